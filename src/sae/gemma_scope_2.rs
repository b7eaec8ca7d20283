//! Google DeepMind's Gemma Scope 2 (the SAEs and transcoders of Gemma 3) as it is published:
//! one `params.safetensors` per SAE, in folders `<site>/layer_L_width_W_l0_<size>[_affine]/` of
//! the `gemma-scope-2-<model>` repositories, holding `w_enc [d_in, d_sae]`, `w_dec
//! [d_sae, d_out]`, `b_enc [d_sae]`, `b_dec [d_out]`, `threshold [d_sae]` and, for an affine
//! (skip) transcoder, `affine_skip_connection [d_in, d_out]`. A `config.json` beside it, where
//! there is one, names the transformers modules the SAE reads and writes (`hf_hook_point_in`,
//! `hf_hook_point_out`); without one the site comes from the path, as SAELens infers it
//! (`get_gemma_3_config_from_hf`):
//!
//! | site | transformers module | monoscope hook |
//! | --- | --- | --- |
//! | `resid_post` | `model.layers.L.output` | `blocks.L.hook_resid_post` |
//! | `attn_out` | `model.layers.L.self_attn.o_proj.input` | `blocks.L.attn.hook_z` |
//! | `mlp_out` | `model.layers.L.post_feedforward_layernorm.output` | `blocks.L.hook_mlp_out` |
//! | `transcoder`, `clt` | `…pre_feedforward_layernorm.output` → `…post_feedforward_layernorm.output` | `blocks.L.mlp.hook_in` → `blocks.L.hook_mlp_out` |
//!
//! The JumpReLU encodes `pre = x @ w_enc + b_enc` (no `b_dec` subtracted) and keeps `pre`
//! where it exceeds the latent's threshold; it decodes `acts @ w_dec + b_dec`, plus
//! `x @ affine_skip_connection` for a skip transcoder. Cross-layer transcoders
//! (`clt/…/params_layer_L.safetensors`) are read by
//! [`crate::attribution_graph::gemma_scope_2`].

use std::path::Path;

use candle_core::{DType, Device};
use serde::Deserialize;

use super::saelens::{SaeDir, SaeMetadata};
use super::{Architecture, Sae};
use crate::error::{Error, Result};
use crate::model::weights::Weights;

pub const WEIGHTS_FILE: &str = "params.safetensors";
pub const CONFIG_FILE: &str = "config.json";

/// What [`load`] understands of a path, for error messages.
pub const KNOWN_PATHS: &str =
    "…/<resid_post|attn_out|mlp_out|transcoder>…/layer_L_…/params.safetensors";

/// Whether `dir` holds a Gemma Scope 2 SAE or transcoder.
pub fn is_gemma_scope_2_dir(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).is_file()
}

/// The fields of `config.json` that say where the SAE sits (SAELens reads the same).
#[derive(Debug, Default, Deserialize)]
struct Config {
    architecture: Option<String>,
    hf_hook_point_in: Option<String>,
    hf_hook_point_out: Option<String>,
}

/// monoscope's hook for a transformers module of a Gemma 3 decoder layer, `…layers.L.<part>`
/// (the language model's layers of a multimodal checkpoint included).
pub fn hook_for_module(name: &str) -> Option<String> {
    let (_, rest) = name.rsplit_once("layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hook = match part {
        "output" => "hook_resid_post",
        "self_attn.o_proj.input" => "attn.hook_z",
        "post_feedforward_layernorm.output" => "hook_mlp_out",
        "pre_feedforward_layernorm.output" => "mlp.hook_in",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{hook}"))
}

/// The hooks a Gemma Scope 2 folder's path names (input, and output for a transcoder): its
/// `layer_L_…` component and the site in it or in the folder above it.
pub fn hooks_for_path(dir: &Path) -> Option<(String, Option<String>)> {
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let at = parts.iter().rposition(|p| p.starts_with("layer_"))?;
    let layer: usize = {
        let digits: String = parts[at]["layer_".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()?
    };
    let named = |site: &str| {
        parts[at.saturating_sub(1)..=at]
            .iter()
            .any(|p| p.contains(site))
    };
    let block = |hook: &str| format!("blocks.{layer}.{hook}");
    if named("transcoder") || named("clt") {
        return Some((block("mlp.hook_in"), Some(block("hook_mlp_out"))));
    }
    let hook = if named("resid_post") {
        "hook_resid_post"
    } else if named("attn_out") {
        "attn.hook_z"
    } else if named("mlp_out") {
        "hook_mlp_out"
    } else {
        return None;
    };
    Some((block(hook), None))
}

/// The hooks `config.json` names (none without a config, or one silent on them).
fn hooks_from_config(dir: &Path) -> Result<Option<(String, Option<String>)>> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let config: Config = crate::files::read_json(&path)?;
    if let Some(arch) = config.architecture.as_deref()
        && arch != "jump_relu"
    {
        return Err(Error::config(
            &path,
            "architecture",
            format!("is `{arch}`; Gemma Scope 2 SAEs are jump_relu"),
        ));
    }
    let hook = |key: &str, module: &str| {
        hook_for_module(module).ok_or_else(|| {
            Error::config(
                &path,
                key,
                format!(
                    "is `{module}`, a module monoscope has no hook for (it knows a decoder \
                     layer's output, self_attn.o_proj.input, pre_feedforward_layernorm.output \
                     and post_feedforward_layernorm.output)"
                ),
            )
        })
    };
    let Some(input) = config.hf_hook_point_in.as_deref() else {
        return Ok(None);
    };
    let output = match config.hf_hook_point_out.as_deref() {
        Some(module) => Some(hook("hf_hook_point_out", module)?),
        None => None,
    };
    Ok(Some((hook("hf_hook_point_in", input)?, output)))
}

/// Loads a Gemma Scope 2 folder onto `device` in `dtype`. `metadata.hook_name` is the hook its
/// config or path names, or empty when neither names one.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    let path = dir.join(WEIGHTS_FILE);
    let (hook_in, hook_out) = match hooks_from_config(dir)? {
        Some(hooks) => hooks,
        None => hooks_for_path(dir).unwrap_or_default(),
    };
    let weights = Weights::open_file(&path, dtype, device)?;
    let dims = |key: &str| -> Result<Vec<usize>> { weights.shape(key) };
    let (d_in, d_sae) = match dims("w_enc")?[..] {
        [d_in, d_sae] => (d_in, d_sae),
        ref other => {
            return Err(Error::TensorShape {
                path,
                key: "w_enc".into(),
                expected: vec![0, 0],
                actual: other.to_vec(),
            });
        }
    };
    let d_out = dims("w_dec")?.last().copied().unwrap_or(0);
    let w_skip = weights.get_opt("affine_skip_connection", &[d_in, d_out])?;
    let sae = Sae {
        architecture: Architecture::JumpRelu,
        w_enc: weights.get("w_enc", &[d_in, d_sae])?,
        w_dec: weights.get("w_dec", &[d_sae, d_out])?,
        b_enc: weights.get("b_enc", &[d_sae])?,
        b_dec: weights.get("b_dec", &[d_out])?,
        threshold: Some(weights.get("threshold", &[d_sae])?),
        apply_b_dec_to_input: false,
        transcoder: hook_out.is_some() || w_skip.is_some(),
        w_skip: match w_skip {
            Some(skip) => Some(skip.t()?.contiguous()?),
            None => None,
        },
    };
    sae.validate(&path)?;
    Ok(SaeDir {
        sae,
        metadata: SaeMetadata {
            hook_name: hook_in,
            hook_name_out: hook_out.unwrap_or_default(),
            ..SaeMetadata::default()
        },
        sparsity: None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn modules_and_paths_name_monoscopes_hooks() {
        for (module, hook) in [
            ("model.layers.12.output", Some("blocks.12.hook_resid_post")),
            (
                "model.language_model.layers.3.self_attn.o_proj.input",
                Some("blocks.3.attn.hook_z"),
            ),
            (
                "model.layers.0.post_feedforward_layernorm.output",
                Some("blocks.0.hook_mlp_out"),
            ),
            (
                "model.layers.7.pre_feedforward_layernorm.output",
                Some("blocks.7.mlp.hook_in"),
            ),
            ("model.layers.7.mlp.down_proj.output", None),
            ("model.embed_tokens.output", None),
        ] {
            assert_eq!(hook_for_module(module).as_deref(), hook, "{module}");
        }
        let hooks = |p: &str| hooks_for_path(Path::new(p));
        let one = |h: &str| Some((h.to_string(), None));
        assert_eq!(
            hooks("/hf/gemma-scope-2-1b-pt/resid_post/layer_12_width_16k_l0_medium"),
            one("blocks.12.hook_resid_post")
        );
        assert_eq!(
            hooks("/m/resid_post_all/layer_3_width_262k_l0_big"),
            one("blocks.3.hook_resid_post")
        );
        assert_eq!(
            hooks("/m/attn_out/layer_5_width_16k_l0_small"),
            one("blocks.5.attn.hook_z")
        );
        assert_eq!(
            hooks("/m/transcoder_all/layer_9_width_16k_l0_small_affine"),
            Some((
                "blocks.9.mlp.hook_in".into(),
                Some("blocks.9.hook_mlp_out".into())
            ))
        );
        assert_eq!(hooks("/m/something/layer_1_width_16k"), None);
        assert_eq!(hooks("/m/resid_post/width_16k"), None);
    }
}
