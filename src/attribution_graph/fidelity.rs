//! How faithfully a set of transcoders stands in for the model's MLPs: the *replacement model*
//! an attribution graph explains. An attribution graph is exact for the replacement model with
//! its error nodes; how much of the model's behaviour the features carry without them is what
//! this measures (Ameisen et al. 2025 report the same kind of figures for their CLTs).
//!
//! Features and MLP outputs are compared, and MLP outputs replaced, at the evaluation windows'
//! non-special positions; the next-token figures count every prediction (as `sae eval`'s do):
//! - per layer written, open-loop FVU `Σ‖y − ŷ‖² / Σ‖y − ȳ‖²` of the MLP output `y` against the
//!   transcoders' prediction `ŷ` from the clean run's inputs (every feature that writes the
//!   layer, from its own layer or an earlier one), and L0: features of that layer firing per
//!   token;
//! - closed loop, every written MLP output replaced at once by the prediction from the
//!   replaced run's own inputs (errors compound from layer to layer):
//!   next-token cross-entropy `CE_replaced`, `CE_zero` with those MLP outputs zeroed instead,
//!   CE loss recovered `(CE_zero − CE_replaced) / (CE_zero − CE_clean)`, the mean
//!   `KL(p_clean ‖ p_replaced)`, and how often the replaced model's most probable next token is
//!   the model's (top-1 agreement).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Tensor};
use serde::Serialize;

use super::{LayerTranscoder, by_layer, skip_path};
use crate::error::{Error, Result};
use crate::model::HookPoint;
use crate::model::hooks::{Hooks, Intervention, InterventionOp};
use crate::sae::activations::ActivationSource;
use crate::sae::eval::{kl_sum, log_probs, nll_sum};

/// One MLP output the transcoders write.
#[derive(Clone, Debug, Serialize)]
pub struct LayerFidelity {
    pub layer: usize,
    /// Open-loop fraction of the MLP output's variance the features leave unexplained.
    pub fvu: f64,
    /// Features of this layer's transcoder firing per token (0 where none reads here).
    pub l0: f64,
}

/// The replacement model's figures (see the module's documentation).
#[derive(Clone, Debug, Serialize)]
pub struct FidelityReport {
    pub tokens: usize,
    pub layers: Vec<LayerFidelity>,
    pub ce_clean: f64,
    pub ce_replaced: f64,
    pub ce_zero: f64,
    pub ce_loss_recovered: f64,
    pub kl_replaced: f64,
    pub top1_agreement: f64,
}

impl FidelityReport {
    /// A table for the terminal.
    pub fn render(&self) -> String {
        let mut out = format!(
            "replacement model over {} tokens: CE loss recovered {:.3} (CE clean {:.4}, \
             replaced {:.4}, MLPs zeroed {:.4}), KL {:.4}, top-1 agreement {:.1}%\n\
             layer    FVU (open loop)    L0\n",
            self.tokens,
            self.ce_loss_recovered,
            self.ce_clean,
            self.ce_replaced,
            self.ce_zero,
            self.kl_replaced,
            100.0 * self.top1_agreement
        );
        for l in &self.layers {
            out.push_str(&format!(
                "{:>5}    {:>15.4}    {:>6.1}\n",
                l.layer, l.fvu, l.l0
            ));
        }
        out
    }
}

/// What each transcoder writes for input `x` `[.., d_in]`: `(layer, [.., d_out])` for its own
/// layer (with `b_dec` and any skip path) and every later layer it writes, and its features'
/// activations. Only the features active somewhere in `x` have their decoder rows read.
fn writes(transcoder: &LayerTranscoder, x: &Tensor) -> Result<(Vec<(usize, Tensor)>, Tensor)> {
    let sae = &transcoder.sae;
    let x = x.to_dtype(sae.w_enc.dtype())?;
    let acts = sae.encode(&x)?;
    let rank = acts.rank();
    let fired: Vec<f32> = acts
        .gt(0.0)?
        .to_dtype(DType::F32)?
        .flatten_to(rank - 2)?
        .sum(0)?
        .to_vec1()?;
    let active: Vec<u32> = (0..fired.len() as u32)
        .filter(|&f| fired[f as usize] > 0.0)
        .collect();
    let own = transcoder.layer()?;
    let base = skip_path(sae, &x)?.broadcast_add(&sae.b_dec)?;
    let mut out = vec![(own, base)];
    if !active.is_empty() {
        let ids = Tensor::new(active.as_slice(), acts.device())?;
        let picked = acts.index_select(&ids, rank - 1)?.contiguous()?;
        for (layer, rows) in transcoder.decoder_rows(&active)? {
            let written = picked.broadcast_matmul(&rows)?;
            match out.iter_mut().find(|(l, _)| *l == layer) {
                Some((_, sum)) => *sum = (&*sum + written)?,
                None => out.push((layer, written)),
            }
        }
    }
    Ok((out, acts))
}

/// Runs `windows` windows from `source` through the model, clean and with `transcoders`
/// replacing the MLP outputs they write; `progress(done, total)` after each batch.
pub fn score(
    source: &mut ActivationSource,
    transcoders: &[LayerTranscoder],
    windows: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<FidelityReport> {
    if transcoders.is_empty() || windows == 0 {
        return Err(Error::InvalidArgument {
            what: "replacement-model evaluation",
            value: format!("{} transcoders, {windows} windows", transcoders.len()),
            message: "needs at least one transcoder and one window".into(),
        });
    }
    let model = source.model();
    let ctx = source.settings.context_size;
    // One per layer, fitting the model, in its dtype (as an attribution graph takes them).
    let transcoders: Vec<LayerTranscoder> = by_layer(model, transcoders)?
        .into_iter()
        .flatten()
        .collect();
    let transcoders = transcoders.as_slice();
    // The hook each written layer's MLP output is read and replaced at.
    let mut outputs: BTreeMap<usize, HookPoint> = BTreeMap::new();
    for t in transcoders {
        let layer = t.layer()?;
        outputs.insert(layer, t.site.output);
        for k in 1..=t.later.count() {
            outputs
                .entry(layer + k)
                .or_insert(HookPoint::MlpOut(layer + k));
        }
    }
    let inputs: Vec<HookPoint> = transcoders.iter().map(|t| t.site.input).collect();
    let d_out = transcoders[0].sae.d_out();
    let own_layers: BTreeMap<usize, usize> = transcoders
        .iter()
        .enumerate()
        .map(|(i, t)| Ok((t.layer()?, i)))
        .collect::<Result<_>>()?;

    let per_batch = source.settings.windows_per_forward.max(1);
    let mut tokens = 0usize;
    // Per written layer: Σ‖y − ŷ‖², Σ y, Σ‖y‖²; per transcoder: features fired.
    let mut sq_err: BTreeMap<usize, f64> = BTreeMap::new();
    let mut sums: BTreeMap<usize, (Vec<f64>, f64)> = BTreeMap::new();
    let mut fired = vec![0f64; transcoders.len()];
    let (mut ce_clean, mut ce_replaced, mut ce_zero, mut kl) = (0f64, 0f64, 0f64, 0f64);
    let (mut agree, mut predictions) = (0usize, 0usize);
    let mut done = 0;
    while done < windows {
        let n = per_batch.min(windows - done);
        let (ids_tensor, keep) = source.next_window_batch(n)?;
        tokens += keep.sum_all()?.to_scalar::<f32>()? as usize;

        // Open loop: every prediction from the clean run's inputs.
        let capture = inputs.iter().chain(outputs.values()).copied();
        let clean = model.forward(&ids_tensor, &Hooks::new().capture(capture))?;
        let mut predicted: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (i, t) in transcoders.iter().enumerate() {
            let (written, acts) = writes(t, clean.cache.require(t.site.input)?)?;
            let on = acts.gt(0.0)?.to_dtype(DType::F32)?.broadcast_mul(&keep)?;
            fired[i] += f64::from(on.sum_all()?.to_scalar::<f32>()?);
            for (layer, w) in written {
                let sum = match predicted.remove(&layer) {
                    Some(sum) => (sum + w)?,
                    None => w,
                };
                predicted.insert(layer, sum);
            }
        }
        for (&layer, &point) in &outputs {
            let y = clean.cache.require(point)?.to_dtype(DType::F32)?;
            // A later layer no active feature wrote, and no transcoder reads at: zero.
            let err = match predicted.get(&layer) {
                Some(y_hat) => (y_hat.to_dtype(DType::F32)? - &y)?,
                None => y.neg()?,
            };
            let err = err.broadcast_mul(&keep)?;
            *sq_err.entry(layer).or_default() +=
                f64::from(err.sqr()?.sum_all()?.to_scalar::<f32>()?);
            let yk = y.broadcast_mul(&keep)?;
            let (sum, sum_sq) = sums.entry(layer).or_insert((vec![0.0; d_out], 0.0));
            *sum_sq += f64::from(yk.sqr()?.sum_all()?.to_scalar::<f32>()?);
            for (s, v) in sum.iter_mut().zip(yk.sum((0, 1))?.to_vec1::<f32>()?) {
                *s += f64::from(v);
            }
        }

        // Closed loop: each input hook adds its transcoder's writes to the layers it writes;
        // each output hook takes what was written for it (at kept positions).
        let pending: Arc<Mutex<BTreeMap<usize, Tensor>>> = Arc::default();
        let mut hooks = Hooks::new();
        for t in transcoders {
            let pending = pending.clone();
            let transcoder = t.clone();
            let add = move |x: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
                let (written, _) =
                    writes(&transcoder, x).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let mut pending = pending
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("a poisoned lock".into()))?;
                for (layer, w) in written {
                    let sum = match pending.remove(&layer) {
                        Some(sum) => (sum + w)?,
                        None => w,
                    };
                    pending.insert(layer, sum);
                }
                Ok(x.clone())
            };
            hooks = hooks.intervene(
                t.site.input,
                Intervention::new(InterventionOp::Func(Arc::new(add))),
            );
        }
        let splice = |hooks: Hooks, replacement: Option<Arc<Mutex<BTreeMap<usize, Tensor>>>>| {
            let mut hooks = hooks;
            for (&layer, &point) in &outputs {
                let keep = keep.clone();
                let pending = replacement.clone();
                let replace = move |v: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
                    let written = match &pending {
                        Some(p) => p
                            .lock()
                            .map_err(|_| candle_core::Error::Msg("a poisoned lock".into()))?
                            .remove(&layer),
                        None => None,
                    };
                    let r = match written {
                        Some(w) => w.to_dtype(v.dtype())?,
                        None => v.zeros_like()?,
                    };
                    let k = keep.to_dtype(v.dtype())?;
                    v.broadcast_mul(&k.affine(-1.0, 1.0)?)?
                        .add(&r.broadcast_mul(&k)?)
                };
                hooks = hooks.intervene(
                    point,
                    Intervention::new(InterventionOp::Func(Arc::new(replace))),
                );
            }
            hooks
        };
        let replaced = model
            .forward(&ids_tensor, &splice(hooks, Some(pending.clone())))?
            .logits;
        let zeroed = model
            .forward(&ids_tensor, &splice(Hooks::new(), None))?
            .logits;

        let targets = ids_tensor.narrow(1, 1, ctx - 1)?.contiguous()?;
        let clean_lp = log_probs(&clean.logits, ctx)?;
        let replaced_lp = log_probs(&replaced, ctx)?;
        ce_clean += nll_sum(&clean_lp, &targets)?;
        ce_replaced += nll_sum(&replaced_lp, &targets)?;
        ce_zero += nll_sum(&log_probs(&zeroed, ctx)?, &targets)?;
        kl += kl_sum(&clean_lp, &replaced_lp)?;
        let same = clean_lp
            .argmax(D::Minus1)?
            .eq(&replaced_lp.argmax(D::Minus1)?)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        agree += same as usize;
        predictions += n * (ctx - 1);
        done += n;
        progress(done, windows);
    }
    if tokens == 0 {
        return Err(Error::InvalidArgument {
            what: "evaluation corpus",
            value: source.corpus().describe(),
            message: "gave no evaluable tokens".into(),
        });
    }
    let layers = outputs
        .keys()
        .filter_map(|&layer| {
            let (sum, sum_sq) = sums.get(&layer)?;
            let mean_sq: f64 = sum.iter().map(|s| s * s).sum::<f64>() / tokens as f64;
            let variance = (sum_sq - mean_sq).max(f64::MIN_POSITIVE);
            Some(LayerFidelity {
                layer,
                fvu: sq_err.get(&layer).copied().unwrap_or_default() / variance,
                l0: own_layers
                    .get(&layer)
                    .map_or(0.0, |&i| fired[i] / tokens as f64),
            })
        })
        .collect();
    let p = predictions as f64;
    let (ce_clean, ce_replaced, ce_zero) = (ce_clean / p, ce_replaced / p, ce_zero / p);
    Ok(FidelityReport {
        tokens,
        layers,
        ce_clean,
        ce_replaced,
        ce_zero,
        ce_loss_recovered: (ce_zero - ce_replaced) / (ce_zero - ce_clean),
        kl_replaced: kl / p,
        top1_agreement: agree as f64 / p,
    })
}
