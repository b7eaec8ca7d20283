//! GPT-Neo (`model_type: gpt_neo`; EleutherAI's 125M–2.7B, used by the knowledge-neurons and
//! ROME work): GPT-2's block with learned positions, q, k and v without biases, local layers
//! that see only the last `window_size` keys (`attention_types`), and attention scores left
//! unscaled (no `1/√d_head`).

use serde::Deserialize;

use super::super::config::ConfigFile;
use super::super::layers::{Attention, Block, Dims, Mlp, Transformer, WeightSource};
use super::super::weights::Weights;
use super::{fuse_qkv, head_dim, layer_norm, linear, unembedding};
use crate::error::Result;

#[derive(Deserialize)]
struct GptNeoConfig {
    vocab_size: usize,
    max_position_embeddings: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    intermediate_size: Option<usize>,
    /// `[[["global", "local"], 12]]`: layer kinds, repeated.
    attention_types: Option<Vec<(Vec<String>, usize)>>,
    #[serde(default = "default_window")]
    window_size: usize,
    #[serde(default = "super::gelu_new")]
    activation_function: String,
    #[serde(default = "super::layer_norm_eps")]
    layer_norm_epsilon: f64,
}

fn default_window() -> usize {
    256
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c: GptNeoConfig = config.parse()?;
    config.require_positive(&[
        ("num_layers", c.num_layers),
        ("hidden_size", c.hidden_size),
        ("num_heads", c.num_heads),
        ("window_size", c.window_size),
    ])?;
    let (d, nh) = (c.hidden_size, c.num_heads);
    let hd = head_dim(config, d, nh, "num_heads")?;
    // transformers expands `attention_types` into one kind per layer (`attention_layers`).
    let types = c
        .attention_types
        .unwrap_or_else(|| vec![(vec!["global".into(), "local".into()], 12)]);
    // Counted before expanding, so that an absurd repeat count is an error, not an allocation.
    let expanded = (types.iter()).try_fold(0usize, |n, (kinds, times)| {
        n.checked_add(kinds.len().checked_mul(*times)?)
    });
    if expanded != Some(c.num_layers) {
        let layers = expanded.map_or("more than usize::MAX".to_string(), |n| n.to_string());
        return Err(config.error(
            "attention_types",
            format!(
                "expands to {layers} layers, but num_layers is {}",
                c.num_layers
            ),
        ));
    }
    let kinds: Vec<String> = (types.iter())
        .flat_map(|(kinds, times)| std::iter::repeat_n(kinds, *times).flatten().cloned())
        .collect();
    let windows = (kinds.iter())
        .map(|kind| match kind.as_str() {
            "global" => Ok(None),
            "local" => Ok(Some(c.window_size)),
            other => Err(config.error(
                "attention_types",
                format!("layer kind `{other}` is not `global` or `local`"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let act = config.activation("activation_function", &c.activation_function)?;
    let d_mlp = c.intermediate_size.unwrap_or(4 * d);
    let layer_norm = |name: &str| layer_norm(w, name, d, c.layer_norm_epsilon);
    let blocks = (0..c.num_layers)
        .map(|l| -> Result<Block> {
            let p = format!("transformer.h.{l}");
            let proj =
                |name: &str, bias| linear(w, &format!("{p}.attn.attention.{name}"), d, d, bias);
            Ok(Block {
                ln_attn: layer_norm(&format!("{p}.ln_1"))?,
                attn: Attention {
                    qkv: fuse_qkv(
                        proj("q_proj", false)?,
                        proj("k_proj", false)?,
                        proj("v_proj", false)?,
                    )?,
                    out: proj("out_proj", true)?,
                    n_heads: nh,
                    n_kv_heads: nh,
                    head_dim: hd,
                    rotary: None,
                    sliding_window: windows[l],
                    qk_norm: None,
                    qk_norm_over_heads: false,
                    scale: 1.0,
                    softcap: None,
                    clip_qkv: None,
                },
                ln_mlp: layer_norm(&format!("{p}.ln_2"))?,
                mlp: Mlp::Plain {
                    fc: linear(w, &format!("{p}.mlp.c_fc"), d_mlp, d, true)?,
                    proj: linear(w, &format!("{p}.mlp.c_proj"), d, d_mlp, true)?,
                    act,
                },
                down_proj_source: WeightSource {
                    key: format!("{p}.mlp.c_proj.weight"),
                    transposed: false,
                },
                parallel_residual: false,
                shared_input_norm: false,
                post_norms: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = w.get("transformer.wte.weight", &[c.vocab_size, d])?;
    let (unembed, unembed_bias, tied) = unembedding(w, &embed, c.vocab_size, d)?;
    Ok(Transformer {
        pos_embed: Some(w.get("transformer.wpe.weight", &[c.max_position_embeddings, d])?),
        embed,
        embed_scale: None,
        blocks,
        ln_final: layer_norm("transformer.ln_f")?,
        unembed,
        tied_embeddings: tied,
        unembed_bias,
        logit_softcap: None,
        dims: Dims {
            n_layers: c.num_layers,
            d_model: d,
            d_mlp,
            n_heads: nh,
            n_kv_heads: nh,
            head_dim: hd,
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
        },
    })
}
