//! MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): many facts at once,
//! spread over several layers.
//!
//! Each fact gets a target residual `z` at the last edit layer (its value at the key token
//! plus an optimised δ, the same losses as ROME's v*). Then, layer by layer from the first,
//! with the earlier layers already updated: keys `K` (averaged over the context templates),
//! residuals `R = (z − z_now) / (layers left)`, and the update
//! `ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`, solved in `f64` by Cholesky (`λ`: how many corpus keys' worth
//! the preserved statistics weigh; MEMIT's GPT-J value is 15,000).

use serde::Serialize;

use super::covariance::KeyCovariance;
use super::history::LayerDelta;
use super::rome::{
    KeyPosition, Request, RomeSettings, mean_key, optimise_value, solve_spd, value_at,
};
use crate::causal::locate_subject;
use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Model};

/// MEMIT's knobs beyond ROME's v* settings.
#[derive(Clone, Debug, Serialize)]
pub struct MemitSettings {
    /// λ, the weight of the preserved key statistics against the new keys.
    pub covariance_weight: f64,
    /// Hold the MLP output at the edit prompts' other tokens ("The", " capital", " of",
    /// " is") and their answers' tokens: their keys join the solve with a zero residual,
    /// exactly kept with the default write at plain keys and pulled toward no change with
    /// `residual_at_mean_key`. λC keeps keys in general; these are the ones every fact of
    /// a batch shares, where fifty residuals would otherwise add up.
    pub guard_prompt_tokens: bool,
    /// A guard key joins only when this share of its norm lies outside the keys already
    /// held, in (0, 1). Keys of one prefix computed in two sequences differ by float noise,
    /// and a guard matching a fact's own key would make the solve singular, so it must stay
    /// well above that noise (1e-3 takes every distinct key).
    pub guard_novelty: f64,
    /// ‖δ‖ of the residual target z, in units of the last layer's residual norm: MEMIT's
    /// `clamp_norm_factor` 0.75 (ROME's 4 bounds an MLP output; z is the whole residual).
    pub clamp_norm: f64,
}

impl Default for MemitSettings {
    fn default() -> Self {
        Self {
            covariance_weight: 15_000.0,
            guard_prompt_tokens: true,
            guard_novelty: 0.2,
            clamp_norm: 0.75,
        }
    }
}

/// What a batch edit did.
#[derive(Clone, Debug)]
pub struct MemitEdit {
    pub deltas: Vec<LayerDelta>,
    /// Ridge added per layer (0: none).
    pub ridges: Vec<f64>,
    /// Each request's target residual z at the last layer's key token.
    pub targets: Vec<Vec<f64>>,
    /// Mean target NLL over the requests before and after optimising their z.
    pub nll_before: f32,
    pub nll_after: f32,
}

/// Computes the MEMIT edit of `requests` at `layers` (ascending, with `covs[i]` the key
/// statistics of `layers[i]`). Each layer's update is computed on the model with the earlier
/// layers' updates in place, so the model is edited as it goes; it is given back with its
/// weights as they were, and the deltas are for [`super::history::EditHistory::apply`].
#[allow(clippy::too_many_arguments)] // the algorithm's inputs, each used once
pub fn compute_batch(
    model: &mut Model,
    requests: &[Request],
    layers: &[usize],
    key: KeyPosition,
    covs: &[&KeyCovariance],
    contexts: &[String],
    settings: &RomeSettings,
    memit: &MemitSettings,
    mut on_progress: impl FnMut(&str),
) -> Result<MemitEdit> {
    if requests.is_empty() || layers.is_empty() || covs.len() != layers.len() {
        return Err(Error::InvalidArgument {
            what: "MEMIT batch",
            value: format!(
                "{} requests, {} layers, {} covariances",
                requests.len(),
                layers.len(),
                covs.len()
            ),
            message: "needs at least one request and one covariance per layer".into(),
        });
    }
    for &l in layers {
        super::check_layer(model, l)?;
        if model.transformer.blocks[l].post_norms.is_some() {
            // MEMIT shares the residual change out among the layers' MLP outputs as sums; a
            // norm between the down projection and the stream (Gemma 2, OLMo 2) makes that
            // nonlinear.
            return Err(Error::InvalidArgument {
                what: "MEMIT layer",
                value: l.to_string(),
                message: "this model normalises each MLP's output before the residual stream \
                          (Gemma 2, OLMo 2), which MEMIT's spreading of the change over layers \
                          does not model; edit one layer with ROME instead"
                    .into(),
            });
        }
    }
    if !(1e-6..1.0).contains(&memit.guard_novelty) {
        return Err(Error::InvalidArgument {
            what: "guard novelty",
            value: memit.guard_novelty.to_string(),
            message: "must lie in [1e-6, 1): a share of a key's norm".into(),
        });
    }
    if layers.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::InvalidArgument {
            what: "layers",
            value: format!("{layers:?}"),
            message: "must be strictly ascending".into(),
        });
    }
    let z_layer = layers[layers.len() - 1];
    let z_point = HookPoint::ResidPost(z_layer);
    let z_settings = RomeSettings {
        clamp_norm: memit.clamp_norm,
        ..settings.clone()
    };
    // Target residuals z at the last layer.
    let mut zs = Vec::with_capacity(requests.len());
    let (mut nll_before, mut nll_after) = (0f32, 0f32);
    for (i, r) in requests.iter().enumerate() {
        on_progress(&format!(
            "target {}/{}: {:?}",
            i + 1,
            requests.len(),
            r.subject
        ));
        r.check()?;
        let (z, before, after) = optimise_value(
            model,
            r,
            &r.in_contexts(contexts),
            z_point,
            key,
            &z_settings,
        )?;
        zs.push(z);
        nll_before += before / requests.len() as f32;
        nll_after += after / requests.len() as f32;
    }
    let originals: Vec<candle_core::Tensor> = layers
        .iter()
        .map(|&l| model.transformer.blocks[l].mlp.down_proj().weight().clone())
        .collect();
    let result = update_layers(
        model,
        requests,
        layers,
        key,
        covs,
        contexts,
        memit,
        !settings.residual_at_mean_key,
        &zs,
        &mut on_progress,
    );
    for (&l, w) in layers.iter().zip(originals) {
        model.transformer.blocks[l].mlp.set_down_proj_weight(w);
    }
    let (deltas, ridges) = result?;
    Ok(MemitEdit {
        deltas,
        ridges,
        targets: zs,
        nll_before,
        nll_after,
    })
}

/// ROME's key choice carried to a batch: the update keeps MEMIT's directions `X = A⁻¹K̄` but
/// writes each residual exactly at its plain prompt's key. With `G = K_plainᵀ X`, the update
/// `ΔW = R' Xᵀ` gives `ΔW k_plain,i = r_i` when `R' = R G⁻ᵀ` (for one edit and λ → ∞ this is
/// ROME's `u = C⁻¹k̄`, `ΔW k_plain = r`). Returns the columns of `R'`.
fn residuals_at_plain_keys(
    directions: &[Vec<f64>],
    plain_keys: &[Vec<f64>],
    resids: Vec<Vec<f64>>,
    layer: usize,
) -> Result<Vec<Vec<f64>>> {
    use ndarray::{Array1, Array2};
    use ndarray_linalg::{FactorizeInto, Solve};
    let n = directions.len();
    // G[i][j] = k_plain,i · x_j, factorised once; each output row o of R' solves
    // G y = (r_i[o])_i.
    let g = Array2::from_shape_fn((n, n), |(i, j)| {
        plain_keys[i]
            .iter()
            .zip(&directions[j])
            .map(|(k, x)| k * x)
            .sum::<f64>()
    });
    let singular = |why: String| Error::InvalidArgument {
        what: "MEMIT keys",
        value: format!("layer {layer}"),
        message: format!(
            "the edits' plain keys are degenerate ({why}); try --residual-at-mean-key"
        ),
    };
    let lu = g.factorize_into().map_err(|e| singular(e.to_string()))?;
    let d_out = resids.first().map_or(0, Vec::len);
    let mut out = vec![vec![0f64; d_out]; n];
    for o in 0..d_out {
        let rhs = Array1::from_iter(resids.iter().map(|r| r[o]));
        let x = lu.solve(&rhs).map_err(|e| singular(e.to_string()))?;
        if !x.iter().all(|v| v.is_finite()) {
            return Err(singular("the solve is not finite".into()));
        }
        for (col, v) in out.iter_mut().zip(x) {
            col[o] = v;
        }
    }
    Ok(out)
}

/// The keys at `layer` of every token of `text` but the `key` token of its first
/// `prompt_len` bytes (the prompt, holding `subject`; the rest is its answer).
fn other_token_keys(
    model: &Model,
    text: &str,
    subject: &str,
    layer: usize,
    key: KeyPosition,
    prompt_len: usize,
) -> Result<Vec<Vec<f64>>> {
    let (ids, span) = locate_subject(model, text, subject)?;
    let prompt_tokens = model.encode_prompt(&text[..prompt_len])?.len();
    let skip = key.index(prompt_tokens, &span);
    let point = HookPoint::MlpPost(layer);
    let out = model.forward(&model.ids_tensor(&ids)?, &Hooks::new().capture([point]))?;
    let rows = out
        .cache
        .require(point)?
        .get(0)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec2::<f64>()?;
    Ok(rows
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| i != skip)
        .map(|(_, k)| k)
        .collect())
}

/// An orthonormal basis of the keys taken so far (Gram–Schmidt).
#[derive(Default)]
struct Span {
    basis: Vec<Vec<f64>>,
}

impl Span {
    /// The part of `k` outside the span.
    fn residual(&self, k: &[f64]) -> Vec<f64> {
        let mut r = k.to_vec();
        for b in &self.basis {
            let dot: f64 = r.iter().zip(b).map(|(x, y)| x * y).sum();
            for (x, y) in r.iter_mut().zip(b) {
                *x -= dot * y;
            }
        }
        r
    }

    /// ‖k outside the span‖ / ‖k‖: 0 for a key already held (a shared prefix computed in
    /// two sequences), 1 for one orthogonal to all.
    fn novelty(&self, k: &[f64]) -> f64 {
        let norm = k.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        self.residual(k).iter().map(|x| x * x).sum::<f64>().sqrt() / norm
    }

    fn add(&mut self, k: &[f64]) {
        let r = self.residual(k);
        let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-12 {
            self.basis.push(r.into_iter().map(|x| x / norm).collect());
        }
    }
}

/// The layer-by-layer updates (applied to `model` as they are made).
#[allow(clippy::too_many_arguments)]
fn update_layers(
    model: &mut Model,
    requests: &[Request],
    layers: &[usize],
    key: KeyPosition,
    covs: &[&KeyCovariance],
    contexts: &[String],
    memit: &MemitSettings,
    at_plain_keys: bool,
    zs: &[Vec<f64>],
    on_progress: &mut impl FnMut(&str),
) -> Result<(Vec<LayerDelta>, Vec<f64>)> {
    let z_point = HookPoint::ResidPost(layers[layers.len() - 1]);
    // Each request's prompt and its context versions, the same at every layer.
    let texts: Vec<(String, Vec<String>)> = requests
        .iter()
        .map(|r| (r.text(), r.in_contexts(contexts)))
        .collect();
    let mut deltas = Vec::with_capacity(layers.len());
    let mut ridges = Vec::with_capacity(layers.len());
    for (li, (&layer, cov)) in layers.iter().zip(covs).enumerate() {
        on_progress(&format!("layer {layer} ({}/{})", li + 1, layers.len()));
        // Keys at this layer and the residuals still to write, on the model as edited so far.
        let mut keys = Vec::with_capacity(requests.len());
        let mut plain_keys = Vec::with_capacity(requests.len());
        let mut resids = Vec::with_capacity(requests.len());
        for ((r, (prompt, prompts)), z) in requests.iter().zip(&texts).zip(zs) {
            let k = mean_key(model, &r.subject, prompt, prompts, layer, key)?;
            keys.push(k.mean);
            plain_keys.push(k.plain);
            let (now, _) = value_at(model, prompt, prompt, &r.subject, z_point, key)?;
            let left = (layers.len() - li) as f64;
            resids.push(
                z.iter()
                    .zip(now)
                    .map(|(z, n)| (z - n) / left)
                    .collect::<Vec<f64>>(),
            );
        }
        if memit.guard_prompt_tokens {
            // A guard nearly in the span of the keys already held adds little and makes the
            // solve ill-conditioned (fifty " is" keys after fifty subjects are nearly
            // alike), which amplifies the update on keys just outside that span.
            let mut span = Span::default();
            for k in &plain_keys {
                span.add(k);
            }
            let mut guards: Vec<Vec<f64>> = Vec::new();
            for (r, (prompt, _)) in requests.iter().zip(&texts) {
                // The target's own tokens too: they follow the prompt when it is scored.
                let answered = format!("{prompt}{}", r.target);
                for g in other_token_keys(model, &answered, &r.subject, layer, key, prompt.len())? {
                    if span.novelty(&g) > memit.guard_novelty {
                        span.add(&g);
                        guards.push(g);
                    }
                }
            }
            let d_out = resids[0].len();
            for g in guards {
                keys.push(g.clone());
                plain_keys.push(g);
                resids.push(vec![0.0; d_out]);
            }
        }
        // A = λC + K Kᵀ; X = A⁻¹ K (one column per key).
        let mut a = cov.matrix()?;
        a *= memit.covariance_weight;
        let stacked = ndarray::Array2::from_shape_fn((keys.len(), cov.d), |(r, c)| keys[r][c]);
        a += &stacked.t().dot(&stacked);
        let (adj, ridge) = solve_spd(&a, &keys, layer)?;
        ridges.push(ridge);
        if at_plain_keys {
            resids = residuals_at_plain_keys(&adj, &plain_keys, resids, layer)?;
        }
        // ΔW = Σ_i r_i x_iᵀ, [d_model, d_mlp].
        let d_out = resids[0].len();
        let mut delta = vec![0f64; d_out * cov.d];
        for (r, x) in resids.iter().zip(&adj) {
            for (o, ro) in r.iter().enumerate() {
                let row = &mut delta[o * cov.d..(o + 1) * cov.d];
                for (dv, xv) in row.iter_mut().zip(x) {
                    *dv += ro * xv;
                }
            }
        }
        let delta: Vec<f32> = delta.into_iter().map(|v| v as f32).collect();
        let mlp = &mut model.transformer.blocks[layer].mlp;
        let w = mlp.down_proj().weight();
        let update =
            candle_core::Tensor::from_slice(&delta, w.dims(), w.device())?.to_dtype(w.dtype())?;
        let edited = (w + update)?;
        mlp.set_down_proj_weight(edited);
        deltas.push(LayerDelta { layer, delta });
    }
    Ok((deltas, ridges))
}

#[cfg(test)]
mod tests {
    use super::Span;

    #[test]
    fn a_key_in_the_span_is_not_new_and_an_orthogonal_one_is() {
        let mut span = Span::default();
        span.add(&[1.0, 0.0, 0.0]);
        span.add(&[1.0, 1.0, 0.0]);
        assert!(span.novelty(&[3.0, -2.0, 0.0]) < 1e-12);
        assert!((span.novelty(&[0.0, 0.0, 5.0]) - 1.0).abs() < 1e-12);
        // Half its norm's square outside: novelty 1/√2.
        let n = span.novelty(&[0.0, 1.0, 1.0]);
        assert!((n - 0.5f64.sqrt()).abs() < 1e-12, "{n}");
        assert_eq!(span.novelty(&[0.0, 0.0, 0.0]), 0.0);
        // A key already held adds no direction.
        span.add(&[2.0, 2.0, 0.0]);
        assert_eq!(span.basis.len(), 2);
    }
}
