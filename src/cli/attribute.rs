//! `monoscope attribute`: a prompt's attribution graph through per-layer or cross-layer
//! transcoders, pruned
//! and written as circuit-tracer's graph file (its local viewer and Neuronpedia read it).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{CANCEL, ModelArgs, install_ctrl_c, print_json, progress_bar, write_new_file};
use crate::attribution_graph::graph_file::{GraphFile, GraphIndex, Metadata, graph_index_path};
use crate::attribution_graph::intervene::{FeatureChange, Intervened, intervene};
use crate::attribution_graph::prune::Pruned;
use crate::attribution_graph::{
    AttributionGraph, GraphSettings, Node, Supernode, attribute, load_each, transcoder_dirs,
};
use crate::gui::widgets::display_token;

#[derive(Args)]
pub struct AttributeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// A transcoder folder that writes a layer's `hook_mlp_out`, or a folder of them (one per
    /// layer; repeatable), or a transcoder set or cross-layer transcoder in circuit-tracer's
    /// formats (layer_L.safetensors, or W_enc_L / W_dec_L files, with their config.yaml).
    /// Layers without one keep their MLP output whole in error nodes.
    /// Default with the bundled model: its bundled transcoders.
    #[arg(long = "transcoders", value_name = "DIR")]
    transcoders: Vec<PathBuf>,
    /// Output graph file (JSON in circuit-tracer's graph-file schema).
    #[arg(long, value_parser = super::output_path, value_name = "FILE")]
    out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Keep the nodes holding this share of the influence on the logits.
    #[arg(long, default_value_t = 0.8)]
    node_threshold: f32,
    /// Keep the edges holding this share of the edge influence among the kept nodes.
    #[arg(long, default_value_t = 0.98)]
    edge_threshold: f32,
    /// At most this many logit targets …
    #[arg(long, default_value_t = 10)]
    max_logits: usize,
    /// … the most probable next tokens until their probabilities add up to this.
    #[arg(long, default_value_t = 0.95)]
    logit_probability: f32,
    /// Targets per backward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// At most this many feature nodes (0: no limit): with more active features, the most
    /// influential on the logits are kept, ranked as circuit-tracer ranks them (the unpruned
    /// adjacency is dense: 20,000 nodes make a 1.6 GB matrix).
    #[arg(long, default_value_t = GraphSettings::default().max_feature_nodes)]
    max_feature_nodes: usize,
    /// Put the model's BOS token before the prompt, as circuit-tracer does (its position is
    /// left out of the graph either way).
    #[arg(long)]
    bos: bool,
    /// Also write the unpruned graph as safetensors: `input_ids`, `active_features` [n, 3]
    /// (layer, position, feature), `activation_values`, `logit_tokens`,
    /// `logit_probabilities` and `adjacency` [nodes, nodes] (target × source), with
    /// `selected_features` (which active features are nodes).
    #[arg(long, value_parser = super::output_path, value_name = "FILE")]
    adjacency: Option<PathBuf>,
    /// Then set a feature node to a new activation and run the prompt again (repeatable):
    /// `LAYER:POSITION:FEATURE=VALUE`, e.g. `6:4:1729=0` ablates feature 1729 of layer 6's
    /// transcoder at token 4. Prints the logit targets' probabilities before and after.
    #[arg(long = "intervene", value_name = "L:P:F=V", value_parser = parse_change)]
    intervene: Vec<(usize, usize, u32, f32)>,
    /// Group feature nodes into a named supernode in the graph file, as Neuronpedia's viewer
    /// shows them (repeatable): `LABEL=L:P:F,L:P:F,…`, e.g. `say a capital=6:4:1729,5:4:88`.
    #[arg(long = "supernode", value_name = "LABEL=L:P:F,…", value_parser = parse_supernode)]
    supernodes: Vec<SupernodeArg>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &AttributeArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    // The outputs are checked before the long part.
    for path in std::iter::once(&args.out).chain(&args.adjacency) {
        super::refuse_existing(path, args.force)?;
    }
    // A graph file name or index that cannot be used is refused before the long part.
    check_graph_path(&args.out)?;
    GraphIndex::read(&graph_index_path(&args.out))?;
    let mut ids = model.encode_prompt(&args.prompt)?;
    if args.bos {
        let bos = model
            .bos_token_id
            .with_context(|| format!("--bos: {} names no BOS token", model.dir.display()))?;
        ids.insert(0, bos);
        model.check_length(ids.len())?;
    }
    let dirs = transcoder_dirs(&super::transcoders_named(&args.transcoders, &args.model)?)?;
    let transcoders = load_each(&dirs, &model)?;
    let settings = GraphSettings {
        max_logits: args.max_logits,
        desired_logit_probability: args.logit_probability,
        batch_rows: args.batch,
        max_feature_nodes: args.max_feature_nodes,
    };
    // Thresholds are checked before the long part.
    if !(0.0..=1.0).contains(&args.node_threshold) || !(0.0..=1.0).contains(&args.edge_threshold) {
        anyhow::bail!(
            "--node-threshold {} and --edge-threshold {} must be between 0 and 1",
            args.node_threshold,
            args.edge_threshold
        );
    }
    install_ctrl_c("stopping after this batch");
    let bar = progress_bar(0, "attribution {bar:30} {pos}/{len} targets")?;
    let started = std::time::Instant::now();
    let graph = attribute(
        &model,
        &transcoders,
        &ids,
        &settings,
        &CANCEL,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?
    .ok_or_else(|| anyhow::anyhow!("cancelled: nothing written"))?;
    bar.finish_and_clear();
    let changes = resolve_changes(&graph, &args.intervene)?;
    let supernodes = args
        .supernodes
        .iter()
        .map(|SupernodeArg { label, members }| {
            let nodes = members
                .iter()
                .map(|&(l, p, f)| {
                    let node = feature_node(&graph, l, p, f, "--supernode")?;
                    Ok(graph.index(Node::Feature(node)))
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Supernode {
                label: label.clone(),
                nodes,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seconds = started.elapsed().as_secs_f64();
    let pruned = graph.prune(args.node_threshold, args.edge_threshold)?;
    let file = GraphToWrite {
        graph: &graph,
        pruned: &pruned,
        prompt: &args.prompt,
        model_dir: &model.dir,
        transcoder_dirs: &dirs,
        node_threshold: args.node_threshold,
        supernodes: &supernodes,
    }
    .write(&args.out, args.force)?;
    if let Some(path) = &args.adjacency {
        write_new_file(path, args.force, |tmp| {
            Ok(crate::files::write_safetensors(&graph.tensors()?, tmp)?)
        })?;
    }
    let mut summary = Summary::new(&graph, &file, pruned.scores, seconds, &args.out);
    if !changes.is_empty() {
        summary.intervention = Some(intervene(&model, &transcoders, &graph, &changes, 5)?);
    }
    if args.json {
        return print_json(&summary);
    }
    summary.print(&graph);
    if let Some(result) = &summary.intervention {
        print_intervention(&graph, &changes, result);
    }
    Ok(())
}

/// `--intervene`'s `LAYER:POSITION:FEATURE=VALUE`.
fn parse_change(text: &str) -> Result<(usize, usize, u32, f32), String> {
    let bad = || format!("`{text}`: expected LAYER:POSITION:FEATURE=VALUE, e.g. 6:4:1729=0");
    let (site, value) = text.split_once('=').ok_or_else(bad)?;
    let (layer, position, feature) = parse_feature_at(site).ok_or_else(bad)?;
    Ok((
        layer,
        position,
        feature,
        value.trim().parse().map_err(|_| bad())?,
    ))
}

/// A feature by layer, position (token) and id, as the command line names it.
type FeatureAt = (usize, usize, u32);

/// `LAYER:POSITION:FEATURE`.
fn parse_feature_at(text: &str) -> Option<FeatureAt> {
    let parts: Vec<&str> = text.split(':').collect();
    let [layer, position, feature] = parts.as_slice() else {
        return None;
    };
    Some((
        layer.trim().parse().ok()?,
        position.trim().parse().ok()?,
        feature.trim().parse().ok()?,
    ))
}

/// One `--supernode`: its label and members.
#[derive(Clone, Debug)]
pub struct SupernodeArg {
    label: String,
    members: Vec<FeatureAt>,
}

/// `--supernode`'s `LABEL=L:P:F,L:P:F,…`.
fn parse_supernode(text: &str) -> Result<SupernodeArg, String> {
    let bad = || format!("`{text}`: expected LABEL=L:P:F,L:P:F,…, e.g. capital=6:4:1729,5:4:88");
    let (label, members) = text.split_once('=').ok_or_else(bad)?;
    if label.trim().is_empty() {
        return Err(bad());
    }
    let members = members
        .split(',')
        .map(|m| parse_feature_at(m).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    Ok(SupernodeArg {
        label: label.trim().to_string(),
        members,
    })
}

/// The index into the graph's feature nodes of `feature` of `layer`'s transcoder at token
/// `position`, or an error naming it (and the `flag` that asked) when it is not a node.
fn feature_node(
    graph: &AttributionGraph,
    layer: usize,
    position: usize,
    feature: u32,
    flag: &str,
) -> anyhow::Result<usize> {
    graph
        .features
        .iter()
        .position(|f| (f.layer, f.position, f.feature) == (layer, position, feature))
        .with_context(|| {
            format!(
                "{flag} {layer}:{position}:{feature}: feature {feature} of layer {layer} is not \
                 a feature node at token {position} (not active there, or left out by \
                 --max-feature-nodes)"
            )
        })
}

/// The graph's feature node for each `--intervene`, or an error naming one that is not a node.
fn resolve_changes(
    graph: &AttributionGraph,
    asked: &[(usize, usize, u32, f32)],
) -> anyhow::Result<Vec<FeatureChange>> {
    asked
        .iter()
        .map(|&(layer, position, feature, value)| {
            Ok(FeatureChange {
                feature: feature_node(graph, layer, position, feature, "--intervene")?,
                value,
            })
        })
        .collect()
}

fn print_intervention(graph: &AttributionGraph, changes: &[FeatureChange], result: &Intervened) {
    let named: Vec<String> = changes
        .iter()
        .map(|c| {
            let node = graph.index(Node::Feature(c.feature));
            format!("{} → {}", graph.describe(node, display_token), c.value)
        })
        .collect();
    println!("intervention: {}", named.join(", "));
    for (l, (b, a)) in graph
        .logits
        .iter()
        .zip(result.before.iter().zip(&result.after))
    {
        println!("  '{}': p {b:.3} → {a:.3}", display_token(&l.token));
    }
    let top: Vec<String> = result
        .top_after
        .iter()
        .map(|t| format!("'{}' {:.3}", display_token(&t.token), t.prob))
        .collect();
    println!("  most likely after: {}", top.join(", "));
}

/// A pruned graph and what made it: what a graph file is written from.
pub struct GraphToWrite<'a> {
    pub graph: &'a AttributionGraph,
    pub pruned: &'a Pruned,
    pub prompt: &'a str,
    pub model_dir: &'a Path,
    pub transcoder_dirs: &'a [PathBuf],
    pub node_threshold: f32,
    /// Groups of nodes, written to the file's `qParams` for Neuronpedia's viewer.
    pub supernodes: &'a [crate::attribution_graph::Supernode],
}

impl GraphToWrite<'_> {
    /// Writes the graph to `out` in circuit-tracer's graph-file schema (refusing an existing
    /// file unless `force`; written under a temporary name, then renamed) and adds it to the
    /// folder's `graph-metadata.json`, where circuit-tracer's viewer finds it as `SLUG.json`.
    pub fn write(&self, out: &Path, force: bool) -> anyhow::Result<GraphFile> {
        check_graph_path(out)?;
        super::refuse_existing(out, force)?;
        let index_path = graph_index_path(out);
        let mut index = GraphIndex::read(&index_path)?;
        let slug = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "graph".into());
        let metadata = Metadata {
            slug,
            scan: scan_name(self.model_dir, self.transcoder_dirs),
            transcoder_list: self
                .transcoder_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect(),
            prompt_tokens: self.graph.tokens.clone(),
            prompt: self.prompt.to_string(),
            node_threshold: self.node_threshold,
            schema_version: 1,
        };
        index.add(&metadata);
        let file = self
            .graph
            .graph_file(self.pruned, metadata, self.supernodes);
        write_new_file(out, force, |tmp| {
            std::fs::write(tmp, serde_json::to_vec(&file)?)
                .with_context(|| format!("writing {}", out.display()))
        })?;
        crate::files::write_atomic(&index_path, |tmp| index.write(tmp))?;
        Ok(file)
    }
}

/// Refuses a graph file name without `.json`: circuit-tracer's viewer finds a graph as
/// `SLUG.json` beside its index.
fn check_graph_path(out: &Path) -> anyhow::Result<()> {
    if out.extension().is_none_or(|e| e != "json") {
        anyhow::bail!(
            "{}: a graph file's name ends in .json (circuit-tracer's viewer finds it as SLUG.json)",
            out.display()
        );
    }
    Ok(())
}

/// circuit-tracer's `scan`: which model and transcoders made the graph.
fn scan_name(model: &Path, dirs: &[PathBuf]) -> String {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let parent = dirs
        .first()
        .and_then(|d| d.parent())
        .map(name)
        .unwrap_or_default();
    format!("{}/{}", name(model), parent)
}

#[derive(serde::Serialize)]
struct Summary {
    out: String,
    tokens: Vec<String>,
    active_features: usize,
    /// The active features kept as nodes (all but those `--max-feature-nodes` left out).
    feature_nodes: usize,
    nodes: usize,
    kept_nodes: usize,
    kept_links: usize,
    logits: Vec<crate::attribution_graph::LogitTarget>,
    replacement_score: f32,
    completeness_score: f32,
    seconds: f64,
    /// `--intervene`'s result: the logit targets before and after, the top tokens after.
    #[serde(skip_serializing_if = "Option::is_none")]
    intervention: Option<Intervened>,
}

impl Summary {
    fn new(
        graph: &AttributionGraph,
        file: &crate::attribution_graph::graph_file::GraphFile,
        scores: crate::attribution_graph::prune::GraphScores,
        seconds: f64,
        out: &Path,
    ) -> Self {
        Self {
            out: out.display().to_string(),
            tokens: graph.tokens.clone(),
            active_features: graph.active_features.len(),
            feature_nodes: graph.features.len(),
            nodes: graph.n_nodes(),
            kept_nodes: file.node_count(),
            kept_links: file.link_count(),
            logits: graph.logits.clone(),
            replacement_score: scores.replacement,
            completeness_score: scores.completeness,
            seconds,
            intervention: None,
        }
    }

    fn print(&self, graph: &AttributionGraph) {
        println!(
            "wrote {} ({} of {} nodes, {} links) in {:.1} s",
            self.out, self.kept_nodes, self.nodes, self.kept_links, self.seconds
        );
        println!(
            "{} active transcoder features ({} of them nodes) over {} tokens; replacement \
             score {:.3}, completeness score {:.3}",
            self.active_features,
            self.feature_nodes,
            self.tokens.len(),
            self.replacement_score,
            self.completeness_score
        );
        for (i, l) in graph.logits.iter().enumerate() {
            let row = graph.index(Node::Logit(i));
            // The strongest direct inputs of each logit.
            let inputs = graph.strongest_inputs(row);
            let named: Vec<String> = inputs
                .iter()
                .take(5)
                .map(|&(s, w)| format!("{} {w:+.2}", graph.describe(s, display_token)))
                .collect();
            println!(
                "  '{}' (p {:.3}): {}",
                display_token(&l.token),
                l.probability,
                named.join(", ")
            );
        }
    }
}
