//! Saving an edited model as a new Hugging Face folder, never in place.
//!
//! Every file of the source folder is copied; the safetensors files keep their names, shards
//! and tensors, with each edited down projection replaced by its edited value in the
//! checkpoint's dtype and layout (GPT-2's `Conv1D` stores `[in, out]`, so its edit is
//! transposed back). `edits.json` logs the edits and the source model (path and content
//! hash); `edits.safetensors` keeps each edit's weight changes, so a saved folder can be
//! edited further or have any edit undone later, bit-exactly, by replaying the remaining
//! edits on the source ([`open_edits`]). The folder is built under a temporary name beside
//! the destination and renamed when complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::history::{AppliedEdit, EditHistory};
use crate::error::{Error, Result};
use crate::files::write_safetensors;
use crate::model::Model;

/// The edit log written beside the weights.
pub const EDIT_LOG: &str = "edits.json";
/// The edits' weight changes, `edit{id}.layer{L}` (`f32`, Linear layout).
pub const EDIT_DELTAS: &str = "edits.safetensors";

/// An edited folder's record of where it came from and what was done.
#[derive(Serialize, serde::Deserialize)]
pub struct EditLog {
    pub monoscope: String,
    pub source_model: PathBuf,
    pub source_hash: String,
    pub edits: Vec<AppliedEdit>,
}

/// The edits of an edited folder, their weight changes read back; `None` for a folder that
/// has no edit log (an unedited model).
pub fn open_edits(dir: &Path) -> Result<Option<EditLog>> {
    let log_path = dir.join(EDIT_LOG);
    if !log_path.is_file() {
        return Ok(None);
    }
    let mut log: EditLog = crate::files::read_json(&log_path)?;
    let deltas_path = dir.join(EDIT_DELTAS);
    let tensors = candle_core::safetensors::load(&deltas_path, &Device::Cpu).map_err(|e| {
        Error::Safetensors {
            path: deltas_path.clone(),
            message: e.to_string(),
        }
    })?;
    for edit in &mut log.edits {
        for &layer in &edit.layers {
            let key = delta_key(edit.id, layer);
            let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                dir: deltas_path.clone(),
                key: key.clone(),
            })?;
            edit.deltas.push(super::history::LayerDelta {
                layer,
                delta: t.flatten_all()?.to_vec1::<f32>()?,
            });
        }
    }
    Ok(Some(log))
}

fn delta_key(id: usize, layer: usize) -> String {
    format!("edit{id}.layer{layer}")
}

/// Writes `model` with the edits of `history` to the new folder `out` (which must not exist,
/// or be empty).
pub fn save_edited(model: &Model, history: &EditHistory, out: &Path) -> Result<()> {
    let refuse = |message: &str| Error::InvalidArgument {
        what: "output folder",
        value: out.display().to_string(),
        message: message.into(),
    };
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(refuse(
                "already exists and is not empty: an edited model goes to a new folder",
            ));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(refuse("its parent folder does not exist"));
    }
    let name = out
        .file_name()
        .ok_or_else(|| refuse("has no folder name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_folder(model, history, &tmp).and_then(|()| {
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_folder(model: &Model, history: &EditHistory, dir: &Path) -> Result<()> {
    // The edited tensors, keyed by their checkpoint name, in checkpoint layout.
    let mut edited: HashMap<String, Tensor> = HashMap::new();
    for layer in history.touched_layers() {
        let block = &model.transformer.blocks[layer];
        let mut w = block.mlp.down_proj().weight().to_device(&Device::Cpu)?;
        if block.down_proj_source.transposed {
            w = w.t()?.contiguous()?;
        }
        edited.insert(block.down_proj_source.key.clone(), w);
    }
    let entries = std::fs::read_dir(&model.dir).map_err(|e| Error::io(&model.dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&model.dir, e))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let target = dir.join(entry.file_name());
        let name = entry.file_name();
        if name == EDIT_LOG || name == EDIT_DELTAS {
            continue;
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            rewrite_safetensors(&path, &target, &mut edited)?;
        } else {
            std::fs::copy(&path, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    if let Some(key) = edited.keys().next() {
        return Err(Error::MissingTensor {
            dir: model.dir.clone(),
            key: key.clone(),
        });
    }
    let log = EditLog {
        monoscope: env!("CARGO_PKG_VERSION").to_string(),
        source_model: std::path::absolute(&model.dir).map_err(|e| Error::io(&model.dir, e))?,
        source_hash: model.content_hash()?,
        edits: history.edits().to_vec(),
    };
    let mut deltas = HashMap::new();
    for edit in history.edits() {
        for d in &edit.deltas {
            let dims = (model.dims().d_model, model.dims().d_mlp);
            deltas.insert(
                delta_key(edit.id, d.layer),
                Tensor::from_slice(&d.delta, dims, &Device::Cpu)?,
            );
        }
    }
    let deltas_path = dir.join(EDIT_DELTAS);
    write_safetensors(&deltas, &deltas_path)?;
    let path = dir.join(EDIT_LOG);
    let json = serde_json::to_string_pretty(&log).map_err(|e| Error::InvalidArgument {
        what: "edit log",
        value: path.display().to_string(),
        message: e.to_string(),
    })?;
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))
}

/// Copies the safetensors file `from` to `to`, replacing the tensors named in `edited`
/// (removed from it once written) in the file's own dtype.
fn rewrite_safetensors(from: &Path, to: &Path, edited: &mut HashMap<String, Tensor>) -> Result<()> {
    let bad = |e: candle_core::Error| Error::Safetensors {
        path: from.to_path_buf(),
        message: e.to_string(),
    };
    let mut tensors = candle_core::safetensors::load(from, &Device::Cpu).map_err(bad)?;
    for (key, tensor) in tensors.iter_mut() {
        if let Some(new) = edited.remove(key) {
            if new.dims() != tensor.dims() {
                return Err(Error::Safetensors {
                    path: from.to_path_buf(),
                    message: format!(
                        "`{key}` is {:?} on disk but the edited weight is {:?}",
                        tensor.dims(),
                        new.dims()
                    ),
                });
            }
            *tensor = new.to_dtype(tensor.dtype())?;
        }
    }
    write_safetensors(&tensors, to)
}
