//! SAEs as Sam Marks's dictionary_learning saves them — SAEBench's SAE suites and their Hugging
//! Face repositories (`<model>_<site>_layer_L/trainer_N/`): `ae.pt`, a `torch.save` of the
//! dictionary's `state_dict`, beside `config.json`, whose `trainer.dict_class` says how to read
//! it (SAELens's `dictionary_learning_1` loader reads the same):
//!
//! | `dict_class` | tensors | monoscope |
//! | --- | --- | --- |
//! | `AutoEncoder` | `encoder.weight [d_sae, d_in]`, `encoder.bias`, `decoder.weight [d_in, d_sae]`, `bias` (b_dec) | standard (ReLU), `b_dec` subtracted from the input |
//! | `AutoEncoderTopK` | the same with `b_dec`, and `k` | topk, `b_dec` subtracted |
//! | `BatchTopKSAE` | the same with a scalar `threshold` | batchtopk (the threshold for every latent), `b_dec` subtracted |
//! | `MatryoshkaBatchTopKSAE` | `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`, `threshold`, `k` | batchtopk, `b_dec` subtracted |
//! | `JumpReluAutoEncoder` | `W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold [d_sae]` | jumprelu, `b_dec` not subtracted |
//!
//! `k` is read from `config.json` (`trainer.k`): the saved `k` is an int32 tensor, which
//! candle's reader of PyTorch files skips (saying so on stderr, "skipping: unsupported storage
//! type IntStorage"; the SAE loads all the same). The SAE reads `blocks.L.hook_resid_post` for
//! `trainer.layer` (SAELens's reading; SAEBench's suites are residual-stream SAEs), or the
//! site `trainer.submodule_name` names (`resid_post_layer_L`, `mlp_out_layer_L`,
//! `attn_out_layer_L`; any other falls back to the layer's residual stream, as SAELens reads
//! it). Gated autoencoders are refused by name. The weights are read as saved:
//! dictionary_learning's own `AutoEncoder.from_pretrained` rescales a standard SAE's decoder
//! rows to unit norm by default (latents scaled up to match, reconstructions unchanged), which
//! monoscope, like SAELens, does not, so a standard SAE's activations can differ in scale from
//! what that loader reports.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::saelens::{SaeDir, SaeMetadata};
use super::{Architecture, Sae};
use crate::error::{Error, Result};

pub const WEIGHTS_FILE: &str = "ae.pt";
pub const CONFIG_FILE: &str = "config.json";

/// Whether `dir` holds a dictionary_learning SAE.
pub fn is_dictionary_learning_dir(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).is_file()
}

#[derive(Debug, Deserialize)]
struct Config {
    trainer: Trainer,
    #[serde(default)]
    buffer: Option<Buffer>,
}

#[derive(Debug, Deserialize)]
struct Trainer {
    dict_class: String,
    #[serde(default)]
    k: Option<usize>,
    #[serde(default)]
    layer: Option<usize>,
    #[serde(default)]
    lm_name: Option<String>,
    #[serde(default)]
    submodule_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Buffer {
    #[serde(default)]
    ctx_len: Option<usize>,
}

/// The hook a trainer's `submodule_name` (`resid_post_layer_3`, …) or else its `layer` names.
fn hook_of(trainer: &Trainer) -> Option<String> {
    let named = trainer.submodule_name.as_deref().and_then(|name| {
        let (site, layer) = name.rsplit_once("_layer_")?;
        let layer: usize = layer.parse().ok()?;
        let hook = match site {
            "resid_post" => "hook_resid_post",
            "mlp_out" => "hook_mlp_out",
            "attn_out" => "hook_attn_out",
            _ => return None,
        };
        Some(format!("blocks.{layer}.{hook}"))
    });
    named.or_else(|| Some(format!("blocks.{}.hook_resid_post", trainer.layer?)))
}

/// Loads a dictionary_learning folder onto `device` in `dtype`.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    let config_path = dir.join(CONFIG_FILE);
    let config: Config = crate::files::read_json(&config_path)?;
    let trainer = &config.trainer;
    let path = dir.join(WEIGHTS_FILE);
    let file = super::TensorFile {
        tensors: candle_core::pickle::read_all(&path)
            .map_err(|e| Error::InvalidArgument {
                what: "dictionary_learning weights",
                value: path.display().to_string(),
                message: format!("not a PyTorch state_dict candle can read: {e}"),
            })?
            .into_iter()
            .collect(),
        path: path.clone(),
    };
    // (Some are saved as transposed views: JumpReLU's W_enc is W_dec.T.)
    let get = |key: &str| file.get(key, dtype, device);
    // The encoder as [d_in, d_sae] and the decoder as [d_sae, d_in], from either spelling.
    let linear = || -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            get("encoder.weight")?.t()?.contiguous()?,
            get("encoder.bias")?,
            get("decoder.weight")?.t()?.contiguous()?,
        ))
    };
    let parameters = || -> Result<(Tensor, Tensor, Tensor)> {
        Ok((get("W_enc")?, get("b_enc")?, get("W_dec")?))
    };
    let k = || {
        trainer.k.ok_or_else(|| {
            Error::config(
                &config_path,
                "trainer.k",
                format!("is missing; a {} needs its k", trainer.dict_class),
            )
        })
    };
    let (architecture, (w_enc, b_enc, w_dec), b_dec, apply_b_dec_to_input) =
        match trainer.dict_class.as_str() {
            "AutoEncoder" => (Architecture::Standard, linear()?, get("bias")?, true),
            "AutoEncoderTopK" => (
                Architecture::TopK { k: k()? },
                linear()?,
                get("b_dec")?,
                true,
            ),
            "BatchTopKSAE" => (
                Architecture::BatchTopK { k: k()? },
                linear()?,
                get("b_dec")?,
                true,
            ),
            "MatryoshkaBatchTopKSAE" => (
                Architecture::BatchTopK { k: k()? },
                parameters()?,
                get("b_dec")?,
                true,
            ),
            "JumpReluAutoEncoder" => (Architecture::JumpRelu, parameters()?, get("b_dec")?, false),
            other => {
                return Err(Error::config(
                    &config_path,
                    "trainer.dict_class",
                    format!(
                        "is `{other}`; monoscope reads AutoEncoder, AutoEncoderTopK, \
                         BatchTopKSAE, MatryoshkaBatchTopKSAE and JumpReluAutoEncoder"
                    ),
                ));
            }
        };
    let d_sae = w_enc.dim(1)?;
    let threshold = match architecture {
        // A scalar threshold (BatchTopK's) holds for every latent.
        Architecture::JumpRelu | Architecture::BatchTopK { .. } => {
            let t = get("threshold")?;
            Some(match t.rank() {
                0 => t.reshape(1)?.broadcast_as(d_sae)?.contiguous()?,
                _ => t,
            })
        }
        _ => None,
    };
    let sae = Sae {
        architecture,
        w_enc,
        w_dec,
        b_enc,
        b_dec,
        threshold,
        apply_b_dec_to_input,
        transcoder: false,
        w_skip: None,
    };
    sae.validate(&path)?;
    Ok(SaeDir {
        sae,
        metadata: SaeMetadata {
            model_name: trainer.lm_name.clone().unwrap_or_default(),
            hook_name: hook_of(trainer).unwrap_or_default(),
            context_size: (config.buffer.as_ref())
                .and_then(|b| b.ctx_len)
                .unwrap_or_default(),
            ..SaeMetadata::default()
        },
        sparsity: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_submodule_or_the_layer_names_the_hook() {
        let trainer = |submodule: Option<&str>, layer: Option<usize>| Trainer {
            dict_class: "AutoEncoder".into(),
            k: None,
            layer,
            lm_name: None,
            submodule_name: submodule.map(String::from),
        };
        let hook = |s, l| hook_of(&trainer(s, l));
        assert_eq!(
            hook(Some("resid_post_layer_3"), Some(3)).as_deref(),
            Some("blocks.3.hook_resid_post")
        );
        assert_eq!(
            hook(Some("mlp_out_layer_5"), None).as_deref(),
            Some("blocks.5.hook_mlp_out")
        );
        assert_eq!(
            hook(Some("attn_out_layer_0"), None).as_deref(),
            Some("blocks.0.hook_attn_out")
        );
        assert_eq!(
            hook(Some("something_else"), Some(7)).as_deref(),
            Some("blocks.7.hook_resid_post")
        );
        assert_eq!(hook(None, None), None);
    }
}
