//! One file per architecture: each maps its `config.json` and weight names onto the shared
//! [`Transformer`]. Adding an architecture means adding a file here and a line to
//! [`ARCHITECTURES`].

mod gemma;
mod gemma2;
mod gemma3;
mod gpt2;
mod gpt_neox;
mod llama;
mod mistral;
mod olmo2;
mod qwen2;
mod qwen3;

use candle_nn::Linear;

use super::config::ConfigFile;
use super::layers::Transformer;
use super::weights::Weights;
use crate::error::Result;

/// Builds a [`Transformer`] from a config and its weights.
pub type LoadFn = fn(&ConfigFile, &Weights) -> Result<Transformer>;

/// Supported `model_type` values and their loaders.
pub const ARCHITECTURES: &[(&str, LoadFn)] = &[
    ("gpt2", gpt2::load),
    ("gpt_neox", gpt_neox::load),
    ("llama", llama::load),
    ("mistral", mistral::load),
    ("qwen2", qwen2::load),
    ("qwen3", qwen3::load),
    ("gemma", gemma::load),
    ("gemma2", gemma2::load),
    ("gemma3_text", gemma3::load),
    ("olmo2", olmo2::load),
];

pub fn loader(model_type: &str) -> Option<LoadFn> {
    ARCHITECTURES
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, load)| *load)
}

pub fn supported() -> String {
    ARCHITECTURES
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
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
