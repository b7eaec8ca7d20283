//! The bundled world model: a knowledge base of real countries, a bilingual corpus generated
//! from it with ground-truth labels, a BPE tokenizer and a GPT-2 trained by monoscope itself.

pub mod bpe;
pub mod build;
pub mod corpus;
pub mod eval;
pub mod knowledge;
pub mod train;

pub use corpus::{CorpusConfig, CorpusGenerator, Document, EvalItem};
pub use knowledge::{EntityKind, KnowledgeBase, Lang, Relation};
pub use train::{Gpt2Shape, TrainConfig, TrainData, Trainer};
