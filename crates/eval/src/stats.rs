//! Summary statistics for evaluation reports: means with a 95% confidence interval, win rates,
//! and response-length statistics (printed next to every reward so length hacking shows).
use serde::Serialize;

/// Mean, sample standard deviation and a normal-approximation 95% interval of the mean.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

/// A rate `k / n` with its Wilson 95% interval (sound near 0 and 1, where a normal interval is not).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rate {
    pub n: usize,
    pub count: usize,
    pub rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

pub fn rate_ci(count: usize, n: usize) -> Rate {
    if n == 0 {
        return Rate {
            n,
            count,
            rate: f64::NAN,
            ci95_low: f64::NAN,
            ci95_high: f64::NAN,
        };
    }
    let (k, nf, z) = (count as f64, n as f64, 1.96f64);
    let p = k / nf;
    let denom = 1.0 + z * z / nf;
    let centre = (p + z * z / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / denom;
    Rate {
        n,
        count,
        rate: p,
        ci95_low: (centre - half).max(0.0),
        ci95_high: (centre + half).min(1.0),
    }
}

pub fn mean_ci(x: &[f64]) -> MeanCi {
    let n = x.len();
    let mean = x.iter().sum::<f64>() / n.max(1) as f64;
    let std = if n > 1 {
        (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let half = 1.96 * std / (n.max(1) as f64).sqrt();
    MeanCi {
        n,
        mean,
        std,
        ci95_low: mean - half,
        ci95_high: mean + half,
    }
}

/// Win rate of `a` over `b` (paired): wins count 1, ties 1/2; with its 95% interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WinRate {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub win_rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

pub fn win_rate(a: &[f64], b: &[f64]) -> WinRate {
    let (mut wins, mut ties, mut losses) = (0, 0, 0);
    let outcomes: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if x > y {
                wins += 1;
                1.0
            } else if x < y {
                losses += 1;
                0.0
            } else {
                ties += 1;
                0.5
            }
        })
        .collect();
    let m = mean_ci(&outcomes);
    WinRate {
        n: outcomes.len(),
        wins,
        ties,
        losses,
        win_rate: m.mean,
        ci95_low: m.ci95_low.max(0.0),
        ci95_high: m.ci95_high.min(1.0),
    }
}

/// Response lengths (characters and words): a reward that grows with length is a warning sign.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Lengths {
    pub mean_chars: f64,
    pub mean_words: f64,
    pub max_words: usize,
    /// Correlation between reward and word count (`None` without rewards or variance).
    pub reward_length_correlation: Option<f64>,
}

pub fn lengths(responses: &[String], rewards: Option<&[f64]>) -> Lengths {
    let n = responses.len().max(1) as f64;
    let words: Vec<f64> = responses
        .iter()
        .map(|r| r.split_whitespace().count() as f64)
        .collect();
    let corr = rewards.and_then(|r| {
        let (mx, my) = (words.iter().sum::<f64>() / n, r.iter().sum::<f64>() / n);
        let cov: f64 = words.iter().zip(r).map(|(x, y)| (x - mx) * (y - my)).sum();
        let vx: f64 = words.iter().map(|x| (x - mx).powi(2)).sum();
        let vy: f64 = r.iter().map(|y| (y - my).powi(2)).sum();
        (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
    });
    Lengths {
        mean_chars: responses
            .iter()
            .map(|r| r.chars().count() as f64)
            .sum::<f64>()
            / n,
        mean_words: words.iter().sum::<f64>() / n,
        max_words: words.iter().fold(0.0f64, |a, &b| a.max(b)) as usize,
        reward_length_correlation: corr,
    }
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom (1.96 beyond 30).
pub fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => T[df - 1],
        _ => 1.96,
    }
}

/// A statistic over independent runs (seeds): its mean, sample standard deviation, Student-t 95%
/// interval of the mean (a few seeds are far from normal-approximation territory), and each run's
/// value in order.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OverRuns {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub per_run: Vec<f64>,
}

pub fn over_runs(x: &[f64]) -> OverRuns {
    let m = mean_ci(x);
    let half = if x.len() > 1 {
        t95(x.len() - 1) * m.std / (x.len() as f64).sqrt()
    } else {
        f64::NAN
    };
    OverRuns {
        n: m.n,
        mean: m.mean,
        std: m.std,
        ci95_low: m.mean - half,
        ci95_high: m.mean + half,
        per_run: x.to_vec(),
    }
}

/// A statistic over runs as `mean{pm}std{open}low, high{close}` with three decimals, or `-` when
/// no run had it: the terminal's and the report's rendering of one summary.
pub fn fmt_over_runs(v: &serde_json::Value, pm: &str, open: &str, close: &str) -> String {
    match (v["mean"].as_f64(), v["std"].as_f64()) {
        (Some(m), Some(s)) => format!(
            "{m:.3}{pm}{s:.3}{open}{:.3}, {:.3}{close}",
            v["ci95_low"].as_f64().unwrap_or(f64::NAN),
            v["ci95_high"].as_f64().unwrap_or(f64::NAN)
        ),
        _ => "-".into(),
    }
}

/// A policy's mean response length against SFT's, as a reward-hacking sign: `Some("longer")` or
/// `Some("shorter")` when it moved by more than `LENGTH_FLAG_FRACTION` of SFT's length.
pub fn length_flag(mean_words: f64, sft_mean_words: f64) -> Option<&'static str> {
    let change = (mean_words - sft_mean_words) / sft_mean_words.max(f64::MIN_POSITIVE);
    if change > LENGTH_FLAG_FRACTION {
        Some("longer")
    } else if change < -LENGTH_FLAG_FRACTION {
        Some("shorter")
    } else {
        None
    }
}

/// The relative change in mean words, against SFT, that `length_flag` reports.
pub const LENGTH_FLAG_FRACTION: f64 = 0.2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_intervals_match_published_values() {
        // Wilson 95% for 0/10 and 5/10 (Newcombe 1998's examples round to these).
        let r = rate_ci(0, 10);
        assert_eq!((r.rate, r.ci95_low), (0.0, 0.0));
        assert!((r.ci95_high - 0.2775).abs() < 1e-4, "{r:?}");
        let r = rate_ci(5, 10);
        assert!((r.ci95_low - 0.2366).abs() < 1e-4 && (r.ci95_high - 0.7634).abs() < 1e-4);
        assert!(rate_ci(0, 0).rate.is_nan());
    }

    #[test]
    fn mean_interval_win_rate_and_lengths() {
        let m = mean_ci(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m.mean, 2.5);
        assert!((m.std - 1.290_994_448_7).abs() < 1e-9);
        assert!((m.ci95_high - m.mean - 1.96 * m.std / 2.0).abs() < 1e-12);
        let w = win_rate(&[1.0, 2.0, 3.0, 0.0], &[0.0, 2.0, 1.0, 5.0]);
        assert_eq!((w.wins, w.ties, w.losses), (2, 1, 1));
        assert_eq!(w.win_rate, 0.625);
        let l = lengths(&["a b".into(), "a b c d".into()], Some(&[1.0, 2.0]));
        assert_eq!((l.mean_words, l.max_words), (3.0, 4));
        assert!((l.reward_length_correlation.unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn runs_get_a_student_t_interval_and_lengths_a_flag() {
        // scipy.stats.t.interval(0.95, 2, loc=0.8, scale=stdev/sqrt(3)) for (0.7, 0.8, 0.9).
        let r = over_runs(&[0.7, 0.8, 0.9]);
        assert!((r.mean - 0.8).abs() < 1e-12 && (r.std - 0.1).abs() < 1e-12);
        assert!((r.ci95_low - 0.551_566).abs() < 1e-5, "{r:?}");
        assert!((r.ci95_high - 1.048_434).abs() < 1e-5, "{r:?}");
        assert_eq!(r.per_run, vec![0.7, 0.8, 0.9]);
        assert!(
            over_runs(&[0.5]).ci95_low.is_nan(),
            "one run has no interval"
        );
        assert_eq!(t95(40), 1.96);
        assert_eq!(length_flag(8.7, 12.9), Some("shorter"));
        assert_eq!(length_flag(17.7, 12.5), Some("longer"));
        assert_eq!(length_flag(13.0, 12.5), None);
    }
}
