//! `monoscope world build|eval`: rebuild the bundled world model, measure what it knows.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json};
use crate::device::DeviceChoice;
use crate::world::KnowledgeBase;
use crate::world::build::{BuildConfig, BuildEvent, build};
use crate::world::eval::evaluate;
use crate::world::knowledge::bundled_knowledge_path;
use crate::world::train::TrainOutcome;

#[derive(Subcommand)]
pub enum WorldCommand {
    /// Regenerate corpus, tokenizer and model from the knowledge base.
    Build(Box<BuildArgs>),
    /// Accuracy on held-out-template prompts per relation and language, and a causal trace.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Knowledge base TSV (default: the bundled one).
    #[arg(long)]
    knowledge: Option<PathBuf>,
    /// Capital facts traced per language (0: no causal trace).
    #[arg(long, default_value_t = 24)]
    trace_facts: usize,
    /// Print the full report, every prediction included, as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Output folder (becomes a model folder usable with --model).
    #[arg(long, value_parser = super::output_path, default_value = "world-build")]
    out: PathBuf,
    /// Knowledge base TSV (default: the bundled assets/knowledge/countries.tsv).
    #[arg(long)]
    knowledge: Option<PathBuf>,
    /// Continue the training checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Build into a non-empty --out, replacing what is there.
    #[arg(long)]
    force: bool,
    /// Training steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Rows per step.
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Transformer layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Residual stream width.
    #[arg(long)]
    d_model: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    /// Context length (also the training row length).
    #[arg(long)]
    context: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Paragraph documents per country and language.
    #[arg(long)]
    docs_per_country: Option<usize>,
    /// Fact-list documents per language.
    #[arg(long)]
    fact_list_docs: Option<usize>,
    /// Infobox documents per country and language.
    #[arg(long)]
    infobox_docs: Option<usize>,
    /// Documents per city of cities.tsv and language.
    #[arg(long)]
    docs_per_city: Option<usize>,
    /// Share of paragraph fact sentences that name their subject (else "the country").
    #[arg(long)]
    name_share: Option<f64>,
    /// Share of fact sentences whose phrasing opens with the subject ("Japan's capital is").
    #[arg(long)]
    subject_first_share: Option<f64>,
    /// English relation lists ("Capitals: Japan Tokyo, Kenya Nairobi.").
    #[arg(long)]
    list_docs: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
}

impl BuildArgs {
    fn config(&self) -> BuildConfig {
        let mut c = BuildConfig::default();
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut c.train.steps, self.steps);
        set(&mut c.train.batch_size, self.batch_size);
        set(&mut c.train.warmup_steps, self.warmup_steps);
        set(&mut c.train.checkpoint_every, self.checkpoint_every);
        set(&mut c.n_layer, self.layers);
        set(&mut c.n_embd, self.d_model);
        set(&mut c.n_head, self.heads);
        set(&mut c.n_positions, self.context);
        set(&mut c.vocab_size, self.vocab_size);
        set(&mut c.corpus.docs_per_country, self.docs_per_country);
        set(&mut c.corpus.fact_list_docs, self.fact_list_docs);
        set(&mut c.corpus.infobox_docs_per_country, self.infobox_docs);
        set(&mut c.corpus.docs_per_city, self.docs_per_city);
        set(&mut c.corpus.name_share, self.name_share);
        set(&mut c.corpus.subject_first_share, self.subject_first_share);
        set(&mut c.corpus.list_docs, self.list_docs);
        set(&mut c.train.learning_rate, self.learning_rate);
        c.train.seq_len = c.n_positions;
        c.train.warmup_steps = c.train.warmup_steps.min(c.train.steps);
        if let Some(seed) = self.seed {
            c.train.seed = seed;
            c.corpus.seed = seed;
        }
        c
    }
}

pub fn run(command: &WorldCommand) -> anyhow::Result<()> {
    match command {
        WorldCommand::Build(args) => run_build(args),
        WorldCommand::Eval(args) => run_eval(args),
    }
}

fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    let knowledge = args
        .knowledge
        .clone()
        .unwrap_or_else(bundled_knowledge_path);
    let kb = KnowledgeBase::load(&knowledge)?;
    let model = args.model.load()?;
    let report = evaluate(&model, &kb, args.trace_facts)
        .with_context(|| format!("evaluating {}", model.dir.display()))?;
    if args.json {
        print_json(&report)
    } else {
        let name = match &args.model.model {
            Some(dir) => dir.display().to_string(),
            None => "the bundled world model (assets/world)".to_string(),
        };
        print!("{}", report.render(&name));
        Ok(())
    }
}

fn run_build(args: &BuildArgs) -> anyhow::Result<()> {
    let config = args.config();
    let knowledge = args
        .knowledge
        .clone()
        .unwrap_or_else(bundled_knowledge_path);
    let non_empty = args.out.is_dir()
        && std::fs::read_dir(&args.out)
            .with_context(|| format!("reading {}", args.out.display()))?
            .next()
            .is_some();
    if non_empty && !args.resume && !args.force {
        anyhow::bail!(
            "{} is not empty; pass --resume to continue its training or --force to rebuild it",
            args.out.display()
        );
    }
    if args.out.exists() && !args.out.is_dir() {
        anyhow::bail!("{} exists and is not a folder", args.out.display());
    }
    let device = args.device.parse::<DeviceChoice>()?.open()?;
    let bar = ProgressBar::new(config.train.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    install_ctrl_c("stopping after this step and writing a checkpoint");
    let outcome = build(
        &knowledge,
        &args.out,
        &config,
        args.resume,
        &device,
        &CANCEL,
        |event| match event {
            BuildEvent::Stage(message) => {
                if bar.is_hidden() {
                    eprintln!("{message}");
                } else {
                    bar.println(message);
                }
            }
            BuildEvent::Step(r) => {
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.3} lr {:.2e} |g| {:.2} {:.0} tok/s",
                    r.loss, r.learning_rate, r.grad_norm, r.tokens_per_sec
                ));
                if bar.is_hidden() && (r.step % 50 == 0 || r.step == r.steps) {
                    eprintln!(
                        "step {}/{} loss {:.4} lr {:.2e} grad-norm {:.3} {:.0} tok/s",
                        r.step, r.steps, r.loss, r.learning_rate, r.grad_norm, r.tokens_per_sec
                    );
                }
            }
        },
    )
    .with_context(|| format!("building the world model into {}", args.out.display()))?;
    bar.finish_and_clear();
    match outcome {
        TrainOutcome::Finished => println!("world model written to {}", args.out.display()),
        TrainOutcome::Cancelled { step } => println!(
            "cancelled at step {step}; continue with --resume --out {}",
            args.out.display()
        ),
    }
    Ok(())
}
