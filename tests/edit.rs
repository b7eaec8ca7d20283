//! Fact editing on real models (tiny fixtures and the bundled world model): ROME's key
//! statistics and their cache, the closed form, MEMIT batches, exact undo, saving in the
//! checkpoint's layout, the world checks, and the `edit` command end to end with its errors.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::{down_proj, fixture_dir};
use monoscope::Model;
use monoscope::edit::covariance::key_covariance;
use monoscope::edit::editor::{Editor, StatsSource};
use monoscope::edit::history::{AppliedEdit, EditHistory, LayerDelta};
use monoscope::edit::locate::KeyChoice;
use monoscope::edit::memit::{MemitSettings, compute_batch};
use monoscope::edit::rome::{
    KeyPosition, Request, RomeEdit, RomeSettings, compute_edit, read_batch,
};
use monoscope::edit::save::{open_edits, save_edited};
use monoscope::edit::verify::{CheckKind, WorldFact, answer_nll, world_checks};
use monoscope::model::{HookPoint, Hooks};
use monoscope::sae::activations::{ActivationSource, ChunkSource, WindowSettings};
use monoscope::world::corpus::Templates;
use monoscope::world::knowledge::{KnowledgeBase, Lang, Relation};

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

/// Every tensor of a model folder's checkpoint (single file or shards).
fn checkpoint_tensors(
    dir: &std::path::Path,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    let mut all = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("model") && name.ends_with(".safetensors") {
            all.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    assert!(!all.is_empty());
    all
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The value at `point` at token `index` of a run on `ids`.
fn value_at(model: &Model, ids: &[u32], point: HookPoint, index: usize) -> Vec<f32> {
    let out = model
        .forward(
            &model.ids_tensor(ids).unwrap(),
            &Hooks::new().capture([point]),
        )
        .unwrap();
    let at = out.cache.require(point).unwrap().get(0).unwrap();
    at.get(index).unwrap().to_vec1::<f32>().unwrap()
}

fn river_edit(
    model: &Model,
    cov: &monoscope::edit::covariance::KeyCovariance,
    target: &str,
    key: KeyPosition,
) -> (RomeEdit, AppliedEdit) {
    river_edit_at(model, 0, cov, target, key)
}

/// [`river_edit`] at `layer` (`cov` that layer's key statistics).
fn river_edit_at(
    model: &Model,
    layer: usize,
    cov: &monoscope::edit::covariance::KeyCovariance,
    target: &str,
    key: KeyPosition,
) -> (RomeEdit, AppliedEdit) {
    let request = Request {
        prompt: "{} flows past the".into(),
        subject: "the river".into(),
        target: target.into(),
    };
    let contexts = vec!["{}".to_string(), "Note: {}".to_string()];
    let edit = compute_edit(
        model,
        &request,
        layer,
        key,
        cov,
        &contexts,
        &RomeSettings::default(),
    )
    .unwrap();
    let applied = AppliedEdit {
        id: 0,
        method: "rome".into(),
        requests: vec![request],
        layers: vec![layer],
        key: key.name().into(),
        reason: "test".into(),
        deltas: vec![LayerDelta {
            layer,
            delta: edit.delta.clone(),
        }],
    };
    (edit, applied)
}

/// On GPT-2 and on GPT-J (the ROME paper's model: attention and the MLP read one norm side
/// by side).
#[test]
fn a_rome_edit_maps_the_prompts_key_to_the_optimised_value() {
    for arch in ["gpt2", "gptj"] {
        rome_edit_maps_key_to_value(arch);
    }
}

fn rome_edit_maps_key_to_value(arch: &str) {
    let mut model = Model::load(&fixture_dir(arch), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    // Layer 0: its MLP output at the subject reaches the last token through layer 1's
    // attention (layer 1, the last, could not move it there).
    let cov = key_covariance(&model, 0, &corpus, 600, None, |_| {}).unwrap();
    let ids = model.encode_prompt("the river flows past the").unwrap();
    let original = down_proj(&model, 0);
    for key in [KeyPosition::SubjectLast, KeyPosition::PromptLast] {
        let (edit, applied) = river_edit(&model, &cov, " hills", key);
        // v* makes the target more likely than the clean MLP output did.
        assert!(
            edit.nll_after < edit.nll_before - 0.1,
            "{arch} {key:?}: {} → {}",
            edit.nll_before,
            edit.nll_after
        );
        if key == KeyPosition::PromptLast {
            assert_eq!(edit.key_index, ids.len() - 1);
        } else {
            let (_, span) =
                monoscope::causal::locate_subject(&model, "the river flows past the", "the river")
                    .unwrap();
            assert_eq!(edit.key_index, span.end - 1, "the subject's last token");
        }
        // The key the edit is solved at is the plain prompt's own key at the key token.
        let k_plain = value_at(&model, &ids, HookPoint::MlpPost(0), edit.key_index);
        for (a, b) in k_plain.iter().zip(&edit.key_vector) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
        }
        // ROME's closed form: the edited down projection maps the plain prompt's key exactly
        // to v* (bias included).
        let mut history = EditHistory::new();
        history.apply(&mut model, applied).unwrap();
        assert_maps_key_to_value(&model, &edit);
        assert_ne!(bits(&down_proj(&model, 0)), bits(&original));
        history.undo_all(&mut model).unwrap();
        assert_eq!(bits(&down_proj(&model, 0)), bits(&original));
    }
}

/// Gemma 2 and OLMo 2 normalise each MLP output before it joins the residual stream, so ROME
/// seeks v* where the down projection writes (`ln2_post.hook_in`): the edited weights produce
/// it exactly there, the edit makes the target likelier, and MEMIT, whose spreading of a
/// residual change over layers assumes no such norm, refuses the model.
#[test]
fn a_rome_edit_after_a_post_mlp_norm_writes_its_value_where_the_down_projection_writes() {
    for model_type in ["gemma2", "olmo2"] {
        rome_edit_before_the_post_mlp_norm(model_type);
    }
}

fn rome_edit_before_the_post_mlp_norm(model_type: &str) {
    let mut model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    let layer = 1;
    let cov = key_covariance(&model, layer, &corpus, 600, None, |_| {}).unwrap();
    let (edit, applied) = river_edit_at(&model, layer, &cov, " hills", KeyPosition::PromptLast);
    assert!(
        edit.nll_after < edit.nll_before - 0.1,
        "{model_type}: {} → {}",
        edit.nll_before,
        edit.nll_after
    );
    let prompt = "the river flows past the";
    let nll = |m: &Model| answer_nll(m, prompt, " hills", &Hooks::new()).unwrap();
    let before = nll(&model);
    EditHistory::new().apply(&mut model, applied).unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    let written = value_at(&model, &ids, HookPoint::Ln2PostIn(layer), edit.key_index);
    let scale = edit.value.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (got, want) in written.iter().zip(&edit.value) {
        assert!(
            (f64::from(*got) - want).abs() < 1e-4 * scale,
            "{model_type}: {got} vs {want}"
        );
    }
    let after = nll(&model);
    assert!(
        after < before - 0.1,
        "{model_type}: NLL of the target {before} → {after}"
    );

    let request = Request {
        prompt: "{} flows past the".into(),
        subject: "the river".into(),
        target: " hills".into(),
    };
    let e = compute_batch(
        &mut model,
        &[request],
        &[layer],
        KeyPosition::PromptLast,
        &[&cov],
        &["{}".to_string()],
        &RomeSettings::default(),
        &MemitSettings::default(),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("ROME instead") && e.contains("layer"),
        "{model_type}: {e}"
    );
}

#[test]
fn a_rome_edit_of_two_phrasings_sums_their_updates_and_holds_the_edit_prompt_exactly() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    let stats = StatsSource {
        corpus,
        tokens: 600,
        cache_dir: None,
    };
    let mut editor = Editor::new(&model, stats, 1, RomeSettings::default()).unwrap();
    // Short contexts: the fixture's window is 64 tokens.
    editor.contexts = vec!["{}".to_string(), "Note: {}".to_string()];
    let choice = KeyChoice {
        layer: 0,
        key: KeyPosition::SubjectLast,
        reason: "test".into(),
        recovery: Vec::new(),
    };
    let prompt = Request {
        prompt: "{} flows past the".into(),
        subject: "the river".into(),
        target: " hills".into(),
    };
    let other = Request {
        prompt: "and {} runs by the".into(),
        ..prompt.clone()
    };
    // Phrasings of one fact share its subject and target.
    let stray = Request {
        target: " sea".into(),
        ..other.clone()
    };
    let e = editor
        .rome(&model, &[prompt.clone(), stray], &choice)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share its subject"), "{e}");

    let (edits, applied) = editor
        .rome(&model, &[prompt.clone(), other.clone()], &choice)
        .unwrap();
    // The edit prompt, the other phrasing, the edit prompt again.
    assert_eq!(edits.len(), 3);
    assert_eq!(applied.requests.len(), 2);
    assert_eq!(applied.deltas.len(), 1);
    let mut sum = vec![0f32; edits[0].delta.len()];
    for e in &edits {
        for (s, d) in sum.iter_mut().zip(&e.delta) {
            *s += d;
        }
    }
    assert_eq!(bits(&applied.deltas[0].delta), bits(&sum));
    // After all three, the edit prompt's key maps exactly to the last update's v*.
    let mut edited = model.clone();
    EditHistory::new().apply(&mut edited, applied).unwrap();
    assert_maps_key_to_value(&edited, edits.last().unwrap());
}

/// ROME's closed form: `model`'s layer-0 down projection maps `edit`'s key exactly to its
/// v* (bias included).
fn assert_maps_key_to_value(model: &Model, edit: &RomeEdit) {
    let w = down_proj(model, 0);
    let bias = model.transformer.blocks[0]
        .mlp
        .down_proj()
        .bias()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let d_in = edit.key_vector.len();
    let scale = edit.value.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (o, want) in edit.value.iter().enumerate() {
        let got: f64 = w[o * d_in..(o + 1) * d_in]
            .iter()
            .zip(&edit.key_vector)
            .map(|(a, b)| f64::from(*a) * b)
            .sum::<f64>()
            + f64::from(bias[o]);
        assert!((got - want).abs() < 1e-4 * scale, "{got} vs {want}");
    }
}

#[test]
fn undoing_any_edit_gives_the_weights_back_bit_for_bit() {
    let mut model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    let cov = key_covariance(&model, 0, &corpus, 600, None, |_| {}).unwrap();
    let original = down_proj(&model, 0);
    let (_, first) = river_edit(&model, &cov, " hills", KeyPosition::SubjectLast);
    let (_, second) = river_edit(&model, &cov, " sea", KeyPosition::PromptLast);

    // The second edit alone, for comparison.
    let mut alone = EditHistory::new();
    assert_eq!(alone.fingerprint(), "", "the loaded weights");
    alone.apply(&mut model, second.clone()).unwrap();
    let second_only = down_proj(&model, 0);
    let second_only_edits = alone.fingerprint();
    assert!(
        second_only_edits.contains("1 edit(s)"),
        "{second_only_edits}"
    );
    alone.undo_all(&mut model).unwrap();
    assert_eq!(bits(&down_proj(&model, 0)), bits(&original));

    let mut history = EditHistory::new();
    let a = history.apply(&mut model, first).unwrap();
    let b = history.apply(&mut model, second).unwrap();
    assert_ne!(a, b);
    assert_eq!(history.edits().len(), 2);
    assert!(history.fingerprint().contains("2 edit(s)"));
    // Undo the first (not the last): exactly as if only the second had been applied, and said
    // to be so (the ids aside).
    history.undo(&mut model, a).unwrap();
    assert_eq!(bits(&down_proj(&model, 0)), bits(&second_only));
    assert_eq!(history.fingerprint(), second_only_edits);
    assert_eq!(history.edits().len(), 1);
    history.undo(&mut model, b).unwrap();
    assert_eq!(bits(&down_proj(&model, 0)), bits(&original));
    // An id that is not there names the ones that are.
    let e = history.undo(&mut model, 7).unwrap_err().to_string();
    assert!(e.contains('7'), "{e}");
}

#[test]
fn an_edited_model_is_saved_to_a_new_folder_in_its_checkpoint_layout() {
    // GPT-2 stores the down projection as Conv1D [in, out]; Llama and GPT-J as Linear
    // [out, in], under their own names; a multimodal Gemma 3 under its language model's
    // prefix (`language_model.model.`), which the edit keeps.
    for arch in ["gpt2", "llama", "gptj", "gemma3"] {
        let source = fixture_dir(arch);
        let source_hash = monoscope::table::model_hash(&source).unwrap();
        let mut model = Model::load(&source, &Device::Cpu, DType::F32).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (corpus, _) = common::river_corpus(tmp.path(), 60);
        let cov = key_covariance(&model, 0, &corpus, 400, None, |_| {}).unwrap();
        let (_, applied) = river_edit(&model, &cov, " hills", KeyPosition::PromptLast);
        let mut history = EditHistory::new();
        history.apply(&mut model, applied).unwrap();
        let out = tmp.path().join("edited");
        save_edited(&model, &history, &out).unwrap();

        // Reloaded, it is the edited model: same down projection bits, same logits.
        let reloaded = Model::load(&out, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            bits(&down_proj(&reloaded, 0)),
            bits(&down_proj(&model, 0)),
            "{arch}"
        );
        let ids = model.encode_prompt("the river flows past the").unwrap();
        let logits = |m: &Model| {
            m.forward(&m.ids_tensor(&ids).unwrap(), &Hooks::new())
                .unwrap()
                .logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(&logits(&reloaded)), bits(&logits(&model)), "{arch}");
        // Only that tensor changed on disk; the source folder is untouched.
        let before = checkpoint_tensors(&source);
        let after = checkpoint_tensors(&out);
        let changed: Vec<&String> = before
            .keys()
            .filter(|k| {
                let a = before[*k]
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = after[*k]
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                bits(&a) != bits(&b)
            })
            .collect();
        assert_eq!(
            changed,
            vec![&model.transformer.blocks[0].down_proj_source.key],
            "{arch}"
        );
        assert_eq!(monoscope::table::model_hash(&source).unwrap(), source_hash);

        // The log and the weight changes read back; the undo replayed on the source is
        // bit-identical to the source.
        let log = open_edits(&out).unwrap().unwrap();
        assert_eq!(log.edits.len(), 1);
        assert_eq!(log.source_hash, source_hash);
        assert_eq!(
            bits(&log.edits[0].deltas[0].delta),
            bits(&history.edits()[0].deltas[0].delta)
        );
        let mut fresh = Model::load(&source, &Device::Cpu, DType::F32).unwrap();
        let original = down_proj(&fresh, 0);
        let mut replayed = EditHistory::new();
        for e in log.edits {
            replayed.replay(&mut fresh, e).unwrap();
        }
        assert_eq!(bits(&down_proj(&fresh, 0)), bits(&down_proj(&model, 0)));
        replayed.undo(&mut fresh, 0).unwrap();
        assert_eq!(bits(&down_proj(&fresh, 0)), bits(&original));

        // Never over an existing folder with files in it.
        let e = save_edited(&model, &history, &out).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("edited"), "{e}");
    }
}

/// Applies a prompt-last MEMIT batch's deltas to `model`.
fn apply_memit(model: &mut Model, requests: &[Request], layers: &[usize], deltas: Vec<LayerDelta>) {
    let edit = AppliedEdit {
        id: 0,
        method: "memit".into(),
        requests: requests.to_vec(),
        layers: layers.to_vec(),
        key: "prompt-last".into(),
        reason: "test".into(),
        deltas,
    };
    EditHistory::new().apply(model, edit).unwrap();
}

/// Two facts the river corpus's tiny GPT-2 can be taught, for the MEMIT tests.
fn river_and_sun_facts() -> Vec<Request> {
    vec![
        Request {
            prompt: "{} flows past the".into(),
            subject: "the river".into(),
            target: " hills".into(),
        },
        Request {
            prompt: "{} shines over the".into(),
            subject: "the sun".into(),
            target: " sea".into(),
        },
    ]
}

/// On GPT-2 and on GPT-J (the MEMIT paper's model, whose MLPs read the block's input beside
/// attention).
#[test]
fn a_memit_batch_writes_every_fact_and_gives_the_model_back_unchanged() {
    // GPT-J's first MLP reads only the last token's own embedding (attention runs beside it,
    // not before it), and both prompts end in " the": their keys there coincide, which MEMIT
    // refuses (tested below), so GPT-J's batch writes at its second layer.
    for (arch, layers) in [("gpt2", &[0usize, 1][..]), ("gptj", &[1])] {
        memit_batch_writes_every_fact(arch, layers);
    }
    let model = Model::load(&fixture_dir("gptj"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    let cov = key_covariance(&model, 0, &corpus, 600, None, |_| {}).unwrap();
    let e = compute_batch(
        &mut model.clone(),
        &river_and_sun_facts(),
        &[0],
        KeyPosition::PromptLast,
        &[&cov],
        &["{}".to_string()],
        &RomeSettings::default(),
        &MemitSettings::default(),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("degenerate") && e.contains("layer 0"), "{e}");
}

fn memit_batch_writes_every_fact(arch: &str, layers: &[usize]) {
    let mut model = Model::load(&fixture_dir(arch), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    let covs: Vec<_> = layers
        .iter()
        .map(|&l| key_covariance(&model, l, &corpus, 600, None, |_| {}).unwrap())
        .collect();
    let requests = river_and_sun_facts();
    let nll = |m: &Model, r: &Request| {
        answer_nll(
            m,
            &r.prompt.replace("{}", &r.subject),
            &r.target,
            &Hooks::new(),
        )
        .unwrap()
    };
    let before: Vec<f64> = requests.iter().map(|r| nll(&model, r)).collect();
    let originals: Vec<Vec<f32>> = layers.iter().map(|&l| down_proj(&model, l)).collect();
    let contexts = vec!["{}".to_string()];
    // A random two-layer model's keys are dense: a small λ lets two facts through.
    let memit = MemitSettings {
        covariance_weight: 1.0,
        ..MemitSettings::default()
    };
    // Prompt-last: a two-layer model has no later layer to carry a subject key's value to
    // the last token.
    let edit = compute_batch(
        &mut model,
        &requests,
        layers,
        KeyPosition::PromptLast,
        &covs.iter().collect::<Vec<_>>(),
        &contexts,
        &RomeSettings::default(),
        &memit,
        |_| {},
    )
    .unwrap();
    for (&l, w) in layers.iter().zip(&originals) {
        assert_eq!(
            bits(&down_proj(&model, l)),
            bits(w),
            "compute_batch leaves layer {l} as it was"
        );
    }
    assert_eq!(edit.deltas.len(), layers.len());
    apply_memit(&mut model, &requests, layers, edit.deltas);
    for (r, b) in requests.iter().zip(&before) {
        let after = nll(&model, r);
        assert!(after < b - 0.5, "{arch} {:?}: NLL {b} → {after}", r.target);
    }
    if layers.len() > 1 {
        // Layers out of order are refused with the reason.
        let e = compute_batch(
            &mut model,
            &requests,
            &layers.iter().rev().copied().collect::<Vec<_>>(),
            KeyPosition::PromptLast,
            &covs.iter().collect::<Vec<_>>(),
            &contexts,
            &RomeSettings::default(),
            &memit,
            |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ascending"), "{e}");
    }
}

#[test]
fn a_memit_batch_writes_each_residual_at_its_plain_prompts_key() {
    for arch in ["gpt2", "gptj"] {
        memit_batch_writes_each_residual(arch);
    }
}

fn memit_batch_writes_each_residual(arch: &str) {
    let mut model = Model::load(&fixture_dir(arch), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    // One layer, the model's last: its residual after the edit is z itself at the key token.
    let layer = 1usize;
    let cov = key_covariance(&model, layer, &corpus, 600, None, |_| {}).unwrap();
    let requests = river_and_sun_facts();
    // A context prefix makes the averaged key k̄ differ from the plain prompt's key.
    let contexts = vec!["{}".to_string(), "The day was long. {}".to_string()];
    let edit = compute_batch(
        &mut model,
        &requests,
        &[layer],
        KeyPosition::PromptLast,
        &[&cov],
        &contexts,
        &RomeSettings::default(),
        &MemitSettings {
            covariance_weight: 1.0,
            ..MemitSettings::default()
        },
        |_| {},
    )
    .unwrap();
    apply_memit(&mut model, &requests, &[layer], edit.deltas);
    for (r, z) in requests.iter().zip(&edit.targets) {
        let ids = model
            .encode_prompt(&r.prompt.replace("{}", &r.subject))
            .unwrap();
        let out = model
            .forward(
                &model.ids_tensor(&ids).unwrap(),
                &Hooks::new().capture([HookPoint::ResidPost(layer)]),
            )
            .unwrap();
        let resid: Vec<f32> = out
            .cache
            .get(HookPoint::ResidPost(layer))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let (err, norm) = resid.iter().zip(z).fold((0f64, 0f64), |(e, n), (&a, &b)| {
            (e + (f64::from(a) - b).powi(2), n + b * b)
        });
        let relative = (err / norm).sqrt();
        assert!(
            relative < 1e-3,
            "{:?}: ‖resid − z‖/‖z‖ = {relative}",
            r.subject
        );
    }
}

/// Layer `layer`'s MLP output at every token of `prompt`.
fn mlp_outputs(model: &Model, prompt: &str, layer: usize) -> Vec<Vec<f32>> {
    let ids = model.encode_prompt(prompt).unwrap();
    let out = model
        .forward(
            &model.ids_tensor(&ids).unwrap(),
            &Hooks::new().capture([HookPoint::MlpOut(layer)]),
        )
        .unwrap();
    out.cache
        .get(HookPoint::MlpOut(layer))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn a_guarded_memit_batch_leaves_the_edit_prompts_other_tokens_alone() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 60);
    let layer = 0usize;
    let cov = key_covariance(&model, layer, &corpus, 600, None, |_| {}).unwrap();
    let requests = river_and_sun_facts();
    let contexts = vec!["{}".to_string(), "The day was long. {}".to_string()];
    // The largest change the batch makes to the MLP output at a token other than the
    // subject's last, over both edit prompts, relative to the largest change at it.
    let spill = |guard: bool| -> f64 {
        let mut edited = model.clone();
        let edit = compute_batch(
            &mut edited,
            &requests,
            &[layer],
            KeyPosition::SubjectLast,
            &[&cov],
            &contexts,
            &RomeSettings::default(),
            &MemitSettings {
                covariance_weight: 1.0,
                guard_prompt_tokens: guard,
                // Every distinct key, so every other token is held exactly.
                guard_novelty: 1e-3,
                ..MemitSettings::default()
            },
            |_| {},
        )
        .unwrap();
        apply_memit(&mut edited, &requests, &[layer], edit.deltas);
        let (mut other, mut at_key) = (0f64, 0f64);
        for r in &requests {
            let text = r.text();
            let (ids, span) = monoscope::causal::locate_subject(&model, &text, &r.subject).unwrap();
            let before = mlp_outputs(&model, &text, layer);
            let after = mlp_outputs(&edited, &text, layer);
            assert_eq!(before.len(), ids.len());
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let change = b
                    .iter()
                    .zip(a)
                    .map(|(x, y)| f64::from(x - y).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if i == span.end - 1 {
                    at_key = at_key.max(change);
                } else {
                    other = other.max(change);
                }
            }
        }
        assert!(at_key > 0.0);
        other / at_key
    };
    let (guarded, unguarded) = (spill(true), spill(false));
    assert!(guarded < 1e-3, "guarded spill {guarded}");
    assert!(unguarded > 10.0 * guarded, "{unguarded} vs {guarded}");
}

#[test]
fn a_batch_file_with_a_malformed_line_is_refused_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("facts.jsonl");
    let good = r#"{"prompt": "The capital of {} is", "subject": "Japan", "target": " Seoul"}"#;
    std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
    assert_eq!(read_batch(&path).unwrap().len(), 2);
    for (bad, says) in [
        (
            r#"{"prompt": "The capital of {} is", "subject": "Japan"}"#,
            "target",
        ),
        (
            r#"{"prompt": "The capital of {} is", "subject": "Japan", "target": "  "}"#,
            "empty",
        ),
        (
            r#"{"prompt": "The capital of Japan is", "subject": "Japan", "target": " X"}"#,
            "{}",
        ),
        (r#"not json"#, "prompt"),
        (
            r#"{"prompt": "{} is", "subject": "A", "target": " B", "extra": 1}"#,
            "extra",
        ),
    ] {
        std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
        let e = read_batch(&path).unwrap_err().to_string();
        assert!(
            e.contains("facts.jsonl") && e.contains("line 2") && e.contains(says),
            "{e}"
        );
    }
    std::fs::write(&path, "\n").unwrap();
    assert!(
        read_batch(&path)
            .unwrap_err()
            .to_string()
            .contains("no edit requests")
    );
}

#[test]
fn a_world_fact_is_checked_on_held_out_paraphrases_neighbours_and_japanese() {
    let kb = KnowledgeBase::bundled().unwrap();
    let fact = WorldFact::find(&kb, "The capital of {} is", "Japan").unwrap();
    assert_eq!(kb.countries[fact.country].name.en, "Japan");
    assert!(WorldFact::find(&kb, "The river of {} is", "Japan").is_none());
    let checks = world_checks(
        &kb,
        fact,
        "The capital of Japan is",
        " Seoul",
        Some("ソウル"),
        12,
        &[],
    );
    let of = |k: CheckKind| checks.iter().filter(|c| c.kind == k).collect::<Vec<_>>();
    assert_eq!(of(CheckKind::Edit).len(), 1);
    let paraphrases = of(CheckKind::Paraphrase);
    assert_eq!(
        paraphrases.len(),
        Templates::held_out_prompts(Relation::Capital, Lang::En, "Japan").len()
    );
    assert!(
        paraphrases
            .iter()
            .all(|c| c.prompt.contains("Japan") && c.wanted == " Seoul")
    );
    assert!(
        paraphrases
            .iter()
            .all(|c| c.rival.as_deref() == Some(" Tokyo"))
    );
    let ja = of(CheckKind::Japanese);
    assert_eq!(ja.len(), 1);
    assert_eq!(ja[0].prompt, "日本の首都は");
    assert_eq!(ja[0].rival.as_deref(), Some("東京"));
    let neighbours = of(CheckKind::Neighbour);
    assert_eq!(neighbours.len(), 12);
    for n in &neighbours {
        assert!(!n.prompt.contains("Japan"));
        assert!(n.wanted != " Seoul" && n.wanted != " Tokyo");
        assert_eq!(n.rival.as_deref(), Some(" Seoul"));
    }
    // A fact edited in the same batch is no neighbour (12 asked of 191: the walk in steps
    // of 15 has a 13th country to take its place);
    // the same country's other relations do not count.
    let first = &neighbours[0].prompt;
    let country = kb
        .countries
        .iter()
        .position(|c| first == &format!("The capital of {} is", c.name.en))
        .unwrap();
    let neighbours_with = |edited: &[WorldFact]| -> Vec<String> {
        world_checks(
            &kb,
            fact,
            "The capital of Japan is",
            " Seoul",
            Some("ソウル"),
            12,
            edited,
        )
        .into_iter()
        .filter(|c| c.kind == CheckKind::Neighbour)
        .map(|c| c.prompt)
        .collect()
    };
    let capital = WorldFact {
        country,
        relation: Relation::Capital,
    };
    let without = neighbours_with(&[capital]);
    assert_eq!(without.len(), 12);
    assert!(without.iter().all(|p| p != first), "{first}");
    let currency = WorldFact {
        country,
        relation: Relation::Currency,
    };
    assert!(neighbours_with(&[currency]).contains(first));
}

/// Runs the binary; returns (success, stdout, stderr).
fn monoscope(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `edit` of "The capital of {subject} is" on the bundled model: ROME proper at layer 0, key
/// statistics over 3,000 tokens cached in `stats`, JSON out.
fn capital_edit_args<'a>(
    subject: &'a str,
    target: &'a str,
    stats: &'a str,
    neighbours: &'a str,
) -> Vec<&'a str> {
    vec![
        "edit",
        "--prompt",
        "The capital of {} is",
        "--subject",
        subject,
        "--target",
        target,
        "--layer",
        "0",
        "--key",
        "subject-last",
        "--stats-tokens",
        "3000",
        "--stats-dir",
        stats,
        "--neighbours",
        neighbours,
        "--json",
    ]
}

#[test]
fn edits_stack_across_runs_and_undo_restores_the_bundled_weights_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats");
    let (a, b, c, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    let edit =
        |model: Option<&std::path::Path>, subject: &str, target: &str, out: &std::path::Path| {
            let mut args = capital_edit_args(subject, target, stats.to_str().unwrap(), "5");
            args.extend(["--out", out.to_str().unwrap()]);
            if let Some(m) = model {
                args.extend(["--model", m.to_str().unwrap()]);
            }
            let (ok, stdout, stderr) = monoscope(&args);
            assert!(ok, "{stderr}");
            serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
        };
    let first = edit(None, "Japan", " Seoul", &a);
    // The edit makes the new answer likelier on the edit prompt (teacher-forced).
    let check = first["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "edit")
        .unwrap();
    assert!(
        check["after"]["nll_wanted"].as_f64().unwrap()
            < check["before"]["nll_wanted"].as_f64().unwrap() - 0.5,
        "{check}"
    );
    assert_eq!(first["key"]["key"], "subject-last");
    assert_eq!(first["layers"], serde_json::json!([0]));
    // A second edit on the edited folder carries the history on.
    let second = edit(Some(&a), "France", " Rome", &b);
    assert_eq!(second["history"].as_array().unwrap().len(), 2);
    let (ok, stdout, stderr) =
        monoscope(&["edit", "list", "--model", b.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let log: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(log["edits"].as_array().unwrap().len(), 2);

    // Undo both, one run each: the bundled model's weights, bit for bit.
    for (from, id, to) in [(&b, "0", &c), (&c, "1", &d)] {
        let (ok, _, stderr) = monoscope(&[
            "edit",
            "undo",
            "--model",
            from.to_str().unwrap(),
            "--id",
            id,
            "--out",
            to.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
    }
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let original = checkpoint_tensors(&bundled);
    let restored = checkpoint_tensors(&d);
    let edited = checkpoint_tensors(&b);
    let key = original
        .keys()
        .find(|k| k.ends_with("h.0.mlp.c_proj.weight"))
        .unwrap()
        .as_str();
    let raw = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(bits(&raw(&edited[key])), bits(&raw(&original[key])));
    assert_eq!(original.len(), restored.len());
    for (name, t) in &original {
        assert_eq!(bits(&raw(t)), bits(&raw(&restored[name])), "{name}");
    }
    assert_eq!(open_edits(&d).unwrap().unwrap().edits.len(), 0);
}

#[test]
fn a_second_phrasing_carries_the_edit_to_its_word_order() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats");
    let edit = |also: &[&str]| {
        let mut args = capital_edit_args("Japan", " Yokohama", stats.to_str().unwrap(), "2");
        for a in also {
            args.extend(["--also-prompt", a]);
        }
        let (ok, stdout, stderr) = monoscope(&args);
        assert!(ok, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    // Teacher-forced NLL of the new answer, after the edit, on the held-out paraphrases that
    // put the subject first ("Officially, Japan's capital city is"); the added phrasing is
    // not among them.
    let nll_after = |report: &serde_json::Value| -> Vec<f64> {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c["kind"] == "paraphrase" && c["prompt"].as_str().unwrap().contains("'s capital")
            })
            .map(|c| c["after"]["nll_wanted"].as_f64().unwrap())
            .collect()
    };
    let one = edit(&[]);
    let two = edit(&["{}'s capital is"]);
    assert_eq!(two["requests"].as_array().unwrap().len(), 2);
    assert_eq!(two["requests"][1]["prompt"], "{}'s capital is");
    let history = two["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "one edit, both phrasings");
    assert_eq!(history[0]["requests"].as_array().unwrap().len(), 2);
    let (a, b) = (nll_after(&one), nll_after(&two));
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len());
    for (one, two) in a.iter().zip(&b) {
        assert!(
            two < one,
            "NLL of \" Yokohama\": one phrasing {one}, two {two}"
        );
    }
    // A phrasing without the subject's slot is refused, naming it.
    let (ok, _, stderr) = monoscope(&[
        "edit",
        "--prompt",
        "The capital of {} is",
        "--also-prompt",
        "Its capital is",
        "--subject",
        "Japan",
        "--target",
        " Yokohama",
    ]);
    assert!(!ok);
    assert!(stderr.contains("Its capital is"), "{stderr}");
}

/// On a LongRoPE model, rewriting prompts longer than the original context (8 positions on
/// the fixture) are refused: their cached prefixes and differentiated suffixes would be
/// rotated by different frequencies.
#[test]
fn rome_refuses_rewriting_prompts_past_a_longrope_switch() {
    let model = Model::load(&fixture_dir("phi3_longrope"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = common::river_corpus(tmp.path(), 20);
    let cov = key_covariance(&model, 0, &corpus, 200, None, |_| {}).unwrap();
    let request = Request {
        prompt: "{} flows past the green hills and the".into(),
        subject: "the river".into(),
        target: " sea".into(),
    };
    let e = compute_edit(
        &model,
        &request,
        0,
        KeyPosition::SubjectLast,
        &cov,
        &["{}".to_string()],
        &RomeSettings::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("LongRoPE") && e.contains("8 positions"), "{e}");
}

#[test]
fn bad_edit_requests_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats");
    let base = [
        "edit",
        "--stats-tokens",
        "500",
        "--stats-dir",
        stats.to_str().unwrap(),
        "--key",
        "subject-last",
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        let (ok, _, stderr) = monoscope(&args);
        assert!(!ok, "{extra:?} should fail");
        stderr
    };
    let fact = |subject: &'static str, target: &'static str, layer: &'static str| {
        [
            "--prompt",
            "The capital of {} is",
            "--subject",
            subject,
            "--target",
            target,
            "--layer",
            layer,
        ]
    };
    let e = run(&[
        "--prompt",
        "The capital of France is",
        "--subject",
        "Atlantis",
        "--target",
        " Rome",
    ]);
    assert!(e.contains("Atlantis") && e.contains("\"The\""), "{e}");
    let e = run(&fact("Japan", " ", "0"));
    assert!(e.contains("empty"), "{e}");
    let e = run(&fact("Japan", " Rome", "99"));
    assert!(e.contains("layer") && e.contains("99"), "{e}");
    let batch = tmp.path().join("batch.jsonl");
    std::fs::write(
        &batch,
        "{\"prompt\": \"The capital of {} is\", \"subject\": \"Japan\"}\n",
    )
    .unwrap();
    let e = run(&["--batch", batch.to_str().unwrap()]);
    assert!(e.contains("batch.jsonl") && e.contains("line 1"), "{e}");
}

/// `edit eval` end to end on the bundled model: before the edits the model gives every old
/// capital (efficacy 0, neighbours kept), after ROME it gives the new ones; every share is a
/// share, and the reported score is the harmonic mean of the reported parts.
#[test]
fn edit_eval_scores_counterfactual_edits_before_and_after() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats");
    let (ok, out, err) = monoscope(&[
        "edit",
        "eval",
        "--edits",
        "2",
        "--layer",
        "0",
        "--key",
        "subject-last",
        "--neighbours",
        "4",
        "--stats-tokens",
        "3000",
        "--stats-dir",
        stats.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["method"], "rome");
    assert_eq!(report["edits"], 2);
    let get = |when: &str, what: &str| report[when][what].as_f64().unwrap();
    for when in ["before", "after"] {
        for what in [
            "efficacy",
            "paraphrase",
            "neighbourhood",
            "japanese",
            "efficacy_top1",
            "paraphrase_top1",
            "neighbourhood_top1",
            "japanese_top1",
        ] {
            let v = get(when, what);
            assert!((0.0..=1.0).contains(&v), "{when}.{what} = {v}");
        }
        assert!(get(when, "generation_entropy") > 0.0);
    }
    assert_eq!(
        get("before", "efficacy"),
        0.0,
        "the model knew the new capitals"
    );
    assert_eq!(get("before", "neighbourhood"), 1.0);
    assert!(get("after", "efficacy") > 0.0, "{out}");
    let parts = ["efficacy", "paraphrase", "neighbourhood"].map(|p| get("after", p));
    let harmonic = if parts.contains(&0.0) {
        0.0
    } else {
        3.0 / parts.iter().map(|p| 1.0 / p).sum::<f64>()
    };
    assert!(
        (report["score"].as_f64().unwrap() - harmonic).abs() < 1e-12,
        "{out}"
    );
    assert_eq!(report["keys_used"]["subject-last L0"], 2, "{out}");
}
