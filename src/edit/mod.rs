//! Fact editing (ROME and MEMIT-style batches), with what it needs: the key statistics of a
//! layer ([`covariance`]). The causal trace that picks the layer is in [`crate::causal`].

pub mod covariance;
pub mod rome;
