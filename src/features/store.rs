//! The feature store: what `monoscope features build` writes and the GUI opens.
//!
//! ```text
//! FEAT_DIR/features.json      what it was built from, and the settings
//! FEAT_DIR/features.parquet   one row per feature: counts, density, mean/max, histogram,
//!                             top/bottom logit tokens with values, decoder neighbours
//! FEAT_DIR/contexts.parquet   one row per stored context, sorted by feature: kind ("top" or
//!                             "interval" with its [low, high) bounds), rank, activation,
//!                             doc_id, position, peak, token ids, token strings and the
//!                             feature's activation on each token
//! ```
//! Both tables are small (bounded by the number of features), so the whole store is read
//! into memory at once.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Float32Builder, Float64Array, ListArray, ListBuilder,
    StringArray, StringBuilder, UInt32Array, UInt32Builder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::logits::{LogitEffects, Neighbours};
use super::stats::{FeatureSummary, StatsSettings};
use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::table::{parquet_error, read_table, write_table};

pub const INFO_FILE: &str = "features.json";
pub const FEATURES_FILE: &str = "features.parquet";
pub const CONTEXTS_FILE: &str = "contexts.parquet";

/// `features.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreInfo {
    pub schema_version: u32,
    pub model_dir: String,
    pub model_hash: String,
    pub sae_dir: String,
    pub sae_hash: String,
    pub hook: String,
    pub corpus: String,
    pub documents: u64,
    pub tokens: u64,
    pub d_sae: usize,
    pub settings: StatsSettings,
    /// How logit effects were computed (see [`super::logits`]); empty if they were not.
    pub logit_effects: String,
}

/// One stored context of a feature.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredContext {
    /// `None` for a top context, the interval's `[low, high)` for an interval sample.
    pub interval: Option<(f32, f32)>,
    pub activation: f32,
    pub doc_id: u64,
    pub position: u32,
    pub peak: u32,
    pub token_ids: Vec<u32>,
    pub tokens: Vec<String>,
    pub token_activations: Vec<f32>,
}

/// Everything stored about one feature.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredFeature {
    pub feature: u32,
    pub fire_count: u64,
    pub density: f64,
    pub mean_activation: f32,
    pub max_activation: f32,
    pub histogram_bin_width: f32,
    pub histogram: Vec<u64>,
    pub top_logits: Vec<(String, f32)>,
    pub bottom_logits: Vec<(String, f32)>,
    pub neighbours: Vec<(u32, f32)>,
    /// Top contexts (highest first), then interval samples (highest interval first).
    pub contexts: Vec<StoredContext>,
}

/// A feature store in memory.
pub struct FeatureStore {
    pub info: StoreInfo,
    pub features: Vec<StoredFeature>,
}

fn list(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

fn features_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("feature", DataType::UInt32, false),
        Field::new("fire_count", DataType::UInt64, false),
        Field::new("density", DataType::Float64, false),
        Field::new("mean_activation", DataType::Float32, false),
        Field::new("max_activation", DataType::Float32, false),
        Field::new("histogram_bin_width", DataType::Float32, false),
        Field::new("histogram", list(DataType::UInt64), false),
        Field::new("top_logits", list(DataType::Utf8), false),
        Field::new("top_logit_values", list(DataType::Float32), false),
        Field::new("bottom_logits", list(DataType::Utf8), false),
        Field::new("bottom_logit_values", list(DataType::Float32), false),
        Field::new("neighbours", list(DataType::UInt32), false),
        Field::new("neighbour_cosines", list(DataType::Float32), false),
    ]))
}

fn contexts_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("feature", DataType::UInt32, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("interval_low", DataType::Float32, true),
        Field::new("interval_high", DataType::Float32, true),
        Field::new("rank", DataType::UInt32, false),
        Field::new("activation", DataType::Float32, false),
        Field::new("doc_id", DataType::UInt64, false),
        Field::new("position", DataType::UInt32, false),
        Field::new("peak", DataType::UInt32, false),
        Field::new("token_ids", list(DataType::UInt32), false),
        Field::new("tokens", list(DataType::Utf8), false),
        Field::new("token_activations", list(DataType::Float32), false),
    ]))
}

/// Writes the store into `dir` (which must exist); each file appears whole or not at all.
pub fn write(
    dir: &Path,
    info: &StoreInfo,
    summaries: &[FeatureSummary],
    effects: Option<&[LogitEffects]>,
    neighbours: &[Neighbours],
    token_names: &[String],
) -> Result<()> {
    let name = |id: u32| token_names.get(id as usize).cloned().unwrap_or_default();
    // features.parquet
    let mut histogram = ListBuilder::new(UInt64Builder::new());
    let mut top = ListBuilder::new(StringBuilder::new());
    let mut top_v = ListBuilder::new(Float32Builder::new());
    let mut bottom = ListBuilder::new(StringBuilder::new());
    let mut bottom_v = ListBuilder::new(Float32Builder::new());
    let mut nb = ListBuilder::new(UInt32Builder::new());
    let mut nb_cos = ListBuilder::new(Float32Builder::new());
    for (i, s) in summaries.iter().enumerate() {
        histogram.values().append_slice(&s.histogram);
        histogram.append(true);
        let e = effects.and_then(|e| e.get(i));
        for (names, values, list) in [
            (&mut top, &mut top_v, e.map(|e| &e.top)),
            (&mut bottom, &mut bottom_v, e.map(|e| &e.bottom)),
        ] {
            for t in list.into_iter().flatten() {
                names.values().append_value(&t.token);
                values.values().append_value(t.logit);
            }
            names.append(true);
            values.append(true);
        }
        if let Some(n) = neighbours.get(i) {
            nb.values().append_slice(&n.features);
            nb_cos.values().append_slice(&n.cosines);
        }
        nb.append(true);
        nb_cos.append(true);
    }
    let features = RecordBatch::try_new(
        features_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(
                summaries.iter().map(|s| s.feature),
            )) as ArrayRef,
            Arc::new(UInt64Array::from_iter_values(
                summaries.iter().map(|s| s.fire_count),
            )),
            Arc::new(Float64Array::from_iter_values(
                summaries.iter().map(|s| s.density),
            )),
            Arc::new(Float32Array::from_iter_values(
                summaries.iter().map(|s| s.mean_activation),
            )),
            Arc::new(Float32Array::from_iter_values(
                summaries.iter().map(|s| s.max_activation),
            )),
            Arc::new(Float32Array::from_iter_values(
                summaries.iter().map(|s| s.histogram_bin_width),
            )),
            Arc::new(histogram.finish()),
            Arc::new(top.finish()),
            Arc::new(top_v.finish()),
            Arc::new(bottom.finish()),
            Arc::new(bottom_v.finish()),
            Arc::new(nb.finish()),
            Arc::new(nb_cos.finish()),
        ],
    )
    .map_err(|e| parquet_error(dir, e))?;

    // contexts.parquet
    let mut c_feature = Vec::new();
    let mut c_kind = Vec::new();
    let mut c_low = Vec::new();
    let mut c_high = Vec::new();
    let mut c_rank = Vec::new();
    let mut c_act = Vec::new();
    let mut c_doc = Vec::new();
    let mut c_pos = Vec::new();
    let mut c_peak = Vec::new();
    let mut c_ids = ListBuilder::new(UInt32Builder::new());
    let mut c_tokens = ListBuilder::new(StringBuilder::new());
    let mut c_acts = ListBuilder::new(Float32Builder::new());
    for s in summaries {
        let tops = s.top.iter().map(|c| (None, c));
        let samples = s.intervals.iter().flat_map(|iv| {
            iv.contexts
                .iter()
                .map(move |c| (Some((iv.low, iv.high)), c))
        });
        let mut rank = 0u32;
        let mut last_interval = None;
        for (interval, c) in tops.chain(samples) {
            if interval != last_interval {
                rank = 0;
                last_interval = interval;
            }
            c_feature.push(s.feature);
            c_kind.push(if interval.is_some() {
                "interval"
            } else {
                "top"
            });
            c_low.push(interval.map(|i| i.0));
            c_high.push(interval.map(|i| i.1));
            c_rank.push(rank);
            rank += 1;
            c_act.push(c.activation);
            c_doc.push(c.doc_id);
            c_pos.push(c.position);
            c_peak.push(c.peak);
            c_ids.values().append_slice(&c.token_ids);
            c_ids.append(true);
            for &id in &c.token_ids {
                c_tokens.values().append_value(name(id));
            }
            c_tokens.append(true);
            c_acts.values().append_slice(&c.token_activations);
            c_acts.append(true);
        }
    }
    let contexts = RecordBatch::try_new(
        contexts_schema(),
        vec![
            Arc::new(UInt32Array::from(c_feature)) as ArrayRef,
            Arc::new(StringArray::from(c_kind)),
            Arc::new(Float32Array::from(c_low)),
            Arc::new(Float32Array::from(c_high)),
            Arc::new(UInt32Array::from(c_rank)),
            Arc::new(Float32Array::from(c_act)),
            Arc::new(UInt64Array::from(c_doc)),
            Arc::new(UInt32Array::from(c_pos)),
            Arc::new(UInt32Array::from(c_peak)),
            Arc::new(c_ids.finish()),
            Arc::new(c_tokens.finish()),
            Arc::new(c_acts.finish()),
        ],
    )
    .map_err(|e| parquet_error(dir, e))?;

    // `features.json` marks a complete store: it goes first and comes back last, so a write
    // that fails midway (replacing an old store) leaves no old/new mix that opens.
    let info_path = dir.join(INFO_FILE);
    match std::fs::remove_file(&info_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&info_path, e)),
        _ => {}
    }
    write_table(&dir.join(FEATURES_FILE), features_schema(), &[features])?;
    write_table(&dir.join(CONTEXTS_FILE), contexts_schema(), &[contexts])?;
    let json = serde_json::to_string_pretty(info).map_err(|source| Error::Json {
        path: info_path.clone(),
        source,
    })?;
    write_atomic(&info_path, |tmp| {
        std::fs::write(tmp, json).map_err(|e| Error::io(tmp, e))
    })
}

/// Typed access to the columns of one record batch, with errors naming the file and column.
struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a Path,
}

impl<'a> Columns<'a> {
    fn get(&self, name: &str) -> Result<&'a ArrayRef> {
        self.batch
            .column_by_name(name)
            .ok_or_else(|| parquet_error(self.path, format!("no column `{name}`")))
    }

    fn typed<T: 'static>(&self, name: &str) -> Result<&'a T> {
        self.get(name)?
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| parquet_error(self.path, format!("column `{name}` has the wrong type")))
    }

    fn list(&self, name: &str) -> Result<&'a ListArray> {
        self.typed::<ListArray>(name)
    }
}

/// Row `row` of a list-of-primitive column.
fn list_values<T: arrow::datatypes::ArrowPrimitiveType>(
    list: &ListArray,
    row: usize,
    path: &Path,
) -> Result<Vec<T::Native>> {
    let values = list.value(row);
    let typed = values
        .as_primitive_opt::<T>()
        .ok_or_else(|| parquet_error(path, format!("row {row}: a list holds the wrong type")))?;
    Ok(typed.values().to_vec())
}

/// Row `row` of a list-of-strings column.
fn list_strings(list: &ListArray, row: usize, path: &Path) -> Result<Vec<String>> {
    let values = list.value(row);
    let s = values
        .as_string_opt::<i32>()
        .ok_or_else(|| parquet_error(path, format!("row {row}: a list holds no strings")))?;
    Ok((0..s.len()).map(|i| s.value(i).to_string()).collect())
}

/// Reads a store written by [`write`].
pub fn open(dir: &Path) -> Result<FeatureStore> {
    let info_path = dir.join(INFO_FILE);
    if !info_path.is_file() {
        return Err(Error::MissingFile {
            path: info_path,
            what: "feature store (made by `monoscope features build`)",
        });
    }
    let info: StoreInfo = read_json(&info_path)?;
    let path = dir.join(FEATURES_FILE);
    // Capped: `d_sae` comes from a file, and the table's rows are what count.
    let mut features = Vec::with_capacity(info.d_sae.min(1 << 20));
    for batch in read_table(&path)? {
        let c = Columns {
            batch: &batch,
            path: &path,
        };
        let feature = c.typed::<UInt32Array>("feature")?;
        let fire = c.typed::<UInt64Array>("fire_count")?;
        let density = c.typed::<Float64Array>("density")?;
        let mean = c.typed::<Float32Array>("mean_activation")?;
        let max = c.typed::<Float32Array>("max_activation")?;
        let width = c.typed::<Float32Array>("histogram_bin_width")?;
        let hist = c.list("histogram")?;
        let (top, top_v) = (c.list("top_logits")?, c.list("top_logit_values")?);
        let (bottom, bottom_v) = (c.list("bottom_logits")?, c.list("bottom_logit_values")?);
        let (nb, nb_cos) = (c.list("neighbours")?, c.list("neighbour_cosines")?);
        for r in 0..batch.num_rows() {
            let pairs = |names: &ListArray, values: &ListArray| -> Result<Vec<(String, f32)>> {
                Ok(list_strings(names, r, &path)?
                    .into_iter()
                    .zip(list_values::<Float32Type>(values, r, &path)?)
                    .collect())
            };
            features.push(StoredFeature {
                feature: feature.value(r),
                fire_count: fire.value(r),
                density: density.value(r),
                mean_activation: mean.value(r),
                max_activation: max.value(r),
                histogram_bin_width: width.value(r),
                histogram: list_values::<UInt64Type>(hist, r, &path)?,
                top_logits: pairs(top, top_v)?,
                bottom_logits: pairs(bottom, bottom_v)?,
                neighbours: list_values::<UInt32Type>(nb, r, &path)?
                    .into_iter()
                    .zip(list_values::<Float32Type>(nb_cos, r, &path)?)
                    .collect(),
                contexts: Vec::new(),
            });
        }
    }
    if features.len() != info.d_sae
        || features
            .iter()
            .enumerate()
            .any(|(i, f)| f.feature as usize != i)
    {
        return Err(parquet_error(
            &path,
            format!("expected features 0..{} in order", info.d_sae),
        ));
    }
    let path = dir.join(CONTEXTS_FILE);
    for batch in read_table(&path)? {
        let c = Columns {
            batch: &batch,
            path: &path,
        };
        let feature = c.typed::<UInt32Array>("feature")?;
        let low = c.typed::<Float32Array>("interval_low")?;
        let high = c.typed::<Float32Array>("interval_high")?;
        let act = c.typed::<Float32Array>("activation")?;
        let doc = c.typed::<UInt64Array>("doc_id")?;
        let pos = c.typed::<UInt32Array>("position")?;
        let peak = c.typed::<UInt32Array>("peak")?;
        let (ids, tokens, acts) = (
            c.list("token_ids")?,
            c.list("tokens")?,
            c.list("token_activations")?,
        );
        for r in 0..batch.num_rows() {
            let f = feature.value(r) as usize;
            let target = features.get_mut(f).ok_or_else(|| {
                parquet_error(&path, format!("row {r}: feature {f} is out of range"))
            })?;
            target.contexts.push(StoredContext {
                interval: (!low.is_null(r)).then(|| (low.value(r), high.value(r))),
                activation: act.value(r),
                doc_id: doc.value(r),
                position: pos.value(r),
                peak: peak.value(r),
                token_ids: list_values::<UInt32Type>(ids, r, &path)?,
                tokens: list_strings(tokens, r, &path)?,
                token_activations: list_values::<Float32Type>(acts, r, &path)?,
            });
        }
    }
    Ok(FeatureStore { info, features })
}
