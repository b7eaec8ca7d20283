//! Steering with SAE features: while the model runs, set chosen features to a value
//! (`clamp`) or push the activations along their decoder directions (`add`) at the SAE's
//! hook, on every position. The CLI's `generate --steer` and the GUI both use
//! [`steering_hooks`].
//!
//! Clamping keeps the SAE's reconstruction error, as Anthropic's and Neuronpedia's steering
//! does: `x' = x + Σ_f (v_f − a_f(x))·W_dec[f]`, `a_f(x)` the feature's activation on `x`
//! (so other features and the error term are untouched). Adding is `x' = x + Σ_f v_f·W_dec[f]`.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::hooks::{HookPoint, Hooks, Intervention, InterventionOp};
use crate::sae::Sae;

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

/// Hooks that steer `steers` at `hook` (the SAE's). The SAE is moved to `device` in f32.
pub fn steering_hooks(
    sae: &Sae,
    hook: HookPoint,
    steers: &[Steer],
    mode: SteerMode,
    device: &Device,
) -> Result<Hooks> {
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
    let sae = sae.to_dtype(DType::F32)?;
    let sae = Sae {
        w_enc: sae.w_enc.to_device(device)?,
        w_dec: sae.w_dec.to_device(device)?,
        b_enc: sae.b_enc.to_device(device)?,
        b_dec: sae.b_dec.to_device(device)?,
        threshold: sae.threshold.map(|t| t.to_device(device)).transpose()?,
        ..sae
    };
    let ids: Vec<u32> = steers.iter().map(|s| s.feature).collect();
    let ids = Tensor::new(ids.as_slice(), device)?;
    let values: Vec<f32> = steers.iter().map(|s| s.value).collect();
    let values = Tensor::new(values.as_slice(), device)?; // [n]
    let directions = sae.w_dec.index_select(&ids, 0)?; // [n, d_in]
    let f = move |x: &Tensor, _offset: usize| -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let amounts = match mode {
            SteerMode::Add => values.broadcast_as(steer_shape(&xf, values.dim(0)?)?)?,
            SteerMode::Clamp => {
                let acts = sae
                    .encode(&xf)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                    .index_select(&ids, D::Minus1)?; // [b, s, n]
                values.broadcast_sub(&acts)?
            }
        };
        let shift = amounts.broadcast_matmul(&directions)?; // [b, s, d_in]
        (xf + shift)?.to_dtype(dtype)
    };
    Ok(Hooks::new().intervene(hook, Intervention::new(InterventionOp::Func(Arc::new(f)))))
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
