//! The binary end to end on fixture models: `info`, `generate`, `trace` with `--json`.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use candle_core::{DType, Device, Tensor};
use common::{MODEL_TYPES, fixture_dir, max_relative_error, monoscope_json, reference};
use monoscope::model::Model;

#[test]
fn info_lists_every_hook_and_the_parameter_count() {
    for model_type in MODEL_TYPES {
        let dir = fixture_dir(model_type);
        let info = monoscope_json(&["info", "--model", dir.to_str().unwrap(), "--json"]);
        let (reference, _) = reference(model_type);
        assert_eq!(info["model_type"], *model_type);
        assert_eq!(info["parameters"], reference.num_parameters);
        assert_eq!(info["dims"]["n_layers"], reference.num_layers);
        let hooks: Vec<&str> = info["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(hooks.len(), model.hook_points().len());
        assert!(
            hooks.contains(&"blocks.1.mlp.hook_post")
                && hooks.contains(&"ln_final.hook_normalized")
        );
        assert_eq!(
            hooks.contains(&"blocks.0.hook_resid_mid"),
            !model.transformer.blocks[0].parallel_residual
        );
    }
}

/// `info` reports the rotary settings it read from the config: base, scaling and rotating
/// channels, in both config spellings (GPT-NeoX's partial rotary too); none for GPT-2.
#[test]
fn info_reports_the_rotary_and_attention_settings_of_the_config() {
    let info = |model_type: &str| {
        let dir = fixture_dir(model_type);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let info = monoscope_json(&["info", "--model", dir.to_str().unwrap(), "--json"]);
        (config, info)
    };
    let (_, gpt2) = info("gpt2");
    assert!(gpt2["rotary"].is_null(), "{}", gpt2["rotary"]);

    let (config, llama3) = info("llama3");
    let (want, got) = (&config["rope_parameters"], &llama3["rotary"]);
    assert_eq!(got["theta"].as_f64(), want["rope_theta"].as_f64());
    assert_eq!(got["scaling"]["type"], want["rope_type"]);
    for key in [
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ] {
        assert_eq!(got["scaling"][key].as_f64(), want[key].as_f64(), "{key}");
    }
    assert_eq!(got["rot_dim"], llama3["dims"]["head_dim"]);

    let (config, neox) = info("gpt_neox");
    let got = &neox["rotary"];
    assert_eq!(got["scaling"]["type"], "none");
    let fraction = config["rope_parameters"]["partial_rotary_factor"]
        .as_f64()
        .or(config["rotary_pct"].as_f64())
        .unwrap();
    let head_dim = neox["dims"]["head_dim"].as_f64().unwrap();
    assert_eq!(got["rot_dim"].as_f64(), Some(head_dim * fraction));
    assert!(fraction < 1.0);
    assert_eq!(got["interleaved"], false);

    // GPT-J: `rotary_dim` channels, in adjacent pairs.
    let (config, gptj) = info("gptj");
    assert_eq!(gptj["rotary"]["rot_dim"], config["rotary_dim"]);
    assert_eq!(gptj["rotary"]["interleaved"], true);

    // LongRoPE: both factor lists, the original context from the top-level key, and the
    // attention factor √(1 + ln s / ln original) for the stretch s = 64 / 8.
    let (config, longrope) = info("phi3_longrope");
    let (want, got) = (&config["rope_parameters"], &longrope["rotary"]["scaling"]);
    assert_eq!(got["type"], "longrope");
    assert_eq!(got["short_factor"], want["short_factor"]);
    assert_eq!(got["long_factor"], want["long_factor"]);
    let original = config["original_max_position_embeddings"].as_f64().unwrap();
    assert_eq!(
        got["original_max_position_embeddings"].as_f64(),
        Some(original)
    );
    let stretch = config["max_position_embeddings"].as_f64().unwrap() / original;
    let factor = got["attention_factor"].as_f64().unwrap();
    assert!((factor - (1.0 + stretch.ln() / original.ln()).sqrt()).abs() < 1e-12);

    // Gemma 2: the window on the layers `layer_types` names, the score scale and both caps.
    let (config, gemma2) = info("gemma2");
    let attention = &gemma2["attention"];
    let window = config["sliding_window"].as_u64().unwrap();
    let windows: Vec<Option<u64>> = config["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t == "sliding_attention").then_some(window))
        .collect();
    let got: Vec<Option<u64>> = attention["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64())
        .collect();
    assert_eq!(got, windows);
    assert!(windows.contains(&None) && windows.contains(&Some(window)));
    let scalar = config["query_pre_attn_scalar"].as_f64().unwrap();
    let scale = attention["scale"].as_f64().unwrap();
    assert!((scale - 1.0 / scalar.sqrt()).abs() < 1e-12, "{scale}");
    assert_eq!(
        attention["score_softcap"].as_f64(),
        config["attn_logit_softcapping"].as_f64()
    );
    assert_eq!(
        gemma2["logit_softcap"].as_f64(),
        config["final_logit_softcapping"].as_f64()
    );
    // Gemma 3: the global layers' base and scaling, and the sliding layers' own base.
    let (config, gemma3) = info("gemma3_text");
    let ropes = &config["rope_parameters"];
    let (global, sliding) = (&gemma3["rotary"], &gemma3["sliding_rotary"]);
    assert_eq!(
        global["theta"].as_f64(),
        ropes["full_attention"]["rope_theta"].as_f64()
    );
    assert_eq!(
        global["scaling"]["type"],
        ropes["full_attention"]["rope_type"]
    );
    assert_eq!(
        global["scaling"]["factor"].as_f64(),
        ropes["full_attention"]["factor"].as_f64()
    );
    assert_eq!(
        sliding["theta"].as_f64(),
        ropes["sliding_attention"]["rope_theta"].as_f64()
    );
    assert_eq!(sliding["scaling"]["type"], "none");
    assert!(gemma2["sliding_rotary"].is_null());
    let (_, mistral) = info("mistral");
    assert!(mistral["logit_softcap"].is_null());
    assert!(mistral["attention"]["score_softcap"].is_null());
    assert!(
        mistral["attention"]["windows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w.as_u64().is_some())
    );
}

#[test]
fn generate_json_gives_the_transformers_greedy_continuation() {
    let (reference, tensors) = reference("gemma");
    let p = &reference.prompts[1];
    let dir = fixture_dir("gemma");
    let n = p.greedy_ids.len().to_string();
    let out = monoscope_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &p.prompt,
        "--max-new-tokens",
        &n,
        "--top-k-probs",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    let steps = out["generation"]["steps"].as_array().unwrap();
    let ids: Vec<u32> = steps
        .iter()
        .map(|s| s["id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, p.greedy_ids);
    for step in steps {
        let top = step["top"].as_array().unwrap();
        assert_eq!(top.len(), 4);
        assert_eq!(
            top[0]["id"], step["id"],
            "greedy picks the most likely token"
        );
        let probs: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
        assert!(probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-6);
    }
    // The first step's top 4 are transformers' next-token distribution at the prompt's end.
    let logits = &tensors["p1.logits"];
    let last = logits.dim(0).unwrap() - 1;
    let probs = candle_nn::ops::softmax_last_dim(&logits.get(last).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    for (t, &want) in steps[0]["top"].as_array().unwrap().iter().zip(&order) {
        assert_eq!(t["id"].as_u64().unwrap() as usize, want);
        let p = t["prob"].as_f64().unwrap();
        assert!(
            (p - f64::from(probs[want])).abs() < 1e-4,
            "{p} vs {}",
            probs[want]
        );
    }
}

#[test]
fn trace_writes_the_requested_hooks_and_the_reference_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("trace.safetensors");
    let (reference, tensors) = reference("gpt_neox");
    let p = &reference.prompts[0];
    let dir = fixture_dir("gpt_neox");
    monoscope_json(&[
        "trace",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &p.prompt,
        "--hooks",
        "blocks.*.mlp.hook_post, hook_embed, blocks.1.attn.hook_pattern",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let traced = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mut keys: Vec<&str> = traced.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "blocks.0.mlp.hook_post",
            "blocks.1.attn.hook_pattern",
            "blocks.1.mlp.hook_post",
            "hook_embed",
            "input_ids",
            "logits"
        ]
    );
    let ids: Vec<i64> = traced["input_ids"].get(0).unwrap().to_vec1().unwrap();
    assert_eq!(
        ids,
        p.input_ids
            .iter()
            .map(|&i| i64::from(i))
            .collect::<Vec<_>>()
    );
    let logits = traced["logits"].get(0).unwrap();
    assert!(max_relative_error(&logits, &tensors["p0.logits"]) < 1e-4);
    let post = traced["blocks.1.mlp.hook_post"].get(0).unwrap();
    assert!(max_relative_error(&post, &tensors["p0.blocks.1.mlp.hook_post"]) < 1e-4);
    // The pattern keeps TransformerLens's shape: [batch, heads, query, key].
    let pattern = &traced["blocks.1.attn.hook_pattern"];
    assert_eq!(pattern.dims(), &[1, 4, ids.len(), ids.len()]);
    let pattern = pattern.get(0).unwrap();
    assert!(max_relative_error(&pattern, &tensors["p0.blocks.1.attn.hook_pattern"]) < 1e-4);
}

/// `monoscope trace` of "The capital of Japan is Tokyo." on `model` at `hooks` with `extra`
/// arguments (the SAEs), into `out`, read back.
fn trace_file(
    model: &std::path::Path,
    hooks: &str,
    out: &std::path::Path,
    extra: &[&str],
) -> std::collections::HashMap<String, Tensor> {
    let args = [
        &[
            "trace",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The capital of Japan is Tokyo.",
            "--hooks",
            hooks,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ][..],
        extra,
    ]
    .concat();
    monoscope_json(&args);
    candle_core::safetensors::load(out, &Device::Cpu).unwrap()
}

/// `trace --sae` runs SAEs at their hooks (SAELens's `run_with_cache_with_saes`): each SAE's
/// input is the hook's value, its activations are the SAE's encoding of it, and
/// reconstruction + error give the input back; with `--splice` the reconstructions replace
/// the hooks' values for the rest of the pass.
#[test]
fn trace_runs_saes_at_their_hooks_and_splices_them_in() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_dir("gpt_neox");
    let sparsify = fixture_dir("gpt_neox").join("../../sparsify/gpt_neox");
    let (attn_sae, resid_sae) = (
        sparsify.join("layers.0.attention"),
        sparsify.join("layers.1"),
    );
    let saes = [
        "--sae",
        resid_sae.to_str().unwrap(),
        "--sae",
        attn_sae.to_str().unwrap(),
    ];
    let trace = |name: &str, extra: &[&str]| {
        let args = [&saes[..], extra].concat();
        trace_file(
            &model,
            "blocks.1.hook_resid_post",
            &tmp.path().join(name),
            &args,
        )
    };
    let plain = trace("plain.safetensors", &[]);
    let spliced = trace("spliced.safetensors", &["--splice"]);
    let get = |t: &std::collections::HashMap<String, candle_core::Tensor>, key: &str| {
        t.get(key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .clone()
    };
    let diff = common::max_abs_diff;

    let resid = "blocks.1.hook_resid_post";
    for (dir, hook) in [(&resid_sae, resid), (&attn_sae, "blocks.0.hook_attn_out")] {
        let sae = monoscope::sae::load(dir, &Device::Cpu, DType::F32)
            .unwrap()
            .sae;
        let input = get(&plain, &format!("{hook}.hook_sae_input"));
        let acts = get(&plain, &format!("{hook}.hook_sae_acts_post"));
        let recons = get(&plain, &format!("{hook}.hook_sae_recons"));
        let error = get(&plain, &format!("{hook}.hook_sae_error"));
        assert!(diff(&acts, &sae.encode(&input).unwrap()) < 1e-6, "{hook}");
        assert!(diff(&(recons + error).unwrap(), &input) < 1e-5, "{hook}");
    }
    // Without --splice the SAE reads the hook and changes nothing.
    let resid_in = get(&plain, &format!("{resid}.hook_sae_input"));
    assert_eq!(diff(&resid_in, &get(&plain, resid)), 0.0);
    // With it, layer 0's SAE sees what it saw before (nothing upstream changed), layer 1's
    // sees the spliced model's residual stream, and the captured hook holds its reconstruction.
    let attn_in = "blocks.0.hook_attn_out.hook_sae_input";
    assert_eq!(diff(&get(&plain, attn_in), &get(&spliced, attn_in)), 0.0);
    let spliced_in = get(&spliced, &format!("{resid}.hook_sae_input"));
    assert!(diff(&spliced_in, &resid_in) > 1e-3);
    let spliced_recons = get(&spliced, &format!("{resid}.hook_sae_recons"));
    assert!(diff(&get(&spliced, resid), &spliced_recons) < 1e-5);
    assert!(diff(&get(&spliced, "logits"), &get(&plain, "logits")) > 1e-3);

    // --sae-hook once per --sae or not at all; one SAE per hook.
    let bad = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
            .args([
                "trace",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "Tokyo",
            ])
            .args([
                "--out",
                tmp.path().join("bad.safetensors").to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let resid_dir = resid_sae.to_str().unwrap();
    let err = bad(&["--sae", resid_dir, "--sae", resid_dir, "--sae-hook", resid]);
    assert!(err.contains("--sae-hook"), "{err}");
    let err = bad(&["--sae", resid_dir, "--sae", resid_dir]);
    assert!(
        err.contains(resid) && err.contains("one SAE per hook"),
        "{err}"
    );
    // An SAE read at a hook of another width is refused, naming its d_in.
    let mlp_sae = sparsify.join("layers.1.mlp.act");
    let err = bad(&["--sae", mlp_sae.to_str().unwrap(), "--sae-hook", resid]);
    assert!(err.contains("d_in") && err.contains(resid), "{err}");
}

/// `trace --sae` runs a transcoder as SAELens attaches one: it reads `blocks.1.mlp.hook_in`,
/// and its tensors are saved under the hook it writes (`blocks.1.hook_mlp_out`), with the
/// prediction (skip path included) plus the error giving that hook's value back; `--splice`
/// puts the prediction in that hook's place and leaves the hook it reads as it was. An SAE
/// spliced into the hook a transcoder reads feeds it the reconstruction.
#[test]
fn trace_runs_a_transcoder_from_the_hook_it_reads_to_the_hook_it_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = fixture_dir("llama");
    let transcoder_dir = model_dir.join("../../sparsify/transcoders/llama/layers.1.mlp");
    let (input, output) = ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out");
    let both = format!("{input},{output}");
    let trace = |name: &str, extra: &[&str]| {
        let args = [&["--sae", transcoder_dir.to_str().unwrap()][..], extra].concat();
        trace_file(&model_dir, &both, &tmp.path().join(name), &args)
    };
    let get = |t: &std::collections::HashMap<String, candle_core::Tensor>, key: &str| {
        t.get(key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .clone()
    };
    let diff = common::max_abs_diff;
    let sae = monoscope::sae::load(&transcoder_dir, &Device::Cpu, DType::F32)
        .unwrap()
        .sae;
    assert!(sae.transcoder && sae.w_skip.is_some());
    let key = |name: &str| format!("{output}.{name}");

    let plain = trace("plain.safetensors", &[]);
    assert!(!plain.contains_key(&format!("{input}.hook_sae_input")));
    let x = get(&plain, &key("hook_sae_input"));
    assert_eq!(diff(&x, &get(&plain, input)), 0.0);
    let acts = get(&plain, &key("hook_sae_acts_post"));
    assert!(diff(&acts, &sae.encode(&x).unwrap()) < 1e-6);
    let recons = get(&plain, &key("hook_sae_recons"));
    assert!(diff(&recons, &sae.output(&x).unwrap()) < 1e-6);
    // The skip path is in the prediction.
    assert!(diff(&recons, &sae.decode(&acts).unwrap()) > 1e-3);
    let error = get(&plain, &key("hook_sae_error"));
    assert!(diff(&(&recons + &error).unwrap(), &get(&plain, output)) < 1e-5);
    assert!(common::max_abs(&error) > 1e-3);

    let spliced = trace("spliced.safetensors", &["--splice"]);
    assert_eq!(diff(&get(&spliced, input), &x), 0.0);
    assert!(diff(&get(&spliced, output), &recons) < 1e-5);
    assert!(diff(&get(&spliced, "logits"), &get(&plain, "logits")) > 1e-3);

    // With an SAE spliced in where the transcoder reads, the transcoder reads its output.
    let (d, d_sae) = (x.dim(2).unwrap(), 16);
    let sae_dir = tmp.path().join("hook_in_sae");
    let hook_in_sae = monoscope::sae::Sae {
        architecture: monoscope::sae::Architecture::TopK { k: 4 },
        w_enc: Tensor::randn(0f32, 0.3, (d, d_sae), &Device::Cpu).unwrap(),
        w_dec: Tensor::randn(0f32, 0.3, (d_sae, d), &Device::Cpu).unwrap(),
        b_enc: Tensor::zeros(d_sae, DType::F32, &Device::Cpu).unwrap(),
        b_dec: Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: false,
        transcoder: false,
        w_skip: None,
    };
    let saved = monoscope::sae::saelens::SaeDir {
        sae: hook_in_sae,
        metadata: monoscope::sae::saelens::SaeMetadata {
            hook_name: input.into(),
            ..Default::default()
        },
        sparsity: None,
    };
    monoscope::sae::saelens::save(&sae_dir, &saved, false).unwrap();
    let chained = trace(
        "chained.safetensors",
        &["--sae", sae_dir.to_str().unwrap(), "--splice"],
    );
    let in_recons = get(&chained, &format!("{input}.hook_sae_recons"));
    assert!(diff(&in_recons, &x) > 1e-3);
    assert_eq!(
        diff(&get(&chained, &key("hook_sae_input")), &in_recons),
        0.0
    );
}

/// Output into a pipe whose reader has gone (`monoscope info | head -1`) ends the command
/// quietly, as for any Unix tool — no panic from `println!` on the closed pipe.
#[test]
fn a_closed_output_pipe_ends_the_command_without_a_panic() {
    let dir = fixture_dir("gpt2");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(["info", "--model", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes before the first line is written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.status.success());
}
