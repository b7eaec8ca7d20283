//! The SAE training step on candle tensors, so that it runs on any candle device — a CUDA GPU
//! when monoscope is built with `--features cuda`. On the CPU the hand-written kernels of
//! [`super::train::SaeTrainer`] are faster and cover every architecture; this engine covers
//! `topk` (with AuxK) and `standard`, as SAEs and as transcoders (a skip path included), with
//! the same parameters, losses and update, and is checked against [`SaeTrainer`] step for step
//! on the CPU.
//!
//! Top-k decoding stays sparse: the selected latents' decoder rows are gathered
//! (`index_select`) and weighted, never the dense `d_sae × d_in` product, and autograd turns
//! that gather into an `index_add` of only those rows. The state converts to and from
//! [`SaeTrainer`]'s, so checkpoints and saved SAEs are the same files whichever engine ran.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};

use super::train::{
    FiringCounters, SaeTrainer, StepMetrics, TrainArchitecture, TrainConfig, TrainerCounters,
    batch_rows,
};
use crate::error::{Error, Result};

/// Names of the trained tensors in [`SaeTrainer::state_tensors`], in `TensorTrainer::params`
/// order; `W_skip` only for a skip transcoder. (`log_threshold`, JumpReLU's, is carried
/// through untouched.)
const PARAM_NAMES: [&str; 5] = ["W_enc_T", "W_dec", "b_enc", "b_dec", "W_skip"];
const W_ENC_T: usize = 0;
const W_DEC: usize = 1;
const B_ENC: usize = 2;
const B_DEC: usize = 3;
const W_SKIP: usize = 4;

/// Rows wider than this are ranked in blocks first: candle's CUDA arg-sort holds a row,
/// padded to a power of two, in 48 KB of shared memory, so it takes at most 8,192 columns.
const SORT_WIDTH: usize = 4096;

/// Training state on a device: parameters as autograd variables, Adam moments, and the
/// per-latent counters (kept on the host: they steer AuxK and feed the progress line).
pub struct TensorTrainer {
    config: TrainConfig,
    device: Device,
    /// `W_enc_T`, `W_dec`, `b_enc`, `b_dec` (and `W_skip`), as in [`PARAM_NAMES`].
    params: Vec<Var>,
    adam_m: Vec<Tensor>,
    adam_v: Vec<Tensor>,
    /// JumpReLU thresholds from the host state (empty for the architectures trained here).
    log_threshold: Tensor,
    pub step: u64,
    pub tokens: u64,
    firing: FiringCounters,
    batch_threshold: f32,
}

impl TensorTrainer {
    /// Whether this engine trains `config`'s SAE; the error says what to use instead.
    pub fn supports(config: &TrainConfig, device: &Device) -> Result<()> {
        let supported = matches!(
            config.architecture,
            TrainArchitecture::TopK { .. } | TrainArchitecture::Standard { .. }
        ) && config.matryoshka.is_empty();
        if supported {
            Ok(())
        } else {
            Err(unsupported(config, device))
        }
    }

    /// Moves a trainer's state (fresh or from a checkpoint) onto `device`.
    pub fn from_host(host: &SaeTrainer, device: &Device) -> Result<Self> {
        let config = host.config.clone();
        Self::supports(&config, device)?;
        let (d_in, d_sae, d_out) = (config.d_in, config.d_sae, config.d_out());
        let state = host.state_tensors()?;
        let shape = |i: usize| -> Vec<usize> {
            match i {
                W_ENC_T => vec![d_sae, d_in],
                W_DEC => vec![d_sae, d_out],
                B_ENC => vec![d_sae],
                W_SKIP => vec![d_out, d_in],
                _ => vec![d_out],
            }
        };
        let load = |key: String, i: usize| -> Result<Tensor> {
            let t = state.get(&key).ok_or_else(|| Error::MissingTensor {
                dir: "the trainer's state".into(),
                key,
            })?;
            Ok(t.reshape(shape(i))?.to_device(device)?)
        };
        let mut params = Vec::new();
        let (mut adam_m, mut adam_v) = (Vec::new(), Vec::new());
        for (i, name) in trained(&config) {
            params.push(Var::from_tensor(&load(name.to_string(), i)?)?);
            adam_m.push(load(format!("{name}.adam_m"), i)?);
            adam_v.push(load(format!("{name}.adam_v"), i)?);
        }
        let counters = host.state_counters();
        let log_threshold = state.get("log_threshold").cloned().unwrap_or(Tensor::zeros(
            0,
            DType::F32,
            &Device::Cpu,
        )?);
        Ok(Self {
            params,
            adam_m,
            adam_v,
            log_threshold,
            step: counters.step,
            tokens: counters.tokens,
            firing: host.firing.clone(),
            batch_threshold: counters.batch_threshold,
            device: device.clone(),
            config,
        })
    }

    /// The state as a host [`SaeTrainer`], for checkpoints and the saved SAE.
    pub fn to_host(&self) -> Result<SaeTrainer> {
        let cpu = Device::Cpu;
        let mut state = HashMap::new();
        for (i, name) in trained(&self.config) {
            for (suffix, t) in [
                ("", self.params[i].as_tensor()),
                (".adam_m", &self.adam_m[i]),
                (".adam_v", &self.adam_v[i]),
            ] {
                state.insert(format!("{name}{suffix}"), t.flatten_all()?.to_device(&cpu)?);
            }
        }
        for suffix in ["", ".adam_m", ".adam_v"] {
            let t = if suffix.is_empty() {
                self.log_threshold.clone()
            } else {
                self.log_threshold.zeros_like()?
            };
            state.insert(format!("log_threshold{suffix}"), t);
        }
        self.firing.insert_tensors(&mut state)?;
        let counters = TrainerCounters {
            step: self.step,
            tokens: self.tokens,
            batch_threshold: self.batch_threshold,
            fire_tokens: self.firing.fire_tokens,
        };
        SaeTrainer::from_state(
            self.config.clone(),
            &counters,
            &state,
            Path::new("the device trainer's state"),
        )
    }

    /// One optimisation step on `x` (`[rows, d_in]`, a transcoder's `[rows, d_in + d_out]`
    /// rows `[x | y]`; finite values): the same update as [`SaeTrainer::step`].
    pub fn step(&mut self, x: &[f32]) -> Result<StepMetrics> {
        let (d_in, d_sae) = (self.config.d_in, self.config.d_sae);
        let width = self.config.row_width();
        let rows = batch_rows(x, width)?;
        let batch = Tensor::from_slice(x, (rows, width), &self.device)?;
        let (w_enc_t, w_dec) = (
            self.params[W_ENC_T].as_tensor(),
            self.params[W_DEC].as_tensor(),
        );
        let (b_enc, b_dec) = (
            self.params[B_ENC].as_tensor(),
            self.params[B_DEC].as_tensor(),
        );
        // An SAE encodes x − b_dec and reconstructs x; a transcoder encodes its x as it is
        // (its b_dec lives in the output space) and predicts its y.
        let (x_in, x) = match self.config.transcode_to {
            Some(d_out) => (
                batch.narrow(1, 0, d_in)?.contiguous()?,
                batch.narrow(1, d_in, d_out)?.contiguous()?,
            ),
            None => (batch.broadcast_sub(b_dec)?, batch),
        };
        let pre = x_in.matmul(&w_enc_t.t()?)?.broadcast_add(b_enc)?;

        let dead = self.firing.dead_mask(self.config.dead_after_tokens);
        let n_dead = dead.iter().filter(|&&d| d).count();
        // Decoded latents (without b_dec) and how often each latent fired; ReLU's
        // activations are kept for the L1 term.
        let mut relu_acts = None;
        let (decoded, fired) = match self.config.architecture {
            // (ReLU's gradient at exactly 0 is 1 in candle and 0 in the CPU kernels: a tie of
            // measure zero.)
            TrainArchitecture::TopK { k, .. } => {
                let latents = top_k_indices(&pre.detach(), k, SORT_WIDTH)?;
                let acts = pre.gather(&latents, 1)?.relu()?;
                let fired = latent_counts(&latents, &acts.gt(0f32)?, d_sae)?;
                (sparse_decode(w_dec, &latents, &acts)?, fired)
            }
            TrainArchitecture::Standard { .. } => {
                let acts = pre.relu()?;
                let fired = pre.gt(0f32)?.to_dtype(DType::F32)?.sum(0)?;
                let decoded = acts.matmul(w_dec)?;
                relu_acts = Some(acts);
                (decoded, fired)
            }
            _ => return Err(unsupported(&self.config, &self.device)),
        };
        let mut x_hat = decoded.broadcast_add(b_dec)?;
        if let Some(w_skip) = self.params.get(W_SKIP) {
            x_hat = (x_hat + x_in.matmul(&w_skip.as_tensor().t()?)?)?;
        }
        let e = x_hat.sub(&x)?;
        let sq_error = e.sqr()?.sum_all()?;
        let mut loss = (&sq_error / rows as f64)?;

        let auxiliary = match (&self.config.architecture, relu_acts) {
            (&TrainArchitecture::Standard { l1_coefficient }, Some(acts)) => {
                // λ · Σ_b Σ_j f_j(x_b)·‖W_dec[j]‖ / B.
                let lambda = l1_coefficient * self.config.penalty_scale(self.step) / rows as f32;
                let norms = w_dec.sqr()?.sum(1)?.sqrt()?;
                Some(
                    (acts.sum(0)? * norms)?
                        .sum_all()?
                        .affine(f64::from(lambda), 0.0)?,
                )
            }
            (
                &TrainArchitecture::TopK {
                    aux_k,
                    aux_coefficient,
                    ..
                },
                _,
            ) if n_dead > 0 && aux_k > 0 && aux_coefficient > 0.0 => {
                // AuxK: the dead latents' largest pre-activations explain the residual
                // x − x̂ (held fixed), decoded without b_dec.
                let mask: Vec<f32> = dead
                    .iter()
                    .map(|&d| if d { 0.0 } else { f32::NEG_INFINITY })
                    .collect();
                let mask = Tensor::from_vec(mask, d_sae, &self.device)?;
                let masked = pre.broadcast_add(&mask)?;
                let latents = top_k_indices(&masked.detach(), aux_k.min(n_dead), SORT_WIDTH)?;
                let acts = masked.gather(&latents, 1)?.relu()?;
                if acts.max_all()?.to_scalar::<f32>()? > 0.0 {
                    let e_aux = (sparse_decode(w_dec, &latents, &acts)? + e.detach())?;
                    let scale = (n_dead as f32 / aux_k as f32).min(1.0) * aux_coefficient;
                    Some(
                        e_aux
                            .sqr()?
                            .sum_all()?
                            .affine(f64::from(scale) / rows as f64, 0.0)?,
                    )
                } else {
                    None // no dead latent would fire: no term, as the CPU trainer has it
                }
            }
            _ => None,
        };
        if let Some(a) = &auxiliary {
            loss = (loss + a)?;
        }
        let grads = loss.backward()?;
        // Detached: a gradient computed from the variables records how, and Adam's moments
        // built from it would otherwise chain every past step's graph.
        let mut g: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| match grads.get(p.as_tensor()) {
                Some(g) => Ok(g.detach()),
                None => p.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let w_dec = &w_dec.detach();
        let constrains = self.config.architecture.constrains_decoder();
        if constrains {
            // Keep steps tangent to the unit-norm rows: g[j] −= (g[j]·w[j] / ‖w[j]‖²) w[j].
            let along = (&g[W_DEC] * w_dec)?
                .sum_keepdim(1)?
                .broadcast_div(&w_dec.sqr()?.sum_keepdim(1)?.maximum(f32::MIN_POSITIVE)?)?;
            g[W_DEC] = (&g[W_DEC] - along.broadcast_mul(w_dec)?)?;
        }
        // One read-back for the norm (each one waits for the GPU).
        let squares = g
            .iter()
            .map(|t| t.sqr()?.sum_all()?.reshape(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let grad_sq: Vec<f32> = Tensor::cat(&squares, 0)?.to_vec1()?;
        let grad_norm = grad_sq.iter().map(|&v| f64::from(v)).sum::<f64>().sqrt();
        if let Some(clip) = self.config.grad_clip
            && grad_norm > f64::from(clip)
        {
            let s = f64::from(clip) / grad_norm;
            for t in &mut g {
                *t = t.affine(s, 0.0)?;
            }
        }

        // Adam, as `cpu::AdamStep` (candle-nn's AdamW keeps its moments private; checkpoints
        // need them, in the CPU trainer's layout).
        let lr = self.config.lr_at(self.step);
        let t = (self.step + 1) as i32;
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2_sqrt = (1.0 - b2.powi(t)).sqrt();
        for (i, g) in g.iter().enumerate() {
            let m = ((&self.adam_m[i] * f64::from(b1))? + (g * f64::from(1.0 - b1))?)?;
            let v = ((&self.adam_v[i] * f64::from(b2))? + (g.sqr()? * f64::from(1.0 - b2))?)?;
            let denom = ((v.sqrt()? / f64::from(c2_sqrt))? + f64::from(self.config.eps))?;
            let update = (m.affine(f64::from(lr / c1), 0.0)? / denom)?;
            let mut value = (self.params[i].as_tensor().detach() - update)?;
            if i == W_DEC && constrains {
                let norms = value.sqr()?.sum_keepdim(1)?.sqrt()?;
                value = value.broadcast_div(&norms.maximum(f32::MIN_POSITIVE)?)?;
            }
            self.params[i].set(&value)?;
            self.adam_m[i] = m;
            self.adam_v[i] = v;
        }

        // Counters, on the host.
        let fired: Vec<f32> = fired.to_vec1()?;
        self.firing.record(
            fired.iter().map(|&f| f as u64),
            rows as u64,
            self.step >= self.config.total_steps / 2,
        );
        let total_variance = x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.sum_all()?;
        let sq_error = f64::from(sq_error.to_scalar::<f32>()?);
        let auxiliary_loss = match auxiliary {
            Some(a) => f64::from(a.to_scalar::<f32>()?),
            None => 0.0,
        };
        self.step += 1;
        self.tokens += rows as u64;
        let mse = sq_error / rows as f64;
        Ok(StepMetrics {
            step: self.step,
            tokens: self.tokens,
            loss: mse + auxiliary_loss,
            mse,
            fvu: sq_error / f64::from(total_variance.to_scalar::<f32>()?).max(f64::MIN_POSITIVE),
            l0: fired.iter().map(|&f| f64::from(f)).sum::<f64>() / rows as f64,
            auxiliary_loss,
            dead_fraction: self.firing.dead_fraction(self.config.dead_after_tokens),
            lr,
            grad_norm,
        })
    }
}

/// The error for an SAE this engine does not train.
fn unsupported(config: &TrainConfig, device: &Device) -> Error {
    let what = if config.matryoshka.is_empty() {
        config.architecture.name().to_string()
    } else {
        format!("Matryoshka {}", config.architecture.name())
    };
    Error::InvalidArgument {
        what: "SAE architecture",
        value: what,
        message: format!(
            "training it on {} is not supported yet (topk and standard are); \
             train it on the CPU with --device cpu",
            crate::device::device_name(device)
        ),
    }
}

/// The trained parameters of `config`'s SAE: `(index, name)`, `W_skip` for a skip transcoder.
fn trained(config: &TrainConfig) -> impl Iterator<Item = (usize, &'static str)> {
    let count = if config.skip_connection { 5 } else { 4 };
    PARAM_NAMES.into_iter().take(count).enumerate()
}

/// Indices (`u32`, `[rows, k]`, largest first) of the `k` largest values of each row of
/// `scores` (`[rows, n]`). Rows wider than `width` (or than `2k` rounded up to a power of two,
/// whichever is more) are ranked in blocks of that width first, and the blocks' top `k` then
/// ranked together, in blocks again while still wider: each round halves the row at least.
pub fn top_k_indices(scores: &Tensor, k: usize, width: usize) -> Result<Tensor> {
    let (rows, n) = scores.dims2()?;
    let width = width.max((2 * k).next_power_of_two());
    let blocks = n.div_ceil(width);
    if n <= width {
        return Ok(scores
            .arg_sort_last_dim(false)?
            .narrow(1, 0, k)?
            .contiguous()?);
    }
    let padded = if blocks * width > n {
        let fill = Tensor::full(
            f32::NEG_INFINITY,
            (rows, blocks * width - n),
            scores.device(),
        )?;
        Tensor::cat(&[scores, &fill], 1)?
    } else {
        scores.clone()
    };
    let local = padded
        .reshape((rows * blocks, width))?
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?;
    let offsets =
        Tensor::arange_step(0u32, (blocks * width) as u32, width as u32, scores.device())?;
    let global = local
        .reshape((rows, blocks, k))?
        .broadcast_add(&offsets.reshape((1, blocks, 1))?)?
        .reshape((rows, blocks * k))?;
    let candidates = padded.gather(&global, 1)?;
    let pick = top_k_indices(&candidates, k, width)?;
    Ok(global.gather(&pick, 1)?)
}

/// `Σ_p acts[b, p] · W_dec[latents[b, p]]` per row: only the selected decoder rows are read.
pub(crate) fn sparse_decode(w_dec: &Tensor, latents: &Tensor, acts: &Tensor) -> Result<Tensor> {
    let (rows, k) = latents.dims2()?;
    let d_in = w_dec.dim(1)?;
    let picked = w_dec.index_select(&latents.flatten_all()?, 0)?;
    Ok(picked
        .reshape((rows, k, d_in))?
        .broadcast_mul(&acts.unsqueeze(D::Minus1)?)?
        .sum(1)?)
}

/// How many times each latent fired in the batch (`f32`, `[d_sae]`): scattered per row, then
/// summed over rows (an `index_add` into `[d_sae]` would run as one CUDA thread over all pairs).
pub(crate) fn latent_counts(latents: &Tensor, fired: &Tensor, d_sae: usize) -> Result<Tensor> {
    let rows = latents.dim(0)?;
    let zeros = Tensor::zeros((rows, d_sae), DType::F32, latents.device())?;
    Ok(zeros
        .scatter_add(latents, &fired.to_dtype(DType::F32)?, 1)?
        .sum(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sae::train::BDecInit;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| crate::world::train::normal(&mut rng) as f32)
            .collect()
    }

    fn config(architecture: TrainArchitecture) -> TrainConfig {
        let mut c = TrainConfig::new(architecture, D_IN, 96);
        c.batch_size = 40;
        c.total_steps = 6;
        c.lr = 3e-2;
        c.decay_steps = 2;
        c.b_dec_init = BDecInit::GeometricMedian;
        // Latents silent for one batch count as dead, so AuxK works from the second step.
        c.dead_after_tokens = 40;
        c
    }

    const D_IN: usize = 16;

    /// Batches with a few strong directions, so that some latents win every time and others
    /// go dead; rows `width` wide (a transcoder's `[x | y]` share the directions).
    fn batch(step: u64, width: usize) -> Vec<f32> {
        let (rows, d_in) = (40, width);
        let noise = random(rows * d_in, 100 + step);
        let basis = random(4 * d_in, 7);
        (0..rows * d_in)
            .map(|i| {
                let (b, f) = (i / d_in, i % d_in);
                noise[i] * 0.3 + 2.0 * basis[(b % 4) * d_in + f]
            })
            .collect()
    }

    fn max_relative_error(a: &[f32], b: &[f32]) -> f32 {
        let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
            / scale
    }

    /// Runs both engines from the same start on the same batches and compares every step's
    /// figures and the final state.
    fn engines_agree(architecture: TrainArchitecture, grad_clip: Option<f32>) {
        let mut c = config(architecture);
        c.grad_clip = grad_clip;
        agree(c);
    }

    /// [`engines_agree`] for a given configuration.
    fn agree(c: TrainConfig) {
        let width = c.row_width();
        let mut host = SaeTrainer::new(c, &batch(0, width)).unwrap();
        let mut device = TensorTrainer::from_host(&host, &Device::Cpu).unwrap();
        let mut saw_aux = false;
        for step in 0..6 {
            let x = batch(step, width);
            let a = host.step(&x).unwrap();
            let b = device.step(&x).unwrap();
            for (what, u, v) in [
                ("loss", a.loss, b.loss),
                ("fvu", a.fvu, b.fvu),
                ("auxiliary loss", a.auxiliary_loss, b.auxiliary_loss),
                ("grad norm", a.grad_norm, b.grad_norm),
            ] {
                assert!(
                    (u - v).abs() <= 1e-4 * u.abs().max(1.0),
                    "step {step}: {what} {u} vs {v}"
                );
            }
            assert_eq!(
                (a.l0, a.dead_fraction),
                (b.l0, b.dead_fraction),
                "step {step}"
            );
            saw_aux |= a.auxiliary_loss > 0.0;
        }
        assert!(saw_aux, "the auxiliary term never ran");
        let (s, t) = (
            host.state_tensors().unwrap(),
            device.to_host().unwrap().state_tensors().unwrap(),
        );
        let skip = host.config.skip_connection;
        let names = [
            "W_enc_T",
            "W_dec",
            "b_enc",
            "b_dec",
            "W_dec.adam_v",
            "W_skip",
        ];
        for name in names.into_iter().take(if skip { 6 } else { 5 }) {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (s[name].to_vec1().unwrap(), t[name].to_vec1().unwrap());
            let err = max_relative_error(&a, &b);
            assert!(err < 1e-4, "{name}: relative error {err}");
        }
        for name in ["fire_counts", "tokens_since_fired"] {
            assert_eq!(
                s[name].to_vec1::<i64>().unwrap(),
                t[name].to_vec1::<i64>().unwrap(),
                "{name}"
            );
        }
        assert_eq!(
            host.state_counters(),
            device.to_host().unwrap().state_counters()
        );
    }

    #[test]
    fn a_topk_step_on_tensors_matches_the_hand_written_one() {
        engines_agree(
            TrainArchitecture::TopK {
                k: 6,
                aux_k: 8,
                aux_coefficient: 0.5,
            },
            None,
        );
    }

    #[test]
    fn a_standard_step_on_tensors_matches_the_hand_written_one() {
        engines_agree(
            TrainArchitecture::Standard {
                l1_coefficient: 0.3,
            },
            Some(1.0),
        );
    }

    /// Transcoders (rows `[x | y]`): top-k with AuxK, and ReLU + L1 with a skip path `W_skip`.
    #[test]
    fn a_transcoder_step_on_tensors_matches_the_hand_written_one() {
        let mut c = config(TrainArchitecture::TopK {
            k: 6,
            aux_k: 8,
            aux_coefficient: 0.5,
        });
        c.transcode_to = Some(10);
        agree(c.clone());
        c.architecture = TrainArchitecture::Standard {
            l1_coefficient: 0.3,
        };
        c.skip_connection = true;
        c.grad_clip = Some(1.0);
        agree(c);
    }

    #[test]
    fn blocked_top_k_picks_what_a_full_sort_picks() {
        let (rows, n) = (5, 37);
        let scores = Tensor::from_vec(random(rows * n, 3), (rows, n), &Device::Cpu).unwrap();
        for k in [1, 2, 6] {
            let full = top_k_indices(&scores, k, n).unwrap();
            for width in [2, 4, 5, 8, 16] {
                let blocked = top_k_indices(&scores, k, width).unwrap();
                assert_eq!(
                    full.to_vec2::<u32>().unwrap(),
                    blocked.to_vec2::<u32>().unwrap(),
                    "k {k}, width {width}"
                );
            }
        }
    }

    #[test]
    fn architectures_it_does_not_train_are_refused_by_name() {
        let mut c = config(TrainArchitecture::JumpRelu {
            l0_coefficient: 1.0,
            bandwidth: 0.05,
            init_threshold: 0.01,
        });
        let host = SaeTrainer::new(c.clone(), &batch(0, D_IN)).unwrap();
        let e = TensorTrainer::from_host(&host, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("jumprelu") && e.contains("--device cpu"), "{e}");
        c.architecture = TrainArchitecture::TopK {
            k: 4,
            aux_k: 0,
            aux_coefficient: 0.0,
        };
        c.matryoshka = vec![8, 32];
        let host = SaeTrainer::new(c, &batch(0, D_IN)).unwrap();
        let e = TensorTrainer::from_host(&host, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("Matryoshka topk"), "{e}");
    }
}
