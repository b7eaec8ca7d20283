//! Cross-layer transcoders (Ameisen et al. 2025; circuit-tracer's `CrossLayerTranscoder`): one
//! encoder per layer, and decoders from each layer's features to its own MLP output and every
//! later one's, so that one feature can stand for computation that several MLPs share.
//!
//! Read in circuit-tracer's format (what `CrossLayerTranscoder.to_safetensors` writes and its
//! Hugging Face CLTs hold): a folder with, for every layer `L`,
//! - `W_enc_L.safetensors`: `W_enc_L` `[features, d_model]`, `b_enc_L`, `b_dec_L` (the bias of
//!   layer `L`'s output) and, for a JumpReLU, `threshold_L` (without it, ReLU);
//! - `W_dec_L.safetensors`: `W_dec_L` `[features, n_layers − L, d_model]`, row `k` of a feature
//!   written into layer `L + k`'s MLP output;
//!
//! and optionally the `config.yaml` beside them, whose `feature_input_hook` and
//! `feature_output_hook` say where the features read and write (circuit-tracer's defaults,
//! `hook_resid_mid` and `hook_mlp_out`, when it is absent). Decoders are read whole, not lazily
//! as circuit-tracer reads them: a CLT must fit in memory.

use std::path::Path;

use candle_core::{DType, IndexOp};

use super::LayerTranscoder;
use crate::error::{Error, Result};
use crate::model::weights::Weights;
use crate::model::{HookPoint, Model};
use crate::sae::{Architecture, Sae, SaeSite};

/// The optional description beside the weights.
pub const CONFIG_FILE: &str = "config.yaml";

fn encoder_file(layer: usize) -> String {
    format!("W_enc_{layer}.safetensors")
}

fn decoder_file(layer: usize) -> String {
    format!("W_dec_{layer}.safetensors")
}

/// Whether `dir` holds a cross-layer transcoder (its first layer's encoder file).
pub fn is_cross_layer_dir(dir: &Path) -> bool {
    dir.join(encoder_file(0)).is_file()
}

/// Where the features read and write, as TransformerLens names a block's hooks
/// (`hook_resid_mid`, `ln2.hook_normalized`, …).
#[derive(Clone, Debug, PartialEq)]
struct Hooks {
    input: String,
    output: String,
}

/// Reads `config.yaml`'s top-level `key: value` lines (the file is flat), or circuit-tracer's
/// defaults without one. Its `model_kind`, when given, must be a cross-layer transcoder.
fn read_config(dir: &Path) -> Result<Hooks> {
    let mut hooks = Hooks {
        input: "hook_resid_mid".into(),
        output: "hook_mlp_out".into(),
    };
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Ok(hooks);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    for line in text.lines() {
        if line.starts_with([' ', '\t', '#', '-']) {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.split(" #").next().unwrap_or_default().trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'').to_string();
        match key.trim() {
            "feature_input_hook" => hooks.input = value,
            "feature_output_hook" => hooks.output = value,
            "model_kind" if value != "cross_layer_transcoder" => {
                return Err(Error::Config {
                    path,
                    key: "model_kind".into(),
                    message: format!(
                        "is `{value}`; a folder of W_enc_L / W_dec_L files is a \
                         cross_layer_transcoder"
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(hooks)
}

/// Loads the cross-layer transcoder in `dir` for `model`: one [`LayerTranscoder`] per layer,
/// each with its decoders to the later layers in `later`.
pub fn load(dir: &Path, model: &Model) -> Result<Vec<LayerTranscoder>> {
    let hooks = read_config(dir)?;
    if hooks.output != "hook_mlp_out" {
        return Err(Error::Config {
            path: dir.join(CONFIG_FILE),
            key: "feature_output_hook".into(),
            message: format!(
                "is `{}`; an attribution graph needs transcoders that write the MLPs' \
                 outputs (hook_mlp_out)",
                hooks.output
            ),
        });
    }
    let n_layers = model.dims().n_layers;
    let files = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(std::result::Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("W_enc_") && name.ends_with(".safetensors")
        })
        .count();
    if files != n_layers {
        return Err(Error::InvalidArgument {
            what: "cross-layer transcoder",
            value: dir.display().to_string(),
            message: format!(
                "has {files} encoder files (W_enc_L.safetensors); the model has {n_layers} layers"
            ),
        });
    }
    let device = &model.device;
    let mut transcoders = Vec::with_capacity(n_layers);
    for layer in 0..n_layers {
        let input = resolve(model, &format!("blocks.{layer}.{}", hooks.input), dir)?;
        let site = SaeSite {
            input,
            output: HookPoint::MlpOut(layer),
        };
        super::site_layer(&site).map_err(|e| Error::Config {
            path: dir.join(CONFIG_FILE),
            key: "feature_input_hook".into(),
            message: e.to_string(),
        })?;
        let d_in = model.hook_width(input)?;
        let d_model = model.hook_width(HookPoint::MlpOut(layer))?;
        let encoder = Weights::open_file(&dir.join(encoder_file(layer)), DType::F32, device)?;
        let key = |name: &str| format!("{name}_{layer}");
        let shape = encoder.shape(&key("W_enc"))?;
        let d_sae = shape.first().copied().unwrap_or(0);
        let w_enc = encoder.get(&key("W_enc"), &[d_sae, d_in])?;
        let threshold = encoder.get_opt(&key("threshold"), &[d_sae])?;
        let decoder = Weights::open_file(&dir.join(decoder_file(layer)), DType::F32, device)?;
        let w_dec = decoder.get(&key("W_dec"), &[d_sae, n_layers - layer, d_model])?;
        let sae = Sae {
            architecture: if threshold.is_some() {
                Architecture::JumpRelu
            } else {
                Architecture::Standard
            },
            w_enc: w_enc.t()?.contiguous()?,
            w_dec: w_dec.i((.., 0))?.contiguous()?,
            b_enc: encoder.get(&key("b_enc"), &[d_sae])?,
            b_dec: encoder.get(&key("b_dec"), &[d_model])?,
            threshold,
            apply_b_dec_to_input: false,
            transcoder: true,
            w_skip: None,
        };
        sae.validate(&dir.join(encoder_file(layer)))?;
        let later = (1..n_layers - layer)
            .map(|k| Ok(w_dec.i((.., k))?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        transcoders.push(LayerTranscoder { sae, site, later });
    }
    Ok(transcoders)
}

/// The model's hook named `name`, or an error naming the folder whose config asked for it.
fn resolve(model: &Model, name: &str, dir: &Path) -> Result<HookPoint> {
    let points = model.resolve_hooks(&[name]).map_err(|e| Error::Config {
        path: dir.join(CONFIG_FILE),
        key: "feature_input_hook".into(),
        message: e.to_string(),
    })?;
    points.first().copied().ok_or_else(|| Error::Config {
        path: dir.join(CONFIG_FILE),
        key: "feature_input_hook".into(),
        message: format!("`{name}` names no hook point"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The flat YAML of circuit-tracer's CLT repositories: quoted or bare values, comments,
    /// nested lists skipped; another model kind is refused by file and key.
    #[test]
    fn the_config_names_the_hooks_and_must_be_a_cross_layer_transcoder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            read_config(dir.path()).unwrap(),
            Hooks {
                input: "hook_resid_mid".into(),
                output: "hook_mlp_out".into()
            }
        );
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "model_kind: cross_layer_transcoder # a CLT\nmodel_name: google/gemma-2-2b\n\
             transcoders:\n  - hf://x/y\nfeature_input_hook: 'ln2.hook_normalized'\n\
             feature_output_hook: \"hook_mlp_out\"\n",
        )
        .unwrap();
        assert_eq!(
            read_config(dir.path()).unwrap(),
            Hooks {
                input: "ln2.hook_normalized".into(),
                output: "hook_mlp_out".into()
            }
        );
        std::fs::write(dir.path().join(CONFIG_FILE), "model_kind: transcoder_set\n").unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.yaml") && err.contains("model_kind"),
            "{err}"
        );
    }
}
