//! ROME's key statistics: the second moment `C = E[k kᵀ]` of the keys `k` (the input of a
//! layer's down projection, `blocks.L.mlp.hook_post`) over a corpus, cached on disk.
//!
//! The cache file is keyed by the model's content hash, the layer, the corpus and the sample
//! count, so a changed model, another layer or a bigger sample never reuses a stale matrix.
//! Accumulation is in blocks of rows (`XᵀX` by gemm in `f32`, summed into `f64`), which keeps
//! 100k tokens of the bundled model to a few seconds beyond the forward passes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::files::{write_atomic, write_safetensors};
use crate::model::Model;
use crate::model::hooks::HookPoint;
use crate::sae::activations::{ActivationSource, ChunkSource, Corpus, WindowSettings};
use crate::sae::cpu::{MatRef, matmul};

/// `E[k kᵀ]` at one layer, `[d_mlp, d_mlp]` row-major, and the keys it averages.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyCovariance {
    pub layer: usize,
    pub d: usize,
    pub samples: u64,
    pub values: Vec<f64>,
}

impl KeyCovariance {
    /// The matrix as ndarray, for the solves.
    pub fn matrix(&self) -> Result<ndarray::Array2<f64>> {
        ndarray::Array2::from_shape_vec((self.d, self.d), self.values.clone()).map_err(|e| {
            Error::InvalidArgument {
                what: "covariance",
                value: format!("{} values", self.values.len()),
                message: e.to_string(),
            }
        })
    }
}

/// Where key statistics are cached by default: `$XDG_CACHE_HOME/monoscope/stats`, else
/// `~/.cache/monoscope/stats` (`None` when neither variable is set).
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("monoscope").join("stats"))
}

/// What identifies a covariance: the cache file's name within `dir`. A file corpus adds a
/// digest of its size and modification time ([`Corpus::fingerprint`]), so an edited file
/// gets new statistics.
pub fn cache_path(
    dir: &Path,
    model_hash: &str,
    layer: usize,
    corpus: &Corpus,
    tokens: u64,
) -> Result<PathBuf> {
    use sha2::Digest;
    let model = model_hash.trim_start_matches("sha256:");
    let fingerprint = corpus.fingerprint()?;
    let version = if fingerprint == corpus.describe() {
        String::new()
    } else {
        let digest = sha2::Sha256::digest(fingerprint.as_bytes());
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("-{hex}")
    };
    let corpus: String = corpus
        .describe()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let tail: String = corpus
        .chars()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Ok(dir.join(format!(
        "cov-{}-L{layer}-{tail}{version}-{tokens}.safetensors",
        &model[..model.len().min(16)]
    )))
}

/// The key covariance of `layer` over `tokens` tokens of `corpus`, from the cache in
/// `cache_dir` when it is there (and written there when it is not).
pub fn key_covariance(
    model: &Model,
    layer: usize,
    corpus: &Corpus,
    tokens: u64,
    cache_dir: Option<&Path>,
    mut on_progress: impl FnMut(u64),
) -> Result<KeyCovariance> {
    super::check_layer(model, layer)?;
    if tokens == 0 {
        return Err(Error::InvalidArgument {
            what: "covariance samples",
            value: "0".into(),
            message: "needs at least one token".into(),
        });
    }
    let path = match cache_dir {
        Some(dir) => Some(cache_path(
            dir,
            &model.content_hash()?,
            layer,
            corpus,
            tokens,
        )?),
        None => None,
    };
    if let Some(path) = path.as_ref().filter(|p| p.is_file()) {
        return load(path, layer);
    }
    let settings = WindowSettings {
        context_size: 128.min(model.dims().context_length),
        ..WindowSettings::default()
    };
    let hook = HookPoint::MlpPost(layer).to_string();
    let mut source = ActivationSource::new(model, corpus.clone(), &hook, settings)?;
    let d = source.d_in();
    let mut sum = vec![0f64; d * d];
    let mut block = vec![0f32; d * d];
    let mut seen = 0u64;
    while seen < tokens {
        let rows = source.next_chunk()?;
        let take = ((tokens - seen) as usize).min(rows.len() / d);
        let x = &rows[..take * d];
        matmul(
            MatRef::new(x, take, d).t(),
            MatRef::new(x, take, d),
            &mut block,
            false,
        );
        for (s, b) in sum.iter_mut().zip(&block) {
            *s += f64::from(*b);
        }
        seen += take as u64;
        on_progress(seen);
    }
    let values: Vec<f64> = sum.iter().map(|s| s / seen as f64).collect();
    let cov = KeyCovariance {
        layer,
        d,
        samples: seen,
        values,
    };
    if let Some(path) = &path {
        save(path, &cov)?;
    }
    Ok(cov)
}

fn save(path: &Path, cov: &KeyCovariance) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tensor = Tensor::from_vec(cov.values.clone(), (cov.d, cov.d), &Device::Cpu)?;
    let samples = Tensor::new(&[cov.samples as f64], &Device::Cpu)?;
    let tensors = std::collections::HashMap::from([
        ("covariance".to_string(), tensor),
        ("samples".to_string(), samples),
    ]);
    write_atomic(path, |tmp| write_safetensors(&tensors, tmp))
}

fn load(path: &Path, layer: usize) -> Result<KeyCovariance> {
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let cov = tensors
        .get("covariance")
        .ok_or_else(|| bad("no `covariance` tensor".into()))?;
    let (d, d2) = cov.dims2()?;
    if d != d2 {
        return Err(bad(format!("`covariance` is {d}×{d2}, not square")));
    }
    let samples = tensors
        .get("samples")
        .ok_or_else(|| bad("no `samples` tensor".into()))?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(KeyCovariance {
        layer,
        d,
        samples: samples.first().copied().unwrap_or(0.0) as u64,
        values: cov.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
    })
}
