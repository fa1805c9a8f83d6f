//! `preftune bench`: fixed workloads, one JSON line each, for BENCHMARKS.md.
//!
//! Each workload runs in a child process of its own, so its peak RSS is its own.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use preftune_model::{
    generate, parse_dtype, token_logprobs, LoadOptions, Pretrained, SamplingConfig,
};
use serde_json::json;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Model folder or .gguf file (the reference workloads use SmolLM2-135M).
    #[arg(long)]
    model: PathBuf,
    /// `fwd-bwd`, `generate`, `matmul` (f32 2048^3 GEMM rate, the MFU yardstick) or `all`.
    #[arg(long, default_value = "all")]
    workload: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Sequences per forward+backward step.
    #[arg(long, default_value_t = 8)]
    train_batch: usize,
    /// Tokens per sequence in the forward+backward step.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Prompts sampled at once.
    #[arg(long, default_value_t = 16)]
    gen_batch: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// JSONL with a `prompt` field per line; the reference scripts read the same file.
    #[arg(long, default_value = "bench/prompts.jsonl")]
    prompts: PathBuf,
    /// Use the ops composed from candle primitives instead of the fused kernels (for comparison).
    #[arg(long)]
    composed_ops: bool,
    /// Mixed precision as `bf16 = true` runs it: linears' products in bf16 with f32 sums (AMX
    /// where present); `matmul` then times the bf16 GEMM.
    #[arg(long)]
    bf16: bool,
    /// Recompute decoder layers in backward (fwd-bwd).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// fwd-bwd with LoRA adapters of this rank on every linear (0: full fine-tuning).
    #[arg(long, default_value_t = 0)]
    lora_r: usize,
    /// With `--lora-r`: adapters on the top this many decoder layers only (0: all).
    #[arg(long, default_value_t = 0)]
    lora_layers: usize,
}

fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let p = v["prompt"].as_str().with_context(|| {
            format!(
                "{}:{}: prompt: missing or not a string",
                path.display(),
                i + 1
            )
        })?;
        out.push(p.to_string());
    }
    anyhow::ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}

fn peak_rss_mib() -> f64 {
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

fn threads_env() -> Option<usize> {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
}

/// Training FLOPs per token as PaLM counts them: `6 N` for the weights (the tied LM head counted
/// once, as a matmul; embedding lookups are free) plus `12 L d T` for attention scores and mixing.
fn train_flops_per_token(p: &Pretrained, seq_len: usize) -> f64 {
    let n: usize = p
        .model
        .named_params()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let c = &p.model.cfg;
    6.0 * n as f64 + 12.0 * (c.num_layers * c.num_heads * c.head_dim * seq_len) as f64
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.workload == "all" {
        let exe = std::env::current_exe()?;
        for w in ["matmul", "fwd-bwd", "generate"] {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(
                std::env::args()
                    .skip(1)
                    .filter(|a| !a.starts_with("--workload")),
            );
            let status = cmd
                .args(["--workload", w])
                .status()
                .with_context(|| format!("running workload {w}"))?;
            anyhow::ensure!(status.success(), "workload {w} failed");
        }
        return Ok(());
    }
    let threads = threads_env();
    if args.workload == "matmul" {
        let n = 2048;
        let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        let _bf16 = preftune_model::ops::Bf16Scope::new(args.bf16);
        let mm = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
            if args.bf16 {
                // The product the bf16 linears run (`x W^T`, both operands row-major).
                preftune_model::ops::bf16_matmul(a, b)
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
        crate::commands::emit(
            &json!({"workload": "matmul", "impl": "preftune", "n": n, "threads": threads_env(), "gflops": gflops,
                    "bf16": args.bf16, "bf16_gemm": preftune_model::ops::bf16_gemm_name()}),
        );
        return Ok(());
    }
    let dtype = parse_dtype(&args.dtype)?;
    let prompts = read_prompts(&args.prompts)?;
    preftune_model::kernels::set_fused(!args.composed_ops);
    // The kernels run in f32/f64 only; other dtypes take the composed ops.
    let ops = if args.composed_ops || !matches!(dtype, DType::F32 | DType::F64) {
        "composed"
    } else {
        "fused"
    };
    let _bf16 = preftune_model::ops::Bf16Scope::new(args.bf16);
    match args.workload.as_str() {
        "fwd-bwd" => {
            let opts = LoadOptions {
                dtype,
                trainable: args.lora_r == 0,
                ..Default::default()
            };
            let mut p = Pretrained::load(&args.model, &opts)?;
            if args.lora_r > 0 {
                let layers = p.model.cfg.num_layers;
                let top = if args.lora_layers == 0 {
                    layers
                } else {
                    args.lora_layers.min(layers)
                };
                let cfg = preftune_model::lora::LoraConfig {
                    r: args.lora_r,
                    alpha: 2.0 * args.lora_r as f64,
                    dropout: 0.0,
                    target_modules: Some(vec!["all-linear".into()]),
                    layers_to_transform: Some((layers - top..layers).collect()),
                };
                p.model.add_lora(&cfg, 0)?;
            }
            p.model
                .set_gradient_checkpointing(args.gradient_checkpointing);
            let text = prompts.join(". ").repeat(1 + args.seq_len / 60);
            let ids = p.tokenizer.encode(&text, false)?;
            anyhow::ensure!(
                ids.len() >= args.seq_len,
                "bench text too short for --seq-len"
            );
            let row = &ids[..args.seq_len];
            let dev = p.model.device().clone();
            let x = Tensor::from_vec(
                row.repeat(args.train_batch),
                (args.train_batch, args.seq_len),
                &dev,
            )?;
            let mask = Tensor::ones((args.train_batch, args.seq_len), DType::U32, &dev)?;
            let mut times = vec![];
            for step in 0..=args.steps {
                let t = Instant::now();
                let hidden = p.model.forward(&x, None, None, None)?;
                let lp = token_logprobs(&p.model, &hidden, &x, &mask, 1.0)?;
                let loss = (lp.sum.sum_all()? * (-1.0 / (args.train_batch * args.seq_len) as f64))?;
                let grads = p.model.backward(&loss)?;
                drop(grads);
                // GPU work is queued: wait for it before reading the clock.
                dev.synchronize()?;
                if step > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let s = median(times);
            let tokens = (args.train_batch * args.seq_len) as f64;
            let gflops = train_flops_per_token(&p, args.seq_len) * tokens / s / 1e9;
            crate::commands::emit(
                &json!({"workload": "fwd-bwd", "model_gflops_per_s": gflops, "impl": "preftune", "ops": ops, "gradient_checkpointing": args.gradient_checkpointing, "lora_r": args.lora_r, "lora_layers": args.lora_layers, "dtype": args.dtype, "bf16": args.bf16, "batch": args.train_batch,
                       "seq_len": args.seq_len, "threads": threads, "seconds_per_step": s,
                       "tokens_per_s": (args.train_batch * args.seq_len) as f64 / s, "peak_rss_mib": peak_rss_mib()}),
            );
        }
        "generate" => {
            let opts = LoadOptions {
                dtype,
                ..Default::default()
            };
            let p = Pretrained::load(&args.model, &opts)?;
            let prompts: Vec<Vec<u32>> = (0..args.gen_batch)
                .map(|i| p.tokenizer.encode(&prompts[i % prompts.len()], true))
                .collect::<preftune_model::Result<_>>()?;
            let cfg = SamplingConfig {
                max_new_tokens: args.new_tokens,
                min_new_tokens: args.new_tokens,
                temperature: 1.0,
                eos_token_ids: p.eos_token_ids(),
                pad_token_id: p.pad_token_id(),
                ..Default::default()
            };
            // Warm-up as the reference does: 4 tokens.
            generate(
                &p.model,
                &prompts,
                &SamplingConfig {
                    max_new_tokens: 4,
                    min_new_tokens: 4,
                    ..cfg.clone()
                },
            )?;
            let t = Instant::now();
            let out = generate(&p.model, &prompts, &cfg)?;
            let s = t.elapsed().as_secs_f64();
            let n: usize = out.tokens.iter().map(Vec::len).sum();
            crate::commands::emit(
                &json!({"workload": "generate", "impl": "preftune", "ops": ops, "dtype": args.dtype, "bf16": args.bf16, "batch": args.gen_batch,
                       "new_tokens": args.new_tokens, "threads": threads, "seconds": s, "tokens_per_s": n as f64 / s,
                       "peak_rss_mib": peak_rss_mib()}),
            );
        }
        other => anyhow::bail!("unknown workload {other:?} (fwd-bwd, generate, matmul or all)"),
    }
    Ok(())
}
