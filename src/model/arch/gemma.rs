//! Gemma (`model_type: gemma`): Llama with `(1 + w)` RMSNorm, embeddings scaled by √d_model,
//! GeGLU (tanh GELU), explicit `head_dim`, tied embeddings.

use super::super::config::ConfigFile;
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, load_family, parse};
use crate::error::Result;

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    let family = Family {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        gemma: true,
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
