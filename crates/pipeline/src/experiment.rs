//! `preftune pipeline CONFIG`: the DPO paper's controlled-sentiment experiment on IMDb, end to end.
//!
//! Stages, each cached in `output_dir` (a stage with `STAGE/done.json` is skipped; trainers resume
//! from their checkpoints): the base model (a GGUF is converted once), the gold judge, the data
//! (review text for SFT, 2–8 token review prefixes as prompts), SFT, preference pairs labelled by
//! the gold judge, a reward model on those pairs, then DPO, PPO and GRPO from the SFT policy, and
//! an evaluation of every policy (and Best-of-N over SFT samples) on held-out prefixes.
use std::path::{Path, PathBuf};

use crate::config::{Bf16Setting, Labels, Method, PipelineConfig, RmPairs};
use crate::error::{ensure, Context, Error, Result};
use preftune_data::Text;
use preftune_eval::gold::{default_csv, read_imdb_csv, GoldSentiment};
use preftune_eval::sources::{sample_and_score, text_json};
use preftune_eval::stats::{fmt_over_runs, length_flag, lengths, mean_ci, over_runs, win_rate};
use preftune_eval::RewardSource;
use preftune_model::io::write_jsonl;
use preftune_model::{LoadOptions, Pretrained, SamplingConfig};
use preftune_train::config::apply_set;
use preftune_train::rl::rollout::load_prompts;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use preftune_train::evaluate::{policy_samples, prompts_per_batch, EvalSampling};

fn done(dir: &Path) -> bool {
    dir.join("done.json").exists()
}

fn mark_done(dir: &Path, v: &Value) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    preftune_model::io::write_json(&dir.join("done.json"), v)?;
    Ok(())
}

/// Runs one of the shared-loop trainers with the pipeline's table for it, over the trainer's
/// defaults, plus the paths the pipeline decides.
fn train<A: preftune_train::Options>(
    defaults: toml::Table,
    table: &toml::Table,
    sets: &[String],
    run: fn(&preftune_train::RunConfig<A>, bool, bool) -> preftune_train::Result<Value>,
) -> Result<Value> {
    let cfg = load_trainer::<A>(defaults, table, sets)?;
    Ok(run(&cfg, true, false)?)
}

/// A trainer's config: its defaults, the pipeline's table for it over them, then `sets`.
pub(crate) fn load_trainer<A: preftune_train::Options>(
    defaults: toml::Table,
    table: &toml::Table,
    sets: &[String],
) -> Result<preftune_train::RunConfig<A>> {
    let mut merged = defaults;
    for (k, v) in table {
        merged.insert(k.clone(), v.clone());
    }
    Ok(A::load_config(None, merged, sets)?)
}

/// The summary a finished stage left in `dir/done.json`.
pub(crate) fn read_done(dir: &Path) -> Result<Value> {
    let path = dir.join("done.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// One cached stage: skipped when `dir/done.json` exists, else run and marked done with its
/// summary plus `stage_seconds`.
pub(crate) fn cached(dir: &Path, label: &str, run: impl FnOnce() -> Result<Value>) -> Result<()> {
    if done(dir) {
        return Ok(());
    }
    eprintln!("[pipeline] {label}");
    let t = std::time::Instant::now();
    let mut v = run()?;
    v["stage_seconds"] = json!(t.elapsed().as_secs_f64());
    mark_done(dir, &v)
}

/// One cached trainer stage. Once it is done its `checkpoint-*` folders (weights plus optimizer
/// state, 1.6 GB each for SmolLM2) are deleted unless `keep_checkpoints`: the final model stays,
/// and nothing resumes a finished stage.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage<A: preftune_train::Options>(
    dir: &Path,
    label: &str,
    defaults: toml::Table,
    table: &toml::Table,
    sets: &[String],
    run: fn(&preftune_train::RunConfig<A>, bool, bool) -> preftune_train::Result<Value>,
    keep_checkpoints: bool,
) -> Result<()> {
    cached(dir, label, || train(defaults, table, sets, run))?;
    if !keep_checkpoints {
        remove_checkpoints(dir)?;
    }
    Ok(())
}

/// Deletes a finished trainer's `checkpoint-*` folders.
pub(crate) fn remove_checkpoints(dir: &Path) -> Result<()> {
    Ok(preftune_train::checkpoint::remove_all(dir)?)
}

/// The base model: a GGUF becomes an HF folder (`out/base`) once.
pub(crate) fn base_model(model: &Path, out: &Path) -> Result<PathBuf> {
    if !model.is_file() {
        return Ok(model.to_path_buf());
    }
    let dir = out.join("base");
    if !done(&dir) {
        eprintln!(
            "[pipeline] converting {} into {}",
            model.display(),
            dir.display()
        );
        Pretrained::load(model, &LoadOptions::default())?.save(&dir)?;
        mark_done(&dir, &json!({"from": model.display().to_string()}))?;
    }
    Ok(dir)
}

/// One prefix's scored samples as a best-vs-worst pair (none when all score the same) and a
/// ranking row, with empty samples (EOS only: nothing to prefer or learn from) dropped and counted.
fn label_samples(
    prompt: &str,
    responses: Vec<String>,
    scores: Vec<f64>,
) -> (Option<Value>, Option<Value>, usize) {
    let n = responses.len();
    let (responses, scores): (Vec<String>, Vec<f64>) = responses
        .into_iter()
        .zip(scores)
        .filter(|(r, _)| !r.trim().is_empty())
        .unzip();
    let dropped = n - responses.len();
    if responses.len() < 2 {
        return (None, None, dropped);
    }
    let pair = preftune_eval::sources::best_and_worst(&scores).map(
        |(best, worst)| json!({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst]}),
    );
    let ranking = json!({"prompt": prompt, "responses": responses, "scores": scores});
    (pair, Some(ranking), dropped)
}

/// The mean of `key` over the rounds that have it, or null.
fn mean_over(rounds: &Value, key: &str) -> Value {
    let x: Vec<f64> = rounds
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r[key].as_f64())
        .collect();
    if x.is_empty() {
        Value::Null
    } else {
        json!(x.iter().sum::<f64>() / x.len() as f64)
    }
}

/// A review's text with the IMDb files' HTML line breaks as spaces.
fn clean_review(t: &str) -> String {
    t.replace("<br />", " ")
}

/// The reviews in the seeded order the data stages take them from (SFT, prompts, held-out
/// prompts, then the reward model's review pairs, each from the next unused ones), and the RNG
/// as the shuffle left it.
fn review_order(n: usize, seed: u64) -> (Vec<usize>, rand::rngs::StdRng) {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    (idx, rng)
}

/// `data.rm_review_pairs` pairs of real review openings scored by the gold judge, as
/// `((higher text, score), (lower text, score))`: reviews after those the other stages use, each
/// cut to a 2-8 token prefix plus `max_new_tokens` tokens (the length of a prefix and its sampled
/// continuation); the higher-scored half paired at random with the lower half.
#[allow(clippy::type_complexity)]
fn review_pairs(
    cfg: &PipelineConfig,
    base: &Path,
    reviews: &[(String, bool)],
    gold_spec: &str,
) -> Result<Vec<((String, f64), (String, f64))>> {
    let d = &cfg.data;
    if d.rm_review_pairs == 0 {
        return Ok(vec![]);
    }
    let start = d.sft_reviews + d.prompts + d.eval_prompts;
    let want = 2 * d.rm_review_pairs;
    ensure!(
        start + want <= reviews.len(),
        "data.rm_review_pairs: {} pairs need {want} reviews beyond the {start} used, of {}",
        d.rm_review_pairs,
        reviews.len()
    );
    let tok = Pretrained::load(base, &LoadOptions::default())?.tokenizer;
    let (idx, _) = review_order(reviews.len(), cfg.seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x0e71e);
    let mut texts = Vec::with_capacity(want);
    for &i in &idx[start..start + want] {
        let ids = tok.encode(&clean_review(&reviews[i].0), false)?;
        let k = rng.gen_range(d.prefix_min_tokens..=d.prefix_max_tokens) + d.max_new_tokens;
        texts.push(tok.decode(&ids[..k.min(ids.len())], false)?);
    }
    let gold = RewardSource::parse(gold_spec)?;
    let samples: Vec<preftune_eval::sources::Sample> = texts
        .iter()
        .map(|t| preftune_eval::sources::Sample {
            prompt: Text::Plain(String::new()),
            response: t.clone(),
            risky: false,
        })
        .collect();
    let scores = gold.score(&samples)?;
    let mut scored: Vec<(String, f64)> = texts.into_iter().zip(scores).collect();
    scored.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut hi = scored.split_off(scored.len() / 2);
    hi.shuffle(&mut rng);
    Ok(hi
        .into_iter()
        .zip(scored)
        .filter(|(h, l)| h.1 > l.1)
        .collect())
}

/// Runs (or continues) the pipeline; returns its output folder and the summary (`results.json`).
/// Runs the pipeline of `config` (with `--set` overrides) once, or once per seed when `seeds` (the
/// command line's `--seeds`, else the config's `seeds` key) names several: each in
/// `output_dir/seed-N` with `seed = N`, then `output_dir/results.json` holds every method's mean,
/// spread and Student-t interval over the seeds.
pub fn run(config: &Path, overrides: &[String], seeds: &[u64]) -> Result<(PathBuf, Value)> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| Error::msg(format!("{}: {e}", config.display())))?;
    for s in overrides {
        apply_set(&mut table, s)?;
    }
    let from_table = match table.remove("seeds") {
        None => vec![],
        Some(v) => v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_integer().and_then(|i| u64::try_from(i).ok()))
                    .collect::<Option<Vec<u64>>>()
            })
            .ok_or_else(|| {
                Error::msg(format!(
                    "{}: seeds: expected a list of seeds >= 0, like [1, 2, 3], found {v}",
                    config.display()
                ))
            })?,
    };
    let seeds = if seeds.is_empty() {
        from_table
    } else {
        seeds.to_vec()
    };
    // `experiment`: "imdb" (the default) or "safety" (examples/safety.toml).
    let safety = match table.get("experiment").map(|v| v.as_str()) {
        None => false,
        Some(Some("imdb")) => {
            table.remove("experiment");
            false
        }
        Some(Some("safety")) => true,
        Some(other) => {
            return Err(Error::msg(format!(
                "{}: experiment: {other:?} (use \"imdb\" or \"safety\")",
                config.display()
            )))
        }
    };
    let one = |t: toml::Table| {
        if safety {
            crate::safety::run_one(config, t)
        } else {
            run_one(config, t)
        }
    };
    if seeds.is_empty() {
        return one(table);
    }
    let mut unique = seeds.clone();
    unique.sort_unstable();
    unique.dedup();
    ensure!(
        unique.len() == seeds.len(),
        "{}: seeds: {seeds:?} repeats a seed",
        config.display()
    );
    let out = PathBuf::from(
        table
            .get("output_dir")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::msg(format!("{}: output_dir: required", config.display())))?,
    );
    let mut runs = vec![];
    for (i, &seed) in seeds.iter().enumerate() {
        let dir = out.join(format!("seed-{seed}"));
        eprintln!(
            "[pipeline] seed {seed} ({} of {}) in {}",
            i + 1,
            seeds.len(),
            dir.display()
        );
        let mut t = table.clone();
        t.insert("seed".into(), toml::Value::Integer(seed as i64));
        t.insert("output_dir".into(), dir.display().to_string().into());
        runs.push((seed, one(t)?.1));
    }
    if safety {
        let summary = crate::safety::over_seeds(&runs);
        preftune_model::io::write_json(&out.join("results.json"), &summary)?;
        crate::safety::print_over_seeds(&summary);
        return Ok((out, summary));
    }
    let summary = over_seeds(&runs);
    preftune_model::io::write_json(&out.join("results.json"), &summary)?;
    eprintln!("\nover seeds {seeds:?}: mean, standard deviation and 95% interval (Student t)");
    eprintln!(
        "gold judge held-out accuracy {}; reward model held-out accuracy vs gold {}",
        fmt_runs(&summary["gold_accuracy"]),
        fmt_runs(&summary["reward_model_accuracy"])
    );
    for (m, r) in summary["methods"].as_object().into_iter().flatten() {
        eprintln!(
            "{m:<5} win vs SFT {}  gold {}  KL {}  words {}{}",
            fmt_runs(&r["win_rate_vs_sft"]),
            fmt_runs(&r["gold_reward"]),
            fmt_runs(&r["kl_to_sft"]),
            fmt_runs(&r["mean_words"]),
            seed_flags(r)
        );
    }
    Ok((out, summary))
}

/// The length warning of a method over seeds: its mean's flag, and how many seeds' own runs were
/// flagged (`  [shorter in 1 of 3 seeds: reward hacking?]`), or nothing.
fn seed_flags(r: &Value) -> String {
    let per_run = r["length_flags_per_run"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut parts = vec![];
    if let Some(f) = r["length_flag"].as_str() {
        parts.push(format!("{f} than SFT on average"));
    }
    for f in ["longer", "shorter"] {
        let k = per_run.iter().filter(|x| x.as_str() == Some(f)).count();
        if k > 0 {
            parts.push(format!("{f} in {k} of {} seeds", per_run.len()));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("  [{}: reward hacking?]", parts.join(", "))
    }
}

/// `0.812 +- 0.040 [0.713, 0.911]`, or `-` for a statistic no run had.
fn fmt_runs(v: &Value) -> String {
    fmt_over_runs(v, " +- ", " [", "]")
}

/// The summary over seeds of single runs' `results.json` values: per method, the win rate against
/// SFT, gold reward, KL to SFT, mean words and their change against SFT, each over the runs; a
/// method whose mean length moved by more than `LENGTH_FLAG_FRACTION` from SFT's is flagged.
fn over_seeds(runs: &[(u64, Value)]) -> Value {
    let stat = |f: &dyn Fn(&Value) -> Option<f64>| -> Value {
        let x: Vec<f64> = runs.iter().filter_map(|(_, v)| f(v)).collect();
        if x.is_empty() {
            Value::Null
        } else {
            json!(over_runs(&x))
        }
    };
    let names: Vec<String> = runs
        .first()
        .and_then(|(_, v)| v["methods"].as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let sft_words = stat(&|v| v["methods"]["sft"]["length"]["mean_words"].as_f64());
    let mut methods = serde_json::Map::new();
    for m in &names {
        let get = |v: &Value, path: &[&str]| -> Option<f64> {
            path.iter().fold(&v["methods"][m], |x, k| &x[*k]).as_f64()
        };
        let words = stat(&|v| get(v, &["length", "mean_words"]));
        let change = stat(&|v| {
            let sft = v["methods"]["sft"]["length"]["mean_words"].as_f64()?;
            Some(get(v, &["length", "mean_words"])? / sft - 1.0)
        });
        let flag = match (words["mean"].as_f64(), sft_words["mean"].as_f64()) {
            (Some(w), Some(s)) if m != "sft" => length_flag(w, s),
            _ => None,
        };
        // Each seed's own flag: one seed's collapse hides in the mean.
        let per_run: Vec<Value> = runs
            .iter()
            .map(|(_, v)| v["methods"][m]["length_flag"].clone())
            .collect();
        methods.insert(
            m.clone(),
            json!({
                "win_rate_vs_sft": stat(&|v| get(v, &["win_rate_vs_sft", "win_rate"])),
                "gold_reward": stat(&|v| get(v, &["gold_reward", "mean"])),
                "kl_to_sft": stat(&|v| get(v, &["kl_to_sft"])),
                "mean_words": words,
                "length_change_vs_sft": if m == "sft" { Value::Null } else { change },
                "length_flag": flag,
                "length_flags_per_run": per_run,
                "labels_agreement_with_gold": stat(&|v| get(v, &["labels_agreement_with_gold"])),
            }),
        );
    }
    json!({
        "seeds": runs.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        "runs": runs.iter().map(|(s, v)| (s.to_string(), v["output_dir"].clone()))
            .collect::<serde_json::Map<_, _>>(),
        "gold_accuracy": stat(&|v| v["gold_accuracy"].as_f64()),
        "reward_model_accuracy": stat(&|v| v["reward_model_heldout"]["eval_accuracy"].as_f64()),
        "methods": methods,
    })
}

/// One run of the pipeline from its merged config table.
fn run_one(config: &Path, table: toml::Table) -> Result<(PathBuf, Value)> {
    let cfg = resolve(config, table)?;
    let r = Run {
        out: cfg.output_dir.clone(),
        cfg: &cfg,
    };
    std::fs::create_dir_all(&r.out)?;
    let base = base_model(&cfg.model, &r.out)?;
    let csv = cfg.reviews_csv.clone().unwrap_or_else(default_csv);
    let reviews = read_imdb_csv(&csv)?;
    let gold_spec = r.gold_judge(&reviews)?;
    r.data(&base, &reviews)?;
    let sft_dir = r.sft(&base)?;
    r.pairs(&sft_dir, &gold_spec)?;
    r.rm_data(&base, &reviews, &gold_spec)?;
    let rm_spec = r.reward_model(&sft_dir)?;
    let sweep = r.policies(&sft_dir, &rm_spec, &gold_spec)?;
    if cfg.methods.contains(&Method::OnlineDpo) {
        r.online_dpo(&base, &sft_dir, &rm_spec, &gold_spec)?;
    }
    let eval_start = std::time::Instant::now();
    let mut e = r.evaluate(&sft_dir, &rm_spec, &gold_spec, sweep)?;
    if let Some(m) = e.results.get_mut(Method::OnlineDpo.name()) {
        m["rounds"] = r.online_rounds()?;
        m["labels_agreement_with_gold"] =
            json!(mean_over(&m["rounds"], "labels/agreement_with_gold"));
    }
    let summary = r.summarise(e.results, &e.order, eval_start.elapsed().as_secs_f64())?;
    eprintln!(
        "\ngold judge held-out accuracy {}; reward model held-out accuracy vs gold {}",
        summary["gold_accuracy"], summary["reward_model_heldout"]["eval_accuracy"]
    );
    eprintln!("method  gold reward, KL to SFT, win rate vs SFT (gold judge), mean words");
    for l in &e.table {
        eprintln!("{l}");
    }
    Ok((r.out, summary))
}

/// The config with its `bf16` resolved, and every trainer's table given the pipeline's `bf16` and
/// `seed` unless it sets its own.
fn resolve(config: &Path, table: toml::Table) -> Result<PipelineConfig> {
    let mut cfg: PipelineConfig = table
        .try_into()
        .map_err(|e| Error::msg(format!("{}: {e}", config.display())))?;
    trainers_follow(
        &mut cfg.bf16,
        cfg.seed,
        [
            &mut cfg.sft,
            &mut cfg.rm,
            &mut cfg.dpo,
            &mut cfg.kto,
            &mut cfg.orpo,
            &mut cfg.simpo,
            &mut cfg.ppo,
            &mut cfg.grpo,
            &mut cfg.online_dpo,
        ],
    );
    Ok(cfg)
}

/// Resolves the pipeline's `bf16` (`"auto"` becomes on or off here), then gives each trainer's
/// table that `bf16` and the pipeline's `seed` unless it sets its own.
pub(crate) fn trainers_follow<const N: usize>(
    setting: &mut Bf16Setting,
    seed: u64,
    tables: [&mut toml::Table; N],
) {
    let bf16 = setting.resolve();
    *setting = if bf16 {
        Bf16Setting::On
    } else {
        Bf16Setting::Off
    };
    for t in tables {
        t.entry("bf16").or_insert(toml::Value::Boolean(bf16));
        t.entry("seed").or_insert(toml::Value::Integer(seed as i64));
    }
}

/// What the evaluation found: results per policy, the table's lines, the policies in order.
struct Evaluation {
    results: serde_json::Map<String, Value>,
    table: Vec<String>,
    order: Vec<String>,
}

/// One run of the pipeline in `out`: each stage below is a method, cached in its own folder.
struct Run<'a> {
    cfg: &'a PipelineConfig,
    out: PathBuf,
}

impl Run<'_> {
    fn p(&self, s: &str) -> PathBuf {
        self.out.join(s)
    }

    fn ps(&self, s: &str) -> String {
        self.out.join(s).display().to_string()
    }

    fn has(&self, m: Method) -> bool {
        self.cfg.methods.contains(&m)
    }

    fn bf16(&self) -> bool {
        self.cfg.bf16 == Bf16Setting::On
    }

    /// The gold judge, trained on the labelled reviews (held-out accuracy recorded); returns its
    /// reward source.
    fn gold_judge(&self, reviews: &[(String, bool)]) -> Result<String> {
        let gold_dir = self.p("gold");
        let gold_file = gold_dir.join("gold-sentiment.safetensors");
        cached(
            &gold_dir,
            &format!("training the gold judge on {} reviews", reviews.len()),
            || {
                let (g, report) = GoldSentiment::train(reviews, self.cfg.seed)?;
                std::fs::create_dir_all(&gold_dir)?;
                g.save(&gold_file)?;
                Ok(serde_json::to_value(&report)?)
            },
        )?;
        Ok(format!("gold:sentiment={}", gold_file.display()))
    }

    /// Data: SFT text and prompts from disjoint reviews.
    fn data(&self, base: &Path, reviews: &[(String, bool)]) -> Result<()> {
        let (cfg, data_dir) = (self.cfg, self.p("data"));
        if done(&data_dir) {
            return Ok(());
        }
        let tok = Pretrained::load(base, &LoadOptions::default())?.tokenizer;
        let (idx, mut rng) = review_order(reviews.len(), cfg.seed);
        let d = &cfg.data;
        ensure!(
            d.sft_reviews + d.prompts + d.eval_prompts <= idx.len(),
            "data: asks for more reviews than the {} available",
            idx.len()
        );
        let sft: Vec<Value> = idx[..d.sft_reviews]
            .iter()
            .map(|&i| {
                let words: Vec<&str> = reviews[i].0.split_whitespace().collect();
                json!({"text": clean_review(&words[..words.len().min(d.sft_words)].join(" "))})
            })
            .collect();
        let prefix = |i: usize, rng: &mut rand::rngs::StdRng| -> Result<Value> {
            let ids = tok.encode(&clean_review(&reviews[i].0), false)?;
            let k = rng
                .gen_range(d.prefix_min_tokens..=d.prefix_max_tokens)
                .min(ids.len());
            Ok(json!({"prompt": tok.decode(&ids[..k], false)?}))
        };
        let prompts = idx[d.sft_reviews..d.sft_reviews + d.prompts]
            .iter()
            .map(|&i| prefix(i, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let eval = idx[d.sft_reviews + d.prompts..d.sft_reviews + d.prompts + d.eval_prompts]
            .iter()
            .map(|&i| prefix(i, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        std::fs::create_dir_all(&data_dir)?;
        write_jsonl(&data_dir.join("sft.jsonl"), &sft)?;
        write_jsonl(&data_dir.join("prompts.jsonl"), &prompts)?;
        write_jsonl(&data_dir.join("eval_prompts.jsonl"), &eval)?;
        mark_done(
            &data_dir,
            &json!({"sft": sft.len(), "prompts": prompts.len(), "eval_prompts": eval.len()}),
        )
    }

    /// SFT so the model writes reviews.
    fn sft(&self, base: &Path) -> Result<PathBuf> {
        let sft_dir = self.p("sft");
        stage(
            &sft_dir,
            "SFT",
            preftune_train::sft::defaults(),
            &self.cfg.sft,
            &[
                format!("model_name_or_path={}", base.display()),
                format!("train_file={}", self.ps("data/sft.jsonl")),
                format!("output_dir={}", sft_dir.display()),
            ],
            preftune_train::sft::run,
            self.cfg.keep_checkpoints,
        )?;
        Ok(sft_dir)
    }

    /// Preference data from several SFT samples per prefix, scored by the gold judge: best vs
    /// worst pairs for DPO, and the scored samples as rankings (every ordered pair) for the reward
    /// model, whose last `rm_eval_prompts` prompts are held out to measure its accuracy.
    fn pairs(&self, sft_dir: &Path, gold_spec: &str) -> Result<()> {
        let (cfg, pairs_dir) = (self.cfg, self.p("pairs"));
        cached(&pairs_dir, "sampling and labelling pairs", || {
            // Training data, so sampled as the trainers run: in bf16 when the run is (the
            // evaluation stays f32).
            let _bf16 = preftune_model::ops::Bf16Scope::new(self.bf16());
            let sft = Pretrained::load(sft_dir, &LoadOptions::default())?;
            let gold = RewardSource::parse(gold_spec)?;
            let (prompts, _) = load_prompts(&self.p("data/prompts.jsonl"), &sft.tokenizer, None)?;
            let mut pairs = vec![];
            let mut all = vec![];
            // A sample that is only EOS has no text to prefer or learn from; such samples are
            // dropped from the pairs and rankings and counted.
            let mut empty = 0;
            for (b, chunk) in prompts.chunks(8).enumerate() {
                let batch: Vec<(Text, bool)> =
                    chunk.iter().map(|x| (x.text.clone(), false)).collect();
                let s = SamplingConfig {
                    max_new_tokens: cfg.data.max_new_tokens,
                    temperature: 1.0,
                    seed: cfg.seed.wrapping_add(b as u64),
                    eos_token_ids: sft.eos_token_ids(),
                    pad_token_id: sft.pad_token_id(),
                    ..Default::default()
                };
                let cands = sample_and_score(&sft, &gold, &batch, cfg.data.samples_per_prompt, &s)?;
                for ((prompt, _), c) in batch.iter().zip(cands) {
                    let Text::Plain(prompt) = prompt else {
                        continue;
                    };
                    let (pair, ranking, dropped) = label_samples(prompt, c.responses, c.rewards);
                    empty += dropped;
                    pairs.extend(pair);
                    all.extend(ranking);
                }
            }
            let held = cfg.data.rm_eval_prompts.min(all.len() / 2);
            let (rm_train, rm_eval) = all.split_at(all.len() - held);
            let eval_prompts: std::collections::HashSet<&Value> =
                rm_eval.iter().map(|r| &r["prompt"]).collect();
            let rm_pairs: Vec<Value> = pairs
                .iter()
                .filter(|r| !eval_prompts.contains(&r["prompt"]))
                .cloned()
                .collect();
            std::fs::create_dir_all(&pairs_dir)?;
            write_jsonl(&pairs_dir.join("pairs.jsonl"), &pairs)?;
            write_jsonl(&pairs_dir.join("rm-pairs.jsonl"), &rm_pairs)?;
            write_jsonl(&pairs_dir.join("rankings.jsonl"), rm_train)?;
            write_jsonl(&pairs_dir.join("rankings-eval.jsonl"), rm_eval)?;
            Ok(
                json!({"pairs": pairs.len(), "prompts": all.len(), "rm_train_prompts": rm_train.len(),
                      "rm_eval_prompts": rm_eval.len(), "empty_responses_dropped": empty}),
            )
        })
    }

    /// The reward model's training file: its share of the sampled pairs (or rankings), plus
    /// gold-labelled pairs of real review openings when `rm_review_pairs` asks for them.
    fn rm_data(&self, base: &Path, reviews: &[(String, bool)], gold_spec: &str) -> Result<()> {
        let (cfg, rm_data) = (self.cfg, self.p("rm-data"));
        let rankings = cfg.data.rm_pairs == RmPairs::Rankings;
        cached(&rm_data, "reward-model data", || {
            let mut rows = preftune_model::io::read_jsonl(&self.p(if rankings {
                "pairs/rankings.jsonl"
            } else {
                "pairs/rm-pairs.jsonl"
            }))?;
            let sampled = rows.len();
            let review_pairs = review_pairs(cfg, base, reviews, gold_spec)?;
            let n_review = review_pairs.len();
            rows.extend(review_pairs.into_iter().map(|(hi, lo)| {
                if rankings {
                    json!({"prompt": "", "responses": [hi.0, lo.0], "scores": [hi.1, lo.1]})
                } else {
                    json!({"prompt": "", "chosen": hi.0, "rejected": lo.0})
                }
            }));
            rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x5eed));
            std::fs::create_dir_all(&rm_data)?;
            write_jsonl(&rm_data.join("train.jsonl"), &rows)?;
            Ok(json!({"sampled": sampled, "review_pairs": n_review, "rows": rows.len()}))
        })
    }

    /// The reward model on the gold-labelled pairs (the proxy PPO, GRPO and Best-of-N optimise),
    /// when one of them runs; returns its reward source.
    fn reward_model(&self, sft_dir: &Path) -> Result<String> {
        let rm_dir = self.p("rm");
        let online_rm = self.has(Method::OnlineDpo) && self.online_labels()? == Labels::Rm;
        if self.has(Method::Ppo) || self.has(Method::Bon) || self.has(Method::Grpo) || online_rm {
            stage(
                &rm_dir,
                "reward model",
                preftune_train::reward::defaults(),
                &self.cfg.rm,
                &[
                    format!("model_name_or_path={}", sft_dir.display()),
                    format!("train_file={}", self.ps("rm-data/train.jsonl")),
                    format!("output_dir={}", rm_dir.display()),
                ]
                .into_iter()
                .chain(
                    std::fs::metadata(self.p("pairs/rankings-eval.jsonl"))
                        .is_ok_and(|m| m.len() > 0)
                        .then(|| format!("eval_file={}", self.ps("pairs/rankings-eval.jsonl"))),
                )
                .collect::<Vec<_>>(),
                preftune_train::reward::run,
                self.cfg.keep_checkpoints,
            )?;
        }
        Ok(format!("model:{}", rm_dir.display()))
    }

    /// DPO on the pairs; PPO and GRPO on the prompts with the reward model (or gold); the frontier
    /// sweeps repeat DPO and PPO at other betas / KL coefficients. Returns the sweeps' folders.
    fn policies(&self, sft_dir: &Path, rm_spec: &str, gold_spec: &str) -> Result<Vec<String>> {
        use preftune_train::dpo;
        use preftune_train::rl::{grpo, ppo};
        let cfg = self.cfg;
        let sft_path = sft_dir.display().to_string();
        let reward_of = |t: &toml::Table| -> Vec<String> {
            // `reward` in a method's table may name "rm" or "gold"; the default is the reward model.
            let r = t.get("reward").and_then(|v| v.as_str()).unwrap_or("rm");
            let spec = match r {
                "rm" => rm_spec,
                "gold" => gold_spec,
                other => other,
            };
            vec![format!("reward=\"{}\"", spec.replace('"', "\\\""))]
        };
        let online_sets = |dir: &str, table: &toml::Table, extra: Option<String>| -> Vec<String> {
            let mut v = vec![
                format!("model_name_or_path={sft_path}"),
                format!("train_file={}", self.ps("data/prompts.jsonl")),
                format!("output_dir={}", self.ps(dir)),
            ];
            v.extend(reward_of(table));
            v.extend(extra);
            v
        };
        // One DPO or PPO stage in `dir`, with an extra `key=value` (a swept beta or KL coefficient).
        let dpo_stage = |dir: &str, label: &str, extra: Option<String>| -> Result<()> {
            let mut sets = vec![
                format!("model_name_or_path={sft_path}"),
                format!("train_file={}", self.ps("pairs/pairs.jsonl")),
                format!("output_dir={}", self.ps(dir)),
            ];
            sets.extend(extra);
            stage(
                &self.p(dir),
                label,
                dpo::defaults(),
                &cfg.dpo,
                &sets,
                dpo::run,
                cfg.keep_checkpoints,
            )
        };
        let ppo_stage =
            |dir: &str, label: &str, table: &toml::Table, extra: Option<String>| -> Result<()> {
                let sets = online_sets(dir, table, extra);
                stage(
                    &self.p(dir),
                    label,
                    ppo::defaults(),
                    table,
                    &sets,
                    ppo::run,
                    cfg.keep_checkpoints,
                )
            };
        if self.has(Method::Dpo) {
            dpo_stage("dpo", "DPO", None)?;
        }
        // The offline methods without DPO's loss, on the same pairs from the same SFT policy.
        let pair_sets = |dir: &str| -> Vec<String> {
            vec![
                format!("model_name_or_path={sft_path}"),
                format!("train_file={}", self.ps("pairs/pairs.jsonl")),
                format!("output_dir={}", self.ps(dir)),
            ]
        };
        if self.has(Method::Kto) {
            stage(
                &self.p("kto"),
                "KTO",
                dpo::kto::defaults(),
                &cfg.kto,
                &pair_sets("kto"),
                dpo::kto::run,
                cfg.keep_checkpoints,
            )?;
        }
        if self.has(Method::Orpo) {
            stage(
                &self.p("orpo"),
                "ORPO",
                dpo::cpo::orpo_defaults(),
                &cfg.orpo,
                &pair_sets("orpo"),
                dpo::cpo::run_orpo,
                cfg.keep_checkpoints,
            )?;
        }
        if self.has(Method::Simpo) {
            let mut sets = pair_sets("simpo");
            // SimPO is CPO's `simpo` loss; the table may set the rest (cpo_alpha, simpo_gamma).
            if !cfg.simpo.contains_key("loss_type") {
                sets.push("loss_type=\"simpo\"".into());
            }
            stage(
                &self.p("simpo"),
                "SimPO",
                dpo::cpo::cpo_defaults(),
                &cfg.simpo,
                &sets,
                dpo::cpo::run_cpo,
                cfg.keep_checkpoints,
            )?;
        }
        let mut sweep: Vec<String> = vec![];
        for beta in &cfg.frontier_dpo_betas {
            let name = format!("dpo-beta-{beta}");
            dpo_stage(
                &name,
                &format!("DPO, beta {beta}"),
                Some(format!("beta={beta}")),
            )?;
            sweep.push(name);
        }
        for kl in &cfg.frontier_ppo_kl_coefs {
            let name = format!("ppo-kl-{kl}");
            let label = format!("PPO, kl_coef {kl}");
            ppo_stage(&name, &label, &cfg.ppo, Some(format!("kl_coef={kl}")))?;
            sweep.push(name);
        }
        if self.has(Method::Ppo) {
            ppo_stage("ppo", "PPO", &cfg.ppo, None)?;
        }
        // The DPO paper's PPO-GT: the same PPO against the gold judge itself, the upper bound of
        // what PPO gets from a perfect reward model.
        if self.has(Method::PpoGt) {
            let mut table = cfg.ppo.clone();
            table.insert("reward".into(), "gold".into());
            ppo_stage("ppo-gt", "PPO with the gold reward (PPO-GT)", &table, None)?;
        }
        if self.has(Method::Grpo) {
            let sets = online_sets("grpo", &cfg.grpo, None);
            stage(
                &self.p("grpo"),
                "GRPO",
                grpo::defaults(),
                &cfg.grpo,
                &sets,
                grpo::run,
                cfg.keep_checkpoints,
            )?;
        }
        Ok(sweep)
    }

    /// Online DPO's metrics per round, as results.json keeps them.
    fn online_rounds(&self) -> Result<Value> {
        let keep = [
            "round",
            "labels/pairs",
            "labels/agreement_with_gold",
            "labels/position_bias",
            "labels/ties",
            "gold/mean_score",
            "objective/scores",
            "val/contain_eos_token",
            "rewards/accuracies",
            "rewards/margins",
            "round_seconds",
        ];
        let done = read_done(&self.p(Method::OnlineDpo.name()))?;
        Ok(done["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                keep.iter()
                    .filter_map(|k| r.get(*k).map(|v| (k.to_string(), v.clone())))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            })
            .collect::<Vec<Value>>()
            .into())
    }

    /// `online_dpo.labels`: gold (the default), the reward model or a judge.
    fn online_labels(&self) -> Result<Labels> {
        match self.cfg.online_dpo.get("labels") {
            None => Ok(Labels::Gold),
            Some(v) => v
                .as_str()
                .ok_or_else(|| {
                    Error::msg(format!("online_dpo.labels: expected a string, found {v}"))
                })?
                .parse()
                .map_err(Error::Msg),
        }
    }

    /// Online DPO from the SFT policy on the training prompts: `[online_dpo]`'s options (by
    /// default as many samples per prompt, as long and at the temperature the offline pairs
    /// were sampled at), DPO's keys from `[dpo]` under `[online_dpo]`'s, the pairs labelled by
    /// `labels`, and every round's labels measured against gold.
    fn online_dpo(
        &self,
        base: &Path,
        sft_dir: &Path,
        rm_spec: &str,
        gold_spec: &str,
    ) -> Result<()> {
        use preftune_train::dpo::{self, online};
        let (cfg, dir) = (self.cfg, self.p("online-dpo"));
        cached(&dir, "online DPO", || {
            let mut own = toml::Table::new();
            own.insert(
                "num_generations".into(),
                (cfg.data.samples_per_prompt as i64).into(),
            );
            own.insert(
                "max_new_tokens".into(),
                (cfg.data.max_new_tokens as i64).into(),
            );
            own.insert("temperature".into(), 1.0.into());
            let mut dpo_table = cfg.dpo.clone();
            for (k, v) in &cfg.online_dpo {
                if online::OnlineDpoOptions::KEYS.contains(&k.as_str()) {
                    own.insert(k.clone(), v.clone());
                } else if k != "labels" {
                    dpo_table.insert(k.clone(), v.clone());
                }
            }
            own.insert("prompts_file".into(), self.ps("data/prompts.jsonl").into());
            own.insert("gold".into(), gold_spec.into());
            // Llama 2's refresh of the reward model: `rm_labels = "gold"` names the gold judge,
            // and the refresh trains with `[rm]`'s options unless `[online_dpo]` sets `rm`.
            if own.get("rm_labels").and_then(|v| v.as_str()) == Some("gold") {
                own.insert("rm_labels".into(), gold_spec.into());
            }
            if own.contains_key("rm_labels") && !own.contains_key("rm") {
                own.insert("rm".into(), cfg.rm.clone().into());
            }
            let (key, spec) = match self.online_labels()? {
                Labels::Gold => ("reward", gold_spec.to_string()),
                Labels::Rm => ("reward", rm_spec.to_string()),
                Labels::Judge(s) => (
                    "judge",
                    s.replace("{base}", &base.display().to_string())
                        .replace("{sft}", &sft_dir.display().to_string()),
                ),
            };
            own.insert(key.into(), spec.into());
            let o: online::OnlineDpoOptions = toml::Value::Table(own)
                .try_into()
                .map_err(|e| Error::msg(format!("online_dpo: {e}")))?;
            let run = load_trainer::<dpo::DpoArgs>(
                dpo::defaults(),
                &dpo_table,
                &[
                    format!("model_name_or_path={}", sft_dir.display()),
                    format!("output_dir={}", dir.display()),
                ],
            )?;
            Ok(online::run(&run, &o, true)?)
        })
    }

    /// Best of `bon_n` SFT samples by the reward model, judged by gold: the rewards and responses.
    fn best_of_n(
        &self,
        sft: &Pretrained,
        eval_prompts: &[preftune_train::rl::rollout::Prompt],
        rm_spec: &str,
        gold: &RewardSource,
    ) -> Result<(Vec<f64>, Vec<String>)> {
        let cfg = self.cfg;
        let proxy = RewardSource::parse(rm_spec)?;
        let (k, n) = (cfg.bon_n, cfg.eval_samples_per_prompt);
        let mut r = vec![];
        let mut t = vec![];
        let mut rows = vec![];
        for (b, chunk) in eval_prompts.chunks(prompts_per_batch(k)).enumerate() {
            let batch: Vec<(Text, bool)> = chunk.iter().map(|x| (x.text.clone(), false)).collect();
            let s = SamplingConfig {
                max_new_tokens: cfg.data.max_new_tokens,
                temperature: 1.0,
                seed: cfg.seed.wrapping_add(1000 + b as u64),
                eos_token_ids: sft.eos_token_ids(),
                pad_token_id: sft.pad_token_id(),
                ..Default::default()
            };
            for rep in 0..n {
                let s = SamplingConfig {
                    seed: s.seed.wrapping_mul(31).wrapping_add(rep as u64),
                    ..s.clone()
                };
                let cands = sample_and_score(sft, &proxy, &batch, k, &s)?;
                for ((prompt, _), c) in batch.iter().zip(cands) {
                    let best = c.responses[c.best()].clone();
                    let g = gold.score(&[preftune_eval::Sample {
                        prompt: prompt.clone(),
                        response: best.clone(),
                        risky: false,
                    }])?[0];
                    rows.push(
                        json!({"prompt": text_json(prompt), "response": best, "gold_reward": g}),
                    );
                    r.push(g);
                    t.push(best);
                }
            }
        }
        write_jsonl(&self.p("samples-bon.jsonl"), &rows)?;
        Ok((r, t))
    }

    /// Evaluation on held-out prefixes: gold reward, KL to SFT, win rate against SFT, lengths.
    fn evaluate(
        &self,
        sft_dir: &Path,
        rm_spec: &str,
        gold_spec: &str,
        sweep: Vec<String>,
    ) -> Result<Evaluation> {
        eprintln!("[pipeline] evaluating");
        let cfg = self.cfg;
        let sft = Pretrained::load(sft_dir, &LoadOptions::default())?;
        let gold = RewardSource::parse(gold_spec)?;
        let (eval_prompts, _) =
            load_prompts(&self.p("data/eval_prompts.jsonl"), &sft.tokenizer, None)?;
        let sampling = EvalSampling {
            max_new_tokens: cfg.data.max_new_tokens,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: cfg.seed.wrapping_add(7),
        };
        let n = cfg.eval_samples_per_prompt;
        let mut results = serde_json::Map::new();
        let mut table = vec![];
        let mut sft_gold: Vec<f64> = vec![];
        let mut sft_words: Option<f64> = None;
        // Trained policies in `Method::ALL` order, then the sweeps, then Best-of-N.
        let mut order: Vec<String> = Method::ALL
            .iter()
            .filter(|m| **m != Method::Bon && self.has(**m))
            .map(|m| m.name().to_string())
            .collect();
        order.extend(sweep);
        if self.has(Method::Bon) {
            order.push(Method::Bon.name().into());
        }
        for m in order.iter().map(String::as_str) {
            let (rewards, kls, texts): (Vec<f64>, Vec<f64>, Vec<String>) = if m == "bon" {
                let (r, t) = self.best_of_n(&sft, &eval_prompts, rm_spec, &gold)?;
                // KL as the DPO paper bounds it: log N - (N - 1) / N.
                let k = cfg.bon_n as f64;
                let kl = k.ln() - (k - 1.0) / k;
                (r.clone(), vec![kl; r.len()], t)
            } else {
                let policy = Pretrained::load(&self.p(m), &LoadOptions::default())?;
                let s = policy_samples(&policy, &sft, &eval_prompts, n, &sampling, &gold)?;
                let rows: Vec<Value> = s
                    .iter()
                    .map(|x| json!({"prompt": text_json(&eval_prompts[x.prompt].text), "response": x.response,
                                    "gold_reward": x.reward, "kl_to_sft": x.kl}))
                    .collect();
                write_jsonl(&self.p(&format!("samples-{m}.jsonl")), &rows)?;
                (
                    s.iter().map(|x| x.reward).collect(),
                    s.iter().map(|x| x.kl).collect(),
                    s.iter().map(|x| x.response.clone()).collect(),
                )
            };
            if m == "sft" {
                sft_gold = rewards.clone();
            }
            let wr = (m != "sft" && sft_gold.len() == rewards.len())
                .then(|| win_rate(&rewards, &sft_gold));
            let gr = mean_ci(&rewards);
            let kl = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
            let len = lengths(&texts, Some(&rewards));
            if m == "sft" {
                sft_words = Some(len.mean_words);
            }
            let flag = sft_words
                .filter(|_| m != "sft")
                .and_then(|s| length_flag(len.mean_words, s));
            table.push(format!(
                "{m:<5} gold {:>7.3}  KL {:>7.3}  win vs SFT {}  words {:.1}{}",
                gr.mean,
                kl,
                wr.as_ref()
                    .map_or("   -  ".to_string(), |w| format!("{:.3}", w.win_rate)),
                len.mean_words,
                flag.map_or(String::new(), |f| format!(
                    "  [{f} than SFT: reward hacking?]"
                ))
            ));
            results.insert(
                m.to_string(),
                json!({"gold_reward": gr, "kl_to_sft": kl, "win_rate_vs_sft": wr, "length": len,
                       "length_flag": flag}),
            );
        }
        Ok(Evaluation {
            results,
            table,
            order,
        })
    }

    /// `results.json`: every policy's results, the gold judge's and the reward model's held-out
    /// accuracy, and the seconds per stage.
    fn summarise(
        &self,
        results: serde_json::Map<String, Value>,
        order: &[String],
        eval_seconds: f64,
    ) -> Result<Value> {
        // Seconds per stage (from each stage's done.json: cached stages keep their first timing;
        // Best-of-N has no stage of its own, its sampling is part of the evaluation).
        let mut seconds = serde_json::Map::new();
        for name in ["gold", "pairs", "sft", "rm-data", "rm"]
            .into_iter()
            .chain(order.iter().map(String::as_str))
        {
            if let Some(x) = read_done(&self.p(name))
                .ok()
                .and_then(|v| v.get("stage_seconds").cloned())
            {
                seconds.insert(name.to_string(), x);
            }
        }
        seconds.insert("evaluation".into(), json!(eval_seconds));
        let gold_report = read_done(&self.p("gold"))?;
        let rm_eval = read_done(&self.p("rm")).map_or(Value::Null, |v| v["eval"].clone());
        let summary = json!({"gold_accuracy": gold_report["heldout_accuracy"], "gold": gold_report,
                             "reward_model_heldout": rm_eval, "methods": results,
                             "reward_model_data": read_done(&self.p("rm-data"))?, "bf16": self.bf16(),
                             "stage_seconds": seconds, "output_dir": self.out.display().to_string(),
                             "seed": self.cfg.seed});
        preftune_model::io::write_json(&self.p("results.json"), &summary)?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_samples_are_dropped_before_pairing() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // The empty sample scores highest, yet the pair is best vs worst of the rest.
        let (pair, ranking, dropped) =
            label_samples("p", s(&["good", "", "bad", " "]), vec![1.0, 9.0, -2.0, 5.0]);
        assert_eq!(dropped, 2);
        let pair = pair.expect("two real samples with different scores");
        assert_eq!(
            (pair["chosen"].as_str(), pair["rejected"].as_str()),
            (Some("good"), Some("bad"))
        );
        let ranking = ranking.expect("a ranking of the two");
        assert_eq!(ranking["responses"], json!(["good", "bad"]));
        assert_eq!(ranking["scores"], json!([1.0, -2.0]));
        // One real sample: nothing to pair or rank. Equal scores: a ranking but no pair.
        assert_eq!(
            label_samples("p", s(&["", "x"]), vec![0.0, 1.0]),
            (None, None, 1)
        );
        let (pair, ranking, _) = label_samples("p", s(&["x", "y"]), vec![1.0, 1.0]);
        assert!(pair.is_none() && ranking.is_some());
    }

    #[test]
    fn runs_over_seeds_summarise_with_spread_and_flag_length_changes() {
        let run = |seed: u64, win: f64, words: f64, acc: Option<f64>| {
            (
                seed,
                json!({"seed": seed, "output_dir": format!("o/seed-{seed}"), "gold_accuracy": 0.9,
                       "reward_model_heldout": {"eval_accuracy": acc},
                       "methods": {
                           "sft": {"gold_reward": {"mean": 0.0}, "kl_to_sft": 0.0,
                                   "win_rate_vs_sft": null, "length": {"mean_words": 10.0}},
                           "ppo": {"gold_reward": {"mean": win}, "kl_to_sft": 2.0 * win,
                                   "win_rate_vs_sft": {"win_rate": win},
                                   "length": {"mean_words": words},
                                   "length_flag": length_flag(words, 10.0)}}}),
            )
        };
        let v = over_seeds(&[
            run(1, 0.7, 7.0, Some(0.6)),
            run(2, 0.8, 7.5, None),
            run(3, 0.9, 8.0, Some(0.7)),
        ]);
        assert_eq!(v["seeds"], json!([1, 2, 3]));
        assert_eq!(v["runs"]["2"], "o/seed-2");
        let w = &v["methods"]["ppo"]["win_rate_vs_sft"];
        assert_eq!(w["n"], 3);
        assert!((w["mean"].as_f64().unwrap() - 0.8).abs() < 1e-12);
        assert!(
            (w["ci95_low"].as_f64().unwrap() - 0.551_566).abs() < 1e-5,
            "{w}"
        );
        assert_eq!(w["per_run"], json!([0.7, 0.8, 0.9]));
        assert!((v["methods"]["ppo"]["kl_to_sft"]["mean"].as_f64().unwrap() - 1.6).abs() < 1e-12);
        // 7.5 words against SFT's 10: 25% shorter, flagged; SFT itself is never flagged.
        let c = &v["methods"]["ppo"]["length_change_vs_sft"]["mean"];
        assert!((c.as_f64().unwrap() + 0.25).abs() < 1e-12, "{c}");
        assert_eq!(v["methods"]["ppo"]["length_flag"], "shorter");
        assert_eq!(
            v["methods"]["ppo"]["length_flags_per_run"],
            json!(["shorter", "shorter", null]),
            "8 words against 10 is 20% shorter, not more"
        );
        assert_eq!(
            seed_flags(&v["methods"]["ppo"]),
            "  [shorter than SFT on average, shorter in 2 of 3 seeds: reward hacking?]"
        );
        // One seed's collapse is named even when the mean stays inside the band.
        let one = over_seeds(&[
            run(1, 0.8, 10.0, None),
            run(2, 0.8, 10.5, None),
            run(3, 0.8, 7.0, None),
        ]);
        assert!(one["methods"]["ppo"]["length_flag"].is_null());
        assert_eq!(
            seed_flags(&one["methods"]["ppo"]),
            "  [shorter in 1 of 3 seeds: reward hacking?]"
        );
        assert_eq!(seed_flags(&one["methods"]["sft"]), "");
        assert!(v["methods"]["sft"]["length_flag"].is_null());
        assert!(v["methods"]["sft"]["win_rate_vs_sft"].is_null());
        // A statistic only some runs have is summarised over those.
        assert_eq!(v["reward_model_accuracy"]["n"], 2);
        assert_eq!(
            fmt_runs(&v["methods"]["ppo"]["win_rate_vs_sft"]),
            "0.800 +- 0.100 [0.552, 1.048]"
        );
        assert_eq!(fmt_runs(&Value::Null), "-");
    }
}
