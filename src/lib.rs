//! monoscope: a workbench for looking inside decoder language models.
//!
//! Data flows one way: [`model`] (load, hooked forward passes, generation) feeds everything
//! built on top of it.

pub mod causal;
pub mod cli;
pub mod device;
pub mod error;
pub mod files;
pub mod model;
pub mod sae;
pub mod world;

pub use error::{Error, Result};
pub use model::Model;
