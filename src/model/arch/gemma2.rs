//! Gemma 2 (`model_type: gemma2`): Gemma with sandwich norms (a norm on the attention and MLP
//! outputs before they join the residual stream), scores scaled by `1/√query_pre_attn_scalar`,
//! tanh soft-capping of attention scores and of the logits, and a sliding attention window on
//! the layers `layer_types` marks (by default every other one, starting with the first).

use serde::Deserialize;
use serde_json::Value;

use super::super::config::ConfigFile;
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, LlamaLikeConfig, load_family, parse};
use crate::error::Result;

/// The keys Gemma 2 and 3 add to the Llama family's, with transformers' defaults (a config
/// saved by `save_pretrained` leaves out values equal to them).
#[derive(Deserialize)]
struct SandwichKeys {
    #[serde(default = "default_query_pre_attn_scalar")]
    query_pre_attn_scalar: f64,
    #[serde(default = "default_sliding_window")]
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
}

fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}

/// A soft-cap setting: `default` when the key is absent, none when it is `null`.
fn cap(config: &ConfigFile, key: &str, default: Option<f64>) -> Result<Option<f64>> {
    match config.json.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(cap) if cap > 0.0 => Ok(Some(cap)),
            _ => Err(config.error(
                key,
                format!("{v} must be positive (or null for no capping)"),
            )),
        },
    }
}

/// What Gemma 2 and 3 share beyond Gemma, read from the config: the sandwich norms, the score
/// scale, the caps (absent: `default_caps`, attention then logits) and which layers slide
/// (`layer_types`, else `default_sliding`).
pub(super) fn sandwich_family(
    config: &ConfigFile,
    c: &LlamaLikeConfig,
    default_caps: [Option<f64>; 2],
    default_sliding: impl Fn(usize) -> bool,
) -> Result<Family> {
    let keys: SandwichKeys = config.parse()?;
    if keys.query_pre_attn_scalar <= 0.0 {
        return Err(config.error("query_pre_attn_scalar", "must be positive"));
    }
    let sliding_layers = match &keys.layer_types {
        Some(types) => super::sliding_layers(config, types)?,
        None => (0..c.num_hidden_layers).map(default_sliding).collect(),
    };
    Ok(Family {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        gemma: true,
        sliding_window: keys.sliding_window,
        sliding_layers: Some(sliding_layers),
        post_norms: true,
        query_pre_attn_scalar: Some(keys.query_pre_attn_scalar),
        attn_softcap: cap(config, "attn_logit_softcapping", default_caps[0])?,
        logit_softcap: cap(config, "final_logit_softcapping", default_caps[1])?,
        ..Family::default()
    })
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    // transformers: `sliding_attention` on even layers, `full_attention` on odd ones; scores
    // capped at 50 and logits at 30 unless the config says otherwise.
    let family = sandwich_family(config, &c, [Some(50.0), Some(30.0)], |l| l % 2 == 0)?;
    load_family(config, &c, w, &family)
}
