//! Knowledge neurons (Dai et al. 2022, "Knowledge Neurons in Pretrained Transformers"): the
//! FFN neurons whose activations carry a fact, found by integrated gradients and refined
//! across paraphrases, then checked by suppressing and amplifying them.
//!
//! - **Attribution.** For each layer `L`, the neuron activations `a` at `mlp.hook_post` of the
//!   prompt's last token are scaled from the zero baseline to their value, `α·a`, and the
//!   gradient of P(target) with respect to them is averaged over the scales:
//!   `attr_i = a_i · (1/m) Σ_k ∂P/∂h_i |_{h = α_k·a}`, with midpoint scales
//!   `α_k = (k + ½)/m`, all `m` of them in one batched forward and backward pass per layer.
//!   The attributions of a layer sum to about `P(a) − P(0)` (the completeness of integrated
//!   gradients), which the tests check.
//! - **Refinement.** Per prompt, neurons above `coarse × max attribution` (0.2); across the
//!   prompts, those shared by a fraction `p` of them, `p` lowered from 1 until at least
//!   `min_neurons` remain, and at most `max_neurons` kept (the highest mean attribution).
//! - **Checks.** The neurons at the last token are multiplied by 0 (suppress) and by 2
//!   (amplify); the relative change in P(target) on the fact's prompts is compared with the
//!   change on unrelated facts' prompts.
//!
//! `mlp.hook_post` is the activation after the nonlinearity (act(gate)·up for gated MLPs), so
//! this works the same on every supported architecture.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::causal::target_probs;
use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

/// Context prefixes that turn one template into several prompts of the same fact.
pub const PARAPHRASE_PREFIXES: [&str; 3] = ["Here is a fact. ", "As is well known, ", "Q: "];

/// How neurons are found.
#[derive(Clone, Debug, Serialize)]
pub struct NeuronSettings {
    /// Integration steps (Dai et al.: 20).
    pub steps: usize,
    /// Per-prompt threshold as a fraction of the largest attribution (Dai et al.: 0.2).
    pub coarse: f32,
    pub min_neurons: usize,
    pub max_neurons: usize,
}

impl Default for NeuronSettings {
    fn default() -> Self {
        Self {
            steps: 20,
            coarse: 0.2,
            min_neurons: 2,
            max_neurons: 5,
        }
    }
}

/// A prompt and the token it should be followed by.
#[derive(Clone, Debug, Serialize)]
pub struct FactPrompt {
    pub prompt: String,
    pub target_id: u32,
}

/// The fact's prompts: `template` and its [`PARAPHRASE_PREFIXES`] forms, with `{}` filled by
/// `subject`, each followed by the first token of `target`.
pub fn fact_prompts(
    model: &Model,
    templates: &[String],
    subject: &str,
    target: &str,
) -> Result<Vec<FactPrompt>> {
    templates
        .iter()
        .map(|t| {
            let prompt = t.replace("{}", subject);
            let target_id = crate::causal::target_token(model, &prompt, target)?;
            Ok(FactPrompt { prompt, target_id })
        })
        .collect()
}

/// `template` and its paraphrase-prefixed forms.
pub fn paraphrased(template: &str) -> Vec<String> {
    std::iter::once(template.to_string())
        .chain(PARAPHRASE_PREFIXES.iter().map(|p| format!("{p}{template}")))
        .collect()
}

/// One neuron: its layer, its index in `mlp.hook_post`, and its attribution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Neuron {
    pub layer: usize,
    pub neuron: usize,
    /// Mean attribution over the prompts.
    pub attribution: f32,
    /// Fraction of the prompts where it passed the coarse threshold.
    pub shared_by: f32,
}

/// Where a norm follows the MLP (Gemma 2, OLMo 2) its output does not depend on the activations'
/// scale once α·‖W_down·a‖ clears the norm's ε, so nearly all of the change along the path
/// happens near α ≈ 10⁻³; there [`attribute`] places its points at α = u⁴ (u uniform), a
/// quarter of them below α = 0.004.
const POST_NORM_PATH_POWER: i32 = 4;

/// Integrated-gradients attributions of P(target) at the last position to every neuron of
/// every layer's `mlp.hook_post` at that position: `[layer][neuron]`. The path scales the
/// layer's activations by α from 0 to 1; the integral is a midpoint rule over `steps` points.
pub fn attribute(model: &Model, ids: &[u32], target: u32, steps: usize) -> Result<Vec<Vec<f32>>> {
    if steps == 0 {
        return Err(Error::InvalidArgument {
            what: "integration steps",
            value: "0".into(),
            message: "must be positive".into(),
        });
    }
    let n_layers = model.dims().n_layers;
    let points: Vec<HookPoint> = (0..n_layers).map(HookPoint::MlpPost).collect();
    let input = model.ids_tensor(ids)?;
    let clean = model.forward(&input, &Hooks::new().capture(points.iter().copied()))?;
    let last = ids.len() - 1;
    let batch = input.repeat((steps, 1))?;
    let power = if model
        .transformer
        .blocks
        .iter()
        .any(|b| b.post_norms.is_some())
    {
        POST_NORM_PATH_POWER
    } else {
        1
    };
    // α_k = u_k^power and the weight dα/du · du of each point.
    let u = |k: usize| (k as f32 + 0.5) / steps as f32;
    let alphas: Vec<f32> = (0..steps).map(|k| u(k).powi(power)).collect();
    let weights: Vec<f32> = (0..steps)
        .map(|k| power as f32 * u(k).powi(power - 1) / steps as f32)
        .collect();
    let alphas = Tensor::from_vec(alphas, (steps, 1, 1), &model.device)?;
    let weights = Tensor::from_vec(weights, (steps, 1, 1), &model.device)?;
    let mut out = Vec::with_capacity(n_layers);
    for &point in &points {
        let value = clean.cache.require(point)?;
        let a = value.narrow(1, last, 1)?.to_dtype(DType::F32)?; // [1, 1, d]
        let scaled = alphas.broadcast_mul(&a)?.to_dtype(value.dtype())?; // [m, 1, d]
        let hooks = Hooks::new()
            .intervene(
                point,
                Intervention::new(InterventionOp::Replace(scaled)).at_positions(vec![-1]),
            )
            .grad(point);
        let run = model.forward(&batch, &hooks)?;
        let p = target_probs(&run.logits, target)?.sum_all()?;
        let grads = p.backward()?;
        let leaf = run.grad_leaf(point).ok_or_else(|| Error::UnknownHook {
            name: point.to_string(),
            valid: String::new(),
        })?;
        let g = grads
            .get(leaf)
            .ok_or_else(|| Error::InvalidArgument {
                what: "hook",
                value: point.to_string(),
                message: "P(target) does not depend on it".into(),
            })?
            .narrow(1, last, 1)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&weights)?
            .sum(0)?; // [1, d]
        let attr = g
            .broadcast_mul(&a.squeeze(0)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.push(attr);
    }
    Ok(out)
}

/// P(target) after each prompt, with `hooks` applied.
pub fn probabilities(model: &Model, facts: &[FactPrompt], hooks: &Hooks) -> Result<Vec<f32>> {
    facts
        .iter()
        .map(|f| {
            let ids = model.encode_prompt(&f.prompt)?;
            let logits = model.forward(&model.ids_tensor(&ids)?, hooks)?.logits;
            Ok(target_probs(&logits, f.target_id)?.to_vec1::<f32>()?[0])
        })
        .collect()
}

/// Refines per-prompt attributions (`[prompt][layer][neuron]`) into the shared neurons.
pub fn refine(attributions: &[Vec<Vec<f32>>], settings: &NeuronSettings) -> Vec<Neuron> {
    let prompts = attributions.len();
    if prompts == 0 {
        return Vec::new();
    }
    // Per neuron: the prompts where it passes the coarse threshold.
    let mut passed: std::collections::HashMap<(usize, usize), usize> = Default::default();
    for attr in attributions {
        let max = attr
            .iter()
            .flatten()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let bar = settings.coarse * max;
        for (layer, row) in attr.iter().enumerate() {
            for (neuron, &v) in row.iter().enumerate() {
                if max > 0.0 && v > bar {
                    *passed.entry((layer, neuron)).or_default() += 1;
                }
            }
        }
    }
    let mut kept = Vec::new();
    for step in (1..=10).rev() {
        let p = step as f32 / 10.0;
        kept = passed
            .iter()
            .filter(|&(_, &n)| n as f32 / prompts as f32 >= p - 1e-6)
            .map(|(&(layer, neuron), &n)| Neuron {
                layer,
                neuron,
                attribution: mean_attribution(attributions, layer, neuron),
                shared_by: n as f32 / prompts as f32,
            })
            .collect();
        if kept.len() >= settings.min_neurons {
            break;
        }
    }
    kept.sort_by(|a, b| {
        b.attribution
            .total_cmp(&a.attribution)
            .then((a.layer, a.neuron).cmp(&(b.layer, b.neuron)))
    });
    kept.truncate(settings.max_neurons);
    kept
}

/// The attribution of every neuron averaged over the prompts, `[layer][neuron]`.
pub fn mean_attributions(attributions: &[Vec<Vec<f32>>]) -> Vec<Vec<f32>> {
    let Some(first) = attributions.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(l, row)| {
            (0..row.len())
                .map(|n| mean_attribution(attributions, l, n))
                .collect()
        })
        .collect()
}

fn mean_attribution(attributions: &[Vec<Vec<f32>>], layer: usize, neuron: usize) -> f32 {
    attributions.iter().map(|a| a[layer][neuron]).sum::<f32>() / attributions.len() as f32
}

/// Hooks that multiply `neurons` at the last token by `factor` (0 suppresses, 2 amplifies).
pub fn scale_neurons(neurons: &[Neuron], factor: f64) -> Hooks {
    let mut hooks = Hooks::new();
    let mut by_layer: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for n in neurons {
        by_layer.entry(n.layer).or_default().push(n.neuron);
    }
    for (layer, channels) in by_layer {
        hooks = hooks.intervene(
            HookPoint::MlpPost(layer),
            Intervention::new(InterventionOp::Scale(factor))
                .at_positions(vec![-1])
                .at_channels(channels),
        );
    }
    hooks
}

/// Mean relative change of P(target) over `facts` when `hooks` apply: `(P' − P) / P`.
pub fn relative_change(model: &Model, facts: &[FactPrompt], hooks: &Hooks) -> Result<f32> {
    let before = probabilities(model, facts, &Hooks::new())?;
    let after = probabilities(model, facts, hooks)?;
    let changes: Vec<f32> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) / b.max(1e-12))
        .collect();
    Ok(changes.iter().sum::<f32>() / changes.len().max(1) as f32)
}

/// The direct-path logit effect of a neuron's value vector (its down-projection column).
pub fn value_tokens(
    model: &Model,
    n: &Neuron,
    k: usize,
    names: &[String],
) -> Result<crate::features::logits::LogitEffects> {
    let d_mlp = model.dims().d_mlp;
    let mut one_hot = vec![0f32; d_mlp];
    one_hot[n.neuron] = 1.0;
    let row = Tensor::from_vec(one_hot, (1, d_mlp), &candle_core::Device::Cpu)?;
    let effects =
        crate::features::logits::logit_effects(model, HookPoint::MlpPost(n.layer), &row, k, names)?
            .and_then(|mut e| e.pop())
            .unwrap_or_default();
    Ok(effects)
}

/// The contexts that fire each neuron's key most: its top activations over `tokens` tokens of
/// `corpus` (one streaming pass per layer involved), highest first, in `neurons`' order.
pub fn key_contexts(
    model: &Model,
    neurons: &[Neuron],
    corpus: &crate::sae::activations::Corpus,
    tokens: u64,
    top_n: usize,
) -> Result<Vec<Vec<crate::features::stats::Context>>> {
    use crate::sae::{Architecture, Sae};

    let d_mlp = model.dims().d_mlp;
    let mut out = vec![Vec::new(); neurons.len()];
    let layers: std::collections::BTreeSet<usize> = neurons.iter().map(|n| n.layer).collect();
    for layer in layers {
        let chosen: Vec<usize> = (0..neurons.len())
            .filter(|&i| neurons[i].layer == layer)
            .collect();
        // An "SAE" whose features are the chosen neurons themselves (ReLU: a key fires when
        // its activation is positive).
        let n = chosen.len();
        let mut select = vec![0f32; d_mlp * n];
        for (j, &i) in chosen.iter().enumerate() {
            select[neurons[i].neuron * n + j] = 1.0;
        }
        let device = candle_core::Device::Cpu;
        let w_enc = Tensor::from_vec(select, (d_mlp, n), &device)?;
        let sae = Sae {
            architecture: Architecture::Standard,
            w_dec: w_enc.t()?.contiguous()?,
            w_enc,
            b_enc: Tensor::zeros(n, DType::F32, &device)?,
            b_dec: Tensor::zeros(d_mlp, DType::F32, &device)?,
            threshold: None,
            apply_b_dec_to_input: false,
            transcoder: false,
            w_skip: None,
        };
        let never = std::sync::atomic::AtomicBool::new(false);
        let tops = crate::features::top_contexts(
            model,
            &sae,
            HookPoint::MlpPost(layer),
            corpus,
            tokens,
            top_n,
            &never,
        )?
        .unwrap_or_default();
        for (top, &i) in tops.into_iter().zip(&chosen) {
            out[i] = top;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refinement_keeps_neurons_shared_across_prompts() {
        // Three prompts, one layer of four neurons. Neuron 1 is strong in all three, neuron 2
        // in two, neuron 3 in one; neuron 0 never passes 0.2 × max.
        let attr = |v: [f32; 4]| vec![v.to_vec()];
        let prompts = vec![
            attr([0.01, 1.0, 0.5, 0.0]),
            attr([0.01, 0.9, 0.0, 0.6]),
            attr([0.01, 1.2, 0.4, 0.0]),
        ];
        let mut s = NeuronSettings::default();
        let kept = refine(&prompts, &s);
        // p = 1 keeps only neuron 1 (< 2 neurons), p = 0.6 adds neuron 2 (2 of 3 prompts).
        let ids: Vec<usize> = kept.iter().map(|n| n.neuron).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!((kept[0].attribution - (1.0 + 0.9 + 1.2) / 3.0).abs() < 1e-6);
        assert!((kept[1].shared_by - 2.0 / 3.0).abs() < 1e-6);
        s.min_neurons = 1;
        assert_eq!(refine(&prompts, &s).len(), 1);
        s.min_neurons = 3;
        s.max_neurons = 2;
        assert_eq!(refine(&prompts, &s).len(), 2);
    }
}
