//! Feature statistics, steering and ground-truth scoring on real (tiny) models: the feature
//! store against a brute-force pass, steering against its defining formula, and concept
//! scoring on the bundled world model.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{direct_codes, fixture_dir, random_sae};
use monoscope::Model;
use monoscope::features::stats::StatsSettings;
use monoscope::features::steer::{Steer, SteerMode, steering_hooks};
use monoscope::features::{BuildSettings, build, store};
use monoscope::model::{HookPoint, Hooks};
use monoscope::sae::Architecture;
use monoscope::sae::activations::Corpus;
use monoscope::sae::codes::CodingInput;
use monoscope::sae::codes::SegmentSettings;

const HOOK: &str = "blocks.1.mlp.hook_post";
const CONTEXT: usize = 16;

fn model() -> Model {
    Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap()
}

fn documents() -> Vec<String> {
    (0..40)
        .map(|i| {
            format!(
                "Note {i}: the river {} flows past town {} and then {} hills.",
                i % 7,
                i * 3 % 11,
                i % 4
            )
        })
        .collect()
}

#[test]
fn the_feature_store_agrees_with_a_brute_force_pass() {
    let model = model();
    let tmp = tempfile::tempdir().unwrap();
    let sae_dir = tmp.path().join("sae");
    std::fs::create_dir_all(&sae_dir).unwrap();
    let sae = random_sae(&sae_dir, HOOK, 256, 48, Architecture::TopK { k: 5 });
    let docs = documents();
    let text = tmp.path().join("corpus.txt");
    std::fs::write(&text, docs.join("\n")).unwrap();
    let corpus = Corpus::parse(text.to_str().unwrap(), "text").unwrap();
    let stats = StatsSettings {
        top_n: 6,
        intervals: 4,
        samples_per_interval: 3,
        histogram_bins: 16,
        context_before: 3,
        context_after: 2,
    };
    let settings = BuildSettings {
        segment: SegmentSettings {
            context_size: CONTEXT,
            prepend_bos: true,
            exclude_special: true,
            segments_per_forward: 3,
        },
        tokens: 1_000_000,
        stats: stats.clone(),
        logit_tokens: 4,
        neighbours: 3,
    };
    let hook: HookPoint = HOOK.parse().unwrap();
    let input = CodingInput {
        model: &model,
        sae: &sae,
        sae_dir: &sae_dir,
        hook,
        writes: hook,
        corpus: &corpus,
    };
    let out = tmp.path().join("features");
    let never = AtomicBool::new(false);
    build(&input, &out, &settings, false, &never, |_| {}).unwrap();
    // A second build into the same folder needs --overwrite.
    let e = build(&input, &out, &settings, false, &never, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--overwrite"), "{e}");

    let store = store::open(&out).unwrap();
    let (rows, tokens) = direct_codes(&model, &sae, HOOK, CONTEXT, &docs);
    assert_eq!(store.info.tokens, tokens.len() as u64);
    assert_eq!(store.features.len(), 48);
    let mut checked_contexts = 0;
    let mut interval_contexts = 0;
    for feature in &store.features {
        let f = feature.feature;
        let mut values: Vec<f32> = rows
            .iter()
            .filter(|(k, _)| k.2 == f)
            .map(|(_, v)| *v)
            .collect();
        values.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(feature.fire_count, values.len() as u64, "feature {f}");
        assert_eq!(feature.histogram.iter().sum::<u64>(), feature.fire_count);
        if values.is_empty() {
            assert!(feature.contexts.is_empty());
            continue;
        }
        assert!((feature.max_activation - values[0]).abs() < 1e-4);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!((feature.mean_activation - mean).abs() < 1e-4 * (1.0 + mean));
        // The histogram's last non-empty bin holds the maximum, and every bin counts the
        // activations on its part of the grid.
        let last = feature.histogram.iter().rposition(|&c| c > 0).unwrap();
        let w = feature.histogram_bin_width;
        assert!((last as f32 * w..(last + 1) as f32 * w).contains(&feature.max_activation));
        let bins = feature.histogram.len();
        let range = w * bins as f32;
        let mut counts = vec![0u64; bins];
        for v in &values {
            counts[((v / range * bins as f32) as usize).min(bins - 1)] += 1;
        }
        assert_eq!(feature.histogram, counts, "feature {f}");

        let top: Vec<f32> = feature
            .contexts
            .iter()
            .filter(|c| c.interval.is_none())
            .map(|c| c.activation)
            .collect();
        let want = &values[..values.len().min(stats.top_n)];
        assert_eq!(top.len(), want.len(), "feature {f}");
        for (a, b) in top.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "feature {f}: top {a} vs {b}");
        }
        for c in &feature.contexts {
            if let Some((low, high)) = c.interval {
                assert!(low <= c.activation && c.activation < high, "{c:?}");
                interval_contexts += 1;
            }
            let peak = c.peak as usize;
            assert!((c.token_activations[peak] - c.activation).abs() < 1e-6);
            assert_eq!(c.token_ids[peak], tokens[&(c.doc_id, c.position)]);
            assert_eq!(c.tokens.len(), c.token_ids.len());
            for (j, &a) in c.token_activations.iter().enumerate() {
                let pos = c.position + j as u32 - c.peak;
                let want = rows.get(&(c.doc_id, pos, f)).copied().unwrap_or(0.0);
                assert!((a - want).abs() < 1e-4, "feature {f} context {c:?}");
                assert_eq!(c.token_ids[j], tokens[&(c.doc_id, pos)]);
            }
            checked_contexts += 1;
        }
    }
    assert!(
        checked_contexts > 100,
        "{checked_contexts} contexts checked"
    );
    assert!(
        interval_contexts > 0,
        "no quantile-interval examples were checked"
    );

    // Neighbours: brute-force cosines of decoder rows.
    let w = sae.w_dec.to_vec2::<f32>().unwrap();
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    };
    for f in [0usize, 31, 47] {
        let mut all: Vec<(usize, f32)> = (0..48)
            .filter(|&g| g != f)
            .map(|g| (g, cos(&w[f], &w[g])))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        let got = &store.features[f].neighbours;
        assert_eq!(got.len(), 3, "feature {f}: the store keeps 3 neighbours");
        for ((g, c), (eg, ec)) in got.iter().zip(&all) {
            assert_eq!(*g as usize, *eg);
            assert!((c - ec).abs() < 1e-5);
        }
    }

    // Logit effects: decoder row → down projection → centred, times the final gain → W_U.
    let t = &model.transformer;
    let d = sae.w_dec.i(7).unwrap().unsqueeze(0).unwrap();
    let resid = d
        .matmul(&t.blocks[1].mlp.down_proj().weight().t().unwrap())
        .unwrap();
    let resid = resid
        .broadcast_sub(&resid.mean_keepdim(1).unwrap())
        .unwrap();
    let resid = resid.broadcast_mul(t.ln_final.weight()).unwrap();
    let logits = resid
        .matmul(&t.unembed.t().unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let best = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    let (name, value) = &store.features[7].top_logits[0];
    assert_eq!(name, &model.tokenizer.token_display(best as u32));
    assert!((value - logits[best]).abs() < 1e-4);
}

#[test]
fn steering_moves_activations_along_decoder_directions() {
    let model = model();
    let tmp = tempfile::tempdir().unwrap();
    let sae = random_sae(tmp.path(), HOOK, 256, 48, Architecture::TopK { k: 5 });
    let hook: HookPoint = HOOK.parse().unwrap();
    let ids = model
        .ids_tensor(&model.encode_prompt("the river flows").unwrap())
        .unwrap();
    let clean = model.forward(&ids, &Hooks::new().capture([hook])).unwrap();
    let x = clean.cache.get(hook).unwrap().clone();
    let acts = sae.encode(&x).unwrap();
    let steers = [
        Steer {
            feature: 3,
            value: 2.5,
        },
        Steer {
            feature: 40,
            value: -1.0,
        },
    ];
    for mode in [SteerMode::Add, SteerMode::Clamp] {
        let hooks = steering_hooks(&sae, hook, &steers, mode, &Device::Cpu)
            .unwrap()
            .capture([hook]);
        let steered = model.forward(&ids, &hooks).unwrap();
        let got = (steered.cache.get(hook).unwrap() - &x).unwrap();
        let mut want = x.zeros_like().unwrap();
        for s in &steers {
            let amount = match mode {
                SteerMode::Add => Tensor::full(s.value, acts.dims()[..2].to_vec(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap(),
                SteerMode::Clamp => {
                    let a = acts.narrow(2, s.feature as usize, 1).unwrap();
                    a.affine(-1.0, f64::from(s.value)).unwrap()
                }
            };
            let dir = sae.w_dec.i(s.feature as usize).unwrap();
            want = (want + amount.broadcast_mul(&dir).unwrap()).unwrap();
        }
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{mode:?}: {diff}");
        // The logits change too.
        assert!(common::max_abs_diff(&steered.logits, &clean.logits) > 1e-3);
    }
    let e = steering_hooks(
        &sae,
        hook,
        &[Steer {
            feature: 48,
            value: 1.0,
        }],
        SteerMode::Add,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("48"), "{e}");
}

/// A transcoder steers where it writes: the shift along its decoder rows lands at its output
/// hook (clamping against the activation its input hook gave earlier in the same pass), and the
/// hook it reads is left as it was. Handed only the hook it reads, it is refused.
#[test]
fn a_transcoder_steers_at_the_hook_it_writes() {
    let model = model();
    let input: HookPoint = HOOK.parse().unwrap();
    let output: HookPoint = "blocks.1.hook_mlp_out".parse().unwrap();
    let (d_in, d_out, d_sae) = (model.dims().d_mlp, model.dims().d_model, 24);
    let cpu = Device::Cpu;
    let sae = monoscope::sae::Sae {
        architecture: Architecture::Standard,
        w_enc: Tensor::randn(0f32, 0.3, (d_in, d_sae), &cpu).unwrap(),
        w_dec: Tensor::randn(0f32, 1.0, (d_sae, d_out), &cpu).unwrap(),
        b_enc: Tensor::randn(0f32, 0.1, d_sae, &cpu).unwrap(),
        b_dec: Tensor::zeros(d_out, DType::F32, &cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: false,
        transcoder: true,
        w_skip: None,
    };
    let site = monoscope::sae::SaeSite { input, output };
    let ids = model
        .ids_tensor(&model.encode_prompt("the river flows").unwrap())
        .unwrap();
    let clean = model
        .forward(&ids, &Hooks::new().capture([input, output]))
        .unwrap();
    let (x_in, y) = (
        clean.cache.get(input).unwrap(),
        clean.cache.get(output).unwrap(),
    );
    let acts = sae.encode(x_in).unwrap();
    let steers = [Steer {
        feature: 5,
        value: 3.0,
    }];
    for mode in [SteerMode::Add, SteerMode::Clamp] {
        let hooks = steering_hooks(&sae, site, &steers, mode, &cpu)
            .unwrap()
            .capture([input, output]);
        let steered = model.forward(&ids, &hooks).unwrap();
        assert_eq!(
            common::max_abs_diff(steered.cache.get(input).unwrap(), x_in),
            0.0,
            "{mode:?}: the input hook is read, not changed"
        );
        let amount = match mode {
            SteerMode::Add => Tensor::full(3f32, acts.dims()[..2].to_vec(), &cpu)
                .unwrap()
                .unsqueeze(2)
                .unwrap(),
            SteerMode::Clamp => acts.narrow(2, 5, 1).unwrap().affine(-1.0, 3.0).unwrap(),
        };
        let want = amount.broadcast_mul(&sae.w_dec.i(5).unwrap()).unwrap();
        let got = (steered.cache.get(output).unwrap() - y).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{mode:?}: {diff}");
    }
    let err = steering_hooks(&sae, input, &steers, SteerMode::Add, &cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("hook_name_out"), "{err}");
}

fn world_sae() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/sae/world-l4-topk")
}

#[test]
fn concept_scores_on_the_world_model_are_consistent() {
    use monoscope::features::score::{ScoreSettings, score};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let model = Model::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let sae = monoscope::sae::saelens::load(&world_sae(), &Device::Cpu, DType::F32).unwrap();
    let mut settings = ScoreSettings::new(SegmentSettings {
        context_size: 128,
        prepend_bos: true,
        exclude_special: true,
        segments_per_forward: 16,
    });
    settings.docs_per_country = 0;
    settings.fact_lists = 60;
    let hook: HookPoint = "blocks.4.mlp.hook_post".parse().unwrap();
    let never = std::sync::atomic::AtomicBool::new(false);
    let report = score(&model, &sae.sae, hook, &settings, &never, |_, _| {})
        .unwrap()
        .expect("not cancelled");
    use monoscope::world::knowledge::{EntityKind, Lang, Relation};
    let scored: Vec<_> = report.concepts.iter().filter(|c| c.scored).collect();
    // Every entity kind and relation in each language, plus "Japanese text".
    let per_language = EntityKind::ALL.len() + Relation::ALL.len();
    assert_eq!(scored.len(), per_language * Lang::ALL.len() + 1);
    for kind in EntityKind::ALL {
        let name = serde_json::to_value(kind).unwrap();
        let name = format!("entity:{}:en", name.as_str().unwrap());
        assert!(
            scored.iter().any(|c| c.concept == name),
            "{name} not scored"
        );
    }
    let mean = scored.iter().map(|c| c.evaluation.f1).sum::<f64>() / scored.len() as f64;
    assert!((mean - report.mean_f1).abs() < 1e-12);
    for c in &report.concepts {
        let probe = c.probe.expect("probes are fitted by default");
        for d in [c.selection, c.evaluation, probe] {
            assert!((0.0..=1.0).contains(&d.f1) && (0.0..=1.0).contains(&d.precision));
        }
    }
    let probe_mean = scored.iter().map(|c| c.probe.unwrap().f1).sum::<f64>() / scored.len() as f64;
    assert!((probe_mean - report.mean_probe_f1.unwrap()).abs() < 1e-12);
    // k-sparse probes: one per k, nested latent sets, means over the scored concepts, and
    // more latents read more of each concept on average.
    let ks: Vec<usize> = report.mean_sparse_probe_f1.iter().map(|m| m.k).collect();
    assert_eq!(ks, settings.sparse_probe_ks);
    for (i, m) in report.mean_sparse_probe_f1.iter().enumerate() {
        let mean = scored
            .iter()
            .map(|c| c.sparse_probes[i].evaluation.f1)
            .sum::<f64>()
            / scored.len() as f64;
        assert!((mean - m.f1).abs() < 1e-12);
    }
    for c in &scored {
        assert_eq!(
            c.sparse_probe_latents.len(),
            *ks.last().unwrap(),
            "{}",
            c.concept
        );
    }
    let (first, last) = (
        report.mean_sparse_probe_f1[0].f1,
        report.mean_sparse_probe_f1.last().unwrap().f1,
    );
    assert!(last > first + 0.1, "k-sparse means {first} → {last}");
    assert!(last <= report.mean_probe_f1.unwrap() + 0.05, "{last}");
    // Absorption is scored on the concept's tokens its dense probe finds: as many as the
    // probe's true positives.
    for c in &scored {
        let a = c
            .absorption
            .as_ref()
            .expect("an SAE with probes has absorption");
        let probe = c.probe.unwrap();
        let found = (probe.recall * c.positives as f64).round() as u64;
        assert_eq!(a.tokens, found, "{}", c.concept);
        assert!(
            a.main_features.contains(&c.best_feature) || c.selection.f1 == 0.0,
            "{}",
            c.concept
        );
        assert!((0.0..=1.0).contains(&a.mean_fraction) && (0.0..=1.0).contains(&a.full_rate));
        // The same rule along the concept's mean difference: the same tokens and main
        // features, a direction whose cosine with the mean difference is 1.
        let d = c.absorption_by_mean_difference.as_ref().unwrap();
        assert_eq!((d.tokens, &d.main_features), (a.tokens, &a.main_features));
        if d.tokens > 0 {
            assert!(
                (d.probe_alignment - 1.0).abs() < 1e-4,
                "{}: {d:?}",
                c.concept
            );
        }
        assert!((0.0..=1.0).contains(&d.mean_fraction) && (0.0..=1.0).contains(&d.full_rate));
    }
    let by_difference: Vec<f64> = (scored.iter())
        .filter_map(|c| c.absorption_by_mean_difference.as_ref())
        .filter(|a| a.tokens > 0)
        .map(|a| a.mean_fraction)
        .collect();
    let mean = by_difference.iter().sum::<f64>() / by_difference.len() as f64;
    assert!((mean - report.mean_absorption_by_mean_difference.unwrap()).abs() < 1e-12);
    let with_tokens: Vec<f64> = scored
        .iter()
        .map(|c| c.absorption.as_ref().unwrap())
        .filter(|a| a.tokens > 0)
        .map(|a| a.mean_fraction)
        .collect();
    let absorbed = with_tokens.iter().sum::<f64>() / with_tokens.len() as f64;
    assert!((absorbed - report.mean_absorption.unwrap()).abs() < 1e-12);
    // The dense reference reads the script of the text straight off the hook.
    let japanese = scored.iter().find(|c| c.concept == "lang:ja").unwrap();
    assert!(japanese.probe.unwrap().f1 > 0.9, "{:?}", japanese.probe);
    // The features chosen for "the next token is a capital/currency/…" must detect it on
    // held-out text far better than chance: the concepts cover about 1% of tokens.
    let relations: Vec<_> = scored
        .iter()
        .filter(|c| c.concept.starts_with("relation:"))
        .collect();
    assert_eq!(relations.len(), Relation::ALL.len() * Lang::ALL.len());
    let relation_f1 =
        relations.iter().map(|c| c.evaluation.f1).sum::<f64>() / relations.len() as f64;
    assert!(relation_f1 > 0.4, "{relation_f1}");
}

#[test]
fn features_score_refuses_a_sparse_probe_k_of_zero() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "features",
            "score",
            "--sae",
            world_sae().to_str().unwrap(),
            "--sparse-probe-k",
            "1,0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--sparse-probe-k") && stderr.contains("\"0\""),
        "{stderr}"
    );
}

#[test]
fn features_build_refuses_zero_tokens() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "features",
            "build",
            "--sae",
            world_sae().to_str().unwrap(),
            "--tokens",
            "0",
            "--out",
            "/tmp/monoscope-never-written",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--tokens"), "{stderr}");
    assert!(!std::path::Path::new("/tmp/monoscope-never-written").exists());
}

/// Logit effects on LayerNorm (GPT-2), RMSNorm (Llama) and Gemma's (1 + w) RMSNorm models,
/// for a residual hook, an MLP hook and the final norm's output, against the model's own
/// modules: the direction through the layer's down projection (its forward, less the bias),
/// then the final norm's forward (less its value at zero, i.e. the bias), then the
/// unembedding. The norm's forward divides by the direction's own scale, which the direct
/// path holds constant, so the brute-force logits are a positive multiple of the reported
/// ones: the same top and bottom tokens, in proportion.
#[test]
fn logit_effects_follow_the_models_own_modules_on_every_norm() {
    use candle_nn::Module;
    use monoscope::features::logits::logit_effects;
    for model_type in ["gpt2", "llama", "gemma"] {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F32).unwrap();
        let t = &model.transformer;
        let names = model.token_names();
        let dims = model.dims();
        for hook in [
            "blocks.0.hook_resid_post",
            "blocks.1.mlp.hook_post",
            "blocks.1.attn.hook_z",
            "ln_final.hook_normalized",
        ] {
            let point: HookPoint = hook.parse().unwrap();
            let d_in = match point {
                HookPoint::MlpPost(_) => dims.d_mlp,
                HookPoint::AttnZ(_) => dims.n_heads * dims.head_dim,
                _ => dims.d_model,
            };
            // Seeded, so a run is reproducible.
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(d_in as u64);
            let values: Vec<f32> = (0..6 * d_in)
                .map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0))
                .collect();
            let w_dec = Tensor::from_vec(values, (6, d_in), &Device::Cpu).unwrap();
            let n = 4;
            let effects = logit_effects(&model, point, &w_dec, n, &names)
                .unwrap()
                .unwrap();
            assert_eq!(effects.len(), 6);
            let mut resid = w_dec.clone();
            if let HookPoint::MlpPost(l) = point {
                let down = t.blocks[l].mlp.down_proj();
                let zero = down.forward(&resid.zeros_like().unwrap()).unwrap();
                resid = (down.forward(&resid).unwrap() - zero).unwrap();
            }
            if let HookPoint::AttnZ(l) = point {
                let out = &t.blocks[l].attn.out;
                let zero = out.forward(&resid.zeros_like().unwrap()).unwrap();
                resid = (out.forward(&resid).unwrap() - zero).unwrap();
            }
            // The final norm at its own scale for a residual direction; for a direction in
            // `ln_final.hook_normalized` (already normalised), only its gain and bias.
            let zero = resid.zeros_like().unwrap();
            resid = if point == HookPoint::LnFinal {
                let at_zero = t.ln_final.affine(&zero).unwrap();
                (t.ln_final.affine(&resid).unwrap() - at_zero).unwrap()
            } else {
                let at_zero = t.ln_final.forward(&zero, false).unwrap();
                (t.ln_final.forward(&resid, false).unwrap() - at_zero).unwrap()
            };
            let logits = resid
                .matmul(&t.unembed.t().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (row, (got, want)) in effects.iter().zip(&logits).enumerate() {
                let mut order: Vec<usize> = (0..want.len()).collect();
                order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
                let top: Vec<u32> = got.top.iter().map(|e| e.token_id).collect();
                let bottom: Vec<u32> = got.bottom.iter().map(|e| e.token_id).collect();
                let want_top: Vec<u32> = order[..n].iter().map(|&i| i as u32).collect();
                let want_bottom: Vec<u32> = order.iter().rev().take(n).map(|&i| i as u32).collect();
                // The same tokens in the same order, up to near-ties (two tokens whose
                // brute-force logits agree to float precision may come either way).
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let same = |ids: &[u32], wanted: &[u32]| {
                    ids.iter()
                        .zip(wanted)
                        .all(|(&a, &b)| (want[a as usize] - want[b as usize]).abs() <= 1e-5 * scale)
                };
                assert!(
                    same(&top, &want_top),
                    "{model_type} {hook} row {row}: {top:?} vs {want_top:?}"
                );
                assert!(
                    same(&bottom, &want_bottom),
                    "{model_type} {hook} row {row}: {bottom:?} vs {want_bottom:?}"
                );
                let ratio = want[top[0] as usize] / got.top[0].logit;
                assert!(ratio > 0.0, "{model_type} {hook}");
                for e in got.top.iter().chain(&got.bottom) {
                    let expected = want[e.token_id as usize] / ratio;
                    assert!(
                        (e.logit - expected).abs() <= 1e-4 * got.top[0].logit.abs(),
                        "{model_type} {hook} row {row}: {} vs {expected}",
                        e.logit
                    );
                    assert_eq!(e.token, names[e.token_id as usize]);
                }
            }
        }
    }
}
