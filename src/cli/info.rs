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
    /// Rotary models: base, scaling and rotating channels per head.
    pub rotary: Option<RotaryInfo>,
    pub dtype: String,
    pub device: String,
    pub hooks: Vec<String>,
}

#[derive(Serialize)]
pub struct RotaryInfo {
    #[serde(flatten)]
    pub rope: Rope,
    pub rot_dim: usize,
}

impl ModelInfo {
    pub fn of(model: &Model) -> Self {
        Self {
            dir: model.dir.display().to_string(),
            model_type: model.model_type.clone(),
            parameters: model.transformer.parameter_count(),
            dims: model.dims().clone(),
            tied_embeddings: model.transformer.tied_embeddings,
            rotary: model
                .transformer
                .blocks
                .first()
                .and_then(|b| b.attn.rotary.as_ref())
                .map(|r| RotaryInfo {
                    rope: r.rope().clone(),
                    rot_dim: r.rot_dim(),
                }),
            dtype: format!("{:?}", model.dtype).to_lowercase(),
            device: device_name(&model.device),
            hooks: model.hook_points().iter().map(|h| h.to_string()).collect(),
        }
    }
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
            "rotary       theta {}, {} of {} head dims, {}",
            r.rope.theta, r.rot_dim, d.head_dim, r.rope.scaling
        );
    }
    println!("run on       {} {}", info.device, info.dtype);
    println!("hooks ({}):", info.hooks.len());
    for h in &info.hooks {
        println!("  {h}");
    }
    Ok(())
}
