//! `monoscope path-patch`: each head's effect on the answer along one path only — to the
//! logits, or into chosen later heads' queries, keys or values.

use clap::Args;

use super::{CANCEL, ModelArgs, print_json};
use crate::patching::Direction;
use crate::path_patching::{PathReport, PathRequest, Receiver, average, path_patch};

#[derive(Args)]
pub struct PathPatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt whose answer is traced: "The capital of Japan is".
    #[arg(long, required_unless_present = "pairs")]
    clean: Option<String>,
    /// The same prompt with a few tokens changed, same token count: "The capital of France is".
    #[arg(long, required_unless_present = "pairs")]
    corrupted: Option<String>,
    /// The clean answer (" Tokyo"); default: the model's prediction after --clean.
    #[arg(long, conflicts_with = "pairs")]
    answer: Option<String>,
    /// The corrupted answer (" Paris"); default: the model's prediction after --corrupted.
    #[arg(long, conflicts_with = "pairs")]
    wrong: Option<String>,
    /// Path-patch every pair of this file and average them (each sender's logit difference
    /// averaged, then normalised with the averaged anchors). One pair per line, tab-separated:
    /// clean, corrupted, and optionally the answer and the wrong answer; a pair's two prompts
    /// have the same token count, pairs may differ. Blank lines and `#` lines are skipped.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["clean", "corrupted"])]
    pairs: Option<std::path::PathBuf>,
    /// Where the paths end, comma-separated: `logits`, or heads' inputs as LAYER.HEAD:q|k|v
    /// (`4.0:q,4.0:k`: head 0 of block 4, its query and key).
    #[arg(long, value_delimiter = ',', default_value = "logits")]
    receivers: Vec<Receiver>,
    /// Let corrupted senders into the clean run (what the answer needs along the path)
    /// instead of clean senders into the corrupted run.
    #[arg(long)]
    noising: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &PathPatchArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let direction = if args.noising {
        Direction::Noise
    } else {
        Direction::Denoise
    };
    let line = [
        args.clean.clone(),
        args.corrupted.clone(),
        args.answer.clone(),
        args.wrong.clone(),
    ];
    let typed = super::patch::pair_requests(&model, args.pairs.as_deref(), line, direction)?;
    let requests: Vec<(String, PathRequest)> = typed
        .into_iter()
        .map(|(place, pair)| {
            let request = PathRequest {
                pair,
                receivers: args.receivers.clone(),
            };
            (place, request)
        })
        .collect();
    let mut reports = super::patch::run_pairs(
        &requests,
        "path patching",
        |r| r.passes(&model),
        |r, progress| path_patch(&model, r, &CANCEL, progress),
    )?;
    let report = match reports.len() {
        1 => reports.remove(0),
        _ => average(&reports)?,
    };
    if args.json {
        return print_json(&report);
    }
    print_report(&report);
    Ok(())
}

fn print_report(r: &PathReport) {
    let (what, into) = match r.direction {
        Direction::Denoise => ("clean", "corrupted"),
        Direction::Noise => ("corrupted", "clean"),
    };
    if r.pairs > 1 {
        println!(
            "averaged over {} prompt pairs (the answers shown are the first pair's; the logit \
             differences are the pairs' means)",
            r.pairs
        );
    }
    println!(
        "logit({}) − logit({}): clean {:.3}, corrupted {:.3}",
        r.answer, r.wrong, r.clean_logit_diff, r.corrupted_logit_diff
    );
    println!(
        "each cell: one sender head's {what} output let into the {into} run along the paths to \
         {} only (every other head frozen), scored (LD − corrupted) / (clean − corrupted)",
        r.receivers.join(", ")
    );
    let heads = r.senders.first().map_or(0, Vec::len);
    let header: String = (0..heads)
        .map(|h| format!("{:>7}", format!("H{h}")))
        .collect();
    println!("{:>8}{header}", "");
    for (l, row) in r.senders.iter().enumerate() {
        let cells: String = row.iter().map(|v| format!("{v:>7.2}")).collect();
        println!("{:>8}{cells}", format!("layer {l}"));
    }
    let strongest: Vec<String> = r
        .ranked()
        .iter()
        .take(3)
        .map(|(l, h, v)| format!("head {l}.{h} {v:.2}"))
        .collect();
    println!("  moved most by: {}", strongest.join(", "));
}
