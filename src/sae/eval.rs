//! `sae eval`: how well an SAE reconstructs its hook, and what splicing it in costs the model.
//!
//! Formulas (peers differ; these are ours, over all non-special positions of the evaluation
//! windows):
//! - L0: mean number of active latents per token;
//! - FVU: `Σ‖x − x̂‖² / Σ‖x − x̄‖²`, pooled, `x̄` the mean activation over the evaluation set;
//! - dead fraction: latents that never fire; dense fraction: latents firing on more than
//!   `dense_threshold` of tokens;
//! - CE loss recovered: `(CE_zero − CE_sae) / (CE_zero − CE_clean)`, where `CE_sae` runs the model
//!   with the hook replaced by the reconstruction and `CE_zero` with the hook zeroed (next-token
//!   cross-entropy averaged over every predicted position);
//! - KL score: `1 − KL_sae / KL_zero`, `KL_·` the mean `KL(p_clean ‖ p_·)` of next-token
//!   distributions;
//! - delta LM loss: `CE_sae − CE_clean`.
//!
//! A transcoder is judged where it writes: `x` above is its output hook's activation, `x̂` its
//! prediction from the input hook, and the splice replaces the output hook. The input hook comes
//! earlier in the pass, so the clean run's input is also the spliced run's and one clean pass
//! gives every prediction.

use std::sync::Arc;

use candle_core::{D, DType, Tensor};
use candle_nn::ops::log_softmax;
use serde::Serialize;

use super::activations::{ActivationSource, ChunkSource};
use super::{Sae, SaeSite};
use crate::error::{Error, Result};
use crate::model::HookPoint;
use crate::model::hooks::{Hooks, Intervention, InterventionOp};

/// What to evaluate on.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    /// Windows to run (each `context_size` tokens).
    pub windows: usize,
    /// A latent firing on more than this fraction of tokens counts as dense.
    pub dense_threshold: f64,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            windows: 256,
            dense_threshold: 0.1,
        }
    }
}

/// One bin of the feature-density histogram: latents whose log10 firing frequency lies in
/// `[log10_from, log10_to)`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DensityBin {
    pub log10_from: f64,
    pub log10_to: f64,
    pub latents: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub tokens: usize,
    pub l0: f64,
    pub fvu: f64,
    pub dead_fraction: f64,
    pub dense_fraction: f64,
    pub ce_clean: f64,
    pub ce_sae: f64,
    pub ce_zero: f64,
    pub ce_loss_recovered: f64,
    pub kl_sae: f64,
    pub kl_zero: f64,
    pub kl_score: f64,
    pub delta_lm_loss: f64,
    /// Latents that never fired are counted in `dead_fraction`, not here.
    pub density_histogram: Vec<DensityBin>,
}

impl EvalReport {
    pub fn render(&self) -> String {
        let mut s = format!(
            "tokens               {}\n\
             L0                   {:.2}\n\
             FVU                  {:.4}\n\
             dead latents         {:.2}%\n\
             dense latents        {:.2}%\n\
             CE clean / SAE / zero {:.4} / {:.4} / {:.4}\n\
             CE loss recovered    {:.4}\n\
             KL score             {:.4} (KL sae {:.4}, zero {:.4})\n\
             delta LM loss        {:+.4}\n\
             feature density (log10 firing frequency):\n",
            self.tokens,
            self.l0,
            self.fvu,
            100.0 * self.dead_fraction,
            100.0 * self.dense_fraction,
            self.ce_clean,
            self.ce_sae,
            self.ce_zero,
            self.ce_loss_recovered,
            self.kl_score,
            self.kl_sae,
            self.kl_zero,
            self.delta_lm_loss,
        );
        let most = self
            .density_histogram
            .iter()
            .map(|b| b.latents)
            .max()
            .unwrap_or(1)
            .max(1);
        for b in &self.density_histogram {
            let bar = "#".repeat((40 * b.latents).div_ceil(most));
            s.push_str(&format!(
                "  [{:>5.1}, {:>5.1})  {:>7}  {bar}\n",
                b.log10_from, b.log10_to, b.latents
            ));
        }
        s
    }
}

/// Runs the evaluation over `settings.windows` windows drawn from `source` (which reads the
/// SAE's input hook); `output` is the hook the SAE writes ([`super::output_hook`]).
pub fn evaluate(
    source: &mut ActivationSource,
    sae: &Sae,
    output: HookPoint,
    settings: &EvalSettings,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let model = source.model();
    let input = source.hook;
    SaeSite { input, output }.check(sae)?;
    let d_in = source.d_in();
    if sae.d_in() != d_in {
        return Err(Error::InvalidArgument {
            what: "SAE",
            value: format!("d_in {}", sae.d_in()),
            message: format!("the hook `{input}` is {d_in} wide"),
        });
    }
    let d_out = sae.d_out();
    let sae = sae.to_dtype(DType::F32)?;
    let per_batch = source.settings.windows_per_forward;
    let ctx = source.settings.context_size;
    let d_sae = sae.d_sae();
    let mut fires = vec![0u64; d_sae];
    let (mut tokens, mut active) = (0usize, 0f64);
    let (mut sq_err, mut sum, mut sum_sq) = (0f64, vec![0f64; d_out], 0f64);
    let (mut ce_clean, mut ce_sae, mut ce_zero, mut kl_sae, mut kl_zero) =
        (0f64, 0f64, 0f64, 0f64, 0f64);
    let mut predictions = 0usize;
    let mut done = 0;
    while done < settings.windows {
        let n = per_batch.min(settings.windows - done);
        // Which positions the SAE covers (special tokens are left alone, as in training).
        let (ids_tensor, keep) = source.next_window_batch(n)?;

        let clean = model.forward(&ids_tensor, &Hooks::new().capture([input, output]))?;
        let x_in = clean.cache.require(input)?.to_dtype(DType::F32)?;
        let acts = sae.encode(&x_in)?;
        // What the SAE puts at its output hook, and what the model had there.
        let x_hat = sae.output(&x_in)?;
        let x = clean.cache.require(output)?.to_dtype(DType::F32)?;

        // Reconstruction statistics over kept positions.
        let kept_rows = keep.sum_all()?.to_scalar::<f32>()? as usize;
        let err = ((&x_hat - &x)?.broadcast_mul(&keep))?;
        sq_err += f64::from(err.sqr()?.sum_all()?.to_scalar::<f32>()?);
        let xk = x.broadcast_mul(&keep)?;
        sum_sq += f64::from(xk.sqr()?.sum_all()?.to_scalar::<f32>()?);
        for (s, v) in sum.iter_mut().zip(xk.sum((0, 1))?.to_vec1::<f32>()?) {
            *s += f64::from(v);
        }
        let on = acts.gt(0.0)?.to_dtype(DType::F32)?.broadcast_mul(&keep)?;
        active += f64::from(on.sum_all()?.to_scalar::<f32>()?);
        for (f, c) in fires.iter_mut().zip(on.sum((0, 1))?.to_vec1::<f32>()?) {
            *f += c as u64;
        }
        tokens += kept_rows;

        // The model with the reconstruction, and with the hook zeroed, at kept positions.
        let splice = |replacement: Tensor| -> Result<Tensor> {
            let keep = keep.clone();
            let f = move |v: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
                let r = replacement.to_dtype(v.dtype())?;
                let k = keep.to_dtype(v.dtype())?;
                v.broadcast_mul(&k.affine(-1.0, 1.0)?)?
                    .add(&r.broadcast_mul(&k)?)
            };
            let hooks = Hooks::new()
                .intervene(output, Intervention::new(InterventionOp::Func(Arc::new(f))));
            Ok(model.forward(&ids_tensor, &hooks)?.logits)
        };
        let sae_logits = splice(x_hat.clone())?;
        let zero_logits = splice(x_hat.zeros_like()?)?;
        let targets = ids_tensor.narrow(1, 1, ctx - 1)?.contiguous()?;
        let clean_lp = log_probs(&clean.logits, ctx)?;
        let sae_lp = log_probs(&sae_logits, ctx)?;
        let zero_lp = log_probs(&zero_logits, ctx)?;
        ce_clean += nll_sum(&clean_lp, &targets)?;
        ce_sae += nll_sum(&sae_lp, &targets)?;
        ce_zero += nll_sum(&zero_lp, &targets)?;
        kl_sae += kl_sum(&clean_lp, &sae_lp)?;
        kl_zero += kl_sum(&clean_lp, &zero_lp)?;
        predictions += n * (ctx - 1);
        done += n;
        progress(done, settings.windows);
    }
    if tokens == 0 {
        return Err(Error::InvalidArgument {
            what: "evaluation corpus",
            value: source.corpus().describe(),
            message: "gave no evaluable tokens".into(),
        });
    }
    let p = predictions as f64;
    let (ce_clean, ce_sae, ce_zero) = (ce_clean / p, ce_sae / p, ce_zero / p);
    let (kl_sae, kl_zero) = (kl_sae / p, kl_zero / p);
    // Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖².
    let mean_sq: f64 = sum.iter().map(|s| s * s).sum::<f64>() / tokens as f64;
    let total_variance = (sum_sq - mean_sq).max(f64::MIN_POSITIVE);
    let density: Vec<f64> = fires.iter().map(|&c| c as f64 / tokens as f64).collect();
    Ok(EvalReport {
        tokens,
        l0: active / tokens as f64,
        fvu: sq_err / total_variance,
        dead_fraction: density.iter().filter(|&&d| d == 0.0).count() as f64 / d_sae as f64,
        dense_fraction: density
            .iter()
            .filter(|&&d| d > settings.dense_threshold)
            .count() as f64
            / d_sae as f64,
        ce_clean,
        ce_sae,
        ce_zero,
        ce_loss_recovered: (ce_zero - ce_sae) / (ce_zero - ce_clean),
        kl_sae,
        kl_zero,
        kl_score: 1.0 - kl_sae / kl_zero,
        delta_lm_loss: ce_sae - ce_clean,
        density_histogram: histogram(&density, tokens),
    })
}

/// Half-decade bins from the rarest observable frequency (1/tokens) up to 1.
fn histogram(density: &[f64], tokens: usize) -> Vec<DensityBin> {
    let lowest = -((tokens as f64).log10() * 2.0).ceil() / 2.0;
    let bins = ((-lowest) * 2.0).round() as usize + 1;
    let mut out: Vec<DensityBin> = (0..bins)
        .map(|i| DensityBin {
            log10_from: lowest + 0.5 * i as f64,
            log10_to: lowest + 0.5 * (i + 1) as f64,
            latents: 0,
        })
        .collect();
    for &d in density.iter().filter(|&&d| d > 0.0) {
        let i = (((d.log10() - lowest) * 2.0).floor().max(0.0) as usize).min(bins - 1);
        out[i].latents += 1;
    }
    out
}

/// `[batch, ctx − 1, vocab]` log-probabilities of the predicting positions.
pub(crate) fn log_probs(logits: &Tensor, ctx: usize) -> Result<Tensor> {
    Ok(log_softmax(
        &logits.narrow(1, 0, ctx - 1)?.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

pub(crate) fn nll_sum(log_probs: &Tensor, targets: &Tensor) -> Result<f64> {
    let picked = log_probs.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    Ok(-f64::from(picked.sum_all()?.to_scalar::<f32>()?))
}

/// `Σ KL(p ‖ q)` over positions, from log-probabilities.
pub(crate) fn kl_sum(log_p: &Tensor, log_q: &Tensor) -> Result<f64> {
    let kl = (log_p.exp()? * (log_p - log_q)?)?;
    Ok(f64::from(kl.sum_all()?.to_scalar::<f32>()?))
}
