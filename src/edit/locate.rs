//! Where to write an edit: the layer and the key token, from the causal trace.
//!
//! ROME keys its edit on the subject's last token, at the layer whose MLP matters most
//! there. Small models often look facts up at the prompt's last token instead, where a
//! subject-keyed edit cannot work; `auto` traces the MLP outputs at both places and takes the
//! (position, layer) with the strongest effect. Every choice carries a sentence saying why.

use serde::Serialize;

use super::rome::KeyPosition;
use crate::causal::{Fact, Restore, TraceSettings, locate_subject, trace};
use crate::error::Result;
use crate::model::Model;

/// How the key is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySelect {
    Fixed(KeyPosition),
    Auto,
}

impl std::str::FromStr for KeySelect {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "subject-last" => Ok(Self::Fixed(KeyPosition::SubjectLast)),
            "prompt-last" => Ok(Self::Fixed(KeyPosition::PromptLast)),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown key position {other:?}: expected subject-last, prompt-last or auto"
            )),
        }
    }
}

/// The layer and key an edit uses, and why.
#[derive(Clone, Debug, Serialize)]
pub struct KeyChoice {
    pub layer: usize,
    pub key: KeyPosition,
    pub reason: String,
    /// Share of the corrupted-to-clean probability gap that restoring each layer's MLP output
    /// brings back, at `[subject-last, prompt-last]` (empty when nothing was traced).
    pub recovery: Vec<[f32; 2]>,
}

/// The model's own next token after `prompt`, decoded: the answer an edit replaces and a
/// trace follows.
pub fn current_answer(model: &Model, prompt: &str) -> Result<String> {
    let ids = model.encode_prompt(prompt)?;
    let top = crate::model::generate::next_token_top_k(model, &ids, 1, &Default::default())?;
    match top.first() {
        Some(t) => model.tokenizer.decode(&[t.id]),
        None => Err(crate::error::Error::InvalidArgument {
            what: "model",
            value: model.dir.display().to_string(),
            message: "has an empty vocabulary".into(),
        }),
    }
}

/// [`choose_key`] for an edit request: the noise scale from the world's subjects, and the
/// model's own current answer as the fact traced (that is what the edit replaces).
pub fn locate_request(
    model: &Model,
    kb: &crate::world::knowledge::KnowledgeBase,
    request: &super::rome::Request,
    layer: Option<usize>,
    select: KeySelect,
) -> Result<KeyChoice> {
    let sigma = crate::causal::subject_embedding_std(model, &kb.subject_names())?;
    let prompt = request.text();
    let current = current_answer(model, &prompt)?;
    let fact = Fact {
        prompt: &prompt,
        subject: &request.subject,
        target: &current,
    };
    choose_key(
        model,
        &fact,
        &TraceSettings::default(),
        sigma,
        layer,
        select,
    )
}

/// Chooses the layer (unless given) and the key position (unless fixed) for editing `fact`;
/// `sigma` scales the corruption noise (see [`crate::causal::subject_embedding_std`]) and
/// `noise` sets its level, samples and seed. The trace restores one layer at a time, whatever
/// `noise.window` says, so that the effect points at one layer: the window traces shown
/// beside it blur neighbouring layers together (and are cut short at the first and last
/// layers). This is the one place the CLI, `edit eval` and the GUI choose a layer.
pub fn choose_key(
    model: &Model,
    fact: &Fact,
    noise: &TraceSettings,
    sigma: f64,
    layer: Option<usize>,
    select: KeySelect,
) -> Result<KeyChoice> {
    if let (Some(layer), KeySelect::Fixed(key)) = (layer, select) {
        super::check_layer(model, layer)?;
        return Ok(KeyChoice {
            layer,
            key,
            reason: format!("layer {layer} and the {} key, as asked", key.name()),
            recovery: Vec::new(),
        });
    }
    if let Some(layer) = layer {
        super::check_layer(model, layer)?;
    }
    let (ids, subject) = locate_subject(model, fact.prompt, fact.subject)?;
    let positions = [subject.end - 1, ids.len() - 1];
    let t = trace(
        model,
        fact,
        &TraceSettings {
            window: 1,
            ..noise.clone()
        },
        sigma,
        Some(&positions),
        Restore::Mlp,
    )?;
    let gap = (t.p_clean - t.p_corrupt).abs().max(1e-9);
    let recovery: Vec<[f32; 2]> = t
        .p_restored
        .iter()
        .map(|row| [0, 1].map(|i| (row[i] - t.p_corrupt) / gap))
        .collect();
    let keys: Vec<(usize, KeyPosition)> = match select {
        KeySelect::Fixed(key) => vec![(key_slot(key), key)],
        KeySelect::Auto => vec![(0, KeyPosition::SubjectLast), (1, KeyPosition::PromptLast)],
    };
    let layers: Vec<usize> = match layer {
        Some(l) => vec![l],
        None => (0..recovery.len()).collect(),
    };
    let mut best = (layers[0], keys[0].1, f32::NEG_INFINITY);
    for &l in &layers {
        for &(slot, key) in &keys {
            if recovery[l][slot] > best.2 {
                best = (l, key, recovery[l][slot]);
            }
        }
    }
    let (layer, key, share) = best;
    let token = &t.tokens[positions[key_slot(key)]];
    let other = match select {
        KeySelect::Auto => {
            let alt = 1 - key_slot(key);
            let alt_best = layers
                .iter()
                .map(|&l| recovery[l][alt])
                .fold(f32::NEG_INFINITY, f32::max);
            format!(
                "; the best at the {} was {:.0}%",
                if alt == 0 {
                    "last subject token"
                } else {
                    "last token"
                },
                100.0 * alt_best
            )
        }
        KeySelect::Fixed(_) => String::new(),
    };
    Ok(KeyChoice {
        layer,
        key,
        reason: format!(
            "restoring layer {layer}'s MLP output at {token:?} ({}) brings back {:.0}% of P({:?}) lost to the corrupted subject, the most of the places traced{other}",
            key.name(),
            100.0 * share,
            fact.target
        ),
        recovery,
    })
}

fn key_slot(key: KeyPosition) -> usize {
    match key {
        KeyPosition::SubjectLast => 0,
        KeyPosition::PromptLast => 1,
    }
}
