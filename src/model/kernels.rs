//! Hand-written CPU kernels for the few elementwise ops where candle's generic path costs
//! real time (profiled on the GPT-2-small forward benchmark: tanh-GELU through libm's
//! `tanhf`/`expm1f` was ~12% of the forward pass). Each falls back to candle's op off the
//! fast path (other devices and dtypes, strided inputs) and carries no gradient: callers use
//! them only when no gradient is needed.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// tanh-approximated GELU, `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`, computed as the
/// equal `x·σ(2·√(2/π)(x + 0.044715x³))`, which needs one `exp` instead of `tanh`.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        x.apply_op1_no_bwd(&GeluTanhCpu)
    } else {
        x.gelu()
    }
}

struct GeluTanhCpu;

impl CustomOp1 for GeluTanhCpu {
    fn name(&self) -> &'static str {
        "gelu-tanh-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu-tanh-cpu: expected f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-tanh-cpu: expected a contiguous tensor");
        };
        const K: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)
        let mut out = vec![0f32; end - start];
        out.par_chunks_mut(4096)
            .zip(data[start..end].par_chunks(4096))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    let z = K * (x + 0.044_715 * x * x * x);
                    *o = x / (1.0 + (-z).exp());
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_gelu_matches_candles_tanh_gelu() {
        let x = Tensor::randn(0f32, 3.0, (7, 1000), &candle_core::Device::Cpu).unwrap();
        let x = (x * 1.0).unwrap();
        let fast = gelu_tanh(&x).unwrap();
        let slow = x.gelu().unwrap();
        let diff = (fast - slow)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max abs difference {diff}");
        let extreme = Tensor::new(
            &[-100f32, -20.0, 0.0, 20.0, 100.0],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y = gelu_tanh(&extreme).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y[2], 0.0);
        assert!(y[0].abs() < 1e-6 && (y[4] - 100.0).abs() < 1e-4);
    }
}
