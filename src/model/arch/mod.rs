//! One file per architecture: each maps its `config.json` and weight names onto the shared
//! [`Transformer`]. Adding an architecture means adding a file here and a line to
//! [`ARCHITECTURES`].

mod gemma;
mod gemma2;
mod gemma3;
mod gpt2;
mod gpt_neo;
mod gpt_neox;
mod gptj;
mod llama;
mod mistral;
mod olmo;
mod olmo2;
mod olmo3;
mod phi;
mod phi3;
mod qwen2;
mod qwen3;
mod smollm3;

use candle_nn::Linear;

use serde_json::Value;

use super::config::{ConfigFile, Rope, RopeParameters, rope};
use super::layers::Transformer;
use super::weights::Weights;
use crate::error::{Error, Result};

/// Builds a [`Transformer`] from a config and its weights.
pub type LoadFn = fn(&ConfigFile, &Weights) -> Result<Transformer>;

/// Supported `model_type` values and their loaders.
pub const ARCHITECTURES: &[(&str, LoadFn)] = &[
    ("gpt2", gpt2::load),
    ("gpt_neo", gpt_neo::load),
    ("gpt_neox", gpt_neox::load),
    ("gptj", gptj::load),
    ("llama", llama::load),
    ("mistral", mistral::load),
    ("qwen2", qwen2::load),
    ("qwen3", qwen3::load),
    ("gemma", gemma::load),
    ("gemma2", gemma2::load),
    ("gemma3_text", gemma3::load),
    ("olmo", olmo::load),
    ("olmo2", olmo2::load),
    ("olmo3", olmo3::load),
    ("phi", phi::load),
    ("phi3", phi3::load),
    ("smollm3", smollm3::load),
];

/// Multimodal checkpoints whose language model is one of the decoders above: the wrapper's
/// `model_type`, its language model's (where `text_config` names none), and how that model's
/// weights are named. Their `text_config` is the decoder's config.
const LANGUAGE_MODELS: &[(&str, &str, RenameFn, DefaultsFn)] = &[(
    "gemma3",
    "gemma3_text",
    gemma3::language_model_key,
    gemma3::with_defaults,
)];

/// Fills in the language model's config defaults for the keys its file leaves out (the
/// special tokens included, which the wrapper's own config may not name).
pub type DefaultsFn = fn(&ConfigFile) -> ConfigFile;

/// Maps a multimodal checkpoint's stored weight key to the plain decoder's name for it
/// (`None`: not the language model's, as a vision tower's).
pub type RenameFn = fn(&str) -> Option<String>;

/// For a multimodal wrapper config, its language model's config (errors then name keys as
/// `text_config.KEY`) and the renaming of its weights; `None` for a plain decoder's config.
pub fn language_model(config: &ConfigFile) -> Result<Option<(ConfigFile, RenameFn)>> {
    let model_type = config.model_type()?;
    let Some(&(_, text_type, rename, defaults)) = LANGUAGE_MODELS
        .iter()
        .find(|(name, ..)| *name == model_type)
    else {
        return Ok(None);
    };
    let text = match config.json.get("text_config") {
        Some(Value::Object(text)) => {
            let mut text = text.clone();
            text.entry("model_type").or_insert(text_type.into());
            text
        }
        _ => {
            return Err(config.error(
                "text_config",
                format!("missing or not an object (a `{model_type}` config holds its language model's there)"),
            ));
        }
    };
    let text = ConfigFile::from_json(config.path.clone(), Value::Object(text));
    Ok(Some((defaults(&text), rename)))
}

/// Names a language model's config errors by their place in the wrapper's file.
pub fn in_text_config(e: Error) -> Error {
    match e {
        Error::Config { path, key, message } => Error::Config {
            path,
            key: format!("text_config.{key}"),
            message,
        },
        other => other,
    }
}

pub fn loader(model_type: &str) -> Option<LoadFn> {
    ARCHITECTURES
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, load)| *load)
}

pub fn supported() -> String {
    (ARCHITECTURES.iter().map(|(name, _)| *name))
        .chain(LANGUAGE_MODELS.iter().map(|(name, ..)| *name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// transformers' default activation for GPT-2, GPT-Neo, GPT-J and Phi (GPT-NeoX's is `gelu`).
fn gelu_new() -> String {
    "gelu_new".to_string()
}

/// transformers' default LayerNorm epsilon for the GPT-2 line.
fn layer_norm_eps() -> f64 {
    1e-5
}

/// The head width `d_model / n_heads`; `heads_key` names the config key when it does not divide.
fn head_dim(config: &ConfigFile, d_model: usize, n_heads: usize, heads_key: &str) -> Result<usize> {
    if !d_model.is_multiple_of(n_heads) {
        return Err(config.error(
            heads_key,
            format!("the model width {d_model} is not divisible by {n_heads} heads"),
        ));
    }
    Ok(d_model / n_heads)
}

/// A LayerNorm with weight and bias at `{prefix}.weight` / `{prefix}.bias`.
fn layer_norm(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<super::layers::Norm> {
    Ok(super::layers::Norm::layer_norm(
        w.get(&format!("{prefix}.weight"), &[dim])?,
        w.get(&format!("{prefix}.bias"), &[dim])?,
        eps,
    ))
}

/// The fraction of each head that rotates: `rope_parameters.partial_rotary_factor`, else the
/// older top-level key, else `default`; it must lie in (0, 1].
fn partial_rotary(
    config: &ConfigFile,
    params: Option<&RopeParameters>,
    legacy: Option<f64>,
    default: f64,
) -> Result<f64> {
    let fraction = (params.and_then(|p| p.partial_rotary_factor))
        .or(legacy)
        .unwrap_or(default);
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(config.error(
            "partial_rotary_factor",
            format!("{fraction} is not in (0, 1]"),
        ));
    }
    Ok(fraction)
}

/// The output head: `lm_head.weight` (and its bias, GPT-J and Phi) where the checkpoint has
/// one, else the token embedding (tied). Returns `(unembed, bias, tied)`.
fn unembedding(
    w: &Weights,
    embed: &candle_core::Tensor,
    vocab: usize,
    d_model: usize,
) -> Result<(candle_core::Tensor, Option<candle_core::Tensor>, bool)> {
    Ok(match w.get_opt("lm_head.weight", &[vocab, d_model])? {
        Some(head) => (head, w.get_opt("lm_head.bias", &[vocab])?, false),
        None => (embed.clone(), None, true),
    })
}

/// Loads `{prefix}.weight` (`[out, in]`) and, if `bias`, `{prefix}.bias` (`[out]`).
fn linear(w: &Weights, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = if bias {
        Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Stacks q, k and v projections into the fused `[q; k; v]` layout of [`super::layers::Attention`].
fn fuse_qkv(q: Linear, k: Linear, v: Linear) -> Result<Linear> {
    let weight = candle_core::Tensor::cat(&[q.weight(), k.weight(), v.weight()], 0)?;
    let bias = match (q.bias(), k.bias(), v.bias()) {
        (Some(qb), Some(kb), Some(vb)) => Some(candle_core::Tensor::cat(&[qb, kb, vb], 0)?),
        _ => None,
    };
    Ok(Linear::new(weight, bias))
}

/// Which layers slide, from transformers' `layer_types` (`sliding_attention` /
/// `full_attention`, one per layer).
fn sliding_layers(config: &ConfigFile, types: &[String]) -> Result<Vec<bool>> {
    types
        .iter()
        .map(|t| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => Err(config.error(
                "layer_types",
                format!(
                    "unknown layer type `{other}` (supported: sliding_attention, full_attention)"
                ),
            )),
        })
        .collect()
}

/// The rotary settings of the full-attention and the sliding layers (Gemma 3, OLMo 3):
/// transformers v5's `rope_parameters.{full_attention, sliding_attention}` (each defaulting to
/// `defaults`), or in older files one setting for the full-attention layers (`rope_parameters`
/// or `rope_theta` + `rope_scaling`, as Llama reads them) and `legacy_sliding` for the others.
fn layer_type_ropes(
    config: &ConfigFile,
    c: &llama::LlamaLikeConfig,
    defaults: [f64; 2],
    legacy_sliding: Rope,
) -> Result<(Rope, Rope)> {
    let per_type = config
        .json
        .get("rope_parameters")
        .and_then(Value::as_object)
        .filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
    let Some(per_type) = per_type else {
        let full = rope(
            config,
            c.rope_parameters.as_ref(),
            c.rope_theta,
            defaults[0],
        )?;
        return Ok((full, legacy_sliding));
    };
    let of_type = |layer_type: &str, default: f64| -> Result<Rope> {
        let section = format!("rope_parameters.{layer_type}");
        let params: RopeParameters = match per_type.get(layer_type) {
            None | Some(Value::Null) => RopeParameters::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| config.error(&section, e.to_string()))?,
        };
        // Read as if it were the only `rope_parameters` (errors then name its section), beside
        // the top-level keys a scaling may fall back on (LongRoPE's context lengths).
        let top = |key: &str| config.json.get(key).cloned().unwrap_or(Value::Null);
        let scoped = ConfigFile::from_json(
            config.path.clone(),
            serde_json::json!({
                "rope_parameters": per_type.get(layer_type),
                "model_type": top("model_type"),
                "max_position_embeddings": top("max_position_embeddings"),
                "original_max_position_embeddings": top("original_max_position_embeddings"),
            }),
        );
        rope(&scoped, Some(&params), None, default).map_err(|e| match e {
            Error::Config { path, key, message } => Error::Config {
                path,
                key: key.replacen("rope_parameters", &section, 1),
                message,
            },
            other => other,
        })
    };
    Ok((
        of_type("full_attention", defaults[0])?,
        of_type("sliding_attention", defaults[1])?,
    ))
}
