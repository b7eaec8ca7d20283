//! `monoscope trace`: capture hook values for one prompt into a safetensors file, with SAEs
//! run at their hooks (SAELens's `run_with_cache_with_saes`): each SAE's input, latent
//! activations, reconstruction and error, optionally with the reconstructions spliced in.
//! A transcoder is run as SAELens attaches one: it reads its input hook, and its prediction,
//! error and splice belong to the hook it writes, under whose name its tensors are saved.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;

use super::{ModelArgs, print_json, write_new_file};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model, Stash};
use crate::sae::{Sae, SaeSite};

#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Hook names or globs, comma-separated (e.g. 'blocks.*.mlp.hook_post,hook_embed').
    #[arg(long, value_name = "GLOB", required_unless_present = "saes")]
    hooks: Option<String>,
    /// An SAE folder to run at its hook (repeatable). Adds, under SAELens's names,
    /// `HOOK.hook_sae_input`, `HOOK.hook_sae_acts_post` [1, seq, d_sae], `HOOK.hook_sae_recons`
    /// and `HOOK.hook_sae_error` (input − reconstruction). For a transcoder HOOK is the hook it
    /// writes: `hook_sae_input` is the value of the hook it reads, `hook_sae_recons` its
    /// prediction (skip path included) and `hook_sae_error` HOOK's value − the prediction.
    #[arg(long = "sae", value_name = "DIR")]
    saes: Vec<PathBuf>,
    /// The hook each --sae reads, once per --sae in the same order (default: the hook each
    /// folder names).
    #[arg(long = "sae-hook", value_name = "HOOK", requires = "saes")]
    sae_hooks: Vec<String>,
    /// Splice each SAE's reconstruction into the forward pass in place of its hook's value (a
    /// transcoder's prediction in place of the hook it writes; no error term), so later hooks,
    /// later SAEs and the logits are the spliced model's.
    #[arg(long, requires = "saes")]
    splice: bool,
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
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let points = if patterns.is_empty() {
        Vec::new()
    } else {
        model.resolve_hooks(&patterns)?
    };
    let saes = load_saes(&model, &args.saes, &args.sae_hooks)?;
    let ids = model.encode_prompt(&args.prompt)?;
    let mut hooks = Hooks::new().capture(points);
    // Every SAE's output hook first, so that a transcoder reading a hook where another SAE is
    // spliced in reads the spliced value (interventions at one hook run in the order given).
    for spliced in &saes {
        hooks = hooks.intervene(spliced.site.output, spliced.at_output(args.splice));
    }
    for transcoder in saes.iter().filter(|s| s.site.input != s.site.output) {
        hooks = hooks.intervene(transcoder.site.input, transcoder.input.keeper());
    }
    let out = model.forward(&model.ids_tensor(&ids)?, &hooks)?;
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
    for spliced in &saes {
        for (name, value) in spliced.outputs()? {
            tensors.insert(format!("{}.{name}", spliced.site.output), value);
        }
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
            "spliced": args.splice,
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

/// An SAE run at its hook during the traced forward pass (a transcoder: at the hook it reads
/// and the hook it writes).
struct TracedSae {
    sae: Sae,
    site: SaeSite,
    /// The input hook's value as it reached the SAE (after any earlier splice), set by the pass.
    input: Stash,
    /// The output hook's value as the model gave it, before any splice; a transcoder's only.
    output: Stash,
}

impl TracedSae {
    /// The hook the SAE writes: keeps its value (for an SAE, as the input), and passes it on
    /// or replaces it with the SAE's output for the kept input.
    fn at_output(&self, splice: bool) -> Intervention {
        let (sae, input, output) = (self.sae.clone(), self.input.clone(), self.output.clone());
        let transcoder = self.site.input != self.site.output;
        let f = move |y: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
            if transcoder { &output } else { &input }.put(y.clone());
            if !splice {
                return Ok(y.clone());
            }
            let x = input.require("the transcoder's input hook")?;
            let predicted = sae
                .output(&x.to_dtype(DType::F32)?)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            predicted.to_dtype(y.dtype())
        };
        Intervention::new(InterventionOp::Func(Arc::new(f)))
    }

    /// The SAE's tensors for the recorded values, moved to the CPU (f32), under SAELens's names.
    fn outputs(&self) -> anyhow::Result<Vec<(&'static str, Tensor)>> {
        let missing = |point: HookPoint| format!("the forward pass never reached {point}");
        let input = (self.input.get())
            .with_context(|| missing(self.site.input))?
            .to_dtype(DType::F32)?;
        let target = if self.site.input == self.site.output {
            input.clone()
        } else {
            (self.output.get())
                .with_context(|| missing(self.site.output))?
                .to_dtype(DType::F32)?
        };
        let acts = self.sae.encode(&input)?;
        let recons = self.sae.output(&input)?;
        let error = (&target - &recons)?;
        let cpu = |t: Tensor| t.to_device(&candle_core::Device::Cpu);
        Ok(vec![
            ("hook_sae_input", cpu(input)?),
            ("hook_sae_acts_post", cpu(acts)?),
            ("hook_sae_recons", cpu(recons)?),
            ("hook_sae_error", cpu(error)?),
        ])
    }
}

/// Loads each SAE (f32, on the model's device) at its hook (`hooks`: none, or one per SAE;
/// a transcoder's output hook from its folder); two SAEs may not write one hook.
fn load_saes(model: &Model, dirs: &[PathBuf], hooks: &[String]) -> anyhow::Result<Vec<TracedSae>> {
    if !hooks.is_empty() && hooks.len() != dirs.len() {
        anyhow::bail!(
            "--sae-hook was given {} times for {} --sae folders: give it once per --sae, in \
             the same order, or not at all",
            hooks.len(),
            dirs.len()
        );
    }
    let mut saes: Vec<TracedSae> = Vec::with_capacity(dirs.len());
    for (i, dir) in dirs.iter().enumerate() {
        let hook = hooks.get(i).map(String::as_str);
        let (sae_dir, site) = super::sae::load_sae(dir, hook, None, model, &model.device)?;
        crate::sae::codes::check_sae_fits(model, site.input, &sae_dir.sae, dir)?;
        let point = site.output;
        if let Some(other) = saes.iter().position(|s| s.site.output == point) {
            anyhow::bail!(
                "{} and {} both write {point}: trace one SAE per hook",
                dirs[other].display(),
                dir.display()
            );
        }
        saes.push(TracedSae {
            sae: sae_dir.sae,
            site,
            input: Stash::default(),
            output: Stash::default(),
        });
    }
    Ok(saes)
}
