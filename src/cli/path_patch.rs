//! `monoscope path-patch`: each head's effect on the answer along one path only — to the
//! logits, or into chosen later heads' queries, keys or values.

use anyhow::Context;
use clap::Args;

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar};
use crate::patching::{Direction, PatchRequest, PromptPair};
use crate::path_patching::{PathReport, PathRequest, Receiver, path_patch};

#[derive(Args)]
pub struct PathPatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt whose answer is traced: "The capital of Japan is".
    #[arg(long)]
    clean: String,
    /// The same prompt with a few tokens changed, same token count: "The capital of France is".
    #[arg(long)]
    corrupted: String,
    /// The clean answer (" Tokyo"); default: the model's prediction after --clean.
    #[arg(long)]
    answer: Option<String>,
    /// The corrupted answer (" Paris"); default: the model's prediction after --corrupted.
    #[arg(long)]
    wrong: Option<String>,
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
    let pair = PromptPair {
        clean: &args.clean,
        corrupted: &args.corrupted,
        answer: args.answer.as_deref(),
        wrong: args.wrong.as_deref(),
    };
    let request = PathRequest {
        pair: PatchRequest::from_prompts(&model, &pair, direction)
            .context("the prompt pair of the command line")?,
        receivers: args.receivers.clone(),
    };
    install_ctrl_c("stopping after this forward pass");
    let bar = progress_bar(
        request.passes(&model) as u64,
        "path patching {bar:30} {pos}/{len} forward passes",
    )?;
    let report = path_patch(&model, &request, &CANCEL, &mut |done, _| {
        bar.set_position(done as u64)
    })?
    .ok_or_else(|| anyhow::anyhow!("cancelled: nothing written"))?;
    bar.finish_and_clear();
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
