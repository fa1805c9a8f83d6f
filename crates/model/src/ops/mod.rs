//! Differentiable building blocks, composed only from candle ops that have a backward pass.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm`, `rope` and `sdpa` have no backward
//! and silently drop gradients, so nothing here may call them. Norms and softmax run in f32 whatever
//! the weights' dtype, as transformers does.
//!
//! - `linear`: `x W^T + b` with LoRA, and the products it picks between;
//! - `precision`: bf16 mixed precision, training products, packed weights, the bf16 matmul op;
//! - `norm`: softmax, log-sum-exp, RMSNorm, LayerNorm;
//! - `quant`: linears over quantised weights (LoRA on a quantised base);
//! - `rope`, `activation`: rotary embeddings and SwiGLU.
//!
//! Attention's op (scores with their backward, decoding attention) is in `kernels.rs`.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

use crate::kernels;

/// Rows up to which an untracked quantised product runs candle's quantised kernels
/// ([`quant_matmul`]); more rows dequantise the weight and multiply densely.
pub(super) const SMALL_M: usize = 32;

/// Row counts up to which [`Linear::forward`] multiplies the other way round (measured on SmolLM2's
/// shapes: 2x faster at 16 rows, even at 48; at 64, a rollout's decoding 1.2x faster on AVX-512;
/// slower from ~96, and 1.1x slower at 128).
pub(super) const TRANSPOSED_MAX_ROWS: usize = 64;

/// Untracked products (sampling) take the bf16 path from this many rows: each call packs the
/// weight, which a decoding step's few rows do not repay.
pub(super) const BF16_MIN_ROWS: usize = 64;

mod activation;
mod linear;
mod norm;
mod precision;
mod quant;
mod rope;

pub use activation::*;
pub use linear::*;
pub use norm::*;
pub use precision::*;
pub use quant::*;
pub use rope::*;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The patched candle backward (vendor/candle-core/PREFTUNE.md) stores a tensor's first
    /// gradient as it is: a tensor reached through a sum, a difference, a transpose and a product
    /// must still get the sum of all four contributions, and the shared upstream gradient must not
    /// be changed by that sum. `L = sum(w * (a + b - a^T + a * b))`.
    #[test]
    fn backward_sums_shared_and_viewed_gradients() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap();
        let (at, bt) = (a.as_tensor(), b.as_tensor());
        let y = ((at + bt).unwrap() - at.t().unwrap()).unwrap();
        let y = (y + at.mul(bt).unwrap()).unwrap();
        let g = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let v2 = |t: &Tensor| -> Vec<Vec<f64>> { t.to_vec2().unwrap() };
        let (av, bv, wv) = (v2(at), v2(bt), v2(&w));
        let (ga, gb) = (v2(g.get(at).unwrap()), v2(g.get(bt).unwrap()));
        for i in 0..3 {
            for j in 0..3 {
                let want_a = wv[i][j] - wv[j][i] + wv[i][j] * bv[i][j];
                let want_b = wv[i][j] + wv[i][j] * av[i][j];
                assert!((ga[i][j] - want_a).abs() < 1e-12, "dL/da[{i}][{j}]");
                assert!((gb[i][j] - want_b).abs() < 1e-12, "dL/db[{i}][{j}]");
            }
        }
    }

    /// The patched candle backward computes no gradient for tensors off every path to a
    /// variable (masks, constants, a constant branch of `where_cond`, the frozen side of a
    /// product), and the variables' gradients are what they were.
    /// `L = sum(where(c, a * m + a m2, k) / d)` with only `a` a variable.
    #[test]
    fn backward_keeps_no_gradient_for_constants() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap()).unwrap();
        let at = a.as_tensor();
        let rand = || Tensor::randn(0f64, 1.0, (3, 3), &dev).unwrap();
        let (m, m2, k, d) = (
            rand(),
            rand(),
            rand(),
            (rand().abs().unwrap() + 1.0).unwrap(),
        );
        let c = Tensor::new(&[[1u8, 0, 1], [1, 1, 0], [0, 1, 1]], &dev).unwrap();
        let x = (at.mul(&m).unwrap() + at.matmul(&m2).unwrap()).unwrap();
        let y = c.where_cond(&x, &k).unwrap().div(&d).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        for (name, t) in [("m", &m), ("m2", &m2), ("k", &k), ("d", &d)] {
            assert!(
                g.get(t).is_none(),
                "a gradient was kept for the constant {name}"
            );
        }
        // dL/da = (c / d) * m + ((c / d) m2^T)
        let w = c.to_dtype(DType::F64).unwrap().div(&d).unwrap();
        let want = (w.mul(&m).unwrap() + w.matmul(&m2.t().unwrap()).unwrap()).unwrap();
        let diff = (g.get(at).unwrap() - want).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
    }

    /// Each op's gradient against central finite differences of the summed, randomly weighted output.
    fn check_grad(f: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, f(x.as_tensor()).unwrap().shape(), &dev).unwrap();
        let loss = |t: &Tensor| f(t).unwrap().mul(&w).unwrap().sum_all().unwrap();
        let grads = loss(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches input")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let lp = loss(&Tensor::from_vec(plus, shape, &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let lm = loss(&Tensor::from_vec(minus, shape, &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                "element {i}: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn ops_match_finite_differences() {
        let dev = Device::Cpu;
        let w = Tensor::randn(1f64, 0.1, 6, &dev).unwrap();
        let b = Tensor::randn(0f64, 0.1, 6, &dev).unwrap();
        check_grad(softmax_last, &[3, 6]);
        check_grad(logsumexp_last, &[3, 6]);
        check_grad(|x| rms_norm(x, &w, 1e-5), &[4, 6]);
        check_grad(|x| layer_norm(x, &w, &b, 1e-5), &[4, 6]);
        let cos = Tensor::randn(0f64, 1.0, (1, 1, 3, 2), &dev).unwrap();
        let sin = Tensor::randn(0f64, 1.0, (1, 1, 3, 2), &dev).unwrap();
        check_grad(|x| rope(x, &cos, &sin), &[1, 2, 3, 4]);
        let lin = Linear::new(
            "lin",
            Tensor::randn(0f64, 1.0, (5, 6), &dev).unwrap(),
            Some(b.narrow(0, 0, 5).unwrap()),
        );
        check_grad(|x| lin.forward(x), &[2, 3, 6]);
    }

    #[test]
    fn unread_forward_gives_forwards_gradients_and_records_no_graph_in_them() {
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 1.0, (70, 5), &dev).unwrap();
        let xv = Tensor::randn(0f32, 1.0, (70, 6), &dev).unwrap();
        let wv = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        for (bf16, trainable) in [(false, true), (false, false), (true, true), (true, false)] {
            let _scope = Bf16Scope::new(bf16);
            let x = Var::from_tensor(&xv).unwrap();
            let w = match trainable {
                true => Var::from_tensor(&wv).unwrap().as_tensor().clone(),
                false => wv.clone(),
            };
            let l = Linear::new("l", w.clone(), None);
            let grads = |y: Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let plain = grads(l.forward(x.as_tensor()).unwrap());
            let y = l.forward_unread(x.as_tensor()).unwrap();
            assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let unread = grads(y);
            let case = format!("bf16 {bf16}, trainable {trainable}");
            let mut pairs = vec![(x.as_tensor(), "x")];
            if trainable {
                pairs.push((&w, "W"));
            } else {
                assert!(
                    unread.get(&w).is_none(),
                    "{case}: a frozen W gets no gradient"
                );
            }
            for (t, name) in pairs {
                let (a, b) = (plain.get(t).unwrap(), unread.get(t).unwrap());
                assert!(max_abs(a, b) < 1e-5, "{case}: {name}'s gradient differs");
                // A recorded graph would keep the layer's activations alive with the gradient.
                assert!(!b.track_op(), "{case}: {name}'s gradient records a graph");
            }
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_the_input_the_same_one() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = Linear::new("l", w.clone(), None)
            .forward(x.as_tensor())
            .unwrap();
        assert!(max_abs(&plain, &frozen) < 1e-6, "same forward");
        let gp = (plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gf = (frozen * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Only `x` keeps a gradient: upstream candle's backward also computed and kept one for
        // `W^T` (plain matmul) and for the constant `g`; the frozen op never computes the weight's,
        // and the patched backward skips tensors that need none.
        assert_eq!(
            gp.get_ids().copied().collect::<Vec<_>>(),
            [x.as_tensor().id()]
        );
        assert_eq!(
            gf.get_ids().copied().collect::<Vec<_>>(),
            [x.as_tensor().id()]
        );
        assert!(gf.get(&w).is_none());
        let (dp, df) = (
            gp.get(x.as_tensor()).unwrap(),
            gf.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs(dp, df) < 1e-5, "same input gradient");
    }

    /// A trained f32 weight's gradient comes back in the weight's own layout (candle's matmul
    /// gives the transpose of `x^T dy`, a strided view every reader had to copy), with the same
    /// values as candle's product; the input's gradient and the output are candle's too.
    #[test]
    fn an_f32_weights_gradient_is_contiguous_and_equals_candles() {
        let dev = Device::Cpu;
        // More rows than the few-row product takes (`TRANSPOSED_MAX_ROWS`).
        let rows = TRANSPOSED_MAX_ROWS + 6;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (13, 24), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (rows, 13), &dev).unwrap();
        let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let ours = Linear::new("l", w.as_tensor().clone(), None)
            .forward(x.as_tensor())
            .unwrap();
        assert!(max_abs(&plain, &ours) < 1e-5, "same forward");
        let backward = |y: Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (gp, go) = (backward(plain), backward(ours));
        let (wp, wo) = (
            gp.get(w.as_tensor()).unwrap(),
            go.get(w.as_tensor()).unwrap(),
        );
        assert!(
            !wp.is_contiguous(),
            "candle's own product gives a transposed view"
        );
        assert!(
            wo.is_contiguous(),
            "the weight's gradient in its own layout"
        );
        assert_eq!(wo.dims(), [13, 24]);
        assert!(max_abs(wp, wo) < 1e-4, "same weight gradient");
        let (xp, xo) = (
            gp.get(x.as_tensor()).unwrap(),
            go.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs(xp, xo) < 1e-4, "same input gradient");
    }

    /// Under a [`Bf16Scope`] a linear's output and both gradients are the f64 products of the
    /// bf16-rounded operands (dy rounded too, as backward's products round their inputs), and
    /// without the scope the same linear is plain f32 again.
    #[test]
    fn bf16_linear_rounds_operands_in_forward_and_backward() {
        let dev = Device::Cpu;
        let (m, n, k) = (40, 24, 70);
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
        let lin = Linear::new("l", w.as_tensor().clone(), None);
        let y = {
            let _bf16 = Bf16Scope::new(true);
            lin.forward(x.as_tensor()).unwrap()
        };
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let r = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let (xr, wr, gr) = (r(x.as_tensor()), r(w.as_tensor()), r(&g));
        let close = |got: &Tensor, want: Tensor, what: &str| {
            let d = (got.to_dtype(DType::F64).unwrap() - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .max_keepdim(1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0];
            assert!(d < 1e-4, "{what}: off by {d}");
        };
        close(&y, xr.matmul(&wr.t().unwrap()).unwrap(), "forward");
        close(
            grads.get(x.as_tensor()).expect("x gets a gradient"),
            gr.matmul(&wr).unwrap(),
            "dx",
        );
        close(
            grads.get(w.as_tensor()).expect("W gets a gradient"),
            gr.t().unwrap().matmul(&xr).unwrap(),
            "dW",
        );
        // Not plain f32: the rounding shows at this size.
        let plain = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert!(max_abs(&plain, &y) > 1e-3, "bf16 products differ from f32");
        assert!(!bf16_enabled(), "the scope restored the previous setting");
        assert!(max_abs(&plain, &lin.forward(x.as_tensor()).unwrap()) < 1e-4);
    }

    /// Under a [`PackedWeights`] guard (bf16, with a bf16 GEMM) untracked products at any row
    /// count are the bf16 products, from one pack per weight; without either, the guard changes
    /// nothing.
    #[test]
    fn packed_weights_give_bf16_products_from_one_pack() {
        let dev = Device::Cpu;
        let (n, k) = (48, 70);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let lin = Linear::new("l", w.clone(), None);
        let r = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let packs = || PACKED.with(|c| c.borrow().as_ref().map(|m| m.len()));
        {
            let _plain = PackedWeights::new();
            assert_eq!(packs(), None, "no bf16 scope, no packing");
        }
        let _bf16 = Bf16Scope::new(true);
        let guard = PackedWeights::new();
        for m in [1, 16, 40] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let got = lin.forward(&x).unwrap();
            let plain = x.matmul(&w.t().unwrap()).unwrap();
            if preftune_kernels::bf16gemm::available() {
                let want = r(&x).matmul(&r(&w).t().unwrap()).unwrap();
                assert!(max_abs(&got, &want) < 1e-4, "{m} rows: bf16 product");
                assert!(
                    max_abs(&got, &plain) > 1e-3,
                    "{m} rows: not the f32 product"
                );
                assert_eq!(packs(), Some(1), "one pack for the weight");
            } else {
                assert_eq!(packs(), Some(0), "no bf16 GEMM, nothing packed");
                assert!(max_abs(&got, &plain) < 1e-4, "{m} rows: f32");
            }
        }
        // A guard made under a live one shares its packs, and leaves them when it drops.
        if preftune_kernels::bf16gemm::available() {
            let inner = PackedWeights::new();
            lin.forward(&Tensor::randn(0f32, 1.0, (2, k), &dev).unwrap())
                .unwrap();
            assert_eq!(packs(), Some(1), "the outer guard's pack, reused");
            drop(inner);
            assert_eq!(packs(), Some(1), "still the outer guard's");
        }
        drop(guard);
        assert_eq!(packs(), None, "the packs go with the guard");
    }

    /// On a device without our CPU kernels (a GPU; here the CPU through [`PortableScope`]) the
    /// guard keeps one bf16 copy per weight, and the products equal the composed bf16 product
    /// that casts the weight at every call, to the bit.
    #[test]
    fn packed_weights_on_a_gpu_keep_one_bf16_copy_per_weight() {
        let dev = Device::Cpu;
        let _portable = crate::kernels::PortableScope::new(true);
        let _bf16 = Bf16Scope::new(true);
        let (n, k) = (48, 70);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let lin = Linear::new("l", w.clone(), None);
        let xs: Vec<Tensor> = [1, 3, 40]
            .iter()
            .map(|&m| Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap())
            .collect();
        let unpacked: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                lin.forward(x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let guard = PackedWeights::new();
        for (x, want) in xs.iter().zip(&unpacked) {
            let got: Vec<f32> = lin
                .forward(x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(&got, want, "the composed bf16 product, to the bit");
            let copies: Vec<DType> = PACKED.with(|c| {
                c.borrow()
                    .as_ref()
                    .unwrap()
                    .values()
                    .map(|p| match p {
                        Packed::Device(t) => t.dtype(),
                        Packed::Cpu(_) => panic!("a CPU pack on a device without CPU kernels"),
                    })
                    .collect()
            });
            assert_eq!(copies, [DType::BF16], "one bf16 copy of the weight");
        }
        let plain = xs[2].matmul(&w.t().unwrap()).unwrap();
        assert!(
            max_abs(&plain, &lin.forward(&xs[2]).unwrap()) > 1e-3,
            "bf16 products, not f32"
        );
        drop(guard);
        assert!(!packing(), "the copies go with the guard");
    }

    pub(super) fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn f32_ops_agree_with_reference_formulas() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 9.0]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 2.0, -1.0], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, 0.2, 0.3, 0.4], &dev).unwrap();
        let rows = x.to_vec2::<f32>().unwrap();
        let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let sm = softmax_last(&x).unwrap().to_vec2::<f32>().unwrap();
        let lse = logsumexp_last(&x).unwrap().to_vec2::<f32>().unwrap();
        let rms = rms_norm(&x, &w, 1e-5).unwrap().to_vec2::<f32>().unwrap();
        let ln = layer_norm(&x, &w, &b, 1e-5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in rows.iter().enumerate() {
            let z: f32 = row.iter().map(|v| v.exp()).sum();
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
            let mean = row.iter().sum::<f32>() / 4.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            assert!((lse[r][0] - z.ln()).abs() < 1e-5);
            for c in 0..4 {
                assert!((sm[r][c] - row[c].exp() / z).abs() < 1e-6);
                assert!((rms[r][c] - row[c] / (ms + 1e-5).sqrt() * wv[c]).abs() < 1e-5);
                assert!(
                    (ln[r][c] - ((row[c] - mean) / (var + 1e-5).sqrt() * wv[c] + bv[c])).abs()
                        < 1e-5
                );
            }
        }
    }
}
