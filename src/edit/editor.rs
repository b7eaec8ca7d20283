//! What every edit needs besides the model — key statistics per layer (cached in memory and
//! on disk), the context templates, the v* settings — and the two ways to make an edit
//! (ROME, MEMIT), each returned as an [`AppliedEdit`] for the history. The CLI, `edit eval`
//! and the GUI all edit through this.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

use super::context_templates;
use super::covariance::{KeyCovariance, key_covariance};
use super::history::{AppliedEdit, LayerDelta};
use super::locate::KeyChoice;
use super::memit::{MemitEdit, MemitSettings, compute_batch};
use super::rome::{KeyPosition, Request, RomeEdit, RomeSettings, compute_edit};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sae::activations::Corpus;

/// Where the key statistics come from.
#[derive(Clone, Debug)]
pub struct StatsSource {
    pub corpus: Corpus,
    pub tokens: u64,
    /// On-disk cache (none: computed every time).
    pub cache_dir: Option<PathBuf>,
}

pub struct Editor {
    pub stats: StatsSource,
    pub contexts: Vec<String>,
    pub settings: RomeSettings,
    pub memit: MemitSettings,
    covs: HashMap<usize, KeyCovariance>,
}

impl Editor {
    /// Generates the context templates (`contexts_per_start` per start word, seeded).
    pub fn new(
        model: &Model,
        stats: StatsSource,
        contexts_per_start: usize,
        settings: RomeSettings,
    ) -> Result<Self> {
        Ok(Self {
            stats,
            contexts: context_templates(model, contexts_per_start, 10, 0)?,
            settings,
            memit: MemitSettings::default(),
            covs: HashMap::new(),
        })
    }

    /// The key statistics of `layer` (reporting tokens done through `progress` when they
    /// have to be computed).
    pub fn covariance(
        &mut self,
        model: &Model,
        layer: usize,
        progress: impl FnMut(u64),
    ) -> Result<&KeyCovariance> {
        if !self.covs.contains_key(&layer) {
            let cov = key_covariance(
                model,
                layer,
                &self.stats.corpus,
                self.stats.tokens,
                self.stats.cache_dir.as_deref(),
                progress,
            )?;
            self.covs.insert(layer, cov);
        }
        Ok(&self.covs[&layer])
    }

    /// ROME's edit of one fact where `choice` says. `phrasings` are the fact's requests (the
    /// same subject and target), the first being the edit prompt; each further phrasing gets
    /// its own rank-one update at its own key, computed on the model with the earlier ones in
    /// place. The edit prompt is written first and, after the others, once more, so that it
    /// holds exactly as in a one-phrasing edit (written only last, its answer's later tokens
    /// suffered: "Yokohama" came out "Yhilippines"). One phrasing is ROME proper. More help
    /// where the subject's key depends on the word order around it: on the bundled model an
    /// edit through "The capital of {} is" alone moves 22 of 28 held-out paraphrases, and
    /// with "{}'s capital is" added 27 (BENCHMARKS.md). The history gets one edit whose
    /// change is the sum of the updates; the returned edits are in the order computed.
    pub fn rome(
        &mut self,
        model: &Model,
        phrasings: &[Request],
        choice: &KeyChoice,
    ) -> Result<(Vec<RomeEdit>, AppliedEdit)> {
        let Some(first) = phrasings.first() else {
            return Err(Error::InvalidArgument {
                what: "edit request",
                value: "none".into(),
                message: "a ROME edit needs at least one phrasing of the fact".into(),
            });
        };
        if let Some(other) = phrasings
            .iter()
            .find(|r| r.subject != first.subject || r.target != first.target)
        {
            return Err(Error::InvalidArgument {
                what: "phrasing",
                value: other.prompt.clone(),
                message: format!(
                    "phrasings of one fact share its subject {:?} and target {:?}",
                    first.subject, first.target
                ),
            });
        }
        self.covariance(model, choice.layer, |_| {})?;
        let cov = &self.covs[&choice.layer];
        // Later phrasings are keyed on the model with the earlier updates applied.
        let mut edited = model.clone();
        let original = model.transformer.blocks[choice.layer]
            .mlp
            .down_proj()
            .weight()
            .clone();
        let mut total = vec![0f32; original.elem_count()];
        let mut order: Vec<&Request> = phrasings.iter().collect();
        if phrasings.len() > 1 {
            order.push(first);
        }
        let mut edits = Vec::with_capacity(order.len());
        for (i, request) in order.iter().enumerate() {
            let edit = compute_edit(
                &edited,
                request,
                choice.layer,
                choice.key,
                cov,
                &self.contexts,
                &self.settings,
            )?;
            for (t, d) in total.iter_mut().zip(&edit.delta) {
                *t += d;
            }
            if i + 1 < order.len() {
                let update = Tensor::from_slice(&total, original.dims(), original.device())?
                    .to_dtype(original.dtype())?;
                edited.transformer.blocks[choice.layer]
                    .mlp
                    .set_down_proj_weight((&original + update)?);
            }
            edits.push(edit);
        }
        let applied = AppliedEdit {
            id: 0,
            method: "rome".into(),
            requests: phrasings.to_vec(),
            layers: vec![choice.layer],
            key: choice.key.name().into(),
            reason: choice.reason.clone(),
            deltas: vec![LayerDelta {
                layer: choice.layer,
                delta: total,
            }],
        };
        Ok((edits, applied))
    }

    /// A MEMIT batch of `requests` over `layers`, keyed at `key`.
    pub fn memit(
        &mut self,
        model: &mut Model,
        requests: &[Request],
        layers: &[usize],
        key: KeyPosition,
        progress: impl FnMut(&str),
    ) -> Result<(MemitEdit, AppliedEdit)> {
        for &l in layers {
            self.covariance(model, l, |_| {})?;
        }
        let covs: Vec<&KeyCovariance> = layers.iter().map(|l| &self.covs[l]).collect();
        let edit = compute_batch(
            model,
            requests,
            layers,
            key,
            &covs,
            &self.contexts,
            &self.settings,
            &self.memit,
            progress,
        )?;
        let applied = AppliedEdit {
            id: 0,
            method: "memit".into(),
            requests: requests.to_vec(),
            layers: layers.to_vec(),
            key: key.name().into(),
            reason: format!(
                "{} facts over layers {layers:?}, λ = {}",
                requests.len(),
                self.memit.covariance_weight
            ),
            deltas: edit.deltas.clone(),
        };
        Ok((edit, applied))
    }
}
