//! The load-balancing loss of the MoE models against transformers' (`output_router_logits=True`,
//! `fixtures/golden/router-aux.json`): its value on a left-padded batch and its gradients on every
//! router and on a first-layer projection (reached through the hidden states the second layer
//! routes), with and without gradient checkpointing, routed on the host (the CPU's kernels) and
//! where the probabilities are (the GPU's code path, whose few-row passes read nothing back).
mod common;

use candle_core::{Device, Tensor};
use preftune_model::{LoadOptions, Pretrained};

fn matrix(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v.as_array().unwrap().iter().map(common::ids_of).collect();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

#[test]
fn the_load_balancing_loss_and_its_gradients_match_transformers() {
    let g = common::golden("router-aux.json");
    let (ids, mask) = (matrix(&g["input_ids"]), matrix(&g["attention_mask"]));
    for (name, want) in g["models"].as_object().unwrap() {
        for (checkpointing, portable) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let _portable = preftune_model::kernels::PortableScope::new(portable);
            let opts = LoadOptions {
                trainable: true,
                ..Default::default()
            };
            let mut p = Pretrained::load(&common::tiny(name), &opts).unwrap();
            let (rows, moe) = (ids.elem_count(), p.model.cfg.moe.clone().unwrap());
            assert_eq!(
                preftune_model::moe::routes_on_device(
                    &Device::Cpu,
                    rows,
                    moe.num_experts,
                    moe.top_k
                ),
                portable,
                "{name}: {rows} rows"
            );
            p.model.set_gradient_checkpointing(checkpointing);
            p.model.set_router_aux_loss(true);
            let what = format!("{name}, checkpointing {checkpointing}, portable {portable}");
            p.model.forward(&ids, Some(&mask), None, None).unwrap();
            let losses = p.model.take_router_aux_losses();
            assert_eq!(losses.len(), 1, "{what}: one loss per training pass");
            let got = losses[0].to_scalar::<f32>().unwrap();
            let aux = want["aux_loss"].as_f64().unwrap() as f32;
            assert!((got - aux).abs() < 1e-5, "{what}: {got} against {aux}");
            let grads = p.model.backward(&losses[0]).unwrap();
            let params = p.model.trainable_params();
            for (param, want) in want["grads"].as_object().unwrap() {
                let want = common::floats(want);
                // Mixtral's router under its checkpoints' name (transformers 5 renames it).
                let legacy = param.replace("mlp.gate.", "block_sparse_moe.gate.");
                let (_, v) = params
                    .iter()
                    .find(|(n, _)| n == param || *n == legacy)
                    .unwrap_or_else(|| {
                        let names: Vec<&String> = params.iter().map(|(n, _)| n).collect();
                        panic!("{what}: no parameter {param} among {names:?}")
                    });
                let got: Vec<f32> = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: {param} has no gradient"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = common::max_abs_diff(&got[..want.len()], &want);
                assert!(
                    scale > 0.0 && diff < 1e-4 * scale.max(1e-3),
                    "{what}: {param} differs by {diff} (largest {scale})"
                );
            }
        }
    }
}

/// A switched-on model records every pass without a KV cache, outside autograd too (an
/// evaluation's); a switched-off one, a detached copy (a reference) and a cached pass (sampling)
/// record nothing.
#[test]
fn which_passes_record_the_loss() {
    let g = common::golden("router-aux.json");
    let (ids, mask) = (matrix(&g["input_ids"]), matrix(&g["attention_mask"]));
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let mut p = Pretrained::load(&common::tiny("tiny-mixtral"), &opts).unwrap();
    p.model.forward(&ids, Some(&mask), None, None).unwrap();
    assert!(p.model.take_router_aux_losses().is_empty(), "switched off");
    p.model.set_router_aux_loss(true);
    let reference = p.model.detached().unwrap();
    reference.forward(&ids, Some(&mask), None, None).unwrap();
    assert!(
        reference.take_router_aux_losses().is_empty(),
        "a detached copy"
    );
    assert!(
        p.model.take_router_aux_losses().is_empty(),
        "nor into the policy's"
    );
    let mut cache = preftune_model::KvCache::new(p.model.cfg.num_layers);
    p.model
        .forward(&ids, Some(&mask), None, Some(&mut cache))
        .unwrap();
    assert!(p.model.take_router_aux_losses().is_empty(), "a cached pass");

    let mut frozen = p.model.detached().unwrap();
    frozen.set_router_aux_loss(true);
    frozen.forward(&ids, Some(&mask), None, None).unwrap();
    let eval = frozen.take_router_aux_losses();
    assert_eq!(eval.len(), 1, "an evaluation's pass");
    p.model.forward(&ids, Some(&mask), None, None).unwrap();
    p.model.forward(&ids, None, None, None).unwrap();
    let two = p.model.take_router_aux_losses();
    assert_eq!(two.len(), 2, "one per pass");
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    let (a, b) = (value(&eval[0]), value(&two[0]));
    assert!(
        (a - b).abs() < 1e-5,
        "the same loss outside autograd: {a} against {b}"
    );
    assert_ne!(
        value(&two[0]),
        value(&two[1]),
        "the padding counts without a mask"
    );
}
