//! ROME's closed-form rank-one edit (Meng et al. 2022), on the down projection of one layer.
//!
//! With keys `k` (inputs of the down projection, `mlp.hook_post`) whose second moment is `C`,
//! the edit that maps the subject's key `k*` to the wanted value `v*` while disturbing other
//! keys least (in the `C⁻¹` metric) is
//! `W' = W + (v* − W k*) uᵀ / (uᵀ k*)`, `u = C⁻¹ k*`.
//! `C⁻¹ k*` is solved through a Cholesky factorisation (ndarray-linalg, LAPACK); when `C` is
//! not positive definite enough to factorise, `λ·(tr C / d)·I` is added with growing `λ`, and
//! the `λ` used is reported.

use candle_core::{D, DType, Tensor};
use ndarray::{Array1, Array2};
use ndarray_linalg::{FactorizeC, SolveC, UPLO};

use super::check_layer;
use super::covariance::KeyCovariance;
use crate::causal::{locate_subject, target_tokens};
use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

/// `u = C⁻¹ k` and the ridge `λ` (0 when none was needed).
pub fn solve_key(cov: &KeyCovariance, k: &[f64]) -> Result<(Vec<f64>, f64)> {
    let d = cov.d;
    if k.len() != d {
        return Err(Error::InvalidArgument {
            what: "key",
            value: format!("{} values", k.len()),
            message: format!("the covariance is {d}×{d}"),
        });
    }
    let c =
        Array2::from_shape_vec((d, d), cov.values.clone()).map_err(|e| Error::InvalidArgument {
            what: "covariance",
            value: format!("{} values", cov.values.len()),
            message: e.to_string(),
        })?;
    let mean_diag = (0..d).map(|i| c[[i, i]]).sum::<f64>() / d as f64;
    let k = Array1::from_vec(k.to_vec());
    for lambda in [0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0] {
        let mut m = c.clone();
        for i in 0..d {
            m[[i, i]] += lambda * mean_diag.max(f64::MIN_POSITIVE);
        }
        if let Ok(factor) = m.factorizec(UPLO::Lower)
            && let Ok(u) = factor.solvec(&k)
            && u.iter().all(|v| v.is_finite())
        {
            return Ok((u.to_vec(), lambda));
        }
    }
    Err(Error::InvalidArgument {
        what: "covariance",
        value: format!("layer {}", cov.layer),
        message: "cannot be factorised even with a ridge of its mean diagonal".into(),
    })
}

/// The rank-one change `Δ` (`[d_out, d_in]`, row-major, Linear layout `W: [out, in]`) that
/// makes `(W + Δ) k = v`, along `u` (`u = C⁻¹ k`).
pub fn rank_one_update(
    w: &[f32],
    d_out: usize,
    k: &[f64],
    v: &[f64],
    u: &[f64],
) -> Result<Vec<f32>> {
    let d_in = k.len();
    if w.len() != d_out * d_in || v.len() != d_out || u.len() != d_in {
        return Err(Error::InvalidArgument {
            what: "rank-one update",
            value: format!(
                "W {} values, k {d_in}, v {}, u {}",
                w.len(),
                v.len(),
                u.len()
            ),
            message: format!("expected W {d_out}×{d_in}"),
        });
    }
    let uk: f64 = u.iter().zip(k).map(|(a, b)| a * b).sum();
    if uk.abs() < 1e-30 || !uk.is_finite() {
        return Err(Error::InvalidArgument {
            what: "key",
            value: format!("uᵀk = {uk}"),
            message: "the key has no weight under C⁻¹: nothing to edit along".into(),
        });
    }
    let mut delta = vec![0f32; d_out * d_in];
    for (o, row) in delta.chunks_mut(d_in).enumerate() {
        let wk: f64 = w[o * d_in..(o + 1) * d_in]
            .iter()
            .zip(k)
            .map(|(a, b)| f64::from(*a) * b)
            .sum();
        let r = (v[o] - wk) / uk;
        for (x, ui) in row.iter_mut().zip(u) {
            *x = (r * ui) as f32;
        }
    }
    Ok(delta)
}

/// ROME's hyper-parameters (the reference implementation's values for GPT-2).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RomeSettings {
    /// Adam steps optimising v*.
    pub v_steps: usize,
    pub v_lr: f64,
    /// Weight of the KL term that keeps "{subject} is a" predictions (essence drift).
    pub kl_factor: f64,
    /// Weight of ‖δ‖² / ‖v₀‖².
    pub weight_decay: f64,
    /// ‖δ‖ is clamped to this many ‖v₀‖.
    pub clamp_norm: f64,
}

impl Default for RomeSettings {
    fn default() -> Self {
        Self {
            v_steps: 20,
            v_lr: 0.5,
            kl_factor: 0.0625,
            weight_decay: 0.5,
            clamp_norm: 4.0,
        }
    }
}

/// Which token's key the edit is written at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPosition {
    /// The subject's last token: ROME proper.
    SubjectLast,
    /// The prompt's last token, for models that look facts up there.
    PromptLast,
}

impl KeyPosition {
    /// The position in `ids` (a prompt whose subject spans `subject`).
    fn index(self, ids_len: usize, subject: &std::ops::Range<usize>) -> usize {
        match self {
            KeyPosition::SubjectLast => subject.end - 1,
            KeyPosition::PromptLast => ids_len - 1,
        }
    }
}

/// One fact to write: `prompt` holds `{}` where `subject` goes; `target` follows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Request {
    pub prompt: String,
    pub subject: String,
    pub target: String,
}

/// A computed edit: where it goes and the weight change.
#[derive(Clone, Debug)]
pub struct RomeEdit {
    pub layer: usize,
    /// `[d_model, d_mlp]`, Linear layout, `f32`.
    pub delta: Vec<f32>,
    /// The ridge the covariance needed (0: none).
    pub ridge: f64,
    /// NLL of the target on the rewriting prompts before and after optimising v*.
    pub nll_before: f32,
    pub nll_after: f32,
    /// v*: the MLP output the edited layer now gives at the key's token.
    pub value: Vec<f64>,
    pub key: KeyPosition,
    /// The key token's position in the plain prompt.
    pub key_index: usize,
}

/// The key (`mlp.hook_post` of `layer`) at the `key` token of `prompt`, and that token's
/// position.
fn key_at(
    model: &Model,
    prompt: &str,
    subject: &str,
    layer: usize,
    key: KeyPosition,
) -> Result<(Vec<f64>, usize)> {
    let (ids, span) = locate_subject(model, prompt, subject)?;
    let index = key.index(ids.len(), &span);
    let point = HookPoint::MlpPost(layer);
    let out = model.forward(&model.ids_tensor(&ids)?, &Hooks::new().capture([point]))?;
    let v = out
        .cache
        .get(point)
        .ok_or_else(|| Error::UnknownHook {
            name: point.to_string(),
            valid: String::new(),
        })?
        .get(0)?
        .get(index)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok((v, index))
}

/// Computes ROME's edit of `request` at `layer` and the `key` token (statistics `cov` of that
/// layer's keys), averaging the key over `contexts` (prefix templates with `{}` for the
/// prompt, the first being `"{}"`).
pub fn compute_edit(
    model: &Model,
    request: &Request,
    layer: usize,
    key: KeyPosition,
    cov: &KeyCovariance,
    contexts: &[String],
    settings: &RomeSettings,
) -> Result<RomeEdit> {
    if request.target.trim().is_empty() {
        return Err(Error::InvalidArgument {
            what: "target",
            value: request.target.clone(),
            message: "is empty: nothing to write".into(),
        });
    }
    check_layer(model, layer)?;
    let prompt = request.prompt.replace("{}", &request.subject);
    let prompts: Vec<String> = contexts.iter().map(|c| c.replace("{}", &prompt)).collect();
    // The key of the plain prompt, and k̄ over the context templates.
    let (k_cur, key_index) = key_at(model, &prompt, &request.subject, layer, key)?;
    let mut k_mean = vec![0f64; cov.d];
    for p in &prompts {
        let k = if *p == prompt {
            k_cur.clone()
        } else {
            key_at(model, p, &request.subject, layer, key)?.0
        };
        for (m, v) in k_mean.iter_mut().zip(k) {
            *m += v / prompts.len() as f64;
        }
    }
    let (u, ridge) = solve_key(cov, &k_mean)?;

    let v_star = optimise_value(model, request, &prompts, layer, key, settings)?;
    let (target, nll_before, nll_after) = v_star;
    let down = model.transformer.blocks[layer].mlp.down_proj();
    let w = down
        .weight()
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bias: Vec<f64> = match down.bias() {
        Some(b) => b
            .to_dtype(DType::F64)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1()?,
        None => vec![0.0; target.len()],
    };
    let v: Vec<f64> = target.iter().zip(&bias).map(|(t, b)| t - b).collect();
    let delta = rank_one_update(&w, v.len(), &k_cur, &v, &u)?;
    Ok(RomeEdit {
        layer,
        delta,
        ridge,
        nll_before,
        nll_after,
        value: target,
        key,
        key_index,
    })
}

/// v*: the MLP output at the key token that makes the target likely, found by
/// optimising an offset δ added there (NLL of the target over the rewriting prompts + KL on
/// "{subject} is a" + weight decay, Adam, norm clamp). Returns v* = v₀ + δ and the NLL before
/// and after.
fn optimise_value(
    model: &Model,
    request: &Request,
    prompts: &[String],
    layer: usize,
    key: KeyPosition,
    settings: &RomeSettings,
) -> Result<(Vec<f64>, f32, f32)> {
    use candle_nn::Optimizer;
    let device = &model.device;
    let point = HookPoint::MlpOut(layer);
    let d = model.dims().d_model;
    // Teacher-forced inputs: prompt + target tokens but the last.
    struct Case {
        input: Tensor,
        /// Where δ goes: the key token.
        at: usize,
        targets: Vec<(usize, u32)>,
    }
    let mut cases = Vec::new();
    for p in prompts {
        let (ids, span) = locate_subject(model, p, &request.subject)?;
        let target_ids = target_tokens(model, p, &request.target)?;
        let mut full = ids.clone();
        full.extend(&target_ids);
        let targets: Vec<(usize, u32)> =
            (ids.len()..full.len()).map(|i| (i - 1, full[i])).collect();
        cases.push(Case {
            input: model.ids_tensor(&full[..full.len() - 1])?,
            at: key.index(ids.len(), &span),
            targets,
        });
    }
    // The essence prompt for the KL term.
    let essence = format!("{} is a", request.subject);
    let (essence_ids, essence_span) = locate_subject(model, &essence, &request.subject)?;
    let essence_input = model.ids_tensor(&essence_ids)?;
    let last_log_probs = |logits: &Tensor| -> candle_core::Result<Tensor> {
        let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
        candle_nn::ops::log_softmax(&last.to_dtype(DType::F32)?, D::Minus1)
    };
    let essence_orig =
        last_log_probs(&model.forward(&essence_input, &Hooks::new())?.logits)?.detach();

    // v₀: the clean MLP output at the subject's last token of the first prompt.
    let clean = model.forward(&cases[0].input, &Hooks::new().capture([point]))?;
    let v0 = clean
        .cache
        .get(point)
        .ok_or_else(|| Error::UnknownHook {
            name: point.to_string(),
            valid: String::new(),
        })?
        .get(0)?
        .get(cases[0].at)?
        .to_dtype(DType::F32)?;
    let v0_norm = v0.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;

    let delta = candle_core::Var::zeros(d, DType::F32, device)?;
    let mut adam = candle_nn::optim::AdamW::new(
        vec![delta.clone()],
        candle_nn::optim::ParamsAdamW {
            lr: settings.v_lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let nll = |with_delta: bool| -> Result<Tensor> {
        let mut total = Tensor::zeros((), DType::F32, device)?;
        for c in &cases {
            let mut hooks = Hooks::new().differentiable();
            if with_delta {
                hooks = hooks.intervene(
                    point,
                    Intervention::new(InterventionOp::Add(delta.as_tensor().clone()))
                        .at_positions(vec![c.at as i64]),
                );
            }
            let logits = model.forward(&c.input, &hooks)?.logits.get(0)?;
            let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
            let mut sum = Tensor::zeros((), DType::F32, device)?;
            for &(pos, id) in &c.targets {
                sum = (sum - log_probs.get(pos)?.get(id as usize)?)?;
            }
            total = (total + (sum / c.targets.len() as f64)?)?;
        }
        Ok((total / cases.len() as f64)?)
    };
    let nll_before = nll(false)?.to_scalar::<f32>()?;
    for _ in 0..settings.v_steps {
        let essence_hooks = Hooks::new().differentiable().intervene(
            point,
            Intervention::new(InterventionOp::Add(delta.as_tensor().clone()))
                .at_positions(vec![key.index(essence_ids.len(), &essence_span) as i64]),
        );
        let essence_new = last_log_probs(&model.forward(&essence_input, &essence_hooks)?.logits)?;
        // KL(orig ‖ new) = Σ p_orig (log p_orig − log p_new).
        let kl = (essence_orig.exp()? * (&essence_orig - &essence_new)?)?.sum_all()?;
        let decay = (delta.as_tensor().sqr()?.sum_all()? / (v0_norm * v0_norm).max(1e-12))?;
        let loss = ((nll(true)? + (kl * settings.kl_factor)?)? + (decay * settings.weight_decay)?)?;
        adam.backward_step(&loss)?;

        // Clamp ‖δ‖ to clamp_norm · ‖v₀‖.
        let norm = delta
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        let max = settings.clamp_norm * v0_norm;
        if norm > max {
            delta.set(&(delta.as_tensor() * (max / norm))?)?;
        }
    }
    let nll_after = nll(true)?.to_scalar::<f32>()?;
    let v_star = (v0 + delta.as_tensor())?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok((v_star, nll_before, nll_after))
}

/// Adds `edit` to the model's weights (`sign` 1.0) or takes it away (−1.0).
pub fn apply(model: &mut Model, edit: &RomeEdit, sign: f32) -> Result<()> {
    let mlp = &mut model.transformer.blocks[edit.layer].mlp;
    let w = mlp.down_proj().weight().clone();
    let delta = Tensor::from_vec(
        edit.delta.iter().map(|d| d * sign).collect::<Vec<f32>>(),
        w.dims(),
        w.device(),
    )?
    .to_dtype(w.dtype())?;
    mlp.set_down_proj_weight((w + delta)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn the_edit_maps_the_key_to_the_value_and_spares_c_orthogonal_keys() {
        let (d_in, d_out) = (12, 5);
        let mut seed = 7;
        // C = XᵀX/n from random keys: symmetric positive definite.
        let n = 40;
        let x: Vec<f64> = (0..n * d_in).map(|_| lcg(&mut seed)).collect();
        let mut c = vec![0f64; d_in * d_in];
        for row in x.chunks(d_in) {
            for i in 0..d_in {
                for j in 0..d_in {
                    c[i * d_in + j] += row[i] * row[j] / n as f64;
                }
            }
        }
        let cov = KeyCovariance {
            layer: 0,
            d: d_in,
            samples: n as u64,
            values: c.clone(),
        };
        let k: Vec<f64> = (0..d_in).map(|_| lcg(&mut seed)).collect();
        let v: Vec<f64> = (0..d_out).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f32> = (0..d_out * d_in).map(|_| lcg(&mut seed) as f32).collect();
        let (u, lambda) = solve_key(&cov, &k).unwrap();
        assert_eq!(lambda, 0.0);
        // C u = k.
        for i in 0..d_in {
            let cu: f64 = (0..d_in).map(|j| c[i * d_in + j] * u[j]).sum();
            assert!((cu - k[i]).abs() < 1e-9);
        }
        let delta = rank_one_update(&w, d_out, &k, &v, &u).unwrap();
        let apply = |key: &[f64], with_delta: bool| -> Vec<f64> {
            (0..d_out)
                .map(|o| {
                    (0..d_in)
                        .map(|i| {
                            let wi = f64::from(w[o * d_in + i])
                                + if with_delta {
                                    f64::from(delta[o * d_in + i])
                                } else {
                                    0.0
                                };
                            wi * key[i]
                        })
                        .sum()
                })
                .collect()
        };
        for (got, want) in apply(&k, true).iter().zip(&v) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // A key with uᵀk' = 0 is mapped as before.
        let other: Vec<f64> = (0..d_in).map(|_| lcg(&mut seed)).collect();
        let uo: f64 = u.iter().zip(&other).map(|(a, b)| a * b).sum();
        let uu: f64 = u.iter().map(|a| a * a).sum();
        let orth: Vec<f64> = other
            .iter()
            .zip(&u)
            .map(|(o, ui)| o - uo / uu * ui)
            .collect();
        for (a, b) in apply(&orth, true).iter().zip(apply(&orth, false)) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn a_singular_covariance_is_regularised_and_says_so() {
        // Rank one: every key along the same direction.
        let d = 4;
        let dir = [1.0, 2.0, -1.0, 0.5];
        let values: Vec<f64> = (0..d * d).map(|i| dir[i / d] * dir[i % d]).collect();
        let cov = KeyCovariance {
            layer: 3,
            d,
            samples: 10,
            values,
        };
        let (u, lambda) = solve_key(&cov, &[0.0, 1.0, 0.0, 0.0]).unwrap();
        assert!(lambda > 0.0);
        assert!(u.iter().all(|x| x.is_finite()));
        assert!(solve_key(&cov, &[1.0]).is_err());
    }
}
