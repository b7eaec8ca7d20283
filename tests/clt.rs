//! Cross-layer transcoders trained by monoscope (`clt train`) and the replacement-model score
//! (`clt eval`): the saved folder reads back through circuit-tracer's CLT loader and computes
//! what the trainer computes, it traces, the score agrees with `sae eval` where both apply, and
//! bad input is refused by name.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use common::monoscope_json;
use monoscope::Model;
use monoscope::attribution_graph::fidelity::score;
use monoscope::attribution_graph::{LayerTranscoder, load_each};
use monoscope::model::HookPoint;
use monoscope::sae::activations::{ActivationSource, ChunkSource, Corpus, WindowSettings};
use monoscope::sae::clt::{Checkpoints, CltConfig, TrainedClt, train, train_checkpointed};
use monoscope::sae::eval::{EvalSettings, evaluate};

fn world_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world")
}

fn world() -> Model {
    Model::load(&world_dir(), &Device::Cpu, DType::F32).unwrap()
}

fn windows() -> WindowSettings {
    WindowSettings {
        context_size: 32,
        windows_per_forward: 8,
        ..WindowSettings::default()
    }
}

/// Every layer's `hook_resid_mid` and `hook_mlp_out` side by side, as `clt train` reads them.
fn clt_source(model: &Model) -> ActivationSource<'_> {
    let n = model.dims().n_layers;
    let columns: Vec<HookPoint> = (1..n)
        .map(HookPoint::ResidMid)
        .chain((0..n).map(HookPoint::MlpOut))
        .collect();
    ActivationSource::new(
        model,
        Corpus::parse("world", "text").unwrap(),
        "blocks.0.hook_resid_mid",
        windows(),
    )
    .unwrap()
    .with_columns(&columns)
    .unwrap()
}

/// What the loaded transcoders predict for every layer's MLP output from `rows`' inputs:
/// each layer's features encoded from its input, written through `decoder_rows` to its own
/// layer and every later one, plus each layer's `b_dec`.
fn loaded_predictions(transcoders: &[LayerTranscoder], rows: &Tensor, d: usize) -> Vec<Tensor> {
    let n = transcoders.len();
    let mut sums: Vec<Tensor> = transcoders
        .iter()
        .map(|t| {
            t.sae
                .b_dec
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((rows.dim(0).unwrap(), d))
                .unwrap()
                .contiguous()
                .unwrap()
        })
        .collect();
    for (l, t) in transcoders.iter().enumerate() {
        let x = rows.narrow(1, l * d, d).unwrap();
        let acts = t.sae.encode(&x).unwrap();
        let all: Vec<u32> = (0..acts.dim(1).unwrap() as u32).collect();
        for (layer, w) in t.decoder_rows(&all).unwrap() {
            assert!(layer < n);
            sums[layer] = (&sums[layer] + acts.matmul(&w).unwrap()).unwrap();
        }
    }
    sums
}

/// A CLT trained on the world model's activations, saved, reads back through the loader that
/// reads circuit-tracer's CLTs (one transcoder per layer, later decoders mapped), and that
/// reading computes what the trainer computes for every layer's MLP output; training lowered
/// the error.
#[test]
fn a_trained_clt_reads_back_as_circuit_tracers_format_and_predicts_what_it_learnt() {
    let model = world();
    let n = model.dims().n_layers;
    let d = model.dims().d_model;
    let mut source = clt_source(&model);
    assert_eq!(source.d_in(), 2 * n * d);
    let mut config = CltConfig::new(n, d, d, 96, 4);
    config.batch_size = 128;
    config.total_steps = 60;
    let mut metrics = Vec::new();
    let (trainer, finished) = train(&mut source, config, 1024, &AtomicBool::new(false), |m| {
        metrics.push(m.clone())
    })
    .unwrap();
    assert!(finished);
    let (first, last) = (&metrics[0], metrics.last().unwrap());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&last.fvu) < 0.8 * mean(&first.fvu),
        "{first:?} → {last:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clt");
    trainer
        .save(&out, DType::F32, ("hook_resid_mid", "hook_mlp_out"), &[])
        .unwrap();
    let config = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(
        config.contains("model_kind: cross_layer_transcoder"),
        "{config}"
    );
    let transcoders = load_each(std::slice::from_ref(&out), &model).unwrap();
    assert_eq!(transcoders.len(), n);
    assert_eq!(transcoders[0].later.count(), n - 1);

    let rows = source.next_chunk().unwrap();
    let count = rows.len() / (2 * n * d);
    let tensor = Tensor::from_slice(&rows, (count, 2 * n * d), &Device::Cpu).unwrap();
    let loaded = loaded_predictions(&transcoders, &tensor, d);
    for (layer, loaded) in loaded.iter().enumerate() {
        let expected =
            Tensor::from_vec(trainer.predict(&rows, layer), (count, d), &Device::Cpu).unwrap();
        let gap = common::max_abs_diff(loaded, &expected);
        let size = common::max_abs(&expected);
        assert!(
            size > 0.0 && gap <= 1e-4 * size,
            "layer {layer}: {gap} of {size}"
        );
    }

    // The replacement score's open-loop FVU of each layer counts every feature that writes
    // it, from its own layer and earlier ones: the same windows worked out from the reading
    // above.
    let report = score(
        &mut ActivationSource::new(
            &model,
            Corpus::parse("world", "text").unwrap(),
            "blocks.0.hook_resid_mid",
            windows(),
        )
        .unwrap(),
        &transcoders,
        windows().windows_per_forward,
        |_, _| {},
    )
    .unwrap();
    let rows = clt_source(&model).next_chunk().unwrap();
    let count = rows.len() / (2 * n * d);
    assert_eq!(report.tokens, count);
    let tensor = Tensor::from_slice(&rows, (count, 2 * n * d), &Device::Cpu).unwrap();
    for (layer, predicted) in loaded_predictions(&transcoders, &tensor, d)
        .iter()
        .enumerate()
    {
        let y = tensor.narrow(1, (n + layer) * d, d).unwrap();
        let error = (predicted - &y).unwrap().sqr().unwrap().sum_all().unwrap();
        let centred = y.broadcast_sub(&y.mean_keepdim(0).unwrap()).unwrap();
        let variance = centred.sqr().unwrap().sum_all().unwrap();
        let fvu = f64::from((error / variance).unwrap().to_scalar::<f32>().unwrap());
        let reported = report.layers[layer].fvu;
        assert!(
            (reported - fvu).abs() <= 1e-3 * fvu,
            "layer {layer}: {reported} vs {fvu}"
        );
    }
}

/// With one per-layer transcoder, the replacement-model score is `sae eval` of that
/// transcoder: the same FVU and L0 at its layer, the same CE with it spliced in and with the
/// MLP output zeroed (two separate code paths over the same windows).
#[test]
fn the_replacement_score_of_one_transcoder_is_its_sae_eval() {
    let model = world();
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/transcoders/world-btk-skip/layer_4");
    let transcoders = load_each(std::slice::from_ref(&dir), &model).unwrap();
    let new_source = || {
        ActivationSource::new(
            &model,
            Corpus::parse("world:7", "text").unwrap(),
            "blocks.4.mlp.hook_in",
            windows(),
        )
        .unwrap()
    };
    let report = score(&mut new_source(), &transcoders, 16, |_, _| {}).unwrap();
    let t = &transcoders[0];
    let eval = evaluate(
        &mut new_source(),
        &t.sae,
        t.site.output,
        &EvalSettings {
            windows: 16,
            dense_threshold: 0.1,
        },
        |_, _| {},
    )
    .unwrap();
    assert_eq!(report.tokens, eval.tokens);
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.layers[0].layer, 4);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    assert!(close(report.layers[0].fvu, eval.fvu), "{report:?} {eval:?}");
    assert!(close(report.layers[0].l0, eval.l0), "{report:?} {eval:?}");
    assert!(close(report.ce_clean, eval.ce_clean), "{report:?} {eval:?}");
    assert!(
        close(report.ce_replaced, eval.ce_sae),
        "{report:?} {eval:?}"
    );
    assert!(close(report.ce_zero, eval.ce_zero), "{report:?} {eval:?}");
    assert!(
        close(report.kl_replaced, eval.kl_sae),
        "{report:?} {eval:?}"
    );
    assert!(report.top1_agreement > 0.5 && report.top1_agreement <= 1.0);
}

fn monoscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap()
}

/// `clt train` end to end on the world model: a folder in circuit-tracer's format with its
/// training log, scored right after training; `clt eval` scores it again; `attribute` traces
/// through it.
#[test]
fn clt_train_writes_a_folder_that_scores_and_traces() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clt");
    let out_str = out.to_str().unwrap();
    let report = monoscope_json(&[
        "clt",
        "train",
        "--out",
        out_str,
        "--features",
        "64",
        "--k",
        "4",
        "--tokens",
        "4096",
        "--batch-size",
        "256",
        "--context-size",
        "32",
        "--eval-windows",
        "4",
        "--json",
    ]);
    assert_eq!(report["finished"], true);
    assert_eq!(report["last_step"]["step"], 16);
    assert_eq!(report["last_step"]["fvu"].as_array().unwrap().len(), 8);
    let evaluation = &report["evaluation"];
    assert_eq!(evaluation["layers"].as_array().unwrap().len(), 8);
    let recovered = evaluation["ce_loss_recovered"].as_f64().unwrap();
    assert!(recovered.is_finite(), "{evaluation}");
    // The saved JumpReLUs fire about k features a token, as BatchTopK did in training.
    for layer in evaluation["layers"].as_array().unwrap() {
        let l0 = layer["l0"].as_f64().unwrap();
        assert!((2.0..=8.0).contains(&l0), "{evaluation}");
    }
    for l in 0..8 {
        assert!(out.join(format!("W_enc_{l}.safetensors")).is_file());
        assert!(out.join(format!("W_dec_{l}.safetensors")).is_file());
    }
    let log = std::fs::read_to_string(out.join("training-metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}"); // steps 10 and 16

    let again = monoscope_json(&[
        "clt",
        "eval",
        "--transcoders",
        out_str,
        "--context-size",
        "32",
        "--windows",
        "4",
        "--corpus",
        "world:1",
        "--json",
    ]);
    assert_eq!(again["tokens"], evaluation["tokens"]);
    assert_eq!(again["ce_replaced"], evaluation["ce_replaced"]);

    let graph = dir.path().join("graph.json");
    let o = monoscope(&[
        "attribute",
        "--prompt",
        "The capital of Japan is",
        "--transcoders",
        out_str,
        "--out",
        graph.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&graph).unwrap()).unwrap();
    assert!(!file["nodes"].as_array().unwrap().is_empty());
}

/// 25 steps of 128 tokens: the log keeps steps 10 and 20 and the last, and features die after
/// two steps without firing, so that AuxK and the firing counters shape the weights.
fn small_config(model: &Model) -> CltConfig {
    let (n, d) = (model.dims().n_layers, model.dims().d_model);
    let mut config = CltConfig::new(n, d, d, 48, 4);
    config.batch_size = 128;
    config.total_steps = 25;
    config.warmup_steps = 2;
    config.decay_steps = 5;
    config.dead_after_tokens = 256;
    config
}

/// Trains a small CLT on the world model with checkpoints in `dir`; `stop_at` sets the cancel
/// flag after that step.
fn checkpointed_run(dir: &Path, resume: bool, stop_at: Option<u64>) -> TrainedClt {
    let model = world();
    let checkpoints = Checkpoints {
        dir: dir.to_path_buf(),
        every_tokens: 2 * 128,
        resume,
        identity: "the world model".into(),
    };
    let cancel = AtomicBool::new(false);
    train_checkpointed(
        &mut clt_source(&model),
        small_config(&model),
        512,
        &cancel,
        &checkpoints,
        |m| {
            if Some(m.step) == stop_at {
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        },
    )
    .unwrap()
}

#[test]
fn a_resumed_clt_run_reaches_the_weights_of_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = checkpointed_run(&tmp.path().join("straight"), false, None);
    assert!(straight.finished);
    let steps: Vec<u64> = straight.log.iter().map(|m| m.step).collect();
    assert_eq!(steps, [10, 20, 25]);
    assert!(
        straight
            .log
            .iter()
            .any(|m| m.dead_fraction.iter().any(|&d| d > 0.0)),
        "some features die, so AuxK acts: {:?}",
        straight.log
    );

    let resumed_dir = tmp.path().join("resumed");
    let stopped = checkpointed_run(&resumed_dir, false, Some(12));
    assert!(!stopped.finished);
    let steps: Vec<u64> = stopped.log.iter().map(|m| m.step).collect();
    assert_eq!(steps, [10, 12]);
    let checkpoint = resumed_dir.join("training/checkpoint");
    assert!(checkpoint.join("state.json").is_file());
    let resumed = checkpointed_run(&resumed_dir, true, None);
    assert!(resumed.finished);

    // The same metrics at every logged step (step 10's read back from the checkpoint), and
    // the same saved tensors, bit for bit.
    assert_eq!(resumed.log, straight.log);
    let (a, b) = (
        straight.trainer.tensors(DType::F32).unwrap(),
        resumed.trainer.tensors(DType::F32).unwrap(),
    );
    for (layer, ((enc_a, dec_a), (enc_b, dec_b))) in a.iter().zip(&b).enumerate() {
        for (key, t) in enc_a.iter().chain(dec_a) {
            let u = enc_b.get(key).or_else(|| dec_b.get(key)).unwrap();
            let (t, u) = (
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(t, u, "layer {layer}: {key}");
        }
    }

    // Saving puts the CLT at its name and drops the run's checkpoint.
    let out = tmp.path().join("clt");
    resumed
        .trainer
        .finish_in(
            &resumed_dir,
            &out,
            DType::F32,
            ("hook_resid_mid", "hook_mlp_out"),
            &[],
        )
        .unwrap();
    assert!(out.join("W_enc_0.safetensors").is_file() && out.join("config.yaml").is_file());
    assert!(!out.join("training").exists() && !resumed_dir.exists());

    // A checkpoint of other settings is refused by name (the straight run's last one).
    let checkpoint = tmp.path().join("straight/training/checkpoint");
    std::fs::write(
        checkpoint.join("state.json"),
        std::fs::read_to_string(checkpoint.join("state.json"))
            .unwrap()
            .replace("\"k\": 4", "\"k\": 5"),
    )
    .unwrap();
    let model = world();
    let err = train_checkpointed(
        &mut clt_source(&model),
        small_config(&model),
        512,
        &AtomicBool::new(false),
        &Checkpoints {
            dir: tmp.path().join("straight"),
            every_tokens: 0,
            resume: true,
            identity: "the world model".into(),
        },
        |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("other settings") && err.contains("k: 5 → 4"),
        "{err}"
    );
}

#[test]
fn clt_train_points_an_interrupted_run_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clt");
    let out_str = out.to_str().unwrap();
    // Nothing to resume: the missing checkpoint is named.
    fails_naming(
        &["clt", "train", "--out", out_str, "--resume"],
        "training checkpoint to resume from",
    );
    // An interrupted run's folder beside --out: a fresh start is refused, with the way on.
    std::fs::create_dir_all(dir.path().join(".clt.partial/training/checkpoint")).unwrap();
    fails_naming(&["clt", "train", "--out", out_str], "pass --resume");
    assert!(!out.exists());
}

fn fails_naming(args: &[&str], needle: &str) {
    let o = monoscope(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_clt_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("notes.txt"), "mine").unwrap();
    let fresh = dir.path().join("fresh");
    let fresh = fresh.to_str().unwrap();
    let short = ["--batch-size", "128", "--features", "32"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["clt", "train", "--out", fresh];
        args.extend(short);
        args.extend(extra);
        args
    };
    fails_naming(
        &["clt", "train", "--out", taken.to_str().unwrap()],
        "not empty",
    );
    assert_eq!(
        std::fs::read_to_string(taken.join("notes.txt")).unwrap(),
        "mine"
    );
    fails_naming(&with(&["--tokens", "256", "--k", "33"]), "value for k");
    fails_naming(&with(&["--tokens", "256", "--k", "0"]), "value for k");
    fails_naming(
        &with(&["--tokens", "256", "--output-hook", "hook_resid_post"]),
        "hook_resid_mid → hook_resid_post",
    );
    fails_naming(&with(&["--tokens", "0"]), "tokens");
    fails_naming(&with(&["--input-hook", "hook_nonsense"]), "hook_nonsense");
    fails_naming(
        &with(&["--corpus", "/no/such/corpus.txt"]),
        "/no/such/corpus.txt",
    );
    assert!(!Path::new(fresh).exists());
    fails_naming(
        &["clt", "eval", "--transcoders", "/no/such/clt"],
        "/no/such/clt",
    );
    let wrong = dir.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    fails_naming(
        &["clt", "eval", "--transcoders", wrong.to_str().unwrap()],
        "holds no transcoder",
    );
    let layer_4 =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/transcoders/world-btk-skip/layer_4");
    let layer_4 = layer_4.to_str().unwrap();
    fails_naming(
        &[
            "clt",
            "eval",
            "--transcoders",
            layer_4,
            "--transcoders",
            layer_4,
        ],
        "two for layer 4",
    );
}
