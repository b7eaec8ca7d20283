//! Gemma 3's language model (`model_type: gemma3_text`, the 270M and 1B checkpoints): Gemma 2
//! without the caps by default, with Gemma-style `(1 + w)` RMSNorms over each query and key
//! head (`q_norm`, `k_norm`) and a separate rotary base for the sliding layers: per layer type
//! in transformers v5's `rope_parameters` (`full_attention`, `sliding_attention`), or
//! `rope_theta` (global, default 10⁶), `rope_local_base_freq` (default 10⁴) and a
//! `rope_scaling` of the global layers in older files. Which layers slide: `layer_types`, or
//! every layer but each `sliding_window_pattern`-th (default 6).

use serde::Deserialize;
use serde_json::{Value, json};

use super::super::config::{ConfigFile, Rope, RopeScaling};
use super::super::layers::Transformer;
use super::super::weights::Weights;
use super::gemma2::sandwich_family;
use super::llama::{load_family, parse};
use crate::error::Result;

#[derive(Deserialize)]
struct Gemma3Keys {
    sliding_window_pattern: Option<usize>,
    use_bidirectional_attention: Option<bool>,
    rope_local_base_freq: Option<f64>,
}

const GLOBAL_THETA: f64 = 1_000_000.0;
const LOCAL_THETA: f64 = 10_000.0;

/// The config with Gemma3TextConfig's defaults for the keys it leaves out: the multimodal
/// checkpoints' `text_config` names only what differs (google/gemma-3-4b-it's, six keys), and
/// their wrapper config names no BOS token (Gemma's is 2).
pub fn with_defaults(config: &ConfigFile) -> ConfigFile {
    let defaults = [
        ("vocab_size", json!(262_208)),
        ("hidden_size", json!(2304)),
        ("intermediate_size", json!(9216)),
        ("num_hidden_layers", json!(26)),
        ("num_attention_heads", json!(8)),
        ("num_key_value_heads", json!(4)),
        ("head_dim", json!(256)),
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        ("max_position_embeddings", json!(131_072)),
        ("rms_norm_eps", json!(1e-6)),
        ("query_pre_attn_scalar", json!(256)),
        ("sliding_window", json!(4096)),
        ("bos_token_id", json!(2)),
        ("eos_token_id", json!(1)),
    ];
    let mut json = config.json.clone();
    if let Value::Object(keys) = &mut json {
        for (key, value) in defaults {
            keys.entry(key.to_string()).or_insert(value);
        }
    }
    ConfigFile::from_json(config.path.clone(), json)
}

/// A multimodal Gemma 3 checkpoint's language model weights under the text-only names: the
/// Hub's `language_model.model.…` and `language_model.lm_head.…`, or transformers v5's
/// in-memory `model.language_model.…`; the vision tower and projector are left out.
pub fn language_model_key(key: &str) -> Option<String> {
    if let Some(rest) = key.strip_prefix("language_model.model.") {
        return Some(format!("model.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("model.language_model.") {
        return Some(format!("model.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("language_model.") {
        return Some(rest.to_string());
    }
    (key == "lm_head.weight").then(|| key.to_string())
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let config = &with_defaults(config);
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
    let local = Rope {
        theta: keys.rope_local_base_freq.unwrap_or(LOCAL_THETA),
        scaling: RopeScaling::None,
    };
    let (global, local) = super::layer_type_ropes(config, &c, [GLOBAL_THETA, LOCAL_THETA], local)?;
    let mut family = sandwich_family(config, &c, [None, None], |l| (l + 1) % pattern != 0)?;
    family.qk_norm = true;
    family.rope = Some(global);
    family.sliding_rope = Some(local);
    load_family(config, &c, w, &family)
}
