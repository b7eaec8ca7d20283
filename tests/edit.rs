//! Fact editing on real (tiny) models: ROME's key statistics against a direct computation,
//! and their on-disk cache.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use candle_core::{DType, Device};
use common::fixture_dir;
use monoscope::Model;
use monoscope::edit::covariance::key_covariance;
use monoscope::sae::activations::{ActivationSource, ChunkSource, WindowSettings};

#[test]
fn key_covariance_is_the_second_moment_of_the_keys_and_is_cached() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 40);
    let tokens = 300;
    let cache = tmp.path().join("stats");
    let cov = key_covariance(&model, 1, &corpus, tokens, Some(&cache), |_| {}).unwrap();
    assert_eq!((cov.d, cov.samples), (256, tokens));

    // Direct: the same keys, outer products summed in f64.
    let settings = WindowSettings {
        context_size: 64,
        ..WindowSettings::default()
    };
    let mut source =
        ActivationSource::new(&model, corpus.clone(), "blocks.1.mlp.hook_post", settings).unwrap();
    let d = 256;
    let mut want = vec![0f64; d * d];
    let mut seen = 0;
    while seen < tokens as usize {
        let rows = source.next_chunk().unwrap();
        for row in rows.chunks(d).take(tokens as usize - seen) {
            for i in 0..d {
                for j in 0..d {
                    want[i * d + j] += f64::from(row[i]) * f64::from(row[j]);
                }
            }
            seen += 1;
        }
    }
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())) / tokens as f64;
    for (g, w) in cov.values.iter().zip(&want) {
        assert!(
            (g - w / tokens as f64).abs() <= 1e-5 * scale,
            "{g} vs {}",
            w / tokens as f64
        );
    }

    // The cache: one file, read back identically; another layer gets its own.
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(files.len(), 1);
    let again = key_covariance(&model, 1, &corpus, tokens, Some(&cache), |_| {
        panic!("a cached covariance recomputes nothing")
    })
    .unwrap();
    assert_eq!(again, cov);
    key_covariance(&model, 0, &corpus, tokens, Some(&cache), |_| {}).unwrap();
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);

    // A damaged cache file is an error naming it, and a layer out of range is refused.
    let path = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&path, b"not safetensors").unwrap();
    let layer = if path.to_string_lossy().contains("-L0-") {
        0
    } else {
        1
    };
    let e = key_covariance(&model, layer, &corpus, tokens, Some(&cache), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains(&*path.to_string_lossy()), "{e}");
    let e = key_covariance(&model, 2, &corpus, tokens, None, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer") && e.contains('2'), "{e}");
}

#[test]
fn a_rome_edit_writes_the_optimised_value_at_the_subject() {
    use monoscope::edit::rome::{KeyPosition, Request, RomeSettings, apply, compute_edit};
    use monoscope::model::{HookPoint, Hooks};
    let mut model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    // Layer 0: its MLP output at the subject reaches the last token through layer 1's
    // attention (layer 1, the last, could not move it there).
    let cov = key_covariance(&model, 0, &corpus, 600, None, |_| {}).unwrap();
    let request = Request {
        prompt: "{} flows past the".into(),
        subject: "the river".into(),
        target: " hills".into(),
    };
    let contexts = vec!["{}".to_string(), "Note: {}".to_string()];
    let ids = model.encode_prompt("the river flows past the").unwrap();
    let point = HookPoint::MlpOut(0);
    let mlp_out = |model: &Model| {
        let out = model
            .forward(
                &model.ids_tensor(&ids).unwrap(),
                &Hooks::new().capture([point]),
            )
            .unwrap();
        out.cache
            .get(point)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    for key in [KeyPosition::SubjectLast, KeyPosition::PromptLast] {
        let settings = RomeSettings::default();
        let edit = compute_edit(&model, &request, 0, key, &cov, &contexts, &settings).unwrap();
        // v* makes the target more likely than the clean MLP output did.
        assert!(
            edit.nll_after < edit.nll_before - 0.1,
            "{key:?}: {} → {}",
            edit.nll_before,
            edit.nll_after
        );
        if key == KeyPosition::PromptLast {
            assert_eq!(edit.key_index, ids.len() - 1);
        }
        // The closed form: the edited layer now gives exactly v* at the key's token.
        let clean = mlp_out(&model);
        apply(&mut model, &edit, 1.0).unwrap();
        let edited = mlp_out(&model);
        let scale = edit.value.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (got, want) in edited[edit.key_index].iter().zip(&edit.value) {
            assert!(
                (f64::from(*got) - want).abs() < 1e-4 * scale,
                "{got} vs {want}"
            );
        }
        assert!(edited[edit.key_index] != clean[edit.key_index]);
        // Taking the edit away restores the layer (to rounding; exact undo keeps the original).
        apply(&mut model, &edit, -1.0).unwrap();
        let restored = mlp_out(&model);
        for (a, b) in restored.iter().flatten().zip(clean.iter().flatten()) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}
