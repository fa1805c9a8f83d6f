//! SwiGLU.
use super::*;

/// `silu(gate) * up`, the gated MLP's activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::elementwise_applies(gate) && up.dtype() == gate.dtype() {
        return kernels::swiglu(gate, up);
    }
    gate.silu()? * up
}
