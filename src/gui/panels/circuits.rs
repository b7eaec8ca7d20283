//! Circuits: a prompt's attribution graph through per-layer or cross-layer transcoders
//! (circuit-tracer's local
//! replacement model, [`crate::attribution_graph`]), pruned as circuit-tracer prunes it and
//! drawn as a layer × token graph: the prompt's token embeddings at the bottom, each layer's
//! active features and error nodes above their token, the top next-token logits along the top,
//! edges coloured by sign. A node's inputs and outputs are listed as buttons, so a circuit can
//! be walked from a logit down to the tokens. The graph is recomputed after a model edit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use egui::{Color32, Pos2, Rect, Sense, Stroke, pos2, vec2};

use super::{Panel, PanelKind, Reader, need_model, running, take};
use crate::attribution_graph::fidelity::{FidelityReport, score};
use crate::attribution_graph::intervene::{FeatureChange, Intervened, intervene};
use crate::attribution_graph::prune::GraphScores;
use crate::attribution_graph::prune::Pruned;
use crate::attribution_graph::{
    AttributionGraph, GraphSettings, LayerTranscoder, Node, Supernode, attribute, load_each,
    transcoder_dirs,
};
use crate::features::logits::logit_effects;
use crate::features::stats::Context;
use crate::features::top_contexts;
use crate::gui::style::{diverging_colour, explain};
use crate::gui::widgets::{display_token, job_row, prompt_row, token_chips};
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::{Job, JobHandle};
use crate::model::{HookPoint, Model};
use crate::sae::activations::{ActivationSource, Corpus, WindowSettings};

/// Height of one row of the graph (the embeddings, a layer, the logits).
const ROW_HEIGHT: f32 = 40.0;
/// Narrowest a token's column gets before the graph scrolls sideways, in points.
const MIN_COLUMN_WIDTH: f32 = 90.0;
/// Token columns the logits spread over (the last ones).
const LOGIT_COLUMNS: usize = 6;
/// Width of the row labels left of the graph.
const LABEL_WIDTH: f32 = 56.0;
/// Edges drawn faintly behind the selected node's, strongest first (a short prompt keeps tens
/// of thousands, which would hide the graph and slow every frame).
const DRAWN_EDGES: usize = 400;
/// The selected node's strongest edges drawn, each way.
const SELECTED_EDGES: usize = 40;
/// Least room between two nodes of a cell before its nodes wrap onto another line, in points.
const NODE_SPACING: f32 = 9.0;
/// Lines a crowded cell wraps onto, at most.
const CELL_LINES: usize = 3;
/// Inputs and outputs listed for the selected node.
const LISTED: usize = 8;
/// Tokens of the world corpus searched for a layer's features' top contexts.
const CONTEXT_TOKENS: u64 = 20_000;
/// Top contexts shown per feature.
const CONTEXTS: usize = 3;
/// How near the pointer must be to a node to hover it, in points.
const PICK_RADIUS: f32 = 8.0;

/// What a graph answers.
#[derive(Clone, Debug, PartialEq)]
struct Query {
    /// The model folder it is for (another model opened starts afresh).
    model: PathBuf,
    prompt: String,
    transcoders: PathBuf,
    bos: bool,
    node_threshold: f32,
    edge_threshold: f32,
}

impl Query {
    /// What the graph itself depends on (the thresholds only prune it).
    fn without_thresholds(self) -> Self {
        Self {
            node_threshold: 0.0,
            edge_threshold: 0.0,
            ..self
        }
    }
}

/// A kept node and where it is drawn: `column` is its token position; `row` 0 the embeddings,
/// `1 + layer` a layer, `n_layers + 1` the logits; `slot` of `slots` its place in its cell.
struct ShownNode {
    index: usize,
    column: usize,
    row: usize,
    slot: usize,
    slots: usize,
    label: String,
}

/// A graph ready to draw.
struct Circuit {
    /// Tells graphs apart (a selection belongs to one).
    serial: u64,
    graph: Arc<AttributionGraph>,
    pruned: Arc<Pruned>,
    /// The transcoder folders it was traced through (for the graph file).
    transcoder_dirs: Vec<PathBuf>,
    scores: GraphScores,
    nodes: Vec<ShownNode>,
    /// Kept edges `(target, source, weight)` as indices into `nodes`, strongest first.
    edges: Vec<(usize, usize, f32)>,
    /// A graph node's index into `nodes`.
    place: HashMap<usize, usize>,
    transcoders: Arc<Vec<LayerTranscoder>>,
    /// Each kept feature's three most promoted tokens (its decoder row's direct logit
    /// effect), by graph index: a label to read the graph by.
    promotes: HashMap<usize, String>,
    /// Each kept feature's five most promoted and suppressed tokens, as a line.
    effects: HashMap<usize, String>,
    seconds: f64,
}

impl Circuit {
    /// What a kept feature promotes ("" for other nodes).
    fn promotes(&self, index: usize) -> &str {
        self.promotes.get(&index).map_or("", String::as_str)
    }

    /// The kept node at `index` (a graph index): its description.
    fn describe(&self, index: usize) -> String {
        self.graph.describe(index, display_token)
    }

    /// The kept edges into (`inputs`) or out of `index`, strongest first: (graph index, weight).
    fn neighbours(&self, index: usize, inputs: bool) -> Vec<(usize, f32)> {
        let Some(&at) = self.place.get(&index) else {
            return Vec::new();
        };
        self.edges
            .iter()
            .filter_map(|&(t, s, w)| match inputs {
                true if t == at => Some((self.nodes[s].index, w)),
                false if s == at => Some((self.nodes[t].index, w)),
                _ => None,
            })
            .collect()
    }
}

pub struct Circuits {
    prompt: String,
    transcoders: String,
    bos: bool,
    node_threshold: f32,
    edge_threshold: f32,
    reader: Reader<Query, Circuit>,
    /// The last graph traced (new thresholds prune it again rather than trace anew).
    last: Arc<Mutex<Option<Traced>>>,
    interventions: Interventions,
    save: SaveForm,
    /// The selected node (graph index) of the graph with that serial.
    selected: Option<(u64, usize)>,
    looks: FeatureLooks,
    supernodes: Supernodes,
    fidelity: Fidelity,
}

/// Nodes of the shown graph grouped into named supernodes.
#[derive(Default)]
struct Supernodes {
    /// The graph the groups belong to (its serial).
    serial: u64,
    /// The name typed for the next group.
    name: String,
    groups: Vec<Supernode>,
}

impl Supernodes {
    /// The form that adds the selected node to a named group, and each group: its members
    /// (buttons that select them), its summed direct effect on the logits and on the other
    /// groups. Returns a node picked, and the feature nodes of a group to ablate.
    fn ui(
        &mut self,
        ui: &mut egui::Ui,
        circuit: &Circuit,
        selected: usize,
    ) -> (Option<usize>, Option<Vec<usize>>) {
        if self.serial != circuit.serial {
            *self = Self {
                serial: circuit.serial,
                name: std::mem::take(&mut self.name),
                ..Self::default()
            };
        }
        let graph = &circuit.graph;
        let (mut picked, mut ablate) = (None, None);
        ui.separator();
        ui.horizontal(|ui| {
            ui.strong("Supernodes").on_hover_text(explain::SUPERNODES);
            let label = ui.label("group name");
            ui.add(
                egui::TextEdit::singleline(&mut self.name)
                    .desired_width(140.0)
                    .hint_text("say a capital"),
            )
            .labelled_by(label.id);
            let name = self.name.trim().to_string();
            if ui
                .add_enabled(!name.is_empty(), egui::Button::new("Add to supernode"))
                .on_hover_text(format!("add {} to the group", circuit.describe(selected)))
                .clicked()
            {
                match self.groups.iter_mut().find(|g| g.label == name) {
                    Some(group) if !group.nodes.contains(&selected) => group.nodes.push(selected),
                    Some(_) => {}
                    None => self.groups.push(Supernode {
                        label: name,
                        nodes: vec![selected],
                    }),
                }
            }
        });
        let mut deleted = None;
        for (k, group) in self.groups.iter_mut().enumerate() {
            let mut taken_out = None;
            ui.horizontal_wrapped(|ui| {
                ui.strong(&group.label);
                for (m, &node) in group.nodes.iter().enumerate() {
                    if ui.button(circuit.describe(node)).clicked() {
                        picked = Some(node);
                    }
                    if ui
                        .small_button("−")
                        .on_hover_text("take it out of the group")
                        .clicked()
                    {
                        taken_out = Some(m);
                    }
                }
                let features: Vec<usize> = group
                    .nodes
                    .iter()
                    .filter_map(|&n| match graph.node(n) {
                        Node::Feature(i) => Some(i),
                        _ => None,
                    })
                    .collect();
                if ui
                    .add_enabled(!features.is_empty(), egui::Button::new("Ablate supernode"))
                    .on_hover_text("set every feature of the group to zero (Interventions)")
                    .clicked()
                {
                    ablate = Some(features);
                }
                if ui.small_button("Delete supernode").clicked() {
                    deleted = Some(k);
                }
            });
            if let Some(m) = taken_out {
                group.nodes.remove(m);
            }
        }
        if let Some(k) = deleted {
            self.groups.remove(k);
        }
        self.groups.retain(|g| !g.nodes.is_empty());
        // Each group's effects: on the logits, then on the other groups.
        for group in &self.groups {
            let mut effects: Vec<String> = (0..graph.logits.len())
                .map(|l| {
                    let logit = graph.index(Node::Logit(l));
                    let w = graph.group_effect(&[logit], &group.nodes);
                    format!("'{}' {w:+.3}", display_token(&graph.logits[l].token))
                })
                .take(LISTED)
                .collect();
            for other in self.groups.iter().filter(|o| o.label != group.label) {
                let w = graph.group_effect(&other.nodes, &group.nodes);
                if w != 0.0 {
                    effects.push(format!("{} {w:+.3}", other.label));
                }
            }
            ui.label(format!("{} → {}", group.label, effects.join(", ")));
        }
        (picked, ablate)
    }
}

/// Writing the shown graph as circuit-tracer's graph file.
#[derive(Default)]
struct SaveForm {
    path: String,
    job: Option<Job<PathBuf>>,
}

impl SaveForm {
    fn ui(
        &mut self,
        ui: &mut egui::Ui,
        wb: &mut Workbench,
        model: &Model,
        (circuit, query, supernodes): (&Circuit, &Query, &[Supernode]),
    ) {
        if let Some(path) = take(&mut self.job, wb) {
            wb.info(format!("wrote {}", path.display()));
        }
        ui.horizontal(|ui| {
            let label = ui.label("Graph file").on_hover_text(explain::GRAPH_FILE);
            let field = ui
                .add(
                    egui::TextEdit::singleline(&mut self.path)
                        .desired_width(320.0)
                        .hint_text("japan.json"),
                )
                .labelled_by(label.id);
            let asked = crate::gui::widgets::entered(ui, &field);
            let path = PathBuf::from(self.path.trim());
            let can = !self.path.trim().is_empty() && self.job.is_none();
            if (ui
                .add_enabled(can, egui::Button::new("Save graph"))
                .clicked()
                || asked)
                && can
            {
                let (graph, pruned) = (circuit.graph.clone(), circuit.pruned.clone());
                let dirs = circuit.transcoder_dirs.clone();
                let (prompt, model_dir) = (query.prompt.clone(), model.dir.clone());
                let node_threshold = query.node_threshold;
                let supernodes = supernodes.to_vec();
                self.job = Some(wb.spawn("saving the graph", move |_| {
                    crate::cli::attribute::GraphToWrite {
                        graph: &graph,
                        pruned: &pruned,
                        prompt: &prompt,
                        model_dir: &model_dir,
                        transcoder_dirs: &dirs,
                        node_threshold,
                        supernodes: &supernodes,
                    }
                    .write(&path, false)?;
                    // Said in full: a relative path is from the window's working folder.
                    Ok(std::path::absolute(&path).unwrap_or(path))
                }));
            }
        });
    }
}

/// Features of the shown graph set to new activations, and what the model then predicts.
#[derive(Default)]
struct Interventions {
    /// The graph the changes belong to (its serial).
    serial: u64,
    changes: Vec<FeatureChange>,
    /// The value typed for "Set to".
    value: f32,
    reader: Reader<(u64, Vec<FeatureChange>), Intervened>,
}

impl Interventions {
    /// Sets `features` (of the graph with `serial`) to zero, beside the other changes.
    fn ablate(&mut self, serial: u64, features: &[usize]) {
        if self.serial != serial {
            *self = Self {
                serial,
                ..Self::default()
            };
        }
        for &f in features {
            set_change(&mut self.changes, f, 0.0);
        }
    }

    /// Buttons that change the selected feature, the changes made, and the logits before and
    /// after them. Returns a node picked (a changed feature's button selects it).
    fn ui(
        &mut self,
        ui: &mut egui::Ui,
        wb: &mut Workbench,
        model: &Arc<Model>,
        (circuit, selected, stale): (&Circuit, usize, bool),
    ) -> Option<usize> {
        self.reader.poll(wb);
        if self.serial != circuit.serial {
            // A new graph: the old one's changes and their answer mean nothing for it.
            *self = Self {
                serial: circuit.serial,
                ..Self::default()
            };
        }
        let graph = &circuit.graph;
        ui.separator();
        let mut picked = None;
        ui.horizontal(|ui| {
            ui.strong("Interventions")
                .on_hover_text(explain::FEATURE_INTERVENTION);
            let Node::Feature(i) = graph.node(selected) else {
                ui.label("select a feature to set its activation");
                return;
            };
            let a = graph.features[i].activation;
            ui.label(format!("{}:", circuit.describe(selected)));
            for (label, value) in [("Ablate", 0.0), ("Double", 2.0 * a), ("Negate", -a)] {
                if ui.button(label).clicked() {
                    set_change(&mut self.changes, i, value);
                }
            }
            ui.label("Set to");
            ui.add(egui::DragValue::new(&mut self.value).speed(0.05));
            if ui.button("Set").clicked() {
                set_change(&mut self.changes, i, self.value);
            }
        });
        let mut removed = None;
        for (k, change) in self.changes.iter().enumerate() {
            ui.horizontal(|ui| {
                let index = graph.index(Node::Feature(change.feature));
                if ui.button(circuit.describe(index)).clicked() {
                    picked = Some(index);
                }
                let was = graph.features[change.feature].activation;
                ui.label(format!("{was:.3} → {:.3}", change.value));
                if ui.small_button("Remove").clicked() {
                    removed = Some(k);
                }
            });
        }
        if let Some(k) = removed {
            self.changes.remove(k);
        }
        if !self.changes.is_empty() {
            ui.horizontal(|ui| {
                if ui.button("Clear interventions").clicked() {
                    self.changes.clear();
                }
            });
        }
        // (Asked whenever the changes differ from those last asked: a supernode's ablation
        // adds changes from outside this form.)
        let question = (self.serial, self.changes.clone());
        if !self.changes.is_empty() && self.reader.asked() != Some(&question) {
            self.reader.ask(question);
        }
        let (model, transcoders, shown) = (
            model.clone(),
            circuit.transcoders.clone(),
            circuit.graph.clone(),
        );
        if stale {
            ui.weak("the model changed: interventions wait for its new graph");
            return picked;
        }
        self.reader
            .run_due(wb, "intervention", move |(_, changes), _| {
                Ok(intervene(&model, &transcoders, &shown, changes, LISTED)?)
            });
        let answer = self.reader.answer()?;
        if answer.question != (self.serial, self.changes.clone()) || self.changes.is_empty() {
            return picked;
        }
        let result = &answer.value;
        egui::Grid::new("intervention logits")
            .striped(true)
            .show(ui, |ui| {
                ui.strong("logit");
                ui.strong("p before → after");
                ui.end_row();
                for (l, (b, a)) in graph
                    .logits
                    .iter()
                    .zip(result.before.iter().zip(&result.after))
                {
                    ui.label(display_token(&l.token));
                    ui.label(format!("{b:.3} → {a:.3}"));
                    ui.end_row();
                }
            });
        let top: Vec<String> = result
            .top_after
            .iter()
            .map(|t| format!("{} {:.3}", display_token(&t.token), t.prob))
            .collect();
        ui.label(format!("Most likely after: {}", top.join(", ")));
        picked
    }
}

/// Sets feature `feature`'s change to `value` (replacing an earlier one).
fn set_change(changes: &mut Vec<FeatureChange>, feature: usize, value: f32) {
    changes.retain(|c| c.feature != feature);
    changes.push(FeatureChange { feature, value });
}

/// Held-out text the replacement model is scored on by default: the world corpus generated
/// with another seed than the bundled corpus's; `FIDELITY_WINDOWS` of `FIDELITY_CONTEXT`
/// tokens of it.
const FIDELITY_CORPUS: &str = "world:1";
const FIDELITY_WINDOWS: usize = 16;
const FIDELITY_CONTEXT: usize = 64;

/// Which transcoders (folders), on which model version and corpus: what a replacement score
/// is of.
type FidelityKey = (Vec<PathBuf>, u64, String);

/// How faithful the graph's transcoders are as a replacement for the MLPs
/// ([`crate::attribution_graph::fidelity`]), scored on demand on held-out text.
struct Fidelity {
    /// What it is scored on: `world:SEED`, or a text, JSONL or Parquet file.
    corpus: String,
    job: Option<Job<(FidelityKey, FidelityReport)>>,
    report: Option<(FidelityKey, FidelityReport)>,
}

impl Default for Fidelity {
    fn default() -> Self {
        Self {
            corpus: FIDELITY_CORPUS.into(),
            job: None,
            report: None,
        }
    }
}

impl Fidelity {
    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench, model: &Arc<Model>, circuit: &Circuit) {
        if let Some(done) = take(&mut self.job, wb) {
            self.report = Some(done);
        }
        let corpus = self.corpus.trim().to_string();
        let key = (
            circuit.transcoder_dirs.clone(),
            wb.model_version,
            corpus.clone(),
        );
        ui.horizontal_wrapped(|ui| {
            let clicked = ui
                .add_enabled(
                    self.job.is_none(),
                    egui::Button::new("Score the replacement model"),
                )
                .on_hover_text(explain::REPLACEMENT_MODEL)
                .clicked();
            let label = ui.label("on").on_hover_text(
                "The held-out text: world:SEED (the world corpus generated with that seed; \
                 the bundled model trained on world:0), or a .txt, .jsonl or .parquet file",
            );
            ui.add_enabled(
                self.job.is_none(),
                egui::TextEdit::singleline(&mut self.corpus).desired_width(140.0),
            )
            .labelled_by(label.id);
            if clicked {
                let (model, transcoders, key) =
                    (model.clone(), circuit.transcoders.clone(), key.clone());
                self.job = Some(wb.spawn("replacement score", move |job| {
                    let first = transcoders
                        .first()
                        .ok_or_else(|| anyhow::anyhow!("a graph without transcoders"))?;
                    let settings = WindowSettings {
                        context_size: FIDELITY_CONTEXT.min(model.dims().context_length),
                        windows_per_forward: 8,
                        ..WindowSettings::default()
                    };
                    let mut source = ActivationSource::new(
                        &model,
                        Corpus::parse(&corpus, "text")?,
                        &first.site.input.to_string(),
                        settings,
                    )?;
                    let report =
                        score(&mut source, &transcoders, FIDELITY_WINDOWS, |done, all| {
                            job.set_progress(done as u64, all as u64, "windows")
                        })?;
                    Ok((key, report))
                }));
            }
            if let Some(job) = &self.job {
                job_row(ui, job);
            }
            if let Some((of, r)) = &self.report
                && *of == key
            {
                let layers: Vec<String> = r
                    .layers
                    .iter()
                    .map(|l| format!("layer {}: FVU {:.3}, L0 {:.1}", l.layer, l.fvu, l.l0))
                    .collect();
                ui.label(format!(
                    "over {} held-out tokens: CE loss recovered {:.3}, KL {:.3}, top-1 \
                     agreement {:.1}%",
                    r.tokens,
                    r.ce_loss_recovered,
                    r.kl_replaced,
                    100.0 * r.top1_agreement
                ))
                .on_hover_text(layers.join("\n"));
            }
        });
    }
}

/// Which transcoder layer's features, on which model version: a key for their top contexts.
type LayerKey = (PathBuf, u64, usize);

/// What the panel finds out about features beyond the graph: the selected one's logit effects,
/// and the top contexts of each layer's features in the world corpus (found in the background
/// the first time a feature of that layer is selected).
#[derive(Default)]
struct FeatureLooks {
    contexts: HashMap<LayerKey, Arc<Vec<Vec<Context>>>>,
    /// Layers whose contexts were asked for (a failed search is not retried).
    asked: std::collections::HashSet<LayerKey>,
    job: Option<Job<(LayerKey, Vec<Vec<Context>>)>>,
}

impl Default for Circuits {
    fn default() -> Self {
        Self {
            prompt: "The capital of Japan is".into(),
            transcoders: String::new(),
            bos: false,
            node_threshold: 0.8,
            edge_threshold: 0.98,
            reader: Reader::default(),
            last: Arc::default(),
            interventions: Interventions::default(),
            save: SaveForm::default(),
            selected: None,
            looks: FeatureLooks::default(),
            supernodes: Supernodes::default(),
            fidelity: Fidelity::default(),
        }
    }
}

impl Panel for Circuits {
    fn kind(&self) -> PanelKind {
        PanelKind::Circuits
    }

    fn busy(&self) -> bool {
        self.reader.busy()
            || running(&self.looks.job)
            || self.interventions.reader.busy()
            || running(&self.save.job)
            || running(&self.fidelity.job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        self.reader.poll(wb);
        if let Some((key, tops)) = take(&mut self.looks.job, wb) {
            self.looks.contexts.insert(key, Arc::new(tops));
        }
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        // Another model opened: nothing of the last one's graph carries over.
        if self
            .reader
            .asked_mut()
            .is_some_and(|q| q.model != wb.model_dir)
        {
            self.reader = Reader::default();
            self.interventions = Interventions::default();
            self.looks = FeatureLooks::default();
            self.selected = None;
        }
        // Transcoders just trained in the Train panel.
        let mut traced = false;
        wb.requests.retain(|r| match r {
            PanelRequest::Trace(dir) => {
                self.transcoders = dir.display().to_string();
                traced = true;
                false
            }
            _ => true,
        });
        let on_bundled = crate::cli::is_bundled_model(&wb.model_dir);
        let asked = self.form(ui, &model, on_bundled) || traced;
        let dir = self.transcoders_dir(wb);
        if let Some(dir) = &dir
            && (asked || self.reader.asked_mut().is_none())
        {
            self.reader.ask(self.query(&wb.model_dir, dir));
        }
        let (worker, memo, version) = (model.clone(), self.last.clone(), wb.model_version);
        self.reader
            .run_due(wb, "attribution graph", move |query, job| {
                trace(&worker, query, job, &memo, version)
            });
        if let Some(job) = self.reader.job() {
            ui.horizontal(|ui| job_row(ui, job));
        }
        if let Some(job) = &self.looks.job {
            ui.horizontal(|ui| job_row(ui, job));
        }
        if dir.is_none() {
            ui.label(
                "Name a folder of per-layer transcoders (one per MLP, each writing \
                 blocks.L.hook_mlp_out; the Train panel's \"MLP transcoder\" trains one) or a \
                 circuit-tracer transcoder folder (a set, or a cross-layer transcoder).",
            );
        }
        let Some(answer) = self.reader.answer() else {
            return;
        };
        let circuit = &answer.value;
        let selected = match self.selected {
            Some((serial, node)) if serial == circuit.serial => node,
            _ => {
                // A new graph opens on its most probable logit.
                let top = circuit.graph.index(Node::Logit(0));
                self.selected = Some((circuit.serial, top));
                top
            }
        };
        // The screenshot tour's demo: one step down from the logit, to its strongest feature.
        if wb.take_request(&PanelRequest::Start(PanelKind::Circuits))
            && let Some(&(feature, _)) = circuit
                .neighbours(selected, true)
                .iter()
                .find(|&&(n, _)| matches!(circuit.graph.node(n), Node::Feature(_)))
        {
            self.selected = Some((circuit.serial, feature));
        }
        ui.separator();
        summary(ui, circuit);
        let shown = (circuit, &answer.question, self.supernodes.groups.as_slice());
        self.save.ui(ui, wb, &model, shown);
        self.fidelity.ui(ui, wb, &model, circuit);
        // A long prompt scrolls sideways rather than crowding its tokens. Only then: a scroll
        // area sized by the view it sits in would resize itself from pass to pass.
        let needed = LABEL_WIDTH + circuit.graph.n_positions().max(1) as f32 * MIN_COLUMN_WIDTH;
        // (Groups of an earlier graph name nodes of that graph: none until they are reset.)
        let groups = match self.supernodes.serial == circuit.serial {
            true => self.supernodes.groups.as_slice(),
            false => &[],
        };
        let mut picked = if needed <= ui.available_width() {
            let width = ui.available_width();
            graph_view(ui, circuit, selected, width, groups)
        } else {
            egui::ScrollArea::horizontal()
                .id_salt("circuit graph")
                .stick_to_right(true)
                .show(ui, |ui| graph_view(ui, circuit, selected, needed, groups))
                .inner
        };
        ui.separator();
        let layer_key = |layer| {
            (
                answer.question.transcoders.clone(),
                answer.model_version,
                layer,
            )
        };
        // Left: the selected node and the interventions; right: its inputs and outputs.
        ui.columns(2, |columns| {
            let [left, right] = columns else {
                return;
            };
            about_node(
                left,
                wb,
                &model,
                circuit,
                selected,
                &mut self.looks,
                layer_key,
            );
            // The model was edited since: the graph is being traced again on the new weights.
            let stale = answer.model_version != wb.model_version;
            let shown = (circuit, selected, stale);
            let (from_group, ablate) = self.supernodes.ui(left, circuit, selected);
            picked = picked.or(from_group);
            if let Some(features) = ablate {
                self.interventions.ablate(circuit.serial, &features);
            }
            picked = picked.or(self.interventions.ui(left, wb, &model, shown));
            picked = picked.or(neighbours(right, circuit, selected));
        });
        if let Some(node) = picked {
            self.selected = Some((circuit.serial, node));
        }
    }
}

impl Circuits {
    /// The folder named, else the bundled transcoders with the bundled model.
    fn transcoders_dir(&self, wb: &Workbench) -> Option<PathBuf> {
        let typed = self.transcoders.trim();
        if !typed.is_empty() {
            return Some(PathBuf::from(typed));
        }
        let bundled = crate::cli::bundled_transcoders_dir();
        (crate::cli::is_bundled_model(&wb.model_dir) && bundled.is_dir()).then_some(bundled)
    }

    /// The prompt, transcoders and thresholds; whether a graph was asked for.
    fn form(&mut self, ui: &mut egui::Ui, model: &Model, on_bundled: bool) -> bool {
        let mut asked = prompt_row(ui, &mut self.prompt, "Trace");
        ui.horizontal(|ui| {
            let label = ui
                .label("Transcoders")
                .on_hover_text(explain::TRANSCODER_SET);
            let hint = match on_bundled {
                true => "the bundled transcoders (assets/transcoders/world-btk-skip)",
                false => "a folder of per-layer transcoders",
            };
            let field = ui
                .add(
                    egui::TextEdit::singleline(&mut self.transcoders)
                        .desired_width(360.0)
                        .hint_text(hint),
                )
                .labelled_by(label.id);
            asked |= crate::gui::widgets::entered(ui, &field);
            if ui.button("Browse…").clicked()
                && let Some(dir) = crate::gui::pick_folder("Transcoders")
            {
                self.transcoders = dir.display().to_string();
                asked = true;
            }
            let has_bos = model.bos_token_id.is_some();
            asked |= ui
                .add_enabled(has_bos, egui::Checkbox::new(&mut self.bos, "BOS first"))
                .on_hover_text(
                    "Put the model's BOS token before the prompt, as circuit-tracer does: the \
                     first position's features and errors are left out of the graph",
                )
                .changed();
            for (label, value, about) in [
                (
                    "Node threshold",
                    &mut self.node_threshold,
                    explain::NODE_THRESHOLD,
                ),
                (
                    "Edge threshold",
                    &mut self.edge_threshold,
                    explain::EDGE_THRESHOLD,
                ),
            ] {
                ui.label(label).on_hover_text(about);
                let field = ui
                    .add(egui::DragValue::new(value).range(0.0..=1.0).speed(0.01))
                    .on_hover_text(about);
                // A drag let go of, or a value typed in.
                asked |= field.drag_stopped() || field.lost_focus();
            }
        });
        asked
    }

    fn query(&self, model: &std::path::Path, transcoders: &std::path::Path) -> Query {
        Query {
            model: model.to_path_buf(),
            prompt: self.prompt.clone(),
            transcoders: transcoders.to_path_buf(),
            bos: self.bos,
            node_threshold: self.node_threshold,
            edge_threshold: self.edge_threshold,
        }
    }
}

/// The selected node: what it is, and for a feature its logit effects and top contexts.
fn about_node(
    ui: &mut egui::Ui,
    wb: &mut Workbench,
    model: &Arc<Model>,
    circuit: &Circuit,
    selected: usize,
    looks: &mut FeatureLooks,
    layer_key: impl Fn(usize) -> LayerKey,
) {
    let graph = &circuit.graph;
    ui.horizontal(|ui| {
        ui.strong(format!("Selected: {}", circuit.describe(selected)));
        match graph.node(selected) {
            Node::Feature(i) => {
                ui.label(format!("activation {:.3}", graph.features[i].activation));
            }
            Node::Logit(i) => {
                ui.label(format!("p {:.3}", graph.logits[i].probability));
            }
            Node::Error { .. } => {
                ui.label("(the MLP output its transcoder misses)")
                    .on_hover_text(explain::ERROR_NODE);
            }
            Node::Token { .. } => {}
        }
    });
    if let Node::Feature(i) = graph.node(selected) {
        if let Some(text) = circuit.effects.get(&selected) {
            ui.label(text.as_str())
                .on_hover_text(explain::FEATURE_LOGIT_EFFECTS);
        }
        feature_contexts(ui, wb, model, circuit, i, looks, layer_key);
    }
}

/// The selected node's strongest kept inputs and outputs as buttons; returns one clicked.
fn neighbours(ui: &mut egui::Ui, circuit: &Circuit, selected: usize) -> Option<usize> {
    let mut picked = None;
    ui.columns(2, |columns| {
        for (ui, inputs) in columns.iter_mut().zip([true, false]) {
            let list = circuit.neighbours(selected, inputs);
            ui.strong(match inputs {
                true => format!("Inputs ({} kept edges)", list.len()),
                false => format!("Outputs ({} kept edges)", list.len()),
            });
            egui::Grid::new(("circuit edges", inputs))
                .striped(true)
                .show(ui, |ui| {
                    for &(node, weight) in list.iter().take(LISTED) {
                        if ui.button(circuit.describe(node)).clicked() {
                            picked = Some(node);
                        }
                        ui.label(format!("{weight:+.3}"));
                        let promotes = circuit.promotes(node);
                        if !promotes.is_empty() {
                            ui.weak(format!("→ {promotes}"))
                                .on_hover_text(explain::FEATURE_LOGIT_EFFECTS);
                        }
                        ui.end_row();
                    }
                });
        }
    });
    picked
}

/// The feature's strongest contexts in the world corpus, searched for in the background for
/// every feature of its layer at once.
fn feature_contexts(
    ui: &mut egui::Ui,
    wb: &mut Workbench,
    model: &Arc<Model>,
    circuit: &Circuit,
    feature: usize,
    looks: &mut FeatureLooks,
    layer_key: impl Fn(usize) -> LayerKey,
) {
    let f = &circuit.graph.features[feature];
    let key = layer_key(f.layer);
    let Some(tops) = looks.contexts.get(&key) else {
        let transcoder = circuit
            .transcoders
            .iter()
            .find(|t| t.site.output == HookPoint::MlpOut(f.layer));
        if looks.job.is_none() && looks.asked.contains(&key) {
            ui.weak("top contexts unavailable (the search failed or was cancelled)");
        }
        if let Some(transcoder) = transcoder
            && looks.job.is_none()
            && looks.asked.insert(key.clone())
        {
            let (model, sae, hook) = (model.clone(), transcoder.sae.clone(), transcoder.site.input);
            let layer = f.layer;
            looks.job = Some(wb.spawn("top contexts", move |job| {
                job.set_message(format!("layer {layer}'s features, {CONTEXT_TOKENS} tokens"));
                let corpus = Corpus::parse("world", "text")?;
                let tops = top_contexts(
                    &model,
                    &sae,
                    hook,
                    &corpus,
                    CONTEXT_TOKENS,
                    CONTEXTS,
                    job.cancel_flag(),
                )?
                .ok_or_else(|| anyhow::anyhow!("cancelled"))?;
                Ok((key, tops))
            }));
        }
        return;
    };
    let contexts = tops.get(f.feature as usize).map_or(&[][..], Vec::as_slice);
    if contexts.is_empty() {
        ui.label(format!(
            "Fires nowhere in the world corpus's first {CONTEXT_TOKENS} tokens"
        ));
    }
    for c in contexts {
        ui.horizontal(|ui| {
            ui.label(egui::RichText::new(format!("{:.2}", c.activation)).monospace())
                .on_hover_text("one of the contexts of the world corpus that fire it most");
            let tokens = model.tokenizer.tokens_display(&c.token_ids);
            token_chips(
                ui,
                &tokens,
                Some(&c.token_activations),
                c.activation.abs().max(1e-6),
                Some(c.peak as usize),
            );
        });
    }
}

/// Serials for graphs (a selection names the graph it was made in).
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// Loads the transcoders, computes and prunes the graph, and lays it out (in the background).
fn trace(
    model: &Model,
    query: &Query,
    job: &JobHandle,
    memo: &Mutex<Option<Traced>>,
    model_version: u64,
) -> anyhow::Result<Circuit> {
    let started = std::time::Instant::now();
    let key = (query.clone().without_thresholds(), model_version);
    let remembered = memo
        .lock()
        .ok()
        .and_then(|m| m.as_ref().filter(|t| t.key == key).cloned());
    let traced = match remembered {
        // Only the thresholds changed: prune the same graph again.
        Some(traced) => traced,
        None => {
            let traced = attribute_anew(model, query, job, key)?;
            if let Ok(mut m) = memo.lock() {
                *m = Some(traced.clone());
            }
            traced
        }
    };
    let Traced {
        graph,
        transcoders,
        dirs,
        ..
    } = traced;
    job.set_message("pruning");
    let pruned = graph.prune(query.node_threshold, query.edge_threshold)?;
    let (nodes, place) = layout(&graph, &pruned.nodes);
    let n = graph.n_nodes();
    let mut edges: Vec<(usize, usize, f32)> = pruned
        .edges
        .iter()
        .enumerate()
        .filter(|&(_, &kept)| kept)
        .filter_map(|(e, _)| {
            let (t, s) = (e / n, e % n);
            Some((*place.get(&t)?, *place.get(&s)?, graph.adjacency[e]))
        })
        .collect();
    edges.sort_by(|a, b| b.2.abs().total_cmp(&a.2.abs()));
    job.set_message("labelling features");
    let (promotes, effects) = promoted_tokens(model, &transcoders, &graph, &nodes)?;
    Ok(Circuit {
        serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        scores: pruned.scores,
        nodes,
        edges,
        place,
        transcoders,
        promotes,
        effects,
        pruned: Arc::new(pruned),
        transcoder_dirs: dirs,
        seconds: started.elapsed().as_secs_f64(),
        graph,
    })
}

/// A graph as traced, before pruning, with what it was traced for.
#[derive(Clone)]
struct Traced {
    /// The query less its thresholds, and the model version.
    key: (Query, u64),
    graph: Arc<AttributionGraph>,
    transcoders: Arc<Vec<LayerTranscoder>>,
    dirs: Vec<PathBuf>,
}

/// Loads the transcoders and computes the query's graph.
fn attribute_anew(
    model: &Model,
    query: &Query,
    job: &JobHandle,
    key: (Query, u64),
) -> anyhow::Result<Traced> {
    job.set_message("loading transcoders");
    let dirs = transcoder_dirs(std::slice::from_ref(&query.transcoders))?;
    let transcoders = load_each(&dirs, model)?;
    let mut ids = model.encode_prompt(&query.prompt)?;
    if query.bos
        && let Some(bos) = model.bos_token_id
    {
        ids.insert(0, bos);
        model.check_length(ids.len())?;
    }
    job.set_message("");
    let graph = attribute(
        model,
        &transcoders,
        &ids,
        &GraphSettings::default(),
        job.cancel_flag(),
        &mut |done, total| job.set_progress(done as u64, total as u64, "targets"),
    )?
    .ok_or_else(|| anyhow::anyhow!("cancelled"))?;
    Ok(Traced {
        key,
        graph: Arc::new(graph),
        transcoders: Arc::new(transcoders),
        dirs,
    })
}

/// Each kept feature's direct-path logit effects, by graph index: its three most promoted
/// tokens (a label), and its five most promoted and suppressed as a line (one product per
/// layer for all its kept features; here, in the background, because the unembedding is big).
/// A cross-layer feature's is that of everything it writes.
fn promoted_tokens(
    model: &Model,
    transcoders: &[LayerTranscoder],
    graph: &AttributionGraph,
    nodes: &[ShownNode],
) -> anyhow::Result<(HashMap<usize, String>, HashMap<usize, String>)> {
    let mut by_layer: std::collections::BTreeMap<usize, Vec<(usize, u32)>> = Default::default();
    for n in nodes {
        if let Node::Feature(i) = graph.node(n.index) {
            let f = &graph.features[i];
            by_layer
                .entry(f.layer)
                .or_default()
                .push((n.index, f.feature));
        }
    }
    let names = model.token_names();
    let (mut labels, mut lines) = (HashMap::new(), HashMap::new());
    let list = |tokens: &[crate::features::logits::TokenEffect], n: usize| {
        let shown: Vec<String> = tokens
            .iter()
            .take(n)
            .map(|t| display_token(&t.token))
            .collect();
        shown.join(" ")
    };
    for (layer, kept) in by_layer {
        let Some(t) = transcoders
            .iter()
            .find(|t| t.site.output == HookPoint::MlpOut(layer))
        else {
            continue;
        };
        let ids: Vec<u32> = kept.iter().map(|&(_, f)| f).collect();
        let rows = t.total_decoder_rows(&ids)?;
        let Some(effects) = logit_effects(model, HookPoint::MlpOut(layer), &rows, 5, &names)?
        else {
            continue;
        };
        for ((index, _), e) in kept.iter().zip(effects) {
            labels.insert(*index, list(&e.top, 3));
            let line = format!(
                "promotes: {}   suppresses: {}",
                list(&e.top, 5),
                list(&e.bottom, 5)
            );
            lines.insert(*index, line);
        }
    }
    Ok((labels, lines))
}

/// Where each kept node is drawn: tokens at the bottom, a layer's features then its error node
/// above their token, the logits along the top over the last tokens.
fn layout(graph: &AttributionGraph, kept: &[bool]) -> (Vec<ShownNode>, HashMap<usize, usize>) {
    let top_row = graph.n_layers + 1;
    let mut cells: std::collections::BTreeMap<(usize, usize), Vec<usize>> = Default::default();
    for index in (0..graph.n_nodes()).filter(|&i| kept[i]) {
        let cell = match graph.node(index) {
            Node::Feature(i) => (1 + graph.features[i].layer, graph.features[i].position),
            Node::Error { layer, position } => (1 + layer, position),
            Node::Token { position } => (0, position),
            Node::Logit(_) => (top_row, 0),
        };
        cells.entry(cell).or_default().push(index);
    }
    let mut nodes = Vec::new();
    for ((row, column), members) in cells {
        let slots = members.len();
        for (slot, index) in members.into_iter().enumerate() {
            let label = match graph.node(index) {
                Node::Logit(i) => display_token(&graph.logits[i].token),
                Node::Token { position } => display_token(&graph.tokens[position]),
                _ => String::new(),
            };
            nodes.push(ShownNode {
                index,
                column,
                row,
                slot,
                slots,
                label,
            });
        }
    }
    let place = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.index, i))
        .collect();
    (nodes, place)
}

/// Nodes, scores and timing in one line.
fn summary(ui: &mut egui::Ui, circuit: &Circuit) {
    let graph = &circuit.graph;
    ui.horizontal_wrapped(|ui| {
        let nodes = match graph.features.len() < graph.active_features.len() {
            true => format!(" ({} of them nodes)", graph.features.len()),
            false => String::new(),
        };
        ui.label(format!(
            "{} active features{nodes} over {} tokens; kept {} of {} nodes and {} edges",
            graph.active_features.len(),
            graph.n_positions(),
            circuit.nodes.len(),
            graph.n_nodes(),
            circuit.edges.len()
        ))
        // The time stays off the panel, so that it looks the same from run to run.
        .on_hover_text(format!("traced and pruned in {:.1} s", circuit.seconds));
        ui.label(format!(
            "replacement score {:.3}",
            circuit.scores.replacement
        ))
        .on_hover_text(explain::REPLACEMENT_SCORE);
        ui.label(format!("completeness {:.3}", circuit.scores.completeness))
            .on_hover_text(explain::COMPLETENESS_SCORE);
        ui.label("· red: excites, blue: inhibits")
            .on_hover_text(explain::ATTRIBUTION_EDGE);
    });
}

/// Draws the graph `width` points wide, with the supernode `groups` over it; returns a clicked
/// node (a graph index).
fn graph_view(
    ui: &mut egui::Ui,
    circuit: &Circuit,
    selected: usize,
    width: f32,
    groups: &[Supernode],
) -> Option<usize> {
    let graph = &circuit.graph;
    let rows = graph.n_layers + 2;
    let columns = graph.n_positions().max(1) as f32;
    let size = vec2(width, rows as f32 * ROW_HEIGHT + 16.0);
    let (response, painter) = ui.allocate_painter(size, Sense::click());
    let area = Rect::from_min_max(
        response.rect.min + vec2(LABEL_WIDTH, 0.0),
        response.rect.max - vec2(0.0, 16.0),
    );
    let column_width = area.width() / columns;
    let visuals = ui.visuals().clone();
    let dark = visuals.dark_mode;
    let text = visuals.text_color();
    let font = egui::FontId::proportional(11.0);
    let position = |n: &ShownNode| -> Pos2 {
        let y = area.bottom() - (n.row as f32 + 0.5) * ROW_HEIGHT;
        // The logits spread over the last few columns, above the token they follow.
        let logit_span = graph.n_positions().clamp(1, LOGIT_COLUMNS) as f32 * column_width;
        let (left, width) = match n.row == graph.n_layers + 1 {
            true => (area.right() - logit_span, logit_span),
            false => (area.left() + n.column as f32 * column_width, column_width),
        };
        // A crowded cell wraps onto up to CELL_LINES lines.
        let fits = ((width / NODE_SPACING) as usize).max(1);
        let lines = n.slots.div_ceil(fits).clamp(1, CELL_LINES);
        let per_line = n.slots.div_ceil(lines);
        let (line, slot) = (n.slot / per_line, n.slot % per_line);
        let in_line = per_line.min(n.slots - line * per_line);
        let line_gap = ROW_HEIGHT / (CELL_LINES as f32 + 1.0);
        pos2(
            left + width * (slot as f32 + 1.0) / (in_line as f32 + 1.0),
            y + (line as f32 - (lines as f32 - 1.0) / 2.0) * line_gap,
        )
    };
    let points: Vec<Pos2> = circuit.nodes.iter().map(position).collect();
    // Row labels and column tokens.
    for row in 0..rows {
        let label = match row {
            0 => "tokens".to_string(),
            r if r == rows - 1 => "logits".to_string(),
            r => format!("L{}", r - 1),
        };
        painter.text(
            pos2(
                response.rect.left() + 4.0,
                area.bottom() - (row as f32 + 0.5) * ROW_HEIGHT,
            ),
            egui::Align2::LEFT_CENTER,
            label,
            font.clone(),
            visuals.weak_text_color(),
        );
    }
    for (p, token) in graph.tokens.iter().enumerate() {
        painter.text(
            pos2(
                area.left() + (p as f32 + 0.5) * column_width,
                area.bottom() + 2.0,
            ),
            egui::Align2::CENTER_TOP,
            display_token(token),
            font.clone(),
            text,
        );
    }
    // Edges: the strongest faintly, the selected node's strongest on top.
    let chosen = circuit.place.get(&selected).copied();
    let largest = circuit.edges.first().map_or(1.0, |e| e.2.abs().max(1e-12));
    let stroke_of = |w: f32, alpha: f32| {
        let t = w / largest;
        let width = 0.5 + 2.5 * t.abs().sqrt();
        let colour = diverging_colour(t.signum() * (0.35 + 0.65 * t.abs().sqrt()), dark);
        Stroke::new(width, colour.gamma_multiply(alpha))
    };
    for &(t, s, w) in circuit.edges.iter().take(DRAWN_EDGES) {
        painter.line_segment([points[s], points[t]], stroke_of(w, 0.3));
    }
    let into = circuit.edges.iter().filter(|e| Some(e.0) == chosen);
    let out_of = circuit.edges.iter().filter(|e| Some(e.1) == chosen);
    for &(t, s, w) in into.take(SELECTED_EDGES).chain(out_of.take(SELECTED_EDGES)) {
        painter.line_segment([points[s], points[t]], stroke_of(w, 1.0));
    }
    // Nodes.
    let hovered = response
        .hover_pos()
        .and_then(|pointer| nearest(&points, pointer));
    for (i, (n, &at)) in circuit.nodes.iter().zip(&points).enumerate() {
        let fill = match graph.node(n.index) {
            Node::Feature(_) => text,
            Node::Error { .. } => visuals.weak_text_color(),
            Node::Token { .. } | Node::Logit(_) => Color32::from_rgb(90, 180, 110),
        };
        let radius = if Some(i) == chosen || Some(i) == hovered {
            6.0
        } else {
            3.5
        };
        match graph.node(n.index) {
            Node::Error { .. } => {
                painter.rect_filled(
                    Rect::from_center_size(at, vec2(2.0, 2.0) * radius),
                    0.0,
                    fill,
                );
            }
            _ => {
                painter.circle_filled(at, radius, fill);
            }
        }
        if Some(i) == chosen {
            painter.circle_stroke(
                at,
                radius + 3.0,
                Stroke::new(2.0, visuals.selection.stroke.color),
            );
        }
        if matches!(graph.node(n.index), Node::Logit(_)) {
            painter.text(
                at - vec2(0.0, radius + 2.0),
                egui::Align2::CENTER_BOTTOM,
                &n.label,
                font.clone(),
                text,
            );
        }
    }
    draw_supernodes(&painter, circuit, groups, &points, dark);
    let hovered = hovered.map(|i| circuit.nodes[i].index);
    if let Some(node) = hovered {
        response
            .clone()
            .on_hover_text_at_pointer(hover_text(circuit, node));
    }
    response.clicked().then_some(hovered).flatten()
}

/// Colours of supernodes, in the order the groups were made.
const GROUP_COLOURS: [Color32; 6] = [
    Color32::from_rgb(230, 160, 40),
    Color32::from_rgb(80, 170, 230),
    Color32::from_rgb(200, 90, 200),
    Color32::from_rgb(120, 200, 90),
    Color32::from_rgb(230, 90, 90),
    Color32::from_rgb(150, 150, 230),
];

/// A supernode as drawn: its shown members' places and their centre.
struct GroupPlace {
    members: Vec<Pos2>,
    centre: Pos2,
}

/// Where a group's name is drawn: above its members' centre (below it at the top of the
/// view, `top`), so that a group of one node does not hide it.
fn label_at(place: &GroupPlace, top: f32) -> Pos2 {
    let above = place.centre - vec2(0.0, 18.0);
    if above.y < top + 10.0 {
        place.centre + vec2(0.0, 18.0)
    } else {
        above
    }
}

/// Where each group's shown members are, and their centre (`None`: none of them is shown).
fn group_places(
    circuit: &Circuit,
    groups: &[Supernode],
    points: &[Pos2],
) -> Vec<Option<GroupPlace>> {
    groups
        .iter()
        .map(|g| {
            let members: Vec<Pos2> = (g.nodes.iter())
                .filter_map(|n| circuit.place.get(n).map(|&i| points[i]))
                .collect();
            let n = members.len() as f32;
            let sum = members
                .iter()
                .fold(vec2(0.0, 0.0), |acc, p| acc + p.to_vec2());
            (!members.is_empty()).then(|| GroupPlace {
                centre: (sum / n).to_pos2(),
                members,
            })
        })
        .collect()
}

/// Supernodes drawn merged over the graph, as Neuronpedia's graph view shows them: each
/// group's members ringed in its colour and joined to its name at their centre, and each
/// group's summed direct effect on every other group as an arrow between the names (red
/// raises, blue lowers; width by size).
fn draw_supernodes(
    painter: &egui::Painter,
    circuit: &Circuit,
    groups: &[Supernode],
    points: &[Pos2],
    dark: bool,
) {
    let places = group_places(circuit, groups, points);
    let top = painter.clip_rect().top();
    let graph = &circuit.graph;
    let links: Vec<(usize, usize, f32)> = (0..groups.len())
        .flat_map(|a| (0..groups.len()).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (a, b, graph.group_effect(&groups[b].nodes, &groups[a].nodes)))
        .filter(|&(_, _, w)| w != 0.0)
        .collect();
    let largest = links.iter().map(|l| l.2.abs()).fold(1e-12, f32::max);
    for &(a, b, w) in &links {
        let (Some(from), Some(to)) = (&places[a], &places[b]) else {
            continue;
        };
        let t = w / largest;
        let colour = diverging_colour(t.signum() * (0.4 + 0.6 * t.abs().sqrt()), dark);
        let stroke = Stroke::new(1.5 + 3.5 * t.abs().sqrt(), colour);
        // From label to label, stopping short of the target's, with a head of fixed size.
        let (start, end) = (label_at(from, top), label_at(to, top));
        let along = end - start;
        let length = along.length();
        if length < 30.0 {
            continue;
        }
        let dir = along / length;
        let tip = start + dir * (length - 18.0);
        painter.line_segment([start, tip], stroke);
        let rot = egui::emath::Rot2::from_angle(0.45);
        for side in [rot * -dir, rot.inverse() * -dir] {
            painter.line_segment([tip, tip + side * 11.0], stroke);
        }
    }
    let font = egui::FontId::proportional(13.0);
    for (k, (group, place)) in groups.iter().zip(&places).enumerate() {
        let Some(place) = place else { continue };
        let colour = GROUP_COLOURS[k % GROUP_COLOURS.len()];
        for &at in &place.members {
            let stroke = Stroke::new(1.0, colour.gamma_multiply(0.6));
            painter.line_segment([at, label_at(place, top)], stroke);
            painter.circle_stroke(at, 7.0, Stroke::new(2.0, colour));
        }
        let galley = painter.layout_no_wrap(group.label.clone(), font.clone(), Color32::BLACK);
        let rect = Rect::from_center_size(label_at(place, top), galley.size() + vec2(10.0, 6.0));
        painter.rect_filled(rect, 4.0, colour);
        painter.galley(rect.min + vec2(5.0, 3.0), galley, Color32::BLACK);
    }
}

/// The node nearest `pointer` within [`PICK_RADIUS`].
fn nearest(points: &[Pos2], pointer: Pos2) -> Option<usize> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.distance(pointer)))
        .filter(|&(_, d)| d <= PICK_RADIUS)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

fn hover_text(circuit: &Circuit, node: usize) -> String {
    let graph = &circuit.graph;
    let mut text = circuit.describe(node);
    match graph.node(node) {
        Node::Feature(i) => {
            text += &format!(
                "\nactivation {:.3}\npromotes {}",
                graph.features[i].activation,
                circuit.promotes(node)
            );
        }
        Node::Logit(i) => text += &format!("\np {:.3}", graph.logits[i].probability),
        _ => {}
    }
    let (inputs, outputs) = (
        circuit.neighbours(node, true),
        circuit.neighbours(node, false),
    );
    text += &format!(
        "\n{} inputs, {} outputs kept · click to select",
        inputs.len(),
        outputs.len()
    );
    text
}
