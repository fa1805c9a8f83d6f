//! `gemv::matmul_t` at the row counts decoding uses, on SmolLM2's LM-head and MLP shapes.
//! `cargo bench -p preftune-kernels --bench gemv`
mod common;
use preftune_kernels::gemv;

fn main() {
    if !gemv::available() {
        eprintln!("gemv: this CPU lacks AVX2/FMA, nothing to measure");
        return;
    }
    for (m, n, k) in [
        (1, 49152, 576),
        (16, 49152, 576),
        (16, 1536, 576),
        (16, 576, 1536),
    ] {
        let x = common::values(m * k, 1);
        let w = common::values(n * k, 2);
        let s = common::median_secs(10, || {
            std::hint::black_box(gemv::matmul_t(&x, m, &w, n, k));
        });
        println!(
            "{{\"kernel\":\"gemv\",\"m\":{m},\"n\":{n},\"k\":{k},\"ms\":{:.3},\"weight_gb_per_s\":{:.1},\"gflops\":{:.1}}}",
            s * 1e3,
            (n * k * 4) as f64 / s / 1e9,
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}
