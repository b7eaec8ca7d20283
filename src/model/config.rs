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

/// transformers v5's `rope_parameters` object (older files spell these at the top level, and
/// the scaling under `rope_scaling`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
    /// Pre-v4.45 spelling of `rope_type` inside `rope_scaling`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub partial_rotary_factor: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<f64>,
}

/// How a model stretches its rotary frequencies to reach a longer context than it was first
/// trained on (transformers' `ROPE_INIT_FUNCTIONS`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: wavelengths longer than `original / low_freq_factor` divided by `factor`,
    /// shorter than `original / high_freq_factor` kept, a linear blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// The scaled inverse frequency (radians per position) of one rotary pair.
    pub fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen > original / low_freq_factor {
                    inv_freq / factor
                } else if wavelen < original / high_freq_factor {
                    inv_freq
                } else {
                    let smooth = (original / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

impl std::fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RopeScaling::None => write!(f, "no scaling"),
            RopeScaling::Linear { factor } => write!(f, "linear scaling (factor {factor})"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => write!(
                f,
                "llama3 scaling (factor {factor}, low {low_freq_factor}, high \
                 {high_freq_factor}, original context {original_max_position_embeddings})"
            ),
        }
    }
}

/// The rotary settings of a config: its base and its scaling.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Resolves the rotary base from `rope_parameters.rope_theta`, or the legacy top-level key, or
/// the architecture's default, and the scaling from `rope_parameters` or the legacy
/// `rope_scaling`; rejects scaling types this engine does not implement.
pub fn rope(
    config: &ConfigFile,
    params: Option<&RopeParameters>,
    legacy_theta: Option<f64>,
    default: f64,
) -> Result<Rope> {
    let legacy_scaling: Option<RopeParameters> = match config.json.get("rope_scaling") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|e| config.error("rope_scaling", e.to_string()))?,
        ),
    };
    let (scaling_params, section) = match (params, &legacy_scaling) {
        (_, Some(legacy)) => (Some(legacy), "rope_scaling"),
        (Some(p), None) => (Some(p), "rope_parameters"),
        (None, None) => (None, "rope_parameters"),
    };
    let kind = scaling_params
        .and_then(|p| p.rope_type.as_deref().or(p.legacy_type.as_deref()))
        .unwrap_or("default");
    let key = |name: &str| format!("{section}.{name}");
    let positive = |name: &str, value: Option<f64>| -> Result<f64> {
        match value {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            Some(v) => Err(config.error(&key(name), format!("{v} must be a positive number"))),
            None => Err(config.error(&key(name), format!("missing (rope type `{kind}` needs it)"))),
        }
    };
    let scaling = match (kind, scaling_params) {
        ("default", _) | (_, None) => RopeScaling::None,
        ("linear", Some(p)) => RopeScaling::Linear {
            factor: positive("factor", p.factor)?,
        },
        ("llama3", Some(p)) => {
            let scaling = RopeScaling::Llama3 {
                factor: positive("factor", p.factor)?,
                low_freq_factor: positive("low_freq_factor", p.low_freq_factor)?,
                high_freq_factor: positive("high_freq_factor", p.high_freq_factor)?,
                original_max_position_embeddings: positive(
                    "original_max_position_embeddings",
                    p.original_max_position_embeddings,
                )?,
            };
            if let (Some(low), Some(high)) = (p.low_freq_factor, p.high_freq_factor)
                && high <= low
            {
                return Err(config.error(
                    &key("high_freq_factor"),
                    format!("{high} must exceed low_freq_factor ({low})"),
                ));
            }
            scaling
        }
        (other, Some(_)) => {
            return Err(config.error(
                &key("rope_type"),
                format!("rope scaling `{other}` is not supported (default, linear, llama3)"),
            ));
        }
    };
    let theta = params
        .and_then(|p| p.rope_theta)
        .or(legacy_theta)
        .unwrap_or(default);
    Ok(Rope { theta, scaling })
}
