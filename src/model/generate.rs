//! Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p,
//! seed), stopping at EOS or a token budget, with the next-token top-k distribution per step.
//! Hooks apply to every forward call, so interventions (steering, ablations, edits) show up
//! in generated text.

use candle_core::DType;
use rand::SeedableRng;
use rand::distr::{Distribution, weighted::WeightedIndex};
use rand::rngs::StdRng;
use serde::Serialize;

use super::{Hooks, KvCache, Model};
use crate::error::{Error, Result};

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = no limit).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument {
                what: "temperature",
                value: self.temperature.to_string(),
                message: "must be a finite number ≥ 0".to_string(),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument {
                what: "top-p",
                value: self.top_p.to_string(),
                message: "must be in (0, 1]".to_string(),
            });
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// How many of the most likely next tokens to report per step (0 = none).
    pub top_k_probs: usize,
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            sampling: Sampling::greedy(),
            top_k_probs: 0,
            stop_at_eos: true,
        }
    }
}

/// One candidate of a next-token distribution.
#[derive(Clone, Debug, Serialize)]
pub struct TokenProb {
    pub id: u32,
    pub token: String,
    pub prob: f32,
}

/// One generated token and the distribution it was drawn from.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub id: u32,
    pub token: String,
    pub prob: f32,
    pub top: Vec<TokenProb>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub steps: Vec<Step>,
    /// The decoded continuation (without the prompt).
    pub text: String,
    pub stop_reason: StopReason,
}

impl Generation {
    pub fn new_ids(&self) -> Vec<u32> {
        self.steps.iter().map(|s| s.id).collect()
    }
}

/// Generates a continuation of `prompt_ids` (batch of one).
pub fn generate(
    model: &Model,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    hooks: &Hooks,
) -> Result<Generation> {
    options.sampling.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let context = model.dims().context_length;
    if prompt_ids.len() > context {
        return Err(Error::PromptTooLong {
            tokens: prompt_ids.len(),
            max: context,
        });
    }
    let mut rng = StdRng::seed_from_u64(options.sampling.seed);
    let mut kv = KvCache::default();
    let mut steps = Vec::new();
    let mut next_input = prompt_ids.to_vec();
    let mut stop_reason = StopReason::MaxTokens;
    let switch = model.transformer.rope_switch_length();
    for _ in 0..options.max_new_tokens {
        if kv.len() + next_input.len() > context {
            stop_reason = StopReason::ContextFull;
            break;
        }
        // LongRoPE: the pass that first reaches past the original context re-reads the whole
        // sequence, its cached keys having been rotated by the short-context frequencies (as
        // transformers' Phi-3 does).
        if let Some(switch) = switch
            && !kv.is_empty()
            && kv.len() <= switch
            && kv.len() + next_input.len() > switch
        {
            next_input = (prompt_ids.iter().copied())
                .chain(steps.iter().map(|s: &Step| s.id))
                .collect();
            kv = KvCache::default();
        }
        let out = model.forward_cached(&model.ids_tensor(&next_input)?, &mut kv, hooks)?;
        let last = out.logits.get(0)?.get(next_input.len() - 1)?;
        let logits: Vec<f32> = last.to_dtype(DType::F32)?.to_vec1()?;
        let probs = softmax(&logits, 1.0);
        let id = pick(&logits, &options.sampling, &mut rng)?;
        let step = Step {
            id,
            token: model.tokenizer.token_display(id),
            prob: probs[id as usize],
            top: token_probs(model, &probs, options.top_k_probs),
        };
        steps.push(step);
        if options.stop_at_eos && model.eos_token_ids.contains(&id) {
            stop_reason = StopReason::Eos;
            break;
        }
        next_input = vec![id];
    }
    let ids: Vec<u32> = steps.iter().map(|s| s.id).collect();
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        text: model.tokenizer.decode(&ids)?,
        steps,
        stop_reason,
    })
}

/// The next-token distribution after `prompt_ids`: the `k` most likely tokens.
pub fn next_token_top_k(
    model: &Model,
    prompt_ids: &[u32],
    k: usize,
    hooks: &Hooks,
) -> Result<Vec<TokenProb>> {
    let out = model.forward(&model.ids_tensor(prompt_ids)?, hooks)?;
    let logits: Vec<f32> = out
        .logits
        .get(0)?
        .get(prompt_ids.len() - 1)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    Ok(top_tokens(model, &logits, k))
}

/// The `k` most likely next tokens given one position's logits.
pub fn top_tokens(model: &Model, logits: &[f32], k: usize) -> Vec<TokenProb> {
    token_probs(model, &softmax(logits, 1.0), k)
}

/// The `k` most likely tokens of a distribution, with their display strings.
pub(crate) fn token_probs(model: &Model, probs: &[f32], k: usize) -> Vec<TokenProb> {
    top_k(probs, k)
        .into_iter()
        .map(|(id, prob)| TokenProb {
            id,
            token: model.tokenizer.token_display(id),
            prob,
        })
        .collect()
}

/// The distribution of `logits` at `temperature`.
pub(crate) fn softmax(logits: &[f32], temperature: f64) -> Vec<f32> {
    let t = temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest probabilities, descending (ties: lower id first).
fn top_k(probs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..probs.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        probs[b as usize]
            .total_cmp(&probs[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.into_iter().map(|i| (i, probs[i as usize])).collect()
}

fn pick(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> Result<u32> {
    if s.temperature == 0.0 {
        return Ok(top_k(logits, 1).first().map_or(0, |(i, _)| *i));
    }
    let probs = softmax(logits, s.temperature);
    let mut ranked = top_k(&probs, if s.top_k == 0 { probs.len() } else { s.top_k });
    if s.top_p < 1.0 {
        let mut mass = 0.0f64;
        let keep = ranked
            .iter()
            .position(|(_, p)| {
                mass += f64::from(*p);
                mass >= s.top_p
            })
            .map_or(ranked.len(), |i| i + 1);
        ranked.truncate(keep);
    }
    let dist =
        WeightedIndex::new(ranked.iter().map(|(_, p)| *p)).map_err(|e| Error::InvalidArgument {
            what: "sampling distribution",
            value: format!("{} candidates", ranked.len()),
            message: e.to_string(),
        })?;
    Ok(ranked[dist.sample(rng)].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_keeps_the_smallest_set_reaching_p() {
        let logits = [3.0f32, 2.0, 1.0, -5.0];
        let probs = softmax(&logits, 1.0);
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: probs[0] as f64 * 0.99,
            seed: 7,
        };
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(pick(&logits, &s, &mut rng).unwrap(), 0);
        }
        let s2 = Sampling {
            top_k: 2,
            top_p: 1.0,
            ..s
        };
        for _ in 0..50 {
            assert!(pick(&logits, &s2, &mut rng).unwrap() < 2);
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            seed: 3,
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| pick(&logits, &s, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }
}
