//! `monoscope features build|score`: per-feature statistics for exploring an SAE, and its
//! features scored against the world corpus's ground-truth labels.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::sae::{CorpusArgs, SaeArgs};
use super::{CANCEL, ModelArgs, install_ctrl_c, peak_rss_bytes, print_json, progress_bar};
use crate::features::score::{ScoreSettings, score};
use crate::features::stats::StatsSettings;
use crate::features::{BuildSettings, build};
use crate::sae::codes::CodingInput;
use crate::sae::codes::SegmentSettings;

#[derive(Subcommand)]
pub enum FeaturesCommand {
    /// Density, activations, histograms, top and sampled contexts, logit effects and
    /// neighbours of every feature, in a folder the GUI opens.
    Build(Box<BuildArgs>),
    /// How well the best single feature detects each labelled concept of the world corpus
    /// (precision, recall, F1 on held-out text), and which concepts split across features.
    Score(Box<ScoreArgs>),
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    sae: SaeArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Paragraph documents per country and language in each generated split.
    #[arg(long, default_value_t = 2)]
    docs_per_country: usize,
    /// Fact-list documents per language in each split.
    #[arg(long, default_value_t = 200)]
    fact_lists: usize,
    /// The k of the k-sparse probes on the SAE's latents, comma-separated (SAEBench's sparse
    /// probing); "none" skips them.
    #[arg(long, default_value = "1,2,5,10,20", value_parser = parse_ks)]
    sparse_probe_k: SparseProbeKs,
    #[arg(long)]
    json: bool,
}

/// The largest k: each probe is fitted on a dense `[tokens, k]` matrix of the selection split.
const MAX_SPARSE_PROBE_K: usize = 256;

/// A list of k for `--sparse-probe-k`.
#[derive(Clone, Debug)]
struct SparseProbeKs(Vec<usize>);

fn parse_ks(text: &str) -> Result<SparseProbeKs, String> {
    if text == "none" {
        return Ok(SparseProbeKs(Vec::new()));
    }
    let ks = (text.split(','))
        .map(|k| match k.trim().parse::<usize>() {
            Ok(k) if (1..=MAX_SPARSE_PROBE_K).contains(&k) => Ok(k),
            _ => Err(format!(
                "{k:?} is not a k from 1 to {MAX_SPARSE_PROBE_K} (a list such as 1,2,5, or none)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SparseProbeKs(ks))
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    sae: SaeArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Tokens to read.
    #[arg(long, default_value_t = 500_000)]
    tokens: u64,
    /// The feature store folder (created).
    #[arg(long, value_parser = super::output_path)]
    out: PathBuf,
    /// Replace a feature store already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Top activating contexts kept per feature.
    #[arg(long, default_value_t = 16)]
    top_contexts: usize,
    /// Activation intervals sampled per feature (a power of two).
    #[arg(long, default_value_t = 8)]
    intervals: usize,
    /// Contexts sampled per interval.
    #[arg(long, default_value_t = 4)]
    samples_per_interval: usize,
    /// Tokens shown before and after the token a context is about.
    #[arg(long, default_value_t = 10)]
    context_before: usize,
    #[arg(long, default_value_t = 4)]
    context_after: usize,
    /// Top and bottom logit tokens per feature.
    #[arg(long, default_value_t = 10)]
    logit_tokens: usize,
    /// Nearest features (decoder cosine) per feature.
    #[arg(long, default_value_t = 10)]
    neighbours: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(command: &FeaturesCommand) -> anyhow::Result<()> {
    match command {
        FeaturesCommand::Build(args) => build_store(args),
        FeaturesCommand::Score(args) => score_features(args),
    }
}

fn build_store(args: &BuildArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let (sae_dir, site) = args.sae.load(&model, &candle_core::Device::Cpu)?;
    let corpus = args.corpus.corpus()?;
    let settings = BuildSettings {
        segment: args.corpus.segments(&model, sae_dir.metadata.context_size),
        tokens: args.tokens,
        stats: StatsSettings {
            top_n: args.top_contexts,
            intervals: args.intervals,
            samples_per_interval: args.samples_per_interval,
            histogram_bins: 32.max(args.intervals),
            context_before: args.context_before,
            context_after: args.context_after,
        },
        logit_tokens: args.logit_tokens,
        neighbours: args.neighbours,
    };
    install_ctrl_c("stopping; nothing will be written");
    let bar = progress_bar(
        args.tokens,
        "{elapsed_precise} [{bar:30}] {pos}/{len} tokens {msg} (eta {eta})",
    )?;
    let started = std::time::Instant::now();
    let input = CodingInput {
        model: &model,
        sae: &sae_dir.sae,
        sae_dir: &args.sae.dir,
        hook: site.input,
        writes: site.output,
        corpus: &corpus,
    };
    let report = build(
        &input,
        &args.out,
        &settings,
        args.overwrite,
        &CANCEL,
        |tokens| {
            bar.set_position(tokens);
            bar.set_message(format!(
                "{:.0} tok/s",
                tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
        },
    )
    .with_context(|| format!("building feature statistics into {}", args.out.display()))?;
    bar.finish_and_clear();
    let Some(info) = report.info else {
        println!("stopped after {} tokens; nothing written", report.tokens);
        return Ok(());
    };
    if args.json {
        return print_json(&serde_json::json!({
            "out": args.out.display().to_string(),
            "info": info,
            "encode_seconds": report.encode_time.as_secs_f64(),
            "total_seconds": report.total_time.as_secs_f64(),
            "peak_rss_bytes": peak_rss_bytes(),
        }));
    }
    println!(
        "feature store for {} features over {} tokens ({} documents) written to {} in {:.1}s",
        info.d_sae,
        info.tokens,
        info.documents,
        args.out.display(),
        report.total_time.as_secs_f64()
    );
    Ok(())
}

fn score_features(args: &ScoreArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let (sae_dir, site) = args.sae.load(&model, &candle_core::Device::Cpu)?;
    let hook = site.input;
    let context = sae_dir.metadata.context_size;
    let mut settings = ScoreSettings::new(SegmentSettings {
        context_size: if context > 0 { context } else { 128 }.min(model.dims().context_length),
        prepend_bos: true,
        exclude_special: true,
        segments_per_forward: 32,
    });
    settings.docs_per_country = args.docs_per_country;
    settings.fact_lists = args.fact_lists;
    settings.sparse_probe_ks = args.sparse_probe_k.0.clone();
    let bar = progress_bar(0, "{elapsed_precise} {msg}")?;
    // Nothing is written: Ctrl-C may end the process at once.
    let never = std::sync::atomic::AtomicBool::new(false);
    let report = score(
        &model,
        &sae_dir.sae,
        hook,
        &settings,
        &never,
        |phase, tokens| {
            bar.set_message(format!("{phase}: {tokens} tokens"));
        },
    )
    .with_context(|| {
        format!(
            "scoring {} against the world labels",
            args.sae.dir.display()
        )
    })?
    .context("scoring stopped")?;
    bar.finish_and_clear();
    if args.json {
        return print_json(&report);
    }
    print!("{}", report.render());
    Ok(())
}
