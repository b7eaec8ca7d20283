//! Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"; what circuit-tracer's
//! `attribute` computes): the direct, linear effects between transcoder features, error nodes,
//! token embeddings and the top next-token logits on one prompt, in the prompt's *local
//! replacement model*.
//!
//! The replacement model is the model with every MLP's output written as its transcoder's
//! features (each `a·W_dec[f]`), the transcoder's `b_dec` and skip path, and an error node (the
//! MLP's true output − the transcoder's prediction), so that it reproduces the model exactly.
//! On one prompt it is made linear by freezing what is not: every attention pattern and every
//! norm's divisor (`hook_pattern`, `hook_scale`) are held at their values on the prompt, and
//! every feature's activation is a fixed node value (gradients stop at the features; a skip
//! path stays linear and passes them). Every target — a feature's pre-activation, read at its
//! transcoder's input hook, or a logit at the last position less the mean logit — is then an
//! affine function of the nodes' values, and the edge from source `s` to target `t` is `s`'s
//! value times the gradient along it: `a_s·(∂t/∂mlp_out · W_dec[s])` for a feature,
//! `∂t/∂mlp_out · error` for an error node, `∂t/∂hook_embed · embedding` for a token. The
//! edges into a target sum to its value less its value with every node at zero (the biases'
//! share), which the tests check, with each single edge against removing that node alone.
//!
//! As in circuit-tracer: one error node per layer and position; a layer without a transcoder
//! keeps its MLP output whole in its error nodes; the first position's features and errors are
//! left out (folded into the biases) — whatever its token, the first position is where a model
//! sinks its attention, and its activations are outliers (on the world model a third of a
//! short prompt's active features sit there); logit targets are the most probable next tokens until their probabilities add up to
//! `desired_logit_probability`, at most `max_logits` of them, read before any logit soft-cap.
//! Positional embeddings and every bias are not nodes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model, Stash};
use crate::sae::{Sae, SaeSite};

pub mod circuit_tracer;
pub mod fidelity;
pub mod gemma_scope_2;
pub mod graph_file;
pub mod intervene;
pub mod prune;

/// A transcoder standing in for one layer's MLP: it writes `blocks.L.hook_mlp_out` and reads
/// a hook of the same block before it (`mlp.hook_in`, `ln2.hook_normalized`, …). One layer of
/// a cross-layer transcoder ([`circuit_tracer`]) also writes every later MLP's output.
#[derive(Clone, Debug)]
pub struct LayerTranscoder {
    /// The encoder, and the decoder to its own layer's MLP output with `b_dec` and any skip
    /// path.
    pub sae: Sae,
    pub site: SaeSite,
    /// A cross-layer transcoder's decoders to the later layers.
    pub later: LaterDecoders,
}

/// A cross-layer transcoder's decoders to the layers after its own: what layer `L`'s features
/// add to layer `L + 1 + k`'s MLP output.
#[derive(Clone, Default)]
pub enum LaterDecoders {
    /// A per-layer transcoder: none.
    #[default]
    None,
    /// `[d_sae, d_out]` per later layer, in memory.
    InMemory(Vec<Tensor>),
    /// Read a few rows at a time from a memory-mapped `[d_sae, own + 1 + count, d_out]` tensor
    /// whose row `[f, own + 1 + k]` writes layer `L + 1 + k` (a CLT's `W_dec_L`: tens of
    /// gigabytes over all layers of a large model, of which a prompt needs the active
    /// features' rows; `own` is 0 for circuit-tracer's, `L` for Gemma Scope 2's, which also
    /// holds zero rows for the earlier layers).
    Mapped {
        weights: Arc<crate::model::weights::Weights>,
        key: String,
        own: usize,
        count: usize,
    },
}

impl std::fmt::Debug for LaterDecoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "None"),
            Self::InMemory(w) => write!(f, "InMemory({} layers)", w.len()),
            Self::Mapped { key, count, .. } => write!(f, "Mapped({key}, {count} layers)"),
        }
    }
}

impl LaterDecoders {
    /// How many later layers are written.
    pub fn count(&self) -> usize {
        match self {
            Self::None => 0,
            Self::InMemory(w) => w.len(),
            Self::Mapped { count, .. } => *count,
        }
    }
}

impl LayerTranscoder {
    /// Loads the transcoder folder `dir` for `model`, checking it can stand in for an MLP.
    pub fn load(dir: &Path, model: &Model) -> Result<Self> {
        let (sae_dir, input) = crate::sae::load_for_model(dir, None, model, &model.device)?;
        let output = crate::sae::output_hook(&sae_dir, input, model)?;
        let transcoder = Self {
            sae: sae_dir.sae,
            site: SaeSite { input, output },
            later: LaterDecoders::None,
        };
        transcoder.layer().map_err(|e| Error::InvalidArgument {
            what: "transcoder folder",
            value: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(transcoder)
    }

    /// The layer whose MLP it replaces (see [`site_layer`]).
    pub fn layer(&self) -> Result<usize> {
        site_layer(&self.site)
    }

    /// The decoder rows of `features` (ids, on the transcoder's device) for every MLP output
    /// they write, from their own layer on: `(layer, [features, d_out])` in the transcoder's
    /// dtype.
    pub fn decoder_rows(&self, features: &[u32]) -> Result<Vec<(usize, Tensor)>> {
        let layer = self.layer()?;
        let w_dec = &self.sae.w_dec;
        let ids = Tensor::new(features, w_dec.device())?;
        let mut rows = vec![(layer, w_dec.index_select(&ids, 0)?)];
        match &self.later {
            LaterDecoders::None => {}
            LaterDecoders::InMemory(later) => {
                for (k, w) in later.iter().enumerate() {
                    rows.push((layer + 1 + k, w.index_select(&ids, 0)?));
                }
            }
            LaterDecoders::Mapped {
                weights,
                key,
                own,
                count,
            } => {
                let all = weights
                    .rows(key, features)?
                    .to_dtype(w_dec.dtype())?
                    .to_device(w_dec.device())?; // [features, own + 1 + count, d_out]
                for k in 1..=*count {
                    rows.push((layer + k, all.i((.., own + k))?.contiguous()?));
                }
            }
        }
        Ok(rows)
    }

    /// What `features` write into the residual stream in all, `[features, d_out]`: their
    /// decoder rows summed over the layers they write (their direct-path effects).
    pub fn total_decoder_rows(&self, features: &[u32]) -> Result<Tensor> {
        let mut rows = self.decoder_rows(features)?.into_iter().map(|(_, r)| r);
        let first = rows
            .next()
            .ok_or_else(|| internal("a transcoder without a decoder".into()))?;
        rows.try_fold(first, |sum, r| Ok((sum + r)?))
    }

    /// The same transcoder in `dtype` on `device` (mapped decoders are converted as read).
    fn to(&self, dtype: DType, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            sae: self.sae.to_dtype(dtype)?.to_device(device)?,
            site: self.site,
            later: match &self.later {
                LaterDecoders::InMemory(later) => LaterDecoders::InMemory(
                    later
                        .iter()
                        .map(|w| w.to_dtype(dtype)?.to_device(device))
                        .collect::<candle_core::Result<_>>()?,
                ),
                other => other.clone(),
            },
        })
    }
}

/// The layer whose MLP a transcoder at `site` replaces; an error unless it writes an MLP's output and reads
/// a hook of the same block that is linear in the residual stream once attention patterns
/// and norm divisors are frozen (inside the MLP, or at a query/key norm, the graph would
/// no longer add up).
pub fn site_layer(site: &SaeSite) -> Result<usize> {
    let bad = |message: String| Error::InvalidArgument {
        what: "transcoder",
        value: format!("{} → {}", site.input, site.output),
        message,
    };
    let HookPoint::MlpOut(layer) = site.output else {
        return Err(bad(
            "an attribution graph needs transcoders that write an MLP's output \
                 (blocks.L.hook_mlp_out)"
                .into(),
        ));
    };
    if site.input.layer() != Some(layer) {
        return Err(bad(format!(
            "reads another block than the MLP it replaces (layer {layer})"
        )));
    }
    let linear = matches!(
        site.input,
        HookPoint::ResidPre(_)
            | HookPoint::Ln1Normalized(_)
            | HookPoint::AttnOut(_)
            | HookPoint::ResidMid(_)
            | HookPoint::Ln2Normalized(_)
            | HookPoint::MlpIn(_)
    );
    if !linear {
        return Err(bad(
            "an attribution graph reads features where the frozen model is linear: \
                 hook_resid_pre, ln1.hook_normalized, hook_attn_out, hook_resid_mid, \
                 ln2.hook_normalized or mlp.hook_in"
                .into(),
        ));
    }
    Ok(layer)
}

/// Whether `dir` is a transcoder folder: a per-layer one (an SAE folder), a set or a
/// cross-layer transcoder in circuit-tracer's formats, or a Gemma Scope 2 cross-layer one.
fn is_transcoder_dir(dir: &Path) -> bool {
    crate::sae::is_sae_dir(dir)
        || circuit_tracer::is_circuit_tracer_dir(dir)
        || gemma_scope_2::is_gemma_scope_2_clt_dir(dir)
}

/// The transcoder folders named: each folder that is one (per-layer or cross-layer), and the
/// transcoder folders inside each that is not (sorted by name).
pub fn transcoder_dirs(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in dirs {
        if is_transcoder_dir(dir) {
            out.push(dir.clone());
            continue;
        }
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let mut inner: Vec<PathBuf> = entries
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .filter(|p| is_transcoder_dir(p))
            .collect();
        if inner.is_empty() {
            return Err(Error::InvalidArgument {
                what: "transcoder folder",
                value: dir.display().to_string(),
                message: "holds no transcoder folders (and is not one)".into(),
            });
        }
        inner.sort();
        out.extend(inner);
    }
    Ok(out)
}

/// Loads every transcoder in `dirs` (see [`transcoder_dirs`]) for `model`.
pub fn load_transcoders(dirs: &[PathBuf], model: &Model) -> Result<Vec<LayerTranscoder>> {
    load_each(&transcoder_dirs(dirs)?, model)
}

/// Loads each transcoder folder of `dirs` (already resolved by [`transcoder_dirs`]); one in
/// circuit-tracer's formats, or a Gemma Scope 2 cross-layer one, gives a transcoder for each of
/// its layers.
pub fn load_each(dirs: &[PathBuf], model: &Model) -> Result<Vec<LayerTranscoder>> {
    let mut out = Vec::new();
    for dir in dirs {
        let one = crate::sae::is_sae_dir(dir);
        if !one && gemma_scope_2::is_gemma_scope_2_clt_dir(dir) {
            out.extend(gemma_scope_2::load(dir, model)?);
        } else if !one && circuit_tracer::is_circuit_tracer_dir(dir) {
            out.extend(circuit_tracer::load(dir, model)?);
        } else {
            out.push(LayerTranscoder::load(dir, model)?);
        }
    }
    Ok(out)
}

/// The hooks a cross-layer transcoder reads and writes in every layer: `input` and `output`
/// named within a block (`hook_resid_mid` → `blocks.L.hook_resid_mid`). An error unless each
/// layer's pair is one that can stand in for its MLP in an attribution graph (see
/// [`site_layer`]), so that a CLT is not trained only to be refused afterwards.
pub fn cross_layer_sites(
    model: &Model,
    input: &str,
    output: &str,
) -> Result<(Vec<HookPoint>, Vec<HookPoint>)> {
    let block_hook = |layer: usize, within: &str| -> Result<HookPoint> {
        let name = format!("blocks.{layer}.{within}");
        let points = model.resolve_hooks(&[name.as_str()])?;
        match points[..] {
            [point] => Ok(point),
            _ => Err(Error::InvalidArgument {
                what: "hook within a block",
                value: within.into(),
                message: format!("{name} names {} hook points, not one", points.len()),
            }),
        }
    };
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    for layer in 0..model.dims().n_layers {
        let site = SaeSite {
            input: block_hook(layer, input)?,
            output: block_hook(layer, output)?,
        };
        if site_layer(&site).ok() != Some(layer) {
            return Err(Error::InvalidArgument {
                what: "cross-layer transcoder hooks",
                value: format!("{input} → {output}"),
                message: "each layer must read a hook of its block before the MLP \
                          (hook_resid_mid, ln2.hook_normalized, mlp.hook_in) and write that \
                          block's hook_mlp_out"
                    .into(),
            });
        }
        inputs.push(site.input);
        outputs.push(site.output);
    }
    Ok((inputs, outputs))
}

/// `transcoders` by the layer whose MLP each replaces, converted to the model's dtype and
/// device; an error unless each fits the model (its hooks' widths, the later layers it writes)
/// and no two replace the same layer.
pub fn by_layer(
    model: &Model,
    transcoders: &[LayerTranscoder],
) -> Result<Vec<Option<LayerTranscoder>>> {
    let n_layers = model.dims().n_layers;
    let mut by_layer: Vec<Option<LayerTranscoder>> = vec![None; n_layers];
    for t in transcoders {
        let layer = t.layer()?;
        if layer >= n_layers {
            return Err(Error::InvalidArgument {
                what: "transcoder",
                value: t.site.output.to_string(),
                message: format!("the model has {n_layers} layers"),
            });
        }
        if by_layer[layer].is_some() {
            return Err(Error::InvalidArgument {
                what: "transcoders",
                value: format!("two for layer {layer}"),
                message: "an attribution graph takes one transcoder per layer".into(),
            });
        }
        t.site.check(&t.sae)?;
        if layer + 1 + t.later.count() > n_layers {
            return Err(Error::InvalidArgument {
                what: "transcoder",
                value: t.site.output.to_string(),
                message: format!(
                    "writes {} later layers; the model has {n_layers}",
                    t.later.count()
                ),
            });
        }
        // (A mapped decoder's shape was checked as its file was opened.)
        if let LaterDecoders::InMemory(later) = &t.later {
            for (k, w) in later.iter().enumerate() {
                let out = layer + 1 + k;
                let want = [t.sae.d_sae(), model.hook_width(HookPoint::MlpOut(out))?];
                if w.dims() != want {
                    return Err(Error::InvalidArgument {
                        what: "transcoder",
                        value: format!("{}'s decoder to layer {out}", t.site.output),
                        message: format!("is {:?}, not {want:?}", w.dims()),
                    });
                }
            }
        }
        for (point, width) in [(t.site.input, t.sae.d_in()), (t.site.output, t.sae.d_out())] {
            let have = model.hook_width(point)?;
            if have != width {
                return Err(Error::InvalidArgument {
                    what: "transcoder",
                    value: format!("{point}"),
                    message: format!("is {have} wide in the model, the transcoder {width}"),
                });
            }
        }
        by_layer[layer] = Some(t.to(model.dtype, &model.device)?);
    }
    Ok(by_layer)
}

/// How many logits to explain, and how targets are batched.
#[derive(Clone, Debug)]
pub struct GraphSettings {
    /// At most this many logit targets.
    pub max_logits: usize,
    /// Logit targets are added, most probable first, until their probabilities reach this.
    pub desired_logit_probability: f32,
    /// Targets per backward pass (rows of the replacement model's batch).
    pub batch_rows: usize,
    /// At most this many feature nodes, the most influential on the logits; 0 for no limit
    /// (the adjacency is dense: its size grows with the square of the node count).
    pub max_feature_nodes: usize,
}

impl Default for GraphSettings {
    fn default() -> Self {
        Self {
            max_logits: 10,
            desired_logit_probability: 0.95,
            batch_rows: 32,
            max_feature_nodes: 20_000,
        }
    }
}

/// A transcoder feature active at one position.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActiveFeature {
    pub layer: usize,
    pub position: usize,
    pub feature: u32,
    pub activation: f32,
}

/// A next-token logit explained by the graph.
#[derive(Clone, Debug, Serialize)]
pub struct LogitTarget {
    pub token_id: u32,
    /// The token as shown (byte-level pieces made readable).
    pub token: String,
    pub probability: f32,
}

/// The kinds of node, in the order the adjacency lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// An index into [`AttributionGraph::features`].
    Feature(usize),
    Error {
        layer: usize,
        position: usize,
    },
    Token {
        position: usize,
    },
    /// An index into [`AttributionGraph::logits`].
    Logit(usize),
}

/// Nodes of a graph read as one (Neuronpedia's supernodes): features that play one part in a
/// circuit ("say a capital"), named by the person who grouped them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Supernode {
    pub label: String,
    /// Adjacency indices.
    pub nodes: Vec<usize>,
}

/// A prompt's attribution graph, unpruned.
#[derive(Clone, Debug)]
pub struct AttributionGraph {
    pub input_ids: Vec<u32>,
    /// The prompt's tokens as shown.
    pub tokens: Vec<String>,
    pub n_layers: usize,
    /// The feature nodes, by layer, position and feature id: every active feature unless
    /// `max_feature_nodes` left some out.
    pub features: Vec<ActiveFeature>,
    /// Every active feature, and which of them are nodes (`features[i]` is
    /// `active_features[selected_features[i]]`).
    pub active_features: Vec<ActiveFeature>,
    pub selected_features: Vec<usize>,
    pub logits: Vec<LogitTarget>,
    /// Row-major `[nodes, nodes]`: entry `(t, s)` is the direct effect of node `s` on node
    /// `t`. Nodes are features, then errors (layer by layer, each over every position), then
    /// tokens, then logits; only feature and logit rows have entries.
    pub adjacency: Vec<f32>,
    /// Whether the first position's features and errors were left out (in every prompt of
    /// more than one token).
    pub first_position_left_out: bool,
}

impl AttributionGraph {
    pub fn n_positions(&self) -> usize {
        self.input_ids.len()
    }

    pub fn n_nodes(&self) -> usize {
        self.features.len() + (self.n_layers + 1) * self.n_positions() + self.logits.len()
    }

    /// The index of a node in the adjacency.
    pub fn index(&self, node: Node) -> usize {
        let (f, s) = (self.features.len(), self.n_positions());
        match node {
            Node::Feature(i) => i,
            Node::Error { layer, position } => f + layer * s + position,
            Node::Token { position } => f + self.n_layers * s + position,
            Node::Logit(i) => f + (self.n_layers + 1) * s + i,
        }
    }

    /// The node at an adjacency index.
    pub fn node(&self, index: usize) -> Node {
        let (f, s) = (self.features.len(), self.n_positions());
        if index < f {
            Node::Feature(index)
        } else if index < f + self.n_layers * s {
            let (layer, position) = ((index - f) / s, (index - f) % s);
            Node::Error { layer, position }
        } else if index < f + (self.n_layers + 1) * s {
            Node::Token {
                position: index - f - self.n_layers * s,
            }
        } else {
            Node::Logit(index - f - (self.n_layers + 1) * s)
        }
    }

    /// A node as people read it: `L4 f123 @5 'Tokyo'`, `error L2 @3`, `token 'Japan' @3`,
    /// `logit 'Tokyo'`, each token shown through `show`.
    pub fn describe(&self, index: usize, show: impl Fn(&str) -> String) -> String {
        let token = |p: usize| show(&self.tokens[p]);
        match self.node(index) {
            Node::Feature(i) => {
                let f = &self.features[i];
                format!(
                    "L{} f{} @{} '{}'",
                    f.layer,
                    f.feature,
                    f.position,
                    token(f.position)
                )
            }
            Node::Error { layer, position } => format!("error L{layer} @{position}"),
            Node::Token { position } => format!("token '{}' @{position}", token(position)),
            Node::Logit(i) => format!("logit '{}'", show(&self.logits[i].token)),
        }
    }

    /// The summed direct effect of the nodes `sources` on the nodes `targets` (two supernodes,
    /// or a supernode and a logit): the edge of the graph in which each group is one node.
    pub fn group_effect(&self, targets: &[usize], sources: &[usize]) -> f32 {
        targets
            .iter()
            .flat_map(|&t| sources.iter().map(move |&s| self.edge(t, s)))
            .sum()
    }

    /// The direct inputs of `target` by size, largest first, zeros left out.
    pub fn strongest_inputs(&self, target: usize) -> Vec<(usize, f32)> {
        let mut inputs: Vec<(usize, f32)> = (0..self.n_nodes())
            .map(|s| (s, self.edge(target, s)))
            .filter(|&(_, w)| w != 0.0)
            .collect();
        inputs.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        inputs
    }

    /// The direct effect of `source` on `target`.
    pub fn edge(&self, target: usize, source: usize) -> f32 {
        self.adjacency[target * self.n_nodes() + source]
    }

    /// The unpruned graph as tensors (on the CPU): `input_ids`, `active_features` `[n, 3]`
    /// (layer, position, feature) with their `activation_values`, `selected_features` (which
    /// of them are nodes), `logit_tokens`, `logit_probabilities` and `adjacency`
    /// (circuit-tracer's `Graph` fields under the names
    /// `scripts/circuit_tracer_fixtures.py` saves them by).
    pub fn tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let cpu = &candle_core::Device::Cpu;
        let n = self.n_nodes();
        let ints = |v: Vec<i64>| Tensor::new(v.as_slice(), cpu);
        let active: Vec<i64> = self
            .active_features
            .iter()
            .flat_map(|f| [f.layer as i64, f.position as i64, i64::from(f.feature)])
            .collect();
        let entries = [
            (
                "input_ids",
                ints(self.input_ids.iter().map(|&i| i64::from(i)).collect())?,
            ),
            (
                "active_features",
                Tensor::from_vec(active, (self.active_features.len(), 3), cpu)?,
            ),
            (
                "selected_features",
                ints(self.selected_features.iter().map(|&f| f as i64).collect())?,
            ),
            (
                "activation_values",
                Tensor::new(
                    self.active_features
                        .iter()
                        .map(|f| f.activation)
                        .collect::<Vec<f32>>()
                        .as_slice(),
                    cpu,
                )?,
            ),
            (
                "logit_tokens",
                ints(self.logits.iter().map(|l| i64::from(l.token_id)).collect())?,
            ),
            (
                "logit_probabilities",
                Tensor::new(
                    self.logits
                        .iter()
                        .map(|l| l.probability)
                        .collect::<Vec<f32>>()
                        .as_slice(),
                    cpu,
                )?,
            ),
            (
                "adjacency",
                Tensor::from_slice(&self.adjacency, (n, n), cpu)?,
            ),
        ];
        Ok(entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect())
    }
}

/// One layer of the replacement model on the prompt.
struct Layer {
    /// The transcoder (in the model's dtype, on its device), if the layer has one.
    transcoder: Option<LayerTranscoder>,
    /// `mlp_out − skip(x)` on the prompt, `[1, seq, d_model]`: what the frozen MLP writes
    /// besides its skip path — the features' sum, `b_dec` and the errors.
    fixed: Tensor,
    /// Error nodes, `[seq, d_model]` (zero where left out).
    error: Tensor,
    /// The same in f32, for the edges.
    error_f32: Tensor,
}

/// The prompt's replacement model, frozen: what every backward pass runs through.
struct Replacement<'a> {
    model: &'a Model,
    ids: Vec<u32>,
    layers: Vec<Layer>,
    /// Patterns and norm divisors on the prompt, `(point, value)`.
    frozen: Vec<(HookPoint, Tensor)>,
    /// `hook_embed` on the prompt, `[seq, d_model]`: the token nodes.
    embeddings: Tensor,
    features: Vec<ActiveFeature>,
    /// The features in runs of one layer and position, with what they write.
    groups: Vec<FeatureGroup>,
    /// `embeddings` in f32, for the edges.
    embeddings_f32: Tensor,
}

/// The active features of one layer and position (a run of [`Replacement::features`]) and
/// what they write: for each MLP output they reach, their decoder rows times their activations.
struct FeatureGroup {
    position: usize,
    /// The run's first feature.
    first: usize,
    /// `(layer written, rows [count, d] in the model's dtype, the same transposed ([d, count])
    /// in f32 for the edges)`.
    writes: Vec<(usize, Tensor, Tensor)>,
}

/// A backward pass's target: what its row of the batch reads.
#[derive(Clone, Debug)]
enum Target {
    /// A feature's pre-activation: its encoder column dotted with the input hook at a position.
    Feature {
        layer: usize,
        position: usize,
        feature: u32,
    },
    /// The final norm's output at the last position dotted with `direction` (`[d_model]`),
    /// the token's unembedding row less the mean row: the logit less the mean logit, before
    /// any soft-cap.
    Logit { direction: Tensor },
}

/// What one linearised forward pass kept for building targets.
struct Pass {
    /// Each transcoder's input hook value, per layer.
    inputs: Vec<Option<Tensor>>,
    /// `ln_final.hook_normalized`: the final norm's input over its divisor, before its gain.
    normed: Tensor,
    output: crate::model::ForwardOutput,
}

/// Passes of feature rows between two rankings of the features by influence, when
/// `max_feature_nodes` leaves some out (circuit-tracer's `update_interval`).
const UPDATE_INTERVAL: usize = 4;

/// The attribution graph of `ids` through `transcoders` (at most one per layer); `None` when
/// cancelled. `progress(done, total)` counts targets.
///
/// With more active features than `settings.max_feature_nodes`, only that many become nodes,
/// chosen as circuit-tracer chooses them: after the logits' rows, the features are ranked by
/// their influence on the logits through the rows found so far ([`partial_influences`]), the
/// most influential `UPDATE_INTERVAL` batches of them get their rows, and so on until the
/// limit; the other features' edges are dropped.
pub fn attribute(
    model: &Model,
    transcoders: &[LayerTranscoder],
    ids: &[u32],
    settings: &GraphSettings,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<AttributionGraph>> {
    if ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    model.check_length(ids.len())?;
    let (replacement, logits) = Replacement::new(model, transcoders, ids, settings)?;
    let n_active = replacement.features.len();
    let n_layers = model.dims().n_layers;
    let n_logits = logits.len();
    // Every node of the graph without a limit.
    let n_all = n_active + (n_layers + 1) * ids.len() + n_logits;
    // 0: no limit (as circuit-tracer reads it).
    let limit = match settings.max_feature_nodes {
        0 => n_active,
        max => max.min(n_active),
    };
    let targets = replacement.targets(&logits)?; // the logits first, then every feature
    let (logit_targets, feature_targets) = targets.split_at(n_logits);
    let total = n_logits + limit;
    let batch = settings.batch_rows.max(1);
    let pass = replacement.forward(batch, &[])?;
    let mut done = 0;
    // Computes the rows of `chunk`'s targets and hands each to `keep`; false when cancelled.
    let mut rows_of =
        |chunk: &[(usize, Target)], keep: &mut dyn FnMut(usize, Vec<f32>)| -> Result<bool> {
            if cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let batch: Vec<Target> = chunk.iter().map(|(_, t)| t.clone()).collect();
            let edges = replacement.edges(&pass, &batch)?; // [rows, n_all − logits]
            for ((node, _), row) in chunk.iter().zip(edges) {
                keep(*node, row);
            }
            done += chunk.len();
            progress(done, total);
            Ok(true)
        };
    let (adjacency, selected) = if limit == n_active {
        // Every feature is a node: rows go straight into the adjacency.
        let mut adjacency = vec![0f32; n_all * n_all];
        let mut keep = |node: usize, row: Vec<f32>| {
            adjacency[node * n_all..][..row.len()].copy_from_slice(&row);
        };
        for chunk in targets.chunks(batch) {
            if !rows_of(chunk, &mut keep)? {
                return Ok(None);
            }
        }
        (adjacency, (0..n_active).collect())
    } else {
        let probabilities: Vec<f32> = logits.iter().map(|l| l.probability).collect();
        let mut rows: Vec<(usize, Vec<f32>)> = Vec::with_capacity(total);
        let mut keep = |node: usize, row: Vec<f32>| rows.push((node, row));
        for chunk in logit_targets.chunks(batch) {
            if !rows_of(chunk, &mut keep)? {
                return Ok(None);
            }
        }
        let mut visited = vec![false; n_active];
        let mut n_visited = 0;
        while n_visited < limit {
            let influence = partial_influences(&rows, &probabilities, n_all);
            let mut ranked: Vec<usize> = (0..n_active).filter(|&f| !visited[f]).collect();
            ranked.sort_by(|&a, &b| influence[b].total_cmp(&influence[a]));
            ranked.truncate((UPDATE_INTERVAL * batch).min(limit - n_visited));
            n_visited += ranked.len();
            let queue: Vec<(usize, Target)> = ranked
                .iter()
                .map(|&f| {
                    visited[f] = true;
                    feature_targets[f].clone()
                })
                .collect();
            let mut keep = |node: usize, row: Vec<f32>| rows.push((node, row));
            for chunk in queue.chunks(batch) {
                if !rows_of(chunk, &mut keep)? {
                    return Ok(None);
                }
            }
        }
        let selected: Vec<usize> = (0..n_active).filter(|&f| visited[f]).collect();
        (select_features(rows, &selected, n_active, n_all), selected)
    };
    let features = selected
        .iter()
        .map(|&f| replacement.features[f].clone())
        .collect();
    Ok(Some(AttributionGraph {
        tokens: model.tokenizer.tokens_display(ids),
        input_ids: ids.to_vec(),
        n_layers,
        features,
        active_features: replacement.features,
        selected_features: selected,
        logits,
        adjacency,
        first_position_left_out: leaves_out_first(ids),
    }))
}

/// circuit-tracer's `compute_partial_influences`: each node's influence on the logits (see
/// [`prune`]) through the rows found so far, `rows` holding (node, edges from every node but
/// the logits) and the logits the last `logit_probabilities.len()` of `n_all` nodes. A node
/// without a row passes no influence on.
fn partial_influences(
    rows: &[(usize, Vec<f32>)],
    logit_probabilities: &[f32],
    n_all: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    // Each row's share of its absolute sum, taken as it is read (no normalised copy).
    let sums: Vec<f32> = rows
        .par_iter()
        .map(|(_, row)| row.iter().map(|w| w.abs()).sum::<f32>().max(1e-8))
        .collect();
    let mut reach = vec![0f32; n_all];
    reach[n_all - logit_probabilities.len()..].copy_from_slice(logit_probabilities);
    let mut influence = vec![0f32; n_all];
    // The graph is acyclic, so paths end within (layers + 2) steps; circuit-tracer stops at 128.
    for _ in 0..128 {
        let weights: Vec<(usize, f32)> = rows
            .iter()
            .zip(&sums)
            .enumerate()
            .filter(|(_, ((node, _), _))| reach[*node] != 0.0)
            .map(|(r, ((node, _), sum))| (r, reach[*node] / sum))
            .collect();
        if weights.is_empty() {
            break;
        }
        // Columns in parallel, rows in order (the same sums whatever the thread count).
        let mut next = vec![0f32; n_all];
        next.par_chunks_mut(1024)
            .enumerate()
            .for_each(|(chunk, out)| {
                let start = chunk * 1024;
                for &(r, w) in &weights {
                    let row = &rows[r].1;
                    if start >= row.len() {
                        continue;
                    }
                    let end = (start + out.len()).min(row.len());
                    for (o, v) in out.iter_mut().zip(&row[start..end]) {
                        *o += w * v.abs();
                    }
                }
            });
        if next.iter().all(|&v| v == 0.0) {
            break;
        }
        influence.iter_mut().zip(&next).for_each(|(i, v)| *i += v);
        reach = next;
    }
    influence
}

/// The adjacency of the graph whose feature nodes are `selected` (sorted indices into the
/// `n_active` active features): `rows` (a node among all `n_all` nodes of the graph without a
/// limit, its edges from all but the logits) with the other features' rows and columns dropped.
fn select_features(
    rows: Vec<(usize, Vec<f32>)>,
    selected: &[usize],
    n_active: usize,
    n_all: usize,
) -> Vec<f32> {
    let kept = selected.len();
    let n_nodes = n_all - n_active + kept;
    // Each node's index in the graph (`None`: a feature left out).
    let mut index: Vec<Option<usize>> = (0..n_all)
        .map(|c| (c >= n_active).then(|| c - n_active + kept))
        .collect();
    for (i, &f) in selected.iter().enumerate() {
        index[f] = Some(i);
    }
    let mut adjacency = vec![0f32; n_nodes * n_nodes];
    for (node, row) in rows {
        let Some(target) = index[node] else {
            continue;
        };
        let out = &mut adjacency[target * n_nodes..][..n_nodes];
        for (column, w) in row.into_iter().enumerate() {
            if let Some(source) = index[column] {
                out[source] = w;
            }
        }
    }
    adjacency
}

/// An error that only a bug in this module can cause.
fn internal(message: String) -> Error {
    Error::Candle(candle_core::Error::Msg(message))
}

/// Whether the first position's features and errors are left out: always, but in a prompt of
/// one token, which would leave nothing.
fn leaves_out_first(ids: &[u32]) -> bool {
    ids.len() > 1
}

/// Each logit target's unembedding row less the mean row (what a demeaned logit reads).
fn logit_directions(model: &Model, logits: &[LogitTarget]) -> Result<Vec<Tensor>> {
    let unembed = &model.transformer.unembed; // [vocab, d_model]
    let mean = unembed.to_dtype(DType::F32)?.mean_keepdim(0)?.squeeze(0)?;
    logits
        .iter()
        .map(|l| {
            let row = unembed.i(l.token_id as usize)?.to_dtype(DType::F32)?;
            Ok((row - &mean)?.to_dtype(model.dtype)?)
        })
        .collect()
}

impl<'a> Replacement<'a> {
    /// Runs the prompt once, and freezes what the graph holds fixed.
    fn new(
        model: &'a Model,
        transcoders: &[LayerTranscoder],
        ids: &[u32],
        settings: &GraphSettings,
    ) -> Result<(Self, Vec<LogitTarget>)> {
        let n_layers = model.dims().n_layers;
        let by_layer = by_layer(model, transcoders)?;
        let frozen_points: Vec<HookPoint> = model
            .hook_points()
            .iter()
            .copied()
            .filter(|p| p.is_norm_scale() || matches!(p, HookPoint::AttnPattern(_)))
            .collect();
        let inputs: Vec<HookPoint> = by_layer.iter().flatten().map(|t| t.site.input).collect();
        let captured = frozen_points
            .iter()
            .copied()
            .chain(inputs)
            .chain((0..n_layers).map(HookPoint::MlpOut))
            .chain([HookPoint::Embed]);
        let clean = model.forward(&model.ids_tensor(ids)?, &Hooks::new().capture(captured))?;
        let logits = logit_targets(model, &clean.logits, settings)?;
        let frozen = frozen_points
            .iter()
            .map(|&p| Ok((p, clean.cache.require(p)?.clone())))
            .collect::<Result<Vec<_>>>()?;
        let embeddings = clean.cache.require(HookPoint::Embed)?.get(0)?;
        let embeddings_f32 = embeddings.to_dtype(DType::F32)?;

        let left_out = leaves_out_first(ids);
        let seq = ids.len();
        let first_only = {
            let mut m = vec![0f32; seq];
            if left_out {
                m[0] = 1.0;
            }
            Tensor::from_vec(m, (1, seq, 1), &model.device)?.to_dtype(model.dtype)?
        };
        let kept = (1.0 - &first_only)?; // positions whose parts are nodes
        let d_model = model.dims().d_model;
        // Every layer's active features and what they write (a cross-layer transcoder's, into
        // later layers too), before any layer's error: the errors need what earlier layers'
        // features write.
        let mut features = Vec::new();
        let mut groups = Vec::new();
        for (layer, t) in by_layer.iter().enumerate() {
            let Some(t) = t else { continue };
            let acts = t.sae.encode(clean.cache.require(t.site.input)?)?.get(0)?; // [seq, d_sae]
            let values = acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (position, row) in values.iter().enumerate() {
                if left_out && position == 0 {
                    continue;
                }
                let ids: Vec<u32> = (0..row.len() as u32)
                    .filter(|&f| row[f as usize] > 0.0)
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                // The activations in the model's dtype (exact for an f64 model), [count, 1].
                let scales = acts
                    .i(position)?
                    .index_select(&Tensor::new(ids.as_slice(), &model.device)?, 0)?
                    .unsqueeze(1)?;
                let writes = t
                    .decoder_rows(&ids)?
                    .into_iter()
                    .map(|(out, rows)| {
                        let rows = rows.broadcast_mul(&scales)?;
                        let transposed = rows.to_dtype(DType::F32)?.t()?.contiguous()?;
                        Ok((out, rows, transposed))
                    })
                    .collect::<Result<Vec<_>>>()?;
                groups.push(FeatureGroup {
                    position,
                    first: features.len(),
                    writes,
                });
                features.extend(ids.iter().map(|&feature| ActiveFeature {
                    layer,
                    position,
                    feature,
                    activation: row[feature as usize],
                }));
            }
        }
        // What the feature nodes write into each MLP output, [1, seq, d].
        let mut written: Vec<Vec<Option<Tensor>>> = vec![vec![None; seq]; n_layers];
        for group in &groups {
            for (out, rows, _) in &group.writes {
                let sum = rows.sum(0)?;
                let slot = &mut written[*out][group.position];
                *slot = Some(match slot.take() {
                    Some(before) => (before + sum)?,
                    None => sum,
                });
            }
        }
        let zeros = Tensor::zeros(d_model, model.dtype, &model.device)?;
        let written = written
            .into_iter()
            .map(|per_position| {
                let rows: Vec<Tensor> = per_position
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| zeros.clone()))
                    .collect();
                Ok(Tensor::stack(&rows, 0)?.unsqueeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        // Each layer's error: the MLP's output less what the nodes write and the biases (b_dec,
        // the skip path) — at the positions whose parts are nodes.
        let mut layers = Vec::with_capacity(n_layers);
        for (layer, (transcoder, written)) in by_layer.into_iter().zip(written).enumerate() {
            let mlp_out = clean.cache.require(HookPoint::MlpOut(layer))?; // [1, seq, d]
            let (fixed, rest) = match &transcoder {
                Some(t) => {
                    let skip = skip_path(&t.sae, clean.cache.require(t.site.input)?)?;
                    let fixed = (mlp_out - &skip)?;
                    let rest = fixed.broadcast_sub(&t.sae.b_dec)?;
                    (fixed, rest)
                }
                None => (mlp_out.clone(), mlp_out.clone()),
            };
            let error = (rest - written)?.broadcast_mul(&kept)?.get(0)?;
            layers.push(Layer {
                transcoder,
                fixed,
                error_f32: error.to_dtype(DType::F32)?,
                error,
            });
        }
        Ok((
            Self {
                model,
                ids: ids.to_vec(),
                layers,
                frozen,
                embeddings,
                features,
                groups,
                embeddings_f32,
            },
            logits,
        ))
    }

    /// Every target with its adjacency row: the logits (the last rows), then the features.
    fn targets(&self, logits: &[LogitTarget]) -> Result<Vec<(usize, Target)>> {
        let n_layers = self.layers.len();
        let n_nodes = self.features.len() + (n_layers + 1) * self.ids.len() + logits.len();
        let mut targets = Vec::with_capacity(self.features.len() + logits.len());
        for (i, direction) in logit_directions(self.model, logits)?
            .into_iter()
            .enumerate()
        {
            targets.push((n_nodes - logits.len() + i, Target::Logit { direction }));
        }
        for (i, f) in self.features.iter().enumerate() {
            let target = Target::Feature {
                layer: f.layer,
                position: f.position,
                feature: f.feature,
            };
            targets.push((i, target));
        }
        Ok(targets)
    }

    /// The linearised model run on `rows` copies of the prompt, with the nodes in `removed`
    /// (adjacency indices) set to zero; every MLP output and `hook_embed` a gradient leaf.
    fn forward(&self, rows: usize, removed: &[usize]) -> Result<Pass> {
        let model = self.model;
        let n_layers = self.layers.len();
        let seq = self.ids.len();
        let n_features = self.features.len();
        let mut hooks = Hooks::new().grad(HookPoint::Embed);
        for (point, value) in &self.frozen {
            hooks = hooks.intervene(
                *point,
                Intervention::new(InterventionOp::Replace(value.clone())),
            );
        }
        // What each removed node contributes, taken off where it is written.
        let d = model.dims().d_model;
        // (In f64, so that an f64 model's removals are exact.)
        let mut taken = vec![vec![0f64; seq * d]; n_layers + 1];
        for &node in removed {
            // (slot written: a layer, or n_layers for the embedding; position; value)
            let parts: Vec<(usize, usize, Tensor)> = if node < n_features {
                let group = &self.groups[self.groups.partition_point(|g| g.first <= node) - 1];
                group
                    .writes
                    .iter()
                    .map(|(out, rows, _)| Ok((*out, group.position, rows.i(node - group.first)?)))
                    .collect::<Result<_>>()?
            } else if node < n_features + n_layers * seq {
                let (layer, position) = ((node - n_features) / seq, (node - n_features) % seq);
                let error = self.layers[layer].error.i(position)?;
                vec![(layer, position, error)]
            } else {
                let position = node - n_features - n_layers * seq;
                vec![(n_layers, position, self.embeddings.i(position)?)]
            };
            for (slot, position, value) in parts {
                let value = value.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                for (t, v) in taken[slot][position * d..][..d].iter_mut().zip(value) {
                    *t += v;
                }
            }
        }
        let taken: Vec<Tensor> = taken
            .into_iter()
            .map(|t| Tensor::from_vec(t, (1, seq, d), &model.device)?.to_dtype(model.dtype))
            .collect::<candle_core::Result<_>>()?;
        let embed = (self.embeddings.unsqueeze(0)? - &taken[n_layers])?;
        hooks = hooks.intervene(
            HookPoint::Embed,
            Intervention::new(InterventionOp::Replace(embed)),
        );
        // One each (clones of a stash share it).
        let inputs: Vec<Stash> = (0..n_layers).map(|_| Stash::default()).collect();
        for (layer, l) in self.layers.iter().enumerate() {
            let fixed = (&l.fixed - &taken[layer])?;
            let out = HookPoint::MlpOut(layer);
            hooks = hooks.grad(out);
            let Some(t) = &l.transcoder else {
                hooks = hooks.intervene(out, Intervention::new(InterventionOp::Replace(fixed)));
                continue;
            };
            hooks = hooks.intervene(t.site.input, inputs[layer].keeper());
            let (read, sae) = (inputs[layer].clone(), t.sae.clone());
            let write = move |y: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
                let x = read.require("the transcoder's input hook")?;
                let skip =
                    skip_path(&sae, &x).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                fixed.broadcast_as(y.shape())?.add(&skip)
            };
            hooks = hooks.intervene(
                out,
                Intervention::new(InterventionOp::Func(Arc::new(write))),
            );
        }
        let normed = Stash::default();
        hooks = hooks.intervene(HookPoint::LnFinal, normed.keeper());
        let ids = model.ids_tensor(&self.ids)?.repeat((rows, 1))?;
        let output = model.forward(&ids, &hooks)?;
        let normed = normed
            .get()
            .ok_or_else(|| internal("the replacement pass never reached the final norm".into()))?;
        Ok(Pass {
            inputs: inputs.iter().map(Stash::get).collect(),
            normed,
            output,
        })
    }

    /// Each target's value in `pass` (row `r` of the batch reads `targets[r]`), `[targets]`:
    /// per layer, the rows' input-hook vectors at their positions gathered and dotted with the
    /// features' encoder columns (gathered on the device too), and likewise the final norm's
    /// output for the logits — a few products per batch, whatever its size.
    fn target_values(&self, pass: &Pass, targets: &[Target]) -> Result<Tensor> {
        let model = self.model;
        let device = &model.device;
        let rows = pass.normed.dim(0)?;
        let seq = self.ids.len();
        let count = targets.len().min(rows);
        // (the targets read, their values in that order)
        let mut pieces: Vec<(Vec<usize>, Tensor)> = Vec::new();
        let at = |read: &[usize], position: &dyn Fn(usize) -> usize| -> Result<Tensor> {
            let flat: Vec<u32> = read
                .iter()
                .map(|&r| (r * seq + position(r)) as u32)
                .collect();
            Ok(Tensor::new(flat.as_slice(), device)?)
        };
        // Logits: the final norm's output at the last position, after its gain and bias
        // (`ln_final.hook_normalized` is before them, and the unembedding reads after).
        let logit_rows: Vec<usize> = (0..count)
            .filter(|&r| matches!(targets[r], Target::Logit { .. }))
            .collect();
        if !logit_rows.is_empty() {
            let d = pass.normed.dim(2)?;
            let normed = pass
                .normed
                .contiguous()?
                .reshape((rows * seq, d))?
                .index_select(&at(&logit_rows, &|_| seq - 1)?, 0)?;
            let normed = model.transformer.ln_final.affine(&normed)?;
            let directions = logit_rows
                .iter()
                .map(|&r| match &targets[r] {
                    Target::Logit { direction } => Ok(direction.clone()),
                    Target::Feature { .. } => Err(internal("a logit row reads a feature".into())),
                })
                .collect::<Result<Vec<_>>>()?;
            let values = (normed * Tensor::stack(&directions, 0)?)?.sum(1)?;
            pieces.push((logit_rows, values));
        }
        // Features, layer by layer.
        for (layer, x) in pass.inputs.iter().enumerate() {
            let Some(x) = x else { continue };
            let mut read = Vec::new();
            let mut positions = Vec::new();
            let mut ids = Vec::new();
            for (r, target) in targets.iter().enumerate().take(count) {
                if let Target::Feature {
                    layer: l,
                    position,
                    feature,
                } = target
                    && *l == layer
                {
                    read.push(r);
                    positions.push(*position);
                    ids.push(*feature);
                }
            }
            if read.is_empty() {
                continue;
            }
            let t = self.layers[layer]
                .transcoder
                .as_ref()
                .ok_or_else(|| internal(format!("layer {layer} has no transcoder")))?;
            let width = x.dim(2)?;
            let slot: std::collections::HashMap<usize, usize> =
                read.iter().copied().zip(positions).collect();
            let inputs = x
                .contiguous()?
                .reshape((rows * seq, width))?
                .index_select(&at(&read, &|r| slot[&r])?, 0)?; // [read, width]
            let encoders = t
                .sae
                .w_enc
                .index_select(&Tensor::new(ids.as_slice(), device)?, 1)?
                .t()?; // [read, width]
            pieces.push((read, (inputs * encoders)?.sum(1)?));
        }
        // Back into the targets' order.
        let mut slot_of = vec![0u32; count];
        for (slot, &target) in pieces.iter().flat_map(|(read, _)| read).enumerate() {
            slot_of[target] = slot as u32;
        }
        let values: Vec<Tensor> = pieces.into_iter().map(|(_, v)| v).collect();
        if values.is_empty() {
            return Err(internal("a batch without targets".into()));
        }
        let values = Tensor::cat(&values, 0)?;
        Ok(values.index_select(&Tensor::new(slot_of.as_slice(), device)?, 0)?)
    }

    /// The edges into each of `targets` (one per row of `pass`'s batch), over every source node
    /// (features, errors, tokens): `[targets][sources]`. The features of one layer and
    /// position take one matrix product: the gradient there times their (activation-scaled)
    /// decoder rows.
    fn edges(&self, pass: &Pass, targets: &[Target]) -> Result<Vec<Vec<f32>>> {
        let values = self.target_values(pass, targets)?;
        let grads = values.sum_all()?.backward()?;
        let rows = targets.len();
        let seq = self.ids.len();
        let n_layers = self.layers.len();
        let n_features = self.features.len();
        let mut out = vec![vec![0f32; n_features + (n_layers + 1) * seq]; rows];
        // `[rows, seq, d]` in f32, or `None` where no target reaches.
        let gradient_at = |point: HookPoint| -> Result<Option<Tensor>> {
            let leaf = pass
                .output
                .grad_leaf(point)
                .ok_or_else(|| internal(format!("no gradient leaf at {point}")))?;
            grads
                .get(leaf)
                .map(|g| Ok(g.narrow(0, 0, rows)?.to_dtype(DType::F32)?))
                .transpose()
        };
        // `Σ_d g[r, p, d]·value[p, d]` into each row's columns `first..first + seq`.
        let per_position =
            |g: &Tensor, value: &Tensor, first: usize, out: &mut [Vec<f32>]| -> Result<()> {
                let dots = g
                    .broadcast_mul(&value.unsqueeze(0)?)?
                    .sum(2)?
                    .to_vec2::<f32>()?;
                for (row, dots) in out.iter_mut().zip(dots) {
                    row[first..first + seq].copy_from_slice(&dots);
                }
                Ok(())
            };
        for (layer, l) in self.layers.iter().enumerate() {
            let Some(g) = gradient_at(HookPoint::MlpOut(layer))? else {
                continue;
            };
            // Each position's features that write this layer: the gradient there times their
            // decoder rows to it (summed over the layers a cross-layer feature writes).
            for group in &self.groups {
                for (_, _, decoders_t) in group.writes.iter().filter(|w| w.0 == layer) {
                    let dots = g
                        .i((.., group.position))?
                        .matmul(decoders_t)?
                        .to_vec2::<f32>()?;
                    for (row, dots) in out.iter_mut().zip(dots) {
                        let columns = &mut row[group.first..group.first + dots.len()];
                        columns.iter_mut().zip(dots).for_each(|(c, d)| *c += d);
                    }
                }
            }
            per_position(&g, &l.error_f32, n_features + layer * seq, &mut out)?;
        }
        if let Some(g) = gradient_at(HookPoint::Embed)? {
            per_position(
                &g,
                &self.embeddings_f32,
                n_features + n_layers * seq,
                &mut out,
            )?;
        }
        Ok(out)
    }
}

/// `x @ W_skipᵀ` for a skip transcoder, zeros of the output's width otherwise.
fn skip_path(sae: &Sae, x: &Tensor) -> Result<Tensor> {
    Ok(match &sae.w_skip {
        Some(w) => x.broadcast_matmul(&w.t()?)?,
        None => {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = sae.d_out();
            }
            Tensor::zeros(dims, x.dtype(), x.device())?
        }
    })
}

/// The most probable next tokens at the last position until their probabilities add up to
/// `desired_logit_probability` (at most `max_logits`), as circuit-tracer picks them.
fn logit_targets(
    model: &Model,
    logits: &Tensor,
    settings: &GraphSettings,
) -> Result<Vec<LogitTarget>> {
    let seq = logits.dim(1)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits.i((0, seq - 1))?.to_dtype(DType::F32)?)?
        .to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut chosen = Vec::new();
    let mut cumulative = 0f32;
    for &t in order.iter().take(settings.max_logits.max(1)) {
        chosen.push(LogitTarget {
            token_id: t as u32,
            token: model
                .tokenizer
                .tokens_display(&[t as u32])
                .pop()
                .unwrap_or_default(),
            probability: probs[t],
        });
        cumulative += probs[t];
        if cumulative >= settings.desired_logit_probability {
            break;
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sae::Architecture;
    use candle_core::Device;

    fn fixture(model_type: &str) -> Model {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(model_type);
        Model::load(&dir, &Device::Cpu, DType::F64).unwrap()
    }

    /// A random top-k transcoder from `blocks.L.mlp.hook_in` to `blocks.L.hook_mlp_out`.
    fn transcoder(model: &Model, layer: usize, skip: bool, seed: u64) -> LayerTranscoder {
        let d = model.dims().d_model;
        let d_sae = 24;
        let cpu = Device::Cpu;
        let randn = |shape: (usize, usize), std: f64, salt: u64| {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 31 + salt);
            let n = shape.0 * shape.1;
            let data: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() - 0.5) * std as f32)
                .collect();
            Tensor::from_vec(data, shape, &cpu).unwrap()
        };
        LayerTranscoder {
            sae: Sae {
                architecture: Architecture::TopK { k: 6 },
                w_enc: randn((d, d_sae), 1.0, 1),
                w_dec: randn((d_sae, d), 0.6, 2),
                b_enc: randn((1, d_sae), 0.2, 3).squeeze(0).unwrap(),
                b_dec: randn((1, d), 0.2, 4).squeeze(0).unwrap(),
                threshold: None,
                apply_b_dec_to_input: false,
                transcoder: true,
                w_skip: skip.then(|| randn((d, d), 0.2, 5)),
            },
            site: SaeSite {
                input: HookPoint::MlpIn(layer),
                output: HookPoint::MlpOut(layer),
            },
            later: LaterDecoders::None,
        }
    }

    /// A random cross-layer transcoder: every layer's features read `hook_resid_mid` (their
    /// encoders scaled to its size on `ids`) and write their own MLP output and every later
    /// one's.
    fn cross_layer(model: &Model, ids: &[u32], seed: u64) -> Vec<LayerTranscoder> {
        let n_layers = model.dims().n_layers;
        let resid = model
            .forward(
                &model.ids_tensor(ids).unwrap(),
                &Hooks::new().capture((0..n_layers).map(HookPoint::ResidMid)),
            )
            .unwrap();
        (0..n_layers)
            .map(|layer| {
                let x = resid.cache.require(HookPoint::ResidMid(layer)).unwrap();
                let norm = x.sqr().unwrap().sum(2).unwrap().sqrt().unwrap();
                let norm = norm.mean_all().unwrap().to_scalar::<f64>().unwrap();
                let mut t = transcoder(model, layer, false, seed + layer as u64);
                t.site.input = HookPoint::ResidMid(layer);
                t.sae.architecture = Architecture::Standard;
                // Pre-activations of a few units, as the per-layer ones have.
                t.sae.w_enc = (&t.sae.w_enc * (8.0 / norm)).unwrap();
                t.later = LaterDecoders::InMemory(
                    (layer + 1..n_layers)
                        .map(|out| {
                            let other = transcoder(model, out, false, seed * 7 + 100 + out as u64);
                            (other.sae.w_dec * 0.5).unwrap()
                        })
                        .collect(),
                );
                t
            })
            .collect()
    }

    /// A transcoder that reads inside the MLP (or anywhere the frozen model is not linear) is
    /// refused: its edges would not add up.
    #[test]
    fn transcoders_must_read_where_the_frozen_model_is_linear() {
        let model = fixture("gpt2");
        let mut t = transcoder(&model, 1, false, 3);
        assert_eq!(t.layer().unwrap(), 1);
        for input in [
            HookPoint::MlpPost(1),
            HookPoint::MlpPre(1),
            HookPoint::AttnQ(1),
        ] {
            t.site.input = input;
            let err = t.layer().unwrap_err().to_string();
            assert!(err.contains("linear"), "{input}: {err}");
        }
        t.site.input = HookPoint::MlpIn(0);
        assert!(t.layer().unwrap_err().to_string().contains("another block"));
    }

    /// Each target's value in the replacement model with `removed` nodes at zero.
    fn values(r: &Replacement, targets: &[(usize, Target)], removed: &[usize]) -> Vec<f64> {
        let pass = r.forward(targets.len(), removed).unwrap();
        let batch: Vec<Target> = targets.iter().map(|(_, t)| t.clone()).collect();
        r.target_values(&pass, &batch)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// On fixture models in f64 (GPT-2, Llama, GPT-NeoX, Gemma 2 and 3, OLMo 2), with a skip
    /// transcoder on layer 0 and a plain one on layer 1 (or none, leaving that MLP whole in its
    /// error nodes): the replacement model gives the model's logits; the edges into every target sum to its value less its value with every
    /// node at zero; and removing one node changes every target by exactly that node's edge.
    #[test]
    fn edges_are_the_replacement_models_exact_direct_effects() {
        for (model_type, second_layer, with_bos, cross) in [
            ("gpt2", true, true, false),
            ("llama", false, false, false),
            ("gpt_neox", true, false, false),
            // Post-norms around both sublayers, soft-capped attention and logits.
            ("gemma2", true, false, false),
            // Per-head query and key norms, local and global layers.
            ("gemma3_text", true, false, false),
            // Norms on the sublayers' outputs only, query and key norms over all heads.
            ("olmo2", true, false, false),
            // Cross-layer transcoders: features that write several MLP outputs.
            ("gpt2", true, true, true),
            ("gemma2", true, false, true),
        ] {
            let model = fixture(model_type);
            let mut transcoders = vec![transcoder(&model, 0, true, 1)];
            if second_layer {
                transcoders.push(transcoder(&model, 1, false, 2));
            }
            let mut ids = model
                .encode_prompt("The capital of Japan is Tokyo.")
                .unwrap();
            if with_bos {
                ids.insert(0, model.bos_token_id.unwrap());
            }
            if cross {
                transcoders = cross_layer(&model, &ids, 3);
            }
            let settings = GraphSettings {
                batch_rows: 7,
                ..Default::default()
            };
            let graph = attribute(
                &model,
                &transcoders,
                &ids,
                &settings,
                &AtomicBool::new(false),
                &mut |_, _| {},
            )
            .unwrap()
            .unwrap();
            assert!(graph.first_position_left_out, "{model_type}");
            assert!(
                graph.features.len() > 20,
                "{model_type}: {}",
                graph.features.len()
            );
            assert!(!graph.logits.is_empty());
            let (r, logits) = Replacement::new(&model, &transcoders, &ids, &settings).unwrap();
            assert_eq!(r.features, graph.features);

            // The replacement model is the model.
            let clean = model
                .forward(&model.ids_tensor(&ids).unwrap(), &Hooks::new())
                .unwrap();
            let pass = r.forward(1, &[]).unwrap();
            let diff = (pass.output.logits - &clean.logits)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 1e-9, "{model_type}: logits differ by {diff}");

            // Past the first position, each MLP's output is its error node, the features
            // writing it (from its layer or, cross-layer, an earlier one), its b_dec and its
            // skip path (what `fixed` leaves out).
            let mlp_outs = model
                .forward(
                    &model.ids_tensor(&ids).unwrap(),
                    &Hooks::new().capture((0..model.dims().n_layers).map(HookPoint::MlpOut)),
                )
                .unwrap();
            for (layer, l) in r.layers.iter().enumerate() {
                let mlp_out = mlp_outs.cache.require(HookPoint::MlpOut(layer)).unwrap();
                let mut rebuilt = (l.error.unsqueeze(0).unwrap() + (mlp_out - &l.fixed).unwrap())
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .to_vec2::<f64>()
                    .unwrap();
                for group in &r.groups {
                    for (_, rows, _) in group.writes.iter().filter(|w| w.0 == layer) {
                        let sum = rows.sum(0).unwrap().to_vec1::<f64>().unwrap();
                        rebuilt[group.position]
                            .iter_mut()
                            .zip(sum)
                            .for_each(|(r, s)| *r += s);
                    }
                }
                let bias = match &l.transcoder {
                    Some(t) => t.sae.b_dec.to_vec1::<f64>().unwrap(),
                    None => vec![0.0; model.dims().d_model],
                };
                let want = mlp_out.get(0).unwrap().to_vec2::<f64>().unwrap();
                for (position, (got, want)) in rebuilt.iter().zip(&want).enumerate().skip(1) {
                    for ((g, w), b) in got.iter().zip(want).zip(&bias) {
                        assert!(
                            (g + b - w).abs() < 1e-9 * w.abs().max(1.0),
                            "{model_type} (cross-layer: {cross}): layer {layer} @{position}: \
                             nodes and biases give {}, the MLP {w}",
                            g + b
                        );
                    }
                }
            }

            let targets = r.targets(&logits).unwrap();
            let n = graph.n_nodes();
            let sources = n - graph.logits.len();
            let full = values(&r, &targets, &[]);
            let all: Vec<usize> = (0..sources).collect();
            let none = values(&r, &targets, &all);
            for (k, &(row, _)) in targets.iter().enumerate() {
                let sum: f64 = (0..sources).map(|s| f64::from(graph.edge(row, s))).sum();
                let want = full[k] - none[k];
                assert!(
                    (sum - want).abs() < 1e-4 * want.abs().max(1.0),
                    "{model_type}: target {:?}: edges sum to {sum}, value less biases {want}",
                    graph.node(row)
                );
            }
            // One node of each kind removed alone.
            let some = [
                graph.index(Node::Feature(3)),
                graph.index(Node::Feature(graph.features.len() - 1)),
                graph.index(Node::Error {
                    layer: 0,
                    position: 2,
                }),
                graph.index(Node::Error {
                    layer: 1,
                    position: 3,
                }),
                graph.index(Node::Token { position: 1 }),
            ];
            for source in some {
                let without = values(&r, &targets, &[source]);
                for (k, &(row, _)) in targets.iter().enumerate() {
                    let want = full[k] - without[k];
                    let edge = f64::from(graph.edge(row, source));
                    assert!(
                        (edge - want).abs() < 1e-4 * want.abs().max(1e-3),
                        "{model_type} (cross-layer: {cross}): {:?} → {:?}: edge {edge}, effect {want}",
                        graph.node(source),
                        graph.node(row)
                    );
                }
            }
            // Causality: nothing reaches back to an earlier position or layer.
            for (t, f) in graph.features.iter().enumerate() {
                for (s, g) in graph.features.iter().enumerate() {
                    if g.layer >= f.layer || g.position > f.position {
                        assert_eq!(graph.edge(t, s), 0.0, "{model_type}: {g:?} → {f:?}");
                    }
                }
            }
        }
    }
}
