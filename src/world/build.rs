//! `monoscope world build`: knowledge base → corpus and labels → tokenizer → trained GPT-2, all
//! in one output folder that is itself a loadable model folder.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::bpe::{EOS_TOKEN, train_tokenizer};
use super::corpus::{CorpusConfig, CorpusGenerator, token_labels};
use super::knowledge::KnowledgeBase;
use super::train::{Gpt2Shape, StepReport, TrainConfig, TrainData, TrainOutcome, Trainer};
use crate::error::{Error, Result};
use crate::files::{read_json, write_atomic};
use crate::model::Tokenizer;

/// Everything a build depends on; saved as `build.json` next to the model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuildConfig {
    pub corpus: CorpusConfig,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub train: TrainConfig,
}

impl Default for BuildConfig {
    /// The recipe of the bundled model.
    fn default() -> Self {
        Self {
            corpus: CorpusConfig::default(),
            vocab_size: 2048,
            n_layer: 8,
            n_embd: 192,
            n_head: 6,
            n_positions: 128,
            train: TrainConfig {
                steps: 2600,
                checkpoint_every: 250,
                ..TrainConfig::default()
            },
        }
    }
}

/// What a build reports as it goes.
pub enum BuildEvent<'a> {
    Stage(String),
    Step(&'a StepReport),
}

pub const CORPUS_DIR: &str = "corpus";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const BUILD_FILE: &str = "build.json";

/// Runs the whole pipeline into `out`. With `resume`, continues the training checkpoint in
/// `out` (the corpus and tokenizer are regenerated identically or reused).
pub fn build(
    knowledge: &Path,
    out: &Path,
    config: &BuildConfig,
    resume: bool,
    device: &Device,
    cancel: &AtomicBool,
    mut on_event: impl FnMut(BuildEvent),
) -> Result<TrainOutcome> {
    crate::files::require_output_path("the world build folder", out)?;
    // The model's shape and training settings are checked before anything is written.
    config.train.validate(&Gpt2Shape {
        vocab_size: config.vocab_size,
        n_positions: config.n_positions,
        n_embd: config.n_embd,
        n_layer: config.n_layer,
        n_head: config.n_head,
    })?;
    let kb = KnowledgeBase::load(knowledge)?;
    let corpus_dir = out.join(CORPUS_DIR);
    std::fs::create_dir_all(&corpus_dir).map_err(|e| Error::io(&corpus_dir, e))?;
    let checkpoint_dir = out.join(CHECKPOINT_DIR);
    let build_file = out.join(BUILD_FILE);
    if resume {
        // Only the step count may change on resume (to train longer).
        let mut saved: BuildConfig = read_json(&build_file)?;
        saved.train.steps = config.train.steps;
        if &saved != config {
            return Err(Error::InvalidArgument {
                what: "--resume",
                value: build_file.display().to_string(),
                message: "the folder was built with other settings; resume with the same ones (only --steps may change)"
                    .into(),
            });
        }
    }
    {
        let json = serde_json::to_string_pretty(config).map_err(|source| Error::Json {
            path: build_file.clone(),
            source,
        })?;
        write_atomic(&build_file, |tmp| {
            std::fs::write(tmp, json).map_err(|e| Error::io(tmp, e))
        })?;
    }

    on_event(BuildEvent::Stage(format!(
        "generating the corpus from {} countries",
        kb.countries.len()
    )));
    let generator = CorpusGenerator::new(&kb, config.corpus.clone())?;
    let docs = generator.training_documents();
    write_jsonl(&corpus_dir.join("train.jsonl"), &docs)?;
    write_jsonl(&corpus_dir.join("eval.jsonl"), &generator.eval_items())?;

    let tokenizer_path = out.join("tokenizer.json");
    if !(resume && tokenizer_path.is_file()) {
        on_event(BuildEvent::Stage(format!(
            "training a {}-token byte-level BPE",
            config.vocab_size
        )));
        train_tokenizer(
            docs.iter().map(|d| d.text.as_str()),
            config.vocab_size,
            &tokenizer_path,
        )?;
    }
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let eos = tokenizer
        .token_id(EOS_TOKEN)
        .ok_or_else(|| Error::Tokenizer {
            path: tokenizer_path.clone(),
            message: format!("no {EOS_TOKEN} token"),
        })?;

    on_event(BuildEvent::Stage(
        "tokenising and labelling the corpus".into(),
    ));
    let mut encoded = Vec::with_capacity(docs.len());
    let mut labels = Vec::with_capacity(docs.len());
    for doc in &docs {
        let (ids, offsets) = tokenizer.encode_with_offsets(&doc.text)?;
        labels.push(token_labels(doc, &ids, &offsets));
        encoded.push(ids);
    }
    write_jsonl(&corpus_dir.join("train.labels.jsonl"), &labels)?;
    let data = TrainData::from_documents(encoded, eos);

    let shape = Gpt2Shape {
        vocab_size: tokenizer.vocab_size(),
        n_positions: config.n_positions,
        n_embd: config.n_embd,
        n_layer: config.n_layer,
        n_head: config.n_head,
    };
    let mut trainer = if resume && Trainer::has_checkpoint(&checkpoint_dir) {
        let mut trainer = Trainer::resume(&checkpoint_dir, device)?;
        // Training longer: the cosine is stretched to the new end from here on.
        trainer.config.steps = config.train.steps;
        trainer
    } else {
        Trainer::new(shape, config.train.clone(), device)?
    };
    on_event(BuildEvent::Stage(format!(
        "training GPT-2 ({} parameters) on {} tokens of {} documents, from step {}",
        trainer.parameter_count(),
        data.tokens.len(),
        docs.len(),
        trainer.step()
    )));
    let outcome = trainer.run(&data, Some(&checkpoint_dir), cancel, |r| {
        on_event(BuildEvent::Step(r))
    })?;
    if outcome == TrainOutcome::Finished {
        trainer.save_model(out, eos)?;
    }
    Ok(outcome)
}

/// One JSON object per line, written atomically.
fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    write_atomic(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        for row in rows {
            serde_json::to_writer(&mut w, row).map_err(|source| Error::Json {
                path: tmp.to_path_buf(),
                source,
            })?;
            w.write_all(b"\n").map_err(|e| Error::io(tmp, e))?;
        }
        w.flush().map_err(|e| Error::io(tmp, e))
    })
}
