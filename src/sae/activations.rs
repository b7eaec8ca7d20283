//! Where SAE training data comes from: a corpus (text, JSONL, Parquet or the bundled world
//! corpus) → token windows → hooked forward passes → rows of activations at one hook, optionally
//! kept in a sharded on-disk cache, then shuffled by a [`MixingBuffer`].
//!
//! The stream is a sequence of *chunks*, chunk `i` being the activations of forward batch `i`
//! (`windows_per_forward` windows). Everything downstream counts chunks, so a run resumes by
//! moving the chunk counter: chunks come back from the cache, or the token stream catches up
//! (tokenising only) before the next one is computed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::model::Model;
use crate::model::hooks::{HookPoint, Hooks};
use crate::world::corpus::{CorpusConfig, CorpusGenerator};
use crate::world::knowledge::{KnowledgeBase, bundled_knowledge_path};

/// A text corpus to run the model over.
#[derive(Clone, Debug, PartialEq)]
pub enum Corpus {
    /// Plain text, one document per non-empty line.
    Text(PathBuf),
    /// One JSON object per line, text under `field`.
    Jsonl { path: PathBuf, field: String },
    /// A Parquet file with a string column.
    Parquet { path: PathBuf, column: String },
    /// The bundled world corpus, regenerated from the knowledge base (epoch `e` uses seed
    /// `seed + e`, so later epochs are fresh paraphrases of the same facts).
    World { seed: u64 },
}

impl Corpus {
    /// `world`, `world:SEED`, or a path whose extension picks the reader (`.jsonl`/`.json`,
    /// `.parquet`, anything else read as text). `field` names the JSONL field / Parquet column.
    pub fn parse(spec: &str, field: &str) -> Result<Self> {
        if spec == "world" {
            return Ok(Corpus::World { seed: 0 });
        }
        if let Some(seed) = spec.strip_prefix("world:") {
            let seed = seed.parse().map_err(|_| Error::InvalidArgument {
                what: "corpus",
                value: spec.into(),
                message: "world:SEED needs an integer seed".into(),
            })?;
            return Ok(Corpus::World { seed });
        }
        let path = PathBuf::from(spec);
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "corpus (a .txt, .jsonl or .parquet file, or `world`)",
            });
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        Ok(match ext.as_str() {
            "jsonl" | "json" | "ndjson" => Corpus::Jsonl {
                path,
                field: field.into(),
            },
            "parquet" => Corpus::Parquet {
                path,
                column: field.into(),
            },
            _ => Corpus::Text(path),
        })
    }

    /// How the corpus is named in SAE metadata and cache manifests.
    pub fn describe(&self) -> String {
        match self {
            Corpus::Text(p) => p.display().to_string(),
            Corpus::Jsonl { path, field } => format!("{}#{field}", path.display()),
            Corpus::Parquet { path, column } => format!("{}#{column}", path.display()),
            Corpus::World { seed } => format!("world:{seed}"),
        }
    }

    /// What identifies this corpus's content for caches: the description, and for a file
    /// also its size and modification time, so that a file edited in place is not read back
    /// from a cache made of its old text.
    pub fn fingerprint(&self) -> Result<String> {
        let path = match self {
            Corpus::Text(p) => p,
            Corpus::Jsonl { path, .. } | Corpus::Parquet { path, .. } => path,
            Corpus::World { .. } => return Ok(self.describe()),
        };
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(format!("{}@{}-{modified}", self.describe(), meta.len()))
    }

    /// The documents of one pass over the corpus, streamed (files are never read whole).
    /// Lines that are not valid UTF-8 are skipped and counted ([`Documents::skipped_counter`]).
    pub fn documents(&self, epoch: u64) -> Result<Documents> {
        let skipped = Arc::new(AtomicU64::new(0));
        let iter: Box<dyn Iterator<Item = Result<String>> + Send> = match self {
            Corpus::Text(path) => {
                let path = path.clone();
                let counter = skipped.clone();
                Box::new(utf8_lines(&path, counter)?.filter_map(|line| match line {
                    Ok((_, text)) if text.trim().is_empty() => None,
                    other => Some(other.map(|(_, text)| text)),
                }))
            }
            Corpus::Jsonl { path, field } => {
                let path = path.clone();
                let field = field.clone();
                Box::new(
                    utf8_lines(&path, skipped.clone())?.filter_map(move |line| match line {
                        Ok((number, text)) => jsonl_text(&path, &field, number, &text),
                        Err(e) => Some(Err(e)),
                    }),
                )
            }
            Corpus::Parquet { path, column } => parquet_texts(path, column)?,
            Corpus::World { seed } => {
                let kb = KnowledgeBase::load(&bundled_knowledge_path())?;
                let config = CorpusConfig {
                    seed: seed + epoch,
                    ..CorpusConfig::default()
                };
                let docs = CorpusGenerator::new(&kb, config)?.training_documents();
                Box::new(docs.into_iter().map(|d| Ok(d.text)))
            }
        };
        Ok(Documents { iter, skipped })
    }
}

/// One pass over a corpus's documents.
pub struct Documents {
    iter: Box<dyn Iterator<Item = Result<String>> + Send>,
    skipped: Arc<AtomicU64>,
}

impl Documents {
    /// A handle on the skipped-lines count that outlives the iterator.
    pub fn skipped_counter(&self) -> Arc<AtomicU64> {
        self.skipped.clone()
    }
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        self.iter.next()
    }
}

/// The lines of a file with their 1-based numbers, without line endings; lines that are not
/// valid UTF-8 are skipped and counted in `skipped`.
fn utf8_lines(
    path: &Path,
    skipped: Arc<AtomicU64>,
) -> Result<impl Iterator<Item = Result<(usize, String)>> + Send + use<>> {
    let mut reader = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let path = path.to_path_buf();
    let mut number = 0usize;
    let mut failed = false;
    Ok(std::iter::from_fn(move || {
        loop {
            if failed {
                return None;
            }
            let mut bytes = Vec::new();
            match reader.read_until(b'\n', &mut bytes) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    failed = true;
                    return Some(Err(Error::DataFile {
                        path: path.clone(),
                        line: number + 1,
                        message: e.to_string(),
                    }));
                }
            }
            number += 1;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            match String::from_utf8(bytes) {
                Ok(text) => return Some(Ok((number, text))),
                Err(_) => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }))
}

fn jsonl_text(path: &Path, field: &str, line: usize, text: &str) -> Option<Result<String>> {
    let error = |message: String| {
        Some(Err(Error::DataFile {
            path: path.to_path_buf(),
            line,
            message,
        }))
    };
    if text.trim().is_empty() {
        return None;
    }
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return error(format!("invalid JSON: {e}")),
    };
    match value.get(field) {
        Some(serde_json::Value::String(s)) => Some(Ok(s.clone())),
        Some(_) => error(format!("field `{field}` is not a string")),
        None => error(format!("no `{field}` field")),
    }
}

fn parquet_texts(
    path: &Path,
    column: &str,
) -> Result<Box<dyn Iterator<Item = Result<String>> + Send>> {
    use arrow::array::{Array, AsArray};
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let bad = |message: String| Error::DataFile {
        path: path.to_path_buf(),
        line: 0,
        message,
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let schema = builder.parquet_schema();
    let index = (0..schema.num_columns())
        .find(|&i| schema.column(i).name() == column)
        .ok_or_else(|| {
            let names: Vec<String> = (0..schema.num_columns())
                .map(|i| schema.column(i).name().to_string())
                .collect();
            bad(format!(
                "no column `{column}` (columns: {})",
                names.join(", ")
            ))
        })?;
    let mask = ProjectionMask::leaves(schema, [index]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let path = path.to_path_buf();
    let column = column.to_string();
    Ok(Box::new(reader.flat_map(move |batch| {
        let texts: Vec<Result<String>> = match batch {
            Err(e) => vec![Err(Error::DataFile {
                path: path.clone(),
                line: 0,
                message: e.to_string(),
            })],
            Ok(batch) => {
                let col = batch.column(0);
                if let Some(a) = col.as_string_opt::<i32>() {
                    a.iter().flatten().map(|s| Ok(s.to_string())).collect()
                } else if let Some(a) = col.as_string_opt::<i64>() {
                    a.iter().flatten().map(|s| Ok(s.to_string())).collect()
                } else {
                    vec![Err(Error::DataFile {
                        path: path.clone(),
                        line: 0,
                        message: format!(
                            "column `{column}` holds {}, not strings",
                            col.data_type()
                        ),
                    })]
                }
            }
        };
        texts
    })))
}

/// How token windows are cut and which positions yield activations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSettings {
    pub context_size: usize,
    /// Start each window with the BOS token (when the model has one).
    pub prepend_bos: bool,
    /// Leave out positions holding special tokens (BOS, EOS, padding, …).
    pub exclude_special: bool,
    /// Windows per forward pass (one chunk).
    pub windows_per_forward: usize,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            context_size: 128,
            prepend_bos: true,
            exclude_special: true,
            windows_per_forward: 32,
        }
    }
}

/// Documents → fixed-length token windows, documents joined by EOS.
struct TokenWindows {
    docs: Documents,
    pending: Vec<u32>,
    /// Whether this pass produced any window.
    produced: bool,
}

/// Anything that hands out chunks of activation rows.
pub trait ChunkSource {
    /// Width of a row.
    fn d_in(&self) -> usize;
    /// The next chunk (`[rows, d_in]`, row-major); never empty.
    fn next_chunk(&mut self) -> Result<Vec<f32>>;
    /// Chunks handed out so far.
    fn chunks_read(&self) -> u64;
    /// Moves on to chunk `n` as cheaply as the source can (to resume).
    fn skip_to(&mut self, n: u64) -> Result<()>;
}

/// Rows already in memory, handed out in fixed-size chunks, cycling (tests and benchmarks).
pub struct RowsSource {
    rows: Vec<f32>,
    d_in: usize,
    chunk_rows: usize,
    chunks: u64,
}

impl RowsSource {
    pub fn new(rows: Vec<f32>, d_in: usize, chunk_rows: usize) -> Result<Self> {
        if d_in == 0 || rows.is_empty() || !rows.len().is_multiple_of(d_in) || chunk_rows == 0 {
            return Err(Error::InvalidArgument {
                what: "rows source",
                value: format!("{} values, width {d_in}", rows.len()),
                message: "needs whole, non-empty rows and a positive chunk size".into(),
            });
        }
        Ok(Self {
            rows,
            d_in,
            chunk_rows,
            chunks: 0,
        })
    }
}

impl ChunkSource for RowsSource {
    fn d_in(&self) -> usize {
        self.d_in
    }

    fn next_chunk(&mut self) -> Result<Vec<f32>> {
        let total = self.rows.len() / self.d_in;
        let start = (self.chunks as usize * self.chunk_rows) % total;
        let out = (0..self.chunk_rows)
            .flat_map(|i| {
                let r = (start + i) % total;
                self.rows[r * self.d_in..(r + 1) * self.d_in]
                    .iter()
                    .copied()
            })
            .collect();
        self.chunks += 1;
        Ok(out)
    }

    fn chunks_read(&self) -> u64 {
        self.chunks
    }

    fn skip_to(&mut self, n: u64) -> Result<()> {
        self.chunks = n;
        Ok(())
    }
}

/// Activations of one hook over a corpus, computed by the model (and cached, if asked).
pub struct ActivationSource<'m> {
    model: &'m Model,
    corpus: Corpus,
    pub hook: HookPoint,
    pub settings: WindowSettings,
    bos: Option<u32>,
    eos: Option<u32>,
    special: HashSet<u32>,
    windows: Option<TokenWindows>,
    epoch: u64,
    /// Windows taken from the token stream since the start (all epochs).
    windows_read: u64,
    chunks: u64,
    d_in: usize,
    /// Hooks read beside `hook` at the same positions, with their widths: a transcoder's
    /// target (rows `[x | y]`), or a cross-layer transcoder's other inputs and targets.
    more: Vec<(HookPoint, usize)>,
    cache: Option<DiskCache>,
}

impl<'m> ActivationSource<'m> {
    /// Resolves `hook` (an exact hook name) and measures its width with a one-token pass.
    pub fn new(
        model: &'m Model,
        corpus: Corpus,
        hook: &str,
        settings: WindowSettings,
    ) -> Result<Self> {
        let points = model.resolve_hooks(&[hook])?;
        let [hook] = points[..] else {
            return Err(Error::InvalidArgument {
                what: "hook",
                value: hook.into(),
                message: format!("names {} hook points; an SAE trains on one", points.len()),
            });
        };
        if settings.context_size < 2 || settings.context_size > model.dims().context_length {
            return Err(Error::InvalidArgument {
                what: "context size",
                value: settings.context_size.to_string(),
                message: format!(
                    "must be between 2 and the model's context ({})",
                    model.dims().context_length
                ),
            });
        }
        if settings.windows_per_forward == 0 {
            return Err(Error::InvalidArgument {
                what: "windows per forward pass",
                value: "0".into(),
                message: "must be positive".into(),
            });
        }
        let d_in = model.hook_width(hook)?;
        Ok(Self {
            model,
            corpus,
            hook,
            settings,
            bos: model.start_token(),
            eos: model.eos_token_ids.first().copied(),
            special: model.special_tokens(),
            windows: None,
            epoch: 0,
            windows_read: 0,
            chunks: 0,
            d_in,
            more: Vec::new(),
            cache: None,
        })
    }

    /// Pairs every row with the same position's activation at `hook_out` (an exact hook name
    /// later in the forward pass): rows become `[x | y]`, what a transcoder trains on. Call
    /// before [`Self::with_cache`].
    pub fn with_target(mut self, hook_out: &str) -> Result<Self> {
        let point = super::resolve_output_hook(self.model, self.hook, hook_out)?;
        if self.cache.is_some() {
            return Err(Error::InvalidArgument {
                what: "output hook",
                value: hook_out.into(),
                message: "must be set before the activation cache".into(),
            });
        }
        let width = self.model.hook_width(point)?;
        self.more = vec![(point, width)];
        Ok(self)
    }

    /// Reads `hooks` beside the first hook at the same positions: rows become the
    /// concatenation of every hook's value in that order (a cross-layer transcoder reads every
    /// layer's input and target at once). Call before [`Self::with_cache`].
    pub fn with_columns(mut self, hooks: &[HookPoint]) -> Result<Self> {
        if self.cache.is_some() {
            return Err(Error::InvalidArgument {
                what: "hooks read",
                value: hooks
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                message: "must be set before the activation cache".into(),
            });
        }
        self.more = hooks
            .iter()
            .map(|&h| Ok((h, self.model.hook_width(h)?)))
            .collect::<Result<_>>()?;
        Ok(self)
    }

    /// Width of the hook read (without a transcoder's target).
    pub fn hook_width(&self) -> usize {
        self.d_in
    }

    /// A transcoder's target hook and its width (`None` unless exactly one hook is read beside
    /// the first).
    pub fn target(&self) -> Option<(HookPoint, usize)> {
        match self.more[..] {
            [target] => Some(target),
            _ => None,
        }
    }

    /// The hooks read, as named in caches and errors: `hook`, `hook -> hook_out`, or every
    /// hook of a cross-layer transcoder's rows.
    fn hooks_read(&self) -> String {
        match &self.more[..] {
            [] => self.hook.to_string(),
            [(out, _)] => format!("{} -> {out}", self.hook),
            more => std::iter::once(self.hook)
                .chain(more.iter().map(|&(h, _)| h))
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Whether positions holding `id` are left out.
    pub fn is_excluded(&self, id: u32) -> bool {
        self.settings.exclude_special && self.special.contains(&id)
    }

    /// The next `n` windows' token ids, `n × context_size` of them (for evaluation).
    pub fn next_windows(&mut self, n: usize) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(n * self.settings.context_size);
        for _ in 0..n {
            ids.extend(self.next_window()?);
        }
        Ok(ids)
    }

    /// The next `n` windows for an evaluation on `model`'s device: their ids, as a `[n,
    /// context]` tensor, and a `[n, context, 1]` f32 mask of the positions kept (1) and left out
    /// as special tokens (0).
    pub fn next_window_batch(&mut self, n: usize) -> Result<(Tensor, Tensor)> {
        let ids = self.next_windows(n)?;
        let ctx = self.settings.context_size;
        let device = &self.model.device;
        let keep: Vec<f32> = ids
            .iter()
            .map(|&id| f32::from(u8::from(!self.is_excluded(id))))
            .collect();
        Ok((
            Tensor::from_vec(ids, (n, ctx), device)?,
            Tensor::from_vec(keep, (n, ctx, 1), device)?,
        ))
    }

    /// Keeps every chunk in (and reads chunks back from) a sharded cache in `dir`.
    pub fn with_cache(mut self, dir: &Path, dtype: DType) -> Result<Self> {
        // Contents, not paths: a model rebuilt or a corpus edited in place must not be read
        // back from the old activations, and the same model under another path may be.
        let manifest = CacheManifest {
            format: 2,
            model: self.model.content_hash()?,
            hook: self.hooks_read(),
            corpus: self.corpus.fingerprint()?,
            window: self.settings.clone(),
            d_in: self.row_width(),
            dtype: format!("{dtype:?}").to_lowercase(),
            shards: Vec::new(),
        };
        self.cache = Some(DiskCache::open(dir, manifest, dtype)?);
        Ok(self)
    }

    /// Advances the token stream to the first window of chunk `index`. The stream lags
    /// behind the chunk counter after a resume or after chunks read from the cache; catching
    /// up only tokenises.
    fn seek_windows(&mut self, index: u64) -> Result<()> {
        let target = index * self.settings.windows_per_forward as u64;
        while self.windows_read < target {
            self.next_window()?;
        }
        Ok(())
    }

    fn next_window(&mut self) -> Result<Vec<u32>> {
        let ctx = self.settings.context_size;
        let bos = self.settings.prepend_bos.then_some(self.bos).flatten();
        let body = ctx - usize::from(bos.is_some());
        loop {
            if self.windows.is_none() {
                self.windows = Some(TokenWindows {
                    docs: self.corpus.documents(self.epoch)?,
                    pending: Vec::new(),
                    produced: false,
                });
            }
            let w = self.windows.as_mut().expect("set above");
            if w.pending.len() >= body {
                self.windows_read += 1;
                let mut window = Vec::with_capacity(ctx);
                window.extend(bos);
                window.extend(w.pending.drain(..body));
                w.produced = true;
                return Ok(window);
            }
            match w.docs.next() {
                Some(doc) => {
                    let mut ids = self.model.tokenizer.encode(&doc?)?;
                    ids.extend(self.eos);
                    w.pending.extend(ids);
                }
                None => {
                    if !w.produced {
                        return Err(Error::InvalidArgument {
                            what: "corpus",
                            value: self.corpus.describe(),
                            message: format!(
                                "holds fewer than {body} tokens: not one window of context {ctx}"
                            ),
                        });
                    }
                    // Next pass (the remainder shorter than a window is dropped).
                    self.epoch += 1;
                    self.windows = None;
                }
            }
        }
    }

    /// Runs the model over one batch of windows and keeps the hook's rows at non-special
    /// positions.
    fn compute_chunk(&mut self) -> Result<Vec<f32>> {
        let n = self.settings.windows_per_forward;
        let ctx = self.settings.context_size;
        let ids = self.next_windows(n)?;
        let input = Tensor::from_vec(ids.clone(), (n, ctx), &self.model.device)?;
        let points: Vec<HookPoint> = std::iter::once(self.hook)
            .chain(self.more.iter().map(|&(p, _)| p))
            .collect();
        let mut hooks = Hooks::new().capture(points.iter().copied());
        // Stop after the last block read, unless a hook after every block is read.
        let layers: Option<Vec<usize>> = points.iter().map(|p| p.layer()).collect();
        if let Some(last) = layers.and_then(|l| l.into_iter().max()) {
            hooks = hooks.stop_at_layer(last + 1);
        }
        let out = self.model.forward(&input, &hooks)?;
        let values = |point: HookPoint| -> Result<Vec<f32>> {
            Ok(out
                .cache
                .require(point)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_device(&Device::Cpu)?
                .to_vec1::<f32>()?)
        };
        let widths: Vec<usize> = std::iter::once(self.d_in)
            .chain(self.more.iter().map(|&(_, w)| w))
            .collect();
        let columns = points
            .iter()
            .map(|&p| values(p))
            .collect::<Result<Vec<_>>>()?;
        let mut rows = Vec::with_capacity(columns.iter().map(Vec::len).sum());
        for (t, &id) in ids.iter().enumerate() {
            if self.is_excluded(id) {
                continue;
            }
            let start = rows.len();
            for (column, &w) in columns.iter().zip(&widths) {
                rows.extend_from_slice(&column[t * w..(t + 1) * w]);
            }
            if rows[start..].iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite {
                    what: format!("activations at hook `{}`", self.hooks_read()),
                    at: format!(
                        "forward batch {} (window {}, position {})",
                        self.chunks,
                        t / ctx,
                        t % ctx
                    ),
                });
            }
        }
        Ok(rows)
    }
}

impl ActivationSource<'_> {
    /// Width of a row: the hook's, plus those of the hooks read beside it.
    fn row_width(&self) -> usize {
        self.d_in + self.more.iter().map(|&(_, w)| w).sum::<usize>()
    }
}

impl ChunkSource for ActivationSource<'_> {
    fn d_in(&self) -> usize {
        self.row_width()
    }

    fn next_chunk(&mut self) -> Result<Vec<f32>> {
        loop {
            let index = self.chunks;
            let cached = self.cache.as_mut().map(|c| c.read(index)).transpose()?;
            let rows = match cached.flatten() {
                Some(rows) => rows,
                None => {
                    self.seek_windows(index)?;
                    let rows = self.compute_chunk()?;
                    let width = self.row_width();
                    if let Some(cache) = self.cache.as_mut() {
                        cache.append(index, &rows, width)?;
                    }
                    rows
                }
            };
            self.chunks += 1;
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
    }

    fn chunks_read(&self) -> u64 {
        self.chunks
    }

    /// Lazy: the token stream catches up when the next chunk is computed.
    fn skip_to(&mut self, n: u64) -> Result<()> {
        self.chunks = n;
        Ok(())
    }
}

/// The cache's description; a cache is reused only when everything but `shards` matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheManifest {
    pub format: u32,
    /// The model folder's content hash.
    pub model: String,
    pub hook: String,
    pub corpus: String,
    pub window: WindowSettings,
    pub d_in: usize,
    pub dtype: String,
    /// One file per chunk, in order.
    pub shards: Vec<CacheShard>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheShard {
    pub file: String,
    pub rows: usize,
}

const MANIFEST: &str = "manifest.json";

/// Chunks of activations on disk, one safetensors file per chunk, in a storage dtype.
struct DiskCache {
    dir: PathBuf,
    manifest: CacheManifest,
    dtype: DType,
}

impl DiskCache {
    fn open(dir: &Path, wanted: CacheManifest, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidArgument {
                what: "activation cache dtype",
                value: format!("{dtype:?}"),
                message: "use f32, f16 or bf16".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(MANIFEST);
        let manifest = if path.is_file() {
            let found: CacheManifest = read_json(&path)?;
            let same = CacheManifest {
                shards: Vec::new(),
                ..found.clone()
            };
            if same != wanted {
                return Err(Error::InvalidArgument {
                    what: "activation cache",
                    value: path.display().to_string(),
                    message: "was made for another model, hook, corpus, window or dtype; \
                              use a new cache folder"
                        .into(),
                });
            }
            found
        } else {
            wanted
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            dtype,
        })
    }

    fn read(&mut self, index: u64) -> Result<Option<Vec<f32>>> {
        let Some(shard) = self.manifest.shards.get(index as usize) else {
            return Ok(None);
        };
        let path = self.dir.join(&shard.file);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            Error::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
        let t = tensors
            .get("activations")
            .ok_or_else(|| Error::MissingTensor {
                dir: path.clone(),
                key: "activations".into(),
            })?;
        if t.dims() != [shard.rows, self.manifest.d_in] {
            return Err(Error::TensorShape {
                path,
                key: "activations".into(),
                expected: vec![shard.rows, self.manifest.d_in],
                actual: t.dims().to_vec(),
            });
        }
        Ok(Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
    }

    fn append(&mut self, index: u64, rows: &[f32], d_in: usize) -> Result<()> {
        if index as usize != self.manifest.shards.len() {
            return Ok(()); // Only extend the cache at its end.
        }
        let n = rows.len() / d_in;
        let file = format!("chunk-{index:07}.safetensors");
        let tensor = Tensor::from_slice(rows, (n, d_in), &Device::Cpu)?.to_dtype(self.dtype)?;
        let path = self.dir.join(&file);
        write_atomic(&path, |tmp| {
            candle_core::safetensors::save(
                &std::collections::HashMap::from([("activations".to_string(), tensor)]),
                tmp,
            )?;
            Ok(())
        })?;
        self.manifest.shards.push(CacheShard { file, rows: n });
        let json = serde_json::to_string_pretty(&self.manifest).map_err(|source| Error::Json {
            path: self.dir.join(MANIFEST),
            source,
        })?;
        write_atomic(&self.dir.join(MANIFEST), |tmp| {
            std::fs::write(tmp, json).map_err(|e| Error::io(tmp, e))
        })
    }
}

/// A shuffling buffer: holds up to `capacity` rows; batches come from the first half of a
/// shuffled fill, and that half is refilled from the source before the next shuffle, so rows
/// from many forward passes (and documents) mix in every batch. Memory: `capacity` rows plus
/// one chunk.
pub struct MixingBuffer {
    d_in: usize,
    capacity: usize,
    seed: u64,
    data: Vec<f32>,
    /// Rows already handed out from the front of `data`.
    used: usize,
    refills: u64,
}

impl MixingBuffer {
    /// Values per row.
    pub fn width(&self) -> usize {
        self.d_in
    }

    pub fn new(d_in: usize, capacity: usize, seed: u64) -> Self {
        Self {
            d_in,
            capacity,
            seed,
            data: Vec::new(),
            used: 0,
            refills: 0,
        }
    }

    /// The next `batch` rows.
    pub fn next_batch(&mut self, source: &mut dyn ChunkSource, batch: usize) -> Result<&[f32]> {
        if batch == 0 || batch * 2 > self.capacity {
            return Err(Error::InvalidArgument {
                what: "batch size",
                value: batch.to_string(),
                message: format!(
                    "must be positive and at most half the mixing buffer ({} rows)",
                    self.capacity
                ),
            });
        }
        if self.used + batch > self.capacity / 2
            || (self.used + batch) * self.d_in > self.data.len()
        {
            self.refill(source)?;
        }
        let d = self.d_in;
        let out = &self.data[self.used * d..(self.used + batch) * d];
        self.used += batch;
        Ok(out)
    }

    fn refill(&mut self, source: &mut dyn ChunkSource) -> Result<()> {
        let d = self.d_in;
        self.data.drain(..self.used * d);
        self.used = 0;
        while self.data.len() / d < self.capacity {
            self.data.extend(source.next_chunk()?);
        }
        let rows = self.data.len() / d;
        let mut order: Vec<usize> = (0..rows).collect();
        let mut rng = StdRng::seed_from_u64(self.seed ^ self.refills.wrapping_mul(0x9E37_79B9));
        order.shuffle(&mut rng);
        let mut shuffled = Vec::with_capacity(self.data.len());
        for i in order {
            shuffled.extend_from_slice(&self.data[i * d..(i + 1) * d]);
        }
        self.data = shuffled;
        self.refills += 1;
        Ok(())
    }

    /// Fills the buffer if it is empty (to measure the data before training).
    pub fn fill(&mut self, source: &mut dyn ChunkSource) -> Result<()> {
        if self.data.is_empty() {
            self.refill(source)?;
        }
        Ok(())
    }

    /// Everything a checkpoint needs: the rows held, how many of them were handed out, and
    /// the refill count.
    pub fn state(&self) -> (&[f32], usize, u64) {
        (&self.data, self.used, self.refills)
    }

    pub fn restore(&mut self, data: Vec<f32>, used: usize, refills: u64) {
        self.data = data;
        self.used = used;
        self.refills = refills;
    }

    /// Rows not yet handed out.
    pub fn unread(&self) -> &[f32] {
        &self.data[self.used * self.d_in..]
    }

    /// Mean Euclidean norm of the rows currently held (for normalisation).
    /// Mean norm over the held rows of the values in `columns` (a transcoder's input or its
    /// target part of each row).
    pub fn mean_norm(&self, columns: std::ops::Range<usize>) -> f64 {
        let rows = self.data.len() / self.d_in.max(1);
        if rows == 0 {
            return 0.0;
        }
        self.data
            .chunks_exact(self.d_in)
            .map(|r| &r[columns.clone()])
            .map(|r| f64::from(super::cpu::dot(r, r)).sqrt())
            .sum::<f64>()
            / rows as f64
    }
}
