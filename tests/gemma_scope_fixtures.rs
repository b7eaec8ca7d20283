//! Gemma Scope SAE folders (`params.npz`, laid out as Google's repositories are;
//! `scripts/gemma_scope_fixtures.py` on the Gemma 2 fixture) load at the hook their path names
//! and give the encodings and reconstructions of Gemma Scope's reference JumpReLU; each site's
//! activations are the ones transformers computes at the module Gemma Scope read. Deflated and
//! stored archives both load; transcoders read their MLP's input after the pre-MLP norm and
//! predict its output after the post-MLP norm. A path that names no site and archives without a
//! needed array are refused by name.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, monoscope_json};
use monoscope::model::Model;
use monoscope::sae;

/// (site folder, layer, average_l0 folder, the hook the site is).
const CASES: [(&str, usize, usize, &str); 3] = [
    ("gemma-scope-tiny-pt-res", 1, 21, "blocks.1.hook_resid_post"),
    ("gemma-scope-tiny-pt-mlp", 0, 21, "blocks.0.hook_mlp_out"),
    ("gemma-scope-tiny-pt-att", 1, 19, "blocks.1.attn.hook_z"),
];

fn scope_dir(site: &str, layer: usize, l0: usize) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gemma_scope")
        .join(site)
        .join(format!("layer_{layer}/width_128/average_l0_{l0}"))
}

/// `input_ids`, `x`, `feature_acts` and `reconstruction` as transformers and the reference
/// JumpReLU made them.
fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn gemma_scope_folders_load_at_their_sites_and_match_the_reference_jumprelu() {
    let model = Model::load(&fixture_dir("gemma2"), &Device::Cpu, DType::F32).unwrap();
    for (site, layer, l0, hook) in CASES {
        let dir = scope_dir(site, layer, l0);
        let (sae_dir, point) = sae::load_for_model(&dir, None, &model, &Device::Cpu).unwrap();
        assert_eq!(point.to_string(), hook, "{site}");
        let sae = &sae_dir.sae;
        assert_eq!(sae.architecture, sae::Architecture::JumpRelu, "{site}");
        assert!(!sae.apply_b_dec_to_input, "{site}");
        let acts = common::check_sae_against_reference(&model, sae, point, &io(&dir), site);
        // Some latents fire and most do not (thresholds at the 85th percentile).
        let fired = acts.gt(0f32).unwrap().to_dtype(DType::F32).unwrap();
        let share = fired.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(share > 0.05 && share < 0.4, "{site}: {share}");
    }
}

#[test]
fn gemma_scope_transcoders_read_the_mlp_input_and_predict_its_post_norm_output() {
    let model = Model::load(&fixture_dir("gemma2"), &Device::Cpu, DType::F32).unwrap();
    let dir = scope_dir("gemma-scope-tiny-pt-transcoders", 1, 21);
    let (sae, site) = common::load_mlp_transcoder(&model, &dir, 1);
    assert!(sae.transcoder && !sae.apply_b_dec_to_input);
    // Gemma 2's MLP input (after the (1 + w) pre-MLP RMSNorm) and post-norm output, as
    // transformers computes them.
    common::check_transcoder_against_reference(&model, &sae, site, &io(&dir), "transcoder");
}

#[test]
fn trace_runs_a_gemma_scope_sae_at_its_site() {
    let tmp = tempfile::tempdir().unwrap();
    let (site, layer, l0, hook) = CASES[2];
    let dir = scope_dir(site, layer, l0);
    let out = tmp.path().join("trace.safetensors");
    monoscope_json(&[
        "trace",
        "--model",
        fixture_dir("gemma2").to_str().unwrap(),
        "--prompt",
        "The capital of Japan is Tokyo.",
        "--hooks",
        hook,
        "--sae",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let trace = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let sae = sae::load(&dir, &Device::Cpu, DType::F32).unwrap().sae;
    let input = &trace[&format!("{hook}.hook_sae_input")];
    assert_eq!(common::max_abs_diff(input, &trace[hook]), 0.0);
    let acts = &trace[&format!("{hook}.hook_sae_acts_post")];
    assert!(common::max_abs_diff(acts, &sae.encode(input).unwrap()) < 1e-6);
}

/// A copy of the `res` fixture's params.npz under `root/path`.
fn copy_to(root: &Path, path: &str) -> PathBuf {
    let (site, layer, l0, _) = CASES[0];
    let to = root.join(path);
    std::fs::create_dir_all(&to).unwrap();
    std::fs::copy(
        scope_dir(site, layer, l0).join("params.npz"),
        to.join("params.npz"),
    )
    .unwrap();
    to
}

#[test]
fn folders_that_are_not_one_sites_sae_or_lack_an_array_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::load(&fixture_dir("gemma2"), &Device::Cpu, DType::F32).unwrap();
    // A path that names no site: the error asks for the hook, and given one it loads.
    let dir = copy_to(tmp.path(), "my-saes/layer_1/width_128");
    let err = sae::load_for_model(&dir, None, &model, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("my-saes") && err.contains("hook"), "{err}");
    let (_, point) =
        sae::load_for_model(&dir, Some("blocks.1.hook_resid_post"), &model, &Device::Cpu).unwrap();
    assert_eq!(point.to_string(), "blocks.1.hook_resid_post");

    // An archive without the thresholds names the array and the file.
    let dir = tmp
        .path()
        .join("gemma-scope-tiny-pt-res/layer_1/no-threshold");
    std::fs::create_dir_all(&dir).unwrap();
    let full = sae::load(&scope_dir(CASES[0].0, 1, 21), &Device::Cpu, DType::F32)
        .unwrap()
        .sae;
    Tensor::write_npz(
        &[
            ("W_enc", &full.w_enc),
            ("W_dec", &full.w_dec),
            ("b_enc", &full.b_enc),
            ("b_dec", &full.b_dec),
        ],
        dir.join("params.npz"),
    )
    .unwrap();
    let err = sae::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("threshold") && err.contains("params.npz"),
        "{err}"
    );

    // Not an archive at all.
    std::fs::write(dir.join("params.npz"), b"not a zip").unwrap();
    let err = sae::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("params.npz"), "{err}");
}
