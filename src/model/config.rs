//! Reading `config.json`: the raw JSON plus typed look-ups whose errors name the file and key,
//! and the settings every architecture shares (rotary parameters in both spellings).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::layers::Activation;
use crate::error::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";

/// A parsed `config.json`.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub json: serde_json::Value,
}

impl ConfigFile {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "model config",
            });
        }
        let json = crate::files::read_json(&path)?;
        Ok(Self { path, json })
    }

    /// A config built in memory (e.g. by the trainer); `path` names it in errors.
    pub fn from_json(path: impl Into<PathBuf>, json: serde_json::Value) -> Self {
        Self {
            path: path.into(),
            json,
        }
    }

    pub fn model_type(&self) -> Result<&str> {
        self.json
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(&self.path, "model_type", "missing or not a string"))
    }

    /// Deserialises the whole file into an architecture's typed config.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.json.clone()).map_err(|e| {
            // serde names the field ("missing field `n_embd`"); keep that, add the file.
            Error::config(&self.path, field_of(&e.to_string()), e.to_string())
        })
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(&self.path, key, message)
    }

    /// Sizes that shapes are divided by or built from: each must be at least 1.
    pub fn require_positive(&self, sizes: &[(&str, usize)]) -> Result<()> {
        match sizes.iter().find(|(_, value)| *value == 0) {
            Some((key, _)) => Err(self.error(key, "is 0; must be at least 1")),
            None => Ok(()),
        }
    }

    /// Parses a transformers activation name found under `key`.
    pub fn activation(&self, key: &str, name: &str) -> Result<Activation> {
        Activation::from_hf_name(name).ok_or_else(|| {
            self.error(
                key,
                format!("unsupported activation `{name}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish, relu)"),
            )
        })
    }

    /// `eos_token_id` as a list (configs write an int or a list).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.json
            .get("bos_token_id")
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as u32)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self.json.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn field_of(serde_message: &str) -> String {
    serde_message
        .split('`')
        .nth(1)
        .unwrap_or("config")
        .to_string()
}

/// transformers v5's `rope_parameters` object (older files spell these at the top level).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
    pub partial_rotary_factor: Option<f64>,
}

/// Resolves the rotary base from `rope_parameters.rope_theta`, or the legacy top-level key, or
/// the architecture's default; rejects rope scaling types this engine does not implement.
pub fn rope_theta(
    config: &ConfigFile,
    params: Option<&RopeParameters>,
    legacy: Option<f64>,
    default: f64,
) -> Result<f64> {
    if let Some(kind) = params.and_then(|p| p.rope_type.as_deref())
        && kind != "default"
    {
        return Err(config.error(
            "rope_parameters.rope_type",
            format!("rope scaling `{kind}` is not supported (only `default`)"),
        ));
    }
    if let Some(scaling) = config.json.get("rope_scaling")
        && !scaling.is_null()
    {
        return Err(config.error("rope_scaling", "rope scaling is not supported"));
    }
    Ok(params
        .and_then(|p| p.rope_theta)
        .or(legacy)
        .unwrap_or(default))
}
