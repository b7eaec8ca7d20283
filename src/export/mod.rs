//! Batch export of SAE feature activations to Parquet, in the layout of DESIGN.md:
//!
//! ```text
//! EXPORT_DIR/manifest.json
//! EXPORT_DIR/activations/part-00000.parquet   doc_id u64, position u32, feature u32, activation f32
//! EXPORT_DIR/tokens/part-00000.parquet        doc_id u64, position u32, token_id u32, token utf8
//! EXPORT_DIR/features.parquet                 feature, density, mean/max activation, top/bottom logits
//! ```
//!
//! Shard `i` of both tables covers the same documents `[first_doc, end_doc)`; shards end on
//! document boundaries once they hold `shard_rows` activation rows. Each shard is written
//! under a hidden temporary name, synced, hashed while written, renamed when complete, and
//! only then listed in the manifest (itself replaced atomically). A rerun with `resume`
//! continues after the last listed shard. Encoding (model + SAE) runs on the calling thread
//! while a second thread writes, so the two overlap.

pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::sae::codes::{
    CodedBatch, CodingInput, DocumentCoder, SegmentSettings, check_sae_fits, tokenised,
};
use crate::sae::sparse::SparseEncoder;
use crate::table::{parquet_error, sae_hash};
use writer::{ShardWriter, write_features};

pub const MANIFEST: &str = "manifest.json";
pub const ACTIVATIONS_DIR: &str = "activations";
pub const TOKENS_DIR: &str = "tokens";
pub const FEATURES_FILE: &str = "features.parquet";
pub const SCHEMA_VERSION: u32 = 1;

/// A file listed in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the export folder.
    pub path: String,
    pub rows: u64,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
}

/// One shard: the same documents in both tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub first_doc: u64,
    /// Exclusive.
    pub end_doc: u64,
    pub activations: FileEntry,
    pub tokens: FileEntry,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub dir: String,
    pub content_hash: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaeRef {
    pub dir: String,
    pub content_hash: String,
    pub architecture: String,
    pub d_in: usize,
    pub d_sae: usize,
    /// A transcoder's output hook (where `features.parquet`'s logit effects are read from);
    /// absent for an SAE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_out: Option<String>,
}

/// `manifest.json`: what was exported, from what, and which files hold it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    /// False while the export runs (or after it was interrupted).
    pub complete: bool,
    pub model: ModelRef,
    pub hook: String,
    pub sae: SaeRef,
    pub corpus: String,
    pub context_size: usize,
    pub prepend_bos: bool,
    /// Whether special tokens (BOS, EOS, …) inside documents were left without codes.
    pub exclude_special: bool,
    pub document_count: u64,
    pub token_count: u64,
    pub activation_count: u64,
    /// Corpus lines left out because they were not valid UTF-8.
    pub skipped_lines: u64,
    pub shards: Vec<Shard>,
    pub features: Option<FileEntry>,
}

impl Manifest {
    /// Whether `other` exports the same thing (so one may continue the other).
    fn same_source(&self, other: &Manifest) -> bool {
        self.schema_version == other.schema_version
            && self.model.content_hash == other.model.content_hash
            && self.hook == other.hook
            && self.sae.content_hash == other.sae.content_hash
            && self.corpus == other.corpus
            && self.context_size == other.context_size
            && self.prepend_bos == other.prepend_bos
            && self.exclude_special == other.exclude_special
    }

    fn save(&self, out: &Path) -> Result<()> {
        let path = out.join(MANIFEST);
        let json = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, |tmp| {
            std::fs::write(tmp, json).map_err(|e| Error::io(tmp, e))
        })
    }
}

/// What to do with an output folder that is not empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Stop with an error.
    Refuse,
    /// Continue the export the folder holds.
    Resume,
    /// Delete the export the folder holds and start again (only export files are deleted).
    Overwrite,
}

#[derive(Clone, Debug)]
pub struct ExportSettings {
    pub segment: SegmentSettings,
    /// Stop after this many tokens in all (`None`: the whole corpus, one pass).
    pub tokens: Option<u64>,
    /// Activation rows after which a shard ends (at the next document boundary).
    pub shard_rows: u64,
    pub row_group_rows: usize,
    /// Top and bottom logit tokens per feature in `features.parquet`.
    pub logit_tokens: usize,
}

/// Counts reported as the export goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub tokens: u64,
    pub rows: u64,
}

/// How an export ended, with where the time went.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub manifest: Manifest,
    pub cancelled: bool,
    /// Tokens and rows written by this run (not counting resumed shards).
    pub tokens_this_run: u64,
    pub rows_this_run: u64,
    pub forward_time: Duration,
    pub encode_time: Duration,
    /// Time the writer thread spent building and writing Parquet (encoding excluded).
    pub write_time: Duration,
    pub total_time: Duration,
}

/// Runs the export into `out`.
pub fn export(
    input: &CodingInput,
    out: &Path,
    settings: &ExportSettings,
    existing: Existing,
    cancel: &AtomicBool,
    mut on_progress: impl FnMut(Progress),
) -> Result<ExportReport> {
    let started = Instant::now();
    if settings.tokens == Some(0) {
        return Err(Error::InvalidArgument {
            what: "--tokens",
            value: "0".into(),
            message: "an export needs at least one token".into(),
        });
    }
    for (what, rows) in [
        ("--shard-rows", settings.shard_rows),
        ("--row-group-rows", settings.row_group_rows as u64),
    ] {
        if rows == 0 {
            return Err(Error::InvalidArgument {
                what,
                value: "0".into(),
                message: "must be at least one row".into(),
            });
        }
    }
    check_sae_fits(input.model, input.hook, input.sae, input.sae_dir)?;
    let fresh = Manifest {
        schema_version: SCHEMA_VERSION,
        complete: false,
        model: ModelRef {
            dir: input.model.dir.display().to_string(),
            content_hash: input.model.content_hash()?,
        },
        hook: input.hook.to_string(),
        sae: SaeRef {
            dir: input.sae_dir.display().to_string(),
            content_hash: sae_hash(input.sae_dir)?,
            architecture: input.sae.architecture.name().to_string(),
            d_in: input.sae.d_in(),
            d_sae: input.sae.d_sae(),
            hook_out: input.sae.transcoder.then(|| input.writes.to_string()),
        },
        corpus: input.corpus.describe(),
        context_size: settings.segment.context_size,
        prepend_bos: settings.segment.prepend_bos,
        exclude_special: settings.segment.exclude_special,
        document_count: 0,
        token_count: 0,
        activation_count: 0,
        skipped_lines: 0,
        shards: Vec::new(),
        features: None,
    };
    let mut manifest = prepare_folder(out, fresh, existing)?;
    let mut report = ExportReport {
        manifest: manifest.clone(),
        cancelled: false,
        tokens_this_run: 0,
        rows_this_run: 0,
        forward_time: Duration::ZERO,
        encode_time: Duration::ZERO,
        write_time: Duration::ZERO,
        total_time: Duration::ZERO,
    };
    if manifest.complete {
        report.total_time = started.elapsed();
        return Ok(report);
    }

    let encoder = SparseEncoder::new(input.sae)?;
    let first_doc = manifest.shards.last().map_or(0, |s| s.end_doc);
    let budget = settings
        .tokens
        .map(|n| n.saturating_sub(manifest.token_count));
    let documents = input.corpus.documents(0)?;
    let skipped = documents.skipped_counter();
    let mut coder = DocumentCoder::new(
        input.model,
        &encoder,
        input.hook,
        settings.segment.clone(),
        tokenised(input.model, documents, first_doc),
        first_doc,
        budget,
    )?;
    let token_names = input.model.token_names();

    let (tx, rx) = mpsc::sync_channel::<Message>(2);
    let mut progress = Progress {
        tokens: manifest.token_count,
        rows: manifest.activation_count,
    };
    let (written, produced) = std::thread::scope(|scope| {
        let writer_manifest = manifest.clone();
        let names = &token_names;
        let writer = scope.spawn(move || -> Result<(Manifest, Duration, bool)> {
            let mut shards = ShardWriter::new(out, writer_manifest, settings, names);
            let mut finished = false;
            for message in rx {
                match message {
                    Message::Batch(batch) => shards.write(&batch)?,
                    Message::End { end_doc } => {
                        shards.finish(end_doc)?;
                        finished = true;
                        break;
                    }
                }
            }
            let busy = shards.busy();
            Ok((shards.into_manifest(), busy, finished))
        });
        let produced = (|| -> Result<bool> {
            while let Some(batch) = coder.next_batch()? {
                progress.tokens += batch.tokens() as u64;
                progress.rows += batch.codes.len() as u64;
                report.tokens_this_run += batch.tokens() as u64;
                report.rows_this_run += batch.codes.len() as u64;
                if tx.send(Message::Batch(batch)).is_err() {
                    // The writer stopped on an error; it reports it below.
                    return Ok(false);
                }
                on_progress(progress);
                if cancel.load(Ordering::Relaxed) {
                    return Ok(false);
                }
            }
            Ok(true)
        })();
        if let Ok(true) = produced {
            // Tell the writer the documents seen in all (trailing empty documents count).
            let _ = tx.send(Message::End {
                end_doc: coder.next_doc(),
            });
        }
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::io(out, std::io::Error::other("writer panicked"))));
        (written, produced)
    });
    let (written_manifest, busy, finished) = written?;
    let all_read = produced?;
    manifest = written_manifest;
    report.forward_time = coder.forward_time;
    report.encode_time = coder.encode_time;
    report.write_time = busy;
    // Every run reads the corpus from its first line, so this run's count is the whole count.
    manifest.skipped_lines = skipped.load(Ordering::Relaxed);
    if !(all_read && finished) {
        manifest.save(out)?;
        report.cancelled = true;
        report.manifest = manifest;
        report.total_time = started.elapsed();
        return Ok(report);
    }
    if manifest.token_count == 0 {
        // Nothing to export: leave no half-made export behind.
        for dir in [ACTIVATIONS_DIR, TOKENS_DIR] {
            let _ = std::fs::remove_dir(out.join(dir));
        }
        let _ = std::fs::remove_file(out.join(MANIFEST));
        return Err(Error::InvalidArgument {
            what: "corpus",
            value: input.corpus.describe(),
            message: format!(
                "holds no tokens ({} lines skipped as invalid UTF-8)",
                manifest.skipped_lines
            ),
        });
    }
    let features = write_features(
        out,
        input.model,
        input.sae,
        input.writes,
        &manifest,
        settings.logit_tokens,
        &token_names,
    )?;
    manifest.features = Some(features);
    manifest.complete = true;
    manifest.save(out)?;
    report.manifest = manifest;
    report.total_time = started.elapsed();
    Ok(report)
}

/// What the encoding thread hands the writer.
enum Message {
    Batch(CodedBatch),
    /// The corpus (or the token budget) is done; `end_doc` documents were read in all
    /// (trailing empty documents count).
    End {
        end_doc: u64,
    },
}

/// Names an export folder holds: its files, and the temporary names they are written under
/// (`.manifest.json.tmp-PID`, `.features.parquet.tmp-PID`).
fn is_export_entry(name: &str) -> bool {
    let temporary = [MANIFEST, FEATURES_FILE]
        .iter()
        .any(|f| name.starts_with(&format!(".{f}.tmp-")));
    matches!(
        name,
        MANIFEST | ACTIVATIONS_DIR | TOKENS_DIR | FEATURES_FILE
    ) || temporary
}

/// Whether `name` in a shard folder is a shard's temporary name (`.part-NNNNN.parquet.tmp`).
fn is_temporary_shard(name: &str) -> bool {
    name.starts_with(".part-") && name.ends_with(".parquet.tmp")
}

/// Makes `out` ready: a fresh folder with an empty manifest, or the manifest to resume.
fn prepare_folder(out: &Path, fresh: Manifest, existing: Existing) -> Result<Manifest> {
    crate::files::require_output_path("the export folder", out)?;
    let entries: Vec<String> = match std::fs::read_dir(out) {
        Ok(rd) => rd
            .filter_map(std::result::Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(out, e)),
    };
    let refuse = |message: String| Error::InvalidArgument {
        what: "--out",
        value: out.display().to_string(),
        message,
    };
    let manifest_path = out.join(MANIFEST);
    if !entries.is_empty() {
        match existing {
            Existing::Refuse => {
                return Err(refuse(
                    "is not empty: pass --resume to continue the export it holds, or --overwrite to replace it"
                        .into(),
                ));
            }
            Existing::Overwrite => {
                if let Some(other) = entries.iter().find(|n| !is_export_entry(n)) {
                    return Err(refuse(format!(
                        "holds `{other}`, which is not part of an export; refusing to delete it"
                    )));
                }
                for name in &entries {
                    let path = out.join(name);
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(|e| Error::io(&path, e))?;
                }
            }
            Existing::Resume => {
                if !manifest_path.is_file() {
                    return Err(refuse(format!(
                        "has no {MANIFEST}: nothing to resume (use --overwrite to start again)"
                    )));
                }
                let saved: Manifest = read_json(&manifest_path)?;
                if !saved.same_source(&fresh) {
                    return Err(Error::Config {
                        path: manifest_path,
                        key: "model/sae/hook/corpus".into(),
                        message: format!(
                            "this export was made from {} + {} at {} over {}; resume with the same model, SAE, hook, corpus and context",
                            saved.model.dir, saved.sae.dir, saved.hook, saved.corpus
                        ),
                    });
                }
                if !saved.complete {
                    clean_unlisted(out, &saved)?;
                }
                return Ok(saved);
            }
        }
    }
    for dir in [
        out.to_path_buf(),
        out.join(ACTIVATIONS_DIR),
        out.join(TOKENS_DIR),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    fresh.save(out)?;
    Ok(fresh)
}

/// Before resuming: removes temporary files and shards the manifest does not list (renamed
/// just before an interruption), and checks that the listed ones hold the rows it says.
fn clean_unlisted(out: &Path, manifest: &Manifest) -> Result<()> {
    let listed: std::collections::HashSet<PathBuf> = manifest
        .shards
        .iter()
        .flat_map(|s| [out.join(&s.activations.path), out.join(&s.tokens.path)])
        .collect();
    for dir in [out.join(ACTIVATIONS_DIR), out.join(TOKENS_DIR)] {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let unlisted_shard =
                name.starts_with("part-") && name.ends_with(".parquet") && !listed.contains(&path);
            if is_temporary_shard(&name) || unlisted_shard {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    for name in std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
    {
        // A features table from an interrupted finish, or a writer's temporary file.
        if name == FEATURES_FILE || (name.starts_with('.') && is_export_entry(&name)) {
            let path = out.join(&name);
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    for shard in &manifest.shards {
        for entry in [&shard.activations, &shard.tokens] {
            let path = out.join(&entry.path);
            let rows = parquet_rows(&path).map_err(|_| Error::MissingFile {
                path: path.clone(),
                what: "export shard listed in manifest.json (start again with --overwrite)",
            })?;
            if rows != entry.rows {
                return Err(parquet_error(
                    &path,
                    format!(
                        "holds {rows} rows, manifest.json says {} (start again with --overwrite)",
                        entry.rows
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Rows of a Parquet file, from its footer.
fn parquet_rows(path: &Path) -> Result<u64> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| parquet_error(path, e))?;
    Ok(builder.metadata().file_metadata().num_rows() as u64)
}
