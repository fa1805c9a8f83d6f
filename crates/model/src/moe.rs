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

use candle_core::{DType, Tensor};

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
}
