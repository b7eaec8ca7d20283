//! A training run: activation source → mixing buffer → trainer, with a metrics log,
//! checkpoints that resume exactly, cancellation, and the SAELens-format result.
//!
//! Output folder:
//! - `cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`: the SAE (SAELens v6), written
//!   when the run finishes (normalisation folded into the weights);
//! - `training/metrics.jsonl`: one [`StepMetrics`] object per logged step;
//! - `training/checkpoint/`: parameters, Adam moments, counters, the buffer's unread rows and the
//!   stream position. SAELens never looks in `training/`, so the folder stays loadable.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::activations::{ChunkSource, MixingBuffer};
use super::checkpoint::{
    STATE_JSON, TRAINER_FILE, checkpoint_to_resume, load_tensors, restore_buffer, save_buffer,
    swap_in_checkpoint,
};
use super::saelens::{self, SaeDir, SaeMetadata};
use super::tensor_train::TensorTrainer;
use super::train::{SaeTrainer, StepMetrics, TrainConfig, TrainerCounters};
use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};

/// Run-level settings around the trainer's own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub train: TrainConfig,
    /// Rows held by the mixing buffer.
    pub buffer_rows: usize,
    /// Scale inputs to mean norm √d_in during training (folded into the saved weights). A
    /// transcoder's targets get their own scale, to mean norm √d_out: training fits
    /// `s_y·y ≈ f(s_x·x)`, and the saved weights compute `f(s_x·x)/s_y`.
    pub normalize: bool,
    /// Write a checkpoint every this many tokens (0: only at the end or on cancel).
    pub checkpoint_every_tokens: u64,
    /// Append to the metrics log every this many steps (and at the last step).
    pub log_every_steps: u64,
    /// Dtype of the saved weights (training is always f32).
    #[serde(default)]
    pub save_dtype: SaveDtype,
}

/// Storage dtype of a finished SAE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum SaveDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl From<SaveDtype> for DType {
    fn from(d: SaveDtype) -> DType {
        match d {
            SaveDtype::F32 => DType::F32,
            SaveDtype::F16 => DType::F16,
            SaveDtype::Bf16 => DType::BF16,
        }
    }
}

/// Everything saved with a checkpoint besides tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointState {
    settings: RunSettings,
    metadata: SaeMetadata,
    input_scale: f32,
    /// A transcoder's target scale (absent: the input scale, as for an SAE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_scale: Option<f32>,
    chunks_read: u64,
    buffer_refills: u64,
    /// Rows of the saved buffer already handed out.
    buffer_used: usize,
    counters: TrainerCounters,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    Finished(StepMetrics),
    /// Stopped by the cancel flag after writing a checkpoint.
    Cancelled {
        step: u64,
    },
}

/// Where a run's training steps are computed.
#[derive(Clone, Debug)]
pub enum StepEngine {
    /// The hand-written kernels of [`SaeTrainer`]: every architecture, fastest on the CPU.
    Cpu,
    /// Candle tensors on a device ([`TensorTrainer`]: topk and standard), for CUDA.
    Tensors(Device),
}

impl StepEngine {
    /// The engine for training `config` beside a model on `device`: tensors on a GPU where
    /// they train this architecture; otherwise the CPU kernels (the activations come to the
    /// host).
    pub fn for_run(device: &Device, config: &TrainConfig) -> Self {
        if device.is_cpu() || TensorTrainer::supports(config, device).is_err() {
            Self::Cpu
        } else {
            Self::Tensors(device.clone())
        }
    }

    /// For progress lines: `the CPU kernels` or `tensors on cuda:0`.
    pub fn describe(&self) -> String {
        match self {
            Self::Cpu => "the CPU kernels".into(),
            Self::Tensors(device) => format!("tensors on {}", crate::device::device_name(device)),
        }
    }
}

/// How to run, besides what to train: fresh or resumed, on which engine, and the flag that
/// stops it (after a checkpoint).
#[derive(Clone, Debug)]
pub struct RunControl<'a> {
    /// Continue the checkpoint in the output folder.
    pub resume: bool,
    pub engine: StepEngine,
    pub cancel: &'a AtomicBool,
}

impl<'a> RunControl<'a> {
    /// A fresh run on the CPU kernels.
    pub fn new(cancel: &'a AtomicBool) -> Self {
        Self {
            resume: false,
            engine: StepEngine::Cpu,
            cancel,
        }
    }

    pub fn resuming(self, resume: bool) -> Self {
        Self { resume, ..self }
    }

    pub fn on(self, engine: StepEngine) -> Self {
        Self { engine, ..self }
    }
}

/// A trainer on its engine: what [`run`] steps, and benchmarks too.
pub enum Trainer {
    Cpu(Box<SaeTrainer>),
    Tensors(Box<TensorTrainer>),
}

impl Trainer {
    /// Puts `host` (fresh or restored) on `engine`.
    pub fn new(host: SaeTrainer, engine: &StepEngine) -> Result<Self> {
        Ok(match engine {
            StepEngine::Cpu => Self::Cpu(Box::new(host)),
            StepEngine::Tensors(device) => {
                Self::Tensors(Box::new(TensorTrainer::from_host(&host, device)?))
            }
        })
    }

    pub fn step(&mut self, x: &[f32]) -> Result<StepMetrics> {
        match self {
            Self::Cpu(t) => t.step(x),
            Self::Tensors(t) => t.step(x),
        }
    }

    /// Steps taken and rows trained on.
    pub fn progress(&self) -> (u64, u64) {
        match self {
            Self::Cpu(t) => (t.step, t.tokens),
            Self::Tensors(t) => (t.step, t.tokens),
        }
    }

    /// Calls `f` with the state as a host trainer (copied off the device for the tensor
    /// engine): checkpoints and the saved SAE are written from it.
    pub fn with_host<R>(&self, f: impl FnOnce(&SaeTrainer) -> Result<R>) -> Result<R> {
        match self {
            Self::Cpu(t) => f(t),
            Self::Tensors(t) => f(&t.to_host()?),
        }
    }
}

/// Paths inside an output folder.
pub struct RunPaths {
    pub out: PathBuf,
}

impl RunPaths {
    pub fn training(&self) -> PathBuf {
        self.out.join("training")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.training().join("checkpoint")
    }
    pub fn metrics(&self) -> PathBuf {
        self.training().join("metrics.jsonl")
    }
}

/// Trains an SAE into `out`. With `control.resume`, continues from
/// `out/training/checkpoint` (the settings must match, except that `total_steps` may grow);
/// without it, refuses a folder that already holds an SAE or a checkpoint.
pub fn run(
    source: &mut dyn ChunkSource,
    settings: &RunSettings,
    metadata: &SaeMetadata,
    out: &Path,
    control: RunControl,
    mut on_step: impl FnMut(&StepMetrics),
) -> Result<RunOutcome> {
    let RunControl {
        resume,
        engine,
        cancel,
    } = control;
    let paths = RunPaths {
        out: out.to_path_buf(),
    };
    // A row: the hook's activation, or a transcoder's input and target side by side.
    let d_in = source.d_in();
    if settings.train.row_width() != d_in {
        return Err(Error::InvalidArgument {
            what: "SAE d_in",
            value: settings.train.row_width().to_string(),
            message: format!("the hook `{}` is {d_in} wide", metadata.hook_name),
        });
    }
    let mut buffer = MixingBuffer::new(d_in, settings.buffer_rows, settings.train.seed);
    let x_width = settings.train.d_in;
    let (host, scaling) = if resume {
        restore(&paths, settings, metadata, source, &mut buffer)?
    } else {
        refuse_existing(&paths)?;
        std::fs::create_dir_all(paths.training()).map_err(|e| Error::io(paths.training(), e))?;
        std::fs::write(paths.metrics(), "").map_err(|e| Error::io(paths.metrics(), e))?;
        buffer.fill(source)?;
        let scale_of = |columns: std::ops::Range<usize>| -> f32 {
            let norm = buffer.mean_norm(columns.clone());
            if settings.normalize && norm > 0.0 {
                ((columns.len() as f64).sqrt() / norm) as f32
            } else {
                1.0
            }
        };
        let input = scale_of(0..x_width);
        let scaling = Scaling {
            input,
            output: if d_in > x_width {
                scale_of(x_width..d_in)
            } else {
                input
            },
        };
        let first = scaling.apply(
            buffer.unread(),
            settings.train.batch_size * d_in,
            d_in,
            x_width,
        );
        (SaeTrainer::new(settings.train.clone(), &first)?, scaling)
    };
    let mut trainer = Trainer::new(host, &engine)?;

    let checkpoint = Checkpoint {
        paths: &paths,
        settings,
        metadata,
        scaling,
    };
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(paths.metrics())
        .map_err(|e| Error::io(paths.metrics(), e))?;
    let batch = settings.train.batch_size;
    let mut last = StepMetrics::default();
    let mut next_checkpoint = next_multiple(trainer.progress().1, settings.checkpoint_every_tokens);
    while trainer.progress().0 < settings.train.total_steps {
        if cancel.load(Ordering::Relaxed) {
            trainer.with_host(|t| checkpoint.save(t, &buffer, source))?;
            return Ok(RunOutcome::Cancelled {
                step: trainer.progress().0,
            });
        }
        let rows = buffer.next_batch(source, batch)?;
        let metrics = if scaling.is_identity() {
            trainer.step(rows)?
        } else {
            let x = scaling.apply(rows, rows.len(), d_in, x_width);
            trainer.step(&x)?
        };
        if !metrics.loss.is_finite() {
            return Err(Error::NonFinite {
                what: "the SAE training loss".into(),
                at: format!(
                    "step {} (try a lower learning rate or --normalize)",
                    metrics.step
                ),
            });
        }
        let is_last = metrics.step == settings.train.total_steps;
        if settings.log_every_steps > 0 && (metrics.step % settings.log_every_steps == 0 || is_last)
        {
            let line = serde_json::to_string(&metrics).map_err(|source| Error::Json {
                path: paths.metrics(),
                source,
            })?;
            writeln!(log, "{line}").map_err(|e| Error::io(paths.metrics(), e))?;
        }
        on_step(&metrics);
        last = metrics;
        if settings.checkpoint_every_tokens > 0 && last.tokens >= next_checkpoint && !is_last {
            trainer.with_host(|t| checkpoint.save(t, &buffer, source))?;
            next_checkpoint = next_multiple(last.tokens, settings.checkpoint_every_tokens);
        }
    }
    let (sae, sparsity) = trainer.with_host(|trainer| {
        checkpoint.save(trainer, &buffer, source)?;
        let sae = trainer
            .to_sae(scaling.input, scaling.output, &Device::Cpu)?
            .to_dtype(settings.save_dtype.into())?;
        let sparsity = trainer.log_sparsity();
        Ok((
            sae,
            Tensor::from_vec(sparsity, settings.train.d_sae, &Device::Cpu)?,
        ))
    })?;
    saelens::save(
        out,
        &SaeDir {
            sae,
            metadata: metadata.clone(),
            sparsity: Some(sparsity),
        },
        resume,
    )?;
    Ok(RunOutcome::Finished(last))
}

/// The first multiple of `every` above `tokens` (never, for `every` 0).
pub(crate) fn next_multiple(tokens: u64, every: u64) -> u64 {
    tokens
        .checked_div(every)
        .map_or(u64::MAX, |q| (q + 1) * every)
}

/// The factors training data is multiplied by: a row's first `d_in` values by `input`, a
/// transcoder's target values after them by `output`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scaling {
    input: f32,
    output: f32,
}

impl Scaling {
    fn is_identity(&self) -> bool {
        self.input == 1.0 && self.output == 1.0
    }

    /// The first `len` values of `rows` (rows `width` wide, inputs in the first `d_in`
    /// columns), scaled.
    fn apply(&self, rows: &[f32], len: usize, width: usize, d_in: usize) -> Vec<f32> {
        rows[..len.min(rows.len())]
            .chunks(width)
            .flat_map(|row| {
                row.iter()
                    .enumerate()
                    .map(move |(i, v)| v * if i < d_in { self.input } else { self.output })
            })
            .collect()
    }
}

fn refuse_existing(paths: &RunPaths) -> Result<()> {
    crate::files::require_output_path("SAE output folder", &paths.out)?;
    let taken = |what: &str| {
        Err(Error::InvalidArgument {
            what: "SAE output folder",
            value: paths.out.display().to_string(),
            message: format!(
                "{what}; pass --resume to continue it (in the window: \"continue the stopped run\") or choose another folder"
            ),
        })
    };
    for name in [
        saelens::CONFIG_FILE,
        saelens::WEIGHTS_FILE,
        saelens::SPARSITY_FILE,
    ] {
        if paths.out.join(name).exists() {
            return taken(&format!("already holds an SAE's {name}"));
        }
    }
    if paths.checkpoint().exists() {
        return taken("holds a training checkpoint");
    }
    Ok(())
}

/// What a checkpoint saves besides the trainer, buffer and source it is handed.
struct Checkpoint<'a> {
    paths: &'a RunPaths,
    settings: &'a RunSettings,
    metadata: &'a SaeMetadata,
    scaling: Scaling,
}

impl Checkpoint<'_> {
    /// Writes `training/checkpoint.new`, then swaps it in for `training/checkpoint`.
    fn save(
        &self,
        trainer: &SaeTrainer,
        buffer: &MixingBuffer,
        source: &dyn ChunkSource,
    ) -> Result<()> {
        let Self {
            paths,
            settings,
            metadata,
            scaling,
        } = *self;
        let (_, used, refills) = buffer.state();
        let state = CheckpointState {
            settings: settings.clone(),
            metadata: metadata.clone(),
            input_scale: scaling.input,
            output_scale: (scaling.output != scaling.input).then_some(scaling.output),
            chunks_read: source.chunks_read(),
            buffer_refills: refills,
            buffer_used: used,
            counters: trainer.state_counters(),
        };
        swap_in_checkpoint(&paths.training(), |new| {
            crate::files::write_safetensors(&trainer.state_tensors()?, &new.join(TRAINER_FILE))?;
            save_buffer(new, buffer)?;
            crate::files::write_json(&new.join(STATE_JSON), &state)
        })
    }
}

fn restore(
    paths: &RunPaths,
    settings: &RunSettings,
    metadata: &SaeMetadata,
    source: &mut dyn ChunkSource,
    buffer: &mut MixingBuffer,
) -> Result<(SaeTrainer, Scaling)> {
    let dir = checkpoint_to_resume(&paths.training())?;
    let state: CheckpointState = read_json(&dir.join(STATE_JSON))?;
    let mut expected = state.settings.clone();
    expected.train.total_steps = settings.train.total_steps;
    if &expected != settings {
        return Err(Error::InvalidArgument {
            what: "resume",
            value: dir.display().to_string(),
            message: format!(
                "the checkpoint was made with other settings ({}); only the token budget may \
                 change on resume",
                super::checkpoint::setting_differences(&expected, settings).join(", ")
            ),
        });
    }
    if &state.metadata != metadata {
        return Err(Error::InvalidArgument {
            what: "resume",
            value: dir.display().to_string(),
            message: format!(
                "the checkpoint is for model {} hook {} on {}",
                state.metadata.model_name, state.metadata.hook_name, state.metadata.dataset_path
            ),
        });
    }
    let tensors = load_tensors(&dir.join(TRAINER_FILE))?;
    let trainer = SaeTrainer::from_state(
        settings.train.clone(),
        &state.counters,
        &tensors,
        &dir.join(TRAINER_FILE),
    )?;
    restore_buffer(&dir, buffer, state.buffer_used, state.buffer_refills)?;
    source.skip_to(state.chunks_read)?;
    truncate_metrics(&paths.metrics(), trainer.step)?;
    let scaling = Scaling {
        input: state.input_scale,
        output: state.output_scale.unwrap_or(state.input_scale),
    };
    Ok((trainer, scaling))
}

/// Drops logged steps after `step`, so a resumed log reads as one run.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, |tmp| {
        std::fs::write(tmp, kept).map_err(|e| Error::io(tmp, e))
    })
}
