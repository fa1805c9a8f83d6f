//! Gemma 2 and Gemma 3 GGUF files as llama.cpp writes them (norms stored as 1 + w, a
//! sentencepiece vocabulary without merges, hyper-parameters under llama.cpp's keys) load to the
//! tokenizer and logits transformers 5.23 gets from the same files
//! (`scripts/parity/make_gemma_gguf.py` made both files and the golden).
mod common;

use candle_core::DType;
use common::*;
use preftune_model::{LoadOptions, Pretrained};

#[test]
fn gemma_gguf_matches_transformers_tokens_and_logits() {
    let golden = golden("gguf-gemma.json");
    let texts: Vec<&str> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for arch in ["gemma2", "gemma3"] {
        let g = &golden["models"][arch];
        let path = fixtures().join("models").join(g["file"].as_str().unwrap());
        let p = Pretrained::load(&path, &LoadOptions::default()).unwrap();
        // The sentencepiece vocabulary rebuilt as transformers does: respelled spaces, merges in
        // the file's order, byte fallback, BOS added, control and user-defined tokens whole.
        for (i, text) in texts.iter().enumerate() {
            let want = ids_of(&g["input_ids"][i]);
            let got = p.tokenizer.encode(text, true).unwrap();
            assert_eq!(got, want, "{arch}: {text:?}");
            let decoded = p.tokenizer.decode(&got, true).unwrap();
            assert_eq!(
                decoded,
                g["decoded"][i].as_str().unwrap(),
                "{arch}: {text:?}"
            );
        }
        // The model: 1 + w norms undone, head size 256, soft-caps (Gemma 2) and the layer pattern.
        let cfg = &p.model.cfg;
        assert_eq!(cfg.query_pre_attn_scalar, 256.0, "{arch}");
        if arch == "gemma2" {
            assert_eq!(cfg.attn_logit_softcapping, Some(50.0));
            assert_eq!(cfg.final_logit_softcapping, Some(30.0));
            assert_eq!(cfg.sliding_layers, vec![true, false]);
        } else {
            assert_eq!(cfg.sliding_window, Some(4));
            assert_eq!(
                cfg.sliding_layers,
                vec![true, true, true, true, true, false]
            );
            assert_eq!(cfg.rope_local_theta, Some(10_000.0));
        }
        let ids = ids_of(&g["logits_input"]);
        let h = p.model.forward(&row(&ids), None, None, None).unwrap();
        let logits = p
            .model
            .logits(&h)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = g["logits"].as_array().unwrap();
        assert_eq!(logits.len(), want.len());
        let worst = logits
            .iter()
            .zip(want)
            .map(|(a, w)| max_abs_diff(a, &floats(w)))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{arch}: logits differ by {worst}");

        // One key/value head (as Gemma 2B has) trains: every parameter gets a gradient.
        let opts = LoadOptions {
            trainable: true,
            ..Default::default()
        };
        let p = Pretrained::load(&path, &opts).unwrap();
        let ids = row(&ids);
        let h = p.model.forward(&ids, None, None, None).unwrap();
        let ones = ids.ones_like().unwrap();
        let loss = neg_logprob_sum(&p, &h, &ids, &ones);
        let grads = p.model.backward(&loss).unwrap();
        assert_gradients(&p, &grads, arch, true);
    }
}
