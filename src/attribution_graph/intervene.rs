//! Feature interventions on a graph's prompt: set chosen features to new activations and see
//! what the model then predicts — the check that a circuit read off the graph is causal
//! (circuit-tracer's `feature_intervention`, with nothing frozen).
//!
//! A transcoder's output is linear in its features, so setting feature `f` at position `p` from
//! `a` to `v` changes its layer's MLP output there by `(v − a)·W_dec[f]` (a cross-layer
//! feature's, every MLP output it writes by its decoder row to that layer); that is added at
//! `blocks.L.hook_mlp_out` and the real model runs on from it: attention, norms and every later
//! MLP respond (the graph itself holds them fixed, so a graph edge predicts only the direct,
//! first-order part of the change).

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use super::{AttributionGraph, LayerTranscoder};
use crate::error::{Error, Result};
use crate::model::generate::{TokenProb, softmax, top_tokens};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

/// One feature of the graph set to a new activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeatureChange {
    /// An index into [`AttributionGraph::features`].
    pub feature: usize,
    pub value: f32,
}

/// The next-token distribution before and after an intervention.
#[derive(Clone, Debug, Serialize)]
pub struct Intervened {
    /// Each of the graph's logit targets' probability, before and after.
    pub before: Vec<f32>,
    pub after: Vec<f32>,
    /// The most likely next tokens after.
    pub top_after: Vec<TokenProb>,
}

/// Runs the graph's prompt with `changes` made (see the module) and reads the last position's
/// next-token distribution: the graph's logit targets before and after, and the `top_k`
/// tokens after.
pub fn intervene(
    model: &Model,
    transcoders: &[LayerTranscoder],
    graph: &AttributionGraph,
    changes: &[FeatureChange],
    top_k: usize,
) -> Result<Intervened> {
    let hooks = intervention_hooks(model, transcoders, graph, changes)?;
    let n = graph.n_positions();
    let last_logits = |hooks: &Hooks| -> Result<Vec<f32>> {
        let out = model.forward(&model.ids_tensor(&graph.input_ids)?, hooks)?;
        Ok(out.logits.i((0, n - 1))?.to_dtype(DType::F32)?.to_vec1()?)
    };
    let probabilities = |logits: &[f32]| -> Vec<f32> {
        let all = softmax(logits, 1.0);
        graph
            .logits
            .iter()
            .map(|l| all[l.token_id as usize])
            .collect()
    };
    let before = last_logits(&Hooks::new())?;
    let after = last_logits(&hooks)?;
    Ok(Intervened {
        before: probabilities(&before),
        after: probabilities(&after),
        top_after: top_tokens(model, &after, top_k),
    })
}

/// The hooks that make `changes` on the graph's prompt: one addition at each touched layer's
/// `hook_mlp_out`, `(v − a)·W_dec[f]` at each changed feature's position (for each layer a
/// cross-layer feature writes).
pub fn intervention_hooks(
    model: &Model,
    transcoders: &[LayerTranscoder],
    graph: &AttributionGraph,
    changes: &[FeatureChange],
) -> Result<Hooks> {
    let d_model = model.dims().d_model;
    let n = graph.n_positions();
    // One added tensor per layer touched, [positions, d_model].
    let mut deltas: std::collections::BTreeMap<usize, Vec<f32>> = Default::default();
    for (k, change) in changes.iter().enumerate() {
        if changes[..k].iter().any(|c| c.feature == change.feature) {
            return Err(Error::InvalidArgument {
                what: "feature intervention",
                value: change.feature.to_string(),
                message: "the feature is changed twice".into(),
            });
        }
        let f = graph
            .features
            .get(change.feature)
            .ok_or_else(|| Error::InvalidArgument {
                what: "feature intervention",
                value: change.feature.to_string(),
                message: format!("the graph has {} feature nodes", graph.features.len()),
            })?;
        let transcoder = transcoders
            .iter()
            .find(|t| t.site.output == HookPoint::MlpOut(f.layer))
            .ok_or_else(|| Error::InvalidArgument {
                what: "feature intervention",
                value: format!("layer {}", f.layer),
                message: "no transcoder writes this layer's MLP output".into(),
            })?;
        let scale = change.value - f.activation;
        for (layer, rows) in transcoder.decoder_rows(&[f.feature])? {
            let row: Vec<f32> = rows.get(0)?.to_dtype(DType::F32)?.to_vec1()?;
            let delta = deltas
                .entry(layer)
                .or_insert_with(|| vec![0.0; n * d_model]);
            for (d, w) in delta[f.position * d_model..][..d_model].iter_mut().zip(row) {
                *d += scale * w;
            }
        }
    }
    let mut hooks = Hooks::new();
    for (layer, delta) in deltas {
        let delta =
            Tensor::from_vec(delta, (1, n, d_model), &model.device)?.to_dtype(model.dtype)?;
        hooks = hooks.intervene(
            HookPoint::MlpOut(layer),
            Intervention::new(InterventionOp::Add(delta)),
        );
    }
    Ok(hooks)
}
