//! Composition scores on the fixture models (f64): every pair equals the Frobenius ratio of
//! the dense d_model × d_model OV and QK matrices built here from the checkpoint's weights
//! (norm gain folded in, LayerNorm models centred); random weights score about the stated
//! baseline; `monoscope heads --composition` on the world model.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use candle_core::{D, DType, Device, Tensor};
use common::{fixture_dir, monoscope_json};
use monoscope::Model;
use monoscope::composition::{Composition, composition_scores};

/// Head `h`'s reading matrix (rows `row·hd..` of the fused projection) as `[d_model, hd]`,
/// the norm's gain folded in and, for a LayerNorm, centred over d_model.
fn reading(model: &Model, layer: usize, row: usize) -> Tensor {
    let block = &model.transformer.blocks[layer];
    let hd = block.attn.head_dim;
    let w = block
        .attn
        .qkv
        .weight()
        .narrow(0, row * hd, hd)
        .unwrap()
        .t()
        .unwrap();
    let gain = block.ln_attn.weight().unsqueeze(1).unwrap();
    let w = w.broadcast_mul(&gain).unwrap();
    if block.ln_attn.centers() {
        w.broadcast_sub(&w.mean_keepdim(0).unwrap()).unwrap()
    } else {
        w
    }
}

/// Head `h`'s OV and QK matrices, dense.
fn ov_qk(model: &Model, layer: usize, h: usize) -> (Tensor, Tensor) {
    let attn = &model.transformer.blocks[layer].attn;
    let (nh, nkv, hd) = (attn.n_heads, attn.n_kv_heads, attn.head_dim);
    let kv = h / (nh / nkv);
    let (q, k, v) = (
        reading(model, layer, h),
        reading(model, layer, nh + kv),
        reading(model, layer, nh + nkv + kv),
    );
    let mut o = attn
        .out
        .weight()
        .narrow(1, h * hd, hd)
        .unwrap()
        .t()
        .unwrap(); // [hd, d]
    if model.transformer.blocks[layer].ln_attn.centers() {
        o = o
            .broadcast_sub(&o.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
    }
    (v.matmul(&o).unwrap(), q.matmul(&k.t().unwrap()).unwrap())
}

fn frobenius(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

#[test]
fn every_score_is_the_ratio_of_the_dense_matrices_norms() {
    for model_type in ["gpt2", "llama", "gpt_neox", "gemma"] {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        let dims = model.dims().clone();
        for mode in Composition::ALL {
            let scores = composition_scores(&model, mode).unwrap();
            assert_eq!(scores.mode, mode);
            for wl in 0..dims.n_layers {
                for wh in 0..dims.n_heads {
                    let (ov, _) = ov_qk(&model, wl, wh);
                    for rl in 0..dims.n_layers {
                        for rh in 0..dims.n_heads {
                            let got = f64::from(scores.scores[wl][wh][rl][rh]);
                            if rl <= wl {
                                assert_eq!(got, 0.0, "{model_type} {mode}: a later writer");
                                continue;
                            }
                            let (ov_r, qk_r) = ov_qk(&model, rl, rh);
                            let reader = match mode {
                                Composition::Q => qk_r,
                                Composition::K => qk_r.t().unwrap(),
                                Composition::V => ov_r,
                            };
                            let expected = frobenius(&ov.matmul(&reader).unwrap())
                                / (frobenius(&ov) * frobenius(&reader));
                            assert!(
                                (got - expected).abs() < 1e-6,
                                "{model_type} {mode} {wl}.{wh} → {rl}.{rh}: {got} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The fixtures' weights are random: their heads compose about as much as the baseline says
/// a reader at random to its writer does.
#[test]
fn random_weights_score_about_the_baseline() {
    for model_type in ["gpt2", "llama"] {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        for mode in Composition::ALL {
            let scores = composition_scores(&model, mode).unwrap();
            let ranked = scores.ranked();
            let mean = ranked.iter().map(|p| f64::from(p.score)).sum::<f64>() / ranked.len() as f64;
            let ratio = mean / f64::from(scores.baseline);
            assert!(
                (0.7..1.3).contains(&ratio),
                "{model_type} {mode}: mean {mean}, baseline {}",
                scores.baseline
            );
        }
    }
}

#[test]
fn the_heads_command_lists_composition_on_the_world_model() {
    let report = monoscope_json(&["heads", "--composition", "--json"]);
    let all = report["composition"].as_array().unwrap();
    let modes: Vec<&str> = all.iter().map(|c| c["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["Q", "K", "V"]);
    for c in all {
        let scores = c["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 8);
        assert_eq!(scores[0].as_array().unwrap().len(), 6);
        assert_eq!(scores[0][0].as_array().unwrap().len(), 8);
        let cell = |wl: usize, rl: usize| scores[wl][1][rl][2].as_f64().unwrap();
        assert_eq!(cell(3, 3), 0.0);
        assert_eq!(cell(5, 2), 0.0);
        assert!(cell(2, 5) > 0.0 && cell(2, 5) < 1.0);
    }
}

/// The window's per-head view holds the same scores as the full grid, its partner lists are
/// sorted, and a head the model lacks is refused.
#[test]
fn one_heads_partners_are_its_row_and_column_of_the_full_grid() {
    use monoscope::composition::head_composition;
    let never = std::sync::atomic::AtomicBool::new(false);
    for model_type in ["gpt2", "llama", "gemma"] {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F64).unwrap();
        let dims = model.dims().clone();
        for (layer, head) in [(0, 1), (dims.n_layers - 1, dims.n_heads - 1)] {
            let partners = head_composition(&model, layer, head, &never)
                .unwrap()
                .unwrap();
            for p in &partners {
                let full = composition_scores(&model, p.mode).unwrap();
                for l in 0..dims.n_layers {
                    for h in 0..dims.n_heads {
                        let (into, from) = (
                            full.scores[l][h][layer][head],
                            full.scores[layer][head][l][h],
                        );
                        assert!(
                            (p.writers[l][h] - into).abs() < 1e-6,
                            "{model_type} {}",
                            p.mode
                        );
                        assert!(
                            (p.readers[l][h] - from).abs() < 1e-6,
                            "{model_type} {}",
                            p.mode
                        );
                    }
                }
                let writers = p.strongest_writers();
                assert_eq!(writers.len(), layer * dims.n_heads);
                assert!(writers.windows(2).all(|w| w[0].1 >= w[1].1));
                let readers = p.strongest_readers();
                assert_eq!(readers.len(), (dims.n_layers - 1 - layer) * dims.n_heads);
            }
        }
        let err = head_composition(&model, dims.n_layers, 0, &never)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a head"), "{err}");
    }
}
