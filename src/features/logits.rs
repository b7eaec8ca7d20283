//! What a feature writes, read through the unembedding (logit effects), and which features
//! write in similar directions (decoder cosine neighbours).
//!
//! Logit effects follow the direct path only, as sae_vis and Neuronpedia do: the feature's
//! decoder row is mapped into the residual stream, then through the final norm *as if its
//! scale were constant* (LayerNorm: centre the vector, multiply by the gain; RMSNorm: multiply
//! by the gain), then through the unembedding. Later layers are ignored. Per hook:
//! - residual-stream hooks (`hook_embed`, `hook_pos_embed`, `hook_resid_*`, `hook_attn_out`,
//!   `hook_mlp_out`): the decoder row is already a residual direction;
//! - `mlp.hook_post`: the row goes through that layer's down projection (without its bias),
//!   which is exactly how the MLP writes it into the residual stream;
//! - `ln_final.hook_normalized`: the row is already normalised (centred and scaled); only the
//!   final norm's gain and the unembedding apply;
//! - the norms after attention and after the MLP (Gemma 2, OLMo 2) are held at constant scale
//!   the same way: `mlp.hook_post` and `attn.hook_z` go through the projection and then that
//!   norm's gain, `ln1_post`/`ln2_post`'s `hook_in` and `hook_normalized` through the gain alone;
//! - the logit soft-cap of Gemma 2 is left out: it is monotonic, so the top and bottom tokens
//!   are the same, and the effects are in the uncapped logits' units;
//! - `mlp.hook_pre` and `mlp.hook_pre_linear`, the attention's queries, keys, values, scores
//!   and pattern, the pre-norms' outputs and every norm's scale: no linear path to the
//!   residual stream exists (a nonlinearity, or the attention itself, sits in between), so no
//!   logit effects are reported.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::Model;
use crate::model::hooks::HookPoint;
use crate::sae::cpu::{MatRef, matmul};

/// How logit effects are computed, in one line (recorded in `features.json`).
pub const METHOD: &str = "direct path: decoder row → residual stream (through the layer's down projection for mlp.hook_post, and the gain of any norm after it) → final norm with its scale held constant (centre, gain) → unembedding";

/// Features per block in the batched products (bounds memory to `BLOCK × max(vocab, d_sae)`).
const BLOCK: usize = 512;

/// One token and the logit a feature's direction adds to it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenEffect {
    pub token_id: u32,
    pub token: String,
    pub logit: f32,
}

/// Top and bottom tokens of one feature's direct logit effect.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LogitEffects {
    pub top: Vec<TokenEffect>,
    pub bottom: Vec<TokenEffect>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// The direct-path logit effects of each row of `w_dec` (`[d_sae, d_in]`) written at `hook`:
/// the `n` most promoted and `n` most suppressed tokens, named from `names`
/// ([`Model::token_names`]). `None` for hooks without a linear path to the logits
/// (`mlp.hook_pre`, and the queries, keys and values, which reach the logits only through
/// attention).
pub fn logit_effects(
    model: &Model,
    hook: HookPoint,
    w_dec: &Tensor,
    n: usize,
    names: &[String],
) -> Result<Option<Vec<LogitEffects>>> {
    let t = &model.transformer;
    let (d_sae, d_in) = w_dec.dims2()?;
    let d_model = t.dims.d_model;
    let w_dec = to_vec(w_dec)?;
    // Map into the residual stream: `[d_in, d_model]` (None = identity).
    // `centre`: whether the row still needs the final norm's centring (it always takes the gain).
    let (to_resid, centre) = match hook {
        HookPoint::Ln1PostIn(_)
        | HookPoint::Ln1PostNormalized(_)
        | HookPoint::Ln2PostIn(_)
        | HookPoint::Ln2PostNormalized(_) => (None, true),
        // Not a direction in any space the model writes from (the pattern is not even one
        // vector per token: SAEs cannot be trained there).
        HookPoint::MlpIn(_)
        | HookPoint::MlpPre(_)
        | HookPoint::MlpPreLinear(_)
        | HookPoint::Ln1Scale(_)
        | HookPoint::Ln1Normalized(_)
        | HookPoint::Ln2Scale(_)
        | HookPoint::Ln2Normalized(_)
        | HookPoint::Ln1PostScale(_)
        | HookPoint::Ln2PostScale(_)
        | HookPoint::LnFinalScale
        | HookPoint::AttnScores(_)
        | HookPoint::AttnPattern(_)
        | HookPoint::AttnQ(_)
        | HookPoint::AttnK(_)
        | HookPoint::AttnV(_)
        | HookPoint::AttnQNormed(_)
        | HookPoint::AttnKNormed(_)
        | HookPoint::AttnRotQ(_)
        | HookPoint::AttnRotK(_) => return Ok(None),
        HookPoint::MlpPost(layer) => {
            // Linear weight is `[d_model, d_mlp]`: the map is its transpose.
            let w = to_vec(t.blocks[layer].mlp.down_proj().weight())?;
            (Some(w), true)
        }
        HookPoint::AttnZ(layer) => {
            // The output projection, `[d_model, n_heads·d_head]`, as for `mlp.hook_post`.
            let w = to_vec(t.blocks[layer].attn.out.weight())?;
            (Some(w), true)
        }
        HookPoint::LnFinal => (None, false),
        HookPoint::Embed
        | HookPoint::PosEmbed
        | HookPoint::ResidPre(_)
        | HookPoint::AttnOut(_)
        | HookPoint::ResidMid(_)
        | HookPoint::MlpOut(_)
        | HookPoint::ResidPost(_) => (None, true),
    };
    // The gain of the norm after attention or the MLP (Gemma 2, OLMo 2), for what is written
    // before it.
    let post_gain = match hook {
        HookPoint::AttnZ(l) | HookPoint::Ln1PostIn(l) | HookPoint::Ln1PostNormalized(l) => t.blocks
            [l]
            .post_norms
            .as_ref()
            .map(|(after_attn, _)| after_attn),
        HookPoint::MlpPost(l) | HookPoint::Ln2PostIn(l) | HookPoint::Ln2PostNormalized(l) => t
            .blocks[l]
            .post_norms
            .as_ref()
            .map(|(_, after_mlp)| after_mlp),
        _ => None,
    }
    .map(|norm| to_vec(norm.weight()))
    .transpose()?;
    let gain = to_vec(t.ln_final.weight())?;
    let centers = t.ln_final.centers();
    let unembed = to_vec(&t.unembed)?; // [vocab, d_model]
    let vocab = t.dims.vocab_size;

    let mut out = Vec::with_capacity(d_sae);
    for start in (0..d_sae).step_by(BLOCK) {
        let rows = BLOCK.min(d_sae - start);
        let dirs = &w_dec[start * d_in..(start + rows) * d_in];
        let mut resid = match &to_resid {
            Some(w) => {
                let mut r = vec![0f32; rows * d_model];
                matmul(
                    MatRef::new(dirs, rows, d_in),
                    MatRef::new(w, d_model, d_in).t(),
                    &mut r,
                    false,
                );
                r
            }
            None => dirs.to_vec(),
        };
        for r in resid.chunks_exact_mut(d_model) {
            if let Some(post) = &post_gain {
                r.iter_mut().zip(post).for_each(|(v, g)| *v *= g);
            }
            if centre && centers {
                let mean = r.iter().sum::<f32>() / d_model as f32;
                r.iter_mut().for_each(|v| *v -= mean);
            }
            r.iter_mut().zip(&gain).for_each(|(v, g)| *v *= g);
        }
        let mut logits = vec![0f32; rows * vocab];
        matmul(
            MatRef::new(&resid, rows, d_model),
            MatRef::new(&unembed, vocab, d_model).t(),
            &mut logits,
            false,
        );
        let block: Vec<LogitEffects> = logits
            .par_chunks(vocab)
            .map(|row| {
                let pick = |ids: Vec<usize>| {
                    ids.into_iter()
                        .map(|i| TokenEffect {
                            token_id: i as u32,
                            token: names.get(i).cloned().unwrap_or_default(),
                            logit: row[i],
                        })
                        .collect()
                };
                LogitEffects {
                    top: pick(extreme_indices(row, n, true)),
                    bottom: pick(extreme_indices(row, n, false)),
                }
            })
            .collect();
        out.extend(block);
    }
    Ok(Some(out))
}

/// Indices of the `n` largest (or smallest) values, most extreme first.
fn extreme_indices(values: &[f32], n: usize, largest: bool) -> Vec<usize> {
    let key = |i: usize| if largest { -values[i] } else { values[i] };
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| key(a).total_cmp(&key(b)));
    idx.truncate(n);
    idx.sort_unstable_by(|&a, &b| key(a).total_cmp(&key(b)));
    idx
}

/// A feature's nearest features by cosine similarity of decoder rows.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Neighbours {
    pub features: Vec<u32>,
    pub cosines: Vec<f32>,
}

/// For every row of `w_dec` (`[d_sae, d_in]`), the `n` other rows with the highest cosine.
pub fn decoder_neighbours(w_dec: &Tensor, n: usize) -> Result<Vec<Neighbours>> {
    let (d_sae, d_in) = w_dec.dims2()?;
    let mut unit = to_vec(w_dec)?;
    for r in unit.chunks_exact_mut(d_in) {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            r.iter_mut().for_each(|v| *v /= norm);
        }
    }
    let mut out = Vec::with_capacity(d_sae);
    let mut sims = vec![0f32; BLOCK * d_sae];
    for start in (0..d_sae).step_by(BLOCK) {
        let rows = BLOCK.min(d_sae - start);
        let sims = &mut sims[..rows * d_sae];
        matmul(
            MatRef::new(&unit[start * d_in..(start + rows) * d_in], rows, d_in),
            MatRef::new(&unit, d_sae, d_in).t(),
            sims,
            false,
        );
        let block: Vec<Neighbours> = sims
            .par_chunks_mut(d_sae)
            .enumerate()
            .map(|(i, row)| {
                row[start + i] = f32::NEG_INFINITY;
                // Never the feature itself, however many neighbours are asked for.
                let ids = extreme_indices(row, n.min(d_sae - 1), true);
                Neighbours {
                    cosines: ids.iter().map(|&j| row[j]).collect(),
                    features: ids.into_iter().map(|j| j as u32).collect(),
                }
            })
            .collect();
        out.extend(block);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extremes_come_most_extreme_first() {
        let v = [0.5, -2.0, 3.0, 1.0, -1.0];
        assert_eq!(extreme_indices(&v, 2, true), vec![2, 3]);
        assert_eq!(extreme_indices(&v, 2, false), vec![1, 4]);
        assert_eq!(extreme_indices(&v, 9, true).len(), 5);
    }

    #[test]
    fn neighbours_rank_by_cosine_and_skip_self() {
        let w = Tensor::new(
            &[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let nb = decoder_neighbours(&w, 2).unwrap();
        assert_eq!(nb[0].features, vec![1, 2]);
        assert!((nb[0].cosines[0] - 0.9 / (0.82f32).sqrt()).abs() < 1e-5);
        assert_eq!(nb[3].features[0], 2);
    }
}
