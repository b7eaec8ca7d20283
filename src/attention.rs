//! Attention patterns and head detectors: where every head looks, and which heads do one of
//! the well-known jobs — attend to the previous token, park on the first token (an attention
//! sink), look back at earlier copies of the current token (duplicate-token heads), or look at
//! the token that followed an earlier copy (induction heads, Olsson et al. 2022).
//!
//! Where a head looks is not whether it matters: [`ablate_heads`] zeroes each head's output in
//! turn (its `attn.hook_z` columns) and measures the change in next-token loss.
//!
//! A detector's score for a head is the attention mass it puts on the keys the detector names,
//! averaged over the queries where the detector names any (TransformerLens's `detect_head`
//! with its `mul` measure, per query). The standard probe for induction is a run of random
//! tokens repeated once ([`repeated_random_tokens`]): in the second copy, only a head that
//! copies "what came next last time" can attend to the right key.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

/// Every head's pattern held at once is `layers · heads · seq²` floats; past this many the
/// caller should ask for fewer tokens (1 GiB of f32).
const MAX_VALUES: usize = 1 << 28;

/// Every head's attention pattern over one token sequence.
#[derive(Clone, Debug, Serialize)]
pub struct Patterns {
    pub ids: Vec<u32>,
    /// Readable token strings, one per id.
    pub tokens: Vec<String>,
    pub n_layers: usize,
    pub n_heads: usize,
    /// `values[((layer·n_heads + head)·seq + query)·seq + key]`.
    values: Vec<f32>,
}

impl Patterns {
    pub fn seq(&self) -> usize {
        self.ids.len()
    }

    /// Head `layer.head`'s pattern, `seq × seq` row-major: row `q` is query `q`'s probabilities
    /// over the keys (zero after `q`).
    pub fn head(&self, layer: usize, head: usize) -> &[f32] {
        let size = self.seq() * self.seq();
        let start = (layer * self.n_heads + head) * size;
        &self.values[start..start + size]
    }

    /// Every detector's scores on these patterns.
    pub fn detect(&self) -> Vec<DetectorScores> {
        Detector::ALL.iter().map(|&d| self.score(d)).collect()
    }

    fn score(&self, detector: Detector) -> DetectorScores {
        let seq = self.seq();
        let targets: Vec<(usize, Vec<usize>)> = (0..seq)
            .map(|q| (q, detector.keys(&self.ids, q)))
            .filter(|(_, keys)| !keys.is_empty())
            .collect();
        let scores = (0..self.n_layers)
            .map(|layer| {
                (0..self.n_heads)
                    .map(|head| {
                        let pattern = self.head(layer, head);
                        let total: f32 = targets
                            .iter()
                            .map(|(q, keys)| {
                                keys.iter().map(|&k| pattern[q * seq + k]).sum::<f32>()
                            })
                            .sum();
                        if targets.is_empty() {
                            0.0
                        } else {
                            total / targets.len() as f32
                        }
                    })
                    .collect()
            })
            .collect();
        DetectorScores {
            detector,
            queries: targets.len(),
            scores,
        }
    }
}

/// One job a head may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    /// Query `q` attends to `q − 1` (counted from the third token, so that it is not the
    /// first token, which the sink detector covers).
    PreviousToken,
    /// Query `q ≥ 1` attends to the first token: a sink where heads with nothing to do park.
    FirstToken,
    /// A query whose token appeared earlier attends to those earlier copies.
    DuplicateToken,
    /// A query whose token appeared earlier attends to the token right after each earlier
    /// copy: the prediction "what came next last time comes next again".
    Induction,
}

impl Detector {
    pub const ALL: [Detector; 4] = [
        Detector::PreviousToken,
        Detector::FirstToken,
        Detector::DuplicateToken,
        Detector::Induction,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::PreviousToken => "previous-token",
            Detector::FirstToken => "first-token",
            Detector::DuplicateToken => "duplicate-token",
            Detector::Induction => "induction",
        }
    }

    /// The keys this detector expects query `q` to attend to (empty: `q` is not counted).
    fn keys(self, ids: &[u32], q: usize) -> Vec<usize> {
        let earlier_copies = || (0..q).filter(move |&j| ids[j] == ids[q]);
        match self {
            Detector::PreviousToken if q >= 2 => vec![q - 1],
            Detector::FirstToken if q >= 1 => vec![0],
            Detector::DuplicateToken => earlier_copies().collect(),
            // The token after a copy right before `q` is `q` itself: not a look back.
            Detector::Induction => earlier_copies().map(|j| j + 1).filter(|&k| k < q).collect(),
            _ => Vec::new(),
        }
    }
}

/// One detector's score for every head: `scores[layer][head]` in `[0, 1]`.
#[derive(Clone, Debug, Serialize)]
pub struct DetectorScores {
    pub detector: Detector,
    /// How many queries the detector counted (0: it has nothing to say on this sequence, and
    /// every score is 0).
    pub queries: usize,
    pub scores: Vec<Vec<f32>>,
}

impl DetectorScores {
    /// Every head as `(layer, head, score)`, the highest first.
    pub fn ranked(&self) -> Vec<(usize, usize, f32)> {
        rank_heads(&self.scores, |s| s)
    }
}

/// Every head of a `[layer][head]` grid as `(layer, head, value)`, ordered by `key(value)`,
/// largest first.
pub fn rank_heads(grid: &[Vec<f32>], key: impl Fn(f32) -> f32) -> Vec<(usize, usize, f32)> {
    let mut heads: Vec<(usize, usize, f32)> = grid
        .iter()
        .enumerate()
        .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &v)| (l, h, v)))
        .collect();
    heads.sort_by(|a, b| key(b.2).total_cmp(&key(a.2)));
    heads
}

/// Runs `ids` (`[seq]`) once and keeps every layer's pattern.
pub fn patterns(model: &Model, ids: &[u32]) -> Result<Patterns> {
    let dims = model.dims();
    let (n_layers, n_heads, seq) = (dims.n_layers, dims.n_heads, ids.len());
    let values = n_layers * n_heads * seq * seq;
    if values > MAX_VALUES {
        return Err(Error::InvalidArgument {
            what: "tokens",
            value: seq.to_string(),
            message: format!(
                "every pattern of {n_layers} layers × {n_heads} heads over {seq} tokens is \
                 {values} values; use a shorter prompt"
            ),
        });
    }
    let points: Vec<HookPoint> = (0..n_layers).map(HookPoint::AttnPattern).collect();
    let out = model.forward(
        &model.ids_tensor(ids)?,
        &Hooks::new().capture(points.clone()),
    )?;
    let mut all = Vec::with_capacity(values);
    for point in points {
        let pattern = out.cache.require(point)?.get(0)?.to_dtype(DType::F32)?;
        all.extend(pattern.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Patterns {
        ids: ids.to_vec(),
        tokens: model.tokenizer.tokens_display(ids),
        n_layers,
        n_heads,
        values: all,
    })
}

/// The induction probe: the start token, then `len` random ordinary tokens (no special ones,
/// none twice), then the same `len` again.
pub fn repeated_random_tokens(model: &Model, len: usize, seed: u64) -> Result<Vec<u32>> {
    let special = model.special_tokens();
    let vocab = model.dims().vocab_size as u32;
    let ordinary = (vocab as usize).saturating_sub(special.len());
    if len == 0 || len > ordinary || 2 * len + 1 > model.dims().context_length {
        return Err(Error::InvalidArgument {
            what: "repeated length",
            value: len.to_string(),
            message: format!(
                "must be between 1 and {} (twice it plus the start token must fit the \
                 context of {} tokens)",
                ordinary.min(model.dims().context_length.saturating_sub(1) / 2),
                model.dims().context_length
            ),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut half = Vec::with_capacity(len);
    while half.len() < len {
        let id = rng.random_range(0..vocab);
        if !special.contains(&id) && seen.insert(id) {
            half.push(id);
        }
    }
    let mut ids: Vec<u32> = model.start_token().into_iter().collect();
    ids.extend(&half);
    ids.extend(&half);
    Ok(ids)
}

/// What zeroing each head does to the next-token loss on one sequence.
#[derive(Clone, Debug, Serialize)]
pub struct HeadAblation {
    /// Positions whose prediction of the following token is scored.
    pub scored: Range<usize>,
    /// Mean loss (nats per token) over the scored positions with every head in place.
    pub clean_loss: f32,
    /// `delta[layer][head]`: the mean loss with that head's output zeroed, minus `clean_loss`
    /// (positive: the head was helping).
    pub delta: Vec<Vec<f32>>,
}

impl HeadAblation {
    /// Every head as `(layer, head, Δloss)`, the most helpful first.
    pub fn ranked(&self) -> Vec<(usize, usize, f32)> {
        rank_heads(&self.delta, |d| d)
    }
}

/// Zero-ablates each head in turn — its `attn.hook_z` columns, at every position — and scores
/// the mean loss of predicting `ids[p + 1]` from each position `p` in `scored`. One forward
/// pass per head; `None` when `cancel` is set between two.
pub fn ablate_heads(
    model: &Model,
    ids: &[u32],
    scored: Range<usize>,
    cancel: &AtomicBool,
) -> Result<Option<HeadAblation>> {
    let clean_loss = next_token_loss(model, ids, scored.clone(), &Hooks::new())?;
    let dims = model.dims();
    let mut delta = vec![vec![0f32; dims.n_heads]; dims.n_layers];
    for (layer, row) in delta.iter_mut().enumerate() {
        for (head, d) in row.iter_mut().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let columns: Vec<usize> = (head * dims.head_dim..(head + 1) * dims.head_dim).collect();
            let zero = Intervention::new(InterventionOp::Zero).at_channels(columns);
            let hooks = Hooks::new().intervene(HookPoint::AttnZ(layer), zero);
            *d = next_token_loss(model, ids, scored.clone(), &hooks)? - clean_loss;
        }
    }
    Ok(Some(HeadAblation {
        scored,
        clean_loss,
        delta,
    }))
}

/// The mean loss (nats per token) of predicting `ids[p + 1]` from each position `p` in
/// `scored`, in one forward pass with `hooks`.
pub fn next_token_loss(
    model: &Model,
    ids: &[u32],
    scored: Range<usize>,
    hooks: &Hooks,
) -> Result<f32> {
    if scored.is_empty() || scored.end >= ids.len() {
        return Err(Error::InvalidArgument {
            what: "scored positions",
            value: format!("{scored:?}"),
            message: format!(
                "must be a non-empty range of positions followed by a token (the sequence has {})",
                ids.len()
            ),
        });
    }
    let logits = model
        .forward(&model.ids_tensor(ids)?, hooks)?
        .logits
        .get(0)?;
    let logits = logits
        .narrow(0, scored.start, scored.len())?
        .to_dtype(DType::F32)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::new(&ids[scored.start + 1..scored.end + 1], &model.device)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(-picked.mean_all()?.to_scalar::<f32>()?)
}

/// For a probe of `total` tokens ending in two copies of `len`: the positions whose next token
/// lies in the first copy, then in the second (where an induction head can predict it).
pub fn probe_copies(total: usize, len: usize) -> [Range<usize>; 2] {
    let second = total - len;
    [second - len..second - 1, second..total - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads built to do one job each on `ids`: each detector must rank its own head first
    /// with a score of 1, and give the others what their patterns put on its keys.
    #[test]
    fn each_detector_finds_the_head_built_for_it() {
        // Two copies of "5 6 7" after a start token: positions 4..=6 repeat 1..=3.
        let ids = vec![0u32, 5, 6, 7, 5, 6, 7];
        let seq = ids.len();
        let one_hot = |key_of: &dyn Fn(usize) -> usize| -> Vec<f32> {
            (0..seq)
                .flat_map(|q| {
                    let k = key_of(q);
                    (0..seq).map(move |j| if j == k { 1.0 } else { 0.0 })
                })
                .collect()
        };
        let previous = one_hot(&|q| q.saturating_sub(1));
        let first = one_hot(&|_| 0);
        // In the second copy, the token after the earlier copy (q − 3 + 1); itself before.
        let induction = one_hot(&|q| if q >= 4 { q - 2 } else { q });
        let values = [previous, first, induction].concat();
        let patterns = Patterns {
            tokens: ids.iter().map(u32::to_string).collect(),
            ids,
            n_layers: 1,
            n_heads: 3,
            values,
        };
        let scores = patterns.detect();
        let by = |d: Detector| scores.iter().find(|s| s.detector == d).unwrap();
        for (detector, head) in [
            (Detector::PreviousToken, 0),
            (Detector::FirstToken, 1),
            (Detector::Induction, 2),
        ] {
            let s = by(detector);
            assert_eq!(s.ranked()[0], (0, head, 1.0), "{}", detector.name());
        }
        // Queries counted: 2..=6; 1..=6; the three repeats; the repeats whose earlier copy
        // is followed by a key before them (all three).
        assert_eq!(by(Detector::PreviousToken).queries, 5);
        assert_eq!(by(Detector::FirstToken).queries, 6);
        assert_eq!(by(Detector::DuplicateToken).queries, 3);
        assert_eq!(by(Detector::Induction).queries, 3);
        // No head looks at an earlier copy; the previous-token head's query 1 looks at the
        // first token, one of the six first-token queries; query 1 is not a previous-token one.
        assert_eq!(by(Detector::DuplicateToken).scores[0], vec![0.0, 0.0, 0.0]);
        assert_eq!(by(Detector::PreviousToken).scores[0][1], 0.0);
        assert_eq!(by(Detector::FirstToken).scores[0][0], 1.0 / 6.0);
    }
}
