//! The logit lens and direct logit attribution: what the residual stream would predict if
//! the model stopped after each block, and how much each component's output writes to one
//! token's logit (TransformerLens's `accumulated_resid` and `decompose_resid` with
//! `apply_ln_to_stack`).
//!
//! - **Logit lens** (nostalgebraist 2020): the stream entering block 0 and leaving each block,
//!   at one position, through the final norm and the unembedding. After the last block this
//!   is the model's own prediction. With a [`TunedLens`] each depth's stream is translated
//!   first (Belrose et al. 2023; [`crate::tuned_lens`]).
//! - **Direct logit attribution**: the stream at the last block is the sum of the embeddings
//!   and every block's attention and MLP outputs, so its logit for a token splits into one
//!   term per component, with the final norm linearised at the scale of the whole stream
//!   ([`crate::model::layers::Norm::at_scale_of`]) plus the norm's bias term. The terms add up
//!   to the logit exactly. With a `versus` token the direction is the logit difference of the
//!   two (the usual read-out of circuits work). It is the direct path only: what a component
//!   writes that later blocks read and transform is credited to those later blocks.
//! - **Per head** (TransformerLens's `stack_head_results`): each attention output is split
//!   further into one term per head, read from `attn.hook_z` through the head's slice of the
//!   output projection, plus the projection's bias.

use candle_core::{DType, IndexOp, Tensor};
use serde::Serialize;

use crate::causal::target_token;
use crate::error::{Error, Result};
use crate::model::generate::{TokenProb, softmax, token_probs, top_tokens};
use crate::model::layers::soft_cap;
use crate::model::{HookPoint, Hooks, Model};
use crate::tuned_lens::TunedLens;

/// The prediction read off the stream at one depth.
#[derive(Clone, Debug, Serialize)]
pub struct LensRow {
    /// The hook the stream was read at (`blocks.0.hook_resid_pre`, then each block's
    /// `hook_resid_post`).
    pub hook: String,
    pub top: Vec<TokenProb>,
    /// Probability and rank (0: the most likely) of the target token at this depth.
    pub target_prob: f32,
    pub target_rank: usize,
}

/// One component's direct contribution to the logit (difference).
#[derive(Clone, Debug, Serialize)]
pub struct Contribution {
    /// The hook whose output this is (`hook_embed`, `blocks.L.hook_attn_out`, …), or
    /// `ln_final bias`, or `unembed bias` (GPT-J).
    pub component: String,
    pub logit: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct LensReport {
    pub tokens: Vec<String>,
    /// The position read (index into `tokens`).
    pub position: usize,
    pub target: TokenProb,
    pub versus: Option<TokenProb>,
    pub lens: Vec<LensRow>,
    pub attribution: Vec<Contribution>,
    /// The model's logit of the target (minus the versus token's), which the attribution
    /// sums to; before the soft-cap of models that cap their logits (Gemma 2), since the
    /// attribution is linear and the cap is not.
    pub logit: f32,
    /// `heads[l][h]`: head h of block l's direct contribution. With `attention_bias[l]` (the
    /// output projection's bias; 0 where it has none) a layer's heads add up to its
    /// `blocks.l.hook_attn_out` term in `attribution` (through a norm after attention, as in
    /// Gemma 2, at the scale the whole output gets there).
    pub heads: Vec<Vec<f32>>,
    pub attention_bias: Vec<f32>,
    /// With [`LensRequest::grid`]: the lens at every position, `grid[depth][position]`,
    /// depths as in `lens` (nostalgebraist's picture: how early each next token appears).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grid: Option<Vec<Vec<LensCell>>>,
    /// Whether the rows (and grid) were read through a tuned lens.
    pub tuned: bool,
}

impl LensReport {
    /// Every head as `(layer, head, direct logit)`, the largest effect (either sign) first.
    pub fn heads_by_effect(&self) -> Vec<(usize, usize, f32)> {
        crate::attention::rank_heads(&self.heads, f32::abs)
    }
}

/// The lens at one depth and position.
#[derive(Clone, Debug, Serialize)]
pub struct LensCell {
    pub top: Vec<TokenProb>,
    /// Probability of the prompt's own next token (none at the last position).
    pub next_prob: Option<f32>,
}

/// What to read.
#[derive(Clone, Debug)]
pub struct LensRequest {
    /// Token ids of the prompt (as [`Model::encode_prompt`] gives them).
    pub ids: Vec<u32>,
    /// Position to read (default: the last).
    pub position: Option<usize>,
    /// Token whose logit is attributed (default: the model's top prediction there).
    pub target: Option<u32>,
    /// Attribute the logit difference target − versus instead.
    pub versus: Option<u32>,
    /// Tokens listed per lens row (and grid cell).
    pub top_k: usize,
    /// Also read the lens at every position ([`LensReport::grid`]).
    pub grid: bool,
    /// Translate each depth's stream with this tuned lens before reading it.
    pub tuned: Option<std::sync::Arc<TunedLens>>,
}

/// The first token of `continuation` (a target or versus token, " Tokyo") as it would follow
/// the prompt's token at `position` (`None`: the last), so that a continuation typed for an
/// earlier position tokenises as it would there.
pub fn continuation_token(
    model: &Model,
    prompt: &str,
    ids: &[u32],
    position: Option<usize>,
    continuation: &str,
) -> Result<u32> {
    let context = match position {
        Some(p) if p + 1 < ids.len() => {
            let start = model.start_token();
            let through: Vec<u32> = ids[..=p]
                .iter()
                .copied()
                .filter(|&id| Some(id) != start)
                .collect();
            model.tokenizer.decode(&through)?
        }
        _ => prompt.to_string(),
    };
    target_token(model, &context, continuation)
}

/// Runs the prompt once and reads the lens and the attribution at the requested position.
pub fn lens(model: &Model, request: &LensRequest) -> Result<LensReport> {
    let ids = &request.ids;
    let last = ids.len().checked_sub(1).ok_or(Error::EmptyPrompt)?;
    let position = request.position.unwrap_or(last);
    if position > last {
        return Err(Error::InvalidArgument {
            what: "position",
            value: position.to_string(),
            message: format!("the prompt has {} tokens, positions 0 to {last}", ids.len()),
        });
    }
    let vocab = model.dims().vocab_size;
    for id in [request.target, request.versus].into_iter().flatten() {
        if id as usize >= vocab {
            return Err(Error::InvalidArgument {
                what: "token id",
                value: id.to_string(),
                message: format!("the vocabulary has {vocab} tokens"),
            });
        }
    }
    let n_layers = model.dims().n_layers;
    let mut stream_points = vec![HookPoint::ResidPre(0)];
    stream_points.extend((0..n_layers).map(HookPoint::ResidPost));
    let mut components = vec![HookPoint::Embed];
    if model.hook_points().contains(&HookPoint::PosEmbed) {
        components.push(HookPoint::PosEmbed);
    }
    for l in 0..n_layers {
        components.extend([HookPoint::AttnOut(l), HookPoint::MlpOut(l)]);
    }
    let head_inputs: Vec<HookPoint> = (0..n_layers).map(HookPoint::AttnZ).collect();
    // What the heads write before a norm after attention (Gemma 2, OLMo 2), whose scale they share.
    let before_post_norm: Vec<HookPoint> = (0..n_layers)
        .filter(|&l| model.transformer.blocks[l].post_norms.is_some())
        .map(HookPoint::Ln1PostIn)
        .collect();
    let capture = stream_points
        .iter()
        .chain(&components)
        .chain(&head_inputs)
        .chain(&before_post_norm)
        .chain([&HookPoint::LnFinal])
        .copied();
    let out = model.forward(&model.ids_tensor(ids)?, &Hooks::new().capture(capture))?;
    // Everything below is read at one position, `[1, d]`: in the run dtype where the model's
    // own modules apply, else in f32 (f64 models stay f64).
    let at_raw = |point: HookPoint| -> Result<Tensor> {
        Ok(out.cache.require(point)?.i((0, position))?.unsqueeze(0)?)
    };
    let at = |point: HookPoint| -> Result<Tensor> {
        let v = at_raw(point)?;
        Ok(match v.dtype() {
            DType::F16 | DType::BF16 => v.to_dtype(DType::F32)?,
            _ => v,
        })
    };
    let t = &model.transformer;
    let norm = &t.ln_final;
    let logits_of = |normed: &Tensor| -> Result<Vec<f32>> {
        Ok(unembed(model, normed)?.squeeze(0)?.to_vec1()?)
    };
    let final_normed = norm.affine(&at_raw(HookPoint::LnFinal)?)?;
    let final_logits = logits_of(&final_normed)?;
    let target_id = match request.target {
        Some(id) => id,
        None => top_tokens(model, &final_logits, 1)[0].id,
    };
    let probs_final = softmax(&final_logits, 1.0);
    let predicted = |id: u32, probs: &[f32]| TokenProb {
        id,
        token: model.tokenizer.token_display(id),
        prob: probs[id as usize],
    };

    // The tuned lens's translation of the stream at a depth (the identity without one, and at
    // the last block, whose read-out is the model's own).
    let translate = |point: HookPoint, x: Tensor| -> Result<Tensor> {
        match request.tuned.as_ref().and_then(|l| l.translator(point)) {
            Some(translator) => translator.apply(&x),
            None => Ok(x),
        }
    };
    let mut rows = Vec::with_capacity(stream_points.len());
    let mut grid = Vec::new();
    for &point in &stream_points {
        let logits = logits_of(&norm.forward(&translate(point, at_raw(point)?)?, false)?)?;
        let probs = softmax(&logits, 1.0);
        let target_prob = probs[target_id as usize];
        rows.push(LensRow {
            hook: point.to_string(),
            top: token_probs(model, &probs, request.top_k),
            target_prob,
            target_rank: probs.iter().filter(|&&p| p > target_prob).count(),
        });
        if request.grid {
            let every =
                norm.forward(&translate(point, out.cache.require(point)?.clone())?, false)?;
            grid.push(lens_cells(model, ids, &every, request.top_k)?);
        }
    }

    // The read-out direction: the target's unembedding row (minus the versus token's).
    let row = |id: u32| t.unembed.i(id as usize);
    let direction = match request.versus {
        Some(v) => (row(target_id)? - row(v)?)?,
        None => row(target_id)?,
    };
    let whole = at(HookPoint::ResidPost(n_layers - 1))?;
    let direction = direction.to_dtype(whole.dtype())?;
    let read = |x: &Tensor| -> Result<f32> {
        Ok(x.squeeze(0)?
            .mul(&direction)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar()?)
    };
    let mut attribution = Vec::with_capacity(components.len() + 1);
    for &point in &components {
        attribution.push(Contribution {
            component: point.to_string(),
            logit: read(&norm.at_scale_of(&at(point)?, &whole)?)?,
        });
    }
    if let Some(b) = norm.bias() {
        let b = b.to_dtype(whole.dtype())?.unsqueeze(0)?;
        attribution.push(Contribution {
            component: "ln_final bias".into(),
            logit: read(&b)?,
        });
    }
    if let Some(b) = &t.unembed_bias {
        let at =
            |id: u32| -> Result<f32> { Ok(b.i(id as usize)?.to_dtype(DType::F32)?.to_scalar()?) };
        attribution.push(Contribution {
            component: "unembed bias".into(),
            logit: at(target_id)? - request.versus.map_or(Ok(0.0), at)?,
        });
    }
    let head_dim = model.dims().head_dim;
    let mut heads = Vec::with_capacity(n_layers);
    let mut attention_bias = Vec::with_capacity(n_layers);
    for (l, &point) in head_inputs.iter().enumerate() {
        let z = at(point)?; // [1, n_heads·head_dim]
        let block = &t.blocks[l];
        // A norm after attention (Gemma 2, OLMo 2) and the whole output it normalises.
        let post_norm = match &block.post_norms {
            Some((after_attn, _)) => Some((after_attn, at(HookPoint::Ln1PostIn(l))?)),
            None => None,
        };
        let through_post_norm = |written: Tensor| -> Result<Tensor> {
            Ok(match &post_norm {
                Some((norm, whole_out)) => norm.at_scale_of(&written, whole_out)?,
                None => written,
            })
        };
        let out = &block.attn.out;
        let w = out.weight().to_dtype(z.dtype())?; // [d_model, n_heads·head_dim]
        let layer: Vec<f32> = (0..model.dims().n_heads)
            .map(|h| -> Result<f32> {
                let cols = h * head_dim;
                let written = z
                    .narrow(1, cols, head_dim)?
                    .matmul(&w.narrow(1, cols, head_dim)?.t()?)?;
                read(&norm.at_scale_of(&through_post_norm(written)?, &whole)?)
            })
            .collect::<Result<_>>()?;
        heads.push(layer);
        attention_bias.push(match out.bias() {
            Some(b) => read(&norm.at_scale_of(
                &through_post_norm(b.to_dtype(z.dtype())?.unsqueeze(0)?)?,
                &whole,
            )?)?,
            None => 0.0,
        });
    }
    let uncapped: Vec<f32> = raw_logits(model, &final_normed)?.squeeze(0)?.to_vec1()?;
    let logit = uncapped[target_id as usize] - request.versus.map_or(0.0, |v| uncapped[v as usize]);
    Ok(LensReport {
        tokens: model.tokenizer.tokens_display(ids),
        position,
        target: predicted(target_id, &probs_final),
        versus: request.versus.map(|v| predicted(v, &probs_final)),
        lens: rows,
        attribution,
        logit,
        heads,
        attention_bias,
        grid: request.grid.then_some(grid),
        tuned: request.tuned.is_some(),
    })
}

/// `[n, d]` normalised stream → logits `[n, vocab]` in f32, soft-capped as the model's are.
fn unembed(model: &Model, normed: &Tensor) -> Result<Tensor> {
    let logits = raw_logits(model, normed)?;
    Ok(match model.transformer.logit_softcap {
        Some(cap) => soft_cap(&logits, cap)?,
        None => logits,
    })
}

/// The logits before any soft-cap, in f32.
fn raw_logits(model: &Model, normed: &Tensor) -> Result<Tensor> {
    Ok(model.transformer.raw_logits(normed)?.to_dtype(DType::F32)?)
}

/// The lens at every position of a `[1, seq, d]` normalised stream.
fn lens_cells(model: &Model, ids: &[u32], normed: &Tensor, top_k: usize) -> Result<Vec<LensCell>> {
    let logits: Vec<Vec<f32>> = unembed(model, &normed.squeeze(0)?)?.to_vec2()?;
    Ok(logits
        .iter()
        .enumerate()
        .map(|(p, logits)| {
            let probs = softmax(logits, 1.0);
            LensCell {
                top: token_probs(model, &probs, top_k),
                next_prob: ids.get(p + 1).map(|&next| probs[next as usize]),
            }
        })
        .collect())
}
