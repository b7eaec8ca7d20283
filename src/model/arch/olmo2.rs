//! OLMo 2 (`model_type: olmo2`): Llama with the norms moved from the sublayers' inputs to
//! their outputs (`post_attention_layernorm`, `post_feedforward_layernorm`, as Gemma 2 has
//! them, and no input norms), and RMSNorms over the whole query and key projections (all
//! heads at once) before the rotary embedding.

use super::super::config::ConfigFile;
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, LlamaLikeConfig, load_family, parse};
use crate::error::Result;

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    load_family(config, &c, w, &family(&c))
}

/// How OLMo 2 departs from Llama (OLMo 3 starts from it).
pub(super) fn family(c: &LlamaLikeConfig) -> Family {
    Family {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        qk_norm: true,
        qk_norm_over_heads: true,
        no_input_norms: true,
        post_norms: true,
        ..Family::default()
    }
}
