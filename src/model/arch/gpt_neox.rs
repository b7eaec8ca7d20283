//! GPT-NeoX / Pythia (`model_type: gpt_neox`): fused per-head-interleaved qkv, partial
//! rotary, parallel residual (`x + attn(ln1(x)) + mlp(ln2(x))`), untied output head.

use candle_core::Tensor;
use candle_nn::Linear;
use serde::Deserialize;

use super::super::config::{ConfigFile, RopeParameters, rope};
use super::super::layers::{Attention, Block, Dims, Mlp, Norm, Rotary, Transformer, WeightSource};
use super::super::weights::Weights;
use super::linear;
use crate::error::Result;

#[derive(Deserialize)]
struct NeoxConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "super::layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "yes")]
    use_parallel_residual: bool,
    #[serde(default = "yes")]
    attention_bias: bool,
    /// Legacy spelling of `rope_parameters.partial_rotary_factor`.
    rotary_pct: Option<f64>,
    /// Legacy spelling of `rope_parameters.rope_theta`.
    rotary_emb_base: Option<f64>,
    rope_parameters: Option<RopeParameters>,
}

fn default_act() -> String {
    "gelu".to_string()
}

fn yes() -> bool {
    true
}

/// NeoX stores qkv as `[heads, 3, head_dim]` along the output axis; reorder to `[q; k; v]`.
fn deinterleave_qkv(fused: Linear, heads: usize, head_dim: usize) -> Result<Linear> {
    let d_in = fused.weight().dim(1)?;
    let w = fused.weight().reshape((heads, 3, head_dim, d_in))?;
    let pick_w = |i: usize| -> candle_core::Result<Tensor> {
        w.narrow(1, i, 1)?.reshape((heads * head_dim, d_in))
    };
    let weight = Tensor::cat(&[pick_w(0)?, pick_w(1)?, pick_w(2)?], 0)?;
    let bias = match fused.bias() {
        Some(b) => {
            let b = b.reshape((heads, 3, head_dim))?;
            let pick_b = |i: usize| b.narrow(1, i, 1)?.reshape(heads * head_dim);
            Some(Tensor::cat(&[pick_b(0)?, pick_b(1)?, pick_b(2)?], 0)?)
        }
        None => None,
    };
    Ok(Linear::new(weight, bias))
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c: NeoxConfig = config.parse()?;
    let (d, nh) = (c.hidden_size, c.num_attention_heads);
    config.require_positive(&[
        ("num_hidden_layers", c.num_hidden_layers),
        ("hidden_size", d),
        ("num_attention_heads", nh),
    ])?;
    if d % nh != 0 {
        return Err(config.error(
            "num_attention_heads",
            format!("hidden_size {d} is not divisible by {nh}"),
        ));
    }
    let hd = d / nh;
    let act = config.activation("hidden_act", &c.hidden_act)?;
    let params = c.rope_parameters.as_ref();
    let rope = rope(config, params, c.rotary_emb_base, 10000.0)?;
    let fraction = params
        .and_then(|p| p.partial_rotary_factor)
        .or(c.rotary_pct)
        .unwrap_or(1.0);
    let rot_dim = (hd as f64 * fraction) as usize;
    rope.scaling.check_rotary_width(config, rot_dim)?;
    let rotary = Rotary::new(rot_dim, &rope, c.max_position_embeddings, w.device())?;
    let layer_norm = |name: &str| -> Result<Norm> {
        Ok(Norm::layer_norm(
            w.get(&format!("{name}.weight"), &[d])?,
            w.get(&format!("{name}.bias"), &[d])?,
            c.layer_norm_eps,
        ))
    };
    let blocks = (0..c.num_hidden_layers)
        .map(|l| -> Result<Block> {
            let p = format!("gpt_neox.layers.{l}");
            let fused = linear(
                w,
                &format!("{p}.attention.query_key_value"),
                3 * d,
                d,
                c.attention_bias,
            )?;
            Ok(Block {
                ln_attn: layer_norm(&format!("{p}.input_layernorm"))?,
                attn: Attention {
                    qkv: deinterleave_qkv(fused, nh, hd)?,
                    out: linear(w, &format!("{p}.attention.dense"), d, d, c.attention_bias)?,
                    n_heads: nh,
                    n_kv_heads: nh,
                    head_dim: hd,
                    rotary: (rot_dim > 0).then(|| rotary.clone()),
                    sliding_window: None,
                    qk_norm: None,
                    qk_norm_over_heads: false,
                    scale: 1.0 / (hd as f64).sqrt(),
                    softcap: None,
                    clip_qkv: None,
                },
                ln_mlp: layer_norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp::Plain {
                    fc: linear(
                        w,
                        &format!("{p}.mlp.dense_h_to_4h"),
                        c.intermediate_size,
                        d,
                        true,
                    )?,
                    proj: linear(
                        w,
                        &format!("{p}.mlp.dense_4h_to_h"),
                        d,
                        c.intermediate_size,
                        true,
                    )?,
                    act,
                },
                down_proj_source: WeightSource {
                    key: format!("{p}.mlp.dense_4h_to_h.weight"),
                    transposed: false,
                },
                parallel_residual: c.use_parallel_residual,
                shared_input_norm: false,
                post_norms: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = w.get("gpt_neox.embed_in.weight", &[c.vocab_size, d])?;
    let (unembed, tied) = match w.get_opt("embed_out.weight", &[c.vocab_size, d])? {
        Some(head) => (head, false),
        None => (embed.clone(), true),
    };
    Ok(Transformer {
        embed,
        pos_embed: None,
        embed_scale: None,
        blocks,
        ln_final: layer_norm("gpt_neox.final_layer_norm")?,
        unembed,
        tied_embeddings: tied,
        unembed_bias: None,
        logit_softcap: None,
        dims: Dims {
            n_layers: c.num_hidden_layers,
            d_model: d,
            d_mlp: c.intermediate_size,
            n_heads: nh,
            n_kv_heads: nh,
            head_dim: hd,
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
        },
    })
}
