//! OLMo 3 (`model_type: olmo3`): OLMo 2 with a sliding attention window on the layers
//! `layer_types` marks (by default three of every four) and rotary settings per layer type
//! (transformers v5's `rope_parameters.{full_attention, sliding_attention}`; in older files
//! `rope_theta` for both and `rope_scaling` for the full-attention layers only).

use serde::Deserialize;

use super::super::config::{ConfigFile, Rope, RopeScaling};
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, load_family, parse};
use crate::error::Result;

const DEFAULT_THETA: f64 = 500_000.0;

#[derive(Deserialize)]
struct Olmo3Keys {
    #[serde(default = "default_sliding_window")]
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
}

fn default_sliding_window() -> Option<usize> {
    Some(4096)
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    let keys: Olmo3Keys = config.parse()?;
    let sliding_layers = match &keys.layer_types {
        Some(types) => super::sliding_layers(config, types)?,
        None => (0..c.num_hidden_layers).map(|l| (l + 1) % 4 != 0).collect(),
    };
    let sliding = Rope {
        theta: c.rope_theta.unwrap_or(DEFAULT_THETA),
        scaling: RopeScaling::None,
    };
    let (full, sliding) =
        super::layer_type_ropes(config, &c, [DEFAULT_THETA, DEFAULT_THETA], sliding)?;
    let family = Family {
        sliding_window: keys.sliding_window,
        sliding_layers: Some(sliding_layers),
        rope: Some(full),
        sliding_rope: Some(sliding),
        ..super::olmo2::family(&c)
    };
    load_family(config, &c, w, &family)
}
