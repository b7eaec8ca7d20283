//! Feature absorption (Chanin et al. 2024, "A is for Absorption"; SAEBench's
//! `absorption_fraction`), measured on the world's ground truth instead of first letters.
//!
//! A concept's *main* features are its best single feature and the features it is split into
//! ([`super::score`]). On each held-out token that has the concept and that the concept's dense
//! probe finds, the activation's projection on the probe's direction is split among the SAE's
//! active latents: each latent's share is its activation times its decoder row's projection on
//! that direction. The token is *absorbed* to the extent that latents other than the main ones —
//! aligned with the probe (cosine ≥ 0.1), the three largest — carry what the main features do
//! not; SAEBench's rule, kept as it is:
//! - main features carry at least the whole projection, or the absorbers carry under 40% of
//!   it: fraction 0;
//! - main features carry nothing (or less): fraction 1;
//! - otherwise `a / (a + m)`, with `m` the main features' share and `a` the absorbers', capped
//!   at what the main features leave.
//!
//! A token is *fully* absorbed when every main feature is silent and the single latent with
//! the largest share has cosine ≥ 0.025 with the probe and carries ≥ 40% of the projection.
//!
//! Two choices differ from SAEBench: the projection is of the activation minus the SAE's decoder
//! bias, so that the latents' shares add up to it but for the reconstruction error (SAEBench
//! projects the raw activation, which on a post-GELU hook such as `mlp.hook_post` sits far
//! from 0, shifting every comparison by the bias's projection), and a latent's share is its
//! activation times its decoder row's projection (SAEBench multiplies by the cosine, the same
//! for unit-norm decoder rows). A token whose projection is not positive is not absorbed.
//!
//! The probe's direction is discriminative: a logistic fit corrects the concept's mean
//! difference (mean activation on it minus off it) for the activations' covariance, and may
//! lean on directions of little variance. So the same rule is also run along the mean
//! difference itself ([`Absorption::new`] takes either direction), on the same tokens.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

#[cfg(doc)]
use super::probe::LinearProbes;

/// SAEBench's thresholds.
const ABSORBER_COSINE: f32 = 0.1;
const FULL_ABSORBER_COSINE: f32 = 0.025;
const PROJECTION_SHARE: f32 = 0.4;
const MAX_ABSORBERS: usize = 3;
/// Top absorbing latents listed per concept.
const LISTED_ABSORBERS: usize = 5;

/// One concept's absorption on the evaluation split, along one direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbsorptionScore {
    /// The concept's main features: its best feature and its split features.
    pub main_features: Vec<u32>,
    /// Each main feature's decoder cosine with the direction (how well the direction and
    /// the features agree on what the concept is).
    pub main_cosines: Vec<f32>,
    /// The direction's cosine with the concept's mean difference (mean activation on it
    /// minus off it): near 1, a probe reads the concept where its activations differ; far
    /// below, the fit leans on directions of little variance (1 along the mean difference).
    pub probe_alignment: f32,
    /// Tokens scored: the concept's held-out tokens that its dense probe finds.
    pub tokens: u64,
    /// Mean absorption fraction over those tokens.
    pub mean_fraction: f64,
    /// Share of them fully absorbed by one latent.
    pub full_rate: f64,
    /// The latents most often the largest absorber on a token, with how often.
    pub top_absorbers: Vec<(u32, u64)>,
}

/// The absorption fraction of one token: `projection` is the activation's projection on the
/// probe direction, `main` the main features' share of it, `absorbers` the shares of the
/// aligned other latents (positive, largest first, at most [`MAX_ABSORBERS`]).
fn absorption_fraction(projection: f32, main: f32, absorbers: &[f32]) -> f32 {
    let absorbed: f32 = absorbers.iter().sum();
    if projection <= 0.0 || main >= projection || absorbed < PROJECTION_SHARE * projection {
        return 0.0;
    }
    if main <= 0.0 {
        return 1.0;
    }
    let absorbed = absorbed.min(projection - main);
    (absorbed / (absorbed + main)).clamp(0.0, 1.0)
}

/// Absorption of every concept, accumulated token by token.
pub(super) struct Absorption {
    d_in: usize,
    /// Per concept, sorted.
    main: Vec<Vec<u32>>,
    /// Per concept: the unit direction, and the decoder bias's projection on it.
    direction: Vec<Vec<f32>>,
    offset: Vec<f32>,
    /// `[concept][feature]`: the decoder row's projection on the direction, and its cosine.
    along: Vec<Vec<f32>>,
    cosine: Vec<Vec<f32>>,
    /// Per concept: the direction's cosine with the concept's mean difference.
    alignment: Vec<f32>,
    tokens: Vec<u64>,
    fraction_sum: Vec<f64>,
    full: Vec<u64>,
    top_absorber: Vec<HashMap<u32, u64>>,
}

impl Absorption {
    /// For an SAE's decoder `w_dec` (`[d_sae, d_in]`, rows writing the hook the probes read)
    /// and bias `b_dec`, each concept's direction (any length: a probe's
    /// [`LinearProbes::raw_direction`], or the mean difference itself), each concept's mean
    /// difference, and each concept's main features.
    pub fn new(
        (w_dec, b_dec): (&[f32], &[f32]),
        directions: &[Vec<f32>],
        mean_differences: &[Vec<f32>],
        main: Vec<Vec<u32>>,
    ) -> Self {
        let d_in = b_dec.len();
        let concepts = main.len();
        let norms: Vec<f32> = w_dec
            .chunks_exact(d_in)
            .map(|row| dot(row, row).sqrt())
            .collect();
        let (mut direction, mut offset, mut along, mut cosine) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut alignment = Vec::new();
        for (raw, difference) in directions.iter().zip(mean_differences).take(concepts) {
            let norm = dot(raw, raw).sqrt().max(f32::MIN_POSITIVE);
            let unit: Vec<f32> = raw.iter().map(|v| v / norm).collect();
            let row_along: Vec<f32> = w_dec.chunks_exact(d_in).map(|r| dot(r, &unit)).collect();
            cosine.push(
                (row_along.iter().zip(&norms))
                    .map(|(&a, &n)| if n > 0.0 { a / n } else { 0.0 })
                    .collect(),
            );
            along.push(row_along);
            offset.push(dot(b_dec, &unit));
            let norm = dot(difference, difference).sqrt().max(f32::MIN_POSITIVE);
            alignment.push(dot(difference, &unit) / norm);
            direction.push(unit);
        }
        let main = main
            .into_iter()
            .map(|mut m| {
                m.sort_unstable();
                m
            })
            .collect();
        Self {
            d_in,
            main,
            direction,
            offset,
            along,
            cosine,
            alignment,
            tokens: vec![0; concepts],
            fraction_sum: vec![0.0; concepts],
            full: vec![0; concepts],
            top_absorber: vec![HashMap::new(); concepts],
        }
    }

    /// Adds one token of `concept` that the probe finds: its activation `x` and its active
    /// latents with their activations.
    pub fn add_token(&mut self, concept: usize, x: &[f32], latents: &[u32], values: &[f32]) {
        let c = concept;
        debug_assert_eq!(x.len(), self.d_in);
        let projection = dot(x, &self.direction[c]) - self.offset[c];
        let share = |f: u32, v: f32| v * self.along[c][f as usize];
        let is_main = |f: &u32| self.main[c].binary_search(f).is_ok();
        let mut main = 0f32;
        let mut main_fired = false;
        let mut others: Vec<(f32, u32)> = Vec::new();
        let mut largest: Option<(f32, u32)> = None;
        for (&f, &v) in latents.iter().zip(values) {
            let s = share(f, v);
            if largest.is_none_or(|(best, _)| s > best) {
                largest = Some((s, f));
            }
            if is_main(&f) {
                main += s;
                main_fired |= v > 0.0;
            } else if s > 0.0 && self.cosine[c][f as usize] >= ABSORBER_COSINE {
                others.push((s, f));
            }
        }
        others.sort_by(|a, b| b.0.total_cmp(&a.0));
        others.truncate(MAX_ABSORBERS);
        let absorbers: Vec<f32> = others.iter().map(|&(s, _)| s).collect();
        let fraction = absorption_fraction(projection, main, &absorbers);
        self.tokens[c] += 1;
        self.fraction_sum[c] += f64::from(fraction);
        if fraction > 0.0
            && let Some(&(_, f)) = others.first()
        {
            *self.top_absorber[c].entry(f).or_insert(0) += 1;
        }
        let full = !main_fired
            && projection > 0.0
            && largest.is_some_and(|(s, f)| {
                self.cosine[c][f as usize] >= FULL_ABSORBER_COSINE
                    && s >= PROJECTION_SHARE * projection
            });
        self.full[c] += u64::from(full);
    }

    pub fn finish(self) -> Vec<AbsorptionScore> {
        (self.main.into_iter().enumerate())
            .map(|(c, main_features)| {
                let main_cosines = (main_features.iter())
                    .map(|&f| self.cosine[c][f as usize])
                    .collect();
                let tokens = self.tokens[c];
                let mut top: Vec<(u32, u64)> = self.top_absorber[c].clone().into_iter().collect();
                top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                top.truncate(LISTED_ABSORBERS);
                AbsorptionScore {
                    main_features,
                    main_cosines,
                    probe_alignment: self.alignment[c],
                    tokens,
                    mean_fraction: self.fraction_sum[c] / tokens.max(1) as f64,
                    full_rate: self.full[c] as f64 / tokens.max(1) as f64,
                    top_absorbers: top,
                }
            })
            .collect()
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::probe::{LinearProbes, ProbeSettings, RowSample};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_fraction_follows_saebenchs_rule() {
        // Main features carry it all: nothing absorbed.
        assert_eq!(absorption_fraction(1.0, 1.2, &[0.9]), 0.0);
        // The absorbers carry under 40%: not counted.
        assert_eq!(absorption_fraction(1.0, 0.2, &[0.3]), 0.0);
        // Main features silent, absorbers enough: fully absorbed.
        assert_eq!(absorption_fraction(1.0, 0.0, &[0.5]), 1.0);
        // Partial: 0.6 absorbed, capped at the 0.75 left, against 0.25 main.
        assert!((absorption_fraction(1.0, 0.25, &[0.4, 0.2]) - 0.6 / 0.85).abs() < 1e-6);
        // Capped: the absorbers overshoot what the main features leave.
        assert!((absorption_fraction(1.0, 0.5, &[0.9]) - 0.5).abs() < 1e-6);
        // Nothing to absorb: the activation does not point along the probe.
        assert_eq!(absorption_fraction(-1.0, -2.0, &[]), 0.0);
        assert_eq!(absorption_fraction(0.0, -0.5, &[0.1]), 0.0);
    }

    /// 2,000 rows of a 4-wide hook, uniform noise of half-width `noise` per axis, three in ten
    /// with the concept, which adds `shift`.
    fn concept_sample(seed: u64, noise: [f32; 4], shift: [f32; 4]) -> RowSample {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sample = RowSample::new(4, 2000, 0);
        for _ in 0..2000 {
            let on = rng.random_bool(0.3);
            let row: Vec<f32> = (noise.iter().zip(shift))
                .map(|(&w, s)| rng.random_range(-w..w) + if on { s } else { 0.0 })
                .collect();
            sample.offer(&row, &[on]);
        }
        sample
    }

    /// A concept along axis 0 of a 4-wide hook; latent 0 is its main feature, latent 1 an
    /// absorber ("the concept, on one entity": direction mostly along axis 0), latent 2 is
    /// orthogonal to it.
    #[test]
    fn a_token_carried_by_an_aligned_other_latent_is_absorbed() {
        let sample = concept_sample(3, [0.5; 4], [2.0, 0.0, 0.0, 0.0]);
        let probes = LinearProbes::fit(&sample, &ProbeSettings::default());
        let w_dec = [
            1.0, 0.0, 0.0, 0.0, // the main feature
            0.9, 0.3, 0.0, 0.0, // an absorber
            0.0, 0.0, 1.0, 0.0, // unrelated
        ];
        let b_dec = [0.6, 0.0, 0.0, 0.0];
        let differences = sample.mean_differences();
        assert!(
            differences[0][0] > 1.5,
            "the concept adds 2 to axis 0: {differences:?}"
        );
        let mut absorption = Absorption::new(
            (&w_dec, &b_dec),
            &[probes.raw_direction(0)],
            &differences,
            vec![vec![0]],
        );
        // Carried by the main feature: not absorbed.
        absorption.add_token(0, &[2.0, 0.0, 0.0, 0.0], &[0, 2], &[2.0, 1.0]);
        // Main feature silent, the absorber carries it: fully absorbed.
        absorption.add_token(0, &[2.0, 0.5, 0.0, 0.0], &[1, 2], &[2.0, 1.0]);
        let scores = absorption.finish();
        let s = &scores[0];
        assert_eq!(s.tokens, 2);
        assert!((s.mean_fraction - 0.5).abs() < 1e-6, "{s:?}");
        assert!((s.full_rate - 0.5).abs() < 1e-6, "{s:?}");
        assert_eq!(s.top_absorbers, vec![(1, 1)]);
        assert!(s.main_cosines[0] > 0.9, "the probe reads axis 0: {s:?}");
        assert!(
            s.probe_alignment > 0.9,
            "and so does the mean difference: {s:?}"
        );
    }

    /// The concept moves axis 0 a lot and axis 3 a little, but axis 3 barely varies
    /// otherwise: the probe leans on axis 3, the mean difference on axis 0. A token carried by
    /// an absorber along axis 0 is absorbed along the mean difference and not along the probe.
    #[test]
    fn the_probe_and_the_mean_difference_can_disagree() {
        let sample = concept_sample(5, [0.5, 0.5, 0.5, 0.01], [2.0, 0.0, 0.0, 0.1]);
        let probes = LinearProbes::fit(&sample, &ProbeSettings::default());
        let differences = sample.mean_differences();
        let w_dec = [
            1.0, 0.0, 0.0, 0.0, // the main feature
            0.9, 0.3, 0.0, 0.0, // an absorber
        ];
        let b_dec = [0.0; 4];
        let along = |direction: Vec<f32>| {
            let mut a =
                Absorption::new((&w_dec, &b_dec), &[direction], &differences, vec![vec![0]]);
            a.add_token(0, &[2.0, 0.5, 0.0, 0.1], &[1], &[2.0]);
            a.finish().remove(0)
        };
        let by_probe = along(probes.raw_direction(0));
        assert!(by_probe.probe_alignment < 0.2, "{by_probe:?}");
        assert!(by_probe.main_cosines[0].abs() < 0.1, "{by_probe:?}");
        assert_eq!(by_probe.mean_fraction, 0.0, "{by_probe:?}");
        let by_difference = along(differences[0].clone());
        assert!((by_difference.probe_alignment - 1.0).abs() < 1e-5);
        assert!(by_difference.main_cosines[0] > 0.9, "{by_difference:?}");
        assert_eq!(by_difference.mean_fraction, 1.0, "{by_difference:?}");
        assert_eq!(by_difference.full_rate, 1.0, "{by_difference:?}");
    }
}
