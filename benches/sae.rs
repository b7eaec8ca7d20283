//! SAE training speed: one optimiser step of a TopK (k 32) and a ReLU-L1 SAE, d_in 512 →
//! d_sae 8192, batch 4096 — the sizes `benches/compare_sae.sh` runs against PyTorch.
//!
//! `cargo bench --bench sae` runs criterion on random data. With `MONOSCOPE_SAE_COMPARE=FILE`
//! (the synthetic data of `benches/reference/sae_synthetic.py`) it instead trains with the exact
//! recipe of `benches/reference/sae_torch.py` for `MONOSCOPE_SAE_STEPS` steps (default 200) and
//! prints one JSON line per variant: tokens/s over the steps after the first 3, FVU and L0 on
//! the file's `eval` rows. `MONOSCOPE_SAE_DEVICE=cuda` (a `--features cuda` build) runs those
//! steps on the GPU with the tensor engine; `MONOSCOPE_SAE_ENGINE=tensors` picks the tensor
//! engine on the CPU too (`kernels`, the hand-written CPU kernels, is the CPU's default).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group};
use monoscope::device::DeviceChoice;
use monoscope::sae::run::{StepEngine, Trainer};
use monoscope::sae::train::{BDecInit, SaeTrainer, TrainArchitecture, TrainConfig};

const D_IN: usize = 512;
const D_SAE: usize = 8192;
const BATCH: usize = 4096;
const K: usize = 32;
const L1: f32 = 20.0;
const LR: f32 = 4e-4;
const WARMUP_STEPS: usize = 3;

fn variants() -> [(&'static str, TrainArchitecture); 2] {
    [
        (
            "topk",
            TrainArchitecture::TopK {
                k: K,
                aux_k: 0,
                aux_coefficient: 0.0,
            },
        ),
        (
            "relu_l1",
            TrainArchitecture::Standard { l1_coefficient: L1 },
        ),
    ]
}

/// The reference recipe: unit-norm decoder rows, `W_enc = W_decᵀ`, `b_dec` = mean of the first
/// batch, constant learning rate, no clipping, no AuxK.
fn config(architecture: TrainArchitecture, steps: usize) -> TrainConfig {
    let mut c = TrainConfig::new(architecture, D_IN, D_SAE);
    c.batch_size = BATCH;
    c.total_steps = steps as u64;
    c.lr = LR;
    c.decoder_init_norm = 1.0;
    c.b_dec_init = BDecInit::Mean;
    c
}

fn random_rows(rows: usize) -> Vec<f32> {
    Tensor::randn(0f32, 1.0, (rows, D_IN), &Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .expect("random data")
}

fn bench_steps(c: &mut Criterion) {
    let x = random_rows(BATCH);
    let mut group = c.benchmark_group("sae_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, arch) in variants() {
        let mut trainer = SaeTrainer::new(config(arch, 1_000_000), &x).expect("trainer");
        group.bench_function(format!("{name}_{D_IN}x{D_SAE}_b{BATCH}"), |b| {
            b.iter(|| trainer.step(&x).expect("step"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_steps);

/// Trains every variant on the reference data and prints a JSON line for each.
fn compare(path: &str, steps: usize, engine: &StepEngine) -> anyhow::Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let rows = |key: &str| -> anyhow::Result<Vec<f32>> {
        let t = tensors
            .get(key)
            .ok_or_else(|| anyhow::anyhow!("{path}: no tensor `{key}`"))?;
        anyhow::ensure!(t.dim(1)? == D_IN, "{path}: `{key}` is not {D_IN} wide");
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let train = rows("train")?;
    let eval = rows("eval")?;
    let train_rows = train.len() / D_IN;
    anyhow::ensure!(
        train_rows.is_multiple_of(BATCH),
        "{path}: train rows not a multiple of {BATCH}"
    );
    let threads = rayon::current_num_threads();
    for (name, arch) in variants() {
        let host = SaeTrainer::new(config(arch, steps), &train[..BATCH * D_IN])?;
        let mut trainer = Trainer::new(host, engine)?;
        let mut timed_from = Instant::now();
        let mut last_loss = 0.0;
        for s in 0..steps {
            if s == WARMUP_STEPS {
                timed_from = Instant::now();
            }
            let start = (s * BATCH) % train_rows;
            last_loss = trainer
                .step(&train[start * D_IN..(start + BATCH) * D_IN])?
                .loss;
        }
        let elapsed = timed_from.elapsed().as_secs_f64();
        let sae = trainer.with_host(|t| t.to_sae(1.0, 1.0, &Device::Cpu))?;
        let x = Tensor::from_slice(&eval, (eval.len() / D_IN, D_IN), &Device::Cpu)?;
        let mut sq_err = 0f64;
        let mut active = 0f64;
        for chunk in 0..x.dim(0)?.div_ceil(BATCH) {
            let xs = x.narrow(0, chunk * BATCH, BATCH.min(x.dim(0)? - chunk * BATCH))?;
            let acts = sae.encode(&xs)?;
            let x_hat = sae.decode(&acts)?;
            sq_err += f64::from((x_hat - &xs)?.sqr()?.sum_all()?.to_scalar::<f32>()?);
            active += f64::from(
                acts.gt(0.0)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            );
        }
        let mean = x.mean(0)?;
        let total = f64::from(
            x.broadcast_sub(&mean)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
        let n = x.dim(0)? as f64;
        println!(
            "{}",
            serde_json::json!({
                "variant": name,
                "steps": steps,
                "batch": BATCH,
                "tokens_per_second": ((steps - WARMUP_STEPS) * BATCH) as f64 / elapsed,
                "fvu": sq_err / total,
                "l0": active / n,
                "final_loss": last_loss,
                "threads": threads,
                "engine": engine.describe(),
            })
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    monoscope::allocator::keep_freed_buffers(); // as the binary does
    if let Ok(path) = std::env::var("MONOSCOPE_SAE_COMPARE") {
        let steps = std::env::var("MONOSCOPE_SAE_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        let device: DeviceChoice = std::env::var("MONOSCOPE_SAE_DEVICE")
            .unwrap_or_else(|_| "cpu".into())
            .parse()?;
        let device = device.open()?;
        let engine = match std::env::var("MONOSCOPE_SAE_ENGINE").as_deref() {
            Err(_) if device.is_cpu() => StepEngine::Cpu,
            Err(_) => StepEngine::Tensors(device),
            Ok("tensors") => StepEngine::Tensors(device),
            Ok("kernels") if device.is_cpu() => StepEngine::Cpu,
            Ok("kernels") => anyhow::bail!("MONOSCOPE_SAE_ENGINE=kernels runs on the CPU only"),
            Ok(other) => anyhow::bail!("MONOSCOPE_SAE_ENGINE={other}: expected kernels or tensors"),
        };
        return compare(&path, steps.max(WARMUP_STEPS + 1), &engine);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    Ok(())
}
