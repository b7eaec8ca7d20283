//! Knowledge neurons on real (tiny) models: integrated gradients satisfy completeness on
//! every layer of every supported architecture (plain and gated MLPs), and suppress/amplify
//! touch exactly the chosen neurons at the last token.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use candle_core::{DType, Device};
use common::fixture_dir;
use monoscope::Model;
use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp};
use monoscope::neurons::{Neuron, attribute, scale_neurons};

fn p_target(model: &Model, ids: &[u32], target: u32, hooks: &Hooks) -> f32 {
    let logits = model
        .forward(&model.ids_tensor(ids).unwrap(), hooks)
        .unwrap()
        .logits;
    let last = logits.get(0).unwrap().get(ids.len() - 1).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&last.unsqueeze(0).unwrap()).unwrap();
    probs
        .get(0)
        .unwrap()
        .get(target as usize)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn attributions_sum_to_the_probability_they_explain() {
    for &model_type in common::MODEL_TYPES {
        let model = Model::load(&fixture_dir(model_type), &Device::Cpu, DType::F32).unwrap();
        let ids = model
            .encode_prompt("the river flows past the town")
            .unwrap();
        // The model's own most likely next token, so P(target) is not tiny.
        let target = monoscope::model::generate::next_token_top_k(&model, &ids, 1, &Hooks::new())
            .unwrap()[0]
            .id;
        let attr = attribute(&model, &ids, target, 64).unwrap();
        assert_eq!(attr.len(), model.dims().n_layers);
        let p_clean = p_target(&model, &ids, target, &Hooks::new());
        for (layer, a) in attr.iter().enumerate() {
            assert_eq!(a.len(), model.dims().d_mlp);
            let zeroed = Hooks::new().intervene(
                HookPoint::MlpPost(layer),
                Intervention::new(InterventionOp::Zero).at_positions(vec![-1]),
            );
            let delta = p_clean - p_target(&model, &ids, target, &zeroed);
            let sum: f32 = a.iter().sum();
            assert!(
                (sum - delta).abs() <= 0.02 * delta.abs() + 1e-5,
                "{model_type} layer {layer}: attributions sum to {sum}, P(a) − P(0) = {delta}"
            );
        }
    }
}

#[test]
fn suppress_and_amplify_touch_only_the_chosen_neurons_at_the_last_token() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let ids = model.encode_prompt("the river flows").unwrap();
    let input = model.ids_tensor(&ids).unwrap();
    let point = HookPoint::MlpPost(1);
    let clean = model
        .forward(&input, &Hooks::new().capture([point]))
        .unwrap();
    let clean = clean.cache.get(point).unwrap().to_vec3::<f32>().unwrap();
    let neurons = [3usize, 40].map(|neuron| Neuron {
        layer: 1,
        neuron,
        attribution: 1.0,
        shared_by: 1.0,
    });
    for factor in [0.0f32, 2.0] {
        let hooks = scale_neurons(&neurons, f64::from(factor)).capture([point]);
        let out = model.forward(&input, &hooks).unwrap();
        let got = out.cache.get(point).unwrap().to_vec3::<f32>().unwrap();
        let last = ids.len() - 1;
        for (t, (g, c)) in got[0].iter().zip(&clean[0]).enumerate() {
            for (i, (gv, cv)) in g.iter().zip(c).enumerate() {
                let want = if t == last && (i == 3 || i == 40) {
                    cv * factor
                } else {
                    *cv
                };
                assert!((gv - want).abs() < 1e-6, "position {t} neuron {i}");
            }
        }
    }
}

#[test]
fn key_contexts_are_the_neurons_strongest_activations() {
    use monoscope::neurons::key_contexts;
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, docs) = common::river_corpus(tmp.path(), 12);
    let neurons = [(1usize, 5usize), (0, 17), (1, 200)].map(|(layer, neuron)| Neuron {
        layer,
        neuron,
        attribution: 1.0,
        shared_by: 1.0,
    });
    let contexts = key_contexts(&model, &neurons, &corpus, 1_000_000, 3).unwrap();
    assert_eq!(contexts.len(), neurons.len());
    let mut fired = 0;
    for (n, found) in neurons.iter().zip(&contexts) {
        // Brute force: every positive activation of the neuron over the documents.
        let point = HookPoint::MlpPost(n.layer);
        let mut all = Vec::new();
        for doc in &docs {
            let mut ids = vec![model.bos_token_id.unwrap()];
            ids.extend(model.tokenizer.encode(doc).unwrap());
            let out = model
                .forward(
                    &model.ids_tensor(&ids).unwrap(),
                    &Hooks::new().capture([point]),
                )
                .unwrap();
            let acts = out.cache.get(point).unwrap().to_vec3::<f32>().unwrap();
            all.extend(
                acts[0][1..]
                    .iter()
                    .map(|row| row[n.neuron])
                    .filter(|&v| v > 0.0),
            );
        }
        all.sort_by(|a, b| b.total_cmp(a));
        fired += usize::from(!all.is_empty());
        let got: Vec<f32> = found.iter().map(|c| c.activation).collect();
        assert_eq!(got.len(), all.len().min(3), "{n:?}");
        for (g, w) in got.iter().zip(&all) {
            assert!((g - w).abs() < 1e-5, "{n:?}: {g} vs {w}");
        }
    }
    assert!(fired > 0, "no neuron fired: the comparison checked nothing");
}
