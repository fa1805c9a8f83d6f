//! `preftune`: the command-line front end. Argument parsing and output only; the work happens in
//! the library crates.
mod args;
mod bench;
mod commands;
mod eval;
mod label;
mod rewards;

use args::{ModelArgs, PromptArgs, RunArgs, SamplingArgs};
use clap::{Parser, Subcommand};

/// Training allocates and frees many large tensors per step. glibc hands large blocks back to the
/// kernel on free, so each new one is page-faulted and zeroed again: a fifth of a SmolLM2 step,
/// measured with perf. mimalloc, told to keep what it has (below), reuses them.
/// mimalloc with live-byte counters ([`preftune_model::mem`]) for `PREFTUNE_MEM_TRACE`.
#[global_allocator]
static GLOBAL: preftune_model::mem::Counting<mimalloc::MiMalloc> =
    preftune_model::mem::Counting(mimalloc::MiMalloc);

/// Never return freed memory to the OS and commit arenas eagerly: a SmolLM2 forward+backward step
/// drops from 16.8 s (glibc) / 15.1 s (mimalloc defaults) to 12.0 s, for 0.6-1 GB more peak RSS
/// (BENCHMARKS.md). `PREFTUNE_LOW_MEMORY=1` keeps mimalloc's defaults instead.
/// (Option indices from mimalloc.h: `mi_option_arena_eager_commit` = 4, `mi_option_purge_delay` = 15.)
fn tune_allocator() {
    preftune_model::mem::enable_from_env();
    if std::env::var("PREFTUNE_LOW_MEMORY").is_ok_and(|v| v == "1") {
        return;
    }
    // SAFETY: mi_option_set only stores an integer option; valid at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(4, 1);
        libmimalloc_sys::mi_option_set(15, -1);
    }
}

#[derive(Parser)]
#[command(
    name = "preftune",
    version,
    about = "Align language models to human preferences: SFT, reward models, DPO and its family, PPO, GRPO, RLOO, Best-of-N and evaluation, on Hugging Face and GGUF models"
)]
struct Cli {
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where to run: cpu, cuda, cuda:N or auto (the GPU when one can be opened). Overrides
    /// `device` in configs; default cpu. CUDA needs a build with `--features cuda`.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<preftune_model::DeviceSpec>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print token ids, top-k logits per position, the last position's logits and the sequence
    /// log-prob of a prompt, as one JSON object.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        prompt: PromptArgs,
        /// How many best tokens to list per position.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Token ids to append after the prompt's, comma-separated: scores a continuation exactly
        /// as another tool produced it, without decoding and re-tokenising its text.
        #[arg(long, value_delimiter = ',')]
        continuation_ids: Vec<u32>,
    },
    /// Sample a continuation; prints `ids`, `text` and `logprobs` as one JSON object.
    Generate(commands::GenerateArgs),
    /// Serve a model over OpenAI's API (chat and text completions, streaming, batched).
    Serve(commands::ServeArgs),
    /// Convert a model (e.g. a GGUF file) into a Hugging Face folder that transformers loads.
    Convert {
        #[arg(long = "in")]
        input: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        /// Weights dtype to save: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Write a model (with `--adapter`, merged) as a llama.cpp GGUF file, for llama.cpp, Ollama
    /// and LM Studio.
    ExportGguf(commands::ExportGgufArgs),
    /// Fold a LoRA adapter into its base model (PEFT's `merge_and_unload`) and save the result as
    /// a Hugging Face folder.
    Merge(commands::MergeArgs),
    /// Chat with a model in the terminal (one user message per line; an empty line or EOF quits).
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Measure forward+backward and sampling throughput; one JSON line per workload.
    Bench(bench::BenchArgs),
    /// Compare each fused kernel (RMSNorm, SwiGLU, RoPE, log-softmax + gather) with its
    /// composed twin on `--device`, forward and gradients; one JSON line per op and dtype.
    /// Exits 1 if any differs by more than its tolerance.
    CheckKernels,
    /// Supervised fine-tuning (TRL's SFTTrainer): language-modelling or prompt-completion data,
    /// standard or conversational, full fine-tuning or LoRA.
    Sft(RunArgs),
    /// Direct preference optimisation and its family (TRL's DPOTrainer loss types, R-DPO, PRO)
    /// against a frozen reference model.
    Dpo(RunArgs),
    /// KTO (TRL's KTOTrainer): thumbs-up / thumbs-down rows (`prompt`, `completion`, `label`), or
    /// preference pairs unpaired, against a frozen reference.
    Kto(RunArgs),
    /// CPO (TRL's CPOTrainer) and, with `loss_type = "simpo"` or `"alphapo"`, SimPO and AlphaPO:
    /// preference pairs, no reference model.
    Cpo(RunArgs),
    /// ORPO (TRL's ORPOTrainer): NLL plus an odds-ratio term on preference pairs, no reference
    /// model.
    Orpo(RunArgs),
    /// Online / iterative DPO (TRL's OnlineDPOTrainer): rounds of sampling from the policy,
    /// labelling by a reward source or a pairwise judge, and DPO (a DPO config plus an
    /// [online_dpo] table).
    OnlineDpo(RunArgs),
    /// Train a reward model (TRL's RewardTrainer): Bradley–Terry on preference pairs, with
    /// `margin` (Llama 2) and `center_rewards_coefficient`; rankings become all ordered pairs.
    Rm(RunArgs),
    /// Score prompt/response rows with a reward source (streaming, resumable).
    Score(rewards::ScoreArgs),
    /// Best-of-N: sample N responses per prompt, score them, keep the best.
    Bon(rewards::BonArgs),
    /// The IMDb controlled-sentiment experiment end to end (examples/imdb-sentiment.toml): gold
    /// judge, SFT, gold-labelled pairs, reward model, DPO, PPO, GRPO, Best-of-N, evaluation.
    Pipeline {
        /// The pipeline config (TOML).
        config: std::path::PathBuf,
        /// Override a key: `--set output_dir=runs/x`, `--set dpo.max_steps=20` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run the whole pipeline once per seed (`--seeds 1,2,3`, in OUTPUT_DIR/seed-N) and
        /// report each method's mean and spread over them; overrides the config's `seeds`.
        #[arg(long, value_delimiter = ',', value_name = "SEEDS")]
        seeds: Vec<u64>,
    },
    /// Write RUN_DIR/report.html: training curves, the reward-vs-KL frontier and results of a
    /// pipeline run, and sample responses (inline SVG, no scripts).
    Report { dir: std::path::PathBuf },
    /// Judge samples and policies: `eval reward`, `eval winrate`, `eval kl`, `eval frontier`.
    Eval {
        #[command(subcommand)]
        cmd: eval::EvalCmd,
    },
    /// Collect human preferences: `label serve` (the web app), `add-annotator`, `import`,
    /// `export` (preference or ranking JSONL), `stats` (agreement, position bias).
    Label {
        #[command(subcommand)]
        cmd: label::LabelCmd,
    },
    /// Train the gold IMDb sentiment judge (`gold:sentiment`) and print its held-out accuracy.
    GoldTrain(rewards::GoldTrainArgs),
    /// Set a reward model's gain and bias so rewards of reference samples have mean 0, std 1.
    NormalizeReward(rewards::NormalizeArgs),
    /// Rejection-sampling fine-tuning: Best-of-N over a prompt set, then SFT on the best, for
    /// one or more rounds (an SFT config plus a [rejection_sampling] table).
    RejectionSampling(RunArgs),
    /// Safety context distillation: answers to risky prompts under a safety preprompt, then SFT
    /// on them without it (an SFT config plus a [distill] table; `safety` makes it targeted).
    Distill(RunArgs),
    /// GRPO (TRL's GRPOTrainer): group-normalised advantages over num_generations samples per
    /// prompt, rewards from any reward source.
    Grpo(RunArgs),
    /// RLOO (TRL's RLOOTrainer): leave-one-out baselines over num_generations samples per prompt.
    Rloo(RunArgs),
    /// REINFORCE with the batch-mean baseline (RLOO's options; one sample per prompt works).
    Reinforce(RunArgs),
    /// PPO for RLHF (TRL's PPOTrainer): value model, GAE, clipped objective, per-token KL penalty
    /// to the reference, fixed or adaptive KL coefficient.
    Ppo(RunArgs),
}

/// A device that cannot be had here (`device` in a config) exits 2, as `--device` does, however
/// deep in a library's error it arrives.
fn is_device_error(e: &anyhow::Error) -> bool {
    use preftune_model::Error as M;
    let inner = e.downcast_ref::<M>().or_else(|| match e.downcast_ref() {
        Some(preftune_train::Error::Model(m)) => Some(m),
        _ => e.downcast_ref::<preftune_pipeline::Error>()?.model_error(),
    });
    e.downcast_ref::<preftune_model::DeviceError>().is_some() || matches!(inner, Some(M::Device(_)))
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    // candle's CPU kernels size their thread pools from this variable. Unset, candle 0.11 works
    // the count out again on every call, reading /proc/cpuinfo (8% of a sampling run), so it is
    // set once here either way.
    let threads = match cli.threads {
        Some(n) => n,
        None => candle_core::utils::get_num_threads(),
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // Testing aid: the GPU's code path (composed candle ops only) on the CPU, for machines
    // without a GPU. The guard lives as long as `main`; trainers run on this thread.
    let _portable = preftune_model::kernels::PortableScope::new(
        std::env::var_os("PREFTUNE_PORTABLE").is_some_and(|v| v == "1"),
    );
    if let Some(spec) = cli.device {
        match spec.open() {
            Ok(d) => preftune_model::device::set_process_device(d),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }
    let result = match cli.command {
        Command::Inspect {
            model,
            prompt,
            top_k,
            continuation_ids,
        } => commands::inspect(&model, &prompt, top_k, &continuation_ids),
        Command::Generate(a) => commands::generate(&a),
        Command::Serve(a) => commands::serve(&a),
        Command::Convert { input, out, dtype } => commands::convert(&input, &out, &dtype),
        Command::Merge(a) => commands::merge(&a),
        Command::ExportGguf(a) => commands::export_gguf(&a),
        Command::Chat {
            model,
            system,
            sampling,
        } => commands::chat(&model, system.as_deref(), &sampling),
        Command::Bench(args) => bench::run(&args),
        Command::CheckKernels => commands::check_kernels(),
        Command::Sft(run) => commands::train(commands::Trainer::Sft, &run),
        Command::Dpo(run) => commands::train(commands::Trainer::Dpo, &run),
        Command::Kto(run) => commands::train(commands::Trainer::Kto, &run),
        Command::Cpo(run) => commands::train(commands::Trainer::Cpo, &run),
        Command::Orpo(run) => commands::train(commands::Trainer::Orpo, &run),
        Command::OnlineDpo(run) => rewards::online_dpo(&run),
        Command::Rm(run) => commands::train(commands::Trainer::Rm, &run),
        Command::Score(a) => rewards::score(&a),
        Command::Bon(a) => rewards::bon(&a),
        Command::NormalizeReward(a) => rewards::normalize(&a),
        Command::GoldTrain(a) => rewards::gold_train(&a),
        Command::Eval { cmd } => eval::run(&cmd),
        Command::Label { cmd } => label::run(&cmd),
        Command::Pipeline { config, set, seeds } => preftune_pipeline::run(&config, &set, &seeds)
            .map(|(_, summary)| commands::emit(&summary))
            .map_err(Into::into),
        Command::Report { dir } => preftune_pipeline::report::run(&dir)
            .map(|v| commands::emit(&v))
            .map_err(Into::into),
        Command::RejectionSampling(run) => rewards::sft_with_table(&run, false),
        Command::Distill(run) => rewards::sft_with_table(&run, true),
        Command::Grpo(run) => commands::train(commands::Trainer::Grpo, &run),
        Command::Rloo(run) => commands::train(commands::Trainer::Rloo, &run),
        Command::Reinforce(run) => commands::train(commands::Trainer::Reinforce, &run),
        Command::Ppo(run) => commands::train(commands::Trainer::Ppo, &run),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(if is_device_error(&e) { 2 } else { 1 });
    }
}
