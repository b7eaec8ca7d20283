//! The writer side of an export: coded batches → sharded Parquet tables, and the per-feature
//! table at the end.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, AsArray, Float32Array, Float64Array, ListBuilder, StringArray, StringBuilder,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, UInt32Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{
    ACTIVATIONS_DIR, ExportSettings, FEATURES_FILE, FileEntry, Manifest, Shard, TOKENS_DIR,
};
use crate::error::{Error, Result};
use crate::features::logits::logit_effects;
use crate::model::Model;
use crate::model::hooks::HookPoint;
use crate::sae::Sae;
use crate::sae::codes::CodedBatch;
use crate::table::{HashingFile, create_writer, finish_writer, parquet_error, write_table};

pub fn activations_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::UInt64, false),
        Field::new("position", DataType::UInt32, false),
        Field::new("feature", DataType::UInt32, false),
        Field::new("activation", DataType::Float32, false),
    ]))
}

pub fn tokens_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::UInt64, false),
        Field::new("position", DataType::UInt32, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new("token", DataType::Utf8, false),
    ]))
}

fn string_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

pub fn features_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("feature", DataType::UInt32, false),
        Field::new("density", DataType::Float64, false),
        Field::new("mean_activation", DataType::Float32, false),
        Field::new("max_activation", DataType::Float32, false),
        Field::new("top_logits", string_list(), false),
        Field::new("bottom_logits", string_list(), false),
    ]))
}

/// The hidden name a shard is written under until it is complete.
pub fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// One table's shard being written under its temporary name; removed on drop unless it
/// was published.
struct OpenFile {
    writer: Option<ArrowWriter<HashingFile>>,
    tmp: PathBuf,
    path: PathBuf,
    relative: String,
    rows: u64,
    sha256: String,
    published: bool,
}

impl OpenFile {
    fn create(
        out: &Path,
        dir: &str,
        index: usize,
        schema: Arc<Schema>,
        rows: usize,
    ) -> Result<Self> {
        let name = format!("part-{index:05}.parquet");
        let tmp = out.join(dir).join(temporary_name(&name));
        Ok(Self {
            writer: Some(create_writer(&tmp, schema, rows)?),
            tmp,
            path: out.join(dir).join(&name),
            relative: format!("{dir}/{name}"),
            rows: 0,
            sha256: String::new(),
            published: false,
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        match self.writer.as_mut() {
            Some(w) => w.write(batch).map_err(|e| parquet_error(&self.tmp, e)),
            None => Err(parquet_error(&self.tmp, "written after it was sealed")),
        }
    }

    /// Writes the footer and syncs the file, still under its temporary name.
    fn seal(&mut self) -> Result<()> {
        if let Some(writer) = self.writer.take() {
            self.sha256 = finish_writer(writer, &self.tmp)?.0;
        }
        Ok(())
    }

    /// Renames the sealed file to its final name.
    fn publish(&mut self) -> Result<FileEntry> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.published = true;
        Ok(FileEntry {
            path: self.relative.clone(),
            rows: self.rows,
            sha256: self.sha256.clone(),
        })
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if !self.published {
            drop(self.writer.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

struct OpenShard {
    first_doc: u64,
    activations: OpenFile,
    tokens: OpenFile,
}

/// Writes coded batches into shards and keeps the manifest in step with the complete ones.
pub struct ShardWriter<'a> {
    out: &'a Path,
    manifest: Manifest,
    settings: &'a ExportSettings,
    token_names: &'a [String],
    open: Option<OpenShard>,
    busy: Duration,
}

impl<'a> ShardWriter<'a> {
    pub fn new(
        out: &'a Path,
        manifest: Manifest,
        settings: &'a ExportSettings,
        token_names: &'a [String],
    ) -> Self {
        Self {
            out,
            manifest,
            settings,
            token_names,
            open: None,
            busy: Duration::ZERO,
        }
    }

    /// Time spent building and writing tables.
    pub fn busy(&self) -> Duration {
        self.busy
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    pub fn write(&mut self, batch: &CodedBatch) -> Result<()> {
        let started = Instant::now();
        let (activations, tokens) = self.tables(batch)?;
        if self.open.is_none() {
            let index = self.manifest.shards.len();
            let rows = self.settings.row_group_rows;
            self.open = Some(OpenShard {
                // Shards cover documents contiguously from 0, empty documents included.
                first_doc: self.manifest.shards.last().map_or(0, |s| s.end_doc),
                activations: OpenFile::create(
                    self.out,
                    ACTIVATIONS_DIR,
                    index,
                    activations_schema(),
                    rows,
                )?,
                tokens: OpenFile::create(self.out, TOKENS_DIR, index, tokens_schema(), rows)?,
            });
        }
        let open = self.open.as_mut().expect("opened above");
        open.activations.write(&activations)?;
        open.tokens.write(&tokens)?;
        let full = open.activations.rows >= self.settings.shard_rows;
        if batch.ends_document && full {
            let end_doc = batch.segments.last().map_or(0, |s| s.doc_id + 1);
            self.close_shard(end_doc)?;
        }
        self.busy += started.elapsed();
        Ok(())
    }

    /// Closes the last shard; `end_doc` documents were read in all.
    pub fn finish(&mut self, end_doc: u64) -> Result<()> {
        let started = Instant::now();
        if self.open.is_some() {
            self.close_shard(end_doc)?;
        }
        self.manifest.document_count = self.manifest.document_count.max(end_doc);
        self.manifest.save(self.out)?;
        self.busy += started.elapsed();
        Ok(())
    }

    fn close_shard(&mut self, end_doc: u64) -> Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        // Both files whole on disk before either appears under its final name.
        open.activations.seal()?;
        open.tokens.seal()?;
        let activations = open.activations.publish()?;
        let tokens = match open.tokens.publish() {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&open.activations.path);
                return Err(e);
            }
        };
        self.manifest.activation_count += activations.rows;
        self.manifest.token_count += tokens.rows;
        self.manifest.document_count = end_doc;
        self.manifest.shards.push(Shard {
            first_doc: open.first_doc,
            end_doc,
            activations,
            tokens,
        });
        self.manifest.save(self.out)
    }

    /// The activation and token rows of one batch.
    fn tables(&self, batch: &CodedBatch) -> Result<(RecordBatch, RecordBatch)> {
        let codes = &batch.codes;
        let mut doc_ids = Vec::with_capacity(codes.len());
        let mut positions = Vec::with_capacity(codes.len());
        let rows = batch.tokens();
        let mut t_doc = Vec::with_capacity(rows);
        let mut t_pos = Vec::with_capacity(rows);
        let mut t_id = Vec::with_capacity(rows);
        for (r, (doc, pos, id)) in batch.addresses().enumerate() {
            let n = codes.row_start[r + 1] - codes.row_start[r];
            doc_ids.extend(std::iter::repeat_n(doc, n));
            positions.extend(std::iter::repeat_n(pos, n));
            t_doc.push(doc);
            t_pos.push(pos);
            t_id.push(id);
        }
        let names = StringArray::from_iter_values(
            t_id.iter()
                .map(|&id| self.token_names.get(id as usize).map_or("", String::as_str)),
        );
        let activations = RecordBatch::try_new(
            activations_schema(),
            vec![
                Arc::new(UInt64Array::from(doc_ids)) as ArrayRef,
                Arc::new(UInt32Array::from(positions)),
                Arc::new(UInt32Array::from(codes.latent.clone())),
                Arc::new(Float32Array::from(codes.value.clone())),
            ],
        )
        .map_err(|e| parquet_error(self.out, e))?;
        let tokens = RecordBatch::try_new(
            tokens_schema(),
            vec![
                Arc::new(UInt64Array::from(t_doc)) as ArrayRef,
                Arc::new(UInt32Array::from(t_pos)),
                Arc::new(UInt32Array::from(t_id)),
                Arc::new(names),
            ],
        )
        .map_err(|e| parquet_error(self.out, e))?;
        Ok((activations, tokens))
    }
}

/// Per-feature firing counts, activation sums and maxima over the activation shards (read
/// back from disk, so a resumed export counts every shard exactly once).
pub fn feature_totals(out: &Path, manifest: &Manifest) -> Result<(Vec<u64>, Vec<f64>, Vec<f32>)> {
    let d_sae = manifest.sae.d_sae;
    let (mut count, mut sum, mut max) = (vec![0u64; d_sae], vec![0f64; d_sae], vec![0f32; d_sae]);
    for shard in &manifest.shards {
        let path = out.join(&shard.activations.path);
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_error(&path, e))?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [2, 3]);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(1 << 16)
            .build()
            .map_err(|e| parquet_error(&path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| parquet_error(&path, e))?;
            let (Some(features), Some(values)) = (
                batch.column(0).as_primitive_opt::<UInt32Type>(),
                batch.column(1).as_primitive_opt::<Float32Type>(),
            ) else {
                return Err(parquet_error(
                    &path,
                    "columns `feature` and `activation` must be uint32 and float32",
                ));
            };
            for (&f, &v) in features.values().iter().zip(values.values()) {
                let f = f as usize;
                if f >= d_sae {
                    return Err(parquet_error(
                        &path,
                        format!("feature {f} is out of range for d_sae {d_sae}"),
                    ));
                }
                count[f] += 1;
                sum[f] += f64::from(v);
                max[f] = max[f].max(v);
            }
        }
    }
    Ok((count, sum, max))
}

/// Writes `features.parquet`: density, mean and max activation from the shards, and the
/// direct-path logit effects of each decoder row (see [`crate::features::logits`]).
pub fn write_features(
    out: &Path,
    model: &Model,
    sae: &Sae,
    writes: HookPoint,
    manifest: &Manifest,
    logit_tokens: usize,
    token_names: &[String],
) -> Result<FileEntry> {
    let (count, sum, max) = feature_totals(out, manifest)?;
    let d_sae = count.len();
    let tokens = manifest.token_count.max(1) as f64;
    let effects = logit_effects(model, writes, &sae.w_dec, logit_tokens, token_names)?;
    let mut top = ListBuilder::new(StringBuilder::new());
    let mut bottom = ListBuilder::new(StringBuilder::new());
    for f in 0..d_sae {
        if let Some(e) = effects.as_ref().and_then(|e| e.get(f)) {
            for t in &e.top {
                top.values().append_value(&t.token);
            }
            for t in &e.bottom {
                bottom.values().append_value(&t.token);
            }
        }
        top.append(true);
        bottom.append(true);
    }
    let batch = RecordBatch::try_new(
        features_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(0..d_sae as u32)) as ArrayRef,
            Arc::new(Float64Array::from_iter_values(
                count.iter().map(|&c| c as f64 / tokens),
            )),
            Arc::new(Float32Array::from_iter_values(
                count
                    .iter()
                    .zip(&sum)
                    .map(|(&c, &s)| if c > 0 { (s / c as f64) as f32 } else { 0.0 }),
            )),
            Arc::new(Float32Array::from(max)),
            Arc::new(top.finish()) as ArrayRef,
            Arc::new(bottom.finish()),
        ],
    )
    .map_err(|e| parquet_error(out, e))?;
    let path = out.join(FEATURES_FILE);
    let sha256 = write_table(&path, features_schema(), &[batch])?;
    Ok(FileEntry {
        path: FEATURES_FILE.into(),
        rows: d_sae as u64,
        sha256,
    })
}
