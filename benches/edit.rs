//! Fact editing speed.
//!
//! - ROME's key statistics on the bundled world model: `E[k kᵀ]` at `blocks.4.mlp.hook_post`
//!   (768 × 768) over 10,000 tokens of the world corpus, forward passes included. The issue's
//!   figure is for 100k tokens: ten times one iteration (the pass streams, so time is linear
//!   in tokens).
//! - One ROME edit with the statistics in hand ("The capital of Japan is" → " Seoul", layer
//!   0, subject-last key, the default 26 context templates, 20 Adam steps for v*, the Cholesky solve
//!   and the rank-one update): on the bundled model, and on a GPT-2-small-shaped model
//!   (12 layers, d_model 768, d_mlp 3072, vocabulary 50,257; random weights, since no real
//!   GPT-2 small may be downloaded here — the time depends on the shape, not the values).
//!
//! `cargo bench --bench edit`

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use monoscope::Model;
use monoscope::edit::covariance::key_covariance;
use monoscope::edit::rome::{KeyPosition, Request, RomeSettings, compute_edit};
use monoscope::edit::{DEFAULT_CONTEXTS_PER_START, context_templates};
use monoscope::sae::activations::Corpus;
use monoscope::world::train::{Gpt2Shape, TrainConfig, Trainer};

const TOKENS: u64 = 10_000;

fn bundled_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world")
}

fn bench_covariance(c: &mut Criterion) {
    monoscope::allocator::keep_freed_buffers(); // as the binary does
    let model = Model::load(&bundled_dir(), &Device::Cpu, DType::F32).expect("bundled model");
    let corpus = Corpus::World { seed: 0 };
    let mut group = c.benchmark_group("edit");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TOKENS));
    group.bench_function("key_covariance_l4_10k_tokens", |b| {
        b.iter(|| key_covariance(&model, 4, &corpus, TOKENS, None, |_| {}).expect("covariance"))
    });
    group.finish();
}

/// A GPT-2-small-shaped folder with random weights and the bundled tokenizer.
fn gpt2_small_shaped(dir: &Path) -> Model {
    let shape = Gpt2Shape {
        vocab_size: 50_257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
    };
    let trainer = Trainer::new(shape, TrainConfig::default(), &Device::Cpu).expect("init");
    let eos = Model::load(&bundled_dir(), &Device::Cpu, DType::F32)
        .expect("bundled model")
        .start_token()
        .unwrap_or(0);
    trainer.save_model(dir, eos).expect("save");
    std::fs::copy(
        bundled_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .expect("tokenizer");
    Model::load(dir, &Device::Cpu, DType::F32).expect("GPT-2-small-shaped model")
}

fn bench_rome(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut models = vec![(
        "bundled",
        Model::load(&bundled_dir(), &Device::Cpu, DType::F32).expect("bundled model"),
        20_000,
    )];
    // The 124M-parameter model takes minutes to set up and time: only under `cargo bench`,
    // not when the test runner runs each benchmark once.
    if std::env::args().any(|a| a == "--bench") {
        models.push(("gpt2_small_shaped", gpt2_small_shaped(tmp.path()), 2_000));
    }
    let request = Request {
        prompt: "The capital of {} is".into(),
        subject: "Japan".into(),
        target: " Seoul".into(),
    };
    let mut group = c.benchmark_group("edit");
    group.sample_size(10);
    for (name, model, stats_tokens) in &models {
        // Statistics are cached in real use; their size, not their sample count, sets the
        // solve's cost.
        let cov = key_covariance(
            model,
            0,
            &Corpus::World { seed: 0 },
            *stats_tokens,
            None,
            |_| {},
        )
        .expect("covariance");
        let contexts =
            context_templates(model, DEFAULT_CONTEXTS_PER_START, 10, 0).expect("contexts");
        group.bench_function(format!("rome_edit_{name}"), |b| {
            b.iter(|| {
                compute_edit(
                    model,
                    &request,
                    0,
                    KeyPosition::SubjectLast,
                    &cov,
                    &contexts,
                    &RomeSettings::default(),
                )
                .expect("edit")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_covariance, bench_rome);
criterion_main!(benches);
