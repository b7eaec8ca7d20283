//! Fact editing (ROME and MEMIT-style batches), with what it needs: the key statistics of a
//! layer ([`covariance`]). The causal trace that picks the layer is in [`crate::causal`].

pub mod covariance;
pub mod rome;

use crate::error::{Error, Result};
use crate::model::Model;

/// Refuses a layer the model does not have.
fn check_layer(model: &Model, layer: usize) -> Result<()> {
    let n_layers = model.dims().n_layers;
    if layer >= n_layers {
        return Err(Error::InvalidArgument {
            what: "layer",
            value: layer.to_string(),
            message: format!("the model has layers 0..{}", n_layers.saturating_sub(1)),
        });
    }
    Ok(())
}
