//! `monoscope sae train|eval`: train a sparse autoencoder on a hook's activations, measure one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar, show_training_step};
use crate::device::parse_dtype;
use crate::sae::SaeSite;
use crate::sae::activations::{ActivationSource, Corpus, WindowSettings};
use crate::sae::eval::{EvalSettings, evaluate};
use crate::sae::run::{
    RunControl, RunOutcome, RunSettings, SaveDtype, StepEngine, run as run_training,
};
use crate::sae::saelens::{self, SaeMetadata};
use crate::sae::train::{ArchitectureKind, ArchitectureKnobs, BDecInit, TrainConfig};

#[derive(Subcommand)]
pub enum SaeCommand {
    /// Train an SAE on one hook's activations over a corpus (SAELens-format output).
    Train(Box<TrainArgs>),
    /// L0, FVU, dead/dense latents, CE loss recovered, KL and delta LM loss of an SAE.
    Eval(Box<EvalArgs>),
}

/// Corpus and windowing options shared by train and eval.
#[derive(Args, Clone, Debug)]
pub struct CorpusArgs {
    /// `world` (the bundled corpus, regenerated), `world:SEED`, or a .txt (one document per
    /// non-empty line), .jsonl or .parquet file.
    #[arg(long, default_value = "world")]
    corpus: String,
    /// JSONL field / Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per window (default: min(128, the model's context)).
    #[arg(long)]
    context_size: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 32)]
    windows_per_forward: usize,
    /// Do not start windows with the BOS token.
    #[arg(long)]
    no_bos: bool,
    /// Keep activations at special-token positions (BOS, EOS, …), left out by default.
    #[arg(long)]
    include_special: bool,
}

impl CorpusArgs {
    /// The same windowing over another corpus.
    pub fn with_corpus(&self, spec: &str) -> Self {
        Self {
            corpus: spec.to_string(),
            ..self.clone()
        }
    }

    /// Whether the corpus is the bundled world corpus (any seed).
    pub fn is_world(&self) -> bool {
        self.corpus == "world" || self.corpus.starts_with("world:")
    }

    pub fn corpus(&self) -> anyhow::Result<Corpus> {
        Ok(Corpus::parse(&self.corpus, &self.text_field)?)
    }

    /// How documents are cut into forward segments (`default_context`: the SAE's).
    pub fn segments(
        &self,
        model: &crate::model::Model,
        default_context: usize,
    ) -> crate::sae::codes::SegmentSettings {
        let fallback = if default_context > 0 {
            default_context
        } else {
            128
        };
        crate::sae::codes::SegmentSettings {
            context_size: self
                .context_size
                .unwrap_or(fallback)
                .min(model.dims().context_length),
            prepend_bos: !self.no_bos,
            exclude_special: !self.include_special,
            segments_per_forward: self.windows_per_forward,
        }
    }

    /// The windows activations are read in.
    pub(super) fn windows(&self, model: &crate::model::Model) -> WindowSettings {
        WindowSettings {
            context_size: self
                .context_size
                .unwrap_or(128.min(model.dims().context_length)),
            prepend_bos: !self.no_bos,
            exclude_special: !self.include_special,
            windows_per_forward: self.windows_per_forward,
        }
    }

    pub(super) fn source<'m>(
        &self,
        model: &'m crate::model::Model,
        hook: &str,
    ) -> anyhow::Result<ActivationSource<'m>> {
        let corpus = self.corpus()?;
        Ok(ActivationSource::new(
            model,
            corpus,
            hook,
            self.windows(model),
        )?)
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Hook to train on, e.g. blocks.4.mlp.hook_post.
    #[arg(long)]
    hook: String,
    /// Train a transcoder: predict this later hook (e.g. blocks.4.hook_mlp_out) from --hook
    /// (e.g. blocks.4.mlp.hook_in) instead of reconstructing --hook.
    #[arg(long)]
    hook_out: Option<String>,
    /// With --hook-out: also learn an affine skip path, predicting decode(encode(x)) +
    /// x @ W_skipᵀ (a skip transcoder; standard, batchtopk or jumprelu).
    #[arg(long, requires = "hook_out")]
    skip: bool,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Output folder for the SAE (cfg.json, sae_weights.safetensors, training/).
    #[arg(long, value_parser = super::output_path)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "topk")]
    arch: ArchitectureKind,
    /// Latents per token (topk, batchtopk).
    #[arg(long, default_value_t = 32)]
    k: usize,
    /// d_sae = expansion × d_in.
    #[arg(long, default_value_t = 16)]
    expansion: usize,
    /// d_sae directly (overrides --expansion).
    #[arg(long)]
    d_sae: Option<usize>,
    /// Tokens to train on.
    #[arg(long, default_value_t = 2_000_000)]
    tokens: u64,
    /// Rows per step.
    #[arg(long, default_value_t = 4096)]
    batch_size: usize,
    #[arg(long, default_value_t = 4e-4)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// Fraction of steps at the end over which the learning rate decays linearly to 0.
    #[arg(long, default_value_t = 0.2)]
    decay_fraction: f64,
    /// Global gradient-norm clipping (off by default).
    #[arg(long)]
    grad_clip: Option<f32>,
    /// L1 coefficient (standard).
    #[arg(long, default_value_t = 5.0)]
    l1_coefficient: f32,
    /// L0 coefficient (jumprelu).
    #[arg(long, default_value_t = 1.0)]
    l0_coefficient: f32,
    /// Steps over which the L1/L0 coefficient ramps up from 0.
    #[arg(long, default_value_t = 0)]
    penalty_warmup_steps: u64,
    /// JumpReLU straight-through-estimator bandwidth.
    #[arg(long, default_value_t = 0.05)]
    bandwidth: f32,
    /// JumpReLU initial threshold.
    #[arg(long, default_value_t = 0.01)]
    init_threshold: f32,
    /// AuxK latents (topk, batchtopk; default d_in / 2).
    #[arg(long)]
    aux_k: Option<usize>,
    #[arg(long, default_value_t = 1.0 / 32.0)]
    aux_coefficient: f32,
    /// A latent silent for this many tokens counts as dead.
    #[arg(long, default_value_t = 1_000_000)]
    dead_after_tokens: u64,
    /// b_dec initialisation.
    #[arg(long, value_enum, default_value = "geometric-median")]
    b_dec_init: BDecInitArg,
    /// Matryoshka SAE or transcoder (topk, batchtopk): sizes of the nested dictionaries that
    /// must each reconstruct (or predict) alone, e.g. 128,512,2048; general features gather in
    /// the first latents.
    #[arg(long, value_delimiter = ',')]
    matryoshka: Vec<usize>,
    /// Train on raw activations (by default they are scaled to mean norm √d_in, and the
    /// scale is folded into the saved weights).
    #[arg(long)]
    no_normalize: bool,
    /// Rows held by the shuffling buffer (default 16 batches).
    #[arg(long)]
    buffer_rows: Option<usize>,
    /// Keep activations in (and reuse them from) this folder.
    #[arg(long, value_parser = super::output_path)]
    cache: Option<PathBuf>,
    /// Storage dtype of the activation cache: f32 | f16 | bf16.
    #[arg(long, default_value = "f16")]
    cache_dtype: String,
    /// Checkpoint every this many tokens (0: only at the end or on Ctrl-C).
    #[arg(long, default_value_t = 1_000_000)]
    checkpoint_every: u64,
    /// Continue the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Metrics-log interval in steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Dtype of the saved weights (training is always f32).
    #[arg(long, value_enum, default_value = "f32")]
    save_dtype: SaveDtype,
    /// Print the final step's metrics as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BDecInitArg {
    GeometricMedian,
    Mean,
    Zeros,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    sae: SaeArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Windows to evaluate on.
    #[arg(long, default_value_t = 256)]
    windows: usize,
    /// Firing frequency above which a latent counts as dense.
    #[arg(long, default_value_t = 0.1)]
    dense_threshold: f64,
    #[arg(long)]
    json: bool,
}

pub fn run(command: &SaeCommand) -> anyhow::Result<()> {
    match command {
        SaeCommand::Train(args) => train(args),
        SaeCommand::Eval(args) => eval(args),
    }
}

fn train(args: &TrainArgs) -> anyhow::Result<()> {
    if args.out.exists() && !args.out.is_dir() {
        anyhow::bail!("{} exists and is not a folder", args.out.display());
    }
    let model = args.model.load()?;
    let mut source = args.corpus.source(&model, &args.hook)?;
    if let Some(out) = &args.hook_out {
        source = source.with_target(out)?;
    }
    if let Some(dir) = &args.cache {
        source = source.with_cache(dir, parse_dtype(&args.cache_dtype)?)?;
    }
    let d_in = source.hook_width();
    let d_out = source.target().map(|(_, width)| width);
    let d_sae = match args.d_sae {
        Some(d_sae) => d_sae,
        None => args
            .expansion
            .checked_mul(d_in)
            .with_context(|| format!("--expansion {} × d_in {d_in} overflows", args.expansion))?,
    };
    let architecture = args.arch.with(&ArchitectureKnobs {
        k: args.k,
        // AuxK explains the residual, which lives where the decoder writes.
        aux_k: args.aux_k.unwrap_or(d_out.unwrap_or(d_in) / 2),
        aux_coefficient: args.aux_coefficient,
        l1_coefficient: args.l1_coefficient,
        l0_coefficient: args.l0_coefficient,
        bandwidth: args.bandwidth,
        init_threshold: args.init_threshold,
        ..ArchitectureKnobs::defaults(d_in)
    });
    let mut train = TrainConfig::new(architecture, d_in, d_sae);
    train.batch_size = args.batch_size;
    train.total_steps = args.tokens.div_ceil(args.batch_size.max(1) as u64);
    train.lr = args.lr;
    train.warmup_steps = args.warmup_steps;
    train.decay_steps = (train.total_steps as f64 * args.decay_fraction.clamp(0.0, 1.0)) as u64;
    train.penalty_warmup_steps = args.penalty_warmup_steps;
    train.grad_clip = args.grad_clip;
    train.dead_after_tokens = args.dead_after_tokens;
    train.seed = args.seed;
    train.matryoshka = args.matryoshka.clone();
    train.transcode_to = d_out;
    train.skip_connection = args.skip;
    train.b_dec_init = match args.b_dec_init {
        BDecInitArg::GeometricMedian => BDecInit::GeometricMedian,
        BDecInitArg::Mean => BDecInit::Mean,
        BDecInitArg::Zeros => BDecInit::Zeros,
    };
    train.validate()?;
    let settings = RunSettings {
        buffer_rows: args
            .buffer_rows
            .unwrap_or(args.batch_size.saturating_mul(16)),
        normalize: !args.no_normalize,
        checkpoint_every_tokens: args.checkpoint_every,
        log_every_steps: args.log_every,
        save_dtype: args.save_dtype,
        train,
    };
    let metadata = SaeMetadata {
        model_name: model_name(&model.dir),
        hook_name: source.hook.to_string(),
        context_size: source.settings.context_size,
        prepend_bos: source.settings.prepend_bos,
        dataset_path: source.corpus().describe(),
        hook_name_out: source
            .target()
            .map(|(out, _)| out.to_string())
            .unwrap_or_default(),
    };
    install_ctrl_c("stopping after this step and writing a checkpoint");
    let total = settings.train.total_steps;
    let bar = progress_bar(
        total,
        "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
    )?;
    let engine = StepEngine::for_run(&model.device, &settings.train);
    let what = match d_out {
        Some(d_out) => format!(
            "transcoder ({d_in} → {d_sae} → {d_out}) from {} to {}",
            metadata.hook_name, metadata.hook_name_out
        ),
        None => format!("SAE ({d_in} → {d_sae}) on {}", metadata.hook_name),
    };
    let nesting = if settings.train.matryoshka.is_empty() {
        String::new()
    } else {
        format!(" (Matryoshka, prefixes {:?})", settings.train.matryoshka)
    };
    eprintln!(
        "training a {} {what}{nesting} over {} for {} tokens, with {}",
        settings.train.architecture.name(),
        metadata.dataset_path,
        args.tokens,
        engine.describe()
    );
    let started = Instant::now();
    let mut first_tokens = None;
    let outcome = run_training(
        &mut source,
        &settings,
        &metadata,
        &args.out,
        RunControl::new(&CANCEL).resuming(args.resume).on(engine),
        |m| {
            let t0 = *first_tokens.get_or_insert(m.tokens);
            let rate = (m.tokens - t0) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let curves = [m.loss, m.l0, m.fvu, m.dead_fraction];
            show_training_step(&bar, (m.step, total), curves, rate);
        },
    )
    .with_context(|| format!("training the SAE into {}", args.out.display()))?;
    bar.finish_and_clear();
    match outcome {
        RunOutcome::Finished(m) => {
            if args.json {
                print_json(&m)?;
            } else {
                println!(
                    "SAE written to {} (step {}, L0 {:.1}, FVU {:.4}, dead {:.1}%)",
                    args.out.display(),
                    m.step,
                    m.l0,
                    m.fvu,
                    100.0 * m.dead_fraction
                );
            }
        }
        RunOutcome::Cancelled { step } => {
            println!(
                "stopped at step {step}; checkpoint in {}; continue with the same command plus --resume",
                args.out.join("training/checkpoint").display()
            );
        }
    }
    Ok(())
}

fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let device = model.device.clone();
    let (sae_dir, site) = args.sae.load(&model, &device)?;
    let hook = site.input.to_string();
    let mut corpus = args.corpus.clone();
    if corpus.context_size.is_none() && sae_dir.metadata.context_size > 0 {
        corpus.context_size = Some(
            sae_dir
                .metadata
                .context_size
                .min(model.dims().context_length),
        );
    }
    let mut source = corpus.source(&model, &hook)?;
    let bar = progress_bar(
        args.windows as u64,
        "{elapsed_precise} [{bar:30}] window {pos}/{len} (eta {eta})",
    )?;
    let report = evaluate(
        &mut source,
        &sae_dir.sae,
        site.output,
        &EvalSettings {
            windows: args.windows,
            dense_threshold: args.dense_threshold,
        },
        |done, _| bar.set_position(done as u64),
    )
    .with_context(|| format!("evaluating {} at {hook}", args.sae.dir.display()))?;
    bar.finish_and_clear();
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

/// An SAE folder and the hook it reads, as every SAE command takes them.
#[derive(Args, Clone, Debug)]
pub struct SaeArgs {
    /// The SAE folder (SAELens, sparsify or Gemma Scope format).
    #[arg(long = "sae", value_name = "DIR")]
    pub dir: PathBuf,
    /// Hook the SAE reads (default: the one its folder names: SAELens metadata.hook_name, a
    /// sparsify folder's hookpoint name, or a Gemma Scope path's site and layer).
    #[arg(long)]
    pub hook: Option<String>,
    /// Hook a transcoder writes (default: the one its folder names: SAELens
    /// metadata.hook_name_out, or a sparsify transcoder's module output).
    #[arg(long)]
    pub hook_out: Option<String>,
}

impl SaeArgs {
    /// See [`load_sae`].
    pub fn load(
        &self,
        model: &crate::model::Model,
        device: &candle_core::Device,
    ) -> anyhow::Result<(saelens::SaeDir, SaeSite)> {
        load_sae(
            &self.dir,
            self.hook.as_deref(),
            self.hook_out.as_deref(),
            model,
            device,
        )
    }
}

/// Loads an SAE (in f32) and resolves the hooks it reads and writes: `hook` (`hook_out`), or
/// else the hooks its folder names, which must exist in `model`.
pub fn load_sae(
    dir: &Path,
    hook: Option<&str>,
    hook_out: Option<&str>,
    model: &crate::model::Model,
    device: &candle_core::Device,
) -> anyhow::Result<(saelens::SaeDir, SaeSite)> {
    let load = || -> crate::error::Result<(saelens::SaeDir, SaeSite)> {
        let (mut sae_dir, input) = crate::sae::load_for_model(dir, hook, model, device)?;
        if let Some(out) = hook_out {
            sae_dir.metadata.hook_name_out = out.to_string();
        }
        let output = crate::sae::output_hook(&sae_dir, input, model)?;
        Ok((sae_dir, SaeSite { input, output }))
    };
    load().with_context(|| format!("loading SAE {}", dir.display()))
}
