//! Steering vectors from contrasting prompts — activation addition (Turner et al. 2023,
//! "ActAdd"; Rimsky et al. 2024, contrastive activation addition): the mean activation of
//! prompts that show a behaviour minus the mean over prompts that do not, read at one or more
//! hooks, then added, times a coefficient, at the same hooks on every position while the
//! model runs.
//!
//! A vector file is safetensors holding one `[d]` f32 tensor per hook, named by the hook — a
//! `monoscope trace` file cut to one row — so anything that writes safetensors can make one.
//! SAE features steer through [`crate::features::steer`]; this needs no SAE.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::error::{Error, Result};
use crate::files::{write_atomic, write_safetensors};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

/// Which positions of a prompt its activation is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Readout {
    /// The mean over the prompt's tokens, special tokens left out: for a property of the
    /// whole text (its language, its sentiment).
    Mean,
    /// The last token: for a property of what comes next (CAA reads the answer's letter).
    Last,
}

/// One hook's vector.
#[derive(Clone, Debug)]
pub struct HookVector {
    pub hook: HookPoint,
    /// `[d]`, f32, on the CPU.
    pub vector: Tensor,
    /// The mean L2 norm of the activations the vector was read from (both sides), so a
    /// coefficient can be chosen against the size of what it is added to; `None` for a vector
    /// loaded from a file.
    pub activation_norm: Option<f32>,
}

/// Vectors at one or more hooks, applied together.
#[derive(Clone, Debug)]
pub struct SteeringVectors {
    pub vectors: Vec<HookVector>,
}

impl SteeringVectors {
    /// `mean(positive) − mean(negative)` at each of `hooks`, every prompt read per `readout`.
    pub fn from_contrast(
        model: &Model,
        hooks: &[HookPoint],
        positive: &[String],
        negative: &[String],
        readout: Readout,
    ) -> Result<Self> {
        for (what, prompts) in [("--positive", positive), ("--negative", negative)] {
            if prompts.is_empty() {
                return Err(Error::InvalidArgument {
                    what,
                    value: String::new(),
                    message: "needs at least one prompt".into(),
                });
            }
        }
        if hooks.is_empty() {
            return Err(Error::InvalidArgument {
                what: "--hooks",
                value: String::new(),
                message: "names no hook".into(),
            });
        }
        if let Some(hook) = hooks.iter().find(|h| !h.per_token()) {
            return Err(Error::InvalidArgument {
                what: "--hooks",
                value: hook.to_string(),
                message: "is [batch, heads, query, key], not one vector per token".into(),
            });
        }
        let special = model.special_tokens();
        let (pos, pos_norm) = mean_readout(model, hooks, positive, readout, &special)?;
        let (neg, neg_norm) = mean_readout(model, hooks, negative, readout, &special)?;
        let vectors = hooks
            .iter()
            .zip(pos.iter().zip(&neg))
            .zip(pos_norm.iter().zip(&neg_norm))
            .map(|((&hook, (p, n)), (pn, nn))| {
                let diff: Vec<f32> = p.iter().zip(n).map(|(a, b)| (a - b) as f32).collect();
                let d = diff.len();
                Ok(HookVector {
                    hook,
                    vector: Tensor::from_vec(diff, d, &Device::Cpu)?,
                    activation_norm: Some(((pn + nn) / 2.0) as f32),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { vectors })
    }

    /// Adds `coefficient` times each vector at its hook, on every position, to `hooks`.
    pub fn add_to(&self, mut hooks: Hooks, coefficient: f64, device: &Device) -> Result<Hooks> {
        for v in &self.vectors {
            let shift = (v.vector.to_device(device)? * coefficient)?;
            hooks = hooks.intervene(v.hook, Intervention::new(InterventionOp::Add(shift)));
        }
        Ok(hooks)
    }

    /// Writes the vectors to `path` (safetensors, one tensor per hook name) through a
    /// temporary file: never half a file under that name.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, |tmp| self.write(tmp))
    }

    /// Writes the vectors to `path` in place (for callers that manage the temporary file).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .vectors
            .iter()
            .map(|v| (v.hook.to_string(), v.vector.clone()))
            .collect();
        write_safetensors(&tensors, path)
    }

    /// Reads a vector file for `model`: every tensor must be named by one of the model's
    /// per-token hooks and be `[width of that hook]`, with finite values.
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "steering vector file",
            });
        }
        let bad = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
        if tensors.is_empty() {
            return Err(bad("holds no tensor".into()));
        }
        let mut vectors = Vec::with_capacity(tensors.len());
        for (name, tensor) in tensors {
            let hook = name
                .parse::<HookPoint>()
                .ok()
                .filter(|h| model.hook_points().contains(h) && h.per_token())
                .ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}` is not named by a per-token hook of {}",
                        model.dir.display()
                    ))
                })?;
            let width = model.hook_width(hook)?;
            if tensor.dims() != [width] {
                return Err(Error::TensorShape {
                    path: path.to_path_buf(),
                    key: name,
                    expected: vec![width],
                    actual: tensor.dims().to_vec(),
                });
            }
            let vector = tensor.to_dtype(DType::F32)?;
            if vector.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFinite {
                    what: format!("steering vector `{name}`"),
                    at: path.display().to_string(),
                });
            }
            vectors.push(HookVector {
                hook,
                vector,
                activation_norm: None,
            });
        }
        vectors.sort_by_key(|v| v.hook);
        Ok(Self { vectors })
    }
}

/// Per hook, the mean over `prompts` of each prompt's readout (f64), and the mean L2 norm of
/// the readouts.
fn mean_readout(
    model: &Model,
    hooks: &[HookPoint],
    prompts: &[String],
    readout: Readout,
    special: &HashSet<u32>,
) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let mut sums: Vec<Vec<f64>> = Vec::new();
    let mut norms = vec![0f64; hooks.len()];
    for prompt in prompts {
        let ids = model.encode_prompt(prompt)?;
        let positions: Vec<usize> = match readout {
            Readout::Last => vec![ids.len() - 1],
            Readout::Mean => (0..ids.len())
                .filter(|&i| !special.contains(&ids[i]))
                .collect(),
        };
        if positions.is_empty() {
            return Err(Error::InvalidArgument {
                what: "prompt",
                value: prompt.clone(),
                message: "has only special tokens to read".into(),
            });
        }
        let out = model.forward(
            &model.ids_tensor(&ids)?,
            &Hooks::new().capture(hooks.iter().copied()),
        )?;
        for (h, &hook) in hooks.iter().enumerate() {
            let acts = out.cache.require(hook)?.i(0)?.to_dtype(DType::F64)?; // [seq, d]
            let picked = Tensor::new(
                positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                acts.device(),
            )?;
            let read = acts.index_select(&picked, 0)?.mean(0)?.to_vec1::<f64>()?;
            norms[h] += read.iter().map(|x| x * x).sum::<f64>().sqrt();
            if sums.len() <= h {
                sums.push(vec![0f64; read.len()]);
            }
            sums[h].iter_mut().zip(&read).for_each(|(s, r)| *s += r);
        }
    }
    let n = prompts.len() as f64;
    for sum in &mut sums {
        sum.iter_mut().for_each(|s| *s /= n);
    }
    norms.iter_mut().for_each(|x| *x /= n);
    Ok((sums, norms))
}
