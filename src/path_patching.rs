//! Path patching (Wang et al. 2022, "Interpretability in the Wild"; Goldowsky-Dill et al.
//! 2023): how much of each head's effect on the answer flows along one path — straight to the
//! logits, or into the query, key or value input of chosen later heads — rather than through
//! every route at once, as activation patching ([`crate::patching`]) measures.
//!
//! For every sender head, in the run patched into (the *base* run; the corrupted one when
//! denoising):
//!
//! 1. the sender's output (its `attn.hook_z` columns) takes the other run's value, while every
//!    other head's output is frozen at the base run's; MLPs and norms are recomputed (as in
//!    ARENA's IOI path patching), so the sender's change travels through the residual stream
//!    and MLPs only;
//! 2. with the logits as receiver, that run's logit difference is the sender's cell; with
//!    heads as receivers, their inputs (`hook_q`, `hook_k` or `hook_v`) are read from that run
//!    and patched into a fresh base run, whose logit difference is the cell.
//!
//! Cells are on activation patching's scale: 0 = the corrupted run, 1 = the clean run. Only
//! senders before the last receiver's layer can reach a head receiver, so its grid has one row
//! per earlier layer.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};
use crate::patching::{BATCH, Direction, PairAverage, PairedRuns, PatchRequest, splice};

/// Which input of a receiving head the sender's effect is let into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInput {
    Query,
    Key,
    Value,
}

/// Where a path ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Receiver {
    /// The final residual stream, read by the unembedding: the senders' direct effect (and
    /// its route through later MLPs).
    Logits,
    /// One head's query, key or value input. Under grouped-query attention a key or value
    /// input belongs to the head's key head, which the other heads of its group read too.
    Head {
        layer: usize,
        head: usize,
        input: HeadInput,
    },
}

impl Receiver {
    /// The hook a head receiver's input is read and patched at.
    fn hook(self) -> Option<HookPoint> {
        match self {
            Self::Logits => None,
            Self::Head { layer, input, .. } => Some(match input {
                HeadInput::Query => HookPoint::AttnQ(layer),
                HeadInput::Key => HookPoint::AttnK(layer),
                HeadInput::Value => HookPoint::AttnV(layer),
            }),
        }
    }

    /// The channels of the receiver's input at its hook: its query, or its key head's key or
    /// value.
    fn channels(self, model: &Model) -> Vec<usize> {
        let dims = model.dims();
        let head = match self {
            Self::Logits => return Vec::new(),
            Self::Head {
                head,
                input: HeadInput::Query,
                ..
            } => head,
            Self::Head { head, .. } => head / (dims.n_heads / dims.n_kv_heads).max(1),
        };
        (head * dims.head_dim..(head + 1) * dims.head_dim).collect()
    }
}

impl fmt::Display for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Logits => write!(f, "logits"),
            Self::Head { layer, head, input } => {
                let input = match input {
                    HeadInput::Query => "q",
                    HeadInput::Key => "k",
                    HeadInput::Value => "v",
                };
                write!(f, "{layer}.{head}:{input}")
            }
        }
    }
}

impl FromStr for Receiver {
    type Err = Error;

    /// `logits`, or `LAYER.HEAD:q|k|v` ("4.0:q": head 0 of block 4, its query).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument {
            what: "path receiver",
            value: s.to_string(),
            message: "expected logits or LAYER.HEAD:q|k|v, e.g. 4.0:q".into(),
        };
        if s == "logits" {
            return Ok(Self::Logits);
        }
        let (head, input) = s.split_once(':').ok_or_else(bad)?;
        let (layer, head) = head.split_once('.').ok_or_else(bad)?;
        Ok(Self::Head {
            layer: layer.parse().map_err(|_| bad())?,
            head: head.parse().map_err(|_| bad())?,
            input: match input {
                "q" => HeadInput::Query,
                "k" => HeadInput::Key,
                "v" => HeadInput::Value,
                _ => return Err(bad()),
            },
        })
    }
}

/// A path-patching run: the prompt pair, answers and direction of `pair` (its sites and
/// attribution flag are not read) and where the paths end.
#[derive(Clone, Debug)]
pub struct PathRequest {
    pub pair: PatchRequest,
    pub receivers: Vec<Receiver>,
}

impl PathRequest {
    /// Sender layers: every layer for the logits, else those before the last receiver's.
    fn sender_layers(&self, n_layers: usize) -> usize {
        self.receivers
            .iter()
            .map(|r| match r {
                Receiver::Logits => n_layers,
                Receiver::Head { layer, .. } => *layer,
            })
            .max()
            .unwrap_or(0)
    }

    /// Forward passes the request costs (for progress): one per batch of senders, two with
    /// head receivers.
    pub fn passes(&self, model: &Model) -> usize {
        let dims = model.dims();
        let senders = self.sender_layers(dims.n_layers) * dims.n_heads;
        let per_batch = if self.receivers.contains(&Receiver::Logits) {
            1
        } else {
            2
        };
        senders.div_ceil(BATCH) * per_batch
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PathReport {
    pub clean_tokens: Vec<String>,
    pub corrupted_tokens: Vec<String>,
    pub answer: String,
    pub wrong: String,
    pub clean_logit_diff: f32,
    pub corrupted_logit_diff: f32,
    pub direction: Direction,
    /// The receivers as typed back (`logits`, `4.0:q`).
    pub receivers: Vec<String>,
    /// `senders[layer][head]`: the normalised logit difference with that head's effect let
    /// through the path alone, for the layers that can reach the receivers.
    pub senders: Vec<Vec<f32>>,
    /// Prompt pairs averaged into this report ([`average`]; 1 for one pair). Tokens and
    /// answers are the first pair's.
    pub pairs: usize,
}

impl PathReport {
    /// Every sender as `(layer, head, value)`, the furthest from the unpatched run first.
    pub fn ranked(&self) -> Vec<(usize, usize, f32)> {
        let unpatched = self.direction.unpatched();
        crate::attention::rank_heads(&self.senders, |v| (v - unpatched).abs())
    }
}

/// Runs the request, calling `progress(done, total)` after every forward pass; `None` when
/// `cancel` was set.
pub fn path_patch(
    model: &Model,
    request: &PathRequest,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<PathReport>> {
    validate(model, &request.receivers)?;
    let dims = model.dims();
    let outputs: Vec<HookPoint> = (0..dims.n_layers).map(HookPoint::AttnZ).collect();
    let runs = PairedRuns::new(model, &request.pair, &outputs)?;
    let (base, source) = runs.base_and_source(request.pair.direction);
    let base_ids = request.pair.base_ids();
    let inputs: Vec<(HookPoint, Vec<usize>)> = request
        .receivers
        .iter()
        .filter_map(|r| Some((r.hook()?, r.channels(model))))
        .collect();
    let senders: Vec<(usize, usize)> = (0..request.sender_layers(dims.n_layers))
        .flat_map(|l| (0..dims.n_heads).map(move |h| (l, h)))
        .collect();
    let (total, mut done) = (request.passes(model), 0);
    let mut cells = Vec::with_capacity(senders.len());
    for batch in senders.chunks(BATCH) {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let ids = model.ids_tensor(base_ids)?.repeat((batch.len(), 1))?;
        // Every head frozen at the base run's output, but each row's sender.
        let mut hooks = Hooks::new().capture(inputs.iter().map(|(point, _)| *point));
        for (layer, point) in outputs.iter().enumerate() {
            let (b, s) = (base.cache.require(*point)?, source.cache.require(*point)?);
            let freeze = Intervention::new(InterventionOp::Replace(b.clone()));
            hooks = hooks.intervene(*point, freeze);
            if let Some(mask) = sender_mask(model, batch, layer)? {
                // Interventions at a point run in order: the sender's columns after the freeze.
                hooks = hooks.intervene(*point, splice(s.clone(), mask));
            }
        }
        let sent = model.forward(&ids, &hooks)?;
        done += 1;
        progress(done, total);
        if inputs.is_empty() {
            cells.extend(runs.metric.normalised(&sent.logits)?);
            continue;
        }
        // The receivers' inputs from that run, into a fresh base run.
        let mut hooks = Hooks::new();
        for (point, channels) in &inputs {
            let d = sent.cache.require(*point)?.dim(2)?;
            let mut mask = vec![0f32; d];
            for &c in channels {
                mask[c] = 1.0;
            }
            let mask = Tensor::from_vec(mask, (1, 1, d), &model.device)?;
            hooks = hooks.intervene(*point, splice(sent.cache.require(*point)?.clone(), mask));
        }
        let received = model.forward(&ids, &hooks)?;
        done += 1;
        progress(done, total);
        cells.extend(runs.metric.normalised(&received.logits)?);
    }
    let pair = &request.pair;
    Ok(Some(PathReport {
        clean_tokens: model.tokenizer.tokens_display(&pair.clean),
        corrupted_tokens: model.tokenizer.tokens_display(&pair.corrupted),
        answer: model.tokenizer.token_display(pair.answer),
        wrong: model.tokenizer.token_display(pair.wrong),
        clean_logit_diff: runs.metric.clean,
        corrupted_logit_diff: runs.metric.corrupted,
        direction: pair.direction,
        receivers: request.receivers.iter().map(ToString::to_string).collect(),
        senders: cells
            .chunks(dims.n_heads.max(1))
            .map(<[f32]>::to_vec)
            .collect(),
        pairs: 1,
    }))
}

/// Several prompt pairs' reports (same receivers and direction) as one, as path-patching
/// studies average a dataset: each sender's logit difference averaged over the pairs, then
/// normalised with the averaged anchors. Cells are per head, not per position, so the pairs
/// may differ in length.
pub fn average(reports: &[PathReport]) -> Result<PathReport> {
    let first = reports.first().ok_or_else(|| Error::InvalidArgument {
        what: "prompt pairs",
        value: "none".into(),
        message: "name at least one pair".into(),
    })?;
    let shape = |r: &PathReport| (r.receivers.clone(), r.direction, r.senders.len());
    if let Some((i, r)) = reports
        .iter()
        .enumerate()
        .find(|(_, r)| shape(r) != shape(first))
    {
        return Err(Error::InvalidArgument {
            what: "prompt pair",
            value: format!("{} (pair {})", r.clean_tokens.concat(), i + 1),
            message: "was patched to other receivers or in the other direction than the first"
                .into(),
        });
    }
    let anchors: Vec<(f32, f32)> = reports
        .iter()
        .map(|r| (r.clean_logit_diff, r.corrupted_logit_diff))
        .collect();
    let pair_average = PairAverage::new(&anchors);
    let senders = first
        .senders
        .iter()
        .enumerate()
        .map(|(l, row)| {
            (0..row.len())
                .map(|h| pair_average.cell(reports.iter().map(|r| r.senders[l][h])))
                .collect()
        })
        .collect();
    Ok(PathReport {
        clean_logit_diff: pair_average.clean(),
        corrupted_logit_diff: pair_average.corrupted(),
        senders,
        pairs: reports.iter().map(|r| r.pairs).sum(),
        ..first.clone()
    })
}

/// `[rows, 1, n_heads·d_head]` 0/1: row `i` selects its sender's columns if the sender is in
/// `layer`. `None` when no row's sender is.
fn sender_mask(model: &Model, batch: &[(usize, usize)], layer: usize) -> Result<Option<Tensor>> {
    if batch.iter().all(|&(l, _)| l != layer) {
        return Ok(None);
    }
    let (heads, head_dim) = (model.dims().n_heads, model.dims().head_dim);
    let width = heads * head_dim;
    let mut data = vec![0f32; batch.len() * width];
    for (row, &(l, h)) in batch.iter().enumerate() {
        if l == layer {
            data[row * width + h * head_dim..row * width + (h + 1) * head_dim].fill(1.0);
        }
    }
    Ok(Some(Tensor::from_vec(
        data,
        (batch.len(), 1, width),
        &model.device,
    )?))
}

/// Refuses receivers the model does not have, none, or the logits mixed with heads.
fn validate(model: &Model, receivers: &[Receiver]) -> Result<()> {
    let dims = model.dims();
    let bad = |r: &Receiver, message: String| Error::InvalidArgument {
        what: "path receiver",
        value: r.to_string(),
        message,
    };
    if receivers.is_empty() {
        return Err(Error::InvalidArgument {
            what: "path receivers",
            value: String::new(),
            message: "name logits or at least one LAYER.HEAD:q|k|v".into(),
        });
    }
    for r in receivers {
        match *r {
            Receiver::Logits if receivers.len() > 1 => {
                return Err(bad(
                    r,
                    "stands alone: the logits and heads are different paths' ends".into(),
                ));
            }
            Receiver::Logits => {}
            Receiver::Head { layer, head, .. } => {
                if layer >= dims.n_layers || head >= dims.n_heads {
                    return Err(bad(
                        r,
                        format!(
                            "is not a head of this model ({} layers × {} heads)",
                            dims.n_layers, dims.n_heads
                        ),
                    ));
                }
                if layer == 0 {
                    return Err(bad(r, "no head comes before block 0 to send to it".into()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_parse_and_print_back() {
        for text in ["logits", "4.0:q", "11.3:k", "1.5:v"] {
            assert_eq!(text.parse::<Receiver>().unwrap().to_string(), text);
        }
        for bad in ["", "4.0", "4:q", "a.0:q", "4.0:z", "Logits"] {
            let err = bad.parse::<Receiver>().unwrap_err().to_string();
            assert!(err.contains("LAYER.HEAD:q|k|v"), "{bad}: {err}");
        }
    }
}
