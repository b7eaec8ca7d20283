//! Qwen3 (`model_type: qwen3`): Llama with an RMSNorm over each query and key head before the
//! rotary embedding (`q_norm`, `k_norm`), explicit `head_dim`, no attention biases by default.

use super::super::config::ConfigFile;
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, load_family, parse};
use crate::error::Result;

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    if c.use_sliding_window == Some(true) {
        return Err(config.error(
            "use_sliding_window",
            "per-layer sliding windows of Qwen3 are not supported",
        ));
    }
    let family = Family {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        qk_norm: true,
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
