//! Gemma 3's language model (`model_type: gemma3_text`, the 270M and 1B checkpoints): Gemma 2
//! without the caps by default, with Gemma-style `(1 + w)` RMSNorms over each query and key
//! head (`q_norm`, `k_norm`) and a separate rotary base for the sliding layers: per layer type
//! in transformers v5's `rope_parameters` (`full_attention`, `sliding_attention`), or
//! `rope_theta` (global, default 10⁶), `rope_local_base_freq` (default 10⁴) and a
//! `rope_scaling` of the global layers in older files. Which layers slide: `layer_types`, or
//! every layer but each `sliding_window_pattern`-th (default 6).

use serde::Deserialize;
use serde_json::Value;

use super::super::config::{ConfigFile, Rope, RopeParameters, RopeScaling, rope};
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::gemma2::sandwich_family;
use super::llama::{load_family, parse};
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct Gemma3Keys {
    sliding_window_pattern: Option<usize>,
    use_bidirectional_attention: Option<bool>,
    rope_local_base_freq: Option<f64>,
}

const GLOBAL_THETA: f64 = 1_000_000.0;
const LOCAL_THETA: f64 = 10_000.0;

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c = parse(config)?;
    let keys: Gemma3Keys = config.parse()?;
    if keys.use_bidirectional_attention == Some(true) {
        return Err(config.error(
            "use_bidirectional_attention",
            "is true (an embedding model); monoscope runs causal decoders",
        ));
    }
    // Without `layer_types`: every layer but each `sliding_window_pattern`-th slides.
    let pattern = keys.sliding_window_pattern.unwrap_or(6);
    if pattern == 0 {
        return Err(config.error("sliding_window_pattern", "is 0; must be at least 1"));
    }
    let (global, local) = ropes(config, c.rope_theta, keys.rope_local_base_freq)?;
    let mut family = sandwich_family(config, &c, [None, None], |l| (l + 1) % pattern != 0)?;
    family.qk_norm = true;
    family.rope = Some(global);
    family.sliding_rope = Some(local);
    load_family(config, &c, w, &family)
}

/// The rotary settings of the global and the sliding layers.
fn ropes(
    config: &ConfigFile,
    rope_theta: Option<f64>,
    local_base: Option<f64>,
) -> Result<(Rope, Rope)> {
    let per_type = config
        .json
        .get("rope_parameters")
        .and_then(Value::as_object)
        .filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
    let Some(per_type) = per_type else {
        // Older files: one `rope_parameters` (or `rope_theta` / `rope_scaling`) for the global
        // layers, `rope_local_base_freq` for the sliding ones.
        let params: Option<RopeParameters> = match config.json.get("rope_parameters") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| config.error("rope_parameters", e.to_string()))?,
            ),
        };
        let global = rope(config, params.as_ref(), rope_theta, GLOBAL_THETA)?;
        let local = Rope {
            theta: local_base.unwrap_or(LOCAL_THETA),
            scaling: RopeScaling::None,
        };
        return Ok((global, local));
    };
    let of_type = |layer_type: &str, default: f64| -> Result<Rope> {
        let params: RopeParameters = match per_type.get(layer_type) {
            None | Some(Value::Null) => RopeParameters::default(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                config.error(&format!("rope_parameters.{layer_type}"), e.to_string())
            })?,
        };
        let scoped = ConfigFile::from_json(
            config.path.clone(),
            serde_json::json!({ "rope_parameters": per_type.get(layer_type) }),
        );
        // Errors name the layer type's section.
        rope(&scoped, Some(&params), None, default).map_err(|e| match e {
            Error::Config { path, key, message } => Error::Config {
                path,
                key: key.replacen(
                    "rope_parameters",
                    &format!("rope_parameters.{layer_type}"),
                    1,
                ),
                message,
            },
            other => other,
        })
    };
    Ok((
        of_type("full_attention", GLOBAL_THETA)?,
        of_type("sliding_attention", LOCAL_THETA)?,
    ))
}
