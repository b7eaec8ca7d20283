//! Training a GPT-2 language model on candle's autograd: AdamW, linear warm-up then cosine
//! decay, global gradient-norm clipping, checkpoints that resume exactly.
//!
//! Parameters live in Hugging Face GPT-2 layout under HF names, so a checkpoint *is* a model
//! folder, and every step builds the engine's [`Transformer`] from them with the same loader
//! that reads models from disk: training and inference share one implementation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::model::arch;
use crate::model::config::ConfigFile;
use crate::model::hooks::HookRunner;
use crate::model::weights::Weights;
use crate::model::{Hooks, Transformer};

/// The shape of a GPT-2 model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Shape {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

impl Gpt2Shape {
    /// The Hugging Face `config.json` of this shape.
    pub fn config_json(&self, eos_token_id: u32) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "scale_attn_weights": true,
            "tie_word_embeddings": true,
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "torch_dtype": "float32",
        })
    }

    /// Parameter names (HF, with the `transformer.` prefix) and shapes, in a fixed order.
    fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.n_embd;
        let mut out = vec![
            (
                "transformer.wte.weight".to_string(),
                vec![self.vocab_size, d],
            ),
            (
                "transformer.wpe.weight".to_string(),
                vec![self.n_positions, d],
            ),
        ];
        for l in 0..self.n_layer {
            let p = format!("transformer.h.{l}");
            out.extend([
                (format!("{p}.ln_1.weight"), vec![d]),
                (format!("{p}.ln_1.bias"), vec![d]),
                (format!("{p}.attn.c_attn.weight"), vec![d, 3 * d]),
                (format!("{p}.attn.c_attn.bias"), vec![3 * d]),
                (format!("{p}.attn.c_proj.weight"), vec![d, d]),
                (format!("{p}.attn.c_proj.bias"), vec![d]),
                (format!("{p}.ln_2.weight"), vec![d]),
                (format!("{p}.ln_2.bias"), vec![d]),
                (format!("{p}.mlp.c_fc.weight"), vec![d, 4 * d]),
                (format!("{p}.mlp.c_fc.bias"), vec![4 * d]),
                (format!("{p}.mlp.c_proj.weight"), vec![4 * d, d]),
                (format!("{p}.mlp.c_proj.bias"), vec![d]),
            ]);
        }
        out.push(("transformer.ln_f.weight".to_string(), vec![d]));
        out.push(("transformer.ln_f.bias".to_string(), vec![d]));
        out
    }
}

/// Optimisation settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Tokens per row; at most the model's `n_positions`.
    pub seq_len: usize,
    pub learning_rate: f64,
    /// The cosine decays to `learning_rate × min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    pub seed: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 16,
            seq_len: 128,
            learning_rate: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            checkpoint_every: 200,
        }
    }
}

impl TrainConfig {
    /// Learning rate at `step` (0-based): linear warm-up, then cosine to the floor.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let floor = self.learning_rate * self.min_lr_ratio;
        floor + 0.5 * (self.learning_rate - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    pub(crate) fn validate(&self, shape: &Gpt2Shape) -> Result<()> {
        let bad = |what: &'static str, value: String, message: &str| Error::InvalidArgument {
            what,
            value,
            message: message.into(),
        };
        if self.steps == 0 {
            return Err(bad("steps", "0".into(), "training needs at least one step"));
        }
        if self.batch_size == 0 {
            return Err(bad("batch size", "0".into(), "must be at least 1"));
        }
        if self.seq_len < 2 || self.seq_len > shape.n_positions {
            return Err(bad(
                "sequence length",
                self.seq_len.to_string(),
                &format!("must be between 2 and n_positions ({})", shape.n_positions),
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(bad(
                "learning rate",
                self.learning_rate.to_string(),
                "must be a positive number",
            ));
        }
        for (what, value) in [
            ("n_layer", shape.n_layer),
            ("n_embd", shape.n_embd),
            ("n_head", shape.n_head),
        ] {
            if value == 0 {
                return Err(bad(what, "0".into(), "must be at least 1"));
            }
        }
        if !shape.n_embd.is_multiple_of(shape.n_head) {
            return Err(bad(
                "n_head",
                shape.n_head.to_string(),
                &format!("must divide n_embd ({})", shape.n_embd),
            ));
        }
        Ok(())
    }
}

/// Tokenised training text: one stream with documents separated by end-of-text, and the
/// offsets where documents start. Every training row starts at a document start, as prompts
/// do at inference.
pub struct TrainData {
    pub tokens: Vec<u32>,
    pub doc_starts: Vec<usize>,
}

impl TrainData {
    /// Joins tokenised documents, each followed by `eos`.
    pub fn from_documents(docs: impl IntoIterator<Item = Vec<u32>>, eos: u32) -> Self {
        let mut tokens = Vec::new();
        let mut doc_starts = Vec::new();
        for doc in docs {
            doc_starts.push(tokens.len());
            tokens.extend(doc);
            tokens.push(eos);
        }
        Self { tokens, doc_starts }
    }

    /// The `(inputs, targets)` rows of step `step`: a pure function of seed and step, so a
    /// resumed run sees the same batches.
    fn batch(
        &self,
        config: &TrainConfig,
        step: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let len = config.seq_len;
        // Starts are ascending: the usable ones (a full row fits after them) are a prefix.
        let usable = &self.doc_starts[..self
            .doc_starts
            .partition_point(|&s| s + len < self.tokens.len())];
        if usable.is_empty() {
            return Err(Error::InvalidArgument {
                what: "training data",
                value: format!("{} tokens", self.tokens.len()),
                message: format!("too short for one row of {} tokens", len + 1),
            });
        }
        let mut rng =
            StdRng::seed_from_u64(config.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut inputs = Vec::with_capacity(config.batch_size * len);
        let mut targets = Vec::with_capacity(config.batch_size * len);
        for _ in 0..config.batch_size {
            let start = usable[rng.random_range(0..usable.len())];
            inputs.extend_from_slice(&self.tokens[start..start + len]);
            targets.extend(
                self.tokens[start + 1..start + len + 1]
                    .iter()
                    .map(|&t| i64::from(t)),
            );
        }
        Ok((
            Tensor::from_vec(inputs, (config.batch_size, len), device)?,
            Tensor::from_vec(targets, config.batch_size * len, device)?,
        ))
    }
}

/// What the trainer reports after each step.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Steps completed.
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    pub tokens_per_sec: f64,
}

/// How a training run ended.
#[derive(Debug, PartialEq)]
pub enum TrainOutcome {
    Finished,
    /// Cancelled; the last checkpoint holds the progress.
    Cancelled {
        step: usize,
    },
}

const CHECKPOINT_TENSORS: &str = "checkpoint.safetensors";
const CHECKPOINT_STATE: &str = "checkpoint.json";

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    shape: Gpt2Shape,
    config: TrainConfig,
}

/// A GPT-2 being trained: parameters, AdamW moments and the step count.
pub struct Trainer {
    pub shape: Gpt2Shape,
    pub config: TrainConfig,
    params: Vec<(String, Var)>,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
    step: usize,
    device: Device,
}

impl Trainer {
    /// A freshly initialised model (GPT-2's scheme: N(0, 0.02), residual projections scaled
    /// by 1/√(2·layers), unit LayerNorms, zero biases), deterministic in `config.seed`.
    pub fn new(shape: Gpt2Shape, config: TrainConfig, device: &Device) -> Result<Self> {
        config.validate(&shape)?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let residual_std = 0.02 / (2.0 * shape.n_layer as f64).sqrt();
        let mut params = Vec::new();
        for (name, dims) in shape.parameters() {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = if name.contains(".ln_") && name.ends_with(".weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let std = if name.ends_with("c_proj.weight") {
                    residual_std
                } else {
                    0.02
                };
                (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
            };
            let var = Var::from_tensor(&Tensor::from_vec(values, dims, device)?)?;
            params.push((name, var));
        }
        Self::with_params(shape, config, params, 0, device)
    }

    fn with_params(
        shape: Gpt2Shape,
        config: TrainConfig,
        params: Vec<(String, Var)>,
        step: usize,
        device: &Device,
    ) -> Result<Self> {
        let zeros = params
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            shape,
            config,
            first_moment: zeros.clone(),
            second_moment: zeros,
            params,
            step,
            device: device.clone(),
        })
    }

    /// Steps completed so far.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The engine's transformer over the current parameters (sharing their storage).
    pub fn transformer(&self) -> Result<Transformer> {
        let tensors = self
            .params
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        let weights = Weights::from_tensors("<training parameters>", tensors);
        let config = ConfigFile::from_json("<training config>", self.shape.config_json(0));
        let load = arch::loader("gpt2").ok_or_else(|| Error::UnknownModelType {
            path: PathBuf::from("<training config>"),
            value: "gpt2".into(),
            supported: arch::supported(),
        })?;
        load(&config, &weights)
    }

    /// Mean next-token cross-entropy of `inputs` `[batch, seq]` against `targets` `[batch·seq]`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let transformer = self.transformer()?;
        let hooks = Hooks::new().differentiable();
        let mut runner = HookRunner::new(&hooks, 0);
        let logits = transformer.forward(inputs, None, &mut runner)?;
        let logits = logits.flatten_to(1)?;
        Ok(candle_nn::loss::cross_entropy(&logits, targets)?)
    }

    /// One optimisation step on the batch for the current step number.
    pub fn train_step(&mut self, data: &TrainData) -> Result<StepReport> {
        let started = Instant::now();
        let (inputs, targets) = data.batch(&self.config, self.step, &self.device)?;
        let loss = self.loss(&inputs, &targets)?;
        let grads = loss.backward()?;
        let mut grad_list = Vec::with_capacity(self.params.len());
        let mut norm_sq = 0f64;
        for (name, var) in &self.params {
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| Error::InvalidArgument {
                    what: "parameter",
                    value: name.clone(),
                    message: "received no gradient".into(),
                })?;
            norm_sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            grad_list.push(g.clone());
        }
        let grad_norm = norm_sq.sqrt();
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() || !grad_norm.is_finite() {
            return Err(Error::InvalidArgument {
                what: "training loss",
                value: loss_value.to_string(),
                message: format!(
                    "diverged at step {} (gradient norm {grad_norm}); lower the learning rate",
                    self.step
                ),
            });
        }
        let clip = if grad_norm > self.config.grad_clip {
            self.config.grad_clip / grad_norm
        } else {
            1.0
        };
        let lr = self.config.learning_rate_at(self.step);
        self.adamw_update(&grad_list, clip, lr)?;
        self.step += 1;
        let tokens = self.config.batch_size * self.config.seq_len;
        Ok(StepReport {
            step: self.step,
            steps: self.config.steps,
            loss: loss_value,
            learning_rate: lr,
            grad_norm: grad_norm as f32,
            tokens_per_sec: tokens as f64 / started.elapsed().as_secs_f64(),
        })
    }

    /// Decoupled weight decay (on matrices only, not biases or norms), bias-corrected Adam.
    fn adamw_update(&mut self, grads: &[Tensor], clip: f64, lr: f64) -> Result<()> {
        let c = &self.config;
        let t = (self.step + 1) as i32;
        let correct1 = 1.0 - c.beta1.powi(t);
        let correct2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let g = (&grads[i] * clip)?;
            let m = ((&self.first_moment[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.second_moment[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let step = ((&m / correct1)? / ((&v / correct2)?.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor().detach();
            let decayed = if var.rank() >= 2 {
                (&theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta
            };
            var.set(&(decayed - (step * lr)?)?)?;
            self.first_moment[i] = m;
            self.second_moment[i] = v;
        }
        Ok(())
    }

    /// Trains to `config.steps`, checkpointing into `checkpoint_dir` every
    /// `checkpoint_every` steps and when cancelled. `on_step` sees every step's report.
    pub fn run(
        &mut self,
        data: &TrainData,
        checkpoint_dir: Option<&Path>,
        cancel: &AtomicBool,
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<TrainOutcome> {
        while self.step < self.config.steps {
            if cancel.load(Ordering::Relaxed) {
                if let Some(dir) = checkpoint_dir {
                    self.save_checkpoint(dir)?;
                }
                return Ok(TrainOutcome::Cancelled { step: self.step });
            }
            let report = self.train_step(data)?;
            on_step(&report);
            let every = self.config.checkpoint_every;
            if let Some(dir) = checkpoint_dir
                && every > 0
                && self.step.is_multiple_of(every)
                && self.step < self.config.steps
            {
                self.save_checkpoint(dir)?;
            }
        }
        if let Some(dir) = checkpoint_dir {
            self.save_checkpoint(dir)?;
        }
        Ok(TrainOutcome::Finished)
    }

    /// Writes parameters, AdamW moments and the step into `dir` (each file atomically).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = HashMap::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            tensors.insert(format!("param.{name}"), var.as_tensor().clone());
            tensors.insert(format!("adam_m.{name}"), self.first_moment[i].clone());
            tensors.insert(format!("adam_v.{name}"), self.second_moment[i].clone());
        }
        let state = CheckpointState {
            step: self.step,
            shape: self.shape.clone(),
            config: self.config.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|source| Error::Json {
            path: dir.join(CHECKPOINT_STATE),
            source,
        })?;
        write_atomic(&dir.join(CHECKPOINT_TENSORS), |tmp| {
            candle_core::safetensors::save(&tensors, tmp)?;
            Ok(())
        })?;
        write_atomic(&dir.join(CHECKPOINT_STATE), |tmp| {
            std::fs::write(tmp, json.as_bytes()).map_err(|e| Error::io(tmp, e))
        })
    }

    /// Whether `dir` holds a checkpoint.
    pub fn has_checkpoint(dir: &Path) -> bool {
        dir.join(CHECKPOINT_STATE).is_file() && dir.join(CHECKPOINT_TENSORS).is_file()
    }

    /// Continues from a checkpoint written by [`Self::save_checkpoint`], with its settings.
    pub fn resume(dir: &Path, device: &Device) -> Result<Self> {
        let state_path = dir.join(CHECKPOINT_STATE);
        if !state_path.is_file() {
            return Err(Error::MissingFile {
                path: state_path,
                what: "training checkpoint state",
            });
        }
        let state: CheckpointState = read_json(&state_path)?;
        let tensors_path = dir.join(CHECKPOINT_TENSORS);
        let weights = Weights::open_file(&tensors_path, DType::F32, device)?;
        let mut params = Vec::new();
        let mut first = Vec::new();
        let mut second = Vec::new();
        for (name, dims) in state.shape.parameters() {
            params.push((
                name.clone(),
                Var::from_tensor(&weights.get(&format!("param.{name}"), &dims)?)?,
            ));
            first.push(weights.get(&format!("adam_m.{name}"), &dims)?);
            second.push(weights.get(&format!("adam_v.{name}"), &dims)?);
        }
        let mut trainer = Self::with_params(state.shape, state.config, params, state.step, device)?;
        trainer.first_moment = first;
        trainer.second_moment = second;
        Ok(trainer)
    }

    /// Writes the model as a Hugging Face GPT-2 folder: `config.json` and `model.safetensors`
    /// (tied head, so no `lm_head.weight`).
    pub fn save_model(&self, dir: &Path, eos_token_id: u32) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        write_atomic(&dir.join("model.safetensors"), |tmp| {
            candle_core::safetensors::save(&tensors, tmp)?;
            Ok(())
        })?;
        let config = serde_json::to_string_pretty(&self.shape.config_json(eos_token_id)).map_err(
            |source| Error::Json {
                path: dir.join("config.json"),
                source,
            },
        )?;
        write_atomic(&dir.join("config.json"), |tmp| {
            std::fs::write(tmp, config.as_bytes()).map_err(|e| Error::io(tmp, e))
        })
    }

    /// A parameter by HF name (for tests and inspection).
    pub fn parameter(&self, name: &str) -> Option<&Tensor> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
    }
}

/// A standard normal draw (Box–Muller), so initialisation depends only on the seed.
pub(crate) fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
