//! Operands packed once and multiplied a piece at a time, on the calling thread: the products of
//! attention in tiles under bf16 ([`crate::flash`]), where each key tile's product reads a slice
//! of K or V packed once per call.
//!
//! A product takes rows `i0..i0 + m` of a packed `A`, rows `j0..j0 + n` of a packed `B` and
//! values `k0..k0 + kl` of `B` along `k` (all of `A`'s). The bf16 backends read the pairs
//! [`super`]'s GEMM packs; the fallback keeps bf16-rounded f32 and multiplies with the `gemm`
//! crate, so that every backend gives the same numbers up to summation order.
use super::{imp, round_bf16, runs, Backend, View};

/// Rows and values along `k` are padded to multiples of this (the packed kernels' block).
pub(crate) const ALIGN: usize = 32;

fn padded(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// How operands are packed: for a backend, in bf16 (the fallback: f32 rows rounded to bf16), or
/// (tests only) f32 rows as they are, which checks the bf16 path's indexing at f32 precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Packing {
    Bf16(Backend),
    #[cfg(test)]
    Exact,
}

/// The packed values: bf16 pairs (rows of `A`, panels of `B`) or the fallback's rounded f32 rows.
#[derive(Default)]
enum Store {
    #[default]
    Empty,
    Pairs(Vec<u16>),
    Dense(Vec<f32>),
}

impl Store {
    /// Packs `v` with `kp` values per row, reusing this buffer; `b`: `B`'s panels. Panics for a
    /// backend this process cannot run (its packing and products would be undefined).
    fn pack(&mut self, packing: Packing, v: View, kp: usize, b: bool) {
        let (backend, round): (Backend, fn(f32) -> f32) = match packing {
            Packing::Bf16(be) => (be, round_bf16),
            #[cfg(test)]
            Packing::Exact => (Backend::F32, |x| x),
        };
        assert!(runs(backend), "tiles: {backend:?} does not run on this CPU");
        if backend == Backend::F32 {
            let mut d = match std::mem::take(self) {
                Store::Dense(d) => d,
                _ => Vec::new(),
            };
            d.clear();
            d.resize(padded(v.rows) * kp, 0.0);
            for i in 0..v.rows {
                for (k, x) in d[i * kp..][..v.cols].iter_mut().enumerate() {
                    *x = round(v.get(i, k));
                }
            }
            *self = Store::Dense(d);
            return;
        }
        let mut p = match std::mem::take(self) {
            Store::Pairs(p) => p,
            _ => Vec::new(),
        };
        match b {
            true => imp::pack_b_into(v, kp, &mut p),
            false => imp::pack_a_into(v, kp, &mut p),
        }
        *self = Store::Pairs(p);
    }
}

/// `A` of `C = A B^T`, packed: rows of `padded(cols)` values, rows padded to a multiple of 32.
#[derive(Default)]
pub(crate) struct TileA {
    packing: Option<Packing>,
    rows: usize,
    cols: usize,
    store: Store,
}

impl TileA {
    /// Packs `a`, reusing this one's buffer.
    pub(crate) fn pack(&mut self, packing: Packing, a: View) {
        self.store.pack(packing, a, padded(a.cols), false);
        (self.packing, self.rows, self.cols) = (Some(packing), a.rows, a.cols);
    }
}

/// `B` of `C = A B^T`, packed: each row of `B` is a column of `C`.
#[derive(Default)]
pub(crate) struct TileB {
    packing: Option<Packing>,
    rows: usize,
    cols: usize,
    store: Store,
}

impl TileB {
    /// Packs `b`, reusing this one's buffer.
    pub(crate) fn pack(&mut self, packing: Packing, b: View) {
        self.store.pack(packing, b, padded(b.cols), true);
        (self.packing, self.rows, self.cols) = (Some(packing), b.rows, b.cols);
    }

    /// `b`, packed.
    pub(crate) fn of(packing: Packing, b: View) -> Self {
        let mut t = TileB::default();
        t.pack(packing, b);
        t
    }
}

/// `c (m x n, row-major) = A[i0..i0 + m] B[j0..j0 + n, k0..k0 + kl]^T`, or `+=` with
/// `accumulate`, where `kl` is `A`'s column count. `i0`, `j0` and `k0` are multiples of
/// [`ALIGN`], and `kl` is one too unless `k0 + kl` is `B`'s last column, so that what is read of
/// `B` past `kl` (up to the next multiple of 32) is its own zero padding, never its values.
///
/// Panics if the pieces do not lie inside the packed operands or were packed for other backends.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    a: &TileA,
    i0: usize,
    m: usize,
    b: &TileB,
    (j0, n): (usize, usize),
    k0: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let kl = a.cols;
    assert!(
        a.packing.is_some() && a.packing == b.packing,
        "tiles::product: operands packed for different backends"
    );
    assert!(
        i0.is_multiple_of(ALIGN) && i0 + m <= a.rows,
        "tiles::product: rows {i0}..{} of {}",
        i0 + m,
        a.rows
    );
    assert!(
        j0.is_multiple_of(ALIGN) && j0 + n <= b.rows,
        "tiles::product: columns {j0}..{} of {}",
        j0 + n,
        b.rows
    );
    assert!(
        k0.is_multiple_of(ALIGN)
            && k0 + kl <= b.cols
            && (kl.is_multiple_of(ALIGN) || k0 + kl == b.cols),
        "tiles::product: k {k0}..{} of {}",
        k0 + kl,
        b.cols
    );
    assert_eq!(c.len(), m * n, "tiles::product: c is not {m} x {n}");
    if m == 0 || n == 0 {
        return;
    }
    let (ka, kb) = (padded(kl), padded(b.cols));
    match (&a.store, &b.store) {
        (Store::Pairs(pa), Store::Pairs(pb)) => {
            let Some(Packing::Bf16(backend)) = b.packing else {
                unreachable!("tiles::product: pairs are packed for a bf16 backend")
            };
            // SAFETY: pairs are packed only for a bf16 backend this process runs (`Store::pack`
            // asserts it; `imp::pack_*_into` check the AVX-512 they use). `pa` from row `i0`
            // holds `m` rounded up to 32 rows of `ka` (rows are padded to 32 and
            // `i0 + m <= rows`); `pb` from panel `j0 / 16`, value `k0` along `k`, holds `n`
            // rounded up to 32 columns with `ka` values each inside the panels of `kb`
            // (`k0 + ka <= kb` as `k0` is a multiple of 32); `c` holds m x n values (asserted)
            // and is borrowed mutably.
            unsafe {
                imp::tile(
                    backend,
                    &pa[i0 * ka..],
                    &pb[(j0 / 16) * kb * 16 + k0 * 16..],
                    (ka, kb * 16),
                    m,
                    n,
                    c.as_mut_ptr(),
                    accumulate,
                )
            }
        }
        (Store::Dense(da), Store::Dense(db)) => {
            let (da, db) = (&da[i0 * ka..][..m * ka], &db[j0 * kb + k0..]);
            // SAFETY: `da` holds m rows of `ka >= kl` values; `db` from row `j0`, value `k0`,
            // holds n rows `kb` apart with `kl` values each (`j0 + n <= rows`, `k0 + kl <=
            // cols`); `c` holds m x n values and aliases neither. With `read_dst` set,
            // `c = 1 * c + 1 * a b`.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    kl,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    accumulate,
                    da.as_ptr(),
                    1,
                    ka as isize,
                    db.as_ptr(),
                    kb as isize,
                    1,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        }
        _ => unreachable!("tiles::product: both operands are packed for one backend (asserted)"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::backends;
    use super::*;
    use crate::test_values_f32 as data;

    /// Pieces of both operands, whole and ragged, from row-major and transposed sources, into
    /// fresh and accumulated outputs: each backend within f32 summation order of the f64 sum of
    /// the rounded operands.
    #[test]
    fn pieces_match_the_rounded_product_on_every_backend() {
        // (A's rows, i0, m, B's rows, j0, n, B's cols, k0, kl)
        let cases = [
            (64, 0, 64, 256, 128, 128, 64, 0, 64),
            (70, 64, 6, 100, 32, 68, 64, 0, 64),
            (64, 32, 17, 64, 0, 64, 300, 256, 44),
            (40, 0, 40, 96, 64, 30, 160, 32, 96),
            (33, 0, 33, 16, 0, 16, 33, 0, 33),
        ];
        for be in backends() {
            for (ci, &(ar, i0, m, br, j0, n, bc, k0, kl)) in cases.iter().enumerate() {
                let (a_src, b_src) = (data(ar * kl, ci as u64 + 1), data(br * bc, ci as u64 + 9));
                // A row-major for even cases, transposed for odd; B the other way round.
                let a_t: Vec<f32> = (0..kl * ar)
                    .map(|x| a_src[(x % ar) * kl + x / ar])
                    .collect();
                let b_t: Vec<f32> = (0..bc * br)
                    .map(|x| b_src[(x % br) * bc + x / br])
                    .collect();
                let a_view = match ci % 2 {
                    0 => View::rows(&a_src, ar, kl),
                    _ => View::transposed(&a_t, ar, kl),
                };
                let b_view = match ci % 2 {
                    0 => View::transposed(&b_t, br, bc),
                    _ => View::rows(&b_src, br, bc),
                };
                let mut pa = TileA::default();
                pa.pack(Packing::Bf16(be), a_view);
                let pb = TileB::of(Packing::Bf16(be), b_view);
                for accumulate in [false, true] {
                    let start = data(m * n, 77);
                    let mut c = match accumulate {
                        true => start.clone(),
                        false => vec![f32::NAN; m * n],
                    };
                    product(&pa, i0, m, &pb, (j0, n), k0, &mut c, accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..kl)
                                .map(|k| {
                                    round_bf16(a_src[(i0 + i) * kl + k]) as f64
                                        * round_bf16(b_src[(j0 + j) * bc + k0 + k]) as f64
                                })
                                .sum::<f64>()
                                + if accumulate {
                                    start[i * n + j] as f64
                                } else {
                                    0.0
                                };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{be:?} case {ci} acc {accumulate} ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "k 16..")]
    fn misaligned_pieces_are_refused() {
        let x = data(64 * 64, 3);
        let mut a = TileA::default();
        a.pack(Packing::Bf16(Backend::F32), View::rows(&x, 64, 32));
        let b = TileB::of(Packing::Bf16(Backend::F32), View::rows(&x, 64, 64));
        product(&a, 0, 64, &b, (0, 64), 16, &mut vec![0.0; 64 * 64], false);
    }
}
