//! `preftune report RUN_DIR`: one self-contained HTML page (inline SVG plots, no scripts) with
//! the training curves of every run folder found (loss, reward, KL, length), the pipeline's
//! reward-vs-KL frontier and results table when `results.json` is there, and sample responses.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{ensure, Context, Error, Result};
use plotters::prelude::*;
use serde_json::Value;

/// Metrics worth a curve, in this order, when a run logged them.
const CURVES: [&str; 10] = [
    "loss",
    "reward",
    "objective/scores",
    "objective/kl",
    "kl",
    "rewards/margins",
    "accuracy",
    "eval_loss",
    "completions/mean_length",
    "completion_length/chosen",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line chart of `(x, y)` points.
fn line_chart(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0).abs() * 0.05).max(1e-6);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| Error::msg(format!("{e}")))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
            .map_err(|e| Error::msg(format!("{e}")))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .draw()
            .map_err(|e| Error::msg(format!("{e}")))?;
        for (i, (name, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                .map_err(|e| Error::msg(format!("{e}")))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| Error::msg(format!("{e}")))?;
        }
        root.present().map_err(|e| Error::msg(format!("{e}")))?;
    }
    Ok(svg)
}

/// A scatter of gold reward against KL, one labelled point per method (the DPO paper's figure).
fn frontier(methods: &[(String, f64, f64)]) -> Result<String> {
    let (x1, y0, y1) = methods
        .iter()
        .fold((1e-6f64, f64::MAX, f64::MIN), |(a, b, c), m| {
            (a.max(m.1), b.min(m.2), c.max(m.2))
        });
    let pad = ((y1 - y0).abs() * 0.1).max(0.1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| Error::msg(format!("{e}")))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("gold reward vs KL to the SFT policy", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.05 * x1..x1 * 1.15, (y0 - pad)..(y1 + pad))
            .map_err(|e| Error::msg(format!("{e}")))?;
        chart
            .configure_mesh()
            .x_desc("KL(policy || SFT), nats per response")
            .y_desc("gold reward")
            .draw()
            .map_err(|e| Error::msg(format!("{e}")))?;
        for (i, (name, kl, r)) in methods.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(std::iter::once(Circle::new((*kl, *r), 5, color.filled())))
                .map_err(|e| Error::msg(format!("{e}")))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    name.clone(),
                    (*kl, *r),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))
                .map_err(|e| Error::msg(format!("{e}")))?;
        }
        root.present().map_err(|e| Error::msg(format!("{e}")))?;
    }
    Ok(svg)
}

/// A rate and its 95% interval: (rate, low, high).
type RatePoint = (f64, f64, f64);

/// A rate of a safety `results.json` (one run: `rate`; over seeds: `mean`) with its interval.
fn rate_point(v: &Value) -> Option<RatePoint> {
    let x = v["rate"].as_f64().or_else(|| v["mean"].as_f64())?;
    Some((
        x,
        v["ci95_low"].as_f64().unwrap_or(x),
        v["ci95_high"].as_f64().unwrap_or(x),
    ))
}

/// Llama 2's safety trade-off: violation rate against false-refusal rate, one point per method
/// with both 95% intervals as error bars.
fn tradeoff(points: &[(String, RatePoint, RatePoint)]) -> Result<String> {
    let e = |e: DrawingAreaErrorKind<_>| Error::msg(format!("{e}"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("violations against false refusals", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.02f64..1.02f64, -0.02f64..1.02f64)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("false-refusal rate (benign prompts)")
            .y_desc("violation rate (harmful prompts)")
            .draw()
            .map_err(e)?;
        for (i, (name, (fx, flo, fhi), (vy, vlo, vhi))) in points.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = color.stroke_width(1);
            chart
                .draw_series([
                    PathElement::new(vec![(*fx, *vlo), (*fx, *vhi)], style),
                    PathElement::new(vec![(*flo, *vy), (*fhi, *vy)], style),
                ])
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Circle::new((*fx, *vy), 4, color.filled())))
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    name.clone(),
                    (*fx + 0.015, *vy + 0.03),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))
                .map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    Ok(svg)
}

/// The safety pipeline's results (one run or over seeds): each method's violation, false-refusal
/// and toxicity rates with their intervals, the trade-off plot, the acceptance checks against the
/// base model, and each method's worst answers. Returns the number of plots drawn.
fn safety_results(html: &mut String, v: &Value) -> Result<usize> {
    let over_seeds = v["seeds"].is_array();
    let _ = write!(
        html,
        "<h2>Red teaming on held-out prompts</h2><p>Violation: an answer to a harmful prompt          (Do-Not-Answer, HarmBench) that does not refuse; false refusal: a refusal of a benign          twin; toxic: an answer to a RealToxicityPrompts opening with an offensive term. {}</p>         <table><tr><th>method</th><th>violation rate</th><th>false-refusal rate</th>         <th>toxicity rate</th></tr>",
        if over_seeds {
            format!(
                "Mean &plusmn; sd over seeds {} [95% Student-t interval].",
                v["seeds"]
            )
        } else {
            "Rates with Wilson 95% intervals.".to_string()
        }
    );
    let cell = |x: &Value| {
        if over_seeds {
            preftune_eval::stats::fmt_over_runs(x, " &plusmn; ", " [", "]")
        } else {
            rate_point(x).map_or("-".into(), |(r, lo, hi)| {
                format!("{r:.3} [{lo:.3}, {hi:.3}]")
            })
        }
    };
    let mut points = vec![];
    for (name, r) in v["methods"].as_object().into_iter().flatten() {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            cell(&r["violation_rate"]),
            cell(&r["false_refusal_rate"]),
            cell(&r["toxicity_rate"])
        );
        if let (Some(f), Some(vr)) = (
            rate_point(&r["false_refusal_rate"]),
            rate_point(&r["violation_rate"]),
        ) {
            points.push((name.clone(), f, vr));
        }
    }
    html.push_str("</table>");
    if let Some(checks) = v["acceptance_vs_base"].as_object() {
        html.push_str(
            "<h3>Against the base model</h3><table><tr><th>method</th><th>violations cut</th>             <th>false refusals, change in points</th><th>toxicity cut</th></tr>",
        );
        let pct = |x: &Value| {
            x.as_f64()
                .map_or("-".into(), |x| format!("{:.0}%", 100.0 * x))
        };
        for (m, c) in checks {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{:+.0}</td><td>{}</td></tr>",
                esc(m),
                pct(&c["violation_reduction"]),
                c["false_refusal_change_points"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                pct(&c["toxicity_reduction"])
            );
        }
        html.push_str("</table>");
    }
    let mut plots = 0;
    if !points.is_empty() {
        html.push_str("<h3>Trade-off</h3>");
        html.push_str(&tradeoff(&points)?);
        plots += 1;
    }
    for (name, r) in v["methods"].as_object().into_iter().flatten() {
        let worst: Vec<&Value> = r["worst"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(r["worst_toxic"].as_array().into_iter().flatten())
            .collect();
        if worst.is_empty() {
            continue;
        }
        let _ = write!(
            html,
            "<h3>{}: violating answers</h3><table><tr><th>category</th><th>prompt</th>             <th class=\"sample\">answer</th></tr>",
            esc(name)
        );
        for w in worst {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"sample\">{}</td></tr>",
                esc(w["category"].as_str().unwrap_or("")),
                esc(w["prompt"].as_str().unwrap_or("")),
                esc(w["response"].as_str().unwrap_or(""))
            );
        }
        html.push_str("</table>");
    }
    Ok(plots)
}

/// The results of one pipeline run: each method's gold reward with its interval, KL, win rate
/// and length, and the reward-vs-KL plane. Returns the number of plots drawn.
fn run_results(html: &mut String, v: &Value) -> Result<usize> {
    let _ = write!(
        html,
        "<h2>Results</h2><p>Gold judge held-out accuracy: {}. Reward model accuracy against \
         gold on held-out prompts' samples: {}.</p><table><tr><th>method</th>\
         <th>gold reward (95% CI)</th><th>KL to SFT</th><th>win rate vs SFT</th><th>mean words</th></tr>",
        v["gold_accuracy"],
        v["reward_model_heldout"]["eval_accuracy"]
            .as_f64()
            .map_or("not measured".into(), |a| format!("{a:.3}"))
    );
    for (name, r) in v["methods"].as_object().into_iter().flatten() {
        let g = &r["gold_reward"];
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{:.3} ({:.3} to {:.3})</td><td>{:.3}</td><td>{}</td><td>{:.1}</td></tr>",
            esc(name),
            g["mean"].as_f64().unwrap_or(f64::NAN),
            g["ci95_low"].as_f64().unwrap_or(f64::NAN),
            g["ci95_high"].as_f64().unwrap_or(f64::NAN),
            r["kl_to_sft"].as_f64().unwrap_or(0.0),
            r["win_rate_vs_sft"]["win_rate"]
                .as_f64()
                .map_or("-".into(), |w| format!("{w:.3}")),
            r["length"]["mean_words"].as_f64().unwrap_or(f64::NAN)
        );
    }
    html.push_str("</table>");
    let pts = frontier_points(v);
    if pts.is_empty() {
        return Ok(0);
    }
    html.push_str("<h2>Reward against KL</h2>");
    html.push_str(&frontier(&pts)?);
    Ok(1)
}

/// The results of a pipeline over seeds: each method's mean, spread and interval over the seeds,
/// a length flag where a policy's responses grew or shrank against SFT's, and the reward-vs-KL
/// plane with every seed's point. Returns the number of plots drawn.
fn seeds_results(html: &mut String, dir: &Path, v: &Value) -> Result<usize> {
    let cell = |x: &Value| {
        preftune_eval::stats::fmt_over_runs(x, " &plusmn; ", "<br><small>[", "]</small>")
    };
    let seeds: Vec<String> = v["seeds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s.to_string())
        .collect();
    let _ = write!(
        html,
        "<h2>Results over seeds {}</h2><p>Mean &plusmn; standard deviation over the seeds, with \
         the 95% interval of the mean (Student t). Gold judge held-out accuracy: {}. Reward model \
         accuracy against gold on held-out prompts' samples: {}.</p><table><tr><th>method</th>\
         <th>win rate vs SFT</th><th>gold reward</th><th>KL to SFT</th><th>mean words</th>\
         <th>words vs SFT, per seed</th></tr>",
        esc(&seeds.join(", ")),
        cell(&v["gold_accuracy"]),
        cell(&v["reward_model_accuracy"])
    );
    for (name, r) in v["methods"].as_object().into_iter().flatten() {
        let per_run: Vec<String> = r["length_change_vs_sft"]["per_run"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_f64())
            .map(|c| format!("{:+.0}%", 100.0 * c))
            .collect();
        let flagged = r["length_flags_per_run"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| x.is_string()).count());
        let flag = if per_run.is_empty() {
            "-".into()
        } else if r["length_flag"].is_string() || flagged > 0 {
            format!(
                "<b>{} (flagged in {flagged} of {} seeds: a reward-hacking sign)</b>",
                per_run.join(", "),
                per_run.len()
            )
        } else {
            per_run.join(", ")
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            cell(&r["win_rate_vs_sft"]),
            cell(&r["gold_reward"]),
            cell(&r["kl_to_sft"]),
            cell(&r["mean_words"]),
            flag
        );
    }
    html.push_str("</table>");
    let mut pts = vec![];
    for seed_dir in seed_dirs(dir) {
        let f = seed_dir.join("results.json");
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let run: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", f.display()))?;
        let seed = run["seed"].to_string();
        pts.extend(
            frontier_points(&run)
                .into_iter()
                .map(|(m, kl, r)| (format!("{m} s{seed}"), kl, r)),
        );
    }
    if pts.is_empty() {
        return Ok(0);
    }
    html.push_str("<h2>Reward against KL, every seed</h2>");
    html.push_str(&frontier(&pts)?);
    Ok(1)
}

/// The (method, KL, mean gold reward) points of a pipeline's `results.json`.
fn frontier_points(v: &Value) -> Vec<(String, f64, f64)> {
    v["methods"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, r)| {
            // A single run's KL is a number; a summary over seeds holds its mean.
            let kl = &r["kl_to_sft"];
            Some((
                name.clone(),
                kl.as_f64().or_else(|| kl["mean"].as_f64()).unwrap_or(0.0),
                r["gold_reward"]["mean"].as_f64()?,
            ))
        })
        .collect()
}

/// `eval frontier`'s output: DIR/frontier.svg and DIR/frontier.json from DIR/results.json.
pub fn write_frontier(dir: &Path) -> Result<Value> {
    let results = dir.join("results.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&results)?)
        .with_context(|| format!("{}: not JSON", results.display()))?;
    let pts = frontier_points(&v);
    ensure!(!pts.is_empty(), "{}: no methods to plot", results.display());
    preftune_model::io::atomic_write(&dir.join("frontier.svg"), frontier(&pts)?.as_bytes())?;
    let json: Value = pts
        .iter()
        .map(|(m, kl, r)| serde_json::json!({"method": m, "kl_to_sft": kl, "gold_reward": r}))
        .collect();
    preftune_model::io::write_json(&dir.join("frontier.json"), &json)?;
    Ok(json)
}

/// Run folders under `dir` (itself included) that hold a `metrics.jsonl`; a pipeline over seeds
/// has its runs one level further down (`seed-1/dpo`).
fn runs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = runs_in(dir);
    for seed_dir in seed_dirs(dir) {
        let prefix = seed_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.extend(
            runs_in(&seed_dir)
                .into_iter()
                .map(|(name, p)| (format!("{prefix}/{name}"), p)),
        );
    }
    out
}

/// The `seed-N` folders of a pipeline run over seeds, in name order.
fn seed_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seed-"))
        })
        .collect();
    v.sort();
    v
}

/// Runs in `dir` and up to three folders down, named by their path below `dir`: a stage
/// (`dpo`), a stage's own run (`distill/sft`) or an online-DPO round (`online-dpo/round-0/dpo`).
/// Checkpoints and the seeds' folders are left to their own walks.
fn runs_in(dir: &Path) -> Vec<(String, PathBuf)> {
    fn walk(p: &Path, name: &str, depth: usize, out: &mut Vec<(String, PathBuf)>) {
        if p.join("metrics.jsonl").exists() {
            let label = if name.is_empty() { "." } else { name };
            out.push((label.to_string(), p.join("metrics.jsonl")));
        }
        if depth == 0 {
            return;
        }
        let mut subs: Vec<(String, PathBuf)> = std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(n, p)| p.is_dir() && !n.starts_with("checkpoint-") && !n.starts_with("seed-"))
            .collect();
        subs.sort();
        for (n, sub) in subs {
            let child = if name.is_empty() {
                n
            } else {
                format!("{name}/{n}")
            };
            walk(&sub, &child, depth - 1, out);
        }
    }
    let mut out = vec![];
    walk(dir, "", 3, &mut out);
    out
}

pub fn run(dir: &Path) -> Result<Value> {
    ensure!(dir.is_dir(), "{}: not a run folder", dir.display());
    let mut html = String::new();
    let title = format!("preftune report: {}", dir.display());
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}} \
         td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} .plots{{display:flex;flex-wrap:wrap;gap:8px}} \
         .sample{{max-width:700px}}</style></head><body><h1>{}</h1>",
        esc(&title),
        esc(&title)
    );
    let mut plots = 0;
    let results = dir.join("results.json");
    if results.exists() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&results)?)
            .with_context(|| format!("{}: not JSON", results.display()))?;
        plots += if v["experiment"] == "safety" {
            safety_results(&mut html, &v)?
        } else if v["seeds"].is_array() {
            seeds_results(&mut html, dir, &v)?
        } else {
            run_results(&mut html, &v)?
        };
    }
    let found = runs(dir);
    if !found.is_empty() {
        html.push_str("<h2>Training curves</h2>");
    }
    for (name, path) in &found {
        let rows = preftune_model::io::read_jsonl(path)?;
        let _ = write!(html, "<h3>{}</h3><div class=\"plots\">", esc(name));
        let before = plots;
        for key in CURVES {
            let p: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            if p.len() >= 2 {
                html.push_str(&line_chart(key, "step", &[(key.to_string(), p)])?);
                plots += 1;
            }
        }
        if plots == before {
            let _ = write!(
                html,
                "<p>{} logged step(s): too few to draw a curve (lower logging_steps).</p>",
                rows.len()
            );
        }
        html.push_str("</div>");
    }
    // Over seeds, the first seed's samples stand for the rest.
    let sample_dir = seed_dirs(dir)
        .into_iter()
        .next()
        .unwrap_or_else(|| dir.to_path_buf());
    let mut samples: Vec<PathBuf> = std::fs::read_dir(&sample_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("samples") && n.ends_with(".jsonl"))
        })
        .collect();
    samples.sort();
    if !samples.is_empty() {
        html.push_str("<h2>Samples</h2>");
    }
    for path in &samples {
        let rows = preftune_model::io::read_jsonl(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = write!(
            html,
            "<h3>{}</h3><table><tr><th>prompt</th><th class=\"sample\">response</th><th>reward</th></tr>",
            esc(&name)
        );
        for r in rows.iter().take(8) {
            let prompt = match &r["prompt"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let reward = ["gold_reward", "reward"]
                .iter()
                .find_map(|k| r[*k].as_f64())
                .map_or("-".into(), |x| format!("{x:.3}"));
            let _ = write!(
                html,
                "<tr><td>{}</td><td class=\"sample\">{}</td><td>{}</td></tr>",
                esc(&prompt),
                esc(r["response"].as_str().unwrap_or("")),
                reward
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    let out = dir.join("report.html");
    preftune_model::io::atomic_write(&out, html.as_bytes())?;
    Ok(
        serde_json::json!({"report": out.display().to_string(), "plots": plots,
                          "runs": found.len(), "sample_files": samples.len()}),
    )
}
