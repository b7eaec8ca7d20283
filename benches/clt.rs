//! Cross-layer transcoder training speed: one step of `monoscope clt train`'s trainer at the
//! bundled model's sizes (8 layers, 192 wide, 1,536 features a layer, k 16, batch 1,024).
//!
//! `cargo bench --bench clt` runs criterion on random rows. Two other modes serve
//! `benches/compare_clt.sh`, which runs the PyTorch reference (`benches/reference/clt_torch.py`)
//! on the same rows:
//! - `MONOSCOPE_CLT_DUMP=FILE` writes the bundled model's activation rows (every layer's
//!   `hook_resid_mid`, then every layer's `hook_mlp_out`): `train` from the world corpus, `eval`
//!   from another seed of it, and `FILE.json` with the sizes;
//! - `MONOSCOPE_CLT_COMPARE=FILE` trains on them for `MONOSCOPE_CLT_STEPS` steps (default 100)
//!   with the reference's recipe (batches in file order, AuxK off) and prints one JSON line:
//!   tokens/s over the steps after the first 3, and the mean FVU and L0 per layer on `eval`
//!   through the calibrated JumpReLU.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group};
use monoscope::Model;
use monoscope::model::HookPoint;
use monoscope::sae::activations::{ActivationSource, ChunkSource, Corpus, WindowSettings};
use monoscope::sae::clt::{CltConfig, CltTrainer};

const FEATURES: usize = 1536;
const K: usize = 16;
const BATCH: usize = 1024;
const WARMUP_STEPS: usize = 3;
const TRAIN_ROWS: usize = 32_768;
const EVAL_ROWS: usize = 8_192;

fn config(n_layers: usize, d: usize, steps: usize) -> CltConfig {
    let mut c = CltConfig::new(n_layers, d, d, FEATURES, K);
    c.batch_size = BATCH;
    c.total_steps = steps as u64;
    c.warmup_steps = 100;
    c.decay_steps = (steps as f64 * 0.2) as u64;
    c.aux_k = 0;
    c
}

fn benches(c: &mut Criterion) {
    let (n, d) = (8, 192);
    let config = config(n, d, 1000);
    let rows = Tensor::randn(0f32, 1.0, (BATCH, config.row_width()), &Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("random rows");
    let mut trainer = CltTrainer::new(config, &rows).expect("trainer");
    let mut group = c.benchmark_group("clt");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("step_8x1536_k16_batch1024", |b| {
        b.iter(|| trainer.step(&rows).expect("step"))
    });
    group.finish();
}

criterion_group!(criterion_benches, benches);

/// `rows` rows of the bundled model's activations over `corpus`.
fn activation_rows(model: &Model, corpus: &str, rows: usize) -> anyhow::Result<Vec<f32>> {
    let n = model.dims().n_layers;
    let columns: Vec<HookPoint> = (1..n)
        .map(HookPoint::ResidMid)
        .chain((0..n).map(HookPoint::MlpOut))
        .collect();
    let mut source = ActivationSource::new(
        model,
        Corpus::parse(corpus, "text")?,
        "blocks.0.hook_resid_mid",
        WindowSettings::default(),
    )?
    .with_columns(&columns)?;
    let width = source.d_in();
    let mut out = Vec::with_capacity(rows * width);
    while out.len() < rows * width {
        out.extend(source.next_chunk()?);
    }
    out.truncate(rows * width);
    Ok(out)
}

fn dump(path: &str) -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world");
    let model = Model::load(&dir, &Device::Cpu, DType::F32)?;
    let (n, d) = (model.dims().n_layers, model.dims().d_model);
    let width = 2 * n * d;
    let train = activation_rows(&model, "world", TRAIN_ROWS)?;
    let eval = activation_rows(&model, "world:1", EVAL_ROWS)?;
    let tensors = HashMap::from([
        (
            "train".to_string(),
            Tensor::from_vec(train, (TRAIN_ROWS, width), &Device::Cpu)?,
        ),
        (
            "eval".to_string(),
            Tensor::from_vec(eval, (EVAL_ROWS, width), &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, path)?;
    let sizes = serde_json::json!({"layers": n, "width": d, "features": FEATURES, "k": K});
    std::fs::write(format!("{path}.json"), sizes.to_string())?;
    Ok(())
}

fn compare(path: &str, steps: usize) -> anyhow::Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let sizes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{path}.json"))?)?;
    let size = |key: &str| sizes[key].as_u64().unwrap_or(0) as usize;
    let (n, d) = (size("layers"), size("width"));
    let get = |key: &str| -> anyhow::Result<Vec<f32>> {
        let t = tensors
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("{path} has no `{key}`"))?;
        Ok(t.flatten_all()?.to_vec1()?)
    };
    let (train, eval) = (get("train")?, get("eval")?);
    let config = config(n, d, steps);
    let width = config.row_width();
    let rows = train.len() / width;
    let batch_at = |s: usize| {
        let lo = (s * BATCH) % rows;
        &train[lo * width..(lo + BATCH) * width]
    };
    let mut trainer = CltTrainer::new(config, batch_at(0))?;
    let mut start = Instant::now();
    for s in 0..steps {
        if s == WARMUP_STEPS {
            start = Instant::now();
        }
        trainer.step(batch_at(s))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    trainer.calibrate((0..8).map(|c| batch_at(steps + c)));
    let eval_rows = eval.len() / width;
    let mut fvu = 0.0;
    for layer in 0..n {
        let predicted = trainer.predict(&eval, layer);
        let target: Vec<f32> = eval
            .chunks_exact(width)
            .flat_map(|row| row[(n + layer) * d..(n + layer + 1) * d].to_vec())
            .collect();
        let mut mean = vec![0f64; d];
        for row in target.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += f64::from(v) / eval_rows as f64;
            }
        }
        let (mut error, mut variance) = (0f64, 0f64);
        for (i, (&p, &y)) in predicted.iter().zip(&target).enumerate() {
            error += (f64::from(p) - f64::from(y)).powi(2);
            variance += (f64::from(y) - mean[i % d]).powi(2);
        }
        fvu += error / variance / n as f64;
    }
    let l0 = trainer.firing(&eval);
    println!(
        "{}",
        serde_json::json!({
            "side": "monoscope",
            "steps": steps,
            "batch": BATCH,
            "tokens_per_second": ((steps - WARMUP_STEPS) * BATCH) as f64 / elapsed,
            "fvu": fvu,
            "l0": l0.iter().sum::<f64>() / n as f64,
            "threads": rayon::current_num_threads(),
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    monoscope::allocator::keep_freed_buffers(); // as the binary does
    if let Ok(path) = std::env::var("MONOSCOPE_CLT_DUMP") {
        return dump(&path);
    }
    if let Ok(path) = std::env::var("MONOSCOPE_CLT_COMPARE") {
        let steps = std::env::var("MONOSCOPE_CLT_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100);
        return compare(&path, steps.max(WARMUP_STEPS + 1));
    }
    criterion_benches();
    Criterion::default().configure_from_args().final_summary();
    Ok(())
}
