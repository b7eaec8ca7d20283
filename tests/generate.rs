//! Generation behaviour beyond greedy agreement (which tests/oracle.rs checks): sampling is
//! reproducible by seed, EOS and the token budget stop it, hooks steer it.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use candle_core::{DType, Device};
use common::fixture_dir;
use monoscope::model::generate::{GenerateOptions, Sampling, StopReason, generate};
use monoscope::model::{HookPoint, Hooks, Intervention, InterventionOp, Model};

fn model() -> Model {
    Model::load(&fixture_dir("llama"), &Device::Cpu, DType::F32).unwrap()
}

fn sampled(seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 1.3,
            top_k: 50,
            top_p: 0.95,
            seed,
        },
        top_k_probs: 0,
        stop_at_eos: false,
    }
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let model = model();
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let run = |seed| {
        generate(&model, &ids, &sampled(seed), &Hooks::new())
            .unwrap()
            .new_ids()
    };
    assert_eq!(run(1), run(1));
    let distinct: std::collections::HashSet<Vec<u32>> = (0..4).map(run).collect();
    assert!(
        distinct.len() > 1,
        "different seeds should give different samples"
    );
}

#[test]
fn generation_stops_at_eos_and_at_the_budget() {
    let mut model = model();
    let ids = model.encode_prompt("日本の首都は").unwrap();
    let options = GenerateOptions {
        max_new_tokens: 5,
        stop_at_eos: true,
        ..Default::default()
    };
    let free = generate(&model, &ids, &options, &Hooks::new()).unwrap();
    assert_eq!(free.steps.len(), 5);
    assert_eq!(free.stop_reason, StopReason::MaxTokens);
    // Declare the second greedy token the end-of-sequence token: generation must stop there.
    model.eos_token_ids = vec![free.steps[1].id];
    let stopped = generate(&model, &ids, &options, &Hooks::new()).unwrap();
    assert_eq!(stopped.new_ids(), free.new_ids()[..2]);
    assert_eq!(stopped.stop_reason, StopReason::Eos);
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let model = model();
    let ids = vec![5u32; model.dims().context_length - 2];
    let options = GenerateOptions {
        max_new_tokens: 10,
        stop_at_eos: false,
        ..Default::default()
    };
    let generation = generate(&model, &ids, &options, &Hooks::new()).unwrap();
    assert_eq!(generation.steps.len(), 3);
    assert_eq!(generation.stop_reason, StopReason::ContextFull);
}

#[test]
fn a_steering_hook_changes_every_generated_step() {
    let model = model();
    let ids = model.encode_prompt("Hello world").unwrap();
    let options = GenerateOptions {
        max_new_tokens: 6,
        stop_at_eos: false,
        ..Default::default()
    };
    let plain = generate(&model, &ids, &options, &Hooks::new()).unwrap();
    // Push the last layer's output towards one token's unembedding direction.
    let target = 123usize;
    let direction = model.transformer.unembed.get(target).unwrap();
    let steer = (direction * 50.0).unwrap();
    let hooks = Hooks::new().intervene(
        HookPoint::LnFinal,
        Intervention::new(InterventionOp::Add(steer)),
    );
    let steered = generate(&model, &ids, &options, &hooks).unwrap();
    assert_ne!(plain.new_ids(), steered.new_ids());
    assert!(
        steered.new_ids().iter().all(|&id| id == target as u32),
        "{:?}",
        steered.new_ids()
    );
}
