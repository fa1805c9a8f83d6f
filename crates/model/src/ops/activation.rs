//! SwiGLU and the sigmoids the losses and Qwen2-MoE's shared-expert gate use.
use super::*;

/// `silu(gate) * up`, the gated MLP's activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if kernels::elementwise_applies(gate) && up.dtype() == gate.dtype() {
        return kernels::swiglu(gate, up);
    }
    gate.silu()? * up
}

/// `log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))`, stable for large `|x|`, from candle ops
/// that have a backward. `min(x, 0)` is written `(x - |x|) / 2` so that both kinks at 0 go
/// through the same `abs`: whatever sign candle gives `|x|` at 0, the gradient there is exactly
/// 1/2. With `minimum` (which splits a tie's gradient) it was 1, and DPO's first step, where the
/// policy is the reference bit for bit (reference computed by the same ops, as on a GPU), got
/// every pair's gradient twice over.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    ((x - &abs)? * 0.5)? - (abs.neg()?.exp()? + 1.0)?.log()?
}

/// `sigmoid(x)`, as `exp(log_sigmoid(x))`: stable for large `|x|`, with a backward.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    log_sigmoid(x)?.exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// d/dx log(sigmoid(x)) = sigmoid(-x), at 0 too (the kinks of the stable form cancel there).
    #[test]
    fn log_sigmoid_gradient_is_sigmoid_of_minus_x_at_zero_too() {
        let xs = [0.0f64, -0.0, 2.0, -2.0, 30.0, -30.0];
        let x = Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let v: Vec<f64> = y.to_vec1().unwrap();
        for ((&x, &g), &v) in xs.iter().zip(&g).zip(&v) {
            let s = 1.0 / (1.0 + x.exp());
            assert!((g - s).abs() < 1e-12, "x = {x}: gradient {g}, want {s}");
            assert!(
                (v - (1.0 / (1.0 + (-x).exp())).ln()).abs() < 1e-12,
                "x = {x}: {v}"
            );
        }
    }
}
