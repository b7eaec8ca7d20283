//! ROME's closed-form rank-one edit (Meng et al. 2022), on the down projection of one layer.
//!
//! With keys `k` (inputs of the down projection, `mlp.hook_post`) whose second moment is `C`,
//! the edit that maps the subject's key `k*` to the wanted value `v*` while disturbing other
//! keys least (in the `C⁻¹` metric) is
//! `W' = W + (v* − W k*) uᵀ / (uᵀ k*)`, `u = C⁻¹ k*`.
//! `C⁻¹ k*` is solved through a Cholesky factorisation (ndarray-linalg, LAPACK); when `C` is
//! not positive definite enough to factorise, `λ·(tr C / d)·I` is added with growing `λ`, and
//! the `λ` used is reported.

use ndarray::{Array1, Array2};
use ndarray_linalg::{FactorizeC, SolveC, UPLO};

use super::covariance::KeyCovariance;
use crate::error::{Error, Result};

/// `u = C⁻¹ k` and the ridge `λ` (0 when none was needed).
pub fn solve_key(cov: &KeyCovariance, k: &[f64]) -> Result<(Vec<f64>, f64)> {
    let d = cov.d;
    if k.len() != d {
        return Err(Error::InvalidArgument {
            what: "key",
            value: format!("{} values", k.len()),
            message: format!("the covariance is {d}×{d}"),
        });
    }
    let c =
        Array2::from_shape_vec((d, d), cov.values.clone()).map_err(|e| Error::InvalidArgument {
            what: "covariance",
            value: format!("{} values", cov.values.len()),
            message: e.to_string(),
        })?;
    let mean_diag = (0..d).map(|i| c[[i, i]]).sum::<f64>() / d as f64;
    let k = Array1::from_vec(k.to_vec());
    for lambda in [0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0] {
        let mut m = c.clone();
        for i in 0..d {
            m[[i, i]] += lambda * mean_diag.max(f64::MIN_POSITIVE);
        }
        if let Ok(factor) = m.factorizec(UPLO::Lower)
            && let Ok(u) = factor.solvec(&k)
            && u.iter().all(|v| v.is_finite())
        {
            return Ok((u.to_vec(), lambda));
        }
    }
    Err(Error::InvalidArgument {
        what: "covariance",
        value: format!("layer {}", cov.layer),
        message: "cannot be factorised even with a ridge of its mean diagonal".into(),
    })
}

/// The rank-one change `Δ` (`[d_out, d_in]`, row-major, Linear layout `W: [out, in]`) that
/// makes `(W + Δ) k = v`, along `u` (`u = C⁻¹ k`).
pub fn rank_one_update(
    w: &[f32],
    d_out: usize,
    k: &[f64],
    v: &[f64],
    u: &[f64],
) -> Result<Vec<f32>> {
    let d_in = k.len();
    if w.len() != d_out * d_in || v.len() != d_out || u.len() != d_in {
        return Err(Error::InvalidArgument {
            what: "rank-one update",
            value: format!(
                "W {} values, k {d_in}, v {}, u {}",
                w.len(),
                v.len(),
                u.len()
            ),
            message: format!("expected W {d_out}×{d_in}"),
        });
    }
    let uk: f64 = u.iter().zip(k).map(|(a, b)| a * b).sum();
    if uk.abs() < 1e-30 || !uk.is_finite() {
        return Err(Error::InvalidArgument {
            what: "key",
            value: format!("uᵀk = {uk}"),
            message: "the key has no weight under C⁻¹: nothing to edit along".into(),
        });
    }
    let mut delta = vec![0f32; d_out * d_in];
    for (o, row) in delta.chunks_mut(d_in).enumerate() {
        let wk: f64 = w[o * d_in..(o + 1) * d_in]
            .iter()
            .zip(k)
            .map(|(a, b)| f64::from(*a) * b)
            .sum();
        let r = (v[o] - wk) / uk;
        for (x, ui) in row.iter_mut().zip(u) {
            *x = (r * ui) as f32;
        }
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn the_edit_maps_the_key_to_the_value_and_spares_c_orthogonal_keys() {
        let (d_in, d_out) = (12, 5);
        let mut seed = 7;
        // C = XᵀX/n from random keys: symmetric positive definite.
        let n = 40;
        let x: Vec<f64> = (0..n * d_in).map(|_| lcg(&mut seed)).collect();
        let mut c = vec![0f64; d_in * d_in];
        for row in x.chunks(d_in) {
            for i in 0..d_in {
                for j in 0..d_in {
                    c[i * d_in + j] += row[i] * row[j] / n as f64;
                }
            }
        }
        let cov = KeyCovariance {
            layer: 0,
            d: d_in,
            samples: n as u64,
            values: c.clone(),
        };
        let k: Vec<f64> = (0..d_in).map(|_| lcg(&mut seed)).collect();
        let v: Vec<f64> = (0..d_out).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f32> = (0..d_out * d_in).map(|_| lcg(&mut seed) as f32).collect();
        let (u, lambda) = solve_key(&cov, &k).unwrap();
        assert_eq!(lambda, 0.0);
        // C u = k.
        for i in 0..d_in {
            let cu: f64 = (0..d_in).map(|j| c[i * d_in + j] * u[j]).sum();
            assert!((cu - k[i]).abs() < 1e-9);
        }
        let delta = rank_one_update(&w, d_out, &k, &v, &u).unwrap();
        let apply = |key: &[f64], with_delta: bool| -> Vec<f64> {
            (0..d_out)
                .map(|o| {
                    (0..d_in)
                        .map(|i| {
                            let wi = f64::from(w[o * d_in + i])
                                + if with_delta {
                                    f64::from(delta[o * d_in + i])
                                } else {
                                    0.0
                                };
                            wi * key[i]
                        })
                        .sum()
                })
                .collect()
        };
        for (got, want) in apply(&k, true).iter().zip(&v) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // A key with uᵀk' = 0 is mapped as before.
        let other: Vec<f64> = (0..d_in).map(|_| lcg(&mut seed)).collect();
        let uo: f64 = u.iter().zip(&other).map(|(a, b)| a * b).sum();
        let uu: f64 = u.iter().map(|a| a * a).sum();
        let orth: Vec<f64> = other
            .iter()
            .zip(&u)
            .map(|(o, ui)| o - uo / uu * ui)
            .collect();
        for (a, b) in apply(&orth, true).iter().zip(apply(&orth, false)) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn a_singular_covariance_is_regularised_and_says_so() {
        // Rank one: every key along the same direction.
        let d = 4;
        let dir = [1.0, 2.0, -1.0, 0.5];
        let values: Vec<f64> = (0..d * d).map(|i| dir[i / d] * dir[i % d]).collect();
        let cov = KeyCovariance {
            layer: 3,
            d,
            samples: 10,
            values,
        };
        let (u, lambda) = solve_key(&cov, &[0.0, 1.0, 0.0, 0.0]).unwrap();
        assert!(lambda > 0.0);
        assert!(u.iter().all(|x| x.is_finite()));
        assert!(solve_key(&cov, &[1.0]).is_err());
    }
}
