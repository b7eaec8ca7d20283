//! Which nodes and edges of an attribution graph matter to its logits, and how much of it runs
//! through features rather than errors — circuit-tracer's `prune_graph` and
//! `compute_graph_scores`, on the same definitions.
//!
//! A node's influence is the weight of every path from it to the logits, each edge counted as
//! its share of the absolute edges into its target (rows normalised to sum to 1), each logit as
//! its probability: `w·(A + A² + …)` for the normalised adjacency `A` and logit weights `w`.
//! The graph is acyclic (nodes only reach later layers and positions), so the series ends.
//! Pruning keeps the most influential nodes that together hold `node_threshold` of the total
//! influence (tokens and logits always), then the edges that hold `edge_threshold` of the
//! edge influence among those, and then drops, until nothing changes, features and errors left
//! without an edge out and features left without an edge in.

use rayon::prelude::*;

use super::AttributionGraph;
use crate::error::{Error, Result};

/// What pruning keeps.
#[derive(Clone, Debug)]
pub struct Pruned {
    /// Per node: kept.
    pub nodes: Vec<bool>,
    /// Per adjacency entry (row-major, target × source): kept.
    pub edges: Vec<bool>,
    /// Per node: the share of the total influence held by the nodes at least as influential
    /// (what circuit-tracer's viewer calls a node's cumulative influence).
    pub cumulative_influence: Vec<f32>,
    /// The unpruned graph's scores ([`AttributionGraph::scores`]), from the same influence.
    pub scores: GraphScores,
}

/// circuit-tracer's two measures of how much of a graph its features explain.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GraphScores {
    /// The share of the tokens' and errors' influence on the logits that is the tokens':
    /// 1 when every path from the prompt to the logits runs through features.
    pub replacement: f32,
    /// The share of each node's inputs that do not come from error nodes, weighted by the
    /// node's influence on the logits.
    pub completeness: f32,
}

impl AttributionGraph {
    /// Logit nodes weighted by their probabilities, every other node 0.
    fn logit_weights(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n_nodes()];
        let first = self.n_nodes() - self.logits.len();
        for (slot, l) in w[first..].iter_mut().zip(&self.logits) {
            *slot = l.probability;
        }
        w
    }

    /// Keeps the nodes holding `node_threshold` of the influence on the logits and the edges
    /// holding `edge_threshold` of the edge influence among them (both in 0..=1;
    /// circuit-tracer's defaults are 0.8 and 0.98).
    pub fn prune(&self, node_threshold: f32, edge_threshold: f32) -> Result<Pruned> {
        for (what, t) in [
            ("node threshold", node_threshold),
            ("edge threshold", edge_threshold),
        ] {
            if !(0.0..=1.0).contains(&t) {
                return Err(Error::InvalidArgument {
                    what,
                    value: t.to_string(),
                    message: "must be between 0 and 1".into(),
                });
            }
        }
        let n = self.n_nodes();
        let (n_logits, n_tokens) = (self.logits.len(), self.n_positions());
        let n_features = self.features.len();
        let w = self.logit_weights();
        if let Some(i) = self.adjacency.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "attribution graph edge".into(),
                at: format!("{:?} → {:?}", self.node(i / n), self.node(i % n)),
            });
        }
        let normal = normalised(&self.adjacency, n);
        let influence = influence_of(&normal, &w, n)?;
        let graph_scores = self.scores_from(&normal, &influence, &w);
        drop(normal);
        let cut = threshold(influence.clone(), node_threshold);
        let mut nodes: Vec<bool> = influence.iter().map(|&v| v >= cut).collect();
        for keep in &mut nodes[n - n_logits - n_tokens..] {
            *keep = true;
        }
        // One working matrix (a graph of 9,000 nodes is 300 MB a copy): the kept nodes'
        // adjacency, normalised, then each row times its target's influence.
        let mut scores = self.adjacency.clone();
        zero_dropped(&mut scores, &nodes, n);
        normalise(&mut scores, n);
        let mut through = influence_of(&scores, &w, n)?;
        for (t, wt) in through.iter_mut().zip(&w) {
            *t += wt;
        }
        scores
            .par_chunks_mut(n)
            .zip(through.par_iter())
            .for_each(|(row, &t)| row.iter_mut().for_each(|a| *a *= t));
        // Only edges of positive score are ranked: the rest are no edges.
        let positive: Vec<f32> = scores.par_iter().copied().filter(|&v| v > 0.0).collect();
        let edge_cut = threshold(positive, edge_threshold);
        // (An edge of weight zero is no edge, whatever the threshold.)
        let mut edges: Vec<bool> = scores.iter().map(|&s| s >= edge_cut && s > 0.0).collect();
        drop(scores);
        loop {
            let before = nodes.clone();
            edges.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
                for (s, e) in row.iter_mut().enumerate() {
                    *e &= nodes[t] && nodes[s];
                }
            });
            // Features and errors need an edge out; features an edge in.
            let has_in: Vec<bool> = edges.par_chunks(n).map(|row| row.contains(&true)).collect();
            let mut has_out = vec![false; n];
            for row in edges.chunks(n) {
                for (o, &e) in has_out.iter_mut().zip(row) {
                    *o |= e;
                }
            }
            for i in 0..n - n_logits - n_tokens {
                nodes[i] &= has_out[i];
            }
            for i in 0..n_features {
                nodes[i] &= has_in[i];
            }
            if nodes == before {
                break;
            }
        }
        Ok(Pruned {
            nodes,
            edges,
            cumulative_influence: cumulative(&influence),
            scores: graph_scores,
        })
    }

    /// circuit-tracer's replacement and completeness scores of the unpruned graph.
    pub fn scores(&self) -> Result<GraphScores> {
        let n = self.n_nodes();
        let w = self.logit_weights();
        let normal = normalised(&self.adjacency, n);
        let influence = influence_of(&normal, &w, n)?;
        Ok(self.scores_from(&normal, &influence, &w))
    }

    /// The scores from the normalised adjacency, the nodes' influence and the logit weights.
    fn scores_from(&self, normal: &[f32], influence: &[f32], w: &[f32]) -> GraphScores {
        let n = self.n_nodes();
        let n_features = self.features.len();
        let errors = n_features..n_features + self.n_layers * self.n_positions();
        let tokens = errors.end..errors.end + self.n_positions();
        let token_influence: f64 = influence[tokens].iter().map(|&v| f64::from(v)).sum();
        let error_influence: f64 = influence[errors.clone()]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        let (mut weighted, mut total) = (0f64, 0f64);
        for (t, row) in normal.chunks(n).enumerate() {
            let from_errors: f32 = row[errors.clone()].iter().sum();
            let weight = f64::from(influence[t] + w[t]);
            weighted += f64::from(1.0 - from_errors) * weight;
            total += weight;
        }
        GraphScores {
            replacement: (token_influence
                / (token_influence + error_influence).max(f64::MIN_POSITIVE))
                as f32,
            completeness: (weighted / total.max(f64::MIN_POSITIVE)) as f32,
        }
    }
}

/// Each row's absolute values divided by the row's absolute sum (rows of zeros stay zero).
fn normalised(adjacency: &[f32], n: usize) -> Vec<f32> {
    let mut out = adjacency.to_vec();
    normalise(&mut out, n);
    out
}

/// [`normalised`] in place.
fn normalise(matrix: &mut [f32], n: usize) {
    matrix.par_chunks_mut(n).for_each(|row| {
        row.iter_mut().for_each(|v| *v = v.abs());
        let sum: f32 = row.iter().sum::<f32>().max(1e-10);
        row.iter_mut().for_each(|v| *v /= sum);
    });
}

/// `w·(A + A² + …)` (the series of an acyclic graph ends within `n` steps).
fn influence_of(a: &[f32], w: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut total = vec![0f32; n];
    let mut current = w.to_vec();
    for _ in 0..=n {
        current = times(&current, a, n);
        if current.iter().all(|&v| v == 0.0) {
            return Ok(total);
        }
        total.iter_mut().zip(&current).for_each(|(t, c)| *t += c);
    }
    Err(Error::InvalidArgument {
        what: "attribution graph",
        value: format!("{n} nodes"),
        message: "its influence does not converge: the adjacency has a cycle".into(),
    })
}

/// `v·A` for a row vector `v` and a row-major `n × n` matrix: the rows with weight summed.
fn times(v: &[f32], a: &[f32], n: usize) -> Vec<f32> {
    let rows: Vec<(usize, f32)> = v
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, x)| x != 0.0)
        .collect();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1024).enumerate().for_each(|(c, chunk)| {
        let start = c * 1024;
        for &(i, x) in &rows {
            let row = &a[i * n + start..][..chunk.len()];
            chunk.iter_mut().zip(row).for_each(|(o, &r)| *o += x * r);
        }
    });
    out
}

/// The score at which the highest scores, summed, first reach `fraction` of the total (sums in
/// f64: at a fraction of 1 that is the smallest score that is not zero, where circuit-tracer's
/// f32 sums may fall short of 1 and take every score, zeros included).
fn threshold(mut sorted: Vec<f32>, fraction: f32) -> f32 {
    sorted.par_sort_unstable_by(|a, b| b.total_cmp(a));
    let total: f64 = sorted.iter().map(|&v| f64::from(v)).sum();
    if sorted.is_empty() {
        return 0.0;
    }
    let mut running = 0f64;
    for (i, &s) in sorted.iter().enumerate() {
        running += f64::from(s);
        if total > 0.0 && running / total >= f64::from(fraction) {
            return sorted[i];
        }
    }
    sorted[sorted.len() - 1]
}

/// Rows and columns of dropped nodes set to zero.
fn zero_dropped(matrix: &mut [f32], keep: &[bool], n: usize) {
    matrix.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
        if !keep[t] {
            row.fill(0.0);
        } else {
            for (s, v) in row.iter_mut().enumerate() {
                if !keep[s] {
                    *v = 0.0;
                }
            }
        }
    });
}

/// Each node's share of the total influence held by the nodes at least as influential.
fn cumulative(influence: &[f32]) -> Vec<f32> {
    let mut order: Vec<usize> = (0..influence.len()).collect();
    order.sort_by(|&a, &b| influence[b].total_cmp(&influence[a]));
    let total: f64 = influence.iter().map(|&v| f64::from(v)).sum();
    let mut out = vec![0f32; influence.len()];
    let mut running = 0f64;
    for i in order {
        running += f64::from(influence[i]);
        out[i] = (running / total.max(f64::MIN_POSITIVE)) as f32;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::attribution_graph::{ActiveFeature, LogitTarget};

    /// A hand-made graph: one position, one layer; features 0 and 1 (1 reads 0), the layer's
    /// error, the token and one logit.
    fn small() -> AttributionGraph {
        let feature = |feature| ActiveFeature {
            layer: 0,
            position: 0,
            feature,
            activation: 1.0,
        };
        // Nodes: f0, f1, error, token, logit.
        let n = 5;
        let mut adjacency = vec![0f32; n * n];
        let mut set = |t: usize, s: usize, v: f32| adjacency[t * n + s] = v;
        set(0, 3, 2.0); // token → f0
        set(1, 0, -3.0); // f0 → f1
        set(1, 2, 1.0); // error → f1
        set(4, 1, 4.0); // f1 → logit
        set(4, 3, 1.0); // token → logit
        set(4, 2, 3.0); // error → logit
        AttributionGraph {
            input_ids: vec![7],
            tokens: vec!["a".into()],
            n_layers: 1,
            features: vec![feature(0), feature(1)],
            active_features: vec![feature(0), feature(1)],
            selected_features: vec![0, 1],
            logits: vec![LogitTarget {
                token_id: 9,
                token: "b".into(),
                probability: 0.5,
            }],
            adjacency,
            first_position_left_out: false,
        }
    }

    /// Influence by hand: the logit's inputs are f1 4/8, token 1/8, error 3/8 (weight 0.5);
    /// f1's are f0 3/4, error 1/4; f0's the token alone.
    #[test]
    fn influence_follows_every_path_to_the_logits() {
        let g = small();
        let n = g.n_nodes();
        let inf = influence_of(&normalised(&g.adjacency, n), &g.logit_weights(), n).unwrap();
        let want = [
            0.5 * 0.5 * 0.75,                   // f0, through f1
            0.5 * 0.5,                          // f1
            0.5 * 3.0 / 8.0 + 0.5 * 0.5 * 0.25, // error
            0.5 / 8.0 + 0.5 * 0.5 * 0.75,       // token, direct and through f0 → f1
            0.0,                                // the logit itself
        ];
        for (i, (&a, &b)) in inf.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-6, "node {i}: {a} vs {b}");
        }
        let scores = g.scores().unwrap();
        let (token, error) = (want[3], want[2]);
        assert!((scores.replacement - token / (token + error)).abs() < 1e-6);
        assert!(scores.completeness > 0.0 && scores.completeness < 1.0);
    }

    /// Everything kept at thresholds of 1; at a low node threshold the weakest feature goes,
    /// and with it its edges; thresholds outside 0..=1 are refused.
    #[test]
    fn pruning_keeps_the_most_influential_and_tokens_and_logits() {
        let g = small();
        let all = g.prune(1.0, 1.0).unwrap();
        assert!(all.nodes.iter().all(|&k| k), "{:?}", all.nodes);
        let kept_edges = all
            .edges
            .iter()
            .zip(&g.adjacency)
            .filter(|(k, _)| **k)
            .count();
        assert_eq!(
            kept_edges,
            g.adjacency.iter().filter(|&&v| v != 0.0).count()
        );
        let some = g.prune(0.3, 1.0).unwrap();
        // f1, the error and the token (0.25 each) outrank f0 (0.19): f0 goes.
        assert!(
            !some.nodes[0] && some.nodes[3] && some.nodes[4],
            "{:?}",
            some.nodes
        );
        assert!(!some.edges[3]); // token → f0 gone with f0
        assert!(g.prune(1.5, 0.5).is_err());
    }
}
