//! Which SAE features carry the difference between a clean and a corrupted prompt: activation
//! patching ([`crate::patching`]) in the SAE's basis, one feature at one token at a time.
//!
//! At the SAE's hook the value is `x = Σ_i f_i·W_dec[i] + b_dec + ε` (ε: the SAE's error).
//! Patching feature `i` at token `p` from the source run into the base run adds
//! `(f_i^source − f_i^base)·W_dec[i]` to the base run's `x` at `p`, leaving every other
//! feature and the error term as they were. Every such change is first estimated by
//! attribution patching — `Δf_i · (W_dec[i] · ∂metric/∂x)`, one backward pass for all
//! features and tokens — and the strongest estimates are then patched for real (one batch row
//! each). Two more runs bound the SAE's share: every feature's change at every token at once
//! (the error term kept from the base run), and the hook's whole value patched.
//!
//! A transcoder reads one hook and writes another ([`SaeSite`]): its features are read from
//! the input hook's value, and each change `Δf_i·W_dec[i]` lands at the output hook, beside the
//! transcoder's error there (its skip path, if any, is kept from the base run with the error).
//! The gradient is taken at the output hook, and the hook patched whole is the output hook.
//!
//! Scores are on the patching scale: 0 is the corrupted run, 1 the clean run.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};
use crate::patching::{Direction, PairedRuns, PatchRequest, metric_gradients};
use crate::sae::{Sae, SaeSite};

/// Patched runs per forward pass.
const BATCH: usize = 32;

/// One feature at one token.
#[derive(Clone, Debug, Serialize)]
pub struct FeatureEffect {
    pub feature: u32,
    pub position: usize,
    /// The feature's activation at `position` in each run.
    pub clean: f32,
    pub corrupted: f32,
    /// Attribution patching's estimate of the metric with this one feature patched.
    pub estimate: f32,
    /// The metric with this one feature patched.
    pub patched: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct FeaturePatchReport {
    /// The hook the features are read from.
    pub hook: String,
    /// The hook their changes are added at: `hook` for an SAE, a later one for a transcoder.
    pub hook_out: String,
    pub direction: Direction,
    /// The clean prompt's tokens (positions index them).
    pub tokens: Vec<String>,
    /// Every feature's change at every token patched at once; the SAE's error term as in the
    /// run patched into.
    pub all_features: f32,
    /// The hook's whole value patched at every token (features and error term).
    pub whole_hook: f32,
    /// (token, feature) pairs whose activation differs between the runs.
    pub changed: usize,
    /// The `top` changes with the largest estimated effect, patched, largest first.
    pub features: Vec<FeatureEffect>,
}

/// Finds the features of the SAE at `site` (a hook, or a transcoder's input and output hooks)
/// whose change between the runs moves the metric most; `request.sites` and
/// `request.attribution` are not used. `None` when cancelled.
pub fn patch_features(
    model: &Model,
    sae: &Sae,
    site: impl Into<SaeSite>,
    request: &PatchRequest,
    top: usize,
    cancel: &AtomicBool,
) -> Result<Option<FeaturePatchReport>> {
    let site = site.into();
    site.check(sae)?;
    for (point, width_wanted, what) in [
        (site.input, sae.d_in(), "d_in"),
        (site.output, sae.d_out(), "d_out"),
    ] {
        let width = model.hook_width(point)?;
        if width != width_wanted {
            return Err(Error::InvalidArgument {
                what: "SAE",
                value: format!("{what} {width_wanted}"),
                message: format!("`{point}` of {} is {width} wide", model.dir.display()),
            });
        }
    }
    let hook = site.output;
    let runs = PairedRuns::new(model, request, &[site.input, site.output])?;
    let metric = &runs.metric;
    let (base, source) = runs.base_and_source(request.direction);
    let base_ids = request.base_ids();
    // Features are read in f32 (f64 for an f64 model, so that the tests can check exactly).
    let work = if model.dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let sae = sae.to_dtype(work)?;
    let read = |cache: &crate::model::ActivationCache, point: HookPoint| -> Result<Tensor> {
        Ok(cache.require(point)?.get(0)?.to_dtype(work)?) // [seq, d]
    };
    let f_base = sae.encode(&read(&base.cache, site.input)?)?; // [seq, d_sae]
    let f_source = sae.encode(&read(&source.cache, site.input)?)?;
    // The value patched whole: the output hook's, which is the input's for an SAE.
    let (y_base, y_source) = (read(&base.cache, hook)?, read(&source.cache, hook)?);
    let (f_clean, f_corrupted) = match request.direction {
        Direction::Denoise => (&f_source, &f_base),
        Direction::Noise => (&f_base, &f_source),
    };
    let delta_f = (&f_source - &f_base)?;
    let grad = metric_gradients(model, base_ids, metric, &[hook])?
        .remove(0)
        .to_dtype(work)?; // [seq, d]
    // Each feature's decoder direction read by the gradient, times its change.
    let along = grad.matmul(&sae.w_dec.t()?)?; // [seq, d_sae]
    let estimates = (&delta_f * &along)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    // Each feature's change at each token, read once: which changed, and by how much.
    let changes = delta_f.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let span = metric.clean - metric.corrupted;
    let unpatched = request.direction.unpatched();
    let mut ranked: Vec<(usize, usize, f32)> = estimates
        .iter()
        .enumerate()
        .flat_map(|(p, row)| row.iter().enumerate().map(move |(i, &e)| (p, i, e)))
        .filter(|&(p, i, _)| changes[p][i] != 0.0)
        .collect();
    let changed = ranked.len();
    ranked.sort_by(|a, b| b.2.abs().total_cmp(&a.2.abs()));
    ranked.truncate(top);

    // Patched for real: row r adds its feature's change at its token.
    let seq = base_ids.len();
    let mut patched = Vec::with_capacity(ranked.len());
    for chunk in ranked.chunks(BATCH) {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let rows = chunk.len();
        let ids: Vec<u32> = chunk.iter().map(|&(_, i, _)| i as u32).collect();
        let amounts: Vec<f32> = chunk.iter().map(|&(p, i, _)| changes[p][i]).collect();
        let mut at = vec![0f32; rows * seq];
        for (r, &(p, _, _)) in chunk.iter().enumerate() {
            at[r * seq + p] = 1.0;
        }
        let device = &model.device;
        let directions = sae
            .w_dec
            .index_select(&Tensor::new(ids.as_slice(), device)?, 0)?; // [rows, d]
        let amounts = Tensor::from_vec(amounts, (rows, 1), device)?.to_dtype(work)?;
        let at = Tensor::from_vec(at, (rows, seq, 1), device)?.to_dtype(work)?;
        let shift = at.broadcast_mul(&directions.broadcast_mul(&amounts)?.unsqueeze(1)?)?;
        let logits = model
            .forward(
                &model.ids_tensor(base_ids)?.repeat((rows, 1))?,
                &Hooks::new().intervene(hook, Intervention::new(InterventionOp::Add(shift))),
            )?
            .logits;
        patched.extend(metric.normalised(&logits)?);
    }
    let one_run = |shift: Tensor| -> Result<f32> {
        let logits = model
            .forward(
                &model.ids_tensor(base_ids)?,
                &Hooks::new().intervene(
                    hook,
                    Intervention::new(InterventionOp::Add(shift.unsqueeze(0)?)),
                ),
            )?
            .logits;
        Ok(metric.normalised(&logits)?[0])
    };
    let all_features = one_run(delta_f.matmul(&sae.w_dec)?)?;
    let whole_hook = one_run((&y_source - &y_base)?)?;
    let activation = |f: &Tensor, p: usize, i: usize| -> Result<f32> {
        Ok(f.i((p, i))?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
    };
    let features = ranked
        .iter()
        .zip(patched)
        .map(|(&(p, i, e), patched)| {
            Ok(FeatureEffect {
                feature: i as u32,
                position: p,
                clean: activation(f_clean, p, i)?,
                corrupted: activation(f_corrupted, p, i)?,
                estimate: unpatched + e / span,
                patched,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(FeaturePatchReport {
        hook: site.input.to_string(),
        hook_out: site.output.to_string(),
        direction: request.direction,
        tokens: model.tokenizer.tokens_display(&request.clean),
        all_features,
        whole_hook,
        changed,
        features,
    }))
}
