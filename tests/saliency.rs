//! Input attribution at the token embeddings: integrated gradients are complete, gradient ×
//! input is the derivative along each token's embedding, later tokens get nothing, and on the
//! world model the country decides between two capitals.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::fixture_dir;
use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};
use monoscope::saliency::{Baseline, SaliencyReport, SaliencyRequest, saliency};

fn run(model: &Model, request: &SaliencyRequest) -> SaliencyReport {
    let mut last = 0;
    let report = saliency(
        model,
        request,
        &AtomicBool::new(false),
        &mut |done, total| {
            assert!(
                done > last && done <= total,
                "progress {done}/{total} after {last}"
            );
            last = done;
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(last, request.passes(), "progress should end at the total");
    report
}

/// logit(17) − logit(40) at `position` (what [`request`] attributes), with `hooks`.
fn logit_difference(model: &Model, ids: &Tensor, hooks: &Hooks, position: usize) -> f64 {
    let logits = model
        .forward(ids, hooks)
        .unwrap()
        .logits
        .i((0, position))
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    logits[17] - logits[40]
}

fn request(model: &Model, prompt: &str, steps: usize) -> SaliencyRequest {
    let ids = model.encode_prompt(prompt).unwrap();
    SaliencyRequest {
        position: ids.len() - 1,
        ids,
        target: 17,
        wrong: Some(40),
        steps,
        baseline: SaliencyRequest::default_baseline(model),
    }
}

/// The attributions add up to f(prompt) − f(baseline) up to the quadrature's error, which
/// falls as the steps grow, on four architectures from the start token's embeddings (and from
/// zero on GPT-2, whose position embeddings keep the zero baseline regular); `value` and
/// `baseline_value` are the model's own logits there.
#[test]
fn integrated_gradients_are_complete() {
    let cases = [
        ("gpt2", None),
        ("gpt2", Some(Baseline::Zero)),
        ("gpt_neox", None),
        ("llama", None),
        ("gemma", None),
    ];
    for (model_type, baseline) in cases {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        let with_steps = |steps: usize| {
            let mut r = request(&model, "The capital of Japan is 東京", steps);
            r.baseline = baseline.unwrap_or(r.baseline);
            run(&model, &r)
        };
        let (coarse, fine) = (with_steps(2), with_steps(40));
        let span = (fine.value - fine.baseline_value).abs();
        assert!(span > 1e-2, "{model_type}: nothing to attribute ({span})");
        assert!(
            fine.completeness_gap.abs() < 2e-3 * span,
            "{model_type}: gap {} of {span}",
            fine.completeness_gap
        );
        assert!(
            fine.completeness_gap.abs() < coarse.completeness_gap.abs(),
            "{model_type}: 40 steps ({}) no better than 4 ({})",
            fine.completeness_gap,
            coarse.completeness_gap
        );
        let mut r = request(&model, "The capital of Japan is 東京", 1);
        r.baseline = fine.baseline;
        let ids = model.ids_tensor(&r.ids).unwrap();
        let logit_diff = |hooks: &Hooks| logit_difference(&model, &ids, hooks, r.position) as f32;
        assert!((fine.value - logit_diff(&Hooks::new())).abs() < 1e-5);
        let start = match r.baseline {
            Baseline::Zero => Intervention::new(InterventionOp::Zero),
            Baseline::Token(id) => {
                let reference = model.ids_tensor(&vec![id; r.ids.len()]).unwrap();
                let embedded = model
                    .forward(&reference, &Hooks::new().capture([HookPoint::Embed]))
                    .unwrap();
                let b = embedded.cache.get(HookPoint::Embed).unwrap().clone();
                Intervention::new(InterventionOp::Replace(b))
            }
        };
        let from_baseline = Hooks::new().intervene(HookPoint::Embed, start);
        assert!((fine.baseline_value - logit_diff(&from_baseline)).abs() < 1e-5);
    }
}

/// Each token's gradient × input is the derivative of the prediction along that token's own
/// embedding, d/dε f(x + ε·x_t) at 0 (central differences), and tokens after the read position
/// get exactly zero.
#[test]
fn gradient_times_input_is_the_derivative_along_each_token() {
    for model_type in ["gpt2", "qwen2"] {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        let mut r = request(&model, "The capital of Japan is Tokyo", 8);
        r.position = 3;
        let report = run(&model, &r);
        let ids = model.ids_tensor(&r.ids).unwrap();
        let embed = model
            .forward(&ids, &Hooks::new().capture([HookPoint::Embed]))
            .unwrap()
            .cache
            .get(HookPoint::Embed)
            .unwrap()
            .i(0)
            .unwrap();
        let scale = report
            .tokens
            .iter()
            .fold(0f32, |m, t| m.max(t.gradient_x_input.abs()));
        for (t, token) in report.tokens.iter().enumerate() {
            if t > r.position {
                assert_eq!(token.gradient_x_input, 0.0, "{model_type} token {t}");
                assert_eq!(token.integrated_gradients, 0.0, "{model_type} token {t}");
                continue;
            }
            let along = |eps: f64| -> f64 {
                let bump: Tensor = (embed.i(t).unwrap() * eps).unwrap();
                let add = Intervention::new(InterventionOp::Add(bump)).at_positions(vec![t as i64]);
                let hooks = Hooks::new().intervene(HookPoint::Embed, add);
                logit_difference(&model, &ids, &hooks, r.position)
            };
            let eps = 1e-5;
            let numeric = (along(eps) - along(-eps)) / (2.0 * eps);
            assert!(
                (numeric as f32 - token.gradient_x_input).abs() < 1e-5 * scale.max(1.0),
                "{model_type} token {t}: {} against {numeric}",
                token.gradient_x_input
            );
        }
    }
}

/// On the bundled world model, "The capital of Japan is" → " Tokyo" rather than " Paris":
/// from the zero baseline, the country carries the largest integrated gradient.
#[test]
fn the_country_decides_between_two_capitals_on_the_world_model() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let first = |text: &str| model.tokenizer.encode(text).unwrap()[0];
    let report = run(
        &model,
        &SaliencyRequest {
            position: ids.len() - 1,
            ids,
            target: first(" Tokyo"),
            wrong: Some(first(" Paris")),
            steps: 32,
            baseline: Baseline::Zero,
        },
    );
    let top = report
        .tokens
        .iter()
        .max_by(|a, b| a.integrated_gradients.total_cmp(&b.integrated_gradients))
        .unwrap();
    assert_eq!(top.token, " Japan", "{:?}", report.tokens);
    let span = (report.value - report.baseline_value).abs();
    assert!(report.completeness_gap.abs() < 0.01 * span);
}

/// Bad requests are refused by name; the CLI's JSON is the library's report.
#[test]
fn bad_requests_are_refused_and_the_command_reports_the_same() {
    let model = Model::load(&fixture_dir("llama"), &Device::Cpu, DType::F32).unwrap();
    let never = AtomicBool::new(false);
    let mut r = request(&model, "Hello there", 0);
    let err = saliency(&model, &r, &never, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("--steps"), "{err}");
    r.steps = 4;
    r.position = r.ids.len();
    let err = saliency(&model, &r, &never, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("--position"), "{err}");
    r.position = 0;
    r.target = model.dims().vocab_size as u32;
    let err = saliency(&model, &r, &never, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");

    let dir = fixture_dir("llama");
    let json = common::monoscope_json(&[
        "saliency",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The capital of Japan is",
        "--steps",
        "8",
        "--json",
    ]);
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let top = monoscope::model::generate::next_token_top_k(&model, &ids, 1, &Hooks::new()).unwrap();
    let report = run(
        &model,
        &SaliencyRequest {
            position: ids.len() - 1,
            ids,
            target: top[0].id,
            wrong: None,
            steps: 8,
            baseline: SaliencyRequest::default_baseline(&model),
        },
    );
    assert_eq!(json["target"], report.target);
    let tokens = json["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), report.tokens.len());
    for (got, want) in tokens.iter().zip(&report.tokens) {
        let ig = got["integrated_gradients"].as_f64().unwrap() as f32;
        assert!((ig - want.integrated_gradients).abs() < 1e-5);
    }
}
