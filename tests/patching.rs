//! Activation and attribution patching on every architecture's fixture model (f64): patched
//! cells that cannot matter score exactly 0, patching the only changed token in the first
//! layer restores the clean run, every batched cell equals the same patch made alone through
//! the hook mechanism, and attribution patching is the metric's derivative along the patch.
//! `monoscope patch` on the bundled world model traces Japan → France to the subject token.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{MODEL_TYPES, fixture_dir, monoscope_json};
use monoscope::Model;
use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp};
use monoscope::patching::{Direction, Layout, PatchReport, PatchRequest, Site, patch};

const ANSWER: u32 = 17;
const WRONG: u32 = 40;

/// A fixture model in f64, a prompt of `len` tokens (the bilingual sentence repeated) and the
/// same prompt with the token at `changed` replaced.
fn pair(model_type: &str, len: usize, changed: usize) -> (Model, Vec<u32>, Vec<u32>) {
    let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
    let sentence = model
        .encode_prompt("The capital of Japan is 東京, of France Paris. ")
        .unwrap();
    let clean: Vec<u32> = sentence.iter().copied().cycle().take(len).collect();
    let mut corrupted = clean.clone();
    corrupted[changed] = (clean[changed] + 7) % 200 + 20;
    assert_ne!(corrupted[changed], clean[changed]);
    (model, clean, corrupted)
}

fn run(model: &Model, clean: &[u32], corrupted: &[u32], direction: Direction) -> PatchReport {
    let request = PatchRequest {
        clean: clean.to_vec(),
        corrupted: corrupted.to_vec(),
        answer: ANSWER,
        wrong: WRONG,
        sites: Site::ALL.to_vec(),
        direction,
        attribution: true,
    };
    let mut calls = 0;
    let report = patch(
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
    assert_eq!(calls, monoscope::patching::passes(model, &request));
    report
}

/// logit(ANSWER) − logit(WRONG) at the last position of `ids` with `hooks`.
fn logit_diff(model: &Model, ids: &[u32], hooks: &Hooks) -> f64 {
    logit_diff_between(model, ids, hooks, ANSWER, WRONG)
}

/// logit(answer) − logit(wrong) at the last position of `ids` with `hooks`.
fn logit_diff_between(model: &Model, ids: &[u32], hooks: &Hooks, answer: u32, wrong: u32) -> f64 {
    let logits = model
        .forward(&model.ids_tensor(ids).unwrap(), hooks)
        .unwrap()
        .logits;
    let last = logits.i((0, ids.len() - 1)).unwrap();
    let at = |t: u32| {
        last.i(t as usize)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    at(answer) - at(wrong)
}

/// The value of `point` on a run of `ids`.
fn capture(model: &Model, ids: &[u32], point: HookPoint) -> Tensor {
    let out = model
        .forward(
            &model.ids_tensor(ids).unwrap(),
            &Hooks::new().capture([point]),
        )
        .unwrap();
    out.cache.require(point).unwrap().clone()
}

/// The intervention patching one cell of `site`'s grid on a prompt of `seq` tokens: its
/// position, its head, or both.
fn cell(model: &Model, site: Site, column: usize, seq: usize, value: Tensor) -> Intervention {
    let replace = Intervention::new(InterventionOp::Replace(value));
    let (head, position) = site.cell(column, seq);
    let replace = match position {
        Some(p) => replace.at_positions(vec![p as i64]),
        None => replace,
    };
    match head {
        // A pattern's channels are its heads.
        Some(h) if matches!(site.hook(0), HookPoint::AttnPattern(_)) => {
            replace.at_channels(vec![h])
        }
        Some(h) => {
            let d_head = model.dims().head_dim;
            replace.at_channels((h * d_head..(h + 1) * d_head).collect::<Vec<_>>())
        }
        None => replace,
    }
}

#[test]
fn patching_restores_exactly_what_the_changed_token_carries_on_every_architecture() {
    for &model_type in MODEL_TYPES {
        let changed = 3;
        let (model, clean, corrupted) = pair(model_type, 9, changed);
        let n_layers = model.dims().n_layers;
        let report = run(&model, &clean, &corrupted, Direction::Denoise);
        assert_eq!(report.differing, vec![changed]);
        let m_clean = logit_diff(&model, &clean, &Hooks::new());
        assert!((report.clean_logit_diff as f64 - m_clean).abs() < 1e-5 * m_clean.abs().max(1.0));
        for grid in &report.grids {
            let estimate = grid.attribution.as_ref().unwrap();
            assert_eq!(grid.patched.len(), n_layers, "{model_type}");
            let heads = grid.site.heads(model.dims());
            for (layer, (row, est)) in grid.patched.iter().zip(estimate).enumerate() {
                let columns = match grid.site.layout() {
                    Layout::Positions => clean.len(),
                    Layout::Heads => heads,
                    Layout::HeadsByPosition => heads * clean.len(),
                };
                assert_eq!(row.len(), columns, "{model_type} {:?}", grid.site);
                assert_eq!(est.len(), columns, "{model_type} {:?}", grid.site);
                // Before the changed token both runs are the same: nothing to restore.
                for c in 0..columns {
                    let Some(p) = grid.site.cell(c, clean.len()).1 else {
                        continue;
                    };
                    if p < changed {
                        let site = grid.site;
                        assert!(row[c].abs() < 1e-9, "{model_type} {site:?} {layer}.{c}");
                        assert!(est[c].abs() < 1e-9, "{model_type} {site:?} {layer}.{c}");
                    }
                }
            }
        }
        // The changed token's clean embedding, entering block 0, is the whole clean run; the
        // other tokens entering block 0 are the same in both runs.
        let resid = report.grid(Site::ResidPre).unwrap();
        for (p, &v) in resid.patched[0].iter().enumerate() {
            if p != changed {
                assert!(v.abs() < 1e-9, "{model_type} position {p}: {v}");
            }
        }
        assert!(
            (resid.patched[0][changed] - 1.0).abs() < 1e-5,
            "{model_type}: {}",
            resid.patched[0][changed]
        );
        // Noising mirrors it: the corrupted token alone makes the corrupted run.
        let noised = run(&model, &clean, &corrupted, Direction::Noise);
        let resid = noised.grid(Site::ResidPre).unwrap();
        assert!(resid.patched[0][changed].abs() < 1e-5, "{model_type}");
        assert!((resid.patched[0][0] - 1.0).abs() < 1e-9, "{model_type}");
    }
}

/// Each batch row patches its own cell: every cell the report gives equals the same patch
/// made alone with a `Replace` intervention at that hook. The 40-token prompt splits the
/// positions over two batches.
#[test]
fn every_batched_cell_equals_the_same_patch_made_alone() {
    for (model_type, len) in [("llama", 40), ("gpt2", 9), ("gemma", 9)] {
        let (model, clean, corrupted) = pair(model_type, len, 2);
        let report = run(&model, &clean, &corrupted, Direction::Denoise);
        let (m_clean, m_corrupt) = (
            logit_diff(&model, &clean, &Hooks::new()),
            logit_diff(&model, &corrupted, &Hooks::new()),
        );
        let last_layer = model.dims().n_layers - 1;
        let (heads, key_heads) = (model.dims().n_heads, model.dims().n_kv_heads);
        for (site, layer, column) in [
            (Site::ResidPre, 1, len - 1),
            (Site::AttnOut, last_layer, len - 1),
            (Site::MlpOut, 0, 2),
            (Site::MlpOut, 1, 35.min(len - 1)),
            (Site::Heads, last_layer, 1),
            (Site::Heads, 0, heads - 1),
            (Site::Patterns, last_layer, 1),
            (Site::Patterns, 0, heads - 1),
            (Site::Queries, last_layer, 1),
            (Site::Queries, 0, heads - 1),
            (Site::Keys, last_layer, key_heads - 1),
            (Site::Keys, 1, 0),
            (Site::Values, 0, key_heads - 1),
            (Site::Values, last_layer, 0),
            // Head 1 at the last token; the last head at the changed token and after it, in
            // the first block (so that later blocks carry it to the last token; later batches).
            (Site::HeadsByPos, last_layer, 2 * len - 1),
            (Site::HeadsByPos, 0, (heads - 1) * len + 2),
            (Site::PatternsByPos, last_layer, 2 * len - 1),
            (Site::PatternsByPos, 0, (heads - 1) * len + 3),
            (Site::QueriesByPos, last_layer, 2 * len - 1),
            (Site::KeysByPos, 0, (key_heads - 1) * len + 2),
            (Site::ValuesByPos, 0, (key_heads - 1) * len + 2),
            (Site::ValuesByPos, last_layer, len - 1),
        ] {
            let point = site.hook(layer);
            let hooks = Hooks::new().intervene(
                point,
                cell(&model, site, column, len, capture(&model, &clean, point)),
            );
            let alone =
                (logit_diff(&model, &corrupted, &hooks) - m_corrupt) / (m_clean - m_corrupt);
            let batched = report.grid(site).unwrap().patched[layer][column] as f64;
            if site.layout() == Layout::HeadsByPosition
                || matches!(site, Site::Queries | Site::Keys | Site::Values)
            {
                // Chosen where the cell matters, so that a mislaid cell cannot pass.
                assert!(alone.abs() > 1e-6, "{model_type} {site:?} {layer}.{column}");
            }
            assert!(
                (alone - batched).abs() < 1e-5,
                "{model_type} {site:?} {layer}.{column}: alone {alone}, batched {batched}"
            );
        }
    }
}

/// Attribution patching's cell is the derivative of the normalised metric along the patch
/// (base + ε·(source − base) at that cell), checked by central differences in both
/// directions.
#[test]
fn attribution_patching_is_the_derivative_along_the_patch() {
    for &model_type in MODEL_TYPES {
        let (model, clean, corrupted) = pair(model_type, 9, 4);
        let key_heads = model.dims().n_kv_heads;
        for direction in [Direction::Denoise, Direction::Noise] {
            let report = run(&model, &clean, &corrupted, direction);
            let (base, source) = match direction {
                Direction::Denoise => (&corrupted, &clean),
                Direction::Noise => (&clean, &corrupted),
            };
            let span = (report.clean_logit_diff - report.corrupted_logit_diff) as f64;
            for (site, layer, column) in [
                (Site::ResidPre, 1, 4),
                (Site::ResidPre, 1, 8),
                (Site::MlpOut, 0, 4),
                (Site::AttnOut, 1, 8),
                (Site::Heads, 1, 0),
                (Site::Patterns, 1, 1),
                (Site::Queries, 1, 2),
                (Site::Keys, 1, key_heads - 1),
                (Site::Values, 0, key_heads - 1),
                // (head, position) as head · 9 + position: cells that reach the last token.
                (Site::HeadsByPos, 0, 9 + 6),
                (Site::HeadsByPos, 1, 2 * 9 + 8),
                (Site::PatternsByPos, 0, 9 + 5),
                (Site::PatternsByPos, 1, 2 * 9 + 8),
                (Site::QueriesByPos, 1, 2 * 9 + 8),
                (Site::KeysByPos, 0, (key_heads - 1) * 9 + 4),
                (Site::ValuesByPos, 1, 8),
            ] {
                let point = site.hook(layer);
                let (b, s) = (capture(&model, base, point), capture(&model, source, point));
                let delta = (&s - &b).unwrap();
                let at = |eps: f64| {
                    let value = (&b + delta.affine(eps, 0.0).unwrap()).unwrap();
                    let hooks = Hooks::new().intervene(point, cell(&model, site, column, 9, value));
                    logit_diff(&model, base, &hooks)
                };
                let eps = 1e-4;
                let slope = (at(eps) - at(-eps)) / (2.0 * eps) / span;
                let estimate = report.grid(site).unwrap().attribution.as_ref().unwrap()[layer]
                    [column] as f64
                    - direction.unpatched() as f64;
                if site.layout() == Layout::HeadsByPosition
                    || matches!(site, Site::Queries | Site::Keys | Site::Values)
                {
                    assert!(slope.abs() > 1e-6, "{model_type} {site:?} {layer}.{column}");
                }
                assert!(
                    (slope - estimate).abs() < 1e-4 * slope.abs().max(1e-2),
                    "{model_type} {direction:?} {site:?} {layer}.{column}: slope {slope}, estimate {estimate}"
                );
            }
        }
    }
}

/// `monoscope patch` on the README's pair.
const JAPAN_FRANCE: [&str; 5] = [
    "patch",
    "--clean",
    "The capital of Japan is",
    "--corrupted",
    "The capital of France is",
];

/// The README's example: the clean answer defaults to the model's prediction, the subject is
/// the only changed token, and its clean embedding restores the answer.
#[test]
fn the_patch_command_traces_the_capital_to_the_subject_on_the_world_model() {
    let args: Vec<&str> = JAPAN_FRANCE.into_iter().chain(["--attribution"]).collect();
    let json = |extra: &[&str]| {
        let all: Vec<&str> = args
            .iter()
            .chain(&["--json"])
            .chain(extra)
            .copied()
            .collect();
        monoscope_json(&all)
    };
    let report = json(&[]);
    let subject = report["differing"].as_array().unwrap();
    assert_eq!(subject.len(), 1);
    let subject = subject[0].as_u64().unwrap() as usize;
    assert!(
        report["clean_tokens"][subject]
            .as_str()
            .unwrap()
            .contains("Japan")
    );
    assert!(
        report["corrupted_tokens"][subject]
            .as_str()
            .unwrap()
            .contains("France")
    );
    assert_ne!(report["answer"], report["wrong"]);
    let clean = report["clean_logit_diff"].as_f64().unwrap();
    let corrupted = report["corrupted_logit_diff"].as_f64().unwrap();
    assert!(clean > 0.0 && corrupted < 0.0, "{clean} {corrupted}");
    let grids = report["grids"].as_array().unwrap();
    let sites: Vec<&str> = grids.iter().map(|g| g["site"].as_str().unwrap()).collect();
    assert_eq!(sites, ["resid_pre", "attn_out", "mlp_out", "heads"]);
    let resid = &grids[0]["patched"];
    assert!((resid[0][subject].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert!(grids.iter().all(|g| g["attribution"].is_array()));
    assert!(report.get("features").is_none());

    // With the bundled SAE: its features, strongest estimate first.
    let with_sae = json(&["--sae", "assets/sae/world-l4-topk", "--top-features", "4"]);
    let features = &with_sae["features"];
    assert_eq!(features["hook"], "blocks.4.mlp.hook_post");
    assert_eq!(features["features"].as_array().unwrap().len(), 4);
    assert!(features["whole_hook"].is_number() && features["all_features"].is_number());
    assert_eq!(with_sae["grids"], report["grids"]);

    assert_text_holds(
        &args,
        &[
            "resid_pre (patched)",
            "heads (attribution patching",
            "moved most by",
            "correlation",
        ],
    );
}

/// `monoscope ARGS` succeeds and its text holds every needle.
fn assert_text_holds(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in needles {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

/// `--sites heads_by_pos,patterns_by_pos`: each layer's row holds every head at every token
/// (head-major), nothing before the subject restores anything, something after it does, and
/// the text names the strongest heads with their tokens.
#[test]
fn the_patch_command_patches_each_head_at_each_token() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = Model::load(&dir.join("assets/world"), &Device::Cpu, DType::F32).unwrap();
    let dims = model.dims();
    let args: Vec<&str> = JAPAN_FRANCE
        .into_iter()
        .chain(["--sites", "heads_by_pos,patterns_by_pos"])
        .collect();
    let all: Vec<&str> = args.iter().chain(&["--json"]).copied().collect();
    let report = monoscope_json(&all);
    let seq = report["clean_tokens"].as_array().unwrap().len();
    let subject = report["differing"][0].as_u64().unwrap() as usize;
    let grids = report["grids"].as_array().unwrap();
    let sites: Vec<&str> = grids.iter().map(|g| g["site"].as_str().unwrap()).collect();
    assert_eq!(sites, ["heads_by_pos", "patterns_by_pos"]);
    for grid in grids {
        let rows = grid["patched"].as_array().unwrap();
        assert_eq!(rows.len(), dims.n_layers);
        let mut strongest = 0f64;
        for row in rows {
            let row = row.as_array().unwrap();
            assert_eq!(row.len(), dims.n_heads * seq);
            for (c, v) in row.iter().enumerate() {
                let v = v.as_f64().unwrap();
                if c % seq < subject {
                    assert!(v.abs() < 1e-6, "{} column {c}: {v}", grid["site"]);
                }
                strongest = strongest.max(v.abs());
            }
        }
        assert!(strongest > 0.05, "{}: {strongest}", grid["site"]);
    }
    assert_text_holds(
        &args,
        &[
            "heads_by_pos (patched)",
            "patterns_by_pos (patched)",
            "at \"",
        ],
    );
}

/// The bundled SAE's features between "Japan" and "France" on the world model (f64): each
/// listed feature's patched score is that feature's change added alone at its token through
/// the hook mechanism, its estimate is the derivative along that change, the list is ordered
/// by the estimate, and the hook's whole value patched is a plain `Replace`.
#[test]
fn sae_feature_patching_agrees_with_patching_each_feature_alone() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = Model::load(&dir.join("assets/world"), &Device::Cpu, DType::F64).unwrap();
    let (sae, hook) = monoscope::sae::load_for_model(
        &dir.join("assets/sae/world-l4-topk"),
        None,
        &model,
        &Device::Cpu,
    )
    .unwrap();
    check_feature_patching(&model, &sae.sae, hook.into());
}

/// A transcoder's features are read at the hook it reads (`blocks.4.mlp.hook_in`) and patched
/// where it writes (`blocks.4.hook_mlp_out`): the same checks as an SAE's, with every patch
/// made at the output hook; one handed only the hook it reads is refused.
#[test]
fn transcoder_feature_patching_reads_one_hook_and_patches_the_other() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = Model::load(&dir.join("assets/world"), &Device::Cpu, DType::F64).unwrap();
    let d = model.dims().d_model;
    let site = monoscope::sae::SaeSite {
        input: "blocks.4.mlp.hook_in".parse().unwrap(),
        output: "blocks.4.hook_mlp_out".parse().unwrap(),
    };
    let cpu = Device::Cpu;
    let d_sae = 96;
    let transcoder = monoscope::sae::Sae {
        architecture: monoscope::sae::Architecture::TopK { k: 12 },
        w_enc: Tensor::randn(0f32, 0.2, (d, d_sae), &cpu).unwrap(),
        w_dec: Tensor::randn(0f32, 0.3, (d_sae, d), &cpu).unwrap(),
        b_enc: Tensor::randn(0f32, 0.1, d_sae, &cpu).unwrap(),
        b_dec: Tensor::zeros(d, DType::F32, &cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: false,
        transcoder: true,
        w_skip: Some(Tensor::randn(0f32, 0.05, (d, d), &cpu).unwrap()),
    };
    check_feature_patching(&model, &transcoder, site);

    let pair = monoscope::patching::PromptPair {
        clean: "The capital of Japan is",
        corrupted: "The capital of France is",
        answer: Some(" Tokyo"),
        wrong: Some(" Paris"),
    };
    let request = PatchRequest::from_prompts(&model, &pair, Direction::Denoise).unwrap();
    let err = monoscope::features::patching::patch_features(
        &model,
        &transcoder,
        site.input,
        &request,
        4,
        &AtomicBool::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hook_name_out"), "{err}");
}

/// Patches the features of `sae` at `site` between "Japan" and "France" both ways and checks
/// the report against patches made alone through the hook mechanism at the output hook.
fn check_feature_patching(model: &Model, sae: &monoscope::sae::Sae, site: monoscope::sae::SaeSite) {
    use monoscope::features::patching::patch_features;
    use monoscope::patching::PromptPair;
    let w_dec = sae.w_dec.to_dtype(DType::F64).unwrap();
    let (clean, corrupted) = ("The capital of Japan is", "The capital of France is");
    for direction in [Direction::Denoise, Direction::Noise] {
        let pair = PromptPair {
            clean,
            corrupted,
            answer: Some(" Tokyo"),
            wrong: Some(" Paris"),
        };
        let request = PatchRequest::from_prompts(model, &pair, direction).unwrap();
        let report = patch_features(model, sae, site, &request, 6, &AtomicBool::new(false))
            .unwrap()
            .unwrap();
        assert_eq!(report.hook, site.input.to_string());
        assert_eq!(report.hook_out, site.output.to_string());
        assert_eq!(report.features.len(), 6);
        assert!(report.changed >= 6);
        // The activations are the SAE's encoding of the hook it reads, in each run.
        let sae64 = sae.to_dtype(DType::F64).unwrap();
        let encoded = |ids: &[u32]| {
            let x = capture(model, ids, site.input);
            sae64.encode(&x).unwrap().get(0).unwrap()
        };
        let (f_clean, f_corrupted) = (encoded(&request.clean), encoded(&request.corrupted));
        for e in &report.features {
            let at = |f: &Tensor| {
                f.i((e.position, e.feature as usize))
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            assert!((at(&f_clean) - e.clean as f64).abs() < 1e-5, "{e:?}");
            assert!(
                (at(&f_corrupted) - e.corrupted as f64).abs() < 1e-5,
                "{e:?}"
            );
        }
        let base = request.base_ids().to_vec();
        let ld = |ids: &[u32], hooks: &Hooks| {
            logit_diff_between(model, ids, hooks, request.answer, request.wrong)
        };
        let metric = |hooks: &Hooks| ld(&base, hooks);
        let (m_clean, m_corrupt) = (
            ld(&request.clean, &Hooks::new()),
            ld(&request.corrupted, &Hooks::new()),
        );
        let normalise = |m: f64| (m - m_corrupt) / (m_clean - m_corrupt);
        let unpatched = direction.unpatched() as f64;
        let mut last_strength = f64::INFINITY;
        for e in &report.features {
            let change = match direction {
                Direction::Denoise => e.clean - e.corrupted,
                Direction::Noise => e.corrupted - e.clean,
            } as f64;
            assert_ne!(change, 0.0);
            let direction_vec = w_dec.i(e.feature as usize).unwrap();
            let with = |scale: f64| {
                let shift = direction_vec.affine(change * scale, 0.0).unwrap();
                Hooks::new().intervene(
                    site.output,
                    Intervention::new(InterventionOp::Add(shift))
                        .at_positions(vec![e.position as i64]),
                )
            };
            let alone = normalise(metric(&with(1.0)));
            assert!(
                (alone - e.patched as f64).abs() < 1e-5,
                "{direction:?} feature {} at {}: alone {alone}, reported {}",
                e.feature,
                e.position,
                e.patched
            );
            let eps = 1e-4;
            let slope =
                (metric(&with(eps)) - metric(&with(-eps))) / (2.0 * eps) / (m_clean - m_corrupt);
            let estimate = e.estimate as f64 - unpatched;
            assert!(
                (slope - estimate).abs() < 1e-4 * slope.abs().max(1e-3),
                "{direction:?} feature {}: slope {slope}, estimate {estimate}",
                e.feature
            );
            assert!(estimate.abs() <= last_strength + 1e-9);
            last_strength = estimate.abs();
        }
        // Every feature's change at every token at once, added where the SAE writes.
        let (f_source, f_base) = match direction {
            Direction::Denoise => (&f_clean, &f_corrupted),
            Direction::Noise => (&f_corrupted, &f_clean),
        };
        let shift = (f_source - f_base).unwrap().matmul(&w_dec).unwrap();
        let all = normalise(metric(&Hooks::new().intervene(
            site.output,
            Intervention::new(InterventionOp::Add(shift.unsqueeze(0).unwrap())),
        )));
        assert!(
            (all - report.all_features as f64).abs() < 1e-5,
            "{all} {}",
            report.all_features
        );
        // The output hook's whole value from the other run.
        let source = match direction {
            Direction::Denoise => &request.clean,
            Direction::Noise => &request.corrupted,
        };
        let value = capture(model, source, site.output);
        let whole = normalise(metric(&Hooks::new().intervene(
            site.output,
            Intervention::new(InterventionOp::Replace(value)),
        )));
        assert!(
            (whole - report.whole_hook as f64).abs() < 1e-5,
            "{whole} {}",
            report.whole_hook
        );
    }
}

/// `--pairs`: every line patched and the pairs averaged; a pair of another token count is
/// refused naming its line.
#[test]
fn the_patch_command_averages_the_pairs_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.tsv");
    std::fs::write(
        &pairs,
        "# clean, corrupted\nThe capital of Japan is\tThe capital of France is\n\n\
         The capital of Italy is\tThe capital of Spain is\t Rome\t Madrid\n",
    )
    .unwrap();
    let path = pairs.to_str().unwrap();
    let report = monoscope_json(&["patch", "--pairs", path, "--sites", "resid_pre", "--json"]);
    assert_eq!(report["pairs"], 2);
    // Each pair's changed token entering block 0 restores its own clean run, so the average
    // is the averaged clean run.
    let subject = report["differing"][0].as_u64().unwrap() as usize;
    let cell = report["grids"][0]["patched"][0][subject].as_f64().unwrap();
    assert!((cell - 1.0).abs() < 1e-4, "{cell}");

    std::fs::write(
        &pairs,
        "The capital of Japan is\tThe capital of France is\nThe capital of Egypt is\tThe capital of Kenya is\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(["patch", "--pairs", path])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pairs.tsv line 2") && stderr.contains("same number of tokens"),
        "{stderr}"
    );
}
