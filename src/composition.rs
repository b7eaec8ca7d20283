//! Composition scores between attention heads, from the weights alone (Elhage et al. 2021, "A
//! Mathematical Framework for Transformer Circuits"; TransformerLens's
//! `all_composition_scores`): how much of what an earlier head writes a later head reads into
//! its queries (Q-composition), its keys (K-composition; previous-token heads feeding induction
//! heads) or its values (V-composition).
//!
//! With row vectors, a head writes through its OV matrix `W_V·W_O` and compares through its QK
//! matrix `W_Q·W_Kᵀ` (both `d_model × d_model`). The score of writer A and reader B is
//! `‖A·B‖_F / (‖A‖_F·‖B‖_F)`, where A is the writer's OV matrix and B the reader's QK matrix
//! (Q), its transpose (K) or its OV matrix (V). As TransformerLens's default loading does
//! (`fold_ln`, `center_writing_weights`), the reader's norm gain is folded into its W_Q, W_K and
//! W_V, and where the norm is a LayerNorm the reading weights are centred over the residual
//! dimension and the writing weights W_O too: the norm removes the mean, so a head can neither
//! write nor read along it. Biases play no part, and neither does rotary: QK is `W_Q·W_Kᵀ`
//! before the rotation, as in TransformerLens. Per-head query and key norms (Qwen3) count by
//! their gains, folded into W_Q and W_K (OLMo 2's norms over all heads at once: each head's
//! slice of the gain); their division by the RMS, a per-token scalar like the residual norm's,
//! is left out. So is the norm after attention of Gemma 2, whose gain
//! is folded into W_O.
//!
//! Every layer's attention weights are held in f64 while the scores are computed: fine for
//! models of a few hundred million parameters; the window asks only for the open head's
//! partners ([`head_composition`]).
//!
//! The `d_model × d_model` products are never formed: each squared norm is a sum over
//! `d_head × d_head` matrices (‖V·M·Rᵀ‖² = Σ M ⊙ (VᵀV·M·RᵀR) with M = W_O·L).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use ndarray::{Array2, ArrayView2, Axis, s};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::layers::Norm;

/// Which input of the later head reads the earlier head's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Composition {
    /// The writer's output moves the reader's queries.
    Q,
    /// The writer's output moves the reader's keys.
    K,
    /// The writer's output is what the reader moves.
    V,
}

impl Composition {
    pub const ALL: [Composition; 3] = [Self::Q, Self::K, Self::V];
}

impl fmt::Display for Composition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
        })
    }
}

impl FromStr for Composition {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q" => Ok(Self::Q),
            "k" => Ok(Self::K),
            "v" => Ok(Self::V),
            _ => Err(Error::InvalidArgument {
                what: "composition",
                value: s.to_string(),
                message: "expected q, k or v".into(),
            }),
        }
    }
}

/// Every head pair's score for one kind of composition.
#[derive(Clone, Debug, Serialize)]
pub struct CompositionScores {
    pub mode: Composition,
    /// `scores[writer layer][writer head][reader layer][reader head]`, as TransformerLens
    /// shapes them; 0 unless the writer's layer comes before the reader's.
    pub scores: Vec<Vec<Vec<Vec<f32>>>>,
    /// 1/√d_model: the root-mean-square score of a reader whose directions are random with
    /// respect to the writer's (E‖A·B‖² = ‖A‖²‖B‖²/d for a rotation-invariant B; 1/√(d − 1)
    /// after a LayerNorm's centring). Scores well above it mark heads that compose.
    pub baseline: f32,
}

/// One writer → reader pair's score; heads as (layer, head).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadPair {
    pub writer: (usize, usize),
    pub reader: (usize, usize),
    pub score: f32,
}

impl CompositionScores {
    /// Every pair with a score (the writer's layer before the reader's), the highest first.
    pub fn ranked(&self) -> Vec<HeadPair> {
        let mut out = Vec::new();
        for (wl, heads) in self.scores.iter().enumerate() {
            for (wh, readers) in heads.iter().enumerate() {
                for (rl, row) in readers.iter().enumerate().skip(wl + 1) {
                    out.extend(row.iter().enumerate().map(|(rh, &score)| HeadPair {
                        writer: (wl, wh),
                        reader: (rl, rh),
                        score,
                    }));
                }
            }
        }
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out
    }
}

/// A reader's matrix as `L·Rᵀ`, kept as what every score with it needs.
struct ReaderFactors {
    l: Array2<f64>,
    /// `RᵀR`.
    rr: Array2<f64>,
    /// `‖L·Rᵀ‖²`.
    norm2: f64,
}

/// One layer's heads as the matrices the scores read, `[d_model, d_head]` each (W_O as
/// `[d_head, d_model]`), with the norm folded in and the centring applied.
struct LayerHeads {
    q: Vec<Array2<f64>>,
    /// Each query head's key (under grouped-query attention its key head's).
    k: Vec<Array2<f64>>,
    v: Vec<Array2<f64>>,
    o: Vec<Array2<f64>>,
}

fn to_array(t: &Tensor) -> Result<Array2<f64>> {
    let (rows, cols) = t.dims2()?;
    let data = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Array2::from_shape_vec((rows, cols), data).map_err(|e| Error::InvalidArgument {
        what: "weight shape",
        value: format!("{rows}×{cols}"),
        message: e.to_string(),
    })
}

fn layer_heads(model: &Model, layer: usize) -> Result<LayerHeads> {
    let block = &model.transformer.blocks[layer];
    let attn = &block.attn;
    let (nh, nkv, hd) = (attn.n_heads, attn.n_kv_heads, attn.head_dim);
    let centred = block.ln_attn.centers();
    // [out, in] → per head [d_model, d_head]: gain folded into the input rows, then centred.
    let qkv = to_array(attn.qkv.weight())?;
    let gain = to_array(&block.ln_attn.weight().unsqueeze(1)?)?; // [d_model, 1]
    let reading = |row: usize| {
        let mut w = qkv.slice(s![row * hd..(row + 1) * hd, ..]).t().to_owned() * &gain;
        if centred {
            let mean = w.sum_axis(Axis(0)) / w.nrows() as f64;
            w -= &mean;
        }
        w
    };
    let group = (nh / nkv).max(1);
    let out = to_array(attn.out.weight())?; // [d_model, n_heads·d_head]
    // The gain of a norm after attention (Gemma 2, OLMo 2) scales what every head writes:
    // [1, d_model].
    let post_gain = match &block.post_norms {
        Some((after_attn, _)) => Some(to_array(&after_attn.weight().unsqueeze(0)?)?),
        None => None,
    };
    // Query and key norm gains scale each head's columns: [1, d_head] for head `h` (the same
    // for every head, or that head's slice where one norm spans them all, as in OLMo 2).
    let head_gain = |norm: &Norm, h: usize| -> Result<Option<Array2<f64>>> {
        let w = norm.weight();
        let w = if attn.qk_norm_over_heads {
            w.narrow(0, h * hd, hd)?
        } else {
            w.clone()
        };
        Ok(Some(to_array(&w.unsqueeze(0)?)?))
    };
    let (q_gain, k_gain): (Vec<_>, Vec<_>) = match &attn.qk_norm {
        Some((q, k)) => (
            (0..nh).map(|h| head_gain(q, h)).collect::<Result<_>>()?,
            (0..nkv).map(|h| head_gain(k, h)).collect::<Result<_>>()?,
        ),
        None => (vec![None; nh], vec![None; nkv]),
    };
    let with_gain = |w: Array2<f64>, gain: &Option<Array2<f64>>| match gain {
        Some(g) => w * g,
        None => w,
    };
    Ok(LayerHeads {
        q: (0..nh).map(|h| with_gain(reading(h), &q_gain[h])).collect(),
        k: (0..nh)
            .map(|h| with_gain(reading(nh + h / group), &k_gain[h / group]))
            .collect(),
        v: (0..nh).map(|h| reading(nh + nkv + h / group)).collect(),
        o: (0..nh)
            .map(|h| {
                let mut w = with_gain(
                    out.slice(s![.., h * hd..(h + 1) * hd]).t().to_owned(),
                    &post_gain,
                );
                if centred {
                    // Centre each written vector over the residual dimension.
                    let mean = (w.sum_axis(Axis(1)) / w.ncols() as f64).insert_axis(Axis(1));
                    w -= &mean;
                }
                w
            })
            .collect(),
    })
}

/// `Σ a ⊙ b`.
fn dot_all(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    (a * b).sum()
}

fn gram(a: ArrayView2<f64>) -> Array2<f64> {
    a.t().dot(&a)
}

impl ReaderFactors {
    /// Head `h` of `heads` as a reader: QK = W_Q·W_Kᵀ for Q, its transpose W_K·W_Qᵀ for K,
    /// OV = W_V·(W_Oᵀ)ᵀ for V.
    fn new(heads: &LayerHeads, h: usize, mode: Composition) -> Self {
        let (l, r) = match mode {
            Composition::Q => (heads.q[h].clone(), heads.k[h].clone()),
            Composition::K => (heads.k[h].clone(), heads.q[h].clone()),
            Composition::V => (heads.v[h].clone(), heads.o[h].t().to_owned()),
        };
        let rr = gram(r.view());
        let norm2 = dot_all(&gram(l.view()), &rr);
        Self { l, rr, norm2 }
    }
}

/// A writer's OV matrix `V·O`, kept as what every score with it needs.
struct WriterFactors<'a> {
    /// `VᵀV`.
    vv: Array2<f64>,
    o: &'a Array2<f64>,
    /// `‖V·O‖²`.
    norm2: f64,
}

impl<'a> WriterFactors<'a> {
    fn new(heads: &'a LayerHeads, h: usize) -> Self {
        let (v, o) = (&heads.v[h], &heads.o[h]);
        let vv = gram(v.view());
        let norm2 = dot_all(&vv, &o.dot(&o.t()));
        Self { vv, o, norm2 }
    }

    /// `‖OV·L·Rᵀ‖ / (‖OV‖·‖L·Rᵀ‖)`, through `M = O·L` (`d_head × d_head`).
    fn score(&self, reader: &ReaderFactors) -> f32 {
        let m = self.o.dot(&reader.l);
        let product = dot_all(&m, &self.vv.dot(&m).dot(&reader.rr));
        let denominator = self.norm2 * reader.norm2;
        if denominator > 0.0 {
            (product.max(0.0) / denominator).sqrt() as f32
        } else {
            0.0
        }
    }
}

fn baseline(model: &Model) -> f32 {
    1.0 / (model.dims().d_model as f32).sqrt()
}

/// Every head pair's composition score of kind `mode`.
pub fn composition_scores(model: &Model, mode: Composition) -> Result<CompositionScores> {
    let dims = model.dims();
    let (n_layers, n_heads) = (dims.n_layers, dims.n_heads);
    let layers: Vec<LayerHeads> = (0..n_layers)
        .map(|l| layer_heads(model, l))
        .collect::<Result<_>>()?;
    let readers: Vec<Vec<ReaderFactors>> = layers
        .iter()
        .map(|heads| {
            (0..n_heads)
                .map(|h| ReaderFactors::new(heads, h, mode))
                .collect()
        })
        .collect();
    let writers: Vec<(usize, usize)> = (0..n_layers)
        .flat_map(|l| (0..n_heads).map(move |h| (l, h)))
        .collect();
    let rows: Vec<Vec<Vec<f32>>> = writers
        .par_iter()
        .map(|&(wl, wh)| {
            let writer = WriterFactors::new(&layers[wl], wh);
            (0..n_layers)
                .map(|rl| match rl > wl {
                    true => readers[rl].iter().map(|r| writer.score(r)).collect(),
                    false => vec![0.0; n_heads],
                })
                .collect()
        })
        .collect();
    let mut scores = Vec::with_capacity(n_layers);
    let mut rows = rows.into_iter();
    for _ in 0..n_layers {
        scores.push(rows.by_ref().take(n_heads).collect());
    }
    Ok(CompositionScores {
        mode,
        scores,
        baseline: baseline(model),
    })
}

/// One head's partners for one kind of composition: the earlier heads it reads from and the
/// later heads that read it.
#[derive(Clone, Debug, Serialize)]
pub struct HeadPartners {
    pub mode: Composition,
    pub head: (usize, usize),
    /// `writers[layer][head]`: each earlier head's score into this one; 0 from its own layer on.
    pub writers: Vec<Vec<f32>>,
    /// `readers[layer][head]`: this head's score into each later head; 0 up to its own layer.
    pub readers: Vec<Vec<f32>>,
    /// As [`CompositionScores::baseline`].
    pub baseline: f32,
}

impl HeadPartners {
    /// The earlier heads it reads most from, as ((layer, head), score), the highest first.
    pub fn strongest_writers(&self) -> Vec<((usize, usize), f32)> {
        strongest(&self.writers, 0..self.head.0)
    }

    /// The later heads that read it most.
    pub fn strongest_readers(&self) -> Vec<((usize, usize), f32)> {
        strongest(&self.readers, self.head.0 + 1..self.readers.len())
    }
}

fn strongest(grid: &[Vec<f32>], layers: std::ops::Range<usize>) -> Vec<((usize, usize), f32)> {
    let mut out: Vec<((usize, usize), f32)> = layers
        .flat_map(|l| grid[l].iter().enumerate().map(move |(h, &v)| ((l, h), v)))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// Head (`layer`, `head`)'s partners for Q-, K- and V-composition: the window's view, one
/// other layer's weights in memory at a time. `None` when `cancel` was set (checked per layer).
pub fn head_composition(
    model: &Model,
    layer: usize,
    head: usize,
    cancel: &AtomicBool,
) -> Result<Option<Vec<HeadPartners>>> {
    let dims = model.dims();
    if layer >= dims.n_layers || head >= dims.n_heads {
        return Err(Error::InvalidArgument {
            what: "head",
            value: format!("{layer}.{head}"),
            message: format!(
                "is not a head of this model ({} layers × {} heads)",
                dims.n_layers, dims.n_heads
            ),
        });
    }
    let own = layer_heads(model, layer)?;
    let as_writer = WriterFactors::new(&own, head);
    let as_readers: Vec<ReaderFactors> = Composition::ALL
        .into_iter()
        .map(|mode| ReaderFactors::new(&own, head, mode))
        .collect();
    let zeros = vec![vec![0f32; dims.n_heads]; dims.n_layers];
    let mut partners: Vec<HeadPartners> = Composition::ALL
        .into_iter()
        .map(|mode| HeadPartners {
            mode,
            head: (layer, head),
            writers: zeros.clone(),
            readers: zeros.clone(),
            baseline: baseline(model),
        })
        .collect();
    for other in (0..dims.n_layers).filter(|&l| l != layer) {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let heads = layer_heads(model, other)?;
        for (p, as_reader) in partners.iter_mut().zip(&as_readers) {
            for h in 0..dims.n_heads {
                if other < layer {
                    p.writers[other][h] = WriterFactors::new(&heads, h).score(as_reader);
                } else {
                    p.readers[other][h] = as_writer.score(&ReaderFactors::new(&heads, h, p.mode));
                }
            }
        }
    }
    Ok(Some(partners))
}
