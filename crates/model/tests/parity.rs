//! Parity with transformers on the tiny models: tokenisation, chat template, logits of every
//! position, left-padded batches, log-probs and greedy decoding (goldens in fixtures/golden).
mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use preftune_model::{generate, generate_on, token_logprobs, DrawOn, Message, SamplingConfig};

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    for name in MODELS {
        let p = load(name);
        let g = golden(&format!("logits-{name}.json"));
        for case in g["cases"].as_array().unwrap() {
            let ids = p
                .tokenizer
                .encode(case["text"].as_str().unwrap(), false)
                .unwrap();
            assert_eq!(
                ids,
                ids_of(&case["input_ids"]),
                "{name}: token ids of {:?}",
                case["text"]
            );
            assert_eq!(
                p.tokenizer.decode(&ids, false).unwrap(),
                case["text"].as_str().unwrap(),
                "{name}: decode round trip"
            );
        }
        let gr = &g["greedy"];
        let messages: Vec<Message> = serde_json::from_value(gr["messages"].clone()).unwrap();
        let text = p.tokenizer.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            text,
            gr["prompt_text"].as_str().unwrap(),
            "{name}: chat template text"
        );
        assert_eq!(
            p.tokenizer.encode_chat(&messages, true).unwrap(),
            ids_of(&gr["prompt_ids"]),
            "{name}: chat ids"
        );
    }
}

#[test]
fn logits_and_logprobs_match_transformers() {
    for name in MODELS {
        let p = load(name);
        let g = golden(&format!("logits-{name}.json"));
        for case in g["cases"].as_array().unwrap() {
            let ids = ids_of(&case["input_ids"]);
            let x = row(&ids);
            let hidden = p.model.forward(&x, None, None, None).unwrap();
            let logits = p
                .model
                .logits(&hidden)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let want = case["logits"].as_array().unwrap();
            assert_eq!(logits.len(), want.len());
            for (t, (got, want)) in logits.iter().zip(want).enumerate() {
                let d = max_abs_diff(got, &floats(want));
                assert!(d < 1e-4, "{name}: position {t}: max |logit diff| {d}");
            }
            let mask = Tensor::ones((1, ids.len()), DType::U32, &Device::Cpu).unwrap();
            let lp = token_logprobs(&p.model, &hidden, &x, &mask, 1.0).unwrap();
            let per = lp.per_token.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(per[0], 0.0, "the first token is never scored");
            let d = max_abs_diff(&per[1..], &floats(&case["token_logprobs"]));
            assert!(d < 1e-4, "{name}: token log-probs differ by {d}");
            let sum = lp.sum.to_vec1::<f32>().unwrap()[0];
            let want_sum = case["sum_logprob"].as_f64().unwrap() as f32;
            assert!(
                (sum - want_sum).abs() < 1e-3,
                "{name}: sum_logprob {sum} vs {want_sum}"
            );
        }
    }
}

#[test]
fn left_padded_batch_matches_transformers() {
    for name in MODELS {
        let p = load(name);
        let g = golden(&format!("logits-{name}.json"));
        let bl = &g["batched_left_padded"];
        let rows: Vec<Vec<u32>> = bl["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids_of)
            .collect();
        let mask: Vec<Vec<u32>> = bl["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids_of)
            .collect();
        let (b, t) = (rows.len(), rows[0].len());
        let dev = Device::Cpu;
        let x = Tensor::from_vec(rows.concat(), (b, t), &dev).unwrap();
        let m = Tensor::from_vec(mask.concat(), (b, t), &dev).unwrap();
        // Positions default to cumsum(mask) - 1, as the goldens used.
        let hidden = p.model.forward(&x, Some(&m), None, None).unwrap();
        let logits = p.model.logits(&hidden).unwrap().to_vec3::<f32>().unwrap();
        // Score every real token that has a real token before it.
        let score: Vec<u32> = mask
            .iter()
            .flat_map(|r| (0..t).map(|j| (j > 0 && r[j] == 1 && r[j - 1] == 1) as u32))
            .collect();
        let score = Tensor::from_vec(score, (b, t), &dev).unwrap();
        let lp = token_logprobs(&p.model, &hidden, &x, &score, 1.0)
            .unwrap()
            .per_token
            .to_vec2::<f32>()
            .unwrap();
        for i in 0..b {
            let start = mask[i].iter().position(|&v| v == 1).unwrap();
            let want = bl["logits_nonpad"][i].as_array().unwrap();
            for (k, w) in want.iter().enumerate() {
                let d = max_abs_diff(&logits[i][start + k], &floats(w));
                assert!(d < 1e-4, "{name}: row {i} position {k}: {d}");
            }
            // The first real token has no context inside the row, so it is not scored.
            let d = max_abs_diff(
                &lp[i][start + 1..],
                &floats(&bl["token_logprobs_nonpad"][i]),
            );
            assert!(d < 1e-4, "{name}: row {i} log-probs differ by {d}");
            assert!(
                lp[i][..=start].iter().all(|&v| v == 0.0),
                "{name}: padding and first token unscored"
            );
        }
    }
}

#[test]
fn greedy_decoding_matches_transformers_with_and_without_cache() {
    for name in MODELS {
        let p = load(name);
        let g = golden(&format!("logits-{name}.json"));
        let gr = &g["greedy"];
        for use_cache in [true, false] {
            let cfg = SamplingConfig {
                max_new_tokens: gr["max_new_tokens"].as_u64().unwrap() as usize,
                temperature: 0.0,
                eos_token_ids: vec![],
                pad_token_id: p.pad_token_id(),
                use_cache,
                ..Default::default()
            };
            let out = generate(&p.model, &[ids_of(&gr["prompt_ids"])], &cfg).unwrap();
            assert_eq!(
                out.tokens[0],
                ids_of(&gr["new_token_ids"]),
                "{name}: greedy ids (cache {use_cache})"
            );
            assert!(out.logprobs[0].iter().all(|l| l.is_finite() && *l <= 0.0));
        }
    }
}

#[test]
fn sampling_with_cache_equals_sampling_without() {
    for name in MODELS {
        let p = load(name);
        let prompts: Vec<Vec<u32>> = ["The movie", "A young director wanted to", "We"]
            .iter()
            .map(|t| p.tokenizer.encode(t, false).unwrap())
            .collect();
        let mut outs = vec![];
        for use_cache in [true, false] {
            let cfg = SamplingConfig {
                max_new_tokens: 12,
                min_new_tokens: 2,
                temperature: 0.9,
                top_k: 50,
                top_p: 0.95,
                seed: 11,
                eos_token_ids: p.eos_token_ids(),
                pad_token_id: p.pad_token_id(),
                use_cache,
                max_num_seqs: 0,
            };
            outs.push(generate(&p.model, &prompts, &cfg).unwrap());
        }
        assert_eq!(
            outs[0].tokens, outs[1].tokens,
            "{name}: cached and uncached samples differ"
        );
        assert_eq!(outs[0].finished, outs[1].finished);
        for (a, b) in outs[0].logprobs.iter().zip(&outs[1].logprobs) {
            assert!(max_abs_diff(a, b) < 1e-4);
        }
        assert!(
            outs[0].tokens.iter().all(|t| t.len() >= 2),
            "min_new_tokens holds"
        );
    }
}

#[test]
fn a_shared_prefix_run_once_samples_as_the_whole_batch_does() {
    for name in MODELS {
        let p = load(name);
        let preprompt = "You are a careful assistant. Answer briefly, and refuse what is harmful. ";
        let prompts: Vec<Vec<u32>> = ["The movie", "A young director wanted to", "We", "We"]
            .iter()
            .map(|t| {
                p.tokenizer
                    .encode(&format!("{preprompt}{t}"), false)
                    .unwrap()
            })
            .collect();
        let shared = (0..prompts[2].len())
            .take_while(|&i| prompts.iter().all(|q| q[i] == prompts[0][i]))
            .count();
        assert!(shared >= 16, "{name}: the prompts share {shared} tokens");
        let mut outs = vec![];
        for (use_cache, temperature) in [(true, 0.9), (false, 0.9), (true, 0.0), (false, 0.0)] {
            let cfg = SamplingConfig {
                max_new_tokens: 12,
                temperature,
                seed: 5,
                eos_token_ids: p.eos_token_ids(),
                pad_token_id: p.pad_token_id(),
                use_cache,
                ..Default::default()
            };
            outs.push(generate(&p.model, &prompts, &cfg).unwrap());
        }
        for pair in outs.chunks(2) {
            assert_eq!(pair[0].tokens, pair[1].tokens, "{name}: samples differ");
            assert_eq!(pair[0].finished, pair[1].finished);
            for (a, b) in pair[0].logprobs.iter().zip(&pair[1].logprobs) {
                assert!(max_abs_diff(a, b) < 1e-4, "{name}: log-probs differ");
            }
        }
        // The two identical prompts decode alike, greedily, however they were batched.
        assert_eq!(outs[2].tokens[2], outs[2].tokens[3]);
    }
}

/// Rollouts: identical prompts are prefilled once and finished sequences leave the batch, and
/// neither changes a token against the uncached path, which reruns the whole batch each step.
#[test]
fn rollouts_skip_repeated_prompts_and_finished_rows_without_changing_samples() {
    let step_rows = |g: &preftune_model::Generation| -> usize {
        let longest = g.tokens.iter().map(Vec::len).max().unwrap_or(0);
        g.tokens.len() * longest.saturating_sub(1)
    };
    let (mut cases, mut uneven) = (0, 0);
    for name in MODELS {
        let p = load(name);
        // Each prompt three times, as GRPO's groups, the longest last: when its group ends (as
        // greedy rows 6-8 do at step 1), the leading positions only its rows held go too.
        let texts = ["We", "The movie", "A young director wanted to"];
        let prompts: Vec<Vec<u32>> = texts
            .iter()
            .flat_map(|t| std::iter::repeat_n(p.tokenizer.encode(t, false).unwrap(), 3))
            .collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        for temperature in [0.9, 0.0] {
            let cfg = |eos: Vec<u32>, use_cache| SamplingConfig {
                max_new_tokens: 16,
                temperature,
                seed: 3,
                eos_token_ids: eos,
                pad_token_id: p.pad_token_id(),
                use_cache,
                ..Default::default()
            };
            // End-of-sequence tokens that rows 8, 4 and 0 draw at steps 1, 2 and 3 (a finished
            // row changes the draws of the rows after it only).
            let free = generate(&p.model, &prompts, &cfg(vec![], true)).unwrap();
            let eos: Vec<u32> = [(8, 1), (4, 2), (0, 3)]
                .iter()
                .map(|&(row, step)| free.tokens[row][step])
                .collect();
            let cached = generate(&p.model, &prompts, &cfg(eos.clone(), true)).unwrap();
            let whole = generate(&p.model, &prompts, &cfg(eos, false)).unwrap();
            assert_eq!(cached.tokens, whole.tokens, "{name} at T={temperature}");
            assert_eq!(cached.finished, whole.finished);
            for (a, b) in cached.logprobs.iter().zip(&whole.logprobs) {
                assert!(max_abs_diff(a, b) < 1e-4, "{name}: log-probs differ");
            }
            // Three distinct prompts prefilled, and fewer rows decoded than a fixed batch runs
            // once rows end at different steps.
            assert_eq!(cached.prompt_positions, 3 * longest);
            assert_eq!(whole.prompt_positions, 9 * longest);
            assert_eq!(whole.decode_rows, step_rows(&whole));
            let lens: std::collections::BTreeSet<usize> =
                cached.tokens.iter().map(Vec::len).collect();
            cases += 1;
            uneven += (lens.len() >= 2) as usize;
            // Rows leave once an eighth of the batch has finished: two of these nine, before the
            // longest row's last step.
            let longest_out = cached.tokens.iter().map(Vec::len).max().unwrap_or(0);
            let early = cached
                .tokens
                .iter()
                .filter(|t| t.len() < longest_out)
                .count();
            if early >= 2 {
                assert!(
                    cached.decode_rows < step_rows(&cached),
                    "{name}: {} decoded rows of {}",
                    cached.decode_rows,
                    step_rows(&cached)
                );
            }
        }
    }
    assert!(
        uneven * 2 >= cases,
        "rows ended at different steps in {uneven} of {cases} cases"
    );
}

/// Drawing on the device (as on a GPU: exponentials and block sums where the logits are, one
/// block per row read back) gives the host's tokens and log-probs, greedy and at T = 0.9, with
/// repeated prompts, finished rows and EOS held back by `min_new_tokens`. Top-k asks for the host.
#[test]
fn drawing_on_the_device_gives_the_hosts_tokens() {
    let mut finished = 0;
    for name in MODELS {
        let p = load(name);
        let prompts: Vec<Vec<u32>> = ["We", "The movie", "A young director wanted to"]
            .iter()
            .flat_map(|t| std::iter::repeat_n(p.tokenizer.encode(t, false).unwrap(), 2))
            .collect();
        for temperature in [0.9, 0.0] {
            let cfg = |eos: Vec<u32>| SamplingConfig {
                max_new_tokens: 12,
                min_new_tokens: 2,
                temperature,
                seed: 4,
                eos_token_ids: eos,
                pad_token_id: p.pad_token_id(),
                ..Default::default()
            };
            // EOS: tokens the free run draws at steps 1 (held back) and 3, and row 2's at 5.
            let free = generate(&p.model, &prompts, &cfg(vec![])).unwrap();
            let eos = vec![free.tokens[0][1], free.tokens[1][3], free.tokens[2][5]];
            let host = generate_on(&p.model, &prompts, &cfg(eos.clone()), DrawOn::Host).unwrap();
            let dev = generate_on(&p.model, &prompts, &cfg(eos), DrawOn::Device).unwrap();
            assert_eq!(dev.tokens, host.tokens, "{name} at T={temperature}");
            assert_eq!(dev.finished, host.finished);
            for (a, b) in dev.logprobs.iter().zip(&host.logprobs) {
                assert!(max_abs_diff(a, b) < 1e-4, "{name}: log-probs differ");
            }
            finished += host.finished.iter().filter(|&&f| f).count();
        }
    }
    assert!(
        finished > 0,
        "no row finished: the live-row path went untested"
    );
    let p = load("tiny-llama");
    let top_k = SamplingConfig {
        top_k: 5,
        ..Default::default()
    };
    let e = generate_on(&p.model, &[vec![1, 2]], &top_k, DrawOn::Device).unwrap_err();
    assert!(e.to_string().contains("top-k"), "{e}");
}

#[test]
fn sampling_is_seeded_and_logprobs_match_recomputation() {
    let p = load("tiny-llama");
    let prompts = vec![
        p.tokenizer.encode("The movie was", false).unwrap(),
        p.tokenizer.encode("Last night", false).unwrap(),
    ];
    let cfg = SamplingConfig {
        max_new_tokens: 10,
        temperature: 0.7,
        seed: 5,
        pad_token_id: p.pad_token_id(),
        ..Default::default()
    };
    let a = generate(&p.model, &prompts, &cfg).unwrap();
    let b = generate(&p.model, &prompts, &cfg).unwrap();
    assert_eq!(a.tokens, b.tokens, "same seed, same samples");
    let c = generate(
        &p.model,
        &prompts,
        &SamplingConfig {
            seed: 6,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(a.tokens, c.tokens, "another seed, other samples");
    // Without top-k/top-p, the sampling log-probs are the model's log-probs at temperature 0.7.
    for (prompt, (toks, lps)) in prompts.iter().zip(a.tokens.iter().zip(&a.logprobs)) {
        let ids: Vec<u32> = prompt.iter().chain(toks).copied().collect();
        let x = row(&ids);
        let hidden = p.model.forward(&x, None, None, None).unwrap();
        let mask: Vec<u32> = (0..ids.len()).map(|i| (i >= prompt.len()) as u32).collect();
        let got = token_logprobs(&p.model, &hidden, &x, &row(&mask), 0.7)
            .unwrap()
            .per_token
            .squeeze(0)
            .unwrap();
        let got = got.to_vec1::<f32>().unwrap();
        assert!(max_abs_diff(&got[prompt.len()..], lps) < 1e-4);
    }
}

#[test]
fn mistral_sliding_window_limits_the_receptive_field() {
    let base = load("tiny-llama");
    let ids = base
        .tokenizer
        .encode(
            "A young director wanted to make a film about memory.",
            false,
        )
        .unwrap();
    let mut changed = ids.clone();
    changed[0] = (ids[0] + 1) % 500;
    let logits = |p: &preftune_model::Pretrained, ids: &[u32]| {
        let h = p.model.forward(&row(ids), None, None, None).unwrap();
        p.model
            .logits(&h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let (w, layers) = (4, 2);
    let reach = layers * (w - 1) + 1; // the first position token 0 cannot influence
    assert!(ids.len() > reach + 2);
    let dir = edited("tiny-llama", |c| {
        c["model_type"] = "mistral".into();
        c["sliding_window"] = w.into();
    });
    let m = preftune_model::Pretrained::load(dir.path(), &preftune_model::LoadOptions::default())
        .unwrap();
    let (a, b) = (logits(&m, &ids), logits(&m, &changed));
    for t in reach..ids.len() {
        assert_eq!(
            max_abs_diff(&a[t], &b[t]),
            0.0,
            "position {t} sees past the window"
        );
    }
    let (fa, fb) = (logits(&base, &ids), logits(&base, &changed));
    assert!(
        max_abs_diff(&fa[ids.len() - 1], &fb[ids.len() - 1]) > 1e-3,
        "full attention does see token 0"
    );
    // A window longer than the text changes nothing.
    let wide = edited("tiny-llama", |c| {
        c["model_type"] = "mistral".into();
        c["sliding_window"] = 4096.into();
    });
    let m2 = preftune_model::Pretrained::load(wide.path(), &preftune_model::LoadOptions::default())
        .unwrap();
    assert_eq!(logits(&m2, &ids), fa);
    // Cached decoding respects the window too.
    for use_cache in [true, false] {
        let cfg = SamplingConfig {
            max_new_tokens: 8,
            temperature: 0.0,
            use_cache,
            ..Default::default()
        };
        let out = generate(&m.model, std::slice::from_ref(&ids), &cfg).unwrap();
        let full: Vec<u32> = ids.iter().chain(&out.tokens[0]).copied().collect();
        let lg = logits(&m, &full);
        for (k, &tok) in out.tokens[0].iter().enumerate() {
            let r = &lg[ids.len() - 1 + k];
            let best = (0..r.len()).max_by(|&x, &y| r[x].total_cmp(&r[y])).unwrap() as u32;
            assert_eq!(tok, best, "cache {use_cache}: greedy token {k}");
        }
    }
}

#[test]
fn llama3_rope_scaling_and_mistral_window_match_transformers() {
    // Also Llama 3.2's shape (tied head + Llama 3 RoPE) and Qwen2.5's config keys.
    let g = golden("logits-tiny-variants.json");
    let ids = ids_of(&g["input_ids"]);
    let logits_of = |p: &preftune_model::Pretrained| {
        let h = p.model.forward(&row(&ids), None, None, None).unwrap();
        p.model
            .logits(&h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    for (name, v) in g["variants"].as_object().unwrap() {
        let base = v["base"].as_str().unwrap_or("tiny-llama");
        let plain = logits_of(&load(base));
        let edit = v["config_edit"].as_object().unwrap().clone();
        let dir = edited(base, |c| {
            for (k, x) in &edit {
                c[k] = x.clone();
            }
        });
        let p =
            preftune_model::Pretrained::load(dir.path(), &preftune_model::LoadOptions::default())
                .unwrap();
        let got = logits_of(&p);
        let want = v["logits"].as_array().unwrap();
        let mut worst = 0f32;
        for (t, w) in want.iter().enumerate() {
            worst = worst.max(max_abs_diff(&got[t], &floats(w)));
        }
        assert!(
            worst < 1e-4,
            "{name}: logits differ from transformers by {worst}"
        );
        let moved = plain
            .iter()
            .zip(&got)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        assert!(
            moved > 1e-2,
            "{name}: the variant must change the logits to be a test at all ({moved})"
        );
    }
}

#[test]
fn packed_sequences_do_not_attend_to_each_other() {
    for name in MODELS {
        let p = load(name);
        let a = p.tokenizer.encode("The movie was good.", false).unwrap();
        let b = p
            .tokenizer
            .encode("A young director wanted to make a film.", false)
            .unwrap();
        let alone = |ids: &[u32]| {
            let h = p.model.forward(&row(ids), None, None, None).unwrap();
            p.model
                .logits(&h)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let packed: Vec<u32> = a.iter().chain(&b).copied().collect();
        let pos: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
        let h = p
            .model
            .forward(&row(&packed), None, Some(&row(&pos)), None)
            .unwrap();
        let got = p
            .model
            .logits(&h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (k, want) in alone(&a).iter().chain(alone(&b).iter()).enumerate() {
            let d = max_abs_diff(&got[k], want);
            assert!(d < 1e-4, "{name}: packed position {k} differs by {d}");
        }
    }
}
