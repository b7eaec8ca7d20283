//! What every edit needs besides the model — key statistics per layer (cached in memory and
//! on disk), the context templates, the v* settings — and the two ways to make an edit
//! (ROME, MEMIT), each returned as an [`AppliedEdit`] for the history. The CLI, `edit eval`
//! and the GUI all edit through this.

use std::collections::HashMap;
use std::path::PathBuf;

use super::context_templates;
use super::covariance::{KeyCovariance, key_covariance};
use super::history::{AppliedEdit, LayerDelta};
use super::locate::KeyChoice;
use super::memit::{MemitEdit, MemitSettings, compute_batch};
use super::rome::{KeyPosition, Request, RomeEdit, RomeSettings, compute_edit};
use crate::error::Result;
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

    /// ROME's edit of `request` where `choice` says.
    pub fn rome(
        &mut self,
        model: &Model,
        request: &Request,
        choice: &KeyChoice,
    ) -> Result<(RomeEdit, AppliedEdit)> {
        self.covariance(model, choice.layer, |_| {})?;
        let edit = compute_edit(
            model,
            request,
            choice.layer,
            choice.key,
            &self.covs[&choice.layer],
            &self.contexts,
            &self.settings,
        )?;
        let applied = AppliedEdit {
            id: 0,
            method: "rome".into(),
            requests: vec![request.clone()],
            layers: vec![edit.layer],
            key: edit.key.name().into(),
            reason: choice.reason.clone(),
            deltas: vec![LayerDelta {
                layer: edit.layer,
                delta: edit.delta.clone(),
            }],
        };
        Ok((edit, applied))
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
