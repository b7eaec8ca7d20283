//! EleutherAI sparsify's folder format, read as it is: `cfg.json` (`d_in`, `num_latents` or
//! `expansion_factor`, `k`, `activation`, `transcode`, `skip_connection`) and
//! `sae.safetensors` (`encoder.weight [num_latents, d_in]`, `encoder.bias`, `W_dec
//! [num_latents, d_in]`, `b_dec`). A sparsify run saves one such folder per hookpoint, named
//! after the hookpoint (`layers.6`, `layers.6.mlp`, …), and the folder name is the only record
//! of where the SAE reads: [`hook_for_hookpoint`] maps it to a monoscope hook.
//!
//! sparsify's SAE encodes `relu((x − b_dec) @ encoder.weightᵀ + encoder.bias)` and keeps the
//! `k` largest per token; it decodes `acts @ W_dec + b_dec` — a top-k SAE in SAELens's form with
//! `W_enc = encoder.weightᵀ` and `b_dec` applied to the input, so it loads as an [`Sae`].
//! A transcoder (`transcode`: the hookpoint module's input in, its output out) encodes `x`
//! without subtracting `b_dec`, and its `skip_connection` adds `x @ W_skipᵀ`: it loads as a
//! transcoder [`Sae`] reading the module's input hook and writing its output hook
//! ([`transcoder_hooks_for_hookpoint`]). Signed latents and GroupMax activations are refused by
//! name.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::Value;

use super::saelens::{SaeDir, SaeMetadata, optional_bool, optional_count, usize_key};
use super::{Architecture, Sae};
use crate::error::{Error, Result};
use crate::files::read_json;
use crate::model::weights::Weights;

pub const WEIGHTS_FILE: &str = "sae.safetensors";

/// Whether `dir` holds a sparsify SAE (its weights file; SAELens folders name theirs
/// differently).
pub fn is_sparsify_dir(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).is_file()
}

/// The monoscope hook that a sparsify hookpoint's module writes, when there is one: the output
/// of a decoder layer is the residual stream after it, of its MLP or attention module that
/// block's MLP or attention output, and of a non-gated MLP's activation function (`mlp.act`,
/// GPT-2 and GPT-NeoX) its hidden activations. Hookpoints are module paths relative to the
/// base model (`layers.6`, `h.6.mlp`); a leading `model.`, `gpt_neox.` or `transformer.` is
/// accepted too.
pub fn hook_for_hookpoint(hookpoint: &str) -> Option<String> {
    let (layer, module) = layer_and_module(hookpoint)?;
    let hook = match module {
        "" => "hook_resid_post",
        "mlp" => "hook_mlp_out",
        "attn" | "attention" | "self_attn" => "hook_attn_out",
        "mlp.act" => "mlp.hook_post",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{hook}"))
}

/// The monoscope hooks a sparsify transcoder of `hookpoint` reads and writes: the module's
/// input and output. A decoder layer reads `hook_resid_pre` and writes `hook_resid_post`, an MLP
/// reads `mlp.hook_in` (after its norm) and writes `hook_mlp_out`, a non-gated MLP's activation
/// reads `mlp.hook_pre` and writes `mlp.hook_post`. Attention has no input hook after its
/// norm's gain: `None`, as for unknown modules.
pub fn transcoder_hooks_for_hookpoint(hookpoint: &str) -> Option<(String, String)> {
    let (layer, module) = layer_and_module(hookpoint)?;
    let (input, output) = match module {
        "" => ("hook_resid_pre", "hook_resid_post"),
        "mlp" => ("mlp.hook_in", "hook_mlp_out"),
        "mlp.act" => ("mlp.hook_pre", "mlp.hook_post"),
        _ => return None,
    };
    Some((
        format!("blocks.{layer}.{input}"),
        format!("blocks.{layer}.{output}"),
    ))
}

/// `(layer, module path inside the layer)` of a hookpoint (`layers.6.mlp` → `(6, "mlp")`),
/// after any leading `base_model.`, `model.`, `gpt_neox.` or `transformer.`.
fn layer_and_module(hookpoint: &str) -> Option<(usize, &str)> {
    let mut rest = hookpoint;
    for prefix in ["base_model.", "model.", "gpt_neox.", "transformer."] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let rest = rest
        .strip_prefix("layers.")
        .or_else(|| rest.strip_prefix("h."))?;
    let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
    Some((layer.parse().ok()?, module))
}

/// What [`hook_for_hookpoint`] understands, for error messages.
pub const KNOWN_HOOKPOINTS: &str = "layers.N or h.N (the residual stream after block N), \
     layers.N.mlp, layers.N.attention, layers.N.self_attn or h.N.attn (that block's MLP or \
     attention output), layers.N.mlp.act or h.N.mlp.act (a non-gated MLP's hidden activations)";

/// Loads a sparsify SAE folder onto `device` in `dtype`. `metadata.hook_name` is the hook its
/// folder name maps to, or empty when it maps to none.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    let cfg_path = dir.join(super::saelens::CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(Error::MissingFile {
            path: cfg_path,
            what: "sparsify SAE config (cfg.json)",
        });
    }
    let cfg: Value = read_json(&cfg_path)?;
    refuse(&cfg_path, &cfg)?;
    let transcoder = optional_bool(&cfg_path, &cfg, "transcode")? == Some(true);
    let skip = optional_bool(&cfg_path, &cfg, "skip_connection")? == Some(true);
    let d_in = usize_key(&cfg_path, &cfg, "d_in")?;
    let k = usize_key(&cfg_path, &cfg, "k")?;
    // sparsify: `num_latents or d_in * expansion_factor`.
    let d_sae = match optional_count(&cfg_path, &cfg, &["num_latents"])? {
        Some(n) if n > 0 => n,
        _ => d_in * usize_key(&cfg_path, &cfg, "expansion_factor")?,
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = Weights::open_file(&weights_path, dtype, device)?;
    let sae = Sae {
        architecture: Architecture::TopK { k },
        w_enc: weights
            .get("encoder.weight", &[d_sae, d_in])?
            .t()?
            .contiguous()?,
        b_enc: weights.get("encoder.bias", &[d_sae])?,
        w_dec: weights.get("W_dec", &[d_sae, d_in])?,
        b_dec: weights.get("b_dec", &[d_in])?,
        threshold: None,
        apply_b_dec_to_input: !transcoder,
        transcoder,
        w_skip: if skip {
            Some(weights.get("W_skip", &[d_in, d_in])?)
        } else {
            None
        },
    };
    sae.validate(&weights_path)?;
    let hookpoint = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (hook_name, hook_name_out) = if transcoder {
        transcoder_hooks_for_hookpoint(&hookpoint).unwrap_or_default()
    } else {
        (
            hook_for_hookpoint(&hookpoint).unwrap_or_default(),
            String::new(),
        )
    };
    let metadata = SaeMetadata {
        hook_name,
        hook_name_out,
        ..SaeMetadata::default()
    };
    Ok(SaeDir {
        sae,
        metadata,
        sparsity: None,
    })
}

/// Refuses the sparse coders that are not an SAE of one hook.
fn refuse(path: &Path, cfg: &Value) -> Result<()> {
    if optional_bool(path, cfg, "skip_connection")? == Some(true)
        && optional_bool(path, cfg, "transcode")? != Some(true)
    {
        return Err(Error::config(
            path,
            "skip_connection",
            "is true for an SAE: a skip connection is supported on transcoders only",
        ));
    }
    if optional_bool(path, cfg, "signed")? == Some(true) {
        return Err(Error::config(
            path,
            "signed",
            "is true: signed latents are not supported",
        ));
    }
    match cfg.get("activation") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == "topk" => Ok(()),
        Some(other) => Err(Error::config(
            path,
            "activation",
            format!("{other} is not supported (topk)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{hook_for_hookpoint, transcoder_hooks_for_hookpoint};

    #[test]
    fn transcoder_hookpoints_map_to_their_modules_input_and_output_hooks() {
        let hooks = |hp| transcoder_hooks_for_hookpoint(hp);
        let pair = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(
            hooks("layers.3"),
            pair("blocks.3.hook_resid_pre", "blocks.3.hook_resid_post")
        );
        assert_eq!(
            hooks("model.layers.2.mlp"),
            pair("blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out")
        );
        assert_eq!(
            hooks("h.1.mlp.act"),
            pair("blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post")
        );
        // Attention's input after its norm's gain is no monoscope hook.
        assert_eq!(hooks("layers.1.self_attn"), None);
        assert_eq!(hooks("embed_tokens"), None);
    }

    #[test]
    fn hookpoints_map_to_the_hooks_their_modules_write() {
        let cases = [
            ("layers.6", Some("blocks.6.hook_resid_post")),
            ("gpt_neox.layers.6", Some("blocks.6.hook_resid_post")),
            ("model.layers.12.mlp", Some("blocks.12.hook_mlp_out")),
            ("h.0.attn", Some("blocks.0.hook_attn_out")),
            ("layers.3.attention", Some("blocks.3.hook_attn_out")),
            ("layers.3.self_attn", Some("blocks.3.hook_attn_out")),
            ("h.2.mlp.act", Some("blocks.2.mlp.hook_post")),
            ("layers.2.mlp.act_fn", None),
            ("layers.x", None),
            ("embed_tokens", None),
            ("layers.2.input_layernorm", None),
        ];
        for (hookpoint, hook) in cases {
            assert_eq!(
                hook_for_hookpoint(hookpoint).as_deref(),
                hook,
                "{hookpoint}"
            );
        }
    }
}
