//! Inputs at the edges of what the model takes, on every architecture: a one-token prompt (one key,
//! whose size-1 dimension candle gives an arbitrary stride) through the prefill and the decoding
//! kernels, against the composed ops of the GPU's code path.
mod common;

use candle_core::{DType, Device, Tensor};
use preftune_model::kernels::PortableScope;
use preftune_model::{generate, SamplingConfig};

fn last_logits(p: &preftune_model::Pretrained, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = p.model.forward(&x, None, None, None).unwrap();
    let l = p.model.logits(&h).unwrap().to_dtype(DType::F32).unwrap();
    l.squeeze(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn one_token_prompts_run_on_every_architecture_and_match_the_composed_ops() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"] {
        let p = common::load(name);
        let fused = last_logits(&p, &[5]);
        let composed = {
            let _portable = PortableScope::new(true);
            last_logits(&p, &[5])
        };
        let diff = fused
            .iter()
            .zip(&composed)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(fused.iter().all(|x| x.is_finite()), "{name}");
        assert!(diff < 1e-5, "{name}: one-token logits differ by {diff}");
        // Decoding from a one-token prompt: every step attends to few keys.
        let cfg = SamplingConfig {
            max_new_tokens: 4,
            min_new_tokens: 4,
            temperature: 0.0,
            ..Default::default()
        };
        let out = generate(&p.model, &[vec![5]], &cfg).unwrap();
        assert_eq!(out.tokens[0].len(), 4, "{name}");
        // The cache path agrees with a full forward over prompt + generated tokens.
        let mut ids = vec![5];
        ids.extend(&out.tokens[0][..3]);
        let full = last_logits(&p, &ids);
        let best = full
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        assert_eq!(
            best, out.tokens[0][3],
            "{name}: greedy step 4 with and without the cache"
        );
    }
}
