//! Command-line front end: clap arguments → validated library calls → text or `--json`.

pub mod attribute;
mod clt;
mod edit;
mod export;
mod features;
mod generate;
mod heads;
mod info;
mod lens;
mod neurons;
mod patch;
mod path_patch;
mod sae;
mod saliency;
mod trace;
mod trace_fact;
mod tuned_lens;
mod vector;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{DeviceChoice, parse_dtype};
use crate::model::Model;

#[derive(Parser)]
#[command(
    name = "monoscope",
    version,
    about = "Look inside decoder language models: hooks, SAEs, knowledge neurons, ROME editing. \
             With no command, opens the workbench window."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Open the workbench window (the default with no command).
    Gui(GuiArgs),
    /// Architecture, parameter count, dimensions and every hook name of a model.
    Info(info::InfoArgs),
    /// Continue a prompt (greedy or sampled) and show next-token probabilities.
    Generate(generate::GenerateArgs),
    /// Run a prompt and save the values at chosen hooks to a safetensors file.
    Trace(trace::TraceArgs),
    /// Logit lens (what each layer's residual stream predicts) and direct logit attribution
    /// (what each attention and MLP output writes to one token's logit) for a prompt.
    Lens(Box<lens::LensArgs>),
    /// The tuned lens: train one translator per depth on a corpus, compare it with the logit
    /// lens; `lens --tuned FILE` reads through it.
    #[command(subcommand)]
    TunedLens(tuned_lens::TunedLensCommand),
    /// Attention heads scored by the standard detectors: previous-token, first-token (sink),
    /// duplicate-token and induction, on repeated random tokens or a prompt.
    Heads(Box<heads::HeadsArgs>),
    /// The bundled world model: rebuild it, evaluate what it knows.
    #[command(subcommand)]
    World(world::WorldCommand),
    /// Sparse autoencoders: train on a hook's activations, evaluate.
    #[command(subcommand)]
    Sae(sae::SaeCommand),
    /// Cross-layer transcoders: train one on the model's activations (circuit-tracer's
    /// format, for `attribute`); score any transcoders as a replacement for the MLPs.
    #[command(subcommand)]
    Clt(clt::CltCommand),
    /// SAE features: build the statistics the GUI shows, score them against ground truth.
    #[command(subcommand)]
    Features(features::FeaturesCommand),
    /// Export an SAE's feature activations over a corpus to Parquet.
    Export(Box<export::ExportArgs>),
    /// Knowledge neurons of a fact (integrated gradients, refined across paraphrases), with
    /// suppress/amplify checks.
    Neurons(Box<neurons::NeuronsArgs>),
    /// Activation patching between a clean and a corrupted prompt: which layers, positions
    /// and heads carry the difference in the answer; attribution patching beside it.
    Patch(Box<patch::PatchArgs>),
    /// Path patching: each head's effect on the answer along one path only — straight to the
    /// logits, or into chosen later heads' queries, keys or values — every other head frozen.
    PathPatch(Box<path_patch::PathPatchArgs>),
    /// Causal tracing of a fact: where restoring the hidden state, MLP or attention output
    /// brings the answer back after the subject is corrupted; suggests the edit layer.
    TraceFact(Box<trace_fact::TraceFactArgs>),
    /// Which prompt tokens a prediction rests on: gradient × input and integrated gradients
    /// at the token embeddings, per token.
    Saliency(Box<saliency::SaliencyArgs>),
    /// A prompt's attribution graph (circuit tracing): the direct effects between per-layer
    /// transcoder features, error nodes, tokens and the top logits in the local replacement
    /// model, pruned and written as circuit-tracer's graph file.
    Attribute(Box<attribute::AttributeArgs>),
    /// A steering vector from contrasting prompts (activation addition): the mean activation
    /// of prompts that show a behaviour minus that of prompts that do not, at chosen hooks;
    /// `generate --vector` adds it while the model runs.
    Vector(Box<vector::VectorArgs>),
    /// Edit a fact (ROME; MEMIT-style batches with --batch), check it on paraphrases,
    /// neighbours and Japanese, save the edited model; `edit eval` scores many edits.
    Edit(Box<edit::EditArgs>),
}

#[derive(Args, Default)]
struct GuiArgs {
    /// A local Hugging Face model folder (default: the last one opened, else the bundled
    /// world model).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// An SAE folder (default: the last one opened, else the bundled SAE).
    #[arg(long, value_name = "DIR")]
    sae: Option<PathBuf>,
    /// Save a PNG of every panel into DIR and quit (for docs/screenshots).
    #[arg(long, value_parser = output_path, value_name = "DIR", hide = true)]
    screenshots: Option<PathBuf>,
}

/// Options every model-loading command shares.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A local Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    /// Defaults to the bundled world model in assets/.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Run dtype: f32 | f16 | bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// A fact, as the tracing, neuron and editing commands take it.
#[derive(Args, Clone, Debug)]
pub struct FactArgs {
    /// The prompt, `{}` where the subject goes: "The capital of {} is".
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub subject: String,
    /// What should follow the prompt: " Tokyo".
    #[arg(long)]
    pub target: String,
}

/// Where the bundled world model lives.
pub fn bundled_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world")
}

/// Whether `dir` is the bundled world model's folder, however the path is spelled.
pub fn is_bundled_model(dir: &Path) -> bool {
    let bundled = bundled_model_dir();
    dir == bundled
        || matches!((dir.canonicalize(), bundled.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Where the bundled world model's transcoders live (one per layer, for attribution graphs).
pub fn bundled_transcoders_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/transcoders/world-btk-skip")
}

/// The transcoder folders a command was given with `--transcoders`, or the bundled ones when
/// none were and the model is the bundled one.
pub fn transcoders_named(named: &[PathBuf], model: &ModelArgs) -> anyhow::Result<Vec<PathBuf>> {
    match (named.is_empty(), &model.model) {
        (false, _) => Ok(named.to_vec()),
        (true, None) => Ok(vec![bundled_transcoders_dir()]),
        (true, Some(dir)) if is_bundled_model(dir) => Ok(vec![bundled_transcoders_dir()]),
        (true, Some(dir)) => anyhow::bail!(
            "--transcoders DIR is needed with --model {} (the bundled transcoders fit the bundled model only)",
            dir.display()
        ),
    }
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Model> {
        let device = self.device.parse::<DeviceChoice>()?.open()?;
        let dtype = parse_dtype(&self.dtype)?;
        let dir = match &self.model {
            Some(dir) => dir.clone(),
            None => {
                let dir = bundled_model_dir();
                if !dir.join("config.json").is_file() {
                    anyhow::bail!(
                        "no --model given and the bundled world model ({}) is not there; pass --model DIR",
                        dir.display()
                    );
                }
                dir
            }
        };
        Model::load(&dir, &device, dtype)
            .with_context(|| format!("loading model {}", dir.display()))
    }
}

pub fn run() -> anyhow::Result<ExitCode> {
    crate::allocator::keep_freed_buffers();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Gui(GuiArgs::default()));
    if !matches!(command, Command::Gui(_)) {
        quit_quietly_on_closed_pipe();
    }
    match command {
        Command::Gui(args) => crate::gui::run(crate::gui::GuiOptions {
            model: args.model,
            sae: args.sae,
            screenshots: args.screenshots,
        }),
        Command::Info(args) => info::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Trace(args) => trace::run(&args),
        Command::Lens(args) => lens::run(&args),
        Command::Heads(args) => heads::run(&args),
        Command::World(command) => world::run(&command),
        Command::Sae(command) => sae::run(&command),
        Command::Clt(command) => clt::run(&command),
        Command::Features(command) => features::run(&command),
        Command::Export(args) => export::run(&args),
        Command::Neurons(args) => neurons::run(&args),
        Command::Patch(args) => patch::run(&args),
        Command::PathPatch(args) => path_patch::run(&args),
        Command::TraceFact(args) => trace_fact::run(&args),
        Command::Saliency(args) => saliency::run(&args),
        Command::Attribute(args) => attribute::run(&args),
        Command::TunedLens(command) => tuned_lens::run(&command),
        Command::Vector(args) => vector::run(&args),
        Command::Edit(args) => edit::run(&args),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename), and
/// never replaces an existing file unless `overwrite`.
pub fn write_new_file(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    refuse_existing(path, overwrite)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!("{}: output folder does not exist", dir.display());
    }
    path.file_name().context("output path has no file name")?;
    crate::files::write_atomic_with(path, write)
}

/// Refuses `path` when it exists, unless `overwrite` (--force).
pub fn refuse_existing(path: &Path, overwrite: bool) -> anyhow::Result<()> {
    if path.exists() && !overwrite {
        anyhow::bail!(
            "{} already exists (pass --force to replace it)",
            path.display()
        );
    }
    Ok(())
}

/// Clap's parser for `--out` paths: an empty one (an unset shell variable) would mean the
/// current folder.
pub fn output_path(value: &str) -> Result<std::path::PathBuf, String> {
    if value.is_empty() {
        return Err(crate::files::EMPTY_OUTPUT_PATH.into());
    }
    Ok(value.into())
}

/// Prints a value as pretty JSON on stdout.
/// Output piped into a reader that stops early (`monoscope lens … | head`) ends the process
/// quietly, as it does every Unix tool, instead of panicking in `println!` on the closed pipe
/// (Rust ignores SIGPIPE by default). Files are written under temporary names and renamed when
/// complete, so stopping mid-command never leaves half a file. Not for the window, whose
/// display connection is a socket.
fn quit_quietly_on_closed_pipe() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: restores the default disposition of one signal; no handler is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Set by Ctrl-C: long jobs stop at the next safe point. A second Ctrl-C exits at once.
pub static CANCEL: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler; `what` says what the first Ctrl-C does.
pub fn install_ctrl_c(what: &'static str) {
    // Only the first installation in a process succeeds; later calls keep the first handler.
    let _ = ctrlc::set_handler(move || {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\n{what} (Ctrl-C again to quit now)");
    });
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, template: &str) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template)?.progress_chars("=> "));
    Ok(bar)
}

/// Shows a training step on `bar` (or, with the bar hidden as in a pipe, on stderr every 50
/// steps): step `step` of `total`, then loss, L0, FVU, dead % and tokens/s.
pub fn show_training_step(
    bar: &ProgressBar,
    (step, total): (u64, u64),
    [loss, l0, fvu, dead_fraction]: [f64; 4],
    tokens_per_second: f64,
) {
    bar.set_position(step);
    let msg = format!(
        "loss {loss:.4} L0 {l0:.1} FVU {fvu:.4} dead {:.1}% {tokens_per_second:.0} tok/s",
        100.0 * dead_fraction
    );
    if bar.is_hidden() {
        if step % 50 == 0 || step == total {
            eprintln!("step {step}/{total} {msg}");
        }
    } else {
        bar.set_message(msg);
    }
}

/// Peak resident memory of this process in bytes (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
