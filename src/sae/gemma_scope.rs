//! Google DeepMind's Gemma Scope SAEs as they are published: one `params.npz` per SAE
//! (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`,
//! `threshold [d_sae]`), in folders `gemma-scope-<model>-<site>/layer_L/width_W/average_l0_N/`.
//! The file holds no config; where the SAE reads comes from that path: the site (`res`: the
//! residual stream after block L, `mlp`: block L's MLP output after Gemma 2's post-MLP norm,
//! `att`: the heads' concatenated outputs, `attn.hook_z`) and the layer ([`hook_for_path`]).
//!
//! Gemma Scope's JumpReLU encodes `pre = x @ W_enc + b_enc` (no `b_dec` subtracted from the
//! input) and keeps `pre` where it exceeds the latent's threshold; it decodes
//! `acts @ W_dec + b_dec`: a JumpReLU [`Sae`] with `apply_b_dec_to_input` off. Gemma Scope's
//! transcoders (`gemma-scope-…-transcoders`) are the same JumpReLU reading block L's MLP input
//! after its pre-MLP norm (`blocks.L.mlp.hook_in`) and predicting the MLP's output after its
//! post-MLP norm (`blocks.L.hook_mlp_out`), SAELens's mapping too.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::saelens::{SaeDir, SaeMetadata};
use super::{Architecture, Sae};
use crate::error::{Error, Result};

pub const WEIGHTS_FILE: &str = "params.npz";

/// Whether `dir` holds a Gemma Scope SAE.
pub fn is_gemma_scope_dir(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).is_file()
}

/// The hook a Gemma Scope folder's path names: its `layer_L` component and the site that ends
/// a `gemma-scope-…` component (`-res`, `-mlp`, `-att`; also inside a Hugging Face cache's
/// `models--google--gemma-scope-…` folder).
pub fn hook_for_path(dir: &Path) -> Option<String> {
    let parts = path_parts(dir);
    let layer = layer_of_path(dir)?;
    let site = parts
        .iter()
        .rev()
        .find(|p| p.contains("gemma-scope"))?
        .rsplit('-')
        .next()?
        .to_string();
    let hook = match site.as_str() {
        "res" => "hook_resid_post",
        "mlp" => "hook_mlp_out",
        "att" => "attn.hook_z",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{hook}"))
}

fn path_parts(dir: &Path) -> Vec<String> {
    dir.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect()
}

/// The `L` of the last `layer_L` component.
fn layer_of_path(dir: &Path) -> Option<usize> {
    path_parts(dir)
        .iter()
        .rev()
        .find_map(|p| p.strip_prefix("layer_")?.parse().ok())
}

/// Whether a `gemma-scope-…` component names transcoders (`gemma-scope-2b-pt-transcoders`).
fn is_transcoder_path(dir: &Path) -> bool {
    path_parts(dir)
        .iter()
        .any(|p| p.contains("gemma-scope") && p.contains("transcoder"))
}

/// What [`hook_for_path`] understands, for error messages.
pub const KNOWN_PATHS: &str = "…/gemma-scope-<model>-<res|mlp|att|transcoders>/layer_L/…";

/// Loads a Gemma Scope folder onto `device` in `dtype`. `metadata.hook_name` is the hook its
/// path names, or empty when it names none.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<SaeDir> {
    let path = dir.join(WEIGHTS_FILE);
    let transcoder = is_transcoder_path(dir);
    let arrays = super::TensorFile {
        tensors: Tensor::read_npz(&path)
            .map_err(|e| Error::InvalidArgument {
                what: "Gemma Scope weights",
                value: path.display().to_string(),
                message: format!("not a readable .npz of float arrays: {e}"),
            })?
            .into_iter()
            .collect(),
        path: path.clone(),
    };
    let get = |key: &str| arrays.get(key, dtype, device);
    let sae = Sae {
        architecture: Architecture::JumpRelu,
        w_enc: get("W_enc")?,
        w_dec: get("W_dec")?,
        b_enc: get("b_enc")?,
        b_dec: get("b_dec")?,
        threshold: Some(get("threshold")?),
        apply_b_dec_to_input: false,
        transcoder,
        w_skip: None,
    };
    sae.validate(&path)?;
    let metadata = match (transcoder, layer_of_path(dir)) {
        (true, Some(layer)) => SaeMetadata {
            hook_name: format!("blocks.{layer}.mlp.hook_in"),
            hook_name_out: format!("blocks.{layer}.hook_mlp_out"),
            ..SaeMetadata::default()
        },
        _ => SaeMetadata {
            hook_name: hook_for_path(dir).unwrap_or_default(),
            ..SaeMetadata::default()
        },
    };
    Ok(SaeDir {
        sae,
        metadata,
        sparsity: None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::hook_for_path;

    #[test]
    fn paths_name_the_site_and_layer() {
        let cases = [
            (
                "/m/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71",
                Some("blocks.20.hook_resid_post"),
            ),
            (
                "gemma-scope-9b-it-mlp/layer_9/width_131k/average_l0_5",
                Some("blocks.9.hook_mlp_out"),
            ),
            (
                "/hf/models--google--gemma-scope-2b-pt-att/snapshots/abc/layer_3/width_16k/canonical",
                Some("blocks.3.attn.hook_z"),
            ),
            ("/m/gemma-scope-2b-pt-res/width_16k/average_l0_71", None),
            ("/m/layer_3/width_16k/average_l0_71", None),
            ("/m/gemma-scope-2b-pt-embeddings/layer_0/width_4k", None),
        ];
        for (path, hook) in cases {
            assert_eq!(hook_for_path(Path::new(path)).as_deref(), hook, "{path}");
        }
    }
}
