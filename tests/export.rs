//! The Parquet export on a real (tiny) model and SAE: every exported activation against a
//! direct forward pass + SAE encode, read back with arrow-rs; resume after an interruption;
//! the folder rules; bad input; and (where the Python readers are installed, as in CI)
//! pyarrow + DuckDB checks and the notebook.

#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::AsArray;
use arrow::datatypes::{Float32Type, UInt32Type, UInt64Type};
use candle_core::{DType, Device};
use common::{Rows, direct_codes, fixture_dir, random_sae};
use monoscope::Model;
use monoscope::export::{ACTIVATIONS_DIR, Existing, ExportSettings, MANIFEST, Manifest, export};
use monoscope::model::HookPoint;
use monoscope::sae::activations::Corpus;
use monoscope::sae::codes::CodingInput;
use monoscope::sae::codes::SegmentSettings;
use monoscope::sae::{Architecture, Sae};
use monoscope::table::{read_table, sha256_file};

const HOOK: &str = "blocks.1.mlp.hook_post";
const CONTEXT: usize = 16;

fn model() -> Model {
    Model::load(&fixture_dir("gpt2"), &Device::Cpu, DType::F32).unwrap()
}

/// One document per line: short and long ones (the long one spans several segments), an
/// empty line, and a line that is not UTF-8.
fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    let mut bytes = Vec::new();
    for i in 0..30 {
        let line = format!(
            "Document {i}: the capital of country {i} is city {}, by river {}.",
            i * 7 % 13,
            i % 5
        );
        bytes.extend(line.as_bytes());
        bytes.push(b'\n');
        if i == 4 {
            bytes.extend(b"\n");
        }
        if i == 9 {
            bytes.extend(b"broken \xff\xfe line\n");
        }
        if i == 12 {
            let long: Vec<String> = (0..40).map(|w| format!("word{w}")).collect();
            bytes.extend(long.join(" ").as_bytes());
            bytes.push(b'\n');
        }
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

fn settings(shard_rows: u64) -> ExportSettings {
    ExportSettings {
        segment: SegmentSettings {
            context_size: CONTEXT,
            prepend_bos: true,
            exclude_special: true,
            segments_per_forward: 4,
        },
        tokens: None,
        shard_rows,
        row_group_rows: 500,
        logit_tokens: 5,
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    sae_dir: PathBuf,
    sae: Sae,
    corpus: Corpus,
    text: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let sae_dir = dir.join("sae");
    std::fs::create_dir_all(&sae_dir).unwrap();
    let sae = random_sae(&sae_dir, HOOK, 256, 96, Architecture::TopK { k: 6 });
    let text = corpus(&dir);
    Fixture {
        corpus: Corpus::parse(text.to_str().unwrap(), "text").unwrap(),
        text,
        _tmp: tmp,
        dir,
        sae_dir,
        sae,
    }
}

fn run_export(
    model: &Model,
    f: &Fixture,
    out: &Path,
    settings: &ExportSettings,
    existing: Existing,
    cancel: &AtomicBool,
    stop_after: Option<usize>,
) -> monoscope::Result<monoscope::export::ExportReport> {
    let input = CodingInput {
        model,
        sae: &f.sae,
        sae_dir: &f.sae_dir,
        hook: HOOK.parse::<HookPoint>().unwrap(),
        writes: HOOK.parse::<HookPoint>().unwrap(),
        corpus: &f.corpus,
    };
    let mut batches = 0;
    export(&input, out, settings, existing, cancel, |_| {
        batches += 1;
        if stop_after == Some(batches) {
            cancel.store(true, Ordering::Relaxed);
        }
    })
}

/// The whole export of the fixture into `out` (200-row shards), never interrupted.
fn export_whole(model: &Model, f: &Fixture, out: &Path) -> monoscope::export::ExportReport {
    let never = AtomicBool::new(false);
    run_export(
        model,
        f,
        out,
        &settings(200),
        Existing::Refuse,
        &never,
        None,
    )
    .unwrap()
}

/// The same export cancelled after six batches, with some shards complete.
fn export_interrupted(model: &Model, f: &Fixture, out: &Path) -> monoscope::export::ExportReport {
    let cancel = AtomicBool::new(false);
    let first = run_export(
        model,
        f,
        out,
        &settings(200),
        Existing::Refuse,
        &cancel,
        Some(6),
    )
    .unwrap();
    assert!(first.cancelled && !first.manifest.complete);
    assert!(!first.manifest.shards.is_empty(), "some shards completed");
    first
}

/// Every activation row of an export, read back with arrow-rs, and its token table.
fn read_back(out: &Path) -> (Manifest, Rows, BTreeMap<(u64, u32), u32>) {
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let mut rows = Rows::new();
    let mut tokens = BTreeMap::new();
    let mut last_key = None;
    for shard in &manifest.shards {
        for (entry, is_tokens) in [(&shard.activations, false), (&shard.tokens, true)] {
            let path = out.join(&entry.path);
            assert_eq!(sha256_file(&path).unwrap(), entry.sha256, "{}", entry.path);
            let mut n = 0;
            for batch in read_table(&path).unwrap() {
                n += batch.num_rows() as u64;
                let doc = batch.column(0).as_primitive::<UInt64Type>();
                let pos = batch.column(1).as_primitive::<UInt32Type>();
                for r in 0..batch.num_rows() {
                    assert!((shard.first_doc..shard.end_doc).contains(&doc.value(r)));
                    if is_tokens {
                        let id = batch.column(2).as_primitive::<UInt32Type>().value(r);
                        tokens.insert((doc.value(r), pos.value(r)), id);
                    } else {
                        let feature = batch.column(2).as_primitive::<UInt32Type>().value(r);
                        let v = batch.column(3).as_primitive::<Float32Type>().value(r);
                        let key = (doc.value(r), pos.value(r), feature);
                        assert!(
                            last_key < Some(key),
                            "rows sorted by (doc, position, feature)"
                        );
                        last_key = Some(key);
                        rows.insert(key, v);
                    }
                }
            }
            assert_eq!(n, entry.rows, "{}", entry.path);
        }
    }
    (manifest, rows, tokens)
}

/// The activations a direct forward pass and dense SAE encode give, document by document.
fn direct(model: &Model, sae: &Sae, text: &Path) -> (Rows, BTreeMap<(u64, u32), u32>) {
    let bytes = std::fs::read(text).unwrap();
    let docs: Vec<String> = bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| String::from_utf8(l.to_vec()).ok())
        .filter(|l| !l.trim().is_empty())
        .collect();
    direct_codes(model, sae, HOOK, CONTEXT, &docs)
}

#[test]
fn every_exported_activation_matches_a_direct_sae_encode() {
    let model = model();
    let f = fixture();
    let out = f.dir.join("export");
    let never = AtomicBool::new(false);
    let report = run_export(
        &model,
        &f,
        &out,
        &settings(300),
        Existing::Refuse,
        &never,
        None,
    )
    .unwrap();
    assert!(report.manifest.complete && !report.cancelled);
    let (manifest, rows, tokens) = read_back(&out);
    assert!(
        manifest.shards.len() >= 3,
        "{} shards",
        manifest.shards.len()
    );
    assert_eq!(
        manifest.skipped_lines, 1,
        "the invalid UTF-8 line is counted"
    );
    let (expected, expected_tokens) = direct(&model, &f.sae, &f.text);
    assert_eq!(tokens, expected_tokens);
    assert_eq!(manifest.token_count, tokens.len() as u64);
    assert_eq!(manifest.activation_count, rows.len() as u64);
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, v) in &rows {
        let e = expected[key];
        assert!(
            (v - e).abs() <= 1e-4 * (1.0 + e.abs()),
            "{key:?}: {v} vs {e}"
        );
    }
    // features.parquet agrees with the activations.
    let features = read_table(&out.join("features.parquet")).unwrap();
    let density = features[0]
        .column(1)
        .as_primitive::<arrow::datatypes::Float64Type>();
    let max = features[0].column(3).as_primitive::<Float32Type>();
    for feature in [0u32, 17, 95] {
        let fired: Vec<f32> = rows
            .iter()
            .filter(|(k, _)| k.2 == feature)
            .map(|(_, v)| *v)
            .collect();
        let d = fired.len() as f64 / tokens.len() as f64;
        assert!((density.value(feature as usize) - d).abs() < 1e-12);
        let m = fired.iter().copied().fold(0.0, f32::max);
        assert_eq!(max.value(feature as usize), m);
    }
    python_readers(&out);
}

#[test]
fn an_interrupted_export_resumes_to_the_same_rows() {
    let model = model();
    let f = fixture();
    let whole = f.dir.join("whole");
    let never = AtomicBool::new(false);
    export_whole(&model, &f, &whole);

    let out = f.dir.join("resumed");
    export_interrupted(&model, &f, &out);
    let leftovers: Vec<_> = walk(&out)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // Without --resume the folder is refused.
    let e = run_export(
        &model,
        &f,
        &out,
        &settings(200),
        Existing::Refuse,
        &never,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--resume"), "{e}");
    let resumed = run_export(
        &model,
        &f,
        &out,
        &settings(200),
        Existing::Resume,
        &never,
        None,
    )
    .unwrap();
    assert!(resumed.manifest.complete);
    assert!(resumed.tokens_this_run < resumed.manifest.token_count);
    let (_, rows_a, tokens_a) = read_back(&whole);
    let (m, rows_b, tokens_b) = read_back(&out);
    assert_eq!(tokens_a, tokens_b);
    assert_eq!(rows_a, rows_b);
    assert_eq!(m.activation_count, rows_b.len() as u64);
}

/// `--resume` continues only what it can trust: an orphan shard (renamed just before an
/// interruption, never listed) is removed and rewritten; a listed shard that lost rows, a
/// manifest from another SAE, or a folder without a manifest are refused, naming the file.
#[test]
fn resume_refuses_what_it_cannot_trust_and_drops_unlisted_shards() {
    let model = model();
    let f = fixture();
    let never = AtomicBool::new(false);
    let interrupted = |name: &str| {
        let out = f.dir.join(name);
        let manifest = export_interrupted(&model, &f, &out).manifest;
        (out, manifest)
    };
    let resume = |out: &Path| {
        run_export(
            &model,
            &f,
            out,
            &settings(200),
            Existing::Resume,
            &never,
            None,
        )
    };

    // An unlisted shard is dropped, and the export still matches an uninterrupted one.
    let (out, manifest) = interrupted("orphan");
    let listed = out.join(&manifest.shards[0].activations.path);
    let orphan = out.join(ACTIVATIONS_DIR).join("part-99999.parquet");
    std::fs::copy(&listed, &orphan).unwrap();
    let whole = f.dir.join("whole");
    export_whole(&model, &f, &whole);
    resume(&out).unwrap();
    assert!(!orphan.exists(), "the unlisted shard was kept");
    assert_eq!(read_back(&out).1, read_back(&whole).1);

    // A listed shard with fewer rows than the manifest says.
    let (out, manifest) = interrupted("short");
    let shard = out.join(&manifest.shards[0].tokens.path);
    let other = out.join(&manifest.shards[manifest.shards.len() - 1].tokens.path);
    let mut wrong = manifest.clone();
    wrong.shards[0].tokens.rows += 1;
    std::fs::write(
        out.join(MANIFEST),
        serde_json::to_string_pretty(&wrong).unwrap(),
    )
    .unwrap();
    let e = resume(&out).unwrap_err().to_string();
    assert!(e.contains(&shard.display().to_string()), "{e}");
    assert!(e.contains("rows"), "{e}");
    assert!(other.exists(), "a refused resume deleted a shard");

    // A manifest from another SAE.
    let (out, manifest) = interrupted("other-sae");
    let mut wrong = manifest.clone();
    wrong.sae.content_hash = "0".repeat(64);
    std::fs::write(
        out.join(MANIFEST),
        serde_json::to_string_pretty(&wrong).unwrap(),
    )
    .unwrap();
    let e = resume(&out).unwrap_err().to_string();
    assert!(e.contains(MANIFEST) && e.contains("same model, SAE"), "{e}");

    // No manifest at all.
    std::fs::remove_file(out.join(MANIFEST)).unwrap();
    let e = resume(&out).unwrap_err().to_string();
    assert!(e.contains("nothing to resume"), "{e}");
}

#[test]
fn overwrite_replaces_an_export_but_never_other_files() {
    let model = model();
    let f = fixture();
    let never = AtomicBool::new(false);
    let out = f.dir.join("export");
    let mut small = settings(200);
    small.tokens = Some(40);
    run_export(&model, &f, &out, &small, Existing::Refuse, &never, None).unwrap();
    let again = run_export(&model, &f, &out, &small, Existing::Overwrite, &never, None).unwrap();
    assert_eq!(again.manifest.token_count, 40);
    // A folder with someone else's file is never emptied.
    let other = f.dir.join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let e = run_export(
        &model,
        &f,
        &other,
        &small,
        Existing::Overwrite,
        &never,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("keep.txt"), "{e}");
    assert!(other.join("keep.txt").is_file());
    // Nor are hidden folders next to an export's files.
    std::fs::create_dir_all(out.join(".git")).unwrap();
    let e = run_export(&model, &f, &out, &small, Existing::Overwrite, &never, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(".git"), "{e}");
    assert!(out.join(".git").is_dir() && out.join("manifest.json").is_file());
}

#[test]
fn bad_input_gets_clear_errors() {
    let model = model();
    let f = fixture();
    let never = AtomicBool::new(false);
    let err = |f: &Fixture, out: &Path, s: &ExportSettings| {
        run_export(&model, f, out, s, Existing::Refuse, &never, None)
            .err()
            .unwrap()
            .to_string()
    };
    let mut zero = settings(100);
    zero.tokens = Some(0);
    assert!(err(&f, &f.dir.join("a"), &zero).contains("--tokens"));

    // A corpus without a single valid line: an error, and no export left behind.
    let empty_text = f.dir.join("empty.txt");
    std::fs::write(&empty_text, b"\n  \n\xff\xfe\n").unwrap();
    let empty = Fixture {
        corpus: Corpus::parse(empty_text.to_str().unwrap(), "text").unwrap(),
        ..fixture()
    };
    let e = err(&empty, &f.dir.join("e"), &settings(100));
    assert!(
        e.contains("no tokens") && e.contains("1 lines skipped"),
        "{e}"
    );
    assert!(!f.dir.join("e/manifest.json").exists());

    // An SAE whose width does not match the hook.
    let narrow = f.dir.join("narrow");
    std::fs::create_dir_all(&narrow).unwrap();
    let sae = random_sae(&narrow, HOOK, 64, 32, Architecture::Standard);
    let g = Fixture {
        sae,
        sae_dir: narrow.clone(),
        ..fixture()
    };
    let e = err(&g, &f.dir.join("b"), &settings(100));
    assert!(
        e.contains("cfg.json") && e.contains("d_in") && e.contains("256"),
        "{e}"
    );

    // An output folder that cannot be created.
    let e = err(&f, Path::new("/proc/monoscope-export"), &settings(100));
    assert!(e.contains("/proc/monoscope-export"), "{e}");

    // Through the CLI: an SAE hook the model lacks, a full disk.
    let missing = f.dir.join("deep");
    std::fs::create_dir_all(&missing).unwrap();
    random_sae(
        &missing,
        "blocks.7.mlp.hook_post",
        256,
        32,
        Architecture::Standard,
    );
    let out = monoscope(&[
        "export",
        "--model",
        fixture_dir("gpt2").to_str().unwrap(),
        "--sae",
        missing.to_str().unwrap(),
        "--corpus",
        f.text.to_str().unwrap(),
        "--out",
        f.dir.join("c").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("blocks.7.mlp.hook_post"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A full disk: the file-size limit makes every write past 64 KiB fail (EFBIG).
    let full = f.dir.join("full");
    let status = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$@\"")
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_monoscope"))
        .args([
            "export",
            "--model",
            fixture_dir("gpt2").to_str().unwrap(),
            "--sae",
            f.sae_dir.to_str().unwrap(),
            "--corpus",
            "world",
            "--tokens",
            "40000",
            "--context-size",
            "16",
            "--out",
            full.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(!status.status.success(), "{stderr}");
    assert!(
        stderr.contains("File too large") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let visible: Vec<PathBuf> = walk(&full)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    let hidden: Vec<PathBuf> = walk(&full)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(full.join("manifest.json")).unwrap())
            .unwrap();
    assert!(!manifest.complete);
    assert_eq!(
        visible.len(),
        2 * manifest.shards.len(),
        "only listed, complete shards are visible"
    );
}

fn monoscope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_monoscope"))
        .args(args)
        .output()
        .unwrap()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// pyarrow + DuckDB checks and the notebook, with the Python environment scripts/test.sh
/// makes (it sets MONOSCOPE_PYTHON; CI always does). Elsewhere this part is skipped, loudly.
fn python_readers(export: &Path) {
    let Ok(python) = std::env::var("MONOSCOPE_PYTHON") else {
        // In CI a missing environment is a broken set-up, not a reason to pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but MONOSCOPE_PYTHON is not: run the tests through scripts/test.sh"
        );
        eprintln!("MONOSCOPE_PYTHON is not set: skipping the pyarrow/DuckDB/notebook checks");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for script in [
        vec![
            root.join("tests/python/check_export.py"),
            export.to_path_buf(),
        ],
        vec![
            root.join("tests/python/run_notebook.py"),
            root.join("notebooks/explore_export.ipynb"),
            export.to_path_buf(),
        ],
    ] {
        let out = Command::new(&python).args(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{:?} failed:\n{}\n{}",
            script[0],
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Exporting a transcoder records the hook it writes in the manifest and reads its features'
/// logit effects from there (its input, `mlp.hook_in`, has no direct path to the logits).
#[test]
fn a_transcoder_export_reads_logit_effects_where_it_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let sae_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sparsify/transcoders/gpt2/h.0.mlp");
    let out = tmp.path().join("export");
    let run = monoscope(&[
        "export",
        "--model",
        fixture_dir("gpt2").to_str().unwrap(),
        "--sae",
        sae_dir.to_str().unwrap(),
        "--corpus",
        text.to_str().unwrap(),
        "--tokens",
        "200",
        "--logit-tokens",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest.hook, "blocks.0.mlp.hook_in");
    assert_eq!(
        manifest.sae.hook_out.as_deref(),
        Some("blocks.0.hook_mlp_out")
    );

    let model = model();
    let sae = monoscope::sae::load(&sae_dir, &Device::Cpu, DType::F32)
        .unwrap()
        .sae;
    let names = model.token_names();
    let want = monoscope::features::logits::logit_effects(
        &model,
        "blocks.0.hook_mlp_out".parse().unwrap(),
        &sae.w_dec,
        3,
        &names,
    )
    .unwrap()
    .unwrap();
    let features = read_table(&out.join("features.parquet")).unwrap();
    let top = features[0].column(4).as_list::<i32>();
    for f in [0usize, 41, 79] {
        let got = top.value(f);
        let got: Vec<&str> = got.as_string::<i32>().iter().flatten().collect();
        let expected: Vec<&str> = want[f].top.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(got, expected, "feature {f}");
    }
}
