//! LoRA dropout over one adapted linear's input at SmolLM2's MLP width (8 x 128 rows of 1,536),
//! on one thread: the counter-based stream's draws and the multiply.
//! `cargo bench -p preftune-kernels --bench rng`
mod common;
use preftune_kernels::rng;

fn main() {
    let n = 8 * 128 * 1536;
    let x = common::values(n, 7);
    let mut y = x.clone();
    let key = rng::stream_key(1, 2);
    let s = common::median_secs(9, || {
        y.copy_from_slice(&x);
        rng::dropout(key, 0, 0.05, 1.0 / 0.95, &mut y);
        std::hint::black_box(&y);
    });
    println!(
        "{{\"kernel\":\"rng.dropout\",\"n\":{n},\"ms\":{:.3},\"gelem_per_s\":{:.3}}}",
        s * 1e3,
        n as f64 / s / 1e9
    );
}
