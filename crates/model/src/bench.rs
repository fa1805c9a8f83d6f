//! The model-layer workloads of `preftune bench` (BENCHMARKS.md): the GEMM rate, a
//! forward+backward step and batched sampling, each reported as one JSON object.
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::{generate, parse_dtype, token_logprobs, LoadOptions, Pretrained, SamplingConfig};

/// What a bench run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// The f32 (or bf16) 2048^3 GEMM rate: the yardstick for model FLOP utilisation.
    Matmul,
    /// One forward+backward step of mean token NLL.
    FwdBwd,
    /// Batched sampling with a KV cache.
    Generate,
    /// A GRPO rollout's sampling: chat prompts, each `num_generations` times, until EOS.
    Rollout,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::Matmul,
        Workload::FwdBwd,
        Workload::Generate,
        Workload::Rollout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Matmul => "matmul",
            Workload::FwdBwd => "fwd-bwd",
            Workload::Generate => "generate",
            Workload::Rollout => "rollout",
        }
    }
}

/// The settings of a bench run (the `preftune bench` flags).
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: PathBuf,
    pub dtype: String,
    /// Sequences per forward+backward step, and their length in tokens.
    pub train_batch: usize,
    pub seq_len: usize,
    /// Timed steps, after one warm-up step.
    pub steps: usize,
    /// Prompts sampled at once, and new tokens per prompt.
    pub gen_batch: usize,
    pub new_tokens: usize,
    /// Samples per prompt (rollout).
    pub num_generations: usize,
    /// Sequences decoding at once in `generate` and `rollout` (0: all).
    pub max_num_seqs: usize,
    /// JSONL with a `prompt` per line (the reference scripts read the same file).
    pub prompts: PathBuf,
    pub composed_ops: bool,
    pub bf16: bool,
    pub gradient_checkpointing: bool,
    /// LoRA rank on every linear (0: full fine-tuning), on the top `lora_layers` layers (0: all).
    pub lora_r: usize,
    pub lora_layers: usize,
}

/// Runs one workload and returns its JSON line.
pub fn run(w: Workload, o: &BenchOptions) -> Result<Value> {
    match w {
        Workload::Matmul => matmul(o.bf16),
        Workload::FwdBwd => fwd_bwd(o),
        Workload::Generate => sample(o),
        Workload::Rollout => rollout(o),
    }
}

fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::Msg(format!("{}:{}: not JSON: {e}", path.display(), i + 1)))?;
        let p = v["prompt"].as_str().ok_or_else(|| {
            Error::Msg(format!(
                "{}:{}: prompt: missing or not a string",
                path.display(),
                i + 1
            ))
        })?;
        out.push(p.to_string());
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

/// The process's peak resident set (`VmHWM`) in MiB; 0 where /proc is missing.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn threads() -> Option<usize> {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
}

/// Training FLOPs per token as PaLM counts them: `6 N` for the weights (the tied LM head counted
/// once, as a matmul; embedding lookups are free) plus `12 L d T` for attention scores and mixing.
fn train_flops_per_token(p: &Pretrained, seq_len: usize) -> f64 {
    let n = p.num_parameters();
    let c = &p.model.cfg;
    6.0 * n as f64 + 12.0 * (c.num_layers * c.num_heads * c.head_dim * seq_len) as f64
}

fn matmul(bf16: bool) -> Result<Value> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let _bf16 = crate::ops::Bf16Scope::new(bf16);
    let mm = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
        if bf16 {
            // The product the bf16 linears run (`x W^T`, both operands row-major).
            crate::ops::bf16_matmul(a, b)
        } else {
            a.matmul(b)
        }
    };
    mm(&a, &b)?;
    let times = (0..5)
        .map(|_| {
            let t = Instant::now();
            mm(&a, &b).map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let gflops = 2.0 * (n as f64).powi(3) / median(times) / 1e9;
    Ok(
        json!({"workload": "matmul", "impl": "preftune", "n": n, "threads": threads(), "gflops": gflops,
                "bf16": bf16, "bf16_gemm": crate::ops::bf16_gemm_name()}),
    )
}

/// Sets the kernels' switches for a model workload; returns the ops label.
fn ops_label(o: &BenchOptions, dtype: DType) -> &'static str {
    crate::kernels::set_fused(!o.composed_ops);
    // The kernels run in f32/f64 only; other dtypes take the composed ops.
    if o.composed_ops || !matches!(dtype, DType::F32 | DType::F64) {
        "composed"
    } else {
        "fused"
    }
}

fn fwd_bwd(o: &BenchOptions) -> Result<Value> {
    let dtype = parse_dtype(&o.dtype)?;
    let prompts = read_prompts(&o.prompts)?;
    let ops = ops_label(o, dtype);
    let _bf16 = crate::ops::Bf16Scope::new(o.bf16);
    let opts = LoadOptions {
        dtype,
        trainable: o.lora_r == 0,
        ..Default::default()
    };
    let mut p = Pretrained::load(&o.model, &opts)?;
    if o.lora_r > 0 {
        let layers = p.model.cfg.num_layers;
        let top = if o.lora_layers == 0 {
            layers
        } else {
            o.lora_layers.min(layers)
        };
        let cfg = crate::lora::LoraConfig {
            r: o.lora_r,
            alpha: 2.0 * o.lora_r as f64,
            dropout: 0.0,
            target_modules: Some(vec!["all-linear".into()]),
            layers_to_transform: Some((layers - top..layers).collect()),
        };
        p.model.add_lora(&cfg, 0)?;
    }
    p.model.set_gradient_checkpointing(o.gradient_checkpointing);
    let text = prompts.join(". ").repeat(1 + o.seq_len / 60);
    let ids = p.tokenizer.encode(&text, false)?;
    if ids.len() < o.seq_len {
        return Err(Error::Msg("bench text too short for --seq-len".into()));
    }
    let row = &ids[..o.seq_len];
    let dev = p.model.device().clone();
    let x = Tensor::from_vec(row.repeat(o.train_batch), (o.train_batch, o.seq_len), &dev)?;
    let mask = Tensor::ones((o.train_batch, o.seq_len), DType::U32, &dev)?;
    let mut times = vec![];
    for step in 0..=o.steps {
        let t = Instant::now();
        let hidden = p.model.forward(&x, None, None, None)?;
        let lp = token_logprobs(&p.model, &hidden, &x, &mask, 1.0)?;
        let loss = (lp.sum.sum_all()? * (-1.0 / (o.train_batch * o.seq_len) as f64))?;
        let grads = p.model.backward(&loss)?;
        drop(grads);
        // GPU work is queued: wait for it before reading the clock.
        dev.synchronize()?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let s = median(times);
    let tokens = (o.train_batch * o.seq_len) as f64;
    let gflops = train_flops_per_token(&p, o.seq_len) * tokens / s / 1e9;
    Ok(
        json!({"workload": "fwd-bwd", "model_gflops_per_s": gflops, "impl": "preftune", "ops": ops,
               "gradient_checkpointing": o.gradient_checkpointing, "lora_r": o.lora_r,
               "lora_layers": o.lora_layers, "dtype": o.dtype, "bf16": o.bf16, "batch": o.train_batch,
               "seq_len": o.seq_len, "threads": threads(), "seconds_per_step": s,
               "tokens_per_s": tokens / s, "peak_rss_mib": peak_rss_mib()}),
    )
}

/// What the sampling workloads start from: the prompts, the ops label and the model loaded in
/// `o`'s dtype; the returned scope keeps `o.bf16` on while it lives.
fn sampling_setup(
    o: &BenchOptions,
) -> Result<(Vec<String>, &'static str, crate::ops::Bf16Scope, Pretrained)> {
    let dtype = parse_dtype(&o.dtype)?;
    let prompts = read_prompts(&o.prompts)?;
    let ops = ops_label(o, dtype);
    let scope = crate::ops::Bf16Scope::new(o.bf16);
    let p = Pretrained::load(
        &o.model,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )?;
    Ok((prompts, ops, scope, p))
}

/// Samples `batch` with `cfg` after a warm-up of 4 tokens (as the reference does), and returns
/// the timed generation with its seconds and how its decoding steps ran, as JSON fields: the
/// fixed-shape steps, this process's CUDA graphs, whether CUDA kernels and cudarc's events were
/// on, and the host<->device traffic per step (zeros off a GPU).
fn timed_generate(
    p: &Pretrained,
    batch: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> Result<(crate::Generation, f64, Value)> {
    let warm = SamplingConfig {
        max_new_tokens: 4,
        min_new_tokens: cfg.min_new_tokens.min(4),
        ..cfg.clone()
    };
    generate(&p.model, batch, &warm)?;
    let before = crate::device::transfer_counts();
    let t = Instant::now();
    let out = generate(&p.model, batch, cfg)?;
    let s = t.elapsed().as_secs_f64();
    let after = crate::device::transfer_counts();
    let steps = out.tokens.iter().map(Vec::len).max().unwrap_or(0).max(1) as f64;
    let per_step = |a: u64, b: u64| (b - a) as f64 / steps;
    let traffic = json!({"h2d_copies": per_step(before.0, after.0), "h2d_bytes": per_step(before.1, after.1),
                         "d2h_copies": per_step(before.2, after.2), "d2h_bytes": per_step(before.3, after.3)});
    let g = crate::decode_graph::stats();
    let dev = p.model.device();
    let fields = json!({"fixed_steps": out.fixed_steps,
                       "cuda_graphs": {"captures": g.captures, "replays": g.replays, "failed": g.failed},
                       "cuda_kernels": crate::kernels::cuda_kernels_apply(dev),
                       "cuda_event_tracking": crate::device::cuda_event_tracking(dev),
                       "transfers_per_step": traffic});
    Ok((out, s, fields))
}

/// The JSON object `line` with the object `fields`' entries added.
fn with_fields(mut line: Value, fields: Value) -> Value {
    if let (Value::Object(m), Value::Object(f)) = (&mut line, fields) {
        m.extend(f);
    }
    line
}

fn sample(o: &BenchOptions) -> Result<Value> {
    let (prompts, ops, _bf16, p) = sampling_setup(o)?;
    let prompts: Vec<Vec<u32>> = (0..o.gen_batch)
        .map(|i| p.tokenizer.encode(&prompts[i % prompts.len()], true))
        .collect::<Result<_>>()?;
    let cfg = SamplingConfig {
        max_new_tokens: o.new_tokens,
        min_new_tokens: o.new_tokens,
        temperature: 1.0,
        eos_token_ids: p.eos_token_ids(),
        pad_token_id: p.pad_token_id(),
        max_num_seqs: o.max_num_seqs,
        ..Default::default()
    };
    let (out, s, fields) = timed_generate(&p, &prompts, &cfg)?;
    let n: usize = out.tokens.iter().map(Vec::len).sum();
    Ok(with_fields(
        json!({"workload": "generate", "impl": "preftune", "ops": ops, "dtype": o.dtype, "bf16": o.bf16,
               "batch": o.gen_batch, "new_tokens": o.new_tokens, "threads": threads(), "seconds": s,
               "tokens_per_s": n as f64 / s, "peak_rss_mib": peak_rss_mib()}),
        fields,
    ))
}

/// `gen_batch` prompts as user turns of the chat template, each sampled `num_generations` times
/// at temperature 1 (no top-k or top-p) until EOS or `new_tokens`, as GRPO's rollout does.
fn rollout(o: &BenchOptions) -> Result<Value> {
    let (prompts, ops, _bf16, p) = sampling_setup(o)?;
    let batch: Vec<Vec<u32>> = (0..o.gen_batch)
        .map(|i| {
            let m = crate::Message::new("user", &prompts[i % prompts.len()]);
            p.tokenizer.encode_chat(&[m], true)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flat_map(|ids| std::iter::repeat_n(ids, o.num_generations))
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: o.new_tokens,
        temperature: 1.0,
        seed: 42,
        eos_token_ids: p.eos_token_ids(),
        pad_token_id: p.pad_token_id(),
        max_num_seqs: o.max_num_seqs,
        ..Default::default()
    };
    let (out, s, fields) = timed_generate(&p, &batch, &cfg)?;
    let lens: Vec<usize> = out.tokens.iter().map(Vec::len).collect();
    let n: usize = lens.iter().sum();
    let steps = lens.iter().max().copied().unwrap_or(0);
    Ok(with_fields(
        json!({"workload": "rollout", "impl": "preftune", "ops": ops, "dtype": o.dtype, "bf16": o.bf16,
              "prompts": o.gen_batch, "num_generations": o.num_generations, "max_new_tokens": o.new_tokens,
              "threads": threads(), "seconds": s, "tokens": n, "tokens_per_s": n as f64 / s,
              "finished": out.finished.iter().filter(|&&f| f).count(), "steps": steps,
              "decode_rows": out.decode_rows, "prompt_positions": out.prompt_positions,
              "max_num_seqs": o.max_num_seqs, "peak_rows": out.peak_rows,
              "peak_rss_mib": peak_rss_mib()}),
        fields,
    ))
}
