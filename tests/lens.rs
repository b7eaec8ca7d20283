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

/// A fixture model in f64, the ids of a bilingual prompt and the model's logits on it.
fn fixture_run(model_type: &str) -> (Model, Vec<u32>, candle_core::Tensor) {
    let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
    let ids = model.encode_prompt("The capital of Japan is 東京").unwrap();
    let logits = model
        .forward(&model.ids_tensor(&ids).unwrap(), &Hooks::new())
        .unwrap()
        .logits;
    (model, ids, logits)
}

#[test]
fn the_attribution_adds_up_to_the_logit_and_the_last_lens_row_is_the_prediction() {
    for &model_type in MODEL_TYPES {
        let (model, ids, logits) = fixture_run(model_type);
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
                        grid: false,
                        tuned: None,
                    },
                )
                .unwrap();
                // The attribution is linear, so it splits the logits before Gemma 2's cap.
                let uncapped = |id: u32| {
                    let logit = row[id as usize];
                    match model.transformer.logit_softcap {
                        Some(cap) => cap * (logit / cap).atanh(),
                        None => logit,
                    }
                };
                let want = uncapped(target) - with_versus.map_or(0.0, uncapped);
                let sum: f64 = report.attribution.iter().map(|c| f64::from(c.logit)).sum();
                let tolerance = 1e-5 * (1.0 + want.abs());
                assert!(
                    (sum - want).abs() < tolerance,
                    "{model_type} at {position}: terms add to {sum}, the logit is {want}"
                );
                assert!((f64::from(report.logit) - want).abs() < tolerance);
                // Each block's heads (and the output projection's bias) add up to its
                // attention term; they differ from head to head.
                let dims = model.dims();
                assert_eq!(report.heads.len(), dims.n_layers, "{model_type}");
                for (l, heads) in report.heads.iter().enumerate() {
                    assert_eq!(heads.len(), dims.n_heads, "{model_type}");
                    let attn = report
                        .attribution
                        .iter()
                        .find(|c| c.component == format!("blocks.{l}.hook_attn_out"))
                        .unwrap()
                        .logit;
                    let split: f32 = heads.iter().sum::<f32>() + report.attention_bias[l];
                    assert!(
                        (split - attn).abs() < 1e-5 * (1.0 + attn.abs()),
                        "{model_type} block {l}: heads add to {split}, attn_out gives {attn}"
                    );
                    let has_bias = model.transformer.blocks[l].attn.out.bias().is_some();
                    assert_eq!(report.attention_bias[l] != 0.0, has_bias, "{model_type}");
                    assert!(
                        heads.iter().any(|&h| (h - heads[0]).abs() > 1e-6),
                        "{model_type} block {l}: {heads:?}"
                    );
                }
                // Embeddings (and positions), two outputs per block, and the bias if any.
                let blocks = model.dims().n_layers;
                let components = report
                    .attribution
                    .iter()
                    .filter(|c| !c.component.ends_with(" bias"))
                    .count();
                let embeddings = if model.transformer.pos_embed.is_some() {
                    2
                } else {
                    1
                };
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
            grid: false,
            tuned: None,
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
            grid: false,
            tuned: None,
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

#[test]
fn the_grid_reads_the_lens_at_every_position_and_agrees_with_the_report() {
    for &model_type in MODEL_TYPES {
        let (model, ids, logits) = fixture_run(model_type);
        let position = 2;
        let report = lens(
            &model,
            &LensRequest {
                ids: ids.clone(),
                position: Some(position),
                target: None,
                versus: None,
                top_k: 4,
                grid: true,
                tuned: None,
            },
        )
        .unwrap();
        let grid = report.grid.as_ref().unwrap();
        assert_eq!(
            grid.len(),
            report.lens.len(),
            "{model_type}: one row per depth"
        );
        for (depth, row) in grid.iter().enumerate() {
            assert_eq!(row.len(), ids.len(), "{model_type}: one cell per position");
            // The report's column is the grid's, read by the single-position path.
            let ids_of = |top: &[monoscope::model::generate::TokenProb]| -> Vec<u32> {
                top.iter().map(|t| t.id).collect()
            };
            assert_eq!(
                ids_of(&row[position].top),
                ids_of(&report.lens[depth].top),
                "{model_type} depth {depth}"
            );
            for (a, b) in row[position].top.iter().zip(&report.lens[depth].top) {
                assert!((a.prob - b.prob).abs() < 1e-5, "{model_type} depth {depth}");
            }
            assert!(row.last().unwrap().next_prob.is_none());
        }
        // The deepest row is the model's own distribution at every position, and the
        // probability of the prompt's real next token is read from it.
        for (p, cell) in grid.last().unwrap().iter().enumerate() {
            let probs = softmax(&logits.i((0, p)).unwrap().to_vec1::<f64>().unwrap());
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let top: Vec<u32> = cell.top.iter().map(|t| t.id).collect();
            let want: Vec<u32> = order[..4].iter().map(|&i| i as u32).collect();
            assert_eq!(top, want, "{model_type} at {p}");
            if let Some(&next) = ids.get(p + 1) {
                let got = f64::from(cell.next_prob.unwrap());
                assert!(
                    (got - probs[next as usize]).abs() < 1e-6,
                    "{model_type} at {p}"
                );
            }
        }
    }
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
    assert!(!text.contains("every position"), "the grid only when asked");
    let heads: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("attention heads"))
        .skip(1)
        .take_while(|l| l.starts_with("head "))
        .collect();
    assert_eq!(heads.len(), 8, "{text}");

    // --grid: one line per depth with a column per token, and `grid` in the JSON.
    let grid = monoscope(&["lens", "--prompt", "The capital of Japan is", "--grid"]);
    assert!(grid.status.success());
    let grid = String::from_utf8_lossy(&grid.stdout);
    let table: Vec<&str> = grid
        .lines()
        .skip_while(|l| !l.contains("every position"))
        .collect();
    assert!(
        table[1].contains("\" Japan\"") && table[1].contains("\" is\""),
        "{grid}"
    );
    assert_eq!(
        table.len(),
        2 + 9,
        "header, tokens, embeddings and 8 blocks: {grid}"
    );
    let json = monoscope(&[
        "lens",
        "--prompt",
        "The capital of Japan is",
        "--grid",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let cells = &json["grid"];
    assert_eq!(cells.as_array().unwrap().len(), 9);
    assert_eq!(cells[8].as_array().unwrap().len(), 5, "{cells}");
    assert_eq!(
        cells[8][4]["top"][0]["id"], json["target"]["id"],
        "the model's prediction, last cell"
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
