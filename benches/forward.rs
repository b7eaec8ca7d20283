//! Forward-pass throughput of a GPT-2-small-shaped model (12 layers, d_model 768, random
//! weights made here) on batch 8 × 128 tokens, capturing `blocks.6.mlp.hook_post`, on CPU
//! (or on `MONOSCOPE_FORWARD_DEVICE=cuda` in a `--features cuda` build).
//! benches/compare_forward.sh runs this beside the PyTorch reference and prints the ratio.
//!
//!     cargo bench --bench forward

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use monoscope::device::{DeviceChoice, device_name};
use monoscope::model::{HookPoint, Hooks, Model};

const LAYERS: usize = 12;
const D: usize = 768;
const VOCAB: usize = 50257;
const CONTEXT: usize = 1024;
const BATCH: usize = 8;
const SEQ: usize = 128;

/// Writes a randomly initialised GPT-2-small in Hugging Face format and loads it through the
/// normal loading path (config.json + model.safetensors + tokenizer.json).
fn random_gpt2_small(dir: &std::path::Path, device: &Device) -> Model {
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev).unwrap();
    let zeros = |n: usize| Tensor::zeros(n, DType::F32, &dev).unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("transformer.wte.weight".into(), randn(&[VOCAB, D]));
    t.insert("transformer.wpe.weight".into(), randn(&[CONTEXT, D]));
    t.insert("transformer.ln_f.weight".into(), ones(D));
    t.insert("transformer.ln_f.bias".into(), zeros(D));
    for l in 0..LAYERS {
        let p = format!("transformer.h.{l}");
        for ln in ["ln_1", "ln_2"] {
            t.insert(format!("{p}.{ln}.weight"), ones(D));
            t.insert(format!("{p}.{ln}.bias"), zeros(D));
        }
        for (name, i, o) in [
            ("attn.c_attn", D, 3 * D),
            ("attn.c_proj", D, D),
            ("mlp.c_fc", D, 4 * D),
            ("mlp.c_proj", 4 * D, D),
        ] {
            t.insert(format!("{p}.{name}.weight"), randn(&[i, o]));
            t.insert(format!("{p}.{name}.bias"), zeros(o));
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": VOCAB, "n_positions": CONTEXT, "n_embd": D,
        "n_layer": LAYERS, "n_head": 12, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "eos_token_id": 50256
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokenizer = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/gpt2/tokenizer.json"
    );
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).unwrap();
    Model::load(dir, device, DType::F32).unwrap()
}

fn forward(c: &mut Criterion) {
    monoscope::allocator::keep_freed_buffers(); // as the binary does
    let device: DeviceChoice = std::env::var("MONOSCOPE_FORWARD_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .unwrap();
    let device = device.open().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = random_gpt2_small(dir.path(), &device);
    let ids = Tensor::rand(0f32, VOCAB as f32, (BATCH, SEQ), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&device)
        .unwrap();
    let hooks = Hooks::new().capture([HookPoint::MlpPost(6)]);
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    // `cpu` or `cuda0`: the GPU's kernels run asynchronously, so each pass waits for them.
    let name = format!(
        "gpt2_small_{}_b8x128_capture_mlp_post",
        device_name(&device).replace(':', "")
    );
    group.bench_function(name, |b| {
        b.iter(|| {
            let out = model.forward(&ids, &hooks).unwrap();
            assert_eq!(out.cache.len(), 1);
            device.synchronize().unwrap();
            out
        })
    });
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
