//! The tiles' products in bf16 with f32 sums ([`super::forward_bf16`], [`super::backward_bf16`]):
//! what `torch.autocast` gives attention under bf16, on AMX or AVX-512 BF16.
//!
//! Each unit's Q, K, V (and dO in backward) are rounded and packed once, in the layouts their
//! products read (K for `Q K^T`, V transposed for `P V`, ...); each tile's probabilities and
//! `dS` are packed as they are made. Key tiles start at multiples of 32, where packed operands
//! can be sliced: the keys this adds to a tile are hidden from all of its rows, so their
//! probabilities are exactly zero, as in [`super::Plain`]'s narrower tiles (for finite K and V:
//! a NaN there reaches the block's rows, as it would in the composed op).
use super::{Backward, Forward, Problem, Scores};
use crate::bf16gemm::tiles::{product, Packing, TileA, TileB, ALIGN};
use crate::bf16gemm::View;

/// A unit's `q` (`r x dh`) and `k` (`tk x dh`) packed for the scores, and the scale.
struct Qk {
    packing: Packing,
    q: TileA,
    k: TileB,
    scale: f32,
}

impl Qk {
    fn new(packing: Packing, p: &Problem<f32>, u: usize) -> Self {
        let (q, k) = (p.unit_rows(p.q, u), p.unit_keys(p.k, u));
        let mut qa = TileA::default();
        qa.pack(packing, View::rows(q, p.r, p.dh));
        Qk {
            packing,
            q: qa,
            k: TileB::of(packing, View::rows(k, p.tk, p.dh)),
            scale: p.scale,
        }
    }

    fn scores(&self, a: usize, n: usize, j0: usize, s: &mut [f32]) {
        product(&self.q, a, n, &self.k, (j0, s.len() / n), 0, s, false);
        s.iter_mut().for_each(|x| *x *= self.scale);
    }

    /// `out += x^T` packed as `A`, times `b`'s values `k0..k0 + n` along `k`: `x` is n x nk
    /// (`dV += P^T dO`, `dK += dS^T Q`).
    fn transposed_product(
        &self,
        s: &mut TileA,
        x: &[f32],
        n: usize,
        b: &TileB,
        k0: usize,
        out: &mut [f32],
    ) {
        let nk = x.len() / n;
        s.pack(self.packing, View::transposed(x, nk, n));
        product(s, 0, nk, b, (0, out.len() / nk), k0, out, true);
    }

    /// `out += x` packed as `A`, times `b`'s values `k0..k0 + nk` along `k`: `x` is n x nk
    /// (`O += P V`, `dQ += dS K`).
    fn straight_product(
        &self,
        s: &mut TileA,
        x: &[f32],
        n: usize,
        b: &TileB,
        k0: usize,
        out: &mut [f32],
    ) {
        let nk = x.len() / n;
        s.pack(self.packing, View::rows(x, n, nk));
        product(s, 0, n, b, (0, out.len() / n), k0, out, true);
    }
}

/// The forward's operands: also V transposed (`dh x tk`), for `P V`.
pub(super) struct Fwd {
    qk: Qk,
    vt: TileB,
}

impl Fwd {
    pub(super) fn new(packing: Packing, p: &Problem<f32>, u: usize) -> Self {
        Fwd {
            qk: Qk::new(packing, p, u),
            vt: TileB::of(packing, View::transposed(p.unit_keys(p.v, u), p.dh, p.tk)),
        }
    }
}

impl Scores<f32> for Fwd {
    type Scratch = TileA;
    const ALIGN: usize = ALIGN;

    fn scores(&self, a: usize, n: usize, j0: usize, s: &mut [f32]) {
        self.qk.scores(a, n, j0, s)
    }
}

impl Forward<f32> for Fwd {
    fn pv(&self, x: &mut TileA, p: &[f32], n: usize, j0: usize, o: &mut [f32]) {
        self.qk.straight_product(x, p, n, &self.vt, j0, o)
    }
}

/// The backward's operands: V (`tk x dh`) for `dO V^T`, K and Q transposed for `dS K` and
/// `dS^T Q`, dO as rows for `dO V^T` and transposed for `P^T dO`.
pub(super) struct Bwd {
    qk: Qk,
    v: TileB,
    kt: TileB,
    qt: TileB,
    dout: TileA,
    dout_t: TileB,
}

impl Bwd {
    pub(super) fn new(packing: Packing, p: &Problem<f32>, u: usize, dout: &[f32]) -> Self {
        let (q, k) = (p.unit_rows(p.q, u), p.unit_keys(p.k, u));
        let (r, tk, dh) = (p.r, p.tk, p.dh);
        let mut dout_a = TileA::default();
        dout_a.pack(packing, View::rows(dout, r, dh));
        Bwd {
            qk: Qk::new(packing, p, u),
            v: TileB::of(packing, View::rows(p.unit_keys(p.v, u), tk, dh)),
            kt: TileB::of(packing, View::transposed(k, dh, tk)),
            qt: TileB::of(packing, View::transposed(q, dh, r)),
            dout: dout_a,
            dout_t: TileB::of(packing, View::transposed(dout, dh, r)),
        }
    }
}

impl Scores<f32> for Bwd {
    type Scratch = TileA;
    const ALIGN: usize = ALIGN;

    fn scores(&self, a: usize, n: usize, j0: usize, s: &mut [f32]) {
        self.qk.scores(a, n, j0, s)
    }
}

impl Backward<f32> for Bwd {
    fn dv(&self, x: &mut TileA, p: &[f32], a: usize, n: usize, dv: &mut [f32]) {
        self.qk.transposed_product(x, p, n, &self.dout_t, a, dv)
    }

    fn dp(&self, a: usize, n: usize, j0: usize, dp: &mut [f32]) {
        product(&self.dout, a, n, &self.v, (j0, dp.len() / n), 0, dp, false)
    }

    fn dq(&self, x: &mut TileA, ds: &[f32], n: usize, j0: usize, dq: &mut [f32]) {
        self.qk.straight_product(x, ds, n, &self.kt, j0, dq)
    }

    fn dk(&self, x: &mut TileA, ds: &[f32], a: usize, n: usize, dk: &mut [f32]) {
        self.qk.transposed_product(x, ds, n, &self.qt, a, dk)
    }
}
