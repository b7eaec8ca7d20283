//! Training cross-layer transcoders (CLTs; Ameisen et al. 2025, "Circuit Tracing"): one encoder
//! per layer reads that layer's MLP input side (by default `hook_resid_mid`), and each layer's
//! features write its own MLP output and every later one's (`hook_mlp_out`), so a feature can
//! stand for computation that several MLPs share. Attribution graphs through a CLT
//! (`monoscope attribute --transcoders DIR`) then need fewer feature hops than through
//! per-layer transcoders.
//!
//! The recipe is the one `utahnlp/crosslayer-coding` recommends: BatchTopK per layer while
//! training (the `k · batch` largest pre-activations of a layer's features across the batch
//! fire), turned into a JumpReLU after training: each layer's fixed threshold is the mean batch
//! threshold over a few batches with the final weights, so about `k` features fire per token
//! and layer. The loss sums every layer's squared error (each layer's
//! inputs and targets scaled to a mean norm of √d first, so that no layer outweighs the others,
//! and the scales folded into the saved weights), plus AuxK for dead features as for TopK SAEs.
//! Each token's candidates are its layer's `4k` largest pre-activations (a token can take at
//! most that many of the batch's picks). Decoding and every gradient touch only the picked
//! features' decoder rows ([`super::cpu`]'s kernels); training runs on the CPU.
//!
//! The output is circuit-tracer's CLT format (see [`crate::attribution_graph::circuit_tracer`]),
//! so the folder traces in monoscope and loads in circuit-tracer unchanged: for every layer `L`,
//! `W_enc_L.safetensors` (`W_enc_L` `[features, d_in]`, `b_enc_L`, `b_dec_L`, `threshold_L`) and
//! `W_dec_L.safetensors` (`W_dec_L` `[features, n_layers − L, d_out]`), plus `config.yaml`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::activations::{ChunkSource, MixingBuffer};
use super::checkpoint::{self, STATE_JSON, TRAINER_FILE};
use super::cpu::{self, AdamStep, MatRef, Nesting};
use crate::error::{Error, Result};

/// Layer `L`'s encoder file: its encoder, encoder bias, output bias and threshold.
pub fn encoder_file(layer: usize) -> String {
    format!("W_enc_{layer}.safetensors")
}

/// Layer `L`'s decoder file: its features' rows into its own and every later MLP output.
pub fn decoder_file(layer: usize) -> String {
    format!("W_dec_{layer}.safetensors")
}

/// The description written beside the weights (read by circuit-tracer's `load_clt` and by
/// monoscope).
pub const CONFIG_FILE: &str = "config.yaml";

/// One layer's saved tensors: its encoder file's and its decoder file's.
pub type LayerFiles = (HashMap<String, Tensor>, HashMap<String, Tensor>);

/// Batches the JumpReLU thresholds are measured on after training.
const CALIBRATION_BATCHES: usize = 8;

/// Each token's candidates per layer, in multiples of `k`.
const CANDIDATES_PER_K: usize = 4;

/// What to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CltConfig {
    pub n_layers: usize,
    /// Width of each layer's input hook.
    pub d_in: usize,
    /// Width of each layer's MLP output.
    pub d_out: usize,
    /// Features per layer.
    pub features: usize,
    /// Mean features firing per token and layer.
    pub k: usize,
    /// Dead features per layer that AuxK asks to explain the error (0: no AuxK).
    pub aux_k: usize,
    pub aux_coefficient: f32,
    /// A feature that has not fired for this many tokens is dead.
    pub dead_after_tokens: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The learning rate falls linearly to zero over this many final steps.
    pub decay_steps: u64,
    pub total_steps: u64,
    pub batch_size: usize,
    pub seed: u64,
}

impl CltConfig {
    /// A config with the usual knobs for `n_layers` layers of the given widths.
    pub fn new(n_layers: usize, d_in: usize, d_out: usize, features: usize, k: usize) -> Self {
        Self {
            n_layers,
            d_in,
            d_out,
            features,
            k,
            aux_k: d_out / 2,
            aux_coefficient: 1.0 / 32.0,
            dead_after_tokens: 1_000_000,
            lr: 1e-3,
            warmup_steps: 50,
            decay_steps: 0,
            total_steps: 1000,
            batch_size: 1024,
            seed: 0,
        }
    }

    /// Width of a training row: every layer's input, then every layer's target.
    pub fn row_width(&self) -> usize {
        self.n_layers * (self.d_in + self.d_out)
    }

    /// Refuses settings that cannot train, naming the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &'static str, value: String, message: &str| {
            Err(Error::InvalidArgument {
                what,
                value,
                message: message.into(),
            })
        };
        if self.n_layers == 0 || self.d_in == 0 || self.d_out == 0 {
            return bad(
                "cross-layer transcoder shape",
                format!("{} layers, {} → {}", self.n_layers, self.d_in, self.d_out),
                "needs at least one layer and non-empty hooks",
            );
        }
        if self.features == 0 {
            return bad("features per layer", "0".into(), "must be positive");
        }
        if self.k == 0 || self.k > self.features {
            return bad(
                "k",
                self.k.to_string(),
                &format!(
                    "must be between 1 and the features per layer ({})",
                    self.features
                ),
            );
        }
        if self.batch_size == 0 {
            return bad("batch size", "0".into(), "must be positive");
        }
        if self.total_steps == 0 {
            return bad("tokens", "0".into(), "must be at least one batch");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("learning rate", self.lr.to_string(), "must be positive");
        }
        Ok(())
    }

    /// Learning rate at `step`: linear warm-up, constant, then a linear fall to zero.
    fn lr_at(&self, step: u64) -> f64 {
        let factor =
            super::train::lr_schedule(step, self.warmup_steps, self.decay_steps, self.total_steps);
        self.lr * f64::from(factor)
    }
}

/// One step's figures (every per-layer list has one entry per layer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CltStepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    /// Fraction of each layer's MLP-output variance left unexplained.
    pub fvu: Vec<f64>,
    /// Features firing per token, per layer.
    pub l0: Vec<f64>,
    /// Fraction of each layer's features dead.
    pub dead_fraction: Vec<f64>,
    pub lr: f64,
}

impl CltStepMetrics {
    /// The mean of per-layer figures.
    pub fn mean(values: &[f64]) -> f64 {
        values.iter().sum::<f64>() / values.len().max(1) as f64
    }
}

/// Per layer, the sum and the number of the batch thresholds seen while calibrating.
struct ThresholdSums {
    total: Vec<f64>,
    count: Vec<usize>,
}

impl ThresholdSums {
    fn new(n_layers: usize) -> Self {
        Self {
            total: vec![0.0; n_layers],
            count: vec![0; n_layers],
        }
    }
}

/// What one forward and backward pass found.
struct Pass {
    loss: f64,
    fvu: Vec<f64>,
    l0: Vec<f64>,
    /// Each layer's picked features, then those AuxK picked (layers with dead features);
    /// the gradient test reads them to skip steps that move a pick.
    #[cfg_attr(not(test), allow(dead_code))]
    picked: Vec<cpu::Active>,
}

/// One parameter with its Adam moments and gradient, on the host.
#[derive(Clone)]
struct Param {
    value: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(value: Vec<f32>) -> Self {
        let n = value.len();
        Self {
            value,
            grad: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// Training state on the host: the parameters with their gradients and Adam moments, the
/// JumpReLU thresholds and the features' firing counters. The step is written by
/// hand on [`cpu`]'s kernels, as the CPU SAE trainer's: one dense product per layer (the
/// encoder), and decoding and every gradient over the picked features only (a CLT's decoder
/// rows are `n_layers − L` times an SAE's, so gathering them as tensors would copy gigabytes a
/// step).
#[derive(Clone)]
pub struct CltTrainer {
    pub config: CltConfig,
    /// Per layer, `[features, d_in]` (encoder columns stored as rows).
    w_enc_t: Vec<Param>,
    /// Per layer, `[features]`.
    b_enc: Vec<Param>,
    /// Per layer `L`, `[features, (n_layers − L) · d_out]`: row `f` is feature `f`'s writes to
    /// layers `L, L + 1, …` side by side.
    w_dec: Vec<Param>,
    /// `[n_layers · d_out]`.
    b_dec: Param,
    /// Per layer: the JumpReLU threshold of the saved CLT (in the scaled units), set by
    /// [`Self::calibrate`].
    thresholds: Vec<f32>,
    /// Per layer and feature: tokens since it last fired.
    since_fired: Vec<Vec<u64>>,
    /// Factors each layer's inputs and targets are multiplied by before training.
    input_scale: Vec<f32>,
    output_scale: Vec<f32>,
    pub step: u64,
    pub tokens: u64,
}

impl CltTrainer {
    /// A fresh CLT for `config`, its scales and output biases set from `first` (rows as
    /// [`CltConfig::row_width`] says): encoder rows are the own-layer decoder rows, as for SAEs.
    pub fn new(config: CltConfig, first: &[f32]) -> Result<Self> {
        config.validate()?;
        let (n, d_in, d_out, f) = (config.n_layers, config.d_in, config.d_out, config.features);
        let width = config.row_width();
        let rows = first.len() / width;
        if rows == 0 || !first.len().is_multiple_of(width) {
            return Err(Error::InvalidArgument {
                what: "cross-layer transcoder training rows",
                value: format!("{} values", first.len()),
                message: format!("need whole rows of {width} values"),
            });
        }
        let scale = |offset: usize, w: usize| -> f32 {
            let norm = first
                .chunks_exact(width)
                .map(|row| cpu::sum_squares(&row[offset..offset + w]).sqrt())
                .sum::<f64>()
                / rows as f64;
            if norm > 0.0 {
                ((w as f64).sqrt() / norm) as f32
            } else {
                1.0
            }
        };
        let input_scale: Vec<f32> = (0..n).map(|l| scale(l * d_in, d_in)).collect();
        let output_scale: Vec<f32> = (0..n).map(|l| scale(n * d_in + l * d_out, d_out)).collect();
        // Output biases: each layer's mean target (scaled).
        let mut b_dec = vec![0f32; n * d_out];
        for row in first.chunks_exact(width) {
            for (l, &s) in output_scale.iter().enumerate() {
                let y = &row[n * d_in + l * d_out..][..d_out];
                for (b, &v) in b_dec[l * d_out..][..d_out].iter_mut().zip(y) {
                    *b += v * s / rows as f32;
                }
            }
        }

        let mut rng = StdRng::seed_from_u64(config.seed);
        let (mut w_enc_t, mut b_enc, mut w_dec) = (Vec::new(), Vec::new(), Vec::new());
        for l in 0..n {
            let writes = n - l;
            // Decoder rows: random directions of norm 0.1 into the own layer, shorter into
            // later ones so that early training leans on the own layer.
            let mut dec = vec![0f32; f * writes * d_out];
            for (i, row) in dec.chunks_exact_mut(d_out).enumerate() {
                row.iter_mut()
                    .for_each(|v| *v = rng.random::<f32>() * 2.0 - 1.0);
                let norm = cpu::sum_squares(row).sqrt().max(1e-12) as f32;
                let length = 0.1 / (1 + i % writes) as f32;
                row.iter_mut().for_each(|v| *v *= length / norm);
            }
            // Encoder columns: the own-layer decoder rows (where d_in differs from d_out, the
            // first min(d_in, d_out) values, the rest small and random).
            let mut enc = vec![0f32; f * d_in];
            for (feature, column) in enc.chunks_exact_mut(d_in).enumerate() {
                let own = &dec[feature * writes * d_out..][..d_out];
                for (i, v) in column.iter_mut().enumerate() {
                    *v = match own.get(i) {
                        Some(&w) => w,
                        None => (rng.random::<f32>() * 2.0 - 1.0) * 0.1 / (d_in as f32).sqrt(),
                    };
                }
            }
            w_enc_t.push(Param::new(enc));
            b_enc.push(Param::new(vec![0.0; f]));
            w_dec.push(Param::new(dec));
        }
        Ok(Self {
            thresholds: vec![0.0; n],
            since_fired: vec![vec![0; f]; n],
            input_scale,
            output_scale,
            step: 0,
            tokens: 0,
            w_enc_t,
            b_enc,
            w_dec,
            b_dec: Param::new(b_dec),
            config,
        })
    }

    /// Layer `layer`'s scaled inputs `[rows, d_in]` and the scaled targets of every layer
    /// `[n_layers][rows, d_out]` of a batch of rows.
    fn columns(&self, rows: &[f32], layer: usize, output: bool) -> Vec<f32> {
        let c = &self.config;
        let (offset, w, s) = if output {
            let o = c.n_layers * c.d_in + layer * c.d_out;
            (o, c.d_out, self.output_scale[layer])
        } else {
            (layer * c.d_in, c.d_in, self.input_scale[layer])
        };
        rows.chunks_exact(c.row_width())
            .flat_map(|row| row[offset..offset + w].iter().map(move |&v| v * s))
            .collect()
    }

    /// Layer `layer`'s encoder pre-activations (without `b_enc`), `[rows, features]`.
    fn pre_activations(&self, x: &[f32], layer: usize) -> Vec<f32> {
        let c = &self.config;
        let batch = x.len() / c.d_in;
        let mut pre = vec![0f32; batch * c.features];
        cpu::matmul(
            MatRef::new(x, batch, c.d_in),
            MatRef::new(&self.w_enc_t[layer].value, c.features, c.d_in).t(),
            &mut pre,
            false,
        );
        pre
    }

    /// Layer `layer`'s BatchTopK picks for its pre-activations `pre` (`[rows, features]`,
    /// without `b_enc`): the `k · rows` largest of the rows' candidates (each row's `4k`
    /// largest positive values), and the batch threshold, the smallest value picked (∞ if
    /// none is).
    fn batch_top_k(&self, pre: &[f32], layer: usize) -> (cpu::Active, f32) {
        let c = &self.config;
        let rows = pre.len() / c.features;
        let picks = rows * c.k;
        let top = cpu::top_k_rows(
            pre,
            &self.b_enc[layer].value,
            (CANDIDATES_PER_K * c.k).min(c.features),
        );
        let threshold = if top.len() > picks {
            let mut values = top.value.clone();
            let (_, &mut kth, _) = values.select_nth_unstable_by(picks - 1, |a, b| b.total_cmp(a));
            kth
        } else {
            top.value.iter().copied().fold(f32::INFINITY, f32::min)
        };
        let active = cpu::Active::from_rows(
            (0..rows)
                .map(|b| {
                    let (latents, values) = top.row(b);
                    latents
                        .iter()
                        .zip(values)
                        .filter(|&(_, &v)| v >= threshold)
                        .map(|(&j, &v)| (j, v))
                        .collect()
                })
                .collect(),
        );
        (active, threshold)
    }

    /// Sets each layer's JumpReLU threshold, what the saved CLT uses in place of BatchTopK, to
    /// the mean over `batches` of the batch threshold BatchTopK picks with the current weights,
    /// so that about `k` features per layer fire on a token on average.
    pub fn calibrate<'a>(&mut self, batches: impl IntoIterator<Item = &'a [f32]>) {
        let mut sums = ThresholdSums::new(self.config.n_layers);
        for rows in batches {
            self.add_batch_thresholds(rows, &mut sums);
        }
        self.set_thresholds(&sums);
    }

    /// Adds each layer's batch threshold for `rows` to `sums`.
    fn add_batch_thresholds(&self, rows: &[f32], sums: &mut ThresholdSums) {
        for l in 0..self.config.n_layers {
            let x = self.columns(rows, l, false);
            let (_, threshold) = self.batch_top_k(&self.pre_activations(&x, l), l);
            if threshold.is_finite() {
                sums.total[l] += f64::from(threshold);
                sums.count[l] += 1;
            }
        }
    }

    /// Each layer's threshold: the mean of its batch thresholds in `sums` (kept where none).
    fn set_thresholds(&mut self, sums: &ThresholdSums) {
        for (l, threshold) in self.thresholds.iter_mut().enumerate() {
            if sums.count[l] > 0 {
                *threshold = (sums.total[l] / sums.count[l] as f64) as f32;
            }
        }
    }

    /// One Adam step on a batch of rows (unscaled, as the activation source gives them).
    pub fn step(&mut self, rows: &[f32]) -> Result<CltStepMetrics> {
        let Pass { loss, fvu, l0, .. } = self.forward_backward(rows)?;
        let lr = self.config.lr_at(self.step);
        let adam = AdamStep {
            lr: lr as f32,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: self.step + 1,
        };
        for p in self.params_mut() {
            adam.apply(&mut p.value, &p.grad, &mut p.m, &mut p.v);
        }
        self.step += 1;
        self.tokens += (rows.len() / self.config.row_width()) as u64;
        Ok(CltStepMetrics {
            step: self.step,
            tokens: self.tokens,
            loss,
            fvu,
            l0,
            dead_fraction: self.dead_fractions(),
            lr,
        })
    }

    /// The loss of a batch, each layer's FVU, L0 and picks; every parameter's gradient left in
    /// its `grad`. Updates the firing counters.
    fn forward_backward(&mut self, rows: &[f32]) -> Result<Pass> {
        let c = self.config.clone();
        let (n, d_in, d_out, f) = (c.n_layers, c.d_in, c.d_out, c.features);
        let width = c.row_width();
        let batch = rows.len() / width;
        if batch == 0 || !rows.len().is_multiple_of(width) {
            return Err(Error::InvalidArgument {
                what: "cross-layer transcoder batch",
                value: format!("{} values", rows.len()),
                message: format!("needs whole rows of {width} values"),
            });
        }
        // Forward: each layer's picked features and what they write.
        let mut inputs = Vec::with_capacity(n);
        let mut pre_acts = Vec::with_capacity(n);
        let mut picked = Vec::with_capacity(n);
        let mut l0 = Vec::with_capacity(n);
        // ŷ per layer, `[rows, d_out]`, starting from b_dec.
        let mut y_hat: Vec<Vec<f32>> = (0..n)
            .map(|l| self.b_dec.value[l * d_out..][..d_out].repeat(batch))
            .collect();
        for l in 0..n {
            let x = self.columns(rows, l, false);
            let pre = self.pre_activations(&x, l);
            let (active, _) = self.batch_top_k(&pre, l);
            l0.push(active.len() as f64 / batch as f64);
            let mut fired = vec![false; f];
            for &j in &active.latent {
                fired[j as usize] = true;
            }
            for (since, fired) in self.since_fired[l].iter_mut().zip(fired) {
                *since = if fired {
                    0
                } else {
                    since.saturating_add(batch as u64)
                };
            }
            let writes = (n - l) * d_out;
            let mut out = vec![0f32; batch * writes];
            cpu::sparse_decode(&active, &self.w_dec[l].value, None, &mut out);
            for (b, row) in out.chunks_exact(writes).enumerate() {
                for (j, part) in row.chunks_exact(d_out).enumerate() {
                    let target = &mut y_hat[l + j][b * d_out..][..d_out];
                    target.iter_mut().zip(part).for_each(|(t, &p)| *t += p);
                }
            }
            inputs.push(x);
            pre_acts.push(pre);
            picked.push(active);
        }

        // Loss Σ‖ŷ − y‖² / B; its gradient 2(ŷ − y)/B per layer, then side by side per
        // source layer (what its decoder rows write).
        let mut errors = Vec::with_capacity(n);
        let mut fvu = Vec::with_capacity(n);
        let mut loss = 0f64;
        for (l, y_hat) in y_hat.into_iter().enumerate() {
            let y = self.columns(rows, l, true);
            let e: Vec<f32> = y_hat.iter().zip(&y).map(|(a, b)| a - b).collect();
            let sq = cpu::sum_squares(&e);
            loss += sq / batch as f64;
            fvu.push(sq / cpu::total_variance(&y, d_out).max(f64::MIN_POSITIVE));
            errors.push(e);
        }
        let side_by_side = |from: usize, scale: f32, errors: &[Vec<f32>]| -> Vec<f32> {
            let writes = (n - from) * d_out;
            let mut g = vec![0f32; batch * writes];
            for (b, row) in g.chunks_exact_mut(writes).enumerate() {
                for (j, part) in row.chunks_exact_mut(d_out).enumerate() {
                    let e = &errors[from + j][b * d_out..][..d_out];
                    part.iter_mut().zip(e).for_each(|(g, &e)| *g = scale * e);
                }
            }
            g
        };
        for p in self.params_mut() {
            p.grad.fill(0.0);
        }
        let g_scale = 2.0 / batch as f32;
        for l in 0..n {
            let writes = (n - l) * d_out;
            let g_out = side_by_side(l, g_scale, &errors);
            let active = &picked[l];
            // The picked values are above a positive threshold: d(value)/d(pre) = 1.
            let g_pre = cpu::pair_dots(active, &g_out, &self.w_dec[l].value, writes, Nesting::NONE);
            let by_latent = active.by_latent(f);
            cpu::accumulate_latent_grads(
                active,
                &by_latent,
                &g_out,
                Nesting::NONE,
                &g_pre,
                &inputs[l],
                d_in,
                writes,
                &mut self.w_dec[l].grad,
                &mut self.w_enc_t[l].grad,
                &mut self.b_enc[l].grad,
            );
        }
        for (e, g) in errors.iter().zip(self.b_dec.grad.chunks_exact_mut(d_out)) {
            for row in e.chunks_exact(d_out) {
                g.iter_mut().zip(row).for_each(|(g, &v)| *g += g_scale * v);
            }
        }

        // AuxK: each layer's dead features, on their largest pre-activations, explain the
        // error left in the layers they write (held fixed).
        let mut aux_picked = Vec::new();
        if c.aux_k > 0 && c.aux_coefficient > 0.0 {
            for l in 0..n {
                let dead: Vec<bool> = self.since_fired[l]
                    .iter()
                    .map(|&s| s >= c.dead_after_tokens)
                    .collect();
                let n_dead = dead.iter().filter(|&&d| d).count();
                if n_dead == 0 {
                    continue;
                }
                let writes = (n - l) * d_out;
                let active = cpu::top_k_rows_where(
                    &pre_acts[l],
                    &self.b_enc[l].value,
                    c.aux_k.min(n_dead),
                    |j| dead[j],
                );
                if active.is_empty() {
                    continue;
                }
                let mut e_aux = side_by_side(l, 1.0, &errors);
                let mut decoded = vec![0f32; batch * writes];
                cpu::sparse_decode(&active, &self.w_dec[l].value, None, &mut decoded);
                e_aux.iter_mut().zip(&decoded).for_each(|(e, &d)| *e += d);
                let weight = (n_dead as f32 / c.aux_k as f32).min(1.0) * c.aux_coefficient;
                loss += f64::from(weight) * cpu::sum_squares(&e_aux) / batch as f64;
                let g_scale = 2.0 * weight / batch as f32;
                e_aux.iter_mut().for_each(|e| *e *= g_scale);
                let g_pre =
                    cpu::pair_dots(&active, &e_aux, &self.w_dec[l].value, writes, Nesting::NONE);
                let by_latent = active.by_latent(f);
                cpu::accumulate_latent_grads(
                    &active,
                    &by_latent,
                    &e_aux,
                    Nesting::NONE,
                    &g_pre,
                    &inputs[l],
                    d_in,
                    writes,
                    &mut self.w_dec[l].grad,
                    &mut self.w_enc_t[l].grad,
                    &mut self.b_enc[l].grad,
                );
                aux_picked.push(active);
            }
        }
        picked.extend(aux_picked);

        Ok(Pass {
            loss,
            fvu,
            l0,
            picked,
        })
    }

    fn params(&self) -> impl Iterator<Item = &Param> {
        self.w_enc_t
            .iter()
            .chain(self.b_enc.iter())
            .chain(self.w_dec.iter())
            .chain(std::iter::once(&self.b_dec))
    }

    /// The state a checkpoint keeps: every parameter with its Adam moments, the features'
    /// firing counters and the scales (steps and tokens go in the checkpoint's JSON).
    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let cpu = Device::Cpu;
        let mut out = HashMap::new();
        for ((name, _), p) in param_names(&self.config).into_iter().zip(self.params()) {
            for (part, values) in [("value", &p.value), ("m", &p.m), ("v", &p.v)] {
                let t = Tensor::from_slice(values, values.len(), &cpu)?;
                out.insert(format!("{name}.{part}"), t);
            }
        }
        for (l, since) in self.since_fired.iter().enumerate() {
            // Token counts: far below i64::MAX.
            let counts: Vec<i64> = since.iter().map(|&t| t as i64).collect();
            out.insert(format!("since_fired.{l}"), Tensor::new(counts, &cpu)?);
        }
        out.insert(
            "input_scale".into(),
            Tensor::new(&self.input_scale[..], &cpu)?,
        );
        out.insert(
            "output_scale".into(),
            Tensor::new(&self.output_scale[..], &cpu)?,
        );
        Ok(out)
    }

    /// A trainer from [`Self::state_tensors`]' tensors (read from `path`) after `step` steps
    /// and `tokens` tokens; a missing or mis-shaped tensor is refused by name.
    fn from_state(
        config: CltConfig,
        (step, tokens): (u64, u64),
        tensors: &HashMap<String, Tensor>,
        path: &Path,
    ) -> Result<Self> {
        let floats = |key: &str, len: usize| -> Result<Vec<f32>> {
            Ok(checkpoint::vector(tensors, key, len, path)?.to_vec1::<f32>()?)
        };
        let mut params = Vec::new();
        for (name, len) in param_names(&config) {
            params.push(Param {
                value: floats(&format!("{name}.value"), len)?,
                grad: vec![0.0; len],
                m: floats(&format!("{name}.m"), len)?,
                v: floats(&format!("{name}.v"), len)?,
            });
        }
        let (n, f) = (config.n_layers, config.features);
        let mut params = params.into_iter();
        let w_enc_t: Vec<Param> = params.by_ref().take(n).collect();
        let b_enc: Vec<Param> = params.by_ref().take(n).collect();
        let w_dec: Vec<Param> = params.by_ref().take(n).collect();
        let b_dec = params.next().ok_or_else(|| Error::MissingTensor {
            dir: path.to_path_buf(),
            key: "b_dec.value".into(),
        })?;
        let since_fired = (0..n)
            .map(|l| checkpoint::counts(tensors, &format!("since_fired.{l}"), f, path))
            .collect::<Result<Vec<Vec<u64>>>>()?;
        Ok(Self {
            thresholds: vec![0.0; n],
            since_fired,
            input_scale: floats("input_scale", n)?,
            output_scale: floats("output_scale", n)?,
            step,
            tokens,
            w_enc_t,
            b_enc,
            w_dec,
            b_dec,
            config,
        })
    }

    fn params_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.w_enc_t
            .iter_mut()
            .chain(self.b_enc.iter_mut())
            .chain(self.w_dec.iter_mut())
            .chain(std::iter::once(&mut self.b_dec))
    }

    /// Fraction of each layer's features that have not fired for `dead_after_tokens` tokens
    /// (none before that many tokens have been seen).
    pub fn dead_fractions(&self) -> Vec<f64> {
        self.since_fired
            .iter()
            .map(|since| {
                let dead = since
                    .iter()
                    .filter(|&&s| s >= self.config.dead_after_tokens)
                    .count();
                dead as f64 / since.len().max(1) as f64
            })
            .collect()
    }

    /// [`Self::calibrate`] on the next [`CALIBRATION_BATCHES`] batches of `buffer`.
    fn calibrate_on(
        &mut self,
        buffer: &mut MixingBuffer,
        source: &mut dyn ChunkSource,
    ) -> Result<()> {
        let batch = self.config.batch_size;
        let mut sums = ThresholdSums::new(self.config.n_layers);
        for _ in 0..CALIBRATION_BATCHES {
            self.add_batch_thresholds(buffer.next_batch(source, batch)?, &mut sums);
        }
        self.set_thresholds(&sums);
        Ok(())
    }

    /// The trained CLT in circuit-tracer's tensors, scales folded in: per layer, the encoder
    /// file's and the decoder file's tensors.
    pub fn tensors(&self, dtype: DType) -> Result<Vec<LayerFiles>> {
        let c = &self.config;
        let (n, d_in, d_out, f) = (c.n_layers, c.d_in, c.d_out, c.features);
        let cpu = Device::Cpu;
        let mut layers = Vec::with_capacity(n);
        for l in 0..n {
            let writes = n - l;
            // pre = (s·x)·W + b: the saved encoder reads x, so W·s.
            let s_in = self.input_scale[l];
            let w_enc: Vec<f32> = self.w_enc_t[l].value.iter().map(|&v| v * s_in).collect();
            // ŷ = (a·W_dec + b)/s_out for each layer written.
            let mut w_dec = self.w_dec[l].value.clone();
            for row in w_dec.chunks_exact_mut(writes * d_out) {
                for (j, part) in row.chunks_exact_mut(d_out).enumerate() {
                    let s = self.output_scale[l + j];
                    part.iter_mut().for_each(|v| *v /= s);
                }
            }
            let s_out = self.output_scale[l];
            let b_dec: Vec<f32> = self.b_dec.value[l * d_out..][..d_out]
                .iter()
                .map(|&v| v / s_out)
                .collect();
            let tensor = |values: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
                Ok(Tensor::from_vec(values, shape, &cpu)?.to_dtype(dtype)?)
            };
            let encoder = HashMap::from([
                (format!("W_enc_{l}"), tensor(w_enc, &[f, d_in])?),
                (
                    format!("b_enc_{l}"),
                    tensor(self.b_enc[l].value.clone(), &[f])?,
                ),
                (format!("b_dec_{l}"), tensor(b_dec, &[d_out])?),
                (
                    format!("threshold_{l}"),
                    tensor(vec![self.thresholds[l]; f], &[f])?,
                ),
            ]);
            let decoder =
                HashMap::from([(format!("W_dec_{l}"), tensor(w_dec, &[f, writes, d_out])?)]);
            layers.push((encoder, decoder));
        }
        Ok(layers)
    }

    /// Writes the CLT into `dir` (created; it must not exist, or be an empty folder) in
    /// circuit-tracer's format, with `extra` files (name, contents) beside it, through a
    /// temporary sibling folder renamed when complete (and removed if anything fails).
    pub fn save(
        &self,
        dir: &Path,
        dtype: DType,
        hooks: (&str, &str),
        extra: &[(&str, Vec<u8>)],
    ) -> Result<()> {
        let staging = check_output_folder(dir)?;
        self.finish_in(&staging, dir, dtype, hooks, extra)
    }

    /// [`Self::save`] for a checkpointed run whose folder is `staging` (the one
    /// [`check_output_folder`] names; created if no checkpoint was written): the CLT is written
    /// into it, it is renamed to `dir`, and then its checkpoint removed. If anything fails
    /// before the rename, a staging folder with a checkpoint is kept (a rerun with `--resume`
    /// finishes it), one without is removed.
    pub fn finish_in(
        &self,
        staging: &Path,
        dir: &Path,
        dtype: DType,
        hooks: (&str, &str),
        extra: &[(&str, Vec<u8>)],
    ) -> Result<()> {
        // A checkpoint in the staging folder outlives a failed save: `--resume` finishes it.
        let checkpointed = staging.join("training").exists();
        let written = std::fs::create_dir_all(staging)
            .map_err(|e| Error::io(staging, e))
            .and_then(|()| self.write_into(staging, dtype, hooks, extra))
            .and_then(|()| {
                if dir.is_dir() {
                    std::fs::remove_dir(dir).map_err(|e| Error::io(dir, e))?;
                }
                std::fs::rename(staging, dir).map_err(|e| Error::io(dir, e))
            });
        if written.is_err() {
            if !checkpointed {
                let _ = std::fs::remove_dir_all(staging);
            }
            return written;
        }
        // Only now, with the CLT in place, is the checkpoint no longer needed.
        let training = dir.join("training");
        if checkpointed {
            std::fs::remove_dir_all(&training).map_err(|e| Error::io(&training, e))?;
        }
        Ok(())
    }

    /// The files of [`Self::save`], written into `staging`.
    fn write_into(
        &self,
        staging: &Path,
        dtype: DType,
        (input_hook, output_hook): (&str, &str),
        extra: &[(&str, Vec<u8>)],
    ) -> Result<()> {
        for (l, (encoder, decoder)) in self.tensors(dtype)?.into_iter().enumerate() {
            crate::files::write_safetensors(&encoder, &staging.join(encoder_file(l)))?;
            crate::files::write_safetensors(&decoder, &staging.join(decoder_file(l)))?;
        }
        let c = &self.config;
        let config = format!(
            "# A cross-layer transcoder written by monoscope `clt train` ({} features per \
             layer, BatchTopK k {} turned into JumpReLU thresholds, {} tokens).\n\
             model_kind: cross_layer_transcoder\n\
             feature_input_hook: \"{input_hook}\"\n\
             feature_output_hook: \"{output_hook}\"\n",
            c.features, c.k, self.tokens
        );
        let files = std::iter::once((CONFIG_FILE, config.into_bytes()))
            .chain(extra.iter().map(|(name, bytes)| (*name, bytes.clone())));
        for (name, bytes) in files {
            let path = staging.join(name);
            std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Features firing per token in each layer for `rows` (unscaled), through JumpReLUs at
    /// the calibrated thresholds: the saved CLT's L0.
    pub fn firing(&self, rows: &[f32]) -> Vec<f64> {
        let batch = (rows.len() / self.config.row_width()).max(1);
        (0..self.config.n_layers)
            .map(|l| {
                let x = self.columns(rows, l, false);
                let threshold = self.thresholds[l];
                let pre = self.pre_activations(&x, l);
                let active = cpu::select_rows(&pre, &self.b_enc[l].value, |_, v| v > threshold);
                active.len() as f64 / batch as f64
            })
            .collect()
    }

    /// Layer `layer`'s MLP-output prediction `[rows, d_out]` for `rows` (unscaled, as
    /// [`Self::step`] takes them) through JumpReLUs at the running thresholds: what the saved
    /// folder computes, worked out in the training units.
    pub fn predict(&self, rows: &[f32], layer: usize) -> Vec<f32> {
        let c = &self.config;
        let (n, d_out) = (c.n_layers, c.d_out);
        let batch = rows.len() / c.row_width();
        let mut sum = self.b_dec.value[layer * d_out..][..d_out].repeat(batch);
        for l in 0..=layer {
            let x = self.columns(rows, l, false);
            let threshold = self.thresholds[l];
            let active = cpu::select_rows(
                &self.pre_activations(&x, l),
                &self.b_enc[l].value,
                |_, v| v > threshold,
            );
            let writes = (n - l) * d_out;
            let mut out = vec![0f32; batch * writes];
            cpu::sparse_decode(&active, &self.w_dec[l].value, None, &mut out);
            for (s, row) in sum.chunks_exact_mut(d_out).zip(out.chunks_exact(writes)) {
                let part = &row[(layer - l) * d_out..][..d_out];
                s.iter_mut().zip(part).for_each(|(s, &p)| *s += p);
            }
        }
        let s_out = self.output_scale[layer];
        sum.iter_mut().for_each(|v| *v /= s_out);
        sum
    }
}

/// The trainer's parameters in [`CltTrainer::params`]' order, with their lengths: every
/// layer's encoder, every layer's encoder bias, every layer's decoder, the output biases.
fn param_names(c: &CltConfig) -> Vec<(String, usize)> {
    let (n, d_in, d_out, f) = (c.n_layers, c.d_in, c.d_out, c.features);
    let layers = |name: &str, len: &dyn Fn(usize) -> usize| -> Vec<(String, usize)> {
        (0..n).map(|l| (format!("{name}.{l}"), len(l))).collect()
    };
    let mut names = layers("w_enc_t", &|_| f * d_in);
    names.extend(layers("b_enc", &|_| f));
    names.extend(layers("w_dec", &|l| f * (n - l) * d_out));
    names.push(("b_dec".into(), n * d_out));
    names
}

/// Where a checkpointed run keeps its state, and when it writes it.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    /// The run's folder: checkpoints go in its `training/checkpoint/`.
    pub dir: std::path::PathBuf,
    /// Tokens between checkpoints (0: only when stopped).
    pub every_tokens: u64,
    /// Continue the checkpoint in `dir` instead of starting afresh.
    pub resume: bool,
    /// What a resumed run must match besides its settings: the model, corpus and hooks.
    pub identity: String,
}

impl Checkpoints {
    fn training(&self) -> std::path::PathBuf {
        self.dir.join("training")
    }

    /// The folder of the latest checkpoint.
    pub fn checkpoint_dir(&self) -> std::path::PathBuf {
        self.training().join("checkpoint")
    }

    /// [`Checkpoints::identity`] of a run of `model` over `source`'s corpus and windows, from
    /// `hooks` (input and output names), with a mixing buffer of `buffer_rows`, worded the same
    /// by the command line and the window. (A run started in one continues in the other only
    /// with the same settings too, and the window's defaults differ from the command's.)
    pub fn identity_of(
        model: &crate::model::Model,
        source: &super::activations::ActivationSource<'_>,
        (input, output): (&str, &str),
        buffer_rows: usize,
    ) -> String {
        format!(
            "model {} ({}), corpus {} in {:?}, hooks {input} → {output}, {buffer_rows} buffer rows",
            model.dir.display(),
            model.model_type,
            source.corpus().describe(),
            source.settings,
        )
    }
}

/// A checkpoint's JSON: everything besides the tensors.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    config: CltConfig,
    identity: String,
    step: u64,
    tokens: u64,
    chunks_read: u64,
    buffer_refills: u64,
    buffer_used: usize,
    /// The metrics logged so far (see [`train_checkpointed`]).
    log: Vec<CltStepMetrics>,
}

/// Writes a checkpoint of `trainer`, the mixing buffer and the stream position.
fn save_checkpoint(
    checkpoints: &Checkpoints,
    trainer: &CltTrainer,
    buffer: &MixingBuffer,
    source: &dyn ChunkSource,
    log: &[CltStepMetrics],
) -> Result<()> {
    let (_, used, refills) = buffer.state();
    let state = CheckpointState {
        config: trainer.config.clone(),
        identity: checkpoints.identity.clone(),
        step: trainer.step,
        tokens: trainer.tokens,
        chunks_read: source.chunks_read(),
        buffer_refills: refills,
        buffer_used: used,
        log: log.to_vec(),
    };
    checkpoint::swap_in_checkpoint(&checkpoints.training(), |new| {
        crate::files::write_safetensors(&trainer.state_tensors()?, &new.join(TRAINER_FILE))?;
        checkpoint::save_buffer(new, buffer)?;
        crate::files::write_json(&new.join(STATE_JSON), &state)
    })
}

/// The trainer and metrics log of the checkpoint in `checkpoints.dir`, with `buffer` and
/// `source` put back where they were; refused unless it was made with `config` and the same
/// identity.
fn restore_checkpoint(
    checkpoints: &Checkpoints,
    config: &CltConfig,
    buffer: &mut MixingBuffer,
    source: &mut dyn ChunkSource,
) -> Result<(CltTrainer, Vec<CltStepMetrics>)> {
    let dir = checkpoint::checkpoint_to_resume(&checkpoints.training())?;
    let state: CheckpointState = crate::files::read_json(&dir.join(STATE_JSON))?;
    let mismatch = |message: String| Error::InvalidArgument {
        what: "resume",
        value: dir.display().to_string(),
        message,
    };
    if &state.config != config {
        return Err(mismatch(format!(
            "the checkpoint was made with other settings ({}); resume with the same ones",
            checkpoint::setting_differences(&state.config, config).join(", ")
        )));
    }
    if state.identity != checkpoints.identity {
        return Err(mismatch(format!(
            "the checkpoint is of another run ({}), not {}",
            state.identity, checkpoints.identity
        )));
    }
    let path = dir.join(TRAINER_FILE);
    let tensors = checkpoint::load_tensors(&path)?;
    let trainer =
        CltTrainer::from_state(config.clone(), (state.step, state.tokens), &tensors, &path)?;
    checkpoint::restore_buffer(&dir, buffer, state.buffer_used, state.buffer_refills)?;
    source.skip_to(state.chunks_read)?;
    Ok((trainer, state.log))
}

/// Refuses an output folder a CLT cannot be saved into — empty, a file, a folder that is not
/// empty, `.` or `..`, or one beside a leftover staging folder — before any training, and again
/// when saving. Returns the staging folder [`CltTrainer::save`] writes into.
pub fn check_output_folder(dir: &Path) -> Result<std::path::PathBuf> {
    let staging = free_output_folder(dir)?;
    if staging.exists() {
        let what = if staging.join("training").exists() {
            "an interrupted run's checkpoint: pass --resume to continue it (in the window: \"continue the stopped run\"), or remove it"
        } else {
            "a leftover; remove it first"
        };
        return Err(Error::InvalidArgument {
            what: "cross-layer transcoder folder",
            value: dir.display().to_string(),
            message: format!("has {} beside it, {what}", staging.display()),
        });
    }
    Ok(staging)
}

/// [`check_output_folder`] for a run that continues the checkpoint in the staging folder:
/// `dir` must still be free; the staging folder is returned (resuming finds the checkpoint in
/// it, or says where it is missing).
pub fn resumed_output_folder(dir: &Path) -> Result<std::path::PathBuf> {
    free_output_folder(dir)
}

/// Refuses `dir` unless a CLT can be written there; returns its staging folder's path.
fn free_output_folder(dir: &Path) -> Result<std::path::PathBuf> {
    crate::files::require_output_path("cross-layer transcoder folder", dir)?;
    let refuse = |message: String| Error::InvalidArgument {
        what: "cross-layer transcoder folder",
        value: dir.display().to_string(),
        message,
    };
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if not_empty || dir.is_file() {
        return Err(refuse(
            "already exists and is not empty; choose a new folder".into(),
        ));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| refuse("names no folder of its own; give a new folder's name".into()))?;
    Ok(dir.with_file_name(format!(".{name}.partial")))
}

/// The rows a CLT trains on: every layer's `inputs[l]`, then every layer's `outputs[l]`, at the
/// same positions of `corpus`'s windows.
pub fn activation_source<'m>(
    model: &'m crate::model::Model,
    corpus: super::activations::Corpus,
    settings: super::activations::WindowSettings,
    inputs: &[crate::model::HookPoint],
    outputs: &[crate::model::HookPoint],
) -> Result<super::activations::ActivationSource<'m>> {
    let (first, rest) = inputs.split_first().ok_or_else(|| Error::InvalidArgument {
        what: "cross-layer transcoder hooks",
        value: "none".into(),
        message: "needs one input hook per layer".into(),
    })?;
    let columns: Vec<_> = rest.iter().chain(outputs).copied().collect();
    super::activations::ActivationSource::new(model, corpus, &first.to_string(), settings)?
        .with_columns(&columns)
}

/// Trains `config` on rows from `source` (each layer's input, then each layer's target, as
/// [`super::activations::ActivationSource::with_columns`] reads them), shuffled through a
/// mixing buffer of `buffer_rows` rows; `on_step` after every step. Returns the trainer and
/// whether it ran every step (`false`: `cancel` was set, and the trainer holds what was learnt
/// so far, ready to save).
pub fn train(
    source: &mut dyn ChunkSource,
    config: CltConfig,
    buffer_rows: usize,
    cancel: &AtomicBool,
    on_step: impl FnMut(&CltStepMetrics),
) -> Result<(CltTrainer, bool)> {
    let run = train_run(source, config, buffer_rows, cancel, None, on_step)?;
    Ok((run.trainer, run.finished))
}

/// A training run's result.
pub struct TrainedClt {
    /// Calibrated, ready to save (except a cancelled checkpointed run's: it is resumed).
    pub trainer: CltTrainer,
    /// Whether every step ran (`false`: cancelled).
    pub finished: bool,
    /// Every [`LOG_EVERY_STEPS`]th step's metrics, and the last step's, resumed runs'
    /// included.
    pub log: Vec<CltStepMetrics>,
}

impl TrainedClt {
    /// The log as JSON lines, one step a line: the folder's `training-metrics.jsonl`.
    pub fn log_lines(&self) -> Vec<u8> {
        let lines = self
            .log
            .iter()
            .filter_map(|m| serde_json::to_string(m).ok());
        lines
            .map(|line| line + "\n")
            .collect::<String>()
            .into_bytes()
    }
}

/// Steps between logged metrics.
pub const LOG_EVERY_STEPS: u64 = 10;

/// [`train`] with checkpoints in `checkpoints.dir` (every `every_tokens` tokens, when
/// cancelled, and at the end), or continuing the one there: a resumed run reaches the weights an
/// uninterrupted one does.
pub fn train_checkpointed(
    source: &mut dyn ChunkSource,
    config: CltConfig,
    buffer_rows: usize,
    cancel: &AtomicBool,
    checkpoints: &Checkpoints,
    on_step: impl FnMut(&CltStepMetrics),
) -> Result<TrainedClt> {
    train_run(
        source,
        config,
        buffer_rows,
        cancel,
        Some(checkpoints),
        on_step,
    )
}

fn train_run(
    source: &mut dyn ChunkSource,
    config: CltConfig,
    buffer_rows: usize,
    cancel: &AtomicBool,
    checkpoints: Option<&Checkpoints>,
    mut on_step: impl FnMut(&CltStepMetrics),
) -> Result<TrainedClt> {
    config.validate()?;
    let width = config.row_width();
    if source.d_in() != width {
        return Err(Error::InvalidArgument {
            what: "cross-layer transcoder rows",
            value: format!("{} values wide", source.d_in()),
            message: format!(
                "{} layers of {} inputs and {} outputs need rows of {width}",
                config.n_layers, config.d_in, config.d_out
            ),
        });
    }
    let batch = config.batch_size;
    let mut buffer = MixingBuffer::new(width, buffer_rows.max(2 * batch), config.seed);
    let (mut trainer, mut log) = match checkpoints.filter(|c| c.resume) {
        Some(c) => restore_checkpoint(c, &config, &mut buffer, source)?,
        None => {
            buffer.fill(source)?;
            let unread = buffer.unread();
            let first = unread[..unread.len().min(batch * width)].to_vec();
            (CltTrainer::new(config, &first)?, Vec::new())
        }
    };
    let total = trainer.config.total_steps;
    let every = checkpoints.map_or(0, |c| c.every_tokens);
    let mut next_checkpoint = super::run::next_multiple(trainer.tokens, every);
    while trainer.step < total {
        if cancel.load(Ordering::Relaxed) {
            // A checkpointed run is continued, not saved: no thresholds to set.
            match checkpoints {
                Some(c) => save_checkpoint(c, &trainer, &buffer, source, &log)?,
                None => trainer.calibrate_on(&mut buffer, source)?,
            }
            return Ok(TrainedClt {
                trainer,
                finished: false,
                log,
            });
        }
        let rows = buffer.next_batch(source, batch)?;
        let metrics = trainer.step(rows)?;
        if !metrics.loss.is_finite() {
            return Err(Error::NonFinite {
                what: "the cross-layer transcoder's training loss".into(),
                at: format!("step {} (try a lower learning rate)", metrics.step),
            });
        }
        // The last logged entry is always the latest step: replace an unlogged one.
        if log.last().is_some_and(|m| m.step % LOG_EVERY_STEPS != 0) {
            log.pop();
        }
        log.push(metrics.clone());
        on_step(&metrics);
        if let Some(c) = checkpoints
            && every > 0
            && trainer.tokens >= next_checkpoint
            && trainer.step < total
        {
            save_checkpoint(c, &trainer, &buffer, source, &log)?;
            next_checkpoint = super::run::next_multiple(trainer.tokens, every);
        }
    }
    // The last checkpoint: should saving fail, `--resume` saves without training again.
    if let Some(c) = checkpoints {
        save_checkpoint(c, &trainer, &buffer, source, &log)?;
    }
    trainer.calibrate_on(&mut buffer, source)?;
    Ok(TrainedClt {
        trainer,
        finished: true,
        log,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Rows of a toy two-layer problem with sparse structure: each token draws a few of 24
    /// "concepts", each with a fixed input direction per layer and a fixed output per layer.
    fn toy_rows(config: &CltConfig, rows: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(99);
        let concepts = 24;
        let (n, d_in, d_out) = (config.n_layers, config.d_in, config.d_out);
        let random = |rng: &mut StdRng, len: usize| -> Vec<f32> {
            (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
        };
        let inputs: Vec<Vec<f32>> = (0..concepts).map(|_| random(&mut rng, n * d_in)).collect();
        let outputs: Vec<Vec<f32>> = (0..concepts).map(|_| random(&mut rng, n * d_out)).collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = vec![0f32; rows * config.row_width()];
        for row in data.chunks_exact_mut(config.row_width()) {
            for _ in 0..3 {
                let c = rng.random_range(0..concepts);
                let a = 0.5 + rng.random::<f32>();
                // Each layer at its own scale, so that a scale folded into the wrong layer shows.
                for (i, (v, &u)) in row[..n * d_in].iter_mut().zip(&inputs[c]).enumerate() {
                    *v += a * u * (1 + i / d_in) as f32 * 3.0;
                }
                for (i, (v, &u)) in row[n * d_in..].iter_mut().zip(&outputs[c]).enumerate() {
                    *v += a * u / (1 + i / d_out) as f32 * 0.2;
                }
            }
        }
        data
    }

    /// A trainer for `config` after `steps` steps on batches of `rows` toy rows.
    fn stepped(config: &CltConfig, rows: usize, steps: u64) -> CltTrainer {
        let mut trainer = CltTrainer::new(config.clone(), &toy_rows(config, rows, 1)).unwrap();
        for step in 0..steps {
            trainer.step(&toy_rows(config, rows, 2 + step)).unwrap();
        }
        trainer
    }

    #[test]
    fn training_explains_the_targets_and_keeps_about_k_features_per_layer() {
        let mut config = CltConfig::new(2, 12, 10, 64, 4);
        config.batch_size = 256;
        config.total_steps = 600;
        config.decay_steps = 200;
        config.lr = 1e-2;
        let first = toy_rows(&config, 256, 1);
        let mut trainer = CltTrainer::new(config.clone(), &first).unwrap();
        let mut metrics = Vec::new();
        for step in 0..config.total_steps {
            metrics.push(trainer.step(&toy_rows(&config, 256, 10 + step)).unwrap());
        }
        let (start, end) = (&metrics[0], metrics.last().unwrap());
        for l in 0..2 {
            assert!(
                end.fvu[l] < 0.2 && end.fvu[l] < start.fvu[l] / 3.0,
                "{start:?} {end:?}"
            );
            assert!((end.l0[l] - 4.0).abs() < 0.5, "{end:?}");
        }
        // Calibrated on held-out rows, the JumpReLUs fire about k features a token.
        trainer.calibrate([toy_rows(&config, 256, 5000).as_slice()]);
        for (l, l0) in trainer
            .firing(&toy_rows(&config, 256, 6000))
            .iter()
            .enumerate()
        {
            assert!((3.0..=5.0).contains(l0), "layer {l}: {l0}");
        }
    }

    /// The saved tensors, read back, compute what the trainer predicts: the scales are folded
    /// in exactly and the thresholds are those of [`CltTrainer::predict`].
    #[test]
    fn the_saved_tensors_predict_what_the_trainer_predicts() {
        let mut config = CltConfig::new(3, 6, 5, 16, 2);
        config.batch_size = 64;
        let mut trainer = stepped(&config, 64, 20);
        let rows = toy_rows(&config, 32, 777);
        trainer.calibrate([toy_rows(&config, 64, 778).as_slice()]);
        assert!(trainer.thresholds.iter().all(|&t| t > 0.0));
        let layers = trainer.tensors(DType::F32).unwrap();
        let data = Tensor::from_slice(&rows, (32, config.row_width()), &Device::Cpu).unwrap();
        for target in 0..3 {
            let mut sum = layers[target].0[&format!("b_dec_{target}")]
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((32, 5))
                .unwrap()
                .contiguous()
                .unwrap();
            for (l, (encoder, decoder)) in layers.iter().enumerate().take(target + 1) {
                let x = data.narrow(1, l * 6, 6).unwrap();
                let pre = x
                    .matmul(&encoder[&format!("W_enc_{l}")].t().unwrap())
                    .unwrap()
                    .broadcast_add(&encoder[&format!("b_enc_{l}")])
                    .unwrap();
                let threshold = encoder[&format!("threshold_{l}")].unsqueeze(0).unwrap();
                let acts = (&pre
                    * pre
                        .broadcast_gt(&threshold)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap())
                .unwrap();
                let w = decoder[&format!("W_dec_{l}")]
                    .narrow(1, target - l, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap();
                sum = (sum + acts.matmul(&w).unwrap()).unwrap();
            }
            let expected =
                Tensor::from_vec(trainer.predict(&rows, target), (32, 5), &Device::Cpu).unwrap();
            let gap = (sum - &expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let size = expected
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                gap <= 1e-5 * size.max(1.0),
                "layer {target}: {gap} of {size}"
            );
            assert!(size > 0.0);
        }
    }

    /// The entries of parameter `which` (0 `W_enc`, 1 `b_enc`, 2 `W_dec`, 3 `b_dec`) of layer
    /// `layer`.
    fn param(t: &mut CltTrainer, which: usize, layer: usize) -> &mut Param {
        match which {
            0 => &mut t.w_enc_t[layer],
            1 => &mut t.b_enc[layer],
            2 => &mut t.w_dec[layer],
            _ => &mut t.b_dec,
        }
    }

    /// Central differences of the loss of `rows` against the hand-written gradient, at the
    /// `take` entries of each parameter kind and layer with the largest gradients among those
    /// `eligible`, except where the step moves a pick (a kink of the loss). Returns how many
    /// entries of each kind were checked.
    fn check_gradients(
        trainer: &CltTrainer,
        rows: &[f32],
        take: usize,
        eligible: impl Fn(usize, usize, usize) -> bool,
    ) -> [usize; 4] {
        let mut at = trainer.clone();
        let base = at.forward_backward(rows).unwrap().picked;
        let mut checked = [0; 4];
        for layer in 0..trainer.config.n_layers {
            for (which, checked) in checked.iter_mut().enumerate() {
                let grad = param(&mut at, which, layer).grad.clone();
                let mut order: Vec<usize> = (0..grad.len())
                    .filter(|&i| grad[i] != 0.0 && eligible(which, layer, i))
                    .collect();
                order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
                for &i in order.iter().take(take) {
                    let h = 1e-3;
                    let pass = |delta: f32| {
                        let mut t = trainer.clone();
                        param(&mut t, which, layer).value[i] += delta;
                        t.forward_backward(rows).unwrap()
                    };
                    let (up, down) = (pass(h), pass(-h));
                    let same = |p: &[cpu::Active]| {
                        p.len() == base.len()
                            && p.iter()
                                .zip(&base)
                                .all(|(a, b)| a.latent == b.latent && a.row_start == b.row_start)
                    };
                    if !same(&up.picked) || !same(&down.picked) {
                        continue; // a pick changed: the loss has a kink there
                    }
                    let numeric = (up.loss - down.loss) / (2.0 * f64::from(h));
                    let analytic = f64::from(grad[i]);
                    assert!(
                        (numeric - analytic).abs() <= 0.02 * analytic.abs().max(1e-2),
                        "parameter {which} layer {layer} entry {i}: {numeric} vs {analytic}"
                    );
                    *checked += 1;
                }
            }
        }
        checked
    }

    /// The hand-written gradients against central differences of the loss: the reconstruction
    /// term for entries of every parameter kind in every layer; AuxK (every feature the batch
    /// does not pick counted dead) for the features only AuxK picks, whose parameters the
    /// reconstruction does not see (AuxK holds the error it explains fixed, which a difference
    /// of losses cannot).
    #[test]
    fn gradients_match_finite_differences() {
        let mut config = CltConfig::new(3, 6, 5, 16, 3);
        config.aux_k = 0;
        let trainer = stepped(&config, 48, 5);
        let rows = toy_rows(&config, 48, 99);
        let checked = check_gradients(&trainer, &rows, 6, |_, _, _| true);
        assert!(checked.iter().all(|&n| n >= 6), "{checked:?}");

        // A wider dictionary, so that a batch leaves features unpicked.
        let mut config = CltConfig::new(3, 6, 5, 96, 2);
        config.aux_k = 0;
        let mut trainer = stepped(&config, 48, 5);
        let mut main = trainer.clone();
        main.forward_backward(&rows).unwrap();
        trainer.config.aux_k = 4;
        trainer.config.aux_coefficient = 0.5;
        // Every feature the batch does not pick counts as dead.
        trainer.config.dead_after_tokens = 1000;
        for since in &mut trainer.since_fired {
            since.fill(1000);
        }
        let only_aux = |which: usize, layer: usize, i: usize| {
            which < 3 && param(&mut main.clone(), which, layer).grad[i] == 0.0
        };
        let checked = check_gradients(&trainer, &rows, 4, only_aux);
        assert!(checked[..3].iter().all(|&n| n >= 3), "{checked:?}");
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let config = CltConfig::new(2, 4, 4, 8, 9);
        let err = CltTrainer::new(config, &[0.0; 16]).err().unwrap();
        assert!(err.to_string().contains("value for k"), "{err}");
        let mut config = CltConfig::new(2, 4, 4, 8, 2);
        config.total_steps = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("tokens"), "{err}");
        let config = CltConfig::new(2, 4, 4, 8, 2);
        let err = CltTrainer::new(config, &[0.0; 15]).err().unwrap();
        assert!(err.to_string().contains("16 values"), "{err}");
    }
}
