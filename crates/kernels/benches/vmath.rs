//! Vectorised exp over an LM head's row of logits (49,152), as sampling and log-probs use it,
//! and the faster one over attention's key tiles (rows of 128).
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
    let n = 128;
    let x: Vec<f32> = common::values(n, 4)
        .iter()
        .map(|v| -8.0 * v.abs())
        .collect();
    let mut y = x.clone();
    let reps = 100_000;
    let s = common::median_secs(9, || {
        for _ in 0..reps {
            y.copy_from_slice(&x);
            std::hint::black_box(vmath::exp_shifted_fast(&mut y, 0.5, 0.25));
        }
    }) / reps as f64;
    println!(
        "{{\"kernel\":\"vmath.exp_shifted_fast\",\"avx512\":{},\"n\":{n},\"us\":{:.3},\"gelem_per_s\":{:.2}}}",
        vmath::available(),
        s * 1e6,
        n as f64 / s / 1e9
    );
}
