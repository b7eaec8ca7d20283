//! Bad input gets an error that names the file, key or value — never a panic. One test per
//! case, plus the binary's exit code.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, scratch_copy};
use monoscope::model::Model;

fn load_err(dir: &std::path::Path) -> String {
    match Model::load(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The load error of a scratch copy of a fixture with its config.json changed by `edit`.
fn load_err_after(model_type: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let dir = scratch_copy(model_type);
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
    load_err(dir.path())
}

fn rewrite_weights(dir: &std::path::Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_config_error_names_config_json() {
    let dir = scratch_copy("gpt2");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("config.json") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn missing_weights_error_names_model_safetensors() {
    let dir = scratch_copy("gpt2");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn missing_shard_error_names_the_shard() {
    let dir = scratch_copy("llama");
    std::fs::remove_file(dir.path().join("model-00003-of-00012.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00003-of-00012.safetensors"), "{msg}");
}

#[test]
fn missing_tokenizer_error_names_tokenizer_json() {
    let dir = scratch_copy("gpt2");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn unknown_model_type_error_names_the_value() {
    let dir = scratch_copy("gpt2");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"gpt2\"", "\"mamba_x\"");
    std::fs::write(&path, text).unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("mamba_x") && msg.contains("config.json") && msg.contains("llama"),
        "{msg}"
    );
}

#[test]
fn missing_config_key_error_names_the_key() {
    let dir = scratch_copy("llama");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&path, json.to_string()).unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("hidden_size") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn unsupported_or_incomplete_rope_scaling_is_named() {
    let cases = [
        (
            serde_json::json!({"rope_type": "dynamic", "factor": 4.0}),
            "dynamic",
        ),
        (
            serde_json::json!({"rope_type": "longrope", "short_factor": [1.0, 1.0]}),
            "rope_scaling.long_factor",
        ),
        (
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
            "rope_scaling.low_freq_factor",
        ),
        (
            serde_json::json!({"type": "linear", "factor": 0.0}),
            "rope_scaling.factor",
        ),
    ];
    for (scaling, named) in cases {
        let msg = load_err_after("llama", |json| json["rope_scaling"] = scaling);
        assert!(msg.contains(named) && msg.contains("config.json"), "{msg}");
    }
}

/// Gemma 2's own keys: an unknown layer type, a layer list of the wrong length, a cap or
/// scalar that is not positive, an empty window.
#[test]
fn bad_gemma2_attention_settings_are_named() {
    let cases = [
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "chunked_attention"]),
            "chunked_attention",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention"]),
            "num_hidden_layers is 2",
        ),
        ("attn_logit_softcapping", serde_json::json!(0.0), "positive"),
        (
            "final_logit_softcapping",
            serde_json::json!(-1.0),
            "positive",
        ),
        ("query_pre_attn_scalar", serde_json::json!(0), "positive"),
        ("sliding_window", serde_json::json!(0), "at least 1"),
    ];
    for (key, value, named) in cases {
        let msg = load_err_after("gemma2", |json| json[key] = value);
        assert!(
            msg.contains(key) && msg.contains(named) && msg.contains("config.json"),
            "{key}: {msg}"
        );
    }
}

/// Gemma 3's own keys: an embedding model's bidirectional attention, an empty window
/// pattern, a rotary scaling of one layer type that is not supported.
#[test]
fn bad_gemma3_settings_are_named() {
    type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "use_bidirectional_attention",
            &|cfg| cfg["use_bidirectional_attention"] = true.into(),
            "causal",
        ),
        (
            "sliding_window_pattern",
            &|cfg| {
                cfg.as_object_mut().unwrap().remove("layer_types");
                cfg["sliding_window_pattern"] = 0.into();
            },
            "at least 1",
        ),
        (
            "rope_parameters.sliding_attention.rope_type",
            &|cfg| cfg["rope_parameters"]["sliding_attention"]["rope_type"] = "dynamic".into(),
            "dynamic",
        ),
    ];
    for (key, edit, named) in cases {
        let msg = load_err_after("gemma3_text", edit);
        assert!(
            msg.contains(key) && msg.contains(named) && msg.contains("config.json"),
            "{key}: {msg}"
        );
    }
}

/// Phi-3's own settings: a partial rotary fraction outside (0, 1]; LongRoPE factor lists
/// whose length does not match the rotary pairs (4 here: head_dim 16, half of it rotating) or
/// that hold a factor that is not positive, and an original context that is not a length.
#[test]
fn bad_phi3_settings_are_named() {
    let cases: [(&str, &str, serde_json::Value, &str); 4] = [
        ("phi3", "partial_rotary_factor", 1.5.into(), "1.5"),
        (
            "phi3_longrope",
            "short_factor",
            serde_json::json!([1.0, 1.0, 1.0]),
            "3 values",
        ),
        (
            "phi3_longrope",
            "long_factor",
            serde_json::json!([1.0, 2.0, 0.0, 4.0]),
            "0 must",
        ),
        (
            "phi3_longrope",
            "original_max_position_embeddings",
            0.5.into(),
            "0.5",
        ),
    ];
    for (fixture, key, value, named) in cases {
        let msg = load_err_after(fixture, |json| {
            if key == "original_max_position_embeddings" {
                json[key] = value;
            } else {
                json["rope_parameters"][key] = value;
            }
        });
        assert!(
            msg.contains(key) && msg.contains(named) && msg.contains("config.json"),
            "{key}: {msg}"
        );
    }
}

/// OLMo 1's clamp that is not positive, SmolLM3's rotary flags and GPT-Neo's layer kinds that
/// do not cover the layers (a pair repeated 2⁶³ times is refused before it is expanded), a
/// layer kind that is not known, and GPT-J's rotary width that is odd or wider than a head.
#[test]
fn bad_per_layer_and_rotary_settings_are_named() {
    let cases: [(&str, &str, serde_json::Value, &str); 7] = [
        ("olmo", "clip_qkv", (-1.0).into(), "-1"),
        (
            "smollm3",
            "no_rope_layers",
            serde_json::json!([1, 0, 1]),
            "3 entries",
        ),
        (
            "gpt_neo",
            "attention_types",
            serde_json::json!([[["global"], 3]]),
            "3 layers",
        ),
        (
            "gpt_neo",
            "attention_types",
            serde_json::json!([[["global", "local"], 1u64 << 63]]),
            "more than",
        ),
        (
            "gpt_neo",
            "attention_types",
            serde_json::json!([[["global", "block"], 1]]),
            "block",
        ),
        ("gptj", "rotary_dim", 7.into(), "7"),
        ("gptj", "rotary_dim", 32.into(), "head dimension (16)"),
    ];
    for (fixture, key, value, named) in cases {
        let msg = load_err_after(fixture, |json| json[key] = value);
        assert!(
            msg.contains(key) && msg.contains(named) && msg.contains("config.json"),
            "{fixture} {key}: {msg}"
        );
    }
}

/// A multimodal wrapper without its language model's config, or with a bad key in it: the
/// error names the key by its place in the file (`text_config.…`).
#[test]
fn bad_multimodal_text_configs_are_named() {
    let msg = load_err_after("gemma3", |json| {
        json.as_object_mut().unwrap().remove("text_config");
    });
    assert!(
        msg.contains("text_config") && msg.contains("config.json"),
        "{msg}"
    );
    let msg = load_err_after("gemma3", |json| {
        json["text_config"]["num_key_value_heads"] = 3.into()
    });
    assert!(
        msg.contains("text_config.num_key_value_heads") && msg.contains('3'),
        "{msg}"
    );
    let msg = load_err_after("gemma3", |json| {
        json["text_config"]["model_type"] = "mllama".into()
    });
    assert!(msg.contains("mllama"), "{msg}");
}

#[test]
fn missing_tensor_error_names_the_key() {
    let dir = scratch_copy("gpt2");
    rewrite_weights(dir.path(), |t| {
        t.remove("transformer.h.1.mlp.c_fc.weight");
    });
    let msg = load_err(dir.path());
    assert!(msg.contains("transformer.h.1.mlp.c_fc.weight"), "{msg}");
}

#[test]
fn misshaped_tensor_error_names_key_and_shapes() {
    let dir = scratch_copy("gpt2");
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "transformer.ln_f.weight".into(),
            Tensor::ones(63, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let msg = load_err(dir.path());
    assert!(
        msg.contains("transformer.ln_f.weight") && msg.contains("[63]") && msg.contains("[64]"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_error_names_the_file() {
    let dir = scratch_copy("gpt2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(dir.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
}

#[test]
fn tokenizer_larger_than_the_model_vocab_is_a_mismatch() {
    let dir = scratch_copy("gpt2");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["vocab_size"] = 300.into();
    std::fs::write(&path, json.to_string()).unwrap();
    rewrite_weights(dir.path(), |t| {
        let wte = t["transformer.wte.weight"]
            .narrow(0, 0, 300)
            .unwrap()
            .contiguous()
            .unwrap();
        t.insert("transformer.wte.weight".into(), wte);
    });
    let msg = load_err(dir.path());
    assert!(
        msg.contains("tokenizer.json") && msg.contains("vocab_size 300"),
        "{msg}"
    );
}

#[test]
fn unknown_hook_name_error_lists_valid_hooks() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let msg = model
        .resolve_hooks(&["blocks.7.mlp.hook_post"])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("blocks.7.mlp.hook_post") && msg.contains("blocks.1.mlp.hook_post"),
        "{msg}"
    );
    let msg = model
        .resolve_hooks(&["blocks.*.hook_nothing"])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("blocks.*.hook_nothing"), "{msg}");
}

#[test]
fn prompt_longer_than_the_context_window_is_rejected() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let long = "hello ".repeat(200);
    let msg = model.encode_prompt(&long).unwrap_err().to_string();
    assert!(msg.contains("context window of 64"), "{msg}");
}

#[test]
fn empty_prompt_is_rejected() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    assert!(
        model
            .encode_prompt("")
            .unwrap_err()
            .to_string()
            .contains("empty")
    );
}

fn monoscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_binary_exits_non_zero_with_a_message_and_no_panic() {
    let gpt2 = fixture_dir("gpt2");
    let gpt2 = gpt2.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["info", "--model", "/no/such/model"], "/no/such/model"),
        (&["generate", "--model", gpt2, "--prompt", ""], "empty"),
        (
            &[
                "trace",
                "--model",
                gpt2,
                "--prompt",
                "hi",
                "--hooks",
                "blocks.9.hook_resid_post",
                "--out",
                "/tmp/x.st",
            ],
            "blocks.9.hook_resid_post",
        ),
        (
            &[
                "generate", "--model", gpt2, "--prompt", "hi", "--device", "tpu",
            ],
            "tpu",
        ),
        (
            &[
                "generate", "--model", gpt2, "--prompt", "hi", "--top-p", "0",
            ],
            "top-p",
        ),
        (
            &[
                "patch",
                "--model",
                gpt2,
                "--clean",
                "a b c",
                "--corrupted",
                "a b c d e f",
            ],
            "same number of tokens",
        ),
        (
            &[
                "patch",
                "--model",
                gpt2,
                "--clean",
                "hi",
                "--corrupted",
                "hi",
            ],
            "is the clean prompt",
        ),
        (
            &[
                "patch",
                "--model",
                gpt2,
                "--clean",
                "hi",
                "--corrupted",
                "ho",
                "--sites",
                "resid_pre,mlp_in",
            ],
            "mlp_in",
        ),
        (
            &[
                "patch",
                "--model",
                gpt2,
                "--clean",
                "hi",
                "--corrupted",
                "ho",
                "--sae",
                "assets/sae/world-l4-topk",
            ],
            "blocks.4.mlp.hook_post",
        ),
    ];
    for (args, needle) in cases {
        let out = monoscope(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn trace_never_overwrites_an_existing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace.safetensors");
    std::fs::write(&out, b"user data").unwrap();
    let gpt2 = fixture_dir("gpt2");
    let args = [
        "trace",
        "--model",
        gpt2.to_str().unwrap(),
        "--prompt",
        "hi",
        "--hooks",
        "hook_embed",
        "--out",
        out.to_str().unwrap(),
    ];
    let result = monoscope(&args);
    assert_eq!(result.status.code(), Some(2));
    assert_eq!(std::fs::read(&out).unwrap(), b"user data");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temporary file left behind"
    );
}

#[test]
fn a_zero_size_in_the_config_is_named_not_a_panic() {
    for (model_type, key) in [
        ("gpt2", "n_head"),
        ("gpt2", "n_layer"),
        ("gpt_neox", "num_attention_heads"),
        ("llama", "num_attention_heads"),
        ("gemma", "num_hidden_layers"),
    ] {
        let dir = scratch_copy(model_type);
        let path = dir.path().join("config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json[key] = 0.into();
        std::fs::write(&path, json.to_string()).unwrap();
        let msg = load_err(dir.path());
        assert!(
            msg.contains(key) && msg.contains("config.json") && msg.contains("at least 1"),
            "{model_type}: {msg}"
        );
    }
}

/// An empty output path (an unset shell variable) would name the current folder and replace
/// the files there: every output flag refuses it, naming the flag, and nothing is written.
/// (The library functions behind them refuse it too, for the window: see
/// `the_library_refuses_an_empty_output_folder`.)
#[test]
fn an_empty_output_path_is_refused_by_every_command_that_writes() {
    let cwd = tempfile::tempdir().unwrap();
    let gpt2 = fixture_dir("gpt2");
    let gpt2 = gpt2.to_str().unwrap();
    let sae = "assets/sae/world-l4-topk";
    let fact = [
        "--prompt",
        "The capital of {} is",
        "--subject",
        "Japan",
        "--target",
    ];
    let trace = [
        "trace",
        "--model",
        gpt2,
        "--prompt",
        "hi",
        "--hooks",
        "hook_embed",
    ];
    // Each command, then the output flag it is given an empty value for.
    let commands: &[(&[&str], &str)] = &[
        (&["world", "build"], "--out"),
        (&trace, "--out"),
        (&["export", "--sae", sae], "--out"),
        (&["features", "build", "--sae", sae], "--out"),
        (
            &["sae", "train", "--hook", "blocks.4.mlp.hook_post"],
            "--out",
        ),
        (&[&["trace-fact"], &fact[..], &[" Tokyo"]].concat(), "--out"),
        (&[&["edit"], &fact[..], &[" Seoul"]].concat(), "--out"),
        (&["edit", "undo", "--model", "x", "--id", "1"], "--out"),
        (
            &[
                "sae",
                "train",
                "--hook",
                "blocks.4.mlp.hook_post",
                "--out",
                "x",
            ],
            "--cache",
        ),
        (&[&["edit"], &fact[..], &[" Seoul"]].concat(), "--stats-dir"),
        (&["gui"], "--screenshots"),
    ];
    let cases = commands
        .iter()
        .map(|(command, flag)| ([*command, &[*flag, ""]].concat(), *flag));
    for (args, flag) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_monoscope"))
            .args(&args)
            .current_dir(cwd.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("empty"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// An SAE file holding inf (a diverged f16 save) is refused when it loads, naming the
/// tensor, instead of hanging the statistics that would read its codes.
#[test]
fn an_sae_with_infinite_weights_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sae/world-l4-topk");
    for name in ["cfg.json", "sae_weights.safetensors"] {
        std::fs::copy(src.join(name), tmp.path().join(name)).unwrap();
    }
    let path = tmp.path().join("sae_weights.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let b_enc = tensors["b_enc"].to_dtype(DType::F32).unwrap();
    let mut values = b_enc.to_vec1::<f32>().unwrap();
    values[7] = f32::INFINITY;
    let b_enc = Tensor::new(values, &Device::Cpu)
        .unwrap()
        .to_dtype(tensors["b_enc"].dtype());
    tensors.insert("b_enc".into(), b_enc.unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = match monoscope::sae::saelens::load(tmp.path(), &Device::Cpu, DType::F32) {
        Ok(_) => panic!("an SAE with inf in b_enc should not load"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("b_enc") && err.contains("inf"), "{err}");
}

/// The same refusal one level down, where the window's forms call in.
#[test]
fn the_library_refuses_an_empty_output_folder() {
    let err = monoscope::world::build::build(
        std::path::Path::new("assets/knowledge/countries.tsv"),
        std::path::Path::new(""),
        &monoscope::world::build::BuildConfig::default(),
        false,
        &Device::Cpu,
        &std::sync::atomic::AtomicBool::new(false),
        |_| {},
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("empty"), "{err}");
}

/// The attention pattern is a hook, but not one vector per token: training an SAE on it is
/// refused, naming the hook and saying why, before anything is written.
#[test]
fn an_sae_on_the_attention_pattern_is_refused_naming_the_hook() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("sae");
    let gpt2 = fixture_dir("gpt2");
    let out = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(["sae", "train", "--model", gpt2.to_str().unwrap()])
        .args(["--hook", "blocks.1.attn.hook_pattern", "--tokens", "64"])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("blocks.1.attn.hook_pattern") && stderr.contains("per token"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out_dir.exists(), "nothing written");
}
