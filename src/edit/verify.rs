//! What an edit is checked on, and the teacher-forced scores CounterFact uses.
//!
//! For a fact about a country of the world knowledge base, stated with one of its bare
//! phrasings ("The capital of {} is"), the checks come from the world's own templates: the
//! edit prompt, every held-out English paraphrase (never trained on), neighbourhood prompts
//! (other countries, same relation, their true answers) and the Japanese form. Any other fact
//! is checked on its prompt and the paraphrases the caller gives.

use serde::Serialize;

use crate::causal::target_tokens;
use crate::error::Result;
use crate::model::generate::{TokenProb, top_tokens};
use crate::model::{Hooks, Model};
use crate::world::corpus::Templates;
use crate::world::knowledge::{KnowledgeBase, Lang, Relation};

/// Why a prompt is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The prompt the edit was made with: should give the new answer.
    Edit,
    /// Another wording of the same fact: should give the new answer.
    Paraphrase,
    /// The same fact in Japanese: whether the edit transfers (a finding, not a goal ROME has).
    Japanese,
    /// Another subject, same relation: should keep its own answer.
    Neighbour,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Edit => "edit",
            CheckKind::Paraphrase => "paraphrase",
            CheckKind::Japanese => "japanese",
            CheckKind::Neighbour => "neighbour",
        }
    }
}

/// One prompt to check, with the answer wanted after the edit and the one it competes with.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub kind: CheckKind,
    pub prompt: String,
    /// What should follow after the edit (the new target; a neighbour's own answer).
    pub wanted: String,
    /// What it competes with (the old answer; for a neighbour, the new target). `None` when
    /// unknown (a fact outside the knowledge base).
    pub rival: Option<String>,
}

/// A fact the world knowledge base knows: which country, which relation.
#[derive(Clone, Copy, Debug)]
pub struct WorldFact {
    pub country: usize,
    pub relation: Relation,
}

impl WorldFact {
    /// The world fact a template and subject state, if any (English or Japanese subject).
    pub fn find(kb: &KnowledgeBase, template: &str, subject: &str) -> Option<Self> {
        let (relation, _) = Templates::relation_of(template)?;
        let country = kb.find(subject)?;
        Some(Self { country, relation })
    }

    /// The knowledge base's answer in `lang`, with the leading space English answers take.
    pub fn answer(&self, kb: &KnowledgeBase, lang: Lang) -> String {
        let name = kb.countries[self.country]
            .attribute(self.relation)
            .get(lang);
        spaced(name, lang)
    }
}

/// An answer as it follows a prompt: `" Tokyo"` in English, `"東京"` in Japanese.
pub fn spaced(name: &str, lang: Lang) -> String {
    match lang {
        Lang::En => format!(" {}", name.trim_start()),
        Lang::Ja => name.to_string(),
    }
}

/// The Japanese name of an English answer when the knowledge base has it (any relation).
pub fn japanese_name(kb: &KnowledgeBase, english: &str) -> Option<String> {
    let english = english.trim();
    kb.countries.iter().find_map(|c| {
        Relation::ALL
            .iter()
            .map(|&r| c.attribute(r))
            .chain([&c.name])
            .find(|n| n.en == english)
            .map(|n| n.ja.clone())
    })
}

/// The checks of an edit of `fact` to `new_en` (and `new_ja` in Japanese, when known):
/// the edit prompt, the held-out paraphrases, `neighbours` other countries (evenly spread,
/// skipping those whose answer is the new target and those whose fact of this relation is
/// in `edited`: the same batch changes it on purpose) and the Japanese form.
pub fn world_checks(
    kb: &KnowledgeBase,
    fact: WorldFact,
    edit_prompt: &str,
    new_en: &str,
    new_ja: Option<&str>,
    neighbours: usize,
    edited: &[WorldFact],
) -> Vec<Check> {
    let country = &kb.countries[fact.country];
    let old_en = fact.answer(kb, Lang::En);
    let mut checks = vec![Check {
        kind: CheckKind::Edit,
        prompt: edit_prompt.to_string(),
        wanted: new_en.to_string(),
        rival: Some(old_en.clone()),
    }];
    for prompt in Templates::held_out_prompts(fact.relation, Lang::En, &country.name.en) {
        checks.push(Check {
            kind: CheckKind::Paraphrase,
            prompt,
            wanted: new_en.to_string(),
            rival: Some(old_en.clone()),
        });
    }
    if let Some(new_ja) = new_ja {
        checks.push(Check {
            kind: CheckKind::Japanese,
            prompt: Templates::prompt(Lang::Ja, fact.relation, (0, 0), &country.name.ja),
            wanted: new_ja.to_string(),
            rival: Some(fact.answer(kb, Lang::Ja)),
        });
    }
    let n = kb.countries.len();
    let stride = (n / neighbours.max(1)).max(1);
    let mut taken = 0;
    for i in (fact.country + 1..fact.country + n)
        .step_by(stride)
        .map(|i| i % n)
    {
        if taken == neighbours {
            break;
        }
        let other = WorldFact {
            country: i,
            relation: fact.relation,
        };
        let answer = other.answer(kb, Lang::En);
        let in_batch = edited
            .iter()
            .any(|e| e.country == i && e.relation == fact.relation);
        if answer == new_en || answer == old_en || in_batch {
            continue;
        }
        checks.push(Check {
            kind: CheckKind::Neighbour,
            prompt: Templates::prompt(Lang::En, fact.relation, (0, 0), &kb.countries[i].name.en),
            wanted: answer,
            rival: Some(new_en.to_string()),
        });
        taken += 1;
    }
    checks
}

/// The checks of `request`: [`world_checks`] when it is a world fact (Japanese with
/// `target_ja`, else the KB's Japanese name of the target when it has one), else just the
/// edit prompt.
pub fn request_checks(
    kb: &KnowledgeBase,
    request: &super::rome::Request,
    target_ja: Option<&str>,
    neighbours: usize,
    batch: &[super::rome::Request],
) -> Vec<Check> {
    // Countries the same batch edits are no neighbours: their answers move on purpose.
    let edited: Vec<WorldFact> = batch
        .iter()
        .filter_map(|r| WorldFact::find(kb, &r.prompt, &r.subject))
        .collect();
    let prompt = request.text();
    let target_ja = target_ja
        .map(str::to_string)
        .or_else(|| japanese_name(kb, &request.target));
    match WorldFact::find(kb, &request.prompt, &request.subject) {
        Some(fact) => world_checks(
            kb,
            fact,
            &prompt,
            &request.target,
            target_ja.as_deref(),
            neighbours,
            &edited,
        ),
        None => vec![Check {
            kind: CheckKind::Edit,
            prompt,
            wanted: request.target.clone(),
            rival: None,
        }],
    }
}

/// Mean negative log-likelihood per token of `answer` after `prompt`, teacher-forced.
pub fn answer_nll(model: &Model, prompt: &str, answer: &str, hooks: &Hooks) -> Result<f64> {
    Ok(teacher_forced(model, prompt, answer, 0, hooks)?.0)
}

/// One forward pass over `prompt` + `answer` (but its last token): the answer's mean NLL per
/// token, and the `top_k` next tokens after the prompt (causal attention: the answer does
/// not change the prompt's positions).
fn teacher_forced(
    model: &Model,
    prompt: &str,
    answer: &str,
    top_k: usize,
    hooks: &Hooks,
) -> Result<(f64, Vec<TokenProb>)> {
    let mut ids = model.encode_prompt(prompt)?;
    let n_prompt = ids.len();
    let answer_ids = target_tokens(model, prompt, answer)?;
    ids.extend(&answer_ids);
    let logits = model
        .forward(&model.ids_tensor(&ids[..ids.len() - 1])?, hooks)?
        .logits
        .get(0)?
        .to_dtype(candle_core::DType::F32)?;
    let top = if top_k > 0 {
        top_tokens(model, &logits.get(n_prompt - 1)?.to_vec1::<f32>()?, top_k)
    } else {
        Vec::new()
    };
    let log_probs =
        candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?.to_vec2::<f32>()?;
    let nll: f64 = answer_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| -f64::from(log_probs[n_prompt - 1 + i][id as usize]))
        .sum();
    Ok((nll / answer_ids.len() as f64, top))
}

/// One check measured on the current model.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The most likely next tokens.
    pub top: Vec<TokenProb>,
    /// Whether the top-1 token is the first token of `wanted`.
    pub top1_wanted: bool,
    /// Teacher-forced mean NLL per token of `wanted` and of `rival`.
    pub nll_wanted: f64,
    pub nll_rival: Option<f64>,
}

impl Outcome {
    /// CounterFact's success: the wanted answer is likelier than its rival (teacher-forced).
    pub fn wins(&self) -> bool {
        self.nll_rival.is_none_or(|r| self.nll_wanted < r)
    }
}

/// Measures `check` on `model` (with `hooks`, for edits applied as interventions).
pub fn measure(model: &Model, check: &Check, top_k: usize, hooks: &Hooks) -> Result<Outcome> {
    let first = target_tokens(model, &check.prompt, &check.wanted)?[0];
    let (nll_wanted, top) =
        teacher_forced(model, &check.prompt, &check.wanted, top_k.max(1), hooks)?;
    Ok(Outcome {
        top1_wanted: top.first().is_some_and(|t| t.id == first),
        top,
        nll_wanted,
        nll_rival: match &check.rival {
            Some(r) => Some(answer_nll(model, &check.prompt, r, hooks)?),
            None => None,
        },
    })
}
