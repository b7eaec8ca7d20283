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

const ARCHITECTURES: [&str; 8] = [
    "standard",
    "topk",
    "batchtopk",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
];
const TOLERANCE: f32 = 1e-5;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/saelens")
        .join(arch)
}

/// `x`, `feature_acts` and `reconstruction` (and a transcoder's `output`) as SAELens computed
/// them.
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
            "standard" | "transcoder" | "skip_transcoder" => Architecture::Standard,
            "topk" => Architecture::TopK { k: 4 },
            // SAELens saves a BatchTopK SAE as a JumpReLU.
            _ => Architecture::JumpRelu,
        };
        assert_eq!(loaded.sae.architecture, expected, "{arch}");
        assert_eq!(loaded.metadata.model_name, "fixture");
        assert_eq!(loaded.metadata.context_size, 32);
        let transcoder = arch.contains("transcoder");
        assert_eq!(loaded.sae.transcoder, transcoder, "{arch}");
        assert_eq!(loaded.sae.w_skip.is_some(), arch.contains("skip"), "{arch}");
        if transcoder {
            assert_eq!(loaded.metadata.hook_name, "blocks.0.mlp.hook_in");
            assert_eq!(loaded.metadata.hook_name_out, "blocks.0.hook_mlp_out");
            assert_eq!((loaded.sae.d_in(), loaded.sae.d_out()), (16, 12), "{arch}");
        } else {
            assert_eq!(loaded.metadata.hook_name, "blocks.0.mlp.hook_post");
            assert_eq!(loaded.metadata.hook_name_out, "");
        }
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
        // A transcoder's forward (with its skip path); an SAE's output is its reconstruction.
        let output = loaded.sae.output(&io["x"]).unwrap();
        let expected = io.get("output").unwrap_or(&io["reconstruction"]);
        assert_eq!(io.contains_key("output"), transcoder, "{arch}");
        let d = max_abs_diff(&output, expected);
        assert!(
            d <= TOLERANCE,
            "{arch}: output differs from sae_lens by {d}"
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
    // A top-k transcoder (sparsify's kind; SAELens has no such class): saved as `topk` with
    // `d_out` and `hook_name_out`.
    let mut topk_transcoder = load(&fixture("topk"));
    topk_transcoder.sae.transcoder = true;
    topk_transcoder.sae.apply_b_dec_to_input = false;
    topk_transcoder.metadata.hook_name_out = "blocks.0.hook_mlp_out".into();
    cases.push(("topk_transcoder".into(), topk_transcoder));
    cases
}

/// In the SAE's dtype (SAELens's decode wants activations of its own dtype); a transcoder's
/// `output` too.
fn write_io(path: &Path, sae: &Sae, x: &Tensor, acts: &Tensor, recon: &Tensor) {
    let x = x.to_dtype(acts.dtype()).unwrap();
    let mut map = HashMap::from([
        ("feature_acts".to_string(), acts.clone()),
        ("reconstruction".to_string(), recon.clone()),
    ]);
    if sae.transcoder {
        map.insert("output".to_string(), sae.output(&x).unwrap());
    }
    map.insert("x".to_string(), x);
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn saved_saes_reload_to_identical_outputs() {
    let scratch = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("MONOSCOPE_SAVE_FIXTURES_TO").map(PathBuf::from);
    let out_root = keep.clone().unwrap_or_else(|| scratch.path().join("saved"));
    for (name, sae_dir) in saved_cases(scratch.path()) {
        // The longest fixture name the case starts with (`jumprelu_transcoder`, not `jumprelu`).
        let arch = ARCHITECTURES
            .into_iter()
            .filter(|a| name.starts_with(a))
            .max_by_key(|a| a.len())
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
        assert_eq!(reloaded.sae.transcoder, sae_dir.sae.transcoder, "{name}");
        let (acts2, recon2) = outputs(&reloaded.sae, x);
        assert_eq!(max_abs_diff(&acts, &acts2), 0.0, "{name}: encode");
        assert_eq!(max_abs_diff(&recon, &recon2), 0.0, "{name}: decode");
        let (out, out2) = (sae_dir.sae.output(x), reloaded.sae.output(x));
        assert_eq!(
            max_abs_diff(&out.unwrap(), &out2.unwrap()),
            0.0,
            "{name}: output"
        );
        if name != "topk_rescale" && name != "topk_transcoder" {
            // Still SAELens's outputs (the rescaled variant has no SAELens reference here).
            assert!(
                max_abs_diff(&acts, &io["feature_acts"]) <= TOLERANCE,
                "{name}"
            );
        }
        if keep.is_some() {
            write_io(&dir.join("io.safetensors"), &sae_dir.sae, x, &acts, &recon);
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
                write_io(&src.join("io.safetensors"), &sae_dir.sae, x, &acts, &recon);
            }
        }
    }
}

/// Copies the `arch` fixture into `scratch/name`, with `edit` applied to its cfg.json.
fn edited_fixture(
    scratch: &Path,
    arch: &str,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture(arch).join(saelens::WEIGHTS_FILE),
        dir.join(saelens::WEIGHTS_FILE),
    )
    .unwrap();
    let text = std::fs::read_to_string(fixture(arch).join(saelens::CONFIG_FILE)).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join(saelens::CONFIG_FILE), cfg.to_string()).unwrap();
    dir
}

#[test]
fn transcoders_that_cannot_hold_are_refused_by_key() {
    let scratch = tempfile::tempdir().unwrap();
    // SAELens itself refuses a transcoder that subtracts b_dec (of the output width) from
    // its input.
    let dir = edited_fixture(scratch.path(), "transcoder", "b_dec_in", |cfg| {
        cfg["apply_b_dec_to_input"] = true.into();
    });
    let err = saelens::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("apply_b_dec_to_input"), "{err}");
    // A d_out that disagrees with the weights names the tensor.
    let dir = edited_fixture(scratch.path(), "transcoder", "d_out", |cfg| {
        cfg["d_out"] = 16.into();
    });
    let err = saelens::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("W_dec") && err.contains("sae_weights"),
        "{err}"
    );
    // A skip transcoder without W_skip.
    let dir = edited_fixture(scratch.path(), "transcoder", "no_skip", |cfg| {
        cfg["architecture"] = "skip_transcoder".into();
    });
    let err = saelens::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("W_skip"), "{err}");
    // SAELens has no top-k skip transcoder: saving one is refused and writes nothing.
    let mut sae_dir = load(&fixture("skip_transcoder"));
    sae_dir.sae.architecture = Architecture::TopK { k: 4 };
    let out = scratch.path().join("topk_skip");
    let err = saelens::save(&out, &sae_dir, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("skip transcoder"), "{err}");
    assert!(!out.exists());
}
