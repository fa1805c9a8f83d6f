//! The load-balancing loss of the MoE models against transformers' (`output_router_logits=True`,
//! `fixtures/golden/router-aux.json`): its value on a left-padded batch and its gradients on every
//! router and on a first-layer projection (reached through the hidden states the second layer
//! routes), with and without gradient checkpointing.
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
        for checkpointing in [false, true] {
            let opts = LoadOptions {
                trainable: true,
                ..Default::default()
            };
            let mut p = Pretrained::load(&common::tiny(name), &opts).unwrap();
            p.model.set_gradient_checkpointing(checkpointing);
            p.model.set_router_aux_loss(true);
            let what = format!("{name}, checkpointing {checkpointing}");
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

/// Passes outside autograd record nothing, nor do models without the switch.
#[test]
fn only_training_passes_of_a_switched_on_model_record_the_loss() {
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
    let frozen = p.model.detached().unwrap();
    frozen.forward(&ids, Some(&mask), None, None).unwrap();
    assert!(
        p.model.take_router_aux_losses().is_empty(),
        "outside autograd"
    );
    p.model.forward(&ids, Some(&mask), None, None).unwrap();
    p.model.forward(&ids, None, None, None).unwrap();
    let two = p.model.take_router_aux_losses();
    assert_eq!(two.len(), 2, "one per pass");
    assert_ne!(
        two[0].to_scalar::<f32>().unwrap(),
        two[1].to_scalar::<f32>().unwrap(),
        "the padding counts without a mask"
    );
}
