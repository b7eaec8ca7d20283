//! The hook mechanism on real fixture models: gradients agree with finite differences,
//! interventions change exactly what they should, capture works across KV-cached calls.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixture_dir, max_abs_diff};
use monoscope::model::layers::{Mlp, Norm};
use monoscope::model::{
    ForwardOutput, HookPoint, Hooks, Intervention, InterventionOp, KvCache, Model,
};

fn load(model_type: &str, dtype: DType) -> Model {
    Model::load(&fixture_dir(model_type), &Device::Cpu, dtype).unwrap()
}

fn logit_at(model: &Model, ids: &Tensor, hooks: &Hooks, pos: usize, token: usize) -> f64 {
    let out = model.forward(ids, hooks).unwrap();
    out.logits
        .get(0)
        .unwrap()
        .get(pos)
        .unwrap()
        .get(token)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// d(logit)/d(hook) from backprop against central differences, in f64, with gradient leaves at
/// the hook in two layers at once (the earlier one must still see the path through the later
/// block).
fn gradient_matches_finite_differences(model_type: &str, point: fn(usize) -> HookPoint) {
    let model = load(model_type, DType::F64);
    let ids = model
        .ids_tensor(&model.encode_prompt("The capital of Japan is").unwrap())
        .unwrap();
    let seq = ids.dim(1).unwrap();
    // The logit of the second-to-last position, so that a later position exists.
    let (target_pos, target_tok) = (seq - 2, 17usize);
    let hooks = Hooks::new().grad(point(0)).grad(point(1));
    let out = model.forward(&ids, &hooks).unwrap();
    let logit = out
        .logits
        .get(0)
        .unwrap()
        .get(target_pos)
        .unwrap()
        .get(target_tok)
        .unwrap();
    let grads = logit.backward().unwrap();
    let grad = grads.get(out.grad_leaf(point(0)).unwrap()).unwrap();
    let width = model.hook_width(point(0)).unwrap();
    assert_eq!(grad.dims(), &[1, seq, width]);
    let grad = grad.get(0).unwrap().to_vec2::<f64>().unwrap();
    assert!(grad[target_pos].iter().any(|g| g.abs() > 1e-6));
    // A later position cannot affect an earlier logit.
    assert!(grad[seq - 1].iter().all(|&g| g == 0.0), "{model_type}");
    let eps = 1e-5;
    let scale = grad.iter().flatten().fold(0f64, |m, g| m.max(g.abs()));
    for (pos, channel) in [
        (0, 3),
        (1, width / 2),
        (target_pos, 0),
        (target_pos, width - 1),
        (2, 7),
        (seq - 1, 5),
    ] {
        let channel = channel % width; // a norm's hook_scale is one wide
        let bump = |delta: f64| {
            let mut v = vec![0f64; width];
            v[channel] = delta;
            let add = Intervention::new(InterventionOp::Add(Tensor::new(v, &Device::Cpu).unwrap()))
                .at_positions(vec![pos as i64]);
            logit_at(
                &model,
                &ids,
                &Hooks::new().intervene(point(0), add),
                target_pos,
                target_tok,
            )
        };
        let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
        let analytic = grad[pos][channel];
        assert!(
            (numeric - analytic).abs() <= 1e-6 * scale.max(1.0),
            "{model_type} {} pos {pos} channel {channel}: backprop {analytic} vs finite difference {numeric}",
            point(0)
        );
    }
}

#[test]
fn mlp_post_gradient_matches_finite_differences_gpt2() {
    gradient_matches_finite_differences("gpt2", HookPoint::MlpPost);
}

#[test]
fn mlp_post_gradient_matches_finite_differences_llama() {
    gradient_matches_finite_differences("llama", HookPoint::MlpPost);
}

/// The attention's inner hooks are differentiable too: values in GPT-2, rotated keys in Llama
/// (whose gradient must flow back through the rotation into the earlier layer's leaf), and
/// Qwen3's normalised queries and keys.
#[test]
fn attention_input_gradients_match_finite_differences() {
    gradient_matches_finite_differences("gpt2", HookPoint::AttnV);
    gradient_matches_finite_differences("llama", HookPoint::AttnRotK);
    gradient_matches_finite_differences("qwen2", HookPoint::AttnQ);
    gradient_matches_finite_differences("qwen3", HookPoint::AttnKNormed);
    gradient_matches_finite_differences("qwen3", HookPoint::ResidPre);
}

/// Through OLMo 2's norms over all query heads at once and its blocks without input norms.
#[test]
fn olmo2_gradients_match_finite_differences() {
    gradient_matches_finite_differences("olmo2", HookPoint::AttnQ);
    gradient_matches_finite_differences("olmo2", HookPoint::ResidMid);
}

/// Through Gemma 2's soft-capped scores and logits and its norms after attention and the MLP.
#[test]
fn gemma2_gradients_match_finite_differences() {
    gradient_matches_finite_differences("gemma2", HookPoint::MlpPost);
    gradient_matches_finite_differences("gemma2", HookPoint::AttnRotK);
    gradient_matches_finite_differences("gemma2", HookPoint::Ln2PostIn);
    gradient_matches_finite_differences("gemma2", HookPoint::Ln1PostScale);
}

/// A norm's divisor is differentiable too: freezing it is a choice, not a side effect.
#[test]
fn norm_scale_gradients_match_finite_differences() {
    gradient_matches_finite_differences("gpt2", HookPoint::Ln1Scale);
    gradient_matches_finite_differences("gemma", HookPoint::Ln2Scale);
}

/// d(logit)/d(`attn.hook_attn_scores`) against central differences on visible entries, and
/// exactly zero on the entries the mask hides (whatever is added there stays hidden).
#[test]
fn attention_score_gradients_match_finite_differences_and_vanish_where_masked() {
    for model_type in ["gpt2", "mistral"] {
        let model = load(model_type, DType::F64);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is 東京").unwrap())
            .unwrap();
        let seq = ids.dim(1).unwrap();
        let point = HookPoint::AttnScores(0);
        let (target_pos, target_tok) = (seq - 1, 17usize);
        let out = model.forward(&ids, &Hooks::new().grad(point)).unwrap();
        let logit = out.logits.i((0, target_pos, target_tok)).unwrap();
        let grads = logit.backward().unwrap();
        let grad = grads.get(out.grad_leaf(point).unwrap()).unwrap();
        let heads = model.dims().n_heads;
        assert_eq!(grad.dims(), &[1, heads, seq, seq]);
        let grad = grad.get(0).unwrap().to_vec3::<f64>().unwrap();
        let window = model.transformer.blocks[0]
            .attn
            .sliding_window
            .unwrap_or(usize::MAX);
        let scale = grad
            .iter()
            .flatten()
            .flatten()
            .fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale > 1e-6, "{model_type}: no gradient reached the scores");
        for (h, query, key) in [
            (0, seq - 1, seq - 1),
            (1, seq - 1, seq - 3),
            (2, 4, 1),
            (0, 2, 3),
        ] {
            let visible = key <= query && query - key < window;
            let bump = |delta: f64| {
                let mut v = vec![0f64; heads * seq * seq];
                v[(h * seq + query) * seq + key] = delta;
                let add = Tensor::from_vec(v, (1, heads, seq, seq), &Device::Cpu).unwrap();
                let hooks =
                    Hooks::new().intervene(point, Intervention::new(InterventionOp::Add(add)));
                logit_at(&model, &ids, &hooks, target_pos, target_tok)
            };
            let eps = 1e-4;
            let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
            let analytic = grad[h][query][key];
            assert!(
                (numeric - analytic).abs() <= 1e-6 * scale.max(1.0),
                "{model_type} head {h} query {query} key {key}: backprop {analytic} vs finite \
                 difference {numeric}"
            );
            if !visible {
                assert_eq!(analytic, 0.0, "{model_type}: a hidden key has a gradient");
            }
        }
    }
}

#[test]
fn gradient_run_gives_the_same_logits_as_the_fast_path() {
    let model = load("gemma", DType::F32);
    let ids = model
        .ids_tensor(&model.encode_prompt("日本の首都は東京です。").unwrap())
        .unwrap();
    let fast = model.forward(&ids, &Hooks::new()).unwrap().logits;
    let slow = model
        .forward(&ids, &Hooks::new().grad(HookPoint::ResidPre(1)))
        .unwrap()
        .logits;
    assert!(common::max_relative_error(&slow, &fast) < 1e-5);
}

#[test]
fn zero_ablating_mlp_post_leaves_only_the_down_projection_bias() {
    let model = load("gpt2", DType::F32);
    let ids = model
        .ids_tensor(&model.encode_prompt("Hello world").unwrap())
        .unwrap();
    let hooks = Hooks::new()
        .intervene(
            HookPoint::MlpPost(1),
            Intervention::new(InterventionOp::Zero),
        )
        .capture([HookPoint::MlpOut(1)]);
    let out = model.forward(&ids, &hooks).unwrap();
    let mlp_out = out.cache.get(HookPoint::MlpOut(1)).unwrap();
    let bias = model.transformer.blocks[1].mlp.down_proj().bias().unwrap();
    let expected = bias
        .unsqueeze(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .broadcast_as(mlp_out.shape())
        .unwrap();
    assert!(common::max_relative_error(mlp_out, &expected.contiguous().unwrap()) < 1e-6);
}

/// Zeroing a gated MLP's up projection (`mlp.hook_pre_linear`) zeroes its `mlp.hook_post`:
/// the hook is the factor the MLP multiplies by, not a copy.
#[test]
fn zeroing_the_up_projection_empties_a_gated_mlp() {
    for model_type in ["llama", "gemma"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is").unwrap())
            .unwrap();
        let (up, post) = (HookPoint::MlpPreLinear(1), HookPoint::MlpPost(1));
        let out = model
            .forward(
                &ids,
                &Hooks::new()
                    .intervene(
                        up,
                        Intervention::new(InterventionOp::Zero).at_positions(vec![-1]),
                    )
                    .capture([post]),
            )
            .unwrap();
        let post = out.cache.get(post).unwrap().get(0).unwrap();
        let seq = post.dim(0).unwrap();
        assert_eq!(
            common::max_abs(&post.get(seq - 1).unwrap()),
            0.0,
            "{model_type}"
        );
        assert!(
            common::max_abs(&post.get(seq - 2).unwrap()) > 0.0,
            "{model_type}"
        );
    }
}

/// Per-head ablation, the attention counterpart of zeroing neurons: zeroing one head's
/// columns of `attn.hook_z` removes exactly that head's term from `hook_attn_out`, and the
/// change reaches the logits.
#[test]
fn zeroing_one_head_at_hook_z_removes_exactly_its_term_from_attn_out() {
    for model_type in ["gpt2", "llama"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is 東京").unwrap())
            .unwrap();
        let (z_point, out_point) = (HookPoint::AttnZ(1), HookPoint::AttnOut(1));
        let clean = model
            .forward(&ids, &Hooks::new().capture([z_point, out_point]))
            .unwrap();
        let hd = model.dims().head_dim;
        let head = 1;
        let columns: Vec<usize> = (head * hd..(head + 1) * hd).collect();
        let ablate = Intervention::new(InterventionOp::Zero).at_channels(columns);
        let ablated = model
            .forward(
                &ids,
                &Hooks::new().intervene(z_point, ablate).capture([out_point]),
            )
            .unwrap();
        let z_head = clean
            .cache
            .get(z_point)
            .unwrap()
            .narrow(2, head * hd, hd)
            .unwrap();
        let w_head = model.transformer.blocks[1]
            .attn
            .out
            .weight()
            .narrow(1, head * hd, hd)
            .unwrap();
        let head_term = z_head.broadcast_matmul(&w_head.t().unwrap()).unwrap();
        let expected = (clean.cache.get(out_point).unwrap() - head_term).unwrap();
        let got = ablated.cache.get(out_point).unwrap();
        let err = common::max_relative_error(got, &expected);
        assert!(err < 1e-5, "{model_type}: attn_out off by {err}");
        assert!(
            max_abs_diff(&clean.logits, &ablated.logits) > 1e-4,
            "{model_type}: the ablation did not reach the logits"
        );
    }
}

#[test]
fn an_intervention_at_one_position_changes_only_that_position_and_later() {
    let model = load("llama", DType::F32);
    let ids = model
        .ids_tensor(&model.encode_prompt("Paris (パリ) is the capital").unwrap())
        .unwrap();
    let clean = model
        .forward(&ids, &Hooks::new())
        .unwrap()
        .logits
        .get(0)
        .unwrap();
    let steer = Tensor::ones(model.dims().d_model, DType::F32, &Device::Cpu).unwrap();
    let hooks = Hooks::new().intervene(
        HookPoint::ResidPost(0),
        Intervention::new(InterventionOp::Add(steer)).at_positions(vec![2]),
    );
    let steered = model.forward(&ids, &hooks).unwrap().logits.get(0).unwrap();
    let row_diff =
        |p: usize| common::max_abs_diff(&clean.get(p).unwrap(), &steered.get(p).unwrap());
    assert_eq!(row_diff(0), 0.0);
    assert_eq!(row_diff(1), 0.0);
    assert!(row_diff(2) > 1e-3);
    assert!(row_diff(3) > 1e-3);
}

#[test]
fn scaling_selected_channels_by_one_is_the_identity_and_by_two_is_not() {
    let model = load("qwen2", DType::F32);
    let ids = model
        .ids_tensor(&model.encode_prompt("Tokyo is").unwrap())
        .unwrap();
    let run = |s: f64| {
        let iv = Intervention::new(InterventionOp::Scale(s)).at_channels(vec![0, 5, 9]);
        model
            .forward(&ids, &Hooks::new().intervene(HookPoint::MlpPost(0), iv))
            .unwrap()
            .logits
    };
    let clean = model.forward(&ids, &Hooks::new()).unwrap().logits;
    assert!(common::max_relative_error(&run(1.0), &clean) < 1e-7);
    assert!(common::max_relative_error(&run(2.0), &clean) > 1e-4);
}

#[test]
fn kv_cached_chunks_match_one_full_pass_and_capture_appends() {
    for model_type in ["gpt_neox", "mistral"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .encode_prompt("Hello world, a tiny model says hello to you.")
            .unwrap();
        // Keys and rotated keys are hooked at the new positions only, and append like the rest.
        let points = [
            HookPoint::ResidPost(1),
            HookPoint::AttnPattern(1),
            HookPoint::AttnK(1),
            HookPoint::AttnRotK(1),
            HookPoint::AttnQ(0),
        ];
        let hooks = Hooks::new().capture(points);
        let full = model
            .forward(&model.ids_tensor(&ids).unwrap(), &hooks)
            .unwrap();
        let mut kv = KvCache::default();
        let split = 4;
        let a = model
            .forward_cached(&model.ids_tensor(&ids[..split]).unwrap(), &mut kv, &hooks)
            .unwrap();
        let b = model
            .forward_cached(&model.ids_tensor(&ids[split..]).unwrap(), &mut kv, &hooks)
            .unwrap();
        assert_eq!(kv.len(), ids.len());
        let joined = Tensor::cat(&[&a.logits, &b.logits], 1).unwrap();
        assert!(
            common::max_relative_error(&joined, &full.logits) < 1e-5,
            "{model_type}"
        );
        // The second call's pattern rows see all keys; extending pads the first call's rows.
        assert_eq!(b.cache.get(points[1]).unwrap().dim(3).unwrap(), ids.len());
        let mut cache = a.cache;
        cache.extend(b.cache).unwrap();
        for point in points {
            let (got, want) = (cache.get(point).unwrap(), full.cache.get(point).unwrap());
            assert_eq!(got.dims(), want.dims(), "{model_type} {point}");
            let err = common::max_relative_error(got, want);
            assert!(err < 1e-5, "{model_type} {point}: relative error {err}");
        }
    }
}

/// An intervention at `attn.hook_pattern` selects heads and query rows: zeroing one head's
/// last row zeroes exactly that head's slice of `attn.hook_z` there, and reaches the logits;
/// patching the pattern with itself leaves the fused fast path's logits.
#[test]
fn interventions_on_the_pattern_act_on_chosen_heads_and_queries() {
    for model_type in ["gpt2", "llama"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is 東京").unwrap())
            .unwrap();
        let (pattern, z) = (HookPoint::AttnPattern(0), HookPoint::AttnZ(0));
        let fast = model.forward(&ids, &Hooks::new()).unwrap();
        let clean = model
            .forward(&ids, &Hooks::new().capture([pattern, z]))
            .unwrap();
        let itself = Intervention::new(InterventionOp::Replace(
            clean.cache.get(pattern).unwrap().clone(),
        ));
        let patched = model
            .forward(&ids, &Hooks::new().intervene(pattern, itself))
            .unwrap();
        let err = common::max_relative_error(&patched.logits, &fast.logits);
        assert!(
            err < 1e-5,
            "{model_type}: unfused pattern path off by {err}"
        );

        let (head, hd) = (1, model.dims().head_dim);
        let blind = Intervention::new(InterventionOp::Zero)
            .at_channels(vec![head])
            .at_positions(vec![-1]);
        let ablated = model
            .forward(&ids, &Hooks::new().intervene(pattern, blind).capture([z]))
            .unwrap();
        let (before, after) = (
            clean.cache.get(z).unwrap().get(0).unwrap(),
            ablated.cache.get(z).unwrap().get(0).unwrap(),
        );
        let last = before.dim(0).unwrap() - 1;
        let changed = (before - &after).unwrap().abs().unwrap();
        let slice = |t: &Tensor, pos: usize, start: usize, len: usize| {
            t.get(pos).unwrap().narrow(0, start, len).unwrap()
        };
        let zeroed = slice(&after, last, head * hd, hd);
        assert_eq!(
            zeroed
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let untouched_rows = changed.narrow(0, 0, last).unwrap();
        assert_eq!(
            untouched_rows
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let other_heads = slice(&changed, last, 0, head * hd);
        assert_eq!(
            other_heads.max_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert!(
            max_abs_diff(&clean.logits, &ablated.logits) > 1e-4,
            "{model_type}: the ablation did not reach the logits"
        );
    }
}

/// Interventions at `attn.hook_attn_scores` select heads and query rows, and the mask comes back
/// after them: zeroing one head's last row gives it uniform attention over the keys it may see
/// (the window included, in Mistral), leaving every other row and head as it was; a large bonus
/// on key 0 draws every query that may see it there and none that may not; replacing the scores
/// with themselves reproduces the fused fast path.
#[test]
fn interventions_on_the_scores_act_on_chosen_heads_and_keep_the_mask() {
    for model_type in ["gpt2", "llama", "mistral"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .ids_tensor(
                &model
                    .encode_prompt("The capital of Japan is 東京です")
                    .unwrap(),
            )
            .unwrap();
        let seq = ids.dim(1).unwrap();
        let (scores, pattern) = (HookPoint::AttnScores(1), HookPoint::AttnPattern(1));
        let window = model.transformer.blocks[1]
            .attn
            .sliding_window
            .unwrap_or(usize::MAX);
        assert!(
            model_type != "mistral" || seq > window,
            "the prompt must outrun the window"
        );
        let visible = |query: usize, key: usize| key <= query && query - key < window;
        let fast = model.forward(&ids, &Hooks::new()).unwrap();
        let clean = model
            .forward(&ids, &Hooks::new().capture([scores, pattern]))
            .unwrap();
        let itself = Intervention::new(InterventionOp::Replace(
            clean.cache.get(scores).unwrap().clone(),
        ));
        let replayed = model
            .forward(&ids, &Hooks::new().intervene(scores, itself))
            .unwrap();
        let err = common::max_relative_error(&replayed.logits, &fast.logits);
        assert!(err < 1e-5, "{model_type}: unfused scores path off by {err}");

        let head = 1;
        let flat = Intervention::new(InterventionOp::Zero)
            .at_channels(vec![head])
            .at_positions(vec![-1]);
        let ablated = model
            .forward(
                &ids,
                &Hooks::new().intervene(scores, flat).capture([pattern]),
            )
            .unwrap();
        let rows = |out: &ForwardOutput| {
            let captured = out.cache.get(pattern).unwrap().get(0).unwrap();
            captured.to_vec3::<f32>().unwrap()
        };
        let (before, after) = (rows(&clean), rows(&ablated));
        let last = seq - 1;
        let seen = (0..seq).filter(|&k| visible(last, k)).count() as f32;
        for (h, (rows_before, rows_after)) in before.iter().zip(&after).enumerate() {
            for (q, (row_before, row_after)) in rows_before.iter().zip(rows_after).enumerate() {
                if (h, q) != (head, last) {
                    assert_eq!(
                        row_before, row_after,
                        "{model_type}: head {h} query {q} moved"
                    );
                    continue;
                }
                for (k, &p) in row_after.iter().enumerate() {
                    let want = if visible(q, k) { 1.0 / seen } else { 0.0 };
                    assert!(
                        (p - want).abs() < 1e-6,
                        "{model_type}: key {k} gets {p}, not {want}"
                    );
                }
            }
        }
        assert!(
            max_abs_diff(&clean.logits, &ablated.logits) > 1e-5,
            "{model_type}: the flattened head did not reach the logits"
        );

        let mut bonus = vec![0f32; seq];
        bonus[0] = 1e4;
        let bonus = Intervention::new(InterventionOp::Add(
            Tensor::new(bonus, &Device::Cpu).unwrap(),
        ));
        let drawn = model
            .forward(
                &ids,
                &Hooks::new().intervene(scores, bonus).capture([pattern]),
            )
            .unwrap();
        let drawn = rows(&drawn);
        for (h, rows) in drawn.iter().enumerate() {
            for (q, row) in rows.iter().enumerate() {
                assert!(
                    row.iter().all(|p| p.is_finite()),
                    "{model_type}: NaN in head {h}"
                );
                let want = if visible(q, 0) { 1.0 } else { 0.0 };
                assert!(
                    (row[0] - want).abs() < 1e-5,
                    "{model_type} head {h} query {q}: key 0 gets {}, not {want}",
                    row[0]
                );
            }
        }
    }
}

/// Freezing a norm's scale — replacing `hook_scale` with its value from the run itself — makes
/// the norm affine in its input: a change δ added before the final norm then moves the logits
/// exactly half as far as 2δ does, which the live norm does not.
#[test]
fn a_frozen_norm_scale_makes_the_logits_linear_in_the_stream() {
    for model_type in ["gpt2", "llama"] {
        let model = load(model_type, DType::F64);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is").unwrap())
            .unwrap();
        let last = model.dims().n_layers - 1;
        let scale_point = HookPoint::LnFinalScale;
        let clean = model
            .forward(&ids, &Hooks::new().capture([scale_point]))
            .unwrap();
        let frozen = clean.cache.get(scale_point).unwrap().clone();
        let delta = Tensor::randn(0f64, 3.0, model.dims().d_model, &Device::Cpu).unwrap();
        let moved = |times: f64, freeze: bool| {
            let add = Intervention::new(InterventionOp::Add((&delta * times).unwrap()));
            let mut hooks = Hooks::new().intervene(HookPoint::ResidPost(last), add);
            if freeze {
                hooks = hooks.intervene(
                    scale_point,
                    Intervention::new(InterventionOp::Replace(frozen.clone())),
                );
            }
            (model.forward(&ids, &hooks).unwrap().logits - &clean.logits).unwrap()
        };
        let (once, twice) = (moved(1.0, true), moved(2.0, true));
        let err = max_abs_diff(&(&once * 2.0).unwrap(), &twice);
        assert!(
            err < 1e-9,
            "{model_type}: frozen norm not linear, off by {err}"
        );
        let (once, twice) = (moved(1.0, false), moved(2.0, false));
        let err = max_abs_diff(&(&once * 2.0).unwrap(), &twice);
        assert!(
            err > 1e-3,
            "{model_type}: the live norm looked linear ({err})"
        );
    }
}

/// Interventions at the attention's inputs act on heads: a zeroed query attends uniformly to
/// every key it may see (rotated or not), and a zeroed value head empties exactly the heads
/// that read it (two query heads per key head in the Llama fixture) on the fused fast path.
#[test]
fn zeroing_a_query_or_value_head_acts_on_exactly_the_heads_that_use_it() {
    for model_type in ["gpt2", "llama", "gpt_neox"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is 東京").unwrap())
            .unwrap();
        let seq = ids.dim(1).unwrap();
        let attn = &model.transformer.blocks[1].attn;
        let (nh, nkv, hd) = (attn.n_heads, attn.n_kv_heads, attn.head_dim);
        let (pattern, z) = (HookPoint::AttnPattern(1), HookPoint::AttnZ(1));
        let clean = model
            .forward(&ids, &Hooks::new().capture([z, pattern]))
            .unwrap();

        let blind =
            Intervention::new(InterventionOp::Zero).at_channels((hd..2 * hd).collect::<Vec<_>>());
        let out = model
            .forward(
                &ids,
                &Hooks::new()
                    .intervene(HookPoint::AttnQ(1), blind)
                    .capture([pattern]),
            )
            .unwrap();
        let rows = out
            .cache
            .get(pattern)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (query, row) in rows[1].iter().enumerate() {
            for (key, &p) in row.iter().enumerate() {
                let expected = if key <= query {
                    1.0 / (query + 1) as f32
                } else {
                    0.0
                };
                assert!(
                    (p - expected).abs() < 1e-6,
                    "{model_type} query {query} key {key}: {p}"
                );
            }
        }
        let before = clean.cache.get(pattern).unwrap().get(0).unwrap();
        let before = before.to_vec3::<f32>().unwrap();
        assert_ne!(
            rows[1], before[1],
            "{model_type}: head 1 was uniform before"
        );
        assert_eq!(
            rows[0], before[0],
            "{model_type}: head 0's query was not touched"
        );

        let kv_head = nkv - 1;
        let silent = Intervention::new(InterventionOp::Zero)
            .at_channels((kv_head * hd..(kv_head + 1) * hd).collect::<Vec<_>>());
        let out = model
            .forward(
                &ids,
                &Hooks::new()
                    .intervene(HookPoint::AttnV(1), silent)
                    .capture([z]),
            )
            .unwrap();
        let (before, after) = (clean.cache.get(z).unwrap(), out.cache.get(z).unwrap());
        for h in 0..nh {
            let head = |t: &Tensor| {
                t.narrow(2, h * hd, hd)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
            };
            let (was, now) = (
                head(before).to_scalar::<f32>().unwrap(),
                head(after).to_scalar::<f32>().unwrap(),
            );
            if h / (nh / nkv) == kv_head {
                assert!(
                    was > 1e-3 && now == 0.0,
                    "{model_type} head {h}: {was} → {now}"
                );
            } else {
                let diff = max_abs_diff(
                    &before.narrow(2, h * hd, hd).unwrap(),
                    &after.narrow(2, h * hd, hd).unwrap(),
                );
                // The run is fused, the clean one unfused: equal up to rounding.
                assert!(
                    diff < 1e-5,
                    "{model_type} head {h} reads another value head: {diff}"
                );
            }
        }
        assert_eq!(after.dims(), &[1, seq, nh * hd]);
    }
}

/// Rows of different lengths, each cached alone, merged into one padded batch and continued
/// twice: every row's logits are those of the row run alone in one pass (learned positions,
/// partial rotary, a sliding window; inference and differentiable passes).
#[test]
fn merged_rows_of_different_lengths_continue_as_if_each_ran_alone() {
    for model_type in ["gpt2", "gpt_neox", "mistral"] {
        let model = load(model_type, DType::F32);
        let texts = [
            "Hello world, a tiny model says",
            "The capital of",
            "One, two, three, four, five, six, seven, eight",
        ];
        let rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| model.encode_prompt(t).unwrap())
            .collect();
        let (first, second) = ([5u32, 9, 11], [7u32, 3]);
        for hooks in [Hooks::new(), Hooks::new().differentiable()] {
            let caches: Vec<KvCache> = rows
                .iter()
                .map(|ids| {
                    let mut kv = KvCache::default();
                    model
                        .forward_cached(&model.ids_tensor(ids).unwrap(), &mut kv, &hooks)
                        .unwrap();
                    kv
                })
                .collect();
            let mut merged = KvCache::merge_rows(&caches).unwrap();
            let batch = |tail: &[u32]| {
                let flat: Vec<u32> = rows.iter().flat_map(|_| tail.iter().copied()).collect();
                Tensor::from_vec(flat, (rows.len(), tail.len()), &Device::Cpu).unwrap()
            };
            let a = model
                .forward_cached(&batch(&first), &mut merged, &hooks)
                .unwrap();
            let b = model
                .forward_cached(&batch(&second), &mut merged, &hooks)
                .unwrap();
            for (r, ids) in rows.iter().enumerate() {
                let mut whole = ids.clone();
                whole.extend(first.iter().chain(&second));
                let alone = model
                    .forward(&model.ids_tensor(&whole).unwrap(), &hooks)
                    .unwrap()
                    .logits
                    .get(0)
                    .unwrap();
                let tail = alone
                    .narrow(0, ids.len(), first.len() + second.len())
                    .unwrap();
                let got =
                    Tensor::cat(&[a.logits.get(r).unwrap(), b.logits.get(r).unwrap()], 0).unwrap();
                let err = common::max_relative_error(&got, &tail);
                assert!(err < 1e-4, "{model_type} row {r}: {err}");
            }
        }
    }
}

#[test]
fn run_with_cache_accepts_globs_and_names_every_capture() {
    let model = load("gpt2", DType::F32);
    let ids = model
        .ids_tensor(&model.encode_prompt("Hello").unwrap())
        .unwrap();
    let out = model
        .run_with_cache(&ids, &["blocks.*.hook_resid_post", "hook_embed"])
        .unwrap();
    assert_eq!(
        out.cache.names(),
        vec![
            "hook_embed",
            "blocks.0.hook_resid_post",
            "blocks.1.hook_resid_post"
        ]
    );
    let last = out.cache.get_by_name("blocks.1.hook_resid_post").unwrap();
    assert_eq!(last.dims(), &[1, ids.dim(1).unwrap(), model.dims().d_model]);
}

/// `stop_at_layer(L)` returns the residual stream entering block L, as the full run sees it.
#[test]
fn stop_at_layer_returns_the_residual_entering_that_block() {
    for model_type in ["gpt2", "llama"] {
        let model = load(model_type, DType::F32);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is").unwrap())
            .unwrap();
        let point: HookPoint = "blocks.1.hook_resid_pre".parse().unwrap();
        let full = model.forward(&ids, &Hooks::new().capture([point])).unwrap();
        let stopped = model.forward(&ids, &Hooks::new().stop_at_layer(1)).unwrap();
        let expected = full.cache.get(point).unwrap();
        assert_eq!(stopped.logits.dims(), expected.dims(), "{model_type}");
        assert_eq!(max_abs_diff(&stopped.logits, expected), 0.0, "{model_type}");
    }
}

/// Every hook on every architecture holds what the residual algebra says it must: the stream
/// entering block 0 is the embedding (plus positions), each block adds its attention and MLP
/// outputs (`hook_resid_mid` between them, or both at once with GPT-NeoX's parallel residual),
/// block L+1 starts from block L's output, each norm's `hook_normalized` times its
/// `hook_scale` is its (centred) input, and the logits are `ln_final.hook_normalized` through the
/// final gain and bias and the unembedding. With the oracle tests' `hook_mlp_out` and `hook_resid_post`
/// against transformers, this pins `hook_attn_out`, `hook_resid_pre` and `hook_resid_mid` too.
#[test]
fn every_hook_holds_what_the_residual_algebra_gives() {
    for &model_type in common::MODEL_TYPES {
        let model = load(model_type, DType::F64);
        let ids = model
            .ids_tensor(&model.encode_prompt("The capital of Japan is 東京").unwrap())
            .unwrap();
        let out = model.run_with_cache(&ids, &["*"]).unwrap();
        let cache = &out.cache;
        let names = cache.names();
        let hook = |name: &str| {
            cache
                .get_by_name(name)
                .unwrap_or_else(|e| panic!("{model_type}: no {name} among {names:?}: {e}"))
                .clone()
        };
        let close = |what: &str, a: &Tensor, b: &Tensor| {
            let err = max_abs_diff(a, b);
            assert!(err < 1e-9, "{model_type}: {what} off by {err}");
        };
        let mut stream = hook("hook_embed");
        if let Ok(pos) = cache.get_by_name("hook_pos_embed") {
            stream = (stream + pos).unwrap();
        }
        let layers = model.dims().n_layers;
        assert!(
            layers >= 2,
            "{model_type}: the check needs a block after the first"
        );
        let norm_divides = |what: &str, norm: &Norm, input: &Tensor| {
            if norm.is_identity() {
                // OLMo 2's blocks have no input norms, and so no hooks for them.
                let name = format!("{what}.hook_scale");
                assert!(cache.get_by_name(&name).is_err(), "{model_type}: {name}");
                return;
            }
            let (scale, normalized) = (
                hook(&format!("{what}.hook_scale")),
                hook(&format!("{what}.hook_normalized")),
            );
            assert_eq!(
                scale.dims(),
                &[1, ids.dim(1).unwrap(), 1],
                "{model_type} {what}"
            );
            let centred = if norm.centers() {
                input
                    .broadcast_sub(&input.mean_keepdim(2).unwrap())
                    .unwrap()
            } else {
                input.clone()
            };
            let rescaled = normalized.broadcast_mul(&scale).unwrap();
            close(
                &format!("{what}.hook_normalized × hook_scale"),
                &rescaled,
                &centred,
            );
            let output = norm.forward(input, false).unwrap();
            close(
                &format!("{what} gain and bias on hook_normalized"),
                &norm.affine(&normalized).unwrap(),
                &output,
            );
        };
        for l in 0..layers {
            let pre = hook(&format!("blocks.{l}.hook_resid_pre"));
            close(&format!("blocks.{l}.hook_resid_pre"), &pre, &stream);
            let block = &model.transformer.blocks[l];
            norm_divides(&format!("blocks.{l}.ln1"), &block.ln_attn, &pre);
            let attn = hook(&format!("blocks.{l}.hook_attn_out"));
            // attn.hook_z is the output projection's input: attn_out = z·W_Oᵀ + b_O.
            let z = hook(&format!("blocks.{l}.attn.hook_z"));
            let dims = model.dims();
            assert_eq!(z.dims()[2], dims.n_heads * dims.head_dim, "{model_type}");
            let out_proj = &model.transformer.blocks[l].attn.out;
            let mut projected = z.broadcast_matmul(&out_proj.weight().t().unwrap()).unwrap();
            if let Some(b) = out_proj.bias() {
                projected = projected.broadcast_add(b).unwrap();
            }
            // Gemma 2 normalises the projection before it joins the stream.
            let written = |what: &str, norm: Option<&Norm>, out: &Tensor| match norm {
                Some(norm) => {
                    let raw = hook(&format!("blocks.{l}.{what}_post.hook_in"));
                    norm_divides(&format!("blocks.{l}.{what}_post"), norm, &raw);
                    close(
                        &format!("blocks.{l}.{what}_post on its hook_in"),
                        &norm.forward(&raw, false).unwrap(),
                        out,
                    );
                    raw
                }
                None => {
                    let name = format!("blocks.{l}.{what}_post.hook_in");
                    assert!(cache.get_by_name(&name).is_err(), "{model_type}: {name}");
                    out.clone()
                }
            };
            let post_norms = block.post_norms.as_ref();
            let raw_attn = written("ln1", post_norms.map(|(a, _)| a), &attn);
            close(&format!("blocks.{l}.attn.hook_z"), &projected, &raw_attn);
            let pattern = hook(&format!("blocks.{l}.attn.hook_pattern"));
            pattern_weights_the_values(model_type, &model, l, &pre, &pattern, &z, cache);
            let mlp = hook(&format!("blocks.{l}.hook_mlp_out"));
            let mid = (&pre + &attn).unwrap();
            match cache.get_by_name(&format!("blocks.{l}.hook_resid_mid")) {
                Ok(got) => {
                    close(&format!("blocks.{l}.hook_resid_mid"), got, &mid);
                    norm_divides(&format!("blocks.{l}.ln2"), &block.ln_mlp, &mid);
                }
                Err(_) => {
                    assert!(
                        block.parallel_residual,
                        "{model_type}: only a parallel residual skips it"
                    );
                    norm_divides(&format!("blocks.{l}.ln2"), &block.ln_mlp, &pre);
                }
            }
            stream = hook(&format!("blocks.{l}.hook_resid_post"));
            close(
                &format!("blocks.{l}.hook_resid_post"),
                &stream,
                &(mid + &mlp).unwrap(),
            );
            let post = hook(&format!("blocks.{l}.mlp.hook_post"));
            assert_eq!(post.dims()[2], model.dims().d_mlp, "{model_type}");
            // A gated MLP's up projection, read from the MLP norm's hooked output.
            let pre_linear = format!("blocks.{l}.mlp.hook_pre_linear");
            // The MLP's input: its norm's hooked output; the attention norm's where the two
            // share one (GPT-J); the stream itself where the block has no input norm (OLMo 2).
            let mlp_in = if block.shared_input_norm {
                let normalized = hook(&format!("blocks.{l}.ln1.hook_normalized"));
                block.ln_attn.affine(&normalized).unwrap()
            } else if block.ln_mlp.is_identity() {
                hook(&format!("blocks.{l}.hook_resid_mid"))
            } else {
                let normalized = hook(&format!("blocks.{l}.ln2.hook_normalized"));
                block.ln_mlp.affine(&normalized).unwrap()
            };
            let pre_act = hook(&format!("blocks.{l}.mlp.hook_pre"));
            let (first, first_hook) = match &block.mlp {
                Mlp::Gated { gate, .. } => (gate, "gate"),
                Mlp::Plain { fc, .. } => (fc, "fc"),
            };
            let mut want = mlp_in
                .broadcast_matmul(&first.weight().t().unwrap())
                .unwrap();
            if let Some(b) = first.bias() {
                want = want.broadcast_add(b).unwrap();
            }
            close(
                &format!("blocks.{l}.mlp.hook_pre ({first_hook})"),
                &pre_act,
                &want,
            );
            if let Mlp::Gated { up, .. } = &block.mlp {
                let x = &mlp_in;
                let mut want = x.broadcast_matmul(&up.weight().t().unwrap()).unwrap();
                if let Some(b) = up.bias() {
                    want = want.broadcast_add(b).unwrap();
                }
                close(&pre_linear, &hook(&pre_linear), &want);
            } else {
                assert!(cache.get_by_name(&pre_linear).is_err(), "{model_type}");
            }
            assert_eq!(pre_act.dims(), post.dims(), "{model_type}");
            // mlp.hook_post is the down projection's input.
            let down = block.mlp.down_proj();
            let mut projected = post.broadcast_matmul(&down.weight().t().unwrap()).unwrap();
            if let Some(b) = down.bias() {
                projected = projected.broadcast_add(b).unwrap();
            }
            let raw_mlp = written("ln2", post_norms.map(|(_, m)| m), &mlp);
            close(&format!("blocks.{l}.mlp.hook_post"), &projected, &raw_mlp);
        }
        norm_divides("ln_final", &model.transformer.ln_final, &stream);
        let normalized = hook("ln_final.hook_normalized");
        let logits = model
            .transformer
            .ln_final
            .affine(&normalized)
            .unwrap()
            .broadcast_matmul(&model.transformer.unembed.t().unwrap())
            .unwrap();
        let logits = match &model.transformer.unembed_bias {
            Some(b) => logits.broadcast_add(b).unwrap(),
            None => logits,
        };
        let logits = match model.transformer.logit_softcap {
            Some(cap) => ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap(),
            None => logits,
        };
        close("logits from ln_final.hook_normalized", &logits, &out.logits);
    }
}

/// A pattern's rows are probabilities over the keys at or before the query, and each head's
/// slice of `attn.hook_z` is its pattern times its value head (grouped heads share one), with
/// the values recomputed from the block's input through its norm and fused projection. The
/// `attn.hook_q`, `hook_k` and `hook_v` captures hold that projection's slices, the scores are
/// the scaled products of the (rotated, where the model is rotary) queries and keys, −∞ where
/// the mask hides a key, and the pattern is their softmax.
#[allow(clippy::too_many_arguments)]
fn pattern_weights_the_values(
    model_type: &str,
    model: &Model,
    layer: usize,
    resid_pre: &Tensor,
    pattern: &Tensor,
    z: &Tensor,
    cache: &monoscope::model::ActivationCache,
) {
    let block = &model.transformer.blocks[layer];
    let (nh, nkv, hd) = (
        block.attn.n_heads,
        block.attn.n_kv_heads,
        block.attn.head_dim,
    );
    let seq = resid_pre.dim(1).unwrap();
    assert_eq!(pattern.dims(), &[1, nh, seq, seq], "{model_type}");
    let rows = pattern.get(0).unwrap().to_vec3::<f64>().unwrap();
    for (h, head) in rows.iter().enumerate() {
        for (q, row) in head.iter().enumerate() {
            let sum: f64 = row.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-9,
                "{model_type} {layer}.{h} row {q} sums to {sum}"
            );
            assert!(
                row[q + 1..].iter().all(|&p| p == 0.0),
                "{model_type} {layer}.{h}: query {q} attends to a later key"
            );
        }
    }
    let x = block.ln_attn.forward(resid_pre, true).unwrap();
    let mut qkv = x
        .broadcast_matmul(&block.attn.qkv.weight().t().unwrap())
        .unwrap();
    if let Some(b) = block.attn.qkv.bias() {
        qkv = qkv.broadcast_add(b).unwrap();
    }
    let qkv = qkv.reshape((seq, nh + 2 * nkv, hd)).unwrap();
    let hook = |name: &str| {
        let name = format!("blocks.{layer}.attn.{name}");
        let value = cache.get_by_name(&name).unwrap().get(0).unwrap();
        value
            .reshape((seq, value.dim(1).unwrap() / hd, hd))
            .unwrap()
    };
    for (name, start, heads) in [
        ("hook_q", 0, nh),
        ("hook_k", nh, nkv),
        ("hook_v", nh + nkv, nkv),
    ] {
        let err = max_abs_diff(&hook(name), &qkv.narrow(1, start, heads).unwrap());
        assert!(
            err < 1e-9,
            "{model_type} blocks.{layer}.attn.{name} off by {err}"
        );
    }
    // Qwen3 and Gemma 3 normalise each query and key head (OLMo 2 all heads at once) before
    // the rotary embedding reads them.
    let normed = |name: &str, norm: &monoscope::model::layers::Norm| {
        let heads = hook(name); // [seq, heads, hd]
        let want = if block.attn.qk_norm_over_heads {
            // OLMo 2: one norm over every head's projection at once.
            let (s, h, d) = heads.dims3().unwrap();
            norm.forward(&heads.reshape((s, h * d)).unwrap(), true)
                .unwrap()
                .reshape((s, h, d))
                .unwrap()
        } else {
            norm.forward(&heads, true).unwrap()
        };
        let got = hook(&format!("{name}_normed"));
        let err = max_abs_diff(&got, &want);
        assert!(
            err < 1e-9,
            "{model_type} blocks.{layer}.attn.{name}_normed off by {err}"
        );
        got
    };
    // OLMo 1 clamps the projections after their hooks, before anything reads them.
    let clamped = |x: Tensor| match block.attn.clip_qkv {
        Some(clip) => x.clamp(-clip, clip).unwrap(),
        None => x,
    };
    let (q_in, k_in) = match &block.attn.qk_norm {
        Some((q_norm, k_norm)) => (normed("hook_q", q_norm), normed("hook_k", k_norm)),
        None => {
            let name = format!("blocks.{layer}.attn.hook_q_normed");
            assert!(cache.get_by_name(&name).is_err(), "{model_type}");
            (clamped(hook("hook_q")), clamped(hook("hook_k")))
        }
    };
    let (q, k) = match &block.attn.rotary {
        None => {
            assert!(
                cache
                    .get_by_name(&format!("blocks.{layer}.attn.hook_rot_q"))
                    .is_err()
            );
            (q_in, k_in)
        }
        Some(_) => {
            // A rotation: position 0 is unrotated, and every head vector keeps its length.
            for (plain, rotated_name) in [(&q_in, "hook_rot_q"), (&k_in, "hook_rot_k")] {
                let (plain, rotated) = (plain.clone(), hook(rotated_name));
                let what = format!("{model_type} blocks.{layer}.attn.{rotated_name}");
                let err = max_abs_diff(&plain.get(0).unwrap(), &rotated.get(0).unwrap());
                assert!(err < 1e-9, "{what}: position 0 was rotated by {err}");
                // The rotary tables are f32 (as in transformers) whatever the run dtype.
                let norms = |t: &Tensor| t.sqr().unwrap().sum(2).unwrap();
                let err = common::max_relative_error(&norms(&rotated), &norms(&plain));
                assert!(
                    err < 1e-6,
                    "{what}: rotation changed a norm by {err} (relative)"
                );
                let moved = max_abs_diff(&plain, &rotated);
                assert!(moved > 1e-3, "{what}: the same as before the rotation");
            }
            (hook("hook_rot_q"), hook("hook_rot_k"))
        }
    };
    let window = block.attn.sliding_window.unwrap_or(usize::MAX);
    let hooked_scores = cache
        .get_by_name(&format!("blocks.{layer}.attn.hook_attn_scores"))
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    assert_eq!(hooked_scores.len(), nh, "{model_type}");
    for (h, hooked_head) in hooked_scores.iter().enumerate() {
        let kv_head = h / (nh / nkv);
        let scores = q
            .i((.., h, ..))
            .unwrap()
            .matmul(&k.i((.., kv_head, ..)).unwrap().t().unwrap())
            .unwrap()
            .affine(block.attn.scale, 0.0)
            .unwrap();
        // Gemma 2 bends the scores into (−cap, cap), TransformerLens's `attn_scores_soft_cap`.
        let scores = match block.attn.softcap {
            Some(cap) => ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap(),
            None => scores,
        }
        .to_vec2::<f64>()
        .unwrap();
        for (query, row) in scores.iter().enumerate() {
            let visible = |key: usize| key <= query && query - key < window;
            let max = (0..seq)
                .filter(|&j| visible(j))
                .map(|j| row[j])
                .fold(f64::MIN, f64::max);
            let total: f64 = (0..seq)
                .filter(|&j| visible(j))
                .map(|j| (row[j] - max).exp())
                .sum();
            for (key, &score) in row.iter().enumerate() {
                let hooked = hooked_head[query][key];
                let what = format!("{model_type} head {layer}.{h}, query {query} key {key}");
                if visible(key) {
                    assert!(
                        (hooked - score).abs() < 1e-9,
                        "{what}: score {hooked}, not {score}"
                    );
                } else {
                    assert_eq!(hooked, f64::NEG_INFINITY, "{what}: a hidden key's score");
                }
                let expected = if visible(key) {
                    (score - max).exp() / total
                } else {
                    0.0
                };
                let got = pattern
                    .i((0, h, query, key))
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    (got - expected).abs() < 1e-9,
                    "{model_type} head {layer}.{h}, query {query} key {key}: pattern {got}, \
                     softmax of the hooked queries and keys {expected}"
                );
            }
        }
    }
    for h in 0..nh {
        let kv_head = h / (nh / nkv);
        let v = clamped(qkv.i((.., nh + nkv + kv_head, ..)).unwrap());
        let expected = pattern.i((0, h)).unwrap().matmul(&v).unwrap();
        let got = z.i((0, .., h * hd..(h + 1) * hd)).unwrap();
        let err = max_abs_diff(&expected, &got);
        assert!(err < 1e-9, "{model_type} head {layer}.{h}: z off by {err}");
    }
}
