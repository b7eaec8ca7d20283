//! Weight dtypes on disk and at run time, and the tokenizer's display strings.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use candle_core::{DType, Device};
use common::{fixture_dir, max_relative_error, reference, scratch_copy};
use monoscope::model::{Hooks, Model};

/// Rewrites a fixture's weights in `dtype` on disk.
fn with_weights_in(model_type: &str, dtype: DType) -> tempfile::TempDir {
    let dir = scratch_copy(model_type);
    let path = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let converted: std::collections::HashMap<_, _> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&converted, &path).unwrap();
    dir
}

fn logits_error(model: &Model, model_type: &str) -> f32 {
    let (reference, tensors) = reference(model_type);
    let p = &reference.prompts[1];
    let out = model
        .forward(&model.ids_tensor(&p.input_ids).unwrap(), &Hooks::new())
        .unwrap();
    max_relative_error(&out.logits.get(0).unwrap(), &tensors["p1.logits"])
}

#[test]
fn f16_and_bf16_weights_on_disk_load_and_stay_close_to_the_f32_reference() {
    for (dtype, tolerance) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
        let dir = with_weights_in("qwen2", dtype);
        let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let err = logits_error(&model, "qwen2");
        assert!(
            err < tolerance,
            "{dtype:?} weights: max relative error {err}"
        );
        assert!(
            err > 0.0,
            "{dtype:?} rounding must show up: the weights were converted"
        );
    }
}

#[test]
fn run_dtype_is_selectable() {
    for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F16, 2e-2), (DType::BF16, 8e-2)] {
        let model = Model::load(&fixture_dir("llama"), &Device::Cpu, dtype).unwrap();
        let (reference, tensors) = reference("llama");
        let p = &reference.prompts[0];
        let out = model
            .forward(&model.ids_tensor(&p.input_ids).unwrap(), &Hooks::new())
            .unwrap();
        assert_eq!(out.logits.dtype(), dtype);
        let err = max_relative_error(&out.logits.get(0).unwrap(), &tensors["p0.logits"]);
        assert!(err < tolerance, "{dtype:?}: max relative error {err}");
    }
}

#[test]
fn token_display_strings_are_readable_including_japanese() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tok = &model.tokenizer;
    let text = "The capital of Japan is 東京";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let shown = tok.tokens_display(&ids);
    assert!(
        shown.iter().all(|s| !s.contains('Ġ')),
        "byte-level markers leak: {shown:?}"
    );
    // The pieces spell the text: whole characters as themselves, the bytes of a character
    // split across pieces as \xNN.
    assert_eq!(shown_bytes(&shown), text.as_bytes(), "{shown:?}");
    assert!(
        shown.iter().any(|s| s.starts_with(' ')),
        "spaces are shown as spaces: {shown:?}"
    );
    for (model, text) in [
        (&model, "日本の首都は東京です。"),
        (&bundled_model(), "日本の首都は東京です。"),
    ] {
        let tok = &model.tokenizer;
        let shown = tok.tokens_display(&tok.encode(text).unwrap());
        assert_eq!(shown_bytes(&shown), text.as_bytes(), "{shown:?}");
        // Valid UTF-8 pieces are shown as text, never escaped.
        for (piece, id) in shown.iter().zip(tok.encode(text).unwrap()) {
            if let Ok(s) = std::str::from_utf8(&shown_bytes(std::slice::from_ref(piece))) {
                assert_eq!(piece, s, "token {id}");
            }
        }
    }
    // The bundled tokenizer keeps common Japanese characters whole.
    let bundled = bundled_model();
    let shown = bundled
        .tokenizer
        .tokens_display(&bundled.tokenizer.encode("日本の首都は東京です。").unwrap())
        .concat();
    assert!(shown.contains('の'), "{shown}");
}

/// The bytes a display string stands for: `\xNN` is one byte, anything else its UTF-8.
fn shown_bytes(pieces: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        let mut rest = piece.as_str();
        while let Some(c) = rest.chars().next() {
            if let Some(hex) = rest.strip_prefix("\\x") {
                out.push(u8::from_str_radix(&hex[..2], 16).unwrap());
                rest = &hex[2..];
            } else {
                let mut buf = [0u8; 4];
                out.extend(c.encode_utf8(&mut buf).as_bytes());
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

fn bundled_model() -> Model {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    Model::load(&dir, &Device::Cpu, DType::F32).unwrap()
}

/// A loaded model's content hash is the folder's (`table::model_hash`), computed once: a
/// copy elsewhere has the same one, and a clone keeps it.
#[test]
fn the_content_hash_names_the_folder_contents_not_the_path() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let hash = model.content_hash().unwrap();
    assert_eq!(
        hash,
        monoscope::table::model_hash(&fixture_dir("gpt2")).unwrap()
    );
    assert_eq!(model.clone().content_hash().unwrap(), hash);
    let copy = scratch_copy("gpt2");
    let moved = Model::load(copy.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(moved.content_hash().unwrap(), hash);
    let other = Model::load(&fixture_dir("llama"), &Device::Cpu, DType::F32).unwrap();
    assert_ne!(other.content_hash().unwrap(), hash);
}

/// Llama 3.1 configs written before transformers v5 spell the scaling as a top-level
/// `rope_scaling` object (even older ones say `type` for `rope_type`): the same model.
/// A multimodal Gemma 3 whose config names no BOS token anywhere (as the Hub's do) starts
/// prompts with Gemma's BOS (Gemma3TextConfig's 2), not its EOS; the wrapper's own EOS stands.
#[test]
fn a_multimodal_gemma3_without_a_bos_token_takes_gemmas() {
    let dir = fixture_dir("gemma3");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(
        config.get("bos_token_id").is_none() && config["text_config"].get("bos_token_id").is_none()
    );
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.bos_token_id, Some(2));
    assert_eq!(
        model.eos_token_ids,
        vec![config["eos_token_id"].as_u64().unwrap() as u32]
    );
}

/// LongRoPE inside a per-layer-type `rope_parameters` (Gemma 3 / OLMo 3 layout) falls back on
/// the top-level context lengths, as transformers does: the stretch 64 / 8 gives the attention
/// factor √(1 + ln 8 / ln 8) = √2 on the full-attention layers only.
#[test]
fn longrope_per_layer_type_reads_the_top_level_context_lengths() {
    let dir = scratch_copy("gemma3_text");
    let path = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let pairs = json["head_dim"].as_u64().unwrap() as usize / 2;
    json["original_max_position_embeddings"] = 8.into();
    json["rope_parameters"]["full_attention"] = serde_json::json!({
        "rope_type": "longrope",
        "rope_theta": 1000.0,
        "short_factor": vec![1.0; pairs],
        "long_factor": vec![2.0; pairs],
    });
    std::fs::write(&path, json.to_string()).unwrap();
    let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let factors: Vec<f64> = (model.transformer.blocks.iter())
        .map(|b| {
            let rope = b.attn.rotary.as_ref().unwrap().rope();
            rope.scaling.attention_factor()
        })
        .collect();
    let windows: Vec<bool> = (model.transformer.blocks.iter())
        .map(|b| b.attn.sliding_window.is_some())
        .collect();
    for (factor, sliding) in factors.iter().zip(&windows) {
        let want = if *sliding { 1.0 } else { 2f64.sqrt() };
        assert!((factor - want).abs() < 1e-12, "{factors:?} {windows:?}");
    }
    assert!(windows.contains(&false) && windows.contains(&true));
}

#[test]
fn legacy_rope_scaling_spellings_load_the_same_model() {
    let rewrite = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = scratch_copy("llama3");
        let path = dir.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&path, cfg.to_string()).unwrap();
        let model = Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        logits_error(&model, "llama3")
    };
    let legacy = |key: &'static str| {
        move |cfg: &mut serde_json::Value| {
            let mut scaling = cfg
                .as_object_mut()
                .unwrap()
                .remove("rope_parameters")
                .unwrap();
            let theta = scaling
                .as_object_mut()
                .unwrap()
                .remove("rope_theta")
                .unwrap();
            let kind = scaling
                .as_object_mut()
                .unwrap()
                .remove("rope_type")
                .unwrap();
            scaling[key] = kind;
            cfg["rope_theta"] = theta;
            cfg["rope_scaling"] = scaling;
        }
    };
    for key in ["rope_type", "type"] {
        let err = rewrite(&legacy(key));
        assert!(err <= 1e-4, "rope_scaling.{key}: logits off by {err}");
    }
    // The fixture is one where the scaling matters.
    let err = rewrite(&|cfg| cfg["rope_parameters"]["rope_type"] = "default".into());
    assert!(
        err > 1e-2,
        "without the scaling the logits moved only {err}"
    );
}

/// A change to a config's top-level keys.
type ConfigEdit<'a> = &'a dyn Fn(&mut serde_json::Map<String, serde_json::Value>);

/// A fixture loaded (f32) from a scratch copy whose config.json `edit` changed.
fn load_edited(model_type: &str, edit: ConfigEdit) -> Model {
    let dir = scratch_copy(model_type);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(&path, cfg.to_string()).unwrap();
    Model::load(dir.path(), &Device::Cpu, DType::F32).unwrap()
}

/// Gemma 3 configs on the Hub predate transformers v5's per-layer-type `rope_parameters`:
/// `rope_theta` and `rope_scaling` for the global layers, `rope_local_base_freq` for the
/// sliding ones, and `sliding_window_pattern` instead of `layer_types`. Both spellings are the
/// same model, and each setting matters on the fixture.
#[test]
fn gemma3_configs_of_either_spelling_load_the_same_model() {
    let rewrite = |edit: ConfigEdit| logits_error(&load_edited("gemma3_text", edit), "gemma3_text");
    let legacy = |cfg: &mut serde_json::Map<String, serde_json::Value>| {
        let ropes = cfg.remove("rope_parameters").unwrap();
        let (global, local) = (&ropes["full_attention"], &ropes["sliding_attention"]);
        cfg.insert("rope_theta".into(), global["rope_theta"].clone());
        cfg.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": global["rope_type"], "factor": global["factor"]}),
        );
        cfg.insert("rope_local_base_freq".into(), local["rope_theta"].clone());
        let pattern = cfg.remove("sliding_window_pattern").unwrap();
        cfg.remove("_sliding_window_pattern");
        cfg.remove("layer_types");
        cfg.insert("sliding_window_pattern".into(), pattern);
    };
    let err = rewrite(&legacy);
    assert!(err <= 1e-4, "the legacy spelling: logits off by {err}");
    // Each setting matters: the local base, the global scaling, the window pattern.
    let local_base: ConfigEdit = &|cfg| {
        legacy(cfg);
        cfg.insert("rope_local_base_freq".into(), 10000.0.into());
    };
    let global_scaling: ConfigEdit = &|cfg| {
        legacy(cfg);
        cfg.remove("rope_scaling");
    };
    let window_pattern: ConfigEdit = &|cfg| {
        legacy(cfg);
        cfg.insert("sliding_window_pattern".into(), 6.into());
    };
    for (what, edit) in [
        ("local base", local_base),
        ("global scaling", global_scaling),
        ("window pattern", window_pattern),
    ] {
        let err = rewrite(edit);
        assert!(err > 1e-2, "{what}: the logits moved only {err}");
    }
}

/// OLMo 3's older config spelling, `rope_theta` for every layer and `rope_scaling` for the
/// full-attention ones, is the model that the per-layer-type `rope_parameters` with that one
/// base describe; and the fixture's two bases matter.
#[test]
fn olmo3_legacy_rope_keys_give_the_per_layer_type_settings() {
    let logits_with = |edit: ConfigEdit| {
        let model = load_edited("olmo3", edit);
        let (reference, _) = reference("olmo3");
        let ids = &reference.prompts[2].input_ids;
        model
            .forward(&model.ids_tensor(ids).unwrap(), &Hooks::new())
            .unwrap()
            .logits
    };
    let one_base = |cfg: &mut serde_json::Map<String, serde_json::Value>| {
        let ropes = cfg.get_mut("rope_parameters").unwrap();
        let full_theta = ropes["full_attention"]["rope_theta"].clone();
        ropes["sliding_attention"]["rope_theta"] = full_theta;
    };
    let legacy = |cfg: &mut serde_json::Map<String, serde_json::Value>| {
        let ropes = cfg.remove("rope_parameters").unwrap();
        let full = &ropes["full_attention"];
        cfg.insert("rope_theta".into(), full["rope_theta"].clone());
        cfg.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": full["rope_type"], "factor": full["factor"]}),
        );
    };
    let per_type = logits_with(&one_base);
    let err = common::max_relative_error(&logits_with(&legacy), &per_type);
    assert!(err <= 1e-6, "legacy keys: logits off by {err}");
    let moved = common::max_relative_error(&logits_with(&|_| {}), &per_type);
    assert!(
        moved > 1e-2,
        "the sliding layers' own base moved the logits only {moved}"
    );
}

/// Both parts of YaRN matter on its fixture: the frequency ramp (without it, the logits of
/// plain rotary) and the attention factor on cos and sin.
#[test]
fn yarn_frequencies_and_attention_factor_each_matter() {
    let err = |edit: ConfigEdit| logits_error(&load_edited("llama_yarn", edit), "llama_yarn");
    assert!(err(&|_| {}) <= 1e-4);
    let plain = err(&|cfg| cfg["rope_parameters"]["rope_type"] = "default".into());
    let unscaled = err(&|cfg| cfg["rope_parameters"]["attention_factor"] = 1.0.into());
    for (what, moved) in [("the ramp", plain), ("the attention factor", unscaled)] {
        assert!(moved > 1e-2, "without {what} the logits moved only {moved}");
    }
}
