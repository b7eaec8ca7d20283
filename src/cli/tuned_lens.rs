//! `monoscope tuned-lens`: train a tuned lens on a corpus, and compare it with the logit lens
//! on held-out text.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar, refuse_existing};
use crate::sae::activations::Corpus;
use crate::tuned_lens::{TrainSettings, TunedLens, evaluate, train};

#[derive(Subcommand)]
pub enum TunedLensCommand {
    /// Train one affine translator per depth so the stream there predicts what the model
    /// predicts (KL to the model's next-token distribution); the model stays frozen.
    Train(TrainArgs),
    /// Per depth, the KL from the model's prediction to the logit lens's and to the tuned
    /// lens's, on held-out text.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// `world` (the bundled corpus, regenerated), `world:SEED`, or a .txt, .jsonl or .parquet
    /// file.
    #[arg(long, default_value = "world")]
    corpus: String,
    /// JSONL field / Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens to train on.
    #[arg(long, default_value_t = 200_000)]
    tokens: u64,
    /// Tokens per window.
    #[arg(long, default_value_t = 64)]
    context_size: usize,
    /// Windows per optimiser step.
    #[arg(long, default_value_t = 8)]
    windows_per_step: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Output safetensors file.
    #[arg(long, value_parser = super::output_path, value_name = "FILE")]
    out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The lens file (`tuned-lens train --out`).
    #[arg(long, value_name = "FILE")]
    lens: PathBuf,
    /// Held-out text: by default a world corpus of a seed training never reads.
    #[arg(long, default_value = "world:4242")]
    corpus: String,
    /// JSONL field / Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    #[arg(long, default_value_t = 20_000)]
    tokens: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(command: &TunedLensCommand) -> anyhow::Result<()> {
    match command {
        TunedLensCommand::Train(args) => run_train(args),
        TunedLensCommand::Eval(args) => run_eval(args),
    }
}

fn run_train(args: &TrainArgs) -> anyhow::Result<()> {
    refuse_existing(&args.out, args.force)?;
    let model = args.model.load()?;
    let settings = TrainSettings {
        context_size: args.context_size,
        windows_per_step: args.windows_per_step,
        lr: args.lr,
        ..TrainSettings::new(Corpus::parse(&args.corpus, &args.text_field)?, args.tokens)
    };
    install_ctrl_c("stopping after this step; nothing is written");
    let bar = progress_bar(
        settings.steps(),
        "tuned lens {bar:30} {pos}/{len} steps, KL {msg} nats/token",
    )?;
    let lens = train(&model, &settings, &CANCEL, &mut |report| {
        bar.set_position(report.step);
        bar.set_message(format!("{:.4}", report.kl));
    })?
    .ok_or_else(|| anyhow::anyhow!("cancelled: nothing written"))?;
    bar.finish_and_clear();
    super::write_new_file(&args.out, args.force, |tmp| Ok(lens.write(tmp)?))?;
    println!(
        "wrote {} ({} translators, {} tokens of {})",
        args.out.display(),
        lens.translators.len(),
        args.tokens,
        args.corpus
    );
    Ok(())
}

fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let lens = TunedLens::load(&args.lens, &model)?;
    let corpus = Corpus::parse(&args.corpus, &args.text_field)?;
    let depths = evaluate(&model, &lens, &corpus, args.tokens)?;
    if args.json {
        return print_json(&serde_json::json!({
            "lens": args.lens.display().to_string(),
            "corpus": args.corpus,
            "tokens": args.tokens,
            "depths": depths,
        }));
    }
    println!(
        "KL(model ‖ lens), nats per token, over {} tokens of {}",
        args.tokens, args.corpus
    );
    println!("{:<26} {:>10} {:>10}", "depth", "logit lens", "tuned lens");
    for d in &depths {
        println!(
            "{:<26} {:>10.4} {:>10.4}",
            d.hook, d.logit_lens, d.tuned_lens
        );
    }
    Ok(())
}
