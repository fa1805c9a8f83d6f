//! Gemma 2 and Gemma 3 GGUF files as llama.cpp writes them (norms stored as 1 + w, a
//! sentencepiece vocabulary without merges, hyper-parameters under llama.cpp's keys) load to the
//! tokenizer and logits transformers 5.23 gets from the same files; the sentencepiece
//! vocabularies of Llama- and Phi-3-architecture files (merges ranked by scores) to its tokens
//! (`scripts/parity/make_sentencepiece_gguf.py` made both files and the golden).
mod common;

use candle_core::DType;
use common::*;
use preftune_model::{LoadOptions, Pretrained};
use serde_json::Value;

/// Each text encodes to transformers' ids (BOS added) and decodes back to its text.
fn assert_same_tokens(tok: &preftune_model::Tokenizer, golden: &Value, g: &Value, what: &str) {
    for (i, text) in golden["texts"].as_array().unwrap().iter().enumerate() {
        let text = text.as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, ids_of(&g["input_ids"][i]), "{what}: {text:?}");
        let decoded = tok.decode(&got, true).unwrap();
        assert_eq!(
            decoded,
            g["decoded"][i].as_str().unwrap(),
            "{what}: {text:?}"
        );
    }
}

#[test]
fn llama_and_phi3_sentencepiece_vocabularies_match_transformers() {
    let golden = golden("gguf-gemma.json");
    for arch in ["llama", "phi3"] {
        let g = &golden["tokenizers"][arch];
        let path = fixtures().join("models").join(g["file"].as_str().unwrap());
        let tok = preftune_model::gguf::load_gguf_tokenizer(&path).unwrap();
        assert_same_tokens(&tok, &golden, g, arch);
    }
}

#[test]
fn gemma_gguf_matches_transformers_tokens_and_logits() {
    let golden = golden("gguf-gemma.json");
    for arch in ["gemma2", "gemma3"] {
        let g = &golden["models"][arch];
        let path = fixtures().join("models").join(g["file"].as_str().unwrap());
        let p = Pretrained::load(&path, &LoadOptions::default()).unwrap();
        // The sentencepiece vocabulary rebuilt as transformers does: respelled spaces, merges in
        // the file's order, byte fallback, BOS added, control and user-defined tokens whole.
        assert_same_tokens(&p.tokenizer, &golden, g, arch);
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
