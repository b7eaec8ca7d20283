//! The logit lens and direct logit attribution on every architecture's fixture model: the
//! attribution adds up to the model's own logit, the lens after the last block is the model's
//! own prediction, and the command line reads and refuses positions as it should.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use candle_core::{DType, Device, IndexOp};
use common::{MODEL_TYPES, fixture_dir};
use monoscope::Model;
use monoscope::lens::{LensRequest, lens};
use monoscope::model::Hooks;

fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[test]
fn the_attribution_adds_up_to_the_logit_and_the_last_lens_row_is_the_prediction() {
    for &model_type in MODEL_TYPES {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        let ids = model.encode_prompt("The capital of Japan is 東京").unwrap();
        let logits = model
            .forward(&model.ids_tensor(&ids).unwrap(), &Hooks::new())
            .unwrap()
            .logits;
        for position in [ids.len() - 1, 2] {
            let row: Vec<f64> = logits.i((0, position)).unwrap().to_vec1().unwrap();
            let probs = softmax(&row);
            let (target, versus) = (17u32, 40u32);
            for with_versus in [None, Some(versus)] {
                let report = lens(
                    &model,
                    &LensRequest {
                        ids: ids.clone(),
                        position: Some(position),
                        target: Some(target),
                        versus: with_versus,
                        top_k: 3,
                    },
                )
                .unwrap();
                let want = row[target as usize] - with_versus.map_or(0.0, |v| row[v as usize]);
                let sum: f64 = report.attribution.iter().map(|c| f64::from(c.logit)).sum();
                let tolerance = 1e-5 * (1.0 + want.abs());
                assert!(
                    (sum - want).abs() < tolerance,
                    "{model_type} at {position}: terms add to {sum}, the logit is {want}"
                );
                assert!((f64::from(report.logit) - want).abs() < tolerance);
                // Embeddings (and positions), two outputs per block, and the bias if any.
                let blocks = model.dims().n_layers;
                let components = report
                    .attribution
                    .iter()
                    .filter(|c| c.component != "ln_final bias")
                    .count();
                let embeddings = if model_type == "gpt2" { 2 } else { 1 };
                assert_eq!(components, embeddings + 2 * blocks, "{model_type}");
                // One lens row per depth; the deepest is the model's own distribution.
                assert_eq!(report.lens.len(), blocks + 1);
                assert_eq!(report.lens[0].hook, "blocks.0.hook_resid_pre");
                let deepest = report.lens.last().unwrap();
                assert_eq!(
                    deepest.hook,
                    format!("blocks.{}.hook_resid_post", blocks - 1)
                );
                let p = probs[target as usize];
                assert!(
                    (f64::from(deepest.target_prob) - p).abs() < 1e-6,
                    "{model_type}"
                );
                let rank = probs.iter().filter(|&&q| q > p).count();
                assert_eq!(deepest.target_rank, rank, "{model_type}");
                let mut order: Vec<usize> = (0..probs.len()).collect();
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                let top: Vec<u32> = deepest.top.iter().map(|t| t.id).collect();
                let want_top: Vec<u32> = order[..3].iter().map(|&i| i as u32).collect();
                assert_eq!(top, want_top, "{model_type}");
            }
        }
    }
}

#[test]
fn without_a_target_the_models_prediction_is_attributed_and_half_precision_runs() {
    let model = Model::load(&fixture_dir("llama"), &Device::Cpu, DType::F16).unwrap();
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let report = lens(
        &model,
        &LensRequest {
            ids: ids.clone(),
            position: None,
            target: None,
            versus: None,
            top_k: 1,
        },
    )
    .unwrap();
    assert_eq!(report.position, ids.len() - 1);
    assert_eq!(report.lens.last().unwrap().top[0].id, report.target.id);
    assert_eq!(report.lens.last().unwrap().target_rank, 0);
    let sum: f32 = report.attribution.iter().map(|c| c.logit).sum();
    assert!(
        (sum - report.logit).abs() < 0.02 * (1.0 + report.logit.abs()),
        "{sum} vs {}",
        report.logit
    );
    // Positions past the prompt and tokens past the vocabulary are named.
    let past = LensRequest {
        position: Some(ids.len()),
        ..LensRequest {
            ids: ids.clone(),
            position: None,
            target: None,
            versus: None,
            top_k: 1,
        }
    };
    let e = lens(&model, &past).unwrap_err().to_string();
    assert!(
        e.contains("position") && e.contains(&ids.len().to_string()),
        "{e}"
    );
    let e = lens(
        &model,
        &LensRequest {
            target: Some(u32::MAX),
            position: None,
            ..past.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&u32::MAX.to_string()), "{e}");
}

fn monoscope(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_lens_command_reads_a_fact_and_refuses_bad_positions() {
    let out = monoscope(&[
        "lens",
        "--prompt",
        "The capital of Japan is",
        "--target",
        " Tokyo",
        "--versus",
        " Seoul",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The bundled model knows the capital: its own prediction is the target's first token.
    let deepest = report["lens"].as_array().unwrap().last().unwrap();
    assert_eq!(deepest["target_rank"], 0, "{deepest}");
    assert!(report["logit"].as_f64().unwrap() > 0.0);
    assert_eq!(report["versus"]["token"], " S");

    let text = monoscope(&["lens", "--prompt", "The capital of Japan is"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("logit lens") && text.contains("blocks.7.hook_mlp_out"),
        "{text}"
    );

    let bad = monoscope(&[
        "lens",
        "--prompt",
        "The capital of Japan is",
        "--position",
        "99",
    ]);
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("position") && e.contains("99"), "{e}");
    let bad = monoscope(&["lens", "--prompt", "Japan", "--versus", " Seoul"]);
    assert!(!bad.status.success(), "--versus needs --target");
}
