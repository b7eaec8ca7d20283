//! `monoscope generate`: continue a prompt, optionally showing next-token probabilities.

use anyhow::Context;
use clap::Args;

use super::sae::load_sae;
use super::{ModelArgs, print_json};
use crate::features::steer::{SteerMode, parse_steers, steering_hooks};
use crate::model::Hooks;
use crate::model::generate::{GenerateOptions, Sampling, generate};
use crate::sae::codes::check_sae_fits;
use crate::steering::SteeringVectors;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Show the K most likely next tokens at each step.
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k_probs: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// An SAE folder whose features --steer names.
    #[arg(long, requires = "steer")]
    sae: Option<std::path::PathBuf>,
    /// Hook the SAE reads (default: the one its folder names: SAELens metadata.hook_name, a
    /// sparsify folder's hookpoint name, or a Gemma Scope path's site and layer).
    #[arg(long, requires = "sae")]
    hook: Option<String>,
    /// Hook a transcoder writes, where it steers (default: the one its folder names).
    #[arg(long, requires = "sae")]
    hook_out: Option<String>,
    /// Steer with SAE features: FEATURE=VALUE[,FEATURE=VALUE…] (needs --sae).
    #[arg(long, requires = "sae")]
    steer: Option<String>,
    /// clamp: set each feature to VALUE (keeping the SAE's error term); add: add VALUE times
    /// the feature's decoder direction.
    #[arg(long, value_enum, default_value = "clamp")]
    steer_mode: SteerModeArg,
    /// Add a steering vector file (`monoscope vector`) at its hooks, on every position.
    #[arg(long, value_name = "FILE")]
    vector: Option<std::path::PathBuf>,
    /// How many times the vector is added (negative: steer away).
    #[arg(
        long,
        default_value_t = 1.0,
        requires = "vector",
        allow_negative_numbers = true
    )]
    coefficient: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SteerModeArg {
    Clamp,
    Add,
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let ids = model.encode_prompt(&args.prompt)?;
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        top_k_probs: args.top_k_probs,
        stop_at_eos: !args.ignore_eos,
    };
    let (hooks, steering) = match (&args.sae, &args.steer) {
        (Some(dir), Some(spec)) => {
            let (sae_dir, site) = load_sae(
                dir,
                args.hook.as_deref(),
                args.hook_out.as_deref(),
                &model,
                &model.device,
            )?;
            check_sae_fits(&model, site.input, &sae_dir.sae, dir)?;
            let steers = parse_steers(spec)?;
            let mode = match args.steer_mode {
                SteerModeArg::Clamp => SteerMode::Clamp,
                SteerModeArg::Add => SteerMode::Add,
            };
            let hooks = steering_hooks(&sae_dir.sae, site, &steers, mode, &model.device)
                .with_context(|| format!("steering with {}", dir.display()))?;
            let described: Vec<serde_json::Value> = steers
                .iter()
                .map(|s| serde_json::json!({"feature": s.feature, "value": s.value}))
                .collect();
            let info = serde_json::json!({
                "sae": dir.display().to_string(),
                "hook": site.input.to_string(),
                "hook_out": site.output.to_string(),
                "mode": format!("{:?}", args.steer_mode).to_lowercase(),
                "features": described,
            });
            (hooks, Some(info))
        }
        _ => (Hooks::new(), None),
    };
    let (hooks, vector) = match &args.vector {
        Some(path) => {
            let vectors = SteeringVectors::load(path, &model)?;
            let hooks = vectors.add_to(hooks, args.coefficient, &model.device)?;
            let info = serde_json::json!({
                "file": path.display().to_string(),
                "hooks": vectors.vectors.iter().map(|v| v.hook.to_string()).collect::<Vec<_>>(),
                "coefficient": args.coefficient,
            });
            (hooks, Some(info))
        }
        None => (hooks, None),
    };
    let generation = generate(&model, &ids, &options, &hooks)?;
    if args.json {
        return print_json(&serde_json::json!({
            "model": model.dir.display().to_string(),
            "prompt": args.prompt,
            "prompt_tokens": model.tokenizer.tokens_display(&ids),
            "steering": steering,
            "vector": vector,
            "generation": generation,
        }));
    }
    if let Some(info) = &steering {
        eprintln!("steering: {info}");
    }
    if let Some(info) = &vector {
        eprintln!("steering vector: {info}");
    }
    println!("{}{}", args.prompt, generation.text);
    if args.top_k_probs > 0 {
        println!();
        for (i, step) in generation.steps.iter().enumerate() {
            let top: Vec<String> = step
                .top
                .iter()
                .map(|t| format!("'{}' {:.3}", t.token, t.prob))
                .collect();
            println!(
                "step {i:>3}  {:<16} {}",
                format!("'{}'", step.token),
                top.join("  ")
            );
        }
    }
    Ok(())
}
