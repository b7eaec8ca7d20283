//! A training checkpoint's folder, shared by the SAE trainer ([`super::run`]) and the
//! cross-layer transcoder's ([`super::clt`]): written whole and swapped in, found again after a
//! crash, the mixing buffer's rows saved and restored, and the checks its tensors are read back
//! with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::activations::MixingBuffer;
use crate::error::{Error, Result};

pub(crate) const STATE_JSON: &str = "state.json";
pub(crate) const TRAINER_FILE: &str = "trainer.safetensors";
const BUFFER_FILE: &str = "buffer.safetensors";

/// The settings in which `now` differs from `was` (the checkpoint's), as `key: was → now`
/// with nested keys joined by dots: what a refused resume names.
pub(crate) fn setting_differences<T: serde::Serialize>(was: &T, now: &T) -> Vec<String> {
    fn walk(key: &str, was: &serde_json::Value, now: &serde_json::Value, out: &mut Vec<String>) {
        match (was, now) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                let null = serde_json::Value::Null;
                for k in keys {
                    let inner = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    walk(
                        &inner,
                        a.get(k).unwrap_or(&null),
                        b.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if was != now => out.push(format!("{key}: {was} → {now}")),
            _ => {}
        }
    }
    let (Ok(was), Ok(now)) = (serde_json::to_value(was), serde_json::to_value(now)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk("", &was, &now, &mut out);
    out
}

/// Writes a checkpoint through `write` into `training/checkpoint.new`, then swaps it in for
/// `training/checkpoint`: the old one is removed only once the new one is complete.
pub(crate) fn swap_in_checkpoint(
    training: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let new = training.join("checkpoint.new");
    if new.exists() {
        std::fs::remove_dir_all(&new).map_err(|e| Error::io(&new, e))?;
    }
    std::fs::create_dir_all(&new).map_err(|e| Error::io(&new, e))?;
    write(&new)?;
    let current = training.join("checkpoint");
    let old = training.join("checkpoint.old");
    if current.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(&current, &old).map_err(|e| Error::io(&current, e))?;
    }
    std::fs::rename(&new, &current).map_err(|e| Error::io(&new, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The checkpoint in `training` to resume from: `checkpoint`, or `checkpoint.old` where a crash
/// between [`swap_in_checkpoint`]'s two renames left only that.
pub(crate) fn checkpoint_to_resume(training: &Path) -> Result<PathBuf> {
    let dir = training.join("checkpoint");
    if dir.exists() {
        return Ok(dir);
    }
    let old = training.join("checkpoint.old");
    if old.exists() {
        return Ok(old);
    }
    Err(Error::MissingFile {
        path: dir,
        what: "training checkpoint to resume from",
    })
}

/// The tensors of a checkpoint's safetensors file.
pub(crate) fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Saves the mixing buffer's rows into checkpoint folder `dir`.
pub(crate) fn save_buffer(dir: &Path, buffer: &MixingBuffer) -> Result<()> {
    let (held, _, _) = buffer.state();
    let width = buffer.width();
    let rows = Tensor::from_slice(held, (held.len() / width.max(1), width), &Device::Cpu)?;
    crate::files::write_safetensors(
        &HashMap::from([("rows".to_string(), rows)]),
        &dir.join(BUFFER_FILE),
    )?;
    Ok(())
}

/// Refills `buffer` from checkpoint folder `dir`: its rows, of which `used` were handed out,
/// after `refills` refills.
pub(crate) fn restore_buffer(
    dir: &Path,
    buffer: &mut MixingBuffer,
    used: usize,
    refills: u64,
) -> Result<()> {
    let buffer_file = dir.join(BUFFER_FILE);
    let width = buffer.width();
    let rows = load_tensors(&buffer_file)?
        .remove("rows")
        .ok_or_else(|| Error::MissingTensor {
            dir: buffer_file.clone(),
            key: "rows".into(),
        })?;
    if rows.dims().get(1) != Some(&width) {
        return Err(Error::TensorShape {
            path: buffer_file,
            key: "rows".into(),
            expected: vec![0, width],
            actual: rows.dims().to_vec(),
        });
    }
    if used > rows.dim(0)? {
        return Err(Error::InvalidArgument {
            what: "checkpoint buffer_used",
            value: used.to_string(),
            message: format!(
                "{} holds only {} rows (a corrupt checkpoint)",
                buffer_file.display(),
                rows.dim(0)?
            ),
        });
    }
    buffer.restore(rows.flatten_all()?.to_vec1()?, used, refills);
    Ok(())
}

/// A checkpoint's one-dimensional tensor `key` of `len` values, read from `path`; a missing or
/// mis-shaped one is refused by name.
pub(crate) fn vector<'a>(
    tensors: &'a HashMap<String, Tensor>,
    key: &str,
    len: usize,
    path: &Path,
) -> Result<&'a Tensor> {
    let t = tensors.get(key).ok_or_else(|| Error::MissingTensor {
        dir: path.to_path_buf(),
        key: key.into(),
    })?;
    if t.dims() != [len] {
        return Err(Error::TensorShape {
            path: path.to_path_buf(),
            key: key.into(),
            expected: vec![len],
            actual: t.dims().to_vec(),
        });
    }
    Ok(t)
}

/// [`vector`] of token counts (saved as `i64`).
pub(crate) fn counts(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    len: usize,
    path: &Path,
) -> Result<Vec<u64>> {
    Ok(vector(tensors, key, len, path)?
        .to_dtype(candle_core::DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|t| t.max(0) as u64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Inner {
        lr: f64,
        k: usize,
    }

    #[derive(serde::Serialize)]
    struct Settings {
        buffer_rows: usize,
        train: Inner,
    }

    #[test]
    fn a_refused_resume_names_each_setting_that_changed() {
        let was = Settings {
            buffer_rows: 64,
            train: Inner { lr: 1e-3, k: 32 },
        };
        let now = Settings {
            buffer_rows: 64,
            train: Inner { lr: 2e-3, k: 16 },
        };
        assert_eq!(
            setting_differences(&was, &now),
            ["train.k: 32 → 16", "train.lr: 0.001 → 0.002"]
        );
        assert!(setting_differences(&was, &was).is_empty());
    }
}
