//! Label statistics: work per annotator, agreement on the overlapping items (raw pairwise
//! agreement, Cohen's kappa per annotator pair, Fleiss' kappa), and a position-bias check.
//!
//! Agreement is measured on a category per judgement: for pairs the direction (first response
//! better, about the same, second better), for rankings the response ranked best.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{Label, Mode};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AnnotatorStats {
    pub name: String,
    pub labelled: usize,
    pub ties: usize,
    pub flagged_unsafe: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CohenPair {
    pub a: String,
    pub b: String,
    pub shared_items: usize,
    pub agreement: f64,
    /// `None` when chance agreement is already 1 (both always gave the same single category).
    pub kappa: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Fleiss {
    /// Items with exactly `raters_per_item` judgements (the most common count among the
    /// overlapping items; Fleiss' kappa needs the same count for every item).
    pub items: usize,
    pub raters_per_item: usize,
    pub kappa: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PositionBias {
    /// Judgements counted: non-tie pairs, or all rankings.
    pub judgements: usize,
    /// How often the response shown first (left) won, or was ranked best.
    pub first_shown_wins: usize,
    pub rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// The rate without any bias: 1/2 for pairs, 1/k for rankings of k.
    pub expected: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub mode: Mode,
    pub judgements: usize,
    pub annotators: Vec<AnnotatorStats>,
    /// Items with judgements from two or more annotators.
    pub overlapping_items: usize,
    /// Share of annotator pairs on the same item that gave the same category.
    pub pairwise_agreement: Option<f64>,
    pub cohen: Vec<CohenPair>,
    pub mean_cohen_kappa: Option<f64>,
    pub fleiss: Option<Fleiss>,
    /// Pairs and rankings; thumbs show one response, so there is no position to favour.
    pub position_bias: Option<PositionBias>,
}

/// The category a judgement falls in (see the module doc) and how many there are.
fn category(l: &Label) -> Option<(usize, usize)> {
    match l.mode {
        Mode::Pair => l.choice.map(|c| {
            let direction = match c.signum() {
                1 => 0, // the first response is better
                0 => 1, // about the same
                _ => 2, // the second is better
            };
            (direction, 3)
        }),
        Mode::Rank => l
            .ranking
            .as_ref()
            .and_then(|r| r.first().map(|&b| (b, l.responses.len()))),
        Mode::Thumbs => l.choice.map(|c| ((c < 0) as usize, 2)),
    }
}

pub use preftune_data::agreement::cohen_kappa;

/// Fleiss' kappa from per-item category counts; every item must have the same number of raters.
pub fn fleiss_kappa(counts: &[Vec<usize>]) -> Option<f64> {
    let m: usize = counts.first()?.iter().sum();
    if m < 2 || counts.iter().any(|c| c.iter().sum::<usize>() != m) {
        return None;
    }
    let n = counts.len() as f64;
    let m = m as f64;
    let k = counts[0].len();
    let p_bar = counts
        .iter()
        .map(|c| (c.iter().map(|&x| (x * x) as f64).sum::<f64>() - m) / (m * (m - 1.0)))
        .sum::<f64>()
        / n;
    let pe: f64 = (0..k)
        .map(|j| {
            let pj = counts.iter().map(|c| c[j] as f64).sum::<f64>() / (n * m);
            pj * pj
        })
        .sum();
    (pe < 1.0 - 1e-12).then(|| (p_bar - pe) / (1.0 - pe))
}

pub fn stats(labels: &[Label], mode: Mode) -> Stats {
    let mut per: BTreeMap<&str, AnnotatorStats> = BTreeMap::new();
    for l in labels {
        let s = per.entry(&l.annotator).or_insert_with(|| AnnotatorStats {
            name: l.annotator.clone(),
            labelled: 0,
            ties: 0,
            flagged_unsafe: 0,
        });
        s.labelled += 1;
        s.ties += (l.choice == Some(0)) as usize;
        s.flagged_unsafe += l.unsafe_flag as usize;
    }

    // Categories per item, by annotator.
    let mut items: BTreeMap<i64, Vec<(&str, usize, usize)>> = BTreeMap::new();
    for l in labels {
        if let Some((c, k)) = category(l) {
            items
                .entry(l.item_id)
                .or_default()
                .push((&l.annotator, c, k));
        }
    }
    let overlapping: Vec<&Vec<(&str, usize, usize)>> =
        items.values().filter(|v| v.len() >= 2).collect();
    let (mut agree, mut pairs) = (0usize, 0usize);
    // (annotator a, annotator b) -> a's categories, b's categories on their shared items, and
    // the number of categories.
    type Shared = (Vec<usize>, Vec<usize>, usize);
    let mut by_pair: BTreeMap<(&str, &str), Shared> = BTreeMap::new();
    for v in &overlapping {
        for i in 0..v.len() {
            for j in i + 1..v.len() {
                pairs += 1;
                agree += (v[i].1 == v[j].1) as usize;
                let (x, y) = if v[i].0 <= v[j].0 {
                    (v[i], v[j])
                } else {
                    (v[j], v[i])
                };
                let e = by_pair.entry((x.0, y.0)).or_insert((vec![], vec![], x.2));
                e.0.push(x.1);
                e.1.push(y.1);
                e.2 = e.2.max(x.2).max(y.2);
            }
        }
    }
    let cohen: Vec<CohenPair> = by_pair
        .into_iter()
        .map(|((a, b), (ca, cb, k))| CohenPair {
            a: a.to_string(),
            b: b.to_string(),
            shared_items: ca.len(),
            agreement: ca.iter().zip(&cb).filter(|(x, y)| x == y).count() as f64 / ca.len() as f64,
            kappa: cohen_kappa(&ca, &cb, k),
        })
        .collect();
    let kappas: Vec<f64> = cohen.iter().filter_map(|c| c.kappa).collect();

    // Fleiss on the items with the most common rater count.
    let mut count_of: BTreeMap<usize, usize> = BTreeMap::new();
    for v in &overlapping {
        *count_of.entry(v.len()).or_default() += 1;
    }
    let fleiss = count_of
        .iter()
        .max_by_key(|(m, n)| (**n, **m))
        .map(|(&m, _)| {
            let k = overlapping
                .iter()
                .flat_map(|v| v.iter().map(|x| x.2))
                .max()
                .unwrap_or(1);
            let counts: Vec<Vec<usize>> = overlapping
                .iter()
                .filter(|v| v.len() == m)
                .map(|v| {
                    let mut c = vec![0; k];
                    for x in v.iter() {
                        c[x.1] += 1;
                    }
                    c
                })
                .collect();
            Fleiss {
                items: counts.len(),
                raters_per_item: m,
                kappa: fleiss_kappa(&counts),
            }
        });

    // Position bias.
    let (mut n, mut wins, mut expected_sum) = (0usize, 0usize, 0.0);
    for l in labels {
        match (l.mode, l.choice, &l.ranking) {
            (Mode::Pair, Some(c), _) if c != 0 => {
                n += 1;
                let winner = if c > 0 { 0 } else { 1 };
                wins += (winner == l.first_shown) as usize;
                expected_sum += 0.5;
            }
            (Mode::Rank, _, Some(r)) if !r.is_empty() => {
                n += 1;
                wins += (r[0] == l.first_shown) as usize;
                expected_sum += 1.0 / l.responses.len() as f64;
            }
            _ => {}
        }
    }
    let rate = if n > 0 { wins as f64 / n as f64 } else { 0.0 };
    let half = if n > 0 {
        1.96 * (rate * (1.0 - rate) / n as f64).sqrt()
    } else {
        0.0
    };
    Stats {
        mode,
        judgements: labels.len(),
        annotators: per.into_values().collect(),
        overlapping_items: overlapping.len(),
        pairwise_agreement: (pairs > 0).then(|| agree as f64 / pairs as f64),
        mean_cohen_kappa: (!kappas.is_empty())
            .then(|| kappas.iter().sum::<f64>() / kappas.len() as f64),
        cohen,
        fleiss,
        position_bias: (mode != Mode::Thumbs).then(|| PositionBias {
            judgements: n,
            first_shown_wins: wins,
            rate,
            ci95_low: (rate - half).max(0.0),
            ci95_high: (rate + half).min(1.0),
            expected: if n > 0 { expected_sum / n as f64 } else { 0.5 },
        }),
    }
}

/// A judge against the human labels: agreement and Cohen's kappa on the direction category
/// (first better, about the same, second better) of each pairwise item, and how often the judge
/// picked the same position in both orders.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JudgeAgreement {
    /// Items with a human majority and a judge's answer.
    pub items: usize,
    /// Items whose human votes split with no majority, left out.
    pub split_items: usize,
    pub agreement: Option<f64>,
    pub kappa: Option<f64>,
    /// Rows: human category; columns: the judge's (first better, same, second better).
    pub confusion: [[usize; 3]; 3],
    /// Share of items where the judge picked the same position in both orders.
    pub position_bias: Option<f64>,
}

/// The direction category of a preference `p` for the first response, with ties within `tie`
/// of 1/2.
fn judge_category(p: f64, tie: f64) -> usize {
    if p > 0.5 + tie {
        0
    } else if p < 0.5 - tie {
        2
    } else {
        1
    }
}

/// The items a judge has to answer to be compared with the human pairwise labels: one label per
/// item (its prompt and both responses), in item order.
pub fn pair_items(labels: &[Label]) -> Vec<&Label> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out: Vec<&Label> = labels
        .iter()
        .filter(|l| l.mode == Mode::Pair && l.choice.is_some() && l.responses.len() == 2)
        .filter(|l| seen.insert(l.item_id))
        .collect();
    out.sort_by_key(|l| l.item_id);
    out
}

/// Compares a judge with the humans. `orders` maps an item to the judge's P(the first listed
/// wins) with `responses[0]` listed first and with `responses[1]` listed first; the judge's
/// preference for `responses[0]` is their mean. The humans' category per item is the majority of
/// its annotators' (items whose votes split evenly are left out).
pub fn judge_agreement(
    labels: &[Label],
    orders: &BTreeMap<i64, (f64, f64)>,
    tie: f64,
) -> JudgeAgreement {
    let mut votes: BTreeMap<i64, [usize; 3]> = BTreeMap::new();
    for l in labels.iter().filter(|l| l.mode == Mode::Pair) {
        if let Some((c, _)) = category(l) {
            votes.entry(l.item_id).or_default()[c] += 1;
        }
    }
    let (mut human, mut judge, mut split, mut biased) = (vec![], vec![], 0, 0);
    let mut confusion = [[0usize; 3]; 3];
    for (item, v) in &votes {
        let Some(&(first, second)) = orders.get(item) else {
            continue;
        };
        let top = *v.iter().max().unwrap_or(&0);
        if v.iter().filter(|&&x| x == top).count() > 1 {
            split += 1;
            continue;
        }
        let h = v.iter().position(|&x| x == top).unwrap_or(1);
        let j = judge_category((first + 1.0 - second) / 2.0, tie);
        confusion[h][j] += 1;
        human.push(h);
        judge.push(j);
        biased += usize::from((first > 0.5) == (second > 0.5) && first != 0.5 && second != 0.5);
    }
    let n = human.len();
    JudgeAgreement {
        items: n,
        split_items: split,
        agreement: (n > 0)
            .then(|| human.iter().zip(&judge).filter(|(a, b)| a == b).count() as f64 / n as f64),
        kappa: cohen_kappa(&human, &judge, 3),
        confusion,
        position_bias: (n > 0).then(|| biased as f64 / n as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fleiss' (1971) worked example as Wikipedia gives it: 10 items, 14 raters -> 0.210.
    #[test]
    fn fleiss_matches_worked_example() {
        let t = [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ];
        let counts: Vec<Vec<usize>> = t.iter().map(|r| r.to_vec()).collect();
        assert!((fleiss_kappa(&counts).unwrap() - 0.20993).abs() < 1e-4);
    }

    #[test]
    fn agreement_and_position_bias_from_labels() {
        // Items 1-3 overlap: agree, agree, disagree (tie vs first); item 4 single.
        let labels = vec![
            Label::test_pair(1, "ann", 2, 0),
            Label::test_pair(1, "bob", 1, 1),
            Label::test_pair(2, "ann", -3, 1),
            Label::test_pair(2, "bob", -1, 0),
            Label::test_pair(3, "ann", 0, 0),
            Label::test_pair(3, "bob", 2, 0),
            Label::test_pair(4, "ann", 1, 1),
        ];
        let s = stats(&labels, Mode::Pair);
        assert_eq!(s.overlapping_items, 3);
        assert!((s.pairwise_agreement.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.cohen.len(), 1);
        assert_eq!(s.cohen[0].shared_items, 3);
        // ann: [first, second, tie], bob: [first, second, first]: po 2/3,
        // pe = (1/3)(2/3) + (1/3)(1/3) + (1/3)(0) = 1/3, kappa = (2/3 - 1/3) / (2/3) = 0.5.
        assert!((s.cohen[0].kappa.unwrap() - 0.5).abs() < 1e-12);
        let f = s.fleiss.unwrap();
        assert_eq!((f.items, f.raters_per_item), (3, 2));
        // Non-tie judgements: 6; the first-shown response won in: (1,ann) yes, (1,bob) no,
        // (2,ann) yes, (2,bob) no, (3,bob) yes, (4,ann) no.
        assert_eq!(
            (
                s.position_bias.as_ref().unwrap().judgements,
                s.position_bias.as_ref().unwrap().first_shown_wins
            ),
            (6, 3)
        );
        assert_eq!(s.annotators[0].ties, 1);
    }

    /// Two annotators on items 1-3 (majority on 1 and 3, a split on 2), one on item 4; the judge
    /// agrees on items 1 and 4, calls item 3 a tie, and answers by position on item 4.
    #[test]
    fn judge_agreement_against_the_human_majority() {
        let labels = vec![
            Label::test_pair(1, "ann", 2, 0),
            Label::test_pair(1, "bob", 3, 1),
            Label::test_pair(2, "ann", 2, 0),
            Label::test_pair(2, "bob", -1, 0),
            Label::test_pair(3, "ann", -2, 0),
            Label::test_pair(3, "bob", -3, 0),
            Label::test_pair(4, "ann", -1, 0),
        ];
        let orders: BTreeMap<i64, (f64, f64)> = [
            (1, (0.9, 0.2)), // first better in both orders
            (2, (0.9, 0.1)),
            (3, (0.55, 0.5)), // 0.525: a tie within 0.05
            (4, (0.8, 0.7)),  // picks the first listed both times: 0.55, a tie
        ]
        .into();
        let a = judge_agreement(&labels, &orders, 0.05);
        assert_eq!(a.items, 3);
        assert_eq!(a.split_items, 1);
        // Humans: item 1 first better (0), item 3 second better (2), item 4 second better (2).
        // Judge: item 1 -> 0, item 3 -> 1 (tie), item 4 -> 0.55 -> 1 (tie).
        assert_eq!(a.confusion[0][0], 1);
        assert_eq!(a.confusion[2][1], 2);
        assert!((a.agreement.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // po = 1/3; human marginals (1/3, 0, 2/3), judge (1/3, 2/3, 0): pe = 1/9.
        let k = (1.0 / 3.0 - 1.0 / 9.0) / (1.0 - 1.0 / 9.0);
        assert!((a.kappa.unwrap() - k).abs() < 1e-12, "{a:?}");
        assert!((a.position_bias.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(pair_items(&labels).len(), 4);
    }
}
