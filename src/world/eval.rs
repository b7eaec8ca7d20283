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
    /// Both languages together.
    #[serde(flatten)]
    pub all: TraceRecovery,
    /// English prompts put the relation before the subject ("The capital of X is"), Japanese
    /// prompts after it ("Xの首都は"), so the two are worth telling apart.
    pub by_lang: BTreeMap<Lang, TraceRecovery>,
}

/// Recovery figures over one set of traced facts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TraceRecovery {
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

/// Sums of traced probabilities, turned into a [`TraceRecovery`] at the end.
struct TraceTally {
    facts: usize,
    clean: f64,
    corrupt: f64,
    subject: Vec<f64>,
    last: Vec<f64>,
}

impl TraceTally {
    fn new(n_layers: usize) -> Self {
        Self {
            facts: 0,
            clean: 0.0,
            corrupt: 0.0,
            subject: vec![0.0; n_layers],
            last: vec![0.0; n_layers],
        }
    }

    fn add(&mut self, trace: &crate::causal::Trace) {
        self.facts += 1;
        self.clean += f64::from(trace.p_clean);
        self.corrupt += f64::from(trace.p_corrupt);
        for (layer, restored) in trace.p_restored.iter().enumerate() {
            self.subject[layer] += f64::from(restored[0]);
            self.last[layer] += f64::from(restored[1]);
        }
    }

    fn merge(&mut self, other: &TraceTally) {
        self.facts += other.facts;
        self.clean += other.clean;
        self.corrupt += other.corrupt;
        for (a, b) in self.subject.iter_mut().zip(&other.subject) {
            *a += b;
        }
        for (a, b) in self.last.iter_mut().zip(&other.last) {
            *a += b;
        }
    }

    fn recovery(&self) -> TraceRecovery {
        let gap = self.clean - self.corrupt;
        let share = |restored: &[f64]| -> Vec<f64> {
            restored
                .iter()
                .map(|r| {
                    if gap.abs() > 0.0 {
                        (r - self.corrupt) / gap
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let n = self.facts.max(1) as f64;
        TraceRecovery {
            facts: self.facts,
            mean_p_clean: self.clean / n,
            mean_p_corrupt: self.corrupt / n,
            recovery_last_subject_token: share(&self.subject),
            recovery_last_token: share(&self.last),
        }
    }
}

impl TraceSummary {
    /// Best layer and its recovery at the last subject token.
    pub fn best_subject_layer(&self) -> (usize, f64) {
        self.all
            .recovery_last_subject_token
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
    let mut by_lang = BTreeMap::new();
    let stride = (kb.countries.len() / per_lang.max(1)).max(1);
    for lang in Lang::ALL {
        let mut tally = TraceTally::new(n_layers);
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
            tally.add(&trace);
        }
        by_lang.insert(lang, tally);
    }
    let mut all = TraceTally::new(n_layers);
    for tally in by_lang.values() {
        all.merge(tally);
    }
    Ok(TraceSummary {
        settings,
        all: all.recovery(),
        by_lang: by_lang
            .into_iter()
            .map(|(lang, tally)| (lang, tally.recovery()))
            .collect(),
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
            let en = t.by_lang.get(&Lang::En).cloned().unwrap_or_default();
            let ja = t.by_lang.get(&Lang::Ja).cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "Causal trace: {} capital facts ({} \"The capital of X is\", {} \"Xの首都は\"); noise {}σ on the subject embeddings, {} samples, MLP outputs restored over a {}-layer window.",
                t.all.facts,
                en.facts,
                ja.facts,
                t.settings.noise_sigmas,
                t.settings.samples,
                t.settings.window
            );
            let _ = writeln!(
                s,
                "mean P(answer): clean {:.3}, corrupted {:.3} (English {:.3} / {:.3}, Japanese {:.3} / {:.3}).",
                t.all.mean_p_clean,
                t.all.mean_p_corrupt,
                en.mean_p_clean,
                en.mean_p_corrupt,
                ja.mean_p_clean,
                ja.mean_p_corrupt
            );
            let _ = writeln!(s, "Share of the gap recovered:");
            let _ = writeln!(
                s,
                "{:<8} {:>26} {:>26}",
                "", "at the last subject token", "at the last token"
            );
            let _ = writeln!(
                s,
                "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                "layer", "all", "English", "Japanese", "all", "English", "Japanese"
            );
            let pct = |v: &[f64], l: usize| 100.0 * v.get(l).copied().unwrap_or(0.0);
            for l in 0..t.all.recovery_last_subject_token.len() {
                let _ = writeln!(
                    s,
                    "{l:<8} {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}%",
                    pct(&t.all.recovery_last_subject_token, l),
                    pct(&en.recovery_last_subject_token, l),
                    pct(&ja.recovery_last_subject_token, l),
                    pct(&t.all.recovery_last_token, l),
                    pct(&en.recovery_last_token, l),
                    pct(&ja.recovery_last_token, l),
                );
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
