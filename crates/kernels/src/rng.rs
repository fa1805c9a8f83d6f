//! Counter-based random numbers: value `i` of a stream is SplitMix64's output function applied to
//! the stream's key plus `i + 1` times its increment, so values can be drawn in any order, in
//! parallel, and on a GPU: `preftune-kernels-cuda`'s `dropout` computes the same bits, so a
//! mask drawn on the device equals the one drawn here.

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of stream `stream` of the generator seeded with `seed`.
pub fn stream_key(seed: u64, stream: u64) -> u64 {
    mix(seed ^ mix(stream.wrapping_add(GOLDEN)))
}

/// Value `i` of the stream with key `key`: uniform on [0, 1) in steps of 2^-24 (exact in f32).
#[inline(always)]
pub fn uniform(key: u64, i: u64) -> f32 {
    let h = mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)));
    (h >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Inverted dropout in place over values `start..start + xs.len()` of the stream with key `key`:
/// `x` becomes 0 where the stream's value is below `p` (`x * 0`, so NaN stays NaN) and `x * keep`
/// elsewhere. It is its own backward: the gradient goes through the same mask.
pub fn dropout(key: u64, start: u64, p: f32, keep: f32, xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has the features the function is compiled for, checked just above.
        return unsafe { dropout_avx512(key, start, p, keep, xs) };
    }
    dropout_loop(key, start, p, keep, xs)
}

/// [`dropout`]'s loop compiled with AVX-512 (64-bit multiplies and u64 -> f32 conversions in
/// vectors): the same bits, several times faster.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn dropout_avx512(key: u64, start: u64, p: f32, keep: f32, xs: &mut [f32]) {
    dropout_loop(key, start, p, keep, xs)
}

#[inline(always)]
fn dropout_loop(key: u64, start: u64, p: f32, keep: f32, xs: &mut [f32]) {
    for (j, x) in xs.iter_mut().enumerate() {
        *x *= if uniform(key, start + j as u64) < p {
            0.0
        } else {
            keep
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_uniform_independent_and_drawn_in_any_order() {
        let key = stream_key(7, 3);
        let n = 200_000;
        let u: Vec<f32> = (0..n).map(|i| uniform(key, i)).collect();
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        // Lag-1 correlation near 0.
        let c = u
            .windows(2)
            .map(|w| (w[0] as f64 - 0.5) * (w[1] as f64 - 0.5))
            .sum::<f64>()
            / (n - 1) as f64
            * 12.0;
        assert!(c.abs() < 0.01, "lag-1 correlation {c}");
        // Another stream or seed draws other values.
        for other in [stream_key(7, 4), stream_key(8, 3)] {
            let same = (0..1000)
                .filter(|&i| uniform(other, i) == u[i as usize])
                .count();
            assert!(same < 5, "{same} equal values");
        }
        // A mask drawn in two pieces is the mask drawn at once, drops about p, and scales
        // every value it keeps by `keep` exactly.
        let (p, keep) = (0.2f32, 1.25f32);
        let x: Vec<f32> = (0..5000).map(|i| i as f32 - 2500.5).collect();
        let mut whole = x.clone();
        dropout(key, 100, p, keep, &mut whole);
        let mut parts = x.clone();
        let (a, b) = parts.split_at_mut(1234);
        dropout(key, 100, p, keep, a);
        dropout(key, 100 + 1234, p, keep, b);
        assert_eq!(whole, parts);
        let dropped = whole.iter().filter(|&&m| m == 0.0).count() as f64 / 5000.0;
        assert!((dropped - 0.2).abs() < 0.02, "dropped {dropped}");
        for (j, (&y, &x)) in whole.iter().zip(&x).enumerate() {
            let dropped = uniform(key, 100 + j as u64) < p;
            assert_eq!(y, if dropped { 0.0 } else { x * keep }, "value {j}");
        }
        // The vectorised loop (where the CPU has it) draws the scalar one's bits.
        let mut scalar = x.clone();
        dropout_loop(key, 100, p, keep, &mut scalar);
        assert_eq!(whole, scalar);
    }
}
