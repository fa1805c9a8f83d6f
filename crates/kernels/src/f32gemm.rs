//! f32 products `C = A B^T` over strided views, through the `gemm` crate (the kernel candle's CPU
//! matmul calls, with the same threading).
//!
//! The point is the layouts: a view may be a transpose, so `dW = dy^T x` is written straight into
//! `W`'s `[out, in]` layout. candle's matmul backward computes `x^T dy` and transposes it, and
//! every weight's gradient then needs a strided copy before anything can read it (5% of an f32
//! training step at 16 x 32 tokens).
use crate::bf16gemm::View;

/// `C = A B^T` with `A` (m x k) and `B` (n x k) any strided views; `C` is row-major m x n. With
/// `accumulate`, adds to `C` instead of overwriting it.
pub fn gemm_nt(a: View, b: View, c: &mut [f32], accumulate: bool) {
    let (m, n, k) = (a.parts().1, b.parts().1, a.parts().2);
    assert_eq!(b.parts().2, k, "f32gemm: inner dimensions differ");
    assert_eq!(c.len(), m * n, "f32gemm: c is not {m} x {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // SAFETY: the views' constructors proved every element they describe lies in their slices,
    // `c` holds m x n values (asserted) and is a `&mut` that aliases neither input.
    unsafe { product(a, b, c.as_mut_ptr(), accumulate) }
}

/// [`gemm_nt`] into a new `m x n` buffer, not zeroed first: the product writes every value.
pub fn gemm_nt_new(a: View, b: View) -> Vec<f32> {
    let (m, n, k) = (a.parts().1, b.parts().1, a.parts().2);
    assert_eq!(b.parts().2, k, "f32gemm: inner dimensions differ");
    let len = m * n;
    if len == 0 || k == 0 {
        return vec![0.0; len];
    }
    let mut c: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: as in `gemm_nt`; `c` has room for m x n values, and with `read_dst` false the
    // gemm crate writes each of them without reading it (k > 0).
    unsafe {
        product(a, b, c.as_mut_ptr(), false);
        c.set_len(len);
    }
    c
}

/// # Safety
/// `a` and `b` share `k > 0` columns, `m, n > 0`, and `c` points to `a.rows * b.rows` writable
/// f32 values that alias neither view's data (read first when `accumulate`).
unsafe fn product(a: View, b: View, c: *mut f32, accumulate: bool) {
    let (ad, m, k, a_rs, a_cs) = a.parts();
    let (bd, n, _, b_rs, b_cs) = b.parts();
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract. `gemm` reads `lhs` (m x k) at `i * rs + k * cs` of A's
    // data, `rhs` (k x n) at `k * rs + j * cs`, which is B^T as `B`'s columns and rows (B's
    // element (j, k) at `j * b.rs + k * b.cs`), and writes `dst` (m x n) row-major (strides n, 1).
    // With `read_dst`, `dst = 1 * dst + 1 * lhs rhs` (alpha scales the destination, beta the
    // product).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            accumulate,
            ad.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            bd.as_ptr(),
            b_rs as isize,
            b_cs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values_f32 as values;

    /// Every layout a linear's forward and backward use, against an f64 loop: `x W^T` (both
    /// row-major), `dy W` (the weight transposed) and `dy^T x` (both transposed), with and
    /// without accumulating, at sizes that leave partial blocks.
    #[test]
    fn strided_products_match_a_plain_loop() {
        let (m, n, k) = (37, 29, 53);
        let ad = values(m * k, 1);
        let bd = values(n * k, 2);
        let layouts = [
            (View::rows(&ad, m, k), View::rows(&bd, n, k)),
            (View::rows(&ad, m, k), View::transposed(&bd, n, k)),
            (View::transposed(&ad, m, k), View::transposed(&bd, n, k)),
            (View::transposed(&ad, m, k), View::rows(&bd, n, k)),
        ];
        for (a, b) in layouts {
            let want: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    (0..k)
                        .map(|p| a.get(i, p) as f64 * b.get(j, p) as f64)
                        .sum()
                })
                .collect();
            let c = gemm_nt_new(a, b);
            let mut twice = c.clone();
            gemm_nt(a, b, &mut twice, true);
            for ij in 0..m * n {
                assert!(
                    (c[ij] as f64 - want[ij]).abs() < 1e-5,
                    "{ij}: {} {}",
                    c[ij],
                    want[ij]
                );
                assert!(
                    (twice[ij] as f64 - 2.0 * want[ij]).abs() < 2e-5,
                    "accumulate {ij}"
                );
            }
        }
        assert_eq!(
            gemm_nt_new(View::rows(&[], 3, 0), View::rows(&[], 2, 0)),
            vec![0.0; 6]
        );
    }
}
