//! `monoscope patch`: activation patching between a clean and a corrupted prompt, per layer
//! and position (residual stream, attention and MLP outputs) and per head (at every position
//! or at each), with attribution patching's estimate beside it.

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar};
use crate::features::patching::{FeaturePatchReport, patch_features};
use crate::patching::{
    Direction, Layout, PatchGrid, PatchReport, PatchRequest, PromptPair, Site, average, passes,
    patch,
};

#[derive(Args)]
pub struct PatchArgs {
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
    /// Patch every pair of this file and average them (each cell's logit difference averaged,
    /// then normalised with the averaged anchors). One pair per line, tab-separated: clean,
    /// corrupted, and optionally the answer and the wrong answer; every pair with the same
    /// token count. Blank lines and lines starting with `#` are skipped.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["clean", "corrupted", "sae"])]
    pairs: Option<std::path::PathBuf>,
    /// What to patch, comma-separated: resid_pre, attn_out, mlp_out (layer × position),
    /// heads (each head's output at every position), queries, keys, values (each head's
    /// query, each key head's keys or values, at every position), patterns (each head's
    /// attention pattern at every query), and heads_by_pos, queries_by_pos, keys_by_pos,
    /// values_by_pos and patterns_by_pos (the same at one position: layer × head × position).
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
    /// the answer most: estimated for every feature at every token, the strongest patched. A
    /// transcoder's features are read at its input hook and patched at the hook it writes.
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
    let typed = pair_requests(&model, args.pairs.as_deref(), line, direction)?;
    let requests: Vec<(String, PatchRequest)> = typed
        .into_iter()
        .map(|(place, request)| {
            let request = PatchRequest {
                sites: args.sites.clone(),
                attribution: args.attribution,
                ..request
            };
            (place, request)
        })
        .collect();
    let mut reports = run_pairs(
        &requests,
        "patching",
        |r| passes(&model, r),
        |r, progress| patch(&model, r, &CANCEL, progress),
    )?;
    let report = match reports.len() {
        1 => reports.remove(0),
        _ => average(&reports)?,
    };
    let request = &requests[0].1;
    let features = match &args.sae {
        Some(dir) => {
            let (sae, site) = super::sae::load_sae(dir, None, None, &model, &model.device)?;
            let found =
                patch_features(&model, &sae.sae, site, request, args.top_features, &CANCEL)?
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

/// The prompt pairs a command patches — each line of `--pairs FILE`, or the one pair of the
/// command line (`line`: clean, corrupted, answer, wrong) — as requests with where each came
/// from, for errors and progress.
pub(super) fn pair_requests(
    model: &crate::model::Model,
    pairs: Option<&std::path::Path>,
    line: [Option<String>; 4],
    direction: Direction,
) -> anyhow::Result<Vec<(String, PatchRequest)>> {
    let typed = match pairs {
        Some(path) => read_pairs(path)?,
        None => vec![("the command line".to_string(), line)],
    };
    typed
        .into_iter()
        .map(|(place, [clean, corrupted, answer, wrong])| {
            let pair = PromptPair {
                clean: clean.as_deref().unwrap_or_default(),
                corrupted: corrupted.as_deref().unwrap_or_default(),
                answer: answer.as_deref(),
                wrong: wrong.as_deref(),
            };
            let request = PatchRequest::from_prompts(model, &pair, direction)
                .with_context(|| format!("the prompt pair of {place}"))?;
            Ok((place, request))
        })
        .collect()
}

/// Runs `run` on each pair's request in turn under one progress bar (`passes`: a request's
/// forward passes), Ctrl-C stopping after the current pass; errors name the pair.
pub(super) fn run_pairs<R, T>(
    requests: &[(String, R)],
    what: &str,
    passes: impl Fn(&R) -> usize,
    mut run: impl FnMut(&R, &mut dyn FnMut(usize, usize)) -> crate::error::Result<Option<T>>,
) -> anyhow::Result<Vec<T>> {
    install_ctrl_c("stopping after this forward pass");
    let total: usize = requests.iter().map(|(_, r)| passes(r)).sum();
    let template = format!("{what} {{bar:30}} {{pos}}/{{len}} forward passes");
    let bar = progress_bar(total as u64, &template)?;
    let mut reports = Vec::with_capacity(requests.len());
    for (place, request) in requests {
        let before = bar.position();
        let report = run(request, &mut |done, _| {
            bar.set_position(before + done as u64)
        })
        .with_context(|| format!("the prompt pair of {place}"))?
        .ok_or_else(|| anyhow::anyhow!("cancelled: nothing written"))?;
        reports.push(report);
    }
    bar.finish_and_clear();
    Ok(reports)
}

/// The pairs of a `--pairs` file, each with where it was read (for errors).
fn read_pairs(path: &std::path::Path) -> anyhow::Result<Vec<(String, [Option<String>; 4])>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompt pairs from {}", path.display()))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let place = format!("{} line {}", path.display(), i + 1);
        let fields: Vec<&str> = line.split('\t').collect();
        anyhow::ensure!(
            matches!(fields.len(), 2 | 4),
            "{place}: expected clean<TAB>corrupted[<TAB>answer<TAB>wrong], found {} fields",
            fields.len()
        );
        let field = |k: usize| fields.get(k).map(|f| f.to_string());
        pairs.push((place, [field(0), field(1), field(2), field(3)]));
    }
    anyhow::ensure!(!pairs.is_empty(), "{} holds no prompt pair", path.display());
    Ok(pairs)
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
        if f.hook == f.hook_out {
            f.hook.clone()
        } else {
            format!(
                "{} (a transcoder: read there, written at {})",
                f.hook, f.hook_out
            )
        },
        f.changed
    );
    println!(
        "  every feature's change patched at once: {:.2}; the hook's whole value: {:.2} (the \
         rest is the SAE's error term, and a skip transcoder's skip path)",
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
    if r.pairs > 1 {
        println!(
            "averaged over {} prompt pairs (tokens and answers shown are the first pair's; the \
             logit differences are the pairs' means)",
            r.pairs
        );
    }
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
        let head = if grid.site.patches_key_heads() {
            "key head"
        } else {
            "head"
        };
        let strongest: Vec<String> = grid
            .ranked(r.direction)
            .iter()
            .take(3)
            .map(|&(l, c, v)| match grid.site.cell(c, positions.len()) {
                (Some(h), Some(p)) => format!("{head} {l}.{h} at {:?} {v:.2}", positions[p]),
                (Some(h), None) => format!("{head} {l}.{h} {v:.2}"),
                (None, p) => format!("layer {l} at {:?} {v:.2}", positions[p.unwrap_or(0)]),
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
/// the page); the head grid one row per layer and one column per head; head × position
/// grids one row per head and one column per token.
fn print_grid(
    r: &PatchReport,
    grid: &PatchGrid,
    values: &[Vec<f32>],
    positions: &[String],
    what: &str,
) {
    let layers = values.len();
    println!("\n{} ({what})", grid.site.name());
    if grid.site.layout() == Layout::HeadsByPosition {
        let seq = positions.len().max(1);
        let header: String = positions
            .iter()
            .map(|t| {
                let t: String = t.chars().take(7).collect();
                format!("{:>10}", format!("{t:?}"))
            })
            .collect();
        println!("{:>8}{header}", "");
        for (l, row) in values.iter().enumerate() {
            for (h, cells) in row.chunks(seq).enumerate() {
                let cells: String = cells.iter().map(|v| format!("{v:>10.2}")).collect();
                let prefix = if grid.site.patches_key_heads() {
                    "K"
                } else {
                    ""
                };
                println!("{:>8}{cells}", format!("{l}.{prefix}{h}"));
            }
        }
        return;
    }
    if grid.site.layout() == Layout::Heads {
        let heads = values.first().map_or(0, Vec::len);
        let prefix = if grid.site.patches_key_heads() {
            "K"
        } else {
            "H"
        };
        let header: String = (0..heads)
            .map(|h| format!("{:>7}", format!("{prefix}{h}")))
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
