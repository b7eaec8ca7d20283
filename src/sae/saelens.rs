//! The SAELens directory format: `cfg.json` + `sae_weights.safetensors` (+ optional
//! `sparsity.safetensors`). Reads SAELens ≥ 6 configs (settings at the top level, run details
//! under `metadata`) and the flat pre-6.0 ones (`hook_name` etc. at the top level, the
//! architecture implied by `activation_fn_str`); writes the v6 layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value;

use super::{Architecture, Sae};
use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::model::weights::Weights;

pub const CONFIG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
pub const SPARSITY_FILE: &str = "sparsity.safetensors";

/// Where an SAE was trained: SAELens keeps these under `metadata`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SaeMetadata {
    pub model_name: String,
    pub hook_name: String,
    pub context_size: usize,
    pub prepend_bos: bool,
    pub dataset_path: String,
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

fn usize_key(path: &Path, cfg: &Value, key: &str) -> Result<usize> {
    lookup(cfg, key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| config_error(path, key, "missing or not a non-negative integer"))
}

fn string_key(cfg: &Value, key: &str) -> String {
    lookup(cfg, key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The architecture named by a config of either generation.
fn architecture(path: &Path, cfg: &Value) -> Result<Architecture> {
    let k = || -> Result<usize> {
        lookup(cfg, "k")
            .or_else(|| cfg.get("activation_fn_kwargs").and_then(|a| a.get("k")))
            .and_then(Value::as_u64)
            .map(|k| k as usize)
            .ok_or_else(|| config_error(path, "k", "missing for a top-k SAE"))
    };
    let name = match cfg.get("architecture").and_then(Value::as_str) {
        Some(name) => name.to_string(),
        // Pre-6.0: no architecture key, a top-k activation function instead.
        None => match cfg.get("activation_fn_str").and_then(Value::as_str) {
            Some("topk") => "topk".to_string(),
            Some("relu") | None => "standard".to_string(),
            Some(other) => {
                return Err(config_error(
                    path,
                    "activation_fn_str",
                    format!("`{other}` is not supported (relu or topk)"),
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
                format!("`{other}` is not supported (standard, topk, batchtopk, jumprelu)"),
            ));
        }
    })
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
    let architecture = architecture(&cfg_path, &cfg)?;
    let d_in = usize_key(&cfg_path, &cfg, "d_in")?;
    let d_sae = usize_key(&cfg_path, &cfg, "d_sae")?;
    let normalize = string_key(&cfg, "normalize_activations");
    if !matches!(normalize.as_str(), "" | "none") {
        return Err(config_error(
            &cfg_path,
            "normalize_activations",
            format!(
                "`{normalize}` is not supported: save the SAE with the scaling folded into its weights (normalize_activations: none)"
            ),
        ));
    }
    let apply_b_dec_to_input = lookup(&cfg, "apply_b_dec_to_input")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let weights = Weights::open_file(&dir.join(WEIGHTS_FILE), dtype, device)?;
    let threshold = if architecture.has_threshold() {
        Some(weights.get("threshold", &[d_sae])?)
    } else {
        None
    };
    let sae = Sae {
        w_enc: weights.get("W_enc", &[d_in, d_sae])?,
        w_dec: weights.get("W_dec", &[d_sae, d_in])?,
        b_enc: weights.get("b_enc", &[d_sae])?,
        b_dec: weights.get("b_dec", &[d_in])?,
        threshold,
        architecture,
        apply_b_dec_to_input,
    };
    sae.validate(&dir.join(WEIGHTS_FILE))?;
    let sparsity_path = dir.join(SPARSITY_FILE);
    let sparsity = if sparsity_path.is_file() {
        Some(Weights::open_file(&sparsity_path, DType::F32, device)?.get("sparsity", &[d_sae])?)
    } else {
        None
    };
    let metadata = SaeMetadata {
        model_name: string_key(&cfg, "model_name"),
        hook_name: string_key(&cfg, "hook_name"),
        context_size: lookup(&cfg, "context_size")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize,
        prepend_bos: lookup(&cfg, "prepend_bos")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        dataset_path: string_key(&cfg, "dataset_path"),
    };
    Ok(SaeDir {
        sae,
        metadata,
        sparsity,
    })
}

/// The v6 `cfg.json` of an SAE.
pub fn config_json(sae: &Sae, metadata: &SaeMetadata) -> Value {
    let dtype = match sae.w_enc.dtype() {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let mut cfg = serde_json::json!({
        "architecture": sae.architecture.name(),
        "d_in": sae.d_in(),
        "d_sae": sae.d_sae(),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    });
    if let Architecture::TopK { k } | Architecture::BatchTopK { k } = sae.architecture {
        cfg["k"] = k.into();
    }
    cfg
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
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let sae = &sae_dir.sae;
    let mut tensors: HashMap<String, Tensor> = HashMap::from([
        ("W_enc".to_string(), sae.w_enc.clone()),
        ("W_dec".to_string(), sae.w_dec.clone()),
        ("b_enc".to_string(), sae.b_enc.clone()),
        ("b_dec".to_string(), sae.b_dec.clone()),
    ]);
    if let Some(t) = &sae.threshold {
        tensors.insert("threshold".to_string(), t.clone());
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
    let json =
        serde_json::to_string_pretty(&config_json(sae, &sae_dir.metadata)).map_err(|source| {
            Error::Json {
                path: cfg_path.clone(),
                source,
            }
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
        }
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
            assert_eq!(loaded.sae.architecture, arch);
            assert_eq!(loaded.metadata, metadata);
            let a = sae.encode(&x).unwrap();
            let b = loaded.sae.encode(&x).unwrap();
            let diff = (a.clone() - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
            if let Architecture::TopK { k } = arch {
                let active = a
                    .gt(0f32)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum(1)
                    .unwrap();
                assert!(
                    active
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .all(|&n| n <= k as f32)
                );
            }
        }
    }

    #[test]
    fn pre_6_flat_configs_load() {
        let dir = tempfile::tempdir().unwrap();
        let sae = random_sae(Architecture::TopK { k: 2 }, 4, 6);
        let tensors = HashMap::from([
            ("W_enc".to_string(), sae.w_enc.clone()),
            ("W_dec".to_string(), sae.w_dec.clone()),
            ("b_enc".to_string(), sae.b_enc.clone()),
            ("b_dec".to_string(), sae.b_dec.clone()),
        ]);
        candle_core::safetensors::save(&tensors, dir.path().join(WEIGHTS_FILE)).unwrap();
        let cfg = serde_json::json!({
            "d_in": 4, "d_sae": 6, "hook_name": "blocks.0.hook_resid_pre",
            "model_name": "gpt2", "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": false,
            "normalize_activations": "none", "context_size": 128, "prepend_bos": true,
        });
        std::fs::write(dir.path().join(CONFIG_FILE), cfg.to_string()).unwrap();
        let loaded = load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.sae.architecture, Architecture::TopK { k: 2 });
        assert_eq!(loaded.metadata.hook_name, "blocks.0.hook_resid_pre");
        assert!(loaded.metadata.prepend_bos);
        assert!(!loaded.sae.apply_b_dec_to_input);
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
        let err = load(dir.path(), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains(WEIGHTS_FILE) && err.contains("W_enc"), "{err}");
        cfg["d_sae"] = 6.into();
        cfg["architecture"] = "gated".into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let err = load(dir.path(), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg.json") && err.contains("architecture") && err.contains("gated"),
            "{err}"
        );
    }
}
