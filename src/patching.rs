//! Activation patching with a clean and a corrupted prompt (Vig et al. 2020; Wang et al. 2022,
//! "Interpretability in the Wild"; TransformerLens's `patching` module), and attribution
//! patching, its first-order estimate (Nanda 2023; Syed et al. 2023).
//!
//! The two prompts have the same number of tokens and differ in a few ("The capital of Japan
//! is" / "The capital of France is"). The metric is the logit difference between the clean
//! answer and the corrupted one (" Tokyo" − " Paris") at the last position. One activation at
//! a time — a layer's residual stream, attention or MLP output at one position, one head's
//! output, query, key, value or attention pattern at every position, a head's output or pattern
//! at one position — is copied from one run into the other:
//!
//! - **denoising** copies the clean value into the corrupted run: which activations are
//!   *enough* to bring the clean answer back;
//! - **noising** copies the corrupted value into the clean run: which ones the clean answer
//!   *needs*.
//!
//! Every figure is the patched run's logit difference on the scale where the corrupted run
//! scores 0 and the clean run 1, in both directions (denoising looks for values near 1, noising
//! for values near 0). Unlike causal tracing ([`crate::causal`]), nothing here is noise: the
//! corruption is a real counterfactual prompt, so the answer can move to a specific wrong token.
//!
//! Attribution patching linearises the metric around the run patched into: for each site,
//! (source − base) · ∂metric/∂site, from one forward and backward pass instead of one forward
//! pass per cell. It is exact for a linear metric and can be far off where attention saturates;
//! the report carries both grids so they can be compared.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Tensor};
use serde::Serialize;

use crate::causal::target_token;
use crate::error::{Error, Result};
use crate::model::generate::next_token_top_k;
use crate::model::{Dims, ForwardOutput, HookPoint, Hooks, Intervention, InterventionOp, Model};

/// Patched runs per forward pass (one batch row each).
pub(crate) const BATCH: usize = 32;

/// What is patched, one grid per site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// `blocks.L.hook_resid_pre` at one position: layer × position.
    ResidPre,
    /// `blocks.L.hook_attn_out` at one position: layer × position.
    AttnOut,
    /// `blocks.L.hook_mlp_out` at one position: layer × position.
    MlpOut,
    /// One head's `blocks.L.attn.hook_z` columns at every position: layer × head.
    Heads,
    /// One head's query (`blocks.L.attn.hook_q`) at every position: layer × head,
    /// TransformerLens's `attn_head_q_all_pos`. Whether what a head looks for matters.
    Queries,
    /// One key head's keys (`blocks.L.attn.hook_k`) at every position: layer × key head (fewer
    /// than the heads under grouped-query attention, each read by a group of heads). Whether
    /// what the tokens offer to be found by matters.
    Keys,
    /// One key head's values (`blocks.L.attn.hook_v`) at every position: layer × key head.
    /// Whether what the tokens pass on when attended to matters.
    Values,
    /// One head's attention pattern (`blocks.L.attn.hook_pattern`) at every query: layer ×
    /// head. Where the head looks, its values and output projection as they were.
    Patterns,
    /// One head's `blocks.L.attn.hook_z` columns at one position: layer × (head, position),
    /// TransformerLens's `attn_head_out_by_pos`. Which token a head's output matters at.
    HeadsByPos,
    /// One head's attention pattern at one query position: layer × (head, query),
    /// TransformerLens's `attn_head_pattern_by_pos`. From which token where a head looks
    /// matters.
    PatternsByPos,
    /// One head's query at one position: layer × (head, position), TransformerLens's
    /// `attn_head_q_by_pos`.
    QueriesByPos,
    /// One key head's key at one position: layer × (key head, position),
    /// `attn_head_k_by_pos`. Which token's key matters.
    KeysByPos,
    /// One key head's value at one position: layer × (key head, position),
    /// `attn_head_v_by_pos`. Which token's value matters.
    ValuesByPos,
}

/// What a grid's columns are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One per position of the prompt.
    Positions,
    /// One per head.
    Heads,
    /// One per head and position, head-major: column `head · seq + position`.
    HeadsByPosition,
}

impl Site {
    pub const ALL: [Site; 13] = [
        Site::ResidPre,
        Site::AttnOut,
        Site::MlpOut,
        Site::Heads,
        Site::Queries,
        Site::Keys,
        Site::Values,
        Site::Patterns,
        Site::HeadsByPos,
        Site::QueriesByPos,
        Site::KeysByPos,
        Site::ValuesByPos,
        Site::PatternsByPos,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ResidPre => "resid_pre",
            Self::AttnOut => "attn_out",
            Self::MlpOut => "mlp_out",
            Self::Heads => "heads",
            Self::Queries => "queries",
            Self::Keys => "keys",
            Self::Values => "values",
            Self::Patterns => "patterns",
            Self::HeadsByPos => "heads_by_pos",
            Self::PatternsByPos => "patterns_by_pos",
            Self::QueriesByPos => "queries_by_pos",
            Self::KeysByPos => "keys_by_pos",
            Self::ValuesByPos => "values_by_pos",
        }
    }

    /// The hook patched at `layer`.
    pub fn hook(self, layer: usize) -> HookPoint {
        match self {
            Self::ResidPre => HookPoint::ResidPre(layer),
            Self::AttnOut => HookPoint::AttnOut(layer),
            Self::MlpOut => HookPoint::MlpOut(layer),
            Self::Heads | Self::HeadsByPos => HookPoint::AttnZ(layer),
            Self::Queries | Self::QueriesByPos => HookPoint::AttnQ(layer),
            Self::Keys | Self::KeysByPos => HookPoint::AttnK(layer),
            Self::Values | Self::ValuesByPos => HookPoint::AttnV(layer),
            Self::Patterns | Self::PatternsByPos => HookPoint::AttnPattern(layer),
        }
    }

    /// What the grid's columns are.
    pub fn layout(self) -> Layout {
        match self {
            Self::ResidPre | Self::AttnOut | Self::MlpOut => Layout::Positions,
            Self::Heads | Self::Queries | Self::Keys | Self::Values | Self::Patterns => {
                Layout::Heads
            }
            Self::HeadsByPos
            | Self::PatternsByPos
            | Self::QueriesByPos
            | Self::KeysByPos
            | Self::ValuesByPos => Layout::HeadsByPosition,
        }
    }

    /// Column `column` of the grid on a prompt of `seq` tokens as (head, position); `None`
    /// where the cell spans every head or every position.
    pub fn cell(self, column: usize, seq: usize) -> (Option<usize>, Option<usize>) {
        match self.layout() {
            Layout::Positions => (None, Some(column)),
            Layout::Heads => (Some(column), None),
            Layout::HeadsByPosition => (Some(column / seq), Some(column % seq)),
        }
    }

    /// Whether a head column is a key head (keys and values), which under grouped-query
    /// attention serves several query heads.
    pub fn patches_key_heads(self) -> bool {
        matches!(
            self,
            Self::Keys | Self::Values | Self::KeysByPos | Self::ValuesByPos
        )
    }

    /// How many heads the site's hook holds: key heads for keys and values, else query heads.
    pub fn heads(self, dims: &Dims) -> usize {
        if self.patches_key_heads() {
            dims.n_kv_heads
        } else {
            dims.n_heads
        }
    }

    /// The names of every site, for messages.
    fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// Whether the site patches an attention pattern rather than an activation.
    fn patches_pattern(self) -> bool {
        matches!(self, Self::Patterns | Self::PatternsByPos)
    }

    /// The grid's columns on a prompt of `seq` tokens.
    fn columns(self, dims: &Dims, seq: usize) -> usize {
        match self.layout() {
            Layout::Positions => seq,
            Layout::Heads => self.heads(dims),
            Layout::HeadsByPosition => self.heads(dims) * seq,
        }
    }
}

impl std::str::FromStr for Site {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|site| site.name() == s)
            .ok_or_else(|| Error::InvalidArgument {
                what: "patching site",
                value: s.to_string(),
                message: format!("expected one of {}", Self::names()),
            })
    }
}

/// Which run is patched into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Clean values into the corrupted run (what suffices).
    #[default]
    Denoise,
    /// Corrupted values into the clean run (what is needed).
    Noise,
}

/// What to patch.
#[derive(Clone, Debug)]
pub struct PatchRequest {
    /// Token ids of the clean and corrupted prompts ([`Model::encode_prompt`]), same length.
    pub clean: Vec<u32>,
    pub corrupted: Vec<u32>,
    /// The clean answer and the corrupted one; the metric is logit(answer) − logit(wrong).
    pub answer: u32,
    pub wrong: u32,
    pub sites: Vec<Site>,
    pub direction: Direction,
    /// Also estimate every grid by attribution patching.
    pub attribution: bool,
}

impl PatchRequest {
    /// Every hook the request's sites patch, site by site, layer by layer.
    fn hook_points(&self, n_layers: usize) -> Vec<HookPoint> {
        self.sites
            .iter()
            .flat_map(|&site| (0..n_layers).map(move |l| site.hook(l)))
            .collect()
    }

    /// The tokens of the run patched into.
    pub fn base_ids(&self) -> &[u32] {
        match self.direction {
            Direction::Denoise => &self.corrupted,
            Direction::Noise => &self.clean,
        }
    }
}

/// One site's grid.
#[derive(Clone, Debug, Serialize)]
pub struct PatchGrid {
    pub site: Site,
    /// `patched[layer][column]`: the normalised logit difference with that one cell patched;
    /// columns as [`Site::layout`] says.
    pub patched: Vec<Vec<f32>>,
    /// The same cells estimated by attribution patching, on the same scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Vec<Vec<f32>>>,
}

impl PatchGrid {
    /// Every cell as `(layer, column, value)`, the furthest from the unpatched run first.
    pub fn ranked(&self, direction: Direction) -> Vec<(usize, usize, f32)> {
        let unpatched = direction.unpatched();
        crate::attention::rank_heads(&self.patched, |v| (v - unpatched).abs())
    }
}

impl PatchGrid {
    /// Pearson correlation of the attribution estimate with the patched grid over every
    /// cell: how far the one-pass estimate can stand in for patching here. `None` without an
    /// estimate or where either grid is constant.
    pub fn agreement(&self) -> Option<f64> {
        let estimate = self.attribution.as_ref()?;
        let xs: Vec<f64> = self
            .patched
            .iter()
            .flatten()
            .map(|&v| f64::from(v))
            .collect();
        let ys: Vec<f64> = estimate.iter().flatten().map(|&v| f64::from(v)).collect();
        let n = xs.len() as f64;
        let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
        let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
        for (x, y) in xs.iter().zip(&ys) {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx).powi(2);
            syy += (y - my).powi(2);
        }
        (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
    }
}

impl Direction {
    /// The normalised metric of the run patched into, before any patch.
    pub fn unpatched(self) -> f32 {
        match self {
            Self::Denoise => 0.0,
            Self::Noise => 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PatchReport {
    pub clean_tokens: Vec<String>,
    pub corrupted_tokens: Vec<String>,
    /// Positions where the prompts differ.
    pub differing: Vec<usize>,
    pub answer: String,
    pub wrong: String,
    /// logit(answer) − logit(wrong) at the last position of each run: the 1 and the 0 of the
    /// grids' scale.
    pub clean_logit_diff: f32,
    pub corrupted_logit_diff: f32,
    pub direction: Direction,
    pub grids: Vec<PatchGrid>,
    /// Prompt pairs averaged into this report ([`average`]; 1 for one pair). Tokens, labels
    /// and answers are then the first pair's.
    pub pairs: usize,
}

impl PatchReport {
    pub fn grid(&self, site: Site) -> Option<&PatchGrid> {
        self.grids.iter().find(|g| g.site == site)
    }

    /// Column labels for a position grid: the clean token, and "clean→corrupted" where the
    /// prompts differ.
    pub fn position_labels(&self) -> Vec<String> {
        self.clean_tokens
            .iter()
            .zip(&self.corrupted_tokens)
            .map(|(c, k)| {
                if c == k {
                    c.clone()
                } else {
                    format!("{c}→{k}")
                }
            })
            .collect()
    }
}

/// The usual answers when none are given: what the model predicts after the clean prompt,
/// against what it predicts after the corrupted one.
pub fn predicted_answers(model: &Model, clean: &[u32], corrupted: &[u32]) -> Result<(u32, u32)> {
    check_prompts(model, clean, corrupted)?;
    let (answer, wrong) = (prediction(model, clean)?, prediction(model, corrupted)?);
    refuse_same_prediction(model, corrupted, answer, wrong)?;
    Ok((answer, wrong))
}

fn prediction(model: &Model, ids: &[u32]) -> Result<u32> {
    let best = next_token_top_k(model, ids, 1, &Hooks::new())?;
    best.first().map(|t| t.id).ok_or(Error::EmptyPrompt)
}

fn refuse_same_prediction(model: &Model, corrupted: &[u32], answer: u32, wrong: u32) -> Result<()> {
    if answer != wrong {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        what: "corrupted prompt",
        value: model.tokenizer.decode(corrupted)?,
        message: format!(
            "the model predicts {} after both prompts: name the two answers to compare",
            model.tokenizer.token_display(answer)
        ),
    })
}

/// A clean and corrupted pair as typed: the prompts and, optionally, the answers' text.
#[derive(Clone, Copy, Debug)]
pub struct PromptPair<'a> {
    pub clean: &'a str,
    pub corrupted: &'a str,
    /// The clean answer (" Tokyo"); `None`: the model's prediction after the clean prompt.
    pub answer: Option<&'a str>,
    /// The corrupted answer (" Paris"); `None`: the prediction after the corrupted prompt.
    pub wrong: Option<&'a str>,
}

impl PatchRequest {
    /// Patches every site of `pair` in `direction` (no attribution): the prompts tokenised,
    /// each answer the first token of its continuation after its prompt, or the model's own
    /// prediction where none is given.
    pub fn from_prompts(model: &Model, pair: &PromptPair, direction: Direction) -> Result<Self> {
        let clean = model.encode_prompt(pair.clean)?;
        let corrupted = model.encode_prompt(pair.corrupted)?;
        check_prompts(model, &clean, &corrupted)?;
        let answer_of = |prompt: &str, ids: &[u32], text: Option<&str>| match text {
            Some(text) => target_token(model, prompt, text),
            None => prediction(model, ids),
        };
        let answer = answer_of(pair.clean, &clean, pair.answer)?;
        let wrong = answer_of(pair.corrupted, &corrupted, pair.wrong)?;
        if pair.answer.is_none() || pair.wrong.is_none() {
            refuse_same_prediction(model, &corrupted, answer, wrong)?;
        }
        Ok(Self {
            clean,
            corrupted,
            answer,
            wrong,
            sites: Site::ALL.to_vec(),
            direction,
            attribution: false,
        })
    }
}

/// The forward passes a request costs (for progress): one per patched cell, in batches.
pub fn passes(model: &Model, request: &PatchRequest) -> usize {
    let dims = model.dims();
    request
        .sites
        .iter()
        .map(|&site| {
            let columns = site.columns(dims, request.clean.len());
            dims.n_layers * columns.div_ceil(BATCH)
        })
        .sum()
}

/// Runs the request, calling `progress(done, total)` after every forward pass; `None` when
/// `cancel` was set.
pub fn patch(
    model: &Model,
    request: &PatchRequest,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<PatchReport>> {
    validate(model, request)?;
    if request.sites.is_empty() {
        return Err(Error::InvalidArgument {
            what: "patching sites",
            value: String::new(),
            message: format!("name at least one of {}", Site::names()),
        });
    }
    let dims = model.dims();
    let points = request.hook_points(dims.n_layers);
    let runs = PairedRuns::new(model, request, &points)?;
    let metric = &runs.metric;
    let (base, source) = runs.base_and_source(request.direction);
    let base_ids = request.base_ids();
    let total = passes(model, request);
    let mut done = 0;
    let mut grids = Vec::with_capacity(request.sites.len());
    for &site in &request.sites {
        let mut patched = Vec::with_capacity(dims.n_layers);
        for layer in 0..dims.n_layers {
            let point = site.hook(layer);
            let value = source.cache.require(point)?;
            let columns = site.columns(dims, base_ids.len());
            let mut row = Vec::with_capacity(columns);
            for start in (0..columns).step_by(BATCH) {
                if cancel.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let cells = start..(start + BATCH).min(columns);
                let mask = cell_mask(model, site, base_ids.len(), cells.clone())?;
                let hooks = Hooks::new().intervene(point, splice(value.clone(), mask));
                let ids = model.ids_tensor(base_ids)?.repeat((cells.len(), 1))?;
                let logits = model.forward(&ids, &hooks)?.logits;
                row.extend(metric.normalised(&logits)?);
                done += 1;
                progress(done, total);
            }
            patched.push(row);
        }
        grids.push(PatchGrid {
            site,
            patched,
            attribution: None,
        });
    }
    if request.attribution {
        let estimates = attribute(model, request, base_ids, base, source, metric)?;
        for (grid, estimate) in grids.iter_mut().zip(estimates) {
            grid.attribution = Some(estimate);
        }
    }
    Ok(Some(PatchReport {
        clean_tokens: model.tokenizer.tokens_display(&request.clean),
        corrupted_tokens: model.tokenizer.tokens_display(&request.corrupted),
        differing: (0..request.clean.len())
            .filter(|&p| request.clean[p] != request.corrupted[p])
            .collect(),
        answer: model.tokenizer.token_display(request.answer),
        wrong: model.tokenizer.token_display(request.wrong),
        clean_logit_diff: metric.clean,
        corrupted_logit_diff: metric.corrupted,
        direction: request.direction,
        grids,
        pairs: 1,
    }))
}

/// Several prompt pairs' reports (same token count, sites and direction) as one, the way
/// circuit studies patch a dataset rather than one prompt: each cell's logit difference
/// (recovered from its normalised score and its pair's anchors) is averaged over the pairs,
/// then normalised with the averaged clean and corrupted logit differences.
pub fn average(reports: &[PatchReport]) -> Result<PatchReport> {
    let first = reports.first().ok_or_else(|| Error::InvalidArgument {
        what: "prompt pairs",
        value: "none".into(),
        message: "name at least one pair".into(),
    })?;
    let shape = |r: &PatchReport| {
        let sites: Vec<Site> = r.grids.iter().map(|g| g.site).collect();
        (r.clean_tokens.len(), sites, r.direction)
    };
    if let Some((i, _)) = reports
        .iter()
        .enumerate()
        .find(|(_, r)| shape(r) != shape(first))
    {
        return Err(Error::InvalidArgument {
            what: "prompt pair",
            value: format!("{} (pair {})", reports[i].clean_tokens.concat(), i + 1),
            message: format!(
                "has {} tokens where the first pair has {}: averaged pairs need the same \
                 token count, sites and direction",
                reports[i].clean_tokens.len(),
                first.clean_tokens.len()
            ),
        });
    }
    let anchors: Vec<(f32, f32)> = reports
        .iter()
        .map(|r| (r.clean_logit_diff, r.corrupted_logit_diff))
        .collect();
    let pair_average = PairAverage::new(&anchors);
    // One cell of every report, as the averaged normalised score.
    let cell = |value: &dyn Fn(&PatchReport) -> f32| -> f32 {
        pair_average.cell(reports.iter().map(value))
    };
    let grids = first
        .grids
        .iter()
        .enumerate()
        .map(|(g, grid)| {
            let averaged = |estimate: bool| -> Option<Vec<Vec<f32>>> {
                if reports
                    .iter()
                    .any(|r| grid_values(r, g, estimate).is_none())
                {
                    return None;
                }
                let rows = grid_values(first, g, estimate)?;
                Some(
                    rows.iter()
                        .enumerate()
                        .map(|(l, row)| {
                            (0..row.len())
                                .map(|c| {
                                    cell(&|r| grid_values(r, g, estimate).map_or(0.0, |v| v[l][c]))
                                })
                                .collect()
                        })
                        .collect(),
                )
            };
            PatchGrid {
                site: grid.site,
                patched: averaged(false).unwrap_or_default(),
                attribution: averaged(true),
            }
        })
        .collect();
    let mut differing: Vec<usize> = reports.iter().flat_map(|r| r.differing.clone()).collect();
    differing.sort_unstable();
    differing.dedup();
    Ok(PatchReport {
        clean_tokens: first.clean_tokens.clone(),
        corrupted_tokens: first.corrupted_tokens.clone(),
        differing,
        answer: first.answer.clone(),
        wrong: first.wrong.clone(),
        clean_logit_diff: pair_average.clean(),
        corrupted_logit_diff: pair_average.corrupted(),
        direction: first.direction,
        grids,
        pairs: reports.iter().map(|r| r.pairs).sum(),
    })
}

/// Averages a cell's normalised scores over prompt pairs the way circuit studies average a
/// dataset: each score back to its pair's logit difference, the mean taken, then normalised
/// with the mean clean and corrupted logit differences (a mean of the ratios would weigh up
/// pairs whose clean and corrupted runs differ little).
pub(crate) struct PairAverage {
    /// Each pair's (clean, corrupted) logit difference.
    anchors: Vec<(f64, f64)>,
    clean: f64,
    corrupted: f64,
}

impl PairAverage {
    pub(crate) fn new(anchors: &[(f32, f32)]) -> Self {
        let anchors: Vec<(f64, f64)> = anchors
            .iter()
            .map(|&(c, k)| (f64::from(c), f64::from(k)))
            .collect();
        let n = anchors.len().max(1) as f64;
        Self {
            clean: anchors.iter().map(|a| a.0).sum::<f64>() / n,
            corrupted: anchors.iter().map(|a| a.1).sum::<f64>() / n,
            anchors,
        }
    }

    /// The mean clean logit difference.
    pub(crate) fn clean(&self) -> f32 {
        self.clean as f32
    }

    /// The mean corrupted logit difference.
    pub(crate) fn corrupted(&self) -> f32 {
        self.corrupted as f32
    }

    /// One cell: `scores` holds each pair's normalised score, in the anchors' order.
    pub(crate) fn cell(&self, scores: impl Iterator<Item = f32>) -> f32 {
        let raw = self
            .anchors
            .iter()
            .zip(scores)
            .map(|(&(clean, corrupted), score)| corrupted + f64::from(score) * (clean - corrupted))
            .sum::<f64>()
            / self.anchors.len().max(1) as f64;
        ((raw - self.corrupted) / (self.clean - self.corrupted)) as f32
    }
}

/// Report `r`'s grid `g`: the patched cells, or the attribution estimate.
fn grid_values(r: &PatchReport, g: usize, estimate: bool) -> Option<&Vec<Vec<f32>>> {
    match estimate {
        true => r.grids[g].attribution.as_ref(),
        false => Some(&r.grids[g].patched),
    }
}

/// The attribution-patching estimate of every site's grid: one backward pass through the run
/// patched into, with a gradient leaf at every patched hook.
fn attribute(
    model: &Model,
    request: &PatchRequest,
    base_ids: &[u32],
    base: &ForwardOutput,
    source: &ForwardOutput,
    metric: &Metric,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let dims = model.dims();
    let points = request.hook_points(dims.n_layers);
    let mut grads = metric_gradients(model, base_ids, metric, &points)?.into_iter();
    let scale = (metric.clean - metric.corrupted) as f64;
    let offset = request.direction.unpatched() as f64;
    let mut out = Vec::with_capacity(request.sites.len());
    for &site in &request.sites {
        let mut grid = Vec::with_capacity(dims.n_layers);
        for layer in 0..dims.n_layers {
            let point = site.hook(layer);
            let grad = grads.next().ok_or_else(|| Error::UnknownHook {
                name: point.to_string(),
                valid: String::new(),
            })?;
            let delta = (source.cache.require(point)? - base.cache.require(point)?)?
                .get(0)?
                .to_dtype(DType::F32)?; // [seq, d], or [heads, query, key] for patterns
            let effect = (grad.to_dtype(DType::F32)? * delta)?;
            let seq = base_ids.len();
            let cells = match (site.patches_pattern(), site.layout()) {
                // [heads, query, key] → per head, or per head and query.
                (true, Layout::Heads) => effect.flatten_from(1)?.sum(1)?,
                (true, _) => effect.sum(2)?.flatten_all()?,
                // [seq, heads·d_head] → per head, summed over positions or not.
                (false, Layout::Heads) => effect
                    .sum(0)?
                    .reshape((site.heads(dims), dims.head_dim))?
                    .sum(1)?,
                (false, Layout::HeadsByPosition) => effect
                    .reshape((seq, site.heads(dims), dims.head_dim))?
                    .sum(2)?
                    .t()?
                    .contiguous()?
                    .flatten_all()?,
                (false, Layout::Positions) => effect.sum(1)?,
            };
            let cells = cells.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            grid.push(
                cells
                    .into_iter()
                    .map(|e| (offset + e / scale) as f32)
                    .collect(),
            );
        }
        out.push(grid);
    }
    Ok(out)
}

/// The metric's two anchors.
pub(crate) struct Metric {
    pub answer: u32,
    pub wrong: u32,
    pub clean: f32,
    pub corrupted: f32,
}

impl Metric {
    pub fn normalise(&self, logit_diff: f32) -> f32 {
        (logit_diff - self.corrupted) / (self.clean - self.corrupted)
    }

    /// The normalised metric of each batch row of `logits`.
    pub fn normalised(&self, logits: &Tensor) -> Result<Vec<f32>> {
        Ok(logit_diffs(logits, self.answer, self.wrong)?
            .into_iter()
            .map(|m| self.normalise(m))
            .collect())
    }
}

/// A request's clean and corrupted runs with `points` captured, and the metric they anchor.
pub(crate) struct PairedRuns {
    pub clean: ForwardOutput,
    pub corrupted: ForwardOutput,
    pub metric: Metric,
}

impl PairedRuns {
    /// Validates the request's pair and answers; refuses a pair the metric cannot tell apart.
    pub fn new(model: &Model, request: &PatchRequest, points: &[HookPoint]) -> Result<Self> {
        validate(model, request)?;
        let run = |ids: &[u32]| {
            model.forward(
                &model.ids_tensor(ids)?,
                &Hooks::new().capture(points.iter().copied()),
            )
        };
        let clean = run(&request.clean)?;
        let corrupted = run(&request.corrupted)?;
        let metric = Metric {
            answer: request.answer,
            wrong: request.wrong,
            clean: logit_diffs(&clean.logits, request.answer, request.wrong)?[0],
            corrupted: logit_diffs(&corrupted.logits, request.answer, request.wrong)?[0],
        };
        // NaN logits fall here too.
        if (metric.clean - metric.corrupted).abs().partial_cmp(&1e-6)
            != Some(std::cmp::Ordering::Greater)
        {
            return Err(Error::InvalidArgument {
                what: "prompt pair",
                value: format!(
                    "logit difference {} clean, {} corrupted",
                    metric.clean, metric.corrupted
                ),
                message: "the clean and corrupted runs score the same, so there is nothing to \
                          restore: choose prompts or answers the model tells apart"
                    .into(),
            });
        }
        Ok(Self {
            clean,
            corrupted,
            metric,
        })
    }

    /// The run patched into and the run patched from, in `direction`.
    pub fn base_and_source(&self, direction: Direction) -> (&ForwardOutput, &ForwardOutput) {
        match direction {
            Direction::Denoise => (&self.corrupted, &self.clean),
            Direction::Noise => (&self.clean, &self.corrupted),
        }
    }
}

/// ∂(logit difference)/∂value at each of `points`, on the run of `ids`: `[seq, d]` per
/// point, in the run dtype; zeros where the metric does not reach (no hook in a decoder).
pub(crate) fn metric_gradients(
    model: &Model,
    ids: &[u32],
    metric: &Metric,
    points: &[HookPoint],
) -> Result<Vec<Tensor>> {
    let hooks = points.iter().fold(Hooks::new(), |h, &p| h.grad(p));
    let run = model.forward(&model.ids_tensor(ids)?, &hooks)?;
    let grads = logit_diff_tensor(&run.logits, metric.answer, metric.wrong)?
        .sum_all()?
        .backward()?;
    points
        .iter()
        .map(|&point| {
            let leaf = run.grad_leaf(point).ok_or_else(|| Error::UnknownHook {
                name: point.to_string(),
                valid: String::new(),
            })?;
            Ok(match grads.get(leaf) {
                Some(g) => g.get(0)?,
                None => leaf.get(0)?.zeros_like()?,
            })
        })
        .collect()
}

fn validate(model: &Model, request: &PatchRequest) -> Result<()> {
    check_prompts(model, &request.clean, &request.corrupted)?;
    if request.answer == request.wrong {
        return Err(Error::InvalidArgument {
            what: "wrong answer",
            value: model.tokenizer.token_display(request.wrong),
            message: "is the answer: the metric is the logit difference of two tokens".into(),
        });
    }
    for (what, id) in [("answer", request.answer), ("wrong answer", request.wrong)] {
        if id as usize >= model.dims().vocab_size {
            return Err(Error::InvalidArgument {
                what,
                value: id.to_string(),
                message: format!("is not a token id (vocabulary {})", model.dims().vocab_size),
            });
        }
    }
    Ok(())
}

/// Refuses a prompt pair patching cannot use: empty, of different token counts, or the same.
pub fn check_prompts(model: &Model, clean: &[u32], corrupted: &[u32]) -> Result<()> {
    if clean.is_empty() || corrupted.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if clean.len() != corrupted.len() {
        return Err(Error::InvalidArgument {
            what: "corrupted prompt",
            value: format!(
                "{} tokens against the clean prompt's {}",
                corrupted.len(),
                clean.len()
            ),
            message: "patching copies activations position by position, so both prompts must \
                      have the same number of tokens (swap in names of the same token length)"
                .into(),
        });
    }
    if clean == corrupted {
        return Err(Error::InvalidArgument {
            what: "corrupted prompt",
            value: model.tokenizer.decode(corrupted)?,
            message: "is the clean prompt: change the tokens whose effect should be traced".into(),
        });
    }
    Ok(())
}

/// 0/1 mask selecting one cell per batch row: row `i` patches column `cells.start + i` of
/// the site's [`Layout`]. For activations `[rows, seq, heads·d_head]` (a whole head's
/// `d_head` channels per cell), for patterns `[rows, heads, seq, 1]` (a query's whole row of
/// keys per cell); dimensions a layout does not select are 1 and broadcast.
fn cell_mask(
    model: &Model,
    site: Site,
    seq: usize,
    cells: std::ops::Range<usize>,
) -> Result<Tensor> {
    let rows = cells.len();
    let (heads, head_dim) = (site.heads(model.dims()), model.dims().head_dim);
    let (selects_head, selects_position) = site.cell(0, seq);
    let (head_span, position_span) = (
        if selects_head.is_some() { heads } else { 1 },
        if selects_position.is_some() { seq } else { 1 },
    );
    let (outer, inner) = if site.patches_pattern() {
        (head_span, position_span)
    } else {
        (position_span, head_span)
    };
    let mut data = vec![0f32; rows * outer * inner];
    for (row, c) in cells.enumerate() {
        let (head, position) = site.cell(c, seq);
        let (head, position) = (head.unwrap_or(0), position.unwrap_or(0));
        let (o, i) = if site.patches_pattern() {
            (head, position)
        } else {
            (position, head)
        };
        data[(row * outer + o) * inner + i] = 1.0;
    }
    let mask = Tensor::from_vec(data, (rows, outer, inner), &model.device)?;
    Ok(if site.patches_pattern() {
        mask.unsqueeze(3)?
    } else if head_span > 1 {
        // A head is its d_head channels.
        mask.unsqueeze(3)?.repeat((1, 1, 1, head_dim))?.reshape((
            rows,
            position_span,
            heads * head_dim,
        ))?
    } else {
        mask
    })
}

/// An intervention that replaces the masked entries of each batch row with `source`
/// (`[1, seq, d]` or a pattern's `[1, heads, query, key]`, broadcast over the rows).
pub(crate) fn splice(source: Tensor, mask: Tensor) -> Intervention {
    Intervention::new(InterventionOp::Func(Arc::new(
        move |x: &Tensor, _offset| {
            let mask = mask.to_dtype(x.dtype())?;
            let keep = mask.affine(-1.0, 1.0)?;
            x.broadcast_mul(&keep)?
                .add(&source.to_dtype(x.dtype())?.broadcast_mul(&mask)?)
        },
    )))
}

/// logit(answer) − logit(wrong) at the last position of every batch row, `[batch]`.
fn logit_diff_tensor(logits: &Tensor, answer: u32, wrong: u32) -> Result<Tensor> {
    let last = logits.dim(1)? - 1;
    let last = logits.narrow(1, last, 1)?.squeeze(1)?;
    let a = last.narrow(D::Minus1, answer as usize, 1)?;
    let w = last.narrow(D::Minus1, wrong as usize, 1)?;
    Ok((a - w)?.squeeze(1)?)
}

fn logit_diffs(logits: &Tensor, answer: u32, wrong: u32) -> Result<Vec<f32>> {
    Ok(logit_diff_tensor(logits, answer, wrong)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tokens: usize, clean: f32, corrupted: f32, cells: [f32; 2]) -> PatchReport {
        PatchReport {
            clean_tokens: vec!["a".into(); tokens],
            corrupted_tokens: vec!["b".into(); tokens],
            differing: vec![tokens - 1],
            answer: "x".into(),
            wrong: "y".into(),
            clean_logit_diff: clean,
            corrupted_logit_diff: corrupted,
            direction: Direction::Denoise,
            grids: vec![PatchGrid {
                site: Site::ResidPre,
                patched: vec![cells.to_vec()],
                attribution: Some(vec![cells.to_vec()]),
            }],
            pairs: 1,
        }
    }

    /// Cells are averaged as logit differences, then normalised with the averaged anchors:
    /// a pair with a wide span weighs more than its normalised score alone would.
    #[test]
    fn averaging_pairs_averages_logit_differences_then_normalises() {
        // Pair 1: corrupted 0, clean 10, cells 0.5 and 1.0 → logit differences 5 and 10.
        // Pair 2: corrupted −2, clean 2, cells 0.0 and 1.0 → logit differences −2 and 2.
        let reports = [
            report(2, 10.0, 0.0, [0.5, 1.0]),
            report(2, 2.0, -2.0, [0.0, 1.0]),
        ];
        let averaged = average(&reports).unwrap();
        // Anchors: clean 6, corrupted −1; cells: (5 − 2)/2 = 1.5 → 2.5/7, (10 + 2)/2 = 6 → 1.
        assert_eq!(averaged.pairs, 2);
        assert!((averaged.clean_logit_diff - 6.0).abs() < 1e-6);
        assert!((averaged.corrupted_logit_diff + 1.0).abs() < 1e-6);
        let grid = &averaged.grids[0];
        assert!((grid.patched[0][0] - 2.5 / 7.0).abs() < 1e-6);
        assert!((grid.patched[0][1] - 1.0).abs() < 1e-6);
        assert_eq!(grid.attribution.as_ref().unwrap(), &grid.patched);
        // One pair averages to itself.
        let alone = average(&reports[..1]).unwrap();
        assert_eq!(alone.grids[0].patched, reports[0].grids[0].patched);
        // Pairs of different lengths cannot share position grids.
        let err = average(&[report(2, 1.0, 0.0, [0.0; 2]), report(3, 1.0, 0.0, [0.0; 2])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("pair 2") && err.contains("3 tokens"), "{err}");
        assert!(average(&[]).is_err());
    }
}
