//! `monoscope saliency`: which prompt tokens a prediction rests on (gradient × input and
//! integrated gradients at the token embeddings).

use anyhow::Context;
use clap::Args;

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar};
use crate::gui::widgets::display_token;
use crate::model::generate::next_token_top_k;
use crate::saliency::{Baseline, SaliencyReport, SaliencyRequest, saliency};

#[derive(Args)]
pub struct SaliencyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// The predicted token attributed (" Tokyo"; its first token); default: the model's
    /// most likely next token at --position.
    #[arg(long)]
    target: Option<String>,
    /// Attribute logit(target) − logit(wrong) instead of the target's logit (" Paris").
    #[arg(long)]
    wrong: Option<String>,
    /// The position whose prediction is attributed (default: the last token).
    #[arg(long)]
    position: Option<usize>,
    /// Integrated-gradients steps (Gauss–Legendre points).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Where the integration starts: `zero` (every token embedding zero) or a token whose
    /// embedding stands at every position; default: the model's start token (zero without one).
    #[arg(long)]
    baseline: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &SaliencyArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let ids = model.encode_prompt(&args.prompt)?;
    let position = args.position.unwrap_or(ids.len() - 1);
    let first_token = |text: &str, flag: &str| -> anyhow::Result<u32> {
        model
            .tokenizer
            .encode(text)?
            .first()
            .copied()
            .with_context(|| format!("{flag} `{text}` has no tokens"))
    };
    let target = match &args.target {
        Some(text) => first_token(text, "--target")?,
        None => {
            let prefix = ids.get(..=position).unwrap_or(&ids);
            next_token_top_k(&model, prefix, 1, &crate::model::Hooks::new())?
                .first()
                .map(|t| t.id)
                .context("the model predicts nothing")?
        }
    };
    let wrong = args
        .wrong
        .as_deref()
        .map(|w| first_token(w, "--wrong"))
        .transpose()?;
    let baseline = match args.baseline.as_deref() {
        None => SaliencyRequest::default_baseline(&model),
        Some("zero") => Baseline::Zero,
        Some(text) => Baseline::Token(first_token(text, "--baseline")?),
    };
    let request = SaliencyRequest {
        ids,
        position,
        target,
        wrong,
        steps: args.steps,
        baseline,
    };
    install_ctrl_c("stopping after this pass");
    let bar = progress_bar(
        request.passes() as u64,
        "saliency {bar:30} {pos}/{len} passes",
    )?;
    let report = saliency(&model, &request, &CANCEL, &mut |done, _| {
        bar.set_position(done as u64)
    })?
    .ok_or_else(|| anyhow::anyhow!("cancelled"))?;
    bar.finish_and_clear();
    if args.json {
        return print_json(&report);
    }
    print_report(&report);
    Ok(())
}

fn print_report(r: &SaliencyReport) {
    let what = match &r.wrong {
        Some(wrong) => format!("logit({}) − logit({})", r.target, wrong),
        None => format!("logit({})", r.target),
    };
    let baseline = match &r.baseline_token {
        Some(token) => format!("from '{}' at every position", display_token(token)),
        None => "with every token embedding zeroed".into(),
    };
    println!(
        "{what} at position {}: {:.3} on the prompt, {:.3} {baseline}",
        r.position, r.value, r.baseline_value
    );
    println!(
        "{:>4}  {:<16} {:>12} {:>12}",
        "pos", "token", "grad×input", "integrated"
    );
    for (i, t) in r.tokens.iter().enumerate() {
        println!(
            "{i:>4}  {:<16} {:>12.3} {:>12.3}",
            format!("'{}'", display_token(&t.token)),
            t.gradient_x_input,
            t.integrated_gradients
        );
    }
    println!(
        "integrated gradients sum to {:.3} against f(prompt) − f(baseline) = {:.3} (gap {:.3}, {} steps)",
        r.value - r.baseline_value + r.completeness_gap,
        r.value - r.baseline_value,
        r.completeness_gap,
        r.steps
    );
}
