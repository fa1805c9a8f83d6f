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

#[cfg(test)]
mod tests {
    use super::*;

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
}
