//! Encoding on the CPU straight to the active latents (compressed sparse rows), for the passes
//! that read SAE codes rather than reconstructions: feature statistics, scoring, export.
//!
//! One dense product (`x @ W_enc`), then a selection that never materialises a dense code:
//! top-k per row for TopK, a threshold filter for the others. The result equals
//! [`Sae::encode`] restricted to its non-zero entries.

use candle_core::{DType, Device};

use super::cpu::{self, Active, MatRef};
use super::{Architecture, Sae};
use crate::error::{Error, Result};

/// An SAE's encoder as plain `f32` arrays.
pub struct SparseEncoder {
    architecture: Architecture,
    /// `[d_in, d_sae]`.
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    /// Subtracted from inputs when the SAE applies `b_dec` to its input.
    input_shift: Option<Vec<f32>>,
    threshold: Option<Vec<f32>>,
    d_in: usize,
}

impl SparseEncoder {
    pub fn new(sae: &Sae) -> Result<Self> {
        let flat = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
            Ok(t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let threshold = sae.threshold.as_ref().map(flat).transpose()?;
        if sae.architecture.has_threshold() && threshold.is_none() {
            return Err(Error::InvalidArgument {
                what: "SAE",
                value: sae.architecture.name().into(),
                message: "has no threshold".into(),
            });
        }
        Ok(Self {
            architecture: sae.architecture.clone(),
            w_enc: flat(&sae.w_enc)?,
            b_enc: flat(&sae.b_enc)?,
            input_shift: sae
                .apply_b_dec_to_input
                .then(|| flat(&sae.b_dec))
                .transpose()?,
            threshold,
            d_in: sae.d_in(),
        })
    }

    pub fn d_in(&self) -> usize {
        self.d_in
    }

    pub fn d_sae(&self) -> usize {
        self.b_enc.len()
    }

    /// The active latents of each row of `x` (`[rows, d_in]`, row-major). TopK rows come in
    /// descending activation order, other architectures in latent order. Rows are encoded in
    /// blocks, so the dense pre-activations never exceed `BLOCK_ROWS × d_sae`.
    pub fn encode(&self, x: &[f32]) -> Active {
        let mut out = Active {
            row_start: vec![0],
            ..Default::default()
        };
        for block in x.chunks(BLOCK_ROWS * self.d_in) {
            let coded = self.encode_block(block);
            let base = out.latent.len();
            out.row_start
                .extend(coded.row_start[1..].iter().map(|s| s + base));
            out.latent.extend(coded.latent);
            out.value.extend(coded.value);
        }
        out
    }

    fn encode_block(&self, x: &[f32]) -> Active {
        let (d_in, d_sae) = (self.d_in, self.d_sae());
        let rows = x.len() / d_in;
        let mut pre = vec![0f32; rows * d_sae];
        let shifted: Vec<f32>;
        let input = match &self.input_shift {
            Some(shift) => {
                shifted = x
                    .chunks_exact(d_in)
                    .flat_map(|row| row.iter().zip(shift).map(|(v, s)| v - s))
                    .collect();
                &shifted[..]
            }
            None => x,
        };
        cpu::matmul(
            MatRef::new(input, rows, d_in),
            MatRef::new(&self.w_enc, d_in, d_sae),
            &mut pre,
            false,
        );
        match (&self.architecture, &self.threshold) {
            (Architecture::TopK { k }, _) => cpu::top_k_rows(&pre, &self.b_enc, *k),
            (Architecture::Standard, _) => cpu::select_rows(&pre, &self.b_enc, |_, v| v > 0.0),
            (_, Some(threshold)) => {
                cpu::select_rows(&pre, &self.b_enc, |j, v| v > 0.0 && v > threshold[j])
            }
            (_, None) => Active::from_rows(vec![Vec::new(); rows]),
        }
    }
}

/// Rows encoded at once.
const BLOCK_ROWS: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    fn sae(architecture: Architecture, apply_b_dec_to_input: bool) -> Sae {
        let dev = Device::Cpu;
        let (d_in, d_sae) = (6, 40);
        let randn = |shape: &[usize], seed: u64| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let threshold = architecture
            .has_threshold()
            .then(|| randn(&[d_sae], 5).abs().unwrap());
        Sae {
            architecture,
            w_enc: randn(&[d_in, d_sae], 1),
            w_dec: randn(&[d_sae, d_in], 2),
            b_enc: randn(&[d_sae], 3),
            b_dec: randn(&[d_in], 4),
            threshold,
            apply_b_dec_to_input,
            transcoder: false,
            w_skip: None,
        }
    }

    #[test]
    fn sparse_codes_equal_the_dense_encoding() {
        // More rows than one encoding block, so block results are stitched together.
        let rows = BLOCK_ROWS + 9;
        let x: Vec<f32> = (0..6 * rows)
            .map(|i| ((i * 37 % 23) as f32 / 7.0) - 1.5)
            .collect();
        for arch in [
            Architecture::Standard,
            Architecture::TopK { k: 5 },
            Architecture::JumpRelu,
            Architecture::BatchTopK { k: 5 },
        ] {
            for apply in [false, true] {
                let sae = sae(arch.clone(), apply);
                let dense = sae
                    .encode(&Tensor::from_vec(x.clone(), (rows, 6), &Device::Cpu).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let sparse = SparseEncoder::new(&sae).unwrap().encode(&x);
                assert_eq!(sparse.rows(), rows);
                for (b, row) in dense.iter().enumerate() {
                    let (latents, values) = sparse.row(b);
                    let mut rebuilt = vec![0f32; row.len()];
                    for (&j, &v) in latents.iter().zip(values) {
                        rebuilt[j as usize] = v;
                    }
                    for (a, e) in rebuilt.iter().zip(row) {
                        assert!((a - e).abs() < 1e-5, "{arch:?} row {b}: {a} vs {e}");
                    }
                    assert!(values.iter().all(|&v| v > 0.0));
                }
            }
        }
    }
}
