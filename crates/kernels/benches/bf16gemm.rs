//! bf16 products with f32 sums: a square 2048^3 product, a training step's shapes and decoding's
//! (16 rows against SmolLM2's LM head and MLP, prepacked as sampling packs them).
//! `cargo bench -p preftune-kernels --bench bf16gemm`
mod common;
use preftune_kernels::bf16gemm::{backend, gemm_nt, gemm_packed, PackedB, View};

fn main() {
    for (m, n, k) in [
        (2048, 2048, 2048),
        (1024, 1536, 576),
        (1024, 576, 1536),
        (8192, 576, 576),
        (8192, 1536, 576),
        (8192, 576, 1536),
        (16, 49152, 576),
        (16, 1536, 576),
        (16, 576, 1536),
    ] {
        let a = common::values(m * k, 1);
        let b = common::values(n * k, 2);
        let mut c = vec![0f32; m * n];
        let reps = if m < 64 { 25 } else { 5 };
        let s = common::median_secs(reps, || {
            gemm_nt(View::rows(&a, m, k), View::rows(&b, n, k), &mut c, false)
        });
        let packed = PackedB::new(View::rows(&b, n, k));
        let sp = common::median_secs(reps, || {
            gemm_packed(View::rows(&a, m, k), &packed, &mut c, false)
        });
        println!(
            "{{\"kernel\":\"bf16gemm\",\"backend\":\"{}\",\"m\":{m},\"n\":{n},\"k\":{k},\"gflops\":{:.1},\"gflops_prepacked\":{:.1},\"ms_prepacked\":{:.3}}}",
            backend().name(),
            2.0 * (m * n * k) as f64 / s / 1e9,
            2.0 * (m * n * k) as f64 / sp / 1e9,
            sp * 1e3
        );
    }
}
