//! Writing and reading Parquet tables, and hashing files: what the export and the feature
//! store share.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Rows per row group: about a million, so readers can skip and parallelise.
pub const ROW_GROUP_ROWS: usize = 1 << 20;

/// A file that hashes (SHA-256) and counts what is written through it.
pub struct HashingFile {
    file: File,
    hasher: Sha256,
    bytes: u64,
}

impl HashingFile {
    pub fn create(path: &Path) -> Result<Self> {
        Ok(Self {
            file: File::create(path).map_err(|e| Error::io(path, e))?,
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Flushes to disk and returns the lowercase hex digest and the size.
    pub fn finish(self, path: &Path) -> Result<(String, u64)> {
        self.file.sync_all().map_err(|e| Error::io(path, e))?;
        Ok((hex(&self.hasher.finalize()), self.bytes))
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// ZSTD (level 1: the writer must keep up with millions of rows a second), no dictionaries
/// (feature ids and activations do not repeat enough to pay for them).
pub fn writer_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(row_group_rows))
        .build()
}

pub fn parquet_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A Parquet writer over a hashing file at `path`.
pub fn create_writer(
    path: &Path,
    schema: Arc<Schema>,
    row_group_rows: usize,
) -> Result<ArrowWriter<HashingFile>> {
    ArrowWriter::try_new(
        HashingFile::create(path)?,
        schema,
        Some(writer_properties(row_group_rows)),
    )
    .map_err(|e| parquet_error(path, e))
}

/// Closes a writer: footer written, file synced; returns (sha256, bytes).
pub fn finish_writer(writer: ArrowWriter<HashingFile>, path: &Path) -> Result<(String, u64)> {
    let file = writer.into_inner().map_err(|e| parquet_error(path, e))?;
    file.finish(path)
}

/// Writes `batches` to a new Parquet file at `path` (through a temporary name).
pub fn write_table(path: &Path, schema: Arc<Schema>, batches: &[RecordBatch]) -> Result<String> {
    let mut digest = String::new();
    crate::files::write_atomic(path, |tmp| {
        let mut writer = create_writer(tmp, schema, ROW_GROUP_ROWS)?;
        for b in batches {
            writer.write(b).map_err(|e| parquet_error(tmp, e))?;
        }
        digest = finish_writer(writer, tmp)?.0;
        Ok(())
    })?;
    Ok(digest)
}

/// Every record batch of a Parquet file.
pub fn read_table(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| parquet_error(path, e))?
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| parquet_error(path, e))?;
    reader
        .map(|b| b.map_err(|e| parquet_error(path, e)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// `sha256:<hex>` over the named files of a folder that exist (each file hashed in
/// parallel, then the list of `name hash` lines hashed): identifies a model or an SAE by
/// content, wherever it was copied.
pub fn content_hash(dir: &Path, names: &[&str]) -> Result<String> {
    let mut files: Vec<PathBuf> = Vec::new();
    for name in names {
        if name.contains('*') {
            // The folder's own name may hold glob syntax ("gpt2 [ft]"): escape it.
            let pattern = Path::new(&glob::Pattern::escape(&dir.to_string_lossy())).join(name);
            let matches = glob::glob(&pattern.to_string_lossy())
                .map_err(|e| Error::io(dir, std::io::Error::other(e.to_string())))?;
            files.extend(matches.filter_map(std::result::Result::ok));
        } else if dir.join(name).is_file() {
            files.push(dir.join(name));
        }
    }
    files.sort();
    files.dedup();
    let digests: Vec<String> = files
        .par_iter()
        .map(|p| sha256_file(p))
        .collect::<Result<_>>()?;
    let mut hasher = Sha256::new();
    for (p, d) in files.iter().zip(&digests) {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        hasher.update(format!("{name} {d}\n").as_bytes());
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}

/// What identifies a model folder's content.
pub fn model_hash(dir: &Path) -> Result<String> {
    content_hash(
        dir,
        &[
            "config.json",
            "tokenizer.json",
            "*.safetensors",
            "*.safetensors.index.json",
        ],
    )
}

/// What identifies an SAE folder's content, in any format monoscope reads (SAELens's,
/// sparsify's, Gemma Scope's, Gemma Scope 2's and dictionary_learning's weight and config
/// files): caches of an SAE's
/// statistics and scores are named by it.
pub fn sae_hash(dir: &Path) -> Result<String> {
    content_hash(
        dir,
        &[
            "cfg.json",
            "sae_weights.safetensors",
            "sae.safetensors",
            "params.npz",
            "params.safetensors",
            "ae.pt",
            "config.json",
        ],
    )
}
