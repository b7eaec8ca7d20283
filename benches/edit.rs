//! ROME's key statistics on the bundled world model: `E[k kᵀ]` at `blocks.4.mlp.hook_post`
//! (768 × 768) over 10,000 tokens of the world corpus, forward passes included. The issue's
//! figure is for 100k tokens: ten times one iteration (the pass streams, so time is linear in
//! tokens).
//!
//! `cargo bench --bench edit`

use std::path::PathBuf;

use candle_core::{DType, Device};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use monoscope::Model;
use monoscope::edit::covariance::key_covariance;
use monoscope::sae::activations::Corpus;

const TOKENS: u64 = 10_000;

fn bench_covariance(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let model = Model::load(&dir, &Device::Cpu, DType::F32).expect("bundled model");
    let corpus = Corpus::World { seed: 0 };
    let mut group = c.benchmark_group("edit");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TOKENS));
    group.bench_function("key_covariance_l4_10k_tokens", |b| {
        b.iter(|| key_covariance(&model, 4, &corpus, TOKENS, None, |_| {}).expect("covariance"))
    });
    group.finish();
}

criterion_group!(benches, bench_covariance);
criterion_main!(benches);
