//! `monoscope info`: what a model is and which hooks it has.

use clap::Args;
use serde::Serialize;

use super::{ModelArgs, print_json};
use crate::device::device_name;
use crate::model::config::Rope;
use crate::model::{Dims, Model};

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
pub struct ModelInfo {
    pub dir: String,
    pub model_type: String,
    pub parameters: usize,
    pub dims: Dims,
    pub tied_embeddings: bool,
    /// Rotary models: base, scaling and rotating channels per head (of the full-attention
    /// layers where layers differ).
    pub rotary: Option<RotaryInfo>,
    /// The sliding layers' rotary settings where they differ (Gemma 3's local base).
    pub sliding_rotary: Option<RotaryInfo>,
    pub attention: AttentionInfo,
    /// Gemma 2's `cap · tanh(logits / cap)` on the output logits.
    pub logit_softcap: Option<f64>,
    pub dtype: String,
    pub device: String,
    pub hooks: Vec<String>,
}

#[derive(Serialize)]
pub struct RotaryInfo {
    #[serde(flatten)]
    pub rope: Rope,
    pub rot_dim: usize,
    /// GPT-J's adjacent channel pairs rather than GPT-NeoX/Llama's halves.
    pub interleaved: bool,
}

/// How attention scores are formed, where architectures differ.
#[derive(Serialize)]
pub struct AttentionInfo {
    /// The multiplier on `q·kᵀ` (`1/√head_dim`, or Gemma 2's `1/√query_pre_attn_scalar`).
    pub scale: f64,
    /// Gemma 2's `cap · tanh(scores / cap)`.
    pub score_softcap: Option<f64>,
    /// Each layer's sliding window (`null`: every earlier key is visible).
    pub windows: Vec<Option<usize>>,
}

impl ModelInfo {
    pub fn of(model: &Model) -> Self {
        Self {
            dir: model.dir.display().to_string(),
            model_type: model.model_type.clone(),
            parameters: model.transformer.parameter_count(),
            dims: model.dims().clone(),
            tied_embeddings: model.transformer.tied_embeddings,
            rotary: rotary_of(model, false).or_else(|| rotary_of(model, true)),
            sliding_rotary: rotary_of(model, true)
                .filter(|r| rotary_of(model, false).is_some_and(|g| g.rope != r.rope)),
            attention: {
                let blocks = &model.transformer.blocks;
                AttentionInfo {
                    scale: blocks.first().map_or(1.0, |b| b.attn.scale),
                    score_softcap: blocks.first().and_then(|b| b.attn.softcap),
                    windows: blocks.iter().map(|b| b.attn.sliding_window).collect(),
                }
            },
            logit_softcap: model.transformer.logit_softcap,
            dtype: format!("{:?}", model.dtype).to_lowercase(),
            device: device_name(&model.device),
            hooks: model.hook_points().iter().map(|h| h.to_string()).collect(),
        }
    }
}

/// The rotary settings of the first sliding (or full-attention) layer.
fn rotary_of(model: &Model, sliding: bool) -> Option<RotaryInfo> {
    model
        .transformer
        .blocks
        .iter()
        .find(|b| b.attn.sliding_window.is_some() == sliding)
        .and_then(|b| b.attn.rotary.as_ref())
        .map(|r| RotaryInfo {
            rope: r.rope().clone(),
            rot_dim: r.rot_dim(),
            interleaved: r.is_interleaved(),
        })
}

pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let info = ModelInfo::of(&model);
    if args.json {
        return print_json(&info);
    }
    let d = &info.dims;
    println!("model        {}", info.dir);
    println!("architecture {}", info.model_type);
    println!("parameters   {}", info.parameters);
    println!("layers       {}", d.n_layers);
    println!("d_model      {}", d.d_model);
    println!("d_mlp        {}", d.d_mlp);
    println!(
        "heads        {} (kv heads {}, head_dim {})",
        d.n_heads, d.n_kv_heads, d.head_dim
    );
    println!("vocab        {}", d.vocab_size);
    println!("context      {}", d.context_length);
    println!("tied embed   {}", info.tied_embeddings);
    if let Some(r) = &info.rotary {
        println!(
            "rotary       theta {}, {} of {} head dims{}, {}",
            r.rope.theta,
            r.rot_dim,
            d.head_dim,
            if r.interleaved {
                " (pairs interleaved)"
            } else {
                ""
            },
            r.rope.scaling
        );
    }
    if let Some(r) = &info.sliding_rotary {
        println!("  sliding    theta {}, {}", r.rope.theta, r.rope.scaling);
    }
    let a = &info.attention;
    match a.score_softcap {
        Some(cap) => println!("attention    scale {:.6}, scores capped at {cap}", a.scale),
        None => println!("attention    scale {:.6}", a.scale),
    }
    let sliding: Vec<String> = (a.windows.iter().enumerate())
        .filter_map(|(l, w)| w.map(|w| format!("{l}: {w}")))
        .collect();
    if !sliding.is_empty() {
        println!("windows      {} (layer: keys seen)", sliding.join(", "));
    }
    if let Some(cap) = info.logit_softcap {
        println!("logits       capped at {cap}");
    }
    println!("run on       {} {}", info.device, info.dtype);
    println!("hooks ({}):", info.hooks.len());
    for h in &info.hooks {
        println!("  {h}");
    }
    Ok(())
}
