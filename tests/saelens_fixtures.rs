//! SAE folders written by the real SAELens (6.54.12, `scripts/saelens_fixtures.py`) load in
//! monoscope and give SAELens's own encodings and reconstructions; monoscope's saved copies
//! load back to the same outputs.
//!
//! With `MONOSCOPE_SAVE_FIXTURES_TO=DIR`, the save test also leaves monoscope-written folders
//! (each with an `io.safetensors` of monoscope's outputs) under DIR, for
//! `scripts/saelens_load_check.py DIR/<name>` to check that SAELens loads them.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use monoscope::sae::saelens::{self, SaeDir};
use monoscope::sae::{Architecture, Sae};

const ARCHITECTURES: [&str; 4] = ["standard", "topk", "batchtopk", "jumprelu"];
const TOLERANCE: f32 = 1e-5;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/saelens")
        .join(arch)
}

/// `x`, `feature_acts` and `reconstruction` as SAELens computed them.
fn io(arch: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(arch).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn load(dir: &Path) -> SaeDir {
    saelens::load(dir, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// Encodings and reconstructions of `x`.
fn outputs(sae: &Sae, x: &Tensor) -> (Tensor, Tensor) {
    let acts = sae.encode(x).unwrap();
    let recon = sae.decode(&acts).unwrap();
    (acts, recon)
}

#[test]
fn saelens_written_saes_match_saelens_outputs() {
    for arch in ARCHITECTURES {
        let loaded = load(&fixture(arch));
        let expected = match arch {
            "standard" => Architecture::Standard,
            "topk" => Architecture::TopK { k: 4 },
            // SAELens saves a BatchTopK SAE as a JumpReLU.
            _ => Architecture::JumpRelu,
        };
        assert_eq!(loaded.sae.architecture, expected, "{arch}");
        assert_eq!(loaded.metadata.model_name, "fixture");
        assert_eq!(loaded.metadata.hook_name, "blocks.0.mlp.hook_post");
        assert_eq!(loaded.metadata.context_size, 32);
        let io = io(arch);
        let acts = loaded.sae.encode(&io["x"]).unwrap();
        let d = max_abs_diff(&acts, &io["feature_acts"]);
        assert!(
            d <= TOLERANCE,
            "{arch}: encode differs from sae_lens by {d}"
        );
        let recon = loaded.sae.decode(&io["feature_acts"]).unwrap();
        let d = max_abs_diff(&recon, &io["reconstruction"]);
        assert!(
            d <= TOLERANCE,
            "{arch}: decode differs from sae_lens by {d}"
        );
    }
}

/// What the save test writes: (name, SAE folder to load and re-save).
fn saved_cases(scratch: &Path) -> Vec<(String, SaeDir)> {
    let mut cases: Vec<(String, SaeDir)> = ARCHITECTURES
        .iter()
        .map(|arch| (arch.to_string(), load(&fixture(arch))))
        .collect();
    // The top-k fixture as a `rescale_acts_by_decoder_norm: true` SAE (monoscope folds the
    // decoder norms in at load; the saved copy is a plain top-k SAE).
    let src = scratch.join("topk_rescale_src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        fixture("topk").join(saelens::WEIGHTS_FILE),
        src.join(saelens::WEIGHTS_FILE),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("topk").join("cfg.json")).unwrap())
            .unwrap();
    cfg["rescale_acts_by_decoder_norm"] = true.into();
    std::fs::write(src.join("cfg.json"), cfg.to_string()).unwrap();
    cases.push(("topk_rescale".into(), load(&src)));
    // A BatchTopK SAE as monoscope trains it (saved as SAELens's JumpReLU + training details).
    let mut batch = load(&fixture("batchtopk"));
    batch.sae.architecture = Architecture::BatchTopK { k: 4 };
    cases.push(("batchtopk_trained".into(), batch));
    // float64 weights (cfg.json dtype "float64").
    let mut f64_dir = load(&fixture("standard"));
    f64_dir.sae = f64_dir.sae.to_dtype(DType::F64).unwrap();
    cases.push(("standard_f64".into(), f64_dir));
    cases
}

/// In the SAE's dtype (SAELens's decode wants activations of its own dtype).
fn write_io(path: &Path, x: &Tensor, acts: &Tensor, recon: &Tensor) {
    let map = HashMap::from([
        ("x".to_string(), x.to_dtype(acts.dtype()).unwrap()),
        ("feature_acts".to_string(), acts.clone()),
        ("reconstruction".to_string(), recon.clone()),
    ]);
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn saved_saes_reload_to_identical_outputs() {
    let scratch = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("MONOSCOPE_SAVE_FIXTURES_TO").map(PathBuf::from);
    let out_root = keep.clone().unwrap_or_else(|| scratch.path().join("saved"));
    for (name, sae_dir) in saved_cases(scratch.path()) {
        let arch = ARCHITECTURES
            .into_iter()
            .find(|a| name.starts_with(a))
            .unwrap();
        let io = io(arch);
        let x = &io["x"];
        let (acts, recon) = outputs(&sae_dir.sae, x);
        let dir = out_root.join(&name);
        saelens::save(&dir, &sae_dir, keep.is_some()).unwrap();
        let dtype = sae_dir.sae.w_enc.dtype();
        let reloaded = saelens::load(&dir, &Device::Cpu, dtype).unwrap();
        assert_eq!(reloaded.metadata, sae_dir.metadata, "{name}");
        let expected_arch = match sae_dir.sae.architecture {
            Architecture::BatchTopK { .. } => Architecture::JumpRelu,
            ref a => a.clone(),
        };
        assert_eq!(reloaded.sae.architecture, expected_arch, "{name}");
        let (acts2, recon2) = outputs(&reloaded.sae, x);
        assert_eq!(max_abs_diff(&acts, &acts2), 0.0, "{name}: encode");
        assert_eq!(max_abs_diff(&recon, &recon2), 0.0, "{name}: decode");
        if name != "topk_rescale" {
            // Still SAELens's outputs (the rescaled variant has no SAELens reference here).
            assert!(
                max_abs_diff(&acts, &io["feature_acts"]) <= TOLERANCE,
                "{name}"
            );
        }
        if keep.is_some() {
            write_io(&dir.join("io.safetensors"), x, &acts, &recon);
            if name == "topk_rescale" {
                // The unfolded source folder too, for sae_lens to compute with rescaling.
                let src = dir.with_file_name("topk_rescale_src");
                std::fs::create_dir_all(&src).unwrap();
                for file in [saelens::CONFIG_FILE, saelens::WEIGHTS_FILE] {
                    std::fs::copy(
                        scratch.path().join("topk_rescale_src").join(file),
                        src.join(file),
                    )
                    .unwrap();
                }
                write_io(&src.join("io.safetensors"), x, &acts, &recon);
            }
        }
    }
}
