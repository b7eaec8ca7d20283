//! What SAE features mean: per-feature statistics and contexts over a corpus ([`stats`]),
//! logit effects and decoder neighbours ([`logits`]), the on-disk feature store the GUI
//! opens ([`store`]), steering ([`steer`]), ground-truth scoring on the world corpus
//! ([`score`]) against dense linear probes of the same hook ([`probe`]) and k-sparse probes
//! of the latents ([`sparse_probe`]), and the features
//! that carry a clean prompt's answer over a corrupted one's ([`patching`]).

pub mod absorption;
pub mod logits;
pub mod patching;
pub mod probe;
pub mod score;
pub mod sparse_probe;
pub mod stats;
pub mod steer;
pub mod store;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sae::codes::{CodingInput, DocumentCoder, SegmentSettings, check_sae_fits, tokenised};
use crate::sae::sparse::SparseEncoder;
use crate::table::sae_hash;
use stats::{FeatureStats, StatsSettings};
use store::StoreInfo;

#[derive(Clone, Debug)]
pub struct BuildSettings {
    pub segment: SegmentSettings,
    /// Tokens to read (the corpus is read once at most).
    pub tokens: u64,
    pub stats: StatsSettings,
    /// Top and bottom logit tokens kept per feature.
    pub logit_tokens: usize,
    /// Nearest features kept per feature.
    pub neighbours: usize,
}

/// How a build went.
#[derive(Clone, Debug)]
pub struct BuildReport {
    /// `None` when cancelled (nothing was written).
    pub info: Option<StoreInfo>,
    pub tokens: u64,
    pub encode_time: Duration,
    pub total_time: Duration,
}

/// Each feature's `top_n` strongest contexts (ten tokens before the peak, three after) over
/// the first `tokens` tokens of `corpus`, in one streaming pass with `sae` reading `hook`:
/// a quick look at what features fire on without a feature store (a knowledge neuron's keys,
/// a circuit's features). `None` when cancelled.
pub fn top_contexts(
    model: &crate::model::Model,
    sae: &crate::sae::Sae,
    hook: crate::model::HookPoint,
    corpus: &crate::sae::activations::Corpus,
    tokens: u64,
    top_n: usize,
    cancel: &AtomicBool,
) -> Result<Option<Vec<Vec<stats::Context>>>> {
    let encoder = SparseEncoder::new(sae)?;
    let settings = StatsSettings {
        top_n,
        intervals: 1,
        samples_per_interval: 0,
        histogram_bins: 1,
        context_before: 10,
        context_after: 3,
    };
    let mut stats = FeatureStats::new(encoder.d_sae(), settings)?;
    let mut coder = DocumentCoder::new(
        model,
        &encoder,
        hook,
        SegmentSettings {
            context_size: 128.min(model.dims().context_length),
            prepend_bos: true,
            exclude_special: true,
            segments_per_forward: 16,
        },
        tokenised(model, corpus.documents(0)?, 0),
        0,
        Some(tokens),
    )?;
    while let Some(batch) = coder.next_batch()? {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        stats.observe(&batch);
    }
    Ok(Some(stats.finish().into_iter().map(|s| s.top).collect()))
}

/// One streaming pass over the corpus, then logit effects and neighbours; writes the store
/// into `out` (created if missing; it must not hold anything but an older store).
pub fn build(
    input: &CodingInput,
    out: &Path,
    settings: &BuildSettings,
    overwrite: bool,
    cancel: &AtomicBool,
    mut on_progress: impl FnMut(u64),
) -> Result<BuildReport> {
    let started = Instant::now();
    if settings.tokens == 0 {
        return Err(Error::InvalidArgument {
            what: "--tokens",
            value: "0".into(),
            message: "feature statistics need at least one token".into(),
        });
    }
    settings.stats.validate()?;
    check_sae_fits(input.model, input.hook, input.sae, input.sae_dir)?;
    prepare_out(out, overwrite)?;

    let encoder = SparseEncoder::new(input.sae)?;
    let mut stats = FeatureStats::new(encoder.d_sae(), settings.stats.clone())?;
    let mut coder = DocumentCoder::new(
        input.model,
        &encoder,
        input.hook,
        settings.segment.clone(),
        tokenised(input.model, input.corpus.documents(0)?, 0),
        0,
        Some(settings.tokens),
    )?;
    let mut documents = 0;
    while let Some(batch) = coder.next_batch()? {
        stats.observe(&batch);
        documents = batch.segments.last().map_or(documents, |s| s.doc_id + 1);
        on_progress(stats.tokens());
        if cancel.load(Ordering::Relaxed) {
            return Ok(BuildReport {
                info: None,
                tokens: stats.tokens(),
                encode_time: coder.forward_time + coder.encode_time,
                total_time: started.elapsed(),
            });
        }
    }
    let tokens = stats.tokens();
    if tokens == 0 {
        return Err(Error::InvalidArgument {
            what: "corpus",
            value: input.corpus.describe(),
            message: "holds no tokens".into(),
        });
    }
    let summaries = stats.finish();
    let token_names = input.model.token_names();
    let effects = logits::logit_effects(
        input.model,
        input.writes,
        &input.sae.w_dec,
        settings.logit_tokens,
        &token_names,
    )?;
    let neighbours = logits::decoder_neighbours(&input.sae.w_dec, settings.neighbours)?;
    let info = StoreInfo {
        schema_version: 1,
        model_dir: input.model.dir.display().to_string(),
        model_hash: input.model.content_hash()?,
        sae_dir: input.sae_dir.display().to_string(),
        sae_hash: sae_hash(input.sae_dir)?,
        hook: input.hook.to_string(),
        corpus: input.corpus.describe(),
        documents,
        tokens,
        d_sae: encoder.d_sae(),
        settings: settings.stats.clone(),
        logit_effects: if effects.is_some() {
            logits::METHOD.into()
        } else {
            String::new()
        },
    };
    store::write(
        out,
        &info,
        &summaries,
        effects.as_deref(),
        &neighbours,
        &token_names,
    )?;
    Ok(BuildReport {
        info: Some(info),
        tokens,
        encode_time: coder.forward_time + coder.encode_time,
        total_time: started.elapsed(),
    })
}

/// Creates `out`, or checks it may be written into.
fn prepare_out(out: &Path, overwrite: bool) -> Result<()> {
    crate::files::require_output_path("the feature store folder", out)?;
    let known = [store::INFO_FILE, store::FEATURES_FILE, store::CONTEXTS_FILE];
    match std::fs::read_dir(out) {
        Ok(entries) => {
            for entry in entries {
                let name = entry
                    .map_err(|e| Error::io(out, e))?
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                let ours = known
                    .iter()
                    .any(|k| name == *k || name.starts_with(&format!(".{k}.tmp-")));
                if !ours || !overwrite {
                    return Err(Error::InvalidArgument {
                        what: "--out",
                        value: out.display().to_string(),
                        message: if ours {
                            "already holds a feature store: pass --overwrite to replace it".into()
                        } else {
                            format!("holds `{name}`, which is not part of a feature store")
                        },
                    });
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
        }
        Err(e) => Err(Error::io(out, e)),
    }
}
