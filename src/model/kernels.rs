//! Hand-written CPU kernels for the few elementwise ops where candle's generic path costs
//! real time (profiled on the GPT-2-small forward benchmark: tanh-GELU through libm's
//! `tanhf`/`expm1f` was ~12% of the forward pass, and GELU's backward through candle's
//! generic ops ~15% of a training step). Each falls back to candle's op off the fast path
//! (other devices and dtypes, strided inputs). [`causal_attention`] fuses inference-time
//! attention: it reads the heads straight out of the QKV projection's buffer and writes the
//! merged heads, where the composed path made seven copies and temporaries per layer.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// tanh-approximated GELU, `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`, computed as the
/// equal `x·σ(2·√(2/π)(x + 0.044715x³))`, which needs one `exp` instead of `tanh`.
/// Differentiable: the backward pass is a fused kernel too.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        x.apply_op1(GeluTanhCpu)
    } else {
        x.gelu()
    }
}

const K: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)

/// Applies `f` elementwise over two equally laid-out contiguous f32 buffers, in parallel.
fn zip_map_f32(
    op: &str,
    (a, a_layout): (&CpuStorage, &Layout),
    (b, b_layout): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let a_data = contiguous_f32(a, a_layout, op)?;
    let b_data = contiguous_f32(b, b_layout, op)?;
    if a_layout.shape() != b_layout.shape() {
        candle_core::bail!("{op}: shapes differ");
    }
    let mut out = vec![0f32; a_data.len()];
    out.par_chunks_mut(4096)
        .zip(a_data.par_chunks(4096))
        .zip(b_data.par_chunks(4096))
        .for_each(|((o, a), b)| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    Ok((CpuStorage::F32(out), a_layout.shape().clone()))
}

/// Standardises each row of the last dimension, `(x − mean) / √(var + eps)`, with a fused
/// backward pass: the autograd-friendly LayerNorm core used in training (weight and bias are
/// applied by the caller with ordinary, differentiable ops).
pub fn standardize_rows(x: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        Ok(Some(x.apply_op1(Standardize { eps: eps as f32 })?))
    } else {
        Ok(None)
    }
}

struct Standardize {
    eps: f32,
}

/// Mean and 1/σ of one row.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor");
    };
    Ok(&data[start..end])
}

impl CustomOp1 for Standardize {
    fn name(&self) -> &'static str {
        "standardize-rows-cpu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let d = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let (mean, inv) = row_stats(row, self.eps);
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = (v - mean) * inv;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = StandardizeGrad { eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// `dx = (g − mean(g) − x̂·mean(g·x̂)) / σ` per row.
struct StandardizeGrad {
    eps: f32,
}

impl CustomOp2 for StandardizeGrad {
    fn name(&self) -> &'static str {
        "standardize-rows-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, self.name())?;
        let g = contiguous_f32(grad, grad_layout, self.name())?;
        if x_layout.shape() != grad_layout.shape() {
            candle_core::bail!("{}: shapes differ", self.name());
        }
        let d = x_layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let n = d as f32;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (row, g))| {
                let (mean, inv) = row_stats(row, self.eps);
                let mut g_mean = 0f32;
                let mut gx_mean = 0f32;
                for (&v, &gv) in row.iter().zip(g) {
                    g_mean += gv;
                    gx_mean += gv * (v - mean) * inv;
                }
                g_mean /= n;
                gx_mean /= n;
                for ((o, &v), &gv) in o.iter_mut().zip(row).zip(g) {
                    *o = (gv - g_mean - (v - mean) * inv * gx_mean) * inv;
                }
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// `grad · gelu'(x)` for the sigmoid form: `σ(z) + x·σ(z)(1−σ(z))·K(1 + 3·0.044715x²)`.
struct GeluTanhGradCpu;

impl CustomOp2 for GeluTanhGradCpu {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        zip_map_f32(self.name(), (x, x_layout), (grad, grad_layout), |x, g| {
            let z = K * (x + 0.044_715 * x * x * x);
            let s = 1.0 / (1.0 + (-z).exp());
            g * (s + x * s * (1.0 - s) * K * (1.0 + 3.0 * 0.044_715 * x * x))
        })
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
        let data = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(4096)
            .zip(data.par_chunks(4096))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    let z = K * (x + 0.044_715 * x * x * x);
                    *o = x / (1.0 + (-z).exp());
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGradCpu)?,
        ))
    }
}

/// `softmax(q·kᵀ·scale + causal mask)·v` with the heads merged: `q` is `[batch, heads, seq,
/// head_dim]`, `k` and `v` are `[batch, kv_heads, total, head_dim]` (grouped-query heads share a
/// key/value head), any strides. Query `i` sits at absolute position `offset + i` and sees keys
/// `j ≤ offset + i`, and with a `window` only the `window` latest of them; with a `softcap`, the
/// scaled scores are bent to `cap · tanh(score / cap)` first (Gemma 2). Returns `[batch, seq,
/// heads·head_dim]`, or `None` off the fast path (other devices or dtypes), where the caller
/// composes the same attention from candle ops. No backward pass: inference only.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    offset: usize,
    window: Option<usize>,
    softcap: Option<f32>,
) -> candle_core::Result<Option<Tensor>> {
    let on_fast_path = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(on_fast_path(q) && on_fast_path(k) && on_fast_path(v)) {
        return Ok(None);
    }
    let op = CausalAttention {
        scale,
        offset,
        window,
        softcap,
    };
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?))
}

struct CausalAttention {
    scale: f32,
    offset: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

/// A `[batch, heads, rows, head_dim]` view into a CPU buffer: where its data starts and its
/// four strides.
struct HeadView<'a> {
    data: &'a [f32],
    start: usize,
    dims: [usize; 4],
    strides: [usize; 4],
}

impl<'a> HeadView<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("causal-attention: {what} must be f32");
        };
        let (Ok(dims), Ok(strides)) = (
            <[usize; 4]>::try_from(layout.dims()),
            <[usize; 4]>::try_from(layout.stride()),
        ) else {
            candle_core::bail!("causal-attention: {what} must have four dimensions");
        };
        Ok(Self {
            data,
            start: layout.start_offset(),
            dims,
            strides,
        })
    }

    /// Pointer to row 0 of head `h` in batch `b`.
    fn head(&self, b: usize, h: usize) -> *const f32 {
        let at = self.start + b * self.strides[0] + h * self.strides[1];
        self.data[at..].as_ptr()
    }
}

/// An output pointer shared by the tasks, each of which writes its own head's columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements (one head's columns of the merged output each).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            HeadView::new(q, q_layout, "q")?,
            HeadView::new(k, k_layout, "k")?,
            HeadView::new(v, v_layout, "v")?,
        );
        let [batch, heads, seq, head_dim] = q.dims;
        let [_, kv_heads, total, _] = k.dims;
        if k.dims != v.dims
            || k.dims[0] != batch
            || k.dims[3] != head_dim
            || kv_heads == 0
            || heads % kv_heads != 0
            || total != self.offset + seq
        {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?} and offset {} do not fit together",
                q.dims,
                k.dims,
                v.dims,
                self.offset
            );
        }
        let width = heads * head_dim;
        let mut out = vec![0f32; batch * seq * width];
        let shared = SharedOut(out.as_mut_ptr());
        let tasks = batch * heads;
        // Few tasks (generation, one prompt): each GEMM may use the pool; many: one task each.
        let inner = if tasks < rayon::current_num_threads() {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        (0..tasks).into_par_iter().for_each_init(
            || vec![0f32; seq * total],
            |scores, task| {
                let (b, h) = (task / heads, task % heads);
                let kv = h / (heads / kv_heads);
                let (qh, kh, vh) = (q.head(b, h), k.head(b, kv), v.head(b, kv));
                let st = |s: usize| s as isize;
                // SAFETY: every pointer stays inside its buffer: the views' extents come from
                // candle's layouts, `scores` holds seq × total, and this task writes only
                // columns h·head_dim.. of each of the seq output rows of batch b.
                unsafe {
                    // scores[i, j] = scale · Σ_d q[i, d] · k[j, d]
                    gemm::gemm(
                        seq,
                        total,
                        head_dim,
                        scores.as_mut_ptr(),
                        1,
                        st(total),
                        false,
                        qh,
                        st(q.strides[3]),
                        st(q.strides[2]),
                        kh,
                        st(k.strides[2]),
                        st(k.strides[3]),
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        inner,
                    );
                }
                for (i, row) in scores.chunks_mut(total).enumerate() {
                    let last = self.offset + i;
                    let first = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
                    if let Some(cap) = self.softcap {
                        row[first..=last]
                            .iter_mut()
                            .for_each(|s| *s = cap * (*s / cap).tanh());
                    }
                    softmax_in_place(&mut row[first..=last]);
                    row[..first].fill(0.0);
                    row[last + 1..].fill(0.0);
                }
                let dst = shared;
                // SAFETY: as above.
                unsafe {
                    // out[b, i, h·head_dim + d] = Σ_j p[i, j] · v[j, d]
                    gemm::gemm(
                        seq,
                        head_dim,
                        total,
                        dst.0.add(b * seq * width + h * head_dim),
                        1,
                        st(width),
                        false,
                        scores.as_ptr(),
                        1,
                        st(total),
                        vh,
                        st(v.strides[3]),
                        st(v.strides[2]),
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        inner,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((batch, seq, width))))
    }
}

/// `x ← exp(x − max x) / Σ exp(x − max x)`.
fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::super::layers::{causal_mask, composed_attention};
    use super::*;

    type Op<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `f(x)` and d(Σ f(x)·w)/dx by candle's backward pass.
    fn value_and_grad(f: Op, x: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
        let v = candle_core::Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let loss = (&y * w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().clone();
        (y, g)
    }

    #[test]
    fn fast_gelu_matches_candles_tanh_gelu() {
        let x = Tensor::randn(0f32, 3.0, (7, 1000), &candle_core::Device::Cpu).unwrap();
        let x = (x * 1.0).unwrap();
        let diff = max_abs_diff(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap());
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

    #[test]
    fn fast_gelu_gradient_matches_candles() {
        let x = Tensor::randn(0f32, 3.0, (5, 300), &candle_core::Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 300), &candle_core::Device::Cpu).unwrap();
        let (_, fast) = value_and_grad(&|t| gelu_tanh(t), &x, &w);
        let (_, slow) = value_and_grad(&|t| t.gelu(), &x, &w);
        let diff = max_abs_diff(&fast, &slow);
        assert!(diff < 1e-4, "max abs difference {diff}");
    }

    #[test]
    fn fused_attention_matches_the_composed_ops() {
        let dev = candle_core::Device::Cpu;
        // (batch, heads, kv heads, seq, offset, window, softcap): plain causal, a KV cache,
        // grouped queries with a sliding window, one query (generation), Gemma 2's capped
        // scores (a cap of 1 bends scores of unit spread hard).
        for (b, nh, nkv, s, offset, window, softcap) in [
            (2, 4, 4, 9, 0, None, None),
            (1, 4, 4, 5, 7, None, None),
            (2, 6, 2, 11, 3, Some(4), None),
            (3, 2, 1, 1, 12, None, None),
            (2, 4, 2, 9, 2, Some(5), Some(1.0f32)),
        ] {
            let hd = 8;
            let t = offset + s;
            // q, k and v as strided views of one projection buffer, as the model makes them.
            let qkv = Tensor::randn(0f32, 1.0, (b, s + 2 * t, nh + 2 * nkv, hd), &dev).unwrap();
            let q = qkv
                .narrow(1, 0, s)
                .unwrap()
                .narrow(2, 0, nh)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let k = qkv
                .narrow(1, s, t)
                .unwrap()
                .narrow(2, nh, nkv)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let v = qkv
                .narrow(1, s + t, t)
                .unwrap()
                .narrow(2, nh + nkv, nkv)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let scale = 1.0 / (hd as f32).sqrt();
            let fused = causal_attention(&q, &k, &v, scale, offset, window, softcap)
                .unwrap()
                .unwrap();
            let mask = causal_mask(s, t, offset, window, &dev).unwrap();
            let scale64 = f64::from(scale);
            let cap64 = softcap.map(f64::from);
            let composed = composed_attention(&q, &k, &v, &mask, scale64, cap64).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            let diff = max_abs_diff(&fused, &composed);
            assert!(
                diff < 1e-5,
                "case {:?}: max abs difference {diff}",
                (b, nh, nkv, s, offset, window, softcap)
            );
        }
    }

    #[test]
    fn fused_attention_rejects_keys_that_do_not_match_the_offset() {
        let dev = candle_core::Device::Cpu;
        let q = Tensor::zeros((1, 2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &dev).unwrap();
        let err = causal_attention(&q, &k, &k, 1.0, 0, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit together"), "{err}");
    }

    #[test]
    fn standardize_gradient_matches_autograd_of_the_formula() {
        let dev = candle_core::Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (6, 64), &dev).unwrap() + 0.7).unwrap();
        let w = Tensor::randn(0f32, 1.0, (6, 64), &dev).unwrap();
        let eps = 1e-5;
        let slow = |t: &Tensor| -> candle_core::Result<Tensor> {
            let c = t.broadcast_sub(&t.mean_keepdim(1)?)?;
            c.broadcast_div(&(c.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?)
        };
        let fast =
            |t: &Tensor| -> candle_core::Result<Tensor> { Ok(standardize_rows(t, eps)?.unwrap()) };
        let (y_fast, g_fast) = value_and_grad(&fast, &x, &w);
        let (y_slow, g_slow) = value_and_grad(&slow, &x, &w);
        assert!(max_abs_diff(&y_fast, &y_slow) < 1e-5);
        assert!(max_abs_diff(&g_fast, &g_slow) < 1e-4);
    }
}
