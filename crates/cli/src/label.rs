//! `preftune label ...`: the labelling web app and what goes in and out of its database.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use preftune_label::export::{export, ExportOptions};
use preftune_label::net::ServeOptions;
use preftune_label::stats::stats;
use preftune_label::{ImportOptions, Mode, Store};
use preftune_model::io::write_jsonl;
use serde_json::json;

use crate::commands::emit;

#[derive(Subcommand, Clone, Debug)]
pub enum LabelCmd {
    /// Serve the labelling app. Candidates (rows `prompt`, `responses`, as `preftune generate
    /// --n` writes them) are imported first; importing the same rows again adds nothing.
    Serve {
        #[arg(long)]
        db: PathBuf,
        /// Candidates JSONL to add (repeatable: several models' candidates merge).
        #[arg(long)]
        candidates: Vec<PathBuf>,
        /// Address to listen on. Plain HTTP, so loopback only unless --insecure: for remote
        /// annotators, put a TLS proxy (Caddy, nginx) in front.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// Allow a non-loopback --bind in plain HTTP, where tokens and judgements can be read
        /// on the way (a trusted network only).
        #[arg(long)]
        insecure: bool,
        /// Connections open at once, at most (fewer if the open-file limit is lower); more
        /// clients wait for a free one.
        #[arg(long, default_value_t = 256)]
        max_connections: usize,
        /// Hours a browser login lasts.
        #[arg(long, default_value_t = 12.0)]
        session_hours: f64,
        /// Give an item back to the pool when its annotator has not judged it this many hours
        /// after it was assigned (checked whenever someone asks for their next item). Off by
        /// default: an item stays with its annotator until `label release`.
        #[arg(long)]
        release_after_hours: Option<f64>,
        #[command(flatten)]
        import: ImportArgs,
    },
    /// Give items assigned and never judged back to the pool (an annotator left, or sat on their
    /// queue): every such item, or only one annotator's, or only those assigned more than
    /// --older-than-hours ago. Judgements are never touched. Prints the count per annotator.
    Release {
        #[arg(long)]
        db: PathBuf,
        /// Only this annotator's items.
        #[arg(long)]
        annotator: Option<String>,
        /// Only items assigned more than this many hours ago.
        #[arg(long)]
        older_than_hours: Option<f64>,
    },
    /// Add candidates to the database without serving.
    Import {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, required = true)]
        candidates: Vec<PathBuf>,
        #[command(flatten)]
        import: ImportArgs,
    },
    /// Create an annotator and print their login token (only its hash is stored).
    AddAnnotator {
        name: String,
        #[arg(long)]
        db: PathBuf,
        /// An admin also sees everyone's progress and the agreement statistics.
        #[arg(long)]
        admin: bool,
    },
    /// Give an annotator a new token and print it; the old one, and their browser sessions,
    /// stop working at once.
    RotateToken {
        name: String,
        #[arg(long)]
        db: PathBuf,
    },
    /// Revoke an annotator's token and end their sessions (their judgements stay);
    /// `rotate-token` gives them a new one.
    RevokeToken {
        name: String,
        #[arg(long)]
        db: PathBuf,
    },
    /// Write the judgements as training data: preference rows (`prompt`, `chosen`, `rejected`,
    /// `margin` from the scale) in pair mode, ranking rows (`prompt`, `responses` best first) in
    /// rank mode, KTO rows (`prompt`, `completion`, `label`) in thumbs mode.
    Export {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Keep "about the same" judgements (margin 0, `tie: true`).
        #[arg(long)]
        keep_ties: bool,
        /// One row per item (mean scale or mean rank over its annotators) instead of one per
        /// judgement.
        #[arg(long)]
        aggregate: bool,
        /// Leave out items any annotator flagged unsafe.
        #[arg(long)]
        drop_unsafe: bool,
    },
    /// Label candidates with a judge instead of people: every pair of a row's responses, asked
    /// in both orders by `llm:` and `openai:URL#MODEL` judges, becomes a preference row
    /// (`prompt`, `chosen`, `rejected`, `margin` = 2p - 1, `judge_p`); prints the counts and the
    /// judge's position-bias rate.
    Judge {
        /// Candidates JSONL (`prompt`, `responses`), as `preftune generate --n` writes it.
        #[arg(long)]
        candidates: PathBuf,
        /// `llm:PATH`, `openai:URL#MODEL` or any reward source.
        #[arg(long)]
        judge: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        ask: crate::args::JudgeAsk,
        /// Pairs whose preference is within this of 0.5 are ties, left out.
        #[arg(long, default_value_t = 0.0)]
        tie: f64,
    },
    /// Items done per annotator, agreement (pairwise, Cohen's and Fleiss' kappa) on the
    /// overlapping items, and how often the response shown first wins; with --judge, the judge's
    /// agreement and kappa against the humans' pairwise labels and its position bias.
    Stats {
        #[arg(long)]
        db: PathBuf,
        /// A judge to measure against the human labels: `llm:PATH`, `openai:URL#MODEL` (asked
        /// in both orders) or any reward source.
        #[arg(long)]
        judge: Option<String>,
        #[command(flatten)]
        ask: crate::args::JudgeAsk,
        /// The judge's preferences within this of 0.5 count as "about the same".
        #[arg(long, default_value_t = 0.0, requires = "judge")]
        tie: f64,
    },
}

#[derive(clap::Args, Clone, Debug)]
pub struct ImportArgs {
    /// `pair` (two responses on a 7-step scale; responses pair up in order), `rank` (order all
    /// responses of a row) or `thumbs` (each response alone, thumbs up or down: KTO's data).
    /// Fixed by the first import.
    #[arg(long, default_value = "pair")]
    mode: String,
    /// Share of items labelled by several annotators, to measure agreement.
    #[arg(long, default_value_t = 0.0)]
    overlap: f64,
    /// How many annotators label an overlapping item.
    #[arg(long, default_value_t = 2)]
    overlap_copies: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn open(db: &std::path::Path) -> Result<Store> {
    Store::open(db).with_context(|| format!("opening {}", db.display()))
}

fn import(store: &mut Store, files: &[PathBuf], a: &ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        mode: Mode::parse(&a.mode)?,
        overlap: a.overlap,
        overlap_copies: a.overlap_copies,
        seed: a.seed,
    };
    for f in files {
        let r = store.import(f, &opts)?;
        eprintln!("{}: {r}", f.display());
    }
    Ok(())
}

pub fn run(cmd: &LabelCmd) -> Result<()> {
    match cmd {
        LabelCmd::Serve {
            db,
            candidates,
            bind,
            insecure,
            max_connections,
            session_hours,
            release_after_hours,
            import: a,
        } => {
            // Refuse a public bind before touching the database.
            preftune_label::net::check_bind(*bind, *insecure)?;
            let opts = ServeOptions::new(
                *insecure,
                *session_hours,
                *release_after_hours,
                *max_connections,
            )?;
            let mut store = open(db)?;
            import(&mut store, candidates, a)?;
            let p = store.progress()?;
            if p.annotators.is_empty() {
                eprintln!(
                    "no annotators yet: `preftune label add-annotator NAME --db {}` prints a token",
                    db.display()
                );
            }
            preftune_label::server::serve(store, *bind, opts)
                .with_context(|| format!("serving on {bind}"))?;
        }
        LabelCmd::Import {
            db,
            candidates,
            import: a,
        } => {
            let mut store = open(db)?;
            import(&mut store, candidates, a)?;
            emit(&serde_json::to_value(store.progress()?)?);
        }
        LabelCmd::AddAnnotator { name, db, admin } => {
            let token = open(db)?.add_annotator(name, *admin)?;
            println!("{token}");
            eprintln!("annotator `{name}` added; log in at the app with the token above");
        }
        LabelCmd::RotateToken { name, db } => {
            let token = open(db)?.rotate_token(name)?;
            println!("{token}");
            eprintln!("annotator `{name}` has a new token (above); the old one no longer works");
        }
        LabelCmd::Judge {
            candidates,
            judge,
            out,
            ask,
            tie,
        } => {
            let rows = preftune_data::read_rows(candidates)?;
            let j = ask.judge(judge)?;
            let l = preftune_eval::judge::label_candidates(&j, &rows, *tie)?;
            write_jsonl(out, &l.rows)?;
            emit(
                &json!({"out": out, "rows": l.rows.len(), "pairs": l.pairs, "ties": l.ties,
                         "skipped_rows": l.skipped_rows, "position_bias": l.position_bias}),
            );
        }
        LabelCmd::Release {
            db,
            annotator,
            older_than_hours,
        } => {
            let older_than = older_than_hours
                .map(|h| preftune_label::net::hours("--older-than-hours", h))
                .transpose()?;
            let released = open(db)?.release(annotator.as_deref(), older_than)?;
            let total: usize = released.iter().map(|(_, n)| n).sum();
            let per: serde_json::Map<String, serde_json::Value> =
                released.into_iter().map(|(n, c)| (n, json!(c))).collect();
            emit(&json!({"db": db, "released": total, "per_annotator": per}));
        }
        LabelCmd::RevokeToken { name, db } => {
            open(db)?.revoke_token(name)?;
            eprintln!("annotator `{name}`: token revoked and sessions ended; judgements kept");
        }
        LabelCmd::Export {
            db,
            out,
            keep_ties,
            aggregate,
            drop_unsafe,
        } => {
            let store = open(db)?;
            let opts = ExportOptions {
                keep_ties: *keep_ties,
                aggregate: *aggregate,
                drop_unsafe: *drop_unsafe,
            };
            let (rows, report) = export(&store.labels()?, &opts);
            write_jsonl(out, &rows)?;
            emit(
                &json!({"out": out.display().to_string(), "mode": store.mode()?, "report": report}),
            );
        }
        LabelCmd::Stats {
            db,
            judge,
            ask,
            tie,
        } => {
            let store = open(db)?;
            let mode = store.mode()?.unwrap_or(Mode::Pair);
            let labels = store.labels()?;
            let mut v = json!({"progress": store.progress()?, "stats": stats(&labels, mode)});
            if let Some(spec) = judge {
                anyhow::ensure!(
                    mode == Mode::Pair,
                    "{}: --judge compares pairwise labels; this database is in {} mode",
                    db.display(),
                    mode.as_str()
                );
                let j = ask.judge(spec)?;
                let orders = judge_orders(&j, &labels, db)?;
                let a = preftune_label::stats::judge_agreement(&labels, &orders, *tie);
                v["judge"] = json!({"judge": spec, "agreement": a});
            }
            emit(&v);
        }
    }
    Ok(())
}

/// The judge's answers on every human-labelled pair item: P(the first listed wins) with the
/// item's first response listed first, and with its second listed first. A reward judge has no
/// order: its answer is the same either way.
fn judge_orders(
    judge: &preftune_eval::judge::Judge,
    labels: &[preftune_label::Label],
    db: &std::path::Path,
) -> Result<std::collections::BTreeMap<i64, (f64, f64)>> {
    use preftune_eval::judge::Judge;
    use preftune_eval::Sample;
    let items = preftune_label::stats::pair_items(labels);
    let (mut a, mut b) = (vec![], vec![]);
    for l in &items {
        let row = preftune_data::Row {
            loc: preftune_data::Location {
                file: std::sync::Arc::new(db.to_path_buf()),
                line: l.item_id as usize,
            },
            value: json!({"prompt": l.prompt}),
        };
        let prompt = preftune_eval::sources::row_prompt(&row)?;
        for (side, r) in [(&mut a, &l.responses[0]), (&mut b, &l.responses[1])] {
            side.push(Sample {
                prompt: prompt.clone(),
                response: r.clone(),
                risky: false,
            });
        }
    }
    let answers: Vec<(f64, f64)> = match judge {
        Judge::Reward(_) => judge
            .compare(&a, &b)?
            .0
            .into_iter()
            .map(|p| (p, 1.0 - p))
            .collect(),
        _ => judge.orders(&a, &b)?,
    };
    Ok(items.iter().map(|l| l.item_id).zip(answers).collect())
}
