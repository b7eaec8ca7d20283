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
    /// YaRN's multiplier on cos and sin (else derived from `factor`, `mscale`, `mscale_all_dim`).
    pub attention_factor: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub truncate: Option<bool>,
    /// LongRoPE's per-pair divisors of the frequencies, within and beyond the original context.
    pub short_factor: Option<Vec<f64>>,
    pub long_factor: Option<Vec<f64>>,
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
    /// YaRN (Peng et al. 2023): frequencies that turn fewer than `beta_slow` times over the
    /// original context divided by `factor`, more than `beta_fast` times kept, a linear ramp
    /// over the channels in between; cos and sin multiplied by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        /// Round the ramp's ends to whole channels (transformers' default).
        truncate: bool,
    },
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): each rotary pair's frequency divided by its
    /// own factor, from `short_factor` while a forward pass ends within the original context
    /// and from `long_factor` once it reaches past it; cos and sin multiplied by
    /// `attention_factor` in both.
    #[serde(rename = "longrope")]
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// The inverse frequencies (radians per position) of the `rot_dim / 2` rotary pairs for
    /// base `theta`, scaled.
    /// For LongRoPE these are the long-context frequencies; [`Self::short_context`] gives the
    /// others.
    pub fn inv_freqs(&self, theta: f64, rot_dim: usize) -> Vec<f64> {
        let plain = (0..rot_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / rot_dim as f64));
        if let RopeScaling::LongRope { long_factor, .. } = self {
            return plain.zip(long_factor).map(|(f, d)| f / d).collect();
        }
        let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } = *self
        else {
            return plain.map(|f| self.apply(f)).collect();
        };
        // The channel at which a frequency turns `rotations` times over the original context.
        let dim = rot_dim as f64;
        let channel = |rotations: f64| {
            dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (channel(beta_fast), channel(beta_slow));
        if truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dim - 1.0));
        let high = if low == high { high + 0.001 } else { high };
        plain
            .enumerate()
            .map(|(i, f)| {
                // 1 keeps the frequency (extrapolation), 0 divides it by `factor`.
                let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                f / factor * (1.0 - keep) + f * keep
            })
            .collect()
    }

    /// LongRoPE's frequencies for passes that end within the original context, and that
    /// context's length; `None` for every other scaling, whose frequencies do not depend on
    /// the length.
    pub fn short_context(&self, theta: f64, rot_dim: usize) -> Option<(usize, Vec<f64>)> {
        let RopeScaling::LongRope {
            short_factor,
            original_max_position_embeddings,
            ..
        } = self
        else {
            return None;
        };
        let short = RopeScaling::LongRope {
            short_factor: short_factor.clone(),
            long_factor: short_factor.clone(),
            original_max_position_embeddings: *original_max_position_embeddings,
            attention_factor: 1.0,
        };
        Some((
            *original_max_position_embeddings,
            short.inv_freqs(theta, rot_dim),
        ))
    }

    /// The multiplier on the rotary cos and sin tables (YaRN's and LongRoPE's attention
    /// factor; else 1).
    pub fn attention_factor(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                attention_factor, ..
            }
            | RopeScaling::LongRope {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// Checks what depends on the rotary width (known only once the architecture has worked
    /// it out from `head_dim` and `partial_rotary_factor`): LongRoPE's one factor per pair.
    pub fn check_rotary_width(&self, config: &ConfigFile, rot_dim: usize) -> Result<()> {
        let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = self
        else {
            return Ok(());
        };
        let section = if config
            .json
            .get("rope_scaling")
            .is_some_and(|v| !v.is_null())
        {
            "rope_scaling"
        } else {
            "rope_parameters"
        };
        for (name, factors) in [("short_factor", short_factor), ("long_factor", long_factor)] {
            let key = format!("{section}.{name}");
            if factors.len() != rot_dim / 2 {
                return Err(config.error(
                    &key,
                    format!(
                        "{} values, but {rot_dim} rotary channels need {} (one per pair)",
                        factors.len(),
                        rot_dim / 2
                    ),
                ));
            }
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(config.error(&key, format!("{bad} must be a positive number")));
            }
        }
        Ok(())
    }

    /// The scaled inverse frequency of one rotary pair, for the scalings that scale each
    /// pair on its own (all but YaRN, whose ramp depends on the pair's channel).
    fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None | RopeScaling::Yarn { .. } | RopeScaling::LongRope { .. } => inv_freq,
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
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => write!(
                f,
                "yarn scaling (factor {factor}, original context \
                 {original_max_position_embeddings}, beta {beta_fast}/{beta_slow}, attention \
                 factor {attention_factor:.4})"
            ),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let range = |f: &[f64]| {
                    let (lo, hi) = f
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                            (l.min(v), h.max(v))
                        });
                    format!("{lo:.3}–{hi:.3}")
                };
                write!(
                    f,
                    "longrope scaling (original context {original_max_position_embeddings}, \
                     short factors {}, long factors {}, attention factor {attention_factor:.4})",
                    range(short_factor),
                    range(long_factor)
                )
            }
        }
    }
}

/// LongRoPE's settings as transformers resolves them: the original context from the
/// top-level `original_max_position_embeddings` (Phi-3's config always has one, 4096 by
/// default), else the scaling's own key, else `max_position_embeddings`; the attention factor
/// given, else `√(1 + ln s / ln original)` for the stretch `s` (`factor`, else
/// `max_position_embeddings / original`).
fn long_rope(
    config: &ConfigFile,
    p: &RopeParameters,
    key: &dyn Fn(&str) -> String,
) -> Result<RopeScaling> {
    let number = |name: &str| config.json.get(name).and_then(|v| v.as_f64());
    let phi3 = config.json.get("model_type").and_then(|v| v.as_str()) == Some("phi3");
    let (original, original_key) = match number("original_max_position_embeddings") {
        Some(v) => (Some(v), "original_max_position_embeddings".to_string()),
        None if phi3 => (Some(4096.0), "original_max_position_embeddings".to_string()),
        None => (
            p.original_max_position_embeddings
                .or_else(|| number("max_position_embeddings")),
            key("original_max_position_embeddings"),
        ),
    };
    let original = match original {
        Some(v) if v.is_finite() && v >= 2.0 && v.fract() == 0.0 => v,
        Some(v) => {
            return Err(config.error(
                &original_key,
                format!("{v} is not a whole number of positions (at least 2)"),
            ));
        }
        None => return Err(config.error(&original_key, "missing (rope type `longrope` needs it)")),
    };
    let factor = (p.factor)
        .or_else(|| number("max_position_embeddings").map(|max| max / original))
        .unwrap_or(1.0);
    let attention_factor = match p.attention_factor {
        Some(a) if a.is_finite() && a > 0.0 => a,
        Some(a) => {
            return Err(config.error(
                &key("attention_factor"),
                format!("{a} must be a positive number"),
            ));
        }
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / original.ln()).sqrt(),
    };
    let factors = |name: &str, v: &Option<Vec<f64>>| match v {
        Some(v) => Ok(v.clone()),
        None => Err(config.error(&key(name), "missing (rope type `longrope` needs it)")),
    };
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor", &p.short_factor)?,
        long_factor: factors("long_factor", &p.long_factor)?,
        original_max_position_embeddings: original as usize,
        attention_factor,
    })
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
    // Phi-3's early 128k configs named LongRoPE `yarn` (transformers renames it for phi3 only).
    let kind = match (kind, config.json.get("model_type").and_then(|v| v.as_str())) {
        ("yarn", Some("phi3")) => "longrope",
        _ => kind,
    };
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
        ("yarn", Some(p)) => {
            let factor = positive("factor", p.factor)?;
            // transformers: the pretrained context, else the config's own.
            let original = positive(
                "original_max_position_embeddings",
                p.original_max_position_embeddings.or_else(|| {
                    config
                        .json
                        .get("max_position_embeddings")
                        .and_then(|v| v.as_f64())
                }),
            )?;
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (p.attention_factor, p.mscale, p.mscale_all_dim) {
                (Some(a), _, _) => positive("attention_factor", Some(a))?,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            // `or` in transformers: a 0 means the default too.
            let beta = |v: Option<f64>, default: f64| v.filter(|&b| b != 0.0).unwrap_or(default);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: beta(p.beta_fast, 32.0),
                beta_slow: beta(p.beta_slow, 1.0),
                attention_factor,
                truncate: p.truncate.unwrap_or(true),
            }
        }
        ("longrope" | "su", Some(p)) => long_rope(config, p, &key)?,
        (other, Some(_)) => {
            return Err(config.error(
                &key("rope_type"),
                format!(
                    "rope scaling `{other}` is not supported (default, linear, llama3, yarn, \
                     longrope)"
                ),
            ));
        }
    };
    let theta = params
        .and_then(|p| p.rope_theta)
        .or(legacy_theta)
        .unwrap_or(default);
    Ok(Rope { theta, scaling })
}
