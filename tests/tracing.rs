//! Causal tracing of a fact on the bundled world model through the CLI: three heatmaps of the
//! right shape, a restoration that must give back the clean probability exactly, and the
//! suggested edit layer recomputed from the JSON.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::process::Command;

/// `monoscope trace-fact` on "The capital of Japan is" → " Tokyo", plus `extra` options.
fn trace_japan(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "trace-fact",
            "--prompt",
            "The capital of {} is",
            "--subject",
            "Japan",
            "--target",
            " Tokyo",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn trace_fact_restores_and_suggests_a_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("trace");
    let out_file = out_dir.join("trace.json");
    let out = trace_japan(&[
        "--samples",
        "3",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(report, saved);
    let traces = report["traces"].as_array().unwrap();
    let kinds: Vec<&str> = traces
        .iter()
        .map(|t| t["restore"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["hidden", "mlp", "attn"]);
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    for t in traces {
        let seq = t["tokens"].as_array().unwrap().len();
        let rows = t["p_restored"].as_array().unwrap();
        assert_eq!(rows.len(), 8, "one row per layer");
        for row in rows {
            assert_eq!(row.as_array().unwrap().len(), seq);
        }
        assert!(f(&t["p_corrupt"]) < f(&t["p_clean"]));
    }
    // The hidden state after the last layer at the last token is all the logits there see:
    // restoring it gives the clean probability back.
    let hidden = &traces[0];
    let last = hidden["tokens"].as_array().unwrap().len() - 1;
    let restored = f(&hidden["p_restored"][7][last]);
    assert!(
        (restored - f(&hidden["p_clean"])).abs() < 1e-4,
        "{restored}"
    );
    // The suggestion is the strongest single-layer MLP effect at the last subject token, the
    // layer `edit --key subject-last` edits; its per-layer recovery is reported beside it.
    let suggestion = &report["suggestion"];
    assert_eq!(suggestion["key"], "subject-last");
    let recovery: Vec<f64> = suggestion["recovery"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| f(&r[0]))
        .collect();
    assert_eq!(recovery.len(), 8, "one share per layer");
    let best = (0..8)
        .max_by(|&a, &b| recovery[a].total_cmp(&recovery[b]))
        .unwrap();
    assert_eq!(suggestion["layer"].as_u64().unwrap() as usize, best);
    // One PNG heatmap per restoration: a cell per (token, layer) plus the subject margin.
    for kind in ["hidden", "mlp", "attn"] {
        let bytes = std::fs::read(out_dir.join(format!("{kind}.png"))).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        let seq = traces[0]["tokens"].as_array().unwrap().len() as u32;
        assert_eq!((width, height), ((8 + 1) * 16, seq * 16));
    }
    // The output files are never replaced without --force.
    let again = trace_japan(&["--samples", "1", "--out", out_dir.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn trace_fact_heads_adds_a_layer_by_head_table() {
    let out = trace_japan(&["--samples", "2", "--heads", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["heads"]["p_restored"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "one row per layer");
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 6));
    assert_eq!(report["heads"]["p_clean"], report["traces"][0]["p_clean"]);

    let text = trace_japan(&["--samples", "2", "--heads"]);
    let text = String::from_utf8_lossy(&text.stdout);
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("restoring each head"))
        .take_while(|l| !l.starts_with("suggested"))
        .collect();
    assert_eq!(table.len(), 2 + 8, "title, head names, 8 layers: {text}");
    assert!(table[1].trim_start().starts_with("H0") && table[9].contains("layer 7"));
    let plain = trace_japan(&["--samples", "2", "--json"]);
    let plain: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(plain.get("heads").is_none(), "heads only when asked");
}

#[test]
fn a_subject_missing_from_the_prompt_is_named_with_the_prompts_tokens() {
    let out = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "trace-fact",
            "--prompt",
            "The capital of France is",
            "--subject",
            "Japan",
            "--target",
            " Paris",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Japan") && stderr.contains("\" capital\""),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The corruption noise's unit σ is the spread of the subject's embeddings where the noise is
/// added, at `hook_embed` (after Gemma's √d_model scale), on every architecture.
#[test]
fn the_noise_unit_is_the_spread_of_hook_embed_on_every_architecture() {
    use monoscope::model::{HookPoint, Hooks, Model};
    for &model_type in common::MODEL_TYPES {
        let model = Model::load(
            &common::fixture_dir(model_type),
            &candle_core::Device::Cpu,
            candle_core::DType::F64,
        )
        .unwrap();
        let subjects = ["Japan", "日本"];
        let sigma = monoscope::causal::subject_embedding_std(&model, &subjects).unwrap();
        let mut values = Vec::new();
        for s in subjects {
            let ids = model.tokenizer.encode(s).unwrap();
            let out = model
                .forward(
                    &model.ids_tensor(&ids).unwrap(),
                    &Hooks::new().capture([HookPoint::Embed]),
                )
                .unwrap();
            let embed = out.cache.require(HookPoint::Embed).unwrap();
            values.extend(embed.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        let expected = var.sqrt();
        assert!(
            (sigma - expected).abs() <= 1e-9 * expected,
            "{model_type}: σ {sigma} against hook_embed's {expected}"
        );
    }
}

/// Per-head tracing on the bundled model: each cell is the corrupted run with exactly that
/// head's `attn.hook_z` columns put back (checked against a replacement built here from the
/// corrupted run's own values), the clean and corrupted probabilities are the layer trace's,
/// and without noise every restoration gives the clean probability.
#[test]
fn tracing_one_head_restores_exactly_its_columns() {
    use candle_core::{D, Tensor};
    use monoscope::causal::{Corruption, Fact, Restore, TraceSettings, trace, trace_heads};
    use monoscope::model::{HookPoint, Intervention, InterventionOp, Model};
    let mut dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.push("assets/world");
    let model = Model::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let fact = Fact {
        prompt: "The capital of Japan is",
        subject: "Japan",
        target: " Tokyo",
    };
    let settings = TraceSettings {
        samples: 3,
        ..TraceSettings::default()
    };
    let sigma = monoscope::causal::subject_embedding_std(&model, &["Japan", "France"]).unwrap();
    let heads = trace_heads(&model, &fact, &settings, sigma).unwrap();
    let dims = model.dims();
    assert_eq!(heads.p_restored.len(), dims.n_layers);
    assert!(heads.p_restored.iter().all(|row| row.len() == dims.n_heads));
    let layers = trace(&model, &fact, &settings, sigma, Some(&[0]), Restore::Hidden).unwrap();
    assert_eq!(
        (heads.p_clean, heads.p_corrupt),
        (layers.p_clean, layers.p_corrupt)
    );
    assert!(
        heads.p_corrupt < heads.p_clean,
        "the noise must cost something"
    );

    // One cell rebuilt by hand: the corrupted z with the head's columns taken from the clean run.
    let (layer, head, hd) = (3, 1, dims.head_dim);
    let point = HookPoint::AttnZ(layer);
    let run = Corruption::new(&model, &fact, &settings, sigma, &[point]).unwrap();
    let corrupt = model
        .forward(&run.batch_ids, &run.hooks.clone().capture([point]))
        .unwrap();
    let corrupt = corrupt.cache.require(point).unwrap();
    let clean = run
        .clean
        .cache
        .require(point)
        .unwrap()
        .broadcast_as(corrupt.shape())
        .unwrap();
    let width = dims.n_heads * hd;
    let patched = Tensor::cat(
        &[
            corrupt.narrow(D::Minus1, 0, head * hd).unwrap(),
            clean.narrow(D::Minus1, head * hd, hd).unwrap(),
            corrupt
                .narrow(D::Minus1, (head + 1) * hd, width - (head + 1) * hd)
                .unwrap(),
        ],
        D::Minus1,
    )
    .unwrap();
    let by_hand = run
        .restored(&model, |hooks| {
            hooks.intervene(point, Intervention::new(InterventionOp::Replace(patched)))
        })
        .unwrap();
    let cell = heads.p_restored[layer][head];
    assert!(
        (by_hand - cell).abs() < 1e-6,
        "head {layer}.{head}: {cell} against {by_hand} rebuilt by hand"
    );
    let spread = heads
        .p_restored
        .iter()
        .flatten()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    assert!(
        spread.1 - spread.0 > 1e-4,
        "every head the same: {spread:?}"
    );

    let silent = TraceSettings {
        noise_sigmas: 0.0,
        ..settings
    };
    let still = trace_heads(&model, &fact, &silent, sigma).unwrap();
    for p in still.p_restored.iter().flatten() {
        assert!(
            (p - still.p_clean).abs() < 1e-5,
            "{p} against {}",
            still.p_clean
        );
    }
}
