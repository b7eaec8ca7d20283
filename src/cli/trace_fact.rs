//! `monoscope trace-fact`: causal tracing of one fact (hidden state, MLP and attention
//! restoration heatmaps) and the layer it suggests for an edit.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{FactArgs, ModelArgs, print_json, write_new_file};
use crate::causal::{
    Fact, HeadTrace, Restore, Trace, TraceSettings, subject_embedding_std, trace, trace_heads,
};
use crate::edit::locate::{KeyChoice, KeySelect, choose_key};
use crate::edit::rome::KeyPosition;

use crate::world::knowledge::KnowledgeBase;

#[derive(Args)]
pub struct TraceFactArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    fact: FactArgs,
    /// Noise in units of σ of the subjects' token embeddings.
    #[arg(long, default_value_t = 3.0)]
    noise: f64,
    /// Noise samples averaged per measurement.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Layers restored together for MLP and attention traces.
    #[arg(long, default_value_t = 10)]
    window: usize,
    /// Subjects whose token embeddings set σ, one per line (default: the knowledge base's
    /// country names, English and Japanese).
    #[arg(long, value_name = "FILE")]
    subjects: Option<PathBuf>,
    /// Write `trace.json` and one heatmap per restoration (`hidden.png`, `mlp.png`,
    /// `attn.png`) into this folder (files are never replaced unless --force).
    #[arg(long, value_parser = super::output_path, value_name = "DIR")]
    out: Option<PathBuf>,
    #[arg(long)]
    force: bool,
    /// Also trace each attention head: its `attn.hook_z` columns restored at every position
    /// (a layer × head table; `heads` in the JSON).
    #[arg(long)]
    heads: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    prompt: String,
    subject: String,
    target: String,
    sigma: f64,
    settings: TraceSettings,
    traces: Vec<Trace>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heads: Option<HeadTrace>,
    /// The edit layer: the strongest single-layer MLP effect at the last subject token (as
    /// `edit --key subject-last` chooses it), with the recovery per layer behind it.
    suggestion: KeyChoice,
}

pub fn run(args: &TraceFactArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let prompt = args.fact.prompt.replace("{}", &args.fact.subject);
    let subjects: Vec<String> = match &args.subjects {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading subjects {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => KnowledgeBase::bundled()?.subject_names(),
    };
    let sigma = subject_embedding_std(&model, &subjects)?;
    let settings = TraceSettings {
        noise_sigmas: args.noise,
        samples: args.samples,
        seed: args.seed,
        window: args.window,
    };
    let fact = Fact {
        prompt: &prompt,
        subject: &args.fact.subject,
        target: &args.fact.target,
    };
    let mut traces = Vec::new();
    for restore in Restore::ALL {
        eprintln!(
            "tracing: restoring {} at every (layer, token)",
            restore.name()
        );
        traces.push(
            trace(&model, &fact, &settings, sigma, None, restore)
                .with_context(|| format!("tracing {prompt:?}"))?,
        );
    }
    let heads = if args.heads {
        eprintln!("tracing: restoring each attention head at every token");
        Some(
            trace_heads(&model, &fact, &settings, sigma)
                .with_context(|| format!("tracing {prompt:?} per head"))?,
        )
    } else {
        None
    };
    // The layer `edit --key subject-last` would choose, by the same single-layer trace.
    let suggestion = choose_key(
        &model,
        &fact,
        &settings,
        sigma,
        None,
        KeySelect::Fixed(KeyPosition::SubjectLast),
    )?;
    let report = Report {
        prompt,
        subject: args.fact.subject.clone(),
        target: args.fact.target.clone(),
        sigma,
        settings,
        traces,
        heads,
        suggestion,
    };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // All three files are checked before any is written, so a refusal leaves no mix of
        // old and new.
        let names = std::iter::once("trace.json".to_string()).chain(
            report
                .traces
                .iter()
                .map(|t| format!("{}.png", t.restore.name())),
        );
        for name in names {
            super::refuse_existing(&dir.join(name), args.force)?;
        }
        let json = serde_json::to_string_pretty(&report)?;
        write_new_file(&dir.join("trace.json"), args.force, |tmp| {
            Ok(std::fs::write(tmp, json)?)
        })?;
        for t in &report.traces {
            let path = dir.join(format!("{}.png", t.restore.name()));
            write_new_file(&path, args.force, |tmp| write_heatmap(t, tmp))?;
        }
    }
    if args.json {
        return print_json(&report);
    }
    for t in &report.traces {
        print!("{}", render(t));
    }
    if let Some(h) = &report.heads {
        print!("{}", render_heads(h));
    }
    println!(
        "suggested edit layer: {} — {}",
        report.suggestion.layer, report.suggestion.reason
    );
    Ok(())
}

/// A heatmap as text: one row per token, one column per layer, shaded by how much of the
/// clean probability the restoration brings back.
fn render(t: &Trace) -> String {
    const SHADES: [char; 5] = [' ', '░', '▒', '▓', '█'];
    let span = (t.p_clean - t.p_corrupt).abs().max(1e-9);
    let mut s = format!(
        "\nrestoring {} (P clean {:.3}, corrupted {:.3})\n",
        t.restore.name(),
        t.p_clean,
        t.p_corrupt
    );
    let layers = t.p_restored.len();
    s.push_str(&format!("{:>18} ", ""));
    for l in 0..layers {
        s.push_str(&format!("{:>2}", l % 100));
    }
    s.push('\n');
    for (i, &pos) in t.positions.iter().enumerate() {
        let marker = if t.subject.contains(&pos) { "*" } else { " " };
        let token: String = t.tokens[pos].chars().take(16).collect();
        s.push_str(&format!("{marker}{token:>17} "));
        for row in &t.p_restored {
            let x = ((row[i] - t.p_corrupt) / span).clamp(0.0, 1.0);
            let shade = SHADES[((x * 4.0).round() as usize).min(4)];
            s.push(shade);
            s.push(shade);
        }
        s.push('\n');
    }
    s
}

/// The per-head trace as a table: one row per layer, one column per head, each cell the
/// share of the clean probability that restoring the head brings back.
fn render_heads(t: &HeadTrace) -> String {
    let span = t.p_clean - t.p_corrupt;
    let mut s = format!(
        "\nrestoring each head (share of P recovered: (P restored − {:.3}) / ({:.3} − {:.3}))\n",
        t.p_corrupt, t.p_clean, t.p_corrupt
    );
    let heads = t.p_restored.first().map_or(0, Vec::len);
    s.push_str(&format!("{:>8}", ""));
    for h in 0..heads {
        s.push_str(&format!("{:>7}", format!("H{h}")));
    }
    s.push('\n');
    for (l, row) in t.p_restored.iter().enumerate() {
        s.push_str(&format!("{:>8}", format!("layer {l}")));
        for &p in row {
            let share = if span.abs() > 1e-9 {
                (p - t.p_corrupt) / span
            } else {
                0.0
            };
            s.push_str(&format!("{share:>7.2}"));
        }
        s.push('\n');
    }
    s
}

/// Pixels per heatmap cell.
const CELL: usize = 16;

/// The trace as a PNG heatmap: one row of cells per token (top to bottom), one column per
/// layer (left to right), white where restoring brings nothing back and the restoration's
/// colour (hidden purple, MLP green, attention red) where it brings back the clean
/// probability; subject rows are marked by a dark bar on the left. Labels are in
/// `trace.json`.
fn write_heatmap(t: &Trace, path: &std::path::Path) -> anyhow::Result<()> {
    let (rows, cols) = (t.positions.len(), t.p_restored.len());
    let (width, height) = ((cols + 1) * CELL, rows * CELL);
    let full: [f32; 3] = match t.restore {
        Restore::Hidden => [84.0, 39.0, 143.0],
        Restore::Mlp => [0.0, 109.0, 44.0],
        Restore::Attn => [165.0, 15.0, 21.0],
    };
    let span = (t.p_clean - t.p_corrupt).abs().max(1e-9);
    let mut pixels = vec![255u8; width * height * 3];
    for (i, &pos) in t.positions.iter().enumerate() {
        for y in i * CELL..(i + 1) * CELL {
            for x in 0..width {
                let rgb = if x < CELL {
                    if t.subject.contains(&pos) && x < CELL / 2 {
                        [40, 40, 40]
                    } else {
                        [255, 255, 255]
                    }
                } else {
                    let layer = x / CELL - 1;
                    let v = ((t.p_restored[layer][i] - t.p_corrupt) / span).clamp(0.0, 1.0);
                    full.map(|c| (255.0 + (c - 255.0) * v).round() as u8)
                };
                pixels[(y * width + x) * 3..][..3].copy_from_slice(&rgb);
            }
        }
    }
    Ok(crate::files::write_png(
        path,
        width,
        height,
        png::ColorType::Rgb,
        &pixels,
    )?)
}
