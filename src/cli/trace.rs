//! `monoscope trace`: capture hook values for one prompt into a safetensors file.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use clap::Args;

use super::{ModelArgs, print_json, write_new_file};
use crate::model::Hooks;

#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Hook names or globs, comma-separated (e.g. 'blocks.*.mlp.hook_post,hook_embed').
    #[arg(long, value_name = "GLOB")]
    hooks: String,
    /// Output safetensors file: `input_ids`, `logits`, and one tensor per hook (f32).
    #[arg(long, value_parser = super::output_path, value_name = "FILE")]
    out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let patterns: Vec<&str> = args
        .hooks
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let points = model.resolve_hooks(&patterns)?;
    let ids = model.encode_prompt(&args.prompt)?;
    let out = model.forward(&model.ids_tensor(&ids)?, &Hooks::new().capture(points))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let ids_i64: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    tensors.insert(
        "input_ids".into(),
        Tensor::new(ids_i64.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?,
    );
    tensors.insert(
        "logits".into(),
        out.logits
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?,
    );
    for (point, value) in out.cache.iter() {
        tensors.insert(
            point.to_string(),
            value
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?,
        );
    }
    write_new_file(&args.out, args.force, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)?;
        Ok(())
    })?;
    let mut summary: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    summary.sort();
    if args.json {
        return print_json(&serde_json::json!({
            "out": args.out.display().to_string(),
            "tokens": model.tokenizer.tokens_display(&ids),
            "tensors": summary.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        }));
    }
    println!(
        "wrote {} ({} tensors, {} tokens)",
        args.out.display(),
        summary.len(),
        ids.len()
    );
    for (name, shape) in summary {
        println!("  {name:<32} {shape:?}");
    }
    Ok(())
}
