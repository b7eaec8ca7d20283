//! `monoscope world eval`: does the model know its world? Top-1 accuracy of the answer's first
//! token on held-out-template prompts, per relation and language, and a causal trace showing
//! where capital facts are recalled.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::corpus::{CorpusConfig, CorpusGenerator, EvalItem};
use super::knowledge::{KnowledgeBase, Lang, Relation};
use crate::causal::{
    Fact, TraceSettings, locate_subject, subject_embedding_std, target_token, trace_mlp,
};
use crate::error::Result;
use crate::model::generate::next_token_top_k;
use crate::model::{Hooks, Model};

/// Correct out of total.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    fn add(&mut self, correct: bool) {
        self.total += 1;
        self.correct += usize::from(correct);
    }
}

/// One prompt's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub prompt: String,
    pub answer: String,
    pub relation: Relation,
    pub lang: Lang,
    pub expected_token: String,
    pub predicted_token: String,
    pub predicted_id: u32,
    pub correct: bool,
}

/// Causal-tracing summary over capital prompts.
#[derive(Clone, Debug, Serialize)]
pub struct TraceSummary {
    pub settings: TraceSettings,
    /// Facts traced (those the model answers correctly).
    pub facts: usize,
    pub mean_p_clean: f64,
    pub mean_p_corrupt: f64,
    /// Per layer: share of the clean−corrupt gap recovered by restoring the MLP outputs of
    /// the window around that layer at the subject's last token.
    pub recovery_last_subject_token: Vec<f64>,
    /// The same at the prompt's last token.
    pub recovery_last_token: Vec<f64>,
}

impl TraceSummary {
    /// Best layer and its recovery at the last subject token.
    pub fn best_subject_layer(&self) -> (usize, f64) {
        self.recovery_last_subject_token
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f64::MIN),
                |best, (l, r)| if r > best.1 { (l, r) } else { best },
            )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub prompts: usize,
    pub overall: BTreeMap<Lang, Score>,
    pub by_relation: BTreeMap<Relation, BTreeMap<Lang, Score>>,
    /// Prompts whose answer does not start on a token boundary (counted as wrong).
    pub not_on_token_boundary: usize,
    pub trace: Option<TraceSummary>,
    pub predictions: Vec<Prediction>,
}

/// Scores every held-out prompt; with `trace_facts > 0`, also traces that many capital facts
/// per language.
pub fn evaluate(model: &Model, kb: &KnowledgeBase, trace_facts: usize) -> Result<EvalReport> {
    let items = CorpusGenerator::new(kb, CorpusConfig::default())?.eval_items();
    let mut overall: BTreeMap<Lang, Score> = BTreeMap::new();
    let mut by_relation: BTreeMap<Relation, BTreeMap<Lang, Score>> = BTreeMap::new();
    let mut predictions = Vec::with_capacity(items.len());
    let mut not_on_boundary = 0;
    for item in &items {
        let prediction = predict(model, item)?;
        if prediction.is_none() {
            not_on_boundary += 1;
        }
        let correct = prediction.as_ref().is_some_and(|p| p.correct);
        overall.entry(item.lang).or_default().add(correct);
        by_relation
            .entry(item.relation)
            .or_default()
            .entry(item.lang)
            .or_default()
            .add(correct);
        predictions.extend(prediction);
    }
    let trace = if trace_facts > 0 {
        Some(trace_capitals(model, kb, trace_facts)?)
    } else {
        None
    };
    Ok(EvalReport {
        prompts: items.len(),
        overall,
        by_relation,
        not_on_token_boundary: not_on_boundary,
        trace,
        predictions,
    })
}

/// The model's top-1 next token after the prompt against the answer's first token; `None`
/// when the answer does not start on a token boundary.
fn predict(model: &Model, item: &EvalItem) -> Result<Option<Prediction>> {
    let Ok(expected) = target_token(model, &item.prompt, &item.answer) else {
        return Ok(None);
    };
    let predicted = top1(model, &model.encode_prompt(&item.prompt)?)?;
    Ok(Some(Prediction {
        prompt: item.prompt.clone(),
        answer: item.answer.clone(),
        relation: item.relation,
        lang: item.lang,
        expected_token: model.tokenizer.token_display(expected),
        predicted_token: model.tokenizer.token_display(predicted),
        predicted_id: predicted,
        correct: predicted == expected,
    }))
}

/// The model's most likely next token after `ids`.
fn top1(model: &Model, ids: &[u32]) -> Result<u32> {
    let best = next_token_top_k(model, ids, 1, &Hooks::new())?;
    Ok(best.first().map_or(0, |t| t.id))
}

/// The canonical capital prompt of a country in a language.
pub fn capital_prompt(kb: &KnowledgeBase, country: usize, lang: Lang) -> (String, String, String) {
    let c = &kb.countries[country];
    match lang {
        Lang::En => (
            format!("The capital of {} is", c.name.en),
            c.name.en.clone(),
            format!(" {}", c.capital.en),
        ),
        Lang::Ja => (
            format!("{}の首都は", c.name.ja),
            c.name.ja.clone(),
            c.capital.ja.clone(),
        ),
    }
}

/// Traces `per_lang` evenly spread capital facts per language that the model gets right, at
/// the subject's last token and at the last token.
fn trace_capitals(model: &Model, kb: &KnowledgeBase, per_lang: usize) -> Result<TraceSummary> {
    let settings = TraceSettings::default();
    let n_layers = model.dims().n_layers;
    let mut subjects: Vec<&str> = kb.countries.iter().map(|c| c.name.en.as_str()).collect();
    subjects.extend(kb.countries.iter().map(|c| c.name.ja.as_str()));
    let sigma = subject_embedding_std(model, &subjects)?;
    let (mut clean, mut corrupt) = (0f64, 0f64);
    let mut restored_subject = vec![0f64; n_layers];
    let mut restored_last = vec![0f64; n_layers];
    let mut facts = 0usize;
    let stride = (kb.countries.len() / per_lang.max(1)).max(1);
    for lang in Lang::ALL {
        for country in (0..kb.countries.len()).step_by(stride).take(per_lang) {
            let (prompt, subject, target) = capital_prompt(kb, country, lang);
            let fact = Fact {
                prompt: &prompt,
                subject: &subject,
                target: &target,
            };
            let Ok(expected) = target_token(model, &prompt, &target) else {
                continue;
            };
            let (ids, subject_tokens) = locate_subject(model, &prompt, &subject)?;
            if top1(model, &ids)? != expected {
                continue;
            }
            // Positions: the subject's last token, then the prompt's last token.
            let positions = [subject_tokens.end - 1, ids.len() - 1];
            let trace = trace_mlp(model, &fact, &settings, sigma, Some(&positions))?;
            facts += 1;
            clean += f64::from(trace.p_clean);
            corrupt += f64::from(trace.p_corrupt);
            for layer in 0..n_layers {
                restored_subject[layer] += f64::from(trace.p_restored[layer][0]);
                restored_last[layer] += f64::from(trace.p_restored[layer][1]);
            }
        }
    }
    let gap = clean - corrupt;
    let recovery = |restored: &[f64]| -> Vec<f64> {
        restored
            .iter()
            .map(|r| {
                if gap.abs() > 0.0 {
                    (r - corrupt) / gap
                } else {
                    0.0
                }
            })
            .collect()
    };
    let n = facts.max(1) as f64;
    Ok(TraceSummary {
        settings,
        facts,
        mean_p_clean: clean / n,
        mean_p_corrupt: corrupt / n,
        recovery_last_subject_token: recovery(&restored_subject),
        recovery_last_token: recovery(&restored_last),
    })
}

impl EvalReport {
    /// The human-readable report `monoscope world eval` prints.
    pub fn render(&self, model_name: &str) -> String {
        let mut s = String::new();
        let pct = |score: &Score| {
            format!(
                "{:5.1}% ({:>3}/{:>3})",
                100.0 * score.accuracy(),
                score.correct,
                score.total
            )
        };
        let _ = writeln!(s, "World model evaluation: {model_name}");
        let _ = writeln!(
            s,
            "{} held-out-template prompts; top-1 accuracy of the answer's first token.",
            self.prompts
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "{:<14} {:<20} {:<20}", "relation", "English", "Japanese");
        for (relation, langs) in &self.by_relation {
            let en = langs.get(&Lang::En).copied().unwrap_or_default();
            let ja = langs.get(&Lang::Ja).copied().unwrap_or_default();
            let _ = writeln!(
                s,
                "{:<14} {:<20} {:<20}",
                relation.name(),
                pct(&en),
                pct(&ja)
            );
        }
        let en = self.overall.get(&Lang::En).copied().unwrap_or_default();
        let ja = self.overall.get(&Lang::Ja).copied().unwrap_or_default();
        let _ = writeln!(s, "{:<14} {:<20} {:<20}", "overall", pct(&en), pct(&ja));
        if self.not_on_token_boundary > 0 {
            let _ = writeln!(
                s,
                "({} answers do not start on a token boundary and count as wrong)",
                self.not_on_token_boundary
            );
        }
        if let Some(t) = &self.trace {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "Causal trace: {} capital facts (\"The capital of X is\", \"Xの首都は\"); noise {}σ on the subject embeddings, {} samples, MLP outputs restored over a {}-layer window.",
                t.facts, t.settings.noise_sigmas, t.settings.samples, t.settings.window
            );
            let _ = writeln!(
                s,
                "mean P(answer): clean {:.3}, corrupted {:.3}. Share of the gap recovered:",
                t.mean_p_clean, t.mean_p_corrupt
            );
            let _ = writeln!(
                s,
                "{:<8} {:>20} {:>12}",
                "layer", "last subject token", "last token"
            );
            for (l, (a, b)) in t
                .recovery_last_subject_token
                .iter()
                .zip(&t.recovery_last_token)
                .enumerate()
            {
                let _ = writeln!(s, "{l:<8} {:>19.1}% {:>11.1}%", 100.0 * a, 100.0 * b);
            }
            let (layer, best) = t.best_subject_layer();
            let _ = writeln!(
                s,
                "Best at the last subject token: layer {layer}, {:.1}% recovered.",
                100.0 * best
            );
        }
        s
    }
}
