//! Steering vectors from contrasting prompts: what they hold, what adding them does, their
//! files, and — on the bundled world model — that a Japanese-minus-English vector moves the
//! language of the answer.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_dir, max_abs_diff};
use monoscope::error::Error;
use monoscope::model::generate::{GenerateOptions, generate};
use monoscope::model::{HookPoint, Hooks, Model};
use monoscope::steering::{Readout, SteeringVectors};

fn strings(prompts: &[&str]) -> Vec<String> {
    prompts.iter().map(|p| p.to_string()).collect()
}

/// Each vector is the mean over the positive prompts of their readout minus the same over the
/// negative ones, recomputed here from captured activations: all tokens but special ones
/// (`mean`), or the last (`last`); prompts of different lengths, two hooks at once.
#[test]
fn a_vector_is_the_difference_of_the_mean_readouts() {
    for model_type in ["gpt2", "llama"] {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        let hooks = [HookPoint::ResidPost(0), HookPoint::MlpPost(1)];
        let positive = strings(&["日本の首都は東京です。", "東京"]);
        let negative = strings(&["The capital of Japan is Tokyo.", "Hello", "Paris is big"]);
        let special = model.special_tokens();
        for readout in [Readout::Mean, Readout::Last] {
            let got = SteeringVectors::from_contrast(&model, &hooks, &positive, &negative, readout)
                .unwrap();
            assert_eq!(got.vectors.len(), 2);
            let mean_of = |prompts: &[String], hook: HookPoint| -> Tensor {
                let reads: Vec<Tensor> = prompts
                    .iter()
                    .map(|p| {
                        let ids = model.encode_prompt(p).unwrap();
                        let out = model
                            .run_with_cache(&model.ids_tensor(&ids).unwrap(), &[&hook.to_string()])
                            .unwrap();
                        let acts = out.cache.get(hook).unwrap().i(0).unwrap();
                        let rows: Vec<Tensor> = match readout {
                            Readout::Last => vec![acts.i(ids.len() - 1).unwrap()],
                            Readout::Mean => (0..ids.len())
                                .filter(|&i| !special.contains(&ids[i]))
                                .map(|i| acts.i(i).unwrap())
                                .collect(),
                        };
                        Tensor::stack(&rows, 0).unwrap().mean(0).unwrap()
                    })
                    .collect();
                Tensor::stack(&reads, 0).unwrap().mean(0).unwrap()
            };
            for v in &got.vectors {
                let want = (mean_of(&positive, v.hook) - mean_of(&negative, v.hook)).unwrap();
                let err = max_abs_diff(&v.vector.to_dtype(DType::F64).unwrap(), &want);
                assert!(
                    err < 1e-5,
                    "{model_type} {readout:?} {}: off by {err}",
                    v.hook
                );
                assert!(v.activation_norm.unwrap() > 0.0);
            }
        }
    }
}

/// Steering adds coefficient × vector at its hook on every position (the capture after the
/// intervention shows it), coefficient 0 changes nothing, and generation runs with it through
/// the KV cache.
#[test]
fn steering_adds_the_vector_times_the_coefficient_everywhere() {
    let model = Model::load(&fixture_dir("qwen2"), &Device::Cpu, DType::F32).unwrap();
    let hook = HookPoint::ResidPost(0);
    let vectors = SteeringVectors::from_contrast(
        &model,
        &[hook],
        &strings(&["日本語の文です。"]),
        &strings(&["An English sentence."]),
        Readout::Mean,
    )
    .unwrap();
    let ids = model
        .ids_tensor(&model.encode_prompt("The capital of Japan is").unwrap())
        .unwrap();
    let clean = model.forward(&ids, &Hooks::new().capture([hook])).unwrap();
    let coefficient = 3.0;
    let steered_hooks = vectors
        .add_to(Hooks::new().capture([hook]), coefficient, &Device::Cpu)
        .unwrap();
    let steered = model.forward(&ids, &steered_hooks).unwrap();
    let want = clean
        .cache
        .get(hook)
        .unwrap()
        .broadcast_add(&(&vectors.vectors[0].vector * coefficient).unwrap())
        .unwrap();
    let err = max_abs_diff(steered.cache.get(hook).unwrap(), &want);
    assert!(err < 1e-5, "the hook holds clean + 3·v up to {err}");
    assert!(max_abs_diff(&steered.logits, &clean.logits) > 1e-3);

    let zero = vectors.add_to(Hooks::new(), 0.0, &Device::Cpu).unwrap();
    let unmoved = model.forward(&ids, &zero).unwrap();
    assert_eq!(max_abs_diff(&unmoved.logits, &clean.logits), 0.0);

    let prompt = model.encode_prompt("The capital of Japan is").unwrap();
    let options = GenerateOptions {
        max_new_tokens: 6,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let plain = generate(&model, &prompt, &options, &Hooks::new()).unwrap();
    let with_zero = generate(&model, &prompt, &options, &zero).unwrap();
    assert_eq!(plain.new_ids(), with_zero.new_ids());
}

/// A vector file round-trips exactly; files that do not fit the model are refused with errors
/// that name the file and the tensor.
#[test]
fn vector_files_round_trip_and_bad_ones_are_refused() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.safetensors");
    let hooks = [HookPoint::ResidPost(1), HookPoint::AttnZ(0)];
    let vectors = SteeringVectors::from_contrast(
        &model,
        &hooks,
        &strings(&["日本"]),
        &strings(&["Japan"]),
        Readout::Last,
    )
    .unwrap();
    vectors.save(&path).unwrap();
    let loaded = SteeringVectors::load(&path, &model).unwrap();
    assert_eq!(loaded.vectors.len(), 2);
    for v in &vectors.vectors {
        let back = loaded.vectors.iter().find(|l| l.hook == v.hook).unwrap();
        assert_eq!(max_abs_diff(&back.vector, &v.vector), 0.0);
        assert!(back.activation_norm.is_none());
    }

    let write = |name: &str, tensor: Tensor| -> PathBuf {
        let path = dir
            .path()
            .join(format!("{}.safetensors", name.replace('.', "_")));
        candle_core::safetensors::save(&std::collections::HashMap::from([(name, tensor)]), &path)
            .unwrap();
        path
    };
    let d = model.dims().d_model;
    let message = |path: &PathBuf| SteeringVectors::load(path, &model).unwrap_err().to_string();

    let unknown = write(
        "blocks.9.hook_resid_post",
        Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap(),
    );
    let text = message(&unknown);
    assert!(
        text.contains("blocks.9.hook_resid_post") && text.contains(&unknown.display().to_string()),
        "{text}"
    );

    let pattern = write(
        "blocks.0.attn.hook_pattern",
        Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(message(&pattern).contains("per-token hook"));

    let narrow = write(
        "blocks.0.hook_resid_post",
        Tensor::zeros(d - 1, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = SteeringVectors::load(&narrow, &model).unwrap_err();
    assert!(
        matches!(err, Error::TensorShape { ref key, .. } if key == "blocks.0.hook_resid_post"),
        "{err}"
    );

    let mut values = vec![0f32; d];
    values[3] = f32::NAN;
    let nan = write(
        "blocks.0.hook_resid_pre",
        Tensor::new(values, &Device::Cpu).unwrap(),
    );
    let err = SteeringVectors::load(&nan, &model).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");

    let missing = dir.path().join("absent.safetensors");
    assert!(message(&missing).contains("absent.safetensors"));

    let empty =
        SteeringVectors::from_contrast(&model, &hooks, &[], &strings(&["x"]), Readout::Mean)
            .unwrap_err();
    assert!(empty.to_string().contains("--positive"), "{empty}");
    let scores = SteeringVectors::from_contrast(
        &model,
        &[HookPoint::AttnScores(0)],
        &strings(&["x"]),
        &strings(&["y"]),
        Readout::Mean,
    )
    .unwrap_err();
    assert!(
        scores
            .to_string()
            .contains("blocks.0.attn.hook_attn_scores"),
        "{scores}"
    );
}

/// The probability that the next token is Japanese (any token whose text is not ASCII) after
/// `prompt`, with `hooks`.
fn p_japanese(model: &Model, prompt: &str, hooks: &Hooks) -> f32 {
    let ids = model.encode_prompt(prompt).unwrap();
    let out = model
        .forward(&model.ids_tensor(&ids).unwrap(), hooks)
        .unwrap();
    let logits = out.logits.i((0, ids.len() - 1)).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&logits.unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    probs
        .iter()
        .enumerate()
        .filter(|(id, _)| !model.tokenizer.decode(&[*id as u32]).unwrap().is_ascii())
        .map(|(_, p)| p)
        .sum()
}

/// On the bundled world model, which answers in the language it is asked in: a vector of six
/// Japanese facts minus the same six in English, read at block 3's residual stream, makes a
/// Japanese next token likely after an English prompt, and subtracting it makes an English
/// one likely after a Japanese prompt.
#[test]
fn a_japanese_minus_english_vector_moves_the_language_of_the_answer() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let japanese = strings(&[
        "日本の首都は東京です。",
        "フランスの首都はパリです。",
        "イタリアの通貨はユーロです。",
        "ブラジルはアメリカ大陸にあります。",
        "エジプトの最大の都市はカイロです。",
        "中国の公用語は中国語です。",
    ]);
    let english = strings(&[
        "The capital of Japan is Tokyo.",
        "The capital of France is Paris.",
        "The currency of Italy is the euro.",
        "Brazil is in South America.",
        "The largest city of Egypt is Cairo.",
        "The official language of China is Chinese.",
    ]);
    let vectors = SteeringVectors::from_contrast(
        &model,
        &[HookPoint::ResidPost(3)],
        &japanese,
        &english,
        Readout::Mean,
    )
    .unwrap();
    let steer = |c: f64| vectors.add_to(Hooks::new(), c, &Device::Cpu).unwrap();
    let (english_prompt, japanese_prompt) = ("The capital of Germany is", "ドイツの首都は");
    let before = p_japanese(&model, english_prompt, &Hooks::new());
    let after = p_japanese(&model, english_prompt, &steer(2.0));
    assert!(
        before < 0.05 && after > 0.5,
        "P(Japanese) after English: {before} → {after}"
    );
    let before = p_japanese(&model, japanese_prompt, &Hooks::new());
    let after = p_japanese(&model, japanese_prompt, &steer(-4.0));
    assert!(
        before > 0.95 && after < 0.5,
        "P(Japanese) after Japanese: {before} → {after}"
    );
}

/// `monoscope vector` writes a file `generate --vector` reads: the file holds the library's
/// vector, the report lists its direct logit effects, coefficient 0 gives the plain
/// continuation, and an existing output is kept without `--force`.
#[test]
fn the_vector_command_feeds_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ja.safetensors");
    let positives = tmp.path().join("ja.txt");
    std::fs::write(&positives, "# Japanese\n日本の首都は東京です。\n\nパリ\n").unwrap();
    let dir = fixture_dir("llama");
    let (model_dir, out_path) = (dir.to_str().unwrap(), out.to_str().unwrap());
    let report = common::monoscope_json(&[
        "vector",
        "--model",
        model_dir,
        "--hooks",
        "blocks.0.hook_resid_post",
        "--positive-file",
        positives.to_str().unwrap(),
        "--negative",
        "The capital of Japan is Tokyo.",
        "--out",
        out_path,
        "--json",
    ]);
    assert_eq!(report["positive"], 2);
    assert_eq!(report["negative"], 1);
    let row = &report["vectors"][0];
    assert_eq!(row["hook"], "blocks.0.hook_resid_post");
    assert_eq!(row["logit_effects"]["top"].as_array().unwrap().len(), 8);
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let want = SteeringVectors::from_contrast(
        &model,
        &[HookPoint::ResidPost(0)],
        &strings(&["日本の首都は東京です。", "パリ"]),
        &strings(&["The capital of Japan is Tokyo."]),
        Readout::Mean,
    )
    .unwrap();
    let saved = SteeringVectors::load(&out, &model).unwrap();
    assert_eq!(
        max_abs_diff(&saved.vectors[0].vector, &want.vectors[0].vector),
        0.0
    );
    let norm = want.vectors[0]
        .vector
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap();
    let reported = row["norm"].as_f64().unwrap() as f32;
    assert!((reported - norm.to_scalar::<f32>().unwrap()).abs() < 1e-5);

    let continuation = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "generate", "--model", model_dir, "--prompt", "Tokyo", "--json",
        ];
        args.extend_from_slice(extra);
        common::monoscope_json(&args)["generation"]["text"].clone()
    };
    let plain = continuation(&[]);
    assert_eq!(
        continuation(&["--vector", out_path, "--coefficient", "0"]),
        plain
    );
    assert_ne!(
        continuation(&["--vector", out_path, "--coefficient", "-30"]),
        plain
    );

    let again = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "vector",
            "--model",
            model_dir,
            "--hooks",
            "blocks.0.hook_resid_post",
        ])
        .args(["--positive", "a", "--negative", "b", "--out", out_path])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(
        max_abs_diff(
            &SteeringVectors::load(&out, &model).unwrap().vectors[0].vector,
            &want.vectors[0].vector
        ),
        0.0
    );
}
