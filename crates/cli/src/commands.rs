//! The model commands: inspect, generate, convert, chat.
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Tensor};
use preftune_model::{
    generate as sample, parse_dtype, token_logprobs, LoadOptions, Message, Pretrained,
    SamplingConfig,
};
use serde_json::json;

use crate::{ModelArgs, PromptArgs, RunArgs, SamplingArgs};

pub fn load(args: &ModelArgs) -> Result<Pretrained> {
    let opts = LoadOptions {
        dtype: parse_dtype(&args.dtype)?,
        ..Default::default()
    };
    // Our load errors already name the file, tensor or field.
    let mut p = Pretrained::load(&args.model, &opts)?;
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
    }
}

pub fn inspect(m: &ModelArgs, pa: &PromptArgs, k: usize) -> Result<()> {
    let p = load(m)?;
    let ids = prompt_ids(&p, pa)?;
    let x = Tensor::new(ids.as_slice(), p.model.device())?.unsqueeze(0)?;
    let hidden = p.model.forward(&x, None, None, None)?;
    let logits = p
        .model
        .logits(&hidden)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let top_k: Vec<Vec<(u32, f32)>> = logits
        .iter()
        .map(|row| {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            let k = k.min(row.len());
            idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| row[b].total_cmp(&row[a]));
            idx.truncate(k);
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            idx.into_iter().map(|i| (i as u32, row[i])).collect()
        })
        .collect();
    let mask = Tensor::ones((1, ids.len()), DType::U32, p.model.device())?;
    let sum_logprob = token_logprobs(&p.model, &hidden, &x, &mask, 1.0)?
        .sum
        .to_vec1::<f32>()?[0];
    let out = json!({
        "ids": ids,
        "top_k": top_k.iter().map(|r| r.iter().map(|&(i, l)| json!([i, short(l)])).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "last_logits": logits.last().map(|r| shorts(r)),
        "sum_logprob": short(sum_logprob),
    });
    emit(&out);
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
}

pub fn generate(a: &GenerateArgs) -> Result<()> {
    let p = load(&a.model)?;
    let (Some(data), Some(out)) = (&a.data, &a.out) else {
        let pa = PromptArgs {
            prompt: a.prompt.clone().unwrap_or_default(),
            chat: a.chat,
            system: a.system.clone(),
        };
        let ids = prompt_ids(&p, &pa)?;
        let out = sample(&p.model, &[ids], &sampling_config(&p, &a.sampling))?;
        let text = p.tokenizer.decode(&out.tokens[0], true)?;
        emit(
            &json!({"ids": out.tokens[0], "text": text, "logprobs": shorts(&out.logprobs[0]), "finished": out.finished[0]}),
        );
        return Ok(());
    };
    anyhow::ensure!(
        a.n > 0 && a.batch_size > 0,
        "--n and --batch-size must be > 0"
    );
    let rows = preftune_data::read_rows(data)?;
    let mut file = preftune_eval::sources::ResumableJsonl::open(out)?;
    let start = file.done.min(rows.len());
    let settings = json!({"model": a.model.model.display().to_string(), "temperature": a.sampling.temperature,
                          "top_p": a.sampling.top_p, "top_k": a.sampling.top_k,
                          "max_new_tokens": a.sampling.max_new_tokens, "seed": a.sampling.seed});
    for (b, chunk) in rows[start..].chunks(a.batch_size).enumerate() {
        let mut batch = vec![];
        for r in chunk {
            let t = preftune_eval::sources::row_prompt(&r.value)
                .map_err(|e| anyhow::anyhow!("{}: prompt: {e}", r.loc))?;
            let ids = preftune_eval::sources::prompt_ids(&p, &t)?;
            batch.extend(std::iter::repeat_n(ids, a.n));
        }
        let mut cfg = sampling_config(&p, &a.sampling);
        cfg.seed = a
            .sampling
            .seed
            .wrapping_add(((start + b * a.batch_size) as u64).wrapping_mul(1_000_003));
        let g = sample(&p.model, &batch, &cfg)?;
        let eos = p.eos_token_ids();
        let lines = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let responses = (0..a.n)
                    .map(|j| {
                        let toks: Vec<u32> = g.tokens[i * a.n + j]
                            .iter()
                            .copied()
                            .filter(|t| !eos.contains(t))
                            .collect();
                        p.tokenizer.decode(&toks, true)
                    })
                    .collect::<preftune_model::Result<Vec<_>>>()?;
                Ok(json!({"prompt": r.value["prompt"], "responses": responses, "sampling": settings}))
            })
            .collect::<Result<Vec<_>>>()?;
        file.append(&lines)?;
    }
    emit(
        &json!({"rows": rows.len(), "generated_now": rows.len() - start, "resumed_after": start,
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
    let n: usize = p
        .model
        .named_params()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    emit(
        &json!({"out": out, "architecture": format!("{:?}", p.model.cfg.arch), "parameters": n, "tensors": p.model.named_params().len(), "dtype": dtype}),
    );
    Ok(())
}

pub fn chat(m: &ModelArgs, system: Option<&str>, s: &SamplingArgs) -> Result<()> {
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
fn run_trainer<A: serde::de::DeserializeOwned>(
    run: &RunArgs,
    defaults: toml::Table,
    trainer: fn(
        &preftune_train::RunConfig<A>,
        bool,
        bool,
    ) -> preftune_train::Result<serde_json::Value>,
) -> Result<()> {
    let cfg = preftune_train::config::load::<A>(run.config.as_deref(), defaults, &run.set)?;
    use_config_device(cfg.args.device)?;
    emit(&trainer(&cfg, run.resume, run.eval_only)?);
    Ok(())
}

pub fn sft(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::sft::defaults(),
        preftune_train::sft::run,
    )
}

pub fn dpo(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::dpo::defaults(),
        preftune_train::dpo::run,
    )
}

pub fn rm(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::reward::defaults(),
        preftune_train::reward::run,
    )
}

pub fn grpo(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::grpo::defaults(),
        preftune_train::grpo::run,
    )
}

pub fn rloo(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::rloo::defaults(),
        preftune_train::rloo::run,
    )
}

pub fn ppo(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::ppo::defaults(),
        preftune_train::ppo::run,
    )
}

pub fn reinforce(run: &RunArgs) -> Result<()> {
    run_trainer(
        run,
        preftune_train::rloo::reinforce_defaults(),
        preftune_train::rloo::run_reinforce,
    )
}
