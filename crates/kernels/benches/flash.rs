//! Training attention in tiles (`flash`), forward and backward, at SmolLM2's shape: 3 KV groups
//! of 3 query heads, head size 64, causal, batch 4 at 1,024 positions (and 256), with f32
//! products and with bf16 ones (`bf16 = true`; the backend is printed).
//! `cargo bench -p preftune-kernels --bench flash`
mod common;
use preftune_kernels::bf16gemm;
use preftune_kernels::flash::{backward, backward_bf16, forward, forward_bf16, Problem};

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
        let mut stats = vec![0f32; 2 * units * r];
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        for products in ["f32", bf16gemm::backend().name()] {
            let bf16 = products != "f32";
            let fwd = common::median_secs(5, || match bf16 {
                true => forward_bf16(&p, &mut out, &mut stats),
                false => forward(&p, &mut out, &mut stats),
            });
            let bwd = common::median_secs(5, || {
                let saved = (&out[..], &w[..], &stats[..]);
                match bf16 {
                    true => backward_bf16(&p, saved, &mut dq, &mut dk, &mut dv),
                    false => backward(&p, saved, &mut dq, &mut dk, &mut dv),
                }
            });
            // Causal: half the multiply-adds of the full square, for each of the forward's two
            // products and the backward's five (the scores again, dV, dP, dQ, dK).
            let macs = (units * r * t * dh) as f64 / 2.0;
            println!(
                "{{\"kernel\":\"flash\",\"products\":\"{products}\",\"t\":{t},\"forward_ms\":{:.1},\"backward_ms\":{:.1},\"forward_gflops\":{:.1},\"backward_gflops\":{:.1}}}",
                fwd * 1e3,
                bwd * 1e3,
                2.0 * 2.0 * macs / fwd / 1e9,
                5.0 * 2.0 * macs / bwd / 1e9
            );
        }
    }
}
