//! Per-feature statistics gathered in one streaming pass, in memory bounded by the number of
//! features (never by the corpus): firing count, mean and max activation, a histogram of
//! non-zero activations, the top-N activating contexts, and contexts sampled uniformly from
//! activation intervals (as sae_vis shows them).
//!
//! The histogram and the intervals share one grid per feature: `[0, range)` cut into equal
//! parts, `range` a power of two that doubles (merging neighbouring bins) whenever a larger
//! activation arrives, so the counts stay exact without knowing the maximum in advance.
//! Interval samples are bottom-k samples under a hash of (document, position, feature): each
//! interval keeps the occurrences with the smallest keys, which is a uniform sample of its
//! occurrences and survives merging exactly.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sae::codes::CodedBatch;

/// What to keep per feature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsSettings {
    /// Top activating contexts kept.
    pub top_n: usize,
    /// Equal-width activation intervals sampled (a power of two).
    pub intervals: usize,
    /// Contexts sampled per interval.
    pub samples_per_interval: usize,
    /// Histogram bins (a power of two, at least `intervals`).
    pub histogram_bins: usize,
    /// Tokens kept before and after the token a context is about.
    pub context_before: usize,
    pub context_after: usize,
}

impl Default for StatsSettings {
    fn default() -> Self {
        Self {
            top_n: 16,
            intervals: 8,
            samples_per_interval: 4,
            histogram_bins: 32,
            context_before: 10,
            context_after: 4,
        }
    }
}

impl StatsSettings {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, value: usize, message: &str| {
            Err(Error::InvalidArgument {
                what,
                value: value.to_string(),
                message: message.into(),
            })
        };
        if !self.intervals.is_power_of_two() {
            return bad("intervals", self.intervals, "must be a power of two");
        }
        if !self.histogram_bins.is_power_of_two() || self.histogram_bins < self.intervals {
            return bad(
                "histogram bins",
                self.histogram_bins,
                "must be a power of two, at least the number of intervals",
            );
        }
        if self.top_n == 0 {
            return bad("top contexts", 0, "must be positive");
        }
        Ok(())
    }
}

/// A token in context: the window around it, with the feature's activation on each token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Context {
    pub activation: f32,
    pub doc_id: u64,
    /// Position of the token in its document.
    pub position: u32,
    pub token_ids: Vec<u32>,
    /// The feature's activation on each token of `token_ids`.
    pub token_activations: Vec<f32>,
    /// Index of the token itself within `token_ids`.
    pub peak: u32,
    #[serde(skip)]
    key: u64,
}

/// Contexts sampled from one activation interval `[low, high)`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IntervalSample {
    pub low: f32,
    pub high: f32,
    /// Occurrences in the interval (the samples are drawn from these).
    pub count: u64,
    pub contexts: Vec<Context>,
}

/// Everything gathered about one feature.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FeatureSummary {
    pub feature: u32,
    pub fire_count: u64,
    pub density: f64,
    /// Mean over the tokens where the feature fires (0 if it never does).
    pub mean_activation: f32,
    pub max_activation: f32,
    /// Bin `i` counts activations in `[i·w, (i+1)·w)`, `w` this width.
    pub histogram_bin_width: f32,
    pub histogram: Vec<u64>,
    /// Highest first.
    pub top: Vec<Context>,
    /// Highest interval first; empty intervals left out.
    pub intervals: Vec<IntervalSample>,
}

/// Running state of one feature.
#[derive(Clone, Debug, Default)]
struct Accumulator {
    count: u64,
    sum: f64,
    max: f32,
    /// Upper end of the grid (0 until the first activation).
    range: f32,
    histogram: Vec<u64>,
    top: Vec<Context>,
    /// Smallest activation in a full `top`.
    top_floor: f32,
    interval_counts: Vec<u64>,
    samples: Vec<Vec<Context>>,
}

/// The pass's state for every feature.
pub struct FeatureStats {
    settings: StatsSettings,
    features: Vec<Accumulator>,
    tokens: u64,
}

/// Where a row of a batch sits: its segment, and its index within the segment.
struct RowPlace {
    segment: u32,
    index: u32,
}

impl FeatureStats {
    pub fn new(d_sae: usize, settings: StatsSettings) -> Result<Self> {
        settings.validate()?;
        Ok(Self {
            settings,
            features: vec![Accumulator::default(); d_sae],
            tokens: 0,
        })
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Takes in one batch of codes; features are updated in parallel.
    pub fn observe(&mut self, batch: &CodedBatch) {
        let codes = &batch.codes;
        self.tokens += codes.rows() as u64;
        let mut places = Vec::with_capacity(codes.rows());
        let mut segment_first_row = Vec::with_capacity(batch.segments.len());
        for (s, seg) in batch.segments.iter().enumerate() {
            segment_first_row.push(places.len());
            for i in 0..seg.token_ids.len() {
                places.push(RowPlace {
                    segment: s as u32,
                    index: i as u32,
                });
            }
        }
        let d_sae = self.features.len();
        let by_latent = codes.by_latent(d_sae);
        let settings = &self.settings;
        let chunk = 64;
        self.features
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, accs)| {
                for (i, acc) in accs.iter_mut().enumerate() {
                    let f = c * chunk + i;
                    for e in by_latent.start[f]..by_latent.start[f + 1] {
                        let pair = by_latent.pair[e] as usize;
                        let row = by_latent.row[e] as usize;
                        let v = codes.value[pair];
                        let place = &places[row];
                        let seg = &batch.segments[place.segment as usize];
                        let occurrence = Occurrence {
                            feature: f as u32,
                            value: v,
                            doc_id: seg.doc_id,
                            position: seg.start + place.index,
                        };
                        acc.observe(settings, &occurrence, || {
                            context(
                                settings,
                                batch,
                                place.segment as usize,
                                segment_first_row[place.segment as usize],
                                place.index as usize,
                                &occurrence,
                            )
                        });
                    }
                }
            });
    }

    /// The summaries, feature by feature.
    pub fn finish(self) -> Vec<FeatureSummary> {
        let tokens = self.tokens.max(1) as f64;
        let settings = self.settings;
        self.features
            .into_par_iter()
            .enumerate()
            .map(|(f, acc)| acc.summary(f as u32, tokens, &settings))
            .collect()
    }
}

/// One non-zero activation.
struct Occurrence {
    feature: u32,
    value: f32,
    doc_id: u64,
    position: u32,
}

impl Occurrence {
    /// Pseudo-random, deterministic key (splitmix64 of the address).
    fn key(&self) -> u64 {
        let mut z = self
            .doc_id
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(u64::from(self.position) << 20)
            .wrapping_add(u64::from(self.feature))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The window around token `index` of segment `segment`, whose first row in the batch is
/// `first_row`. Windows stay within the segment (one forward pass), so near a segment's
/// edge a long document's context is shorter.
fn context(
    settings: &StatsSettings,
    batch: &CodedBatch,
    segment: usize,
    first_row: usize,
    index: usize,
    occurrence: &Occurrence,
) -> Context {
    let seg = &batch.segments[segment];
    let from = index.saturating_sub(settings.context_before);
    let to = (index + settings.context_after + 1).min(seg.token_ids.len());
    let token_activations = (from..to)
        .map(|i| {
            let (latents, values) = batch.codes.row(first_row + i);
            latents
                .binary_search(&occurrence.feature)
                .map_or(0.0, |p| values[p])
        })
        .collect();
    Context {
        activation: occurrence.value,
        doc_id: occurrence.doc_id,
        position: occurrence.position,
        token_ids: seg.token_ids[from..to].to_vec(),
        token_activations,
        peak: (index - from) as u32,
        key: occurrence.key(),
    }
}

impl Accumulator {
    fn observe(
        &mut self,
        settings: &StatsSettings,
        o: &Occurrence,
        context: impl FnOnce() -> Context,
    ) {
        let v = o.value;
        self.count += 1;
        self.sum += f64::from(v);
        self.max = self.max.max(v);
        if self.range == 0.0 {
            self.range = 2f32.powi(v.log2().floor() as i32 + 1);
            self.histogram = vec![0; settings.histogram_bins];
            self.interval_counts = vec![0; settings.intervals];
            self.samples = vec![Vec::new(); settings.intervals];
        }
        while v >= self.range {
            self.double_range(settings.samples_per_interval);
        }
        let bin = |parts: usize| ((v / self.range * parts as f32) as usize).min(parts - 1);
        self.histogram[bin(settings.histogram_bins)] += 1;
        let interval = bin(settings.intervals);
        self.interval_counts[interval] += 1;

        let key = o.key();
        let samples = &self.samples[interval];
        let wants_sample =
            samples.len() < settings.samples_per_interval || samples.iter().any(|c| c.key > key);
        let wants_top = self.top.len() < settings.top_n || v > self.top_floor;
        if !(wants_sample || wants_top) {
            return;
        }
        let ctx = context();
        if wants_sample {
            let samples = &mut self.samples[interval];
            samples.push(ctx.clone());
            keep_smallest_keys(samples, settings.samples_per_interval);
        }
        if wants_top {
            self.top.push(ctx);
            if self.top.len() > settings.top_n {
                let (min_at, _) = self
                    .top
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.activation.total_cmp(&b.1.activation))
                    .expect("non-empty");
                self.top.swap_remove(min_at);
            }
            if self.top.len() == settings.top_n {
                self.top_floor = self
                    .top
                    .iter()
                    .map(|c| c.activation)
                    .fold(f32::INFINITY, f32::min);
            }
        }
    }

    /// Doubles the grid: neighbouring histogram bins and intervals merge.
    fn double_range(&mut self, samples_per_interval: usize) {
        self.range *= 2.0;
        fn merge_counts(counts: &mut [u64]) {
            let half = counts.len() / 2;
            for i in 0..half {
                counts[i] = counts[2 * i] + counts[2 * i + 1];
            }
            counts[half..].fill(0);
        }
        merge_counts(&mut self.histogram);
        merge_counts(&mut self.interval_counts);
        let n = self.samples.len();
        for i in 0..n / 2 {
            let mut merged = std::mem::take(&mut self.samples[2 * i]);
            merged.append(&mut self.samples[2 * i + 1]);
            keep_smallest_keys(&mut merged, samples_per_interval);
            self.samples[i] = merged;
        }
        for s in &mut self.samples[n / 2..] {
            s.clear();
        }
    }

    fn summary(mut self, feature: u32, tokens: f64, settings: &StatsSettings) -> FeatureSummary {
        self.top
            .sort_by(|a, b| b.activation.total_cmp(&a.activation));
        let width = self.range / settings.intervals.max(1) as f32;
        let intervals = self
            .samples
            .into_iter()
            .zip(self.interval_counts)
            .enumerate()
            .rev()
            .filter(|(_, (s, _))| !s.is_empty())
            .map(|(i, (mut contexts, count))| {
                contexts.sort_by(|a, b| b.activation.total_cmp(&a.activation));
                IntervalSample {
                    low: i as f32 * width,
                    high: (i + 1) as f32 * width,
                    count,
                    contexts,
                }
            })
            .collect();
        FeatureSummary {
            feature,
            fire_count: self.count,
            density: self.count as f64 / tokens,
            mean_activation: if self.count > 0 {
                (self.sum / self.count as f64) as f32
            } else {
                0.0
            },
            max_activation: self.max,
            histogram_bin_width: self.range / settings.histogram_bins as f32,
            histogram: if self.histogram.is_empty() {
                vec![0; settings.histogram_bins]
            } else {
                self.histogram
            },
            top: self.top,
            intervals,
        }
    }
}

/// Keeps the `n` contexts with the smallest keys.
fn keep_smallest_keys(contexts: &mut Vec<Context>, n: usize) {
    if contexts.len() > n {
        contexts.sort_unstable_by_key(|c| c.key);
        contexts.truncate(n);
    }
}
