//! Ground-truth monosemanticity on the bundled world: how well the single best feature
//! detects each labelled concept of the world corpus.
//!
//! Two fresh corpora are generated with seeds the SAE never trained on: a *selection* split,
//! on which each concept's best feature (highest F1 of "feature fires" against "token has the
//! concept") is chosen, and an *evaluation* split, on which that feature's precision, recall
//! and F1 are reported. Concepts (per token, from the corpus's character-level labels; a
//! token has a label when it overlaps the labelled span):
//! - `entity:KIND` — the token ends a mention of a name of that kind (country, capital, …):
//!   the first place where the whole name has been read (earlier tokens of "Buenos Aires" or
//!   "ブエノスアイレス" do not yet say which entity, or which kind, they belong to). A name
//!   has every kind it has for its country: "Tokyo" is a capital token also where a sentence
//!   names it as Japan's largest city;
//! - `relation:R` — the next token starts the value of relation R in a sentence stating it:
//!   the place where the model has to say a capital, a currency, … (earlier tokens of the
//!   sentence do not yet say which relation it states);
//! - `lang:ja` — the token is Japanese text.
//!
//! A feature "detects" a concept when its activation exceeds a threshold; the threshold is
//! chosen with the feature on the selection split, from a grid of half-octave steps
//! (0 included, i.e. "fires at all").
//!
//! The reference: a dense linear probe per concept ([`super::probe`]), fitted on a sample of
//! the selection split's activations at the same hook and scored on the evaluation split. Its
//! F1 is what a linear read-out of the hook reaches; a feature can only approach it.
//!
//! Feature splitting (a finding, not a bar): the features that fire almost only on a concept
//! (precision ≥ 0.9 on the selection split) while covering a real part of it (recall ≥ 0.05)
//! but not all of it (recall < 0.9). A concept with two or more of them is split; their
//! union's recall is reported next to the best single feature's.
//!
//! Between the two, k-sparse probes ([`super::sparse_probe`]): a logistic regression on the
//! k latents that differ most on the concept, for a few k — how many latents the concept
//! is spread over.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use super::absorption::{Absorption, AbsorptionScore};
use super::probe::{LinearProbes, ProbeSettings, RowSample};
use super::sparse_probe::{self, SparseProbeScore};
use crate::error::Result;
use crate::model::Model;
use crate::model::hooks::HookPoint;
use crate::sae::Sae;
use crate::sae::codes::{DocumentCoder, SegmentSettings};
use crate::sae::cpu::Active;
use crate::sae::sparse::SparseEncoder;
use crate::world::corpus::{CorpusConfig, CorpusGenerator, TokenLabel, token_labels};
use crate::world::knowledge::{EntityKind, KnowledgeBase, Lang, Relation};

/// Precision and recall below which a feature is not counted as a split piece of a concept.
const SPLIT_PRECISION: f64 = 0.9;
const SPLIT_MIN_RECALL: f64 = 0.05;
const SPLIT_MAX_RECALL: f64 = 0.9;

/// Selection-split tokens the dense probes are fitted on (a uniform sample).
const PROBE_ROWS: usize = 30_000;

/// What a concept is about.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConceptKind {
    Entity(EntityKind),
    Relation(Relation),
    Japanese,
}

/// A labelled concept of the world corpus, in one language or in both.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Concept {
    pub kind: ConceptKind,
    /// `None`: either language (the concept as the knowledge base sees it).
    pub lang: Option<Lang>,
}

impl Concept {
    /// Per-language concepts (scored), then the same merged across languages (a finding).
    pub fn all() -> Vec<Concept> {
        let kinds: Vec<ConceptKind> = EntityKind::ALL
            .into_iter()
            .map(ConceptKind::Entity)
            .chain(Relation::ALL.into_iter().map(ConceptKind::Relation))
            .collect();
        let mut all = Vec::new();
        for &kind in &kinds {
            for lang in Lang::ALL {
                all.push(Concept {
                    kind,
                    lang: Some(lang),
                });
            }
        }
        all.push(Concept {
            kind: ConceptKind::Japanese,
            lang: None,
        });
        all.extend(kinds.into_iter().map(|kind| Concept { kind, lang: None }));
        all
    }

    /// Whether the concept counts towards the mean F1: the per-language ones and `lang:ja`.
    pub fn is_scored(&self) -> bool {
        self.lang.is_some() || self.kind == ConceptKind::Japanese
    }

    pub fn name(&self) -> String {
        let base = match self.kind {
            ConceptKind::Entity(k) => format!("entity:{}", k.name()),
            ConceptKind::Relation(r) => format!("relation:{}", r.name()),
            ConceptKind::Japanese => return "lang:ja".into(),
        };
        match self.lang {
            Some(lang) => format!("{base}:{}", lang.code()),
            None => base,
        }
    }

    /// Whether token `i` of a document with these labels has the concept; `kinds[i]` are
    /// the entity kinds of the token's name ([`name_kinds`]).
    fn holds(&self, labels: &[TokenLabel], kinds: &[Vec<EntityKind>], i: usize) -> bool {
        let label = &labels[i];
        let in_lang = |l: &TokenLabel| self.lang.is_none_or(|lang| l.lang == lang);
        match self.kind {
            ConceptKind::Entity(k) => {
                // The mention's last token: where its whole name has been read.
                let last = labels.get(i + 1).is_none_or(|next| {
                    next.kind != label.kind
                        || next.lang != label.lang
                        || next.country != label.country
                });
                kinds[i].contains(&k) && in_lang(label) && last
            }
            ConceptKind::Relation(r) => labels.get(i + 1).is_some_and(|next| {
                let value = Some(r.value_kind());
                next.relation == Some(r)
                    && next.kind == value
                    && label.kind != value
                    && in_lang(next)
            }),
            ConceptKind::Japanese => label.lang == Lang::Ja,
        }
    }
}

/// Every kind the name of a token's mention has for its country (none outside mentions).
fn name_kinds(kb: &KnowledgeBase, label: &TokenLabel) -> Vec<EntityKind> {
    let (Some(kind), Some(country)) = (label.kind, label.country) else {
        return Vec::new();
    };
    let Some(c) = kb.countries.get(country) else {
        return vec![kind];
    };
    let name = c.entity(kind).get(label.lang);
    EntityKind::ALL
        .into_iter()
        .filter(|&k| k == kind || c.entity(k).get(label.lang) == name)
        .collect()
}

/// Sizes and seeds of the two generated splits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreSettings {
    pub segment: SegmentSettings,
    /// Paragraph documents per country and language in each split.
    pub docs_per_country: usize,
    /// Fact-list documents per language in each split.
    pub fact_lists: usize,
    pub selection_seed: u64,
    pub evaluation_seed: u64,
    /// Fit the dense reference probes (seconds of extra work; the window's labels skip it).
    pub probes: bool,
    /// The k of the k-sparse probes on the SAE's latents (none: skipped).
    pub sparse_probe_ks: Vec<usize>,
}

impl ScoreSettings {
    pub fn new(segment: SegmentSettings) -> Self {
        Self {
            segment,
            docs_per_country: 2,
            fact_lists: 200,
            // Far from the seeds SAE training uses (world:SEED + epoch).
            selection_seed: 1_000_001,
            evaluation_seed: 1_000_002,
            probes: true,
            sparse_probe_ks: vec![1, 2, 5, 10, 20],
        }
    }
}

/// Precision, recall and F1 of one feature at one concept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Detection {
    pub(super) fn new(true_positives: u64, fires: u64, positives: u64) -> Self {
        let precision = true_positives as f64 / fires.max(1) as f64;
        let recall = true_positives as f64 / positives.max(1) as f64;
        let f1 = if true_positives == 0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Self {
            precision,
            recall,
            f1,
        }
    }
}

/// The result for one concept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConceptScore {
    pub concept: String,
    /// Tokens with the concept in the evaluation split.
    pub positives: u64,
    pub best_feature: u32,
    /// Activation above which the feature counts as detecting the concept.
    pub threshold: f32,
    /// The best feature on the selection split (where it was chosen).
    pub selection: Detection,
    /// The same feature on the held-out evaluation split.
    pub evaluation: Detection,
    /// A dense linear probe of the hook on the evaluation split: the reference (when
    /// fitted, [`ScoreSettings::probes`]).
    pub probe: Option<Detection>,
    /// Whether it counts towards the mean (per-language concepts and `lang:ja`).
    pub scored: bool,
    /// Features that fire almost only on this concept and cover part of it.
    pub split_features: Vec<u32>,
    /// Recall of those features together (selection split).
    pub split_union_recall: f64,
    /// The latents the k-sparse probes read, best first (the first k for each k).
    pub sparse_probe_latents: Vec<u32>,
    /// The k-sparse probes on the evaluation split, one per k of
    /// [`ScoreSettings::sparse_probe_ks`].
    pub sparse_probes: Vec<SparseProbeScore>,
    /// Feature absorption on the evaluation split along the dense probe's direction, as
    /// SAEBench measures it (with the dense probes, for an SAE).
    pub absorption: Option<AbsorptionScore>,
    /// The same along the concept's mean difference, on the same tokens.
    pub absorption_by_mean_difference: Option<AbsorptionScore>,
}

/// The mean F1 of the k-sparse probes at one k.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseProbeMean {
    pub k: usize,
    pub f1: f64,
}

impl ConceptScore {
    /// "N features (union recall R)" for a concept split across features, "-" otherwise.
    pub fn split_text(&self) -> String {
        if self.split_features.len() >= 2 {
            format!(
                "{} features (union recall {:.2})",
                self.split_features.len(),
                self.split_union_recall
            )
        } else {
            "-".into()
        }
    }
}

/// The version of [`ScoreReport`]'s fields and figures, for reports kept on disk (the window
/// keeps them): raise it when either changes, and older ones are scored again.
pub const REPORT_FORMAT: u32 = 3;

/// The per-concept table and its summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    pub concepts: Vec<ConceptScore>,
    /// Mean over the scored concepts of the best feature's F1 on the evaluation split.
    pub mean_f1: f64,
    /// The same mean for the dense linear probes, when fitted.
    pub mean_probe_f1: Option<f64>,
    /// Mean over the scored concepts of each k-sparse probe's F1.
    pub mean_sparse_probe_f1: Vec<SparseProbeMean>,
    /// Mean over the scored concepts (those with tokens to score) of the mean absorption
    /// fraction, and of the share of tokens fully absorbed (when measured).
    pub mean_absorption: Option<f64>,
    pub mean_full_absorption: Option<f64>,
    /// The same two means along the concepts' mean differences.
    pub mean_absorption_by_mean_difference: Option<f64>,
    pub mean_full_absorption_by_mean_difference: Option<f64>,
    /// Scored concepts with two or more split features.
    pub split_concepts: usize,
    pub selection_tokens: u64,
    pub evaluation_tokens: u64,
}

impl ScoreReport {
    /// What the report says `feature` does for the scored concepts: which it is the best
    /// feature of, a split piece of, an absorber of, and which k-sparse probes read it.
    pub fn roles_of(&self, feature: u32) -> Vec<String> {
        let mut roles = Vec::new();
        for c in self.concepts.iter().filter(|c| c.scored) {
            let name = &c.concept;
            if c.best_feature == feature && c.selection.f1 > 0.0 {
                roles.push(format!(
                    "best feature of {name} (held-out F1 {:.3})",
                    c.evaluation.f1
                ));
            } else if c.split_features.contains(&feature) {
                roles.push(format!("one of the features {name} is split into"));
            }
            if let Some(a) = &c.absorption
                && let Some((_, n)) = a.top_absorbers.iter().find(|(f, _)| *f == feature)
            {
                roles.push(format!(
                    "absorbs {name}: the largest absorber on {n} of its {} tokens",
                    a.tokens
                ));
            }
            if let Some(rank) = c.sparse_probe_latents.iter().position(|&f| f == feature) {
                roles.push(format!(
                    "latent {} of {name}'s k-sparse probes (by mean difference)",
                    rank + 1
                ));
            }
        }
        roles
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "{:<24} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7} {:>9}  {}\n",
            "concept",
            "tokens",
            "feature",
            "above",
            "precision",
            "recall",
            "F1",
            "probe F1",
            "split into"
        );
        for (i, c) in self.concepts.iter().enumerate() {
            if !c.scored && i > 0 && self.concepts[i - 1].scored {
                s.push_str(
                    "-- merged across languages (not scored: shows splitting by language) --\n",
                );
            }
            let split = c.split_text();
            s.push_str(&format!(
                "{:<24} {:>8} {:>8} {:>7.3} {:>9.3} {:>7.3} {:>7.3} {:>9}  {split}\n",
                c.concept,
                c.positives,
                c.best_feature,
                c.threshold,
                c.evaluation.precision,
                c.evaluation.recall,
                c.evaluation.f1,
                c.probe.map_or("-".into(), |p| format!("{:.3}", p.f1))
            ));
        }
        s.push_str(&format!(
            "mean best-feature F1 over the {} per-language concepts and lang:ja (held-out split, {} tokens): {:.3}; {} of them split across several features\n",
            self.concepts.iter().filter(|c| c.scored).count(),
            self.evaluation_tokens,
            self.mean_f1,
            self.split_concepts
        ));
        if let Some(mean) = self.mean_probe_f1 {
            s.push_str(&format!(
                "mean dense-probe F1 over the same concepts (a logistic regression of the hook's activations per concept; the reference): {mean:.3}\n"
            ));
        }
        if !self.mean_sparse_probe_f1.is_empty() {
            s.push_str(&self.render_sparse_probes());
        }
        if let (Some(mean), Some(full)) = (self.mean_absorption, self.mean_full_absorption) {
            s.push_str(&self.render_absorption(mean, full));
        }
        s
    }

    /// The absorption table: per concept, its main features and how much of its probe's
    /// projection other latents carry instead.
    fn render_absorption(&self, mean: f64, full: f64) -> String {
        let mut s = format!(
            "\nfeature absorption (SAEBench's rule, on the held-out tokens the dense probe finds; along the probe's direction, then along the mean difference):\n{:<24} {:>7} {:>9} {:>7} {:>7} {:>9} {:>7}  {:<46} {}\n",
            "concept",
            "tokens",
            "absorbed",
            "fully",
            "aligned",
            "by diff",
            "fully",
            "main features (decoder cosine with the probe)",
            "top absorbers (tokens)"
        );
        for c in self.concepts.iter().filter(|c| c.scored) {
            let Some(a) = &c.absorption else { continue };
            let list = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
            let (by_difference, full_by_difference) = c
                .absorption_by_mean_difference
                .as_ref()
                .map_or((f64::NAN, f64::NAN), |d| (d.mean_fraction, d.full_rate));
            s.push_str(&format!(
                "{:<24} {:>7} {:>9.3} {:>7.3} {:>7.2} {:>9.3} {:>7.3}  {:<46} {}\n",
                c.concept,
                a.tokens,
                a.mean_fraction,
                a.full_rate,
                a.probe_alignment,
                by_difference,
                full_by_difference,
                list(
                    &mut (a.main_features.iter().zip(&a.main_cosines))
                        .map(|(f, cos)| format!("{f} (cos {cos:.2})"))
                ),
                list(&mut a.top_absorbers.iter().map(|(f, n)| format!("{f} ({n})"))),
            ));
        }
        s.push_str(&format!(
            "mean absorption fraction {mean:.3}; mean share of tokens fully absorbed {full:.3}\n"
        ));
        if let (Some(mean), Some(full)) = (
            self.mean_absorption_by_mean_difference,
            self.mean_full_absorption_by_mean_difference,
        ) {
            s.push_str(&format!(
                "along the mean differences: mean absorption fraction {mean:.3}; mean share fully absorbed {full:.3}\n"
            ));
        }
        s.push_str("(aligned: the probe direction's cosine with the concept's mean difference; low means the probe leans on directions of little variance)\n");
        s
    }

    /// The k-sparse probes' table: F1 per concept and k, then the means.
    fn render_sparse_probes(&self) -> String {
        let mut s = String::from(
            "\nk-sparse probes (a logistic regression on the k latents whose mean activation differs most on the concept; held-out F1):\n",
        );
        s.push_str(&format!("{:<24}", "concept"));
        for m in &self.mean_sparse_probe_f1 {
            s.push_str(&format!(" {:>7}", format!("k={}", m.k)));
        }
        s.push_str(&format!(" {:>7}  first latents\n", "all-yes"));
        for c in self.concepts.iter().filter(|c| c.scored) {
            s.push_str(&format!("{:<24}", c.concept));
            for p in &c.sparse_probes {
                s.push_str(&format!(" {:>7.3}", p.evaluation.f1));
            }
            s.push_str(&format!(
                " {:>7.3}",
                Detection::new(c.positives, self.evaluation_tokens, c.positives).f1
            ));
            let first: Vec<String> = (c.sparse_probe_latents.iter().take(5))
                .map(u32::to_string)
                .collect();
            s.push_str(&format!("  {}\n", first.join(",")));
        }
        s.push_str(&format!("{:<24}", "mean"));
        for m in &self.mean_sparse_probe_f1 {
            s.push_str(&format!(" {:>7.3}", m.f1));
        }
        s.push_str(
            "\n(all-yes: the F1 of saying every token has the concept; a probe may learn that a latent's silence is the concept, and for a frequent concept such as lang:ja that alone scores high)\n",
        );
        s
    }
}

/// Detection thresholds: level 0 is "fires at all", level `l ≥ 1` is `2^((l − 1)/2 − 8)`.
const LEVELS: usize = 34;

fn threshold(level: usize) -> f32 {
    if level == 0 {
        0.0
    } else {
        2f32.powf((level - 1) as f32 / 2.0 - 8.0)
    }
}

/// The highest level whose threshold `v` exceeds.
fn level_of(v: f32) -> usize {
    (1..LEVELS).rev().find(|&l| v > threshold(l)).unwrap_or(0)
}

/// Counts over one split, per threshold level: tokens with each concept, firings of each
/// feature above the level, and both.
struct Counts {
    tokens: u64,
    positives: Vec<u64>,
    /// `[feature][level]`: firings whose highest passed level is `level`.
    fires: Vec<[u32; LEVELS]>,
    /// `[concept][feature][level]`, the same restricted to tokens with the concept.
    both: Vec<Vec<[u32; LEVELS]>>,
}

impl Counts {
    /// Detection by `feature` above threshold `level`.
    fn detection(&self, concept: usize, feature: usize, level: usize) -> Detection {
        let tail = |h: &[u32; LEVELS]| h[level..].iter().map(|&n| u64::from(n)).sum::<u64>();
        Detection::new(
            tail(&self.both[concept][feature]),
            tail(&self.fires[feature]),
            self.positives[concept],
        )
    }

    /// The (feature, level) with the highest F1 for `concept`.
    fn best(&self, concept: usize) -> (usize, usize, Detection) {
        let mut best = (0, 0, Detection::default());
        for f in 0..self.fires.len() {
            let (mut tp, mut fires) = (0u64, 0u64);
            for level in (0..LEVELS).rev() {
                tp += u64::from(self.both[concept][f][level]);
                fires += u64::from(self.fires[f][level]);
                let d = Detection::new(tp, fires, self.positives[concept]);
                if d.f1 > best.2.f1 {
                    best = (f, level, d);
                }
            }
        }
        best
    }
}

/// Scores `sae` (reading `hook` of `model`) against the world corpus's labels. `None` when
/// `cancel` was set.
pub fn score(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    settings: &ScoreSettings,
    cancel: &AtomicBool,
    mut on_progress: impl FnMut(&str, u64),
) -> Result<Option<ScoreReport>> {
    let encoder = SparseEncoder::new(sae)?;
    let splits = Splits {
        model,
        encoder: &encoder,
        hook,
        settings,
        kb: KnowledgeBase::bundled()?,
        concepts: Concept::all(),
        cancel,
    };
    let n_concepts = splits.concepts.len();
    let rows_for_probes = if settings.probes { PROBE_ROWS } else { 0 };
    let mut sample = RowSample::new(encoder.d_in(), rows_for_probes, settings.selection_seed);
    let Some((selection, rows)) = splits.count(
        settings.selection_seed,
        true,
        |_, inputs, flags| {
            for (row, flag) in inputs.chunks_exact(encoder.d_in()).zip(flags) {
                sample.offer(row, flag);
            }
        },
        |t| on_progress("selection split", t),
    )?
    else {
        return Ok(None);
    };
    // (No rows, no probes: a split of zero tokens has nothing to fit.)
    let probes = (settings.probes && !sample.is_empty()).then(|| {
        on_progress("fitting the dense probes after", selection.tokens);
        LinearProbes::fit(&sample, &ProbeSettings::default())
    });
    let mean_differences = probes.as_ref().map(|_| sample.mean_differences());
    drop(sample);
    let d_sae = encoder.d_sae();
    // Each concept's best feature and threshold, and the features it is split into.
    let chosen: Vec<(usize, usize, Detection)> =
        (0..n_concepts).map(|c| selection.best(c)).collect();
    let split_features: Vec<Vec<u32>> = (0..n_concepts)
        .map(|c| {
            (0..d_sae)
                .filter(|&f| {
                    let d = selection.detection(c, f, 0);
                    d.precision >= SPLIT_PRECISION
                        && (SPLIT_MIN_RECALL..SPLIT_MAX_RECALL).contains(&d.recall)
                })
                .map(|f| f as u32)
                .collect()
        })
        .collect();
    // Absorption reads the decoder in the probes' space: an SAE's, not a transcoder's.
    let mut absorption = match (&probes, mean_differences) {
        (Some(probes), Some(mean_differences)) if !sae.transcoder => {
            let host = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            };
            let main: Vec<Vec<u32>> = (chosen.iter().zip(&split_features))
                .map(|(&(best, _, detection), split)| {
                    let mut main = split.clone();
                    // (A concept no feature detects has no best feature.)
                    if detection.f1 > 0.0 && !main.contains(&(best as u32)) {
                        main.push(best as u32);
                    }
                    main
                })
                .collect();
            let (w_dec, b_dec) = (host(&sae.w_dec)?, host(&sae.b_dec)?);
            let decoder = (w_dec.as_slice(), b_dec.as_slice());
            let probe_directions: Vec<Vec<f32>> =
                (0..n_concepts).map(|c| probes.raw_direction(c)).collect();
            Some((
                Absorption::new(decoder, &probe_directions, &mean_differences, main.clone()),
                Absorption::new(decoder, &mean_differences, &mean_differences, main),
            ))
        }
        _ => None,
    };
    let (mut probe_hits, mut probe_fires) = (vec![0u64; n_concepts], vec![0u64; n_concepts]);
    let sparse_probes = !settings.sparse_probe_ks.is_empty();
    let Some((evaluation, evaluation_rows)) = splits.count(
        settings.evaluation_seed,
        sparse_probes,
        |codes, inputs, flags| {
            let Some(probes) = &probes else {
                return;
            };
            let logits = probes.logits(inputs);
            let rows = logits.chunks_exact(probes.concepts()).zip(flags);
            for (r, (row, flag)) in rows.enumerate() {
                for (c, (&logit, &on)) in row.iter().zip(flag).enumerate() {
                    let fires = logit > probes.threshold[c];
                    probe_fires[c] += u64::from(fires);
                    probe_hits[c] += u64::from(fires && on);
                    if let Some((by_probe, by_difference)) =
                        absorption.as_mut().filter(|_| fires && on)
                    {
                        let (latents, values) = codes.row(r);
                        let x = &inputs[r * encoder.d_in()..][..encoder.d_in()];
                        by_probe.add_token(c, x, latents, values);
                        by_difference.add_token(c, x, latents, values);
                    }
                }
            }
        },
        |t| on_progress("evaluation split", t),
    )?
    else {
        return Ok(None);
    };
    if sparse_probes {
        on_progress("fitting the k-sparse probes after", selection.tokens);
    }
    let sparse = if sparse_probes {
        let ks = &settings.sparse_probe_ks;
        let all = sparse_probe::score_all(&rows, &evaluation_rows, n_concepts, d_sae, ks, cancel);
        let Some(all) = all else {
            return Ok(None);
        };
        all
    } else {
        Vec::new()
    };
    let mut sparse = sparse.into_iter();
    drop(evaluation_rows);
    let (mut absorption, mut absorption_by_difference) = match absorption {
        Some((by_probe, by_difference)) => (
            Some(by_probe.finish().into_iter()),
            Some(by_difference.finish().into_iter()),
        ),
        None => (None, None),
    };
    let mut scores = Vec::new();
    let per_concept = (splits.concepts.iter()).zip(chosen).zip(split_features);
    for (c, ((concept, (best, level, chosen)), split_features)) in per_concept.enumerate() {
        let (sparse_probe_latents, sparse_probes) = sparse.next().unwrap_or_default();
        scores.push(ConceptScore {
            concept: concept.name(),
            scored: concept.is_scored(),
            positives: evaluation.positives[c],
            best_feature: best as u32,
            threshold: threshold(level),
            selection: chosen,
            evaluation: evaluation.detection(c, best, level),
            probe: probes
                .as_ref()
                .map(|_| Detection::new(probe_hits[c], probe_fires[c], evaluation.positives[c])),
            split_union_recall: union_recall(&rows, c, &split_features),
            split_features,
            sparse_probe_latents,
            sparse_probes,
            absorption: absorption.as_mut().and_then(Iterator::next),
            absorption_by_mean_difference: (absorption_by_difference.as_mut())
                .and_then(Iterator::next),
        });
    }
    let mean_over_scored = |f1: &dyn Fn(&ConceptScore) -> f64| {
        let scored: Vec<f64> = scores.iter().filter(|s| s.scored).map(f1).collect();
        scored.iter().sum::<f64>() / scored.len().max(1) as f64
    };
    let mean_f1 = mean_over_scored(&|s| s.evaluation.f1);
    let mean_probe_f1 = probes
        .is_some()
        .then(|| mean_over_scored(&|s| s.probe.map_or(0.0, |p| p.f1)));
    // Over the scored concepts with tokens to score (a probe that finds none says nothing).
    let absorption_mean = |along: fn(&ConceptScore) -> Option<&AbsorptionScore>,
                           of: fn(&AbsorptionScore) -> f64| {
        let values: Vec<f64> = (scores.iter().filter(|s| s.scored))
            .filter_map(|s| along(s).filter(|a| a.tokens > 0).map(of))
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    fn by_probe(s: &ConceptScore) -> Option<&AbsorptionScore> {
        s.absorption.as_ref()
    }
    fn by_difference(s: &ConceptScore) -> Option<&AbsorptionScore> {
        s.absorption_by_mean_difference.as_ref()
    }
    let mean_absorption = absorption_mean(by_probe, |a| a.mean_fraction);
    let mean_full_absorption = absorption_mean(by_probe, |a| a.full_rate);
    let mean_absorption_by_mean_difference = absorption_mean(by_difference, |a| a.mean_fraction);
    let mean_full_absorption_by_mean_difference = absorption_mean(by_difference, |a| a.full_rate);
    let mean_sparse_probe_f1 = (settings.sparse_probe_ks.iter().enumerate())
        .map(|(i, &k)| SparseProbeMean {
            k,
            f1: mean_over_scored(&|s| s.sparse_probes.get(i).map_or(0.0, |p| p.evaluation.f1)),
        })
        .collect();
    Ok(Some(ScoreReport {
        split_concepts: scores
            .iter()
            .filter(|s| s.scored && s.split_features.len() >= 2)
            .count(),
        concepts: scores,
        mean_f1,
        mean_probe_f1,
        mean_sparse_probe_f1,
        mean_absorption,
        mean_full_absorption,
        mean_absorption_by_mean_difference,
        mean_full_absorption_by_mean_difference,
        selection_tokens: selection.tokens,
        evaluation_tokens: evaluation.tokens,
    }))
}

/// One token of a split: the features that fire, and which concepts it has.
pub(super) struct TokenRow {
    pub latents: Vec<u32>,
    /// The latents' activations.
    pub values: Vec<f32>,
    pub concepts: Vec<bool>,
}

/// What generating and coding a split needs.
struct Splits<'a> {
    model: &'a Model,
    encoder: &'a SparseEncoder,
    hook: HookPoint,
    settings: &'a ScoreSettings,
    kb: KnowledgeBase,
    concepts: Vec<Concept>,
    cancel: &'a AtomicBool,
}

impl Splits<'_> {
    /// Generates the split with `seed`, runs the model and SAE over it, and calls `visit`
    /// with each batch's codes, its activations (`[token, d_in]`; empty when no probes are
    /// fitted) and the concept flags of its tokens (`[token][concept]`). `false` when
    /// cancelled.
    fn for_each_batch(
        &self,
        seed: u64,
        mut visit: impl FnMut(&Active, &[f32], &[Vec<bool>]),
    ) -> Result<bool> {
        let config = CorpusConfig {
            seed,
            docs_per_country: self.settings.docs_per_country,
            fact_list_docs: self.settings.fact_lists,
            infobox_docs_per_country: 0,
            docs_per_city: 0,
            ..CorpusConfig::default()
        };
        let docs = CorpusGenerator::new(&self.kb, config)?.training_documents();
        let mut labels = Vec::with_capacity(docs.len());
        let mut ids = Vec::with_capacity(docs.len());
        for doc in &docs {
            let (tokens, offsets) = self.model.tokenizer.encode_with_offsets(&doc.text)?;
            let token_labels = token_labels(doc, &tokens, &offsets);
            let kinds: Vec<Vec<EntityKind>> = token_labels
                .iter()
                .map(|l| name_kinds(&self.kb, l))
                .collect();
            let flags: Vec<Vec<bool>> = (0..tokens.len())
                .map(|i| {
                    self.concepts
                        .iter()
                        .map(|c| c.holds(&token_labels, &kinds, i))
                        .collect()
                })
                .collect();
            labels.push(flags);
            ids.push(tokens);
        }
        let mut coder = DocumentCoder::new(
            self.model,
            self.encoder,
            self.hook,
            self.settings.segment.clone(),
            Box::new(ids.into_iter().map(Ok)),
            0,
            None,
        )?;
        if self.settings.probes {
            coder = coder.keep_inputs();
        }
        while let Some(batch) = coder.next_batch()? {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let flags: Vec<Vec<bool>> = batch
                .addresses()
                .map(|(doc, pos, _)| labels[doc as usize][pos as usize].clone())
                .collect();
            visit(&batch.codes, &batch.inputs, &flags);
        }
        Ok(true)
    }

    /// Counts for one split; with `keep_rows`, also every token's firing set and concepts.
    /// `on_batch` sees each batch's codes, activations and concept flags. `None` when
    /// cancelled.
    fn count(
        &self,
        seed: u64,
        keep_rows: bool,
        mut on_batch: impl FnMut(&Active, &[f32], &[Vec<bool>]),
        mut on_progress: impl FnMut(u64),
    ) -> Result<Option<(Counts, Vec<TokenRow>)>> {
        let d_sae = self.encoder.d_sae();
        let n = self.concepts.len();
        let mut rows = Vec::new();
        let mut counts = Counts {
            tokens: 0,
            positives: vec![0; n],
            fires: vec![[0; LEVELS]; d_sae],
            both: vec![vec![[0; LEVELS]; d_sae]; n],
        };
        let finished = self.for_each_batch(seed, |codes, inputs, flags| {
            on_batch(codes, inputs, flags);
            for (r, flag) in flags.iter().enumerate() {
                counts.tokens += 1;
                let (latents, values) = codes.row(r);
                let levels: Vec<usize> = values.iter().map(|&v| level_of(v)).collect();
                for (&f, &l) in latents.iter().zip(&levels) {
                    counts.fires[f as usize][l] += 1;
                }
                for (c, &on) in flag.iter().enumerate() {
                    if on {
                        counts.positives[c] += 1;
                        for (&f, &l) in latents.iter().zip(&levels) {
                            counts.both[c][f as usize][l] += 1;
                        }
                    }
                }
                if keep_rows {
                    rows.push(TokenRow {
                        latents: latents.to_vec(),
                        values: values.to_vec(),
                        concepts: flag.clone(),
                    });
                }
            }
            on_progress(counts.tokens);
        })?;
        Ok(finished.then_some((counts, rows)))
    }
}

/// The recall of "any of `features` fires" for concept `c` over `rows` (0 for fewer than
/// two features: nothing is split).
fn union_recall(rows: &[TokenRow], c: usize, features: &[u32]) -> f64 {
    if features.len() < 2 {
        return 0.0;
    }
    let set: std::collections::HashSet<u32> = features.iter().copied().collect();
    let (mut covered, mut positives) = (0u64, 0u64);
    for row in rows.iter().filter(|r| r.concepts[c]) {
        positives += 1;
        covered += u64::from(row.latents.iter().any(|f| set.contains(f)));
    }
    covered as f64 / positives.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(kind: Option<EntityKind>, relation: Option<Relation>, lang: Lang) -> TokenLabel {
        TokenLabel {
            id: 0,
            kind,
            relation,
            lang,
            country: None,
        }
    }

    #[test]
    fn concepts_mark_mention_ends_and_prediction_sites() {
        // "The capital of Japan is Tok yo ." with Japan a country mention and Tokyo the value.
        let cap = Some(Relation::Capital);
        let labels = [
            label(None, cap, Lang::En),
            label(None, cap, Lang::En),
            label(Some(EntityKind::Country), cap, Lang::En),
            label(None, cap, Lang::En),
            label(Some(EntityKind::Capital), cap, Lang::En),
            label(Some(EntityKind::Capital), cap, Lang::En),
            label(None, cap, Lang::En),
        ];
        let kinds: Vec<Vec<EntityKind>> = labels
            .iter()
            .map(|l| l.kind.into_iter().collect())
            .collect();
        let holds = |kind, lang| -> Vec<usize> {
            let c = Concept { kind, lang };
            (0..labels.len())
                .filter(|&i| c.holds(&labels, &kinds, i))
                .collect()
        };
        let en = Some(Lang::En);
        assert_eq!(holds(ConceptKind::Entity(EntityKind::Capital), en), vec![5]);
        assert_eq!(
            holds(ConceptKind::Entity(EntityKind::Country), None),
            vec![2]
        );
        assert_eq!(holds(ConceptKind::Relation(Relation::Capital), en), vec![3]);
        assert!(holds(ConceptKind::Relation(Relation::Capital), Some(Lang::Ja)).is_empty());
        assert!(holds(ConceptKind::Japanese, None).is_empty());
    }

    #[test]
    fn a_features_roles_name_every_concept_it_serves() {
        let detection = Detection::new(8, 10, 10);
        let concept = |name: &str, best: u32, scored: bool| ConceptScore {
            concept: name.into(),
            positives: 10,
            best_feature: best,
            threshold: 0.0,
            selection: detection,
            evaluation: detection,
            probe: None,
            scored,
            split_features: vec![best, 7],
            split_union_recall: 0.9,
            sparse_probe_latents: vec![best, 9, 7],
            sparse_probes: Vec::new(),
            absorption: Some(AbsorptionScore {
                main_features: vec![best],
                main_cosines: vec![0.3],
                probe_alignment: 0.9,
                tokens: 10,
                mean_fraction: 0.5,
                full_rate: 0.0,
                top_absorbers: vec![(9, 4)],
            }),
            absorption_by_mean_difference: None,
        };
        let report = ScoreReport {
            concepts: vec![
                concept("entity:continent:en", 3, true),
                concept("entity:continent", 7, false),
            ],
            mean_f1: 0.8,
            mean_probe_f1: None,
            mean_sparse_probe_f1: Vec::new(),
            mean_absorption: None,
            mean_full_absorption: None,
            mean_absorption_by_mean_difference: None,
            mean_full_absorption_by_mean_difference: None,
            split_concepts: 1,
            selection_tokens: 100,
            evaluation_tokens: 100,
        };
        assert_eq!(
            report.roles_of(3),
            [
                "best feature of entity:continent:en (held-out F1 0.800)",
                "latent 1 of entity:continent:en's k-sparse probes (by mean difference)"
            ]
        );
        assert_eq!(
            report.roles_of(9),
            [
                "absorbs entity:continent:en: the largest absorber on 4 of its 10 tokens",
                "latent 2 of entity:continent:en's k-sparse probes (by mean difference)"
            ]
        );
        // Feature 7 is a split piece of the scored concept; the merged (unscored) concept,
        // whose best feature it is, is left out.
        assert_eq!(
            report.roles_of(7)[0],
            "one of the features entity:continent:en is split into"
        );
        assert!(report.roles_of(11).is_empty());
    }

    #[test]
    fn the_best_threshold_trades_precision_for_recall() {
        // One concept, two features. Feature 0 fires on 10 tokens, all positive, at level 3;
        // and on 30 negatives at level 1. Feature 1 fires on 4 positives only.
        let mut fires = vec![[0u32; LEVELS]; 2];
        let mut both = vec![vec![[0u32; LEVELS]; 2]];
        fires[0][3] = 10;
        fires[0][1] = 30;
        both[0][0][3] = 10;
        fires[1][5] = 4;
        both[0][1][5] = 4;
        let counts = Counts {
            tokens: 100,
            positives: vec![12],
            fires,
            both,
        };
        let (feature, level, d) = counts.best(0);
        assert_eq!(
            (feature, level),
            (0, 3),
            "above level 1 and 2 alike: the first found"
        );
        assert!((d.precision - 1.0).abs() < 1e-12);
        assert!((d.recall - 10.0 / 12.0).abs() < 1e-12);
        let all = counts.detection(0, 0, 0);
        assert!((all.precision - 0.25).abs() < 1e-12);
        assert!(level_of(threshold(7) * 1.01) == 7 && level_of(threshold(7)) == 6);
    }
}
