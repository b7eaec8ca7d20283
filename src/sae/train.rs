//! SAE training: the parameters, their gradients (written by hand, see [`cpu`]) and Adam, for
//! every architecture. This module sees batches of activations only; where they come from is
//! [`super::activations`], and the run loop with checkpoints is [`super::run`].
//!
//! Losses, per batch of `B` rows (x̂ the reconstruction, `e = x̂ − x`):
//! - reconstruction `Σ‖e‖² / B` (summed over features, averaged over rows, as SAELens);
//! - `standard`: `+ λ · Σ_b Σ_j f_j(x_b)·‖W_dec[j]‖ / B` (L1 weighted by decoder norms);
//! - `jumprelu`: `+ λ · Σ_b ‖f(x_b)‖₀ / B`, through the straight-through estimator of
//!   Rajamanoharan et al. (rectangle kernel of width `bandwidth`) for the thresholds;
//! - `topk` / `batchtopk`: `+ α · min(1, dead/aux_k) · Σ‖ê − (x − x̂)‖² / B`, AuxK: `ê` decodes
//!   the `aux_k` largest pre-activations among dead latents. This is sparsify's weighting
//!   (its two terms share one normaliser, the batch's variance); OpenAI's `train.py` divides
//!   the AuxK term by the residual's own variance instead and has no `min(1, dead/aux_k)`,
//!   so it weighs AuxK up by 1/FVU relative to this.
//!   Decoder rows are kept at unit norm and the gradient's component along each row removed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cpu::{self, Active, AdamStep, MatRef};
use super::{Architecture, Sae};
use crate::error::{Error, Result};

/// The architecture to train and its own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", rename_all = "lowercase")]
pub enum TrainArchitecture {
    Standard {
        l1_coefficient: f32,
    },
    #[serde(rename = "topk")]
    TopK {
        k: usize,
        aux_k: usize,
        aux_coefficient: f32,
    },
    #[serde(rename = "batchtopk")]
    BatchTopK {
        k: usize,
        aux_k: usize,
        aux_coefficient: f32,
        /// Rate of the running average that turns into the inference threshold.
        threshold_lr: f32,
    },
    #[serde(rename = "jumprelu")]
    JumpRelu {
        l0_coefficient: f32,
        bandwidth: f32,
        init_threshold: f32,
    },
}

impl TrainArchitecture {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Standard { .. } => "standard",
            Self::TopK { .. } => "topk",
            Self::BatchTopK { .. } => "batchtopk",
            Self::JumpRelu { .. } => "jumprelu",
        }
    }

    fn top_k(&self) -> Option<usize> {
        match self {
            Self::TopK { k, .. } | Self::BatchTopK { k, .. } => Some(*k),
            _ => None,
        }
    }

    /// Unit-norm decoder rows (TopK family); the others let the penalty see the norms.
    pub(crate) fn constrains_decoder(&self) -> bool {
        self.top_k().is_some()
    }
}

/// The architectures by name, for command lines and forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchitectureKind {
    Standard,
    #[value(name = "topk")]
    TopK,
    #[value(name = "batchtopk")]
    BatchTopK,
    #[value(name = "jumprelu")]
    JumpRelu,
}

/// Every architecture's own knobs; [`ArchitectureKind::with`] takes those it needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchitectureKnobs {
    /// Latents per token (topk, batchtopk).
    pub k: usize,
    /// AuxK latents for dead-latent revival (topk, batchtopk).
    pub aux_k: usize,
    pub aux_coefficient: f32,
    /// L1 coefficient (standard).
    pub l1_coefficient: f32,
    /// L0 coefficient (jumprelu).
    pub l0_coefficient: f32,
    /// Straight-through-estimator bandwidth (jumprelu).
    pub bandwidth: f32,
    pub init_threshold: f32,
    /// Rate of the running average that becomes batchtopk's inference threshold.
    pub threshold_lr: f32,
}

impl ArchitectureKnobs {
    /// The defaults for inputs of width `d_in` (AuxK on d_in / 2 latents at 1/32, as in Gao
    /// et al.; JumpReLU as in Rajamanoharan et al.).
    pub fn defaults(d_in: usize) -> Self {
        Self {
            k: 32,
            aux_k: d_in / 2,
            aux_coefficient: 1.0 / 32.0,
            l1_coefficient: 5.0,
            l0_coefficient: 1.0,
            bandwidth: 0.05,
            init_threshold: 0.01,
            threshold_lr: 0.01,
        }
    }
}

impl ArchitectureKind {
    /// The architecture with its knobs taken from `knobs`.
    pub fn with(self, knobs: &ArchitectureKnobs) -> TrainArchitecture {
        match self {
            Self::Standard => TrainArchitecture::Standard {
                l1_coefficient: knobs.l1_coefficient,
            },
            Self::TopK => TrainArchitecture::TopK {
                k: knobs.k,
                aux_k: knobs.aux_k,
                aux_coefficient: knobs.aux_coefficient,
            },
            Self::BatchTopK => TrainArchitecture::BatchTopK {
                k: knobs.k,
                aux_k: knobs.aux_k,
                aux_coefficient: knobs.aux_coefficient,
                threshold_lr: knobs.threshold_lr,
            },
            Self::JumpRelu => TrainArchitecture::JumpRelu {
                l0_coefficient: knobs.l0_coefficient,
                bandwidth: knobs.bandwidth,
                init_threshold: knobs.init_threshold,
            },
        }
    }
}

/// How `b_dec` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// Geometric median of the first batch (Weiszfeld), robust to outliers (Bricken et al.).
    GeometricMedian,
    Mean,
    Zeros,
}

/// Everything that fixes a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub architecture: TrainArchitecture,
    pub d_in: usize,
    pub d_sae: usize,
    pub batch_size: usize,
    pub total_steps: u64,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Linear learning-rate warm-up from 0.
    pub warmup_steps: u64,
    /// Linear decay to 0 over the final steps.
    pub decay_steps: u64,
    /// Linear warm-up of the sparsity coefficient (standard, jumprelu).
    pub penalty_warmup_steps: u64,
    /// Global gradient-norm clipping.
    pub grad_clip: Option<f32>,
    /// A latent that has not fired for this many tokens counts as dead (for AuxK and stats).
    pub dead_after_tokens: u64,
    /// Initial decoder row norm.
    pub decoder_init_norm: f32,
    pub b_dec_init: BDecInit,
    pub seed: u64,
    /// Matryoshka prefixes (topk, batchtopk): the sizes of the nested dictionaries before
    /// the whole one, ascending. Each prefix must reconstruct the input alone, which pulls
    /// general features into the first latents instead of splitting them (Bussmann et al.
    /// 2025). Empty: a plain SAE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matryoshka: Vec<usize>,
    /// A transcoder's output width: its batches' rows are `[x | y]`, `d_in + d_out` wide, and
    /// it learns to predict `y` from `x` (never subtracting `b_dec` from `x`). `None`: an SAE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcode_to: Option<usize>,
    /// A transcoder's affine skip path: it also learns `W_skip` (`[d_out, d_in]`, starting at
    /// zero) and predicts `decode(encode(x)) + x @ W_skipᵀ`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_connection: bool,
}

impl TrainConfig {
    /// Settings a researcher would start from (SAELens / sparsify defaults where they agree).
    pub fn new(architecture: TrainArchitecture, d_in: usize, d_sae: usize) -> Self {
        let decoder_init_norm = if architecture.constrains_decoder() {
            1.0
        } else {
            0.1
        };
        Self {
            architecture,
            d_in,
            d_sae,
            batch_size: 4096,
            total_steps: 1000,
            lr: 4e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            decay_steps: 0,
            penalty_warmup_steps: 0,
            grad_clip: None,
            dead_after_tokens: 2_000_000,
            decoder_init_norm,
            b_dec_init: BDecInit::GeometricMedian,
            seed: 0,
            matryoshka: Vec::new(),
            transcode_to: None,
            skip_connection: false,
        }
    }

    /// Width of what the decoder writes: `d_in` for an SAE, a transcoder's `d_out`.
    pub fn d_out(&self) -> usize {
        self.transcode_to.unwrap_or(self.d_in)
    }

    /// Width of a training row: `d_in`, or `d_in + d_out` for a transcoder's `[x | y]`.
    pub fn row_width(&self) -> usize {
        self.d_in + self.transcode_to.unwrap_or(0)
    }

    /// Rejects settings that cannot train; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, value: String, message: &str| {
            Err(Error::InvalidArgument {
                what,
                value,
                message: message.into(),
            })
        };
        if self.d_in == 0 || self.d_sae == 0 || self.d_out() == 0 {
            return bad(
                "SAE size",
                format!("{}x{}x{}", self.d_in, self.d_sae, self.d_out()),
                "d_in, d_sae and d_out must be positive",
            );
        }
        if self.batch_size == 0 {
            return bad("batch size", "0".into(), "must be positive");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(
                "learning rate",
                self.lr.to_string(),
                "must be a positive number",
            );
        }
        if let Some(k) = self.architecture.top_k()
            && (k == 0 || k > self.d_sae)
        {
            return bad(
                "k",
                k.to_string(),
                &format!("must be between 1 and d_sae ({})", self.d_sae),
            );
        }
        if !self.matryoshka.is_empty() {
            let sizes = || {
                self.matryoshka
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            if self.architecture.top_k().is_none() {
                return bad(
                    "matryoshka prefixes",
                    sizes(),
                    "nest a topk or batchtopk SAE or transcoder",
                );
            }
            let ascending = self.matryoshka.windows(2).all(|w| w[0] < w[1]);
            let inside = self
                .matryoshka
                .iter()
                .all(|&m| (1..self.d_sae).contains(&m));
            if !(ascending && inside) {
                return bad(
                    "matryoshka prefixes",
                    sizes(),
                    &format!(
                        "must be ascending sizes between 1 and d_sae ({}), exclusive",
                        self.d_sae
                    ),
                );
            }
        }
        if let TrainArchitecture::JumpRelu {
            bandwidth,
            init_threshold,
            ..
        } = self.architecture
            && !(bandwidth > 0.0 && init_threshold > 0.0)
        {
            return bad(
                "jumprelu bandwidth/threshold",
                format!("{bandwidth}/{init_threshold}"),
                "must be positive",
            );
        }
        // A negative weight would reward what the term penalises (a negative clip flips the
        // gradient: ascent).
        let (what, weight) = match self.architecture {
            TrainArchitecture::Standard { l1_coefficient, .. } => {
                ("l1 coefficient", l1_coefficient)
            }
            TrainArchitecture::TopK {
                aux_coefficient, ..
            }
            | TrainArchitecture::BatchTopK {
                aux_coefficient, ..
            } => ("aux coefficient", aux_coefficient),
            TrainArchitecture::JumpRelu { l0_coefficient, .. } => {
                ("l0 coefficient", l0_coefficient)
            }
        };
        if !(weight >= 0.0 && weight.is_finite()) {
            return bad(what, weight.to_string(), "must be a number ≥ 0");
        }
        if self.skip_connection {
            if self.transcode_to.is_none() {
                return bad(
                    "skip connection",
                    "on".into(),
                    "is a transcoder's (give it an output hook)",
                );
            }
            // SAELens, where the result is saved, has skip transcoders of ReLU and JumpReLU
            // only (BatchTopK is saved as a JumpReLU).
            if matches!(self.architecture, TrainArchitecture::TopK { .. }) {
                return bad(
                    "skip connection",
                    "topk".into(),
                    "a top-k skip transcoder has no SAELens form: use batchtopk, jumprelu or \
                     standard",
                );
            }
        }
        if let Some(clip) = self.grad_clip
            && !(clip > 0.0 && clip.is_finite())
        {
            return bad(
                "gradient clip",
                clip.to_string(),
                "must be a positive number",
            );
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f32 {
        self.lr * lr_schedule(step, self.warmup_steps, self.decay_steps, self.total_steps)
    }

    pub(crate) fn penalty_scale(&self, step: u64) -> f32 {
        if self.penalty_warmup_steps == 0 {
            1.0
        } else {
            ((step + 1) as f32 / self.penalty_warmup_steps as f32).min(1.0)
        }
    }
}

/// One trained tensor with its gradient and Adam moments.
#[derive(Clone, Debug)]
struct Param {
    name: &'static str,
    value: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(name: &'static str, value: Vec<f32>) -> Self {
        let n = value.len();
        Self {
            name,
            value,
            grad: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

// Indices into `SaeTrainer::params`.
const W_ENC_T: usize = 0;
const W_DEC: usize = 1;
const B_ENC: usize = 2;
const B_DEC: usize = 3;
const LOG_THRESHOLD: usize = 4;
const W_SKIP: usize = 5;

/// What one step measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction `Σ‖e‖² / B`.
    pub mse: f64,
    /// Batch FVU, `Σ‖e‖² / Σ‖x − x̄‖²`.
    pub fvu: f64,
    /// Mean active latents per row.
    pub l0: f64,
    /// Sparsity penalty (L1 or L0 term) or AuxK loss.
    pub auxiliary_loss: f64,
    /// Fraction of latents that have not fired for `dead_after_tokens`.
    pub dead_fraction: f64,
    pub lr: f32,
    pub grad_norm: f64,
}

/// Training state: parameters, optimiser moments, counters. Owns its work buffers, so a step
/// allocates little beyond the active set.
pub struct SaeTrainer {
    pub config: TrainConfig,
    params: [Param; 6],
    /// Steps taken.
    pub step: u64,
    /// Rows trained on.
    pub tokens: u64,
    /// When each latent last fired, and how often in the second half.
    pub(crate) firing: FiringCounters,
    /// Running BatchTopK threshold (smallest kept activation, averaged).
    batch_threshold: f32,
    x_in: Vec<f32>,
    pre: Vec<f32>,
    x_hat: Vec<f32>,
    dense_grad: Vec<f32>,
    /// A transcoder's targets, split from its `[x | y]` rows.
    targets: Vec<f32>,
}

impl SaeTrainer {
    /// A fresh SAE; `first_batch` (`[rows, d_in]`, a transcoder's `[rows, d_in + d_out]`)
    /// sets `b_dec` (from what the decoder writes).
    pub fn new(config: TrainConfig, first_batch: &[f32]) -> Result<Self> {
        config.validate()?;
        let (d_in, d_sae, d_out) = (config.d_in, config.d_sae, config.d_out());
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut random_rows = |width: usize| -> Vec<f32> {
            let mut w: Vec<f32> = (0..d_sae * width)
                .map(|_| crate::world::train::normal(&mut rng) as f32)
                .collect();
            for row in w.chunks_exact_mut(width) {
                let norm = cpu::dot(row, row).sqrt().max(f32::MIN_POSITIVE);
                row.iter_mut()
                    .for_each(|v| *v *= config.decoder_init_norm / norm);
            }
            w
        };
        let w_dec = random_rows(d_out);
        // An SAE's encoder starts as its decoder's transpose; a transcoder's reads another
        // space, so it starts random (at the same row norm).
        let w_enc_t = if config.transcode_to.is_some() {
            random_rows(d_in)
        } else {
            w_dec.clone()
        };
        let targets = match config.transcode_to {
            Some(_) => split_rows(first_batch, d_in, d_out).1,
            None => first_batch.to_vec(),
        };
        let b_dec = match config.b_dec_init {
            BDecInit::Zeros => vec![0.0; d_out],
            BDecInit::Mean => mean_row(&targets, d_out),
            BDecInit::GeometricMedian => geometric_median(&targets, d_out, 100),
        };
        let log_threshold = match config.architecture {
            TrainArchitecture::JumpRelu { init_threshold, .. } => vec![init_threshold.ln(); d_sae],
            _ => Vec::new(),
        };
        Ok(Self {
            params: [
                Param::new("W_enc_T", w_enc_t),
                Param::new("W_dec", w_dec),
                Param::new("b_enc", vec![0.0; d_sae]),
                Param::new("b_dec", b_dec),
                Param::new("log_threshold", log_threshold),
                // Empty unless the transcoder has a skip path.
                Param::new(
                    "W_skip",
                    vec![0.0; usize::from(config.skip_connection) * d_out * d_in],
                ),
            ],
            step: 0,
            tokens: 0,
            firing: FiringCounters::new(d_sae),
            batch_threshold: 0.0,
            x_in: Vec::new(),
            pre: Vec::new(),
            x_hat: Vec::new(),
            dense_grad: Vec::new(),
            targets: Vec::new(),
            config,
        })
    }

    fn dead_mask(&self) -> Vec<bool> {
        self.firing.dead_mask(self.config.dead_after_tokens)
    }

    /// Fraction of latents dead right now.
    pub fn dead_fraction(&self) -> f64 {
        self.firing.dead_fraction(self.config.dead_after_tokens)
    }

    /// One optimisation step on `x` (`[rows, d_in]`, finite values).
    pub fn step(&mut self, x: &[f32]) -> Result<StepMetrics> {
        let pass = self.backward(x)?;
        let (d_out, d_sae) = (self.config.d_out(), self.config.d_sae);
        let arch = &self.config.architecture;
        let rows = pass.rows;
        let lr = self.config.lr_at(self.step);
        if arch.constrains_decoder() {
            let w_dec = &mut self.params[W_DEC];
            remove_parallel_component(&mut w_dec.grad, &w_dec.value, d_out);
        }
        let grad_norm = self
            .params
            .iter()
            .map(|p| cpu::sum_squares(&p.grad))
            .sum::<f64>()
            .sqrt();
        if let Some(clip) = self.config.grad_clip
            && grad_norm > f64::from(clip)
        {
            let s = (f64::from(clip) / grad_norm) as f32;
            for p in &mut self.params {
                p.grad.par_iter_mut().for_each(|g| *g *= s);
            }
        }
        let adam = AdamStep {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            t: self.step + 1,
        };
        for p in &mut self.params {
            adam.apply(&mut p.value, &p.grad, &mut p.m, &mut p.v);
        }
        if arch.constrains_decoder() {
            normalize_rows(&mut self.params[W_DEC].value, d_out);
        }

        self.firing.record(
            pass.fire_counts.iter().map(|&f| u64::from(f)),
            rows as u64,
            self.step >= self.config.total_steps / 2,
        );
        if let TrainArchitecture::BatchTopK { threshold_lr, .. } = *arch
            && let Some(min) = pass.smallest_activation
        {
            self.batch_threshold = if self.step == 0 {
                min
            } else {
                self.batch_threshold + threshold_lr * (min - self.batch_threshold)
            };
        }
        self.step += 1;
        self.tokens += rows as u64;
        debug_assert_eq!(pass.fire_counts.len(), d_sae);
        Ok(StepMetrics {
            step: self.step,
            tokens: self.tokens,
            loss: pass.mse + pass.prefix_mse + pass.auxiliary_loss,
            mse: pass.mse,
            fvu: pass.fvu,
            l0: pass.l0,
            auxiliary_loss: pass.auxiliary_loss,
            dead_fraction: self.dead_fraction(),
            lr,
            grad_norm,
        })
    }

    /// Forward pass and gradients (into each parameter's `grad`) for the batch `x`.
    fn backward(&mut self, x: &[f32]) -> Result<Pass> {
        let (d_in, d_sae, d_out) = (self.config.d_in, self.config.d_sae, self.config.d_out());
        let transcoder = self.config.transcode_to.is_some();
        let rows = batch_rows(x, self.config.row_width())?;
        let step = self.step;
        let penalty_scale = self.config.penalty_scale(step);
        let arch = self.config.architecture.clone();
        for p in &mut self.params {
            p.grad.fill(0.0);
        }

        let dead = self.dead_mask();
        let Self {
            params,
            x_in,
            pre,
            x_hat,
            dense_grad,
            targets,
            config,
            ..
        } = self;
        let [w_enc_t, w_dec_p, b_enc_p, b_dec_p, log_threshold, w_skip] = params;
        // Encoder input and pre-activations (bias added on the fly by the selection). A
        // transcoder's rows are `[x | y]`: it encodes x as it is (its b_dec lives in the output
        // space) and is trained to predict y, the target here.
        x_in.resize(rows * d_in, 0.0);
        let target: &[f32] = if transcoder {
            targets.clear();
            for (row, o) in x
                .chunks_exact(d_in + d_out)
                .zip(x_in.chunks_exact_mut(d_in))
            {
                o.copy_from_slice(&row[..d_in]);
                targets.extend_from_slice(&row[d_in..]);
            }
            targets
        } else {
            let b_dec = &b_dec_p.value;
            x_in.par_chunks_mut(d_in)
                .zip(x.par_chunks(d_in))
                .for_each(|(o, x)| {
                    for ((o, &x), &b) in o.iter_mut().zip(x).zip(b_dec) {
                        *o = x - b;
                    }
                });
            x
        };
        pre.resize(rows * d_sae, 0.0);
        cpu::matmul(
            MatRef::new(x_in, rows, d_in),
            MatRef::new(&w_enc_t.value, d_sae, d_in).t(),
            pre,
            false,
        );

        // Which latents fire.
        let b_enc = &b_enc_p.value;
        let threshold: Vec<f32> = log_threshold.value.iter().map(|l| l.exp()).collect();
        let mut near: Vec<(u32, u32, f32)> = Vec::new();
        let active = match arch {
            TrainArchitecture::Standard { .. } => cpu::select_rows(pre, b_enc, |_, v| v > 0.0),
            TrainArchitecture::TopK { k, .. } => cpu::top_k_rows(pre, b_enc, k),
            TrainArchitecture::BatchTopK { k, .. } => {
                batch_top_k(pre, b_enc, k * rows, config.seed ^ step)
            }
            TrainArchitecture::JumpRelu { bandwidth, .. } => {
                near = near_threshold(pre, b_enc, &threshold, bandwidth);
                cpu::select_rows(pre, b_enc, |j, v| v > threshold[j] && v > 0.0)
            }
        };
        let l0 = active.len() as f64 / rows as f64;
        // AuxK candidates: the largest pre-activations among dead latents (selected now, as
        // the dense path below reuses the pre-activation buffer).
        let n_dead = dead.iter().filter(|&&d| d).count();
        let aux_active = match arch {
            TrainArchitecture::TopK {
                aux_k,
                aux_coefficient,
                ..
            }
            | TrainArchitecture::BatchTopK {
                aux_k,
                aux_coefficient,
                ..
            } if n_dead > 0 && aux_k > 0 && aux_coefficient > 0.0 => {
                Some(cpu::top_k_rows_where(pre, b_enc, aux_k.min(n_dead), |j| {
                    dead[j]
                }))
            }
            _ => None,
        };

        // Decode, reconstruction error, its gradient g_e = 2e/B.
        let nesting = cpu::Nesting {
            ends: &config.matryoshka,
        };
        let dense = nesting.groups() == 1 && active.len() * 16 > rows * d_sae;
        x_hat.resize(rows * d_out, 0.0);
        if dense {
            scatter_values(&active, &active.value, d_sae, pre);
            for row in x_hat.chunks_exact_mut(d_out) {
                row.copy_from_slice(&b_dec_p.value);
            }
            cpu::matmul(
                MatRef::new(pre, rows, d_sae),
                MatRef::new(&w_dec_p.value, d_sae, d_out),
                x_hat,
                true,
            );
        } else {
            cpu::sparse_decode(&active, &w_dec_p.value, Some(&b_dec_p.value), x_hat);
        }
        // A skip transcoder's `x @ W_skipᵀ`, part of every prefix's output when nested.
        let skipped = config.skip_connection.then(|| {
            let mut skipped = vec![0f32; rows * d_out];
            cpu::matmul(
                MatRef::new(x_in, rows, d_in),
                MatRef::new(&w_skip.value, d_out, d_in).t(),
                &mut skipped,
                false,
            );
            x_hat
                .par_iter_mut()
                .zip(skipped.par_iter())
                .for_each(|(o, &v)| *o += v);
            skipped
        });
        let mut g_e = std::mem::take(x_hat);
        g_e.par_chunks_mut(d_out)
            .zip(target.par_chunks(d_out))
            .for_each(|(e, x)| e.iter_mut().zip(x).for_each(|(e, &x)| *e -= x));
        let sq_error = cpu::sum_squares(&g_e);
        let total_variance = cpu::total_variance(target, d_out);
        let mse = sq_error / rows as f64;
        let scale = 2.0 / rows as f32;
        g_e.par_iter_mut().for_each(|g| *g *= scale);
        // Matryoshka: what reaches each group's latents, and the prefixes' own error.
        let (nested, prefix_sq_error) = if nesting.groups() > 1 {
            let (g, sq) = nested_output_grads(
                &active,
                nesting,
                &w_dec_p.value,
                &b_dec_p.value,
                skipped.as_deref(),
                target,
                scale,
            );
            (Some(g), sq)
        } else {
            (None, 0.0)
        };
        let g_out = nested.as_deref().unwrap_or(&g_e);
        if config.skip_connection {
            // ∂/∂W_skip of the loss: g_outᵀ x, with what reaches every output (group 0's rows
            // when nested, as the skip path is in every prefix).
            let groups = nesting.groups();
            let g_every: std::borrow::Cow<[f32]> = if groups > 1 {
                g_out
                    .chunks_exact(d_out)
                    .step_by(groups)
                    .flatten()
                    .copied()
                    .collect::<Vec<f32>>()
                    .into()
            } else {
                g_out.into()
            };
            cpu::matmul(
                MatRef::new(&g_every, rows, d_out).t(),
                MatRef::new(x_in, rows, d_in),
                &mut w_skip.grad,
                false,
            );
        }

        // Gradient reaching each active latent's activation.
        let w_dec = &w_dec_p.value;
        let mut g_pre = if dense {
            dense_grad.resize(rows * d_sae, 0.0);
            cpu::matmul(
                MatRef::new(&g_e, rows, d_out),
                MatRef::new(w_dec, d_sae, d_out).t(),
                dense_grad,
                false,
            );
            gather_pairs(&active, dense_grad, d_sae)
        } else {
            cpu::pair_dots(&active, g_out, w_dec, d_out, nesting)
        };

        // Sparsity penalties.
        let mut auxiliary_loss = 0.0f64;
        let mut decoder_norm_grad: Option<Vec<f32>> = None;
        match arch {
            TrainArchitecture::Standard { l1_coefficient } => {
                let lambda = l1_coefficient * penalty_scale / rows as f32;
                let norms = row_norms(w_dec, d_out);
                let mut act_sums = vec![0f64; d_sae];
                for (p, (&j, &v)) in active.latent.iter().zip(&active.value).enumerate() {
                    let j = j as usize;
                    auxiliary_loss += f64::from(lambda * v * norms[j]);
                    act_sums[j] += f64::from(v);
                    g_pre[p] += lambda * norms[j];
                }
                // ∂/∂W_dec[j] of λ·(Σ_b f_j)·‖W_dec[j]‖.
                decoder_norm_grad = Some(
                    act_sums
                        .iter()
                        .zip(&norms)
                        .map(|(&s, &n)| lambda * s as f32 / n.max(f32::MIN_POSITIVE))
                        .collect(),
                );
            }
            TrainArchitecture::JumpRelu {
                l0_coefficient,
                bandwidth,
                ..
            } => {
                let lambda = l0_coefficient * penalty_scale / rows as f32;
                auxiliary_loss = f64::from(lambda) * active.len() as f64;
                // Pseudo-derivatives w.r.t. θ from the rectangle kernel, then chain to log θ.
                let g_log = &mut log_threshold.grad;
                for &(b, j, _) in &near {
                    let (b, j) = (b as usize, j as usize);
                    let theta = threshold[j];
                    let g_act = cpu::dot(&g_e[b * d_out..][..d_out], &w_dec[j * d_out..][..d_out]);
                    let g_theta = -(theta * g_act + lambda) / bandwidth;
                    g_log[j] += g_theta * theta;
                }
            }
            _ => {}
        }

        // Per-latent gradients of the main path.
        if dense {
            // g_pre as a dense matrix in the buffer the dot products came from.
            scatter_values(&active, &g_pre, d_sae, dense_grad);
            cpu::matmul(
                MatRef::new(pre, rows, d_sae).t(),
                MatRef::new(&g_e, rows, d_out),
                &mut w_dec_p.grad,
                true,
            );
            cpu::matmul(
                MatRef::new(dense_grad, rows, d_sae).t(),
                MatRef::new(x_in, rows, d_in),
                &mut w_enc_t.grad,
                true,
            );
            for (&j, &g) in active.latent.iter().zip(&g_pre) {
                b_enc_p.grad[j as usize] += g;
            }
        } else {
            cpu::accumulate_latent_grads(
                &active,
                &active.by_latent(d_sae),
                g_out,
                nesting,
                &g_pre,
                x_in,
                d_in,
                d_out,
                &mut w_dec_p.grad,
                &mut w_enc_t.grad,
                &mut b_enc_p.grad,
            );
        }
        if let Some(scale) = decoder_norm_grad {
            w_dec_p
                .grad
                .par_chunks_mut(d_out)
                .zip(w_dec_p.value.par_chunks(d_out))
                .zip(scale.par_iter())
                .for_each(|((g, w), &s)| cpu::axpy(s, w, g));
        }

        // AuxK: dead latents learn to explain the residual.
        if let TrainArchitecture::TopK {
            aux_k,
            aux_coefficient,
            ..
        }
        | TrainArchitecture::BatchTopK {
            aux_k,
            aux_coefficient,
            ..
        } = arch
            && n_dead > 0
            && aux_k > 0
            && aux_coefficient > 0.0
        {
            let aux_scale = (n_dead as f32 / aux_k as f32).min(1.0) * aux_coefficient;
            if let Some(aux) = aux_active.as_ref().filter(|a| !a.is_empty()) {
                let mut e_aux = vec![0f32; rows * d_out];
                cpu::sparse_decode(aux, &w_dec_p.value, None, &mut e_aux);
                // ê − (x − x̂) = ê + e, with e = g_e·B/2.
                let half_b = rows as f32 / 2.0;
                e_aux
                    .par_chunks_mut(d_out)
                    .zip(g_e.par_chunks(d_out))
                    .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, &g)| *a += g * half_b));
                auxiliary_loss = f64::from(aux_scale) * cpu::sum_squares(&e_aux) / rows as f64;
                let s = aux_scale * 2.0 / rows as f32;
                e_aux.par_iter_mut().for_each(|v| *v *= s);
                let g_aux = cpu::pair_dots(aux, &e_aux, &w_dec_p.value, d_out, cpu::Nesting::NONE);
                cpu::accumulate_latent_grads(
                    aux,
                    &aux.by_latent(d_sae),
                    &e_aux,
                    cpu::Nesting::NONE,
                    &g_aux,
                    x_in,
                    d_in,
                    d_out,
                    &mut w_dec_p.grad,
                    &mut w_enc_t.grad,
                    &mut b_enc_p.grad,
                );
            }
        }

        // b_dec: directly through the output (every prefix's, when nested: group 0's
        // gradient rows sum them), and through the encoder input x − b_dec.
        let direct = match &nested {
            Some(g) => cpu::column_sums_of_rows(g, d_out, nesting.groups()),
            None => cpu::column_sums(&g_e, d_out),
        };
        let mut g_b_dec: Vec<f32> = direct.into_iter().map(|v| v as f32).collect();
        if !transcoder {
            let mut through_encoder = vec![0f32; d_in];
            cpu::matmul(
                MatRef::new(&b_enc_p.grad, 1, d_sae),
                MatRef::new(&w_enc_t.value, d_sae, d_in),
                &mut through_encoder,
                false,
            );
            for (g, t) in g_b_dec.iter_mut().zip(&through_encoder) {
                *g -= t;
            }
        }
        b_dec_p.grad.copy_from_slice(&g_b_dec);
        *x_hat = g_e;

        let mut fire_counts = vec![0u32; d_sae];
        for &j in &active.latent {
            fire_counts[j as usize] += 1;
        }
        Ok(Pass {
            rows,
            mse,
            prefix_mse: prefix_sq_error / rows as f64,
            fvu: sq_error / total_variance.max(f64::MIN_POSITIVE),
            l0,
            auxiliary_loss,
            fire_counts,
            smallest_activation: active.value.iter().copied().reduce(f32::min),
        })
    }

    /// The SAE as trained, for inputs multiplied by `input_scale` and targets (the inputs
    /// themselves for an SAE) by `output_scale` during training; the scales are folded into the
    /// weights so the result takes raw activations.
    pub fn to_sae(&self, input_scale: f32, output_scale: f32, device: &Device) -> Result<Sae> {
        let (d_in, d_sae, d_out) = (self.config.d_in, self.config.d_sae, self.config.d_out());
        let s = input_scale;
        let w_enc_t = &self.params[W_ENC_T].value;
        let mut w_enc = vec![0f32; d_in * d_sae];
        for j in 0..d_sae {
            for i in 0..d_in {
                w_enc[i * d_sae + j] = w_enc_t[j * d_in + i] * s;
            }
        }
        let scaled = |v: &[f32], f: f32| v.iter().map(|x| x * f).collect::<Vec<f32>>();
        let architecture = match self.config.architecture {
            TrainArchitecture::Standard { .. } => Architecture::Standard,
            TrainArchitecture::TopK { k, .. } => Architecture::TopK { k },
            TrainArchitecture::BatchTopK { k, .. } => Architecture::BatchTopK { k },
            TrainArchitecture::JumpRelu { .. } => Architecture::JumpRelu,
        };
        let threshold = match self.config.architecture {
            TrainArchitecture::JumpRelu { .. } => Some(
                self.params[LOG_THRESHOLD]
                    .value
                    .iter()
                    .map(|l| l.exp())
                    .collect::<Vec<f32>>(),
            ),
            TrainArchitecture::BatchTopK { .. } => Some(vec![self.batch_threshold; d_sae]),
            _ => None,
        };
        Ok(Sae {
            architecture,
            w_enc: Tensor::from_vec(w_enc, (d_in, d_sae), device)?,
            w_dec: Tensor::from_vec(
                scaled(&self.params[W_DEC].value, 1.0 / output_scale),
                (d_sae, d_out),
                device,
            )?,
            b_enc: Tensor::from_vec(self.params[B_ENC].value.clone(), d_sae, device)?,
            b_dec: Tensor::from_vec(
                scaled(&self.params[B_DEC].value, 1.0 / output_scale),
                d_out,
                device,
            )?,
            threshold: threshold
                .map(|t| Tensor::from_vec(t, d_sae, device))
                .transpose()?,
            apply_b_dec_to_input: self.config.transcode_to.is_none(),
            transcoder: self.config.transcode_to.is_some(),
            // Trained as `s_y·y ≈ … + (s_x·x) @ W_skipᵀ`.
            w_skip: self
                .config
                .skip_connection
                .then(|| {
                    Tensor::from_vec(
                        scaled(&self.params[W_SKIP].value, s / output_scale),
                        (d_out, d_in),
                        device,
                    )
                })
                .transpose()?,
        })
    }

    /// Every tensor of the training state, for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let mut out = HashMap::new();
        for p in &self.params {
            for (suffix, data) in [("", &p.value), (".adam_m", &p.m), (".adam_v", &p.v)] {
                out.insert(
                    format!("{}{suffix}", p.name),
                    Tensor::from_slice(data, data.len(), &dev)?,
                );
            }
        }
        self.firing.insert_tensors(&mut out)?;
        Ok(out)
    }

    /// Counters that go with [`Self::state_tensors`].
    pub fn state_counters(&self) -> TrainerCounters {
        TrainerCounters {
            step: self.step,
            tokens: self.tokens,
            batch_threshold: self.batch_threshold,
            fire_tokens: self.firing.fire_tokens,
        }
    }

    /// log10 of each latent's firing frequency over the second half of training (SAELens'
    /// `sparsity`; −10 for latents that never fired).
    pub fn log_sparsity(&self) -> Vec<f32> {
        let n = self.firing.fire_tokens.max(1) as f64;
        self.firing
            .fire_counts
            .iter()
            .map(|&c| (c as f64 / n + 1e-10).log10() as f32)
            .collect()
    }

    /// Rebuilds a trainer from a checkpoint's tensors; errors name `source` and the tensor.
    pub fn from_state(
        config: TrainConfig,
        counters: &TrainerCounters,
        tensors: &HashMap<String, Tensor>,
        source: &Path,
    ) -> Result<Self> {
        config.validate()?;
        let mut trainer = Self::new(config, &[])?;
        let get = |key: String, len: usize| -> Result<Vec<f32>> {
            // Checkpoints from before a parameter existed lack it where it is empty.
            if len == 0 && !tensors.contains_key(&key) {
                return Ok(Vec::new());
            }
            let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                dir: source.to_path_buf(),
                key: key.clone(),
            })?;
            if t.elem_count() != len {
                return Err(Error::TensorShape {
                    path: source.to_path_buf(),
                    key,
                    expected: vec![len],
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?)
        };
        for p in &mut trainer.params {
            let n = p.value.len();
            p.value = get(p.name.to_string(), n)?;
            p.m = get(format!("{}.adam_m", p.name), n)?;
            p.v = get(format!("{}.adam_v", p.name), n)?;
        }
        let d_sae = trainer.config.d_sae;
        let counts = |key: &str| super::checkpoint::counts(tensors, key, d_sae, source);
        trainer.firing = FiringCounters {
            tokens_since_fired: counts("tokens_since_fired")?,
            fire_counts: counts("fire_counts")?,
            fire_tokens: counters.fire_tokens,
        };
        trainer.step = counters.step;
        trainer.tokens = counters.tokens;
        trainer.batch_threshold = counters.batch_threshold;
        Ok(trainer)
    }
}

/// The learning rate's factor at `step` of `total`: a linear warm-up over `warmup` steps, 1,
/// then a linear fall to zero over the last `decay` steps.
pub fn lr_schedule(step: u64, warmup: u64, decay: u64, total: u64) -> f32 {
    let warm = if warmup > 0 {
        ((step + 1) as f32 / warmup as f32).min(1.0)
    } else {
        1.0
    };
    let left = total.saturating_sub(step);
    let fall = if decay > 0 && left < decay {
        left as f32 / decay as f32
    } else {
        1.0
    };
    warm * fall
}

/// A transcoder's batch `[rows, d_in + d_out]` as its inputs `[rows, d_in]` and targets
/// `[rows, d_out]`.
fn split_rows(x: &[f32], d_in: usize, d_out: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / (d_in + d_out);
    let (mut inputs, mut targets) = (
        Vec::with_capacity(rows * d_in),
        Vec::with_capacity(rows * d_out),
    );
    for row in x.chunks_exact(d_in + d_out) {
        inputs.extend_from_slice(&row[..d_in]);
        targets.extend_from_slice(&row[d_in..]);
    }
    (inputs, targets)
}

/// The rows of a training batch `x` of width `d_in`; an error unless it has a whole number.
pub(crate) fn batch_rows(x: &[f32], d_in: usize) -> Result<usize> {
    if x.is_empty() || !x.len().is_multiple_of(d_in) {
        return Err(Error::InvalidArgument {
            what: "SAE training batch",
            value: format!("{} values", x.len()),
            message: format!("not a whole number of rows of width d_in = {d_in}"),
        });
    }
    Ok(x.len() / d_in)
}

/// What [`SaeTrainer::backward`] leaves for the update.
struct Pass {
    rows: usize,
    mse: f64,
    /// Matryoshka: the prefixes' reconstruction error, `Σ_prefix ‖e‖² / B`.
    prefix_mse: f64,
    fvu: f64,
    l0: f64,
    auxiliary_loss: f64,
    fire_counts: Vec<u32>,
    smallest_activation: Option<f32>,
}

/// Per-latent firing records, kept alike by both training engines: what AuxK and the dead
/// fraction read, and the second half's counts for `sparsity.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FiringCounters {
    /// Tokens since each latent last fired.
    pub(crate) tokens_since_fired: Vec<u64>,
    /// Firings per latent over the second half of training.
    pub(crate) fire_counts: Vec<u64>,
    /// Rows those counts cover.
    pub(crate) fire_tokens: u64,
}

impl FiringCounters {
    fn new(d_sae: usize) -> Self {
        Self {
            tokens_since_fired: vec![0; d_sae],
            fire_counts: vec![0; d_sae],
            fire_tokens: 0,
        }
    }

    /// Which latents have been silent for `dead_after` tokens.
    pub(crate) fn dead_mask(&self, dead_after: u64) -> Vec<bool> {
        self.tokens_since_fired
            .iter()
            .map(|&t| t >= dead_after)
            .collect()
    }

    pub(crate) fn dead_fraction(&self, dead_after: u64) -> f64 {
        let dead = self.tokens_since_fired.iter().filter(|&&t| t >= dead_after);
        dead.count() as f64 / self.tokens_since_fired.len().max(1) as f64
    }

    /// Records a step of `rows` rows in which latent `j` fired `fired[j]` times; the counts
    /// for the sparsity file only in the second half of training.
    pub(crate) fn record(
        &mut self,
        fired: impl IntoIterator<Item = u64>,
        rows: u64,
        second_half: bool,
    ) {
        for ((since, count), f) in self
            .tokens_since_fired
            .iter_mut()
            .zip(self.fire_counts.iter_mut())
            .zip(fired)
        {
            *since = if f > 0 { 0 } else { *since + rows };
            if second_half {
                *count += f;
            }
        }
        if second_half {
            self.fire_tokens += rows;
        }
    }

    /// Adds `fire_counts` and `tokens_since_fired` to a checkpoint's tensors (as i64:
    /// safetensors has no u64).
    pub(crate) fn insert_tensors(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        for (name, counts) in [
            ("fire_counts", &self.fire_counts),
            ("tokens_since_fired", &self.tokens_since_fired),
        ] {
            let values: Vec<i64> = counts.iter().map(|&t| t as i64).collect();
            out.insert(
                name.into(),
                Tensor::from_vec(values, counts.len(), &Device::Cpu)?,
            );
        }
        Ok(())
    }
}

/// Scalar training counters saved with a checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerCounters {
    pub step: u64,
    pub tokens: u64,
    pub batch_threshold: f32,
    pub fire_tokens: u64,
}

fn mean_row(x: &[f32], d: usize) -> Vec<f32> {
    let rows = (x.len() / d).max(1);
    cpu::column_sums(x, d)
        .into_iter()
        .map(|s| (s / rows as f64) as f32)
        .collect()
}

/// Weiszfeld's iteration for the point minimising the summed distance to the rows of `x`.
pub fn geometric_median(x: &[f32], d: usize, iterations: usize) -> Vec<f32> {
    let mut y: Vec<f64> = mean_row(x, d).into_iter().map(f64::from).collect();
    if x.len() < d {
        return vec![0.0; d];
    }
    for _ in 0..iterations {
        let (num, den) = x
            .par_chunks(d)
            .map(|row| {
                let dist = row
                    .iter()
                    .zip(&y)
                    .map(|(&v, &m)| (f64::from(v) - m).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-8);
                let w = 1.0 / dist;
                (
                    row.iter().map(|&v| f64::from(v) * w).collect::<Vec<f64>>(),
                    w,
                )
            })
            .reduce(
                || (vec![0.0; d], 0.0),
                |(mut a, wa), (b, wb)| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    (a, wa + wb)
                },
            );
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let moved = next
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        y = next;
        if moved < 1e-6 {
            break;
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

fn row_norms(w: &[f32], d: usize) -> Vec<f32> {
    w.par_chunks(d).map(|r| cpu::dot(r, r).sqrt()).collect()
}

fn normalize_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(|r| {
        let n = cpu::dot(r, r).sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|v| *v /= n);
        }
    });
}

/// `g[j] −= (g[j]·w[j] / ‖w[j]‖²) w[j]`: keeps steps tangent to the unit-norm constraint.
fn remove_parallel_component(g: &mut [f32], w: &[f32], d: usize) {
    g.par_chunks_mut(d).zip(w.par_chunks(d)).for_each(|(g, w)| {
        let ww = cpu::dot(w, w);
        if ww > 0.0 {
            cpu::axpy(-cpu::dot(g, w) / ww, w, g);
        }
    });
}

/// Matryoshka's output gradients, `[rows, groups, d_in]`: group `h`'s latents appear in the
/// reconstruction of every prefix `g ≥ h`, so theirs is `Σ_{g ≥ h} scale · (x̂_g − x)`, with
/// `x̂_g` decoded from the latents of groups `0..=g` (plus a skip transcoder's `skipped`,
/// `[rows, d_in]`, in every prefix). Also returns the squared error of the prefixes short of
/// the whole dictionary, `Σ_{g < last} ‖x̂_g − x‖²`. (`d_in` here is the output's width: a
/// transcoder's `d_out`, `x` its target.)
fn nested_output_grads(
    active: &Active,
    nesting: cpu::Nesting,
    w_dec: &[f32],
    b_dec: &[f32],
    skipped: Option<&[f32]>,
    x: &[f32],
    scale: f32,
) -> (Vec<f32>, f64) {
    let d_in = b_dec.len();
    let groups = nesting.groups();
    let mut out = vec![0f32; active.rows() * groups * d_in];
    let prefix_sq_error = out
        .par_chunks_mut(groups * d_in)
        .zip(x.par_chunks(d_in))
        .enumerate()
        .map(|(b, (out, x))| {
            let (latents, values) = active.row(b);
            // Residual of each prefix: x̂_g − x.
            let mut residual: Vec<f32> = b_dec.iter().zip(x).map(|(&c, &x)| c - x).collect();
            if let Some(skipped) = skipped {
                cpu::axpy(1.0, &skipped[b * d_in..][..d_in], &mut residual);
            }
            let mut sq_error = 0f64;
            for (g, slot) in out.chunks_exact_mut(d_in).enumerate() {
                for (&j, &v) in latents.iter().zip(values) {
                    if nesting.group(j as usize) == g {
                        cpu::axpy(v, &w_dec[j as usize * d_in..][..d_in], &mut residual);
                    }
                }
                if g + 1 < groups {
                    sq_error += cpu::sum_squares(&residual);
                }
                slot.copy_from_slice(&residual);
            }
            // Suffix sums, scaled: slot h ← scale · Σ_{g ≥ h} residual_g.
            let mut acc = vec![0f32; d_in];
            for slot in out.chunks_exact_mut(d_in).rev() {
                for (a, s) in acc.iter_mut().zip(slot.iter_mut()) {
                    *a += scale * *s;
                    *s = *a;
                }
            }
            sq_error
        })
        .sum();
    (out, prefix_sq_error)
}

/// Overwrites `out` (`[rows, d_sae]`) with one value per active pair, zeros elsewhere.
fn scatter_values(active: &Active, values: &[f32], d_sae: usize, out: &mut [f32]) {
    out.par_chunks_mut(d_sae).enumerate().for_each(|(b, row)| {
        row.fill(0.0);
        let r = active.row_start[b]..active.row_start[b + 1];
        for (&j, &v) in active.latent[r.clone()].iter().zip(&values[r]) {
            row[j as usize] = v;
        }
    });
}

fn gather_pairs(active: &Active, dense: &[f32], d_sae: usize) -> Vec<f32> {
    (0..active.rows())
        .into_par_iter()
        .flat_map_iter(|b| {
            let r = active.row_start[b]..active.row_start[b + 1];
            active.latent[r]
                .iter()
                .map(move |&j| dense[b * d_sae + j as usize])
        })
        .collect()
}

/// `(row, latent, value)` of pre-activations within half a bandwidth of their threshold: the
/// only ones with a JumpReLU threshold gradient.
fn near_threshold(
    pre: &[f32],
    bias: &[f32],
    threshold: &[f32],
    bandwidth: f32,
) -> Vec<(u32, u32, f32)> {
    let d_sae = bias.len();
    let half = bandwidth / 2.0;
    pre.par_chunks(d_sae)
        .enumerate()
        .flat_map_iter(|(b, row)| {
            row.iter().zip(bias).zip(threshold).enumerate().filter_map(
                move |(j, ((&p, &bi), &t))| {
                    let v = p + bi;
                    ((v - t).abs() < half).then_some((b as u32, j as u32, v))
                },
            )
        })
        .collect()
}

/// BatchTopK: the `total` largest positive values of the whole batch. Exact: a threshold
/// estimated from a sample filters the candidates, then a selection finds the cut.
fn batch_top_k(pre: &[f32], bias: &[f32], total: usize, seed: u64) -> Active {
    let n = pre.len();
    let d_sae = bias.len();
    let value = |i: usize| pre[i] + bias[i % d_sae];
    // Sample-based lower bound that should keep about twice `total` candidates.
    let samples = 65_536.min(n);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sample: Vec<f32> = (0..samples)
        .map(|_| value(rng.random_range(0..n)))
        .collect();
    let want = ((2 * total) as f64 / n as f64 * samples as f64).ceil() as usize;
    let mut floor = 0.0f32;
    if want < samples {
        let at = samples - 1 - want;
        sample.select_nth_unstable_by(at, f32::total_cmp);
        floor = sample[at].max(0.0);
    }
    loop {
        let candidates = cpu::select_rows(pre, bias, |_, v| v > floor);
        if candidates.len() < total && floor > 0.0 {
            floor = 0.0;
            continue;
        }
        if candidates.len() <= total {
            return candidates;
        }
        let mut values = candidates.value.clone();
        let at = values.len() - total;
        values.select_nth_unstable_by(at, f32::total_cmp);
        let cut = values[at];
        let rows: Vec<Vec<(u32, f32)>> = (0..candidates.rows())
            .map(|b| {
                let (l, v) = candidates.row(b);
                l.iter()
                    .zip(v)
                    .filter(|&(_, &v)| v >= cut)
                    .map(|(&j, &v)| (j, v))
                    .collect()
            })
            .collect();
        return Active::from_rows(rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| crate::world::train::normal(&mut rng) as f32 * scale)
            .collect()
    }

    /// A trainer whose parameters are all nonzero and not at their constrained values.
    fn trainer(architecture: TrainArchitecture, d_in: usize, d_sae: usize) -> SaeTrainer {
        let mut config = TrainConfig::new(architecture, d_in, d_sae);
        config.b_dec_init = BDecInit::Zeros;
        let mut t = SaeTrainer::new(config, &[]).unwrap();
        t.params[W_ENC_T].value = random(d_sae * d_in, 1, 0.5);
        t.params[W_DEC].value = random(d_sae * d_in, 2, 0.5);
        t.params[B_ENC].value = random(d_sae, 3, 0.1);
        t.params[B_DEC].value = random(d_in, 4, 0.1);
        t
    }

    /// Loss and gradients by candle's autograd, for given 0/1 masks of the active latents
    /// (main and AuxK): the selection itself has no gradient.
    fn autograd(
        t: &SaeTrainer,
        x: &[f32],
        mask: &[f32],
        aux: Option<(&[f32], f32)>,
        l1: Option<f32>,
    ) -> Vec<Vec<f32>> {
        let (d_in, d_sae, d_out) = (t.config.d_in, t.config.d_sae, t.config.d_out());
        let rows = x.len() / t.config.row_width();
        let dev = Device::Cpu;
        let var = |i: usize, shape: &[usize]| {
            Var::from_tensor(&Tensor::from_slice(&t.params[i].value, shape, &dev).unwrap()).unwrap()
        };
        let w_enc_t = var(W_ENC_T, &[d_sae, d_in]);
        let w_dec = var(W_DEC, &[d_sae, d_out]);
        let b_enc = var(B_ENC, &[d_sae]);
        let b_dec = var(B_DEC, &[d_out]);
        // A transcoder's rows are `[x | y]`: it encodes x as it is and predicts y.
        let (x, encoded) = match t.config.transcode_to {
            Some(_) => {
                let (inputs, targets) = split_rows(x, d_in, d_out);
                let inputs = Tensor::from_vec(inputs, (rows, d_in), &dev).unwrap();
                (
                    Tensor::from_vec(targets, (rows, d_out), &dev).unwrap(),
                    inputs,
                )
            }
            None => {
                let x = Tensor::from_slice(x, (rows, d_in), &dev).unwrap();
                let centred = x.broadcast_sub(&b_dec).unwrap();
                (x, centred)
            }
        };
        let mask = Tensor::from_slice(mask, (rows, d_sae), &dev).unwrap();
        let pre = encoded
            .matmul(&w_enc_t.t().unwrap())
            .unwrap()
            .broadcast_add(&b_enc)
            .unwrap();
        let acts = (&pre * &mask).unwrap();
        let mut x_hat = acts.matmul(&w_dec).unwrap().broadcast_add(&b_dec).unwrap();
        // A skip transcoder adds its inputs through W_skip.
        let w_skip = t
            .config
            .skip_connection
            .then(|| var(W_SKIP, &[d_out, d_in]));
        if let Some(w_skip) = &w_skip {
            x_hat = (x_hat + encoded.matmul(&w_skip.t().unwrap()).unwrap()).unwrap();
        }
        let n = rows as f64;
        let mut loss = ((&x_hat - &x).unwrap().sqr().unwrap().sum_all().unwrap() / n).unwrap();
        // Matryoshka: each prefix reconstructs on its own too.
        for &m in &t.config.matryoshka {
            let mut prefix_hat = acts
                .narrow(1, 0, m)
                .unwrap()
                .matmul(&w_dec.narrow(0, 0, m).unwrap())
                .unwrap()
                .broadcast_add(&b_dec)
                .unwrap();
            if let Some(w_skip) = &w_skip {
                prefix_hat = (prefix_hat + encoded.matmul(&w_skip.t().unwrap()).unwrap()).unwrap();
            }
            let prefix = (&prefix_hat - &x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            loss = (loss + (prefix / n).unwrap()).unwrap();
        }
        if let Some(lambda) = l1 {
            let norms = w_dec.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
            let penalty = acts
                .broadcast_mul(&norms)
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(f64::from(lambda) / n, 0.0)
                .unwrap();
            loss = (loss + penalty).unwrap();
        }
        if let Some((aux_mask, coefficient)) = aux {
            let aux_mask = Tensor::from_slice(aux_mask, (rows, d_sae), &dev).unwrap();
            let residual = (&x - &x_hat).unwrap().detach();
            let e_hat = (&pre * &aux_mask).unwrap().matmul(&w_dec).unwrap();
            let aux_loss = (&e_hat - &residual)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(f64::from(coefficient) / n, 0.0)
                .unwrap();
            loss = (loss + aux_loss).unwrap();
        }
        let grads = loss.backward().unwrap();
        [
            Some(&w_enc_t),
            Some(&w_dec),
            Some(&b_enc),
            Some(&b_dec),
            w_skip.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
    }

    /// Pre-activations computed independently of the trainer, `[rows][d_sae]` (a transcoder's
    /// from the `x` of its `[x | y]` rows, without `b_dec`).
    fn pre_activations(t: &SaeTrainer, x: &[f32]) -> Vec<Vec<f32>> {
        let (d_in, d_sae) = (t.config.d_in, t.config.d_sae);
        let transcoder = t.config.transcode_to.is_some();
        x.chunks(t.config.row_width())
            .map(|row| {
                (0..d_sae)
                    .map(|j| {
                        let w = &t.params[W_ENC_T].value[j * d_in..][..d_in];
                        let xc: Vec<f32> = if transcoder {
                            row[..d_in].to_vec()
                        } else {
                            row.iter()
                                .zip(&t.params[B_DEC].value)
                                .map(|(a, b)| a - b)
                                .collect()
                        };
                        cpu::dot(&xc, w) + t.params[B_ENC].value[j]
                    })
                    .collect()
            })
            .collect()
    }

    /// 0/1 mask of the `k` largest positive values per row among `allowed` latents.
    fn top_k_mask(pre: &[Vec<f32>], k: usize, allowed: &[bool]) -> Vec<f32> {
        pre.iter()
            .flat_map(|row| {
                let mut order: Vec<usize> = (0..row.len()).filter(|&j| allowed[j]).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let mut mask = vec![0f32; row.len()];
                for &j in order.iter().take(k) {
                    if row[j] > 0.0 {
                        mask[j] = 1.0;
                    }
                }
                mask
            })
            .collect()
    }

    fn assert_close(name: &str, ours: &[f32], reference: &[f32]) {
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
            assert!(
                (a - b).abs() <= 2e-4 * scale,
                "{name}[{i}]: ours {a}, autograd {b} (scale {scale})"
            );
        }
    }

    fn check_gradients(
        mut t: SaeTrainer,
        x: &[f32],
        mask: &[f32],
        aux: Option<(&[f32], f32)>,
        l1: Option<f32>,
    ) {
        let reference = autograd(&t, x, mask, aux, l1);
        t.backward(x).unwrap();
        for (&i, r) in [W_ENC_T, W_DEC, B_ENC, B_DEC, W_SKIP]
            .iter()
            .zip(&reference)
        {
            assert_close(t.params[i].name, &t.params[i].grad, r);
        }
    }

    #[test]
    fn topk_gradients_match_autograd() {
        let (d_in, d_sae, rows, k) = (12, 40, 9, 5);
        let t = trainer(
            TrainArchitecture::TopK {
                k,
                aux_k: 0,
                aux_coefficient: 0.0,
            },
            d_in,
            d_sae,
        );
        let x = random(rows * d_in, 7, 1.0);
        let mask = top_k_mask(&pre_activations(&t, &x), k, &vec![true; d_sae]);
        check_gradients(t, &x, &mask, None, None);
    }

    /// A transcoder trainer (`(d_in, d_out, d_sae)`, nested at `matryoshka`) with random
    /// weights, a random skip path if `skip`, and `b_dec` not fitted to data.
    fn random_transcoder(
        architecture: TrainArchitecture,
        (d_in, d_out, d_sae): (usize, usize, usize),
        skip: bool,
        matryoshka: &[usize],
    ) -> SaeTrainer {
        let mut config = TrainConfig::new(architecture, d_in, d_sae);
        config.transcode_to = Some(d_out);
        config.skip_connection = skip;
        config.matryoshka = matryoshka.to_vec();
        config.b_dec_init = BDecInit::Zeros;
        let mut t = SaeTrainer::new(config, &[]).unwrap();
        if skip {
            t.params[W_SKIP].value = random(d_out * d_in, 5, 0.3);
        }
        t.params[W_ENC_T].value = random(d_sae * d_in, 1, 0.5);
        t.params[W_DEC].value = random(d_sae * d_out, 2, 0.5);
        t.params[B_ENC].value = random(d_sae, 3, 0.1);
        t.params[B_DEC].value = random(d_out, 4, 0.1);
        t
    }

    /// A transcoder's gradients (rows `[x | y]`: encode x without b_dec, predict y) agree with
    /// autograd, for top-k and for the decoder-norm-weighted L1 of `standard`, with and without
    /// a skip path; its FVU is measured against the target's variance.
    #[test]
    fn transcoder_gradients_match_autograd() {
        let (d_in, d_out, d_sae, rows, k) = (12, 7, 40, 9, 5);
        let top_k = TrainArchitecture::TopK {
            k,
            aux_k: 0,
            aux_coefficient: 0.0,
        };
        let l1 = TrainArchitecture::Standard {
            l1_coefficient: 0.3,
        };
        let cases = [
            (top_k, None, false),
            (l1.clone(), Some(0.3f32), false),
            (l1, Some(0.3f32), true),
        ];
        for (architecture, penalty, skip) in cases {
            let mut t = random_transcoder(architecture.clone(), (d_in, d_out, d_sae), skip, &[]);
            let x = random(rows * (d_in + d_out), 7, 1.0);
            let pre = pre_activations(&t, &x);
            let mask: Vec<f32> = match architecture {
                TrainArchitecture::TopK { .. } => top_k_mask(&pre, k, &vec![true; d_sae]),
                _ => pre
                    .iter()
                    .flatten()
                    .map(|&v| f32::from(u8::from(v > 0.0)))
                    .collect(),
            };
            let pass = t.backward(&x).unwrap();
            let (_, y) = split_rows(&x, d_in, d_out);
            let sq_error = pass.mse * rows as f64;
            let fvu = sq_error / cpu::total_variance(&y, d_out);
            assert!((pass.fvu - fvu).abs() < 1e-9 * fvu, "{} vs {fvu}", pass.fvu);
            check_gradients(t, &x, &mask, None, penalty);
        }
    }

    #[test]
    fn matryoshka_gradients_match_autograd() {
        let (d_in, d_sae, rows, k) = (12, 40, 9, 5);
        let mut t = trainer(
            TrainArchitecture::TopK {
                k,
                aux_k: 0,
                aux_coefficient: 0.0,
            },
            d_in,
            d_sae,
        );
        // Latent 3 is the last of the first prefix, 4 the first of the second.
        t.config.matryoshka = vec![4, 15];
        let x = random(rows * d_in, 7, 1.0);
        let pre = pre_activations(&t, &x);
        let mask = top_k_mask(&pre, k, &vec![true; d_sae]);
        let groups: std::collections::BTreeSet<usize> = mask
            .chunks(d_sae)
            .flat_map(|row| (0..d_sae).filter(|&j| row[j] > 0.0))
            .map(|j| cpu::Nesting { ends: &[4, 15] }.group(j))
            .collect();
        assert_eq!(groups.len(), 3, "the batch uses every group");
        check_gradients(t, &x, &mask, None, None);
    }

    /// A Matryoshka transcoder (rows `[x | y]`): every prefix predicts y on its own, a skip
    /// path included in each; top-k without and batch top-k with a skip path, against autograd.
    #[test]
    fn matryoshka_transcoder_gradients_match_autograd() {
        let (d_in, d_out, d_sae, rows, k) = (12, 7, 40, 9, 5);
        let cases = [
            (
                TrainArchitecture::TopK {
                    k,
                    aux_k: 0,
                    aux_coefficient: 0.0,
                },
                false,
            ),
            (
                TrainArchitecture::BatchTopK {
                    k,
                    aux_k: 0,
                    aux_coefficient: 0.0,
                    threshold_lr: 0.01,
                },
                true,
            ),
        ];
        for (architecture, skip) in cases {
            let t = random_transcoder(architecture.clone(), (d_in, d_out, d_sae), skip, &[4, 15]);
            let x = random(rows * (d_in + d_out), 7, 1.0);
            let pre = pre_activations(&t, &x);
            let mask = match architecture {
                TrainArchitecture::BatchTopK { .. } => {
                    let flat: Vec<f32> = pre.iter().flatten().copied().collect();
                    let mut sorted = flat.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    let cut = sorted[k * rows - 1];
                    flat.iter()
                        .map(|&v| f32::from(u8::from(v >= cut && v > 0.0)))
                        .collect()
                }
                _ => top_k_mask(&pre, k, &vec![true; d_sae]),
            };
            let groups: std::collections::BTreeSet<usize> = mask
                .chunks(d_sae)
                .flat_map(|row| (0..d_sae).filter(|&j| row[j] > 0.0))
                .map(|j| cpu::Nesting { ends: &[4, 15] }.group(j))
                .collect();
            assert_eq!(groups.len(), 3, "skip {skip}: the batch uses every group");
            check_gradients(t, &x, &mask, None, None);
        }
    }

    #[test]
    fn matryoshka_prefixes_are_checked() {
        let mut config = TrainConfig::new(
            TrainArchitecture::TopK {
                k: 4,
                aux_k: 0,
                aux_coefficient: 0.0,
            },
            8,
            32,
        );
        for bad in [vec![16, 8], vec![0, 8], vec![8, 32]] {
            config.matryoshka = bad.clone();
            let e = config.validate().unwrap_err().to_string();
            assert!(e.contains("matryoshka") && e.contains("32"), "{bad:?}: {e}");
        }
        config.matryoshka = vec![8, 16];
        config.validate().unwrap();
        config.architecture = TrainArchitecture::Standard {
            l1_coefficient: 1.0,
        };
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("topk"), "{e}");
    }

    #[test]
    fn auxk_gradients_match_autograd() {
        let (d_in, d_sae, rows, k, aux_k) = (12, 40, 9, 5, 6);
        let mut t = trainer(
            TrainArchitecture::TopK {
                k,
                aux_k,
                aux_coefficient: 0.5,
            },
            d_in,
            d_sae,
        );
        // Every third latent has been silent for longer than the dead window.
        let dead: Vec<bool> = (0..d_sae).map(|j| j % 3 == 0).collect();
        for (t_since, &d) in t.firing.tokens_since_fired.iter_mut().zip(&dead) {
            *t_since = if d { t.config.dead_after_tokens } else { 0 };
        }
        let x = random(rows * d_in, 8, 1.0);
        let pre = pre_activations(&t, &x);
        let mask = top_k_mask(&pre, k, &vec![true; d_sae]);
        let aux_mask = top_k_mask(&pre, aux_k, &dead);
        let n_dead = dead.iter().filter(|&&d| d).count();
        let scale = 0.5 * (n_dead as f32 / aux_k as f32).min(1.0);
        check_gradients(t, &x, &mask, Some((&aux_mask, scale)), None);
    }

    #[test]
    fn standard_l1_gradients_match_autograd() {
        let (d_in, d_sae, rows) = (12, 40, 9);
        let t = trainer(
            TrainArchitecture::Standard {
                l1_coefficient: 0.3,
            },
            d_in,
            d_sae,
        );
        let x = random(rows * d_in, 9, 1.0);
        let mask: Vec<f32> = pre_activations(&t, &x)
            .iter()
            .flatten()
            .map(|&v| f32::from(u8::from(v > 0.0)))
            .collect();
        // About half the latents fire at this scale, so this takes the dense path.
        check_gradients(t, &x, &mask, None, Some(0.3));
    }

    #[test]
    fn standard_l1_sparse_path_matches_autograd() {
        let (d_in, d_sae, rows) = (12, 200, 9);
        let mut t = trainer(
            TrainArchitecture::Standard {
                l1_coefficient: 0.3,
            },
            d_in,
            d_sae,
        );
        // Negative encoder biases leave a few latents on: the sparse path.
        t.params[B_ENC].value.iter_mut().for_each(|b| *b -= 4.0);
        let x = random(rows * d_in, 10, 1.0);
        let mask: Vec<f32> = pre_activations(&t, &x)
            .iter()
            .flatten()
            .map(|&v| f32::from(u8::from(v > 0.0)))
            .collect();
        let on = mask.iter().sum::<f32>() as usize;
        assert!(
            on > 0 && on * 16 < rows * d_sae,
            "{on} active: not the sparse path"
        );
        check_gradients(t, &x, &mask, None, Some(0.3));
    }

    #[test]
    fn batchtopk_keeps_the_batch_largest_and_matches_autograd() {
        let (d_in, d_sae, rows, k) = (12, 40, 9, 3);
        let t = trainer(
            TrainArchitecture::BatchTopK {
                k,
                aux_k: 0,
                aux_coefficient: 0.0,
                threshold_lr: 0.01,
            },
            d_in,
            d_sae,
        );
        let x = random(rows * d_in, 11, 1.0);
        let pre: Vec<f32> = pre_activations(&t, &x).into_iter().flatten().collect();
        let mut sorted = pre.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let cut = sorted[k * rows - 1];
        let mask: Vec<f32> = pre
            .iter()
            .map(|&v| f32::from(u8::from(v >= cut && v > 0.0)))
            .collect();
        assert_eq!(mask.iter().sum::<f32>() as usize, k * rows);
        check_gradients(t, &x, &mask, None, None);
    }

    #[test]
    fn jumprelu_gradients_match_autograd_and_the_papers_threshold_estimator() {
        let (d_in, d_sae, rows) = (12, 40, 9);
        let arch = TrainArchitecture::JumpRelu {
            l0_coefficient: 0.1,
            bandwidth: 0.5,
            init_threshold: 0.3,
        };
        let mut t = trainer(arch, d_in, d_sae);
        t.config.penalty_warmup_steps = 0;
        let x = random(rows * d_in, 12, 1.0);
        let pre = pre_activations(&t, &x);
        let mask: Vec<f32> = pre
            .iter()
            .flatten()
            .map(|&v| f32::from(u8::from(v > 0.3)))
            .collect();
        let reference = autograd(&t, &x, &mask, None, None);
        t.backward(&x).unwrap();
        for (i, r) in reference.iter().enumerate() {
            assert_close(t.params[i].name, &t.params[i].grad, r);
        }
        // The threshold's straight-through gradient (Rajamanoharan et al. 2024, rectangle
        // kernel of width ε): per pre-activation z within ε/2 of θ,
        // ∂L/∂θ = −(θ·∂L/∂a + λ)/ε, chained to log θ; ∂L/∂a from the reconstruction
        // loss Σ‖x̂ − x‖²/rows, λ = L0 coefficient / rows.
        let (theta, eps, lambda) = (0.3f32, 0.5f32, 0.1 / rows as f32);
        let w_dec = &t.params[W_DEC].value;
        let mut want = vec![0f32; d_sae];
        let mut near = 0;
        for (b, z) in pre.iter().enumerate() {
            let mut x_hat = t.params[B_DEC].value.clone();
            for (j, &v) in z.iter().enumerate() {
                if v > theta {
                    cpu::axpy(v, &w_dec[j * d_in..][..d_in], &mut x_hat);
                }
            }
            let g_e: Vec<f32> = x_hat
                .iter()
                .zip(&x[b * d_in..][..d_in])
                .map(|(h, x)| 2.0 * (h - x) / rows as f32)
                .collect();
            for (j, &v) in z.iter().enumerate() {
                if (v - theta).abs() < eps / 2.0 {
                    let g_act = cpu::dot(&g_e, &w_dec[j * d_in..][..d_in]);
                    want[j] += -(theta * g_act + lambda) / eps * theta;
                    near += 1;
                }
            }
        }
        assert!(
            near > 0,
            "no pre-activation near a threshold: nothing checked"
        );
        assert_close("log_threshold", &t.params[LOG_THRESHOLD].grad, &want);
    }

    /// Sparse ground truth: each row mixes a few of `n_true` directions.
    fn sparse_data(rows: usize, d_in: usize, n_true: usize, per_row: usize, seed: u64) -> Vec<f32> {
        let dirs = random(n_true * d_in, seed, 1.0);
        let mut rng = StdRng::seed_from_u64(seed + 1);
        let mut x = vec![0f32; rows * d_in];
        for row in x.chunks_mut(d_in) {
            for _ in 0..per_row {
                let j = rng.random_range(0..n_true);
                let a = 1.0 + rng.random::<f32>();
                cpu::axpy(a, &dirs[j * d_in..][..d_in], row);
            }
        }
        x
    }

    #[test]
    fn every_architecture_learns_sparse_data() {
        let (d_in, d_sae, rows) = (16, 64, 256);
        let x = sparse_data(rows * 8, d_in, 32, 3, 5);
        for arch in [
            TrainArchitecture::TopK {
                k: 4,
                aux_k: 8,
                aux_coefficient: 1.0 / 32.0,
            },
            TrainArchitecture::BatchTopK {
                k: 4,
                aux_k: 8,
                aux_coefficient: 1.0 / 32.0,
                threshold_lr: 0.01,
            },
            TrainArchitecture::Standard {
                l1_coefficient: 0.3,
            },
            TrainArchitecture::JumpRelu {
                l0_coefficient: 0.05,
                bandwidth: 0.5,
                init_threshold: 1.0,
            },
        ] {
            let name = arch.name();
            let mut config = TrainConfig::new(arch, d_in, d_sae);
            config.lr = 3e-3;
            config.batch_size = rows;
            let mut t = SaeTrainer::new(config, &x[..rows * d_in]).unwrap();
            let mut first = None;
            let mut last = StepMetrics::default();
            for step in 0..400 {
                let batch = &x[(step % 8) * rows * d_in..][..rows * d_in];
                last = t.step(batch).unwrap();
                first.get_or_insert(last.fvu);
            }
            let first = first.unwrap();
            assert!(
                last.fvu < 0.5 * first && last.fvu < 0.25,
                "{name}: FVU {first} -> {}",
                last.fvu
            );
            assert!(last.l0 < d_sae as f64 / 2.0, "{name}: L0 {}", last.l0);
        }
    }
}
