//! Bounded fuzzing of the two model loaders (issue 23, item 6): no GGUF file and no config.json
//! may panic, whatever its bytes or fields. Each case is a valid tiny-llama (GGUF, or an HF folder
//! whose config.json is edited) with seeded mutations: structured ones (a metadata value or a JSON
//! field set to an edge value, removed, or given another type) and raw ones (bit flips, edge
//! integers written at random offsets, cuts, repeated chunks). A case that loads must then run a
//! short forward pass and encode text without panicking too.
//!
//! The case count is bounded for CI (a few seconds each); `PREFTUNE_FUZZ_CASES=N` runs more, and
//! a failure prints the seed that reproduces it (`PREFTUNE_FUZZ_SEED`).
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::GgmlDType;
use common::*;
use preftune_model::{LoadOptions, Pretrained};
use serde_json::{json, Value};

/// xorshift64*: small, seeded, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn cases(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("PREFTUNE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    match std::env::var("PREFTUNE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(s) => s..s + 1,
        None => 1..n + 1,
    }
}

const EDGE_INTS: [u64; 12] = [
    0,
    1,
    2,
    3,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Loads `path`, and if it loads, encodes a text and runs a two-token forward pass: any panic on
/// the way is the failure. Errors are fine.
fn exercise(path: &Path) -> Result<(), String> {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let Ok(p) = Pretrained::load(path, &LoadOptions::default()) else {
            return;
        };
        let _ = p.tokenizer.encode("Hello, world!", true);
        let _ = p
            .model
            .forward(&row(&[0, 1]), None, None, None)
            .and_then(|h| p.model.logits(&h));
    }));
    r.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// A copy of the fixture `model` whose files are links but `file`, which is written from the
/// fixture's JSON (returned, for mutating).
fn fixture_but(model: &str, file: &str) -> (tempfile::TempDir, Value) {
    let src = tiny(model);
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap();
        if name != file {
            std::os::unix::fs::symlink(&f, dir.path().join(name)).unwrap();
        }
    }
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(file)).unwrap()).unwrap();
    std::fs::write(dir.path().join(file), base.to_string()).unwrap();
    (dir, base)
}

/// Fails listing every case that panicked.
fn assert_no_panics(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} panics:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn edge_gvalue(rng: &mut Rng) -> GValue {
    let x = EDGE_INTS[rng.below(EDGE_INTS.len())];
    match rng.below(12) {
        0 => GValue::U32(x as u32),
        1 => GValue::I32(x as i32),
        2 => GValue::U64(x),
        3 => GValue::I64(x as i64),
        4 => GValue::F32([f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30, 0.5][rng.below(6)]),
        5 => GValue::F64([f64::NAN, f64::NEG_INFINITY, -1e300, 1e300][rng.below(4)]),
        6 => GValue::U8(x as u8),
        7 => GValue::Bool(rng.below(2) == 1),
        8 => GValue::String(["", "llama", "gpt2", "\u{0}", "a b c"][rng.below(5)].into()),
        9 => GValue::Array(vec![]),
        10 => GValue::Array(vec![GValue::U32(x as u32); rng.below(4)]),
        _ => GValue::I8(x as i8),
    }
}

/// Raw mutations of a file's bytes.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len());
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => {
                let v = EDGE_INTS[rng.below(EDGE_INTS.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in v[..w].iter().enumerate() {
                    if let Some(x) = bytes.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            2 => bytes.truncate(at),
            3 => {
                let end = (at + 1 + rng.below(64)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                bytes.splice(at..at, chunk);
            }
            _ => {
                let end = (at + 1 + rng.below(64)).min(bytes.len());
                bytes.drain(at..end);
            }
        }
        if bytes.is_empty() {
            return;
        }
    }
}

#[test]
fn no_gguf_file_panics_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let (md, qt) = tiny_llama_gguf_parts(GgmlDType::Q8_0);
    let seed_path = dir.path().join("seed.gguf");
    write_gguf(&seed_path, &md, &qt);
    let seed_bytes = std::fs::read(&seed_path).unwrap();
    // The unmutated file loads: the mutations start from a real model.
    exercise(&seed_path).unwrap();
    assert!(Pretrained::load(&seed_path, &LoadOptions::default()).is_ok());

    let path = dir.path().join("case.gguf");
    let mut failures = vec![];
    for seed in cases(1000) {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        if rng.below(2) == 0 {
            // Structured: edit, drop or retype metadata, then write a well-formed file.
            let mut md = md.clone();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(md.len());
                match rng.below(4) {
                    0 => {
                        md.remove(i);
                    }
                    _ => md[i].1 = edge_gvalue(&mut rng),
                }
            }
            // Tensors may lose their neighbours too.
            let mut qt_case: Vec<_> = qt.iter().map(|(n, t)| (n.clone(), t)).collect();
            if rng.below(4) == 0 {
                qt_case.remove(rng.below(qt_case.len()));
            }
            let mdr: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tr: Vec<(&str, &candle_core::quantized::QTensor)> =
                qt_case.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let mut f = std::fs::File::create(&path).unwrap();
            candle_core::quantized::gguf_file::write(&mut f, &mdr, &tr).unwrap();
        } else {
            let mut bytes = seed_bytes.clone();
            mutate_bytes(&mut rng, &mut bytes);
            std::fs::write(&path, &bytes).unwrap();
        }
        if let Err(msg) = exercise(&path) {
            failures.push(format!("PREFTUNE_FUZZ_SEED={seed}: {msg}"));
        }
    }
    assert_no_panics(&failures);
}

fn edge_json(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!(1e300),
        6 => json!(0.5),
        7 => json!(-0.0),
        8 => json!("x"),
        9 => Value::Null,
        10 => json!([]),
        11 => json!({"rope_type": "llama3", "factor": 0.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 1.0, "original_max_position_embeddings": 0.0}),
        12 => json!(true),
        _ => json!(EDGE_INTS[rng.below(EDGE_INTS.len())]),
    }
}

#[test]
fn no_config_json_panics_the_loader() {
    const KEYS: [&str; 32] = [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "layer_norm_epsilon",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "hidden_act",
        "activation_function",
        "sliding_window",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "n_inner",
        "n_positions",
        "attention_bias",
        // Mixtures of experts.
        "num_local_experts",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "mlp_only_layers",
        "shared_expert_intermediate_size",
        "router_aux_loss_coef",
    ];
    let mut failures = vec![];
    for model in MODELS {
        let (dir, base) = fixture_but(model, "config.json");
        exercise(dir.path()).unwrap();
        for seed in cases(300) {
            let mut rng = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
            let mut cfg = base.clone();
            let obj = cfg.as_object_mut().unwrap();
            for _ in 0..1 + rng.below(3) {
                let key = KEYS[rng.below(KEYS.len())];
                match rng.below(5) {
                    0 => {
                        obj.remove(key);
                    }
                    _ => {
                        obj.insert(key.into(), edge_json(&mut rng));
                    }
                }
            }
            let text = if rng.below(8) == 0 {
                let mut bytes = cfg.to_string().into_bytes();
                mutate_bytes(&mut rng, &mut bytes);
                bytes
            } else {
                cfg.to_string().into_bytes()
            };
            std::fs::write(dir.path().join("config.json"), text).unwrap();
            if let Err(msg) = exercise(dir.path()) {
                failures.push(format!("{model} PREFTUNE_FUZZ_SEED={seed}: {msg}"));
            }
        }
    }
    assert_no_panics(&failures);
}

/// What the fuzzing found, as errors that name the file and the field.
#[test]
fn crafted_sizes_are_errors_naming_the_field() {
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny("tiny-llama").join("config.json")).unwrap(),
    )
    .unwrap();
    let path = Path::new("crafted/config.json");
    for (key, value, want) in [
        (
            "head_dim",
            json!(u64::MAX),
            "head_dim: must be in 1..=1048576",
        ),
        (
            "num_hidden_layers",
            json!(i64::MAX),
            "num_hidden_layers: must be in 1..=4096",
        ),
        (
            "vocab_size",
            json!(0),
            "vocab_size: must be in 1..=16777216, found 0",
        ),
        (
            "max_position_embeddings",
            json!(1u64 << 40),
            "max_position_embeddings: must be in",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": -1.0}),
            "rope_theta: must be a finite number > 0",
        ),
        (
            "rms_norm_eps",
            json!(-1e-6),
            "rms_norm_eps: must be a finite number >= 0, found -0.000001",
        ),
    ] {
        let mut cfg = base.clone();
        cfg[key] = value;
        let e = preftune_model::config::ModelConfig::from_json(cfg, path)
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"))
            .to_string();
        assert!(
            e.contains(want) && e.contains("crafted/config.json"),
            "{key}: {e}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let (md, qt) = tiny_llama_gguf_parts(GgmlDType::F32);
    for (key, value, want) in [
        (
            "llama.embedding_length",
            GValue::U32(0),
            "must be an integer in 1..=1048576, found 0",
        ),
        (
            "llama.block_count",
            GValue::U64(1 << 40),
            "llama.block_count: must be an integer in",
        ),
        (
            "llama.attention.head_count",
            GValue::F32(2.5),
            "must be an integer in",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GValue::F32(f32::NAN),
            "finite number",
        ),
        (
            "tokenizer.ggml.bos_token_id",
            GValue::U32(1 << 20),
            "must be a token id below",
        ),
    ] {
        let mut md = md.clone();
        md.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
        let path = dir.path().join("crafted.gguf");
        write_gguf(&path, &md, &qt);
        let e = Pretrained::load(&path, &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"))
            .to_string();
        assert!(e.contains(want) && e.contains("crafted.gguf"), "{key}: {e}");
    }
}

/// Tensor bytes at any alignment: an empty buffer (whose pointer is 1), bytes at an odd offset,
/// and too few bytes. Reinterpreting them in place was undefined behaviour (an abort under the
/// test profile's checks); they are copied now, and a short buffer is an error.
#[test]
fn tensor_bytes_load_at_any_alignment() {
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::Device;
    let dev = Device::Cpu;
    let empty = qtensor_from_ggml(GgmlDType::F32, &[], vec![0], &dev).unwrap();
    assert_eq!(empty.shape().elem_count(), 0);
    let values = [1.5f32, -2.25, 3.0];
    let mut bytes = vec![0u8];
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    let odd = &bytes[1..];
    assert_eq!(odd.as_ptr() as usize % 4, (bytes.as_ptr() as usize + 1) % 4);
    let t = qtensor_from_ggml(GgmlDType::F32, odd, vec![3], &dev).unwrap();
    let got: Vec<f32> = t.dequantize(&dev).unwrap().to_vec1().unwrap();
    assert_eq!(got, values);
    // Q8_0 blocks (34 bytes, an f16 scale first) at an odd offset.
    let mut q = vec![0u8];
    q.extend([0x00, 0x3c]); // scale 1.0
    q.extend((0..32).map(|i| i as u8));
    let t = qtensor_from_ggml(GgmlDType::Q8_0, &q[1..], vec![32], &dev).unwrap();
    let got: Vec<f32> = t.dequantize(&dev).unwrap().to_vec1().unwrap();
    assert_eq!(got, (0..32).map(|i| i as f32).collect::<Vec<_>>());
    let short = qtensor_from_ggml(GgmlDType::F32, &bytes[1..9], vec![3], &dev);
    assert!(short.unwrap_err().to_string().contains("12 needed"));
}

/// Every JSON path (object keys and array indices) of `v` down to `depth`, for structured edits.
fn json_paths(v: &Value, depth: usize, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if depth == 0 {
        return;
    }
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, c)| (k.clone(), c)).collect(),
        // A few entries of long arrays (merges, added tokens): the first, second and last.
        Value::Array(a) => [0, 1, a.len().saturating_sub(1)]
            .into_iter()
            .filter(|&i| i < a.len())
            .map(|i| (i.to_string(), &a[i]))
            .collect(),
        _ => return,
    };
    for (k, c) in children {
        at.push(k);
        out.push(at.clone());
        json_paths(c, depth - 1, at, out);
        at.pop();
    }
}

fn json_at<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Object(m) => m.get_mut(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    })
}

/// A crafted tokenizer.json (values anywhere in its tree replaced or removed, or its bytes
/// mutated) is an error or a working tokenizer, never a panic.
#[test]
fn no_tokenizer_json_panics_the_loader() {
    let mut failures = vec![];
    for model in ["tiny-llama", "tiny-gpt2"] {
        let (dir, base) = fixture_but(model, "tokenizer.json");
        let mut paths = vec![];
        json_paths(&base, 4, &mut vec![], &mut paths);
        exercise(dir.path()).unwrap();
        for seed in cases(300) {
            let mut rng = Rng(seed.wrapping_mul(0x94d0_49bb_1331_11eb) | 1);
            let mut tok = base.clone();
            for _ in 0..1 + rng.below(3) {
                let path = &paths[rng.below(paths.len())];
                let (last, parent) = path.split_last().unwrap();
                if rng.below(5) == 0 {
                    if let Some(Value::Object(m)) = json_at(&mut tok, parent) {
                        m.remove(last);
                    }
                } else if let Some(v) = json_at(&mut tok, path) {
                    *v = edge_json(&mut rng);
                }
            }
            let mut bytes = tok.to_string().into_bytes();
            if rng.below(8) == 0 {
                mutate_bytes(&mut rng, &mut bytes);
            }
            std::fs::write(dir.path().join("tokenizer.json"), bytes).unwrap();
            if let Err(msg) = exercise(dir.path()) {
                failures.push(format!("{model} PREFTUNE_FUZZ_SEED={seed}: {msg}"));
            }
        }
    }
    assert_no_panics(&failures);
}

/// What the tokenizer fuzzing found: a tokenizer.json cut short inside its decoder, on which the
/// tokenizers crate panics (an `expect` in its decoder's deserializer), is an error naming the
/// file, as is a decoder of the wrong type.
#[test]
fn malformed_tokenizer_json_is_an_error_naming_the_file() {
    let src = tiny("tiny-llama");
    let base = std::fs::read_to_string(src.join("tokenizer.json")).unwrap();
    let mut wrong_decoder: Value = serde_json::from_str(&base).unwrap();
    wrong_decoder["decoder"] = json!({"type": 5});
    for (what, text) in [
        (
            "cut short",
            base[..base.find("\"decoder\"").unwrap() + 20].to_string(),
        ),
        ("a decoder of the wrong type", wrong_decoder.to_string()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let tj = dir.path().join("tokenizer.json");
        std::fs::write(&tj, text).unwrap();
        let e = preftune_model::Tokenizer::from_hf_dir(dir.path())
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"))
            .to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("tokenizer"),
            "{what}: {e}"
        );
    }
}
