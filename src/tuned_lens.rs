//! The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with
//! the Tuned Lens"): one affine translator per depth, trained so that the residual stream
//! there, translated and read through the final norm and the unembedding, predicts what the
//! whole model predicts. The logit lens is the same read-out without translators; early
//! layers' streams live in a basis the unembedding does not speak, and the translators learn
//! the change of basis.
//!
//! - **Translator**: `h ↦ h + h·Aᵀ + b`, `A` and `b` starting at zero — so the untrained lens
//!   is exactly the logit lens.
//! - **Depths**: the stream entering block 0 and leaving every block but the last (whose
//!   read-out is the model's own prediction).
//! - **Loss**: the KL divergence from the model's next-token distribution to the lens's, per
//!   token, summed over depths; Adam on the translators alone (the model is frozen), over
//!   token windows of a corpus (special tokens left out).
//!
//! A lens file is safetensors: `{hook}.weight` (`[d, d]`, the `A` above) and `{hook}.bias`
//! (`[d]`) for every depth, named by the depth's hook.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;

use crate::error::{Error, Result};
use crate::files::{write_atomic, write_safetensors};
use crate::model::{HookPoint, Hooks, Model};
use crate::sae::activations::{ActivationSource, Corpus, WindowSettings};

/// The depths a tuned lens translates: the stream entering block 0 and leaving each block but
/// the last.
pub fn depths(model: &Model) -> Vec<HookPoint> {
    let layers = model.dims().n_layers;
    std::iter::once(HookPoint::ResidPre(0))
        .chain((0..layers.saturating_sub(1)).map(HookPoint::ResidPost))
        .collect()
}

/// One depth's translator.
#[derive(Clone, Debug)]
pub struct Translator {
    pub hook: HookPoint,
    /// `[d, d]`: the translated stream is `h + h·weightᵀ + bias`.
    pub weight: Tensor,
    /// `[d]`.
    pub bias: Tensor,
}

impl Translator {
    /// `h` (`[.., d]`) translated, in `h`'s dtype.
    pub fn apply(&self, h: &Tensor) -> Result<Tensor> {
        let dtype = h.dtype();
        let w = self.weight.to_device(h.device())?.to_dtype(dtype)?;
        let b = self.bias.to_device(h.device())?.to_dtype(dtype)?;
        Ok((h + h.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?)?)
    }
}

/// A translator for every depth ([`depths`]).
#[derive(Clone, Debug)]
pub struct TunedLens {
    pub translators: Vec<Translator>,
}

impl TunedLens {
    /// Zero translators: the logit lens.
    pub fn identity(model: &Model) -> Result<Self> {
        let d = model.dims().d_model;
        let translators = depths(model)
            .into_iter()
            .map(|hook| {
                Ok(Translator {
                    hook,
                    weight: Tensor::zeros((d, d), DType::F32, &Device::Cpu)?,
                    bias: Tensor::zeros(d, DType::F32, &Device::Cpu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { translators })
    }

    /// The translator of the stream at `hook`, if the lens has one.
    pub fn translator(&self, hook: HookPoint) -> Option<&Translator> {
        self.translators.iter().find(|t| t.hook == hook)
    }

    /// Writes the lens to `path` through a temporary file.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, |tmp| self.write(tmp))
    }

    /// Writes the lens to `path` in place (for callers that manage the temporary file).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for t in &self.translators {
            tensors.insert(format!("{}.weight", t.hook), t.weight.to_dtype(DType::F32)?);
            tensors.insert(format!("{}.bias", t.hook), t.bias.to_dtype(DType::F32)?);
        }
        write_safetensors(&tensors, path)
    }

    /// Reads a lens file for `model`: a weight and a bias for every depth, of the model's
    /// width.
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "tuned lens file",
            });
        }
        let mut tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let d = model.dims().d_model;
        let mut take = |key: String, shape: &[usize]| -> Result<Tensor> {
            let tensor = tensors.remove(&key).ok_or_else(|| Error::Safetensors {
                path: path.to_path_buf(),
                message: format!("no tensor `{key}`: not a tuned lens of this model"),
            })?;
            if tensor.dims() != shape {
                return Err(Error::TensorShape {
                    path: path.to_path_buf(),
                    key,
                    expected: shape.to_vec(),
                    actual: tensor.dims().to_vec(),
                });
            }
            Ok(tensor.to_dtype(DType::F32)?)
        };
        let translators = depths(model)
            .into_iter()
            .map(|hook| {
                Ok(Translator {
                    hook,
                    weight: take(format!("{hook}.weight"), &[d, d])?,
                    bias: take(format!("{hook}.bias"), &[d])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!("tensor `{extra}` belongs to no depth of this model"),
            });
        }
        Ok(Self { translators })
    }
}

/// How a tuned lens is trained.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    pub corpus: Corpus,
    /// Tokens to train on.
    pub tokens: u64,
    pub context_size: usize,
    /// Windows per step.
    pub windows_per_step: usize,
    pub lr: f64,
}

impl TrainSettings {
    pub fn new(corpus: Corpus, tokens: u64) -> Self {
        Self {
            corpus,
            tokens,
            context_size: 64,
            windows_per_step: 8,
            lr: 1e-3,
        }
    }

    /// Optimiser steps the settings ask for.
    pub fn steps(&self) -> u64 {
        self.tokens
            .div_ceil((self.context_size * self.windows_per_step).max(1) as u64)
    }
}

/// What one training step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub step: u64,
    pub steps: u64,
    /// Mean KL (nats per token) over the depths, before this step's update.
    pub kl: f32,
}

/// Token windows of the corpus, as `[windows, context]` id tensors.
struct Windows<'m> {
    source: ActivationSource<'m>,
    windows: usize,
    context: usize,
}

impl<'m> Windows<'m> {
    fn new(model: &'m Model, corpus: &Corpus, context: usize, windows: usize) -> Result<Self> {
        let settings = WindowSettings {
            context_size: context,
            ..WindowSettings::default()
        };
        let hook = HookPoint::ResidPre(0).to_string();
        Ok(Self {
            source: ActivationSource::new(model, corpus.clone(), &hook, settings)?,
            windows,
            context,
        })
    }

    /// The next batch: ids `[windows, context]` and which positions count (not special).
    fn next(&mut self) -> Result<(Tensor, Tensor)> {
        let ids = self.source.next_windows(self.windows)?;
        let keep: Vec<f32> = ids
            .iter()
            .map(|&id| f32::from(u8::from(!self.source.is_excluded(id))))
            .collect();
        let model = self.source.model();
        let shape = (self.windows, self.context);
        Ok((
            Tensor::from_vec(ids, shape, &model.device)?,
            Tensor::from_vec(keep, self.windows * self.context, &model.device)?,
        ))
    }
}

/// The model's next-token log-probabilities and the stream at every depth for a batch, all
/// flattened to `[tokens, ..]` in f32, off the graph.
fn run_batch(model: &Model, ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let points = depths(model);
    let out = model.forward(ids, &Hooks::new().capture(points.iter().copied()))?;
    let tokens = ids.elem_count();
    let flat = |t: &Tensor| -> Result<Tensor> {
        let d = t.dim(D::Minus1)?;
        Ok(t.to_dtype(DType::F32)?.reshape((tokens, d))?)
    };
    let target = candle_nn::ops::log_softmax(&flat(&out.logits)?, D::Minus1)?;
    let streams = points
        .iter()
        .map(|p| flat(out.cache.require(*p)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((target, streams))
}

/// Mean KL(model ‖ lens) over the kept tokens: `target` and `read` are log-probabilities
/// `[tokens, vocab]`, `keep` is `[tokens]` of 0/1.
fn kl(target: &Tensor, read: &Tensor, keep: &Tensor) -> Result<Tensor> {
    let per_token = (target.exp()? * (target - read)?)?.sum(D::Minus1)?;
    let kept = keep.sum_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(((per_token * keep)?.sum_all()? / f64::from(kept))?)
}

/// The lens's log-probabilities for a (translated) stream `[tokens, d]`: the final norm and
/// the unembedding (and the model's logit soft-cap), in f32.
fn read_out(model: &Model, translated: &Tensor) -> Result<Tensor> {
    let t = &model.transformer;
    let normed = t
        .ln_final
        .forward(&translated.to_dtype(model.dtype)?, true)?;
    let mut logits = normed
        .to_dtype(DType::F32)?
        .matmul(&t.unembed.to_dtype(DType::F32)?.t()?)?;
    if let Some(b) = &t.unembed_bias {
        logits = logits.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    if let Some(cap) = t.logit_softcap {
        logits = crate::model::layers::soft_cap(&logits, cap)?;
    }
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
}

/// Trains a tuned lens from the identity, calling `progress` after every step; `None` when
/// `cancel` was set.
pub fn train(
    model: &Model,
    settings: &TrainSettings,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(StepReport),
) -> Result<Option<TunedLens>> {
    if settings.tokens == 0 {
        return Err(Error::InvalidArgument {
            what: "--tokens",
            value: "0".into(),
            message: "needs at least one token to train on".into(),
        });
    }
    let d = model.dims().d_model;
    let device = &model.device;
    let points = depths(model);
    let weights = (0..points.len())
        .map(|_| Var::zeros((d, d), DType::F32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let biases = (0..points.len())
        .map(|_| Var::zeros(d, DType::F32, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let vars: Vec<Var> = weights.iter().chain(&biases).cloned().collect();
    let mut optimiser = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: settings.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut windows = Windows::new(
        model,
        &settings.corpus,
        settings.context_size,
        settings.windows_per_step,
    )?;
    let steps = settings.steps();
    for step in 0..steps {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (ids, keep) = windows.next()?;
        let (target, streams) = run_batch(model, &ids)?;
        let mut total: Option<Tensor> = None;
        for ((stream, w), b) in streams.iter().zip(&weights).zip(&biases) {
            let translated = (stream
                + stream
                    .matmul(&w.as_tensor().t()?)?
                    .broadcast_add(b.as_tensor())?)?;
            let loss = kl(&target, &read_out(model, &translated)?, &keep)?;
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        let Some(total) = total else { break };
        let mean = total.to_scalar::<f32>()? / points.len() as f32;
        optimiser.backward_step(&total)?;
        progress(StepReport {
            step: step + 1,
            steps,
            kl: mean,
        });
    }
    let translators = points
        .into_iter()
        .zip(weights.iter().zip(&biases))
        .map(|(hook, (w, b))| {
            Ok(Translator {
                hook,
                weight: w.as_tensor().to_device(&Device::Cpu)?,
                bias: b.as_tensor().to_device(&Device::Cpu)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(TunedLens { translators }))
}

/// Per depth, the mean KL (nats per token) from the model's prediction to the logit lens's
/// and to `lens`'s, over `tokens` tokens of `corpus`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DepthKl {
    pub hook: String,
    pub logit_lens: f32,
    pub tuned_lens: f32,
}

/// Compares `lens` with the logit lens on held-out text.
pub fn evaluate(
    model: &Model,
    lens: &TunedLens,
    corpus: &Corpus,
    tokens: u64,
) -> Result<Vec<DepthKl>> {
    let (context, per_batch) = (64, 8);
    let mut windows = Windows::new(model, corpus, context, per_batch)?;
    let batches = tokens.div_ceil((context * per_batch) as u64).max(1);
    let n = lens.translators.len();
    let (mut plain, mut tuned) = (vec![0f64; n], vec![0f64; n]);
    for _ in 0..batches {
        let (ids, keep) = windows.next()?;
        let (target, streams) = run_batch(model, &ids)?;
        for (i, (stream, translator)) in streams.iter().zip(&lens.translators).enumerate() {
            let logit_lens = kl(&target, &read_out(model, stream)?, &keep)?;
            let tuned_lens = kl(
                &target,
                &read_out(model, &translator.apply(stream)?)?,
                &keep,
            )?;
            plain[i] += f64::from(logit_lens.to_scalar::<f32>()?);
            tuned[i] += f64::from(tuned_lens.to_scalar::<f32>()?);
        }
    }
    Ok(lens
        .translators
        .iter()
        .enumerate()
        .map(|(i, t)| DepthKl {
            hook: t.hook.to_string(),
            logit_lens: (plain[i] / batches as f64) as f32,
            tuned_lens: (tuned[i] / batches as f64) as f32,
        })
        .collect())
}
