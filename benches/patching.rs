//! Activation patching speed on the bundled world model: "The capital of Japan is" against
//! "The capital of France is", every site (residual stream, attention and MLP outputs per
//! layer × position; each head's output, query, key, value and pattern at every position and
//! at each position: 8 × 5 × 3 + 8 × 6 × 5 + 8 × 30 × 5 = 1,560 patched runs), as
//! TransformerLens's thirteen `get_act_patch_*` calls compute them. `bash benches/compare_patching.sh`
//! runs this beside TransformerLens and prints the ratio and the largest difference.
//!
//! `cargo bench --bench patching`

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use criterion::{Criterion, criterion_group, criterion_main};
use monoscope::Model;
use monoscope::causal::target_token;
use monoscope::patching::{Direction, PatchRequest, Site, patch};

fn bench_patching(c: &mut Criterion) {
    monoscope::allocator::keep_freed_buffers(); // as the binary does
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let model = Model::load(&dir, &Device::Cpu, DType::F32).expect("bundled model");
    let (clean, corrupted) = ("The capital of Japan is", "The capital of France is");
    let request = PatchRequest {
        clean: model.encode_prompt(clean).expect("clean"),
        corrupted: model.encode_prompt(corrupted).expect("corrupted"),
        answer: target_token(&model, clean, " Tokyo").expect("answer"),
        wrong: target_token(&model, corrupted, " Paris").expect("wrong"),
        sites: Site::ALL.to_vec(),
        direction: Direction::Denoise,
        attribution: false,
    };
    let never = AtomicBool::new(false);
    let mut group = c.benchmark_group("patching");
    group.sample_size(20);
    group.bench_function("world_japan_france_all_sites", |b| {
        b.iter(|| patch(&model, &request, &never, &mut |_, _| {}).expect("patch"))
    });
    let with_attribution = PatchRequest {
        attribution: true,
        ..request.clone()
    };
    group.bench_function("world_japan_france_all_sites_with_attribution", |b| {
        b.iter(|| patch(&model, &with_attribution, &never, &mut |_, _| {}).expect("patch"))
    });
    group.finish();
}

criterion_group!(benches, bench_patching);
criterion_main!(benches);
