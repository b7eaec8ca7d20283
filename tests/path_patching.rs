//! Path patching on the fixture models (f64): from the last layer, the path to the logits is
//! the head's whole effect, so it equals activation patching; every batched sender equals the
//! same two runs made alone through the hook mechanism; receivers are checked. On the bundled
//! world model, `monoscope path-patch` agrees with `monoscope patch` where it must.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, IndexOp};
use common::{MODEL_TYPES, fixture_dir, monoscope_json};
use monoscope::Model;
use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp};
use monoscope::patching::{Direction, PatchRequest, Site, patch};
use monoscope::path_patching::{HeadInput, PathReport, PathRequest, Receiver, path_patch};

const ANSWER: u32 = 17;
const WRONG: u32 = 40;

/// A fixture model in f64 and a 9-token prompt pair differing at position 3.
fn pair(model_type: &str, direction: Direction) -> (Model, PatchRequest) {
    let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
    let sentence = model
        .encode_prompt("The capital of Japan is 東京, of France Paris. ")
        .unwrap();
    let clean: Vec<u32> = sentence.iter().copied().cycle().take(9).collect();
    let mut corrupted = clean.clone();
    corrupted[3] = (clean[3] + 7) % 200 + 20;
    let request = PatchRequest {
        clean,
        corrupted,
        answer: ANSWER,
        wrong: WRONG,
        sites: vec![Site::Heads],
        direction,
        attribution: false,
    };
    (model, request)
}

fn run(model: &Model, pair: &PatchRequest, receivers: &[Receiver]) -> PathReport {
    let request = PathRequest {
        pair: pair.clone(),
        receivers: receivers.to_vec(),
    };
    let mut calls = 0;
    let report = path_patch(
        model,
        &request,
        &AtomicBool::new(false),
        &mut |done, total| {
            calls += 1;
            assert_eq!(done, calls);
            assert!(done <= total);
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(calls, request.passes(model));
    report
}

/// The request's logit difference at the last position of `ids` with `hooks`, and the capture.
fn run_alone(
    model: &Model,
    request: &PatchRequest,
    ids: &[u32],
    hooks: &Hooks,
) -> (f64, monoscope::model::ActivationCache) {
    let out = model
        .forward(&model.ids_tensor(ids).unwrap(), hooks)
        .unwrap();
    let last = out.logits.i((0, ids.len() - 1)).unwrap();
    let at = |t: u32| {
        last.i(t as usize)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (at(request.answer) - at(request.wrong), out.cache)
}

/// The channels of head `head` in a hook whose heads are `d_head` wide.
fn head_channels(model: &Model, head: usize) -> Vec<usize> {
    let d = model.dims().head_dim;
    (head * d..(head + 1) * d).collect()
}

#[test]
fn the_path_from_the_last_layer_to_the_logits_is_the_heads_whole_effect() {
    for &model_type in MODEL_TYPES {
        for direction in [Direction::Denoise, Direction::Noise] {
            let (model, request) = pair(model_type, direction);
            let paths = run(&model, &request, &[Receiver::Logits]);
            let patched = patch(&model, &request, &AtomicBool::new(false), &mut |_, _| {})
                .unwrap()
                .unwrap();
            let heads = &patched.grid(Site::Heads).unwrap().patched;
            let last = model.dims().n_layers - 1;
            assert_eq!(paths.senders.len(), last + 1, "{model_type}");
            for (h, (&path, &whole)) in paths.senders[last].iter().zip(&heads[last]).enumerate() {
                assert!(
                    (path - whole).abs() < 1e-5,
                    "{model_type} {direction:?} head {last}.{h}: path {path}, patching {whole}"
                );
            }
            // Earlier heads also act through later heads, which the path leaves out.
            let differs = paths.senders[0]
                .iter()
                .zip(&heads[0])
                .any(|(a, b)| (a - b).abs() > 1e-4);
            assert!(
                differs,
                "{model_type} {direction:?}: layer 0's paths are its whole effect"
            );
            assert_eq!(paths.receivers, ["logits"]);
        }
    }
}

/// Each batch row is its own sender: the report's cell equals the two runs made alone — every
/// head's output replaced by the base run's (the sender's by the source run's), the
/// receivers' inputs read there and patched into a fresh base run — with interventions that
/// select channels rather than the batched masks.
fn every_sender_equals_the_two_runs_made_alone(
    model: &Model,
    request: &PatchRequest,
    receivers: &[Receiver],
    tolerance: f64,
) {
    let what = model.dir.display().to_string();
    let report = run(model, request, receivers);
    let dims = model.dims().clone();
    let last = receivers
        .iter()
        .map(|r| match r {
            Receiver::Head { layer, .. } => *layer,
            Receiver::Logits => dims.n_layers,
        })
        .max()
        .unwrap();
    assert_eq!(
        report.senders.len(),
        last,
        "{what}: senders before the last receiver"
    );
    let (base, source) = match request.direction {
        Direction::Denoise => (&request.corrupted, &request.clean),
        Direction::Noise => (&request.clean, &request.corrupted),
    };
    let outputs: Vec<HookPoint> = (0..dims.n_layers).map(HookPoint::AttnZ).collect();
    let (_, base_cache) = run_alone(model, request, base, &Hooks::new().capture(outputs.clone()));
    let (_, source_cache) = run_alone(
        model,
        request,
        source,
        &Hooks::new().capture(outputs.clone()),
    );
    let (clean_ld, _) = run_alone(model, request, &request.clean, &Hooks::new());
    let (corrupted_ld, _) = run_alone(model, request, &request.corrupted, &Hooks::new());
    let group = dims.n_heads / dims.n_kv_heads;
    let inputs: Vec<(HookPoint, Vec<usize>)> = receivers
        .iter()
        .filter(|r| **r != Receiver::Logits)
        .map(|r| match *r {
            Receiver::Head { layer, head, input } => match input {
                HeadInput::Query => (HookPoint::AttnQ(layer), head_channels(model, head)),
                HeadInput::Key => (HookPoint::AttnK(layer), head_channels(model, head / group)),
                HeadInput::Value => (HookPoint::AttnV(layer), head_channels(model, head / group)),
            },
            Receiver::Logits => unreachable!("head receivers only"),
        })
        .collect();
    let mut moved = 0;
    for sender_layer in 0..last {
        for sender in 0..dims.n_heads {
            let mut frozen = Hooks::new().capture(inputs.iter().map(|(p, _)| *p));
            for point in &outputs {
                let replace = |cache: &monoscope::model::ActivationCache| {
                    Intervention::new(InterventionOp::Replace(cache.get(*point).unwrap().clone()))
                };
                frozen = frozen.intervene(*point, replace(&base_cache));
                if *point == HookPoint::AttnZ(sender_layer) {
                    frozen = frozen.intervene(
                        *point,
                        replace(&source_cache).at_channels(head_channels(model, sender)),
                    );
                }
            }
            let (sent_ld, sent) = run_alone(model, request, base, &frozen);
            let mut received = Hooks::new();
            for (point, channels) in &inputs {
                let value = sent.get(*point).unwrap().clone();
                received = received.intervene(
                    *point,
                    Intervention::new(InterventionOp::Replace(value)).at_channels(channels.clone()),
                );
            }
            let ld = match inputs.is_empty() {
                true => sent_ld,
                false => run_alone(model, request, base, &received).0,
            };
            let alone = (ld - corrupted_ld) / (clean_ld - corrupted_ld);
            let batched = f64::from(report.senders[sender_layer][sender]);
            assert!(
                (alone - batched).abs() < tolerance,
                "{what} sender {sender_layer}.{sender}: alone {alone}, batched {batched}"
            );
            if (alone - f64::from(request.direction.unpatched())).abs() > 1e-3 {
                moved += 1;
            }
        }
    }
    assert!(
        moved > 0,
        "{what}: no sender moved the answer, so nothing was checked"
    );
}

#[test]
fn every_batched_sender_equals_the_same_two_runs_made_alone() {
    for (model_type, direction) in [
        ("llama", Direction::Denoise),
        ("gpt2", Direction::Noise),
        ("gemma", Direction::Denoise),
    ] {
        let (model, request) = pair(model_type, direction);
        let heads = model.dims().n_heads;
        let receivers = [
            format!("1.{}:k", heads - 1).parse().unwrap(),
            "1.0:q".parse().unwrap(),
            "1.1:v".parse().unwrap(),
        ];
        every_sender_equals_the_two_runs_made_alone(&model, &request, &receivers, 1e-5);
    }
}

/// On the 8-layer world model, heads between sender and receiver are frozen too: receivers in
/// block 4 (senders in blocks 0–3), and the logits (48 senders: two batches, the first with
/// no sender in blocks 6 and 7), on the README's pair.
#[test]
fn frozen_heads_between_sender_and_receiver_on_the_world_model() {
    let model = Model::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let pair = monoscope::patching::PromptPair {
        clean: "The capital of Japan is",
        corrupted: "The capital of France is",
        answer: None,
        wrong: None,
    };
    let request = PatchRequest::from_prompts(&model, &pair, Direction::Denoise).unwrap();
    let receivers = ["4.0:q".parse().unwrap(), "4.0:v".parse().unwrap()];
    every_sender_equals_the_two_runs_made_alone(&model, &request, &receivers, 1e-4);
    every_sender_equals_the_two_runs_made_alone(&model, &request, &[Receiver::Logits], 1e-4);
}

#[test]
fn receivers_the_model_lacks_are_refused_by_name() {
    let (model, request) = pair("gpt2", Direction::Denoise);
    let refuse = |receivers: &[Receiver], needle: &str| {
        let request = PathRequest {
            pair: request.clone(),
            receivers: receivers.to_vec(),
        };
        let err = path_patch(&model, &request, &AtomicBool::new(false), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    };
    let head = |layer, head| Receiver::Head {
        layer,
        head,
        input: HeadInput::Query,
    };
    refuse(&[], "LAYER.HEAD");
    refuse(&[head(2, 0)], "`2.0:q`");
    refuse(&[head(1, 4)], "2 layers × 4 heads");
    refuse(&[head(0, 1)], "before block 0");
    refuse(&[Receiver::Logits, head(1, 0)], "stands alone");
}

/// The README's pair on the world model: the last layer's paths to the logits are what
/// `monoscope patch --sites heads` gives there; head receivers get a row per earlier block.
#[test]
fn the_path_patch_command_agrees_with_patch_on_the_last_layer() {
    let pair = [
        "--clean",
        "The capital of Japan is",
        "--corrupted",
        "The capital of France is",
        "--json",
    ];
    let args = |extra: &[&'static str]| -> Vec<&'static str> {
        extra.iter().chain(&pair).copied().collect()
    };
    let paths = monoscope_json(&args(&["path-patch"]));
    let patched = monoscope_json(&args(&["patch", "--sites", "heads"]));
    let senders = paths["senders"].as_array().unwrap();
    let heads = patched["grids"][0]["patched"].as_array().unwrap();
    assert_eq!(senders.len(), heads.len());
    let last = senders.len() - 1;
    for (path, whole) in senders[last]
        .as_array()
        .unwrap()
        .iter()
        .zip(heads[last].as_array().unwrap())
    {
        let (path, whole) = (path.as_f64().unwrap(), whole.as_f64().unwrap());
        assert!((path - whole).abs() < 1e-4, "path {path}, patching {whole}");
    }
    let to_head = monoscope_json(&args(&["path-patch", "--receivers", "4.0:q,4.0:k,4.0:v"]));
    assert_eq!(to_head["senders"].as_array().unwrap().len(), 4);
    assert_eq!(
        to_head["receivers"],
        serde_json::json!(["4.0:q", "4.0:k", "4.0:v"])
    );
}

/// `path-patch --pairs` averages a dataset the way `patch --pairs` does: each sender's logit
/// difference, recovered from every pair's own report, averaged, then normalised with the
/// averaged anchors — here two pairs of different lengths on the world model.
#[test]
fn path_patching_pairs_averages_each_senders_logit_difference() {
    let pairs = [
        ("The capital of Japan is", "The capital of France is"),
        (
            "The largest city of Japan is",
            "The largest city of France is",
        ),
    ];
    let single = |(clean, corrupted): (&str, &str)| {
        monoscope_json(&[
            "path-patch",
            "--clean",
            clean,
            "--corrupted",
            corrupted,
            "--json",
        ])
    };
    let reports: Vec<serde_json::Value> = pairs.iter().map(|&p| single(p)).collect();
    let lengths: Vec<usize> = reports
        .iter()
        .map(|r| r["clean_tokens"].as_array().unwrap().len())
        .collect();
    assert_ne!(lengths[0], lengths[1], "the pairs should differ in length");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("pairs.tsv");
    let lines: Vec<String> = pairs.iter().map(|(c, k)| format!("{c}\t{k}")).collect();
    std::fs::write(&file, format!("# clean\tcorrupted\n{}\n", lines.join("\n"))).unwrap();
    let averaged = monoscope_json(&["path-patch", "--pairs", file.to_str().unwrap(), "--json"]);
    assert_eq!(averaged["pairs"], 2);
    let number = |v: &serde_json::Value| v.as_f64().unwrap();
    let anchors: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| {
            (
                number(&r["clean_logit_diff"]),
                number(&r["corrupted_logit_diff"]),
            )
        })
        .collect();
    let clean = (anchors[0].0 + anchors[1].0) / 2.0;
    let corrupted = (anchors[0].1 + anchors[1].1) / 2.0;
    assert!((number(&averaged["clean_logit_diff"]) - clean).abs() < 1e-4);
    let rows = averaged["senders"].as_array().unwrap();
    assert_eq!(rows.len(), reports[0]["senders"].as_array().unwrap().len());
    for (l, row) in rows.iter().enumerate() {
        for (h, cell) in row.as_array().unwrap().iter().enumerate() {
            let raw: f64 = reports
                .iter()
                .zip(&anchors)
                .map(|(r, &(c, k))| k + number(&r["senders"][l][h]) * (c - k))
                .sum::<f64>()
                / 2.0;
            let want = (raw - corrupted) / (clean - corrupted);
            assert!(
                (number(cell) - want).abs() < 1e-4,
                "head {l}.{h}: {} against {want}",
                number(cell)
            );
        }
    }
}
