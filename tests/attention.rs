//! Attention patterns, head detectors and head ablation on the fixture models and through the
//! binary.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, IndexOp};
use common::{fixture_dir, monoscope_json};
use monoscope::attention::{
    Detector, ablate_heads, next_token_loss, patterns, probe_copies, repeated_random_tokens,
};
use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

fn load(model_type: &str) -> Model {
    Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F32).unwrap()
}

/// The loss is the mean negative log-probability of each next token, read here off the
/// logits by hand in f64.
#[test]
fn next_token_loss_is_the_mean_negative_log_probability_of_the_next_tokens() {
    let model = load("qwen2");
    let ids = model
        .encode_prompt("The capital of Japan is Tokyo.")
        .unwrap();
    let logits = model
        .forward(&model.ids_tensor(&ids).unwrap(), &Hooks::new())
        .unwrap()
        .logits
        .get(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let scored = 1..ids.len() - 1;
    let by_hand: f64 = scored
        .clone()
        .map(|p| {
            let row = &logits[p];
            let max = row.iter().copied().fold(f64::MIN, f64::max);
            let log_z = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            log_z - row[ids[p + 1] as usize]
        })
        .sum::<f64>()
        / scored.len() as f64;
    let got = next_token_loss(&model, &ids, scored, &Hooks::new()).unwrap();
    assert!(
        (f64::from(got) - by_hand).abs() < 1e-4,
        "{got} against {by_hand}"
    );
    let err = next_token_loss(&model, &ids, 0..ids.len(), &Hooks::new()).unwrap_err();
    assert!(err.to_string().contains("scored positions"), "{err}");
}

/// Zeroing a head's `attn.hook_z` columns and zeroing its whole attention pattern remove the
/// same term, so each head's Δloss must come out the same both ways — on a model with grouped
/// query heads, where a wrong head-to-column mapping would show.
#[test]
fn ablating_a_head_at_hook_z_matches_zeroing_its_pattern() {
    let model = load("llama");
    let ids = model
        .encode_prompt("Paris (パリ) is the capital city of France")
        .unwrap();
    let scored = 0..ids.len() - 1;
    let ablation = ablate_heads(&model, &ids, scored.clone(), &AtomicBool::new(false))
        .unwrap()
        .unwrap();
    let dims = model.dims();
    assert_eq!(ablation.delta.len(), dims.n_layers);
    let mut moved = 0;
    for layer in 0..dims.n_layers {
        for head in 0..dims.n_heads {
            let blind = Intervention::new(InterventionOp::Zero).at_channels(vec![head]);
            let hooks = Hooks::new().intervene(HookPoint::AttnPattern(layer), blind);
            let loss = next_token_loss(&model, &ids, scored.clone(), &hooks).unwrap();
            let want = loss - ablation.clean_loss;
            let got = ablation.delta[layer][head];
            assert!(
                (got - want).abs() < 1e-4,
                "head {layer}.{head}: Δloss {got} at hook_z, {want} at the pattern"
            );
            moved += usize::from(got.abs() > 1e-3);
        }
    }
    assert!(moved > 0, "no head changed the loss");
    let (l, h, d) = ablation.ranked()[0];
    assert_eq!(d, ablation.delta[l][h]);
    assert!(ablation.delta.iter().flatten().all(|&x| x <= d));

    let cancelled = ablate_heads(&model, &ids, scored, &AtomicBool::new(true)).unwrap();
    assert!(cancelled.is_none());
}

/// The probe is the start token and two copies of distinct ordinary tokens; its copies'
/// scored positions predict tokens inside each copy.
#[test]
fn the_induction_probe_repeats_distinct_ordinary_tokens() {
    let model = load("gpt2");
    let ids = repeated_random_tokens(&model, 10, 7).unwrap();
    assert_eq!(ids.len(), 21);
    assert_eq!(Some(ids[0]), model.start_token());
    assert_eq!(ids[1..11], ids[11..]);
    let special = model.special_tokens();
    let distinct: std::collections::HashSet<u32> = ids[1..11].iter().copied().collect();
    assert_eq!(distinct.len(), 10);
    assert!(distinct.iter().all(|id| !special.contains(id)));
    assert_ne!(
        ids,
        repeated_random_tokens(&model, 10, 8).unwrap(),
        "seeded"
    );
    let [first, second] = probe_copies(ids.len(), 10);
    assert_eq!((first, second), (1..10, 11..20));
    // Too long for the context (64 here): a clear error, not a panic.
    let err = repeated_random_tokens(&model, 40, 0).unwrap_err();
    assert!(err.to_string().contains("repeated length"), "{err}");
}

/// `monoscope heads --json --ablate`: the detector scores and Δlosses of the library, for
/// every head.
#[test]
fn the_heads_command_reports_every_detector_and_ablation_as_json() {
    let dir = fixture_dir("mistral");
    let json = monoscope_json(&[
        "heads",
        "--model",
        dir.to_str().unwrap(),
        "--repeat",
        "12",
        "--seed",
        "3",
        "--ablate",
        "--json",
    ]);
    let model = load("mistral");
    let ids = repeated_random_tokens(&model, 12, 3).unwrap();
    let p = patterns(&model, &ids).unwrap();
    let detectors = p.detect();
    assert_eq!(
        json["detectors"].as_array().unwrap().len(),
        Detector::ALL.len()
    );
    for (shown, want) in json["detectors"].as_array().unwrap().iter().zip(&detectors) {
        assert_eq!(shown["detector"], want.detector.name());
        assert_eq!(shown["queries"], want.queries);
        for (l, row) in want.scores.iter().enumerate() {
            for (h, &s) in row.iter().enumerate() {
                let got = shown["scores"][l][h].as_f64().unwrap();
                assert!((got - f64::from(s)).abs() < 1e-6, "{l}.{h}");
            }
        }
    }
    // The pattern the detectors read is the hook's value (here with block 0 fused: equal to
    // rounding).
    let hooked = model
        .forward(
            &model.ids_tensor(&ids).unwrap(),
            &Hooks::new().capture([HookPoint::AttnPattern(1)]),
        )
        .unwrap();
    let head = hooked
        .cache
        .get(HookPoint::AttnPattern(1))
        .unwrap()
        .i((0, 2))
        .unwrap();
    let flat: Vec<f32> = head.flatten_all().unwrap().to_vec1().unwrap();
    let worst = p
        .head(1, 2)
        .iter()
        .zip(&flat)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "off by {worst}");
    let ablation = &json["ablation"];
    let second = probe_copies(ids.len(), 12)[1].clone();
    assert_eq!(ablation["scored"]["start"], second.start);
    let want = ablate_heads(&model, &ids, second, &AtomicBool::new(false))
        .unwrap()
        .unwrap();
    let got = ablation["delta"][1][3].as_f64().unwrap();
    assert!((got - f64::from(want.delta[1][3])).abs() < 1e-5);
    assert_eq!(json["probe_losses"].as_array().unwrap().len(), 2);
}
