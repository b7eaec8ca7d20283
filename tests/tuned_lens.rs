//! The tuned lens: the untrained lens is the logit lens, training on the world corpus brings
//! every depth's read-out closer to the model's prediction on held-out text, lens files
//! round-trip and bad ones are refused, and `lens --tuned` reads through one.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, max_abs_diff};
use monoscope::lens::{LensRequest, lens};
use monoscope::model::{HookPoint, Model};
use monoscope::sae::activations::Corpus;
use monoscope::tuned_lens::{TrainSettings, TunedLens, depths, evaluate, train};

fn world() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    Model::load(&dir, &Device::Cpu, DType::F32).unwrap()
}

fn request(model: &Model, tuned: Option<Arc<TunedLens>>) -> LensRequest {
    LensRequest {
        ids: model.encode_prompt("The capital of Japan is").unwrap(),
        position: None,
        target: None,
        versus: None,
        top_k: 3,
        grid: true,
        tuned,
    }
}

/// Zero translators read exactly what the logit lens reads; a translator changes its own
/// depth's row (by `h + h·Aᵀ + b`, checked by hand) and no other.
#[test]
fn the_untrained_lens_is_the_logit_lens_and_a_translator_moves_its_depth_only() {
    let model = Model::load(&fixture_dir("llama"), &Device::Cpu, DType::F32).unwrap();
    let plain = lens(&model, &request(&model, None)).unwrap();
    let identity = Arc::new(TunedLens::identity(&model).unwrap());
    let same = lens(&model, &request(&model, Some(identity.clone()))).unwrap();
    assert!(same.tuned && !plain.tuned);
    for (a, b) in plain.lens.iter().zip(&same.lens) {
        assert_eq!(a.target_prob, b.target_prob, "{}", a.hook);
    }
    assert_eq!(
        depths(&model),
        vec![HookPoint::ResidPre(0), HookPoint::ResidPost(0)],
        "two blocks: the stream entering block 0 and leaving block 0"
    );

    let d = model.dims().d_model;
    let mut moved = (*identity).clone();
    let translator = &mut moved.translators[1];
    translator.weight = Tensor::randn(0f32, 0.3, (d, d), &Device::Cpu).unwrap();
    translator.bias = Tensor::randn(0f32, 0.3, d, &Device::Cpu).unwrap();
    let h = Tensor::randn(0f32, 1.0, (3, d), &Device::Cpu).unwrap();
    let by_hand = (&h
        + h.matmul(&translator.weight.t().unwrap())
            .unwrap()
            .broadcast_add(&translator.bias)
            .unwrap())
    .unwrap();
    assert!(max_abs_diff(&translator.apply(&h).unwrap(), &by_hand) < 1e-5);
    let tuned = lens(&model, &request(&model, Some(Arc::new(moved)))).unwrap();
    let rows: Vec<(f32, f32)> = plain
        .lens
        .iter()
        .zip(&tuned.lens)
        .map(|(a, b)| (a.target_prob, b.target_prob))
        .collect();
    assert_eq!(
        rows[0].0, rows[0].1,
        "block 0's input has its own translator"
    );
    assert_ne!(rows[1].0, rows[1].1, "the translated depth should move");
    assert_eq!(
        rows[2].0, rows[2].1,
        "the last block is the model's own read-out"
    );
}

/// Training on the world corpus brings every depth closer to the model's prediction on a
/// world corpus of a seed training never saw: the tuned lens's KL is below the logit lens's
/// at each depth.
#[test]
fn training_beats_the_logit_lens_at_every_depth_on_held_out_text() {
    let model = world();
    let settings = TrainSettings::new(Corpus::World { seed: 0 }, 16_384);
    let mut last = 0;
    let lens = train(&model, &settings, &AtomicBool::new(false), &mut |r| {
        assert_eq!(r.step, last + 1);
        assert!(r.kl.is_finite());
        last = r.step;
    })
    .unwrap()
    .unwrap();
    assert_eq!(last, settings.steps());
    let report = evaluate(&model, &lens, &Corpus::World { seed: 4242 }, 4_096).unwrap();
    assert_eq!(report.len(), model.dims().n_layers);
    for depth in &report {
        assert!(
            depth.tuned_lens < depth.logit_lens,
            "{}: tuned {} against logit lens {}",
            depth.hook,
            depth.tuned_lens,
            depth.logit_lens
        );
    }
}

/// A lens file round-trips exactly; a file of another shape of model, a wrong shape, a stray tensor or
/// a missing file is refused by name; a cancelled training writes nothing.
#[test]
fn lens_files_round_trip_and_bad_ones_are_refused() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let d = model.dims().d_model;
    let mut lens = TunedLens::identity(&model).unwrap();
    for t in &mut lens.translators {
        t.weight = Tensor::randn(0f32, 1.0, (d, d), &Device::Cpu).unwrap();
        t.bias = Tensor::randn(0f32, 1.0, d, &Device::Cpu).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lens.safetensors");
    lens.save(&path).unwrap();
    let back = TunedLens::load(&path, &model).unwrap();
    for (a, b) in lens.translators.iter().zip(&back.translators) {
        assert_eq!(a.hook, b.hook);
        assert_eq!(max_abs_diff(&a.weight, &b.weight), 0.0);
        assert_eq!(max_abs_diff(&a.bias, &b.bias), 0.0);
    }

    // Any model of the same depths and width can read a lens; the world model cannot.
    let err = TunedLens::load(&path, &world()).unwrap_err().to_string();
    assert!(err.contains("lens.safetensors"), "{err}");

    let write = |name: &str, tensors: Vec<(String, Tensor)>| -> PathBuf {
        let path = dir.path().join(name);
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
        path
    };
    let mut tensors: Vec<(String, Tensor)> = lens
        .translators
        .iter()
        .flat_map(|t| {
            [
                (format!("{}.weight", t.hook), t.weight.clone()),
                (format!("{}.bias", t.hook), t.bias.clone()),
            ]
        })
        .collect();
    tensors.push((
        "stray".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    ));
    let stray = write("stray.safetensors", tensors.clone());
    let err = TunedLens::load(&stray, &model).unwrap_err().to_string();
    assert!(err.contains("stray"), "{err}");
    tensors.pop();
    tensors[0].1 = Tensor::zeros((d, d - 1), DType::F32, &Device::Cpu).unwrap();
    let narrow = write("narrow.safetensors", tensors);
    let err = TunedLens::load(&narrow, &model).unwrap_err().to_string();
    assert!(err.contains("blocks.0.hook_resid_pre.weight"), "{err}");
    let err = TunedLens::load(&dir.path().join("absent"), &model)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent"), "{err}");

    let settings = TrainSettings::new(Corpus::World { seed: 0 }, 1_000);
    let cancelled = train(&model, &settings, &AtomicBool::new(true), &mut |_| {}).unwrap();
    assert!(cancelled.is_none());
    let zero = TrainSettings::new(Corpus::World { seed: 0 }, 0);
    let err = train(&model, &zero, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--tokens"), "{err}");
}

/// `tuned-lens train` writes a lens that `tuned-lens eval` scores and `lens --tuned` reads
/// through.
#[test]
fn the_commands_train_evaluate_and_read_through_a_lens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lens.safetensors");
    let model_dir = fixture_dir("qwen2");
    let (model_dir, out_path) = (model_dir.to_str().unwrap(), out.to_str().unwrap());
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "tuned-lens",
            "train",
            "--model",
            model_dir,
            "--tokens",
            "2048",
        ])
        .args(["--context-size", "32", "--out", out_path])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let eval = common::monoscope_json(&[
        "tuned-lens",
        "eval",
        "--model",
        model_dir,
        "--lens",
        out_path,
        "--tokens",
        "512",
        "--json",
    ]);
    assert_eq!(eval["depths"].as_array().unwrap().len(), 2);
    let read = common::monoscope_json(&[
        "lens",
        "--model",
        model_dir,
        "--prompt",
        "The capital of Japan is",
        "--tuned",
        out_path,
        "--json",
    ]);
    assert_eq!(read["tuned"], true);
}
