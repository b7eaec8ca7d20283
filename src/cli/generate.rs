//! `monoscope generate`: continue a prompt, optionally showing next-token probabilities.

use clap::Args;

use super::{ModelArgs, print_json};
use crate::model::Hooks;
use crate::model::generate::{GenerateOptions, Sampling, generate};

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
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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
    let generation = generate(&model, &ids, &options, &Hooks::new())?;
    if args.json {
        return print_json(&serde_json::json!({
            "model": model.dir.display().to_string(),
            "prompt": args.prompt,
            "prompt_tokens": model.tokenizer.tokens_display(&ids),
            "generation": generation,
        }));
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
