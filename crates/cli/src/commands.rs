//! The model commands: inspect, generate, convert, chat.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use preftune_model::{
    generate as sample, parse_dtype, LoadOptions, Message, Pretrained, SamplingConfig,
};
use serde_json::json;

use crate::args::{ModelArgs, PromptArgs, RunArgs, SamplingArgs};

pub fn load(args: &ModelArgs) -> Result<Pretrained> {
    let opts = LoadOptions {
        dtype: parse_dtype(&args.dtype)?,
        ..Default::default()
    };
    // Our load errors already name the file, tensor or field.
    let mut p = if args.keep_quantized {
        Pretrained::load_quantized(&args.model, &opts, preftune_model::ops::BaseQuant::Q8)?
    } else {
        Pretrained::load(&args.model, &opts)?
    };
    if let Some(dir) = &args.adapter {
        p.model.load_lora(dir, false)?;
    }
    Ok(p)
}

fn prompt_ids(p: &Pretrained, args: &PromptArgs) -> Result<Vec<u32>> {
    let ids = if args.chat {
        let mut msgs = vec![];
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &args.prompt));
        p.tokenizer.encode_chat(&msgs, true)?
    } else {
        p.tokenizer.encode(&args.prompt, true)?
    };
    anyhow::ensure!(!ids.is_empty(), "the prompt has no tokens");
    Ok(ids)
}

/// The products a sampling command multiplies with while it lives: bf16 with `--bf16` (f32
/// weights only), each weight packed for the CPU's bf16 GEMM (or copied to bf16 on a GPU) once
/// for the whole command rather than once per batch; else the weights' dtype.
pub(crate) struct Products {
    // Dropped in this order: the packs, then the scope.
    _packed: preftune_model::ops::PackedWeights,
    _bf16: preftune_model::ops::Bf16Scope,
}

pub(crate) fn products(m: &ModelArgs, s: &SamplingArgs) -> Result<Products> {
    check_bf16(m, s.bf16)?;
    let bf16 = preftune_model::ops::Bf16Scope::new(s.bf16);
    Ok(Products {
        _packed: preftune_model::ops::PackedWeights::new(),
        _bf16: bf16,
    })
}

/// `--bf16` goes with f32 weights only.
fn check_bf16(m: &ModelArgs, bf16: bool) -> Result<()> {
    anyhow::ensure!(
        !bf16 || parse_dtype(&m.dtype)? == candle_core::DType::F32,
        "--bf16 multiplies f32 weights in bf16; with --dtype {} leave it out",
        m.dtype
    );
    Ok(())
}

pub(crate) fn sampling_config(p: &Pretrained, s: &SamplingArgs) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: s.max_new_tokens,
        min_new_tokens: s.min_new_tokens,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        eos_token_ids: p.eos_token_ids(),
        pad_token_id: p.pad_token_id(),
        use_cache: true,
        max_num_seqs: s.max_num_seqs,
    }
}

pub fn inspect(m: &ModelArgs, pa: &PromptArgs, k: usize, continuation: &[u32]) -> Result<()> {
    let p = load(m)?;
    let mut ids = prompt_ids(&p, pa)?;
    let vocab = p.model.cfg.vocab_size;
    if let Some(&bad) = continuation.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!(
            "--continuation-ids: token id {bad} is outside the model's vocabulary of {vocab}"
        );
    }
    ids.extend_from_slice(continuation);
    let r = preftune_model::logprobs::inspect(&p, &ids, k)?;
    emit(&json!({
        "ids": ids,
        "top_k": r.top_k.iter().map(|r| r.iter().map(|&(i, l)| json!([i, short(l)])).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "last_logits": shorts(&r.last_logits),
        "sum_logprob": short(r.sum_logprob),
    }));
    Ok(())
}

/// `preftune generate`: one prompt (`--prompt`), or candidates for labelling (`--data --n --out`).
#[derive(clap::Args, Clone, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (one completion, printed as JSON).
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    prompt: Option<String>,
    /// Wrap --prompt as a user message in the model's chat template (with the generation prompt).
    #[arg(long)]
    chat: bool,
    /// A system message, with --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Rows with `prompt` (text, or messages that get the chat template): K responses each,
    /// written to --out (resumable; seeds follow the row, so a resumed run samples the same).
    #[arg(long, requires = "out")]
    data: Option<std::path::PathBuf>,
    /// Responses per prompt, with --data.
    #[arg(long, default_value_t = 2)]
    n: usize,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Prompts sampled together, with --data.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Where each token is drawn from the logits, with --prompt: `auto` (on the device for a
    /// model on a GPU, unless top-k or top-p asks for the host), `host` or `device`. Both give
    /// the same tokens up to rounding.
    #[arg(long, value_enum, default_value_t = DrawOnArg::Auto, conflicts_with = "data")]
    draw_on: DrawOnArg,
}

/// `--draw-on`: [`preftune_model::DrawOn`].
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DrawOnArg {
    Auto,
    Host,
    Device,
}

pub fn generate(a: &GenerateArgs) -> Result<()> {
    let _bf16 = products(&a.model, &a.sampling)?;
    let p = load(&a.model)?;
    let (Some(data), Some(out)) = (&a.data, &a.out) else {
        let pa = PromptArgs {
            prompt: a.prompt.clone().unwrap_or_default(),
            chat: a.chat,
            system: a.system.clone(),
        };
        let ids = prompt_ids(&p, &pa)?;
        let draw_on = match a.draw_on {
            DrawOnArg::Auto => preftune_model::DrawOn::Auto,
            DrawOnArg::Host => preftune_model::DrawOn::Host,
            DrawOnArg::Device => preftune_model::DrawOn::Device,
        };
        let cfg = sampling_config(&p, &a.sampling);
        let out = preftune_model::generate_on(&p.model, &[ids], &cfg, draw_on)?;
        if preftune_model::decode_graph::enabled() {
            let g = preftune_model::decode_graph::stats();
            eprintln!(
                "decoding: {} fixed-shape steps; CUDA graphs: {} captured, {} replayed, {} failed",
                out.fixed_steps, g.captures, g.replays, g.failed
            );
        }
        let text = p.tokenizer.decode(&out.tokens[0], true)?;
        emit(
            &json!({"ids": out.tokens[0], "text": text, "logprobs": shorts(&out.logprobs[0]), "finished": out.finished[0]}),
        );
        return Ok(());
    };
    let mut settings = json!({"model": a.model.model.display().to_string(), "temperature": a.sampling.temperature,
                          "top_p": a.sampling.top_p, "top_k": a.sampling.top_k,
                          "max_new_tokens": a.sampling.max_new_tokens, "seed": a.sampling.seed});
    // The draws depend on the bound (another batch): recorded when set.
    if a.sampling.max_num_seqs > 0 {
        settings["max_num_seqs"] = json!(a.sampling.max_num_seqs);
    }
    let cfg = sampling_config(&p, &a.sampling);
    let s =
        preftune_eval::bon::sample_candidates(&p, data, out, a.n, a.batch_size, &cfg, &settings)?;
    emit(
        &json!({"rows": s.rows, "generated_now": s.generated_now, "resumed_after": s.resumed_after,
                 "n": a.n, "out": out.display().to_string()}),
    );
    Ok(())
}

pub fn convert(input: &Path, out: &Path, dtype: &str) -> Result<()> {
    let opts = LoadOptions {
        dtype: parse_dtype(dtype)?,
        ..Default::default()
    };
    let p = Pretrained::load(input, &opts)?;
    p.save(out)?;
    let n = p.num_parameters();
    emit(
        &json!({"out": out, "architecture": format!("{:?}", p.model.cfg.arch), "parameters": n, "tensors": p.model.named_params().len(), "dtype": dtype}),
    );
    Ok(())
}

/// `preftune merge`.
#[derive(clap::Args, Clone, Debug)]
pub struct MergeArgs {
    /// The base model: an HF folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The LoRA adapter folder (PEFT's layout).
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Weights dtype to merge in and save: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Folds the adapter into the base weights (`W + scale * B A`, as PEFT's `merge_and_unload`),
/// keeping a reward model's score head, and saves an HF folder.
pub fn merge(a: &MergeArgs) -> Result<()> {
    let mut p = load(&ModelArgs {
        model: a.model.clone(),
        dtype: a.dtype.clone(),
        adapter: Some(a.adapter.clone()),
        keep_quantized: false,
    })?;
    let adapters = p.model.lora_params().len() / 2;
    p.model.merge_lora()?;
    p.save(&a.out)?;
    emit(
        &json!({"out": a.out, "merged_modules": adapters, "reward_model": p.model.has_score_head(),
                 "dtype": a.dtype}),
    );
    Ok(())
}

/// `preftune export-gguf`.
#[derive(clap::Args, Clone, Debug)]
pub struct ExportGgufArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor type: f32, f16, bf16, q8_0 or q4_k_m (llama.cpp's recipe).
    #[arg(long = "type", default_value = "f16")]
    pub ty: String,
}

pub fn export_gguf(a: &ExportGgufArgs) -> Result<()> {
    let ty: preftune_model::gguf_export::GgufType =
        a.ty.parse()
            .map_err(|e: String| anyhow::anyhow!("--type {e}"))?;
    let p = load(&a.model)?;
    let s = preftune_model::gguf_export::export_gguf(&p, &a.out, ty)?;
    emit(&json!({"out": a.out, "type": a.ty, "summary": s}));
    Ok(())
}

pub fn chat(m: &ModelArgs, system: Option<&str>, s: &SamplingArgs) -> Result<()> {
    let _bf16 = products(m, s)?;
    let p = load(m)?;
    let mut cfg = sampling_config(&p, s);
    let mut history: Vec<Message> = system
        .map(|s| vec![Message::new("system", s)])
        .unwrap_or_default();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("you> ");
        std::io::stderr().flush().ok();
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(Message::new("user", line.trim()));
        let ids = p.tokenizer.encode_chat(&history, true)?;
        let out = sample(&p.model, &[ids], &cfg)?;
        let reply = p.tokenizer.decode(&out.tokens[0], true)?;
        println!("{}", reply.trim());
        history.push(Message::new("assistant", reply.trim()));
        cfg.seed = cfg.seed.wrapping_add(1);
    }
}

/// An f32 as the shortest decimal that reads back as the same f32 (JSON numbers are f64, and the
/// plain widening would print noise digits).
fn short(x: f32) -> serde_json::Value {
    format!("{x}")
        .parse::<f64>()
        .map(serde_json::Value::from)
        .unwrap_or(serde_json::Value::Null)
}

fn shorts(v: &[f32]) -> Vec<serde_json::Value> {
    v.iter().map(|&x| short(x)).collect()
}

/// Prints one JSON line on stdout. A closed pipe (`| head`) ends the program quietly, as Unix tools do.
/// `preftune check-kernels`: fused kernels against composed ops on the process's device.
pub fn check_kernels() -> Result<()> {
    let dev = preftune_model::device::default_device();
    let checks = preftune_model::kernel_check::check_kernels(&dev)?;
    for c in &checks {
        emit(&serde_json::to_value(c)?);
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} kernel checks are off by more than their tolerance",
            checks.len()
        );
    }
    Ok(())
}

pub fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{v}").and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Makes a config's `device` the process's, for every model the command loads, unless
/// `--device` already chose one. Its error stays a [`preftune_model::DeviceError`] (exit 2).
pub(crate) fn use_config_device(spec: Option<preftune_model::DeviceSpec>) -> Result<()> {
    preftune_model::device::run_device(spec)?;
    Ok(())
}

/// Loads a trainer's config (its defaults, the file, `--set`) and prints what the trainer returns.
fn run_trainer<A: preftune_train::Options>(
    run: &RunArgs,
    defaults: toml::Table,
    trainer: fn(
        &preftune_train::RunConfig<A>,
        bool,
        bool,
    ) -> preftune_train::Result<serde_json::Value>,
) -> Result<()> {
    let cfg = A::load_config(run.config.as_deref(), defaults, &run.set)?;
    use_config_device(cfg.args.device)?;
    emit(&trainer(&cfg, run.resume, run.eval_only)?);
    Ok(())
}

/// The trainers `preftune` runs from a config.
#[derive(Clone, Copy, Debug)]
pub enum Trainer {
    Sft,
    Dpo,
    Kto,
    Cpo,
    Orpo,
    Rm,
    Grpo,
    Rloo,
    Reinforce,
    Ppo,
}

pub fn train(t: Trainer, run: &RunArgs) -> Result<()> {
    use preftune_train::rl::{grpo, ppo, rloo};
    use preftune_train::{dpo, reward, sft};
    match t {
        Trainer::Sft => run_trainer(run, sft::defaults(), sft::run),
        Trainer::Dpo => run_trainer(run, dpo::defaults(), dpo::run),
        Trainer::Kto => run_trainer(run, dpo::kto::defaults(), dpo::kto::run),
        Trainer::Cpo => run_trainer(run, dpo::cpo::cpo_defaults(), dpo::cpo::run_cpo),
        Trainer::Orpo => run_trainer(run, dpo::cpo::orpo_defaults(), dpo::cpo::run_orpo),
        Trainer::Rm => run_trainer(run, reward::defaults(), reward::run),
        Trainer::Grpo => run_trainer(run, grpo::defaults(), grpo::run),
        Trainer::Rloo => run_trainer(run, rloo::defaults(), rloo::run),
        Trainer::Reinforce => run_trainer(run, rloo::reinforce_defaults(), rloo::run_reinforce),
        Trainer::Ppo => run_trainer(run, ppo::defaults(), ppo::run),
    }
}

/// `preftune serve`: an OpenAI-compatible server (docs/serve.md).
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; off loopback only with --api-key-file.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub bind: std::net::SocketAddr,
    /// API keys, one per line (16 characters or more): every request must send one as
    /// `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// The model's name in /v1/models (default: the model path's last component).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Sequences running or queued, past which requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Multiply in bf16 over the f32 weights, as `generate --bf16` does.
    #[arg(long)]
    pub bf16: bool,
}

pub fn serve(a: &ServeArgs) -> Result<()> {
    let keys = match &a.api_key_file {
        Some(f) => preftune_serve::read_keys(f)?,
        None => vec![],
    };
    // Refuse an open public bind before loading the model.
    preftune_serve::check_bind(a.bind, &keys)?;
    check_bf16(&a.model, a.bf16)?;
    let p = load(&a.model)?;
    let name = a
        .model
        .model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned());
    let opts = preftune_serve::ServeOptions {
        limits: preftune_serve::Limits {
            max_tokens: a.max_tokens,
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            ..Default::default()
        },
        keys,
        model_id: a
            .model_id
            .clone()
            .or(name)
            .unwrap_or_else(|| "preftune".into()),
        bf16: a.bf16,
    };
    Ok(preftune_serve::serve(p, a.bind, opts)?)
}
