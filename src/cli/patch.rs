//! `monoscope patch`: activation patching between a clean and a corrupted prompt, per layer
//! and position (residual stream, attention and MLP outputs) and per head, with attribution
//! patching's estimate beside it.

use clap::Args;
use serde::Serialize;

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar};
use crate::features::patching::{FeaturePatchReport, patch_features};
use crate::patching::{Direction, PatchGrid, PatchReport, PatchRequest, PromptPair, Site, patch};

#[derive(Args)]
pub struct PatchArgs {
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
    /// What to patch, comma-separated: resid_pre, attn_out, mlp_out (layer × position) and
    /// heads (each head at every position).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "resid_pre,attn_out,mlp_out,heads"
    )]
    sites: Vec<Site>,
    /// Patch corrupted values into the clean run (what the answer needs) instead of clean
    /// values into the corrupted run (what is enough to bring it back).
    #[arg(long)]
    noising: bool,
    /// Also estimate every grid by attribution patching (one backward pass) and print how
    /// well it agrees.
    #[arg(long)]
    attribution: bool,
    /// Also find the features of this SAE (at its hook) whose change between the runs moves
    /// the answer most: estimated for every feature at every token, the strongest patched.
    #[arg(long, value_name = "DIR")]
    sae: Option<std::path::PathBuf>,
    /// SAE features patched and listed.
    #[arg(long, default_value_t = 10, requires = "sae")]
    top_features: usize,
    /// Print JSON (every grid) instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &PatchArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let pair = PromptPair {
        clean: &args.clean,
        corrupted: &args.corrupted,
        answer: args.answer.as_deref(),
        wrong: args.wrong.as_deref(),
    };
    let direction = if args.noising {
        Direction::Noise
    } else {
        Direction::Denoise
    };
    let request = PatchRequest {
        sites: args.sites.clone(),
        attribution: args.attribution,
        ..PatchRequest::from_prompts(&model, &pair, direction)?
    };
    install_ctrl_c("stopping after this forward pass");
    let bar = progress_bar(
        crate::patching::passes(&model, &request) as u64,
        "patching {bar:30} {pos}/{len} forward passes",
    )?;
    let report = patch(&model, &request, &CANCEL, &mut |done, _| {
        bar.set_position(done as u64)
    })?
    .ok_or_else(|| anyhow::anyhow!("cancelled: nothing written"))?;
    bar.finish_and_clear();
    let features = match &args.sae {
        Some(dir) => {
            let (sae, hook) = super::sae::load_sae(dir, None, &model, &model.device)?;
            let found =
                patch_features(&model, &sae.sae, hook, &request, args.top_features, &CANCEL)?
                    .ok_or_else(|| anyhow::anyhow!("cancelled: nothing written"))?;
            Some(found)
        }
        None => None,
    };
    if args.json {
        return print_json(&Output { report, features });
    }
    print_report(&report);
    if let Some(f) = &features {
        print_features(f);
    }
    Ok(())
}

#[derive(Serialize)]
struct Output {
    #[serde(flatten)]
    report: PatchReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<FeaturePatchReport>,
}

fn print_features(f: &FeaturePatchReport) {
    println!(
        "
SAE features at {} ({} token × feature activations differ between the runs)",
        f.hook, f.changed
    );
    println!(
        "  every feature's change patched at once: {:.2}; the hook's whole value: {:.2} (the \
         rest is the SAE's error term)",
        f.all_features, f.whole_hook
    );
    println!(
        "  {:>8}  {:<18} {:>8} {:>10} {:>9} {:>8}",
        "feature", "token", "clean", "corrupted", "estimate", "patched"
    );
    for e in &f.features {
        let token: String = format!("{:?}", f.tokens[e.position])
            .chars()
            .take(18)
            .collect();
        println!(
            "  {:>8}  {token:<18} {:>8.3} {:>10.3} {:>9.3} {:>8.3}",
            e.feature, e.clean, e.corrupted, e.estimate, e.patched
        );
    }
}

fn print_report(r: &PatchReport) {
    let (what, into) = match r.direction {
        Direction::Denoise => ("clean", "corrupted"),
        Direction::Noise => ("corrupted", "clean"),
    };
    println!(
        "logit({:?}) − logit({:?}): clean {:.3}, corrupted {:.3}",
        r.answer, r.wrong, r.clean_logit_diff, r.corrupted_logit_diff
    );
    println!(
        "each cell: one {what} activation patched into the {into} run, scored (LD − corrupted) / \
         (clean − corrupted): 0 = the corrupted run, 1 = the clean run"
    );
    let positions = r.position_labels();
    for grid in &r.grids {
        print_grid(r, grid, &grid.patched, &positions, "patched");
        let strongest: Vec<String> = grid
            .ranked(r.direction)
            .iter()
            .take(3)
            .map(|&(l, c, v)| match grid.site.per_head() {
                true => format!("head {l}.{c} {v:.2}"),
                false => format!("layer {l} at {:?} {v:.2}", positions[c]),
            })
            .collect();
        println!("  moved most by: {}", strongest.join(", "));
        if let Some(estimate) = &grid.attribution {
            print_grid(
                r,
                grid,
                estimate,
                &positions,
                "attribution patching's estimate",
            );
            if let Some(r) = grid.agreement() {
                println!(
                    "  agreement with patching: correlation {r:.3} over {} cells",
                    grid.patched.iter().map(Vec::len).sum::<usize>()
                );
            }
        }
    }
}

/// Position grids print one row per token and one column per layer (the prompt reads down
/// the page); the head grid one row per layer and one column per head.
fn print_grid(
    r: &PatchReport,
    grid: &PatchGrid,
    values: &[Vec<f32>],
    positions: &[String],
    what: &str,
) {
    let layers = values.len();
    println!("\n{} ({what})", grid.site.name());
    if grid.site.per_head() {
        let heads = values.first().map_or(0, Vec::len);
        let header: String = (0..heads)
            .map(|h| format!("{:>7}", format!("H{h}")))
            .collect();
        println!("{:>8}{header}", "");
        for (l, row) in values.iter().enumerate() {
            let cells: String = row.iter().map(|v| format!("{v:>7.2}")).collect();
            println!("{:>8}{cells}", format!("layer {l}"));
        }
        return;
    }
    let header: String = (0..layers)
        .map(|l| format!("{:>7}", format!("L{l}")))
        .collect();
    println!("{:>24}{header}", "");
    for (p, label) in positions.iter().enumerate() {
        let label: String = format!("{label:?}").chars().take(22).collect();
        let marker = if r.differing.contains(&p) { "*" } else { " " };
        let cells: String = values
            .iter()
            .map(|row| format!("{:>7.2}", row[p]))
            .collect();
        println!("{marker}{label:>23}{cells}");
    }
}
