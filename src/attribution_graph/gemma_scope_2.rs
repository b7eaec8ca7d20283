//! Gemma Scope 2's cross-layer transcoders (Gemma 3): one file per layer,
//! `clt/width_W_l0_<size>[_affine]/params_layer_L.safetensors`, holding `w_enc [d_in, features]`,
//! `b_enc [features]`, `threshold [features]`, `b_dec [d_model]` (the bias of layer `L`'s
//! output), `w_dec [features, n_layers, d_model]` (row `[f, M]` written into layer `M`'s MLP
//! output; the rows for layers before `L` are zero) and, for an affine CLT,
//! `affine_skip_connection [d_in, d_model]`. Each layer's features read its MLP input after the
//! pre-MLP norm and write MLP outputs after the post-MLP norm (`blocks.L.mlp.hook_in` →
//! `blocks.L.hook_mlp_out`; SAELens's mapping of `pre_feedforward_layernorm.output` →
//! `post_feedforward_layernorm.output`). Read as circuit-tracer's CLTs are
//! ([`super::circuit_tracer`]): encoders and own-layer decoders loaded, the decoders to later
//! layers left in their mapped files.

use std::path::Path;

use super::LayerTranscoder;
use super::circuit_tracer::{CltLayerFiles, count_files, cross_layer_from};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sae::SaeSite;

/// Layer `layer`'s file.
pub fn layer_file(layer: usize) -> String {
    format!("params_layer_{layer}.safetensors")
}

/// Whether `dir` holds a Gemma Scope 2 cross-layer transcoder (its first layer's file).
pub fn is_gemma_scope_2_clt_dir(dir: &Path) -> bool {
    dir.join(layer_file(0)).is_file()
}

/// Loads the Gemma Scope 2 cross-layer transcoder in `dir` for `model`: one [`LayerTranscoder`]
/// per layer, its decoders to the later layers mapped.
pub fn load(dir: &Path, model: &Model) -> Result<Vec<LayerTranscoder>> {
    let n_layers = model.dims().n_layers;
    let count = count_files(dir, |name| {
        name.starts_with("params_layer_") && name.ends_with(".safetensors")
    })?;
    if count != n_layers {
        return Err(Error::InvalidArgument {
            what: "Gemma Scope 2 cross-layer transcoder",
            value: dir.display().to_string(),
            message: format!(
                "has {count} layer files (params_layer_L.safetensors); the model has {n_layers} \
                 layers"
            ),
        });
    }
    let (inputs, outputs) = super::cross_layer_sites(model, "mlp.hook_in", "hook_mlp_out")?;
    (inputs.into_iter().zip(outputs).enumerate())
        .map(|(layer, (input, output))| {
            let site = SaeSite { input, output };
            let path = dir.join(layer_file(layer));
            let files = CltLayerFiles {
                encoder: path.clone(),
                decoder: path,
                w_enc: "w_enc".into(),
                b_enc: "b_enc".into(),
                b_dec: "b_dec".into(),
                threshold: "threshold".into(),
                w_dec: "w_dec".into(),
                skip: Some("affine_skip_connection".into()),
                encoder_by_feature: false,
                own_slot: layer,
            };
            cross_layer_from(&files, model, layer, site)
        })
        .collect()
}
