//! Llama (`model_type: llama`), and the loader the rest of the Llama family (Mistral, Qwen2,
//! Gemma) shares: RMSNorm, rotary, grouped-query attention, gated MLP, `model.` key prefix.

use candle_core::DType;
use serde::Deserialize;

use super::super::config::{ConfigFile, Rope, RopeParameters, rope};
use super::super::layers::{Attention, Block, Dims, Mlp, Norm, Rotary, Transformer, WeightSource};
use super::super::weights::Weights;
use super::{fuse_qkv, linear, partial_rotary};
use crate::error::Result;

/// The union of the Llama-family config keys; each family member reads the ones it has.
#[derive(Deserialize)]
pub(super) struct LlamaLikeConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    pub(super) num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    pub(super) rope_theta: Option<f64>,
    pub(super) rope_parameters: Option<RopeParameters>,
    hidden_act: Option<String>,
    /// Gemma's spelling, which takes precedence there.
    hidden_activation: Option<String>,
    tie_word_embeddings: Option<bool>,
    pub(super) attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    pub(super) sliding_window: Option<usize>,
    pub(super) use_sliding_window: Option<bool>,
    /// Older spelling of `rope_parameters.partial_rotary_factor` (Phi-3).
    partial_rotary_factor: Option<f64>,
}

fn default_eps() -> f64 {
    1e-6
}

/// How a family member departs from Llama (`Family::default()` is Llama).
#[derive(Default)]
pub(super) struct Family {
    /// Biases on q, k, v (Qwen2: always; Llama: `attention_bias`).
    pub qkv_bias: Option<bool>,
    /// Bias on the output projection (Llama: `attention_bias`; Qwen2: never).
    pub o_bias: Option<bool>,
    /// Gemma: RMSNorm weight used as `1 + w`, embeddings scaled by √d_model, GeGLU default.
    pub gemma: bool,
    /// Mask keys further back than `sliding_window` (Mistral; Gemma 2 on some layers).
    pub sliding_window: Option<usize>,
    /// Which layers the window applies to (`None`: all of them).
    pub sliding_layers: Option<Vec<bool>>,
    /// RMSNorm each query and key head (`q_norm`, `k_norm`) before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Those norms span all heads' projection at once (OLMo 2: `[n_heads·d_head]` weights).
    pub qk_norm_over_heads: bool,
    /// No norm on the sublayers' inputs (OLMo 2: only the `post_norms`).
    pub no_input_norms: bool,
    /// q, k and v in one `qkv_proj`, gate and up in one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// Gemma 2's sandwich norms: `pre_feedforward_layernorm` before the MLP, and
    /// `post_attention_layernorm` / `post_feedforward_layernorm` on the two outputs.
    pub post_norms: bool,
    /// Scores scaled by `1/√query_pre_attn_scalar` rather than `1/√head_dim` (Gemma 2).
    pub query_pre_attn_scalar: Option<f64>,
    /// `cap · tanh(x / cap)` on attention scores (Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// The same on the output logits (`final_logit_softcapping`).
    pub logit_softcap: Option<f64>,
    /// Rotary settings read by the family member itself (Gemma 3: per layer type), in place
    /// of the Llama reading of `rope_parameters` / `rope_theta`.
    pub rope: Option<Rope>,
    /// The rotary settings of the sliding layers, where they differ (Gemma 3's local base).
    pub sliding_rope: Option<Rope>,
    /// Which layers rotate their queries and keys (`None`: all); the others see no position
    /// at all (SmolLM3's NoPE layers).
    pub rope_layers: Option<Vec<bool>>,
    /// LayerNorms without gain or bias in place of the RMSNorms (OLMo 1; no norm weights in
    /// the checkpoint).
    pub fixed_layer_norms: bool,
    /// Clamp q, k and v to `[−clip, clip]` (OLMo 1's `clip_qkv`).
    pub clip_qkv: Option<f64>,
}

pub fn load(config: &ConfigFile, w: &Weights) -> Result<Transformer> {
    let c: LlamaLikeConfig = config.parse()?;
    let bias = c.attention_bias;
    load_family(
        config,
        &c,
        w,
        &Family {
            qkv_bias: bias,
            o_bias: bias,
            ..Family::default()
        },
    )
}

pub(super) fn parse(config: &ConfigFile) -> Result<LlamaLikeConfig> {
    config.parse()
}

pub(super) fn load_family(
    config: &ConfigFile,
    c: &LlamaLikeConfig,
    w: &Weights,
    family: &Family,
) -> Result<Transformer> {
    let (d, nh) = (c.hidden_size, c.num_attention_heads);
    config.require_positive(&[
        ("num_hidden_layers", c.num_hidden_layers),
        ("hidden_size", d),
        ("num_attention_heads", nh),
    ])?;
    let nkv = c.num_key_value_heads.unwrap_or(nh);
    if nkv == 0 || nh % nkv != 0 {
        return Err(config.error(
            "num_key_value_heads",
            format!("{nkv} does not divide num_attention_heads {nh}"),
        ));
    }
    let hd = c.head_dim.unwrap_or(d / nh);
    let act = match (&c.hidden_activation, &c.hidden_act, family.gemma) {
        (Some(a), _, true) => config.activation("hidden_activation", a)?,
        // transformers forces the tanh GELU on Gemma configs that name none.
        (None, _, true) => config.activation("hidden_activation", "gelu_pytorch_tanh")?,
        (_, Some(a), false) => config.activation("hidden_act", a)?,
        (_, None, false) => config.activation("hidden_act", "silu")?,
    };
    if c.mlp_bias == Some(true) && family.gemma {
        return Err(config.error("mlp_bias", "not supported for gemma"));
    }
    let mlp_bias = c.mlp_bias.unwrap_or(false);
    let rope = match &family.rope {
        Some(rope) => rope.clone(),
        None => rope(config, c.rope_parameters.as_ref(), c.rope_theta, 10000.0)?,
    };
    // Partial rotary (Phi-3 variants): the first channels of each head rotate.
    let fraction = partial_rotary(
        config,
        c.rope_parameters.as_ref(),
        c.partial_rotary_factor,
        1.0,
    )?;
    let rot_dim = (hd as f64 * fraction) as usize;
    rope.scaling.check_rotary_width(config, rot_dim)?;
    let rotary = Rotary::new(rot_dim, &rope, c.max_position_embeddings, w.device())?;
    let sliding_rotary = match &family.sliding_rope {
        Some(rope) => {
            rope.scaling.check_rotary_width(config, rot_dim)?;
            Rotary::new(rot_dim, rope, c.max_position_embeddings, w.device())?
        }
        None => rotary.clone(),
    };
    let rms_of = |key: String, dim: usize| -> Result<Norm> {
        if family.fixed_layer_norms {
            return Ok(Norm::fixed_layer_norm(dim, 1e-5, w.dtype(), w.device())?);
        }
        let weight = w.get(&key, &[dim])?;
        let weight = if family.gemma {
            // Gemma's RMSNorm multiplies by (1 + w), computed in f32 as transformers does.
            (weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(w.dtype())?
        } else {
            weight
        };
        Ok(Norm::rms_norm(weight, c.rms_norm_eps))
    };
    let rms = |key: String| rms_of(key, d);
    if let Some(layers) = &family.sliding_layers
        && layers.len() != c.num_hidden_layers
    {
        return Err(config.error(
            "layer_types",
            format!(
                "lists {} layers, num_hidden_layers is {}",
                layers.len(),
                c.num_hidden_layers
            ),
        ));
    }
    if family.sliding_window == Some(0) {
        return Err(config.error("sliding_window", "is 0; must be at least 1"));
    }
    let window = |l: usize| {
        let sliding = family.sliding_layers.as_ref().is_none_or(|s| s[l]);
        family.sliding_window.filter(|_| sliding)
    };
    let scale = 1.0 / family.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
    let (qkv_bias, o_bias) = (
        family.qkv_bias.unwrap_or(false),
        family.o_bias.unwrap_or(false),
    );
    let blocks = (0..c.num_hidden_layers)
        .map(|l| -> Result<Block> {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let qkv = if family.fused_projections {
                linear(
                    w,
                    &format!("{a}.qkv_proj"),
                    (nh + 2 * nkv) * hd,
                    d,
                    qkv_bias,
                )?
            } else {
                let q = linear(w, &format!("{a}.q_proj"), nh * hd, d, qkv_bias)?;
                let k = linear(w, &format!("{a}.k_proj"), nkv * hd, d, qkv_bias)?;
                let v = linear(w, &format!("{a}.v_proj"), nkv * hd, d, qkv_bias)?;
                fuse_qkv(q, k, v)?
            };
            let (gate, up) = if family.fused_projections {
                // `gate_up_proj`: the gate's rows, then the up projection's.
                let both = linear(
                    w,
                    &format!("{p}.mlp.gate_up_proj"),
                    2 * c.intermediate_size,
                    d,
                    mlp_bias,
                )?;
                let half = |i: usize| -> Result<candle_nn::Linear> {
                    let rows = |t: &candle_core::Tensor| {
                        t.narrow(0, i * c.intermediate_size, c.intermediate_size)?
                            .contiguous()
                    };
                    Ok(candle_nn::Linear::new(
                        rows(both.weight())?,
                        both.bias().map(rows).transpose()?,
                    ))
                };
                (half(0)?, half(1)?)
            } else {
                (
                    linear(
                        w,
                        &format!("{p}.mlp.gate_proj"),
                        c.intermediate_size,
                        d,
                        mlp_bias,
                    )?,
                    linear(
                        w,
                        &format!("{p}.mlp.up_proj"),
                        c.intermediate_size,
                        d,
                        mlp_bias,
                    )?,
                )
            };
            Ok(Block {
                ln_attn: if family.no_input_norms {
                    Norm::identity(d, w.dtype(), w.device())?
                } else {
                    rms(format!("{p}.input_layernorm.weight"))?
                },
                attn: Attention {
                    qkv,
                    out: linear(w, &format!("{a}.o_proj"), d, nh * hd, o_bias)?,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    rotary: match &family.rope_layers {
                        Some(rotates) if !rotates[l] => None,
                        _ if window(l).is_some() => Some(sliding_rotary.clone()),
                        _ => Some(rotary.clone()),
                    },
                    sliding_window: window(l),
                    qk_norm: if family.qk_norm {
                        // Per head, or over every head's projection at once.
                        let (q_width, k_width) = if family.qk_norm_over_heads {
                            (nh * hd, nkv * hd)
                        } else {
                            (hd, hd)
                        };
                        Some((
                            rms_of(format!("{a}.q_norm.weight"), q_width)?,
                            rms_of(format!("{a}.k_norm.weight"), k_width)?,
                        ))
                    } else {
                        None
                    },
                    qk_norm_over_heads: family.qk_norm_over_heads,
                    scale,
                    softcap: family.attn_softcap,
                    clip_qkv: family.clip_qkv,
                },
                ln_mlp: if family.no_input_norms {
                    Norm::identity(d, w.dtype(), w.device())?
                } else if family.post_norms {
                    rms(format!("{p}.pre_feedforward_layernorm.weight"))?
                } else {
                    rms(format!("{p}.post_attention_layernorm.weight"))?
                },
                mlp: Mlp::Gated {
                    gate,
                    up,
                    down: linear(
                        w,
                        &format!("{p}.mlp.down_proj"),
                        d,
                        c.intermediate_size,
                        mlp_bias,
                    )?,
                    act,
                },
                down_proj_source: WeightSource {
                    key: w.stored_key(&format!("{p}.mlp.down_proj.weight")),
                    transposed: false,
                },
                parallel_residual: false,
                shared_input_norm: false,
                post_norms: if family.post_norms {
                    Some((
                        rms(format!("{p}.post_attention_layernorm.weight"))?,
                        rms(format!("{p}.post_feedforward_layernorm.weight"))?,
                    ))
                } else {
                    None
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = w.get("model.embed_tokens.weight", &[c.vocab_size, d])?;
    let tie = c.tie_word_embeddings.unwrap_or(family.gemma);
    let (unembed, tied) = match w.get_opt("lm_head.weight", &[c.vocab_size, d])? {
        Some(head) if !tie => (head, false),
        _ if tie => (embed.clone(), true),
        _ => {
            return Err(crate::error::Error::MissingTensor {
                dir: w.dir().to_path_buf(),
                key: "lm_head.weight".to_string(),
            });
        }
    };
    let embed_scale = family
        .gemma
        .then(|| round_to_dtype((d as f64).sqrt(), w.dtype()));
    Ok(Transformer {
        embed,
        pos_embed: None,
        embed_scale,
        blocks,
        ln_final: rms("model.norm.weight".to_string())?,
        unembed,
        tied_embeddings: tied,
        unembed_bias: None,
        logit_softcap: family.logit_softcap,
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

/// transformers builds Gemma's √d normaliser as a tensor of the run dtype, so it is rounded.
fn round_to_dtype(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        DType::F16 => half::f16::from_f64(v).to_f64(),
        _ => v,
    }
}
