//! SmolLM3 (`model_type: smollm3`): Llama whose every `no_rope_layer_interval`-th layer (by
//! default each fourth) uses no rotary embedding at all (NoPE), as `no_rope_layers` lists
//! (1: rotary, 0: none); a rotary base of 2·10⁶ by default; a sliding window, where
//! `use_sliding_window` asks for one, on the layers `layer_types` marks (by default the NoPE
//! ones).

use serde::Deserialize;

use super::super::config::{ConfigFile, rope};
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::llama::{Family, load_family, parse};
use crate::error::Result;

const DEFAULT_THETA: f64 = 2_000_000.0;

#[derive(Deserialize)]
struct SmolLm3Keys {
    no_rope_layers: Option<Vec<u8>>,
    #[serde(default = "default_interval")]
    no_rope_layer_interval: usize,
    #[serde(default)]
    use_sliding_window: bool,
    layer_types: Option<Vec<String>>,
}

fn default_interval() -> usize {
    4
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    let keys: SmolLm3Keys = config.parse()?;
    let layers = c.num_hidden_layers;
    let rope_layers: Vec<bool> = match &keys.no_rope_layers {
        Some(flags) if flags.len() != layers => {
            return Err(config.error(
                "no_rope_layers",
                format!("{} entries for {layers} layers", flags.len()),
            ));
        }
        Some(flags) => flags.iter().map(|&f| f != 0).collect(),
        None if keys.no_rope_layer_interval == 0 => {
            return Err(config.error("no_rope_layer_interval", "is 0; must be at least 1"));
        }
        None => (0..layers)
            .map(|l| (l + 1) % keys.no_rope_layer_interval != 0)
            .collect(),
    };
    let sliding_window = c.sliding_window.filter(|_| keys.use_sliding_window);
    let sliding_layers = match &keys.layer_types {
        Some(types) => super::sliding_layers(config, types)?,
        None => rope_layers.iter().map(|rotates| !rotates).collect(),
    };
    let family = Family {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        sliding_window,
        sliding_layers: Some(sliding_layers),
        rope: Some(rope(
            config,
            c.rope_parameters.as_ref(),
            c.rope_theta,
            DEFAULT_THETA,
        )?),
        rope_layers: Some(rope_layers),
        ..Family::default()
    };
    load_family(config, &c, w, &family)
}
