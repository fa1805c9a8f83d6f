//! Training attention in tiles (`flash`), forward and backward, at SmolLM2's shape: 3 KV groups
//! of 3 query heads, head size 64, causal, batch 4 at 1,024 positions (and 256).
//! `cargo bench -p preftune-kernels --bench flash`
mod common;
use preftune_kernels::flash::{backward, forward, Problem};

fn main() {
    let (b, groups, heads, dh) = (4, 3, 3, 64);
    for t in [256, 1024] {
        let (units, r) = (b * groups, heads * t);
        let q = common::values(units * r * dh, 1);
        let k = common::values(units * t * dh, 2);
        let v = common::values(units * t * dh, 3);
        let w = common::values(units * r * dh, 4);
        let mut mask = vec![0f32; b * t * t];
        for (i, row) in mask.chunks_exact_mut(t).enumerate() {
            row[i % t + 1..].fill(-1e9);
        }
        let p = Problem {
            q: &q,
            k: &k,
            v: &v,
            mask: Some(&mask),
            groups,
            r,
            t,
            tk: t,
            dh,
            scale: 0.125,
        };
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; units * r];
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let fwd = common::median_secs(5, || forward(&p, &mut out, &mut lse));
        let bwd = common::median_secs(5, || {
            backward(&p, (&out, &w, &lse), &mut dq, &mut dk, &mut dv)
        });
        // Causal: half the products of the full square (2 in the forward, 4 in the backward).
        let flops = (units * r * t * dh) as f64; // one multiply-add per query row, key and dim
        println!(
            "{{\"kernel\":\"flash\",\"t\":{t},\"forward_ms\":{:.1},\"backward_ms\":{:.1},\"forward_gflops\":{:.1},\"backward_gflops\":{:.1}}}",
            fwd * 1e3,
            bwd * 1e3,
            2.0 * flops / fwd / 1e9,
            4.0 * flops / bwd / 1e9
        );
    }
}
