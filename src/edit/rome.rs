//! ROME's closed-form rank-one edit (Meng et al. 2022), on the down projection of one layer.
//!
//! With keys `k` (inputs of the down projection, `mlp.hook_post`) whose second moment is `C`,
//! the edit that maps the subject's key `k*` to the wanted value `v*` while disturbing other
//! keys least (in the `C⁻¹` metric) is
//! `W' = W + (v* − W k*) uᵀ / (uᵀ k*)`, `u = C⁻¹ k*`.
//! `C⁻¹ k*` is solved through a Cholesky factorisation (ndarray-linalg, LAPACK); when `C` is
//! not positive definite enough to factorise, `λ·(tr C / d)·I` is added with growing `λ`, and
//! the `λ` used is reported.
//!
//! `u` comes from `k̄`, the key averaged over context-prefix templates. The residual `v* − W k`
//! and the denominator `uᵀk` take the plain prompt's own key, as in ROME's reference code, so
//! the edited layer maps that key exactly to `v*` (the value v* was optimised as). On the
//! bundled model this reaches ES 96.7% over 30 edits against 73.3% with `k̄` in both places.
//! `RomeSettings::residual_at_mean_key` (`--residual-at-mean-key`) gives the `k̄`-everywhere
//! form of Gupta et al. 2024 ("Rebuilding ROME", r-ROME), who showed that the asymmetry can
//! make long runs of sequential edits collapse the model.

use candle_core::{D, DType, Tensor};
use ndarray::{Array1, Array2};
use ndarray_linalg::{FactorizeC, SolveC, UPLO};

use super::check_layer;
use super::covariance::KeyCovariance;
use crate::causal::{locate_subject, locate_subject_after, target_tokens};
use crate::error::{Error, Result};
use crate::model::{ForwardOutput, HookPoint, Hooks, Intervention, InterventionOp, KvCache, Model};

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
    let c = cov.matrix()?;
    let (mut u, ridge) = solve_spd(&c, std::slice::from_ref(&k.to_vec()), cov.layer)?;
    Ok((u.remove(0), ridge))
}

/// Solves `A x = b` for each of `rhs` with `A` symmetric positive (semi-)definite, by
/// Cholesky; when `A` will not factorise, `λ·(tr A / d)·I` is added with growing `λ`.
/// Returns the solutions and the `λ` used (0: none). `layer` names `A` in errors.
pub fn solve_spd(a: &Array2<f64>, rhs: &[Vec<f64>], layer: usize) -> Result<(Vec<Vec<f64>>, f64)> {
    let d = a.nrows();
    let mean_diag = (0..d).map(|i| a[[i, i]]).sum::<f64>() / d.max(1) as f64;
    'ridge: for lambda in [0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0] {
        let mut m = a.clone();
        for i in 0..d {
            m[[i, i]] += lambda * mean_diag.max(f64::MIN_POSITIVE);
        }
        let Ok(factor) = m.factorizec(UPLO::Lower) else {
            continue;
        };
        let mut out = Vec::with_capacity(rhs.len());
        for b in rhs {
            match factor.solvec(&Array1::from_vec(b.clone())) {
                Ok(x) if x.iter().all(|v| v.is_finite()) => out.push(x.to_vec()),
                _ => continue 'ridge,
            }
        }
        return Ok((out, lambda));
    }
    Err(Error::InvalidArgument {
        what: "covariance",
        value: format!("layer {layer}"),
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
    /// Adam steps optimising v*. All of them run: ROME's `compute_v` stops once its loss is
    /// under 5e-2, which the squared decay term below keeps this loss from reaching whenever
    /// ‖δ‖ > 0.32‖v₀‖ (and the target NLL alone ends at 0.2–0.4 on the bundled model).
    pub v_steps: usize,
    pub v_lr: f64,
    /// Weight of the KL term that keeps "{subject} is a" predictions (essence drift):
    /// KL(new ‖ original) of the next-token distribution at the key token, as the reference
    /// `compute_v` has it (`kl_div(init, new, log_target=True)` at the lookup index).
    pub kl_factor: f64,
    /// Weight of (‖δ‖ / ‖v₀‖)². ROME's `compute_v` has ‖δ‖ / ‖v₀‖², linear in ‖δ‖; on the
    /// bundled model that form lets δ grow to the clamp, and edits erase the old answer
    /// without installing the new one (Japan → Yokohama: not top-1 on its own prompt, NLL
    /// 1.69 against 0.40; BENCHMARKS.md, "The v* loss against the reference's"), so the
    /// squared form is kept on purpose.
    pub weight_decay: f64,
    /// ‖δ‖ is clamped to this many ‖v₀‖.
    pub clamp_norm: f64,
    /// Solve the rank-one update at k̄ (r-ROME: W'k̄ = v*) instead of ROME's reference
    /// choice, the plain prompt's own key (u = C⁻¹k̄ still gives the direction, and
    /// W'k_plain = v*, the value v* was optimised as). On the bundled model the reference
    /// choice reaches ES 96.7% against 73.3% (BENCHMARKS.md). MEMIT follows the same
    /// switch (`memit::residuals_at_plain_keys`).
    pub residual_at_mean_key: bool,
}

impl Default for RomeSettings {
    fn default() -> Self {
        Self {
            v_steps: 20,
            v_lr: 0.5,
            kl_factor: 0.0625,
            weight_decay: 0.5,
            clamp_norm: 4.0,
            residual_at_mean_key: false,
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
    pub fn name(self) -> &'static str {
        match self {
            KeyPosition::SubjectLast => "subject-last",
            KeyPosition::PromptLast => "prompt-last",
        }
    }

    /// The position in `ids` (a prompt whose subject spans `subject`).
    pub(super) fn index(self, ids_len: usize, subject: &std::ops::Range<usize>) -> usize {
        match self {
            KeyPosition::SubjectLast => subject.end - 1,
            KeyPosition::PromptLast => ids_len - 1,
        }
    }
}

/// One fact to write: `prompt` holds `{}` where `subject` goes; `target` follows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub prompt: String,
    pub subject: String,
    pub target: String,
}

impl Request {
    /// The prompt with the subject in its slot.
    pub fn text(&self) -> String {
        self.prompt.replace("{}", &self.subject)
    }

    /// The prompt behind each context template (`{}` in a template is the prompt).
    pub fn in_contexts(&self, contexts: &[String]) -> Vec<String> {
        let text = self.text();
        contexts.iter().map(|c| c.replace("{}", &text)).collect()
    }

    /// This request and the same fact in each of `also` (prompt templates with `{}` for the
    /// subject), for [`super::editor::Editor::rome`]; a template that is not a valid
    /// request is an error naming it.
    pub fn with_phrasings(&self, also: &[String]) -> Result<Vec<Request>> {
        let mut phrasings = vec![self.clone()];
        for prompt in also {
            let r = Request {
                prompt: prompt.clone(),
                ..self.clone()
            };
            r.validate().map_err(|message| Error::InvalidArgument {
                what: "phrasing",
                value: prompt.clone(),
                message,
            })?;
            phrasings.push(r);
        }
        Ok(phrasings)
    }

    /// [`Request::validate`] as a library error.
    pub fn check(&self) -> Result<()> {
        self.validate().map_err(|message| Error::InvalidArgument {
            what: "edit request",
            value: self.subject.clone(),
            message,
        })
    }

    /// Checks what can be checked without a model: a `{}` slot, a subject, a target.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.prompt.contains("{}") {
            return Err(format!(
                "prompt {:?} has no {{}} where the subject goes",
                self.prompt
            ));
        }
        if self.subject.trim().is_empty() {
            return Err("subject is empty".into());
        }
        if self.target.trim().is_empty() {
            return Err(format!(
                "target {:?} is empty: nothing to write",
                self.target
            ));
        }
        Ok(())
    }
}

/// Reads a batch of requests: JSON Lines, one `{"prompt", "subject", "target"}` object per
/// line (blank lines skipped). A malformed line is an error naming the file and line.
pub fn read_batch(path: &std::path::Path) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::DataFile {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let request: Request = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "not a {{\"prompt\", \"subject\", \"target\"}} object: {e}"
            ))
        })?;
        request.validate().map_err(bad)?;
        requests.push(request);
    }
    if requests.is_empty() {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            line: 0,
            message: "no edit requests in the file".into(),
        });
    }
    Ok(requests)
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
    /// v*: the MLP output the edited layer now gives for `key_vector`.
    pub value: Vec<f64>,
    /// The key the edit maps exactly to `v*`: the plain prompt's key (ROME's reference), or
    /// k̄, the key averaged over the context templates (with `residual_at_mean_key`).
    pub key_vector: Vec<f64>,
    pub key: KeyPosition,
    /// The key token's position in the plain prompt.
    pub key_index: usize,
}

/// Tokens of a rewriting prompt (`text`, the request's prompt with its subject, after a
/// context) and the span of its subject: the mention inside `text`, never an earlier one in
/// the sampled context (a context that says "Japanese" holds "Japan").
fn locate_in_rewriting(
    model: &Model,
    rewriting: &str,
    text: &str,
    subject: &str,
) -> Result<(Vec<u32>, std::ops::Range<usize>)> {
    let from = if rewriting.ends_with(text) {
        rewriting.len() - text.len()
    } else {
        0
    };
    locate_subject_after(model, rewriting, subject, from)
}

/// The value at `point` at the `key` token of `prompt` (a rewriting prompt ending with the
/// request's `text`), and that token's position.
pub(super) fn value_at(
    model: &Model,
    prompt: &str,
    text: &str,
    subject: &str,
    point: HookPoint,
    key: KeyPosition,
) -> Result<(Vec<f64>, usize)> {
    let (ids, span) = locate_in_rewriting(model, prompt, text, subject)?;
    let index = key.index(ids.len(), &span);
    let out = model.forward(&model.ids_tensor(&ids)?, &Hooks::new().capture([point]))?;
    let v = out
        .cache
        .require(point)?
        .get(0)?
        .get(index)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok((v, index))
}

/// The keys at `layer` and the `key` token: k̄ averaged over `prompts` (the plain `prompt`
/// among them, each containing `subject`), the plain prompt's own key, and that token's
/// position in the plain prompt.
pub(super) struct Keys {
    pub mean: Vec<f64>,
    pub plain: Vec<f64>,
    pub index: usize,
}

pub(super) fn mean_key(
    model: &Model,
    subject: &str,
    prompt: &str,
    prompts: &[String],
    layer: usize,
    key: KeyPosition,
) -> Result<Keys> {
    let point = HookPoint::MlpPost(layer);
    let (plain, index) = value_at(model, prompt, prompt, subject, point, key)?;
    let mut mean = vec![0f64; plain.len()];
    for p in prompts {
        let k = if p == prompt {
            plain.clone()
        } else {
            value_at(model, p, prompt, subject, point, key)?.0
        };
        for (m, v) in mean.iter_mut().zip(k) {
            *m += v / prompts.len() as f64;
        }
    }
    Ok(Keys { mean, plain, index })
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
    request.check()?;
    check_layer(model, layer)?;
    let prompt = request.text();
    let prompts = request.in_contexts(contexts);
    let keys = mean_key(model, &request.subject, &prompt, &prompts, layer, key)?;
    let (u, ridge) = solve_key(cov, &keys.mean)?;

    // What the down projection writes: the MLP output, or, where a norm follows the MLP
    // (Gemma 2, OLMo 2), that norm's input, so v* is a value the weights can produce.
    let written = match model.transformer.blocks[layer].post_norms {
        Some(_) => HookPoint::Ln2PostIn(layer),
        None => HookPoint::MlpOut(layer),
    };
    let (target, nll_before, nll_after) =
        optimise_value(model, request, &prompts, written, key, settings)?;
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
    let k_exact = if settings.residual_at_mean_key {
        keys.mean
    } else {
        keys.plain
    };
    let delta = rank_one_update(&w, v.len(), &k_exact, &v, &u)?;
    Ok(RomeEdit {
        layer,
        delta,
        ridge,
        nll_before,
        nll_after,
        value: target,
        key_vector: k_exact,
        key,
        key_index: keys.index,
    })
}

/// v*: the value at `point` (ROME: what the edit layer's down projection writes; MEMIT: the
/// last edit layer's residual stream) at the key token that makes the target likely, found by
/// optimising an offset δ added there (NLL of the target over the rewriting prompts + KL on
/// "{subject} is a" + weight decay, Adam, norm clamp). Returns v* = v₀ + δ and the NLL before
/// and after.
pub(super) fn optimise_value(
    model: &Model,
    request: &Request,
    prompts: &[String],
    point: HookPoint,
    key: KeyPosition,
    settings: &RomeSettings,
) -> Result<(Vec<f64>, f32, f32)> {
    use candle_nn::Optimizer;
    let device = &model.device;
    let d = model.dims().d_model;
    // All rewriting prompts in one batch, teacher-forced (prompt + target but its last
    // token). Each row splits at its key token: the prefix before it cannot see δ (causal
    // attention), so it runs once, off the graph, into a KV cache; only the suffix from the
    // key on (key, rest of the prompt, target) is differentiated at every step. The
    // suffixes are right-padded, which causal attention keeps out of the real positions.
    let text = request.text();
    let mut prefixes: Vec<KvCache> = Vec::new();
    let mut suffixes: Vec<Vec<u32>> = Vec::new();
    // (row, suffix position, token) of every target token, for the NLL.
    let mut targets: Vec<(usize, usize, u32)> = Vec::new();
    for (row, p) in prompts.iter().enumerate() {
        let (ids, span) = locate_in_rewriting(model, p, &text, &request.subject)?;
        let target_ids = target_tokens(model, p, &request.target)?;
        let key_at = key.index(ids.len(), &span);
        let mut full = ids.clone();
        full.extend(&target_ids);
        targets.extend((ids.len()..full.len()).map(|i| (row, i - 1 - key_at, full[i])));
        full.pop();
        // LongRoPE picks its frequencies by a pass's length: a prefix cached with the short
        // ones would not match a suffix run with the long ones, so such prompts are refused.
        if let Some(switch) = model.transformer.rope_switch_length()
            && full.len() > switch
        {
            return Err(Error::InvalidArgument {
                what: "rewriting prompt",
                value: p.clone(),
                message: format!(
                    "{} tokens with the target, past the {switch} positions after which the \
                     model's LongRoPE switches frequencies; use shorter prompts or contexts",
                    full.len()
                ),
            });
        }
        let mut kv = KvCache::default();
        if key_at > 0 {
            model.forward_cached(&model.ids_tensor(&full[..key_at])?, &mut kv, &Hooks::new())?;
        }
        prefixes.push(kv);
        suffixes.push(full[key_at..].to_vec());
    }
    let prefix = KvCache::merge_rows(&prefixes)?;
    let input = padded_batch(model, &suffixes)?;
    let (n, seq) = input.dims2()?;
    // δ goes to each row's key token, the first of its suffix.
    let mut onehot = vec![0f32; n * seq];
    for row in 0..n {
        onehot[row * seq] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (n, seq, 1), device)?;
    let index: Vec<u32> = targets
        .iter()
        .map(|&(row, pos, id)| ((row * seq + pos) * model.dims().vocab_size) as u32 + id)
        .collect();
    let index = Tensor::new(index.as_slice(), device)?;
    // Each prompt's target NLL is a mean over its tokens; prompts weigh the same.
    let per_token: Vec<f32> = targets
        .iter()
        .map(|&(row, ..)| {
            let len = targets.iter().filter(|t| t.0 == row).count();
            1.0 / (len * n) as f32
        })
        .collect();
    let per_token = Tensor::new(per_token.as_slice(), device)?;

    // The essence prompt for the KL term.
    let essence = format!("{} is a", request.subject);
    let (essence_ids, essence_span) = locate_subject(model, &essence, &request.subject)?;
    let essence_input = model.ids_tensor(&essence_ids)?;
    let essence_at = key.index(essence_ids.len(), &essence_span) as i64;
    // The next-token distribution at the key token itself (the subject's last token for
    // ROME proper), where δ is added.
    let key_log_probs = |logits: &Tensor| -> candle_core::Result<Tensor> {
        let at = logits.get(0)?.get(essence_at as usize)?;
        candle_nn::ops::log_softmax(&at.to_dtype(DType::F32)?, D::Minus1)
    };
    let essence_orig =
        key_log_probs(&model.forward(&essence_input, &Hooks::new())?.logits)?.detach();

    let forward = |hooks: &Hooks| -> Result<ForwardOutput> {
        model.forward_cached(&input, &mut prefix.clone(), hooks)
    };
    // v₀: the clean value at the key token of the first (plain) prompt.
    let clean = forward(&Hooks::new().capture([point]))?;
    let v0 = clean
        .cache
        .require(point)?
        .get(0)?
        .get(0)?
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
        let mut hooks = Hooks::new().differentiable();
        if with_delta {
            let add = onehot.broadcast_mul(&delta.as_tensor().reshape((1, 1, d))?)?;
            hooks = hooks.intervene(point, Intervention::new(InterventionOp::Add(add)));
        }
        let logits = forward(&hooks)?.logits.to_dtype(DType::F32)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.flatten_all()?;
        let picked = log_probs.index_select(&index, 0)?;
        Ok((picked * &per_token)?.sum_all()?.neg()?)
    };
    let nll_before = nll(false)?.to_scalar::<f32>()?;
    for _ in 0..settings.v_steps {
        let essence_hooks = Hooks::new().differentiable().intervene(
            point,
            Intervention::new(InterventionOp::Add(delta.as_tensor().clone()))
                .at_positions(vec![essence_at]),
        );
        let essence_new = key_log_probs(&model.forward(&essence_input, &essence_hooks)?.logits)?;
        // KL(new ‖ orig) = Σ p_new (log p_new − log p_orig).
        let kl = (essence_new.exp()? * (&essence_new - &essence_orig)?)?.sum_all()?;
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

/// `[rows, longest]` token ids, shorter rows right-padded with the start token (padding
/// only ever follows the real tokens, which causal attention never lets them see).
fn padded_batch(model: &Model, rows: &[Vec<u32>]) -> Result<Tensor> {
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
    let pad = model.start_token().unwrap_or(0);
    let mut flat = Vec::with_capacity(rows.len() * seq);
    for r in rows {
        flat.extend(r);
        flat.extend(std::iter::repeat_n(pad, seq - r.len()));
    }
    Ok(Tensor::from_vec(flat, (rows.len(), seq), &model.device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewriting_prompt_keys_the_subject_in_the_requests_text_not_in_its_context() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gpt2");
        let model = Model::load(&dir, &candle_core::Device::Cpu, DType::F32).unwrap();
        let text = "The capital of Japan is";
        // A sampled context that mentions a word holding the subject.
        let rewriting = format!("People there speak Japanese. {text}");
        let (ids, span) = locate_in_rewriting(&model, &rewriting, text, "Japan").unwrap();
        let (plain_ids, plain_span) = locate_subject(&model, text, "Japan").unwrap();
        // The same tokens follow the subject as in the plain prompt: it is the text's mention.
        assert_eq!(ids[span.end..], plain_ids[plain_span.end..]);
        assert_eq!(ids[span.clone()], plain_ids[plain_span.clone()]);
        // A plain search stops at "Japanese".
        let (_, first) = locate_subject(&model, &rewriting, "Japan").unwrap();
        assert!(first.end <= span.start, "{first:?} {span:?}");
    }

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
