//! Parquet writing speed of the export, SAE encoding excluded: coded batches shaped like the
//! bundled SAE's (k = 32 of 12,288 features per token, 4,096 tokens per batch) go through the
//! export's shard writer (arrow arrays, ZSTD, row groups of 2^20 rows, hashing, sync and rename
//! at each shard) into a temporary folder. Throughput is in activation rows (non-zero
//! activations) per second.
//!
//! `cargo bench --bench export`. With `MONOSCOPE_FEATURE_STORE=DIR` (a folder made by
//! `monoscope features build`) it also times opening that feature store, as the GUI does.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use monoscope::export::writer::ShardWriter;
use monoscope::export::{ExportSettings, Manifest, ModelRef, SaeRef};
use monoscope::sae::codes::{CodedBatch, Segment, SegmentSettings};
use monoscope::sae::cpu::Active;
use monoscope::table::ROW_GROUP_ROWS;

const D_SAE: u32 = 12_288;
const K: usize = 32;
const TOKENS_PER_BATCH: usize = 4096;
const SEGMENT: usize = 127;
const BATCHES: usize = 16;

/// Deterministic batches: segments of 127 tokens, 32 distinct sorted features per token.
fn batches() -> Vec<CodedBatch> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut doc = 0u64;
    (0..BATCHES)
        .map(|_| {
            let mut segments = Vec::new();
            let mut codes = Active {
                row_start: vec![0],
                ..Default::default()
            };
            let mut tokens = 0;
            while tokens < TOKENS_PER_BATCH {
                let token_ids: Vec<u32> = (0..SEGMENT).map(|_| (next() % 2048) as u32).collect();
                for _ in 0..SEGMENT {
                    let mut features: Vec<u32> =
                        (0..K).map(|_| (next() % u64::from(D_SAE)) as u32).collect();
                    features.sort_unstable();
                    features.dedup();
                    for f in features {
                        codes.latent.push(f);
                        codes.value.push((next() % 10_000) as f32 / 1000.0 + 0.01);
                    }
                    codes.row_start.push(codes.latent.len());
                }
                segments.push(Segment {
                    doc_id: doc,
                    start: 0,
                    token_ids,
                });
                doc += 1;
                tokens += SEGMENT;
            }
            CodedBatch {
                segments,
                codes,
                inputs: Vec::new(),
                ends_document: true,
            }
        })
        .collect()
}

fn manifest() -> Manifest {
    Manifest {
        schema_version: 1,
        complete: false,
        model: ModelRef {
            dir: "bench".into(),
            content_hash: String::new(),
        },
        hook: "blocks.4.mlp.hook_post".into(),
        sae: SaeRef {
            dir: "bench".into(),
            content_hash: String::new(),
            architecture: "topk".into(),
            d_in: 768,
            d_sae: D_SAE as usize,
            hook_out: None,
        },
        corpus: "bench".into(),
        context_size: 128,
        prepend_bos: true,
        exclude_special: true,
        document_count: 0,
        token_count: 0,
        activation_count: 0,
        skipped_lines: 0,
        shards: Vec::new(),
        features: None,
    }
}

fn write_all(out: &Path, batches: &[CodedBatch], settings: &ExportSettings, names: &[String]) {
    for dir in ["activations", "tokens"] {
        std::fs::create_dir_all(out.join(dir)).expect("bench folder");
    }
    let mut writer = ShardWriter::new(out, manifest(), settings, names);
    for b in batches {
        writer.write(b).expect("write");
    }
    let end = batches
        .last()
        .and_then(|b| b.segments.last())
        .map_or(0, |s| s.doc_id + 1);
    writer.finish(end).expect("finish");
}

fn bench_write(c: &mut Criterion) {
    monoscope::allocator::keep_freed_buffers(); // as the binary does
    let batches = batches();
    let rows: usize = batches.iter().map(|b| b.codes.len()).sum();
    let names: Vec<String> = (0..2048).map(|i| format!("tok{i}")).collect();
    let settings = ExportSettings {
        segment: SegmentSettings {
            context_size: 128,
            prepend_bos: true,
            exclude_special: true,
            segments_per_forward: 32,
        },
        tokens: None,
        // Two shards per run, so shard closing (sync, hash, rename, manifest) is included.
        shard_rows: rows as u64 / 2,
        row_group_rows: ROW_GROUP_ROWS,
        logit_tokens: 0,
    };
    let mut group = c.benchmark_group("export");
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("write_parquet_rows", |b| {
        b.iter_with_setup(
            || tempfile::tempdir().expect("temp dir"),
            |dir| write_all(dir.path(), &batches, &settings, &names),
        )
    });
    group.finish();
}

fn bench_store_open(c: &mut Criterion) {
    let Ok(dir) = std::env::var("MONOSCOPE_FEATURE_STORE") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let mut group = c.benchmark_group("features");
    group.sample_size(10);
    group.bench_function("open_feature_store", |b| {
        b.iter(|| monoscope::features::store::open(&dir).expect("feature store"))
    });
    group.finish();
}

criterion_group!(benches, bench_write, bench_store_open);
criterion_main!(benches);
