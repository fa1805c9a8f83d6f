//! Vectorised exp over an LM head's row of logits (49,152), as sampling and log-probs use it.
//! `cargo bench -p preftune-kernels --bench vmath`
mod common;
use preftune_kernels::vmath;

fn main() {
    let n = 49152;
    let x = common::values(n, 3);
    let mut y = x.clone();
    let reps = 2000;
    let s = common::median_secs(9, || {
        for _ in 0..reps {
            y.copy_from_slice(&x);
            let max = vmath::max(&y);
            std::hint::black_box(vmath::exp_shifted(&mut y, max));
        }
    }) / reps as f64;
    println!(
        "{{\"kernel\":\"vmath.exp_shifted\",\"avx512\":{},\"n\":{n},\"us\":{:.2},\"gelem_per_s\":{:.2}}}",
        vmath::available(),
        s * 1e6,
        n as f64 / s / 1e9
    );
}
