//! Hook points with TransformerLens names, and the one mechanism that serves capture,
//! intervention and gradients.
//!
//! Every block calls [`HookRunner::hook`] at each of its hook points. With no hook set for a
//! point the call returns its input untouched, so an un-hooked forward pass pays one set lookup
//! per point. Hooks are scoped to a single forward call: a [`Hooks`] value describes what to do,
//! and the cache and gradient leaves come back in the forward output — nothing global to forget
//! to remove (the trap TransformerLens' `run_with_hooks` guards against).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Device, Tensor, Var};

use crate::error::{Error, Result};

/// A named place in the forward pass. Tensors at every point are `[batch, seq, d]`, where `d` is
/// `d_model`, `d_mlp` for the two `mlp.*` points, `n_heads·d_head` for `attn.hook_z`,
/// `attn.hook_q` and `attn.hook_rot_q`, `n_kv_heads·d_head` for the keys and values, or 1 for a
/// norm's `hook_scale` — except `attn.hook_attn_scores` and `attn.hook_pattern`, which are
/// `[batch, n_heads, query, key]` as in TransformerLens. Heads are
/// side by side in the last dimension (TransformerLens keeps them as a separate axis,
/// `[batch, pos, head, d_head]`; reshape to compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings (scaled, for Gemma) — `[batch, seq, d_model]`.
    Embed,
    /// `hook_pos_embed`: learned position embeddings (GPT-2, GPT-Neo) — `[batch, seq, d_model]`.
    PosEmbed,
    /// `blocks.L.hook_resid_pre`: the residual stream entering block L.
    ResidPre(usize),
    /// `blocks.L.ln1.hook_scale`: the attention norm's divisor per token, `sqrt(var + eps)`
    /// (LayerNorm) or the RMS (RMSNorm) — `[.., 1]`. Replacing it with another run's value
    /// freezes the norm, which makes the block's input linear in the residual stream (direct
    /// logit attribution and attribution patching assume exactly this). Asking for it runs
    /// the norm unfused. Absent where blocks have no input norm (OLMo 2).
    Ln1Scale(usize),
    /// `blocks.L.ln1.hook_normalized`: the attention norm's input centred (LayerNorm) and
    /// divided by `hook_scale`, before the gain and bias — TransformerLens's convention (its
    /// default checkpoints fold the gain into the next weights, so this is what they hook).
    Ln1Normalized(usize),
    /// `blocks.L.attn.hook_q`: every head's query as projected, before rotary (and before the
    /// per-head norm of models that have one) — `[.., n_heads·d_head]`.
    /// Query-side patching and QK-circuit work act here (and at `hook_rot_q`).
    AttnQ(usize),
    /// `blocks.L.attn.hook_k`: every key head's key at the current positions as projected,
    /// before rotary and any per-head norm (with a KV cache, earlier positions were hooked
    /// when they were computed) — `[.., n_kv_heads·d_head]`.
    AttnK(usize),
    /// `blocks.L.attn.hook_v`: every key head's value — `[.., n_kv_heads·d_head]`. (OLMo 1
    /// clamps q, k and v by `clip_qkv` after these three hooks, as transformers does.)
    AttnV(usize),
    /// `blocks.L.attn.hook_q_normed`: queries after their RMSNorm (Qwen3, Gemma 3: per head;
    /// OLMo 2: over all heads at once), before
    /// rotary — TransformerLens's name.
    AttnQNormed(usize),
    /// `blocks.L.attn.hook_k_normed`: keys after their RMSNorm (Qwen3, Gemma 3, OLMo 2).
    AttnKNormed(usize),
    /// `blocks.L.attn.hook_rot_q`: queries after the rotary embedding (rotary models only): what
    /// the attention scores are actually computed from.
    AttnRotQ(usize),
    /// `blocks.L.attn.hook_rot_k`: keys after the rotary embedding (rotary models only).
    AttnRotK(usize),
    /// `blocks.L.attn.hook_attn_scores`: every head's scaled, masked scores `q·kᵀ/√d_head`
    /// (Gemma 2/3: `/√query_pre_attn_scalar`, capped; GPT-Neo: unscaled)
    /// before the softmax, `[batch, n_heads, query, key]` in f32 (masked keys hold −∞, as in
    /// TransformerLens). Interventions select query positions and heads like the pattern's;
    /// the mask is applied again after them, so no intervention lets a query see a later (or
    /// out-of-window) key — zeroing a head's scores gives it uniform attention over what it may
    /// see. Asking for it runs that layer's attention unfused.
    AttnScores(usize),
    /// `blocks.L.attn.hook_z`: every head's attention-weighted values, the input of the output
    /// projection, heads side by side (head `h` in columns `h·d_head..(h+1)·d_head`: the layout
    /// of SAELens's attention SAEs) — `[.., n_heads·d_head]`. The attention counterpart of
    /// `mlp.hook_post`: per-head ablation and patching act here.
    AttnZ(usize),
    /// `blocks.L.attn.hook_pattern`: every head's attention probabilities, `[batch, n_heads,
    /// query, key]` (f32 whatever the run dtype; each row sums to 1, zero on masked keys). The
    /// only point that is not one vector per token: interventions select query positions and
    /// heads (as channels), SAEs and exports cannot read it ([`HookPoint::per_token`]). Asking
    /// for it runs that layer's attention unfused.
    AttnPattern(usize),
    /// `blocks.L.ln1_post.hook_in`: the attention output as projected, before the norm after
    /// attention (Gemma 2 and 3, OLMo 2; elsewhere that is `hook_attn_out`).
    Ln1PostIn(usize),
    /// `blocks.L.ln1_post.hook_scale`: the post-attention norm's divisor per token (Gemma 2/3).
    Ln1PostScale(usize),
    /// `blocks.L.ln1_post.hook_normalized`: the post-attention norm's normalised input, before
    /// its gain (Gemma 2/3).
    Ln1PostNormalized(usize),
    /// `blocks.L.hook_attn_out`: the attention output, after the output projection (and, in
    /// Gemma 2/3, after the norm that follows it): what is added to the residual stream.
    AttnOut(usize),
    /// `blocks.L.hook_resid_mid`: resid_pre + attn_out (absent in parallel-residual blocks).
    ResidMid(usize),
    /// `blocks.L.ln2.hook_scale`: the MLP norm's divisor per token (see `ln1.hook_scale`).
    Ln2Scale(usize),
    /// `blocks.L.ln2.hook_normalized`: the MLP norm's normalised input, before its gain and bias.
    Ln2Normalized(usize),
    /// `blocks.L.mlp.hook_in`: the MLP's input, after its norm's gain and bias (what the up
    /// and gate projections read; TransformerBridge's and circuit-tracer's name): where
    /// transcoders read — `[.., d_model]`.
    MlpIn(usize),
    /// `blocks.L.mlp.hook_pre`: FFN pre-activation (for gated MLPs, the gate's) — `[.., d_mlp]`.
    MlpPre(usize),
    /// `blocks.L.mlp.hook_pre_linear`: a gated MLP's up projection, the factor that
    /// multiplies act(gate) (gated MLPs only) — `[.., d_mlp]`.
    MlpPreLinear(usize),
    /// `blocks.L.mlp.hook_post`: FFN value after the nonlinearity (gated: act(gate)·up), the input
    /// of the down projection: ROME's key space and the space of knowledge neurons — `[.., d_mlp]`.
    MlpPost(usize),
    /// `blocks.L.ln2_post.hook_in`: what the down projection writes, before the norm after the
    /// MLP (Gemma 2 and 3, OLMo 2; elsewhere that is `hook_mlp_out`): ROME's value space there.
    Ln2PostIn(usize),
    /// `blocks.L.ln2_post.hook_scale`: the post-MLP norm's divisor per token (Gemma 2/3).
    Ln2PostScale(usize),
    /// `blocks.L.ln2_post.hook_normalized`: the post-MLP norm's normalised input, before its
    /// gain (Gemma 2/3).
    Ln2PostNormalized(usize),
    /// `blocks.L.hook_mlp_out`: the FFN output, after the down projection (and, in Gemma 2/3,
    /// after the norm that follows it): what is added to the residual stream.
    MlpOut(usize),
    /// `blocks.L.hook_resid_post`: the residual stream leaving block L.
    ResidPost(usize),
    /// `ln_final.hook_scale`: the final norm's divisor per token (see `ln1.hook_scale`).
    LnFinalScale,
    /// `ln_final.hook_normalized`: the final norm's normalised input, before its gain and bias
    /// (which, with the unembedding, make the logits).
    LnFinal,
}

impl HookPoint {
    /// The layer this point belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Self::ResidPre(l)
            | Self::Ln1Scale(l)
            | Self::Ln1Normalized(l)
            | Self::AttnScores(l)
            | Self::Ln2Scale(l)
            | Self::Ln2Normalized(l)
            | Self::AttnQ(l)
            | Self::AttnK(l)
            | Self::AttnV(l)
            | Self::AttnQNormed(l)
            | Self::AttnKNormed(l)
            | Self::AttnRotQ(l)
            | Self::AttnRotK(l)
            | Self::AttnZ(l)
            | Self::AttnPattern(l)
            | Self::Ln1PostIn(l)
            | Self::Ln1PostScale(l)
            | Self::Ln1PostNormalized(l)
            | Self::AttnOut(l)
            | Self::ResidMid(l)
            | Self::MlpIn(l)
            | Self::MlpPre(l)
            | Self::MlpPreLinear(l)
            | Self::MlpPost(l)
            | Self::Ln2PostIn(l)
            | Self::Ln2PostScale(l)
            | Self::Ln2PostNormalized(l)
            | Self::MlpOut(l)
            | Self::ResidPost(l) => Some(l),
            Self::Embed | Self::PosEmbed | Self::LnFinalScale | Self::LnFinal => None,
        }
    }

    /// Whether the value is one vector per token (`[batch, seq, d]`): what SAEs, feature
    /// statistics and exports read. Only `attn.hook_attn_scores` and `attn.hook_pattern` are
    /// not.
    pub fn per_token(&self) -> bool {
        !matches!(self, Self::AttnScores(_) | Self::AttnPattern(_))
    }

    /// Whether the value is a norm's divisor (`hook_scale`): what makes a block non-linear in
    /// its input besides attention and the MLP, and what a linearised model freezes.
    pub fn is_norm_scale(&self) -> bool {
        matches!(
            self,
            Self::Ln1Scale(_)
                | Self::Ln2Scale(_)
                | Self::Ln1PostScale(_)
                | Self::Ln2PostScale(_)
                | Self::LnFinalScale
        )
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embed => write!(f, "hook_embed"),
            Self::PosEmbed => write!(f, "hook_pos_embed"),
            Self::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            Self::Ln1Scale(l) => write!(f, "blocks.{l}.ln1.hook_scale"),
            Self::Ln1Normalized(l) => write!(f, "blocks.{l}.ln1.hook_normalized"),
            Self::AttnScores(l) => write!(f, "blocks.{l}.attn.hook_attn_scores"),
            Self::Ln2Scale(l) => write!(f, "blocks.{l}.ln2.hook_scale"),
            Self::Ln2Normalized(l) => write!(f, "blocks.{l}.ln2.hook_normalized"),
            Self::AttnQ(l) => write!(f, "blocks.{l}.attn.hook_q"),
            Self::AttnK(l) => write!(f, "blocks.{l}.attn.hook_k"),
            Self::AttnV(l) => write!(f, "blocks.{l}.attn.hook_v"),
            Self::AttnQNormed(l) => write!(f, "blocks.{l}.attn.hook_q_normed"),
            Self::AttnKNormed(l) => write!(f, "blocks.{l}.attn.hook_k_normed"),
            Self::AttnRotQ(l) => write!(f, "blocks.{l}.attn.hook_rot_q"),
            Self::AttnRotK(l) => write!(f, "blocks.{l}.attn.hook_rot_k"),
            Self::AttnZ(l) => write!(f, "blocks.{l}.attn.hook_z"),
            Self::AttnPattern(l) => write!(f, "blocks.{l}.attn.hook_pattern"),
            Self::Ln1PostIn(l) => write!(f, "blocks.{l}.ln1_post.hook_in"),
            Self::Ln1PostScale(l) => write!(f, "blocks.{l}.ln1_post.hook_scale"),
            Self::Ln1PostNormalized(l) => write!(f, "blocks.{l}.ln1_post.hook_normalized"),
            Self::AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            Self::ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            Self::MlpPre(l) => write!(f, "blocks.{l}.mlp.hook_pre"),
            Self::MlpIn(l) => write!(f, "blocks.{l}.mlp.hook_in"),
            Self::MlpPreLinear(l) => write!(f, "blocks.{l}.mlp.hook_pre_linear"),
            Self::MlpPost(l) => write!(f, "blocks.{l}.mlp.hook_post"),
            Self::Ln2PostIn(l) => write!(f, "blocks.{l}.ln2_post.hook_in"),
            Self::Ln2PostScale(l) => write!(f, "blocks.{l}.ln2_post.hook_scale"),
            Self::Ln2PostNormalized(l) => write!(f, "blocks.{l}.ln2_post.hook_normalized"),
            Self::MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            Self::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            Self::LnFinalScale => write!(f, "ln_final.hook_scale"),
            Self::LnFinal => write!(f, "ln_final.hook_normalized"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;

    /// Parses a TransformerLens hook name. Whether the layer exists in a given model is checked
    /// by [`HookRunner`] users against the model's hook list.
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || {
            Error::UnknownHook {
            name: s.to_string(),
            valid: "hook_embed, hook_pos_embed, blocks.L.{hook_resid_pre, ln1.hook_scale, \
                    ln1.hook_normalized, attn.hook_q, attn.hook_k, attn.hook_v, attn.hook_q_normed, \
                    attn.hook_k_normed, attn.hook_rot_q, \
                    attn.hook_rot_k, attn.hook_attn_scores, attn.hook_pattern, attn.hook_z, \
                    ln1_post.hook_in, ln1_post.hook_scale, ln1_post.hook_normalized, \
                    hook_attn_out, hook_resid_mid, ln2.hook_scale, ln2.hook_normalized, \
                    mlp.hook_in, mlp.hook_pre, mlp.hook_pre_linear, mlp.hook_post, ln2_post.hook_in, \
                    ln2_post.hook_scale, ln2_post.hook_normalized, hook_mlp_out, \
                    hook_resid_post}, \
                    ln_final.hook_scale, ln_final.hook_normalized"
                .to_string(),
        }
        };
        match s {
            "hook_embed" => return Ok(Self::Embed),
            "hook_pos_embed" => return Ok(Self::PosEmbed),
            "ln_final.hook_scale" => return Ok(Self::LnFinalScale),
            "ln_final.hook_normalized" => return Ok(Self::LnFinal),
            _ => {}
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(unknown)?;
        let (layer, name) = rest.split_once('.').ok_or_else(unknown)?;
        let layer: usize = layer.parse().map_err(|_| unknown())?;
        Ok(match name {
            "hook_resid_pre" => Self::ResidPre(layer),
            "ln1.hook_scale" => Self::Ln1Scale(layer),
            "ln1.hook_normalized" => Self::Ln1Normalized(layer),
            "attn.hook_attn_scores" => Self::AttnScores(layer),
            "ln2.hook_scale" => Self::Ln2Scale(layer),
            "ln2.hook_normalized" => Self::Ln2Normalized(layer),
            "attn.hook_q" => Self::AttnQ(layer),
            "attn.hook_k" => Self::AttnK(layer),
            "attn.hook_v" => Self::AttnV(layer),
            "attn.hook_q_normed" => Self::AttnQNormed(layer),
            "attn.hook_k_normed" => Self::AttnKNormed(layer),
            "attn.hook_rot_q" => Self::AttnRotQ(layer),
            "attn.hook_rot_k" => Self::AttnRotK(layer),
            "attn.hook_z" => Self::AttnZ(layer),
            "attn.hook_pattern" => Self::AttnPattern(layer),
            "ln1_post.hook_in" => Self::Ln1PostIn(layer),
            "ln1_post.hook_scale" => Self::Ln1PostScale(layer),
            "ln1_post.hook_normalized" => Self::Ln1PostNormalized(layer),
            "hook_attn_out" => Self::AttnOut(layer),
            "hook_resid_mid" => Self::ResidMid(layer),
            "mlp.hook_in" => Self::MlpIn(layer),
            "mlp.hook_pre" => Self::MlpPre(layer),
            "mlp.hook_pre_linear" => Self::MlpPreLinear(layer),
            "mlp.hook_post" => Self::MlpPost(layer),
            "ln2_post.hook_in" => Self::Ln2PostIn(layer),
            "ln2_post.hook_scale" => Self::Ln2PostScale(layer),
            "ln2_post.hook_normalized" => Self::Ln2PostNormalized(layer),
            "hook_mlp_out" => Self::MlpOut(layer),
            "hook_resid_post" => Self::ResidPost(layer),
            _ => return Err(unknown()),
        })
    }
}

/// Resolves names or glob patterns (`blocks.*.mlp.hook_post`, `*resid_post`) against the hook
/// points a model actually has. An exact name that is not there, or a pattern that matches
/// nothing, is an error listing the valid names.
pub fn resolve_hook_patterns(patterns: &[&str], available: &[HookPoint]) -> Result<Vec<HookPoint>> {
    let valid = || {
        available
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    for pattern in patterns {
        let is_glob = pattern.contains(['*', '?', '[']);
        if !is_glob {
            let point: HookPoint = pattern.parse().map_err(|_| Error::UnknownHook {
                name: pattern.to_string(),
                valid: valid(),
            })?;
            if !available.contains(&point) {
                return Err(Error::UnknownHook {
                    name: pattern.to_string(),
                    valid: valid(),
                });
            }
            out.push(point);
            continue;
        }
        let glob = glob::Pattern::new(pattern).map_err(|e| Error::BadHookPattern {
            pattern: pattern.to_string(),
            message: e.to_string(),
        })?;
        let before = out.len();
        out.extend(
            available
                .iter()
                .filter(|h| glob.matches(&h.to_string()))
                .copied(),
        );
        if out.len() == before {
            return Err(Error::HookPatternMatchesNothing {
                pattern: pattern.to_string(),
                valid: valid(),
            });
        }
    }
    let mut seen = HashSet::new();
    out.retain(|h| seen.insert(*h));
    Ok(out)
}

/// A user function applied to a hook's value: receives `[batch, seq, d]` and the absolute
/// position of its first sequence element, returns the replacement (same shape).
pub type HookFn = Arc<dyn Fn(&Tensor, usize) -> candle_core::Result<Tensor> + Send + Sync>;

/// What an intervention does to the selected entries of a hook's value.
#[derive(Clone)]
pub enum InterventionOp {
    /// Set to this tensor (broadcast to `[batch, seq, d]`; a `[d]` vector works).
    Replace(Tensor),
    /// Add this tensor (broadcast like `Replace`), e.g. a steering vector.
    Add(Tensor),
    /// Multiply by a constant.
    Scale(f64),
    /// Set to zero (zero-ablation).
    Zero,
    /// Anything else, e.g. splicing an SAE reconstruction in.
    Func(HookFn),
}

impl fmt::Debug for InterventionOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replace(t) => write!(f, "Replace({:?})", t.shape()),
            Self::Add(t) => write!(f, "Add({:?})", t.shape()),
            Self::Scale(s) => write!(f, "Scale({s})"),
            Self::Zero => write!(f, "Zero"),
            Self::Func(_) => write!(f, "Func(..)"),
        }
    }
}

/// An intervention at a hook: an operation restricted to some positions and channels.
#[derive(Clone, Debug)]
pub struct Intervention {
    pub op: InterventionOp,
    /// Sequence positions to touch (absolute; negative counts from the end of the current
    /// forward call's sequence; query positions for the scores and the pattern). `None` = all.
    pub positions: Option<Vec<i64>>,
    /// Channels (last-dimension indices; heads for `attn.hook_attn_scores` and
    /// `attn.hook_pattern`) to touch. `None` = all.
    pub channels: Option<Vec<usize>>,
}

impl Intervention {
    pub fn new(op: InterventionOp) -> Self {
        Self {
            op,
            positions: None,
            channels: None,
        }
    }

    pub fn at_positions(mut self, positions: impl Into<Vec<i64>>) -> Self {
        self.positions = Some(positions.into());
        self
    }

    pub fn at_channels(mut self, channels: impl Into<Vec<usize>>) -> Self {
        self.channels = Some(channels.into());
        self
    }

    /// Applies the operation to `x` (`[batch, seq, d]`, or a pattern's `[batch, heads, seq,
    /// key]`, starting at absolute position `offset`).
    fn apply(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let full = match &self.op {
            // Made contiguous: a broadcast value (stride 0 over the batch) cannot feed a
            // matrix product, as a replaced attention pattern does.
            InterventionOp::Replace(v) => v
                .to_dtype(x.dtype())?
                .broadcast_as(x.shape())?
                .contiguous()?,
            InterventionOp::Add(v) => x.broadcast_add(&v.to_dtype(x.dtype())?)?,
            InterventionOp::Scale(s) => x.affine(*s, 0.0)?,
            InterventionOp::Zero => x.zeros_like()?,
            InterventionOp::Func(f) => f(x, offset)?,
        };
        if self.positions.is_none() && self.channels.is_none() {
            return Ok(full);
        }
        // A select rather than x·(1−m) + new·m: attention scores hold −∞, and −∞·0 is NaN.
        // Both branches stay differentiable.
        self.mask(x.dims(), offset, x.device())?
            .broadcast_as(x.shape())?
            .where_cond(&full, x)
    }

    /// 0/1 (u8) mask of the selected entries, broadcastable to a value of shape `dims`: `[1,
    /// seq, d]` for per-token values, `[1, heads, seq, 1]` for scores and patterns (channels
    /// are heads).
    fn mask(&self, dims: &[usize], offset: usize, device: &Device) -> candle_core::Result<Tensor> {
        let (seq, width, pattern) = match *dims {
            [_, seq, d] => (seq, d, false),
            [_, heads, seq, _] => (seq, heads, true),
            _ => candle_core::bail!(
                "an intervention needs a 3- or 4-dimensional value, got {dims:?}"
            ),
        };
        let mut pos_sel = vec![self.positions.is_none(); seq];
        if let Some(positions) = &self.positions {
            for &p in positions {
                let local = if p < 0 {
                    seq as i64 + p
                } else {
                    p - offset as i64
                };
                if (0..seq as i64).contains(&local) {
                    pos_sel[local as usize] = true;
                }
            }
        }
        let mut ch_sel = vec![self.channels.is_none(); width];
        if let Some(channels) = &self.channels {
            let what = if pattern { "head" } else { "channel" };
            for &c in channels {
                if c >= width {
                    candle_core::bail!("intervention {what} {c} is out of range for width {width}");
                }
                ch_sel[c] = true;
            }
        }
        let selected = |p: bool, c: bool| u8::from(p && c);
        if pattern {
            let data: Vec<u8> = ch_sel
                .iter()
                .flat_map(|&c| pos_sel.iter().map(move |&p| selected(p, c)))
                .collect();
            Tensor::from_vec(data, (1, width, seq, 1), device)
        } else {
            let data: Vec<u8> = pos_sel
                .iter()
                .flat_map(|&p| ch_sel.iter().map(move |&c| selected(p, c)))
                .collect();
            Tensor::from_vec(data, (1, seq, width), device)
        }
    }
}

/// What to do at hook points during one forward call.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    capture: HashSet<HookPoint>,
    interventions: HashMap<HookPoint, Vec<Intervention>>,
    grad: HashSet<HookPoint>,
    /// Keep the whole forward pass differentiable (training): no fused kernels without a
    /// backward pass.
    differentiable: bool,
    /// Stop before this block, as TransformerLens' `stop_at_layer`.
    stop_at_layer: Option<usize>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run only blocks `0..layer`: the forward output's `logits` is then the residual stream
    /// entering block `layer` (`[batch, seq, d_model]`), as with TransformerLens'
    /// `stop_at_layer`. Saves the rest of the model when only early hooks are wanted.
    pub fn stop_at_layer(mut self, layer: usize) -> Self {
        self.stop_at_layer = Some(layer);
        self
    }

    /// Record the value at these points into the output's [`ActivationCache`].
    pub fn capture(mut self, points: impl IntoIterator<Item = HookPoint>) -> Self {
        self.capture.extend(points);
        self
    }

    /// Apply an intervention at `point` (several at one point run in the order added).
    pub fn intervene(mut self, point: HookPoint, intervention: Intervention) -> Self {
        self.interventions
            .entry(point)
            .or_default()
            .push(intervention);
        self
    }

    /// Make the value at `point` a differentiable leaf: after `loss.backward()`, the gradient
    /// with respect to that value is `grads.get(output.grad_leaf(point))`.
    pub fn grad(mut self, point: HookPoint) -> Self {
        self.grad.insert(point);
        self
    }

    /// Make the forward pass differentiable with respect to the weights, for training.
    pub fn differentiable(mut self) -> Self {
        self.differentiable = true;
        self
    }

    /// Every point this value touches, to check against a model's hook list.
    pub fn points(&self) -> impl Iterator<Item = &HookPoint> {
        self.capture
            .iter()
            .chain(self.interventions.keys())
            .chain(self.grad.iter())
    }

    pub fn is_empty(&self) -> bool {
        self.capture.is_empty() && self.interventions.is_empty() && self.grad.is_empty()
    }

    pub fn needs_grad(&self) -> bool {
        self.differentiable || !self.grad.is_empty()
    }
}

/// Captured hook values by point, each `[batch, seq, d]` (patterns `[batch, heads, seq, key]`).
/// Across KV-cached calls (generation) new positions are appended along `seq`.
#[derive(Clone, Debug, Default)]
pub struct ActivationCache {
    values: BTreeMap<HookPoint, Tensor>,
}

impl ActivationCache {
    pub fn get(&self, point: HookPoint) -> Option<&Tensor> {
        self.values.get(&point)
    }

    /// The value at `point`, which the caller asked to capture: an error naming it and what
    /// was captured if it is missing.
    pub fn require(&self, point: HookPoint) -> Result<&Tensor> {
        self.values.get(&point).ok_or_else(|| Error::UnknownHook {
            name: point.to_string(),
            valid: self.names().join(", "),
        })
    }

    /// Looks a value up by its TransformerLens name.
    pub fn get_by_name(&self, name: &str) -> Result<&Tensor> {
        let point: HookPoint = name.parse()?;
        self.values.get(&point).ok_or_else(|| Error::UnknownHook {
            name: name.to_string(),
            valid: self.names().join(", "),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.values.keys().map(|h| h.to_string()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HookPoint, &Tensor)> {
        self.values.iter()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn into_inner(self) -> BTreeMap<HookPoint, Tensor> {
        self.values
    }

    /// Appends what a later KV-cached call captured (generating step by step), so the cache
    /// reads as one pass over the whole sequence.
    pub fn extend(&mut self, later: ActivationCache) -> Result<()> {
        for (point, value) in later.values {
            self.append(point, value)?;
        }
        Ok(())
    }

    /// Appends a later call's positions. A pattern grows along its query axis; the earlier
    /// rows get zero attention on the new keys, which they could not see.
    fn append(&mut self, point: HookPoint, value: Tensor) -> candle_core::Result<()> {
        let merged = match self.values.remove(&point) {
            Some(old) if old.rank() == 4 => {
                let new_keys = value.dim(3)? - old.dim(3)?;
                Tensor::cat(&[&old.pad_with_zeros(3, 0, new_keys)?, &value], 2)?
            }
            Some(old) => Tensor::cat(&[&old, &value], 1)?,
            None => value,
        };
        self.values.insert(point, merged);
        Ok(())
    }
}

/// The per-call state blocks talk to: applies [`Hooks`] at each point and collects results.
pub struct HookRunner<'a> {
    hooks: &'a Hooks,
    /// Absolute position of the first element of this call's sequence (non-zero with a KV cache).
    pub offset: usize,
    pub cache: ActivationCache,
    pub grad_leaves: HashMap<HookPoint, Var>,
}

impl<'a> HookRunner<'a> {
    pub fn new(hooks: &'a Hooks, offset: usize) -> Self {
        Self {
            hooks,
            offset,
            cache: ActivationCache::default(),
            grad_leaves: HashMap::new(),
        }
    }

    /// Whether a forward pass must keep every op differentiable (fast fused kernels without a
    /// backward pass are then avoided).
    pub fn needs_grad(&self) -> bool {
        self.hooks.needs_grad()
    }

    /// Whether anything is asked of `point`: a value that exists only for it (the attention
    /// pattern, which the fused kernel never forms) is computed only then.
    pub fn touches(&self, point: HookPoint) -> bool {
        self.hooks.capture.contains(&point)
            || self.hooks.grad.contains(&point)
            || self.hooks.interventions.contains_key(&point)
    }

    /// See [`Hooks::stop_at_layer`].
    pub fn stop_at_layer(&self) -> Option<usize> {
        self.hooks.stop_at_layer
    }

    /// The hook point itself: interventions, then the gradient leaf, then capture.
    pub fn hook(&mut self, point: HookPoint, x: Tensor) -> candle_core::Result<Tensor> {
        if self.hooks.is_empty() {
            return Ok(x);
        }
        let mut x = x;
        if let Some(list) = self.hooks.interventions.get(&point) {
            for intervention in list {
                x = intervention.apply(&x, self.offset)?;
            }
        }
        if self.hooks.grad.contains(&point) {
            // x + 0-leaf: the gradient w.r.t. the leaf equals the gradient w.r.t. the hook's
            // value, and the upstream graph stays intact for leaves at earlier hooks.
            let leaf = Var::zeros(x.shape(), x.dtype(), x.device())?;
            x = x.add(leaf.as_tensor())?;
            self.grad_leaves.insert(point, leaf);
        }
        if self.hooks.capture.contains(&point) {
            self.cache.append(point, x.clone())?;
        }
        Ok(x)
    }
}

/// A value one hook keeps for a later one in the same forward pass (a transcoder reads one hook
/// and writes another; the hook it writes needs what the hook it reads saw). Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Stash(Arc<Mutex<Option<Tensor>>>);

impl Stash {
    pub fn put(&self, value: Tensor) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(value);
        }
    }

    /// The value kept, if any (it stays kept).
    pub fn get(&self) -> Option<Tensor> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }

    /// The value kept, or an error saying `which` hook should have run first (for use inside
    /// an intervention).
    pub fn require(&self, which: &str) -> candle_core::Result<Tensor> {
        self.get().ok_or_else(|| {
            candle_core::Error::Msg(format!("{which} did not run before the hook that reads it"))
        })
    }

    /// An intervention that keeps the hook's value and passes it on unchanged.
    pub fn keeper(&self) -> Intervention {
        let stash = self.clone();
        let keep = move |x: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
            stash.put(x.clone());
            Ok(x.clone())
        };
        Intervention::new(InterventionOp::Func(Arc::new(keep)))
    }
}

/// Upcasts half-precision values to f32 for numerically sensitive ops (f32 and f64 stay).
pub(crate) fn upcast(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Index of the last dimension, for ops like softmax.
pub(crate) const LAST: D = D::Minus1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_names_round_trip() {
        let points = [
            HookPoint::Embed,
            HookPoint::PosEmbed,
            HookPoint::ResidPre(3),
            HookPoint::Ln1Scale(2),
            HookPoint::Ln1Normalized(2),
            HookPoint::AttnScores(4),
            HookPoint::Ln2Scale(3),
            HookPoint::Ln2Normalized(3),
            HookPoint::LnFinalScale,
            HookPoint::AttnQ(1),
            HookPoint::AttnK(2),
            HookPoint::AttnV(3),
            HookPoint::AttnRotQ(6),
            HookPoint::AttnRotK(8),
            HookPoint::AttnZ(4),
            HookPoint::AttnPattern(5),
            HookPoint::AttnOut(0),
            HookPoint::ResidMid(11),
            HookPoint::MlpPre(2),
            HookPoint::MlpPreLinear(2),
            HookPoint::MlpPost(2),
            HookPoint::MlpOut(7),
            HookPoint::ResidPost(1),
            HookPoint::LnFinal,
        ];
        for p in points {
            assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p);
        }
        assert!("blocks.x.hook_resid_pre".parse::<HookPoint>().is_err());
        assert!("blocks.1.hook_nothing".parse::<HookPoint>().is_err());
    }

    #[test]
    fn globs_resolve_against_available_points() {
        let available = [
            HookPoint::Embed,
            HookPoint::MlpPost(0),
            HookPoint::MlpPost(1),
            HookPoint::ResidPost(0),
        ];
        let got = resolve_hook_patterns(&["blocks.*.mlp.hook_post"], &available).unwrap();
        assert_eq!(got, vec![HookPoint::MlpPost(0), HookPoint::MlpPost(1)]);
        let err = resolve_hook_patterns(&["blocks.5.mlp.hook_post"], &available).unwrap_err();
        assert!(err.to_string().contains("blocks.5.mlp.hook_post"));
        assert!(resolve_hook_patterns(&["*attn*"], &available).is_err());
    }

    #[test]
    fn interventions_touch_only_selected_positions_and_channels() {
        let x = Tensor::ones((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let zero_some = Intervention::new(InterventionOp::Zero)
            .at_positions(vec![-1])
            .at_channels(vec![1, 2]);
        let y = zero_some.apply(&x, 0).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0][0], vec![1.0; 4]);
        assert_eq!(y[0][2], vec![1.0, 0.0, 0.0, 1.0]);
        let add = Intervention::new(InterventionOp::Add(
            Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap(),
        ))
        .at_positions(vec![5]);
        // Absolute position 5 with the call starting at offset 4 is local position 1.
        let y = add.apply(&x, 4).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0][1], vec![2.0, 3.0, 4.0, 5.0]);
        assert_eq!(y[0][0], vec![1.0; 4]);
    }

    #[test]
    fn pattern_interventions_select_heads_and_query_rows() {
        // [batch 1, heads 2, query 3, key 3]
        let x = Tensor::ones((1, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let zero = Intervention::new(InterventionOp::Zero)
            .at_positions(vec![-1])
            .at_channels(vec![1]);
        let y = zero.apply(&x, 0).unwrap().get(0).unwrap();
        let y = y.to_vec3::<f32>().unwrap();
        assert_eq!(y[0], vec![vec![1.0; 3]; 3], "head 0 untouched");
        assert_eq!(y[1][0], vec![1.0; 3]);
        assert_eq!(y[1][1], vec![1.0; 3]);
        assert_eq!(y[1][2], vec![0.0; 3], "head 1's last query row zeroed");
        let err = Intervention::new(InterventionOp::Zero)
            .at_channels(vec![2])
            .apply(&x, 0)
            .unwrap_err();
        assert!(err.to_string().contains("head 2"), "{err}");
    }
}
