//! SAE folders as dictionary_learning saves them (`ae.pt` and `config.json`, SAEBench's
//! layout; `scripts/dictionary_learning_fixtures.py` on the GPT-2 fixture), one per dictionary
//! class, load at the hook their config names and give the encodings and reconstructions of
//! dictionary_learning's own classes on the activations transformers computes there. A gated
//! autoencoder, a missing k and a file that is not a state_dict are refused by name.

#![allow(clippy::unwrap_used)] // tests and benches may panic on failure

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::fixture_dir;
use monoscope::model::Model;
use monoscope::sae::{self, Architecture};

fn trainer_dir(n: usize) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dictionary_learning/gpt2-tiny_resid_post_layer_1")
        .join(format!("trainer_{n}"))
}

fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn every_dictionary_class_loads_and_matches_dictionary_learning() {
    let model = Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap();
    let cases = [
        ("AutoEncoder", Architecture::Standard, true),
        ("JumpReluAutoEncoder", Architecture::JumpRelu, false),
        ("AutoEncoderTopK", Architecture::TopK { k: 12 }, true),
        ("BatchTopKSAE", Architecture::BatchTopK { k: 12 }, true),
        (
            "MatryoshkaBatchTopKSAE",
            Architecture::BatchTopK { k: 12 },
            true,
        ),
    ];
    for (n, (class, architecture, subtracts_b_dec)) in cases.into_iter().enumerate() {
        let dir = trainer_dir(n);
        let (sae_dir, point) = sae::load_for_model(&dir, None, &model, &Device::Cpu).unwrap();
        assert_eq!(point.to_string(), "blocks.1.hook_resid_post", "{class}");
        let sae = &sae_dir.sae;
        assert_eq!(sae.architecture, architecture, "{class}");
        assert_eq!(sae.apply_b_dec_to_input, subtracts_b_dec, "{class}");
        assert_eq!(sae_dir.metadata.context_size, 128, "{class}");
        common::check_sae_against_reference(&model, sae, point, &io(&dir), class);
    }
}

#[test]
fn folders_dictionary_learning_cannot_be_read_from_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let error = |dir: &Path| {
        sae::load(dir, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string()
    };
    let copy = |from: usize, to: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = tmp.path().join(to);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(trainer_dir(from).join("ae.pt"), dir.join("ae.pt")).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(trainer_dir(from).join("config.json")).unwrap())
                .unwrap();
        edit(&mut config);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dir
    };
    let gated = copy(0, "gated", &|c| {
        c["trainer"]["dict_class"] = "GatedAutoEncoder".into()
    });
    let e = error(&gated);
    assert!(
        e.contains("config.json") && e.contains("trainer.dict_class") && e.contains("Gated"),
        "{e}"
    );
    let no_k = copy(2, "no-k", &|c| {
        c["trainer"].as_object_mut().unwrap().remove("k");
    });
    let e = error(&no_k);
    assert!(
        e.contains("trainer.k") && e.contains("AutoEncoderTopK"),
        "{e}"
    );
    // Two folders with one config and other weights are two SAEs to the caches.
    let same_config = copy(0, "same-config", &|_| {});
    std::fs::copy(trainer_dir(1).join("ae.pt"), same_config.join("ae.pt")).unwrap();
    let hash = |dir: &Path| monoscope::table::sae_hash(dir).unwrap();
    assert_ne!(hash(&same_config), hash(&trainer_dir(0)));
    let not_torch = copy(0, "not-torch", &|_| {});
    std::fs::write(not_torch.join("ae.pt"), b"not a zip").unwrap();
    let e = error(&not_torch);
    assert!(e.contains("ae.pt") && e.contains("state_dict"), "{e}");
}
