//! `monoscope vector`: a steering vector from contrasting prompts, saved for
//! `generate --vector`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{ModelArgs, print_json, refuse_existing};
use crate::features::logits::{LogitEffects, TokenEffect, logit_effects};
use crate::steering::{Readout, SteeringVectors};

#[derive(Args)]
pub struct VectorArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Hook names or globs to read at, comma-separated (e.g. 'blocks.4.hook_resid_post'): one
    /// vector per hook, all added together when steering.
    #[arg(long, value_name = "GLOB")]
    hooks: String,
    /// A prompt that shows the behaviour (repeat the flag for more).
    #[arg(long)]
    positive: Vec<String>,
    /// A prompt that does not (repeat the flag for more).
    #[arg(long)]
    negative: Vec<String>,
    /// More positive prompts, one per line (blank lines and lines starting with `#` skipped).
    #[arg(long, value_name = "FILE")]
    positive_file: Option<PathBuf>,
    /// More negative prompts, one per line.
    #[arg(long, value_name = "FILE")]
    negative_file: Option<PathBuf>,
    /// mean: each prompt's mean over its tokens (a property of the text); last: its last token
    /// (a property of what comes next).
    #[arg(long, value_enum, default_value = "mean")]
    readout: ReadoutArg,
    /// Output safetensors file: one tensor per hook, named by the hook.
    #[arg(long, value_parser = super::output_path, value_name = "FILE")]
    out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Tokens listed per vector in its direct logit effect.
    #[arg(long, default_value_t = 8)]
    top_tokens: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ReadoutArg {
    Mean,
    Last,
}

/// The prompts given on the command line, then those of the file.
fn prompts(flags: &[String], file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let mut prompts = flags.to_vec();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the prompts", path.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim_end)
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    Ok(prompts)
}

pub fn run(args: &VectorArgs) -> anyhow::Result<()> {
    refuse_existing(&args.out, args.force)?;
    let model = args.model.load()?;
    let patterns: Vec<&str> = args
        .hooks
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let hooks = model.resolve_hooks(&patterns)?;
    let positive = prompts(&args.positive, args.positive_file.as_deref())?;
    let negative = prompts(&args.negative, args.negative_file.as_deref())?;
    let readout = match args.readout {
        ReadoutArg::Mean => Readout::Mean,
        ReadoutArg::Last => Readout::Last,
    };
    let vectors = SteeringVectors::from_contrast(&model, &hooks, &positive, &negative, readout)?;
    super::write_new_file(&args.out, args.force, |tmp| Ok(vectors.write(tmp)?))?;
    let names = model.token_names();
    let mut rows = Vec::new();
    for v in &vectors.vectors {
        let effects = logit_effects(
            &model,
            v.hook,
            &v.vector.unsqueeze(0)?,
            args.top_tokens,
            &names,
        )?
        .and_then(|e| e.into_iter().next());
        rows.push(VectorRow {
            hook: v.hook.to_string(),
            norm: v.vector.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
            activation_norm: v.activation_norm,
            logit_effects: effects,
        });
    }
    if args.json {
        return print_json(&serde_json::json!({
            "out": args.out.display().to_string(),
            "readout": readout,
            "positive": positive.len(),
            "negative": negative.len(),
            "vectors": rows,
        }));
    }
    println!(
        "wrote {} ({} positive and {} negative prompts, readout {readout:?})",
        args.out.display(),
        positive.len(),
        negative.len(),
    );
    let listed = |tokens: &[TokenEffect]| -> String {
        tokens
            .iter()
            .map(|t| format!("'{}'", t.token))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for row in &rows {
        print!("  {:<28} norm {:.3}", row.hook, row.norm);
        match row.activation_norm {
            Some(size) => println!(" (the activations it was read from: {size:.3} on average)"),
            None => println!(),
        }
        if let Some(effects) = &row.logit_effects {
            println!("    promotes   {}", listed(&effects.top));
            println!("    suppresses {}", listed(&effects.bottom));
        }
    }
    Ok(())
}

/// One vector as `vector` reports it.
#[derive(serde::Serialize)]
struct VectorRow {
    hook: String,
    /// L2 norm.
    norm: f32,
    activation_norm: Option<f32>,
    /// What the vector writes straight to the logits (residual-stream hooks and those with a
    /// linear path to it; see `features::logits`).
    logit_effects: Option<LogitEffects>,
}
