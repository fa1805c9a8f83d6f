//! Agreement between raters beyond chance: human annotators with each other, a judge with people
//! or with hand labels.

/// Cohen's kappa of two raters' categories (`0..k`) over the same items: 1 is perfect agreement,
/// 0 what chance gives; `None` for no items, or when chance agreement is already 1 (both gave the
/// same single category throughout).
pub fn cohen_kappa(a: &[usize], b: &[usize], k: usize) -> Option<f64> {
    let n = a.len().min(b.len());
    if n == 0 {
        return None;
    }
    let po = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n as f64;
    let (mut pa, mut pb) = (vec![0.0; k], vec![0.0; k]);
    for (&x, &y) in a.iter().zip(b) {
        pa[x] += 1.0 / n as f64;
        pb[y] += 1.0 / n as f64;
    }
    let pe: f64 = pa.iter().zip(&pb).map(|(x, y)| x * y).sum();
    (pe < 1.0 - 1e-12).then(|| (po - pe) / (1.0 - pe))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wikipedia's worked example: 50 items, 20 both yes, 5 and 10 split, 15 both no -> 0.4.
    #[test]
    fn cohen_matches_worked_example() {
        let mut a = vec![];
        let mut b = vec![];
        for (x, y, n) in [(0, 0, 20), (0, 1, 5), (1, 0, 10), (1, 1, 15)] {
            a.extend(std::iter::repeat_n(x, n));
            b.extend(std::iter::repeat_n(y, n));
        }
        assert!((cohen_kappa(&a, &b, 2).unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(cohen_kappa(&[0, 0], &[0, 0], 2), None);
    }
}
