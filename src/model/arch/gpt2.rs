//! GPT-2 (`model_type: gpt2`): learned positions, pre-LayerNorm, `Conv1D` weights stored
//! `[in, out]` (transposed here to `[out, in]`), tied embeddings.

use candle_nn::Linear;
use serde::Deserialize;

use super::super::config::ConfigFile;
use super::super::layers::{Attention, Block, Dims, Mlp, Norm, Transformer, WeightSource};
use super::super::weights::Weights;
use crate::error::Result;

#[derive(Deserialize)]
struct Gpt2Config {
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    #[serde(default = "super::gelu_new")]
    activation_function: String,
    #[serde(default = "super::layer_norm_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

/// A `Conv1D`: weight `[in, out]` on disk.
fn conv1d(w: &Weights, prefix: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[in_dim, out_dim])?;
    let bias = w.get(&format!("{prefix}.bias"), &[out_dim])?;
    Ok(Linear::new(weight.t()?.contiguous()?, Some(bias)))
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c: Gpt2Config = config.parse()?;
    if c.scale_attn_by_inverse_layer_idx {
        return Err(config.error("scale_attn_by_inverse_layer_idx", "true is not supported"));
    }
    // `reorder_and_upcast_attn` only moves transformers' f32 upcast; attention here always
    // computes its softmax in f32, so the key is read by neither.
    config.require_positive(&[
        ("n_layer", c.n_layer),
        ("n_embd", c.n_embd),
        ("n_head", c.n_head),
    ])?;
    if !c.n_embd.is_multiple_of(c.n_head) {
        return Err(config.error(
            "n_head",
            format!(
                "n_embd {} is not divisible by n_head {}",
                c.n_embd, c.n_head
            ),
        ));
    }
    let act = config.activation("activation_function", &c.activation_function)?;
    let d = c.n_embd;
    let d_mlp = c.n_inner.unwrap_or(4 * d);
    // Hub checkpoints saved from GPT2LMHeadModel prefix keys with `transformer.`; the original
    // OpenAI conversion does not.
    let p = if w.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let layer_norm = |name: &str| -> Result<Norm> {
        Ok(Norm::layer_norm(
            w.get(&format!("{p}{name}.weight"), &[d])?,
            w.get(&format!("{p}{name}.bias"), &[d])?,
            c.layer_norm_epsilon,
        ))
    };
    let blocks = (0..c.n_layer)
        .map(|l| -> Result<Block> {
            let h = format!("{p}h.{l}");
            Ok(Block {
                ln_attn: layer_norm(&format!("h.{l}.ln_1"))?,
                attn: Attention {
                    qkv: conv1d(w, &format!("{h}.attn.c_attn"), d, 3 * d)?,
                    out: conv1d(w, &format!("{h}.attn.c_proj"), d, d)?,
                    n_heads: c.n_head,
                    n_kv_heads: c.n_head,
                    head_dim: d / c.n_head,
                    rotary: None,
                    sliding_window: None,
                    qk_norm: None,
                    qk_norm_over_heads: false,
                    scale: 1.0 / ((d / c.n_head) as f64).sqrt(),
                    softcap: None,
                    clip_qkv: None,
                },
                ln_mlp: layer_norm(&format!("h.{l}.ln_2"))?,
                mlp: Mlp::Plain {
                    fc: conv1d(w, &format!("{h}.mlp.c_fc"), d, d_mlp)?,
                    proj: conv1d(w, &format!("{h}.mlp.c_proj"), d_mlp, d)?,
                    act,
                },
                down_proj_source: WeightSource {
                    key: format!("{h}.mlp.c_proj.weight"),
                    transposed: true,
                },
                parallel_residual: false,
                shared_input_norm: false,
                post_norms: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = w.get(&format!("{p}wte.weight"), &[c.vocab_size, d])?;
    let (unembed, tied) = match w.get_opt("lm_head.weight", &[c.vocab_size, d])? {
        Some(head) => (head, false),
        None => (embed.clone(), true),
    };
    Ok(Transformer {
        pos_embed: Some(w.get(&format!("{p}wpe.weight"), &[c.n_positions, d])?),
        embed,
        embed_scale: None,
        blocks,
        ln_final: layer_norm("ln_f")?,
        unembed,
        tied_embeddings: tied,
        unembed_bias: None,
        logit_softcap: None,
        dims: Dims {
            n_layers: c.n_layer,
            d_model: d,
            d_mlp,
            n_heads: c.n_head,
            n_kv_heads: c.n_head,
            head_dim: d / c.n_head,
            vocab_size: c.vocab_size,
            context_length: c.n_positions,
        },
    })
}
