//! GPT-J (`model_type: gptj`; GPT-J 6B, the model of the ROME and MEMIT papers): one LayerNorm
//! feeding attention and the MLP side by side (`x + attn(ln(x)) + mlp(ln(x))`), rotary on the
//! first `rotary_dim` channels of each head in the interleaved layout (base 10,000), no
//! biases in attention, and an `lm_head` with a bias.

use serde::Deserialize;

use super::super::config::{ConfigFile, Rope, RopeScaling};
use super::super::layers::{Attention, Block, Dims, Mlp, Norm, Rotary, Transformer, WeightSource};
use super::super::weights::Weights;
use super::{fuse_qkv, head_dim, layer_norm, linear, unembedding};
use crate::error::Result;

#[derive(Deserialize)]
struct GptjConfig {
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    /// 64 when absent (GPTJConfig's default); `null` rotates every channel.
    #[serde(default = "default_rotary_dim")]
    rotary_dim: Option<usize>,
    n_inner: Option<usize>,
    #[serde(default = "super::gelu_new")]
    activation_function: String,
    #[serde(default = "super::layer_norm_eps")]
    layer_norm_epsilon: f64,
}

fn default_rotary_dim() -> Option<usize> {
    Some(64)
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c: GptjConfig = config.parse()?;
    config.require_positive(&[
        ("n_layer", c.n_layer),
        ("n_embd", c.n_embd),
        ("n_head", c.n_head),
    ])?;
    let (d, nh) = (c.n_embd, c.n_head);
    let hd = head_dim(config, d, nh, "n_head")?;
    // transformers builds its sin/cos table `rotary_dim` wide (or `n_embd` when null) and
    // rotates that many channels of each head.
    let rot_dim = c.rotary_dim.unwrap_or(d);
    if rot_dim == 0 || rot_dim > hd || !rot_dim.is_multiple_of(2) {
        return Err(config.error(
            "rotary_dim",
            format!("{rot_dim} must be even and within the head dimension ({hd})"),
        ));
    }
    let act = config.activation("activation_function", &c.activation_function)?;
    let d_mlp = c.n_inner.unwrap_or(4 * d);
    let rope = Rope {
        theta: 10000.0,
        scaling: RopeScaling::None,
    };
    let rotary = Rotary::interleaved(rot_dim, &rope, c.n_positions, w.device())?;
    let layer_norm = |name: &str| layer_norm(w, name, d, c.layer_norm_epsilon);
    let blocks = (0..c.n_layer)
        .map(|l| -> Result<Block> {
            let p = format!("transformer.h.{l}");
            let proj = |name: &str| linear(w, &format!("{p}.attn.{name}"), d, d, false);
            Ok(Block {
                ln_attn: layer_norm(&format!("{p}.ln_1"))?,
                attn: Attention {
                    qkv: fuse_qkv(proj("q_proj")?, proj("k_proj")?, proj("v_proj")?)?,
                    out: proj("out_proj")?,
                    n_heads: nh,
                    n_kv_heads: nh,
                    head_dim: hd,
                    rotary: Some(rotary.clone()),
                    sliding_window: None,
                    qk_norm: None,
                    qk_norm_over_heads: false,
                    scale: 1.0 / (hd as f64).sqrt(),
                    softcap: None,
                    clip_qkv: None,
                },
                ln_mlp: Norm::identity(d, w.dtype(), w.device())?,
                mlp: Mlp::Plain {
                    fc: linear(w, &format!("{p}.mlp.fc_in"), d_mlp, d, true)?,
                    proj: linear(w, &format!("{p}.mlp.fc_out"), d, d_mlp, true)?,
                    act,
                },
                down_proj_source: WeightSource {
                    key: format!("{p}.mlp.fc_out.weight"),
                    transposed: false,
                },
                parallel_residual: true,
                shared_input_norm: true,
                post_norms: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = w.get("transformer.wte.weight", &[c.vocab_size, d])?;
    let (unembed, unembed_bias, tied) = unembedding(w, &embed, c.vocab_size, d)?;
    Ok(Transformer {
        embed,
        pos_embed: None,
        embed_scale: None,
        blocks,
        ln_final: layer_norm("transformer.ln_f")?,
        unembed,
        tied_embeddings: tied,
        unembed_bias,
        logit_softcap: None,
        dims: Dims {
            n_layers: c.n_layer,
            d_model: d,
            d_mlp,
            n_heads: nh,
            n_kv_heads: nh,
            head_dim: hd,
            vocab_size: c.vocab_size,
            context_length: c.n_positions,
        },
    })
}
