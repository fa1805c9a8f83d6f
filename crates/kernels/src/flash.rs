//! Attention in tiles on the CPU (flash-attention style), forward and backward, for training:
//! `softmax(scale * Q K^T + mask) V` without storing the scores or the probabilities. The forward
//! keeps each query row's softmax statistics (its largest score and the log of its sum of
//! exponentials); the backward recomputes the probabilities tile by tile from them
//! (FlashAttention-2's scheme, on small GEMMs of the `gemm` crate).
//!
//! Tiles that the mask hides from every row they hold are skipped: under a causal mask that is
//! about half of them. A key is hidden when its mask value is at or below [`HIDDEN`]; the skip is
//! exact because such a key's probability is `exp(-1e9 + ...)`, zero in f32, for every row that
//! sees any key. A row that sees none (a padding slot) visits every tile and gets the uniform
//! average the composed softmax gives it.
//!
//! The layout is the model's grouped one: unit `u` (batch times KV groups) has `r` query rows (the
//! query heads of one KV group stacked along time, `r = heads * t`) and `tk` keys and values;
//! query row `i` reads mask row `i % t` of batch row `u / groups`.
use rayon::prelude::*;

use crate::bf16gemm::tiles::Packing;
use crate::fused::Real;

/// Query rows per tile.
pub const BLOCK_Q: usize = 64;
/// Keys per tile.
pub const BLOCK_K: usize = 128;
/// Mask values at or below this hide a key (the model masks with -1e9).
pub const HIDDEN: f32 = -1e9;

/// One attention problem: `q` `[units, r, dh]`, `k` and `v` `[units, tk, dh]`, an additive `mask`
/// `[units / groups, t, tk]`.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub mask: Option<&'a [f32]>,
    /// KV groups per batch row: unit `u` reads batch row `u / groups` of the mask.
    pub groups: usize,
    pub r: usize,
    pub t: usize,
    pub tk: usize,
    pub dh: usize,
    pub scale: T,
}

impl<T: Real> Problem<'_, T> {
    fn units(&self) -> usize {
        self.q.len() / (self.r * self.dh).max(1)
    }

    /// Panics unless the slices hold whole units of the stated sizes.
    fn check(&self, what: &str) {
        let (r, t, tk, dh) = (self.r, self.t, self.tk, self.dh);
        assert!(
            r > 0 && t > 0 && tk > 0 && dh > 0 && self.groups > 0 && r % t == 0,
            "{what}: r {r}, t {t}, tk {tk}, dh {dh}, groups {}",
            self.groups
        );
        let u = self.units();
        assert_eq!(self.q.len(), u * r * dh, "{what}: q is not whole units");
        assert_eq!(self.k.len(), u * tk * dh, "{what}: k size");
        assert_eq!(self.v.len(), u * tk * dh, "{what}: v size");
        if let Some(m) = self.mask {
            assert_eq!(u % self.groups, 0, "{what}: units not whole batch rows");
            assert_eq!(m.len(), u / self.groups * t * tk, "{what}: mask size");
        }
    }

    /// What each mask row of every batch row sees ([`Live`]), one list per batch row.
    fn live(&self) -> Vec<Vec<Live>> {
        let (t, tk) = (self.t, self.tk);
        let Some(mask) = self.mask else {
            let all = Live {
                lo: 0,
                hi: tk,
                clean: true,
            };
            return vec![vec![all; t]];
        };
        mask.par_chunks(t * tk)
            .map(|rows| rows.chunks_exact(tk).map(Live::of).collect())
            .collect()
    }

    /// Unit `u`'s rows' [`Live`] (every unit shares one when there is no mask).
    fn live_of<'l>(&self, live: &'l [Vec<Live>], u: usize) -> &'l [Live] {
        &live[if self.mask.is_some() {
            u / self.groups
        } else {
            0
        }]
    }

    /// Unit `u`'s query rows of `x` (`q`, `out` or `dout`: `[units, r, dh]`).
    fn unit_rows<'x>(&self, x: &'x [T], u: usize) -> &'x [T] {
        &x[u * self.r * self.dh..][..self.r * self.dh]
    }

    /// Unit `u`'s keys or values of `x` (`k` or `v`: `[units, tk, dh]`).
    fn unit_keys<'x>(&self, x: &'x [T], u: usize) -> &'x [T] {
        &x[u * self.tk * self.dh..][..self.tk * self.dh]
    }

    /// The keys some row of `a..a + n` may see.
    fn block_live(&self, live: &[Live], a: usize, n: usize) -> (usize, usize) {
        (a..a + n)
            .map(|i| live[i % self.t])
            .fold((self.tk, 0), |(lo, hi), l| (lo.min(l.lo), hi.max(l.hi)))
    }

    /// Unit `u`'s mask values for query row `i`, keys `j0..j0 + n`.
    fn mask_row(&self, u: usize, i: usize, j0: usize, n: usize) -> Option<&[f32]> {
        let (t, tk) = (self.t, self.tk);
        self.mask
            .map(|m| &m[((u / self.groups) * t + i % t) * tk + j0..][..n])
    }

    /// Adds unit `u`'s mask to the scores `s` of the query rows from `a` (whose rows see
    /// `live`) against keys `j0..`; rows that see every key of the tile are left as they are.
    #[inline(always)]
    fn add_mask(&self, (u, live): (usize, &[Live]), a: usize, j0: usize, s: &mut [T], n: usize) {
        if self.mask.is_none() {
            return;
        }
        let nk = s.len() / n;
        for (i, row) in s.chunks_exact_mut(nk).enumerate() {
            // Adding zeros changes nothing: only rows with hidden keys in the tile add.
            if live[(a + i) % self.t].sees_all(j0, j0 + nk) {
                continue;
            }
            if let Some(m) = self.mask_row(u, a + i, j0, nk) {
                row.iter_mut()
                    .zip(m)
                    .for_each(|(x, &m)| *x += T::of(m as f64));
            }
        }
    }

    /// The key tiles of the query rows from `a` (`n` of them): from the first key one of them
    /// sees to the last, widened to multiples of `align` (within `tk`) for packed operands.
    fn key_range(&self, live: &[Live], a: usize, n: usize, align: usize) -> (usize, usize) {
        let (lo, hi) = self.block_live(live, a, n);
        (
            lo / align * align,
            (hi.div_ceil(align) * align).min(self.tk),
        )
    }
}

/// The keys one mask row may see: `lo..hi` holds every key it sees (all keys for a row that sees
/// none), and `clean` says it sees every key in there (its mask is zero there).
#[derive(Clone, Copy, Debug)]
struct Live {
    lo: usize,
    hi: usize,
    clean: bool,
}

impl Live {
    fn of(row: &[f32]) -> Live {
        // Whole chunks at a time, with no early exit inside one, so that the tests vectorise:
        // a causal mask's rows are mostly hidden keys, scanned at every layer's call.
        const C: usize = 32;
        let seen = |c: &[f32]| c.iter().fold(false, |a, &m| a | (m > HIDDEN));
        let tk = row.len();
        let Some(first) = row.chunks(C).position(seen) else {
            return Live {
                lo: 0,
                hi: tk,
                clean: false,
            };
        };
        let lo = first * C
            + row[first * C..]
                .iter()
                .position(|&m| m > HIDDEN)
                .unwrap_or(0);
        let tail = row.len() % C;
        let last = match row[tk - tail..].iter().rposition(|&m| m > HIDDEN) {
            Some(j) => tk - tail + j,
            None => {
                let c = row[..tk - tail]
                    .rchunks_exact(C)
                    .position(seen)
                    .unwrap_or(0);
                let start = tk - tail - (c + 1) * C;
                start
                    + row[start..start + C]
                        .iter()
                        .rposition(|&m| m > HIDDEN)
                        .unwrap_or(0)
            }
        };
        let hi = last + 1;
        let clean = row[lo..hi]
            .chunks(C)
            .all(|c| c.iter().fold(true, |a, &m| a & (m == 0.0)));
        Live { lo, hi, clean }
    }

    /// Whether keys `j0..j1` all have a zero mask.
    fn sees_all(&self, j0: usize, j1: usize) -> bool {
        self.clean && self.lo <= j0 && j1 <= self.hi
    }
}

/// The products of one unit's tiles: [`Plain`] multiplies in the problem's precision, [`bf16`]
/// in bf16 with f32 sums. Tiles are `n` query rows from row `a` against `nk` keys from key `j0`;
/// `nk` is the tile's width (`len / n` of its `n x nk` operands).
trait Scores<T: Real>: Sync {
    /// What one thread reuses from tile to tile.
    type Scratch: Default;
    /// Key tiles start at multiples of this.
    const ALIGN: usize;
    /// `s = scale * Q[a..a + n] K[j0..j0 + nk]^T`.
    fn scores(&self, a: usize, n: usize, j0: usize, s: &mut [T]);
}

/// The forward's second product.
trait Forward<T: Real>: Scores<T> {
    /// `o += P V[j0..j0 + nk]` (`p`: n x nk, `o`: n x dh).
    fn pv(&self, x: &mut Self::Scratch, p: &[T], n: usize, j0: usize, o: &mut [T]);
}

/// The backward's four products besides the scores.
trait Backward<T: Real>: Scores<T> {
    /// `dv += P^T dO[a..a + n]` (`dv`: the tile's nk x dh).
    fn dv(&self, x: &mut Self::Scratch, p: &[T], a: usize, n: usize, dv: &mut [T]);
    /// `dp = dO[a..a + n] V[j0..j0 + nk]^T`.
    fn dp(&self, a: usize, n: usize, j0: usize, dp: &mut [T]);
    /// `dq += dS K[j0..j0 + nk]` (`dq`: n x dh).
    fn dq(&self, x: &mut Self::Scratch, ds: &[T], n: usize, j0: usize, dq: &mut [T]);
    /// `dk += dS^T Q[a..a + n]` (`dk`: the tile's nk x dh).
    fn dk(&self, x: &mut Self::Scratch, ds: &[T], a: usize, n: usize, dk: &mut [T]);
}

/// Unit `u`'s products on its own values, in `T`, by the `gemm` crate.
struct Plain<'a, T> {
    p: &'a Problem<'a, T>,
    u: usize,
    /// The unit's output gradient (backward only).
    dout: &'a [T],
}

impl<T: Real> Plain<'_, T> {
    /// Unit `u`'s rows of `x` (`q` or `dout`, `[.., r, dh]`) from `a`, `n` of them.
    fn rows<'x>(&self, x: &'x [T], a: usize, n: usize) -> &'x [T] {
        &x[a * self.p.dh..][..n * self.p.dh]
    }

    /// Unit `u`'s keys or values `j0..j0 + nk`.
    fn keys<'x>(&self, x: &'x [T], j0: usize, nk: usize) -> &'x [T] {
        &self.p.unit_keys(x, self.u)[j0 * self.p.dh..][..nk * self.p.dh]
    }

    fn q(&self) -> &[T] {
        self.p.unit_rows(self.p.q, self.u)
    }
}

impl<T: Real> Scores<T> for Plain<'_, T> {
    type Scratch = ();
    const ALIGN: usize = 1;

    fn scores(&self, a: usize, n: usize, j0: usize, s: &mut [T]) {
        let (dh, nk) = (self.p.dh, s.len() / n);
        let (q, k) = (self.rows(self.q(), a, n), self.keys(self.p.k, j0, nk));
        // SAFETY: `s` holds n x nk values, `q` n x dh and `k` nk x dh (sliced above), at the
        // strides given (`k` read transposed); `s` aliases neither.
        unsafe {
            mm(
                (n, nk, dh),
                s.as_mut_ptr(),
                nk,
                false,
                (q.as_ptr(), dh, 1),
                (k.as_ptr(), 1, dh),
                self.p.scale,
            )
        }
    }
}

impl<T: Real> Plain<'_, T> {
    /// `out (n x dh) += x (n x nk) y[j0..j0 + nk]`, `y` this unit's keys or values (`O += P V`,
    /// `dQ += dS K`).
    fn straight(&self, x: &[T], n: usize, y: &[T], j0: usize, out: &mut [T]) {
        let (dh, nk) = (self.p.dh, x.len() / n);
        let y = self.keys(y, j0, nk);
        assert_eq!(out.len(), n * dh, "flash: output tile size");
        // SAFETY: `out` holds n x dh values, `x` n x nk, `y` nk x dh (sliced and asserted
        // above); `out` aliases neither.
        unsafe {
            mm(
                (n, dh, nk),
                out.as_mut_ptr(),
                dh,
                true,
                (x.as_ptr(), nk, 1),
                (y.as_ptr(), dh, 1),
                T::one(),
            )
        }
    }

    /// `out (nk x dh) += x^T y[a..a + n]`, `x` n x nk, `y` this unit's query rows or their
    /// gradient (`dV += P^T dO`, `dK += dS^T Q`).
    fn transposed(&self, x: &[T], a: usize, n: usize, y: &[T], out: &mut [T]) {
        let (dh, nk) = (self.p.dh, x.len() / n);
        let y = self.rows(y, a, n);
        assert_eq!(out.len(), nk * dh, "flash: key tile size");
        // SAFETY: `out` holds nk x dh values, `x` n x nk (read transposed), `y` n x dh; `out`
        // aliases neither.
        unsafe {
            mm(
                (nk, dh, n),
                out.as_mut_ptr(),
                dh,
                true,
                (x.as_ptr(), 1, nk),
                (y.as_ptr(), dh, 1),
                T::one(),
            )
        }
    }
}

impl<T: Real> Forward<T> for Plain<'_, T> {
    fn pv(&self, _: &mut (), p: &[T], n: usize, j0: usize, o: &mut [T]) {
        self.straight(p, n, self.p.v, j0, o)
    }
}

impl<T: Real> Backward<T> for Plain<'_, T> {
    fn dv(&self, _: &mut (), p: &[T], a: usize, n: usize, dv: &mut [T]) {
        self.transposed(p, a, n, self.dout, dv)
    }

    fn dp(&self, a: usize, n: usize, j0: usize, dp: &mut [T]) {
        let (dh, nk) = (self.p.dh, dp.len() / n);
        let (go, v) = (self.rows(self.dout, a, n), self.keys(self.p.v, j0, nk));
        // SAFETY: `dp` holds n x nk values, `go` n x dh, `v` nk x dh (read transposed); `dp`
        // aliases neither.
        unsafe {
            mm(
                (n, nk, dh),
                dp.as_mut_ptr(),
                nk,
                false,
                (go.as_ptr(), dh, 1),
                (v.as_ptr(), 1, dh),
                T::one(),
            )
        }
    }

    fn dq(&self, _: &mut (), ds: &[T], n: usize, j0: usize, dq: &mut [T]) {
        self.straight(ds, n, self.p.k, j0, dq)
    }

    fn dk(&self, _: &mut (), ds: &[T], a: usize, n: usize, dk: &mut [T]) {
        self.transposed(ds, a, n, self.q(), dk)
    }
}

/// `dst (m x n, row stride ld) += scale * lhs (m x k) rhs (k x n)`, or `=` when `!add`; each
/// operand given with its (row, column) strides.
///
/// # Safety
/// Every operand's pointer must cover the `m x k`, `k x n` and `m x n` elements its strides reach,
/// and `dst` must alias neither input.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    ld: usize,
    add: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    scale: T,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            add,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out` (`[units, r, dh]`) and each query row's softmax statistics `stats` (`[units, r, 2]`: the
/// row's largest score, then the log of its sum of `exp(score - largest)`). Their sum is the row's
/// log-sum-exp; they are kept apart because a row that sees no key has every score at -1e9 in f32,
/// where the log-sum-exp would round its `ln(tk)` away.
pub fn forward<T: Real>(p: &Problem<T>, out: &mut [T], stats: &mut [T]) {
    run_forward(p, out, stats, |u| Plain { p, u, dout: &[] })
}

/// [`forward`] with bf16 products and f32 sums (`bf16 = true`): Q, K and V are rounded to bf16
/// once, the probabilities tile by tile; the softmax and its statistics stay f32. On the
/// backend [`crate::bf16gemm::backend`] picks (AMX, AVX-512 BF16, or the same rounding through
/// f32 products).
pub fn forward_bf16(p: &Problem<f32>, out: &mut [f32], stats: &mut [f32]) {
    let packing = Packing::Bf16(crate::bf16gemm::backend());
    forward_bf16_on(packing, p, out, stats)
}

/// [`forward_bf16`] with its operands packed as `packing` says.
fn forward_bf16_on(packing: Packing, p: &Problem<f32>, out: &mut [f32], stats: &mut [f32]) {
    run_forward(p, out, stats, |u| bf16::Fwd::new(packing, p, u))
}

/// [`backward`] with bf16 products and f32 sums, for [`forward_bf16`]: dO is rounded once, the
/// probabilities and `dS` tile by tile.
pub fn backward_bf16(
    p: &Problem<f32>,
    saved: (&[f32], &[f32], &[f32]),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let packing = Packing::Bf16(crate::bf16gemm::backend());
    backward_bf16_on(packing, p, saved, (dq, dk, dv))
}

/// [`backward_bf16`] with its operands packed as `packing` says.
fn backward_bf16_on(
    packing: Packing,
    p: &Problem<f32>,
    saved: (&[f32], &[f32], &[f32]),
    grads: (&mut [f32], &mut [f32], &mut [f32]),
) {
    let dout = saved.1;
    run_backward(p, saved, grads, |u| {
        bf16::Bwd::new(packing, p, u, p.unit_rows(dout, u))
    })
}

/// The forward with unit `u`'s products from `ops(u)`.
fn run_forward<T: Real, P: Forward<T>>(
    p: &Problem<T>,
    out: &mut [T],
    stats: &mut [T],
    ops: impl Fn(usize) -> P + Sync,
) {
    p.check("flash::forward");
    let (r, dh) = (p.r, p.dh);
    assert_eq!(out.len(), p.q.len(), "flash::forward: out size");
    assert_eq!(stats.len(), 2 * p.units() * r, "flash::forward: stats size");
    let live = p.live();
    out.par_chunks_mut(r * dh)
        .zip(stats.par_chunks_mut(2 * r))
        .enumerate()
        .for_each(|(u, (out, stats))| {
            let live = p.live_of(&live, u);
            let ops = ops(u);
            out.par_chunks_mut(BLOCK_Q * dh)
                .zip(stats.par_chunks_mut(2 * BLOCK_Q))
                .enumerate()
                .for_each(|(blk, (o, l))| forward_block(p, &ops, (u, live), blk * BLOCK_Q, o, l));
        });
}

/// Rows `a..a + stats.len() / 2` of unit `u`: the online softmax over the tiles they may see.
fn forward_block<T: Real, P: Forward<T>>(
    p: &Problem<T>,
    ops: &P,
    ul: (usize, &[Live]),
    a: usize,
    o: &mut [T],
    stats: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::vmath::available() {
        // SAFETY: `vmath::available` checked that the CPU has AVX-512F, all `avx512` requires.
        return unsafe { avx512::forward_block(p, ops, ul, a, o, stats) };
    }
    forward_block_body(p, ops, ul, a, o, stats)
}

/// The elementwise loops (masks, `dS`, rescaling) compiled for AVX-512 (the crate targets
/// baseline x86-64); the products pick their own instructions.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_block<T: Real, P: Forward<T>>(
        p: &Problem<T>,
        ops: &P,
        ul: (usize, &[Live]),
        a: usize,
        o: &mut [T],
        stats: &mut [T],
    ) {
        forward_block_body(p, ops, ul, a, o, stats)
    }

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn backward_unit<T: Real, P: Backward<T>>(
        p: &Problem<T>,
        ops: &P,
        ul: (usize, &[Live]),
        g: Unit<T>,
        grads: (&mut [T], &mut [T], &mut [T]),
    ) {
        backward_unit_body(p, ops, ul, g, grads)
    }
}

#[inline(always)]
fn forward_block_body<T: Real, P: Forward<T>>(
    p: &Problem<T>,
    ops: &P,
    (u, live): (usize, &[Live]),
    a: usize,
    o: &mut [T],
    stats: &mut [T],
) {
    let n = stats.len() / 2;
    let (lo, hi) = p.key_range(live, a, n, P::ALIGN);
    let mut s = vec![T::zero(); n * BLOCK_K.min(hi - lo)];
    let mut max = vec![T::neg_infinity(); n];
    let mut sum = vec![T::zero(); n];
    let mut scratch = P::Scratch::default();
    o.fill(T::zero());
    let mut j0 = lo;
    while j0 < hi {
        let nk = BLOCK_K.min(hi - j0);
        let s = &mut s[..n * nk];
        ops.scores(a, n, j0, s);
        p.add_mask((u, live), a, j0, s, n);
        for (i, (row, orow)) in s
            .chunks_exact_mut(nk)
            .zip(o.chunks_exact_mut(p.dh))
            .enumerate()
        {
            let top = T::max_of(row);
            // A NaN score makes the row NaN (the trainer stops on it), as the composed op would.
            let m = if top.is_nan() { top } else { max[i].max(top) };
            if m == T::neg_infinity() {
                row.fill(T::zero());
                continue;
            }
            // exp(-inf) = 0 on a row's first tile: nothing to rescale.
            let corr = (max[i] - m).exp();
            sum[i] = sum[i] * corr + T::exp_shifted_fast(row, m, T::one());
            if corr != T::one() {
                orow.iter_mut().for_each(|x| *x *= corr);
            }
            max[i] = m;
        }
        ops.pv(&mut scratch, s, n, j0, o);
        j0 += nk;
    }
    for ((orow, st), (&m, &z)) in o
        .chunks_exact_mut(p.dh)
        .zip(stats.chunks_exact_mut(2))
        .zip(max.iter().zip(&sum))
    {
        let inv = z.recip();
        orow.iter_mut().for_each(|x| *x *= inv);
        st[0] = m;
        st[1] = z.ln();
    }
}

/// The gradients `dq` (`[units, r, dh]`), `dk` and `dv` (`[units, tk, dh]`) from the forward's
/// `out` and `stats` and the output's gradient `dout`. Units run in parallel, each one's tiles in
/// order, so the sums are the same on every run.
pub fn backward<T: Real>(
    p: &Problem<T>,
    saved: (&[T], &[T], &[T]),
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let dout = saved.1;
    run_backward(p, saved, (dq, dk, dv), |u| Plain {
        p,
        u,
        dout: p.unit_rows(dout, u),
    })
}

/// The backward with unit `u`'s products from `ops(u)`.
fn run_backward<T: Real, P: Backward<T>>(
    p: &Problem<T>,
    (out, dout, stats): (&[T], &[T], &[T]),
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    ops: impl Fn(usize) -> P + Sync,
) {
    p.check("flash::backward");
    let (r, tk, dh) = (p.r, p.tk, p.dh);
    for (x, n, what) in [
        (out.len(), p.q.len(), "out"),
        (dout.len(), p.q.len(), "dout"),
        (stats.len(), 2 * p.units() * r, "stats"),
        (dq.len(), p.q.len(), "dq"),
        (dk.len(), p.k.len(), "dk"),
        (dv.len(), p.v.len(), "dv"),
    ] {
        assert_eq!(x, n, "flash::backward: {what} size");
    }
    let live = p.live();
    dq.par_chunks_mut(r * dh)
        .zip(dk.par_chunks_mut(tk * dh))
        .zip(dv.par_chunks_mut(tk * dh))
        .enumerate()
        .for_each(|(u, ((dq, dk), dv))| {
            let rows = u * r * dh..(u + 1) * r * dh;
            let g = Unit {
                out: &out[rows.clone()],
                dout: &dout[rows],
                stats: &stats[2 * u * r..][..2 * r],
            };
            let ops = ops(u);
            backward_unit(p, &ops, (u, p.live_of(&live, u)), g, (dq, dk, dv))
        });
}

/// One unit's forward output, its gradient and softmax statistics.
struct Unit<'a, T> {
    out: &'a [T],
    dout: &'a [T],
    stats: &'a [T],
}

fn backward_unit<T: Real, P: Backward<T>>(
    p: &Problem<T>,
    ops: &P,
    ul: (usize, &[Live]),
    g: Unit<T>,
    grads: (&mut [T], &mut [T], &mut [T]),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::vmath::available() {
        // SAFETY: `vmath::available` checked that the CPU has AVX-512F, all `avx512` requires.
        return unsafe { avx512::backward_unit(p, ops, ul, g, grads) };
    }
    backward_unit_body(p, ops, ul, g, grads)
}

#[inline(always)]
fn backward_unit_body<T: Real, P: Backward<T>>(
    p: &Problem<T>,
    ops: &P,
    (u, live): (usize, &[Live]),
    g: Unit<T>,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) {
    let (r, dh) = (p.r, p.dh);
    for x in [&mut *dq, &mut *dk, &mut *dv] {
        x.fill(T::zero());
    }
    // D = rowsum(dO * O), the softmax backward's correction per row.
    let d: Vec<T> = g
        .out
        .chunks_exact(dh)
        .zip(g.dout.chunks_exact(dh))
        .map(|(o, go)| o.iter().zip(go).map(|(&a, &b)| a * b).sum())
        .collect();
    // On the heap: up to 64 KB each.
    #[allow(clippy::useless_vec)]
    let (mut s, mut ds) = (
        vec![T::zero(); BLOCK_Q * BLOCK_K],
        vec![T::zero(); BLOCK_Q * BLOCK_K],
    );
    let mut scratch = P::Scratch::default();
    for a in (0..r).step_by(BLOCK_Q) {
        let n = BLOCK_Q.min(r - a);
        let dq_blk = &mut dq[a * dh..][..n * dh];
        let (lo, hi) = p.key_range(live, a, n, P::ALIGN);
        let mut j0 = lo;
        while j0 < hi {
            let nk = BLOCK_K.min(hi - j0);
            let (s, ds) = (&mut s[..n * nk], &mut ds[..n * nk]);
            // P = exp(S - max) / sum, as the forward normalised it.
            ops.scores(a, n, j0, s);
            p.add_mask((u, live), a, j0, s, n);
            for (i, row) in s.chunks_exact_mut(nk).enumerate() {
                let st = &g.stats[2 * (a + i)..][..2];
                T::exp_shifted_fast(row, st[0], (-st[1]).exp());
            }
            let keys = j0 * dh..(j0 + nk) * dh;
            ops.dv(&mut scratch, s, a, n, &mut dv[keys.clone()]);
            ops.dp(a, n, j0, ds);
            // dS = scale * P * (dP - D)
            for (i, (dsr, pr)) in ds.chunks_exact_mut(nk).zip(s.chunks_exact(nk)).enumerate() {
                let di = d[a + i];
                dsr.iter_mut()
                    .zip(pr)
                    .for_each(|(x, &pv)| *x = p.scale * pv * (*x - di));
            }
            ops.dq(&mut scratch, ds, n, j0, dq_blk);
            ops.dk(&mut scratch, ds, a, n, &mut dk[keys]);
            j0 += nk;
        }
    }
}

mod bf16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// Plain f64 attention and its gradients, row by row over every key. With `uniform_dead`,
    /// rows that see no key take the uniform average, as f32 gives them (their scores all round
    /// to -1e9); otherwise f64's softmax of their scores.
    fn reference(p: &Problem<f64>, w: &[f64], uniform_dead: bool) -> (Vec<f64>, [Vec<f64>; 3]) {
        let (r, tk, dh) = (p.r, p.tk, p.dh);
        let units = p.units();
        let mut out = vec![0.0; p.q.len()];
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; p.q.len()],
            vec![0.0; p.k.len()],
            vec![0.0; p.v.len()],
        );
        for u in 0..units {
            for i in 0..r {
                let q = &p.q[(u * r + i) * dh..][..dh];
                // Unit u is batch row u / groups; query row i reads mask row i % t.
                let mrow = p
                    .mask
                    .map(|m| &m[((u / p.groups) * p.t + i % p.t) * tk..][..tk]);
                let s: Vec<f64> = (0..tk)
                    .map(|j| {
                        let k = &p.k[(u * tk + j) * dh..][..dh];
                        let m = mrow.map_or(0.0, |m| m[j] as f64);
                        p.scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() + m
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let dead = mrow.is_some_and(|m| m.iter().all(|&x| x <= HIDDEN));
                let pr: Vec<f64> = match dead && uniform_dead {
                    true => vec![1.0 / tk as f64; tk],
                    false => s.iter().map(|x| (x - mx).exp() / z).collect(),
                };
                let row = (u * r + i) * dh;
                for (j, &pj) in pr.iter().enumerate() {
                    for e in 0..dh {
                        out[row + e] += pj * p.v[(u * tk + j) * dh + e];
                    }
                }
                // Loss sum(w * out): dO = w.
                let go = &w[row..][..dh];
                let dp: Vec<f64> = (0..tk)
                    .map(|j| (0..dh).map(|e| go[e] * p.v[(u * tk + j) * dh + e]).sum())
                    .collect();
                let dd: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..tk {
                    let dsj = p.scale * pr[j] * (dp[j] - dd);
                    let key = (u * tk + j) * dh;
                    for e in 0..dh {
                        dq[row + e] += dsj * p.k[key + e];
                        dk[key + e] += dsj * q[e];
                        dv[key + e] += pr[j] * go[e];
                    }
                }
            }
        }
        (out, [dq, dk, dv])
    }

    /// A causal mask over `past + t` keys for `b` batch rows; batch row 1 has its first `pad` keys
    /// padded (so its first `pad - past` query rows see nothing), the last row (`b` > 2) a hole.
    fn causal_mask(b: usize, t: usize, past: usize, pad: usize) -> Vec<f32> {
        let tk = past + t;
        let mut m = vec![0f32; b * t * tk];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..tk {
                    let hidden =
                        j > past + i || (bi == 1 && j < pad) || (bi == 2 && (40..45).contains(&j));
                    if hidden {
                        m[(bi * t + i) * tk + j] = -1e9;
                    }
                }
            }
        }
        m
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Shapes crossing tile edges (rows and keys not multiples of the blocks, heads stacked so
    /// that a tile straddles two), with and without a causal and padding mask, in f64 (to 1e-12)
    /// and f32 (to 2e-5): output and the three gradients against the plain loop.
    #[test]
    fn tiles_match_the_plain_loop() {
        // (batch, groups, heads per group, t, past, dh, pad)
        for &(b, groups, heads, t, past, dh, pad) in &[
            (3, 2, 3, 150, 20, 16, 60),
            (1, 1, 1, 1, 7, 8, 0),
            (2, 1, 2, 200, 0, 32, 130),
            (1, 3, 1, 64, 64, 64, 0),
        ] {
            let (r, tk) = (heads * t, past + t);
            let units = b * groups;
            let q = values(units * r * dh, 1);
            let k = values(units * tk * dh, 2);
            let v = values(units * tk * dh, 3);
            let mask = causal_mask(b, t, past, pad);
            let w = values(units * r * dh, 4);
            // In f64 the rows that see no key (padding slots) keep 1e-7 of their scores' spread
            // under -1e9, which the tiles round otherwise than the plain loop: no loss there, as
            // in training. In f32 they are uniform on both sides and carry a loss.
            let mut w_live = w.clone();
            for (row, wr) in w_live.chunks_exact_mut(dh).enumerate() {
                let (u, i) = (row / r, row % r);
                if mask[((u / groups) * t + i % t) * tk..][..tk]
                    .iter()
                    .all(|&m| m <= HIDDEN)
                {
                    wr.fill(0.0);
                }
            }
            for masked in [true, false] {
                let p = Problem {
                    q: &q,
                    k: &k,
                    v: &v,
                    mask: masked.then_some(&mask[..]),
                    groups,
                    r,
                    t,
                    tk,
                    dh,
                    scale: 1.0 / (dh as f64).sqrt(),
                };
                let case = format!("{b}x{groups}x{heads} t {t} past {past} masked {masked}");
                let want = reference(&p, &w_live, false);
                let got = run(&p, &w_live);
                compare(&got, &want, 1e-12, &format!("f64 {case}"));

                let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
                let (q32, k32, v32, w32) = (f(&q), f(&k), f(&v), f(&w));
                let p32 = Problem {
                    q: &q32,
                    k: &k32,
                    v: &v32,
                    mask: p.mask,
                    groups,
                    r,
                    t,
                    tk,
                    dh,
                    scale: p.scale as f32,
                };
                let g = |x: Vec<f32>| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
                let (out, [dq, dk, dv]) = run(&p32, &w32);
                let got = (g(out), [g(dq), g(dk), g(dv)]);
                compare(&got, &reference(&p, &w, true), 2e-5, &format!("f32 {case}"));
            }
        }
    }

    /// The kernel's output and gradients for the loss `sum(w * out)`.
    fn run<T: Real>(p: &Problem<T>, w: &[T]) -> (Vec<T>, [Vec<T>; 3]) {
        let mut out = vec![T::zero(); p.q.len()];
        let mut stats = vec![T::zero(); 2 * p.units() * p.r];
        forward(p, &mut out, &mut stats);
        let (mut dq, mut dk, mut dv) = (
            vec![T::zero(); p.q.len()],
            vec![T::zero(); p.k.len()],
            vec![T::zero(); p.v.len()],
        );
        backward(p, (&out, w, &stats), &mut dq, &mut dk, &mut dv);
        (out, [dq, dk, dv])
    }

    type Grads = (Vec<f64>, [Vec<f64>; 3]);

    fn compare(got: &Grads, want: &Grads, tol: f64, case: &str) {
        let pairs = [(&got.0, &want.0)]
            .into_iter()
            .chain(got.1.iter().zip(&want.1));
        for (what, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(pairs) {
            let e = max_diff(a, b);
            assert!(e < tol, "{case}: {what} off by {e}");
        }
    }

    /// The range of keys a mask row sees, found a chunk at a time, against the plain scan.
    #[test]
    fn live_ranges_match_a_plain_scan() {
        for tk in [1, 5, 31, 32, 33, 64, 100, 130] {
            for lo in 0..tk.min(40) {
                for hi in [lo + 1, (lo + 7).min(tk), tk] {
                    for hole in [None, Some((lo + hi) / 2)] {
                        let mut row = vec![-1e9f32; tk];
                        row[lo..hi].fill(0.0);
                        if let Some(h) = hole.filter(|&h| h > lo && h + 1 < hi) {
                            row[h] = -1e9;
                        }
                        let l = Live::of(&row);
                        let clean = row[lo..hi].iter().all(|&m| m == 0.0);
                        assert_eq!((l.lo, l.hi, l.clean), (lo, hi, clean), "tk {tk} {lo}..{hi}");
                    }
                }
            }
            let l = Live::of(&vec![-1e9f32; tk]);
            assert_eq!(
                (l.lo, l.hi, l.clean),
                (0, tk, false),
                "a row that sees nothing"
            );
        }
    }

    /// Under a causal mask the tiles above the diagonal are never visited: a NaN planted in a key
    /// that no query row of an early tile may see does not reach those rows.
    #[test]
    fn hidden_tiles_are_skipped() {
        let (t, dh) = (2 * BLOCK_K, 8);
        let mut k = vec![0.5f32; t * dh];
        // Value j is j: row i, seeing keys 0..=i with equal scores, averages them to i / 2.
        let v: Vec<f32> = (0..t * dh).map(|x| (x / dh) as f32).collect();
        let q = vec![0.25f32; t * dh];
        k[(t - 1) * dh] = f32::NAN;
        let mask = causal_mask(1, t, 0, 0);
        let p = Problem {
            q: &q,
            k: &k,
            v: &v,
            mask: Some(&mask),
            groups: 1,
            r: t,
            t,
            tk: t,
            dh,
            scale: 1.0,
        };
        // The bf16 tiles too (their key tiles widen to multiples of 32): the values, 0..256, and
        // the equal probabilities are exact in bf16.
        let bf16 = crate::bf16gemm::backends().into_iter().map(Some);
        for be in [None].into_iter().chain(bf16) {
            let mut out = vec![0f32; q.len()];
            let mut stats = vec![0f32; 2 * t];
            match be {
                None => forward(&p, &mut out, &mut stats),
                Some(be) => forward_bf16_on(Packing::Bf16(be), &p, &mut out, &mut stats),
            }
            for (i, row) in out[..BLOCK_K * dh].chunks_exact(dh).enumerate() {
                assert!(
                    row.iter().all(|&x| (x - i as f32 / 2.0).abs() < 1e-4),
                    "{be:?} row {i}: {row:?}"
                );
            }
            assert!(
                out[(t - 1) * dh].is_nan(),
                "{be:?}: the last row sees the NaN key"
            );
        }
    }

    /// Shapes for the bf16 tests: (batch, groups, heads per group, t, past, dh, pad), crossing
    /// tile edges with ragged last blocks of rows and keys, head sizes 8 to 64.
    const BF16_SHAPES: [(usize, usize, usize, usize, usize, usize, usize); 4] = [
        (3, 2, 3, 150, 20, 16, 60),
        (1, 1, 1, 1, 7, 8, 0),
        (2, 1, 2, 200, 0, 32, 130),
        (1, 3, 1, 300, 64, 64, 0),
    ];

    /// The bf16 path's output and gradients for the loss `sum(w * out)`, packed as `packing` says.
    fn run_bf16(packing: Packing, p: &Problem<f32>, w: &[f32]) -> (Vec<f32>, [Vec<f32>; 3]) {
        let mut out = vec![0f32; p.q.len()];
        let mut stats = vec![0f32; 2 * p.units() * p.r];
        forward_bf16_on(packing, p, &mut out, &mut stats);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; p.q.len()],
            vec![0f32; p.k.len()],
            vec![0f32; p.v.len()],
        );
        let grads = (&mut dq[..], &mut dk[..], &mut dv[..]);
        backward_bf16_on(packing, p, (&out, w, &stats), grads);
        (out, [dq, dk, dv])
    }

    /// Each bf16 shape, masked and not, with its inputs in f32: `f(case, problem, w)`.
    fn each_bf16_case(f: impl Fn(&str, &Problem<f32>, &[f32])) {
        for (b, groups, heads, t, past, dh, pad) in BF16_SHAPES {
            let (r, tk) = (heads * t, past + t);
            let units = b * groups;
            let f32s = |x: Vec<f64>| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (q, k, v, w) = (
                f32s(values(units * r * dh, 1)),
                f32s(values(units * tk * dh, 2)),
                f32s(values(units * tk * dh, 3)),
                f32s(values(units * r * dh, 4)),
            );
            let mask = causal_mask(b, t, past, pad);
            for masked in [true, false] {
                let p = Problem {
                    q: &q,
                    k: &k,
                    v: &v,
                    mask: masked.then_some(&mask[..]),
                    groups,
                    r,
                    t,
                    tk,
                    dh,
                    scale: 1.0 / (dh as f32).sqrt(),
                };
                f(
                    &format!("{b}x{groups}x{heads} t {t} past {past} masked {masked}"),
                    &p,
                    &w,
                );
            }
        }
    }

    fn widen(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// The bf16 path's tiles, packing and slicing with nothing rounded: the plain f32 tiles'
    /// numbers up to summation order, so every offset (ragged last blocks, key tiles widened to
    /// multiples of 32, transposed packs) is checked at f32 precision.
    #[test]
    fn bf16_path_without_rounding_is_the_plain_tiles() {
        each_bf16_case(|case, p, w| {
            let (out, [dq, dk, dv]) = run_bf16(Packing::Exact, p, w);
            let (po, [pq, pk, pv]) = run(p, w);
            compare(
                &(widen(&out), [widen(&dq), widen(&dk), widen(&dv)]),
                &(widen(&po), [widen(&pq), widen(&pk), widen(&pv)]),
                1e-5,
                case,
            );
        });
    }

    /// The bf16 tiles: every backend close to the fallback (which rounds the same operands and
    /// multiplies in f32), and all of them within bf16's rounding of the plain f64 loop (and
    /// visibly rounded).
    #[test]
    fn bf16_tiles_match_the_fallback_and_the_plain_loop() {
        each_bf16_case(|case, p, w| {
            let (q, k, v) = (widen(p.q), widen(p.k), widen(p.v));
            let p64 = Problem {
                q: &q,
                k: &k,
                v: &v,
                mask: p.mask,
                groups: p.groups,
                r: p.r,
                t: p.t,
                tk: p.tk,
                dh: p.dh,
                scale: p.scale as f64,
            };
            let exact = reference(&p64, &widen(w), true);
            let mut fallback = None;
            for be in crate::bf16gemm::backends().into_iter().rev() {
                let (out, [dq, dk, dv]) = run_bf16(Packing::Bf16(be), p, w);
                let got = (widen(&out), [widen(&dq), widen(&dk), widen(&dv)]);
                // Seen: up to 5.5e-3 off the f64 loop, and 1.2e-4 between backends (a `dP`
                // summed in another order can round `dS` to the next bf16).
                compare(&got, &exact, 1e-2, &format!("{be:?} against f64, {case}"));
                let rounded = max_diff(&got.0, &exact.0);
                assert!(
                    rounded > 1e-5,
                    "{be:?}, {case}: no bf16 rounding ({rounded})"
                );
                match &fallback {
                    None => fallback = Some(got),
                    Some(want) => compare(&got, want, 5e-4, &format!("{be:?}, {case}")),
                }
            }
        });
    }
}
