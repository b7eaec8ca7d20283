//! `monoscope heads`: every attention head scored by the standard detectors (previous-token,
//! first-token, duplicate-token, induction) on a prompt or on repeated random tokens.

use std::sync::atomic::AtomicBool;

use clap::Args;
use serde::Serialize;

use super::{ModelArgs, print_json};
use crate::attention::{
    DetectorScores, HeadAblation, ablate_heads, next_token_loss, patterns, probe_copies,
    repeated_random_tokens,
};
use crate::composition::{Composition, CompositionScores, composition_scores};
use crate::model::Hooks;

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
    /// Also zero each head in turn and measure the next-token loss (one forward pass per
    /// head): over the probe's second copy, or over the whole prompt.
    #[arg(long)]
    ablate: bool,
    /// Also score every pair of heads for Q-, K- and V-composition from the weights (Elhage et
    /// al. 2021), and list the strongest pairs.
    #[arg(long)]
    composition: bool,
    /// Print JSON (every head's score for every detector) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct HeadsReport {
    tokens: Vec<String>,
    detectors: Vec<DetectorScores>,
    /// The probe's clean loss over its first and second copy (an induction signature when the
    /// second is far lower).
    #[serde(skip_serializing_if = "Option::is_none")]
    probe_losses: Option<[f32; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ablation: Option<HeadAblation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    composition: Option<Vec<CompositionScores>>,
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
    // Where the loss is scored: the probe's second copy, or every prediction in the prompt.
    let copies = args
        .prompt
        .is_none()
        .then(|| probe_copies(ids.len(), args.repeat));
    let probe_losses = match &copies {
        Some([first, second]) => Some([
            next_token_loss(&model, &ids, first.clone(), &Hooks::new())?,
            next_token_loss(&model, &ids, second.clone(), &Hooks::new())?,
        ]),
        None => None,
    };
    let ablation = if args.ablate {
        let scored = copies.map_or(0..ids.len() - 1, |[_, second]| second);
        anyhow::ensure!(
            !scored.is_empty(),
            "--ablate needs a prompt of two tokens or more"
        );
        ablate_heads(&model, &ids, scored, &AtomicBool::new(false))?
    } else {
        None
    };
    let composition = if args.composition {
        let all = Composition::ALL.map(|mode| composition_scores(&model, mode));
        Some(all.into_iter().collect::<crate::Result<Vec<_>>>()?)
    } else {
        None
    };
    let report = HeadsReport {
        tokens: patterns.tokens.clone(),
        detectors,
        probe_losses,
        ablation,
        composition,
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "{} layers × {} heads of {} on {} tokens: {what}",
        patterns.n_layers,
        patterns.n_heads,
        model.dir.display(),
        patterns.seq()
    );
    if let Some([first, second]) = report.probe_losses {
        println!(
            "next-token loss: first copy {first:.3}, second copy {second:.3} nats per token \
             (a model that copies from context does far better on the second)"
        );
    }
    println!("mean attention on the detector's keys, over the queries it counts; head L.H");
    println!("{:<16} {:>7}  strongest heads", "detector", "queries");
    for d in &report.detectors {
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
    if let Some(a) = &report.ablation {
        let heads: Vec<String> = a
            .ranked()
            .iter()
            .take(args.top)
            .map(|(l, h, d)| format!("{l}.{h} {d:+.3}"))
            .collect();
        println!(
            "zeroing one head: loss {:.3} nats per token over positions {}..{}; the heads it rises most without: {}",
            a.clean_loss,
            a.scored.start,
            a.scored.end,
            heads.join(", ")
        );
    }
    if let Some(all) = &report.composition {
        let baseline = all.first().map_or(0.0, |c| c.baseline);
        println!(
            "composition from the weights, writer → reader (a reader at random to the writer \
             scores about {baseline:.3}):"
        );
        for c in all {
            let pairs: Vec<String> = c
                .ranked()
                .iter()
                .take(args.top)
                .map(|p| {
                    let ((wl, wh), (rl, rh)) = (p.writer, p.reader);
                    format!("{wl}.{wh} → {rl}.{rh} {:.2}", p.score)
                })
                .collect();
            println!("  {}-composition: {}", c.mode, pairs.join(", "));
        }
    }
    Ok(())
}
