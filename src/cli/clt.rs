//! `monoscope clt train|eval`: train a cross-layer transcoder on the model's own activations,
//! and score transcoders (a CLT, or per-layer ones) as a replacement for the model's MLPs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::sae::CorpusArgs;
use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar, show_training_step};
use crate::attribution_graph::fidelity::{FidelityReport, score};
use crate::attribution_graph::{LayerTranscoder, cross_layer_sites, load_each, transcoder_dirs};
use crate::model::Model;
use crate::sae::clt::{
    Checkpoints, CltConfig, CltStepMetrics, activation_source, check_output_folder,
    resumed_output_folder, train_checkpointed,
};
use crate::sae::run::SaveDtype;

#[derive(Subcommand)]
pub enum CltCommand {
    /// Train a cross-layer transcoder: one encoder per layer, each layer's features writing
    /// its own MLP output and every later one's (circuit-tracer's CLT format).
    Train(Box<TrainArgs>),
    /// How faithfully transcoders (a CLT, a circuit-tracer transcoder set, or per-layer
    /// transcoder folders) stand in for the MLPs: per-layer FVU and L0, and the replacement
    /// model's CE loss recovered, KL and top-1 agreement with every MLP replaced at once.
    Eval(Box<EvalArgs>),
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Output folder (must not exist, or be empty); written whole or not at all. While
    /// training, the run's checkpoints are in `.DIR.partial/` beside it.
    #[arg(long, value_parser = super::output_path, value_name = "DIR")]
    out: PathBuf,
    /// Checkpoint every this many tokens (0: only on Ctrl-C).
    #[arg(long, default_value_t = 1_000_000)]
    checkpoint_every: u64,
    /// Continue the interrupted run whose checkpoint is beside --out (the same settings).
    #[arg(long)]
    resume: bool,
    /// Features per layer (default: 8 × the input width).
    #[arg(long)]
    features: Option<usize>,
    /// Mean features firing per token and layer (BatchTopK while training).
    #[arg(long, default_value_t = 16)]
    k: usize,
    /// Training tokens.
    #[arg(long, default_value_t = 1_000_000)]
    tokens: u64,
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    /// Fraction of the steps at the end over which the learning rate falls to zero.
    #[arg(long, default_value_t = 0.2)]
    decay_fraction: f64,
    /// Dead features per layer that AuxK asks to explain the error (default: half the output
    /// width; 0 turns AuxK off).
    #[arg(long)]
    aux_k: Option<usize>,
    #[arg(long, default_value_t = 1.0 / 32.0)]
    aux_coefficient: f32,
    /// A feature that has not fired for this many tokens is dead.
    #[arg(long, default_value_t = 200_000)]
    dead_after_tokens: u64,
    /// Rows in the shuffling buffer (default: 16 batches).
    #[arg(long)]
    buffer_rows: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The hook each layer's features read, within a block (TransformerLens name).
    #[arg(long, default_value = "hook_resid_mid")]
    input_hook: String,
    /// The hook each layer's features write, within a block.
    #[arg(long, default_value = "hook_mlp_out")]
    output_hook: String,
    #[arg(long, value_enum, default_value = "f32")]
    save_dtype: SaveDtype,
    /// Windows to score the saved CLT on afterwards (as `clt eval`; 0: skip).
    #[arg(long, default_value_t = 32)]
    eval_windows: usize,
    /// The corpus it is scored on (default: `world:1`, a held-out generation of the world
    /// corpus, when training on the world corpus; the training corpus otherwise).
    #[arg(long)]
    eval_corpus: Option<String>,
    /// Print the final step's figures and the evaluation as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Transcoders as `attribute --transcoders` takes them (repeatable). Default with the
    /// bundled model: its bundled per-layer transcoders.
    #[arg(long = "transcoders", value_name = "DIR")]
    transcoders: Vec<PathBuf>,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Windows to run.
    #[arg(long, default_value_t = 64)]
    windows: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(command: &CltCommand) -> anyhow::Result<()> {
    match command {
        CltCommand::Train(args) => train_clt(args),
        CltCommand::Eval(args) => eval(args),
    }
}

#[derive(Serialize)]
struct TrainReport<'a> {
    out: &'a std::path::Path,
    finished: bool,
    last_step: &'a CltStepMetrics,
    evaluation: Option<FidelityReport>,
}

fn train_clt(args: &TrainArgs) -> anyhow::Result<()> {
    let staging = if args.resume {
        resumed_output_folder(&args.out)?
    } else {
        check_output_folder(&args.out)?
    };
    let model = args.model.load()?;
    let n_layers = model.dims().n_layers;
    let (inputs, outputs) = cross_layer_sites(&model, &args.input_hook, &args.output_hook)?;
    let corpus = args.corpus.corpus()?;
    let mut source = activation_source(
        &model,
        corpus,
        args.corpus.windows(&model),
        &inputs,
        &outputs,
    )?;
    let d_in = source.hook_width();
    let d_out = model.hook_width(outputs[0])?;
    let features = match args.features {
        Some(f) => f,
        None => 8 * d_in,
    };
    let mut config = CltConfig::new(n_layers, d_in, d_out, features, args.k);
    config.batch_size = args.batch_size;
    config.total_steps = args.tokens.div_ceil(args.batch_size.max(1) as u64);
    config.lr = args.lr;
    config.warmup_steps = args.warmup_steps;
    config.decay_steps = (config.total_steps as f64 * args.decay_fraction.clamp(0.0, 1.0)) as u64;
    config.aux_k = args.aux_k.unwrap_or(d_out / 2);
    config.aux_coefficient = args.aux_coefficient;
    config.dead_after_tokens = args.dead_after_tokens;
    config.seed = args.seed;
    config.validate()?;

    eprintln!(
        "training a cross-layer transcoder ({n_layers} layers × {features} features, k {}, \
         {} → {}) over {} for {} tokens",
        args.k,
        args.input_hook,
        args.output_hook,
        source.corpus().describe(),
        args.tokens
    );
    install_ctrl_c("stopping after this step and writing a checkpoint");
    let total = config.total_steps;
    let bar = progress_bar(
        total,
        "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
    )?;
    let started = Instant::now();
    let mut first_tokens = None;
    // What a checkpoint must match to be resumed, besides the settings.
    let buffer_rows = args
        .buffer_rows
        .unwrap_or(args.batch_size.saturating_mul(16));
    let hooks = (args.input_hook.as_str(), args.output_hook.as_str());
    let checkpoints = Checkpoints {
        dir: staging.clone(),
        every_tokens: args.checkpoint_every,
        resume: args.resume,
        identity: Checkpoints::identity_of(&model, &source, hooks, buffer_rows),
    };
    let run = train_checkpointed(
        &mut source,
        config,
        buffer_rows,
        &CANCEL,
        &checkpoints,
        |m| {
            let t0 = *first_tokens.get_or_insert(m.tokens);
            let rate = (m.tokens - t0) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let curves = [
                m.loss,
                CltStepMetrics::mean(&m.l0),
                CltStepMetrics::mean(&m.fvu),
                CltStepMetrics::mean(&m.dead_fraction),
            ];
            show_training_step(&bar, (m.step, total), curves, rate);
        },
    )
    .context("training the cross-layer transcoder")?;
    bar.finish_and_clear();
    let last = run.log.last().cloned().unwrap_or_default();
    if !run.finished {
        if args.json {
            return print_json(&TrainReport {
                out: &args.out,
                finished: false,
                last_step: &last,
                evaluation: None,
            });
        }
        println!(
            "stopped at step {} of {total}; checkpoint in {}; continue with the same command \
             plus --resume",
            last.step,
            checkpoints.checkpoint_dir().display()
        );
        return Ok(());
    }
    let metrics = run.log_lines();
    let trainer = run.trainer;
    trainer
        .finish_in(
            &staging,
            &args.out,
            args.save_dtype.into(),
            hooks,
            &[("training-metrics.jsonl", metrics)],
        )
        .with_context(|| {
            format!(
                "saving the CLT into {} (the checkpoint in {} is kept: the same command with \
                 --resume saves it again)",
                args.out.display(),
                staging.display()
            )
        })?;
    drop(trainer);
    let evaluation = if args.eval_windows > 0 && !CANCEL.load(std::sync::atomic::Ordering::SeqCst) {
        let transcoders = load_each(std::slice::from_ref(&args.out), &model)
            .with_context(|| format!("reading back {}", args.out.display()))?;
        let held_out = match (&args.eval_corpus, args.corpus.is_world()) {
            (Some(spec), _) => args.corpus.with_corpus(spec),
            (None, true) => args.corpus.with_corpus("world:1"),
            (None, false) => args.corpus.clone(),
        };
        Some(evaluate(
            &held_out,
            &model,
            &transcoders,
            args.eval_windows,
        )?)
    } else {
        None
    };
    if args.json {
        return print_json(&TrainReport {
            out: &args.out,
            finished: true,
            last_step: &last,
            evaluation,
        });
    }
    println!(
        "cross-layer transcoder written to {}: training FVU {:.4}, L0 {:.1} per layer, \
         dead {:.1}%",
        args.out.display(),
        CltStepMetrics::mean(&last.fvu),
        CltStepMetrics::mean(&last.l0),
        100.0 * CltStepMetrics::mean(&last.dead_fraction)
    );
    if let Some(report) = evaluation {
        print!("{}", report.render());
    }
    Ok(())
}

/// Scores `transcoders` on `windows` windows of the corpus, with a progress bar.
fn evaluate(
    corpus: &CorpusArgs,
    model: &Model,
    transcoders: &[LayerTranscoder],
    windows: usize,
) -> anyhow::Result<FidelityReport> {
    let first = transcoders
        .first()
        .context("no transcoders to evaluate")?
        .site
        .input
        .to_string();
    let mut source = corpus.source(model, &first)?;
    let bar = progress_bar(
        windows as u64,
        "{elapsed_precise} [{bar:30}] window {pos}/{len} (eta {eta})",
    )?;
    let report = score(&mut source, transcoders, windows, |done, _| {
        bar.set_position(done as u64)
    })
    .context("scoring the replacement model")?;
    bar.finish_and_clear();
    Ok(report)
}

fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let dirs = transcoder_dirs(&super::transcoders_named(&args.transcoders, &args.model)?)?;
    let transcoders = load_each(&dirs, &model)?;
    let report = evaluate(&args.corpus, &model, &transcoders, args.windows)?;
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
