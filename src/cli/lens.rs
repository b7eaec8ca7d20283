//! `monoscope lens`: the logit lens and direct logit attribution of one prompt.

use clap::Args;

use super::{ModelArgs, print_json};
use crate::causal::target_token;
use crate::lens::{LensReport, LensRequest, lens};

#[derive(Args)]
pub struct LensArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Token position to read, counting the start token if the model adds one (default: the
    /// last, whose prediction is the next token).
    #[arg(long)]
    position: Option<usize>,
    /// The continuation whose first token's logit is attributed (" Tokyo"); default: the
    /// model's own prediction.
    #[arg(long)]
    target: Option<String>,
    /// Attribute the logit difference between --target and this continuation (" Seoul").
    #[arg(long, requires = "target")]
    versus: Option<String>,
    /// Tokens listed per layer of the lens.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &LensArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let ids = model.encode_prompt(&args.prompt)?;
    // A continuation is tokenised after the text up to the position read.
    let last = ids.len() - 1;
    let context = match args.position {
        Some(p) if p < last => {
            let start = model.start_token();
            let upto: Vec<u32> = ids[..=p]
                .iter()
                .copied()
                .filter(|&id| Some(id) != start)
                .collect();
            model.tokenizer.decode(&upto)?
        }
        _ => args.prompt.clone(),
    };
    let token = |text: &Option<String>| {
        text.as_deref()
            .map(|t| target_token(&model, &context, t))
            .transpose()
    };
    let report = lens(
        &model,
        &LensRequest {
            target: token(&args.target)?,
            versus: token(&args.versus)?,
            ids,
            position: args.position,
            top_k: args.top_k,
        },
    )?;
    if args.json {
        return print_json(&report);
    }
    print_report(&report);
    if let Some(t) = args.target.as_deref().filter(|t| *t != report.target.token) {
        let also = if args.versus.is_some() {
            "; --versus likewise"
        } else {
            ""
        };
        println!("(the target is the first token of {t:?}{also})");
    }
    Ok(())
}

fn print_report(r: &LensReport) {
    println!(
        "position {} ({:?}) of {:?}",
        r.position,
        r.tokens[r.position],
        r.tokens.concat()
    );
    let target = format!("P({:?})", r.target.token);
    println!("\nlogit lens: the stream through the final norm and the unembedding");
    println!("{:<26} {:>10} {:>5}  top tokens", "read at", target, "rank");
    for row in &r.lens {
        let top: Vec<String> = row
            .top
            .iter()
            .map(|p| format!("{:?} {:.3}", p.token, p.prob))
            .collect();
        println!(
            "{:<26} {:>10.4} {:>5}  {}",
            row.hook,
            row.target_prob,
            row.target_rank,
            top.join("  ")
        );
    }
    let what = match &r.versus {
        Some(v) => format!("logit({:?}) − logit({:?})", r.target.token, v.token),
        None => format!("logit({:?})", r.target.token),
    };
    println!("\ndirect logit attribution of {what} = {:.4}", r.logit);
    let largest = r
        .attribution
        .iter()
        .map(|c| c.logit.abs())
        .fold(0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    for c in &r.attribution {
        let bar = "█".repeat((20.0 * c.logit.abs() / largest).round() as usize);
        let sign = if c.logit < 0.0 { '−' } else { '+' };
        println!("{:<26} {:>+9.4}  {sign}{bar}", c.component, c.logit);
    }
}
