//! `monoscope neurons`: knowledge neurons of a fact, with suppress/amplify checks and what
//! each neuron writes.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{FactArgs, ModelArgs, print_json};
use crate::model::Hooks;
use crate::neurons::{
    FactPrompt, Neuron, NeuronSettings, attribute, fact_prompts, key_contexts, paraphrased,
    probabilities, refine, relative_change, scale_neurons, value_tokens,
};
use crate::sae::activations::Corpus;
use crate::world::knowledge::{KnowledgeBase, Lang};

#[derive(Args)]
pub struct NeuronsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    fact: FactArgs,
    /// More templates of the same fact, one per line with `{}` (default: the prompt behind
    /// three context prefixes).
    #[arg(long, value_name = "FILE")]
    paraphrases: Option<PathBuf>,
    /// Subjects of unrelated facts for the suppress/amplify control, comma-separated; each
    /// is put in the prompt and the model's own answer is its target (default with the
    /// bundled model: five other countries).
    #[arg(long)]
    unrelated: Option<String>,
    /// Integration steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Tokens shown per neuron value vector.
    #[arg(long, default_value_t = 8)]
    value_tokens: usize,
    /// Corpus searched for the contexts that fire each neuron's key (`world`, or a .txt,
    /// .jsonl or .parquet file).
    #[arg(long, default_value = "world")]
    corpus: String,
    /// JSONL field / Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens of --corpus read for key contexts (0: skip them).
    #[arg(long, default_value_t = 20_000)]
    key_tokens: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    prompts: Vec<FactPrompt>,
    p_target: Vec<f32>,
    neurons: Vec<NeuronReport>,
    suppress: Effect,
    amplify: Effect,
}

#[derive(Serialize)]
struct NeuronReport {
    #[serde(flatten)]
    neuron: Neuron,
    /// Tokens its value vector (down-projection column) promotes through the unembedding.
    promotes: Vec<String>,
    /// Contexts that fire its key most, the firing token in [[…]], with the activation.
    key_contexts: Vec<(f32, String)>,
}

/// Mean relative change of P(target): on the fact's prompts, and on unrelated facts'.
#[derive(Serialize)]
struct Effect {
    fact: f32,
    unrelated: Option<f32>,
}

pub fn run(args: &NeuronsArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    if !args.fact.prompt.contains("{}") {
        anyhow::bail!(
            "--prompt {:?} has no `{{}}` for the subject",
            args.fact.prompt
        );
    }
    let templates: Vec<String> = match &args.paraphrases {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading paraphrases {}", path.display()))?;
            let mut t = vec![args.fact.prompt.clone()];
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                if !line.contains("{}") {
                    anyhow::bail!("{}:{}: no `{{}}` for the subject", path.display(), i + 1);
                }
                t.push(line.to_string());
            }
            t
        }
        None => paraphrased(&args.fact.prompt),
    };
    let facts = fact_prompts(&model, &templates, &args.fact.subject, &args.fact.target)?;

    let settings = NeuronSettings {
        steps: args.steps,
        ..NeuronSettings::default()
    };
    let mut attributions = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        eprintln!(
            "attributing prompt {}/{}: {:?}",
            i + 1,
            facts.len(),
            f.prompt
        );
        let ids = model.encode_prompt(&f.prompt)?;
        attributions.push(attribute(&model, &ids, f.target_id, settings.steps)?);
    }
    let neurons = refine(&attributions, &settings);
    if neurons.is_empty() {
        anyhow::bail!(
            "no neuron has a positive attribution to {:?}",
            args.fact.target
        );
    }

    let keys = if args.key_tokens > 0 {
        eprintln!(
            "reading {} tokens of {} for key contexts",
            args.key_tokens, args.corpus
        );
        let corpus = Corpus::parse(&args.corpus, &args.text_field)?;
        key_contexts(&model, &neurons, &corpus, args.key_tokens, 3)?
    } else {
        vec![Vec::new(); neurons.len()]
    };
    let unrelated = unrelated_facts(&model, args)?;
    let effect = |factor: f64| -> anyhow::Result<Effect> {
        let hooks = scale_neurons(&neurons, factor);
        Ok(Effect {
            fact: relative_change(&model, &facts, &hooks)?,
            unrelated: (!unrelated.is_empty())
                .then(|| relative_change(&model, &unrelated, &hooks))
                .transpose()?,
        })
    };
    let token_names = model.token_names();
    let report = Report {
        p_target: probabilities(&model, &facts, &Hooks::new())?,
        suppress: effect(0.0)?,
        amplify: effect(2.0)?,
        neurons: neurons
            .iter()
            .zip(&keys)
            .map(|(n, contexts)| {
                Ok(NeuronReport {
                    neuron: *n,
                    promotes: value_tokens(&model, n, args.value_tokens, &token_names)?
                        .top
                        .into_iter()
                        .map(|t| t.token)
                        .collect(),
                    key_contexts: contexts
                        .iter()
                        .map(|c| (c.activation, render_context(&model, c)))
                        .collect(),
                })
            })
            .collect::<anyhow::Result<_>>()?,
        prompts: facts,
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "knowledge neurons for {:?} → {:?}",
        args.fact.prompt.replace("{}", &args.fact.subject),
        args.fact.target
    );
    for (f, p) in report.prompts.iter().zip(&report.p_target) {
        println!("  P = {p:.3}  {:?}", f.prompt);
    }
    println!(
        "\n{:>5} {:>7} {:>11} {:>7}  promotes",
        "layer", "neuron", "attribution", "shared"
    );
    for n in &report.neurons {
        println!(
            "{:>5} {:>7} {:>11.4} {:>6.0}%  {}",
            n.neuron.layer,
            n.neuron.neuron,
            n.neuron.attribution,
            100.0 * n.neuron.shared_by,
            n.promotes.join(" ")
        );
        for (a, text) in &n.key_contexts {
            println!("{:>26.3}  {text}", a);
        }
    }
    let show = |name: &str, e: &Effect| {
        let unrelated = e
            .unrelated
            .map_or("-".to_string(), |u| format!("{:+.1}%", 100.0 * u));
        println!(
            "{name}: P(target) on the fact's prompts {:+.1}%, on unrelated facts {unrelated}",
            100.0 * e.fact
        );
    };
    println!();
    show("suppress (×0)", &report.suppress);
    show("amplify  (×2)", &report.amplify);
    Ok(())
}

/// The unrelated facts: the prompt with other subjects, each with the model's own answer.
fn unrelated_facts(model: &crate::Model, args: &NeuronsArgs) -> anyhow::Result<Vec<FactPrompt>> {
    let subjects: Vec<String> = match &args.unrelated {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
        None if args.model.model.is_none() => {
            let kb = KnowledgeBase::bundled()?;
            kb.countries
                .iter()
                .map(|c| c.name.get(Lang::En).to_string())
                .filter(|n| n != &args.fact.subject)
                .step_by(37)
                .take(5)
                .collect()
        }
        None => Vec::new(),
    };
    subjects
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let prompt = args.fact.prompt.replace("{}", s);
            let ids = model.encode_prompt(&prompt)?;
            let top = crate::model::generate::next_token_top_k(model, &ids, 1, &Hooks::new())?;
            let target_id = top.first().map(|t| t.id).context("empty vocabulary")?;
            Ok(FactPrompt { prompt, target_id })
        })
        .collect()
}

/// A context's tokens with the firing one in `[[…]]`.
fn render_context(model: &crate::Model, c: &crate::features::stats::Context) -> String {
    c.token_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let t = model.tokenizer.token_display(id).replace('\n', "⏎");
            if i == c.peak as usize {
                format!("[[{t}]]")
            } else {
                t
            }
        })
        .collect()
}
