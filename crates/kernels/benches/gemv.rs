//! `gemv::matmul_t`'s kernels at the row counts decoding uses (1 to 32), on SmolLM2's LM-head
//! and MLP shapes, timed in turn within each round so that a busy machine slows them alike.
//! `cargo bench -p preftune-kernels --bench gemv`
mod common;
use preftune_kernels::gemv;
use std::time::Instant;

fn main() {
    let kernels = gemv::kernels();
    if kernels.is_empty() {
        eprintln!("gemv: this CPU lacks AVX2/FMA, nothing to measure");
        return;
    }
    let shapes = [(49152, 576), (1536, 576), (576, 1536)];
    for (m, (n, k)) in [1, 4, 8, 12, 16, 24, 32]
        .into_iter()
        .flat_map(|m| shapes.map(|s| (m, s)))
    {
        let x = common::values(m * k, 1);
        let w = common::values(n * k, 2);
        // Calls per timing: about 2 ms of work at 50 GFLOP/s.
        let calls = (50e6 / (m * n * k) as f64).ceil() as usize;
        let mut secs = vec![Vec::new(); kernels.len()];
        for _round in 0..15 {
            for (t, &kernel) in secs.iter_mut().zip(&kernels) {
                let s = Instant::now();
                for _ in 0..calls {
                    std::hint::black_box(gemv::matmul_t_with(&x, m, &w, n, k, kernel));
                }
                t.push(s.elapsed().as_secs_f64() / calls as f64);
            }
        }
        for (t, &kernel) in secs.iter_mut().zip(&kernels) {
            t.sort_by(f64::total_cmp);
            let s = t[t.len() / 2];
            println!(
                "{{\"kernel\":\"gemv\",\"variant\":\"{kernel:?}\",\"used\":{},\"m\":{m},\"n\":{n},\"k\":{k},\"ms\":{:.3},\"best_ms\":{:.3},\"gflops\":{:.1}}}",
                kernel == gemv::kernel_for(m),
                s * 1e3,
                t[0] * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
}
