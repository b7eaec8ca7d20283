//! Sparse autoencoders: the inference-time model (encode / decode for every architecture) and
//! the folders it is read from: the SAELens format monoscope writes ([`saelens`]), EleutherAI
//! sparsify's ([`sparsify`]) and Gemma Scope's `params.npz` ([`gemma_scope`]), told apart by
//! their weight files ([`load`]).
//!
//! Encode: `pre = (x − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc`, then the architecture's
//! activation; decode: `acts @ W_dec + b_dec`. Shapes: `W_enc [d_in, d_sae]`,
//! `W_dec [d_sae, d_in]`.

pub mod activations;
pub mod codes;
pub mod cpu;
pub mod eval;
pub mod gemma_scope;
pub mod run;
pub mod saelens;
pub mod sparse;
pub mod sparsify;
pub mod tensor_train;
pub mod train;

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{HookPoint, Model};
use saelens::SaeDir;

/// Loads the SAE folder `dir` onto `device` in `dtype`, in whichever format it is: sparsify's
/// (`sae.safetensors`), Gemma Scope's (`params.npz`) or else SAELens's. A folder of SAE folders (a sparsify run, one per
/// hookpoint) is refused with the names to choose from.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    if sparsify::is_sparsify_dir(dir) {
        return sparsify::load(dir, device, dtype);
    }
    if gemma_scope::is_gemma_scope_dir(dir) {
        return gemma_scope::load(dir, device, dtype);
    }
    if !dir.join(saelens::CONFIG_FILE).is_file() {
        let mut inner: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(std::result::Result::ok)
            .filter(|e| e.path().join(saelens::CONFIG_FILE).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !inner.is_empty() {
            inner.sort();
            return Err(Error::InvalidArgument {
                what: "SAE folder",
                value: dir.display().to_string(),
                message: format!(
                    "holds {} SAE folders, not one SAE: pass one of them ({})",
                    inner.len(),
                    inner.join(", ")
                ),
            });
        }
    }
    saelens::load(dir, device, dtype)
}

/// Loads an SAE (in f32) for `model`, at `hook` or else the hook its folder names (SAELens's
/// `metadata.hook_name`, sparsify's folder name, Gemma Scope's path); the hook must be one hook
/// point of the model.
pub fn load_for_model(
    dir: &Path,
    hook: Option<&str>,
    model: &Model,
    device: &Device,
) -> Result<(SaeDir, HookPoint)> {
    let sae_dir = load(dir, device, DType::F32)?;
    let name = match hook {
        Some(h) => h.to_string(),
        None if !sae_dir.metadata.hook_name.is_empty() => sae_dir.metadata.hook_name.clone(),
        None if sparsify::is_sparsify_dir(dir) => {
            let folder = dir.file_name().unwrap_or_default().to_string_lossy();
            return Err(Error::InvalidArgument {
                what: "sparsify SAE folder",
                value: dir.display().to_string(),
                message: format!(
                    "its name `{folder}` is the hookpoint it was trained on, and monoscope \
                     knows no hook for it (it knows {}); pass the hook it reads",
                    sparsify::KNOWN_HOOKPOINTS
                ),
            });
        }
        None if gemma_scope::is_gemma_scope_dir(dir) => {
            return Err(Error::InvalidArgument {
                what: "Gemma Scope SAE folder",
                value: dir.display().to_string(),
                message: format!(
                    "its path does not say where it reads (monoscope reads {}); pass the hook \
                     it reads",
                    gemma_scope::KNOWN_PATHS
                ),
            });
        }
        None => {
            return Err(Error::config(
                dir.join(saelens::CONFIG_FILE),
                "metadata.hook_name",
                "the SAE names no hook; pass the hook it reads",
            ));
        }
    };
    let points = model.resolve_hooks(&[&name])?;
    match points[..] {
        [point] => Ok((sae_dir, point)),
        _ => Err(Error::InvalidArgument {
            what: "SAE hook",
            value: name,
            message: format!(
                "names {} hook points of {}; an SAE reads one",
                points.len(),
                model.dir.display()
            ),
        }),
    }
}

/// How latent activations are computed from pre-activations.
#[derive(Clone, Debug, PartialEq)]
pub enum Architecture {
    /// ReLU.
    Standard,
    /// Keep the `k` largest pre-activations per token (then ReLU).
    TopK { k: usize },
    /// Trained with a batch-level top-k; at inference a JumpReLU with the saved threshold.
    BatchTopK { k: usize },
    /// `pre · [pre > threshold]`, per-latent thresholds.
    JumpRelu,
}

impl Architecture {
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Standard => "standard",
            Architecture::TopK { .. } => "topk",
            Architecture::BatchTopK { .. } => "batchtopk",
            Architecture::JumpRelu => "jumprelu",
        }
    }

    /// Whether the weights include a per-latent `threshold`.
    pub fn has_threshold(&self) -> bool {
        matches!(
            self,
            Architecture::JumpRelu | Architecture::BatchTopK { .. }
        )
    }
}

/// An SAE ready to encode and decode activations.
#[derive(Clone, Debug)]
pub struct Sae {
    pub architecture: Architecture,
    /// `[d_in, d_sae]`.
    pub w_enc: Tensor,
    /// `[d_sae, d_in]`.
    pub w_dec: Tensor,
    /// `[d_sae]`.
    pub b_enc: Tensor,
    /// `[d_in]`.
    pub b_dec: Tensor,
    /// `[d_sae]`, for JumpReLU and BatchTopK.
    pub threshold: Option<Tensor>,
    pub apply_b_dec_to_input: bool,
}

impl Sae {
    pub fn d_in(&self) -> usize {
        self.b_dec.dim(0).unwrap_or(0)
    }

    pub fn d_sae(&self) -> usize {
        self.b_enc.dim(0).unwrap_or(0)
    }

    /// Checks shapes against each other; errors name the tensor.
    pub fn validate(&self, source: &std::path::Path) -> Result<()> {
        let (d_in, d_sae) = (self.d_in(), self.d_sae());
        for (key, size) in [("d_in", d_in), ("d_sae", d_sae)] {
            if size == 0 {
                return Err(Error::config(source, key, "is 0; must be at least 1"));
            }
        }
        let check = |key: &str, t: &Tensor, expected: &[usize]| -> Result<()> {
            if t.dims() != expected {
                return Err(Error::TensorShape {
                    path: source.to_path_buf(),
                    key: key.to_string(),
                    expected: expected.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(())
        };
        check("W_enc", &self.w_enc, &[d_in, d_sae])?;
        check("W_dec", &self.w_dec, &[d_sae, d_in])?;
        if let Some(t) = &self.threshold {
            check("threshold", t, &[d_sae])?;
        }
        // A diverged or corrupt save (inf or NaN) would poison every code computed from it.
        let tensors = [
            ("W_enc", Some(&self.w_enc)),
            ("W_dec", Some(&self.w_dec)),
            ("b_enc", Some(&self.b_enc)),
            ("b_dec", Some(&self.b_dec)),
            ("threshold", self.threshold.as_ref()),
        ];
        for (key, t) in tensors {
            let Some(t) = t else { continue };
            // 0·x is 0 for every finite x and NaN for inf or NaN, so the sum is finite
            // exactly when every entry is.
            let sum = t
                .affine(0.0, 0.0)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            if !sum.is_finite() {
                return Err(Error::config(
                    source,
                    key,
                    "holds inf or NaN values (a diverged or corrupt save, or values too \
                     large for the run dtype)",
                ));
            }
        }
        if let Architecture::TopK { k } | Architecture::BatchTopK { k } = self.architecture
            && (k == 0 || k > d_sae)
        {
            return Err(Error::config(
                source,
                "k",
                format!("{k} is not between 1 and d_sae ({d_sae})"),
            ));
        }
        Ok(())
    }

    /// Pre-activations `[.., d_sae]` of activations `[.., d_in]`.
    pub fn pre_activations(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.w_enc.dtype())?;
        let x = if self.apply_b_dec_to_input {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x
        };
        Ok(x.broadcast_matmul(&self.w_enc)?
            .broadcast_add(&self.b_enc)?)
    }

    /// Latent activations `[.., d_sae]` (dense; zeros where a latent is off).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let pre = self.pre_activations(x)?;
        Ok(match &self.architecture {
            Architecture::Standard => pre.relu()?,
            Architecture::TopK { k } => top_k_mask(&pre, *k)?.relu()?,
            Architecture::JumpRelu | Architecture::BatchTopK { .. } => {
                let threshold = self
                    .threshold
                    .as_ref()
                    .ok_or_else(|| Error::InvalidArgument {
                        what: "SAE",
                        value: self.architecture.name().into(),
                        message: "has no threshold".into(),
                    })?;
                let on = pre.broadcast_gt(threshold)?.to_dtype(pre.dtype())?;
                (pre.relu()? * on)?
            }
        })
    }

    /// The `k` most active latents of each row of `x` (`[rows, d_in]`), strongest first, as
    /// `(latent, activation)`; latents that are off are never listed. What fires on a token
    /// (Neuronpedia's search by text).
    pub fn strongest_latents(&self, x: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let acts = self.encode(x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(acts
            .into_iter()
            .map(|row| {
                let mut on: Vec<(u32, f32)> = row
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, a)| a > 0.0)
                    .map(|(i, a)| (i as u32, a))
                    .collect();
                on.sort_by(|a, b| b.1.total_cmp(&a.1));
                on.truncate(k);
                on
            })
            .collect())
    }

    /// Reconstruction `[.., d_in]` of latent activations `[.., d_sae]`.
    pub fn decode(&self, acts: &Tensor) -> Result<Tensor> {
        Ok(acts
            .broadcast_matmul(&self.w_dec)?
            .broadcast_add(&self.b_dec)?)
    }

    /// Converts every tensor to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = self.clone();
        out.w_enc = self.w_enc.to_dtype(dtype)?;
        out.w_dec = self.w_dec.to_dtype(dtype)?;
        out.b_enc = self.b_enc.to_dtype(dtype)?;
        out.b_dec = self.b_dec.to_dtype(dtype)?;
        out.threshold = self
            .threshold
            .as_ref()
            .map(|t| t.to_dtype(dtype))
            .transpose()?;
        Ok(out)
    }
}

/// Keeps the `k` largest entries of the last dimension (exactly `k`: ties at the k-th value
/// are broken arbitrarily, as `torch.topk` does), zeroing the rest.
fn top_k_mask(pre: &Tensor, k: usize) -> Result<Tensor> {
    let on_device = |t: &Tensor| -> candle_core::Result<Tensor> {
        let t = t.contiguous()?;
        let idx = t
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, k)?
            .contiguous()?;
        let kept = t.gather(&idx, D::Minus1)?;
        t.zeros_like()?.scatter(&idx, &kept, D::Minus1)
    };
    if pre.device().is_cpu() {
        return Ok(on_device(pre)?);
    }
    // candle's GPU arg-sort keeps a whole (power-of-two padded) row in shared memory, which
    // fails for wide SAEs: sort those on the CPU.
    let fits = pre.dim(D::Minus1)?.next_power_of_two() <= 8192;
    match fits.then(|| on_device(pre)) {
        Some(Ok(t)) => Ok(t),
        _ => {
            let cpu = on_device(&pre.to_device(&candle_core::Device::Cpu)?)?;
            Ok(cpu.to_device(pre.device())?)
        }
    }
}
