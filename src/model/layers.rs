//! The shared decoder: norms, rotary embeddings, attention, MLPs, blocks and the
//! [`Transformer`] that every architecture file fills in.
//!
//! Architectures differ in weight names, config spelling and a handful of switches (norm
//! kind, gated MLP, parallel residual, partial rotary, embedding scale); the forward pass and
//! its hook points live here once, so every architecture gets the same hooks for free.
//!
//! Numerically sensitive steps (norms, softmax) run in f32 whatever the run dtype, as
//! transformers does. When a forward pass needs gradients, candle's fused kernels (which have
//! no backward pass) are swapped for their differentiable compositions.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::Linear;

use super::hooks::{HookPoint, HookRunner, LAST, upcast};
use super::kernels;

/// `x @ Wᵀ + b` over all leading dimensions at once: one `[batch·seq, in] × [in, out]` GEMM
/// instead of candle's per-batch broadcast matmul. When `x` is being differentiated and the
/// weight is a constant (ROME's v*, knowledge neurons' gradients: anything but training),
/// the product goes through [`ConstantWeight`] so the backward pass skips the weight's
/// gradient.
fn linear(x: &Tensor, l: &Linear) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let d_in = dims[dims.len() - 1];
    let rows = x.elem_count() / d_in;
    let x = x.reshape((rows, d_in))?;
    let w = l.weight();
    let y = if x.track_op() && !w.track_op() && x.device().is_cpu() {
        let product = x.detach().matmul(&w.t()?)?;
        x.apply_op2(&product, ConstantWeight { weight: w.clone() })?
    } else {
        x.matmul(&w.t()?)?
    };
    let y = match l.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    out_dims[dims.len() - 1] = y.dim(1)?;
    y.reshape(out_dims)
}

/// `x·Wᵀ` with `W` a constant, inside a pass being differentiated: the forward value is the
/// product computed off the graph (the op's second operand, returned as is), and the backward
/// gives `x` alone its gradient, `g·W`. candle's own matmul backward also computes the
/// weight's gradient, a product as large as the forward one that nothing reads: a third of
/// the backward pass's work. CPU only (the op's forward is a copy of the CPU buffer); other
/// devices take the plain matmul.
struct ConstantWeight {
    /// `[out, in]`.
    weight: Tensor,
}

impl candle_core::CustomOp2 for ConstantWeight {
    fn name(&self) -> &'static str {
        "constant-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        _x: &candle_core::CpuStorage,
        _x_layout: &candle_core::Layout,
        product: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        // A fresh matmul output: contiguous from offset 0, so the whole buffer is the value.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("constant-weight-matmul: the product must be a fresh buffer");
        }
        Ok((product.clone(), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _product: &Tensor,
        _result: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.weight)?), None))
    }
}

/// Which normalisation a model uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `(x − mean) / sqrt(var + eps) · w + b` (GPT-2, GPT-NeoX).
    LayerNorm,
    /// `x / sqrt(mean(x²) + eps) · w` (Llama, Mistral, Qwen2; Gemma with `w` stored as 1 + w).
    RmsNorm,
    /// No norm at all: OLMo 2 normalises only each sublayer's output, not its input. Its
    /// gain is ones, so code that folds gains need not tell it apart.
    Identity,
}

#[derive(Clone, Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    kind: NormKind,
    /// False where the gain and bias are fixed ones and zeros (OLMo 1), not parameters.
    learned: bool,
}

impl Norm {
    pub fn layer_norm(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: Some(bias),
            eps,
            kind: NormKind::LayerNorm,
            learned: true,
        }
    }

    pub fn rms_norm(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: None,
            eps,
            kind: NormKind::RmsNorm,
            learned: true,
        }
    }

    /// LayerNorm with no learned gain or bias (OLMo 1's): ones and zeros stand in for them.
    pub fn fixed_layer_norm(
        d: usize,
        eps: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Tensor::ones(d, dtype, device)?,
            bias: Some(Tensor::zeros(d, dtype, device)?),
            eps,
            kind: NormKind::LayerNorm,
            learned: false,
        })
    }

    /// The identity over `[.., d]` (in `dtype` on `device`), where a block has no input norm.
    pub fn identity(d: usize, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Tensor::ones(d, dtype, device)?,
            bias: None,
            eps: 0.0,
            kind: NormKind::Identity,
            learned: false,
        })
    }

    /// Whether this is no norm at all ([`Norm::identity`]): it has no hook points.
    pub fn is_identity(&self) -> bool {
        self.kind == NormKind::Identity
    }

    /// Learned parameters (an identity or a fixed LayerNorm has none).
    pub fn parameter_count(&self) -> usize {
        match self.learned {
            false => 0,
            true => self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count()),
        }
    }

    /// The elementwise gain (Gemma's stored `1 + w` included).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Whether the norm centres its input (LayerNorm) or only rescales it (RMSNorm).
    pub fn centers(&self) -> bool {
        matches!(self.kind, NormKind::LayerNorm)
    }

    /// The norm's linear part applied to `part` at the scale `whole` gets: centred (LayerNorm),
    /// divided by `whole`'s `sqrt(var + eps)` (or RMS), times the gain, no bias. Over the
    /// parts of a sum `whole`, these add up to `forward(whole)` minus the bias, which is how
    /// direct logit attribution splits a logit among the components that wrote the stream.
    /// `part` broadcasts against `whole`'s scale (`[…, d]` and `[…, 1]`); half-precision
    /// inputs come back in f32.
    pub fn at_scale_of(&self, part: &Tensor, whole: &Tensor) -> candle_core::Result<Tensor> {
        if self.is_identity() {
            return upcast(part);
        }
        let centre = |x: Tensor| -> candle_core::Result<Tensor> {
            match self.kind {
                NormKind::LayerNorm => x.broadcast_sub(&x.mean_keepdim(LAST)?),
                NormKind::RmsNorm | NormKind::Identity => Ok(x),
            }
        };
        let whole = centre(upcast(whole)?)?;
        let scale = (whole.sqr()?.mean_keepdim(LAST)? + self.eps)?.sqrt()?;
        let part = centre(upcast(part)?)?.broadcast_div(&scale)?;
        part.broadcast_mul(&upcast(&self.weight)?.to_dtype(part.dtype())?)
    }

    /// The additive bias (LayerNorm), if any (a fixed LayerNorm's zeros are none).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().filter(|_| self.learned)
    }

    pub fn forward(&self, x: &Tensor, needs_grad: bool) -> candle_core::Result<Tensor> {
        if self.is_identity() {
            return Ok(x.clone());
        }
        // candle's fused kernels have no backward pass and no f64 version.
        if !needs_grad && x.dtype() != DType::F64 {
            return match (&self.kind, &self.bias) {
                (NormKind::LayerNorm, Some(b)) => {
                    candle_nn::ops::layer_norm(x, &self.weight, b, self.eps as f32)
                }
                _ => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32),
            };
        }
        if let (NormKind::LayerNorm, Some(b)) = (&self.kind, &self.bias)
            && let Some(normed) = kernels::standardize_rows(x, self.eps)?
        {
            // Training on CPU: fused standardisation with its own backward pass.
            return normed.broadcast_mul(&self.weight)?.broadcast_add(b);
        }
        self.composed(x, None)
    }

    /// [`Norm::forward`] with its two hook points, as TransformerLens has them: `scale` (the
    /// divisor per token, `[.., 1]`) and `normalized` (the input divided by it, before the gain
    /// and bias). The norm runs unfused only when one of them is hooked.
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        hooks: &mut HookRunner,
        scale: HookPoint,
        normalized: HookPoint,
    ) -> candle_core::Result<Tensor> {
        if !self.is_identity() && (hooks.touches(scale) || hooks.touches(normalized)) {
            self.composed(x, Some((hooks, scale, normalized)))
        } else {
            self.forward(x, hooks.needs_grad())
        }
    }

    /// The gain and bias, applied to a normalised value (what `hook_normalized` holds): the
    /// norm's output in the gain's dtype.
    pub fn affine(&self, normalized: &Tensor) -> candle_core::Result<Tensor> {
        let y = normalized
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The norm from candle ops (differentiable, any dtype; statistics in f32 or f64), through
    /// the scale and normalized hook points when `hooks` are given.
    fn composed(
        &self,
        x: &Tensor,
        mut hooks: Option<(&mut HookRunner, HookPoint, HookPoint)>,
    ) -> candle_core::Result<Tensor> {
        let x = upcast(x)?;
        let x = match self.kind {
            NormKind::LayerNorm => x.broadcast_sub(&x.mean_keepdim(LAST)?)?,
            NormKind::RmsNorm | NormKind::Identity => x,
        };
        let mut divisor = (x.sqr()?.mean_keepdim(LAST)? + self.eps)?.sqrt()?;
        if let Some((runner, scale, _)) = hooks.as_mut() {
            divisor = runner.hook(*scale, divisor)?;
        }
        let mut normed = x.broadcast_div(&divisor)?;
        if let Some((runner, _, normalized)) = hooks.as_mut() {
            normed = runner.hook(*normalized, normed)?;
        }
        self.affine(&normed)
    }
}

/// FFN nonlinearities, by their transformers names.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// Exact erf GELU (`gelu`).
    GeluErf,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
    Relu,
}

impl Activation {
    /// Parses a transformers activation name; `None` if unsupported.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => kernels::gelu_tanh(x),
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
        }
    }
}

/// Rotary position embedding, applied to the first `rot_dim` channels of each head (all of them
/// unless the model uses partial rotary): in GPT-NeoX and Llama's `rotate_half` layout, which
/// pairs channel `i` with `i + rot_dim/2`, or GPT-J's interleaved one, which pairs `2i` with
/// `2i + 1`.
#[derive(Clone, Debug)]
pub struct Rotary {
    /// `[max_positions, rot_dim]`, f32.
    cos: Tensor,
    sin: Tensor,
    /// LongRoPE's tables for passes that end within the original context, and its length.
    short: Option<(usize, Tensor, Tensor)>,
    rot_dim: usize,
    /// GPT-J's adjacent pairs rather than halves.
    interleaved: bool,
    rope: super::config::Rope,
}

impl Rotary {
    pub fn new(
        rot_dim: usize,
        rope: &super::config::Rope,
        max_positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Self::with_layout(rot_dim, rope, max_positions, device, false)
    }

    /// GPT-J's layout: each channel pair is two neighbours.
    pub fn interleaved(
        rot_dim: usize,
        rope: &super::config::Rope,
        max_positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Self::with_layout(rot_dim, rope, max_positions, device, true)
    }

    fn with_layout(
        rot_dim: usize,
        rope: &super::config::Rope,
        max_positions: usize,
        device: &Device,
        interleaved: bool,
    ) -> candle_core::Result<Self> {
        // YaRN and LongRoPE scale the tables (in f32, as transformers does); 1 for the others.
        let attention = rope.scaling.attention_factor();
        let tables = |inv_freq: Vec<f64>, positions: usize| -> candle_core::Result<_> {
            let inv_freq: Vec<f32> = inv_freq.into_iter().map(|f| f as f32).collect();
            let inv_freq = Tensor::from_vec(inv_freq, (1, rot_dim / 2), device)?;
            let positions = Tensor::arange(0u32, positions as u32, device)?
                .to_dtype(DType::F32)?
                .reshape((positions, 1))?;
            let freqs = positions.matmul(&inv_freq)?;
            // Each pair's angle on both its channels: [f0 f1 … f0 f1 …] or [f0 f0 f1 f1 …].
            let emb = if interleaved {
                Tensor::stack(&[&freqs, &freqs], 2)?.reshape((positions.dim(0)?, rot_dim))?
            } else {
                Tensor::cat(&[&freqs, &freqs], 1)?
            };
            Ok(((emb.cos()? * attention)?, (emb.sin()? * attention)?))
        };
        let (cos, sin) = tables(rope.scaling.inv_freqs(rope.theta, rot_dim), max_positions)?;
        let short = match rope.scaling.short_context(rope.theta, rot_dim) {
            Some((length, inv_freq)) => {
                let (cos, sin) = tables(inv_freq, length.min(max_positions))?;
                Some((length, cos, sin))
            }
            None => None,
        };
        Ok(Self {
            cos,
            sin,
            short,
            rot_dim,
            interleaved,
            rope: rope.clone(),
        })
    }

    /// The sequence length past which a pass switches to LongRoPE's long-context frequencies
    /// (keys cached by a shorter pass are then stale); `None` for every other scaling.
    pub fn switch_length(&self) -> Option<usize> {
        self.short.as_ref().map(|(length, ..)| *length)
    }

    /// The base and scaling the tables were built from.
    pub fn rope(&self) -> &super::config::Rope {
        &self.rope
    }

    /// Whether channel pairs are neighbours (GPT-J) rather than halves apart.
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// How many channels of each head rotate (fewer than `head_dim` under partial rotary).
    pub fn rot_dim(&self) -> usize {
        self.rot_dim
    }

    /// `x`: `[batch, heads, seq, head_dim]` at `positions`.
    fn apply(&self, x: &Tensor, positions: &Positions) -> candle_core::Result<Tensor> {
        let (b, _, seq, head_dim) = x.dims4()?;
        // transformers picks LongRoPE's table by the pass's last position, for all its tokens.
        let end = match positions {
            Positions::From(offset) => offset + seq,
            Positions::PerRow { starts, .. } => starts.iter().max().map_or(0, |s| s + seq),
        };
        let (table_cos, table_sin) = match &self.short {
            Some((length, cos, sin)) if end <= *length => (cos, sin),
            _ => (&self.cos, &self.sin),
        };
        let (cos, sin) = match positions {
            Positions::From(offset) => (
                table_cos.narrow(0, *offset, seq)?,
                table_sin.narrow(0, *offset, seq)?,
            ),
            // [b, 1, seq, rot_dim]: one row of angles per batch row, broadcast over heads.
            Positions::PerRow { ids, .. } => (
                table_cos
                    .index_select(ids, 0)?
                    .reshape((b, 1, seq, self.rot_dim))?,
                table_sin
                    .index_select(ids, 0)?
                    .reshape((b, 1, seq, self.rot_dim))?,
            ),
        };
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        let x_rot = x.narrow(D::Minus1, 0, self.rot_dim)?;
        let half = self.rot_dim / 2;
        let rotated = if self.interleaved {
            // (x₀, x₁, x₂, x₃, …) → (−x₁, x₀, −x₃, x₂, …)
            let pairs = x_rot.reshape((b, x.dim(1)?, seq, half, 2))?;
            let (even, odd) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
            Tensor::cat(&[&odd.neg()?, &even], 4)?.reshape((b, x.dim(1)?, seq, self.rot_dim))?
        } else {
            let x1 = x_rot.narrow(D::Minus1, 0, half)?;
            let x2 = x_rot.narrow(D::Minus1, half, half)?;
            Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?
        };
        let out = (x_rot.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        if self.rot_dim == head_dim {
            Ok(out)
        } else {
            let pass = x.narrow(D::Minus1, self.rot_dim, head_dim - self.rot_dim)?;
            Tensor::cat(&[&out, &pass], D::Minus1)
        }
    }
}

/// Multi-head attention with grouped KV heads, with q, k and v fused into one projection whose
/// output rows are `[q (n_heads·head_dim); k (n_kv_heads·head_dim); v (n_kv_heads·head_dim)]`.
#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub out: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rotary: Option<Rotary>,
    /// Keys more than this many positions back are masked (Mistral).
    pub sliding_window: Option<usize>,
    /// Norms over each query and key head before the rotary embedding (Qwen3 and Gemma 3's
    /// RMSNorms, Phi's LayerNorms).
    pub qk_norm: Option<(Norm, Norm)>,
    /// Whether those norms each span all heads' projection at once rather than one head
    /// (OLMo 2's `q_norm` over `n_heads·d_head`).
    pub qk_norm_over_heads: bool,
    /// Multiplier on `q·kᵀ`: `1/√d_head`, Gemma 2/3's `1/√query_pre_attn_scalar`, or 1
    /// (GPT-Neo leaves its scores unscaled).
    pub scale: f64,
    /// Gemma 2's `cap · tanh(scores / cap)` on the scaled scores, before the mask.
    pub softcap: Option<f64>,
    /// OLMo 1's clamp of every query, key and value projection to `[−clip, clip]`, after the
    /// `hook_q` / `hook_k` / `hook_v` hooks (which hold the raw projections, as in
    /// TransformerLens).
    pub clip_qkv: Option<f64>,
}

/// Keys and values of one layer for all positions seen so far: `[batch, n_kv_heads, t, head_dim]`.
pub type LayerKv = Option<(Tensor, Tensor)>;

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        kv: &mut LayerKv,
        positions: &Positions,
        mask: &Tensor,
        hooks: &mut HookRunner,
    ) -> candle_core::Result<Tensor> {
        let needs_grad = hooks.needs_grad();
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // Heads as views of the projection's buffer: [b, s, heads, hd] → [b, heads, s, hd].
        let qkv = linear(x, &self.qkv)?.reshape((b, s, nh + 2 * nkv, hd))?;
        let mut split = |point: fn(usize) -> HookPoint, start: usize, heads: usize| {
            hook_heads(
                hooks,
                point(layer),
                qkv.narrow(2, start, heads)?.transpose(1, 2)?,
            )
        };
        let mut q = split(HookPoint::AttnQ, 0, nh)?;
        let mut k = split(HookPoint::AttnK, nh, nkv)?;
        let mut v = split(HookPoint::AttnV, nh + nkv, nkv)?;
        if let Some(clip) = self.clip_qkv {
            // After the hooks, as transformers clamps what its projections (and so
            // TransformerLens's hooks) return.
            (q, k, v) = (
                q.clamp(-clip, clip)?,
                k.clamp(-clip, clip)?,
                v.clamp(-clip, clip)?,
            );
        }
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            if self.qk_norm_over_heads {
                q = norm_over_heads(q_norm, &q, needs_grad)?;
                k = norm_over_heads(k_norm, &k, needs_grad)?;
            } else {
                // Over head_dim, the last axis of `[b, heads, s, hd]`.
                q = q_norm.forward(&q.contiguous()?, needs_grad)?;
                k = k_norm.forward(&k.contiguous()?, needs_grad)?;
            }
            q = hook_heads(hooks, HookPoint::AttnQNormed(layer), q)?;
            k = hook_heads(hooks, HookPoint::AttnKNormed(layer), k)?;
        }
        if let Some(rotary) = &self.rotary {
            q = rotary.apply(&q.contiguous()?, positions)?;
            k = rotary.apply(&k.contiguous()?, positions)?;
            q = hook_heads(hooks, HookPoint::AttnRotQ(layer), q)?;
            k = hook_heads(hooks, HookPoint::AttnRotK(layer), k)?;
        }
        if let Some((past_k, past_v)) = kv.as_ref() {
            k = Tensor::cat(&[past_k, &k], 2)?;
            v = Tensor::cat(&[past_v, &v], 2)?;
        }
        *kv = Some((k.clone(), v.clone()));
        let scale = self.scale;
        let scores_point = HookPoint::AttnScores(layer);
        let pattern_point = HookPoint::AttnPattern(layer);
        // The fused kernel masks causally from one offset (ragged rows take the mask) and never
        // forms the scores or the pattern.
        let formed = hooks.touches(scores_point) || hooks.touches(pattern_point);
        if let (false, false, Positions::From(offset)) = (needs_grad, formed, positions) {
            let fused = kernels::causal_attention(
                &q,
                &k,
                &v,
                scale as f32,
                *offset,
                self.sliding_window,
                self.softcap.map(|cap| cap as f32),
            )?;
            if let Some(z) = fused {
                let z = hooks.hook(HookPoint::AttnZ(layer), z)?; // [b, s, heads·hd]
                return linear(&z, &self.out);
            }
        }
        let mut scores = attention_scores(&q, &k, mask, scale, self.softcap)?;
        if hooks.touches(scores_point) {
            // The mask again after the interventions: none may unmask a key.
            scores = hooks.hook(scores_point, scores)?.broadcast_add(mask)?; // [b, heads, s, t]
        }
        let pattern = softmax(&scores, needs_grad)?;
        let pattern = hooks.hook(pattern_point, pattern)?; // [b, heads, s, t]
        let z = weighted_values(&pattern, &v, q.dtype())?;
        let z = hooks.hook(HookPoint::AttnZ(layer), z)?; // [b, s, heads·hd]
        linear(&z, &self.out)
    }
}

/// `norm` over every head of `x` (`[batch, heads, seq, head_dim]`) at once: the heads merged
/// side by side, normalised, and split again.
fn norm_over_heads(norm: &Norm, x: &Tensor, needs_grad: bool) -> candle_core::Result<Tensor> {
    let (b, heads, s, hd) = x.dims4()?;
    let merged = x.transpose(1, 2)?.reshape((b, s, heads * hd))?;
    norm.forward(&merged, needs_grad)?
        .reshape((b, s, heads, hd))?
        .transpose(1, 2)
}

/// The hook at a per-head point (`attn.hook_q`, `hook_k`, `hook_v`, `hook_rot_q`, `hook_rot_k`):
/// `x` is `[batch, heads, seq, head_dim]`, the hook sees `[batch, seq, heads·head_dim]` like every
/// per-token point. Untouched points pass `x` through without the copy the merge costs.
fn hook_heads(hooks: &mut HookRunner, point: HookPoint, x: Tensor) -> candle_core::Result<Tensor> {
    if !hooks.touches(point) {
        return Ok(x);
    }
    let (b, heads, s, hd) = x.dims4()?;
    let merged = x.transpose(1, 2)?.reshape((b, s, heads * hd))?;
    hooks
        .hook(point, merged)?
        .reshape((b, s, heads, hd))?
        .transpose(1, 2)
}

/// `softmax(q·kᵀ·scale + mask)·v` (scores soft-capped with a `softcap`) with the heads merged
/// (`[batch, seq, heads·head_dim]`),
/// composed from candle ops, on any device and dtype. `q` is `[batch, heads,
/// seq, head_dim]`, `k` and `v` `[batch, kv_heads, total, head_dim]`, `mask` `[seq, total]`
/// (or `[batch, 1, seq, total]` for ragged rows). The reference the fused kernel is tested
/// against.
#[cfg(test)]
pub(super) fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let pattern = softmax(&attention_scores(q, k, mask, scale, softcap)?, false)?;
    weighted_values(&pattern, v, q.dtype())
}

/// Grouped-query heads: each of `x`'s kv heads (`[batch, kv_heads, total, head_dim]`) serves
/// `heads / kv_heads` query heads; returns `[batch, heads, total, head_dim]`.
fn repeat_kv(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, nkv, t, hd) = x.dims4()?;
    if nkv == heads {
        return Ok(x.clone());
    }
    x.unsqueeze(2)?
        .expand((b, nkv, heads / nkv, t, hd))?
        .reshape((b, heads, t, hd))
}

/// `q·kᵀ·scale + mask` (soft-capped before the mask with a `softcap`): the attention scores
/// `[batch, heads, seq, total]`, in f32 (or f64) whatever the run dtype, −∞ where the mask
/// hides a key.
fn attention_scores(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let k = repeat_kv(k, q.dim(1)?)?;
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let mut scores = upcast(&scores)?;
    if let Some(cap) = softcap {
        scores = soft_cap(&scores, cap)?;
    }
    scores.broadcast_add(mask)
}

/// `cap · tanh(x / cap)`: Gemma 2's bound on attention scores and logits.
pub fn soft_cap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// The attention pattern from the scores: a softmax over keys.
fn softmax(scores: &Tensor, needs_grad: bool) -> candle_core::Result<Tensor> {
    if needs_grad {
        candle_nn::ops::softmax(scores, LAST)
    } else {
        candle_nn::ops::softmax_last_dim(scores)
    }
}

/// `pattern·v` with the heads merged: `[batch, seq, heads·head_dim]` in `dtype`.
fn weighted_values(pattern: &Tensor, v: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, nh, s, _) = pattern.dims4()?;
    let v = repeat_kv(v, nh)?;
    let hd = v.dim(3)?;
    let y = pattern.to_dtype(dtype)?.matmul(&v.contiguous()?)?;
    y.transpose(1, 2)?.reshape((b, s, nh * hd))
}

/// `[seq, total]` additive mask: 0 where query `i` (absolute `offset + i`) may see key `j`,
/// −∞ elsewhere. With a window `w`, a query sees itself and the `w − 1` keys before it.
/// Built as f32; callers convert it once to the dtype attention scores are computed in.
pub(super) fn causal_mask(
    seq: usize,
    total: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| {
            let q = offset + i;
            (0..total).map(move |j| {
                let visible = j <= q && window.is_none_or(|w| q - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    Tensor::from_vec(data, (seq, total), device)
}

/// `[batch, 1, seq, total]` additive mask for ragged rows: query `i` of row `r` sits at
/// `starts[r] + i`; cached slot `j` holds position `slots[r][j]` (`None`: padding, never
/// visible) and the call's own tokens follow the `cached` slots.
fn ragged_mask(
    slots: &[Vec<Option<usize>>],
    starts: &[usize],
    seq: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let cached = slots.first().map_or(0, Vec::len);
    let total = cached + seq;
    let mut data = Vec::with_capacity(slots.len() * seq * total);
    for (row, &start) in slots.iter().zip(starts) {
        for i in 0..seq {
            let q = start + i;
            let key_positions = row.iter().copied().chain((0..seq).map(|j| Some(start + j)));
            data.extend(key_positions.map(|k| {
                let visible = k.is_some_and(|k| k <= q && window.is_none_or(|w| q - k < w));
                if visible { 0.0 } else { f32::NEG_INFINITY }
            }));
        }
    }
    Tensor::from_vec(data, (slots.len(), 1, seq, total), device)
}

/// The absolute positions of a forward call's new tokens.
#[derive(Clone, Debug)]
enum Positions {
    /// Every row's tokens start at the same position.
    From(usize),
    /// Row `r`'s tokens start at `starts[r]` (a batch merged from rows of different lengths,
    /// [`KvCache::merge_rows`]); `ids` is every token's position, `[batch·seq]` u32.
    PerRow { starts: Vec<usize>, ids: Tensor },
}

/// The feed-forward network.
#[derive(Clone, Debug)]
pub enum Mlp {
    /// `proj(act(fc(x)))` (GPT-2, GPT-NeoX).
    Plain {
        fc: Linear,
        proj: Linear,
        act: Activation,
    },
    /// `down(act(gate(x)) · up(x))` (Llama, Mistral, Qwen2: SwiGLU; Gemma: GeGLU).
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        hooks: &mut HookRunner,
    ) -> candle_core::Result<Tensor> {
        let x = &hooks.hook(HookPoint::MlpIn(layer), x.clone())?; // [b, s, d_model]
        match self {
            Self::Plain { fc, proj, act } => {
                let pre = hooks.hook(HookPoint::MlpPre(layer), linear(x, fc)?)?; // [b, s, d_mlp]
                let post = hooks.hook(HookPoint::MlpPost(layer), act.forward(&pre)?)?; // [b, s, d_mlp]
                linear(&post, proj)
            }
            Self::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let pre = hooks.hook(HookPoint::MlpPre(layer), linear(x, gate)?)?; // [b, s, d_mlp]
                let up = hooks.hook(HookPoint::MlpPreLinear(layer), linear(x, up)?)?; // [b, s, d_mlp]
                let post = (act.forward(&pre)? * up)?;
                let post = hooks.hook(HookPoint::MlpPost(layer), post)?; // [b, s, d_mlp]
                linear(&post, down)
            }
        }
    }

    /// The down projection, whose input is `mlp.hook_post`: ROME's edit target.
    pub fn down_proj(&self) -> &Linear {
        match self {
            Self::Plain { proj, .. } => proj,
            Self::Gated { down, .. } => down,
        }
    }

    /// Replaces the down projection's weight (`[d_model, d_mlp]`, Linear layout), keeping its
    /// bias: how an edit is applied and undone.
    pub fn set_down_proj_weight(&mut self, weight: Tensor) {
        let slot = match self {
            Self::Plain { proj, .. } => proj,
            Self::Gated { down, .. } => down,
        };
        *slot = Linear::new(weight, slot.bias().cloned());
    }
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    pub ln_attn: Norm,
    pub attn: Attention,
    pub ln_mlp: Norm,
    pub mlp: Mlp,
    /// Where the down projection's weight lives in the checkpoint, so an edited model can be
    /// written back in the layout it came in.
    pub down_proj_source: WeightSource,
    /// GPT-NeoX's `x + attn(ln1(x)) + mlp(ln2(x))` (no `hook_resid_mid`).
    pub parallel_residual: bool,
    /// GPT-J's parallel block with one norm: the MLP reads the attention's normalised input
    /// (`ln_mlp` is then the identity, and there are no `ln2` hooks).
    pub shared_input_norm: bool,
    /// Gemma 2/3's norms on the attention and MLP outputs before they join the residual
    /// stream (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub post_norms: Option<(Norm, Norm)>,
}

/// A weight's key in the checkpoint and its layout there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WeightSource {
    pub key: String,
    /// Stored `[in, out]` (GPT-2's `Conv1D`) rather than `[out, in]` (`Linear`).
    pub transposed: bool,
}

impl Block {
    fn forward(
        &self,
        resid_pre: Tensor,
        layer: usize,
        kv: &mut LayerKv,
        positions: &Positions,
        mask: &Tensor,
        hooks: &mut HookRunner,
    ) -> candle_core::Result<Tensor> {
        let resid_pre = hooks.hook(HookPoint::ResidPre(layer), resid_pre)?; // [b, s, d_model]
        let (ln2_scale, ln2_normalized) =
            (HookPoint::Ln2Scale(layer), HookPoint::Ln2Normalized(layer));
        let attn_in = self.ln_attn.forward_hooked(
            &resid_pre,
            hooks,
            HookPoint::Ln1Scale(layer),
            HookPoint::Ln1Normalized(layer),
        )?;
        let attn_out = self
            .attn
            .forward(&attn_in, layer, kv, positions, mask, hooks)?;
        let attn_out = post_norm(
            self.post_norms.as_ref().map(|(after_attn, _)| after_attn),
            attn_out,
            hooks,
            [
                HookPoint::Ln1PostIn(layer),
                HookPoint::Ln1PostScale(layer),
                HookPoint::Ln1PostNormalized(layer),
            ],
        )?;
        let attn_out = hooks.hook(HookPoint::AttnOut(layer), attn_out)?; // [b, s, d_model]
        let resid_post = if self.parallel_residual {
            let mlp_in = if self.shared_input_norm {
                attn_in
            } else {
                self.ln_mlp
                    .forward_hooked(&resid_pre, hooks, ln2_scale, ln2_normalized)?
            };
            let mlp_out = self.mlp.forward(&mlp_in, layer, hooks)?;
            let mlp_out = hooks.hook(HookPoint::MlpOut(layer), mlp_out)?; // [b, s, d_model]
            ((resid_pre + attn_out)? + mlp_out)?
        } else {
            let resid_mid = hooks.hook(HookPoint::ResidMid(layer), (resid_pre + attn_out)?)?; // [b, s, d_model]
            let mlp_in =
                self.ln_mlp
                    .forward_hooked(&resid_mid, hooks, ln2_scale, ln2_normalized)?;
            let mlp_out = self.mlp.forward(&mlp_in, layer, hooks)?;
            let mlp_out = post_norm(
                self.post_norms.as_ref().map(|(_, after_mlp)| after_mlp),
                mlp_out,
                hooks,
                [
                    HookPoint::Ln2PostIn(layer),
                    HookPoint::Ln2PostScale(layer),
                    HookPoint::Ln2PostNormalized(layer),
                ],
            )?;
            let mlp_out = hooks.hook(HookPoint::MlpOut(layer), mlp_out)?; // [b, s, d_model]
            (resid_mid + mlp_out)?
        };
        hooks.hook(HookPoint::ResidPost(layer), resid_post) // [b, s, d_model]
    }
}

/// A sublayer's output through the norm after it, if the block has one (Gemma 2/3), with the
/// norm's three hook points `[input, scale, normalized]`; without one, the output as it is.
fn post_norm(
    norm: Option<&Norm>,
    out: Tensor,
    hooks: &mut HookRunner,
    [input, scale, normalized]: [HookPoint; 3],
) -> candle_core::Result<Tensor> {
    match norm {
        Some(norm) => {
            let raw = hooks.hook(input, out)?; // [b, s, d_model]
            norm.forward_hooked(&raw, hooks, scale, normalized)
        }
        None => Ok(out),
    }
}

/// Shape facts about a loaded model, for `info` and for sizing buffers.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Dims {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_mlp: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Longest sequence the model accepts (its position table / rotary range).
    pub context_length: usize,
}

/// A decoder-only transformer with hook points, built by an architecture file.
#[derive(Clone, Debug)]
pub struct Transformer {
    /// `[vocab, d_model]`.
    pub embed: Tensor,
    /// `[context, d_model]` learned positions (GPT-2, GPT-Neo).
    pub pos_embed: Option<Tensor>,
    /// Multiplier on token embeddings (Gemma: √d_model, rounded to the run dtype).
    pub embed_scale: Option<f64>,
    pub blocks: Vec<Block>,
    pub ln_final: Norm,
    /// `[vocab, d_model]`; the same tensor as `embed` when embeddings are tied.
    pub unembed: Tensor,
    /// `[vocab]`: the `lm_head` bias of GPT-J and Phi.
    pub unembed_bias: Option<Tensor>,
    pub tied_embeddings: bool,
    /// Gemma 2's `cap · tanh(logits / cap)` on the output logits.
    pub logit_softcap: Option<f64>,
    pub dims: Dims,
}

/// Keys and values for every layer, for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// For a batch merged from rows of different lengths ([`KvCache::merge_rows`]): the
    /// absolute position each slot of each row holds, `None` for padding. `None` when every
    /// row's slot `j` is position `j`.
    slots: Option<Vec<Vec<Option<usize>>>>,
}

impl KvCache {
    /// Number of slots already filled (positions, plus padding in a merged batch).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|kv| kv.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One batch from single-row caches of different lengths, each row padded at its end and
    /// the padding masked: a forward call continuing it puts row `r`'s tokens at the
    /// positions that follow row `r`'s own, as if each row were run alone. How ROME's v*
    /// runs each rewriting prompt's constant prefix once and differentiates only the rest.
    /// Empty rows (nothing run yet) are all padding. Interventions at given positions count
    /// from the cache's slot count, padding included.
    pub fn merge_rows(rows: &[KvCache]) -> candle_core::Result<KvCache> {
        let longest = rows.iter().map(KvCache::len).max().unwrap_or(0);
        let Some(shape_row) = rows.iter().find(|r| !r.is_empty()) else {
            return Ok(KvCache {
                layers: Vec::new(),
                slots: Some(vec![Vec::new(); rows.len()]),
            });
        };
        let n_layers = shape_row.layers.len();
        let mut slots = Vec::with_capacity(rows.len());
        for row in rows {
            let plain = row.slots.is_none() && (row.is_empty() || row.layers.len() == n_layers);
            if !plain {
                candle_core::bail!("merge_rows: every row must be a plain cache of every layer");
            }
            let len = row.len();
            slots.push((0..longest).map(|j| (j < len).then_some(j)).collect());
        }
        let mut layers = Vec::with_capacity(n_layers);
        for layer in 0..n_layers {
            let Some((k0, _)) = &shape_row.layers[layer] else {
                candle_core::bail!("merge_rows: layer {layer} was never run");
            };
            let (_, heads, _, hd) = k0.dims4()?;
            // `[1, heads, longest, hd]`: the row's slots, then zeros.
            let pad = |x: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let len = x.map_or(Ok(0), |x| x.dim(2))?;
                let zeros = Tensor::zeros((1, heads, longest - len, hd), k0.dtype(), k0.device())?;
                match x {
                    Some(x) if len == longest => Ok(x.clone()),
                    Some(x) => Tensor::cat(&[x, &zeros], 2),
                    None => Ok(zeros),
                }
            };
            let mut keys = Vec::with_capacity(rows.len());
            let mut values = Vec::with_capacity(rows.len());
            for row in rows {
                let kv = match row.layers.get(layer) {
                    Some(Some((k, v))) => Some((k, v)),
                    Some(None) => candle_core::bail!("merge_rows: layer {layer} was never run"),
                    None => None, // an empty row
                };
                if let Some((k, _)) = kv
                    && k.dim(0)? != 1
                {
                    candle_core::bail!("merge_rows: a row's cache holds {} rows", k.dim(0)?);
                }
                keys.push(pad(kv.map(|(k, _)| k))?);
                values.push(pad(kv.map(|(_, v)| v))?);
            }
            layers.push(Some((Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?)));
        }
        Ok(KvCache {
            layers,
            slots: Some(slots),
        })
    }
}

impl Transformer {
    /// The sequence length past which LongRoPE switches every layer to its long-context
    /// frequencies, so that keys cached at or below it no longer match a fresh pass.
    pub fn rope_switch_length(&self) -> Option<usize> {
        (self.blocks.iter())
            .filter_map(|b| b.attn.rotary.as_ref()?.switch_length())
            .min()
    }

    /// The hook points this model has, in forward order.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        let mut points = vec![HookPoint::Embed];
        if self.pos_embed.is_some() {
            points.push(HookPoint::PosEmbed);
        }
        for (l, block) in self.blocks.iter().enumerate() {
            points.push(HookPoint::ResidPre(l));
            if !block.ln_attn.is_identity() {
                points.extend([HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l)]);
            }
            points.extend([
                HookPoint::AttnQ(l),
                HookPoint::AttnK(l),
                HookPoint::AttnV(l),
            ]);
            if block.attn.qk_norm.is_some() {
                points.extend([HookPoint::AttnQNormed(l), HookPoint::AttnKNormed(l)]);
            }
            if block.attn.rotary.is_some() {
                points.extend([HookPoint::AttnRotQ(l), HookPoint::AttnRotK(l)]);
            }
            points.extend([
                HookPoint::AttnScores(l),
                HookPoint::AttnPattern(l),
                HookPoint::AttnZ(l),
            ]);
            if block.post_norms.is_some() {
                points.extend([
                    HookPoint::Ln1PostIn(l),
                    HookPoint::Ln1PostScale(l),
                    HookPoint::Ln1PostNormalized(l),
                ]);
            }
            points.push(HookPoint::AttnOut(l));
            if !block.parallel_residual {
                points.push(HookPoint::ResidMid(l));
            }
            if !block.ln_mlp.is_identity() {
                points.extend([HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l)]);
            }
            points.extend([HookPoint::MlpIn(l), HookPoint::MlpPre(l)]);
            if matches!(block.mlp, Mlp::Gated { .. }) {
                points.push(HookPoint::MlpPreLinear(l));
            }
            points.push(HookPoint::MlpPost(l));
            if block.post_norms.is_some() {
                points.extend([
                    HookPoint::Ln2PostIn(l),
                    HookPoint::Ln2PostScale(l),
                    HookPoint::Ln2PostNormalized(l),
                ]);
            }
            points.extend([HookPoint::MlpOut(l), HookPoint::ResidPost(l)]);
        }
        points.extend([HookPoint::LnFinalScale, HookPoint::LnFinal]);
        points
    }

    /// `input_ids`: `[batch, seq]` u32. Returns logits `[batch, seq, vocab]`. With `kv`, the
    /// ids continue the cached positions and the cache is extended.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        kv: Option<&mut KvCache>,
        hooks: &mut HookRunner,
    ) -> candle_core::Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let d = self.dims.d_model;
        let mut scratch = KvCache::default();
        let kv = kv.unwrap_or(&mut scratch);
        if kv.layers.len() != self.blocks.len() {
            kv.layers = vec![None; self.blocks.len()];
        }
        let offset = hooks.offset;
        let positions = match &kv.slots {
            None => Positions::From(offset),
            Some(slots) => {
                if slots.len() != b {
                    candle_core::bail!("a cache of {} rows continued by {b}", slots.len());
                }
                let starts: Vec<usize> = slots
                    .iter()
                    .map(|row| row.iter().flatten().max().map_or(0, |p| p + 1))
                    .collect();
                let ids: Vec<u32> = starts
                    .iter()
                    .flat_map(|&start| (start..start + s).map(|p| p as u32))
                    .collect();
                let ids = Tensor::from_vec(ids, b * s, input_ids.device())?;
                Positions::PerRow { starts, ids }
            }
        };
        let mut x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let mut x = hooks.hook(HookPoint::Embed, x)?; // [b, s, d_model]
        if let Some(pos) = &self.pos_embed {
            let p = match &positions {
                Positions::From(offset) => pos
                    .narrow(0, *offset, s)?
                    .unsqueeze(0)?
                    .broadcast_as((b, s, d))?,
                Positions::PerRow { ids, .. } => pos.index_select(ids, 0)?.reshape((b, s, d))?,
            };
            let p = hooks.hook(HookPoint::PosEmbed, p.contiguous()?)?; // [b, s, d_model]
            x = (x + p)?;
        }
        // One mask per distinct attention window, built once per call rather than per layer,
        // in the dtype the scores are computed in (f32, or f64 for f64 runs).
        let total = offset + s;
        let score_dtype = upcast(&x)?.dtype();
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for (layer, (block, layer_kv)) in self.blocks.iter().zip(kv.layers.iter_mut()).enumerate() {
            if hooks.stop_at_layer() == Some(layer) {
                return Ok(x);
            }
            let window = block.attn.sliding_window;
            let mask = match masks.iter().position(|(w, _)| *w == window) {
                Some(i) => &masks[i].1,
                None => {
                    let m = match (&positions, &kv.slots) {
                        (Positions::PerRow { starts, .. }, Some(slots)) => {
                            ragged_mask(slots, starts, s, window, x.device())?
                        }
                        _ => causal_mask(s, total, offset, window, x.device())?,
                    };
                    masks.push((window, m.to_dtype(score_dtype)?));
                    &masks[masks.len() - 1].1
                }
            };
            x = block.forward(x, layer, layer_kv, &positions, mask, hooks)?;
        }
        if let (Positions::PerRow { starts, .. }, Some(slots)) = (&positions, &mut kv.slots) {
            for (row, &start) in slots.iter_mut().zip(starts) {
                row.extend((start..start + s).map(Some));
            }
        }
        let x =
            self.ln_final
                .forward_hooked(&x, hooks, HookPoint::LnFinalScale, HookPoint::LnFinal)?; // [b, s, d_model]
        self.logits(&x)
    }

    /// The logits of final-norm outputs `[.., d_model]`: the unembedding, soft-capped where the
    /// model caps them (Gemma 2). Lenses read intermediate streams through this too.
    pub fn logits(&self, normed: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.raw_logits(normed)?;
        match self.logit_softcap {
            Some(cap) => soft_cap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// The logits before any soft-cap: the unembedding and its bias, in `normed`'s dtype.
    pub fn raw_logits(&self, normed: &Tensor) -> candle_core::Result<Tensor> {
        let bias = (self.unembed_bias.as_ref())
            .map(|b| b.to_dtype(normed.dtype()))
            .transpose()?;
        linear(
            normed,
            &Linear::new(self.unembed.to_dtype(normed.dtype())?, bias),
        )
    }

    /// Total parameter count (tied embeddings counted once).
    pub fn parameter_count(&self) -> usize {
        let linear = |l: &Linear| l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count());
        let norm = Norm::parameter_count;
        let mut n = self.embed.elem_count() + norm(&self.ln_final);
        n += self.pos_embed.as_ref().map_or(0, |p| p.elem_count());
        if !self.tied_embeddings {
            n += self.unembed.elem_count();
        }
        n += self.unembed_bias.as_ref().map_or(0, Tensor::elem_count);
        for b in &self.blocks {
            n += norm(&b.ln_attn) + norm(&b.ln_mlp);
            if let Some((a, m)) = &b.post_norms {
                n += norm(a) + norm(m);
            }
            n += linear(&b.attn.qkv) + linear(&b.attn.out);
            if let Some((q, k)) = &b.attn.qk_norm {
                n += norm(q) + norm(k);
            }
            n += match &b.mlp {
                Mlp::Plain { fc, proj, .. } => linear(fc) + linear(proj),
                Mlp::Gated { gate, up, down, .. } => linear(gate) + linear(up) + linear(down),
            };
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linear rope scaling is position interpolation: position 2p with factor 2 is position p.
    #[test]
    fn linear_rope_scaling_interpolates_positions() {
        use super::super::config::{Rope, RopeScaling};
        let rotary = |scaling| {
            let rope = Rope {
                theta: 500.0,
                scaling,
            };
            Rotary::new(16, &rope, 32, &Device::Cpu).unwrap()
        };
        let plain = rotary(RopeScaling::None);
        let halved = rotary(RopeScaling::Linear { factor: 2.0 });
        let even: Vec<u32> = (0..16).map(|p| 2 * p).collect();
        let even = Tensor::new(even.as_slice(), &Device::Cpu).unwrap();
        let scaled = halved.cos.index_select(&even, 0).unwrap();
        let diff = (scaled - plain.cos.narrow(0, 0, 16).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        assert!(
            halved.cos.get(1).unwrap().to_vec1::<f32>().unwrap()
                != plain.cos.get(1).unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn causal_mask_respects_offset_and_window() {
        let m = causal_mask(2, 4, 2, None, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][2], 0.0);
        assert!(m[0][3].is_infinite());
        assert!(m[1].iter().all(|v| *v == 0.0));
        let w = causal_mask(4, 4, 0, Some(2), &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(w[3][2], 0.0);
        assert_eq!(w[3][3], 0.0);
        assert!(w[3][1].is_infinite());
    }

    #[test]
    fn a_constant_weight_passes_the_same_values_and_input_gradients_as_a_variable_one() {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let as_constant = Linear::new(w.clone(), Some(b.clone()));
        let w_var = candle_core::Var::from_tensor(&w).unwrap();
        let as_variable = Linear::new(w_var.as_tensor().clone(), Some(b));
        // A loss that weighs every output differently, so a wrong gradient shows.
        let weights = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let run = |l: &Linear| {
            let y = linear(x.as_tensor(), l).unwrap();
            let loss = (y.sqr().unwrap() * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone(), grads)
        };
        let (y_const, g_const, _) = run(&as_constant);
        let (y_var, g_var, grads_var) = run(&as_variable);
        let max_diff = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        assert_eq!(max_diff(&y_const, &y_var), 0.0);
        assert!(max_diff(&g_const, &g_var) < 1e-5);
        // Training still reaches the weight.
        assert!(grads_var.get(w_var.as_tensor()).is_some());
    }

    #[test]
    fn fused_and_differentiable_norms_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.2, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 8, &dev).unwrap();
        for norm in [
            Norm::layer_norm(w.clone(), b, 1e-5),
            Norm::rms_norm(w.clone(), 1e-6),
        ] {
            let fast = norm.forward(&x, false).unwrap();
            let slow = norm.forward(&x, true).unwrap();
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
