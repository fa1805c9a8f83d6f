//! Decoding attention for one KV group: SmolLM2's 3 query heads per KV group, head size 64,
//! against 64 to 1,024 cached positions.
//! `cargo bench -p preftune-kernels --bench attention`
mod common;
use preftune_kernels::attention::{attend, Group};

fn main() {
    let (rows, dh) = (3, 64);
    for tk in [64, 256, 1024] {
        let q = common::values(rows * dh, 1);
        let k = common::values(tk * dh, 2);
        let v = common::values(tk * dh, 3);
        let mut out = vec![0f32; rows * dh];
        let reps = 1000;
        let s = common::median_secs(9, || {
            for _ in 0..reps {
                let g = Group {
                    q: &q,
                    k: &k,
                    v: &v,
                    mask: None,
                    scale: 0.125,
                    tk,
                    dh,
                };
                attend(&g, &mut out);
            }
        }) / reps as f64;
        println!(
            "{{\"kernel\":\"attention.attend\",\"rows\":{rows},\"tk\":{tk},\"dh\":{dh},\"us\":{:.2},\"kv_gb_per_s\":{:.1}}}",
            s * 1e6,
            (2 * tk * dh * 4) as f64 / s / 1e9
        );
    }
}
