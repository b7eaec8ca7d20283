//! Train: capture a hook's activations over a corpus and train an SAE on them (or a
//! transcoder, which predicts a later hook from them), with live curves of loss, L0, FVU, dead
//! latents and throughput; pause, cancel (a checkpoint stays, and the run continues from it
//! when asked), and open the result in Features. Or train a cross-layer transcoder over every
//! layer, with the same checkpoints, and trace through it in Circuits.

use std::path::PathBuf;
use std::sync::Arc;

use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::{Panel, PanelKind, need_model, running, take};
use crate::attribution_graph::cross_layer_sites;
use crate::gui::style::explain;
use crate::gui::widgets::{folder_field, job_row};
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::Job;
use crate::model::Model;
use crate::sae::activations::{ActivationSource, Corpus, WindowSettings};
use crate::sae::clt::{
    Checkpoints, CltConfig, CltStepMetrics, activation_source, check_output_folder,
    resumed_output_folder, train_checkpointed,
};
use crate::sae::run::{RunControl, RunOutcome, RunPaths, RunSettings, SaveDtype, StepEngine, run};
use crate::sae::saelens::SaeMetadata;
use crate::sae::train::{ArchitectureKind, ArchitectureKnobs, TrainConfig};

/// What the form trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coder {
    /// An SAE on one hook, or a transcoder from one hook to a later one.
    Single,
    /// A cross-layer transcoder: every layer's MLP, each layer's features writing it and every
    /// later one.
    CrossLayer,
}

/// The training form.
#[derive(Clone, Debug)]
pub struct TrainForm {
    pub coder: Coder,
    pub hook: String,
    /// The hook a transcoder predicts; empty for an SAE, which reconstructs `hook`.
    pub hook_out: String,
    /// A transcoder's affine skip path `W_skip` (not for TopK).
    pub skip: bool,
    arch: ArchitectureKind,
    pub k: usize,
    l1: f32,
    pub expansion: usize,
    pub tokens: u64,
    pub batch_size: usize,
    lr: f32,
    pub corpus: String,
    pub out: String,
    /// Continue the stopped run whose checkpoint is in (or beside) the output folder.
    pub resume: bool,
    /// The model's edits when the run starts ([`crate::edit::history::EditHistory::fingerprint`]):
    /// part of what a checkpoint must match, and of the trained SAE's model name.
    model_edits: String,
}

impl Default for TrainForm {
    fn default() -> Self {
        Self {
            coder: Coder::Single,
            hook: "blocks.4.mlp.hook_post".into(),
            hook_out: String::new(),
            skip: false,
            arch: ArchitectureKind::TopK,
            k: 32,
            l1: 5.0,
            expansion: 8,
            tokens: 500_000,
            batch_size: 4096,
            lr: 4e-4,
            corpus: "world".into(),
            out: "sae-out".into(),
            resume: false,
            model_edits: String::new(),
        }
    }
}

enum Ended {
    Finished(PathBuf),
    /// Stopped at a step, with a checkpoint in the folder.
    Cancelled(u64, PathBuf),
    /// A cross-layer transcoder saved into the folder.
    CrossLayer(PathBuf),
}

#[derive(Default)]
pub struct Train {
    pub form: TrainForm,
    job: Option<Job<Ended>>,
    /// The curves of the last run (kept after it ends).
    last_series: Option<crate::jobs::Progress>,
}

impl Panel for Train {
    fn kind(&self) -> PanelKind {
        PanelKind::Train
    }

    fn busy(&self) -> bool {
        running(&self.job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        if let Some(job) = &self.job {
            self.last_series = Some(job.progress());
        }
        if let Some(ended) = take(&mut self.job, wb) {
            // A finished run leaves no checkpoint to continue.
            self.form.resume &= matches!(ended, Ended::Cancelled(..));
            match ended {
                Ended::Finished(dir) => {
                    wb.info(format!("SAE written to {}", dir.display()));
                    wb.open_sae(dir);
                    wb.goto = Some(PanelKind::Features);
                }
                Ended::Cancelled(step, checkpoint) => {
                    wb.info(format!(
                        "training stopped at step {step}; its checkpoint is in {} (tick \
                         \"continue the stopped run\" and start again to go on)",
                        checkpoint.display()
                    ));
                }
                Ended::CrossLayer(dir) => {
                    wb.info(format!(
                        "cross-layer transcoder written to {}",
                        dir.display()
                    ));
                    wb.requests.push(PanelRequest::Trace(dir));
                    wb.goto = Some(PanelKind::Circuits);
                }
            }
        }
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        if wb.take_request(&PanelRequest::Start(PanelKind::Train)) {
            // The screenshot tour: a short run into a fresh temporary folder.
            self.form.tokens = 16 * self.form.batch_size as u64;
            self.form.out = std::env::temp_dir()
                .join(format!("monoscope-tour-sae-{}", std::process::id()))
                .display()
                .to_string();
            self.start(wb, &model);
        }
        ui.add_enabled_ui(self.job.is_none(), |ui| self.form_ui(ui, &model));
        ui.horizontal(|ui| match &self.job {
            None => {
                if ui.button("Start training").clicked() {
                    self.start(wb, &model);
                }
            }
            Some(job) => {
                let paused = job.is_paused();
                if ui
                    .button(if paused { "Resume" } else { "Pause" })
                    .on_hover_text("holds the trainer between steps")
                    .clicked()
                {
                    job.set_paused(!paused);
                }
                job_row(ui, job);
            }
        });
        if let Some(p) = &self.last_series {
            charts(ui, p);
        }
    }
}

impl Train {
    fn form_ui(&mut self, ui: &mut egui::Ui, model: &Model) {
        let f = &mut self.form;
        ui.horizontal(|ui| {
            ui.label("Train");
            ui.radio_value(&mut f.coder, Coder::Single, "an SAE or a transcoder");
            ui.radio_value(&mut f.coder, Coder::CrossLayer, "a cross-layer transcoder")
                .on_hover_text(explain::CROSS_LAYER);
        });
        if f.coder == Coder::CrossLayer {
            cross_layer_form(ui, f, model);
            return;
        }
        egui::Grid::new("train-form").num_columns(2).show(ui, |ui| {
            ui.label("Hook");
            egui::ComboBox::from_id_salt("hook")
                .selected_text(&f.hook)
                .height(400.0)
                .show_ui(ui, |ui| {
                    for h in model.hook_points().iter().filter(|h| h.per_token()) {
                        let name = h.to_string();
                        ui.selectable_value(&mut f.hook, name.clone(), name);
                    }
                });
            ui.end_row();
            ui.label("Predicts").on_hover_text(explain::TRANSCODER);
            ui.horizontal(|ui| {
                transcoder_ui(ui, f, model);
            });
            ui.end_row();
            ui.label("Architecture");
            ui.horizontal(|ui| {
                ui.radio_value(&mut f.arch, ArchitectureKind::TopK, "TopK");
                ui.radio_value(&mut f.arch, ArchitectureKind::BatchTopK, "BatchTopK");
                ui.radio_value(&mut f.arch, ArchitectureKind::Standard, "ReLU + L1");
                ui.radio_value(&mut f.arch, ArchitectureKind::JumpRelu, "JumpReLU");
            });
            ui.end_row();
            match f.arch {
                ArchitectureKind::TopK | ArchitectureKind::BatchTopK => {
                    ui.label("k").on_hover_text("latents active per token");
                    ui.add(egui::DragValue::new(&mut f.k).range(1..=1024));
                }
                ArchitectureKind::Standard | ArchitectureKind::JumpRelu => {
                    ui.label("sparsity coefficient")
                        .on_hover_text("L1 (ReLU) or L0 (JumpReLU) penalty weight");
                    ui.add(
                        egui::DragValue::new(&mut f.l1)
                            .speed(0.1)
                            .range(0.0..=1000.0),
                    );
                }
            }
            ui.end_row();
            run_rows(
                ui,
                f,
                "d_sae = expansion × d_in".into(),
                "Folder for the SAE",
            );
        });
    }

    pub fn start(&mut self, wb: &Workbench, model: &Arc<Model>) {
        let model = model.clone();
        let mut form = self.form.clone();
        form.model_edits = wb.history.fingerprint();
        self.last_series = None;
        self.job = Some(match form.coder {
            Coder::CrossLayer => wb.spawn("train CLT", move |job| {
                train_cross_layer(&model, &form, job)
            }),
            Coder::Single if form.hook_out.is_empty() => {
                wb.spawn("train SAE", move |job| train(&model, &form, job))
            }
            Coder::Single => wb.spawn("train transcoder", move |job| train(&model, &form, job)),
        });
    }
}

fn train(model: &Model, f: &TrainForm, job: &crate::jobs::JobHandle) -> anyhow::Result<Ended> {
    let out = PathBuf::from(f.out.trim());
    if out.as_os_str().is_empty() {
        anyhow::bail!("choose an output folder");
    }
    job.set_message("filling the activation buffer");
    let corpus = Corpus::parse(f.corpus.trim(), "text")?;
    let settings = WindowSettings {
        context_size: 128.min(model.dims().context_length),
        prepend_bos: true,
        exclude_special: true,
        windows_per_forward: 32,
    };
    let mut source = ActivationSource::new(model, corpus, &f.hook, settings)?;
    if !f.hook_out.is_empty() {
        source = source.with_target(&f.hook_out)?;
    }
    let d_in = source.hook_width();
    let d_out = source.target().map(|(_, width)| width);
    let architecture = f.arch.with(&ArchitectureKnobs {
        k: f.k,
        l1_coefficient: f.l1,
        l0_coefficient: f.l1,
        // AuxK explains the residual, which lives where the decoder writes.
        aux_k: d_out.unwrap_or(d_in) / 2,
        ..ArchitectureKnobs::defaults(d_in)
    });
    let mut train = TrainConfig::new(architecture, d_in, f.expansion * d_in);
    train.transcode_to = d_out;
    train.skip_connection = d_out.is_some() && f.skip;
    train.batch_size = f.batch_size;
    train.total_steps = f.tokens.div_ceil(f.batch_size.max(1) as u64);
    train.lr = f.lr;
    train.decay_steps = train.total_steps / 5;
    train.dead_after_tokens = f.tokens.min(1_000_000) / 2;
    train.validate()?;
    let total = train.total_steps;
    let settings = RunSettings {
        buffer_rows: 16 * f.batch_size,
        normalize: true,
        checkpoint_every_tokens: 1_000_000,
        log_every_steps: 10,
        save_dtype: SaveDtype::F32,
        train,
    };
    let folder = model.dir.file_name().map(|n| n.to_string_lossy());
    let metadata = SaeMetadata {
        // A resumed run must be of the same edits, and the SAE says what it was trained on.
        model_name: format!("{}{}", folder.unwrap_or_default(), f.model_edits),
        hook_name: source.hook.to_string(),
        context_size: source.settings.context_size,
        prepend_bos: source.settings.prepend_bos,
        dataset_path: source.corpus().describe(),
        hook_name_out: source
            .target()
            .map(|(out, _)| out.to_string())
            .unwrap_or_default(),
    };
    let mut pace = Pace::new();
    let outcome = run(
        &mut source,
        &settings,
        &metadata,
        &out,
        RunControl::new(job.cancel_flag())
            .resuming(f.resume)
            .on(StepEngine::for_run(&model.device, &settings.train)),
        |m| {
            let curves = [m.loss, m.l0, m.fvu, 100.0 * m.dead_fraction];
            report_step(job, &mut pace, (m.step, total, m.tokens), curves);
        },
    )?;
    Ok(match outcome {
        RunOutcome::Finished(_) => Ended::Finished(out),
        RunOutcome::Cancelled { step } => {
            Ended::Cancelled(step, RunPaths { out: out.clone() }.checkpoint())
        }
    })
}

/// The cross-layer transcoder's settings: features per layer (expansion × the model's width),
/// k, tokens, batch, learning rate, corpus and folder.
fn cross_layer_form(ui: &mut egui::Ui, f: &mut TrainForm, model: &Model) {
    egui::Grid::new("clt-form").num_columns(2).show(ui, |ui| {
        ui.label("Reads → writes")
            .on_hover_text(explain::CROSS_LAYER);
        ui.label("blocks.L.hook_resid_mid → blocks.L.hook_mlp_out and every later layer's");
        ui.end_row();
        ui.label("k")
            .on_hover_text("features firing per token and layer (BatchTopK)");
        ui.add(egui::DragValue::new(&mut f.k).range(1..=1024));
        ui.end_row();
        let tip = format!(
            "features per layer = expansion × d_model ({})",
            model.dims().d_model
        );
        run_rows(ui, f, tip, "Folder for the cross-layer transcoder");
    });
}

/// The form rows every kind of training shares, from the expansion (`expansion_tip` says what
/// it multiplies) to the output folder (`folder_title`: the file dialog's title).
fn run_rows(ui: &mut egui::Ui, f: &mut TrainForm, expansion_tip: String, folder_title: &str) {
    ui.label("Expansion").on_hover_text(expansion_tip);
    ui.add(egui::DragValue::new(&mut f.expansion).range(1..=128));
    ui.end_row();
    let label = ui.label("Tokens");
    ui.add(
        egui::DragValue::new(&mut f.tokens)
            .range(1_000..=1_000_000_000)
            .speed(10_000),
    )
    .labelled_by(label.id);
    ui.end_row();
    let label = ui.label("Batch size");
    ui.add(egui::DragValue::new(&mut f.batch_size).range(16..=65_536))
        .labelled_by(label.id);
    ui.end_row();
    ui.label("Learning rate");
    ui.add(
        egui::DragValue::new(&mut f.lr)
            .speed(1e-5)
            .range(1e-6..=1e-1),
    );
    ui.end_row();
    ui.label("Corpus")
        .on_hover_text("world (the bundled generated corpus), or a .txt / .jsonl / .parquet file");
    ui.text_edit_singleline(&mut f.corpus);
    ui.end_row();
    let label = ui.label("Output folder");
    ui.horizontal(|ui| {
        folder_field(ui, &mut f.out, folder_title).labelled_by(label.id);
    });
    ui.end_row();
    ui.label("");
    ui.checkbox(&mut f.resume, "continue the stopped run")
        .on_hover_text(
            "continue from the checkpoint a cancelled run left for this output folder (the \
             same settings; as `--resume` does on the command line), reaching the weights an \
             uninterrupted run would",
        );
    ui.end_row();
}

/// Trains a cross-layer transcoder as `monoscope clt train` does, with its checkpoints beside
/// the output folder (every million tokens and when cancelled), and saves it.
fn train_cross_layer(
    model: &Model,
    f: &TrainForm,
    job: &crate::jobs::JobHandle,
) -> anyhow::Result<Ended> {
    let out = PathBuf::from(f.out.trim());
    let staging = if f.resume {
        resumed_output_folder(&out)?
    } else {
        check_output_folder(&out)?
    };
    let (input, output) = ("hook_resid_mid", "hook_mlp_out");
    let (inputs, outputs) = cross_layer_sites(model, input, output)?;
    job.set_message("filling the activation buffer");
    let settings = WindowSettings {
        context_size: 128.min(model.dims().context_length),
        prepend_bos: true,
        exclude_special: true,
        windows_per_forward: 32,
    };
    let corpus = Corpus::parse(f.corpus.trim(), "text")?;
    let mut source = activation_source(model, corpus, settings, &inputs, &outputs)?;
    let (n, d) = (model.dims().n_layers, source.hook_width());
    let d_out = model.hook_width(outputs[0])?;
    let mut config = CltConfig::new(n, d, d_out, f.expansion * d, f.k);
    config.batch_size = f.batch_size;
    config.total_steps = f.tokens.div_ceil(f.batch_size.max(1) as u64);
    config.lr = f64::from(f.lr);
    config.warmup_steps = config.warmup_steps.min(config.total_steps / 10);
    config.decay_steps = config.total_steps / 5;
    config.dead_after_tokens = f.tokens.min(1_000_000) / 5;
    let total = config.total_steps;
    let mut pace = Pace::new();
    // A row holds every layer's input and output: 16 batches of them could take gigabytes, so
    // the mixing buffer is capped at 256 MB (but holds at least two batches).
    let row_bytes = 4 * config.row_width();
    let buffer_rows = (16 * f.batch_size)
        .min((256 << 20) / row_bytes.max(1))
        .max(2 * f.batch_size);
    let hooks = (input, output);
    let checkpoints = Checkpoints {
        dir: staging.clone(),
        every_tokens: 1_000_000,
        resume: f.resume,
        identity: Checkpoints::identity_of(model, &source, hooks, buffer_rows) + &f.model_edits,
    };
    let run = train_checkpointed(
        &mut source,
        config,
        buffer_rows,
        job.cancel_flag(),
        &checkpoints,
        |m| {
            let curves = [
                m.loss,
                CltStepMetrics::mean(&m.l0),
                CltStepMetrics::mean(&m.fvu),
                100.0 * CltStepMetrics::mean(&m.dead_fraction),
            ];
            report_step(job, &mut pace, (m.step, total, m.tokens), curves);
        },
    )?;
    if !run.finished {
        let step = run.trainer.step;
        return Ok(Ended::Cancelled(step, checkpoints.checkpoint_dir()));
    }
    job.set_message("saving");
    let metrics = run.log_lines();
    let extra = [("training-metrics.jsonl", metrics)];
    run.trainer
        .finish_in(&staging, &out, candle_core::DType::F32, hooks, &extra)?;
    Ok(Ended::CrossLayer(out))
}

/// Reports step `step` of `total` (`tokens` trained on) to the job, waiting while it is paused,
/// and every other step the curves [`charts`] draws: loss, L0, FVU and dead %, then tokens/s.
fn report_step(
    job: &crate::jobs::JobHandle,
    pace: &mut Pace,
    (step, total, tokens): (u64, u64, u64),
    [loss, l0, fvu, dead_percent]: [f64; 4],
) {
    job.wait_while_paused();
    job.set_progress(step, total, "steps");
    job.set_message(format!("step {step} of {total}"));
    if step % 2 == 0 || step == total {
        let x = tokens as f64;
        job.record("loss", x, loss);
        job.record("L0", x, l0);
        job.record("FVU", x, fvu);
        job.record("dead %", x, dead_percent);
        job.record("tokens/s", x, pace.rate(tokens));
    }
}

/// Tokens a second from the first step reported (a continued run's earlier tokens, and the
/// time its buffer took to fill, left out).
#[derive(Default)]
struct Pace {
    first: Option<(std::time::Instant, u64)>,
}

impl Pace {
    fn new() -> Self {
        Self::default()
    }

    /// The rate at `tokens` trained on in all.
    fn rate(&mut self, tokens: u64) -> f64 {
        let (started, first) = *self
            .first
            .get_or_insert_with(|| (std::time::Instant::now(), tokens));
        (tokens - first) as f64 / started.elapsed().as_secs_f64().max(1e-9)
    }
}

/// What the coder predicts: the hook it reads (an SAE), or a later hook (a transcoder), with a
/// shortcut for the usual transcoder of the chosen layer's MLP and the skip-path switch.
fn transcoder_ui(ui: &mut egui::Ui, f: &mut TrainForm, model: &Model) {
    const ITSELF: &str = "its input (an SAE)";
    let points = model.hook_points();
    let input = points.iter().position(|h| h.to_string() == f.hook);
    // A hook picked before the input moved to or past it is no longer one to predict.
    let output = points.iter().position(|h| h.to_string() == f.hook_out);
    if output.is_some_and(|o| input.is_none_or(|i| o <= i)) {
        f.hook_out.clear();
    }
    let shown = if f.hook_out.is_empty() {
        ITSELF.to_string()
    } else {
        f.hook_out.clone()
    };
    egui::ComboBox::from_id_salt("hook out")
        .selected_text(shown)
        .height(400.0)
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut f.hook_out, String::new(), ITSELF);
            // A transcoder predicts a hook later in the forward pass than the one it reads.
            let later = input.map_or(&points[..0], |i| &points[i + 1..]);
            for h in later.iter().filter(|h| h.per_token()) {
                let name = h.to_string();
                ui.selectable_value(&mut f.hook_out, name.clone(), name);
            }
        });
    let layer = f
        .hook
        .parse::<crate::model::HookPoint>()
        .ok()
        .and_then(|h| h.layer())
        .unwrap_or(model.dims().n_layers / 2);
    let mlp_in = format!("blocks.{layer}.mlp.hook_in");
    if points.iter().any(|h| h.to_string() == mlp_in)
        && ui
            .button("MLP transcoder")
            .on_hover_text(format!(
                "read {mlp_in} (the MLP's input after its norm) and predict \
                 blocks.{layer}.hook_mlp_out: a sparse stand-in for the layer's MLP"
            ))
            .clicked()
    {
        f.hook = mlp_in;
        f.hook_out = format!("blocks.{layer}.hook_mlp_out");
    }
    let can_skip = !f.hook_out.is_empty() && f.arch != ArchitectureKind::TopK;
    if !can_skip {
        f.skip = false;
    }
    ui.add_enabled(can_skip, egui::Checkbox::new(&mut f.skip, "skip path"))
        .on_hover_text(
            "also learn an affine W_skip from input to output (a skip transcoder; not for \
             TopK, which SAELens cannot save with one)",
        );
}

/// Five small live charts against tokens trained on.
fn charts(ui: &mut egui::Ui, p: &crate::jobs::Progress) {
    let charts = [
        ("loss", explain::LOSS),
        ("L0", explain::L0),
        ("FVU", explain::FVU),
        ("dead %", explain::DEAD),
        ("tokens/s", explain::TOKENS_PER_S),
    ];
    ui.horizontal_wrapped(|ui| {
        for (name, tip) in charts {
            let Some(points) = p.series.get(name) else {
                continue;
            };
            ui.vertical(|ui| {
                let last = points.last().map_or(0.0, |q| q[1]);
                ui.label(format!("{name}: {last:.4}")).on_hover_text(tip);
                Plot::new(("train-chart", name))
                    .width(260.0)
                    .height(150.0)
                    .legend(Legend::default())
                    .x_axis_label("tokens")
                    .allow_scroll(false)
                    .show(ui, |plot| {
                        plot.line(Line::new(name, PlotPoints::from(points.clone())));
                    });
            });
        }
    });
}
