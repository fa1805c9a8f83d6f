//! Pairwise judges: the LLM judge asks in both orders, so swapping the two responses gives
//! exactly the complementary preference (its position bias cancels); reward judges compare
//! scores.
use preftune_data::Text;
use preftune_eval::judge::Judge;
use preftune_eval::{RewardSource, Sample};

fn s(prompt: &str, response: &str) -> Sample {
    Sample {
        prompt: Text::Plain(prompt.into()),
        response: response.into(),
        risky: false,
    }
}

#[test]
fn llm_judge_is_order_symmetric_and_a_probability() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/tiny-llama"
    );
    let judge = Judge::parse(&format!("llm:{model}"), Some("Which reply is kinder?")).unwrap();
    let a = vec![
        s("Say hi.", "Hello there, friend!"),
        s("2+2?", "4"),
        s("Name a colour.", "blue"),
    ];
    let b = vec![
        s("Say hi.", "Go away."),
        s("2+2?", "five, probably"),
        s("Name a colour.", "blue"),
    ];
    let (ab, r) = judge.compare(&a, &b).unwrap();
    assert!(r.is_none());
    let (ba, _) = judge.compare(&b, &a).unwrap();
    for i in 0..a.len() {
        assert!(ab[i] > 0.0 && ab[i] < 1.0, "{ab:?}");
        assert!(
            (ab[i] + ba[i] - 1.0).abs() < 1e-9,
            "pair {i}: {} + {} != 1",
            ab[i],
            ba[i]
        );
    }
    // Identical responses are an exact tie whatever the model's position bias.
    assert!((ab[2] - 0.5).abs() < 1e-9, "{}", ab[2]);
}

#[test]
fn reward_judge_compares_scores() {
    let judge = Judge::Reward(RewardSource::Function(Box::new(|x: &Sample| {
        x.response.len() as f64
    })));
    let a = vec![s("p", "long answer"), s("p", "ab"), s("p", "x")];
    let b = vec![s("p", "short"), s("p", "abc"), s("p", "y")];
    let (p, r) = judge.compare(&a, &b).unwrap();
    assert_eq!(p, vec![1.0, 0.0, 0.5]);
    assert_eq!(r.unwrap().0, vec![11.0, 2.0, 1.0]);
}
