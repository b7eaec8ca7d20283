//! Sparse autoencoders: the inference-time model (encode / decode for every architecture) and
//! the folders it is read from: the SAELens format monoscope writes ([`saelens`]), EleutherAI
//! sparsify's ([`sparsify`]), Gemma Scope's `params.npz` ([`gemma_scope`]), Gemma Scope 2's
//! `params.safetensors` ([`gemma_scope_2`]) and dictionary_learning's `ae.pt` (SAEBench's;
//! [`dictionary_learning`]), told apart by their weight files ([`load`]).
//!
//! Encode: `pre = (x − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc`, then the architecture's
//! activation; decode: `acts @ W_dec + b_dec`. Shapes: `W_enc [d_in, d_sae]`,
//! `W_dec [d_sae, d_out]`, where `d_out = d_in` for an SAE.
//!
//! A *transcoder* (Dunefsky et al. 2024; SAELens's `transcoder` family, sparsify's
//! `transcode`) has the same encoder but predicts another hook from it — an MLP's output from
//! its input — so its decoder writes `d_out` values at that other hook, optionally plus an affine
//! skip path `x @ W_skipᵀ` (`W_skip [d_out, d_in]`). It never subtracts `b_dec` (which lives
//! in the output space) from its input. Which hook it writes is the folder's
//! `metadata.hook_name_out`; [`output_hook`] resolves it against a model.

pub mod activations;
pub(crate) mod checkpoint;
pub mod clt;
pub mod codes;
pub mod cpu;
pub mod dictionary_learning;
pub mod eval;
pub mod gemma_scope;
pub mod gemma_scope_2;
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

/// Tensors read whole from one file (an `.npz`, a PyTorch `state_dict`), and the file.
pub(crate) struct TensorFile {
    pub path: std::path::PathBuf,
    pub tensors: std::collections::HashMap<String, Tensor>,
}

impl TensorFile {
    /// `key`, in `dtype` on `device` and contiguous (some files hold transposed views); an error
    /// naming the file and key where it is missing.
    pub fn get(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            dir: self.path.clone(),
            key: key.to_string(),
        })?;
        Ok(t.to_dtype(dtype)?.to_device(device)?.contiguous()?)
    }
}

/// Whether `dir` holds one SAE in a format [`load`] reads.
pub fn is_sae_dir(dir: &Path) -> bool {
    sparsify::is_sparsify_dir(dir)
        || gemma_scope::is_gemma_scope_dir(dir)
        || gemma_scope_2::is_gemma_scope_2_dir(dir)
        || dictionary_learning::is_dictionary_learning_dir(dir)
        || dir.join(saelens::CONFIG_FILE).is_file()
}

/// Loads the SAE folder `dir` onto `device` in `dtype`, in whichever format it is: sparsify's
/// (`sae.safetensors`), Gemma Scope's (`params.npz`), Gemma Scope 2's (`params.safetensors`),
/// dictionary_learning's (`ae.pt`) or else SAELens's. A folder of SAE folders (a sparsify run, one per
/// hookpoint) is refused with the names to choose from.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    if sparsify::is_sparsify_dir(dir) {
        return sparsify::load(dir, device, dtype);
    }
    if gemma_scope::is_gemma_scope_dir(dir) {
        return gemma_scope::load(dir, device, dtype);
    }
    if gemma_scope_2::is_gemma_scope_2_dir(dir) {
        return gemma_scope_2::load(dir, device, dtype);
    }
    if dictionary_learning::is_dictionary_learning_dir(dir) {
        return dictionary_learning::load(dir, device, dtype);
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
        None if dictionary_learning::is_dictionary_learning_dir(dir) => {
            return Err(Error::config(
                dir.join(dictionary_learning::CONFIG_FILE),
                "trainer.layer",
                "is missing, and no submodule_name names a site; pass the hook the SAE reads",
            ));
        }
        None if gemma_scope_2::is_gemma_scope_2_dir(dir) => {
            return Err(Error::InvalidArgument {
                what: "Gemma Scope 2 SAE folder",
                value: dir.display().to_string(),
                message: format!(
                    "neither a config.json nor its path says where it reads (monoscope reads \
                     {}); pass the hook it reads",
                    gemma_scope_2::KNOWN_PATHS
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

/// Where an SAE sits in a model: the hook it reads and the hook its decoder writes — the same
/// hook for an SAE, a later one for a transcoder ([`output_hook`]). A bare [`HookPoint`] is an
/// SAE's site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaeSite {
    pub input: HookPoint,
    pub output: HookPoint,
}

impl From<HookPoint> for SaeSite {
    fn from(hook: HookPoint) -> Self {
        Self {
            input: hook,
            output: hook,
        }
    }
}

impl SaeSite {
    /// Checks that a transcoder is given its own output hook (a site built from one hook would
    /// write its predictions where it reads).
    pub fn check(&self, sae: &Sae) -> Result<()> {
        if sae.transcoder && self.input == self.output {
            return Err(Error::InvalidArgument {
                what: "transcoder",
                value: format!("reading {}", self.input),
                message: "needs the hook it writes (metadata.hook_name_out or --hook-out); it \
                          does not write where it reads"
                    .into(),
            });
        }
        Ok(())
    }
}

/// The hook an SAE's decoder writes, in `model`: `input` (the hook it reads) for an SAE; for a
/// transcoder, `metadata.hook_name_out`, which must be one per-token hook of the model that comes
/// after `input` in the forward pass (so that splicing it in leaves the transcoder's own input
/// unchanged) and is `d_out` wide.
pub fn output_hook(sae_dir: &SaeDir, input: HookPoint, model: &Model) -> Result<HookPoint> {
    if !sae_dir.sae.transcoder {
        return Ok(input);
    }
    let name = &sae_dir.metadata.hook_name_out;
    if name.is_empty() {
        return Err(Error::InvalidArgument {
            what: "transcoder",
            value: format!("reading {input}"),
            message: "names no hook it writes (metadata.hook_name_out); pass it with --hook-out"
                .into(),
        });
    }
    let point = resolve_output_hook(model, input, name)?;
    let width = model.hook_width(point)?;
    if width != sae_dir.sae.d_out() {
        return Err(Error::InvalidArgument {
            what: "transcoder output hook",
            value: name.clone(),
            message: format!(
                "is {width} wide but the transcoder writes d_out = {}",
                sae_dir.sae.d_out()
            ),
        });
    }
    Ok(point)
}

/// The hook point `name` names in `model` as a transcoder's output: exactly one, and later in
/// the forward pass than `input`, the hook it reads (so that splicing it in, or capturing both
/// in one pass, sees the transcoder's own input unchanged).
pub fn resolve_output_hook(model: &Model, input: HookPoint, name: &str) -> Result<HookPoint> {
    let bad = |message: String| Error::InvalidArgument {
        what: "transcoder output hook",
        value: name.to_string(),
        message,
    };
    let point = match model.resolve_hooks(&[name])?[..] {
        [point] => point,
        ref points => {
            return Err(bad(format!(
                "names {} hook points; a transcoder writes one",
                points.len()
            )));
        }
    };
    let order = |p: HookPoint| model.hook_points().iter().position(|&q| q == p);
    if order(point) <= order(input) {
        return Err(bad(format!(
            "does not come after the hook the transcoder reads ({input}) in the forward pass"
        )));
    }
    Ok(point)
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

/// An SAE (or a transcoder) ready to encode and decode activations.
#[derive(Clone, Debug)]
pub struct Sae {
    pub architecture: Architecture,
    /// `[d_in, d_sae]`.
    pub w_enc: Tensor,
    /// `[d_sae, d_out]`.
    pub w_dec: Tensor,
    /// `[d_sae]`.
    pub b_enc: Tensor,
    /// `[d_out]`.
    pub b_dec: Tensor,
    /// `[d_sae]`, for JumpReLU and BatchTopK.
    pub threshold: Option<Tensor>,
    pub apply_b_dec_to_input: bool,
    /// Whether the decoder predicts another hook than the encoder reads (see the module doc).
    pub transcoder: bool,
    /// `[d_out, d_in]`: a skip transcoder's affine path from input to output.
    pub w_skip: Option<Tensor>,
}

impl Sae {
    pub fn d_in(&self) -> usize {
        self.w_enc.dim(0).unwrap_or(0)
    }

    /// Width of what the decoder writes: `d_in` for an SAE, the output hook's for a transcoder.
    pub fn d_out(&self) -> usize {
        self.b_dec.dim(0).unwrap_or(0)
    }

    pub fn d_sae(&self) -> usize {
        self.b_enc.dim(0).unwrap_or(0)
    }

    /// Checks shapes against each other; errors name the tensor.
    pub fn validate(&self, source: &std::path::Path) -> Result<()> {
        let (d_in, d_sae, d_out) = (self.d_in(), self.d_sae(), self.d_out());
        for (key, size) in [("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)] {
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
        check("W_dec", &self.w_dec, &[d_sae, d_out])?;
        if let Some(t) = &self.threshold {
            check("threshold", t, &[d_sae])?;
        }
        if let Some(t) = &self.w_skip {
            check("W_skip", t, &[d_out, d_in])?;
        }
        if !self.transcoder {
            if d_out != d_in {
                return Err(Error::config(
                    source,
                    "b_dec",
                    format!(
                        "is {d_out} wide but W_enc reads {d_in}: an SAE decodes what it reads \
                         (only a transcoder writes another width)"
                    ),
                ));
            }
            if self.w_skip.is_some() {
                return Err(Error::config(
                    source,
                    "W_skip",
                    "is a skip transcoder's weight, but the SAE is not a transcoder",
                ));
            }
        }
        if self.transcoder && self.apply_b_dec_to_input {
            return Err(Error::config(
                source,
                "apply_b_dec_to_input",
                "is true, but a transcoder never subtracts b_dec (an output-space bias) from \
                 its input",
            ));
        }
        // A diverged or corrupt save (inf or NaN) would poison every code computed from it.
        let tensors = [
            ("W_enc", Some(&self.w_enc)),
            ("W_dec", Some(&self.w_dec)),
            ("b_enc", Some(&self.b_enc)),
            ("b_dec", Some(&self.b_dec)),
            ("threshold", self.threshold.as_ref()),
            ("W_skip", self.w_skip.as_ref()),
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

    /// Reconstruction `[.., d_out]` of latent activations `[.., d_sae]` (for a skip transcoder,
    /// without the skip path, which needs the input: see [`Sae::output`]).
    pub fn decode(&self, acts: &Tensor) -> Result<Tensor> {
        Ok(acts
            .broadcast_matmul(&self.w_dec)?
            .broadcast_add(&self.b_dec)?)
    }

    /// What the SAE puts in place of its output hook for input `x` `[.., d_in]`: the
    /// reconstruction of `x`, or a transcoder's prediction (with its skip path), `[.., d_out]`.
    pub fn output(&self, x: &Tensor) -> Result<Tensor> {
        let decoded = self.decode(&self.encode(x)?)?;
        match &self.w_skip {
            None => Ok(decoded),
            Some(w_skip) => {
                let x = x.to_dtype(w_skip.dtype())?;
                Ok((decoded + x.broadcast_matmul(&w_skip.t()?)?)?)
            }
        }
    }

    /// Moves every tensor to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let move_to = |t: &Tensor| t.to_device(device);
        Ok(Self {
            w_enc: move_to(&self.w_enc)?,
            w_dec: move_to(&self.w_dec)?,
            b_enc: move_to(&self.b_enc)?,
            b_dec: move_to(&self.b_dec)?,
            threshold: self.threshold.as_ref().map(move_to).transpose()?,
            w_skip: self.w_skip.as_ref().map(move_to).transpose()?,
            ..self.clone()
        })
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
        out.w_skip = self
            .w_skip
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
