//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// Every supported architecture has a tiny oracle model under tests/fixtures/models.
pub const MODEL_TYPES: &[&str] = &[
    "gpt2",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "olmo",
    "olmo2",
    "olmo3",
    "phi",
    "phi3",
    "smollm3",
];

/// Runs the binary with `args`, which must succeed, and parses what it prints as JSON.
pub fn monoscope_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn fixture_dir(model_type: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(model_type)
}

/// max |a − b| / max |b|: the error relative to the reference tensor's scale (element-wise
/// relative error is meaningless for entries near zero).
pub fn max_relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let scale = max_abs(expected);
    max_abs_diff(actual, expected) / scale.max(1e-12)
}

/// max |a − b| over all elements (shapes must match), computed in f64 (so f64 tensors keep
/// their precision), returned as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    diff.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap() as f32
}

/// max |t| over all elements, as f32.
pub fn max_abs(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap();
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[derive(serde::Deserialize)]
pub struct Reference {
    pub num_layers: usize,
    pub num_parameters: usize,
    pub prompts: Vec<ReferencePrompt>,
}

#[derive(serde::Deserialize)]
pub struct ReferencePrompt {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
}

pub fn reference(model_type: &str) -> (Reference, std::collections::HashMap<String, Tensor>) {
    let dir = fixture_dir(model_type);
    let json = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    (serde_json::from_str(&json).unwrap(), tensors)
}

/// Copies a fixture model into a temporary directory that a test may damage.
pub fn scratch_copy(model_type: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(model_type)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// Writes an SAE with deterministic pseudo-random weights for `hook` (SAELens layout) into
/// `dir`: real files for the commands that read SAEs, without training one.
pub fn random_sae(
    dir: &std::path::Path,
    hook: &str,
    d_in: usize,
    d_sae: usize,
    architecture: monoscope::sae::Architecture,
) -> monoscope::sae::Sae {
    use monoscope::sae::Sae;
    use monoscope::sae::saelens::{SaeDir, SaeMetadata, save};
    let dev = candle_core::Device::Cpu;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut randn = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let w_dec = randn(&[d_sae, d_in], 1.0);
    let norms = w_dec.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    let w_dec = w_dec.broadcast_div(&norms).unwrap();
    let threshold = architecture
        .has_threshold()
        .then(|| randn(&[d_sae], 0.2).abs().unwrap());
    let sae = Sae {
        architecture,
        w_enc: w_dec.t().unwrap().contiguous().unwrap(),
        w_dec,
        b_enc: randn(&[d_sae], 0.2),
        b_dec: randn(&[d_in], 0.1),
        threshold,
        apply_b_dec_to_input: true,
        transcoder: false,
        w_skip: None,
    };
    let metadata = SaeMetadata {
        model_name: "fixture".into(),
        hook_name: hook.into(),
        context_size: 16,
        prepend_bos: true,
        dataset_path: "test".into(),
        hook_name_out: String::new(),
    };
    save(
        dir,
        &SaeDir {
            sae: sae.clone(),
            metadata,
            sparsity: None,
        },
        false,
    )
    .unwrap();
    sae
}

/// Activations by (doc_id, position, feature).
pub type Rows = std::collections::BTreeMap<(u64, u32, u32), f32>;

/// What a direct forward pass and dense SAE encode give for each document, segment by
/// segment as the export cuts them (BOS + `context − 1` tokens): the non-zero activations
/// and the token id at each (doc_id, position).
pub fn direct_codes(
    model: &monoscope::Model,
    sae: &monoscope::sae::Sae,
    hook: &str,
    context: usize,
    docs: &[String],
) -> (Rows, std::collections::BTreeMap<(u64, u32), u32>) {
    use monoscope::model::{HookPoint, Hooks};
    let hook: HookPoint = hook.parse().unwrap();
    let bos = model.bos_token_id.unwrap();
    let mut rows = Rows::new();
    let mut tokens = std::collections::BTreeMap::new();
    for (doc, line) in docs.iter().enumerate() {
        let ids = model.tokenizer.encode(line).unwrap();
        for (s, chunk) in ids.chunks(context - 1).enumerate() {
            let mut input = vec![bos];
            input.extend(chunk);
            let out = model
                .forward(
                    &model.ids_tensor(&input).unwrap(),
                    &Hooks::new().capture([hook]),
                )
                .unwrap();
            let acts = sae.encode(out.cache.get(hook).unwrap()).unwrap();
            let acts = acts.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in acts.iter().enumerate().skip(1) {
                let pos = (s * (context - 1) + i - 1) as u32;
                tokens.insert((doc as u64, pos), input[i]);
                for (f, &v) in row.iter().enumerate() {
                    if v > 0.0 {
                        rows.insert((doc as u64, pos, f as u32), v);
                    }
                }
            }
        }
    }
    (rows, tokens)
}

/// A plain-text corpus of `lines` short documents (one per line) in `dir`, and its documents.
pub fn river_corpus(
    dir: &std::path::Path,
    lines: usize,
) -> (monoscope::sae::activations::Corpus, Vec<String>) {
    let docs: Vec<String> = (0..lines)
        .map(|i| {
            format!(
                "line {i}: the river {} flows past town {}",
                i % 3,
                i * 7 % 5
            )
        })
        .collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, docs.join("\n")).unwrap();
    let corpus =
        monoscope::sae::activations::Corpus::parse(path.to_str().unwrap(), "text").unwrap();
    (corpus, docs)
}

/// The down projection's weight of `layer`, as f32 values (edits change it; undo restores it).
pub fn down_proj(model: &monoscope::Model, layer: usize) -> Vec<f32> {
    model.transformer.blocks[layer]
        .mlp
        .down_proj()
        .weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Checks an SAE against the `io.safetensors` a fixture script wrote beside it (`input_ids`,
/// `x`, `feature_acts`, `reconstruction`): the model's activations at `point` on the ids
/// against `x` (relative 1e-4), and the SAE's encoding and reconstruction of `x` against the
/// reference's (1e-5). Returns the encoding.
pub fn check_sae_against_reference(
    model: &monoscope::Model,
    sae: &monoscope::sae::Sae,
    point: monoscope::model::HookPoint,
    io: &std::collections::HashMap<String, Tensor>,
    what: &str,
) -> Tensor {
    let out = model
        .forward(
            &model.ids_tensor(&io_ids(io)).unwrap(),
            &monoscope::model::Hooks::new().capture([point]),
        )
        .unwrap();
    let captured = out.cache.get(point).unwrap().get(0).unwrap();
    let err = max_relative_error(&captured, &io["x"]);
    assert!(err <= 1e-4, "{what} → {point}: activations off by {err}");
    // The SAE on the reference's own input, so no near-tie at a threshold or in a top-k flips.
    let acts = sae.encode(&io["x"]).unwrap();
    let err = max_relative_error(&acts, &io["feature_acts"]);
    assert!(err <= 1e-5, "{what}: feature activations off by {err}");
    let recon = sae.decode(&acts).unwrap();
    let err = max_relative_error(&recon, &io["reconstruction"]);
    assert!(err <= 1e-5, "{what}: reconstruction off by {err}");
    acts
}

/// A reference's token ids (`input_ids`, int64).
pub fn io_ids(io: &std::collections::HashMap<String, Tensor>) -> Vec<u32> {
    io["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// Loads the transcoder folder `dir` for `model` and checks it reads `blocks.{layer}.mlp.hook_in`
/// and writes `blocks.{layer}.hook_mlp_out` (the MLP's input after its norm, and its output).
pub fn load_mlp_transcoder(
    model: &monoscope::Model,
    dir: &std::path::Path,
    layer: usize,
) -> (monoscope::sae::Sae, monoscope::sae::SaeSite) {
    let device = candle_core::Device::Cpu;
    let (sae_dir, input) = monoscope::sae::load_for_model(dir, None, model, &device).unwrap();
    let output = monoscope::sae::output_hook(&sae_dir, input, model).unwrap();
    assert_eq!(
        (input.to_string(), output.to_string()),
        (
            format!("blocks.{layer}.mlp.hook_in"),
            format!("blocks.{layer}.hook_mlp_out")
        )
    );
    (sae_dir.sae, monoscope::sae::SaeSite { input, output })
}

/// Checks a transcoder against a reference made by its own package: the model's activations at
/// `input` and `output` on the reference's tokens are its `x` and `y` (max relative error
/// ≤ 1e-4), and on `x` the transcoder's encodings and output (skip path included) are its
/// `feature_acts` and `output` (≤ 1e-5).
pub fn check_transcoder_against_reference(
    model: &monoscope::Model,
    sae: &monoscope::sae::Sae,
    site: monoscope::sae::SaeSite,
    io: &std::collections::HashMap<String, Tensor>,
    what: &str,
) {
    let run = model
        .forward(
            &model.ids_tensor(&io_ids(io)).unwrap(),
            &monoscope::model::Hooks::new().capture([site.input, site.output]),
        )
        .unwrap();
    for (point, key) in [(site.input, "x"), (site.output, "y")] {
        let captured = run.cache.get(point).unwrap().get(0).unwrap();
        let err = max_relative_error(&captured, &io[key]);
        assert!(err <= 1e-4, "{what}: {point} off by {err}");
    }
    let acts = sae.encode(&io["x"]).unwrap();
    let err = max_relative_error(&acts, &io["feature_acts"]);
    assert!(err <= 1e-5, "{what}: feature activations off by {err}");
    let out = sae.output(&io["x"]).unwrap();
    let err = max_relative_error(&out, &io["output"]);
    assert!(err <= 1e-5, "{what}: output off by {err}");
}

/// The library's attribution graph of `ids` through `transcoders` (never cancelled).
pub fn attribution_graph(
    model: &monoscope::Model,
    transcoders: &[monoscope::attribution_graph::LayerTranscoder],
    ids: &[u32],
    settings: &monoscope::attribution_graph::GraphSettings,
) -> monoscope::attribution_graph::AttributionGraph {
    let cancel = std::sync::atomic::AtomicBool::new(false);
    monoscope::attribution_graph::attribute(
        model,
        transcoders,
        ids,
        settings,
        &cancel,
        &mut |_, _| {},
    )
    .unwrap()
    .unwrap()
}
