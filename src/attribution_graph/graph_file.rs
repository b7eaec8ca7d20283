//! A pruned attribution graph as circuit-tracer's graph file (the `SLUG.json` its
//! `create_graph_files` writes and its viewer and Neuronpedia's read), node ids, fields and link
//! list spelled as circuit-tracer 0.5 writes them — the error nodes' ids `0_L_P` included,
//! which can coincide with a layer-0 feature's `0_F_P` (a node's `feature_type` tells them
//! apart) — and the `graph-metadata.json` index beside it that circuit-tracer's local server
//! lists graphs from (`add_graph_metadata`: one entry per slug, the newest kept).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::prune::Pruned;
use super::{AttributionGraph, Node, Supernode};
use crate::error::{Error, Result};

/// The index of the graphs in a folder, `graph-metadata.json`, beside `graph_file`.
pub fn graph_index_path(graph_file: &Path) -> PathBuf {
    graph_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("graph-metadata.json")
}

/// circuit-tracer's `graph-metadata.json`: `{"graphs": [metadata, …]}`. Other keys and
/// entries are kept as they are.
#[derive(Clone, Debug)]
pub struct GraphIndex(serde_json::Value);

impl GraphIndex {
    /// The index at `path`, or a new one where there is none; an index that is not one is an
    /// error naming the file (it is not replaced).
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self(serde_json::json!({ "graphs": [] })));
        }
        let value: serde_json::Value = crate::files::read_json(path)?;
        if !value.get("graphs").is_some_and(serde_json::Value::is_array) {
            return Err(Error::config(path, "graphs", "missing or not a list"));
        }
        Ok(Self(value))
    }

    /// Adds `metadata`, replacing an entry of the same slug.
    pub fn add(&mut self, metadata: &Metadata) {
        if let Some(graphs) = self.0.get_mut("graphs").and_then(|g| g.as_array_mut()) {
            graphs.retain(|g| g.get("slug").and_then(|s| s.as_str()) != Some(&metadata.slug));
            graphs.push(serde_json::to_value(metadata).unwrap_or_default());
        }
    }

    /// Writes the index to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.0).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

/// `graph-metadata`'s entry and the file's header.
#[derive(Clone, Debug, Serialize)]
pub struct Metadata {
    pub slug: String,
    /// Which transcoders made the graph (circuit-tracer's `scan`).
    pub scan: String,
    pub transcoder_list: Vec<String>,
    pub prompt_tokens: Vec<String>,
    pub prompt: String,
    pub node_threshold: f32,
    pub schema_version: u32,
}

#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)] // the viewer's spelling
struct QParams {
    pinnedIds: Vec<String>,
    supernodes: Vec<Vec<String>>,
    linkType: String,
    clickedId: String,
    sg_pos: String,
}

#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
struct GraphNode {
    node_id: String,
    feature: i64,
    layer: String,
    ctx_idx: usize,
    feature_type: &'static str,
    token_prob: f32,
    is_target_logit: bool,
    run_idx: u32,
    reverse_ctx_idx: u32,
    jsNodeId: String,
    clerp: String,
    influence: Option<f32>,
    activation: Option<f32>,
}

#[derive(Clone, Debug, Serialize)]
struct Link {
    source: String,
    target: String,
    weight: f32,
}

/// The whole file.
#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
pub struct GraphFile {
    pub metadata: Metadata,
    qParams: QParams,
    nodes: Vec<GraphNode>,
    links: Vec<Link>,
}

impl GraphFile {
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn link_count(&self) -> usize {
        self.links.len()
    }
}

/// circuit-tracer's id for a (layer, feature) pair (the Cantor pairing).
fn cantor(x: i64, y: i64) -> i64 {
    (x + y) * (x + y + 1) / 2 + y
}

impl AttributionGraph {
    /// The pruned graph as circuit-tracer's graph file: kept nodes that keep an edge (tokens
    /// and logits always), and the kept edges between them; `supernodes` go in its `qParams`
    /// as Neuronpedia's viewer reads them (`[label, node id, …]`, members the file keeps).
    pub fn graph_file(
        &self,
        pruned: &Pruned,
        metadata: Metadata,
        supernodes: &[Supernode],
    ) -> GraphFile {
        let n = self.n_nodes();
        let nodes: Vec<Option<GraphNode>> = (0..n)
            .map(|i| pruned.nodes[i].then(|| self.graph_node(i, pruned)))
            .collect();
        let mut links = Vec::new();
        let mut connected = vec![false; n];
        for t in 0..n {
            for s in 0..n {
                if !pruned.edges[t * n + s] {
                    continue;
                }
                if let (Some(target), Some(source)) = (&nodes[t], &nodes[s]) {
                    links.push(Link {
                        source: source.node_id.clone(),
                        target: target.node_id.clone(),
                        weight: self.edge(t, s),
                    });
                    connected[t] = true;
                    connected[s] = true;
                }
            }
        }
        let written: Vec<Option<GraphNode>> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, node)| {
                let node = node?;
                let always = matches!(node.feature_type, "embedding" | "logit");
                (connected[i] || always).then_some(node)
            })
            .collect();
        let supernodes = supernodes
            .iter()
            .filter_map(|group| {
                let ids: Vec<String> = group
                    .nodes
                    .iter()
                    .filter_map(|&i| Some(written.get(i)?.as_ref()?.node_id.clone()))
                    .collect();
                (!ids.is_empty()).then(|| std::iter::once(group.label.clone()).chain(ids).collect())
            })
            .collect();
        let nodes = written.into_iter().flatten().collect();
        GraphFile {
            metadata,
            qParams: QParams {
                pinnedIds: Vec::new(),
                supernodes,
                linkType: "both".into(),
                clickedId: String::new(),
                sg_pos: String::new(),
            },
            nodes,
            links,
        }
    }

    fn graph_node(&self, index: usize, pruned: &Pruned) -> GraphNode {
        let influence = Some(pruned.cumulative_influence[index]);
        let blank = GraphNode {
            node_id: String::new(),
            feature: 0,
            layer: String::new(),
            ctx_idx: 0,
            feature_type: "",
            token_prob: 0.0,
            is_target_logit: false,
            run_idx: 0,
            reverse_ctx_idx: 0,
            jsNodeId: String::new(),
            clerp: String::new(),
            influence,
            activation: None,
        };
        match self.node(index) {
            Node::Feature(i) => {
                let f = &self.features[i];
                GraphNode {
                    node_id: format!("{}_{}_{}", f.layer, f.feature, f.position),
                    feature: cantor(f.layer as i64, i64::from(f.feature)),
                    layer: f.layer.to_string(),
                    ctx_idx: f.position,
                    feature_type: "cross layer transcoder",
                    jsNodeId: format!("{}_{}-0", f.layer, f.feature),
                    activation: Some(f.activation),
                    ..blank
                }
            }
            Node::Error { layer, position } => GraphNode {
                node_id: format!("0_{layer}_{position}"),
                feature: -1,
                layer: layer.to_string(),
                ctx_idx: position,
                feature_type: "mlp reconstruction error",
                jsNodeId: format!("{layer}_{position}-0"),
                ..blank
            },
            Node::Token { position } => {
                let vocab = self.input_ids[position];
                GraphNode {
                    node_id: format!("E_{vocab}_{position}"),
                    feature: position as i64,
                    layer: "E".into(),
                    ctx_idx: position,
                    feature_type: "embedding",
                    jsNodeId: format!("E_{vocab}-{position}"),
                    ..blank
                }
            }
            Node::Logit(i) => {
                let l = &self.logits[i];
                let layer = (self.n_layers + 1).to_string();
                let position = self.n_positions() - 1;
                GraphNode {
                    node_id: format!("{layer}_{}_{position}", l.token_id),
                    feature: i64::from(l.token_id),
                    layer,
                    ctx_idx: position,
                    feature_type: "logit",
                    token_prob: l.probability,
                    is_target_logit: i == 0,
                    jsNodeId: format!("L_{}-{position}", l.token_id),
                    clerp: format!("Output \"{}\" (p={:.3})", l.token, l.probability),
                    influence: None,
                    ..blank
                }
            }
        }
    }
}
