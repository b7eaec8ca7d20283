//! OLMo 1 (`model_type: olmo`; OLMo-1B/7B-hf and their 0424/0724 releases): Llama with
//! LayerNorms that learn neither gain nor bias (so the checkpoint holds no norm weights), and
//! every query, key and value projection clamped to `[−clip_qkv, clip_qkv]` where the config
//! sets `clip_qkv`.

use serde::Deserialize;

use super::super::config::ConfigFile;
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, load_family, parse};
use crate::error::Result;

#[derive(Deserialize)]
struct OlmoKeys {
    clip_qkv: Option<f64>,
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    let keys: OlmoKeys = config.parse()?;
    if let Some(clip) = keys.clip_qkv
        && !(clip.is_finite() && clip > 0.0)
    {
        return Err(config.error("clip_qkv", format!("{clip} must be a positive number")));
    }
    let family = Family {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        fixed_layer_norms: true,
        clip_qkv: keys.clip_qkv,
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
