//! The SAELens directory format: `cfg.json` + `sae_weights.safetensors` (+ optional
//! `sparsity.safetensors`). Reads SAELens ≥ 6 configs (settings at the top level, run details
//! under `metadata`) and the flat pre-6.0 ones (`hook_name`/`hook_point` etc. at the top level,
//! top-k implied by `activation_fn_str: "topk"`); writes the v6 layout that
//! [`SAELENS_FORMAT_VERSION`] writes, so `sae_lens` reads our folders back as v6.
//!
//! BatchTopK is saved the way SAELens saves it (it has no BatchTopK inference class): as a
//! JumpReLU with the learned threshold per latent, the training `k` kept under
//! `metadata.training_architecture_details`. Such a folder loads back as
//! [`Architecture::JumpRelu`] (the same maths).
//!
//! Transcoders use SAELens's transcoder family: `transcoder` (ReLU), `skip_transcoder` (ReLU and
//! `W_skip`), `jumprelu_transcoder` and `jumprelu_skip_transcoder`, with `d_out` at the top level
//! and the hook they write as `metadata.hook_name_out`. SAELens has no top-k transcoder class: a
//! top-k transcoder (sparsify's kind) is saved as `topk` with `d_out` and `hook_name_out`, which
//! SAELens's `HookedSAETransformer` splices at that output hook; a top-k *skip* transcoder has
//! no SAELens form and is refused.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Architecture, Sae};
use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::model::weights::Weights;

pub const CONFIG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
pub const SPARSITY_FILE: &str = "sparsity.safetensors";

/// The SAELens release whose directory format we write (`metadata.sae_lens_version` and
/// `metadata.sae_lens_training_version`): any 6.x makes SAELens read the config as v6 and keep
/// the nested metadata (model_name, hook_name, context_size …).
pub const SAELENS_FORMAT_VERSION: &str = "6.54.12";

/// Where an SAE was trained: SAELens keeps these under `metadata`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SaeMetadata {
    pub model_name: String,
    pub hook_name: String,
    pub context_size: usize,
    pub prepend_bos: bool,
    pub dataset_path: String,
    /// The hook a transcoder writes (empty for an SAE, which writes the hook it reads).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hook_name_out: String,
}

/// An SAE with its metadata, as stored in a directory.
#[derive(Clone, Debug)]
pub struct SaeDir {
    pub sae: Sae,
    pub metadata: SaeMetadata,
    /// log10 firing frequency per latent, when saved.
    pub sparsity: Option<Tensor>,
}

fn config_error(path: &Path, key: &str, message: impl Into<String>) -> Error {
    Error::config(path, key, message)
}

/// Reads `key` from the top level, or else from `metadata` (v6 moved run details there).
fn lookup<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    cfg.get(key)
        .or_else(|| cfg.get("metadata").and_then(|m| m.get(key)))
        .filter(|v| !v.is_null())
}

/// The first of `keys` (current name first, then pre-6.0 names) that is set.
fn lookup_any<'a>(cfg: &'a Value, keys: &[&str]) -> Option<(&'a Value, String)> {
    keys.iter()
        .find_map(|key| lookup(cfg, key).map(|v| (v, key.to_string())))
}

/// A non-negative integer, also written as an integral float (`32.0`, as Python may save it).
fn as_count(v: &Value) -> Option<usize> {
    if let Some(n) = v.as_u64() {
        return usize::try_from(n).ok();
    }
    let f = v.as_f64()?;
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= usize::MAX as f64).then_some(f as usize)
}

/// An optional count: `None` when missing or null, an error when set to anything else.
pub(super) fn optional_count(path: &Path, cfg: &Value, keys: &[&str]) -> Result<Option<usize>> {
    match lookup_any(cfg, keys) {
        None => Ok(None),
        Some((v, key)) => as_count(v)
            .map(Some)
            .ok_or_else(|| config_error(path, &key, format!("{v} is not a non-negative integer"))),
    }
}

pub(super) fn usize_key(path: &Path, cfg: &Value, key: &str) -> Result<usize> {
    optional_count(path, cfg, &[key])?
        .ok_or_else(|| config_error(path, key, "missing or not a non-negative integer"))
}

fn string_key(cfg: &Value, keys: &[&str]) -> String {
    lookup_any(cfg, keys)
        .and_then(|(v, _)| v.as_str())
        .unwrap_or_default()
        .to_string()
}

pub(super) fn optional_bool(path: &Path, cfg: &Value, key: &str) -> Result<Option<bool>> {
    match lookup(cfg, key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| config_error(path, key, format!("{v} is not true or false"))),
    }
}

/// Whether SAELens would read `cfg` as a pre-6.0 config: no `sae_lens_version` (top level or
/// under `metadata`), or one below 6.
fn is_pre_6(cfg: &Value) -> bool {
    let major = lookup(cfg, "sae_lens_version")
        .and_then(Value::as_str)
        .and_then(|v| {
            v.trim_start_matches('v')
                .split('.')
                .next()?
                .parse::<u64>()
                .ok()
        });
    major.is_none_or(|m| m < 6)
}

/// What a config's `architecture` says: the activation, whether the SAE is a transcoder, and
/// whether it has a skip path (`W_skip`).
struct Declared {
    architecture: Architecture,
    transcoder: bool,
    skip: bool,
}

/// The architecture named by a config of either generation, SAELens's transcoder names
/// included; a `hook_name_out` makes any architecture a transcoder.
fn declared(path: &Path, cfg: &Value) -> Result<Declared> {
    let name = cfg.get("architecture").and_then(Value::as_str);
    let (base, transcoder, skip) = match name {
        Some("transcoder") => ("standard", true, false),
        Some("skip_transcoder") => ("standard", true, true),
        Some("jumprelu_transcoder") => ("jumprelu", true, false),
        Some("jumprelu_skip_transcoder") => ("jumprelu", true, true),
        _ => {
            let out = lookup(cfg, "hook_name_out").and_then(Value::as_str);
            return Ok(Declared {
                architecture: architecture(path, cfg)?,
                transcoder: out.is_some_and(|o| !o.is_empty()),
                skip: false,
            });
        }
    };
    let mut plain = cfg.clone();
    plain["architecture"] = base.into();
    Ok(Declared {
        architecture: architecture(path, &plain)?,
        transcoder,
        skip,
    })
}

/// The architecture named by a config of either generation.
fn architecture(path: &Path, cfg: &Value) -> Result<Architecture> {
    let k = || -> Result<usize> {
        let (v, key) = lookup_any(cfg, &["k"])
            .or_else(|| {
                lookup(cfg, "activation_fn_kwargs")
                    .and_then(|a| a.get("k"))
                    .filter(|v| !v.is_null())
                    .map(|v| (v, "activation_fn_kwargs.k".to_string()))
            })
            .ok_or_else(|| config_error(path, "k", "missing for a top-k SAE"))?;
        as_count(v)
            .ok_or_else(|| config_error(path, &key, format!("{v} is not a non-negative integer")))
    };
    let declared = cfg.get("architecture").and_then(Value::as_str);
    // Pre-6.0 configs (and any without `architecture`) say top-k through the activation
    // function; SAELens 5.x wrote `architecture: "standard"` for its top-k SAEs too.
    let name = match declared {
        Some(name) if !(name == "standard" && is_pre_6(cfg)) => name.to_string(),
        _ => match lookup_any(cfg, &["activation_fn_str", "activation_fn"]) {
            Some((v, _)) if v.as_str() == Some("topk") => "topk".to_string(),
            Some((v, _)) if v.as_str() == Some("relu") => declared.unwrap_or("standard").into(),
            None => declared.unwrap_or("standard").into(),
            Some((v, key)) => {
                return Err(config_error(
                    path,
                    &key,
                    format!("{v} is not supported (relu or topk)"),
                ));
            }
        },
    };
    Ok(match name.as_str() {
        "standard" => Architecture::Standard,
        "topk" => Architecture::TopK { k: k()? },
        "batchtopk" => Architecture::BatchTopK { k: k()? },
        "jumprelu" => Architecture::JumpRelu,
        other => {
            return Err(config_error(
                path,
                "architecture",
                format!(
                    "`{other}` is not supported (standard, topk, batchtopk, jumprelu, \
                     transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder)"
                ),
            ));
        }
    })
}

/// Checks `normalize_activations`: only settings that are the identity at inference for a
/// folder on disk are accepted. `expected_average_only_in` is one: SAELens folds its scaling
/// factor into the weights only for pretrained releases it knows, never in `load_from_disk`.
/// Pre-6.0 configs may hold a bool (false = none, true = expected_average_only_in).
fn check_normalization(path: &Path, cfg: &Value) -> Result<()> {
    let key = "normalize_activations";
    match lookup(cfg, key) {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(Value::String(s)) if matches!(s.as_str(), "none" | "expected_average_only_in") => {
            Ok(())
        }
        Some(other) => Err(config_error(
            path,
            key,
            format!(
                "{other} is not supported (none or expected_average_only_in): save the SAE with the scaling folded into its weights"
            ),
        )),
    }
}

/// Folds SAELens's `rescale_acts_by_decoder_norm` into the weights. SAELens's top-k encode is
/// `topk(pre · ‖W_dec‖_row)` and its decode `(acts / ‖W_dec‖_row) @ W_dec + b_dec`;
/// with `W_enc' = W_enc · ‖W_dec‖`, `b_enc' = b_enc · ‖W_dec‖`, `W_dec' = W_dec / ‖W_dec‖`
/// the plain top-k SAE gives the same activations and reconstructions (what
/// `TopKTrainingSAE.save_inference_model` does too).
fn fold_decoder_norm(sae: &mut Sae, path: &Path) -> Result<()> {
    let dtype = sae.w_dec.dtype();
    let w_dec = sae.w_dec.to_dtype(DType::F64)?;
    let norms = w_dec.sqr()?.sum_keepdim(1)?.sqrt()?; // [d_sae, 1]
    let bad = norms
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .position(|n| !(n.is_finite() && *n > 0.0));
    if let Some(i) = bad {
        return Err(config_error(
            path,
            "rescale_acts_by_decoder_norm",
            format!("W_dec row {i} has norm zero (or not finite): cannot rescale by it"),
        ));
    }
    sae.w_dec = w_dec.broadcast_div(&norms)?.to_dtype(dtype)?;
    sae.w_enc = sae
        .w_enc
        .to_dtype(DType::F64)?
        .broadcast_mul(&norms.t()?)?
        .to_dtype(dtype)?;
    sae.b_enc = (sae.b_enc.to_dtype(DType::F64)? * norms.squeeze(1)?)?.to_dtype(dtype)?;
    Ok(())
}

/// Loads an SAE directory onto `device` in `dtype`.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(Error::MissingFile {
            path: cfg_path,
            what: "SAE config (cfg.json)",
        });
    }
    let cfg: Value = read_json(&cfg_path)?;
    let Declared {
        architecture,
        transcoder,
        skip,
    } = declared(&cfg_path, &cfg)?;
    let d_in = usize_key(&cfg_path, &cfg, "d_in")?;
    let d_sae = usize_key(&cfg_path, &cfg, "d_sae")?;
    let d_out = optional_count(&cfg_path, &cfg, &["d_out"])?.unwrap_or(d_in);
    check_normalization(&cfg_path, &cfg)?;
    // SAELens's default, which its transcoder configs must turn off.
    let apply_b_dec_to_input =
        optional_bool(&cfg_path, &cfg, "apply_b_dec_to_input")?.unwrap_or(!transcoder);
    // SAELens reads it for top-k SAEs only (other configs have no such field).
    let rescale = matches!(architecture, Architecture::TopK { .. })
        && optional_bool(&cfg_path, &cfg, "rescale_acts_by_decoder_norm")?.unwrap_or(false);
    let weights = Weights::open_file(&dir.join(WEIGHTS_FILE), dtype, device)?;
    let threshold = if architecture.has_threshold() {
        Some(weights.get("threshold", &[d_sae])?)
    } else {
        None
    };
    let w_skip = if skip {
        Some(weights.get("W_skip", &[d_out, d_in])?)
    } else {
        None
    };
    let mut sae = Sae {
        w_enc: weights.get("W_enc", &[d_in, d_sae])?,
        w_dec: weights.get("W_dec", &[d_sae, d_out])?,
        b_enc: weights.get("b_enc", &[d_sae])?,
        b_dec: weights.get("b_dec", &[d_out])?,
        threshold,
        architecture,
        apply_b_dec_to_input,
        transcoder,
        w_skip,
    };
    sae.validate(&dir.join(WEIGHTS_FILE))?;
    if rescale {
        fold_decoder_norm(&mut sae, &cfg_path)?;
    }
    let sparsity_path = dir.join(SPARSITY_FILE);
    let sparsity = if sparsity_path.is_file() {
        Some(Weights::open_file(&sparsity_path, DType::F32, device)?.get("sparsity", &[d_sae])?)
    } else {
        None
    };
    // An SAE of one attention head's `hook_z` slice: monoscope hooks whole activations only.
    let head_keys = [
        "hook_head_index",
        "hook_point_head_index",
        "hook_head_index_out",
    ];
    if let Some(head) = optional_count(&cfg_path, &cfg, &head_keys)? {
        let key = head_keys
            .into_iter()
            .find(|k| lookup(&cfg, k).is_some())
            .unwrap_or(head_keys[0]);
        return Err(config_error(
            &cfg_path,
            key,
            format!("head {head}: SAEs of a single attention head are not supported"),
        ));
    }
    let metadata = SaeMetadata {
        model_name: string_key(&cfg, &["model_name"]),
        hook_name: string_key(&cfg, &["hook_name", "hook_point"]),
        context_size: optional_count(&cfg_path, &cfg, &["context_size"])?.unwrap_or(0),
        // SAELens's default (pre-6.0 configs may omit it).
        prepend_bos: optional_bool(&cfg_path, &cfg, "prepend_bos")?.unwrap_or(true),
        dataset_path: string_key(&cfg, &["dataset_path"]),
        hook_name_out: string_key(&cfg, &["hook_name_out"]),
    };
    Ok(SaeDir {
        sae,
        metadata,
        sparsity,
    })
}

/// The v6 `cfg.json` of an SAE; an error for a top-k skip transcoder, which SAELens cannot
/// express.
pub fn config_json(sae: &Sae, metadata: &SaeMetadata) -> Result<Value> {
    let dtype = match sae.w_enc.dtype() {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    };
    let mut meta = serde_json::to_value(metadata).unwrap_or_else(|_| serde_json::json!({}));
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION.into();
    meta["sae_lens_training_version"] = SAELENS_FORMAT_VERSION.into();
    // SAELens has no BatchTopK inference SAE: BatchTopKTrainingSAE.save_inference_model writes a
    // JumpReLU (threshold per latent) and keeps k in the training details.
    let architecture = match sae.architecture {
        Architecture::BatchTopK { k } => {
            meta["training_architecture"] = "batchtopk".into();
            meta["training_architecture_details"] = serde_json::json!({ "k": k });
            "jumprelu"
        }
        ref other => other.name(),
    };
    let architecture = match (architecture, sae.transcoder, sae.w_skip.is_some()) {
        (name, false, _) => name,
        ("standard", true, false) => "transcoder",
        ("standard", true, true) => "skip_transcoder",
        ("jumprelu", true, false) => "jumprelu_transcoder",
        ("jumprelu", true, true) => "jumprelu_skip_transcoder",
        (name, true, false) => name,
        (name, true, true) => {
            return Err(Error::InvalidArgument {
                what: "SAE",
                value: format!("a {name} skip transcoder"),
                message: "has no SAELens form (SAELens's skip transcoders are ReLU or \
                          JumpReLU)"
                    .into(),
            });
        }
    };
    let mut cfg = serde_json::json!({
        "architecture": architecture,
        "d_in": sae.d_in(),
        "d_sae": sae.d_sae(),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    });
    if let Architecture::TopK { k } = sae.architecture {
        cfg["k"] = k.into();
        cfg["rescale_acts_by_decoder_norm"] = false.into();
    }
    if sae.transcoder {
        cfg["d_out"] = sae.d_out().into();
    }
    Ok(cfg)
}

/// Writes `dir` (created if missing; refuses to replace an existing SAE unless `overwrite`).
/// Each file goes through a temporary name, so a crash never leaves a half-written SAE.
pub fn save(dir: &Path, sae_dir: &SaeDir, overwrite: bool) -> Result<()> {
    let cfg_path = dir.join(CONFIG_FILE);
    if cfg_path.exists() && !overwrite {
        return Err(Error::InvalidArgument {
            what: "SAE output folder",
            value: dir.display().to_string(),
            message: "already holds an SAE (cfg.json); choose another folder".into(),
        });
    }
    let sae = &sae_dir.sae;
    if sae.architecture.has_threshold() && sae.threshold.is_none() {
        return Err(Error::InvalidArgument {
            what: "SAE",
            value: sae.architecture.name().into(),
            message: "has no threshold to save".into(),
        });
    }
    let cfg = config_json(sae, &sae_dir.metadata)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::from([
        ("W_enc".to_string(), sae.w_enc.clone()),
        ("W_dec".to_string(), sae.w_dec.clone()),
        ("b_enc".to_string(), sae.b_enc.clone()),
        ("b_dec".to_string(), sae.b_dec.clone()),
    ]);
    if let Some(t) = &sae.threshold {
        tensors.insert("threshold".to_string(), t.clone());
    }
    if let Some(t) = &sae.w_skip {
        tensors.insert("W_skip".to_string(), t.clone());
    }
    write_atomic(&dir.join(WEIGHTS_FILE), |tmp| {
        candle_core::safetensors::save(&tensors, tmp)?;
        Ok(())
    })?;
    if let Some(sparsity) = &sae_dir.sparsity {
        let map = HashMap::from([("sparsity".to_string(), sparsity.clone())]);
        write_atomic(&dir.join(SPARSITY_FILE), |tmp| {
            candle_core::safetensors::save(&map, tmp)?;
            Ok(())
        })?;
    }
    let json = serde_json::to_string_pretty(&cfg).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    // cfg.json last: a folder with a cfg.json is a complete SAE.
    write_atomic(&cfg_path, |tmp| {
        std::fs::write(tmp, json).map_err(|e| Error::io(tmp, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_sae(architecture: Architecture, d_in: usize, d_sae: usize) -> Sae {
        let dev = Device::Cpu;
        let threshold = architecture
            .has_threshold()
            .then(|| Tensor::rand(0f32, 0.5, d_sae, &dev).unwrap());
        Sae {
            architecture,
            w_enc: Tensor::randn(0f32, 0.3, (d_in, d_sae), &dev).unwrap(),
            w_dec: Tensor::randn(0f32, 0.3, (d_sae, d_in), &dev).unwrap(),
            b_enc: Tensor::randn(0f32, 0.1, d_sae, &dev).unwrap(),
            b_dec: Tensor::randn(0f32, 0.1, d_in, &dev).unwrap(),
            threshold,
            apply_b_dec_to_input: true,
            transcoder: false,
            w_skip: None,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn active_per_row(acts: &Tensor) -> Vec<f32> {
        acts.ne(0f32)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Writes the weights of `sae` and `cfg` as a folder, the way another tool would.
    fn write_folder(dir: &Path, sae: &Sae, cfg: &Value) {
        let mut tensors = HashMap::from([
            ("W_enc".to_string(), sae.w_enc.clone()),
            ("W_dec".to_string(), sae.w_dec.clone()),
            ("b_enc".to_string(), sae.b_enc.clone()),
            ("b_dec".to_string(), sae.b_dec.clone()),
        ]);
        if let Some(t) = &sae.threshold {
            tensors.insert("threshold".to_string(), t.clone());
        }
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE)).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        load(dir, &Device::Cpu, DType::F32).unwrap_err().to_string()
    }

    #[test]
    fn save_then_load_gives_the_same_encodings_for_every_architecture() {
        let x = Tensor::randn(0f32, 1.0, (5, 8), &Device::Cpu).unwrap();
        for arch in [
            Architecture::Standard,
            Architecture::TopK { k: 3 },
            Architecture::BatchTopK { k: 3 },
            Architecture::JumpRelu,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let sae = random_sae(arch.clone(), 8, 16);
            let metadata = SaeMetadata {
                hook_name: "blocks.3.mlp.hook_post".into(),
                ..SaeMetadata::default()
            };
            let saved = SaeDir {
                sae: sae.clone(),
                metadata: metadata.clone(),
                sparsity: None,
            };
            save(dir.path(), &saved, false).unwrap();
            assert!(
                save(dir.path(), &saved, false).is_err(),
                "must not overwrite"
            );
            let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
            // BatchTopK is saved as SAELens saves it: a JumpReLU (same maths).
            let expected = match arch {
                Architecture::BatchTopK { .. } => Architecture::JumpRelu,
                ref a => a.clone(),
            };
            assert_eq!(loaded.sae.architecture, expected);
            assert_eq!(loaded.metadata, metadata);
            let a = sae.encode(&x).unwrap();
            let b = loaded.sae.encode(&x).unwrap();
            assert_eq!(max_diff(&a, &b), 0.0);
            if let Architecture::TopK { k } = arch {
                assert!(active_per_row(&a).iter().all(|&n| n <= k as f32));
            }
        }
    }

    #[test]
    fn written_configs_are_saelens_v6() {
        let metadata = SaeMetadata {
            model_name: "gpt2".into(),
            hook_name: "blocks.3.hook_resid_post".into(),
            context_size: 128,
            ..SaeMetadata::default()
        };
        let cfg = config_json(&random_sae(Architecture::TopK { k: 3 }, 4, 6), &metadata).unwrap();
        assert_eq!(cfg["architecture"], "topk");
        assert_eq!(cfg["k"], 3);
        assert_eq!(cfg["rescale_acts_by_decoder_norm"], false);
        assert_eq!(cfg["device"], "cpu");
        assert_eq!(cfg["reshape_activations"], "none");
        assert_eq!(cfg["dtype"], "float32");
        let meta = &cfg["metadata"];
        assert_eq!(meta["sae_lens_version"], SAELENS_FORMAT_VERSION);
        assert_eq!(meta["sae_lens_training_version"], SAELENS_FORMAT_VERSION);
        assert!(SAELENS_FORMAT_VERSION.starts_with("6."));
        assert_eq!(meta["hook_name"], "blocks.3.hook_resid_post");
        assert!(!is_pre_6(&cfg));

        let batch = random_sae(Architecture::BatchTopK { k: 5 }, 4, 6);
        let cfg = config_json(&batch, &metadata).unwrap();
        assert_eq!(cfg["architecture"], "jumprelu");
        assert!(cfg.get("k").is_none());
        assert_eq!(cfg["metadata"]["training_architecture"], "batchtopk");
        assert_eq!(cfg["metadata"]["training_architecture_details"]["k"], 5);

        let f64_sae = batch.to_dtype(DType::F64).unwrap();
        assert_eq!(
            config_json(&f64_sae, &metadata).unwrap()["dtype"],
            "float64"
        );
    }

    #[test]
    fn batchtopk_saves_its_threshold_and_old_batchtopk_configs_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::BatchTopK { k: 2 }, 4, 6);
        let cfg = serde_json::json!({
            "architecture": "batchtopk", "d_in": 4, "d_sae": 6, "k": 2.0,
            "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.0.hook_resid_pre"},
        });
        write_folder(dir.path(), &sae, &cfg);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::BatchTopK { k: 2 });
        let x = Tensor::randn(0f32, 1.0, (3, 4), &Device::Cpu).unwrap();
        assert_eq!(
            max_diff(&sae.encode(&x).unwrap(), &loaded.sae.encode(&x).unwrap()),
            0.0
        );

        let mut without = sae.clone();
        without.threshold = None;
        let out = tempfile::tempdir().unwrap();
        let saved = SaeDir {
            sae: without,
            metadata: SaeMetadata::default(),
            sparsity: None,
        };
        let err = save(out.path(), &saved, false).unwrap_err().to_string();
        assert!(err.contains("threshold"), "{err}");
    }

    #[test]
    fn pre_6_flat_configs_load() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::TopK { k: 2 }, 4, 6);
        let cfg = serde_json::json!({
            "d_in": 4, "d_sae": 6, "hook_name": "blocks.0.hook_resid_pre",
            "model_name": "gpt2", "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": false,
            "normalize_activations": "none", "context_size": 128, "prepend_bos": false,
        });
        write_folder(dir.path(), &sae, &cfg);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::TopK { k: 2 });
        assert_eq!(loaded.metadata.hook_name, "blocks.0.hook_resid_pre");
        assert_eq!(loaded.metadata.context_size, 128);
        assert!(!loaded.metadata.prepend_bos);
        assert!(!loaded.sae.apply_b_dec_to_input);
    }

    #[test]
    fn saelens_5_topk_is_standard_with_a_topk_activation_fn() {
        // What SAELens 5.x wrote for a top-k SAE.
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::TopK { k: 3 }, 4, 6);
        let cfg = serde_json::json!({
            "architecture": "standard", "d_in": 4, "d_sae": 6,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
            "hook_name": "blocks.1.hook_resid_post", "sae_lens_version": "5.9.1",
        });
        write_folder(dir.path(), &sae, &cfg);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::TopK { k: 3 });
        // Missing prepend_bos: SAELens's default, true.
        assert!(loaded.metadata.prepend_bos);

        // A v6 config means what its `architecture` says (SAELens ignores the rest).
        let mut v6 = cfg.clone();
        v6["sae_lens_version"] = "6.1.0".into();
        write_folder(dir.path(), &sae, &v6);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::Standard);
    }

    #[test]
    fn old_key_names_are_read_when_the_new_ones_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::TopK { k: 2 }, 4, 6);
        let cfg = serde_json::json!({
            "d_in": 4, "d_sae": 6, "hook_point": "blocks.2.hook_resid_post",
            "hook_point_head_index": null, "activation_fn": "topk",
            "activation_fn_kwargs": {"k": 2.0}, "context_size": 64.0,
        });
        write_folder(dir.path(), &sae, &cfg);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::TopK { k: 2 });
        assert_eq!(loaded.metadata.hook_name, "blocks.2.hook_resid_post");
        assert_eq!(loaded.metadata.context_size, 64);

        // A per-head SAE is refused, naming the key (old or new spelling).
        for key in ["hook_point_head_index", "hook_head_index"] {
            let mut head = cfg.clone();
            head[key] = 5.into();
            write_folder(dir.path(), &sae, &head);
            let err = load_err(dir.path());
            assert!(err.contains("cfg.json") && err.contains(key), "{err}");
        }

        // The new names win.
        let mut both = cfg.clone();
        both["hook_name"] = "blocks.0.hook_resid_pre".into();
        both["activation_fn_str"] = "relu".into();
        write_folder(dir.path(), &sae, &both);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.metadata.hook_name, "blocks.0.hook_resid_pre");
        assert_eq!(loaded.sae.architecture, Architecture::Standard);

        let mut tanh = cfg.clone();
        tanh["activation_fn"] = "tanh-relu".into();
        write_folder(dir.path(), &sae, &tanh);
        let err = load_err(dir.path());
        assert!(
            err.contains("activation_fn") && err.contains("tanh-relu"),
            "{err}"
        );
    }

    #[test]
    fn k_may_be_an_integral_float_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::TopK { k: 2 }, 4, 6);
        let mut cfg = serde_json::json!({
            "architecture": "topk", "d_in": 4, "d_sae": 6, "k": 2.0,
            "metadata": {"sae_lens_version": "6.54.12"},
        });
        write_folder(dir.path(), &sae, &cfg);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::TopK { k: 2 });
        for bad in [
            serde_json::json!(2.5),
            serde_json::json!(-1),
            serde_json::json!("2"),
        ] {
            cfg["k"] = bad.clone();
            write_folder(dir.path(), &sae, &cfg);
            let err = load_err(dir.path());
            assert!(
                err.contains("cfg.json") && err.contains("k"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn normalize_activations_accepts_only_inference_no_ops() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::Standard, 4, 6);
        let mut cfg = serde_json::json!({
            "architecture": "standard", "d_in": 4, "d_sae": 6,
            "metadata": {"sae_lens_version": "6.54.12"},
        });
        for ok in [
            serde_json::json!("none"),
            serde_json::json!("expected_average_only_in"),
            serde_json::json!(false),
            Value::Null,
        ] {
            cfg["normalize_activations"] = ok.clone();
            write_folder(dir.path(), &sae, &cfg);
            assert!(load(dir.path(), &Device::Cpu, DType::F32).is_ok(), "{ok}");
        }
        for bad in [
            "layer_norm",
            "constant_norm_rescale",
            "covariance_whitening",
        ] {
            cfg["normalize_activations"] = bad.into();
            write_folder(dir.path(), &sae, &cfg);
            let err = load_err(dir.path());
            assert!(
                err.contains("cfg.json")
                    && err.contains("normalize_activations")
                    && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn rescale_acts_by_decoder_norm_matches_saelens_formula() {
        let dir = tempfile::tempdir().unwrap();
        let (d_in, d_sae, k) = (5, 12, 3);
        let mut sae = random_sae(Architecture::TopK { k }, d_in, d_sae);
        // Decoder rows of very different norms, so rescaling changes the top-k choice.
        let scale: Vec<f32> = (0..d_sae).map(|i| 0.2 + 0.4 * i as f32).collect();
        let scale = Tensor::from_vec(scale, (d_sae, 1), &Device::Cpu).unwrap();
        sae.w_dec = sae.w_dec.broadcast_mul(&scale).unwrap();
        let cfg = serde_json::json!({
            "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
            "rescale_acts_by_decoder_norm": true,
            "metadata": {"sae_lens_version": "6.54.12"},
        });
        write_folder(dir.path(), &sae, &cfg);
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();

        // SAELens: acts = topk(pre · ‖W_dec‖), decode(a) = (a / ‖W_dec‖) @ W_dec + b_dec.
        let x = Tensor::randn(0f32, 1.0, (7, d_in), &Device::Cpu).unwrap();
        let norms = sae.w_dec.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        let pre = sae
            .pre_activations(&x)
            .unwrap()
            .broadcast_mul(&norms)
            .unwrap();
        let plain = Sae {
            w_enc: Tensor::eye(d_sae, DType::F32, &Device::Cpu).unwrap(),
            b_enc: Tensor::zeros(d_sae, DType::F32, &Device::Cpu).unwrap(),
            b_dec: Tensor::zeros(d_sae, DType::F32, &Device::Cpu).unwrap(),
            w_dec: Tensor::eye(d_sae, DType::F32, &Device::Cpu).unwrap(),
            ..sae.clone()
        };
        let expected_acts = plain.encode(&pre).unwrap();
        let acts = loaded.sae.encode(&x).unwrap();
        assert!(max_diff(&acts, &expected_acts) < 1e-5);
        let expected_recon = sae
            .decode(&expected_acts.broadcast_div(&norms).unwrap())
            .unwrap();
        assert!(max_diff(&loaded.sae.decode(&acts).unwrap(), &expected_recon) < 1e-5);

        // The folded SAE saves as a plain top-k one.
        let out = tempfile::tempdir().unwrap();
        save(out.path(), &loaded, false).unwrap();
        let cfg: Value = read_json(&out.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(cfg["rescale_acts_by_decoder_norm"], false);
        let again = load(out.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(max_diff(&again.sae.encode(&x).unwrap(), &acts), 0.0);

        // A zero decoder row cannot be rescaled by.
        let mut zero = sae.clone();
        zero.w_dec = Tensor::zeros((d_sae, d_in), DType::F32, &Device::Cpu).unwrap();
        write_folder(dir.path(), &zero, &cfg_with_rescale(d_in, d_sae, k));
        let err = load_err(dir.path());
        assert!(
            err.contains("cfg.json") && err.contains("rescale_acts_by_decoder_norm"),
            "{err}"
        );
    }

    fn cfg_with_rescale(d_in: usize, d_sae: usize, k: usize) -> Value {
        serde_json::json!({
            "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
            "rescale_acts_by_decoder_norm": true,
            "metadata": {"sae_lens_version": "6.54.12"},
        })
    }

    #[test]
    fn topk_keeps_exactly_k_latents_even_with_ties() {
        let (d_in, d_sae, k) = (3, 8, 3);
        let sae = Sae {
            architecture: Architecture::TopK { k },
            w_enc: Tensor::zeros((d_in, d_sae), DType::F32, &Device::Cpu).unwrap(),
            w_dec: Tensor::zeros((d_sae, d_in), DType::F32, &Device::Cpu).unwrap(),
            // Pre-activations are b_enc for every token: five latents tie at 1.0.
            b_enc: Tensor::new(&[1f32, 0.5, 1.0, 1.0, 2.0, 1.0, 1.0, -1.0], &Device::Cpu).unwrap(),
            b_dec: Tensor::zeros(d_in, DType::F32, &Device::Cpu).unwrap(),
            threshold: None,
            apply_b_dec_to_input: true,
            transcoder: false,
            w_skip: None,
        };
        let x = Tensor::randn(0f32, 1.0, (4, d_in), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let acts = sae.to_dtype(dtype).unwrap().encode(&x).unwrap();
            assert_eq!(acts.dims(), &[4, d_sae]);
            assert!(
                active_per_row(&acts.to_dtype(DType::F32).unwrap())
                    .iter()
                    .all(|&n| n == k as f32),
                "{dtype:?}: {acts}"
            );
            let rows = acts.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            for row in rows {
                assert_eq!(row[4], 2.0);
                assert_eq!(
                    row.iter().sum::<f32>(),
                    4.0,
                    "the largest, then two of the ties"
                );
            }
        }
        // ReLU after the selection: with fewer than k positive pre-activations, fewer fire.
        let mut neg = sae.clone();
        neg.b_enc = Tensor::new(
            &[-1f32, 0.5, -1.0, -1.0, 2.0, -1.0, -1.0, -1.0],
            &Device::Cpu,
        )
        .unwrap();
        let acts = neg.encode(&x).unwrap();
        assert!(active_per_row(&acts).iter().all(|&n| n == 2.0));
    }

    #[test]
    fn bad_configs_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::Standard, 4, 6);
        let saved = SaeDir {
            sae,
            metadata: SaeMetadata::default(),
            sparsity: None,
        };
        save(dir.path(), &saved, false).unwrap();
        let cfg_path = dir.path().join(CONFIG_FILE);
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["d_sae"] = 7.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains(WEIGHTS_FILE) && err.contains("W_enc"), "{err}");
        cfg["d_sae"] = 6.into();
        cfg["architecture"] = "gated".into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let err = load_err(dir.path());
        assert!(
            err.contains("cfg.json") && err.contains("architecture") && err.contains("gated"),
            "{err}"
        );
    }
}
