//! monoscope: a workbench for looking inside decoder language models.
//!
//! Data flows one way: [`model`] (load, hooked forward passes, generation) → [`sae`]
//! (activations, training, codes) → [`features`] and [`export`]; [`lens`], [`attention`], [`causal`],
//! [`neurons`] and [`edit`] read and change the model itself; [`world`] is the bundled
//! model and its labelled corpus; [`jobs`] runs long work in the background with progress and
//! cancel; [`gui`] is the desktop workbench on top of all of it.

pub mod allocator;
pub mod attention;
pub mod attribution_graph;
pub mod causal;
pub mod cli;
pub mod composition;
pub mod device;
pub mod edit;
pub mod error;
pub mod export;
pub mod features;
pub mod files;
pub mod gui;
pub mod jobs;
pub mod lens;
pub mod model;
pub mod neurons;
pub mod patching;
pub mod path_patching;
pub mod sae;
pub mod saliency;
pub mod steering;
pub mod table;
pub mod tuned_lens;
pub mod world;

pub use error::{Error, Result};
pub use model::Model;
