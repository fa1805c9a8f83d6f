//! Inputs at the edges of what the model takes, on every architecture: a one-token prompt (one key,
//! whose size-1 dimension candle gives an arbitrary stride) through the prefill and the decoding
//! kernels, against the composed ops of the GPU's code path; and a full context, exactly
//! `max_position_embeddings` tokens, scored, trained on and decoded to its last position.
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

fn argmax(xs: &[f32]) -> u32 {
    xs.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

#[test]
fn one_token_prompts_run_on_every_architecture_and_match_the_composed_ops() {
    for name in common::MODELS {
        let p = common::load(name);
        let fused = last_logits(&p, &[5]);
        let composed = {
            let _portable = PortableScope::new(true);
            last_logits(&p, &[5])
        };
        let diff = common::max_abs_diff(&fused, &composed);
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
        let best = argmax(&full);
        assert_eq!(
            best, out.tokens[0][3],
            "{name}: greedy step 4 with and without the cache"
        );
    }
}

/// A full context: exactly `max_position_embeddings` tokens, the last position the model was
/// trained for. Scoring (fused and composed agree), training (every gradient finite), and
/// decoding up to that position with the cache all work; one token past it, GPT-2 (learned
/// positions) answers with an error, never a panic, while RoPE models go on, as transformers does.
#[test]
fn a_full_context_scores_trains_and_decodes_on_every_architecture() {
    use preftune_model::{LoadOptions, Pretrained};
    for name in common::MODELS {
        let opts = LoadOptions {
            trainable: true,
            ..Default::default()
        };
        let p = Pretrained::load(&common::tiny(name), &opts).unwrap();
        let max = p.model.cfg.max_position_embeddings;
        let ids: Vec<u32> = (0..max as u32).map(|i| 5 + (i * 7) % 50).collect();

        // Scoring the whole context, on both code paths.
        let fused = last_logits(&p, &ids);
        let composed = {
            let _portable = PortableScope::new(true);
            last_logits(&p, &ids)
        };
        let diff = common::max_abs_diff(&fused, &composed);
        assert!(fused.iter().all(|x| x.is_finite()), "{name}");
        assert!(diff < 1e-4, "{name}: full-context logits differ by {diff}");

        // A training step over the whole context: every parameter gets a finite gradient.
        let x = common::row(&ids);
        let mut score = vec![1u32; max];
        score[0] = 0;
        let score = common::row(&score);
        let h = p.model.forward(&x, None, None, None).unwrap();
        let loss = common::neg_logprob_sum(&p, &h, &x, &score);
        let grads = loss.backward().unwrap();
        common::assert_gradients(&p, &grads, name, false);

        // Decoding the last two positions with the cache matches a full forward.
        let cfg = SamplingConfig {
            max_new_tokens: 2,
            min_new_tokens: 2,
            temperature: 0.0,
            ..Default::default()
        };
        let prompt = ids[..max - 2].to_vec();
        let out = generate(&p.model, std::slice::from_ref(&prompt), &cfg).unwrap();
        assert_eq!(out.tokens[0].len(), 2, "{name}");
        let mut seen = prompt.clone();
        seen.push(out.tokens[0][0]);
        let full = last_logits(&p, &seen);
        let best = argmax(&full);
        assert_eq!(
            best, out.tokens[0][1],
            "{name}: the last position, cached or not"
        );

        // One past the context.
        let over: Vec<u32> = (0..=max as u32).map(|i| 5 + i % 50).collect();
        let r = p.model.forward(&common::row(&over), None, None, None);
        let cfg4 = SamplingConfig {
            max_new_tokens: 4,
            min_new_tokens: 4,
            ..cfg.clone()
        };
        let g = generate(&p.model, &[prompt], &cfg4);
        if name == "tiny-gpt2" {
            let e = r.expect_err("GPT-2 has no position 256").to_string();
            assert!(
                e.contains("exceeds the model's 256 learned positions"),
                "{e}"
            );
            assert!(g.is_err(), "{name}: decoding past the context");
        } else {
            r.unwrap();
            assert_eq!(g.unwrap().tokens[0].len(), 4, "{name}");
        }
    }
}

/// Decoding a padded batch with the cache on the GPU's code path (composed ops, the cache's
/// strided views read in place, under bf16 one bf16 copy per weight) gives the CPU kernels'
/// tokens and log-probs, in f32 and with bf16 products, on every architecture.
///
/// With bf16 products the two agree more loosely: the composed product stores its output in bf16
/// (as PyTorch's autocast does), where the CPU's GEMM hands back its f32 sums. The tiny models'
/// near-uniform distributions then break ties differently now and then, so in bf16 each row is
/// compared up to its first differing token.
#[test]
fn decoding_a_padded_batch_matches_the_composed_ops_in_f32_and_bf16() {
    let cfg = SamplingConfig {
        max_new_tokens: 6,
        min_new_tokens: 6,
        temperature: 0.0,
        ..Default::default()
    };
    let prompts = [vec![5, 9, 17, 3, 22], vec![7, 11]];
    for name in common::MODELS {
        let p = common::load(name);
        for bf16 in [false, true] {
            let _bf16 = preftune_model::ops::Bf16Scope::new(bf16);
            let fused = generate(&p.model, &prompts, &cfg).unwrap();
            let composed = {
                let _portable = PortableScope::new(true);
                generate(&p.model, &prompts, &cfg).unwrap()
            };
            if !bf16 {
                assert_eq!(fused.tokens, composed.tokens, "{name}");
            }
            let mut compared = 0;
            for r in 0..prompts.len() {
                let (ta, tb) = (&fused.tokens[r], &composed.tokens[r]);
                let same = ta.iter().zip(tb).take_while(|(a, b)| a == b).count();
                let n = (same + 1).min(ta.len());
                let diff =
                    common::max_abs_diff(&fused.logprobs[r][..n], &composed.logprobs[r][..n]);
                let tol = if bf16 { 0.1 } else { 1e-4 };
                assert!(
                    diff < tol,
                    "{name}, bf16 {bf16}: log-probs differ by {diff}"
                );
                compared += same;
            }
            assert!(
                compared >= 2,
                "{name}, bf16 {bf16}: {compared} tokens agree"
            );
        }
    }
}

/// A sampling loop under bf16 on the GPU's code path keeps its KV cache in bf16, half the f32
/// cache's bytes, and its decoding steps' logits stay within bf16's rounding of the full forward
/// pass over the same tokens (which stores no cache).
#[test]
fn a_bf16_sampling_loop_on_the_gpu_path_keeps_a_bf16_cache() {
    let ids = [5u32, 9, 17, 3, 22, 8, 14];
    let (prompt, steps) = ids.split_at(4);
    let dev = Device::Cpu;
    for name in common::MODELS {
        let p = common::load(name);
        let _portable = PortableScope::new(true);
        let decode = |bf16: bool| {
            let _bf16 = preftune_model::ops::Bf16Scope::new(bf16);
            let _packed = preftune_model::ops::PackedWeights::new();
            let mut cache = preftune_model::KvCache::new(p.model.cfg.num_layers);
            let x = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
            p.model.forward(&x, None, None, Some(&mut cache)).unwrap();
            let mut last = Vec::new();
            for &id in steps {
                let x = Tensor::new(&[id], &dev).unwrap().unsqueeze(0).unwrap();
                let h = p.model.forward(&x, None, None, Some(&mut cache)).unwrap();
                let l = p.model.logits(&h).unwrap().to_dtype(DType::F32).unwrap();
                last = l.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            }
            let full = last_logits(&p, &ids);
            (cache.bytes(), last, full)
        };
        let (f32_bytes, f32_last, f32_full) = decode(false);
        let (bf16_bytes, bf16_last, bf16_full) = decode(true);
        assert_eq!(2 * bf16_bytes, f32_bytes, "{name}: a bf16 cache");
        assert!(
            common::max_abs_diff(&f32_last, &f32_full) < 1e-4,
            "{name}: an f32 cache decodes as the full forward pass"
        );
        // Bars: within 6% of the largest logit, and at most twice (plus 0.02) what bf16 products
        // already cost the full pass against f32. Gemma 2's soft caps put it at 5.1%; the
        // others at 0.6-1.5%.
        let spread = f32_full.iter().fold(0f32, |m, x| m.max(x.abs()));
        let products = common::max_abs_diff(&bf16_full, &f32_full);
        let diff = common::max_abs_diff(&bf16_last, &bf16_full);
        assert!(
            diff < (0.06 * spread).min(2.0 * products + 0.02),
            "{name}: the bf16 cache's logits differ by {diff} (largest logit {spread}, bf16 \
             products against f32 {products})"
        );
        assert!(diff > 0.0, "{name}: the bf16 cache rounds keys and values");
    }
}

/// Fixed-shape decoding steps (the step a CUDA graph replays: keys and values written at a
/// position read from the device, attention over the whole capacity under a mask) draw the
/// growing cache's tokens with its log-probs, on every architecture, on the GPU's code path and
/// with the CPU kernels, in f32 and (on the GPU's path) under bf16: a left-padded batch with a
/// repeated prompt, draws at T > 0, sliding windows shorter than the sequences (Gemma), and rows
/// that finish and leave the batch. Mixtures of experts route on the host with the CPU kernels and
/// on the device on the GPU's path (nothing read back, as a graph needs).
#[test]
fn fixed_shape_decoding_steps_draw_the_growing_caches_tokens() {
    use preftune_model::decode_graph::{DecodeSteps, Force};
    let prompts = vec![
        vec![5u32, 9, 17, 3, 22],
        vec![8, 14],
        vec![5, 9, 17, 3, 22],
        vec![30, 2, 7],
    ];
    let mut left = 0;
    for name in common::MODELS {
        let p = common::load(name);
        // A quarter of the vocabulary ends a row: most rows finish, at different steps.
        let eos: Vec<u32> = (0..p.model.cfg.vocab_size as u32 / 4).collect();
        for (portable, bf16) in [(false, false), (true, false), (true, true)] {
            let _portable = PortableScope::new(portable);
            let _bf16 = preftune_model::ops::Bf16Scope::new(bf16);
            let cfg = SamplingConfig {
                max_new_tokens: 12,
                min_new_tokens: 2,
                temperature: 0.8,
                seed: 4,
                eos_token_ids: eos.clone(),
                ..Default::default()
            };
            let run = |mode| {
                let _mode = Force::new(mode);
                generate(&p.model, &prompts, &cfg).unwrap()
            };
            let (grow, fixed) = (run(DecodeSteps::Growing), run(DecodeSteps::Fixed));
            // Off a GPU, graphs mean the same fixed-shape steps, run eagerly.
            assert_eq!(fixed.tokens, run(DecodeSteps::Graphs).tokens);
            let what = format!("{name} (portable {portable}, bf16 {bf16})");
            assert_eq!(grow.fixed_steps, 0, "{what}");
            let steps = fixed.tokens.iter().map(Vec::len).max().unwrap() - 1;
            assert_eq!(fixed.fixed_steps, steps, "{what}");
            assert_eq!(grow.tokens, fixed.tokens, "{what}");
            assert_eq!(grow.decode_rows, fixed.decode_rows, "{what}");
            for (a, b) in grow.logprobs.iter().zip(&fixed.logprobs) {
                let tol = if bf16 { 2e-3 } else { 1e-4 };
                assert!(common::max_abs_diff(a, b) < tol, "{what}: {a:?} {b:?}");
            }
            left += (fixed.decode_rows < steps * prompts.len()) as usize;
        }
    }
    assert!(left > 0, "no row left a batch early");
    // While LoRA dropout draws masks (a training step's passes), a replay would repeat one
    // step's masks: such loops keep the growing cache.
    let p = common::load("tiny-llama");
    p.model.set_lora_dropout_seed(Some(1));
    let _mode = Force::new(DecodeSteps::Fixed);
    let cfg = SamplingConfig {
        max_new_tokens: 4,
        ..Default::default()
    };
    assert_eq!(generate(&p.model, &prompts, &cfg).unwrap().fixed_steps, 0);
    p.model.set_lora_dropout_seed(None);
    assert_eq!(generate(&p.model, &prompts, &cfg).unwrap().fixed_steps, 3);
}

/// Continuous batching (`max_num_seqs`): with room for every prompt the loop is the unbounded
/// one, bit for bit; with less, waiting prompts join the running batch as rows finish (after a
/// shared prefix too), at most `max_num_seqs` rows run a step, and greedy rows decode what they
/// decode in the full batch, on every architecture, with the CPU kernels and on the GPU's path.
#[test]
fn waiting_prompts_join_the_batch_as_rows_finish() {
    let short: Vec<Vec<u32>> = vec![
        vec![5, 9, 17, 3, 22],
        vec![8, 14],
        vec![5, 9, 17, 3, 22],
        vec![30, 2, 7],
        vec![11, 4, 6, 19, 25, 1, 3],
        vec![2],
        vec![8, 14],
        vec![40, 41, 42],
    ];
    // The same prompts after a 17-token preprompt: one prefill of it, copied to each admission.
    let pre: Vec<Vec<u32>> = short
        .iter()
        .map(|p| (20..37).chain(p.iter().copied()).collect())
        .collect();
    let (mut joined, mut wide) = (0, 0);
    for name in common::MODELS {
        let p = common::load(name);
        // A quarter of the vocabulary ends a row: rows finish at different steps.
        let eos: Vec<u32> = (0..p.model.cfg.vocab_size as u32 / 4).collect();
        for portable in [false, true] {
            let _portable = PortableScope::new(portable);
            for prompts in [&short, &pre] {
                let what = format!("{name} (portable {portable}, {} tokens)", prompts[0].len());
                let greedy = SamplingConfig {
                    max_new_tokens: 10,
                    temperature: 0.0,
                    eos_token_ids: eos.clone(),
                    ..Default::default()
                };
                let all = generate(&p.model, prompts, &greedy).unwrap();
                let roomy = SamplingConfig {
                    max_num_seqs: prompts.len(),
                    ..greedy.clone()
                };
                let same = generate(&p.model, prompts, &roomy).unwrap();
                assert_eq!(same.tokens, all.tokens, "{what}");
                assert_eq!(same.logprobs, all.logprobs, "{what}");
                assert_eq!(same.decode_rows, all.decode_rows, "{what}");
                // Rows done at their first token leave before the first decoding step.
                assert!(all.peak_rows <= prompts.len(), "{what}");
                wide = wide.max(all.peak_rows);
                for cap in [1, 3] {
                    let cfg = SamplingConfig {
                        max_num_seqs: cap,
                        ..greedy.clone()
                    };
                    let g = generate(&p.model, prompts, &cfg).unwrap();
                    let what = format!("{what}, max_num_seqs {cap}");
                    assert!(g.peak_rows >= 1 && g.peak_rows <= cap, "{what}");
                    assert_eq!(g.tokens, all.tokens, "{what}");
                    assert_eq!(g.finished, all.finished, "{what}");
                    for (a, b) in g.logprobs.iter().zip(&all.logprobs) {
                        assert!(common::max_abs_diff(a, b) < 1e-4, "{what}: {a:?} {b:?}");
                    }
                    // Each row decodes once per token it makes, after its first.
                    let rows: usize = g.tokens.iter().map(|t| t.len().max(1) - 1).sum();
                    assert!(g.decode_rows >= rows, "{what}");
                    joined += 1;
                }
            }
        }
    }
    // Somewhere the unbounded loop ran more rows than the bounded ones may.
    assert!(joined > 0 && wide > 3, "{wide}");
}

/// Draws at T > 0 with rows joining: reproducible, each row holds EOS back until its own
/// `min_new_tokens` (rows that joined later are still held when earlier ones are not), and the
/// device's draws are the host's.
#[test]
fn joining_rows_draw_alike_on_the_host_and_the_device() {
    use preftune_model::{generate_on, DrawOn};
    let prompts: Vec<Vec<u32>> = (0..9u32).map(|i| vec![3 + i, 7, 11 + 2 * i]).collect();
    for name in ["tiny-llama", "tiny-gemma3", "tiny-qwen2moe"] {
        let p = common::load(name);
        let eos: Vec<u32> = (0..p.model.cfg.vocab_size as u32 / 3).collect();
        let cfg = SamplingConfig {
            max_new_tokens: 12,
            min_new_tokens: 3,
            temperature: 0.8,
            seed: 5,
            eos_token_ids: eos.clone(),
            max_num_seqs: 3,
            ..Default::default()
        };
        let host = generate_on(&p.model, &prompts, &cfg, DrawOn::Host).unwrap();
        let again = generate_on(&p.model, &prompts, &cfg, DrawOn::Host).unwrap();
        let device = generate_on(&p.model, &prompts, &cfg, DrawOn::Device).unwrap();
        assert_eq!(host.tokens, again.tokens, "{name}");
        assert_eq!(host.tokens, device.tokens, "{name}");
        for (a, b) in host.logprobs.iter().zip(&device.logprobs) {
            assert!(common::max_abs_diff(a, b) < 1e-4, "{name}: {a:?} {b:?}");
        }
        assert!(host.peak_rows <= 3, "{name}");
        for t in &host.tokens {
            assert!(t.len() >= 3, "{name}: {t:?}");
            assert!(t[..3].iter().all(|x| !eos.contains(x)), "{name}: {t:?}");
        }
        // Most rows end early on EOS, so later prompts joined while others ran.
        assert!(host.finished.iter().filter(|&&f| f).count() >= 5, "{name}");
    }
}
