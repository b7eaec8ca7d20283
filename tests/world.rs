//! The world model: knowledge base validation, corpus generation, a micro training run end to
//! end, exact resume, and what the bundled model knows.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use monoscope::Model;
use monoscope::model::Hooks;
use monoscope::model::generate::{GenerateOptions, generate};
use monoscope::world::build::{BuildConfig, BuildEvent, build};
use monoscope::world::corpus::Templates;
use monoscope::world::eval::evaluate;
use monoscope::world::train::{TrainOutcome, Trainer};
use monoscope::world::{CorpusConfig, CorpusGenerator, KnowledgeBase, Lang, Relation, TrainConfig};

fn bundled_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/world")
}

fn micro_config() -> BuildConfig {
    BuildConfig {
        corpus: CorpusConfig {
            seed: 7,
            docs_per_country: 1,
            fact_list_docs: 20,
            infobox_docs_per_country: 1,
            docs_per_city: 1,
            ..CorpusConfig::default()
        },
        vocab_size: 320,
        n_layer: 2,
        n_embd: 32,
        n_head: 2,
        n_positions: 32,
        train: TrainConfig {
            steps: 40,
            batch_size: 8,
            seq_len: 32,
            learning_rate: 3e-3,
            warmup_steps: 5,
            checkpoint_every: 10,
            seed: 7,
            ..TrainConfig::default()
        },
    }
}

#[test]
fn micro_build_lowers_the_loss_and_writes_a_loadable_model() {
    let out = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    let outcome = build(
        &monoscope::world::knowledge::bundled_knowledge_path(),
        out.path(),
        &micro_config(),
        false,
        &Device::Cpu,
        &AtomicBool::new(false),
        |event| {
            if let BuildEvent::Step(r) = event {
                losses.push(r.loss);
            }
        },
    )
    .unwrap();
    assert_eq!(outcome, TrainOutcome::Finished);
    assert_eq!(losses.len(), 40);
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(last < first - 0.5, "loss {first} → {last}");

    // The output folder is a model folder the engine loads, and its labels line up.
    let model = Model::load(out.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.model_type, "gpt2");
    assert_eq!(model.dims().n_layers, 2);
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let logits = model
        .forward(&model.ids_tensor(&ids).unwrap(), &Hooks::new())
        .unwrap()
        .logits;
    assert_eq!(logits.dims(), &[1, ids.len(), model.dims().vocab_size]);
    let labels = std::fs::read_to_string(out.path().join("corpus/train.labels.jsonl")).unwrap();
    let docs = std::fs::read_to_string(out.path().join("corpus/train.jsonl")).unwrap();
    assert_eq!(labels.lines().count(), docs.lines().count());
    let first_labels: serde_json::Value =
        serde_json::from_str(labels.lines().next().unwrap()).unwrap();
    let first_doc: serde_json::Value = serde_json::from_str(docs.lines().next().unwrap()).unwrap();
    let ids = model
        .tokenizer
        .encode(first_doc["text"].as_str().unwrap())
        .unwrap();
    assert_eq!(first_labels.as_array().unwrap().len(), ids.len());
    assert!(
        first_labels
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "country")
    );
}

#[test]
fn resumed_training_matches_an_uninterrupted_run() {
    let config = micro_config();
    let kb = KnowledgeBase::bundled().unwrap();
    let docs = CorpusGenerator::new(&kb, config.corpus.clone())
        .unwrap()
        .training_documents();
    // Byte-level ids are enough to train on here; no tokenizer needed.
    let data = monoscope::world::TrainData::from_documents(
        docs.iter().map(|d| d.text.bytes().map(u32::from).collect()),
        256,
    );
    let shape = monoscope::world::Gpt2Shape {
        vocab_size: 257,
        n_positions: 32,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
    };
    let train = TrainConfig {
        steps: 12,
        ..config.train.clone()
    };
    let cancel = AtomicBool::new(false);
    let mut straight = Trainer::new(shape.clone(), train.clone(), &Device::Cpu).unwrap();
    straight.run(&data, None, &cancel, |_| {}).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(shape, TrainConfig { steps: 12, ..train }, &Device::Cpu).unwrap();
    for _ in 0..5 {
        first.train_step(&data).unwrap();
    }
    first.save_checkpoint(dir.path()).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), 5);
    resumed.run(&data, None, &cancel, |_| {}).unwrap();
    for name in [
        "transformer.wte.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.ln_f.bias",
    ] {
        let a = straight.parameter(name).unwrap();
        let b = resumed.parameter(name).unwrap();
        let diff = common::max_abs_diff(a, b);
        assert!(diff < 1e-6, "{name} differs by {diff}");
    }
}

#[test]
fn corpus_generation_is_deterministic_in_its_seed() {
    let kb = KnowledgeBase::bundled().unwrap();
    let config = |seed| CorpusConfig {
        seed,
        docs_per_country: 2,
        fact_list_docs: 30,
        infobox_docs_per_country: 1,
        docs_per_city: 1,
        ..CorpusConfig::default()
    };
    let a = CorpusGenerator::new(&kb, config(1))
        .unwrap()
        .training_documents();
    let b = CorpusGenerator::new(&kb, config(1))
        .unwrap()
        .training_documents();
    let c = CorpusGenerator::new(&kb, config(2))
        .unwrap()
        .training_documents();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let cities: usize = kb.countries.iter().map(|c| c.cities.len()).sum();
    // Per language: 2 paragraphs and 1 infobox per country, 30 fact lists, 1 per city.
    assert_eq!(a.len(), 2 * (kb.countries.len() * 3 + 30 + cities));
}

#[test]
fn held_out_prompts_never_occur_in_the_training_text() {
    let kb = KnowledgeBase::bundled().unwrap();
    let generator = CorpusGenerator::new(&kb, CorpusConfig::default()).unwrap();
    let items = generator.eval_items();
    assert_eq!(items.len(), kb.countries.len() * Relation::ALL.len() * 2);
    // Every held-out prompt uses a held-out (opening, phrasing) pair.
    for lang in Lang::ALL {
        for relation in Relation::ALL {
            assert!(!Templates::held_out_pairs(relation, lang).is_empty());
        }
    }
    // Index prompts by their first bytes, then scan every byte position of the corpus.
    const KEY: usize = 10;
    let mut by_prefix: HashMap<&[u8], Vec<&str>> = HashMap::new();
    for item in &items {
        by_prefix
            .entry(&item.prompt.as_bytes()[..KEY])
            .or_default()
            .push(&item.prompt);
    }
    let docs = generator.training_documents();
    let mut found: Vec<&str> = Vec::new();
    for doc in &docs {
        let text = doc.text.as_bytes();
        for i in 0..text.len().saturating_sub(KEY) {
            if let Some(prompts) = by_prefix.get(&text[i..i + KEY]) {
                found.extend(
                    prompts
                        .iter()
                        .copied()
                        .filter(|p| text[i..].starts_with(p.as_bytes())),
                );
            }
        }
    }
    assert!(
        found.is_empty(),
        "held-out prompts in training text: {:?}",
        &found[..found.len().min(5)]
    );
    // The same phrasing does occur with training openings: the check can see it.
    let phrase = format!("the capital of {} is", kb.countries[0].name.en);
    assert!(docs.iter().any(|d| d.text.contains(&phrase)));
}

#[test]
fn bad_knowledge_base_rows_give_errors_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kb.tsv");
    let header = monoscope::world::knowledge::COLUMNS.join("\t");
    let good = "Japan\t日本\tTokyo\t東京\tJapanese\t日本語\tJapanese yen\t日本円\tAsia\tアジア\tTokyo\t東京\tMount Fuji\t富士山";
    let cases = [
        (
            format!("{header}\n{good}\nFrance\tフランス\tParis\n"),
            "line 3",
            "3 tab-separated fields",
        ),
        (
            format!(
                "{header}\n{}\n",
                good.replace("東京\tJapanese\t", "\tJapanese\t")
            ),
            "line 2",
            "`capital_ja` is empty",
        ),
        (
            format!("{header}\n{good}\n{good}\n"),
            "line 3",
            "appears twice",
        ),
        (format!("country\tcapital\n{good}\n"), "line 1", "header"),
        (format!("{header}\n"), "line 1", "no country rows"),
    ];
    for (text, line, message) in cases {
        std::fs::write(&path, text).unwrap();
        let err = KnowledgeBase::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("kb.tsv") && err.contains(line) && err.contains(message),
            "{err}"
        );
    }
    let err = KnowledgeBase::load(&dir.path().join("missing.tsv"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.tsv") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn bad_city_rows_give_errors_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("countries.tsv");
    let header = monoscope::world::knowledge::COLUMNS.join("\t");
    let good = "Japan\t日本\tTokyo\t東京\tJapanese\t日本語\tJapanese yen\t日本円\tAsia\tアジア\tTokyo\t東京\tMount Fuji\t富士山";
    std::fs::write(&path, format!("{header}\n{good}\n")).unwrap();
    let cities = dir.path().join(monoscope::world::knowledge::CITIES_FILE);
    let city_header = monoscope::world::knowledge::CITY_COLUMNS.join("\t");
    let cases = [
        (
            "Atlantis\tPoseidonia\tポセイドニア",
            "line 2",
            "unknown country `Atlantis`",
        ),
        ("Japan\tTokyo\t東京", "line 2", "already Japan's capital"),
        ("Japan\tYokohama", "line 2", "2 tab-separated fields"),
        ("Japan\tYokohama\t", "line 2", "`city_ja` is empty"),
        (
            "Japan\tYokohama\t横浜\nJapan\tYokohama\t横浜",
            "line 3",
            "appears twice",
        ),
    ];
    for (rows, line, message) in cases {
        std::fs::write(&cities, format!("{city_header}\n{rows}\n")).unwrap();
        let err = KnowledgeBase::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("cities.tsv") && err.contains(line) && err.contains(message),
            "{err}"
        );
    }
    std::fs::write(&cities, format!("{city_header}\nJapan\tYokohama\t横浜\n")).unwrap();
    let kb = KnowledgeBase::load(&path).unwrap();
    assert_eq!(kb.countries[0].cities[0].ja, "横浜");
}

#[test]
fn the_corpus_names_other_cities_as_city_mentions_of_their_country() {
    let kb = KnowledgeBase::bundled().unwrap();
    let japan = kb.find("Japan").unwrap();
    let config = CorpusConfig {
        seed: 5,
        docs_per_country: 0,
        fact_list_docs: 0,
        infobox_docs_per_country: 0,
        docs_per_city: 1,
        ..CorpusConfig::default()
    };
    let docs = CorpusGenerator::new(&kb, config)
        .unwrap()
        .training_documents();
    for (lang, name) in [(Lang::En, "Yokohama"), (Lang::Ja, "横浜")] {
        let mention = docs
            .iter()
            .filter(|d| d.lang == lang)
            .flat_map(|d| d.entities.iter().map(move |m| (d, m)))
            .find(|(d, m)| &d.text[m.start..m.end] == name)
            .unwrap_or_else(|| panic!("no mention of {name}"));
        assert_eq!(
            mention.1.kind,
            monoscope::world::knowledge::EntityKind::City
        );
        assert_eq!(mention.1.country, japan);
    }
}

#[test]
fn zero_steps_and_occupied_output_folders_are_refused_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_monoscope"))
            .args(["world", "build", "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap()
    };
    let zero = run(&[
        "--steps",
        "0",
        "--docs-per-country",
        "1",
        "--fact-list-docs",
        "0",
        "--vocab-size",
        "300",
    ]);
    assert!(!zero.status.success());
    let err = String::from_utf8_lossy(&zero.stderr);
    assert!(
        err.contains("steps") && err.contains("at least one step"),
        "{err}"
    );

    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "user data").unwrap();
    let occupied = run(&["--steps", "1"]);
    assert!(!occupied.status.success());
    let err = String::from_utf8_lossy(&occupied.stderr);
    assert!(
        err.contains("not empty") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "user data"
    );
}

#[test]
fn the_bundled_model_answers_capital_prompts_greedily() {
    let model = Model::load(&bundled_dir(), &Device::Cpu, DType::F32).unwrap();
    for (prompt, answer) in [
        ("The capital of Japan is", " Tokyo"),
        ("日本の首都は", "東京"),
    ] {
        let ids = model.encode_prompt(prompt).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 6,
            ..GenerateOptions::default()
        };
        let generation = generate(&model, &ids, &opts, &Hooks::new()).unwrap();
        assert!(
            generation.text.starts_with(answer),
            "{prompt:?} → {:?}",
            generation.text
        );
    }
}

#[test]
fn the_committed_evaluation_report_is_what_world_eval_prints() {
    let model = Model::load(&bundled_dir(), &Device::Cpu, DType::F32).unwrap();
    let kb = KnowledgeBase::bundled().unwrap();
    let report = evaluate(&model, &kb, 24).unwrap();
    assert_eq!(report.not_on_token_boundary, 0);
    let committed = std::fs::read_to_string(bundled_dir().join("eval.txt")).unwrap();
    assert_same_report(
        &report.render("the bundled world model (assets/world)"),
        &committed,
    );
}

/// Identical text and counts; decimals may move by one in their last digit on another CPU
/// (GEMM kernels sum in a different order).
fn assert_same_report(printed: &str, committed: &str) {
    let split = |s: &str| -> (String, Vec<String>) {
        let (mut text, mut numbers, mut current) = (String::new(), Vec::new(), String::new());
        for c in s.chars().chain(std::iter::once('\n')) {
            let numeric = c.is_ascii_digit()
                || (c == '.' && !current.is_empty())
                || (c == '-' && current.is_empty());
            if numeric {
                current.push(c);
                continue;
            }
            if !current.is_empty() {
                numbers.push(std::mem::take(&mut current));
                text.push('#');
            }
            text.push(c);
        }
        (text, numbers)
    };
    let (printed_text, printed_numbers) = split(printed);
    let (committed_text, committed_numbers) = split(committed);
    assert_eq!(printed_text, committed_text, "printed:\n{printed}");
    for (a, b) in printed_numbers.iter().zip(&committed_numbers) {
        let (a, b) = (a.trim_end_matches('.'), b.trim_end_matches('.'));
        match a.split_once('.') {
            Some((_, decimals)) => {
                let (x, y): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
                let last_digit = 10f64.powi(-(decimals.len() as i32));
                assert!(
                    (x - y).abs() <= last_digit * 1.01,
                    "{a} printed, {b} committed:\n{printed}"
                );
            }
            None => assert_eq!(a, b, "printed:\n{printed}"),
        }
    }
}

#[test]
fn the_name_and_subject_first_shares_shape_the_fact_sentences() {
    let kb = KnowledgeBase::bundled().unwrap();
    let paragraphs = |name_share: f64, subject_first_share: f64| {
        let config = CorpusConfig {
            seed: 9,
            docs_per_country: 2,
            fact_list_docs: 0,
            infobox_docs_per_country: 0,
            docs_per_city: 0,
            name_share,
            subject_first_share,
            list_docs: 0,
        };
        CorpusGenerator::new(&kb, config)
            .unwrap()
            .training_documents()
    };
    let english_text = |docs: &[monoscope::world::corpus::Document]| {
        docs.iter()
            .filter(|d| d.lang == Lang::En)
            .map(|d| d.text.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Always named: no "the country" / "this nation" references are left.
    let named = english_text(&paragraphs(1.0, 0.0));
    assert!(!named.contains("the country") && !named.contains("this nation"));
    assert!(english_text(&paragraphs(0.0, 0.0)).contains("the country"));
    // Always subject first: no English capital sentence puts "capital of" before its subject.
    let capital_of = |text: &str| text.matches("capital of ").count();
    assert_eq!(capital_of(&english_text(&paragraphs(1.0, 1.0))), 0);
    assert!(capital_of(&english_text(&paragraphs(1.0, 0.0))) > 0);
    // Shares outside [0, 1] are refused, naming the share.
    for (name_share, subject_first_share, field) in
        [(1.5, 0.0, "name_share"), (0.5, -0.1, "subject_first_share")]
    {
        let config = CorpusConfig {
            name_share,
            subject_first_share,
            ..CorpusConfig::default()
        };
        let err = CorpusGenerator::new(&kb, config).err().unwrap().to_string();
        assert!(
            err.contains(field) && err.contains("between 0 and 1"),
            "{err}"
        );
    }
}

#[test]
fn relation_lists_put_each_answer_right_after_its_subject() {
    let kb = KnowledgeBase::bundled().unwrap();
    let config = CorpusConfig {
        docs_per_country: 0,
        fact_list_docs: 0,
        infobox_docs_per_country: 0,
        docs_per_city: 0,
        list_docs: 40,
        ..CorpusConfig::default()
    };
    let docs = CorpusGenerator::new(&kb, config)
        .unwrap()
        .training_documents();
    assert_eq!(docs.len(), 40);
    for doc in &docs {
        assert_eq!(doc.lang, Lang::En);
        assert!(doc.facts.len() >= 4, "{}", doc.text);
        for fact in &doc.facts {
            // Each entry is "{country} {answer}": a country mention, one space, the answer.
            let entities: Vec<_> = doc
                .entities
                .iter()
                .filter(|e| fact.start <= e.start && e.end <= fact.end)
                .collect();
            assert_eq!(entities.len(), 2, "{}", doc.text);
            let (subject, answer) = (entities[0], entities[1]);
            let country = &kb.countries[fact.country];
            assert_eq!(&doc.text[subject.start..subject.end], country.name.en);
            assert_eq!(subject.end + 1, answer.start, "{}", doc.text);
            assert_eq!(
                &doc.text[answer.start..answer.end],
                country.attribute(fact.relation).en
            );
        }
    }
    // The bundled recipe has none, and draws them last, so its corpus is unchanged.
    assert_eq!(CorpusConfig::default().list_docs, 0);
}
