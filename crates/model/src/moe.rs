//! The load-balancing loss of mixture-of-experts models (Switch Transformer, eq. 4-6; transformers'
//! `load_balancing_loss_func`), which TRL adds to a MoE model's training loss with the config's
//! `router_aux_loss_coef`.
//!
//! A training forward pass of a model with [`Model::set_router_aux_loss`] on records each MoE
//! layer's routing ([`Route`]) and leaves the pass's loss for the trainer
//! ([`Model::take_router_aux_losses`]). Under gradient checkpointing the routing probabilities
//! enter the loss as leaves, and [`Model::backward`] carries their gradients into each layer's
//! recomputation.
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::model::Model;

/// One MoE layer's routing of a forward pass's rows (every token of the batch, padding included).
#[derive(Clone, Debug)]
pub struct Route {
    /// `[rows, experts]`: the router's softmax, in f32 (f64 in gradient checks).
    pub probs: Tensor,
    /// `[rows, experts]`: 1 where the row went to the expert (one of its top k), else 0, in the
    /// dtype of `probs`. No gradient flows through it.
    pub picks: Tensor,
}

/// `E * sum_e f_e P_e` over every layer's real rows, as transformers computes it: `f_e` the picks
/// of expert `e` per row (summing to `k` over the experts), `P_e` the mean probability the router
/// gives `e`, both averaged over `layers x real rows`. `rows` (`[rows, 1]`, 1 for a real token and 0
/// for padding) leaves padding out; `None` counts every row. The gradient flows through `P` only.
/// A pass without real rows has a loss of 0.
pub fn load_balancing_loss(routes: &[Route], rows: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(first) = routes.first() else {
        candle_core::bail!("load_balancing_loss: no MoE layer's routing")
    };
    let (n, experts) = first.probs.dims2()?;
    let dtype = first.probs.dtype();
    let w = match rows {
        Some(r) => r.to_dtype(dtype)?.reshape((n, 1))?,
        None => Tensor::ones((n, 1), dtype, first.probs.device())?,
    };
    let real = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let total = routes.len() as f64 * real;
    if total == 0.0 {
        return Tensor::zeros((), dtype, first.probs.device());
    }
    // Per expert, summed over layers and real rows: picks (no gradient) and probabilities.
    let mut picks = Tensor::zeros(experts, dtype, first.probs.device())?;
    let mut probs = picks.clone();
    for r in routes {
        picks = (picks + r.picks.detach().broadcast_mul(&w)?.sum(0)?)?;
        probs = (probs + r.probs.broadcast_mul(&w)?.sum(0)?)?;
    }
    (picks * probs)?.sum_all()? * (experts as f64 / (total * total))
}

/// Passes of at most this many rows (tokens: a decoding step's batch) route on the device when
/// tensors there take the composed ops ([`routes_on_device`]).
pub const DEVICE_ROUTING_MAX_ROWS: usize = 64;

thread_local! {
    static FIXED_STEP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the guard lives, this thread's MoE layers route every pass of at most
/// [`DEVICE_ROUTING_MAX_ROWS`] rows on the device, however few: a fixed-shape decoding step (a CUDA
/// graph) cannot read back, even once its rows are too few to pick most experts.
#[must_use = "applies only while the guard lives"]
pub(crate) struct FixedStepRouting(bool);

impl FixedStepRouting {
    pub(crate) fn new() -> Self {
        FixedStepRouting(FIXED_STEP.with(|c| c.replace(true)))
    }
}

impl Drop for FixedStepRouting {
    fn drop(&mut self) {
        FIXED_STEP.with(|c| c.set(self.0));
    }
}

/// Whether a MoE layer of `experts` experts picking `top_k` routes a pass of `rows` tokens on `d`
/// without reading the router back: off the CPU's kernels (on a GPU, or its code path on the CPU),
/// at most [`DEVICE_ROUTING_MAX_ROWS`] rows, and enough picks to reach most experts
/// (`rows * top_k >= experts`; any number of rows inside a [`FixedStepRouting`] guard). Such a
/// pass runs every expert on every row, weighted by zero where the row did not pick it: with few
/// rows a step is bound by reading the experts' weights, and that many picks read most of them
/// anyway (about 63% when `rows * top_k == experts`). Otherwise the layer routes on the host, one
/// read back per layer, and each expert sees only its rows.
pub fn routes_on_device(d: &Device, rows: usize, experts: usize, top_k: usize) -> bool {
    if rows > DEVICE_ROUTING_MAX_ROWS || crate::kernels::cpu_kernels(d) {
        return false;
    }
    FIXED_STEP.with(|c| c.get()) || rows * top_k >= experts
}

/// `[experts, experts]` in f32 on `d`, 1 where column `j` comes before row `e` (`j < e`): the tie
/// order of [`top_k_mask`], made once per layer so routing uploads nothing.
pub(crate) fn tie_order(experts: usize, d: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..experts * experts)
        .map(|i| f32::from(u8::from(i % experts < i / experts)))
        .collect();
    Tensor::from_vec(v, (experts, experts), d)
}

/// Each row's `k` most probable experts as a 0/1 `[rows, experts]` mask in `probs`' dtype,
/// computed where `probs` is: expert `e` is picked when fewer than `k` experts rank above it, an
/// expert ranking above `e` when its probability is higher, or equal with a lower index (the host
/// routing's order, so both pick the same experts). `tie_order` is [`tie_order`]'s matrix. No
/// gradient flows through the mask. Compared in f32, as the host sorts (f64 in gradient checks).
pub(crate) fn top_k_mask(
    probs: &Tensor,
    k: usize,
    tie_order: &Tensor,
) -> candle_core::Result<Tensor> {
    let dtype = probs.dtype();
    let p = probs.detach().to_dtype(DType::F32)?;
    let mine = p.unsqueeze(2)?; // [rows, e, 1]
    let other = p.unsqueeze(1)?; // [rows, 1, j]
    let above = other.broadcast_gt(&mine)?.to_dtype(DType::F32)?;
    let tied = other
        .broadcast_eq(&mine)?
        .to_dtype(DType::F32)?
        .broadcast_mul(tie_order)?;
    let rank = (above + tied)?.sum(2)?;
    // rank < k as min(relu(k - rank), 1), which is 1 there (ranks are whole numbers) and 0 from k
    // on: unary ops only, where a comparison with k would upload k at every call.
    let over = rank.affine(-1.0, k as f64)?.relu()?;
    over.affine(-1.0, 1.0)?
        .relu()?
        .affine(-1.0, 1.0)?
        .to_dtype(dtype)
}

/// The losses of the recorded passes since the last take, shared by a model's clones.
#[derive(Clone, Debug, Default)]
pub(crate) struct AuxLosses(Arc<Mutex<Vec<Tensor>>>);

impl AuxLosses {
    pub(crate) fn push(&self, loss: Tensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(loss);
    }

    fn take(&self) -> Vec<Tensor> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Model {
    /// Records the load-balancing loss of every forward pass without a KV cache of a
    /// mixture-of-experts model, for [`Model::take_router_aux_losses`]; in a training pass it
    /// back-propagates. No effect on dense models; [`Model::detached`] copies (references,
    /// sampling) start with it off.
    pub fn set_router_aux_loss(&mut self, on: bool) {
        self.router_aux = on;
    }

    /// The load-balancing losses of the recorded forward passes since the last call, oldest
    /// first, each a scalar that back-propagates into the routers in a training pass (under
    /// gradient checkpointing, through [`Model::backward`]).
    pub fn take_router_aux_losses(&self) -> Vec<Tensor> {
        self.aux_losses.take()
    }

    /// Whether a forward pass records its routing: one without a KV cache of a MoE model with
    /// [`Model::set_router_aux_loss`] on.
    pub(crate) fn records_routes(&self, cached: bool) -> bool {
        !cached && self.router_aux && self.cfg.moe.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Two layers, three rows (the last padding), four experts, top 2: the loss written out by
    /// hand, and its gradient `E f_e / total^2` on every real row's probability.
    #[test]
    fn the_loss_and_its_gradient_match_the_formula_written_out() {
        let dev = Device::Cpu;
        let probs = [
            [
                [0.4f64, 0.3, 0.2, 0.1],
                [0.1, 0.2, 0.3, 0.4],
                [0.7, 0.1, 0.1, 0.1],
            ],
            [
                [0.25, 0.25, 0.4, 0.1],
                [0.5, 0.1, 0.3, 0.1],
                [0.1, 0.1, 0.1, 0.7],
            ],
        ];
        let picks = [
            [[1f64, 1., 0., 0.], [0., 0., 1., 1.], [1., 1., 0., 0.]],
            [[1., 0., 1., 0.], [1., 0., 1., 0.], [0., 0., 1., 1.]],
        ];
        let vars: Vec<Var> = probs
            .iter()
            .map(|p| Var::from_tensor(&Tensor::new(p, &dev).unwrap()).unwrap())
            .collect();
        let routes: Vec<Route> = vars
            .iter()
            .zip(&picks)
            .map(|(v, c)| Route {
                probs: v.as_tensor().clone(),
                picks: Tensor::new(c, &dev).unwrap(),
            })
            .collect();
        let rows = Tensor::new(&[[1f64], [1.], [0.]], &dev).unwrap();
        let loss = load_balancing_loss(&routes, Some(&rows)).unwrap();
        // Over 2 layers x 2 real rows: picks per expert 3, 1, 3, 1 and probabilities summed
        // 1.25, 0.85, 1.2, 0.7.
        let total = 4.0;
        let (f, p) = ([3.0, 1.0, 3.0, 1.0], [1.25, 0.85, 1.2, 0.7]);
        let want = 4.0 * (0..4).map(|e| f[e] * p[e]).sum::<f64>() / (total * total);
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} against {want}");
        let grads = loss.backward().unwrap();
        for v in &vars {
            let g = grads.get(v.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
            for (r, row) in g.iter().enumerate() {
                for (e, &x) in row.iter().enumerate() {
                    let want = if r == 2 { 0.0 } else { 4.0 * f[e] / 16.0 };
                    assert!(
                        (x - want).abs() < 1e-12,
                        "row {r} expert {e}: {x} against {want}"
                    );
                }
            }
        }
        // Without a mask the padding row counts.
        let all = load_balancing_loss(&routes, None).unwrap();
        assert!((all.to_scalar::<f64>().unwrap() - want).abs() > 1e-3);
        let none = Tensor::zeros((3, 1), DType::F64, &dev).unwrap();
        let zero = load_balancing_loss(&routes, Some(&none)).unwrap();
        assert_eq!(zero.to_scalar::<f64>().unwrap(), 0.0);
    }

    /// The device's picks are the host's: on random probabilities, on ties (a router whose
    /// weights are all zero gives every expert the same probability), and for every k.
    #[test]
    fn device_picks_are_the_hosts_ties_included() {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let experts = 6;
        let mut rows: Vec<Vec<f32>> = (0..40)
            .map(|_| (0..experts).map(|_| rng.gen::<f32>()).collect())
            .collect();
        rows.push(vec![1.0 / 6.0; experts]);
        rows.push(vec![0.3, 0.1, 0.3, 0.1, 0.1, 0.1]);
        rows.push(vec![0.1, 0.2, 0.2, 0.2, 0.2, 0.1]);
        // Rounding alike on both sides: whole multiples of 1/8 tie often.
        rows.extend((0..20).map(|_| {
            (0..experts)
                .map(|_| f32::from(rng.gen_range(0u8..4)) / 8.0)
                .collect()
        }));
        let order = tie_order(experts, &dev).unwrap();
        let probs = Tensor::new(rows.clone(), &dev).unwrap();
        for k in 1..=experts {
            let (want, _) = crate::model::top_k_routes(&rows, k);
            let got = top_k_mask(&probs, k, &order).unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "k = {k}");
            // f64 probabilities (gradient checks) pick the same.
            let p64 = probs.to_dtype(DType::F64).unwrap();
            let got64 = top_k_mask(&p64, k, &order).unwrap();
            assert_eq!(got64.dtype(), DType::F64);
            let got64: Vec<f64> = got64.flatten_all().unwrap().to_vec1().unwrap();
            assert!(got64.iter().zip(&want).all(|(a, b)| *a == f64::from(*b)));
        }
    }
}
