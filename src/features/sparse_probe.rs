//! k-sparse probes: how many SAE latents a concept needs before a linear read-out of them
//! finds it (SAEBench's sparse probing, on the world's ground-truth concepts).
//!
//! For each concept the latents are ranked by the absolute difference between their mean
//! activation on the concept's tokens and on the rest (SAEBench's `top_k_mean_diff`); a
//! logistic regression ([`super::probe::LinearProbes`]) is then fitted on the first `k`
//! latents' activations over the selection split, and scored on the evaluation split. At
//! `k = 1` it is close to the best single feature; as `k` grows it climbs towards the dense
//! probe of the hook. The gap between the two says how far a concept is spread over
//! latents: a concept that one latent carries needs no second one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::probe::{LinearProbes, ProbeSettings, RowSample};
use super::score::{Detection, TokenRow};

/// One k-sparse probe's result on the evaluation split.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseProbeScore {
    pub k: usize,
    pub evaluation: Detection,
}

/// Every concept's latents ranked by `|mean on the concept − mean off it|` over `rows`,
/// best first, `keep` of them (fewer when fewer latents fire at all).
pub(super) fn rank_latents(
    rows: &[TokenRow],
    concepts: usize,
    d_sae: usize,
    keep: usize,
) -> Vec<Vec<u32>> {
    let mut total = vec![0f64; d_sae];
    let mut on_concept = vec![vec![0f64; d_sae]; concepts];
    let mut positives = vec![0u64; concepts];
    for row in rows {
        for (&f, &v) in row.latents.iter().zip(&row.values) {
            total[f as usize] += f64::from(v);
        }
        for (c, _) in row.concepts.iter().enumerate().filter(|(_, on)| **on) {
            positives[c] += 1;
            for (&f, &v) in row.latents.iter().zip(&row.values) {
                on_concept[c][f as usize] += f64::from(v);
            }
        }
    }
    let fired: Vec<u32> = (0..d_sae as u32)
        .filter(|&f| total[f as usize] != 0.0)
        .collect();
    (0..concepts)
        .map(|c| {
            let (pos, neg) = (positives[c], rows.len() as u64 - positives[c]);
            let difference = |f: u32| {
                let on = on_concept[c][f as usize];
                let mean_on = on / pos.max(1) as f64;
                let mean_off = (total[f as usize] - on) / neg.max(1) as f64;
                (mean_on - mean_off).abs()
            };
            let mut ranked = fired.clone();
            ranked.sort_by(|&a, &b| difference(b).total_cmp(&difference(a)).then(a.cmp(&b)));
            ranked.truncate(keep);
            ranked
        })
        .collect()
}

/// The `[rows, features.len()]` activations of `features` in `rows` (0 where one is silent).
fn gather(rows: &[TokenRow], features: &[u32]) -> Vec<f32> {
    let column: HashMap<u32, usize> = features.iter().enumerate().map(|(i, &f)| (f, i)).collect();
    let k = features.len();
    let mut dense = vec![0f32; rows.len() * k];
    for (row, out) in rows.iter().zip(dense.chunks_exact_mut(k.max(1))) {
        for (f, &v) in row.latents.iter().zip(&row.values) {
            if let Some(&i) = column.get(f) {
                out[i] = v;
            }
        }
    }
    dense
}

/// Fits a probe of `concept` on the first `k` of `ranked` over `selection` and scores it on
/// `evaluation`, for each `k` of `ks`.
fn score_concept(
    selection: &[TokenRow],
    evaluation: &[TokenRow],
    concept: usize,
    ranked: &[u32],
    ks: &[usize],
) -> Vec<SparseProbeScore> {
    ks.iter()
        .map(|&k| {
            let features = &ranked[..k.min(ranked.len())];
            if features.is_empty() {
                return SparseProbeScore {
                    k,
                    evaluation: Detection::default(),
                };
            }
            let inputs = gather(selection, features);
            // All of the selection split (k columns wide, it fits): the sample never samples.
            let mut sample = RowSample::new(features.len(), selection.len(), 0);
            for (x, row) in inputs.chunks_exact(features.len()).zip(selection) {
                sample.offer(x, &[row.concepts[concept]]);
            }
            let probe = LinearProbes::fit(&sample, &ProbeSettings::default());
            let logits = probe.logits(&gather(evaluation, features));
            let (mut hits, mut fires, mut positives) = (0u64, 0u64, 0u64);
            for (&logit, row) in logits.iter().zip(evaluation) {
                let (fire, on) = (logit > probe.threshold[0], row.concepts[concept]);
                fires += u64::from(fire);
                positives += u64::from(on);
                hits += u64::from(fire && on);
            }
            SparseProbeScore {
                k,
                evaluation: Detection::new(hits, fires, positives),
            }
        })
        .collect()
}

/// Every concept's ranked latents (the first `max(ks)`) and its k-sparse probe scores, one
/// concept per rayon task. `None` when `cancel` was set.
pub(super) fn score_all(
    selection: &[TokenRow],
    evaluation: &[TokenRow],
    concepts: usize,
    d_sae: usize,
    ks: &[usize],
    cancel: &AtomicBool,
) -> Option<Vec<(Vec<u32>, Vec<SparseProbeScore>)>> {
    let keep = ks.iter().copied().max().unwrap_or(0);
    let ranked = rank_latents(selection, concepts, d_sae, keep);
    ranked
        .into_par_iter()
        .enumerate()
        .map(|(c, ranked)| {
            if cancel.load(Ordering::Relaxed) {
                return None;
            }
            let scores = score_concept(selection, evaluation, c, &ranked, ks);
            Some((ranked, scores))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Rows where concept 0 holds when latent 3 or latent 7 fires (each on half of its
    /// tokens), latents 10..40 fire at random, and concept 1 is latent 3 alone.
    fn rows(seed: u64, n: usize) -> Vec<TokenRow> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut latents = Vec::new();
                let mut values = Vec::new();
                let (a, b) = (rng.random_bool(0.1), rng.random_bool(0.1));
                if a {
                    latents.push(3);
                    values.push(rng.random_range(0.5..2.0));
                }
                if b && !a {
                    latents.push(7);
                    values.push(rng.random_range(0.5..2.0));
                }
                for f in 10..40u32 {
                    if rng.random_bool(0.2) {
                        latents.push(f);
                        values.push(rng.random_range(0.0..2.0));
                    }
                }
                TokenRow {
                    latents,
                    values,
                    concepts: vec![a || b, a],
                }
            })
            .collect()
    }

    #[test]
    fn ranking_puts_the_concepts_latents_first() {
        let selection = rows(1, 4000);
        let ranked = rank_latents(&selection, 2, 64, 5);
        assert_eq!(&ranked[1][..1], &[3], "{:?}", ranked[1]);
        let mut first_two = ranked[0][..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, vec![3, 7], "{:?}", ranked[0]);
        assert!(ranked[0].len() == 5 && !ranked[0][2..].contains(&3));
    }

    #[test]
    fn a_concept_spread_over_two_latents_needs_k_two() {
        let (selection, evaluation) = (rows(1, 4000), rows(2, 4000));
        let scores = score_all(
            &selection,
            &evaluation,
            2,
            64,
            &[1, 2, 5],
            &AtomicBool::new(false),
        )
        .unwrap();
        let f1 = |c: usize, i: usize| scores[c].1[i].evaluation.f1;
        // Concept 0 is the union of two latents: one alone finds about half of it.
        assert!(f1(0, 0) < 0.8, "k 1: {}", f1(0, 0));
        assert!(f1(0, 1) > 0.97, "k 2: {}", f1(0, 1));
        assert!(f1(0, 2) > 0.95, "k 5: {}", f1(0, 2));
        // Concept 1 is one latent: k = 1 already finds it.
        assert!(f1(1, 0) > 0.97, "k 1: {}", f1(1, 0));
        assert_eq!(
            scores[0].1.iter().map(|s| s.k).collect::<Vec<_>>(),
            [1, 2, 5]
        );
    }

    #[test]
    fn a_k_beyond_the_firing_latents_uses_them_all() {
        let selection = rows(1, 500);
        let scores = score_all(
            &selection,
            &selection,
            2,
            64,
            &[100],
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(scores[0].0.len(), 32, "latents 3, 7 and 10..40 fire");
        assert!(scores[0].1[0].evaluation.f1 > 0.9);
    }

    #[test]
    fn a_set_cancel_flag_stops_the_fits() {
        let selection = rows(1, 500);
        let cancel = AtomicBool::new(true);
        assert!(score_all(&selection, &selection, 2, 64, &[1, 2], &cancel).is_none());
    }
}
