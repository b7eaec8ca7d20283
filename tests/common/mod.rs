//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// Every supported architecture has a tiny oracle model under tests/fixtures/models.
pub const MODEL_TYPES: &[&str] = &["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma"];

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

fn max_abs(t: &Tensor) -> f32 {
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
