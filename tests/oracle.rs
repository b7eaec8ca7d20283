//! Every architecture against Hugging Face transformers: token ids, logits, per-layer
//! `mlp.hook_post`, `hook_mlp_out`, `hook_resid_post`, `attn.hook_pattern`, and greedy
//! continuations, on the tiny models that tests/fixtures/make_fixtures.py built (f32, max
//! relative error ≤ 1e-4).

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use candle_core::{DType, Device, Tensor};
use common::{MODEL_TYPES, fixture_dir, max_relative_error, reference};
use monoscope::model::generate::{GenerateOptions, generate};
use monoscope::model::{HookPoint, Hooks, Model};

const TOLERANCE: f32 = 1e-4;

fn check_against_transformers(model_type: &str, device: &Device) {
    let model = Model::load(&fixture_dir(model_type), device, DType::F32).unwrap();
    let (reference, tensors) = reference(model_type);
    assert_eq!(model.dims().n_layers, reference.num_layers);
    assert_eq!(
        model.transformer.parameter_count(),
        reference.num_parameters,
        "{model_type}: parameter count"
    );
    let layers = 0..reference.num_layers;
    let points: Vec<HookPoint> = layers
        .clone()
        .flat_map(|l| {
            [
                HookPoint::MlpPost(l),
                HookPoint::MlpOut(l),
                HookPoint::ResidPost(l),
            ]
        })
        .collect();
    let pattern_points: Vec<HookPoint> = layers.clone().map(HookPoint::AttnPattern).collect();
    for (i, p) in reference.prompts.iter().enumerate() {
        let ids = model.encode_prompt(&p.prompt).unwrap();
        assert_eq!(
            ids, p.input_ids,
            "{model_type}: token ids of {:?}",
            p.prompt
        );
        let mut worst = 0f32;
        let mut check = |key: String, got: &Tensor| {
            let err = max_relative_error(got, &tensors[&key]);
            assert!(
                err <= TOLERANCE,
                "{model_type} {key}: max relative error {err}"
            );
            worst = worst.max(err);
        };
        // Two passes: the hooks beside the fast path's logits, then the attention patterns,
        // whose capture runs attention unfused.
        for (pass, captured) in [&points, &pattern_points].into_iter().enumerate() {
            let out = model
                .forward(
                    &model.ids_tensor(&ids).unwrap(),
                    &Hooks::new().capture(captured.iter().copied()),
                )
                .unwrap();
            if pass == 0 {
                check(format!("p{i}.logits"), &out.logits.get(0).unwrap());
            }
            for point in captured {
                let got = out.cache.get(*point).unwrap().get(0).unwrap();
                check(format!("p{i}.{point}"), &got);
            }
        }
        let options = GenerateOptions {
            max_new_tokens: p.greedy_ids.len(),
            stop_at_eos: false,
            ..Default::default()
        };
        let generation = generate(&model, &ids, &options, &Hooks::new()).unwrap();
        assert_eq!(
            generation.new_ids(),
            p.greedy_ids,
            "{model_type}: greedy continuation of {:?}",
            p.prompt
        );
        println!("{model_type} prompt {i}: max relative error {worst:.2e}");
    }
}

#[test]
fn gpt2_matches_transformers() {
    check_against_transformers("gpt2", &Device::Cpu);
}

#[test]
fn gpt_neox_matches_transformers() {
    check_against_transformers("gpt_neox", &Device::Cpu);
}

/// Unscaled attention scores and a local (windowed) layer after a global one.
#[test]
fn gpt_neo_matches_transformers() {
    check_against_transformers("gpt_neo", &Device::Cpu);
}

/// One norm feeding attention and the MLP in parallel, interleaved partial rotary, and an
/// `lm_head` bias.
#[test]
fn gptj_matches_transformers() {
    check_against_transformers("gptj", &Device::Cpu);
}

#[test]
fn llama_sharded_matches_transformers() {
    check_against_transformers("llama", &Device::Cpu);
}

/// Llama 3.1's rope scaling, its rotary wavelengths in all three of the scaling's bands.
#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_against_transformers("llama3", &Device::Cpu);
}

/// YaRN: a ramp between kept and divided frequencies, and cos and sin scaled.
#[test]
fn llama_yarn_rope_scaling_matches_transformers() {
    check_against_transformers("llama_yarn", &Device::Cpu);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check_against_transformers("mistral", &Device::Cpu);
}

#[test]
fn qwen2_matches_transformers() {
    check_against_transformers("qwen2", &Device::Cpu);
}

/// Per-head query and key RMSNorms before the rotary embedding.
#[test]
fn qwen3_matches_transformers() {
    check_against_transformers("qwen3", &Device::Cpu);
}

#[test]
fn gemma_matches_transformers() {
    check_against_transformers("gemma", &Device::Cpu);
}

/// Sandwich norms, soft-capped scores and logits, `query_pre_attn_scalar`, and a sliding
/// window on the first layer only.
#[test]
fn gemma2_matches_transformers() {
    check_against_transformers("gemma2", &Device::Cpu);
}

/// Per-head (1+w) query and key norms, and a rotary base (and scaling) per layer type.
#[test]
fn gemma3_text_matches_transformers() {
    check_against_transformers("gemma3_text", &Device::Cpu);
}

/// Gemma 3 4B–27B's checkpoints: the language model of a multimodal Gemma3ForConditionalGeneration
/// (vision tower left out), its text_config as sparse as the Hub's (Gemma3TextConfig's defaults
/// for the rest, the global layers' scaling as `rope_scaling`).
#[test]
fn gemma3_multimodal_language_model_matches_transformers() {
    check_against_transformers("gemma3", &Device::Cpu);
}

/// OLMo 1: LayerNorms without gain or bias, and q, k and v clamped.
#[test]
fn olmo_matches_transformers() {
    check_against_transformers("olmo", &Device::Cpu);
}

/// No input norms, norms after each sublayer, and query and key norms over all heads at once.
#[test]
fn olmo2_matches_transformers() {
    check_against_transformers("olmo2", &Device::Cpu);
}

/// Fused qkv and gate-up projections, partial rotary, a window on every layer.
/// Phi-2: one norm feeding attention and the MLP in parallel, biased projections, a quarter
/// of each head rotating, per-head query and key LayerNorms, an `lm_head` bias.
#[test]
fn phi_matches_transformers() {
    check_against_transformers("phi", &Device::Cpu);
}

#[test]
fn phi3_matches_transformers() {
    check_against_transformers("phi3", &Device::Cpu);
}

/// SmolLM3: a layer without any rotary embedding (NoPE) after a rotary one, windowed.
#[test]
fn smollm3_matches_transformers() {
    check_against_transformers("smollm3", &Device::Cpu);
}

/// LongRoPE: short-context factors for the 5-token prompts, long ones for the longer prompts,
/// and the greedy continuations cross from one to the other.
#[test]
fn phi3_longrope_matches_transformers() {
    check_against_transformers("phi3_longrope", &Device::Cpu);
}

/// Every step of a cached generation that crosses LongRoPE's switch (8 positions here) sees
/// what a fresh pass over the whole sequence sees: the crossing step re-reads the sequence
/// rather than reuse keys rotated by the short-context frequencies.
#[test]
fn longrope_generation_matches_fresh_passes_across_the_switch() {
    let model = Model::load(&fixture_dir("phi3_longrope"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.transformer.rope_switch_length(), Some(8));
    let prompt = model.encode_prompt("The capital of Japan is").unwrap();
    assert!(prompt.len() < 8);
    let options = GenerateOptions {
        max_new_tokens: 12 - prompt.len(),
        stop_at_eos: false,
        ..Default::default()
    };
    let generation = generate(&model, &prompt, &options, &Hooks::new()).unwrap();
    let mut ids = prompt.clone();
    for step in &generation.steps {
        let logits = model
            .forward(&model.ids_tensor(&ids).unwrap(), &Hooks::new())
            .unwrap()
            .logits
            .get(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let fresh = monoscope::model::generate::top_tokens(&model, &logits, 1);
        assert_eq!(fresh[0].id, step.id, "greedy step at length {}", ids.len());
        assert!(
            (fresh[0].prob - step.prob).abs() < 1e-5,
            "length {}: fresh {} cached {}",
            ids.len(),
            fresh[0].prob,
            step.prob
        );
        ids.push(step.id);
    }
}

/// OLMo 2 with sliding windows on three of four layers and a rotary base per layer type.
#[test]
fn olmo3_matches_transformers() {
    check_against_transformers("olmo3", &Device::Cpu);
}

/// Runs the same checks on a CUDA GPU when the build has one (`--features cuda`).
#[test]
fn all_architectures_match_transformers_on_cuda() {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("no CUDA in this build: skipped");
        return;
    }
    let device = Device::new_cuda(0).unwrap();
    for model_type in MODEL_TYPES {
        check_against_transformers(model_type, &device);
    }
}
