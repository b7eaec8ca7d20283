//! SAE folders written by EleutherAI's sparsify (`scripts/sparsify_fixtures.py`) load in
//! monoscope at the hook their folder names, and give sparsify's own encodings and
//! reconstructions; the hook's activations are the ones sparsify's trainer captured from the
//! same module in transformers. Transcoders load at the module's input and output hooks and give
//! sparsify's own outputs, skip connections included. Sparse coders that monoscope cannot run
//! are refused by name.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, monoscope_json};
use monoscope::model::Model;
use monoscope::sae;

/// (fixture model, hookpoint folder, the hook its module writes).
const CASES: [(&str, &str, &str); 8] = [
    ("gpt_neox", "layers.1", "blocks.1.hook_resid_post"),
    ("gpt_neox", "layers.0.attention", "blocks.0.hook_attn_out"),
    ("gpt_neox", "layers.1.mlp.act", "blocks.1.mlp.hook_post"),
    ("gpt2", "h.0.mlp", "blocks.0.hook_mlp_out"),
    ("gpt2", "h.1.attn", "blocks.1.hook_attn_out"),
    ("llama", "layers.0", "blocks.0.hook_resid_post"),
    ("llama", "layers.1.self_attn", "blocks.1.hook_attn_out"),
    ("llama", "layers.1.mlp", "blocks.1.hook_mlp_out"),
];

fn sparsify_dir(model: &str, hookpoint: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sparsify")
        .join(model)
        .join(hookpoint)
}

/// `input_ids`, `x`, `feature_acts` and `reconstruction` as transformers and sparsify made them.
fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn sparsify_folders_load_at_their_hookpoints_and_match_sparsify() {
    for (model_type, hookpoint, hook) in CASES {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F32).unwrap();
        let dir = sparsify_dir(model_type, hookpoint);
        let (sae_dir, point) = sae::load_for_model(&dir, None, &model, &Device::Cpu).unwrap();
        assert_eq!(point.to_string(), hook, "{model_type} {hookpoint}");
        let what = format!("{model_type} {hookpoint}");
        let acts =
            common::check_sae_against_reference(&model, &sae_dir.sae, point, &io(&dir), &what);
        // Every fixture's SAE is top-k: each token keeps at most k latents, and some keep k.
        let sae::Architecture::TopK { k } = sae_dir.sae.architecture else {
            panic!("{hookpoint}: {:?}", sae_dir.sae.architecture);
        };
        let on = acts
            .gt(0f32)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum(1)
            .unwrap();
        assert_eq!(on.max(0).unwrap().to_scalar::<f32>().unwrap() as usize, k);
    }
}

/// A copy of one fixture folder under `root/name`, with its cfg.json changed by `edit`.
fn edited_copy(root: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let from = sparsify_dir("gpt_neox", "layers.1");
    let to = root.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in ["cfg.json", "sae.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    let cfg_path = to.join("cfg.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    to
}

#[test]
fn sparse_coders_that_are_not_one_hooks_sae_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, serde_json::Value); 4] = [
        ("signed", true.into()),
        // A skip connection on an SAE (not a transcoder).
        ("skip_connection", true.into()),
        ("activation", "groupmax".into()),
        ("k", 0.into()),
    ];
    for (key, value) in cases {
        let dir = edited_copy(tmp.path(), &format!("{key}/layers.1"), |cfg| {
            cfg[key] = value.clone();
        });
        let err = sae::load(&dir, &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
        assert!(
            err.contains("cfg.json") || err.contains("sae.safetensors"),
            "{key}: {err}"
        );
    }
    // `num_latents` 0 means `d_in · expansion_factor`: a factor that disagrees with the
    // weights names the tensor whose shape is wrong.
    let dir = edited_copy(tmp.path(), "expansion/layers.1", |cfg| {
        cfg["num_latents"] = 0.into();
        cfg["expansion_factor"] = 2.into();
    });
    let err = sae::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder.weight"), "{err}");
}

/// (fixture model, transcoder hookpoint folder, the hooks its module reads and writes).
const TRANSCODER_CASES: [(&str, &str, &str, &str); 3] = [
    (
        "gpt2",
        "h.0.mlp",
        "blocks.0.mlp.hook_in",
        "blocks.0.hook_mlp_out",
    ),
    (
        "llama",
        "layers.1.mlp",
        "blocks.1.mlp.hook_in",
        "blocks.1.hook_mlp_out",
    ),
    (
        "gpt_neox",
        "layers.1.mlp.act",
        "blocks.1.mlp.hook_pre",
        "blocks.1.mlp.hook_post",
    ),
];

#[test]
fn sparsify_transcoders_read_and_write_their_modules_hooks_and_match_sparsify() {
    for (model_type, hookpoint, hook_in, hook_out) in TRANSCODER_CASES {
        let what = format!("{model_type} transcoder {hookpoint}");
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F32).unwrap();
        let dir = sparsify_dir("transcoders", model_type).join(hookpoint);
        let (sae_dir, point) = sae::load_for_model(&dir, None, &model, &Device::Cpu).unwrap();
        let out_point = sae::output_hook(&sae_dir, point, &model).unwrap();
        assert_eq!(
            (point.to_string(), out_point.to_string()),
            (hook_in.to_string(), hook_out.to_string()),
            "{what}"
        );
        assert!(sae_dir.sae.transcoder && !sae_dir.sae.apply_b_dec_to_input);
        let io = io(&dir);
        assert_eq!(sae_dir.sae.w_skip.is_some(), model_type != "gpt2", "{what}");
        // The module's input and output as transformers computed them are monoscope's hooks.
        let site = sae::SaeSite {
            input: point,
            output: out_point,
        };
        common::check_transcoder_against_reference(&model, &sae_dir.sae, site, &io, &what);
    }
}

#[test]
fn a_run_folder_names_its_hookpoints_and_an_unknown_hookpoint_asks_for_a_hook() {
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sparsify/gpt_neox");
    let err = sae::load(&run, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    for hookpoint in ["layers.0.attention", "layers.1", "layers.1.mlp.act"] {
        assert!(err.contains(hookpoint), "{err}");
    }

    let model = Model::load(&fixture_dir("gpt_neox"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_copy(tmp.path(), "layers.1.post_attention_layernorm", |_| {});
    let err = sae::load_for_model(&dir, None, &model, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers.1.post_attention_layernorm"), "{err}");
    assert!(err.contains("hook"), "{err}");
    let (_, point) =
        sae::load_for_model(&dir, Some("blocks.1.hook_resid_post"), &model, &Device::Cpu).unwrap();
    assert_eq!(point.to_string(), "blocks.1.hook_resid_post");
}

/// `sae eval` of `sae` with the fixture model `model` on a three-line corpus written into
/// `dir`, plus `extra` arguments.
fn eval_args(dir: &Path, sae: &Path, model: &str, extra: &[&str]) -> Vec<String> {
    let text = dir.join("corpus.txt");
    std::fs::write(
        &text,
        "The capital of Japan is Tokyo.\nThe capital of France is Paris.\n日本の首都は東京です。\n",
    )
    .unwrap();
    let (sae, model, text) = (
        sae.to_str().unwrap(),
        fixture_dir(model),
        text.to_str().unwrap().to_string(),
    );
    let args = [
        "sae",
        "eval",
        "--sae",
        sae,
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        &text,
        "--context-size",
        "8",
        "--windows",
        "4",
        "--json",
    ];
    args.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn sae_eval_runs_on_a_sparsify_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = sparsify_dir("gpt_neox", "layers.1");
    let report = monoscope_json(&strs(&eval_args(tmp.path(), &sae, "gpt_neox", &[])));
    let l0 = report["l0"].as_f64().unwrap();
    assert!(l0 > 0.0 && l0 <= 8.0, "{report}");
    assert!(report["fvu"].as_f64().unwrap().is_finite(), "{report}");
}

/// `sae eval` judges a sparsify transcoder at the module output it predicts (its own L0 of at
/// most k), and an output hook that does not come after its input is refused by name.
#[test]
fn sae_eval_runs_on_a_sparsify_transcoder_and_refuses_an_earlier_output_hook() {
    let tmp = tempfile::tempdir().unwrap();
    let sae = sparsify_dir("transcoders", "llama").join("layers.1.mlp");
    let report = monoscope_json(&strs(&eval_args(tmp.path(), &sae, "llama", &[])));
    let l0 = report["l0"].as_f64().unwrap();
    assert!(l0 > 0.0 && l0 <= 8.0, "{report}");
    assert!(report["fvu"].as_f64().unwrap().is_finite(), "{report}");
    assert!(report["ce_sae"].as_f64().unwrap().is_finite(), "{report}");

    let earlier = eval_args(
        tmp.path(),
        &sae,
        "llama",
        &["--hook-out", "blocks.0.hook_mlp_out"],
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(&earlier)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("blocks.0.hook_mlp_out") && stderr.contains("does not come after"),
        "{stderr}"
    );
}
