//! Phi-3 and Phi-4-mini (`model_type: phi3`): Llama with q, k and v in one `qkv_proj` and the
//! MLP's gate and up projections in one `gate_up_proj`, a sliding window on every layer where
//! the config sets one, and partial rotary where `partial_rotary_factor` says so. The
//! 128k-context models' `longrope` scaling (also spelt `su`, or `yarn` in early Phi-3 configs)
//! is in `config::RopeScaling::LongRope`.

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
        fused_projections: true,
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
