//! Which prompt tokens a prediction rests on: input attribution at the token embeddings
//! (`hook_embed`), as Captum and inseq compute it for transformers.
//!
//! The prediction is a number read at one position: the target token's logit, or its logit
//! minus a wrong token's. Per prompt token, summed over the embedding's channels:
//!
//! - **gradient × input**: `Σ_d x_d · ∂f/∂x_d` at the prompt — a first-order estimate;
//! - **integrated gradients** (Sundararajan et al. 2017): `Σ_d (x − b)_d · Σ_k w_k ∂f/∂x_d`
//!   at `b + α_k·(x − b)` for every token at once, the straight path from a baseline `b` to
//!   the prompt's embeddings integrated by `m`-point Gauss–Legendre quadrature (Captum's
//!   default), all `m` points in batched forward and backward passes. Position embeddings
//!   (GPT-2) stay: the baseline keeps where each token is, not what it is. The attributions
//!   sum to about `f(x) − f(b)` (completeness); the report gives the gap, which shrinks as the
//!   steps grow.
//!
//! The baseline is a reference token's embedding at every position (Captum's
//! `TokenReferenceBase`; by default the model's start token), or zero. Zero is the textbook
//! choice but sits on a singularity of models without position embeddings: their first norm
//! sees `α·x`, which it scales back to full size for every `α` above about
//! `sqrt(eps)/rms(x)`, so nearly all of `f(x) − f(0)` is earned in a sliver next to the
//! baseline that no quadrature resolves — the completeness gap then says so.
//!
//! Tokens after the read position cannot affect it and get exactly zero.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

/// Interpolation steps per forward and backward pass: bounds memory to this many copies of the
/// prompt's activations.
const STEPS_PER_PASS: usize = 16;

/// What is attributed.
#[derive(Clone, Debug)]
pub struct SaliencyRequest {
    pub ids: Vec<u32>,
    /// The position the prediction is read at (usually the last).
    pub position: usize,
    pub target: u32,
    /// With a wrong token, the prediction is `logit(target) − logit(wrong)`.
    pub wrong: Option<u32>,
    /// Integrated-gradients steps.
    pub steps: usize,
    pub baseline: Baseline,
}

/// Where the integrated-gradients path starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// Every token embedding zero.
    Zero,
    /// This token's embedding at every position.
    Token(u32),
}

/// One prompt token's attributions.
#[derive(Clone, Debug, Serialize)]
pub struct TokenSaliency {
    pub token: String,
    pub gradient_x_input: f32,
    pub integrated_gradients: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct SaliencyReport {
    pub position: usize,
    pub target: String,
    pub wrong: Option<String>,
    /// `f(x)`: the prediction on the prompt.
    pub value: f32,
    /// `f(b)`: the prediction from the baseline's embeddings.
    pub baseline_value: f32,
    pub baseline: Baseline,
    /// The baseline token, shown.
    pub baseline_token: Option<String>,
    pub steps: usize,
    pub tokens: Vec<TokenSaliency>,
    /// `Σ integrated gradients − (f(x) − f(b))`.
    pub completeness_gap: f32,
}

impl SaliencyRequest {
    /// Forward and backward passes the request costs (for progress).
    pub fn passes(&self) -> usize {
        1 + self.steps.div_ceil(STEPS_PER_PASS)
    }

    /// The default baseline: the model's start token where it has one, else zero.
    pub fn default_baseline(model: &Model) -> Baseline {
        model.start_token().map_or(Baseline::Zero, Baseline::Token)
    }

    fn validate(&self, model: &Model) -> Result<()> {
        let bad = |what: &'static str, value: String, message: String| {
            Err(Error::InvalidArgument {
                what,
                value,
                message,
            })
        };
        if self.steps == 0 {
            return bad("--steps", "0".into(), "needs at least one step".into());
        }
        if self.position >= self.ids.len() {
            return bad(
                "--position",
                self.position.to_string(),
                format!("the prompt has {} tokens", self.ids.len()),
            );
        }
        let vocab = model.dims().vocab_size as u32;
        let reference = match self.baseline {
            Baseline::Token(id) => Some(id),
            Baseline::Zero => None,
        };
        for id in [Some(self.target), self.wrong, reference]
            .into_iter()
            .flatten()
        {
            if id >= vocab {
                return bad(
                    "token",
                    id.to_string(),
                    format!("the vocabulary has {vocab} tokens"),
                );
            }
        }
        Ok(())
    }

    /// The prediction at `position` of every row of `logits` (`[rows, seq, vocab]`), summed
    /// over the rows (their gradients are independent).
    fn prediction(&self, logits: &Tensor) -> Result<Tensor> {
        let at = logits.i((.., self.position))?.to_dtype(DType::F32)?; // [rows, vocab]
        let mut f = at.i((.., self.target as usize))?;
        if let Some(wrong) = self.wrong {
            f = (f - at.i((.., wrong as usize))?)?;
        }
        Ok(f.sum_all()?)
    }
}

/// Runs the request, calling `progress(done, total)` after every pass; `None` when `cancel`
/// was set.
pub fn saliency(
    model: &Model,
    request: &SaliencyRequest,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<SaliencyReport>> {
    request.validate(model)?;
    let point = HookPoint::Embed;
    let ids = model.ids_tensor(&request.ids)?;
    let total = request.passes();
    // Gradient × input, and the embeddings the interpolation scales.
    let run = model.forward(&ids, &Hooks::new().capture([point]).grad(point))?;
    let x = run.cache.require(point)?.to_dtype(DType::F32)?; // [1, seq, d]
    let f = request.prediction(&run.logits)?;
    let value = f.to_scalar::<f32>()?;
    let grad = embedding_gradient(&f, &run, point)?;
    let gradient_x_input = per_token(&(&grad * &x)?)?;
    progress(1, total);

    let b = match request.baseline {
        Baseline::Zero => x.zeros_like()?,
        Baseline::Token(id) => {
            let reference = model.ids_tensor(&vec![id; request.ids.len()])?;
            let run = model.forward(&reference, &Hooks::new().capture([point]))?;
            run.cache.require(point)?.to_dtype(DType::F32)?
        }
    };
    let from_baseline = Intervention::new(InterventionOp::Replace(b.to_dtype(model.dtype)?));
    let baseline_run = model.forward(&ids, &Hooks::new().intervene(point, from_baseline))?;
    let baseline_value = request
        .prediction(&baseline_run.logits)?
        .to_scalar::<f32>()?;
    let difference = (&x - &b)?;

    let steps = request.steps;
    let (nodes, weights) = gauss_legendre(steps);
    let mut summed = x.zeros_like()?; // Σ_k w_k ∂f/∂x at α_k·x
    for (pass, first) in (0..steps).step_by(STEPS_PER_PASS).enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let m = STEPS_PER_PASS.min(steps - first);
        let column = |values: &[f64]| -> Result<Tensor> {
            let values: Vec<f32> = values[first..first + m].iter().map(|&v| v as f32).collect();
            Ok(Tensor::from_vec(values, (m, 1, 1), x.device())?)
        };
        let along = column(&nodes)?
            .broadcast_mul(&difference)?
            .broadcast_add(&b)?
            .to_dtype(model.dtype)?; // [m, seq, d]
        let hooks = Hooks::new()
            .intervene(point, Intervention::new(InterventionOp::Replace(along)))
            .grad(point);
        let run = model.forward(&ids.repeat((m, 1))?, &hooks)?;
        let f = request.prediction(&run.logits)?;
        let g = embedding_gradient(&f, &run, point)?;
        summed = (summed + column(&weights)?.broadcast_mul(&g)?.sum_keepdim(0)?)?;
        progress(2 + pass, total);
    }
    let integrated = per_token(&(summed * &difference)?)?;
    let tokens = model
        .tokenizer
        .tokens_display(&request.ids)
        .into_iter()
        .zip(gradient_x_input.iter().zip(&integrated))
        .map(|(token, (&gxi, &ig))| TokenSaliency {
            token,
            gradient_x_input: gxi,
            integrated_gradients: ig,
        })
        .collect();
    let completeness_gap = integrated.iter().sum::<f32>() - (value - baseline_value);
    Ok(Some(SaliencyReport {
        position: request.position,
        target: model.tokenizer.token_display(request.target),
        wrong: request.wrong.map(|w| model.tokenizer.token_display(w)),
        value,
        baseline_value,
        baseline: request.baseline,
        baseline_token: match request.baseline {
            Baseline::Token(id) => Some(model.tokenizer.token_display(id)),
            Baseline::Zero => None,
        },
        steps,
        tokens,
        completeness_gap,
    }))
}

/// ∂f/∂(`hook_embed`) from a run with a gradient leaf there, in f32: `[rows, seq, d]`.
fn embedding_gradient(
    f: &Tensor,
    run: &crate::model::ForwardOutput,
    point: HookPoint,
) -> Result<Tensor> {
    let grads = f.backward()?;
    let leaf = run.grad_leaf(point).ok_or_else(|| Error::UnknownHook {
        name: point.to_string(),
        valid: String::new(),
    })?;
    Ok(grads
        .get(leaf)
        .ok_or_else(|| Error::InvalidArgument {
            what: "hook",
            value: point.to_string(),
            message: "the prediction does not depend on it".into(),
        })?
        .to_dtype(DType::F32)?)
}

/// The `m`-point Gauss–Legendre rule on [0, 1]: nodes (ascending) and weights (summing to 1).
/// Newton's method on the Legendre polynomial from the usual cosine guesses.
pub fn gauss_legendre(m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut nodes = vec![0f64; m];
    let mut weights = vec![0f64; m];
    for i in 0..m.div_ceil(2) {
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (m as f64 + 0.5)).cos();
        let mut derivative = 1.0;
        for _ in 0..100 {
            // P_m(x) and P_m'(x) by the three-term recurrence.
            let (mut p, mut previous) = (1.0, 0.0);
            for j in 1..=m {
                let j = j as f64;
                (p, previous) = (((2.0 * j - 1.0) * x * p - (j - 1.0) * previous) / j, p);
            }
            derivative = m as f64 * (x * p - previous) / (x * x - 1.0);
            let step = p / derivative;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        let weight = 1.0 / ((1.0 - x * x) * derivative * derivative); // 2/(…) halved for [0, 1]
        nodes[i] = (1.0 - x) / 2.0;
        nodes[m - 1 - i] = (1.0 + x) / 2.0;
        weights[i] = weight;
        weights[m - 1 - i] = weight;
    }
    (nodes, weights)
}

/// `[1, seq, d]` → one number per token: the sum over channels.
fn per_token(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.sum(2)?.squeeze(0)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::gauss_legendre;

    /// An m-point rule integrates polynomials up to degree 2m − 1 exactly.
    #[test]
    fn gauss_legendre_is_exact_for_polynomials_up_to_degree_2m_minus_1() {
        for m in [1, 2, 5, 16, 33] {
            let (nodes, weights) = gauss_legendre(m);
            assert!(nodes.windows(2).all(|w| w[0] < w[1]), "m {m}: {nodes:?}");
            for degree in 0..2 * m {
                let integral: f64 = nodes
                    .iter()
                    .zip(&weights)
                    .map(|(x, w)| w * x.powi(degree as i32))
                    .sum();
                let exact = 1.0 / (degree as f64 + 1.0);
                assert!(
                    (integral - exact).abs() < 1e-12,
                    "m {m}, degree {degree}: {integral} against {exact}"
                );
            }
        }
    }
}
