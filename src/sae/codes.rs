//! SAE codes of a corpus, document by document: the stream that feature statistics, concept
//! scoring and the Parquet export read.
//!
//! Unlike training windows (packed across documents), every token here keeps an address in
//! its own document: `(doc_id, position)`, `doc_id` counting documents from the start of the
//! corpus and `position` counting the document's tokens from 0 (the BOS token that starts
//! each forward segment is not part of the document). Documents longer than one context are
//! cut into consecutive segments, each run separately.

use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

use std::path::Path;

use super::Sae;
use super::activations::Corpus;
use super::cpu::Active;
use super::sparse::SparseEncoder;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::hooks::{HookPoint, Hooks};

/// How documents become forward passes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSettings {
    /// Tokens per forward segment, BOS included.
    pub context_size: usize,
    pub prepend_bos: bool,
    /// Leave special tokens (BOS, EOS, padding, …) without codes.
    pub exclude_special: bool,
    /// Segments per forward pass.
    pub segments_per_forward: usize,
}

/// A run of one document's tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub doc_id: u64,
    /// Position of the first token in its document.
    pub start: u32,
    pub token_ids: Vec<u32>,
}

/// The codes of a batch of segments: row `r` of `codes` belongs to the `r`-th token of the
/// segments taken in order. Excluded (special) tokens have empty rows.
pub struct CodedBatch {
    pub segments: Vec<Segment>,
    pub codes: Active,
    /// The hook's activations of every row (`[tokens, d_in]`; zeros for excluded tokens)
    /// when the coder keeps them ([`DocumentCoder::keep_inputs`]); empty otherwise.
    pub inputs: Vec<f32>,
    /// Whether the batch's last segment finishes its document, so that the next batch
    /// starts a new one (where an export may cut a shard).
    pub ends_document: bool,
}

impl CodedBatch {
    pub fn tokens(&self) -> usize {
        self.codes.rows()
    }

    /// `(doc_id, position, token_id)` of every row, in row order.
    pub fn addresses(&self) -> impl Iterator<Item = (u64, u32, u32)> + '_ {
        self.segments.iter().flat_map(|s| {
            s.token_ids
                .iter()
                .enumerate()
                .map(move |(i, &id)| (s.doc_id, s.start + i as u32, id))
        })
    }
}

/// Runs a model to one hook and an SAE over tokenised documents.
pub struct DocumentCoder<'a> {
    model: &'a Model,
    encoder: &'a SparseEncoder,
    hook: HookPoint,
    settings: SegmentSettings,
    docs: Box<dyn Iterator<Item = Result<Vec<u32>>> + 'a>,
    next_doc: u64,
    /// Tokens left to read (`None`: the whole corpus).
    budget: Option<u64>,
    /// Segments cut from the current document and not yet coded.
    pending: std::collections::VecDeque<Segment>,
    bos: Option<u32>,
    pad: u32,
    special: std::collections::HashSet<u32>,
    finished: bool,
    keep_inputs: bool,
    /// Time spent in forward passes and in SAE encoding, for throughput reports.
    pub forward_time: Duration,
    pub encode_time: Duration,
}

impl<'a> DocumentCoder<'a> {
    /// `docs` yields token ids per document; the first has id `first_doc` (non-zero when
    /// resuming). Reading stops after `budget` tokens, cutting the last document short.
    pub fn new(
        model: &'a Model,
        encoder: &'a SparseEncoder,
        hook: HookPoint,
        settings: SegmentSettings,
        docs: Box<dyn Iterator<Item = Result<Vec<u32>>> + 'a>,
        first_doc: u64,
        budget: Option<u64>,
    ) -> Result<Self> {
        let body = settings
            .context_size
            .saturating_sub(usize::from(settings.prepend_bos));
        if body == 0 || settings.context_size > model.dims().context_length {
            return Err(Error::InvalidArgument {
                what: "context size",
                value: settings.context_size.to_string(),
                message: format!(
                    "must leave room for a token and fit the model's context ({})",
                    model.dims().context_length
                ),
            });
        }
        if settings.segments_per_forward == 0 {
            return Err(Error::InvalidArgument {
                what: "segments per forward pass",
                value: "0".into(),
                message: "must be positive".into(),
            });
        }
        Ok(Self {
            model,
            encoder,
            hook,
            settings,
            docs,
            next_doc: first_doc,
            budget,
            pending: Default::default(),
            bos: model.start_token(),
            pad: model.eos_token_ids.first().copied().unwrap_or(0),
            special: model.special_tokens(),
            finished: false,
            keep_inputs: false,
            forward_time: Duration::ZERO,
            encode_time: Duration::ZERO,
        })
    }

    /// Hands each batch's activations out beside its codes ([`CodedBatch::inputs`]), for
    /// what reads the hook itself (dense probes).
    pub fn keep_inputs(mut self) -> Self {
        self.keep_inputs = true;
        self
    }

    /// The id the next document will get.
    pub fn next_doc(&self) -> u64 {
        self.next_doc
    }

    /// Codes for the next batch of segments, `None` at the end of the corpus or the budget.
    pub fn next_batch(&mut self) -> Result<Option<CodedBatch>> {
        let per_forward = self.settings.segments_per_forward;
        while self.pending.len() < per_forward && !self.finished {
            self.cut_next_document()?;
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        let take = self.pending.len().min(per_forward);
        let segments: Vec<Segment> = self.pending.drain(..take).collect();
        let ends_document = self
            .pending
            .front()
            .is_none_or(|next| next.doc_id != segments[segments.len() - 1].doc_id);
        let (codes, inputs) = self.code(&segments)?;
        Ok(Some(CodedBatch {
            segments,
            codes,
            inputs,
            ends_document,
        }))
    }

    fn cut_next_document(&mut self) -> Result<()> {
        if self.budget == Some(0) {
            self.finished = true;
            return Ok(());
        }
        let Some(doc) = self.docs.next() else {
            self.finished = true;
            return Ok(());
        };
        let mut ids = doc?;
        // Tokenizers that add BOS themselves (Llama, Gemma) would otherwise get two.
        if self.settings.prepend_bos && self.bos.is_some() && ids.first() == self.bos.as_ref() {
            ids.remove(0);
        }
        if let Some(budget) = self.budget.as_mut() {
            ids.truncate(usize::try_from(*budget).unwrap_or(usize::MAX));
            *budget -= ids.len() as u64;
        }
        let doc_id = self.next_doc;
        self.next_doc += 1;
        let body = self.settings.context_size - usize::from(self.settings.prepend_bos);
        for (i, chunk) in ids.chunks(body).enumerate() {
            self.pending.push_back(Segment {
                doc_id,
                start: (i * body) as u32,
                token_ids: chunk.to_vec(),
            });
        }
        Ok(())
    }

    /// One forward pass over `segments` (right-padded), then the SAE on every kept token;
    /// with the activations of every token when they are kept.
    fn code(&mut self, segments: &[Segment]) -> Result<(Active, Vec<f32>)> {
        let started = Instant::now();
        let bos = self.settings.prepend_bos.then_some(self.bos).flatten();
        let lead = usize::from(bos.is_some());
        let width = lead
            + segments
                .iter()
                .map(|s| s.token_ids.len())
                .max()
                .unwrap_or(0);
        let mut input = Vec::with_capacity(segments.len() * width);
        for s in segments {
            input.extend(bos);
            input.extend(&s.token_ids);
            input.extend(std::iter::repeat_n(
                self.pad,
                width - lead - s.token_ids.len(),
            ));
        }
        let input = Tensor::from_vec(input, (segments.len(), width), &self.model.device)?;
        let mut hooks = Hooks::new().capture([self.hook]);
        if let Some(layer) = self.hook.layer() {
            hooks = hooks.stop_at_layer(layer + 1);
        }
        let out = self.model.forward(&input, &hooks)?;
        let acts = out
            .cache
            .require(self.hook)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let d = self.encoder.d_in();
        if acts.len() != segments.len() * width * d {
            return Err(Error::InvalidArgument {
                what: "SAE",
                value: format!("d_in {d}"),
                message: format!(
                    "the hook `{}` is {} wide",
                    self.hook,
                    acts.len() / (segments.len() * width).max(1)
                ),
            });
        }
        // Rows of kept tokens, and where each token's codes come from.
        let mut kept = Vec::new();
        let mut source_row = Vec::new();
        let mut inputs = Vec::new();
        for (si, s) in segments.iter().enumerate() {
            for (i, &id) in s.token_ids.iter().enumerate() {
                let row = &acts[(si * width + lead + i) * d..][..d];
                let excluded = self.settings.exclude_special && self.special.contains(&id);
                if self.keep_inputs {
                    match excluded {
                        true => inputs.resize(inputs.len() + d, 0.0),
                        false => inputs.extend_from_slice(row),
                    }
                }
                if excluded {
                    source_row.push(None);
                    continue;
                }
                if row.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!("activations at hook `{}`", self.hook),
                        at: format!("document {}, position {}", s.doc_id, s.start as usize + i),
                    });
                }
                source_row.push(Some(kept.len() / d));
                kept.extend_from_slice(row);
            }
        }
        let encoding = Instant::now();
        self.forward_time += encoding - started;
        let coded = self.encoder.encode(&kept);
        let mut codes = Active {
            row_start: Vec::with_capacity(source_row.len() + 1),
            latent: Vec::with_capacity(coded.len()),
            value: Vec::with_capacity(coded.len()),
        };
        codes.row_start.push(0);
        let mut pairs: Vec<(u32, f32)> = Vec::new();
        for row in source_row {
            if let Some(r) = row {
                let (latents, values) = coded.row(r);
                // Ascending latent order within a token, as the export's sort order wants.
                pairs.clear();
                pairs.extend(latents.iter().copied().zip(values.iter().copied()));
                pairs.sort_unstable_by_key(|p| p.0);
                for &(j, v) in &pairs {
                    codes.latent.push(j);
                    codes.value.push(v);
                }
            }
            codes.row_start.push(codes.latent.len());
        }
        self.encode_time += encoding.elapsed();
        Ok((codes, inputs))
    }
}

/// Tokenises a corpus's documents for a [`DocumentCoder`], skipping the first `skip`.
pub fn tokenised<'a>(
    model: &'a Model,
    docs: impl Iterator<Item = Result<String>> + 'a,
    skip: u64,
) -> Box<dyn Iterator<Item = Result<Vec<u32>>> + 'a> {
    Box::new(
        docs.skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .map(move |d| model.tokenizer.encode(&d?)),
    )
}

/// The SAE's hook exists in the model and is as wide as the SAE's input; errors name the
/// SAE's `cfg.json` or list the model's hooks.
pub fn check_sae_fits(model: &Model, hook: HookPoint, sae: &Sae, sae_dir: &Path) -> Result<()> {
    let width = model.hook_width(hook)?;
    if width != sae.d_in() {
        return Err(Error::Config {
            path: sae_dir.join("cfg.json"),
            key: "d_in".into(),
            message: format!(
                "the SAE reads {} values but `{hook}` of {} is {width} wide",
                sae.d_in(),
                model.dir.display()
            ),
        });
    }
    Ok(())
}

/// An SAE read at its hook of a model, over a corpus: what a feature store and an export are
/// made from.
pub struct CodingInput<'a> {
    pub model: &'a Model,
    pub sae: &'a Sae,
    /// The SAE's folder (its content hash goes into the outputs).
    pub sae_dir: &'a Path,
    /// The hook the SAE reads.
    pub hook: HookPoint,
    /// The hook its decoder writes, where its logit effects are read: `hook` for an SAE, the
    /// output hook for a transcoder.
    pub writes: HookPoint,
    pub corpus: &'a Corpus,
}
