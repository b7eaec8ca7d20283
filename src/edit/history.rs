//! A stack of applied edits with exact undo.
//!
//! The first time an edit touches a layer, the layer's original down-projection weight is
//! kept. Undoing any edit rebuilds each layer it touched from that original plus the
//! remaining edits' changes, added in the order they were applied — the same additions, so
//! the weights are bit-identical to never having applied the undone edit (and to the
//! original once every edit is undone), never `W + Δ − Δ` with its rounding.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;

use super::rome::Request;
use crate::error::{Error, Result};
use crate::model::Model;

/// One layer's weight change, `[d_model, d_mlp]` row-major in the Linear layout.
#[derive(Clone, Debug, Default)]
pub struct LayerDelta {
    pub layer: usize,
    pub delta: Vec<f32>,
}

/// An edit as the history keeps it: what was asked, how it was made, the weight changes.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct AppliedEdit {
    /// Stable within a history: undo refers to it.
    pub id: usize,
    /// "rome" or "memit".
    pub method: String,
    pub requests: Vec<Request>,
    pub layers: Vec<usize>,
    /// The key position and why it and the layers were chosen.
    pub key: String,
    pub reason: String,
    #[serde(skip)]
    pub deltas: Vec<LayerDelta>,
}

/// The applied edits and the original weights of every layer they touched.
#[derive(Clone, Default)]
pub struct EditHistory {
    originals: BTreeMap<usize, Tensor>,
    edits: Vec<AppliedEdit>,
    next_id: usize,
}

impl EditHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// The applied edits, oldest first.
    pub fn edits(&self) -> &[AppliedEdit] {
        &self.edits
    }

    /// "" for the loaded weights; else how many edits and a digest of what they asked, so that
    /// what was made from an edited model says so (and is told from one edited otherwise).
    pub fn fingerprint(&self) -> String {
        if self.edits.is_empty() {
            return String::new();
        }
        // What was asked and how, not the ids (the same edits undone and redone are the same).
        let asked: Vec<serde_json::Value> = (self.edits.iter())
            .filter_map(|e| serde_json::to_value(e).ok())
            .map(|mut e| {
                if let Some(fields) = e.as_object_mut() {
                    fields.remove("id");
                }
                e
            })
            .collect();
        let asked = serde_json::to_string(&asked).unwrap_or_default();
        let digest = crate::table::sha256_hex(asked.as_bytes());
        format!(" (edited: {} edit(s), {})", self.edits.len(), &digest[..12])
    }

    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// The layers some applied edit has changed.
    pub fn touched_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.originals.keys().copied()
    }

    /// Applies `edit` to `model` and records it; its `id` is assigned here and returned.
    pub fn apply(&mut self, model: &mut Model, mut edit: AppliedEdit) -> Result<usize> {
        edit.id = self.next_id;
        self.replay(model, edit)
    }

    /// Applies an edit keeping its id (replaying a saved history).
    pub fn replay(&mut self, model: &mut Model, edit: AppliedEdit) -> Result<usize> {
        for d in &edit.deltas {
            super::check_layer(model, d.layer)?;
        }
        for d in &edit.deltas {
            let mlp = &model.transformer.blocks[d.layer].mlp;
            self.originals
                .entry(d.layer)
                .or_insert_with(|| mlp.down_proj().weight().clone());
            let w = add_delta(mlp.down_proj().weight(), &d.delta)?;
            model.transformer.blocks[d.layer]
                .mlp
                .set_down_proj_weight(w);
        }
        let id = edit.id;
        self.next_id = self.next_id.max(id + 1);
        self.edits.push(edit);
        Ok(id)
    }

    /// Takes edit `id` away; every layer it touched is rebuilt from its original weight and
    /// the other edits.
    pub fn undo(&mut self, model: &mut Model, id: usize) -> Result<AppliedEdit> {
        let index =
            self.edits
                .iter()
                .position(|e| e.id == id)
                .ok_or_else(|| Error::InvalidArgument {
                    what: "edit id",
                    value: id.to_string(),
                    message: format!(
                        "no such edit; applied: {}",
                        self.edits
                            .iter()
                            .map(|e| e.id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })?;
        let removed = self.edits.remove(index);
        for layer in removed.deltas.iter().map(|d| d.layer) {
            let Some(original) = self.originals.get(&layer) else {
                continue;
            };
            let mut w = original.clone();
            for d in self.edits.iter().flat_map(|e| &e.deltas) {
                if d.layer == layer {
                    w = add_delta(&w, &d.delta)?;
                }
            }
            model.transformer.blocks[layer].mlp.set_down_proj_weight(w);
        }
        Ok(removed)
    }

    /// Undoes every edit: the model is back to its loaded weights.
    pub fn undo_all(&mut self, model: &mut Model) -> Result<()> {
        while let Some(last) = self.edits.last() {
            let id = last.id;
            self.undo(model, id)?;
        }
        Ok(())
    }
}

/// `w + delta` in `w`'s dtype and device.
fn add_delta(w: &Tensor, delta: &[f32]) -> Result<Tensor> {
    if delta.len() != w.elem_count() {
        return Err(Error::InvalidArgument {
            what: "weight change",
            value: format!("{} values", delta.len()),
            message: format!("the down projection has shape {:?}", w.dims()),
        });
    }
    let delta = Tensor::from_slice(delta, w.dims(), w.device())?.to_dtype(w.dtype())?;
    Ok((w + delta)?)
}
