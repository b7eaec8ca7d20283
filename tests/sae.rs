//! SAE training on a real (tiny) model: exact resume, cancellation, the activation cache,
//! evaluation, and clear errors for bad input.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, max_abs_diff};
use monoscope::Model;
use monoscope::model::HookPoint;
use monoscope::sae::activations::{ActivationSource, ChunkSource, Corpus, WindowSettings};
use monoscope::sae::eval::{EvalSettings, evaluate};
use monoscope::sae::run::{RunControl, RunOutcome, RunSettings, StepEngine, run};
use monoscope::sae::saelens::{self, SaeMetadata};
use monoscope::sae::train::{StepMetrics, TrainArchitecture, TrainConfig};

const HOOK: &str = "blocks.1.mlp.hook_post";

fn model() -> Model {
    Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap()
}

/// A small plain-text corpus: one document per line (blank lines are skipped).
fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    let docs: Vec<String> = (0..60)
        .map(|i| {
            format!(
                "Document {i}. The capital of country {i} is city {}. It lies by the river {}.",
                i * 7 % 13,
                i % 5
            )
        })
        .collect();
    std::fs::write(&path, docs.join("\n\n")).unwrap();
    path
}

fn windows() -> WindowSettings {
    WindowSettings {
        context_size: 16,
        windows_per_forward: 4,
        ..WindowSettings::default()
    }
}

fn source<'m>(model: &'m Model, corpus: &Path) -> ActivationSource<'m> {
    ActivationSource::new(
        model,
        Corpus::parse(corpus.to_str().unwrap(), "text").unwrap(),
        HOOK,
        windows(),
    )
    .unwrap()
}

fn settings(d_in: usize, steps: u64) -> RunSettings {
    let mut train = TrainConfig::new(
        TrainArchitecture::TopK {
            k: 4,
            aux_k: 8,
            aux_coefficient: 1.0 / 32.0,
        },
        d_in,
        4 * d_in,
    );
    train.batch_size = 32;
    train.total_steps = steps;
    train.lr = 1e-3;
    train.decay_steps = steps / 4;
    // Small enough that some latents go dead and AuxK runs.
    train.dead_after_tokens = 96;
    RunSettings {
        train,
        buffer_rows: 128,
        normalize: true,
        checkpoint_every_tokens: 0,
        log_every_steps: 1,
        save_dtype: Default::default(),
    }
}

fn metadata(source: &ActivationSource) -> SaeMetadata {
    SaeMetadata {
        model_name: "gpt2-fixture".into(),
        hook_name: HOOK.into(),
        context_size: 16,
        prepend_bos: true,
        dataset_path: source.corpus().describe(),
        hook_name_out: String::new(),
    }
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(saelens::WEIGHTS_FILE), &Device::Cpu).unwrap()
}

/// Trains `s` from `src` into `out` without interruption; the last step's metrics.
fn train_to_end(
    src: &mut ActivationSource,
    s: &RunSettings,
    meta: &SaeMetadata,
    out: &Path,
) -> StepMetrics {
    let never = AtomicBool::new(false);
    match run(src, s, meta, out, RunControl::new(&never), |_| {}).unwrap() {
        RunOutcome::Finished(last) => last,
        other => panic!("not finished: {other:?}"),
    }
}

/// Trains into `out` on `engine`, cancelled after step 9 (a checkpoint is written); calls
/// `between` with the checkpointed folder, then resumes in a fresh source (from
/// `make_source`) to the end.
fn cancel_at_9_then_resume<'m>(
    make_source: impl Fn() -> ActivationSource<'m>,
    meta: &SaeMetadata,
    s: &RunSettings,
    out: &Path,
    engine: StepEngine,
    between: impl FnOnce(),
) {
    let cancel = AtomicBool::new(false);
    let control = RunControl::new(&cancel).on(engine.clone());
    let outcome = run(&mut make_source(), s, meta, out, control, |m| {
        if m.step == 9 {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert_eq!(outcome, RunOutcome::Cancelled { step: 9 });
    between();
    let never = AtomicBool::new(false);
    let control = RunControl::new(&never).on(engine).resuming(true);
    run(&mut make_source(), s, meta, out, control, |_| {}).unwrap();
}

/// Each of `keys` agrees in `a` and `b` to 1e-3 of its largest value.
fn assert_close_relative(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    keys: &[&str],
    what: &str,
) {
    for &key in keys {
        let err = max_abs_diff(&a[key], &b[key]) / common::max_abs(&a[key]);
        assert!(err < 1e-3, "{what}: {key} differs by {err} (relative)");
    }
}

/// Trains the test SAE with the CPU kernels and with the tensor engine on `device`, checks
/// that they reach the same weights, and returns the tensor engine's output folder.
fn engines_train_the_same_sae(model: &Model, text: &Path, dir: &Path, device: Device) -> PathBuf {
    let never = AtomicBool::new(false);
    let (kernels_dir, tensors_dir) = (dir.join("kernels"), dir.join("tensors"));
    let mut src = source(model, text);
    let s = settings(src.d_in(), 24);
    let meta = metadata(&src);
    run(
        &mut src,
        &s,
        &meta,
        &kernels_dir,
        RunControl::new(&never),
        |_| {},
    )
    .unwrap();
    let mut src = source(model, text);
    let mut aux_ran = false;
    let tensors = RunControl::new(&never).on(StepEngine::Tensors(device));
    run(&mut src, &s, &meta, &tensors_dir, tensors, |m| {
        aux_ran |= m.auxiliary_loss > 0.0;
    })
    .unwrap();
    assert!(aux_ran, "no latent went dead, so AuxK was not exercised");
    let (a, b) = (weights(&kernels_dir), weights(&tensors_dir));
    assert_close_relative(&a, &b, &["W_enc", "W_dec", "b_enc", "b_dec"], "the engines");
    tensors_dir
}

/// The tensor engine (what trains on a CUDA device), run on the CPU: it trains the SAE the
/// hand-written kernels train, and a cancelled run resumes to the same weights bit for bit.
#[test]
fn the_tensor_engine_trains_the_same_sae_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let tensors_dir = engines_train_the_same_sae(&model, &text, tmp.path(), Device::Cpu);
    let b = weights(&tensors_dir);
    let s = settings(source(&model, &text).d_in(), 24);
    let resumed = tmp.path().join("resumed");
    let engine = StepEngine::Tensors(Device::Cpu);
    let meta = metadata(&source(&model, &text));
    let make_source = || source(&model, &text);
    cancel_at_9_then_resume(make_source, &meta, &s, &resumed, engine, || {});
    let c = weights(&resumed);
    for key in ["W_enc", "W_dec", "b_enc", "b_dec"] {
        assert_eq!(
            max_abs_diff(&b[key], &c[key]),
            0.0,
            "{key} differs after resume"
        );
    }
}

/// The same on a CUDA GPU (a `--features cuda` build on a machine with one; skipped
/// otherwise): the SAE's steps run there, the model stays on the CPU.
#[test]
fn the_tensor_engine_on_cuda_trains_the_same_sae() {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("no CUDA in this build: skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let device = Device::new_cuda(0).unwrap();
    engines_train_the_same_sae(&model(), &text, tmp.path(), device);
}

#[test]
fn resumed_training_reaches_the_same_weights_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let never = AtomicBool::new(false);

    let straight = tmp.path().join("straight");
    let mut src = source(&model, &text);
    let s = settings(src.d_in(), 24);
    let meta = metadata(&src);
    let last = train_to_end(&mut src, &s, &meta, &straight);
    assert_eq!(last.step, 24);

    let resumed = tmp.path().join("resumed");
    let make_source = || source(&model, &text);
    cancel_at_9_then_resume(make_source, &meta, &s, &resumed, StepEngine::Cpu, || {
        assert!(resumed.join("training/checkpoint/state.json").is_file());
        assert!(!resumed.join(saelens::CONFIG_FILE).exists());
        // Without --resume the folder is refused.
        let mut src = source(&model, &text);
        let err = run(
            &mut src,
            &s,
            &meta,
            &resumed,
            RunControl::new(&never),
            |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("checkpoint"), "{err}");
    });

    let (a, b) = (weights(&straight), weights(&resumed));
    for key in ["W_enc", "W_dec", "b_enc", "b_dec"] {
        assert_eq!(
            max_abs_diff(&a[key], &b[key]),
            0.0,
            "{key} differs after resume"
        );
    }
    // The metrics log reads as one run: steps 1..=24 once each.
    let log = std::fs::read_to_string(resumed.join("training/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=24).collect::<Vec<_>>());
    // The result loads as an SAE and reconstructs the hook better than chance.
    let sae = saelens::load(&resumed, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sae.metadata.hook_name, HOOK);
    let mut src = source(&model, &text);
    let report = evaluate(
        &mut src,
        &sae.sae,
        HOOK.parse().unwrap(),
        &EvalSettings {
            windows: 8,
            dense_threshold: 0.5,
        },
        |_, _| {},
    )
    .unwrap();
    assert!(report.l0 <= 4.0 + 1e-9, "L0 {}", report.l0);
    assert!(report.fvu < 1.0, "FVU {}", report.fvu);
    assert!(report.ce_clean.is_finite() && report.ce_sae.is_finite() && report.ce_zero.is_finite());
    let binned: usize = report.density_histogram.iter().map(|b| b.latents).sum();
    let dead = (report.dead_fraction * sae.sae.d_sae() as f64).round() as usize;
    assert_eq!(binned + dead, sae.sae.d_sae());
}

#[test]
fn the_activation_cache_replays_what_the_model_computed() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let cache = tmp.path().join("cache");
    let mut fresh = source(&model, &text)
        .with_cache(&cache, DType::F32)
        .unwrap();
    let computed: Vec<Vec<f32>> = (0..3).map(|_| fresh.next_chunk().unwrap()).collect();
    // A new source reads the three cached chunks back, then computes a fourth that matches
    // an uncached source's fourth.
    let mut cached = source(&model, &text)
        .with_cache(&cache, DType::F32)
        .unwrap();
    for c in &computed {
        assert_eq!(&cached.next_chunk().unwrap(), c);
    }
    let mut plain = source(&model, &text);
    plain.skip_to(3).unwrap();
    assert_eq!(cached.next_chunk().unwrap(), plain.next_chunk().unwrap());
    // A cache made for another hook is refused.
    let other = ActivationSource::new(
        &model,
        Corpus::parse(text.to_str().unwrap(), "text").unwrap(),
        "blocks.0.mlp.hook_post",
        windows(),
    )
    .unwrap();
    let err = other.with_cache(&cache, DType::F32).err().unwrap();
    assert!(err.to_string().contains("another model, hook"), "{err}");
    // The cache is keyed by contents: the same model under another path reads it back...
    let copy = common::scratch_copy("gpt2");
    let moved = Model::load(copy.path(), &Device::Cpu, DType::F32).unwrap();
    let mut elsewhere = source(&moved, &text)
        .with_cache(&cache, DType::F32)
        .unwrap();
    assert_eq!(&elsewhere.next_chunk().unwrap(), &computed[0]);
    // ...and a corpus edited in place is not mistaken for the old one.
    let mut lines = std::fs::read_to_string(&text).unwrap();
    lines.push_str("One more document, written after the cache was made.\n");
    std::fs::write(&text, lines).unwrap();
    let err = source(&model, &text)
        .with_cache(&cache, DType::F32)
        .err()
        .unwrap();
    assert!(err.to_string().contains("corpus"), "{err}");
}

#[test]
fn special_tokens_are_left_out_of_the_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let mut with = source(&model, &text);
    let mut without = ActivationSource::new(
        &model,
        Corpus::parse(text.to_str().unwrap(), "text").unwrap(),
        HOOK,
        WindowSettings {
            exclude_special: false,
            ..windows()
        },
    )
    .unwrap();
    let d = with.d_in();
    let kept = with.next_chunk().unwrap();
    let all = without.next_chunk().unwrap();
    // Every window starts with BOS and documents end with EOS: at least one row per window.
    assert_eq!(all.len() / d, 4 * 16);
    assert!(kept.len() / d <= all.len() / d - 4);
    // The kept rows are exactly the rows of the tokens that are not special, in order.
    let ids = source(&model, &text).next_windows(4).unwrap();
    assert_eq!(ids.len(), 4 * 16);
    let expected: Vec<f32> = ids
        .iter()
        .zip(all.chunks(d))
        .filter(|(id, _)| !with.is_excluded(**id))
        .flat_map(|(_, row)| row.iter().copied())
        .collect();
    assert_eq!(kept, expected);
}

fn error_of(result: Result<impl Sized, monoscope::Error>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_gives_errors_that_name_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model();
    let text = corpus(tmp.path());
    let parse = |p: &Path| Corpus::parse(p.to_str().unwrap(), "text").unwrap();

    // A hook the model does not have.
    let e = error_of(ActivationSource::new(
        &model,
        parse(&text),
        "blocks.9.mlp.hook_post",
        windows(),
    ));
    assert!(e.contains("blocks.9.mlp.hook_post"), "{e}");

    // An empty corpus.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let mut src = ActivationSource::new(&model, parse(&empty), HOOK, windows()).unwrap();
    let e = error_of(src.next_chunk());
    assert!(e.contains("empty.txt"), "{e}");

    // A JSONL line without the text field names the file and line.
    let jsonl = tmp.path().join("c.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{\"body\": \"no text\"}\n").unwrap();
    let mut src = ActivationSource::new(&model, parse(&jsonl), HOOK, windows()).unwrap();
    let e = error_of(src.next_chunk());
    assert!(e.contains("c.jsonl, line 2") && e.contains("`text`"), "{e}");

    // NaN in the activations: a model whose MLP weights hold a NaN.
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture_dir("gpt2").join(f), broken.join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(fixture_dir("gpt2").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let key = tensors
        .keys()
        .find(|k| k.contains("h.1.mlp.c_fc.bias"))
        .unwrap()
        .clone();
    let n = tensors[&key].elem_count();
    let mut values = vec![0f32; n];
    values[3] = f32::NAN;
    tensors.insert(key, Tensor::from_vec(values, n, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, broken.join("model.safetensors")).unwrap();
    let broken_model = Model::load(&broken, &Device::Cpu, DType::F32).unwrap();
    let mut src = ActivationSource::new(&broken_model, parse(&text), HOOK, windows()).unwrap();
    let e = error_of(src.next_chunk());
    assert!(
        e.contains("NaN") && e.contains(HOOK) && e.contains("forward batch 0"),
        "{e}"
    );

    // k larger than d_sae.
    let d_in = source(&model, &text).d_in();
    let mut s = settings(d_in, 4);
    s.train.architecture = TrainArchitecture::TopK {
        k: 10 * d_in,
        aux_k: 0,
        aux_coefficient: 0.0,
    };
    let mut src = source(&model, &text);
    let meta = metadata(&src);
    let never = AtomicBool::new(false);
    let e = error_of(run(
        &mut src,
        &s,
        &meta,
        &tmp.path().join("k"),
        RunControl::new(&never),
        |_| {},
    ));
    assert!(
        e.contains(&format!("{}", 10 * d_in)) && e.contains("d_sae"),
        "{e}"
    );

    // SAE width that is not the hook's.
    let mut s = settings(d_in + 1, 4);
    s.train.d_in = d_in + 1;
    let e = error_of(run(
        &mut src,
        &s,
        &meta,
        &tmp.path().join("w"),
        RunControl::new(&never),
        |_| {},
    ));
    assert!(e.contains(HOOK) && e.contains(&d_in.to_string()), "{e}");

    // A corrupt checkpoint names its file.
    let out = tmp.path().join("corrupt");
    let s = settings(d_in, 6);
    let cancel = AtomicBool::new(false);
    let mut src = source(&model, &text);
    run(&mut src, &s, &meta, &out, RunControl::new(&cancel), |m| {
        if m.step == 2 {
            cancel.store(true, Ordering::Relaxed)
        }
    })
    .unwrap();
    let file = out.join("training/checkpoint/trainer.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let mut src = source(&model, &text);
    let e = error_of(run(
        &mut src,
        &s,
        &meta,
        &out,
        RunControl::new(&never).resuming(true),
        |_| {},
    ));
    assert!(e.contains("trainer.safetensors"), "{e}");
}

fn monoscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_trains_and_evaluates_an_sae() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let text = text.to_str().unwrap();
    let out = tmp.path().join("sae");
    let out = out.to_str().unwrap();
    let model = fixture_dir("gpt2");
    let model = model.to_str().unwrap();
    let train = [
        "sae", "train", "--model", model, "--hook", HOOK, "--corpus", text,
    ];
    let status = monoscope(
        &[
            &train[..],
            &["--out", out, "--context-size", "16", "--tokens", "1024"],
            &[
                "--batch-size",
                "64",
                "--k",
                "4",
                "--expansion",
                "2",
                "--json",
            ],
        ]
        .concat(),
    );
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let last: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(last["step"], 16);
    let eval = monoscope(&[
        "sae",
        "eval",
        "--sae",
        out,
        "--model",
        model,
        "--corpus",
        text,
        "--windows",
        "8",
        "--json",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    for key in [
        "l0",
        "fvu",
        "dead_fraction",
        "ce_loss_recovered",
        "kl_score",
        "delta_lm_loss",
    ] {
        assert!(report[key].is_number(), "{key} missing: {report}");
    }
    // k > d_sae is refused before any work, naming the value.
    let bad_out = tmp.path().join("bad");
    let bad = monoscope(
        &[
            &train[..],
            &["--out", bad_out.to_str().unwrap(), "--context-size", "16"],
            &["--k", "100000"],
        ]
        .concat(),
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("100000"));
}

#[test]
fn parquet_text_columns_feed_the_same_windows_as_text() {
    use arrow::array::{ArrayRef, Int32Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let docs: Vec<String> = std::fs::read_to_string(&text)
        .unwrap()
        .split("\n\n")
        .map(str::to_string)
        .collect();
    let path = tmp.path().join("corpus.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int32Array::from_iter_values(0..docs.len() as i32)) as ArrayRef,
        ),
        (
            "body",
            Arc::new(StringArray::from_iter_values(docs.iter())) as ArrayRef,
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();

    let model = model();
    let mut from_parquet = ActivationSource::new(
        &model,
        Corpus::parse(path.to_str().unwrap(), "body").unwrap(),
        HOOK,
        windows(),
    )
    .unwrap();
    let mut from_text = source(&model, &text);
    assert_eq!(
        from_parquet.next_windows(6).unwrap(),
        from_text.next_windows(6).unwrap()
    );
    // A missing column is named, with the ones that exist.
    let mut wrong = ActivationSource::new(
        &model,
        Corpus::parse(path.to_str().unwrap(), "text").unwrap(),
        HOOK,
        windows(),
    )
    .unwrap();
    let e = error_of(wrong.next_chunk());
    assert!(
        e.contains("corpus.parquet") && e.contains("`text`") && e.contains("body"),
        "{e}"
    );
}

/// An SAE whose reconstruction is exact (`relu(x) − relu(−x) = x`) and one that reconstructs
/// nothing pin `sae eval`'s formulas at both ends: FVU 0 / 1-ish, CE loss recovered and KL
/// score 1 / 0, delta LM loss 0 / CE_zero − CE_clean.
#[test]
fn the_eval_metrics_are_exact_for_a_perfect_and_an_empty_reconstruction() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let d = model.dims().d_mlp;
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu).unwrap();
    let w_enc = Tensor::cat(&[&eye, &eye.neg().unwrap()], 1).unwrap();
    let w_dec = w_enc.t().unwrap().contiguous().unwrap();
    let exact = monoscope::sae::Sae {
        architecture: monoscope::sae::Architecture::Standard,
        w_enc,
        w_dec: w_dec.clone(),
        b_enc: Tensor::zeros(2 * d, DType::F32, &Device::Cpu).unwrap(),
        b_dec: Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: true,
        transcoder: false,
        w_skip: None,
    };
    let empty = monoscope::sae::Sae {
        w_dec: w_dec.zeros_like().unwrap(),
        ..exact.clone()
    };
    let settings = EvalSettings {
        windows: 8,
        dense_threshold: 0.5,
    };
    let eval = |sae: &monoscope::sae::Sae| {
        evaluate(
            &mut source(&model, &text),
            sae,
            HOOK.parse().unwrap(),
            &settings,
            |_, _| {},
        )
        .unwrap()
    };

    let perfect = eval(&exact);
    assert!(perfect.fvu < 1e-10, "FVU {}", perfect.fvu);
    // The ratios need zeroing the hook to change the loss (on this random model it lowers it).
    assert!(
        (perfect.ce_zero - perfect.ce_clean).abs() > 0.01,
        "zeroing the hook should change the loss: {perfect:?}"
    );
    assert!(
        (perfect.ce_loss_recovered - 1.0).abs() < 1e-4,
        "{perfect:?}"
    );
    assert!((perfect.kl_score - 1.0).abs() < 1e-4, "{perfect:?}");
    assert!(perfect.delta_lm_loss.abs() < 1e-4, "{perfect:?}");
    // Every active post-GELU value turns on one of its two latents.
    assert!(
        perfect.l0 > 0.0 && perfect.l0 <= d as f64,
        "L0 {}",
        perfect.l0
    );

    let nothing = eval(&empty);
    assert!(nothing.ce_loss_recovered.abs() < 1e-4, "{nothing:?}");
    assert!(nothing.kl_score.abs() < 1e-4, "{nothing:?}");
    assert!(
        (nothing.delta_lm_loss - (nothing.ce_zero - nothing.ce_clean)).abs() < 1e-6,
        "{nothing:?}"
    );
    // x̂ = 0: FVU = Σ‖x‖² / Σ‖x − x̄‖² ≥ 1, and the same activations and clean model.
    assert!(nothing.fvu >= 1.0, "FVU {}", nothing.fvu);
    assert_eq!(nothing.ce_clean, perfect.ce_clean);
    assert_eq!(nothing.tokens, perfect.tokens);
}

/// `strongest_latents` lists, per row, the latents `encode` turns on, strongest first, `k` at
/// most, and none weaker than a latent it leaves out.
#[test]
fn the_strongest_latents_are_the_encodings_largest_entries() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/sae/world-l4-topk");
    let sae = saelens::load(&dir, &Device::Cpu, DType::F32).unwrap().sae;
    let x = Tensor::randn(0f32, 1.0, (5, sae.d_in()), &Device::Cpu).unwrap();
    let dense = sae.encode(&x).unwrap().to_vec2::<f32>().unwrap();
    for k in [1, 8, 100] {
        let listed = sae.strongest_latents(&x, k).unwrap();
        assert_eq!(listed.len(), 5);
        for (row, list) in dense.iter().zip(&listed) {
            let on = row.iter().filter(|&&a| a > 0.0).count();
            assert_eq!(list.len(), on.min(k));
            assert!(list.windows(2).all(|w| w[0].1 >= w[1].1));
            for &(latent, activation) in list {
                assert_eq!(row[latent as usize], activation);
            }
            let weakest = list.last().map_or(0.0, |l| l.1);
            let left_out = row
                .iter()
                .enumerate()
                .filter(|(i, _)| !list.iter().any(|l| l.0 as usize == *i))
                .fold(0.0f32, |m, (_, &a)| m.max(a));
            assert!(left_out <= weakest, "k {k}: {left_out} > {weakest}");
        }
    }
}

/// A transcoder from `mlp.hook_post` to `hook_mlp_out` that is exactly GPT-2's down projection
/// (`relu(x) − relu(−x) = x`, decoded through `W_projᵀ`; or the same map as its skip path) is
/// judged where it writes: FVU 0, CE loss recovered and KL score 1 with it spliced in at
/// `hook_mlp_out`; one that predicts nothing recovers nothing. Given no output hook, it is
/// refused rather than spliced in where it reads.
#[test]
fn a_transcoder_is_judged_and_spliced_in_at_the_hook_it_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let output: HookPoint = "blocks.1.hook_mlp_out".parse().unwrap();
    let down = model.transformer.blocks[1].mlp.down_proj();
    let (w_proj, b_proj) = (down.weight().clone(), down.bias().unwrap().clone()); // [d_model, d_mlp]
    let d = model.dims().d_mlp;
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu).unwrap();
    let split = Tensor::cat(&[&eye, &eye.neg().unwrap()], 1).unwrap(); // [d, 2d]
    let exact = monoscope::sae::Sae {
        architecture: monoscope::sae::Architecture::Standard,
        w_enc: split.clone(),
        w_dec: split.t().unwrap().matmul(&w_proj.t().unwrap()).unwrap(), // [2d, d_model]
        b_enc: Tensor::zeros(2 * d, DType::F32, &Device::Cpu).unwrap(),
        b_dec: b_proj.clone(),
        threshold: None,
        apply_b_dec_to_input: false,
        transcoder: true,
        w_skip: None,
    };
    let through_skip = monoscope::sae::Sae {
        w_dec: exact.w_dec.zeros_like().unwrap(),
        w_skip: Some(w_proj.clone()),
        ..exact.clone()
    };
    let nothing = monoscope::sae::Sae {
        w_dec: exact.w_dec.zeros_like().unwrap(),
        b_dec: b_proj.zeros_like().unwrap(),
        ..exact.clone()
    };
    let settings = EvalSettings {
        windows: 8,
        dense_threshold: 0.5,
    };
    let eval = |sae: &monoscope::sae::Sae, writes: HookPoint| {
        evaluate(
            &mut source(&model, &text),
            sae,
            writes,
            &settings,
            |_, _| {},
        )
    };
    for (name, sae) in [("exact", &exact), ("skip", &through_skip)] {
        let r = eval(sae, output).unwrap();
        assert!(r.fvu < 1e-8, "{name}: FVU {}", r.fvu);
        assert!(
            (r.ce_zero - r.ce_clean).abs() > 0.01,
            "{name}: zeroing hook_mlp_out should change the loss: {r:?}"
        );
        assert!((r.ce_loss_recovered - 1.0).abs() < 1e-4, "{name}: {r:?}");
        assert!((r.kl_score - 1.0).abs() < 1e-4, "{name}: {r:?}");
        assert!(r.l0 > 0.0, "{name}: {r:?}");
    }
    let r = eval(&nothing, output).unwrap();
    assert!(r.ce_loss_recovered.abs() < 1e-4, "{r:?}");
    assert!(r.fvu >= 1.0, "FVU {}", r.fvu);

    let err = eval(&exact, HOOK.parse().unwrap()).unwrap_err().to_string();
    assert!(err.contains("hook_name_out"), "{err}");
}

/// A transcoder trains from `blocks.1.mlp.hook_in` to `blocks.1.hook_mlp_out`: its FVU against
/// the MLP's output falls well below where it starts, it saves as a SAELens transcoder that
/// loads and evaluates at its output hook, and a resumed run reaches the same weights as an
/// uninterrupted one; likewise a JumpReLU skip transcoder, whose learned `W_skip` is saved in
/// SAELens's `jumprelu_skip_transcoder` form.
#[test]
fn a_transcoder_trains_from_the_mlp_input_to_its_output_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model = model();
    let (hook_in, hook_out) = ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out");
    let pairs = || {
        ActivationSource::new(
            &model,
            Corpus::parse(text.to_str().unwrap(), "text").unwrap(),
            hook_in,
            windows(),
        )
        .unwrap()
        .with_target(hook_out)
        .unwrap()
    };
    // The target must come later in the pass than the input.
    let backwards = ActivationSource::new(
        &model,
        Corpus::parse(text.to_str().unwrap(), "text").unwrap(),
        hook_out,
        windows(),
    )
    .unwrap()
    .with_target(hook_in)
    .err()
    .unwrap()
    .to_string();
    assert!(backwards.contains("does not come after"), "{backwards}");
    let src = pairs();
    let (d_in, (_, d_out)) = (src.hook_width(), src.target().unwrap());
    assert_eq!(src.d_in(), d_in + d_out, "rows are [x | y]");
    // Its encoder starts random (not as the decoder's transpose): a longer, faster run.
    let mut s = settings(d_in, 300);
    s.train.lr = 3e-3;
    s.train.transcode_to = Some(d_out);
    let meta = SaeMetadata {
        hook_name: hook_in.into(),
        hook_name_out: hook_out.into(),
        ..metadata(&src)
    };
    let straight = tmp.path().join("straight");
    let mut src = pairs();
    let last = train_to_end(&mut src, &s, &meta, &straight);
    let log = std::fs::read_to_string(straight.join("training/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let first_fvu = first["fvu"].as_f64().unwrap();
    assert!(
        last.fvu < 0.5 * first_fvu,
        "FVU {first_fvu} at the first step, {} at the last",
        last.fvu
    );

    let loaded = saelens::load(&straight, &Device::Cpu, DType::F32).unwrap();
    assert!(loaded.sae.transcoder && !loaded.sae.apply_b_dec_to_input);
    assert_eq!((loaded.sae.d_in(), loaded.sae.d_out()), (d_in, d_out));
    assert_eq!(loaded.metadata.hook_name_out, hook_out);
    // Judged where it writes, over the test corpus.
    let judge = |sae: &monoscope::sae::Sae| {
        let mut source = ActivationSource::new(
            &model,
            Corpus::parse(text.to_str().unwrap(), "text").unwrap(),
            hook_in,
            windows(),
        )
        .unwrap();
        let settings = EvalSettings {
            windows: 8,
            dense_threshold: 0.5,
        };
        evaluate(
            &mut source,
            sae,
            hook_out.parse().unwrap(),
            &settings,
            |_, _| {},
        )
        .unwrap()
    };
    let report = judge(&loaded.sae);
    assert!(report.fvu < 0.5 * first_fvu, "{report:?}");
    eprintln!(
        "transcoder: training FVU {first_fvu:.3} → {:.3}; eval FVU {:.3}, L0 {:.1}, CE loss \
         recovered {:.3}",
        last.fvu, report.fvu, report.l0, report.ce_loss_recovered
    );

    let resumed = tmp.path().join("resumed");
    cancel_at_9_then_resume(pairs, &meta, &s, &resumed, StepEngine::Cpu, || {});
    let (a, b) = (weights(&straight), weights(&resumed));
    for key in ["W_enc", "W_dec", "b_enc", "b_dec"] {
        assert_eq!(
            max_abs_diff(&a[key], &b[key]),
            0.0,
            "{key} differs after resume"
        );
    }

    // The tensor engine (what trains on a CUDA device), run on the CPU, trains the same
    // transcoder as the kernels over a short run, a skip path included (ReLU + L1).
    let mut short = s.clone();
    short.train.total_steps = 24;
    for skip in [false, true] {
        if skip {
            short.train.architecture = TrainArchitecture::Standard {
                l1_coefficient: 0.5,
            };
            short.train.skip_connection = true;
        }
        let never = AtomicBool::new(false);
        let (by_kernels, by_tensors) = (
            tmp.path().join(format!("kernels-{skip}")),
            tmp.path().join(format!("tensors-{skip}")),
        );
        let kernels = RunControl::new(&never);
        run(&mut pairs(), &short, &meta, &by_kernels, kernels, |_| {}).unwrap();
        let tensors = RunControl::new(&never).on(StepEngine::Tensors(Device::Cpu));
        run(&mut pairs(), &short, &meta, &by_tensors, tensors, |_| {}).unwrap();
        let (a, b) = (weights(&by_kernels), weights(&by_tensors));
        let keys: &[&str] = if skip {
            &["W_enc", "W_dec", "b_enc", "b_dec", "W_skip"]
        } else {
            &["W_enc", "W_dec", "b_enc", "b_dec"]
        };
        assert_close_relative(&a, &b, keys, &format!("skip {skip}"));
    }

    // With a skip path (a JumpReLU skip transcoder): W_skip is learned, saved in SAELens's
    // form, and resumed exactly too.
    s.train.architecture = TrainArchitecture::JumpRelu {
        l0_coefficient: 0.01,
        bandwidth: 0.05,
        init_threshold: 0.01,
    };
    s.train.skip_connection = true;
    let straight = tmp.path().join("skip");
    let last = train_to_end(&mut pairs(), &s, &meta, &straight);
    assert!(last.fvu < 0.5 * first_fvu, "skip: FVU {}", last.fvu);
    let cfg = std::fs::read_to_string(straight.join(saelens::CONFIG_FILE)).unwrap();
    assert!(cfg.contains("jumprelu_skip_transcoder"), "{cfg}");
    let loaded = saelens::load(&straight, &Device::Cpu, DType::F32).unwrap();
    let w_skip = loaded.sae.w_skip.as_ref().unwrap();
    assert_eq!(w_skip.dims(), [d_out, d_in]);
    assert!(common::max_abs(w_skip) > 0.0);
    let resumed = tmp.path().join("skip-resumed");
    cancel_at_9_then_resume(pairs, &meta, &s, &resumed, StepEngine::Cpu, || {});
    let (a, b) = (weights(&straight), weights(&resumed));
    for key in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip"] {
        assert_eq!(
            max_abs_diff(&a[key], &b[key]),
            0.0,
            "skip: {key} differs after resume"
        );
    }

    // Nested (a Matryoshka BatchTopK skip transcoder, whose every prefix predicts the output on
    // its own): it learns, its prefixes' error is in its loss, and it saves in SAELens's JumpReLU
    // skip transcoder form.
    s.train.architecture = TrainArchitecture::BatchTopK {
        k: 4,
        aux_k: 8,
        aux_coefficient: 1.0 / 32.0,
        threshold_lr: 0.01,
    };
    let d_sae = s.train.d_sae;
    s.train.matryoshka = vec![d_sae / 8, d_sae / 2];
    let nested = tmp.path().join("nested");
    let last = train_to_end(&mut pairs(), &s, &meta, &nested);
    assert!(last.fvu < 0.5 * first_fvu, "nested: FVU {}", last.fvu);
    let cfg = std::fs::read_to_string(nested.join(saelens::CONFIG_FILE)).unwrap();
    assert!(cfg.contains("jumprelu_skip_transcoder"), "{cfg}");
    let report = judge(
        &saelens::load(&nested, &Device::Cpu, DType::F32)
            .unwrap()
            .sae,
    );
    assert!(report.fvu < 0.5 * first_fvu, "nested: {report:?}");
    let log = std::fs::read_to_string(nested.join("training/metrics.jsonl")).unwrap();
    let end: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let part = |key: &str| end[key].as_f64().unwrap();
    assert!(
        part("loss") > part("mse") + part("auxiliary_loss") + 1e-6,
        "the prefixes' own error is in the loss: {end}"
    );
}
