//! Phi-1, Phi-1.5 and Phi-2 (`model_type: phi`): GPT-J's block (one LayerNorm feeding
//! attention and the MLP side by side, an `lm_head` with a bias) with biased q, k, v and dense
//! projections, partial rotary in the `rotate_half` layout (`partial_rotary_factor`, 0.5 when
//! absent, as transformers assumes), grouped-query attention, and optional per-head query and
//! key LayerNorms (`qk_layernorm`).

use serde::Deserialize;

use super::super::config::{ConfigFile, RopeParameters, rope};
use super::super::layers::{Attention, Block, Dims, Mlp, Norm, Rotary, Transformer, WeightSource};
use super::super::weights::Weights;
use super::{fuse_qkv, head_dim, layer_norm, linear, partial_rotary, unembedding};
use crate::error::Result;

#[derive(Deserialize)]
struct PhiConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default = "super::gelu_new")]
    hidden_act: String,
    #[serde(default = "super::layer_norm_eps")]
    layer_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    qk_layernorm: bool,
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c: PhiConfig = config.parse()?;
    let (d, nh) = (c.hidden_size, c.num_attention_heads);
    config.require_positive(&[
        ("num_hidden_layers", c.num_hidden_layers),
        ("hidden_size", d),
        ("num_attention_heads", nh),
    ])?;
    let nkv = c.num_key_value_heads.unwrap_or(nh);
    let hd = head_dim(config, d, nh, "num_attention_heads")?;
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return Err(config.error(
            "num_key_value_heads",
            format!("{nkv} does not divide num_attention_heads {nh}"),
        ));
    }
    let act = config.activation("hidden_act", &c.hidden_act)?;
    let rope = rope(config, c.rope_parameters.as_ref(), c.rope_theta, 10000.0)?;
    let fraction = partial_rotary(
        config,
        c.rope_parameters.as_ref(),
        c.partial_rotary_factor,
        0.5,
    )?;
    let rot_dim = (hd as f64 * fraction) as usize;
    rope.scaling.check_rotary_width(config, rot_dim)?;
    let rotary = Rotary::new(rot_dim, &rope, c.max_position_embeddings, w.device())?;
    let layer_norm = |name: &str, dim: usize| layer_norm(w, name, dim, c.layer_norm_eps);
    let blocks = (0..c.num_hidden_layers)
        .map(|l| -> Result<Block> {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let qk_norm = match c.qk_layernorm {
                true => Some((
                    layer_norm(&format!("{a}.q_layernorm"), hd)?,
                    layer_norm(&format!("{a}.k_layernorm"), hd)?,
                )),
                false => None,
            };
            Ok(Block {
                ln_attn: layer_norm(&format!("{p}.input_layernorm"), d)?,
                attn: Attention {
                    qkv: fuse_qkv(
                        linear(w, &format!("{a}.q_proj"), nh * hd, d, true)?,
                        linear(w, &format!("{a}.k_proj"), nkv * hd, d, true)?,
                        linear(w, &format!("{a}.v_proj"), nkv * hd, d, true)?,
                    )?,
                    out: linear(w, &format!("{a}.dense"), d, nh * hd, true)?,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    rotary: (rot_dim > 0).then(|| rotary.clone()),
                    sliding_window: None,
                    qk_norm,
                    qk_norm_over_heads: false,
                    scale: 1.0 / (hd as f64).sqrt(),
                    softcap: None,
                    clip_qkv: None,
                },
                ln_mlp: Norm::identity(d, w.dtype(), w.device())?,
                mlp: Mlp::Plain {
                    fc: linear(w, &format!("{p}.mlp.fc1"), c.intermediate_size, d, true)?,
                    proj: linear(w, &format!("{p}.mlp.fc2"), d, c.intermediate_size, true)?,
                    act,
                },
                down_proj_source: WeightSource {
                    key: format!("{p}.mlp.fc2.weight"),
                    transposed: false,
                },
                parallel_residual: true,
                shared_input_norm: true,
                post_norms: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = w.get("model.embed_tokens.weight", &[c.vocab_size, d])?;
    let (unembed, unembed_bias, tied) = unembedding(w, &embed, c.vocab_size, d)?;
    Ok(Transformer {
        embed,
        pos_embed: None,
        embed_scale: None,
        blocks,
        ln_final: layer_norm("model.final_layernorm", d)?,
        unembed,
        tied_embeddings: tied,
        unembed_bias,
        logit_softcap: None,
        dims: Dims {
            n_layers: c.num_hidden_layers,
            d_model: d,
            d_mlp: c.intermediate_size,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
        },
    })
}
