//! Memory-mapped safetensors weights, single-file or sharded, with errors that name the file
//! and the tensor key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The weights of one model directory. Tensors are read from the memory map on request and
/// converted to the run dtype and device. The trainer instead hands over tensors it holds in
/// memory ([`Weights::from_tensors`]), so training and loading share the architecture code.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// In-memory tensors (training); kept as they are so gradients flow back to them.
    memory: HashMap<String, Tensor>,
    /// Tensor key → index into `files`.
    routing: HashMap<String, usize>,
    /// The key a tensor is stored under where it is served under another ([`Weights::renamed`]).
    stored: HashMap<String, String>,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let paths = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_paths(&index)?
        } else {
            return Err(Error::MissingFile {
                path: single,
                what: "model weights: model.safetensors or model.safetensors.index.json",
            });
        };
        Self::open_paths(dir, paths, dtype, device)
    }

    /// Opens one safetensors file (a checkpoint, an SAE).
    pub fn open_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "safetensors file",
            });
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::open_paths(dir, vec![path.to_path_buf()], dtype, device)
    }

    fn open_paths(dir: &Path, paths: Vec<PathBuf>, dtype: DType, device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(Error::MissingFile {
                    path,
                    what: "weight shard listed in model.safetensors.index.json",
                });
            }
            // SAFETY: the file is mapped read-only; like every mmap-based loader (candle,
            // transformers) this assumes nobody truncates the file while the model is loaded.
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| Error::Safetensors {
                path: path.clone(),
                message: root_message(&e),
            })?;
            for (key, _) in st.tensors() {
                routing.insert(key, files.len());
            }
            files.push((path, st));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            routing,
            stored: HashMap::new(),
            memory: HashMap::new(),
            dtype,
            device: device.clone(),
        })
    }

    /// Weights held in memory; `label` names them in errors. Tensors keep their dtype and
    /// device and are returned as they are (same graph node), which is what training needs.
    pub fn from_tensors(label: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        let (dtype, device) = tensors
            .values()
            .next()
            .map_or((DType::F32, Device::Cpu), |t| {
                (t.dtype(), t.device().clone())
            });
        Self {
            dir: label.into(),
            files: Vec::new(),
            routing: HashMap::new(),
            stored: HashMap::new(),
            memory: tensors,
            dtype,
            device,
        }
    }

    /// The same files with each stored key served under `rename(key)` (left out where it
    /// gives `None`): how a multimodal checkpoint's language model reads as a plain one.
    pub fn renamed(mut self, rename: impl Fn(&str) -> Option<String>) -> Self {
        let mut routing = HashMap::new();
        for (key, file) in std::mem::take(&mut self.routing) {
            if let Some(name) = rename(&key) {
                self.stored.insert(name.clone(), key);
                routing.insert(name, file);
            }
        }
        self.routing = routing;
        self
    }

    /// The key `key` is stored under in the checkpoint (itself unless [`Weights::renamed`]
    /// moved it): where an edited tensor is written back.
    pub fn stored_key(&self, key: &str) -> String {
        self.stored
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.to_string())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, key: &str) -> bool {
        self.routing.contains_key(key) || self.memory.contains_key(key)
    }

    /// Loads `key`, checks it has `shape`, converts to the run dtype and device.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let (path, tensor) = self.load(key)?;
        if tensor.dims() != shape {
            return Err(Error::TensorShape {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected: shape.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        Ok(tensor.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// The shape `key` is stored with, read without loading it.
    pub fn shape(&self, key: &str) -> Result<Vec<usize>> {
        if let Some(tensor) = self.memory.get(key) {
            return Ok(tensor.dims().to_vec());
        }
        let (path, st, stored) = self.locate(key)?;
        let view = st.get(stored).map_err(|e| Error::Safetensors {
            path: path.clone(),
            message: format!("tensor `{stored}`: {}", root_message(&e)),
        })?;
        Ok(view.shape().to_vec())
    }

    /// Rows `rows` of `key` (indices along its first dimension), `[rows.len(), ..]` in the run
    /// dtype on the run device, read from the mapped file without loading the rest: how a
    /// cross-layer transcoder's decoders, tens of gigabytes for a large model, are used.
    pub fn rows(&self, key: &str, rows: &[u32]) -> Result<Tensor> {
        if let Some(tensor) = self.memory.get(key) {
            let ids = Tensor::new(rows, tensor.device())?;
            return Ok(tensor
                .index_select(&ids, 0)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?);
        }
        let (path, st, stored) = self.locate(key)?;
        let bad = |message: String| Error::Safetensors {
            path: path.clone(),
            message: format!("tensor `{stored}`: {message}"),
        };
        let view = st.get(stored).map_err(|e| bad(root_message(&e)))?;
        let dtype = DType::try_from(view.dtype()).map_err(|e| bad(root_message(&e)))?;
        let shape = view.shape();
        let Some((&n_rows, rest)) = shape.split_first() else {
            return Err(bad("a scalar has no rows".into()));
        };
        let row_bytes = rest.iter().product::<usize>() * dtype.size_in_bytes();
        let data = view.data();
        let mut bytes = Vec::with_capacity(rows.len() * row_bytes);
        for &row in rows {
            let row = row as usize;
            if row >= n_rows {
                return Err(bad(format!("row {row} of {n_rows}")));
            }
            bytes.extend_from_slice(&data[row * row_bytes..][..row_bytes]);
        }
        let mut out_shape = shape.to_vec();
        out_shape[0] = rows.len();
        Ok(
            Tensor::from_raw_buffer(&bytes, dtype, &out_shape, &Device::Cpu)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?,
        )
    }

    /// Loads `key` when present; `Ok(None)` when absent (optional biases, untied heads).
    pub fn get_opt(&self, key: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(key) {
            self.get(key, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The file `key` is stored in, its mapping and the key it is stored under there.
    fn locate<'a>(&'a self, key: &'a str) -> Result<(&'a PathBuf, &'a MmapedSafetensors, &'a str)> {
        let idx = *self.routing.get(key).ok_or_else(|| Error::MissingTensor {
            dir: self.dir.clone(),
            key: key.to_string(),
        })?;
        let (path, st) = &self.files[idx];
        Ok((path, st, self.stored.get(key).map_or(key, String::as_str)))
    }

    fn load<'a>(&'a self, key: &'a str) -> Result<(&'a Path, Tensor)> {
        if let Some(tensor) = self.memory.get(key) {
            return Ok((&self.dir, tensor.clone()));
        }
        let (path, st, stored) = self.locate(key)?;
        let tensor = st
            .load(stored, &Device::Cpu)
            .map_err(|e| Error::Safetensors {
                path: path.clone(),
                message: format!("tensor `{stored}`: {}", root_message(&e)),
            })?;
        Ok((path, tensor))
    }
}

/// The distinct shard files of an index, in order of first appearance.
fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let json: serde_json::Value = crate::files::read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "weight_map", "missing or not an object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut paths: Vec<PathBuf> = Vec::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| Error::config(index, format!("weight_map.{key}"), "not a string"))?;
        let path = dir.join(file);
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    Ok(paths)
}

/// candle wraps errors in context layers; the innermost message is the informative one.
fn root_message(e: &candle_core::Error) -> String {
    let mut msg = e.to_string();
    if let candle_core::Error::WithBacktrace { inner, .. } = e {
        msg = root_message(inner);
    }
    msg
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Rows read from the mapped file are the stored tensor's rows, in any stored dtype and in
    /// any order, converted to the run dtype; a row past the end is an error naming the file.
    #[test]
    fn rows_read_from_the_mapped_file_are_the_tensors_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let values: Vec<f32> = (0..30).map(|i| i as f32 * 0.5 - 3.0).collect();
        let full = Tensor::from_vec(values, (5, 2, 3), &Device::Cpu).unwrap();
        let stored = full.to_dtype(DType::BF16).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), stored.clone())]), &path)
            .unwrap();
        let weights = Weights::open_file(&path, DType::F32, &Device::Cpu).unwrap();
        let rows = weights.rows("w", &[4, 0, 4]).unwrap();
        assert_eq!(rows.dims(), [3, 2, 3]);
        assert_eq!(rows.dtype(), DType::F32);
        let want = stored
            .to_dtype(DType::F32)
            .unwrap()
            .index_select(&Tensor::new(&[4u32, 0, 4], &Device::Cpu).unwrap(), 0)
            .unwrap();
        assert_eq!(
            rows.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let err = weights.rows("w", &[5]).unwrap_err().to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("row 5 of 5"),
            "{err}"
        );
        assert!(weights.rows("nothing", &[0]).is_err());
    }
}
