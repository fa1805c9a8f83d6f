//! `preftune bench`: fixed workloads, one JSON line each, for BENCHMARKS.md.
//!
//! Each workload runs in a child process of its own, so its peak RSS is its own.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Model folder or .gguf file (the reference workloads use SmolLM2-135M).
    #[arg(long)]
    model: PathBuf,
    /// `fwd-bwd`, `generate`, `rollout` (chat prompts sampled `--num-generations` times until
    /// EOS), `matmul` (f32 2048^3 GEMM rate, the MFU yardstick) or `all`.
    #[arg(long, value_enum, default_value_t = WorkloadArg::All)]
    workload: WorkloadArg,
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
    /// Samples per prompt in `rollout`.
    #[arg(long, default_value_t = 8)]
    num_generations: usize,
    /// Sequences decoding at once in `generate` and `rollout`; the others join as sequences
    /// finish (0: all at once).
    #[arg(long, default_value_t = 0)]
    max_num_seqs: usize,
    /// JSONL with a `prompt` field per line; the reference scripts read the same file.
    #[arg(long, default_value = "bench/prompts.jsonl")]
    prompts: PathBuf,
    /// Use the ops composed from candle primitives instead of the fused kernels (for comparison).
    #[arg(long)]
    composed_ops: bool,
    /// Mixed precision as `bf16 = true` runs it: linears' products in bf16 with f32 sums (AMX or
    /// AVX-512 BF16 where present); `matmul` then times the bf16 GEMM.
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

/// `--workload`: one of the model layer's workloads, or each in turn.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum WorkloadArg {
    All,
    Matmul,
    FwdBwd,
    Generate,
    Rollout,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    use preftune_model::bench::Workload;
    let workload = match args.workload {
        WorkloadArg::All => None,
        WorkloadArg::Matmul => Some(Workload::Matmul),
        WorkloadArg::FwdBwd => Some(Workload::FwdBwd),
        WorkloadArg::Generate => Some(Workload::Generate),
        WorkloadArg::Rollout => Some(Workload::Rollout),
    };
    let Some(workload) = workload else {
        // Each workload in a child process of its own, so that its peak RSS is its own.
        let exe = std::env::current_exe()?;
        // This run's arguments less its `--workload all` (`--workload=all` or two words).
        let mut rest = vec![];
        let mut given = std::env::args().skip(1);
        while let Some(a) = given.next() {
            if a == "--workload" {
                given.next();
            } else if !a.starts_with("--workload=") {
                rest.push(a);
            }
        }
        for w in Workload::ALL {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(&rest);
            let status = cmd
                .args(["--workload", w.name()])
                .status()
                .with_context(|| format!("running workload {}", w.name()))?;
            anyhow::ensure!(status.success(), "workload {} failed", w.name());
        }
        return Ok(());
    };
    let opts = preftune_model::bench::BenchOptions {
        model: args.model.clone(),
        dtype: args.dtype.clone(),
        train_batch: args.train_batch,
        seq_len: args.seq_len,
        steps: args.steps,
        gen_batch: args.gen_batch,
        new_tokens: args.new_tokens,
        max_num_seqs: args.max_num_seqs,
        num_generations: args.num_generations,
        prompts: args.prompts.clone(),
        composed_ops: args.composed_ops,
        bf16: args.bf16,
        gradient_checkpointing: args.gradient_checkpointing,
        lora_r: args.lora_r,
        lora_layers: args.lora_layers,
    };
    crate::commands::emit(&preftune_model::bench::run(workload, &opts)?);
    Ok(())
}
