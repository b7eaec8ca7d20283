//! Gemma 2 (`model_type: gemma2`): Gemma with sandwich norms (a norm on the attention and MLP
//! outputs before they join the residual stream), scores scaled by `1/√query_pre_attn_scalar`,
//! tanh soft-capping of attention scores and of the logits, and a sliding attention window on
//! the layers `layer_types` marks (by default every other one, starting with the first).

use serde::Deserialize;

use super::super::config::ConfigFile;
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, LlamaLikeConfig, load_family, parse};
use crate::error::Result;

/// The keys Gemma 2 adds to the Llama family's, with transformers' defaults: a config saved
/// by `save_pretrained` leaves out values equal to them, and an explicit `null` turns a cap off.
#[derive(Deserialize)]
struct Gemma2Keys {
    #[serde(default = "default_query_pre_attn_scalar")]
    query_pre_attn_scalar: f64,
    #[serde(default = "default_sliding_window")]
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_final_logit_softcapping")]
    final_logit_softcapping: Option<f64>,
    #[serde(default = "default_attn_logit_softcapping")]
    attn_logit_softcapping: Option<f64>,
}

pub(super) fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
pub(super) fn default_sliding_window() -> Option<usize> {
    Some(4096)
}
fn default_final_logit_softcapping() -> Option<f64> {
    Some(30.0)
}
fn default_attn_logit_softcapping() -> Option<f64> {
    Some(50.0)
}

/// What Gemma 2 and 3 share beyond Gemma: the sandwich norms, the score scale, the caps and
/// the per-layer windows, checked.
pub(super) struct Sandwich {
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    pub sliding_layers: Vec<bool>,
    pub attn_softcap: Option<f64>,
    pub logit_softcap: Option<f64>,
}

impl Sandwich {
    pub(super) fn family(self, config: &ConfigFile, c: &LlamaLikeConfig) -> Result<Family> {
        if self.query_pre_attn_scalar <= 0.0 {
            return Err(config.error("query_pre_attn_scalar", "must be positive"));
        }
        for (key, cap) in [
            ("final_logit_softcapping", self.logit_softcap),
            ("attn_logit_softcapping", self.attn_softcap),
        ] {
            if cap.is_some_and(|cap| cap <= 0.0) {
                return Err(config.error(key, "must be positive (or null for no capping)"));
            }
        }
        Ok(Family {
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            gemma: true,
            sliding_window: self.sliding_window,
            sliding_layers: Some(self.sliding_layers),
            post_norms: true,
            query_pre_attn_scalar: Some(self.query_pre_attn_scalar),
            attn_softcap: self.attn_softcap,
            logit_softcap: self.logit_softcap,
            ..Family::default()
        })
    }
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    let keys: Gemma2Keys = config.parse()?;
    let sliding_layers = match &keys.layer_types {
        Some(types) => super::sliding_layers(config, types)?,
        // transformers: `sliding_attention` on even layers, `full_attention` on odd ones.
        None => (0..c.num_hidden_layers).map(|l| l % 2 == 0).collect(),
    };
    let family = Sandwich {
        query_pre_attn_scalar: keys.query_pre_attn_scalar,
        sliding_window: keys.sliding_window,
        sliding_layers,
        attn_softcap: keys.attn_logit_softcapping,
        logit_softcap: keys.final_logit_softcapping,
    }
    .family(config, &c)?;
    load_family(config, &c, w, &family)
}
