//! Dense linear probes: the reference that a single SAE feature is measured against.
//!
//! A concept that no linear read-out of the hook can find is out of any feature's reach,
//! while one that a probe finds and no feature does is the SAE's loss (SAEBench compares
//! sparse and dense probes the same way). One logistic regression per concept on the
//! standardised activations, all fitted together by full-batch Adam, each class weighted to
//! half of the loss so that rare concepts are not drowned by their negatives.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sae::cpu::{self, AdamStep, MatRef};

/// Settings of the fit.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    pub steps: usize,
    pub lr: f32,
    /// L2 penalty on the weights.
    pub l2: f32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            steps: 200,
            lr: 0.05,
            l2: 1e-4,
        }
    }
}

/// A uniform sample of rows (reservoir sampling), so that the fit's memory is bounded
/// however long the split is.
pub struct RowSample {
    d: usize,
    capacity: usize,
    seen: u64,
    rows: Vec<f32>,
    labels: Vec<Vec<bool>>,
    rng: StdRng,
}

impl RowSample {
    pub fn new(d: usize, capacity: usize, seed: u64) -> Self {
        Self {
            d,
            capacity,
            seen: 0,
            rows: Vec::new(),
            labels: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Offers one row (`d` values) with its concept flags.
    pub fn offer(&mut self, row: &[f32], labels: &[bool]) {
        self.seen += 1;
        if self.capacity == 0 {
            return;
        }
        if self.labels.len() < self.capacity {
            self.rows.extend_from_slice(row);
            self.labels.push(labels.to_vec());
            return;
        }
        let slot = self.rng.random_range(0..self.seen);
        if let Ok(slot) = usize::try_from(slot)
            && slot < self.capacity
        {
            self.rows[slot * self.d..][..self.d].copy_from_slice(row);
            self.labels[slot] = labels.to_vec();
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Each concept's mean row on it minus its mean row off it (`[concepts][d]`): the
    /// simplest direction that reads the concept, to check a fitted probe's direction against.
    pub fn mean_differences(&self) -> Vec<Vec<f32>> {
        let concepts = self.labels.first().map_or(0, Vec::len);
        (0..concepts)
            .map(|c| {
                let (mut on, mut off) = (vec![0f64; self.d], vec![0f64; self.d]);
                let mut n_on = 0usize;
                for (row, labels) in self.rows.chunks_exact(self.d).zip(&self.labels) {
                    let sum = if labels[c] { &mut on } else { &mut off };
                    n_on += usize::from(labels[c]);
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += f64::from(v);
                    }
                }
                let n_off = self.labels.len() - n_on;
                (on.iter().zip(&off))
                    .map(|(&a, &b)| (a / n_on.max(1) as f64 - b / n_off.max(1) as f64) as f32)
                    .collect()
            })
            .collect()
    }
}

/// One fitted probe per concept, with each one's detection threshold on its logit.
pub struct LinearProbes {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// `[concepts, d]`, on standardised inputs.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Logit above which probe `c` says "concept": the best F1 on the fitted rows.
    pub threshold: Vec<f32>,
}

impl LinearProbes {
    /// Fits a probe for each of the sample's concepts.
    pub fn fit(sample: &RowSample, settings: &ProbeSettings) -> Self {
        let (d, n) = (sample.d, sample.len());
        let concepts = sample.labels.first().map_or(0, Vec::len);
        let mut mean = vec![0f64; d];
        let mut square = vec![0f64; d];
        for row in sample.rows.chunks_exact(d) {
            for ((m, s), &v) in mean.iter_mut().zip(&mut square).zip(row) {
                *m += f64::from(v);
                *s += f64::from(v) * f64::from(v);
            }
        }
        let rows = n.max(1) as f64;
        let inv_std: Vec<f32> = mean
            .iter()
            .zip(&square)
            .map(|(&m, &s)| {
                let var = (s / rows - (m / rows).powi(2)).max(0.0);
                (1.0 / var.sqrt().max(1e-6)) as f32
            })
            .collect();
        let mean: Vec<f32> = mean.iter().map(|&m| (m / rows) as f32).collect();
        let mut probes = Self {
            mean,
            inv_std,
            weight: vec![0.0; concepts * d],
            bias: vec![0.0; concepts],
            threshold: vec![0.0; concepts],
        };
        let x = probes.standardise(&sample.rows);
        // Each class weighs half of the loss.
        let positives: Vec<usize> = (0..concepts)
            .map(|c| sample.labels.iter().filter(|l| l[c]).count())
            .collect();
        let class_weight = |c: usize, on: bool| -> f32 {
            let count = if on { positives[c] } else { n - positives[c] };
            0.5 / count.max(1) as f32
        };
        let (mut m_w, mut v_w) = (vec![0f32; concepts * d], vec![0f32; concepts * d]);
        let (mut m_b, mut v_b) = (vec![0f32; concepts], vec![0f32; concepts]);
        let mut logits = vec![0f32; n * concepts];
        let mut g_logits = vec![0f32; n * concepts];
        let mut g_weight = vec![0f32; concepts * d];
        for step in 0..settings.steps {
            probes.logits_of_standardised(&x, &mut logits);
            let mut g_bias = vec![0f32; concepts];
            for (r, labels) in sample.labels.iter().enumerate() {
                for c in 0..concepts {
                    let p = sigmoid(logits[r * concepts + c]);
                    let on = labels[c];
                    let g = (p - f32::from(u8::from(on))) * class_weight(c, on);
                    g_logits[r * concepts + c] = g;
                    g_bias[c] += g;
                }
            }
            cpu::matmul(
                MatRef::new(&g_logits, n, concepts).t(),
                MatRef::new(&x, n, d),
                &mut g_weight,
                false,
            );
            for (g, &w) in g_weight.iter_mut().zip(&probes.weight) {
                *g += settings.l2 * w;
            }
            let adam = AdamStep {
                lr: settings.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                t: step as u64 + 1,
            };
            adam.apply(&mut probes.weight, &g_weight, &mut m_w, &mut v_w);
            adam.apply(&mut probes.bias, &g_bias, &mut m_b, &mut v_b);
        }
        probes.logits_of_standardised(&x, &mut logits);
        for c in 0..concepts {
            let scored: Vec<(f32, bool)> = (0..n)
                .map(|r| (logits[r * concepts + c], sample.labels[r][c]))
                .collect();
            probes.threshold[c] = best_threshold(scored, positives[c]);
        }
        probes
    }

    pub fn concepts(&self) -> usize {
        self.bias.len()
    }

    /// Probe `concept`'s direction in the raw activations' space: its weights over the
    /// standard deviations (the logit is `(x − mean)·direction + bias`).
    pub fn raw_direction(&self, concept: usize) -> Vec<f32> {
        let d = self.d();
        (self.weight[concept * d..][..d].iter())
            .zip(&self.inv_std)
            .map(|(&w, &s)| w * s)
            .collect()
    }

    /// Width of the rows the probes read.
    fn d(&self) -> usize {
        self.mean.len()
    }

    /// `[rows, concepts]` logits of raw rows (`[rows, d]`).
    pub fn logits(&self, rows: &[f32]) -> Vec<f32> {
        let x = self.standardise(rows);
        let mut out = vec![0f32; x.len() / self.d().max(1) * self.concepts()];
        self.logits_of_standardised(&x, &mut out);
        out
    }

    fn standardise(&self, rows: &[f32]) -> Vec<f32> {
        let mut x = rows.to_vec();
        for row in x.chunks_exact_mut(self.d()) {
            for ((v, &m), &s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *v = (*v - m) * s;
            }
        }
        x
    }

    fn logits_of_standardised(&self, x: &[f32], out: &mut [f32]) {
        let (d, concepts) = (self.d(), self.concepts());
        let n = x.len() / d.max(1);
        cpu::matmul(
            MatRef::new(x, n, d),
            MatRef::new(&self.weight, concepts, d).t(),
            out,
            false,
        );
        for row in out.chunks_exact_mut(concepts) {
            for (v, &b) in row.iter_mut().zip(&self.bias) {
                *v += b;
            }
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The score above which "positive" has the best F1 (`+∞` when nothing is positive).
fn best_threshold(mut scored: Vec<(f32, bool)>, positives: usize) -> f32 {
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut best_f1, mut best) = (0.0f64, f32::INFINITY);
    let mut true_positives = 0usize;
    for (i, &(score, on)) in scored.iter().enumerate() {
        true_positives += usize::from(on);
        // Cut between this score and the next lower one.
        if scored.get(i + 1).is_some_and(|next| next.0 == score) {
            continue;
        }
        let predicted = i + 1;
        let f1 = 2.0 * true_positives as f64 / (predicted + positives).max(1) as f64;
        if f1 > best_f1 {
            best_f1 = f1;
            best = scored.get(i + 1).map_or(f32::NEG_INFINITY, |next| {
                // Midway to the next score, so that the cut holds on new data too.
                0.5 * (score + next.0)
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_finds_a_linear_concept_and_not_a_missing_one() {
        // Concept 0 is "x[3] + x[5] > 1"; concept 1 is random, unrelated to x.
        let (d, n) = (8, 4000);
        let mut rng = StdRng::seed_from_u64(7);
        let mut sample = RowSample::new(d, n, 0);
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..2 * n {
            let row: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let l = vec![row[3] + row[5] > 1.0, rng.random_bool(0.2)];
            rows.push(row);
            labels.push(l);
        }
        for (row, l) in rows.iter().zip(&labels).take(n) {
            sample.offer(row, l);
        }
        let probes = LinearProbes::fit(&sample, &ProbeSettings::default());
        // Held-out rows.
        let held: Vec<f32> = rows[n..].concat();
        let logits = probes.logits(&held);
        let f1 = |c: usize| {
            let (mut tp, mut fires, mut pos) = (0, 0, 0);
            for (r, l) in labels[n..].iter().enumerate() {
                let fire = logits[r * 2 + c] > probes.threshold[c];
                tp += usize::from(fire && l[c]);
                fires += usize::from(fire);
                pos += usize::from(l[c]);
            }
            2.0 * tp as f64 / (fires + pos) as f64
        };
        assert!(f1(0) > 0.95, "linear concept: F1 {}", f1(0));
        assert!(f1(1) < 0.45, "random concept: F1 {}", f1(1));
    }

    #[test]
    fn the_reservoir_keeps_a_bounded_uniform_sample() {
        let mut sample = RowSample::new(1, 100, 3);
        for i in 0..10_000 {
            sample.offer(&[i as f32], &[i % 2 == 0]);
        }
        assert_eq!(sample.len(), 100);
        let late = sample.rows.iter().filter(|&&v| v >= 5000.0).count();
        assert!(
            (30..=70).contains(&late),
            "{late} of 100 from the second half"
        );
    }

    #[test]
    fn the_threshold_cuts_where_f1_is_best() {
        let scored = vec![
            (3.0, true),
            (2.0, true),
            (1.0, false),
            (0.5, true),
            (0.0, false),
        ];
        // Above 1.5: 2 of 3 positives, precision 1 → F1 0.8; above 0.25: 3/3, precision 3/4
        // → F1 0.857.
        assert_eq!(best_threshold(scored, 3), 0.25);
    }
}
