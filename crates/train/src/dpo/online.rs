//! Online and iterative DPO (TRL's `OnlineDPOTrainer`, OpenRLHF's iterative DPO, Llama 2's rounds).
//! Each round samples `num_generations` responses per prompt from the current policy, labels them
//! (a reward source: the best against the worst; or a pairwise judge, asked in both orders) and
//! trains DPO from the current policy on those pairs; the next round starts from the result.
//! `ref_update` says whether the reference stays the initial model (TRL) or becomes each round's
//! starting policy (iterative DPO).
//!
//! `output_dir/round-K/` holds the round's `samples.jsonl`, `pairs.jsonl`, the DPO run (`dpo/`)
//! and, once the round is over, `done.json` with its metrics; `output_dir/rounds.jsonl` has one
//! line per finished round and `output_dir` itself the final model (its files linked from the
//! last round's). With `--resume` finished rounds are skipped and an unfinished round's DPO
//! continues from its checkpoint.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use preftune_data::{read_rows, Location, Row, Text};
use preftune_eval::judge::{label_candidates, Judge, PairwisePrompt};
use preftune_eval::sources::{best_and_worst, row_prompt};
use preftune_eval::{RewardSource, Sample};
use preftune_model::{LoadOptions, Pretrained, SamplingConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::DpoArgs;
use crate::config::RunConfig;
use crate::error::{Error, Result};

/// What each round's DPO takes as its reference (`ref_update`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefUpdate {
    /// The initial model (or `ref_model`) throughout, as TRL's OnlineDPOTrainer does.
    #[default]
    Initial,
    /// Each round's starting policy: the reference moves with the rounds (iterative DPO).
    Round,
}

/// The `[online_dpo]` table of an online-DPO config; the rest is a DPO config whose options apply
/// to every round's training (`max_steps` is per round).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineDpoOptions {
    /// Prompts (`prompt`: text or messages; `risky` for the piecewise safety rule).
    pub prompts_file: PathBuf,
    /// Labels by score: any reward source (`model:PATH`, `gold:sentiment`, `combine:F.toml`,
    /// `llm:PATH::QUESTION` as a rubric...); each prompt's best sample is chosen over its worst.
    #[serde(default)]
    pub reward: Option<String>,
    /// Labels by comparison: a pairwise judge (`llm:PATH`, `openai:URL#MODEL`) asked in both
    /// orders; of a prompt's pairs the one it prefers most clearly is kept.
    #[serde(default)]
    pub judge: Option<String>,
    /// The pairwise judge's question.
    #[serde(default)]
    pub judge_question: Option<String>,
    /// A Jinja template for the pairwise judge's message (a rubric; see `preftune label judge`).
    #[serde(default)]
    pub judge_rubric: Option<PathBuf>,
    /// A judged pair whose preference is within `tie` of 0.5 is a tie, left out.
    #[serde(default)]
    pub tie: f64,
    #[serde(default = "crate::config::default::one")]
    pub rounds: usize,
    /// Prompts per round, taken in turn from the file (wrapping around); default: all of them.
    #[serde(default)]
    pub prompts_per_round: Option<usize>,
    /// Samples per prompt (TRL's OnlineDPO samples 2).
    #[serde(default = "crate::config::default::two")]
    pub num_generations: usize,
    #[serde(default = "max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "temperature")]
    pub temperature: f64,
    #[serde(default = "crate::config::default::unit")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    /// Prompts sampled together.
    #[serde(default = "crate::config::default::eight")]
    pub batch_size: usize,
    /// Subtracted from the score of a sample that ends without EOS (reward labels only).
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    #[serde(default)]
    pub ref_update: RefUpdate,
    /// A reward source to measure the labels against (`labels/agreement_with_gold`) and the
    /// round's samples by (`gold/mean_score`).
    #[serde(default)]
    pub gold: Option<String>,
    /// Llama 2's reward-model refresh: a source (people's stand-in: gold, a judge) that labels
    /// each round's samples for the reward model `reward` names (`model:PATH`), which trains on
    /// them from its previous weights before it labels the round's DPO pairs.
    #[serde(default)]
    pub rm_labels: Option<String>,
    /// The reward trainer's options for each refresh (TRL's RewardConfig names).
    #[serde(default)]
    pub rm: Option<toml::Table>,
}

impl OnlineDpoOptions {
    /// The table's keys, for configs that keep them beside DPO's in one table.
    pub const KEYS: [&'static str; 19] = [
        "prompts_file",
        "reward",
        "judge",
        "judge_question",
        "judge_rubric",
        "tie",
        "rounds",
        "prompts_per_round",
        "num_generations",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "batch_size",
        "missing_eos_penalty",
        "ref_update",
        "gold",
        "rm_labels",
        "rm",
    ];
}

fn max_new_tokens() -> usize {
    64
}
fn temperature() -> f64 {
    0.9
}

/// Loads an online-DPO config: a DPO config (defaults, the file, `--set`) plus `[online_dpo]`.
pub fn load_config(
    file: Option<&Path>,
    set: &[String],
) -> Result<(RunConfig<DpoArgs>, OnlineDpoOptions)> {
    crate::config::load_with_table(
        file,
        super::defaults(),
        set,
        "online_dpo",
        "prompts_file, and reward or judge",
    )
}

/// One prompt's samples in a round.
struct Candidates {
    row: Row,
    prompt: Text,
    risky: bool,
    responses: Vec<String>,
    finished: Vec<bool>,
}

/// Who labels the samples.
enum Labeller {
    Score(RewardSource),
    Compare(Judge),
}

impl Labeller {
    fn parse(o: &OnlineDpoOptions) -> Result<Labeller> {
        // An empty string unsets (`--set online_dpo.reward=""` over a config that names one).
        let given = |x: &Option<String>| x.clone().filter(|s| !s.is_empty());
        match (given(&o.reward), given(&o.judge)) {
            (Some(r), None) => Ok(Labeller::Score(RewardSource::parse(&r)?)),
            (None, Some(j)) => match Judge::parse_with(
                &j,
                PairwisePrompt::new(o.judge_question.as_deref(), o.judge_rubric.as_deref())?,
            )? {
                Judge::Reward(r) => Ok(Labeller::Score(r)),
                judge => Ok(Labeller::Compare(judge)),
            },
            _ => Err(Error::Config(
                "[online_dpo]: set one of reward (a reward source) or judge (a pairwise judge), not \
                 both"
                    .into(),
            )),
        }
    }
}

/// The rows of `prompts_file` that round `round` samples.
fn round_rows(rows: &[Row], o: &OnlineDpoOptions, round: usize) -> Vec<Row> {
    let n = o.prompts_per_round.unwrap_or(rows.len());
    (0..n)
        .map(|i| rows[(round * n + i) % rows.len()].clone())
        .collect()
}

/// `num_generations` samples of each row's prompt from `policy`.
fn sample(
    policy: &Pretrained,
    rows: Vec<Row>,
    o: &OnlineDpoOptions,
    seed: u64,
) -> Result<Vec<Candidates>> {
    let mut out = vec![];
    for (b, chunk) in rows.chunks(o.batch_size.max(1)).enumerate() {
        let prompts = chunk
            .iter()
            .map(|r| Ok((row_prompt(r)?, preftune_eval::bon::risky_of(r)?)))
            .collect::<Result<Vec<(Text, bool)>>>()?;
        let sampling = SamplingConfig {
            max_new_tokens: o.max_new_tokens,
            temperature: o.temperature,
            top_p: o.top_p,
            top_k: o.top_k,
            seed: seed.wrapping_add(b as u64),
            eos_token_ids: policy.eos_token_ids(),
            pad_token_id: policy.pad_token_id(),
            ..Default::default()
        };
        let k = o.num_generations;
        let s = preftune_eval::sources::sample_prompts(policy, None, &prompts, k, &sampling)?;
        for (j, (row, (prompt, risky))) in chunk.iter().zip(prompts).enumerate() {
            out.push(Candidates {
                row: row.clone(),
                prompt,
                risky,
                responses: s.texts[j * k..(j + 1) * k].to_vec(),
                finished: s.finished[j * k..(j + 1) * k].to_vec(),
            });
        }
    }
    Ok(out)
}

/// A response as the preference row holds it: text, or an assistant message for conversations.
fn completion(prompt: &Value, text: &str) -> Value {
    match prompt {
        Value::Array(_) => json!([{"role": "assistant", "content": text}]),
        _ => json!(text),
    }
}

/// The round's preference rows (`prompt`, `chosen`, `rejected`, `margin`) and the labelling's
/// metrics.
fn label(
    labeller: &Labeller,
    cands: &[Candidates],
    o: &OnlineDpoOptions,
) -> Result<(Vec<Value>, Value)> {
    let samples = |c: &Candidates| -> Vec<Sample> {
        c.responses
            .iter()
            .map(|r| Sample {
                prompt: c.prompt.clone(),
                response: r.clone(),
                risky: c.risky,
            })
            .collect()
    };
    let mut rows = vec![];
    let mut m = serde_json::Map::new();
    match labeller {
        Labeller::Score(src) => {
            let all: Vec<Sample> = cands.iter().flat_map(samples).collect();
            let mut scores = src.score(&all)?;
            let finished: Vec<bool> = cands.iter().flat_map(|c| c.finished.clone()).collect();
            if let Some(p) = o.missing_eos_penalty {
                for (s, f) in scores.iter_mut().zip(&finished) {
                    if !f {
                        *s -= p;
                    }
                }
            }
            let (mut margins, mut skipped) = (vec![], 0);
            let k = o.num_generations;
            for (i, c) in cands.iter().enumerate() {
                // An empty response (EOS only) has nothing to prefer or learn from.
                let keep: Vec<usize> = (0..k)
                    .filter(|&j| !c.responses[j].trim().is_empty())
                    .collect();
                let s: Vec<f64> = keep.iter().map(|&j| scores[i * k + j]).collect();
                match best_and_worst(&s) {
                    Some((b, w)) => {
                        let p = &c.row.value["prompt"];
                        let margin = s[b] - s[w];
                        margins.push(margin);
                        rows.push(json!({"prompt": p,
                            "chosen": completion(p, &c.responses[keep[b]]),
                            "rejected": completion(p, &c.responses[keep[w]]),
                            "margin": margin}));
                    }
                    None => skipped += 1,
                }
            }
            m.insert("objective/scores".into(), json!(mean(&scores)));
            m.insert("objective/scores_margin".into(), json!(mean(&margins)));
            m.insert("labels/skipped_prompts".into(), json!(skipped));
        }
        Labeller::Compare(judge) => {
            let candidate_rows: Vec<Row> = cands
                .iter()
                .map(|c| {
                    let texts: Vec<&String> = c
                        .responses
                        .iter()
                        .filter(|r| !r.trim().is_empty())
                        .collect();
                    Row {
                        loc: c.row.loc.clone(),
                        value: json!({"prompt": c.row.value["prompt"], "responses": texts}),
                    }
                })
                .collect();
            let l = label_candidates(judge, &candidate_rows, o.tie)?;
            // Of each prompt's pairs, the one the judge prefers most clearly.
            let mut best: Vec<(String, Value)> = vec![];
            for r in l.rows {
                let key = r["prompt"].to_string();
                let margin = r["margin"].as_f64().unwrap_or(0.0);
                match best.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, b)) if b["margin"].as_f64().unwrap_or(0.0) >= margin => {}
                    Some((_, b)) => *b = r,
                    None => best.push((key, r)),
                }
            }
            for (_, mut r) in best {
                let p = r["prompt"].clone();
                for side in ["chosen", "rejected"] {
                    let t = r[side].as_str().unwrap_or_default().to_string();
                    r[side] = completion(&p, &t);
                }
                rows.push(r);
            }
            m.insert("labels/pairs_judged".into(), json!(l.pairs));
            m.insert("labels/ties".into(), json!(l.ties));
            m.insert(
                "labels/skipped_prompts".into(),
                json!(cands.len() - rows.len()),
            );
            if let Some(b) = l.position_bias {
                m.insert("labels/position_bias".into(), json!(b));
            }
        }
    }
    let finished: Vec<f64> = cands
        .iter()
        .flat_map(|c| c.finished.iter().map(|&f| f64::from(u8::from(f))))
        .collect();
    m.insert("val/contain_eos_token".into(), json!(mean(&finished)));
    m.insert("labels/pairs".into(), json!(rows.len()));
    Ok((rows, Value::Object(m)))
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Against `gold`: the share of pairs whose chosen response gold scores higher (a tie counts
/// half), and gold's mean score of every sample of the round.
fn gold_metrics(
    gold: &RewardSource,
    cands: &[Candidates],
    pairs: &[Value],
    prompts_file: &Path,
) -> Result<Value> {
    let all: Vec<Sample> = cands
        .iter()
        .flat_map(|c| {
            c.responses.iter().map(|r| Sample {
                prompt: c.prompt.clone(),
                response: r.clone(),
                risky: c.risky,
            })
        })
        .collect();
    let sample_scores = gold.score(&all)?;
    let loc = Location {
        file: Arc::new(prompts_file.to_path_buf()),
        line: 0,
    };
    let text = |v: &Value| -> String {
        match v {
            Value::Array(m) => m
                .last()
                .and_then(|x| x["content"].as_str())
                .unwrap_or_default()
                .to_string(),
            v => v.as_str().unwrap_or_default().to_string(),
        }
    };
    let (mut chosen, mut rejected) = (vec![], vec![]);
    for p in pairs {
        let prompt = row_prompt(&Row {
            loc: loc.clone(),
            value: p.clone(),
        })?;
        for (side, out) in [("chosen", &mut chosen), ("rejected", &mut rejected)] {
            out.push(Sample {
                prompt: prompt.clone(),
                response: text(&p[side]),
                risky: false,
            });
        }
    }
    let (c, r) = (gold.score(&chosen)?, gold.score(&rejected)?);
    let agree: Vec<f64> = c
        .iter()
        .zip(&r)
        .map(|(a, b)| match a.total_cmp(b) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        })
        .collect();
    Ok(json!({
        "labels/agreement_with_gold": if agree.is_empty() { Value::Null } else { json!(mean(&agree)) },
        "gold/mean_score": mean(&sample_scores),
    }))
}

/// Llama 2's refresh: the round's samples labelled by `labeller` (best over worst per prompt)
/// train the reward model from `from` into `dir/rm`. Returns the `rm/*` metrics.
fn refresh_reward_model(
    cfg: &RunConfig<DpoArgs>,
    o: &OnlineDpoOptions,
    labeller: &Labeller,
    cands: &[Candidates],
    from: &str,
    dir: &Path,
) -> Result<Value> {
    use crate::Options;
    let rm_dir = dir.join("rm");
    let (pairs, m) = label(labeller, cands, o)?;
    if pairs.is_empty() {
        return Err(Error::Msg(format!(
            "{}: rm_labels made no pairs to refresh the reward model with",
            dir.display()
        )));
    }
    let file = dir.join("rm-pairs.jsonl");
    preftune_model::io::write_jsonl(&file, &pairs)?;
    let mut table = crate::reward::defaults();
    table.insert("bf16".into(), cfg.args.bf16.into());
    table.insert("seed".into(), (cfg.args.seed as i64).into());
    for (k, v) in o.rm.iter().flatten() {
        table.insert(k.clone(), v.clone());
    }
    let rm_cfg = crate::reward::RewardArgs::load_config(
        None,
        table,
        &[
            format!("model_name_or_path=\"{from}\""),
            format!("train_file=\"{}\"", file.display()),
            format!("output_dir=\"{}\"", rm_dir.display()),
        ],
    )?;
    let summary = crate::reward::run(&rm_cfg, rm_dir.exists(), false)?;
    crate::checkpoint::remove_all(&rm_dir)?;
    Ok(json!({
        "rm/pairs": pairs.len(),
        "rm/objective/scores": m["objective/scores"],
        "rm/train_loss": summary["train_loss"],
        "rm/model": rm_dir.display().to_string(),
    }))
}

/// Links (or copies, across file systems) the final model's files into `out`.
fn link_final(from: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let is_model_file =
            e.path().is_file() && !matches!(name.to_str(), Some("metrics.jsonl" | "done.json"));
        if !is_model_file {
            continue;
        }
        let to = out.join(&name);
        if to.exists() {
            std::fs::remove_file(&to).map_err(|err| Error::io(&to, err))?;
        }
        if std::fs::hard_link(e.path(), &to).is_err() {
            std::fs::copy(e.path(), &to).map_err(|err| Error::io(&to, err))?;
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Runs every round (see the module docs); returns `rounds` (each round's metrics) and
/// `final_model`.
pub fn run(cfg: &RunConfig<DpoArgs>, o: &OnlineDpoOptions, resume: bool) -> Result<Value> {
    if o.rounds == 0 || o.num_generations < 2 || o.prompts_per_round == Some(0) {
        return Err(Error::Config(
            "[online_dpo]: rounds and prompts_per_round must be > 0, num_generations >= 2".into(),
        ));
    }
    if cfg.args.use_peft && o.rounds > 1 {
        return Err(Error::Config(
            "online DPO with use_peft runs one round (a round's adapter is not a model the next \
             round can sample from); set rounds = 1 or train fully"
                .into(),
        ));
    }
    let mut labeller = Labeller::parse(o)?;
    // With a refresh, the reward model's folder as it stands (the labeller is reloaded from it).
    let (rm_labeller, mut rm_path) = match &o.rm_labels {
        None => (None, None),
        Some(spec) => {
            let path = o
                .reward
                .as_deref()
                .and_then(|r| r.strip_prefix("model:"))
                .ok_or_else(|| {
                    Error::Config(
                        "[online_dpo]: rm_labels refreshes the reward model: reward must name it \
                         (model:PATH)"
                            .into(),
                    )
                })?;
            (
                Some(Labeller::Score(RewardSource::parse(spec)?)),
                Some(path.to_string()),
            )
        }
    };
    let gold = o.gold.as_deref().map(RewardSource::parse).transpose()?;
    let rows = read_rows(&o.prompts_file)?;
    if rows.is_empty() {
        return Err(Error::Config(format!(
            "{}: no prompts",
            o.prompts_file.display()
        )));
    }
    let out = cfg.args.output_dir.clone();
    if !resume {
        crate::trainer::fresh_output_dir(&cfg.args)?;
    }
    let initial = cfg.args.model_name_or_path.clone();
    let mut model = initial.clone();
    let mut rounds = vec![];
    for round in 0..o.rounds {
        let dir = out.join(format!("round-{round}"));
        let dpo_dir = dir.join("dpo");
        let done = dir.join("done.json");
        let rm_dir = dir.join("rm");
        if done.exists() {
            rounds.push(read_json(&done)?);
            model = dpo_dir.display().to_string();
            if rm_path.is_some() {
                rm_path = Some(rm_dir.display().to_string());
            }
            continue;
        }
        let t = std::time::Instant::now();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let pairs_file = dir.join("pairs.jsonl");
        let labels_file = dir.join("labels.json");
        if !labels_file.exists() {
            let policy = Pretrained::load(
                Path::new(&model),
                &LoadOptions {
                    dtype: cfg.args.dtype.candle(),
                    ..Default::default()
                },
            )?;
            let seed = cfg.args.seed.wrapping_add(1_000_003 * round as u64);
            let cands = sample(&policy, round_rows(&rows, o, round), o, seed)?;
            drop(policy);
            let samples: Vec<Value> = cands
                .iter()
                .map(|c| json!({"prompt": c.row.value["prompt"], "responses": c.responses, "finished": c.finished}))
                .collect();
            preftune_model::io::write_jsonl(&dir.join("samples.jsonl"), &samples)?;
            let mut refresh = None;
            if let (Some(rl), Some(from)) = (&rm_labeller, &rm_path) {
                let summary = refresh_reward_model(cfg, o, rl, &cands, from, &dir)?;
                labeller =
                    Labeller::Score(RewardSource::parse(&format!("model:{}", rm_dir.display()))?);
                refresh = Some(summary);
            }
            let (pairs, mut metrics) = label(&labeller, &cands, o)?;
            if let Some(r) = refresh {
                for (k, v) in r.as_object().into_iter().flatten() {
                    metrics[k] = v.clone();
                }
            }
            if let Some(g) = &gold {
                for (k, v) in gold_metrics(g, &cands, &pairs, &o.prompts_file)?
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    metrics[k] = v.clone();
                }
            }
            if pairs.is_empty() {
                return Err(Error::Msg(format!(
                    "round {round}: no preference pairs (every prompt's samples tied or were \
                     empty); see {}",
                    dir.join("samples.jsonl").display()
                )));
            }
            preftune_model::io::write_jsonl(&pairs_file, &pairs)?;
            // Written last: the round's labelling is complete when it exists.
            preftune_model::io::write_json(&labels_file, &metrics)?;
        }
        if rm_path.is_some() {
            // This round refreshed the reward model; later rounds start from it.
            rm_path = Some(rm_dir.display().to_string());
        }
        let mut c = cfg.clone();
        c.args.model_name_or_path = model.clone();
        c.args.train_file = Some(pairs_file.clone());
        c.args.output_dir = dpo_dir.clone();
        if o.ref_update == RefUpdate::Round && round > 0 {
            c.algo.ref_model = None;
        } else if round > 0 {
            c.algo.ref_model = Some(cfg.algo.ref_model.clone().unwrap_or(initial.clone()));
        }
        let summary = super::run(&c, dpo_dir.exists(), false)?;
        crate::checkpoint::remove_all(&dpo_dir)?;
        let mut metrics = read_json(&labels_file)?;
        // The round's last logged DPO metrics (`rewards/accuracies`, `rewards/margins`, `loss`...).
        let logged = std::fs::read_to_string(dpo_dir.join("metrics.jsonl")).unwrap_or_default();
        if let Some(last) = logged
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            for (k, v) in last.as_object().into_iter().flatten() {
                if k.starts_with("rewards/") || k.starts_with("logps/") || k == "loss" {
                    metrics[k.as_str()] = v.clone();
                }
            }
        }
        metrics["round"] = json!(round);
        metrics["beta"] = json!(cfg.algo.beta);
        metrics["model"] = json!(model);
        metrics["reference"] = json!(c.algo.ref_model.clone().unwrap_or(model.clone()));
        metrics["dpo"] = summary;
        metrics["round_seconds"] = json!(t.elapsed().as_secs_f64());
        preftune_model::io::write_json(&done, &metrics)?;
        eprintln!(
            "round {round}: {} pairs{}",
            metrics["labels/pairs"],
            metrics
                .get("labels/agreement_with_gold")
                .and_then(Value::as_f64)
                .map_or(String::new(), |a| format!(", agreement with gold {a:.3}"))
        );
        rounds.push(metrics);
        model = dpo_dir.display().to_string();
    }
    link_final(Path::new(&model), &out)?;
    preftune_model::io::write_jsonl(&out.join("rounds.jsonl"), &rounds)?;
    Ok(json!({"rounds": rounds, "final_model": out.display().to_string()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(extra: &str) -> OnlineDpoOptions {
        toml::from_str(&format!("prompts_file = \"p.jsonl\"\n{extra}")).unwrap()
    }

    #[test]
    fn keys_are_the_tables_fields() {
        let mut t = toml::Table::new();
        for k in OnlineDpoOptions::KEYS {
            t.insert(k.into(), toml::Value::Integer(0));
        }
        // Every listed key is a field (a wrong type is the error, not an unknown key)...
        let e = toml::Value::Table(t)
            .try_into::<OnlineDpoOptions>()
            .unwrap_err();
        assert!(!e.to_string().contains("unknown field"), "{e}");
        // ...and a key not listed is refused.
        let e = toml::from_str::<OnlineDpoOptions>("prompts_file = \"p\"\nrondus = 2").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn defaults_follow_trl_online_dpo() {
        let o = options("reward = \"gold:sentiment\"");
        assert_eq!(o.num_generations, 2);
        assert_eq!(o.max_new_tokens, 64);
        assert_eq!(o.temperature, 0.9);
        assert_eq!(o.ref_update, RefUpdate::Initial);
        assert_eq!(
            options("ref_update = \"round\"").ref_update,
            RefUpdate::Round
        );
        assert!(
            toml::from_str::<OnlineDpoOptions>("prompts_file = \"p\"\nref_update = \"x\"").is_err()
        );
    }

    #[test]
    fn rounds_take_prompts_in_turn() {
        let loc = Location {
            file: Arc::new(PathBuf::from("p")),
            line: 1,
        };
        let rows: Vec<Row> = (0..5)
            .map(|i| Row {
                loc: loc.clone(),
                value: json!({"prompt": i}),
            })
            .collect();
        let o = options("prompts_per_round = 3");
        let ids = |r: usize| -> Vec<i64> {
            round_rows(&rows, &o, r)
                .iter()
                .map(|x| x.value["prompt"].as_i64().unwrap())
                .collect()
        };
        assert_eq!(ids(0), vec![0, 1, 2]);
        assert_eq!(ids(1), vec![3, 4, 0]);
        assert_eq!(round_rows(&rows, &options(""), 1).len(), 5);
    }

    #[test]
    fn labels_by_score_keep_best_over_worst_and_skip_ties() {
        let loc = Location {
            file: Arc::new(PathBuf::from("p")),
            line: 1,
        };
        let cand = |prompt: &str, responses: [&str; 3], finished: [bool; 3]| Candidates {
            row: Row {
                loc: loc.clone(),
                value: json!({ "prompt": prompt }),
            },
            prompt: Text::Plain(prompt.into()),
            risky: false,
            responses: responses.iter().map(|s| s.to_string()).collect(),
            finished: finished.to_vec(),
        };
        // The score is the response's length; an unfinished sample loses 10 with the penalty.
        let src = RewardSource::Function(Box::new(|s: &Sample| s.response.len() as f64));
        let cands = vec![
            cand("a", ["xx", "xxxx", "x"], [true, true, true]),
            cand("b", ["yy", "yy", "  "], [true, true, true]),
            cand("c", ["zzzzzz", "zz", "z"], [false, true, true]),
        ];
        let mut o = options("num_generations = 3");
        let (rows, m) = label(&Labeller::Score(src), &cands, &o).unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0]["chosen"], "xxxx");
        assert_eq!(rows[0]["rejected"], "x");
        assert_eq!(rows[0]["margin"], 3.0);
        assert_eq!(rows[1]["chosen"], "zzzzzz");
        assert_eq!(m["labels/skipped_prompts"], 1);
        assert!((m["val/contain_eos_token"].as_f64().unwrap() - 8.0 / 9.0).abs() < 1e-12);
        o.missing_eos_penalty = Some(10.0);
        let src = RewardSource::Function(Box::new(|s: &Sample| s.response.len() as f64));
        let (rows, _) = label(&Labeller::Score(src), &cands, &o).unwrap();
        assert_eq!(rows[1]["chosen"], "zz");
        assert_eq!(rows[1]["rejected"], "zzzzzz");
    }

    #[test]
    fn conversational_prompts_get_assistant_messages() {
        let p = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            completion(&p, "yo"),
            json!([{"role": "assistant", "content": "yo"}])
        );
        assert_eq!(completion(&json!("hi"), "yo"), json!("yo"));
    }
}
