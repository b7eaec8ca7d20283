//! Gemma Scope 2 folders (`params.safetensors`, laid out as Google's `gemma-scope-2-<model>`
//! repositories are; `scripts/gemma_scope_2_fixtures.py` on the Gemma 3 fixture) load at the
//! hook their config or path names and give the encodings and outputs of circuit-tracer's Gemma
//! Scope 2 loaders; each site's activations are the ones transformers computes at the module
//! Gemma Scope 2 reads. The affine transcoder adds its skip path; the cross-layer transcoder
//! (one file per layer, decoders to every layer) writes each layer's MLP output from its own
//! and the earlier layers' features, through the same reading attribution graphs use.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_dir, max_relative_error};
use monoscope::attribution_graph::{load_each, transcoder_dirs};
use monoscope::model::Model;
use monoscope::sae;

fn scope_dir(rest: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gemma_scope_2/gemma-scope-2-tiny-pt")
        .join(rest)
}

fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

fn gemma3() -> Model {
    Model::load(&fixture_dir("gemma3_text"), &Device::Cpu, DType::F32).unwrap()
}

/// (folder, the hook it reads). `resid_post`'s config names its module; the others have no
/// config and are placed by their path.
const SAES: [(&str, &str); 3] = [
    (
        "resid_post/layer_1_width_128_l0_small",
        "blocks.1.hook_resid_post",
    ),
    (
        "attn_out/layer_1_width_128_l0_small",
        "blocks.1.attn.hook_z",
    ),
    (
        "mlp_out/layer_0_width_128_l0_small",
        "blocks.0.hook_mlp_out",
    ),
];

#[test]
fn gemma_scope_2_saes_load_at_their_sites_and_match_circuit_tracers_reading() {
    let model = gemma3();
    for (folder, hook) in SAES {
        let dir = scope_dir(folder);
        let (sae_dir, point) = sae::load_for_model(&dir, None, &model, &Device::Cpu).unwrap();
        assert_eq!(point.to_string(), hook, "{folder}");
        let sae = &sae_dir.sae;
        assert_eq!(sae.architecture, sae::Architecture::JumpRelu, "{folder}");
        assert!(!sae.apply_b_dec_to_input && !sae.transcoder, "{folder}");
        let acts = common::check_sae_against_reference(&model, sae, point, &io(&dir), folder);
        let fired = acts.gt(0f32).unwrap().to_dtype(DType::F32).unwrap();
        let share = fired.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(share > 0.05 && share < 0.4, "{folder}: {share}");
    }
    // Each is its own SAE to the caches of statistics and scores, which are named by content.
    let hashes: std::collections::HashSet<String> = SAES
        .iter()
        .map(|(folder, _)| monoscope::table::sae_hash(&scope_dir(folder)).unwrap())
        .collect();
    assert_eq!(hashes.len(), SAES.len());
}

#[test]
fn a_gemma_scope_2_affine_transcoder_reads_the_mlp_input_and_adds_its_skip_path() {
    let model = gemma3();
    let dir = scope_dir("transcoder/layer_1_width_128_l0_small_affine");
    let (sae, site) = common::load_mlp_transcoder(&model, &dir, 1);
    assert!(sae.transcoder && sae.w_skip.is_some());
    common::check_transcoder_against_reference(&model, &sae, site, &io(&dir), "transcoder");
}

#[test]
fn a_gemma_scope_2_cross_layer_transcoder_writes_every_later_mlp_as_circuit_tracer_reads_it() {
    let model = gemma3();
    let dir = scope_dir("clt/width_128_l0_small_affine");
    let io = io(&dir);
    // Found as one transcoder folder, read as one transcoder per layer.
    let one = std::slice::from_ref(&dir);
    assert_eq!(transcoder_dirs(one).unwrap(), one);
    let transcoders = load_each(one, &model).unwrap();
    let n = model.dims().n_layers;
    assert_eq!(transcoders.len(), n);
    // The model's MLP inputs and post-norm outputs are transformers'.
    let run = model
        .forward(
            &model.ids_tensor(&common::io_ids(&io)).unwrap(),
            &monoscope::model::Hooks::new().capture(
                transcoders
                    .iter()
                    .flat_map(|t| [t.site.input, t.site.output]),
            ),
        )
        .unwrap();
    for (l, t) in transcoders.iter().enumerate() {
        assert_eq!(
            (t.site.input.to_string(), t.site.output.to_string()),
            (
                format!("blocks.{l}.mlp.hook_in"),
                format!("blocks.{l}.hook_mlp_out")
            )
        );
        assert_eq!(t.later.count(), n - 1 - l);
        for (point, key) in [(t.site.input, "x"), (t.site.output, "y")] {
            let captured = run.cache.get(point).unwrap().get(0).unwrap();
            let err = max_relative_error(&captured, &io[key].i(l).unwrap());
            assert!(err <= 1e-4, "layer {l}: {point} off by {err}");
        }
    }
    // Each layer's output: its own features' (with b_dec and the skip path), plus what the
    // earlier layers' features write into it through their mapped decoders.
    let x = |l: usize| io["x"].i(l).unwrap();
    let mut outputs: Vec<Tensor> = (0..n)
        .map(|l| transcoders[l].sae.output(&x(l)).unwrap())
        .collect();
    for (l, t) in transcoders.iter().enumerate() {
        let acts = t.sae.encode(&x(l)).unwrap();
        let err = max_relative_error(&acts, &io["feature_acts"].i(l).unwrap());
        assert!(err <= 1e-5, "layer {l}: feature activations off by {err}");
        let all: Vec<u32> = (0..acts.dim(1).unwrap() as u32).collect();
        for (layer, rows) in t.decoder_rows(&all).unwrap().into_iter().skip(1) {
            assert!(layer > l);
            outputs[layer] = (&outputs[layer] + acts.matmul(&rows).unwrap()).unwrap();
        }
    }
    for (l, out) in outputs.iter().enumerate() {
        let err = max_relative_error(out, &io["output"].i(l).unwrap());
        assert!(err <= 1e-5, "layer {l}: output off by {err}");
    }
}

/// A Gemma Scope 2 folder whose config names a module monoscope has no hook for, or another
/// architecture, is refused by file and key; one placed by neither config nor path asks for
/// the hook.
#[test]
fn gemma_scope_2_folders_that_say_nothing_usable_are_refused_by_name() {
    let model = gemma3();
    let tmp = tempfile::tempdir().unwrap();
    let source = scope_dir("resid_post/layer_1_width_128_l0_small");
    let copy = |to: &Path, config: Option<&str>| {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(
            source.join("params.safetensors"),
            to.join("params.safetensors"),
        )
        .unwrap();
        if let Some(text) = config {
            std::fs::write(to.join("config.json"), text).unwrap();
        }
    };
    let error = |dir: &Path| {
        sae::load_for_model(dir, None, &model, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    let bad_module = tmp.path().join("a");
    copy(
        &bad_module,
        Some(
            r#"{"architecture": "jump_relu", "hf_hook_point_in": "model.layers.1.mlp.down_proj.output"}"#,
        ),
    );
    let e = error(&bad_module);
    assert!(
        e.contains("config.json") && e.contains("hf_hook_point_in") && e.contains("down_proj"),
        "{e}"
    );
    let bad_arch = tmp.path().join("b");
    copy(&bad_arch, Some(r#"{"architecture": "topk"}"#));
    let e = error(&bad_arch);
    assert!(e.contains("architecture") && e.contains("topk"), "{e}");
    let nowhere = tmp.path().join("somewhere");
    copy(&nowhere, None);
    let e = error(&nowhere);
    assert!(
        e.contains("Gemma Scope 2") && e.contains("pass the hook"),
        "{e}"
    );
    // The config decides over the path: placed under another site and layer, the folder still
    // reads where its config says.
    let misplaced = tmp.path().join("mlp_out/layer_0_width_128_l0_small");
    copy(
        &misplaced,
        Some(&std::fs::read_to_string(source.join("config.json")).unwrap()),
    );
    let (_, point) = sae::load_for_model(&misplaced, None, &model, &Device::Cpu).unwrap();
    assert_eq!(point.to_string(), "blocks.1.hook_resid_post");
    // Given the hook, the same folder loads.
    let (_, point) = sae::load_for_model(
        &nowhere,
        Some("blocks.1.hook_resid_post"),
        &model,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(point.to_string(), "blocks.1.hook_resid_post");
    // A CLT with a layer's file missing.
    let clt = tmp.path().join("clt");
    std::fs::create_dir_all(&clt).unwrap();
    for l in 0..2 {
        let name = format!("params_layer_{l}.safetensors");
        std::fs::copy(
            scope_dir("clt/width_128_l0_small_affine").join(&name),
            clt.join(&name),
        )
        .unwrap();
    }
    let e = load_each(&[clt], &model).err().unwrap().to_string();
    assert!(e.contains("2 layer files") && e.contains("3 layers"), "{e}");
}
