//! Transcoder folders in circuit-tracer's formats (what its `to_safetensors` methods write and
//! its Hugging Face repositories hold), so that a set downloaded for circuit-tracer traces here
//! unchanged. A folder holds the weights and, optionally, the `config.yaml` beside them, whose
//! `model_kind`, `feature_input_hook`, `feature_output_hook` and `transcoders` (per-layer file
//! names) it reads; hooks are TransformerLens names within a block (`hook_resid_mid`,
//! `ln2.hook_normalized`, circuit-tracer's own `mlp.hook_in` and `mlp.hook_out`).
//!
//! - **A transcoder set** (`model_kind: transcoder_set`): one file per layer, `layer_L.safetensors`
//!   unless the config lists others, holding `W_enc` `[features, d_in]`, `W_dec`
//!   `[features, d_model]`, `b_enc`, `b_dec`, for a JumpReLU `activation_function.threshold`
//!   (without it, ReLU) and for a skip transcoder `W_skip` `[d_model, d_in]`. Default hooks:
//!   `mlp.hook_in` → `mlp.hook_out`.
//! - **A cross-layer transcoder** (Ameisen et al. 2025; `model_kind: cross_layer_transcoder`):
//!   one encoder per layer and decoders from each layer's features to its own MLP output and
//!   every later one's, so that one feature can stand for computation several MLPs share. For
//!   every layer `L`, `W_enc_L.safetensors` holds `W_enc_L` `[features, d_model]`, `b_enc_L`,
//!   `b_dec_L` (the bias of layer `L`'s output) and, for a JumpReLU, `threshold_L`;
//!   `W_dec_L.safetensors` holds `W_dec_L` `[features, n_layers − L, d_model]`, row `k` of a
//!   feature written into layer `L + k`'s MLP output. Default hooks: `hook_resid_mid` →
//!   `hook_mlp_out`. As in circuit-tracer, the decoders to later layers stay in their mapped
//!   files and only the active features' rows are read (over all layers a large model's CLT
//!   decoders are tens of gigabytes); the encoders and each layer's decoder to its own MLP are
//!   loaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor};

use super::{LaterDecoders, LayerTranscoder};
use crate::error::{Error, Result};
use crate::model::weights::Weights;
use crate::model::{HookPoint, Model};
use crate::sae::{Architecture, Sae, SaeSite};

/// The optional description beside the weights (the file names of a CLT's are
/// [`crate::sae::clt`]'s, which writes them).
pub use crate::sae::clt::CONFIG_FILE;
use crate::sae::clt::{decoder_file, encoder_file};

/// Features whose decoder rows are read at once while the own layer's decoder is gathered.
const DECODER_CHUNK: usize = 512;

fn layer_file(layer: usize) -> String {
    format!("layer_{layer}.safetensors")
}

/// Whether `dir` holds transcoders in one of circuit-tracer's formats: a cross-layer
/// transcoder's first encoder file, a set's first layer file, or a config naming either kind.
pub fn is_circuit_tracer_dir(dir: &Path) -> bool {
    dir.join(encoder_file(0)).is_file()
        || dir.join(layer_file(0)).is_file()
        || read_config(dir).is_ok_and(|c| c.kind.is_some())
}

/// The two layouts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    TranscoderSet,
    CrossLayer,
}

/// What `config.yaml` says (each field `None` or empty where it is silent).
#[derive(Clone, Debug, Default, PartialEq)]
struct Config {
    kind: Option<Kind>,
    input: Option<String>,
    output: Option<String>,
    /// The per-layer files of a set, as listed (`hf://owner/repo/path`, or a plain path).
    transcoders: Vec<String>,
}

/// Reads `config.yaml` (an empty config without one). The file is flat YAML: top-level
/// `key: value` lines and the `transcoders` list's `- item` lines; comments are ignored.
fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join(CONFIG_FILE);
    let mut config = Config::default();
    if !path.is_file() {
        return Ok(config);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let unquote = |v: &str| {
        let v = v.split(" #").next().unwrap_or_default().trim();
        v.trim_matches(|c| c == '"' || c == '\'').to_string()
    };
    let mut key = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(item) = trimmed.strip_prefix("- ") {
            if key == "transcoders" {
                config.transcoders.push(unquote(item));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let Some((k, value)) = line.split_once(':') else {
            continue;
        };
        key = k.trim().to_string();
        let value = unquote(value);
        match key.as_str() {
            "feature_input_hook" => config.input = Some(value),
            "feature_output_hook" => config.output = Some(value),
            "model_kind" => {
                config.kind = Some(match value.as_str() {
                    "transcoder_set" => Kind::TranscoderSet,
                    "cross_layer_transcoder" => Kind::CrossLayer,
                    _ => {
                        return Err(Error::Config {
                            path,
                            key,
                            message: format!(
                                "is `{value}`; circuit-tracer's kinds are transcoder_set and \
                                 cross_layer_transcoder"
                            ),
                        });
                    }
                })
            }
            _ => {}
        }
    }
    Ok(config)
}

/// Loads the circuit-tracer transcoders in `dir` for `model`: one [`LayerTranscoder`] per
/// layer (a cross-layer one's with its decoders to the later layers in `later`).
pub fn load(dir: &Path, model: &Model) -> Result<Vec<LayerTranscoder>> {
    let config = read_config(dir)?;
    let has_encoders = dir.join(encoder_file(0)).is_file();
    let kind = match config.kind {
        Some(Kind::TranscoderSet) if has_encoders && !dir.join(layer_file(0)).is_file() => {
            return Err(Error::Config {
                path: dir.join(CONFIG_FILE),
                key: "model_kind".into(),
                message: "is transcoder_set, but the folder holds a cross-layer transcoder's \
                          W_enc_L / W_dec_L files"
                    .into(),
            });
        }
        Some(kind) => kind,
        None if has_encoders => Kind::CrossLayer,
        None => Kind::TranscoderSet,
    };
    let (input, output) = match kind {
        Kind::TranscoderSet => ("mlp.hook_in", "mlp.hook_out"),
        Kind::CrossLayer => ("hook_resid_mid", "hook_mlp_out"),
    };
    let input = config.input.clone().unwrap_or(input.into());
    let output = config.output.clone().unwrap_or(output.into());
    let n_layers = model.dims().n_layers;
    let mut transcoders = Vec::with_capacity(n_layers);
    let files = match kind {
        Kind::CrossLayer => {
            let count = count_files(dir, |name| {
                name.starts_with("W_enc_") && name.ends_with(".safetensors")
            })?;
            if count != n_layers {
                return Err(Error::InvalidArgument {
                    what: "cross-layer transcoder",
                    value: dir.display().to_string(),
                    message: format!(
                        "has {count} encoder files (W_enc_L.safetensors); the model has \
                         {n_layers} layers"
                    ),
                });
            }
            Vec::new()
        }
        Kind::TranscoderSet => set_files(dir, &config)?,
    };
    if files.len() > n_layers {
        return Err(Error::InvalidArgument {
            what: "circuit-tracer transcoder set",
            value: dir.display().to_string(),
            message: format!(
                "has {} layers' files; the model has {n_layers} layers",
                files.len()
            ),
        });
    }
    for layer in 0..n_layers {
        if kind == Kind::TranscoderSet && layer >= files.len() {
            break;
        }
        let site = SaeSite {
            input: resolve(model, layer, &input, dir, "feature_input_hook")?,
            output: resolve(model, layer, &output, dir, "feature_output_hook")?,
        };
        super::site_layer(&site).map_err(|e| Error::Config {
            path: dir.join(CONFIG_FILE),
            key: "feature_input_hook / feature_output_hook".into(),
            message: e.to_string(),
        })?;
        transcoders.push(match kind {
            Kind::CrossLayer => cross_layer(dir, model, layer, site)?,
            Kind::TranscoderSet => set_member(&files[layer], model, site)?,
        });
    }
    Ok(transcoders)
}

/// How many files in `dir` have a name that `wanted` accepts.
pub(super) fn count_files(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<usize> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(std::result::Result::ok)
        .filter(|e| wanted(&e.file_name().to_string_lossy()))
        .count())
}

/// A set's per-layer files: those the config lists (an `hf://owner/repo/` prefix and an
/// `@revision` taken off, the rest found in `dir`), or `layer_0.safetensors`, `layer_1…` up to
/// the first missing.
fn set_files(dir: &Path, config: &Config) -> Result<Vec<PathBuf>> {
    if config.transcoders.is_empty() {
        let files: Vec<PathBuf> = (0..)
            .map(|l| dir.join(layer_file(l)))
            .take_while(|p| p.is_file())
            .collect();
        if files.is_empty() {
            return Err(Error::MissingFile {
                path: dir.join(layer_file(0)),
                what: "circuit-tracer transcoder set: layer_L.safetensors per layer",
            });
        }
        return Ok(files);
    }
    config
        .transcoders
        .iter()
        .map(|entry| {
            let path = match entry.strip_prefix("hf://") {
                Some(rest) => rest.splitn(3, '/').nth(2).unwrap_or_default(),
                None => entry.as_str(),
            };
            let path = dir.join(path.split('@').next().unwrap_or_default());
            if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
                Ok(path)
            } else {
                Err(Error::Config {
                    path: dir.join(CONFIG_FILE),
                    key: "transcoders".into(),
                    message: format!(
                        "lists `{entry}`, which is not a safetensors file in this folder ({}); \
                         open Gemma Scope transcoders by their own folders instead",
                        path.display()
                    ),
                })
            }
        })
        .collect()
}

/// The model's hook circuit-tracer names `name` in `layer`'s block. `mlp.hook_out` (its
/// replacement MLP's output) is `hook_mlp_out` where no norm follows the MLP; with one (Gemma
/// 2 and 3, OLMo 2) it is the norm's input, which an attribution graph cannot use.
fn resolve(model: &Model, layer: usize, name: &str, dir: &Path, key: &str) -> Result<HookPoint> {
    let bad = |message: String| Error::Config {
        path: dir.join(CONFIG_FILE),
        key: key.into(),
        message,
    };
    if name == "mlp.hook_out" {
        if model.hook_points().contains(&HookPoint::Ln2PostIn(layer)) {
            return Err(bad(format!(
                "is mlp.hook_out, the MLP's output before the norm after it \
                 (blocks.{layer}.ln2_post.hook_in); an attribution graph needs transcoders that \
                 write hook_mlp_out"
            )));
        }
        return Ok(HookPoint::MlpOut(layer));
    }
    let full = format!("blocks.{layer}.{name}");
    let points = model
        .resolve_hooks(&[&full])
        .map_err(|e| bad(e.to_string()))?;
    points
        .first()
        .copied()
        .ok_or_else(|| bad(format!("`{full}` names no hook point")))
}

/// One file of a transcoder set.
fn set_member(path: &Path, model: &Model, site: SaeSite) -> Result<LayerTranscoder> {
    let weights = Weights::open_file(path, DType::F32, &model.device)?;
    let d_in = model.hook_width(site.input)?;
    let d_out = model.hook_width(site.output)?;
    let d_sae = weights.shape("b_enc")?.first().copied().unwrap_or(0);
    let threshold_key = "activation_function.threshold";
    let threshold = if weights.contains(threshold_key) {
        // (stored [d_sae] or [1, d_sae])
        let shape = weights.shape(threshold_key)?;
        Some(weights.get(threshold_key, &shape)?.flatten_all()?)
    } else {
        None
    };
    if let Some(t) = &threshold
        && t.dim(0)? != d_sae
    {
        return Err(Error::TensorShape {
            path: path.to_path_buf(),
            key: threshold_key.into(),
            expected: vec![d_sae],
            actual: t.dims().to_vec(),
        });
    }
    let sae = Sae {
        architecture: jump_relu_or_relu(&threshold),
        w_enc: weights.get("W_enc", &[d_sae, d_in])?.t()?.contiguous()?,
        w_dec: weights.get("W_dec", &[d_sae, d_out])?,
        b_enc: weights.get("b_enc", &[d_sae])?,
        b_dec: weights.get("b_dec", &[d_out])?,
        threshold,
        apply_b_dec_to_input: false,
        transcoder: true,
        w_skip: weights.get_opt("W_skip", &[d_out, d_in])?,
    };
    sae.validate(path)?;
    Ok(LayerTranscoder {
        sae,
        site,
        later: LaterDecoders::None,
    })
}

fn jump_relu_or_relu(threshold: &Option<Tensor>) -> Architecture {
    match threshold {
        Some(_) => Architecture::JumpRelu,
        None => Architecture::Standard,
    }
}

/// Where one layer of a cross-layer transcoder is kept, in circuit-tracer's layout or Gemma
/// Scope 2's ([`super::gemma_scope_2`]).
pub(super) struct CltLayerFiles {
    pub encoder: PathBuf,
    pub decoder: PathBuf,
    /// The tensors' keys.
    pub w_enc: String,
    pub b_enc: String,
    pub b_dec: String,
    pub threshold: String,
    pub w_dec: String,
    /// An affine skip path `[d_in, d_out]` (the output gains `x @ skip`), where there is one.
    pub skip: Option<String>,
    /// `W_enc` stored `[features, d_in]` (circuit-tracer) rather than `[d_in, features]`.
    pub encoder_by_feature: bool,
    /// Where the layer's own output sits on the decoder's second axis: 0 when it holds the own
    /// and later layers only (circuit-tracer's `W_dec_L`), `L` when it holds every layer.
    pub own_slot: usize,
}

/// Layer `layer` of the cross-layer transcoder in `dir`, its decoders to the later layers in
/// `later`.
fn cross_layer(dir: &Path, model: &Model, layer: usize, site: SaeSite) -> Result<LayerTranscoder> {
    let key = |name: &str| format!("{name}_{layer}");
    let files = CltLayerFiles {
        encoder: dir.join(encoder_file(layer)),
        decoder: dir.join(decoder_file(layer)),
        w_enc: key("W_enc"),
        b_enc: key("b_enc"),
        b_dec: key("b_dec"),
        threshold: key("threshold"),
        w_dec: key("W_dec"),
        skip: None,
        encoder_by_feature: true,
        own_slot: 0,
    };
    cross_layer_from(&files, model, layer, site)
}

/// Layer `layer` of a cross-layer transcoder kept as `files` say.
pub(super) fn cross_layer_from(
    files: &CltLayerFiles,
    model: &Model,
    layer: usize,
    site: SaeSite,
) -> Result<LayerTranscoder> {
    let n_layers = model.dims().n_layers;
    let d_in = model.hook_width(site.input)?;
    let d_model = model.hook_width(site.output)?;
    let device = &model.device;
    let encoder = Weights::open_file(&files.encoder, DType::F32, device)?;
    let shape = encoder.shape(&files.w_enc)?;
    let d_sae = match (files.encoder_by_feature, &shape[..]) {
        (true, [features, _]) | (false, [_, features]) => *features,
        _ => 0,
    };
    let threshold = encoder.get_opt(&files.threshold, &[d_sae])?;
    // The decoders stay in their mapped file: the own layer's rows are read now, a few
    // hundred features at a time; the later layers' as a prompt needs them.
    let decoder = Weights::open_file(&files.decoder, DType::F32, device)?;
    let own = files.own_slot;
    let want = [d_sae, own + n_layers - layer, d_model];
    let shape = decoder.shape(&files.w_dec)?;
    if shape != want {
        return Err(Error::TensorShape {
            path: files.decoder.clone(),
            key: files.w_dec.clone(),
            expected: want.to_vec(),
            actual: shape,
        });
    }
    let own_rows = (0..d_sae as u32)
        .step_by(DECODER_CHUNK)
        .map(|start| {
            let end = (start + DECODER_CHUNK as u32).min(d_sae as u32);
            let ids: Vec<u32> = (start..end).collect();
            Ok(decoder
                .rows(&files.w_dec, &ids)?
                .i((.., own))?
                .contiguous()?)
        })
        .collect::<Result<Vec<_>>>()?;
    let w_enc = if files.encoder_by_feature {
        encoder
            .get(&files.w_enc, &[d_sae, d_in])?
            .t()?
            .contiguous()?
    } else {
        encoder.get(&files.w_enc, &[d_in, d_sae])?
    };
    let w_skip = match &files.skip {
        Some(key) => match encoder.get_opt(key, &[d_in, d_model])? {
            Some(skip) => Some(skip.t()?.contiguous()?),
            None => None,
        },
        None => None,
    };
    let sae = Sae {
        architecture: jump_relu_or_relu(&threshold),
        w_enc,
        w_dec: Tensor::cat(&own_rows, 0)?,
        b_enc: encoder.get(&files.b_enc, &[d_sae])?,
        b_dec: encoder.get(&files.b_dec, &[d_model])?,
        threshold,
        apply_b_dec_to_input: false,
        transcoder: true,
        w_skip,
    };
    sae.validate(&files.encoder)?;
    let later = match n_layers - layer - 1 {
        0 => LaterDecoders::None,
        count => LaterDecoders::Mapped {
            weights: Arc::new(decoder),
            key: files.w_dec.clone(),
            own,
            count,
        },
    };
    Ok(LayerTranscoder { sae, site, later })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The flat YAML of circuit-tracer's repositories: quoted or bare values, comments, the
    /// `transcoders` list; an unknown model kind is refused by file and key.
    #[test]
    fn the_config_names_the_kind_the_hooks_and_the_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_config(dir.path()).unwrap(), Config::default());
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "model_kind: transcoder_set # per layer\nmodel_name: meta-llama/Llama-3.2-1B\n\
             transcoders:\n  - hf://mntss/t/layer_0.safetensors\n  - \"layer_1.safetensors\"\n\
             feature_input_hook: 'mlp.hook_in'\n\nfeature_output_hook: \"mlp.hook_out\"\n",
        )
        .unwrap();
        assert_eq!(
            read_config(dir.path()).unwrap(),
            Config {
                kind: Some(Kind::TranscoderSet),
                input: Some("mlp.hook_in".into()),
                output: Some("mlp.hook_out".into()),
                transcoders: vec![
                    "hf://mntss/t/layer_0.safetensors".into(),
                    "layer_1.safetensors".into()
                ],
            }
        );
        std::fs::write(dir.path().join(CONFIG_FILE), "model_kind: sae\n").unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.yaml") && err.contains("model_kind"),
            "{err}"
        );
    }
}
