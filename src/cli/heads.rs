//! `monoscope heads`: every attention head scored by the standard detectors (previous-token,
//! first-token, duplicate-token, induction) on a prompt or on repeated random tokens.

use clap::Args;
use serde::Serialize;

use super::{ModelArgs, print_json};
use crate::attention::{DetectorScores, patterns, repeated_random_tokens};

#[derive(Args)]
pub struct HeadsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Score the heads on this prompt instead of the induction probe (a start token, then
    /// --repeat random tokens twice).
    #[arg(long)]
    prompt: Option<String>,
    /// Length of the random run the probe repeats.
    #[arg(long, default_value_t = 20, conflicts_with = "prompt")]
    repeat: usize,
    /// Seed of the probe's random tokens.
    #[arg(long, default_value_t = 0, conflicts_with = "prompt")]
    seed: u64,
    /// Heads listed per detector.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON (every head's score for every detector) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct HeadsReport {
    tokens: Vec<String>,
    detectors: Vec<DetectorScores>,
}

pub fn run(args: &HeadsArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let (ids, what) = match &args.prompt {
        Some(prompt) => (model.encode_prompt(prompt)?, format!("{prompt:?}")),
        None => (
            repeated_random_tokens(&model, args.repeat, args.seed)?,
            format!(
                "{} random tokens (seed {}) repeated once",
                args.repeat, args.seed
            ),
        ),
    };
    let patterns = patterns(&model, &ids)?;
    let detectors = patterns.detect();
    if args.json {
        return print_json(&HeadsReport {
            tokens: patterns.tokens,
            detectors,
        });
    }
    println!(
        "{} layers × {} heads of {} on {} tokens: {what}",
        patterns.n_layers,
        patterns.n_heads,
        model.dir.display(),
        patterns.seq()
    );
    println!("mean attention on the detector's keys, over the queries it counts; head L.H");
    println!("{:<16} {:>7}  strongest heads", "detector", "queries");
    for d in &detectors {
        let heads: Vec<String> = d
            .ranked()
            .iter()
            .take(args.top)
            .map(|(l, h, s)| format!("{l}.{h} {s:.2}"))
            .collect();
        let heads = if d.queries == 0 {
            "(no query to count on this sequence)".to_string()
        } else {
            heads.join(", ")
        };
        println!("{:<16} {:>7}  {heads}", d.detector.name(), d.queries);
    }
    Ok(())
}
