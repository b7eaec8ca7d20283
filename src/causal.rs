//! Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"):
//! corrupt the subject's token embeddings with Gaussian noise, then restore clean activations
//! at one (layer, position) at a time and measure how much of the answer's probability comes
//! back. Three things can be restored ([`Restore`]): the hidden state (`hook_resid_post` of
//! one layer), or the MLP or attention outputs of a window of layers around it. The MLP trace
//! at the last subject token is what locates the layer a ROME edit should target.

use std::ops::Range;

use candle_core::{D, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{ForwardOutput, HookPoint, Hooks, Intervention, InterventionOp, Model};

/// The noise and restoration settings (ROME's defaults, window scaled to small models).
#[derive(Clone, Debug, Serialize)]
pub struct TraceSettings {
    /// Noise standard deviation in units of the subject embeddings' σ.
    pub noise_sigmas: f64,
    /// Noise samples averaged per measurement.
    pub samples: usize,
    pub seed: u64,
    /// Layers restored together, centred on the traced layer.
    pub window: usize,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            noise_sigmas: 3.0,
            samples: 10,
            seed: 0,
            window: 3,
        }
    }
}

/// A fact to trace: `prompt` contains `subject`; `target` continues the prompt.
#[derive(Clone, Debug)]
pub struct Fact<'a> {
    pub prompt: &'a str,
    pub subject: &'a str,
    pub target: &'a str,
}

/// What a trace restores at each (layer, position).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restore {
    /// The residual stream after the layer (`blocks.L.hook_resid_post`), that layer only.
    Hidden,
    /// The MLP outputs (`blocks.L.hook_mlp_out`) of the window of layers around `L`.
    Mlp,
    /// The attention outputs (`blocks.L.hook_attn_out`) of the window around `L`.
    Attn,
}

impl Restore {
    pub const ALL: [Restore; 3] = [Restore::Hidden, Restore::Mlp, Restore::Attn];

    pub fn name(self) -> &'static str {
        match self {
            Restore::Hidden => "hidden",
            Restore::Mlp => "mlp",
            Restore::Attn => "attn",
        }
    }

    fn point(self, layer: usize) -> HookPoint {
        match self {
            Restore::Hidden => HookPoint::ResidPost(layer),
            Restore::Mlp => HookPoint::MlpOut(layer),
            Restore::Attn => HookPoint::AttnOut(layer),
        }
    }

    /// The layers restored together when tracing `layer`: a window centred on it, cut short
    /// at the first and last layers (ROME's `trace_important_window` window:
    /// `max(0, L − ⌊w/2⌋) .. min(n, L + ⌈w/2⌉)`), never less than the layer itself.
    fn layers(self, layer: usize, window: usize, n_layers: usize) -> Range<usize> {
        match self {
            Restore::Hidden => layer..layer + 1,
            _ => {
                let lo = layer.saturating_sub(window / 2);
                let hi = (layer + window.div_ceil(2)).min(n_layers).max(layer + 1);
                lo..hi
            }
        }
    }
}

/// The probabilities of one fact's target under clean, corrupted and restored runs.
#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    pub restore: Restore,
    pub tokens: Vec<String>,
    /// Token positions of the subject.
    pub subject: Range<usize>,
    pub target_id: u32,
    pub p_clean: f32,
    pub p_corrupt: f32,
    /// The positions traced.
    pub positions: Vec<usize>,
    /// `p_restored[layer][i]`: restoring at `layer` (or its window) at `positions[i]`.
    pub p_restored: Vec<Vec<f32>>,
}

/// The MLP trace of issue 3's world evaluation.
pub type MlpTrace = Trace;

/// Token ids of `prompt` and the byte range of `subject` mapped to token positions.
pub fn locate_subject(
    model: &Model,
    prompt: &str,
    subject: &str,
) -> Result<(Vec<u32>, Range<usize>)> {
    locate_subject_after(model, prompt, subject, 0)
}

/// [`locate_subject`] for the first mention of `subject` at or after byte `from`.
pub fn locate_subject_after(
    model: &Model,
    prompt: &str,
    subject: &str,
    from: usize,
) -> Result<(Vec<u32>, Range<usize>)> {
    let (ids, offsets) = model.tokenizer.encode_with_offsets(prompt)?;
    let tokens = || {
        model
            .tokenizer
            .tokens_display(&ids)
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let start = prompt
        .get(from..)
        .and_then(|rest| rest.find(subject))
        .map(|i| i + from)
        .filter(|_| !subject.is_empty());
    let start = start.ok_or_else(|| Error::InvalidArgument {
        what: "subject",
        value: subject.to_string(),
        message: format!(
            "does not occur in the prompt {prompt:?} (its tokens: {})",
            tokens()
        ),
    })?;
    let end = start + subject.len();
    let hits: Vec<usize> = offsets
        .iter()
        .enumerate()
        .filter(|(_, (s, e))| *s < end && start < *e)
        .map(|(i, _)| i)
        .collect();
    match (hits.first(), hits.last()) {
        (Some(&first), Some(&last)) => Ok((ids, first..last + 1)),
        _ => Err(Error::InvalidArgument {
            what: "subject",
            value: subject.to_string(),
            message: "covers no token of the prompt".into(),
        }),
    }
}

/// The first token of `target` as it continues `prompt`; errors when the target does not
/// start on a token boundary (its first token would then also cover prompt text).
pub fn target_token(model: &Model, prompt: &str, target: &str) -> Result<u32> {
    Ok(target_tokens(model, prompt, target)?[0])
}

/// Every token of `target` as it continues `prompt` (never empty); errors as [`target_token`].
pub fn target_tokens(model: &Model, prompt: &str, target: &str) -> Result<Vec<u32>> {
    let prompt_ids = model.tokenizer.encode(prompt)?;
    let full = model.tokenizer.encode(&format!("{prompt}{target}"))?;
    if full.len() <= prompt_ids.len() || full[..prompt_ids.len()] != prompt_ids[..] {
        return Err(Error::InvalidArgument {
            what: "target",
            value: target.to_string(),
            message: format!("does not start on a token boundary after {prompt:?}"),
        });
    }
    Ok(full[prompt_ids.len()..].to_vec())
}

/// σ of the token embeddings of these subjects (all their tokens, all channels), the unit of
/// the corruption noise: measured where the noise is added, at `hook_embed` (after Gemma's
/// √d_model scale).
pub fn subject_embedding_std(model: &Model, subjects: &[impl AsRef<str>]) -> Result<f64> {
    let mut ids = Vec::new();
    for s in subjects {
        ids.extend(model.tokenizer.encode(s.as_ref())?);
    }
    if ids.is_empty() {
        return Err(Error::InvalidArgument {
            what: "subjects",
            value: String::new(),
            message: "no subject tokens to measure the embedding scale on".into(),
        });
    }
    let index = Tensor::new(ids.as_slice(), &model.device)?;
    let rows = model
        .transformer
        .embed
        .index_select(&index, 0)?
        .to_dtype(candle_core::DType::F64)?;
    let mean = rows.mean_all()?.to_scalar::<f64>()?;
    let var = rows
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?;
    let scale = model.transformer.embed_scale.unwrap_or(1.0);
    Ok(var.sqrt() * scale.abs())
}

/// Probability of `target` at the last position of each sequence of `logits`
/// (`[batch, seq, vocab]` → `[batch]`). Differentiable (the composed softmax: candle's fused
/// one has no backward pass).
pub fn target_probs(logits: &Tensor, target: u32) -> Result<Tensor> {
    let last = logits
        .narrow(1, logits.dim(1)? - 1, 1)?
        .squeeze(1)?
        .contiguous()?;
    let probs = candle_nn::ops::softmax(&last.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    Ok(probs.narrow(D::Minus1, target as usize, 1)?.squeeze(1)?)
}

/// Probability of `target` at the last position, averaged over the batch.
fn mean_target_prob(logits: &Tensor, target: u32) -> Result<f32> {
    Ok(target_probs(logits, target)?
        .mean_all()?
        .to_scalar::<f32>()?)
}

/// Traces the MLP outputs of `fact` at `positions` (all positions when `None`).
pub fn trace_mlp(
    model: &Model,
    fact: &Fact,
    settings: &TraceSettings,
    sigma: f64,
    positions: Option<&[usize]>,
) -> Result<MlpTrace> {
    trace(model, fact, settings, sigma, positions, Restore::Mlp)
}

/// A fact's clean run and its corrupted batch: the subject's embeddings plus Gaussian noise,
/// one draw per sample, fixed by the seed. What every trace restores into.
pub struct Corruption {
    pub ids: Vec<u32>,
    /// Token positions of the subject.
    pub subject: Range<usize>,
    pub target_id: u32,
    /// The clean run, with the hooks asked for captured.
    pub clean: ForwardOutput,
    pub p_clean: f32,
    /// The prompt repeated once per noise sample.
    pub batch_ids: Tensor,
    /// The noise, as an intervention at `hook_embed`; restorations are added to it.
    pub hooks: Hooks,
    pub p_corrupt: f32,
}

impl Corruption {
    /// Runs `fact` clean (capturing `points`) and corrupted.
    pub fn new(
        model: &Model,
        fact: &Fact,
        settings: &TraceSettings,
        sigma: f64,
        points: &[HookPoint],
    ) -> Result<Self> {
        let (ids, subject) = locate_subject(model, fact.prompt, fact.subject)?;
        let target_id = target_token(model, fact.prompt, fact.target)?;
        let (seq, d) = (ids.len(), model.dims().d_model);
        let clean_ids = model.ids_tensor(&ids)?;
        let clean = model.forward(&clean_ids, &Hooks::new().capture(points.iter().copied()))?;
        let p_clean = mean_target_prob(&clean.logits, target_id)?;
        if !(settings.noise_sigmas >= 0.0 && settings.noise_sigmas.is_finite()) {
            return Err(Error::InvalidArgument {
                what: "noise",
                value: settings.noise_sigmas.to_string(),
                message: "must be a number of σ ≥ 0".into(),
            });
        }
        let n = settings.samples.max(1);
        let mut rng = StdRng::seed_from_u64(settings.seed);
        let scale = settings.noise_sigmas * sigma;
        let mut noise = vec![0f32; n * seq * d];
        for b in 0..n {
            for t in subject.clone() {
                for c in 0..d {
                    noise[(b * seq + t) * d + c] =
                        (crate::world::train::normal(&mut rng) * scale) as f32;
                }
            }
        }
        let noise = Tensor::from_vec(noise, (n, seq, d), &model.device)?.to_dtype(model.dtype)?;
        let batch_ids = clean_ids.repeat((n, 1))?;
        let hooks = Hooks::new().intervene(
            HookPoint::Embed,
            Intervention::new(InterventionOp::Add(noise)),
        );
        let p_corrupt = mean_target_prob(&model.forward(&batch_ids, &hooks)?.logits, target_id)?;
        Ok(Self {
            ids,
            subject,
            target_id,
            clean,
            p_clean,
            batch_ids,
            hooks,
            p_corrupt,
        })
    }

    /// P(target) in the corrupted runs with the interventions `restore` adds to the noise,
    /// averaged over the samples.
    pub fn restored(&self, model: &Model, restore: impl FnOnce(Hooks) -> Hooks) -> Result<f32> {
        let hooks = restore(self.hooks.clone());
        mean_target_prob(
            &model.forward(&self.batch_ids, &hooks)?.logits,
            self.target_id,
        )
    }
}

/// Traces `fact`, restoring `restore` at every layer and each of `positions` (all when
/// `None`).
pub fn trace(
    model: &Model,
    fact: &Fact,
    settings: &TraceSettings,
    sigma: f64,
    positions: Option<&[usize]>,
    restore: Restore,
) -> Result<Trace> {
    let n_layers = model.dims().n_layers;
    let points: Vec<HookPoint> = (0..n_layers).map(|l| restore.point(l)).collect();
    let run = Corruption::new(model, fact, settings, sigma, &points)?;
    let seq = run.ids.len();
    let positions: Vec<usize> = positions.map_or_else(|| (0..seq).collect(), <[usize]>::to_vec);
    let mut p_restored = vec![Vec::with_capacity(positions.len()); n_layers];
    for (layer, row) in p_restored.iter_mut().enumerate() {
        let restored = restore.layers(layer, settings.window, n_layers);
        for &t in &positions {
            let mut clean = Vec::with_capacity(restored.len());
            for &point in &points[restored.clone()] {
                clean.push((point, run.clean.cache.require(point)?.clone()));
            }
            row.push(run.restored(model, |hooks| {
                clean.into_iter().fold(hooks, |hooks, (point, value)| {
                    hooks.intervene(
                        point,
                        Intervention::new(InterventionOp::Replace(value))
                            .at_positions(vec![t as i64]),
                    )
                })
            })?);
        }
    }
    Ok(Trace {
        restore,
        tokens: model.tokenizer.tokens_display(&run.ids),
        subject: run.subject,
        target_id: run.target_id,
        p_clean: run.p_clean,
        p_corrupt: run.p_corrupt,
        positions,
        p_restored,
    })
}

/// Per-head causal tracing: P(target) with one attention head's output restored.
#[derive(Clone, Debug, Serialize)]
pub struct HeadTrace {
    pub tokens: Vec<String>,
    pub subject: Range<usize>,
    pub target_id: u32,
    pub p_clean: f32,
    pub p_corrupt: f32,
    /// `p_restored[layer][head]`: the head's clean `attn.hook_z` columns restored at every
    /// position of the corrupted runs.
    pub p_restored: Vec<Vec<f32>>,
}

/// Traces `fact` one attention head at a time (activation patching per head, as
/// TransformerLens's `get_act_patch_attn_head_out_all_pos`, with ROME's noise as the
/// corruption): which heads carry what the corrupted subject took away.
pub fn trace_heads(
    model: &Model,
    fact: &Fact,
    settings: &TraceSettings,
    sigma: f64,
) -> Result<HeadTrace> {
    let dims = model.dims();
    let points: Vec<HookPoint> = (0..dims.n_layers).map(HookPoint::AttnZ).collect();
    let run = Corruption::new(model, fact, settings, sigma, &points)?;
    let mut p_restored = Vec::with_capacity(dims.n_layers);
    for &point in &points {
        let clean = run.clean.cache.require(point)?;
        let mut row = Vec::with_capacity(dims.n_heads);
        for head in 0..dims.n_heads {
            let columns: Vec<usize> = (head * dims.head_dim..(head + 1) * dims.head_dim).collect();
            let restore = Intervention::new(InterventionOp::Replace(clean.clone()));
            row.push(run.restored(model, |hooks| {
                hooks.intervene(point, restore.at_channels(columns))
            })?);
        }
        p_restored.push(row);
    }
    Ok(HeadTrace {
        tokens: model.tokenizer.tokens_display(&run.ids),
        subject: run.subject,
        target_id: run.target_id,
        p_clean: run.p_clean,
        p_corrupt: run.p_corrupt,
        p_restored,
    })
}

#[cfg(test)]
mod tests {
    use super::Restore;

    #[test]
    fn the_restored_window_is_centred_and_cut_short_at_the_edges() {
        let window = |layer, w| Restore::Mlp.layers(layer, w, 8);
        // ROME's range(max(0, L − w//2), min(n, L − (−w//2))).
        assert_eq!(window(0, 3), 0..2);
        assert_eq!(window(1, 3), 0..3);
        assert_eq!(window(4, 3), 3..6);
        assert_eq!(window(7, 3), 6..8);
        assert_eq!(window(0, 10), 0..5);
        assert_eq!(window(5, 10), 0..8);
        assert_eq!(window(4, 4), 2..6);
        // At least the traced layer, whatever the window.
        assert_eq!(window(3, 1), 3..4);
        assert_eq!(window(3, 0), 3..4);
        assert_eq!(Restore::Hidden.layers(3, 10, 8), 3..4);
    }
}
