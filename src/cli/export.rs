//! `monoscope export`: an SAE's feature activations over a corpus, to sharded Parquet.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::sae::{CorpusArgs, SaeArgs};
use super::{CANCEL, ModelArgs, install_ctrl_c, peak_rss_bytes, print_json, progress_bar};
use crate::export::{Existing, ExportSettings, export};
use crate::sae::codes::CodingInput;
use crate::table::ROW_GROUP_ROWS;

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    sae: SaeArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// The export folder (created; must be empty unless --resume or --overwrite).
    #[arg(long, value_parser = super::output_path)]
    out: PathBuf,
    /// Stop after this many tokens (default: one pass over the corpus).
    #[arg(long)]
    tokens: Option<u64>,
    /// Activation rows per shard (a shard ends at the next document boundary).
    #[arg(long, default_value_t = 8 * ROW_GROUP_ROWS as u64)]
    shard_rows: u64,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = ROW_GROUP_ROWS)]
    row_group_rows: usize,
    /// Continue the export in --out after its last complete shard.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace the export in --out.
    #[arg(long)]
    overwrite: bool,
    /// Top and bottom logit tokens per feature in features.parquet.
    #[arg(long, default_value_t = 10)]
    logit_tokens: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let (sae_dir, site) = args.sae.load(&model, &candle_core::Device::Cpu)?;
    let corpus = args.corpus.corpus()?;
    let settings = ExportSettings {
        segment: args.corpus.segments(&model, sae_dir.metadata.context_size),
        tokens: args.tokens,
        shard_rows: args.shard_rows,
        row_group_rows: args.row_group_rows,
        logit_tokens: args.logit_tokens,
    };
    let existing = match (args.resume, args.overwrite) {
        (true, _) => Existing::Resume,
        (_, true) => Existing::Overwrite,
        _ => Existing::Refuse,
    };
    install_ctrl_c(
        "stopping after the current batch; the complete shards stay (rerun with --resume)",
    );
    let bar = match args.tokens {
        Some(n) => progress_bar(
            n,
            "{elapsed_precise} [{bar:30}] {pos}/{len} tokens {msg} (eta {eta})",
        )?,
        None => progress_bar(0, "{elapsed_precise} {pos} tokens {msg}")?,
    };
    let started = std::time::Instant::now();
    let mut first = None;
    let input = CodingInput {
        model: &model,
        sae: &sae_dir.sae,
        sae_dir: &args.sae.dir,
        hook: site.input,
        writes: site.output,
        corpus: &corpus,
    };
    let report = export(&input, &args.out, &settings, existing, &CANCEL, |p| {
        let (t0, r0) = *first.get_or_insert((p.tokens, p.rows));
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(p.tokens);
        bar.set_message(format!(
            "{} rows, {:.0} rows/s, {:.0} tok/s",
            p.rows,
            (p.rows - r0) as f64 / secs,
            (p.tokens - t0) as f64 / secs
        ));
    })
    .with_context(|| format!("exporting to {}", args.out.display()))?;
    bar.finish_and_clear();
    let m = &report.manifest;
    let write_secs = report.write_time.as_secs_f64();
    let summary = serde_json::json!({
        "out": args.out.display().to_string(),
        "complete": m.complete,
        "cancelled": report.cancelled,
        "documents": m.document_count,
        "tokens": m.token_count,
        "activation_rows": m.activation_count,
        "shards": m.shards.len(),
        "skipped_lines": m.skipped_lines,
        "this_run": {
            "tokens": report.tokens_this_run,
            "rows": report.rows_this_run,
            "forward_seconds": report.forward_time.as_secs_f64(),
            "encode_seconds": report.encode_time.as_secs_f64(),
            "write_seconds": write_secs,
            "total_seconds": report.total_time.as_secs_f64(),
            "write_rows_per_second": report.rows_this_run as f64 / write_secs.max(1e-9),
        },
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if args.json {
        return print_json(&summary);
    }
    if report.cancelled {
        println!(
            "stopped: {} complete shards ({} tokens) in {}; continue with the same command plus --resume",
            m.shards.len(),
            m.token_count,
            args.out.display()
        );
        return Ok(());
    }
    println!(
        "exported {} activation rows over {} tokens of {} documents into {} ({} shards{})",
        m.activation_count,
        m.token_count,
        m.document_count,
        args.out.display(),
        m.shards.len(),
        if m.skipped_lines > 0 {
            format!(", {} invalid UTF-8 lines skipped", m.skipped_lines)
        } else {
            String::new()
        }
    );
    if report.rows_this_run > 0 {
        println!(
            "this run: model {:.1}s, SAE encode {:.1}s, Parquet writing {:.1}s ({:.2}M rows/s, overlapped with encoding), total {:.1}s",
            report.forward_time.as_secs_f64(),
            report.encode_time.as_secs_f64(),
            write_secs,
            report.rows_this_run as f64 / write_secs.max(1e-9) / 1e6,
            report.total_time.as_secs_f64()
        );
    }
    Ok(())
}
