//! `monoscope attribute` end to end on a fixture model with transcoders saved in SAELens's
//! format: the graph file is circuit-tracer's schema, its links are the library's edges, and
//! bad transcoders and thresholds are refused by name. (The graph's exactness is checked in
//! `src/attribution_graph`'s unit tests.)

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, monoscope_json};
use monoscope::Model;
use monoscope::attribution_graph::{
    AttributionGraph, GraphSettings, LaterDecoders, LayerTranscoder, Node,
};
use monoscope::sae::saelens::{SaeDir, SaeMetadata, save};
use monoscope::sae::{Architecture, Sae, SaeSite};

const PROMPT: &str = "The capital of Japan is Tokyo.";

/// Uniform values in ±`scale`, `[rows, cols]`, from a seeded generator (tests repeat).
fn uniform(rows: usize, cols: usize, scale: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
}

/// A random JumpReLU skip transcoder for `layer`'s MLP, saved under `dir/layer_L`.
fn save_transcoder(model: &Model, dir: &Path, layer: usize) -> LayerTranscoder {
    let d = model.dims().d_model;
    let d_sae = 32;
    let cpu = Device::Cpu;
    let seed = 10 * layer as u64;
    let vector =
        |n: usize, scale: f32, salt: u64| uniform(1, n, scale, seed + salt).squeeze(0).unwrap();
    let sae = Sae {
        architecture: Architecture::JumpRelu,
        w_enc: uniform(d, d_sae, 0.8, seed + 1),
        w_dec: uniform(d_sae, d, 0.5, seed + 2),
        b_enc: vector(d_sae, 0.2, 3),
        b_dec: vector(d, 0.2, 4),
        threshold: Some(Tensor::full(0.4f32, d_sae, &cpu).unwrap()),
        apply_b_dec_to_input: false,
        transcoder: true,
        w_skip: Some(uniform(d, d, 0.15, seed + 5)),
    };
    let site = SaeSite {
        input: format!("blocks.{layer}.mlp.hook_in").parse().unwrap(),
        output: format!("blocks.{layer}.hook_mlp_out").parse().unwrap(),
    };
    let saved = SaeDir {
        sae: sae.clone(),
        metadata: SaeMetadata {
            hook_name: site.input.to_string(),
            hook_name_out: site.output.to_string(),
            ..Default::default()
        },
        sparsity: None,
    };
    save(&dir.join(format!("layer_{layer}")), &saved, false).unwrap();
    LayerTranscoder {
        sae,
        site,
        later: LaterDecoders::None,
    }
}

/// The library's graph of `ids` with the default settings.
fn graph_of(model: &Model, transcoders: &[LayerTranscoder], ids: &[u32]) -> AttributionGraph {
    common::attribution_graph(model, transcoders, ids, &GraphSettings::default())
}

fn attribute_command(model: &Path, transcoders: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_monoscope"));
    c.args([
        "attribute",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
    ])
    .args(["--transcoders", transcoders.to_str().unwrap()])
    .args(["--out", out.to_str().unwrap()])
    .args(extra);
    c
}

/// The file holds every token and logit node, links only between its nodes, and each link's
/// weight is the library's edge between those nodes; at thresholds of 1 every edge is a link.
#[test]
fn the_graph_file_is_circuit_tracers_schema_with_the_librarys_edges() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = fixture_dir("gpt2");
    let model = Model::load(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let set = tmp.path().join("transcoders");
    let transcoders: Vec<LayerTranscoder> =
        (0..2).map(|l| save_transcoder(&model, &set, l)).collect();
    let out = tmp.path().join("graph.json");
    // `attribute` keeping every node and edge, with `extra` arguments.
    let unpruned = |extra: &[&str]| {
        let mut args = vec![
            "attribute",
            "--model",
            model_dir.to_str().unwrap(),
            "--prompt",
            PROMPT,
            "--transcoders",
            set.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--node-threshold",
            "1",
            "--edge-threshold",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        monoscope_json(&args)
    };
    let summary = unpruned(&[]);
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let ids = model.encode_prompt(PROMPT).unwrap();
    let graph = graph_of(&model, &transcoders, &ids);
    assert_eq!(summary["active_features"], graph.features.len());
    assert_eq!(file["metadata"]["slug"], "graph");
    assert_eq!(file["metadata"]["prompt"], PROMPT);
    assert_eq!(
        file["metadata"]["prompt_tokens"].as_array().unwrap().len(),
        ids.len()
    );
    for key in ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"] {
        assert!(file["qParams"].get(key).is_some(), "qParams.{key}");
    }

    // Node ids as circuit-tracer spells them, mapped to the library's nodes. (Its error ids
    // `0_L_P` can coincide with a layer-0 feature's `0_F_P`; links name ids only, so a kind is
    // told by the node list.)
    let mut by_id: HashMap<(String, &str), usize> = HashMap::new();
    for i in 0..graph.n_nodes() {
        let key = match graph.node(i) {
            Node::Feature(f) => {
                let f = &graph.features[f];
                (
                    format!("{}_{}_{}", f.layer, f.feature, f.position),
                    "cross layer transcoder",
                )
            }
            Node::Error { layer, position } => {
                (format!("0_{layer}_{position}"), "mlp reconstruction error")
            }
            Node::Token { position } => (format!("E_{}_{position}", ids[position]), "embedding"),
            Node::Logit(l) => (
                format!(
                    "{}_{}_{}",
                    graph.n_layers + 1,
                    graph.logits[l].token_id,
                    ids.len() - 1
                ),
                "logit",
            ),
        };
        by_id.insert(key, i);
    }
    let nodes = file["nodes"].as_array().unwrap();
    let kinds = |kind: &str| nodes.iter().filter(|n| n["feature_type"] == kind).count();
    assert_eq!(kinds("embedding"), ids.len());
    assert_eq!(kinds("logit"), graph.logits.len());
    assert!(kinds("cross layer transcoder") > 0 && kinds("mlp reconstruction error") > 0);
    let mut listed: HashMap<&str, Vec<usize>> = HashMap::new();
    for n in nodes {
        let id = n["node_id"].as_str().unwrap();
        let kind = n["feature_type"].as_str().unwrap();
        let index = by_id
            .get(&(id.to_string(), kind))
            .unwrap_or_else(|| panic!("{id} ({kind}) is no node of the graph"));
        listed.entry(id).or_default().push(*index);
        assert!(n["jsNodeId"].is_string());
    }
    let links = file["links"].as_array().unwrap();
    for link in links {
        let (s, t) = (
            link["source"].as_str().unwrap(),
            link["target"].as_str().unwrap(),
        );
        let got = link["weight"].as_f64().unwrap() as f32;
        let close = |want: f32| (got - want).abs() <= 1e-4 * want.abs().max(1e-3);
        let matches = listed[t]
            .iter()
            .any(|&ti| listed[s].iter().any(|&si| close(graph.edge(ti, si))));
        assert!(matches, "{link}: no such edge in the library's graph");
    }
    // At thresholds of 1 every direct input of a logit is linked to it. (Nodes that cannot
    // reach the logits — a last-layer feature before the last position — have no influence
    // and go, with their edges, at any threshold.)
    let linked: std::collections::HashSet<(&str, &str)> = links
        .iter()
        .map(|l| (l["source"].as_str().unwrap(), l["target"].as_str().unwrap()))
        .collect();
    let id_of = |i: usize| {
        by_id
            .iter()
            .find(|(_, j)| **j == i)
            .map(|((id, _), _)| id.clone())
            .unwrap()
    };
    let mut direct = 0;
    for l in 0..graph.logits.len() {
        let t = graph.index(Node::Logit(l));
        for s in 0..t {
            if graph.edge(t, s) != 0.0 {
                direct += 1;
                let (si, ti) = (id_of(s), id_of(t));
                assert!(linked.contains(&(si.as_str(), ti.as_str())), "{si} → {ti}");
            }
        }
    }
    assert!(direct > 10, "{direct}");

    // Default thresholds keep fewer, and an existing file is kept unless --force.
    let pruned = attribute_command(&model_dir, &set, &out, &["--json"])
        .output()
        .unwrap();
    assert!(!pruned.status.success());
    assert!(String::from_utf8_lossy(&pruned.stderr).contains("--force"));
    let pruned = attribute_command(&model_dir, &set, &out, &["--force", "--json"])
        .output()
        .unwrap();
    assert!(
        pruned.status.success(),
        "{}",
        String::from_utf8_lossy(&pruned.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&pruned.stdout).unwrap();
    // circuit-tracer's viewer lists the folder's graphs from its index: one entry per slug.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("graph-metadata.json")).unwrap())
            .unwrap();
    let graphs = index["graphs"].as_array().unwrap();
    assert_eq!(graphs.len(), 1, "{index}");
    assert_eq!(graphs[0]["slug"], "graph");
    assert_eq!(graphs[0]["prompt"], PROMPT);
    assert!(summary["kept_links"].as_u64().unwrap() < links.len() as u64);
    let replacement = summary["replacement_score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&replacement), "{summary}");

    // Supernodes go into qParams as Neuronpedia reads them: [label, node id, …].
    let (a, b) = (&graph.features[0], &graph.features[1]);
    let group = format!(
        "a pair={}:{}:{},{}:{}:{}",
        a.layer, a.position, a.feature, b.layer, b.position, b.feature
    );
    unpruned(&["--force", "--supernode", &group]);
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(
        file["qParams"]["supernodes"],
        serde_json::json!([[
            "a pair",
            id_of(graph.index(Node::Feature(0))),
            id_of(graph.index(Node::Feature(1)))
        ]])
    );
    let bad = attribute_command(
        &model_dir,
        &set,
        &out,
        &["--force", "--supernode", "x=1:0:999999"],
    )
    .output()
    .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--supernode 1:0:999999"), "{err}");
}

/// On the bundled model `attribute` needs no --transcoders: it traces through the bundled set,
/// one transcoder per layer, and explains the model's own most likely next token.
#[test]
fn the_bundled_model_is_traced_through_its_bundled_transcoders() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("japan.json");
    let prompt = "The capital of Japan is";
    let summary = common::monoscope_json(&[
        "attribute",
        "--prompt",
        prompt,
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let model = Model::load(
        &monoscope::cli::bundled_model_dir(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    let top = monoscope::model::generate::next_token_top_k(
        &model,
        &ids,
        1,
        &monoscope::model::Hooks::new(),
    )
    .unwrap();
    assert_eq!(summary["logits"][0]["token_id"], top[0].id, "{summary}");
    // Every active feature is a node (no limit reached), and some survive pruning.
    let features = summary["feature_nodes"].as_u64().unwrap();
    assert!(features > 0, "{summary}");
    assert_eq!(summary["active_features"], features, "{summary}");
    let kept = summary["kept_nodes"].as_u64().unwrap();
    let floor = (summary["tokens"].as_array().unwrap().len()
        + summary["logits"].as_array().unwrap().len()) as u64;
    assert!(kept > floor, "no feature or error node kept: {summary}");
    // The bundled model named by another path (a link to it) still needs no --transcoders.
    let link = tmp.path().join("world");
    std::os::unix::fs::symlink(monoscope::cli::bundled_model_dir(), &link).unwrap();
    let linked = common::monoscope_json(&[
        "attribute",
        "--model",
        link.to_str().unwrap(),
        "--prompt",
        prompt,
        "--out",
        tmp.path().join("linked.json").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(linked["feature_nodes"], features, "{linked}");
    // --intervene: the logit's strongest feature input ablated, as the library's intervention;
    // a feature that is not a node is refused by name.
    let transcoders = monoscope::attribution_graph::load_transcoders(
        &[monoscope::cli::bundled_transcoders_dir()],
        &model,
    )
    .unwrap();
    let graph = graph_of(&model, &transcoders, &ids);
    let top = graph.index(Node::Logit(0));
    let (source, _) = graph
        .strongest_inputs(top)
        .into_iter()
        .find(|&(s, _)| matches!(graph.node(s), Node::Feature(_)))
        .unwrap();
    let Node::Feature(i) = graph.node(source) else {
        unreachable!()
    };
    let f = &graph.features[i];
    let change = format!("{}:{}:{}=0", f.layer, f.position, f.feature);
    let out2 = tmp.path().join("ablated.json");
    let ablated = common::monoscope_json(&[
        "attribute",
        "--prompt",
        prompt,
        "--out",
        out2.to_str().unwrap(),
        "--json",
        "--intervene",
        &change,
    ]);
    let expected = monoscope::attribution_graph::intervene::intervene(
        &model,
        &transcoders,
        &graph,
        &[monoscope::attribution_graph::intervene::FeatureChange {
            feature: i,
            value: 0.0,
        }],
        5,
    )
    .unwrap();
    let after: Vec<f64> = ablated["intervention"]["after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(after.len(), expected.after.len());
    for (a, e) in after.iter().zip(&expected.after) {
        assert!((a - f64::from(*e)).abs() < 1e-5, "{a} {e}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(["attribute", "--prompt", prompt, "--intervene", "0:0:0=1"])
        .args(["--out", tmp.path().join("not.json").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--intervene 0:0:0"),
        "{err}"
    );
    assert!(!tmp.path().join("not.json").exists());
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let list = file["metadata"]["transcoder_list"].as_array().unwrap();
    let layers: Vec<String> = (0..model.dims().n_layers)
        .map(|l| format!("layer_{l}"))
        .collect();
    assert_eq!(list.len(), layers.len(), "{list:?}");
    for (dir, layer) in list.iter().zip(&layers) {
        assert!(dir.as_str().unwrap().ends_with(layer.as_str()), "{dir}");
    }
}

/// An SAE that does not write an MLP's output, two transcoders for one layer, a folder with
/// none and a threshold out of range are refused by name, and nothing is written.
#[test]
fn bad_transcoders_and_thresholds_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = fixture_dir("gpt2");
    let model = Model::load(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let out = tmp.path().join("graph.json");
    let refused = |transcoders: &[&Path], extra: &[&str]| -> String {
        let mut c = attribute_command(&model_dir, transcoders[0], &out, extra);
        for t in &transcoders[1..] {
            c.args(["--transcoders", t.to_str().unwrap()]);
        }
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{transcoders:?} {extra:?}");
        assert!(!out.exists(), "nothing is written");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // An attention-output SAE (sparsify's `h.1.attn`) writes no MLP output.
    let attn = fixture_dir("gpt2").join("../../sparsify/gpt2/h.1.attn");
    let err = refused(&[&attn], &[]);
    assert!(err.contains("hook_mlp_out"), "{err}");
    let set = tmp.path().join("set");
    save_transcoder(&model, &set, 1);
    let err = refused(&[&set, &set.join("layer_1")], &[]);
    assert!(err.contains("layer 1"), "{err}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = refused(&[&empty], &[]);
    assert!(err.contains("no transcoder folders"), "{err}");
    // A graph file's name ends in .json (the viewer looks for SLUG.json).
    let txt = tmp.path().join("graph.txt");
    let o = attribute_command(&model_dir, &set, &txt, &[])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(".json"), "{err}");
    assert!(!txt.exists());
    // Without --transcoders only the bundled model has a default set.
    let o = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(["attribute", "--model", model_dir.to_str().unwrap()])
        .args(["--prompt", PROMPT, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--transcoders"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
    let err = refused(&[&set], &["--node-threshold", "1.5"]);
    assert!(err.contains("--node-threshold"), "{err}");
    // A graph index that is not one is named, and kept.
    let index = tmp.path().join("graph-metadata.json");
    std::fs::write(&index, "not json").unwrap();
    let err = refused(&[&set], &[]);
    assert!(err.contains("graph-metadata.json"), "{err}");
    assert_eq!(std::fs::read_to_string(&index).unwrap(), "not json");
}

/// The GPT-2 fixture, the transcoders `scripts/circuit_tracer_fixtures.py` gave circuit-tracer
/// (one per layer) and its graphs.
fn circuit_tracer_fixture() -> (Model, Vec<LayerTranscoder>, HashMap<String, Tensor>) {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let root = circuit_tracer_dir();
    let transcoders: Vec<LayerTranscoder> = (0..model.dims().n_layers)
        .map(|l| LayerTranscoder::load(&root.join(format!("transcoders/layer_{l}")), &model))
        .collect::<Result<_, _>>()
        .unwrap();
    let reference =
        candle_core::safetensors::load(root.join("graphs.safetensors"), &Device::Cpu).unwrap();
    (model, transcoders, reference)
}

fn circuit_tracer_dir() -> std::path::PathBuf {
    fixture_dir("gpt2").join("../../circuit_tracer/gpt2")
}

/// circuit-tracer's graph of the first prompt with at most 40 feature nodes, ranked by
/// influence in batches of 8 (`scripts/circuit_tracer_fixtures.py`): monoscope keeps the same
/// features and finds the same edges among them, in the library and through `attribute
/// --max-feature-nodes` (its `--adjacency` file).
#[test]
fn a_feature_node_limit_keeps_the_features_circuit_tracer_keeps() {
    let (model, transcoders, reference) = circuit_tracer_fixture();
    let get = |key: &str| reference[&format!("limited.{key}")].clone();
    let ids: Vec<u32> = get("input_ids")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let settings = GraphSettings {
        batch_rows: 8,
        max_feature_nodes: 40,
        ..GraphSettings::default()
    };
    let graph = common::attribution_graph(&model, &transcoders, &ids, &settings);
    // (0 is no limit, as circuit-tracer reads it.)
    let unlimited = GraphSettings {
        max_feature_nodes: 0,
        ..settings.clone()
    };
    let all = common::attribution_graph(&model, &transcoders, &ids, &unlimited);
    assert_eq!(all.features, all.active_features);
    let active: Vec<Vec<i64>> = graph
        .active_features
        .iter()
        .map(|f| vec![f.layer as i64, f.position as i64, i64::from(f.feature)])
        .collect();
    assert_eq!(active, get("active_features").to_vec2::<i64>().unwrap());
    assert!(active.len() > 100, "{} active features", active.len());
    let selected: Vec<i64> = graph.selected_features.iter().map(|&f| f as i64).collect();
    assert_eq!(selected, get("selected_features").to_vec1::<i64>().unwrap());
    assert_eq!(graph.features.len(), 40);
    let theirs = get("adjacency").to_vec2::<f32>().unwrap();
    assert_eq!(theirs.len(), graph.n_nodes());
    let scale = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (t, row) in theirs.iter().enumerate() {
        for (s, &want) in row.iter().enumerate() {
            worst = worst.max((graph.edge(t, s) - want).abs());
        }
    }
    assert!(
        worst <= 1e-4 * scale,
        "edges differ by {worst} (largest {scale})"
    );

    let written = circuit_tracer_prompt_through_cli(
        &circuit_tracer_dir().join("transcoders"),
        &["--max-feature-nodes", "40", "--batch", "8"],
    );
    let selected_cli = written["selected_features"].to_vec1::<i64>().unwrap();
    assert_eq!(selected_cli, selected);
    let n = graph.n_nodes();
    let cli = written["adjacency"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(cli.len(), n * n);
    assert_eq!(cli, graph.adjacency);
}

/// `monoscope attribute` on the GPT-2 fixture and circuit-tracer's first prompt (BOS first, as
/// circuit-tracer puts it) through `transcoders`, with `extra` arguments: the tensors its
/// `--adjacency` file holds.
fn circuit_tracer_prompt_through_cli(
    transcoders: &Path,
    extra: &[&str],
) -> HashMap<String, Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let (out, adjacency) = (tmp.path().join("g.json"), tmp.path().join("g.safetensors"));
    let o = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "attribute",
            "--model",
            fixture_dir("gpt2").to_str().unwrap(),
        ])
        .args(["--prompt", "The capital of Japan is", "--bos"])
        .args(["--transcoders", transcoders.to_str().unwrap()])
        .args(extra)
        .args(["--out", out.to_str().unwrap()])
        .args(["--adjacency", adjacency.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    candle_core::safetensors::load(&adjacency, &Device::Cpu).unwrap()
}

/// The input ids of circuit-tracer's graph `prefix` in its fixture.
fn reference_ids(reference: &HashMap<String, Tensor>, prefix: &str) -> Vec<u32> {
    reference[&format!("{prefix}.input_ids")]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// `graph` has circuit-tracer's graph `prefix`'s active features with their activations, its
/// logit targets and probabilities, and its unpruned adjacency matrix, node for node.
fn assert_matches_circuit_tracer(
    graph: &AttributionGraph,
    reference: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let get = |key: String| {
        reference
            .get(&key)
            .unwrap_or_else(|| panic!("{key}"))
            .clone()
    };
    let active = get(format!("{prefix}.active_features"))
        .to_vec2::<i64>()
        .unwrap();
    let ours: Vec<Vec<i64>> = graph
        .features
        .iter()
        .map(|f| vec![f.layer as i64, f.position as i64, i64::from(f.feature)])
        .collect();
    assert_eq!(ours, active, "{prefix}: active features");
    let values = get(format!("{prefix}.activation_values"))
        .to_vec1::<f32>()
        .unwrap();
    for (f, &v) in graph.features.iter().zip(&values) {
        assert!(
            (f.activation - v).abs() <= 1e-4 * v.abs().max(1.0),
            "{f:?}: {v}"
        );
    }
    let tokens: Vec<u32> = get(format!("{prefix}.logit_tokens"))
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let ours: Vec<u32> = graph.logits.iter().map(|l| l.token_id).collect();
    assert_eq!(ours, tokens, "{prefix}: logit targets");
    let probabilities = get(format!("{prefix}.logit_probabilities"))
        .to_vec1::<f32>()
        .unwrap();
    for (l, &p) in graph.logits.iter().zip(&probabilities) {
        assert!((l.probability - p).abs() < 1e-5, "{l:?}: {p}");
    }
    let theirs = get(format!("{prefix}.adjacency")).to_vec2::<f32>().unwrap();
    let n = graph.n_nodes();
    assert_eq!(theirs.len(), n, "{prefix}: node count");
    let scale = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    let mut feature_to_feature = 0;
    for (t, row) in theirs.iter().enumerate() {
        for (s, &want) in row.iter().enumerate() {
            worst = worst.max((graph.edge(t, s) - want).abs());
            let both = matches!(
                (graph.node(t), graph.node(s)),
                (Node::Feature(_), Node::Feature(_))
            );
            feature_to_feature += usize::from(both && want != 0.0);
        }
    }
    assert!(
        feature_to_feature > 100,
        "{feature_to_feature} feature → feature edges"
    );
    eprintln!("{prefix}: {n} nodes, largest edge {scale}, largest difference {worst}");
    assert!(worst <= 1e-4 * scale, "{prefix}: edges differ by {worst}");
}

/// circuit-tracer 0.5.0's own graphs (`scripts/circuit_tracer_fixtures.py`: the GPT-2 fixture
/// in TransformerLens with a JumpReLU skip transcoder per layer, two prompts, one of them
/// Japanese): monoscope finds the same active features with the same activations, the same
/// logit targets and probabilities, and the same unpruned adjacency matrix, node for node.
#[test]
fn graphs_match_circuit_tracers_on_the_same_model_and_transcoders() {
    let (model, transcoders, reference) = circuit_tracer_fixture();
    let get = |key: String| {
        reference
            .get(&key)
            .unwrap_or_else(|| panic!("{key}"))
            .clone()
    };
    for prompt in 0..2 {
        let ids = reference_ids(&reference, &prompt.to_string());
        let graph = graph_of(&model, &transcoders, &ids);
        assert_matches_circuit_tracer(&graph, &reference, &prompt.to_string());
        // Pruned at circuit-tracer's defaults: the same nodes and edges, the same cumulative
        // influence, the same replacement and completeness scores.
        let pruned = graph.prune(0.8, 0.98).unwrap();
        let mask = |key: &str| -> Vec<bool> {
            get(format!("{prompt}.{key}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
                .into_iter()
                .map(|v| v != 0)
                .collect()
        };
        assert_eq!(
            pruned.nodes,
            mask("node_mask"),
            "prompt {prompt}: kept nodes"
        );
        assert_eq!(
            pruned.edges,
            mask("edge_mask"),
            "prompt {prompt}: kept edges"
        );
        assert!(pruned.edges.iter().filter(|&&e| e).count() > 50);
        let cumulative = get(format!("{prompt}.cumulative_scores"))
            .to_vec1::<f32>()
            .unwrap();
        for (i, (a, b)) in pruned
            .cumulative_influence
            .iter()
            .zip(&cumulative)
            .enumerate()
        {
            assert!(
                (a - b).abs() < 1e-4,
                "prompt {prompt}: node {i}: {a} vs {b}"
            );
        }
        let want = get(format!("{prompt}.scores")).to_vec1::<f32>().unwrap();
        let scores = graph.scores().unwrap();
        assert!(
            (scores.replacement - want[0]).abs() < 1e-5,
            "{scores:?} vs {want:?}"
        );
        assert!(
            (scores.completeness - want[1]).abs() < 1e-5,
            "{scores:?} vs {want:?}"
        );
    }
}

/// circuit-tracer's graph through a cross-layer transcoder (`scripts/circuit_tracer_fixtures.py`:
/// a random JumpReLU CLT on the GPT-2 fixture, reading `hook_resid_mid`, written by
/// circuit-tracer's `to_safetensors` and loaded back by its `load_clt`): monoscope, given the
/// same folder, finds the same features, logits and adjacency — a layer-0 feature's edges
/// summing what it writes into both MLP outputs — in the library and through `attribute
/// --transcoders` (its `--adjacency` file).
#[test]
fn graphs_through_a_cross_layer_transcoder_match_circuit_tracers() {
    use monoscope::attribution_graph::load_transcoders;
    let (model, _, reference) = circuit_tracer_fixture();
    let clt = circuit_tracer_dir().join("clt");
    let transcoders = load_transcoders(std::slice::from_ref(&clt), &model).unwrap();
    assert_eq!(transcoders.len(), 2);
    assert_eq!(transcoders[0].later.count(), 1);
    assert_eq!(transcoders[1].later.count(), 0);
    assert_eq!(
        transcoders[0].site.input.to_string(),
        "blocks.0.hook_resid_mid"
    );
    let ids = reference_ids(&reference, "clt");
    let graph = graph_of(&model, &transcoders, &ids);
    assert!(graph.features.iter().any(|f| f.layer == 0));
    assert_matches_circuit_tracer(&graph, &reference, "clt");

    // The command line, on the same folder.
    let written = circuit_tracer_prompt_through_cli(&clt, &[]);
    assert_eq!(
        written["input_ids"].to_vec1::<i64>().unwrap(),
        reference["clt.input_ids"].to_vec1::<i64>().unwrap()
    );
    let ours = written["adjacency"].to_vec2::<f32>().unwrap();
    let theirs = reference["clt.adjacency"].to_vec2::<f32>().unwrap();
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
}

/// circuit-tracer's per-layer transcoders in its own format (`SingleLayerTranscoder
/// .to_safetensors` files and the `config.yaml` that lists them by `hf://` address and names
/// their hooks) trace to circuit-tracer's graphs, as the same weights in SAELens folders do.
#[test]
fn circuit_tracers_own_transcoder_set_traces_to_its_graphs() {
    use monoscope::attribution_graph::load_transcoders;
    let (model, _, reference) = circuit_tracer_fixture();
    let set = circuit_tracer_dir().join("transcoder_set");
    let transcoders = load_transcoders(std::slice::from_ref(&set), &model).unwrap();
    assert_eq!(transcoders.len(), 2);
    for (layer, t) in transcoders.iter().enumerate() {
        assert_eq!(
            (t.site.input.to_string(), t.site.output.to_string()),
            (
                format!("blocks.{layer}.ln2.hook_normalized"),
                format!("blocks.{layer}.hook_mlp_out")
            )
        );
        assert_eq!(t.sae.architecture, Architecture::JumpRelu);
        assert!(t.sae.w_skip.is_some() && t.later.count() == 0);
    }
    for prompt in ["0", "1"] {
        let graph = graph_of(&model, &transcoders, &reference_ids(&reference, prompt));
        assert_matches_circuit_tracer(&graph, &reference, prompt);
    }
}

/// A circuit-tracer transcoder set that does not fit is refused by file and key: a listed
/// file that is not there, more layers than the model, or `mlp.hook_out` on a model whose MLP
/// output passes through a norm.
#[test]
fn bad_circuit_tracer_transcoder_sets_are_refused_by_file_and_key() {
    use monoscope::attribution_graph::load_transcoders;
    let (model, _, _) = circuit_tracer_fixture();
    let source = circuit_tracer_dir().join("transcoder_set");
    let root = tempfile::tempdir().unwrap();
    let copy = |name: &str, config: &str| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for l in 0..2 {
            let file = format!("layer_{l}.safetensors");
            std::fs::copy(source.join(&file), dir.join(&file)).unwrap();
        }
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        dir
    };
    let refused = |model: &Model, dir: &Path| -> String {
        load_transcoders(&[dir.to_path_buf()], model)
            .unwrap_err()
            .to_string()
    };
    let missing = copy(
        "missing",
        "model_kind: transcoder_set\ntranscoders:\n  - hf://a/b/layer_0.safetensors\n  \
         - hf://a/b/layer_9.safetensors\n",
    );
    let err = refused(&model, &missing);
    assert!(
        err.contains("config.yaml") && err.contains("transcoders") && err.contains("layer_9"),
        "{err}"
    );
    let three = copy(
        "three",
        "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n\
         feature_output_hook: hook_mlp_out\n",
    );
    std::fs::copy(
        source.join("layer_0.safetensors"),
        three.join("layer_2.safetensors"),
    )
    .unwrap();
    let err = refused(&model, &three);
    assert!(
        err.contains("3 layers' files") && err.contains("2 layers"),
        "{err}"
    );
    let gemma = Model::load(&fixture_dir("gemma2"), &Device::Cpu, DType::F32).unwrap();
    let post_norm = copy("post_norm", "model_kind: transcoder_set\n");
    let err = refused(&gemma, &post_norm);
    assert!(
        err.contains("feature_output_hook") && err.contains("ln2_post.hook_in"),
        "{err}"
    );
}

/// A bad cross-layer transcoder folder is refused by file and key: a layer's file missing,
/// a decoder of the wrong shape, a config naming another kind or a hook the model lacks.
#[test]
fn bad_cross_layer_transcoders_are_refused_by_file_and_key() {
    use monoscope::attribution_graph::load_transcoders;
    let (model, _, _) = circuit_tracer_fixture();
    let source = circuit_tracer_dir().join("clt");
    let copy = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        for entry in std::fs::read_dir(&source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    };
    let root = tempfile::tempdir().unwrap();
    let refused = |dir: &Path| -> String {
        load_transcoders(&[dir.to_path_buf()], &model)
            .unwrap_err()
            .to_string()
    };
    let missing = root.path().join("missing");
    copy(&missing);
    std::fs::remove_file(missing.join("W_enc_1.safetensors")).unwrap();
    let err = refused(&missing);
    assert!(
        err.contains("1 encoder files") && err.contains("2 layers"),
        "{err}"
    );

    let swapped = root.path().join("swapped");
    copy(&swapped);
    // Layer 1's decoder (one layer written) under layer 0's name.
    let layer_1 =
        candle_core::safetensors::load(source.join("W_dec_1.safetensors"), &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("W_dec_0".to_string(), layer_1["W_dec_1"].clone())]),
        swapped.join("W_dec_0.safetensors"),
    )
    .unwrap();
    let err = refused(&swapped);
    assert!(
        err.contains("W_dec_0") && err.contains("[32, 2, 64]"),
        "{err}"
    );

    // Configs that do not fit the folder or the model.
    for (name, config, needles) in [
        (
            "kind",
            "model_kind: transcoder_set\n",
            ["config.yaml", "model_kind"],
        ),
        (
            "hook",
            "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_nowhere\n",
            ["feature_input_hook", "blocks.0.hook_nowhere"],
        ),
        (
            "inside",
            "feature_input_hook: mlp.hook_post\n",
            ["feature_input_hook", "linear"],
        ),
    ] {
        let dir = root.path().join(name);
        copy(&dir);
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        let err = refused(&dir);
        assert!(needles.iter().all(|n| err.contains(n)), "{name}: {err}");
    }
}

/// Setting a cross-layer feature changes every MLP output it writes by its decoder row to that
/// layer: with the same change at its own layer, the later layer's output differs by exactly
/// `(v − a)·W_dec[f, k]`, at the feature's position only.
#[test]
fn a_cross_layer_feature_intervention_writes_every_layer_the_feature_writes() {
    use monoscope::attribution_graph::intervene::{FeatureChange, intervention_hooks};
    use monoscope::attribution_graph::load_transcoders;
    use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp};
    let (model, _, reference) = circuit_tracer_fixture();
    let clt = circuit_tracer_dir().join("clt");
    let transcoders = load_transcoders(&[clt], &model).unwrap();
    let ids = reference_ids(&reference, "clt");
    let graph = graph_of(&model, &transcoders, &ids);
    let i = graph.features.iter().position(|f| f.layer == 0).unwrap();
    let f = graph.features[i].clone();
    let change = FeatureChange {
        feature: i,
        value: f.activation + 3.0,
    };
    let both = intervention_hooks(&model, &transcoders, &graph, &[change]).unwrap();
    // The same change written into layer 0 only.
    let d = model.dims().d_model;
    let mut own = vec![0f32; ids.len() * d];
    let row: Vec<f32> = transcoders[0]
        .sae
        .w_dec
        .get(f.feature as usize)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (o, w) in own[f.position * d..][..d].iter_mut().zip(&row) {
        *o = 3.0 * w;
    }
    let own = Tensor::from_vec(own, (1, ids.len(), d), &Device::Cpu).unwrap();
    let first_only = Hooks::new().intervene(
        HookPoint::MlpOut(0),
        Intervention::new(InterventionOp::Add(own)),
    );
    let mlp_out = |hooks: Hooks| {
        let out = model
            .forward(
                &model.ids_tensor(&ids).unwrap(),
                &hooks.capture([HookPoint::ResidMid(1), HookPoint::ResidPost(1)]),
            )
            .unwrap();
        let post = out.cache.get(HookPoint::ResidPost(1)).unwrap().clone();
        let mid = out.cache.get(HookPoint::ResidMid(1)).unwrap().clone();
        (post - mid).unwrap().squeeze(0).unwrap()
    };
    let moved = (mlp_out(both) - mlp_out(first_only)).unwrap();
    let rows = transcoders[0].decoder_rows(&[f.feature]).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].0, 1);
    let expected = rows[1].1.get(0).unwrap().affine(3.0, 0.0).unwrap();
    for p in 0..ids.len() {
        let row = moved.get(p).unwrap();
        let err = match p == f.position {
            true => common::max_abs_diff(&row, &expected),
            false => common::max_abs(&row),
        };
        assert!(err < 1e-5, "position {p}: {err}");
    }
    assert!(common::max_abs(&expected) > 0.1);
}

/// A feature intervention adds `(v − a)·W_dec[f]` to its layer's MLP output at its position and
/// nothing else: what that MLP writes into the stream moves by exactly that, there and only
/// there. With no change, or each feature set to its own activation, the model's
/// distribution is the graph's.
#[test]
fn feature_interventions_move_the_stream_by_the_decoder_row_where_the_feature_is() {
    use monoscope::attribution_graph::intervene::{FeatureChange, intervene, intervention_hooks};
    use monoscope::attribution_graph::load_transcoders;
    use monoscope::model::{HookPoint, Hooks};

    let model = Model::load(
        &monoscope::cli::bundled_model_dir(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let transcoders =
        load_transcoders(&[monoscope::cli::bundled_transcoders_dir()], &model).unwrap();
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let graph = graph_of(&model, &transcoders, &ids);
    let same = intervene(&model, &transcoders, &graph, &[], 5).unwrap();
    for (l, (b, a)) in graph.logits.iter().zip(same.before.iter().zip(&same.after)) {
        assert!((l.probability - b).abs() < 1e-5, "{l:?} {b}");
        assert_eq!(a, b);
    }
    let own: Vec<FeatureChange> = (0..graph.features.len())
        .map(|i| FeatureChange {
            feature: i,
            value: graph.features[i].activation,
        })
        .collect();
    let unchanged = intervene(&model, &transcoders, &graph, &own, 5).unwrap();
    assert_eq!(unchanged.after, same.before);
    // One feature per layer, at different positions, each set to 3 more than it is.
    let mut changes = Vec::new();
    for (layer, position) in [(1, 1), (4, 3), (7, ids.len() - 1)] {
        let i = graph
            .features
            .iter()
            .position(|f| f.layer == layer && f.position == position)
            .unwrap();
        changes.push(FeatureChange {
            feature: i,
            value: graph.features[i].activation + 3.0,
        });
    }
    let run = |hooks: Hooks, layer: usize| {
        let hooks = hooks.capture([HookPoint::ResidMid(layer), HookPoint::ResidPost(layer)]);
        let out = model
            .forward(&model.ids_tensor(&ids).unwrap(), &hooks)
            .unwrap();
        let post = out.cache.get(HookPoint::ResidPost(layer)).unwrap().clone();
        let mid = out.cache.get(HookPoint::ResidMid(layer)).unwrap().clone();
        (post - mid).unwrap().squeeze(0).unwrap() // the MLP's output as it entered the stream
    };
    // Each alone (an earlier change moves a later layer's MLP through the stream).
    for change in &changes {
        let f = &graph.features[change.feature];
        let hooks = intervention_hooks(&model, &transcoders, &graph, &[*change]).unwrap();
        let moved = (run(hooks.clone(), f.layer) - run(Hooks::new(), f.layer)).unwrap();
        let expected = transcoders[f.layer]
            .sae
            .w_dec
            .get(f.feature as usize)
            .unwrap()
            .affine(3.0, 0.0)
            .unwrap();
        for p in 0..ids.len() {
            let row = moved.get(p).unwrap();
            let err = match p == f.position {
                true => common::max_abs_diff(&row, &expected),
                false => common::max_abs(&row),
            };
            assert!(err < 1e-4, "layer {} position {p}: {err}", f.layer);
        }
    }
    let twice = [changes[0], changes[0]];
    let err = intervene(&model, &transcoders, &graph, &twice, 5).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let moved = intervene(&model, &transcoders, &graph, &changes, 5).unwrap();
    assert_ne!(moved.after, moved.before);
    assert_eq!(moved.top_after.len(), 5);
}
