//! `monoscope lens`: the logit lens and direct logit attribution of one prompt.

use clap::Args;

use super::{ModelArgs, print_json};
use crate::lens::{LensCell, LensReport, LensRequest, continuation_token, lens};
use crate::tuned_lens::TunedLens;

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
    /// Also read the lens at every position: each depth's top token for every prefix of the
    /// prompt (in JSON: `grid[depth][position]`).
    #[arg(long)]
    grid: bool,
    /// Read the stream through this tuned lens (`monoscope tuned-lens train`) instead of the
    /// plain logit lens.
    #[arg(long, value_name = "FILE")]
    tuned: Option<std::path::PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &LensArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let ids = model.encode_prompt(&args.prompt)?;
    let token = |text: &Option<String>| {
        text.as_deref()
            .map(|t| continuation_token(&model, &args.prompt, &ids, args.position, t))
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
            grid: args.grid,
            tuned: match &args.tuned {
                Some(path) => Some(std::sync::Arc::new(TunedLens::load(path, &model)?)),
                None => None,
            },
        },
    )?;
    if args.json {
        return print_json(&report);
    }
    print_report(&report);
    if let Some(grid) = &report.grid {
        print_grid(&report, grid);
    }
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
    if r.tuned {
        println!(
            "\ntuned lens: each depth's stream translated, then the final norm and the unembedding"
        );
    } else {
        println!("\nlogit lens: the stream through the final norm and the unembedding");
    }
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
    print_heads(r);
}

/// The heads whose direct effect is largest, by size: where a circuit's attention lives.
fn print_heads(r: &LensReport) {
    let heads = r.heads_by_effect();
    println!(
        "
attention heads with the largest direct effect (L.H; all of them in --json)"
    );
    for (l, h, v) in heads.iter().take(HEADS_SHOWN) {
        println!("{:<26} {v:>+9.4}", format!("head {l}.{h}"));
    }
}

/// Heads listed by the text output.
const HEADS_SHOWN: usize = 8;

/// One line per depth, one column per position: the top token and its probability.
fn print_grid(r: &LensReport, grid: &[Vec<LensCell>]) {
    let cell = |c: &LensCell| {
        c.top
            .first()
            .map_or(String::new(), |t| format!("{:?} {:.2}", t.token, t.prob))
    };
    let widths: Vec<usize> = (0..r.tokens.len())
        .map(|p| {
            let shown = grid.iter().map(|row| cell(&row[p]).chars().count());
            shown
                .chain([format!("{:?}", r.tokens[p]).chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!("\nlogit lens at every position: the top next token read at each depth");
    let mut line = format!("{:<26}", "after token");
    for (token, w) in r.tokens.iter().zip(&widths) {
        line += &format!("  {:<w$}", format!("{token:?}"));
    }
    println!("{}", line.trim_end());
    for (row, lens_row) in grid.iter().zip(&r.lens) {
        let mut line = format!("{:<26}", lens_row.hook);
        for (c, w) in row.iter().zip(&widths) {
            line += &format!("  {:<w$}", cell(c));
        }
        println!("{}", line.trim_end());
    }
}
