//! Mistral (`model_type: mistral`): Llama with a sliding attention window.

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
        sliding_window: c.sliding_window,
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
