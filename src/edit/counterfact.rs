//! `edit eval`: CounterFact's scores (Meng et al. 2022) over counterfactual edits generated
//! from the world knowledge base — random capital swaps ("The capital of Peru is" → another
//! country's capital).
//!
//! Per edit, teacher-forced mean NLL per token decides each check: efficacy (the edit
//! prompt), paraphrase (held-out templates) and neighbourhood (other countries keep their
//! own capital over the new one). Scores are the share of successes, averaged per edit and
//! then over edits, as ROME reports them; the score is their harmonic mean. Generation
//! entropy is ROME's weighted 2- and 3-gram entropy (weights 2/3 and 4/3, bits) of text
//! sampled about the subject after the edit, over model tokens: it falls when an edit makes
//! the model repeat itself. The Japanese form's success is reported as a transfer rate.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::rome::Request;
use super::verify::{Check, CheckKind, WorldFact, measure, world_checks};
use crate::error::{Error, Result};
use crate::model::generate::{GenerateOptions, Sampling, generate};
use crate::model::{Hooks, Model};
use crate::world::knowledge::{KnowledgeBase, Relation};

/// One counterfactual: a country's capital replaced by another country's.
#[derive(Clone, Debug, Serialize)]
pub struct Counterfact {
    pub country: usize,
    /// "The capital of {}" with the country and the new capital (English).
    pub request: Request,
    pub new_ja: String,
    pub old_en: String,
}

/// `n` random capital swaps (distinct countries, seeded).
pub fn capital_swaps(kb: &KnowledgeBase, n: usize, seed: u64) -> Result<Vec<Counterfact>> {
    let count = kb.countries.len();
    if n == 0 || n > count || count < 2 {
        return Err(Error::InvalidArgument {
            what: "edits",
            value: n.to_string(),
            message: format!("needs 1..={count} (the knowledge base's countries)"),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut rng);
    let mut cases = Vec::with_capacity(n);
    for &i in order.iter().take(n) {
        let c = &kb.countries[i];
        // Another country's capital, different from this one's.
        let new = loop {
            let j = rng.random_range(0..count);
            if kb.countries[j].capital.en != c.capital.en {
                break j;
            }
        };
        cases.push(Counterfact {
            country: i,
            request: Request {
                prompt: "The capital of {} is".into(),
                subject: c.name.en.clone(),
                target: format!(" {}", kb.countries[new].capital.en),
            },
            new_ja: kb.countries[new].capital.ja.clone(),
            old_en: format!(" {}", c.capital.en),
        });
    }
    Ok(cases)
}

impl Counterfact {
    /// The world fact this counterfactual rewrites.
    pub fn fact(&self) -> WorldFact {
        WorldFact {
            country: self.country,
            relation: Relation::Capital,
        }
    }

    /// The checks of this edit: edit prompt, held-out paraphrases, Japanese, `neighbours`
    /// (none of them a fact in `edited`, the facts edited in the same batch).
    pub fn checks(
        &self,
        kb: &KnowledgeBase,
        neighbours: usize,
        edited: &[WorldFact],
    ) -> Vec<Check> {
        let fact = self.fact();
        world_checks(
            kb,
            fact,
            &self.request.text(),
            &self.request.target,
            Some(&self.new_ja),
            neighbours,
            edited,
        )
    }
}

/// Share of successes per check kind for one model state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Scores {
    /// Teacher-forced P(wanted) > P(rival), per kind: edit, paraphrase, neighbour, japanese.
    pub efficacy: f64,
    pub paraphrase: f64,
    pub neighbourhood: f64,
    pub japanese: f64,
    /// Top-1 is the wanted answer's first token (a stricter reading), per kind.
    pub efficacy_top1: f64,
    pub paraphrase_top1: f64,
    pub neighbourhood_top1: f64,
    pub japanese_top1: f64,
    /// ROME's weighted n-gram entropy of generations about the subject.
    pub generation_entropy: f64,
}

impl Scores {
    /// The harmonic mean of efficacy, paraphrase and neighbourhood scores.
    pub fn score(&self) -> f64 {
        let parts = [self.efficacy, self.paraphrase, self.neighbourhood];
        if parts.iter().any(|&p| p <= 0.0) {
            return 0.0;
        }
        parts.len() as f64 / parts.iter().map(|p| 1.0 / p).sum::<f64>()
    }

    fn add(&mut self, other: &Scores, weight: f64) {
        self.efficacy += other.efficacy * weight;
        self.paraphrase += other.paraphrase * weight;
        self.neighbourhood += other.neighbourhood * weight;
        self.japanese += other.japanese * weight;
        self.efficacy_top1 += other.efficacy_top1 * weight;
        self.paraphrase_top1 += other.paraphrase_top1 * weight;
        self.neighbourhood_top1 += other.neighbourhood_top1 * weight;
        self.japanese_top1 += other.japanese_top1 * weight;
        self.generation_entropy += other.generation_entropy * weight;
    }
}

/// Scores `checks` on the model as it is (with `hooks`); `subject` seeds the generations.
pub fn score_checks(model: &Model, checks: &[Check], subject: &str, seed: u64) -> Result<Scores> {
    let mut wins = [(0usize, 0usize); 4];
    let mut top1 = [0usize; 4];
    for check in checks {
        let slot = match check.kind {
            CheckKind::Edit => 0,
            CheckKind::Paraphrase => 1,
            CheckKind::Neighbour => 2,
            CheckKind::Japanese => 3,
        };
        let outcome = measure(model, check, 1, &Hooks::new())?;
        wins[slot].1 += 1;
        if outcome.wins() {
            wins[slot].0 += 1;
        }
        if outcome.top1_wanted {
            top1[slot] += 1;
        }
    }
    let share = |(ok, n): (usize, usize)| if n == 0 { 0.0 } else { ok as f64 / n as f64 };
    let share_top1 = |slot: usize| share((top1[slot], wins[slot].1));
    Ok(Scores {
        efficacy: share(wins[0]),
        paraphrase: share(wins[1]),
        neighbourhood: share(wins[2]),
        japanese: share(wins[3]),
        efficacy_top1: share_top1(0),
        paraphrase_top1: share_top1(1),
        neighbourhood_top1: share_top1(2),
        japanese_top1: share_top1(3),
        generation_entropy: generation_entropy(model, subject, seed)?,
    })
}

/// Prompts the generations about a subject start from.
const GENERATION_PROMPTS: [&str; 3] = ["{} is a country", "In {},", "The capital of {} is"];

/// Mean n-gram entropy of sampled continuations (top-5, 30 tokens) of prompts about
/// `subject`.
pub fn generation_entropy(model: &Model, subject: &str, seed: u64) -> Result<f64> {
    let mut total = 0.0;
    for (i, p) in GENERATION_PROMPTS.iter().enumerate() {
        let prompt = p.replace("{}", subject);
        let ids = model.encode_prompt(&prompt)?;
        let options = GenerateOptions {
            max_new_tokens: 30,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 5,
                top_p: 1.0,
                seed: seed.wrapping_add(i as u64),
            },
            top_k_probs: 0,
            stop_at_eos: false,
        };
        let g = generate(model, &ids, &options, &Hooks::new())?;
        let mut tokens = ids;
        tokens.extend(g.new_ids());
        total += ngram_entropy(&tokens);
    }
    Ok(total / GENERATION_PROMPTS.len() as f64)
}

/// ROME's `compute_n_gram_entropy`: the arithmetic mean of the 2-gram entropy × 2/3 and the
/// 3-gram entropy × 4/3, in bits.
pub fn ngram_entropy(tokens: &[u32]) -> f64 {
    let entropy = |n: usize| -> f64 {
        let mut counts: std::collections::HashMap<&[u32], usize> = Default::default();
        for w in tokens.windows(n) {
            *counts.entry(w).or_default() += 1;
        }
        let total: usize = counts.values().sum();
        if total == 0 {
            return 0.0;
        }
        counts
            .values()
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.log2()
            })
            .sum()
    };
    (entropy(2) * 2.0 / 3.0 + entropy(3) * 4.0 / 3.0) / 2.0
}

/// Scores over many edits: the mean per-edit scores before and after.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalSummary {
    pub edits: usize,
    pub before: Scores,
    pub after: Scores,
    /// Harmonic mean of efficacy, paraphrase and neighbourhood after the edits.
    pub score: f64,
}

/// Accumulates per-edit scores.
#[derive(Default)]
pub struct Tally {
    before: Vec<Scores>,
    after: Vec<Scores>,
}

impl Tally {
    pub fn push(&mut self, before: Scores, after: Scores) {
        self.before.push(before);
        self.after.push(after);
    }

    pub fn summary(&self) -> EvalSummary {
        let mean = |all: &[Scores]| {
            let mut m = Scores::default();
            for s in all {
                m.add(s, 1.0 / all.len().max(1) as f64);
            }
            m
        };
        let after = mean(&self.after);
        EvalSummary {
            edits: self.after.len(),
            before: mean(&self.before),
            score: after.score(),
            after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_entropy_is_romes_weighted_mean_and_falls_with_repetition() {
        // 2-grams (1,2)×2, (2,1)×2: 1 bit. 3-grams (1,2,1)×2, (2,1,2)×1: H(2/3, 1/3).
        let h3 = -(2.0f64 / 3.0 * (2.0f64 / 3.0).log2() + 1.0 / 3.0 * (1.0f64 / 3.0).log2());
        let want = (1.0 * 2.0 / 3.0 + h3 * 4.0 / 3.0) / 2.0;
        assert!((ngram_entropy(&[1, 2, 1, 2, 1]) - want).abs() < 1e-12);
        let varied: Vec<u32> = (0..30).collect();
        let repeated: Vec<u32> = (0..30).map(|i| i % 3).collect();
        assert!(ngram_entropy(&varied) > ngram_entropy(&repeated));
        assert_eq!(ngram_entropy(&[5]), 0.0);
    }

    #[test]
    fn capital_swaps_are_distinct_countries_with_another_capital() {
        let kb = KnowledgeBase::bundled().unwrap();
        let cases = capital_swaps(&kb, 40, 3).unwrap();
        let mut seen: Vec<usize> = cases.iter().map(|c| c.country).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 40);
        for c in &cases {
            assert_ne!(c.request.target, c.old_en);
            assert!(
                kb.countries
                    .iter()
                    .any(|k| format!(" {}", k.capital.en) == c.request.target)
            );
        }
        assert!(capital_swaps(&kb, 0, 0).is_err());
        assert!(capital_swaps(&kb, kb.countries.len() + 1, 0).is_err());
        let s = Scores {
            efficacy: 1.0,
            paraphrase: 0.5,
            neighbourhood: 1.0,
            ..Scores::default()
        };
        assert!((s.score() - 0.75).abs() < 1e-12);
        // An edit that fails any part scores 0, not a harmonic mean blown up by 1/0.
        let failed = Scores {
            paraphrase: 0.0,
            ..s.clone()
        };
        assert_eq!(failed.score(), 0.0);
    }
}
