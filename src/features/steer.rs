//! Steering with SAE features: while the model runs, set chosen features to a value
//! (`clamp`) or push the activations along their decoder directions (`add`) at the SAE's
//! hook, on every position. The CLI's `generate --steer` and the GUI both use
//! [`steering_hooks`].
//!
//! Clamping keeps the SAE's reconstruction error, as Anthropic's and Neuronpedia's steering
//! does: `x' = x + Σ_f (v_f − a_f(x))·W_dec[f]`, `a_f(x)` the feature's activation on `x`
//! (so other features and the error term are untouched). Adding is `x' = x + Σ_f v_f·W_dec[f]`.
//!
//! A transcoder steers where it writes: its decoder directions live in its output hook's space,
//! so the shift is added there, and clamping reads the feature's activation from the input hook
//! earlier in the same forward pass.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::hooks::{Hooks, Intervention, InterventionOp, Stash};
use crate::sae::{Sae, SaeSite};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteerMode {
    Clamp,
    Add,
}

/// One feature and the value to clamp it to (or the amount to add).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Steer {
    pub feature: u32,
    pub value: f32,
}

/// Parses `FEATURE=VALUE[,FEATURE=VALUE…]`; each feature at most once.
pub fn parse_steers(spec: &str) -> Result<Vec<Steer>> {
    let bad = |part: &str, message: &str| Error::InvalidArgument {
        what: "--steer",
        value: part.to_string(),
        message: message.to_string(),
    };
    spec.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (f, v) = part
                .split_once('=')
                .ok_or_else(|| bad(part, "expected FEATURE=VALUE, e.g. 1234=8.0"))?;
            let feature = f
                .trim()
                .parse()
                .map_err(|_| bad(part, "the feature must be a non-negative integer"))?;
            let value: f32 = v
                .trim()
                .parse()
                .map_err(|_| bad(part, "the value must be a number"))?;
            if !value.is_finite() {
                return Err(bad(part, "the value must be finite"));
            }
            Ok(Steer { feature, value })
        })
        .collect::<Result<Vec<Steer>>>()
        .and_then(|steers| {
            if steers.is_empty() {
                return Err(bad(spec, "names no feature; expected FEATURE=VALUE[,…]"));
            }
            let mut seen = std::collections::HashSet::new();
            match steers.iter().find(|s| !seen.insert(s.feature)) {
                Some(s) => Err(bad(&s.feature.to_string(), "is named twice")),
                None => Ok(steers),
            }
        })
}

/// Hooks that steer `steers` at the SAE's `site` (a [`HookPoint`](crate::model::HookPoint) for an SAE). The SAE is moved
/// to `device` in f32.
pub fn steering_hooks(
    sae: &Sae,
    site: impl Into<SaeSite>,
    steers: &[Steer],
    mode: SteerMode,
    device: &Device,
) -> Result<Hooks> {
    let site = site.into();
    site.check(sae)?;
    if steers.is_empty() {
        return Ok(Hooks::new());
    }
    let d_sae = sae.d_sae();
    if let Some(s) = steers.iter().find(|s| s.feature as usize >= d_sae) {
        return Err(Error::InvalidArgument {
            what: "--steer",
            value: s.feature.to_string(),
            message: format!("the SAE has features 0..{}", d_sae.saturating_sub(1)),
        });
    }
    let sae = sae.to_dtype(DType::F32)?.to_device(device)?;
    let ids: Vec<u32> = steers.iter().map(|s| s.feature).collect();
    let ids = Tensor::new(ids.as_slice(), device)?;
    let values: Vec<f32> = steers.iter().map(|s| s.value).collect();
    let values = Tensor::new(values.as_slice(), device)?; // [n]
    let directions = sae.w_dec.index_select(&ids, 0)?; // [n, d_out]
    let encode = move |x: &Tensor| -> candle_core::Result<Tensor> {
        sae.encode(&x.to_dtype(DType::F32)?)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .index_select(&ids, D::Minus1) // [b, s, n]
    };
    // The steered features' activations, read at the input hook: for an SAE in the hook that
    // it also shifts; for a transcoder earlier in the pass, kept here until its output hook.
    let read_at_input = Stash::default();
    let read = read_at_input.clone();
    let separate_output = site.output != site.input;
    let encode_here = encode.clone();
    let f = move |x: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let amounts = match mode {
            SteerMode::Add => values.broadcast_as(steer_shape(&xf, values.dim(0)?)?)?,
            SteerMode::Clamp => {
                let acts = if separate_output {
                    read.require("the transcoder's input hook")?
                } else {
                    encode_here(&xf)?
                };
                values.broadcast_sub(&acts)?
            }
        };
        let shift = amounts.broadcast_matmul(&directions)?; // [b, s, d_out]
        (xf + shift)?.to_dtype(dtype)
    };
    let hooks = Hooks::new().intervene(
        site.output,
        Intervention::new(InterventionOp::Func(Arc::new(f))),
    );
    if !(separate_output && mode == SteerMode::Clamp) {
        return Ok(hooks);
    }
    let stash = move |x: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
        read_at_input.put(encode(x)?);
        Ok(x.clone())
    };
    Ok(hooks.intervene(
        site.input,
        Intervention::new(InterventionOp::Func(Arc::new(stash))),
    ))
}

/// `[b, s, n]` for activations `[b, s, d]`.
fn steer_shape(x: &Tensor, n: usize) -> candle_core::Result<(usize, usize, usize)> {
    let (b, s, _) = x.dims3()?;
    Ok((b, s, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steer_specs_parse_or_say_what_is_wrong() {
        let s = parse_steers("12=5, 7=-2.5").unwrap();
        assert_eq!(
            s,
            vec![
                Steer {
                    feature: 12,
                    value: 5.0
                },
                Steer {
                    feature: 7,
                    value: -2.5
                }
            ]
        );
        for (spec, says) in [
            ("", "names no feature"),
            ("12", "FEATURE=VALUE"),
            ("x=1", "non-negative integer"),
            ("3=abc", "number"),
            ("3=inf", "finite"),
            ("3=1,3=2", "twice"),
        ] {
            let e = parse_steers(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }
}
