//! Qwen2 (`model_type: qwen2`): Llama with biases on q, k and v (none on the output).

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
            "per-layer sliding windows of Qwen2 are not supported",
        ));
    }
    let family = Family {
        qkv_bias: Some(true),
        o_bias: Some(false),
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
