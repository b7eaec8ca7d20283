//! Export: the open SAE's feature activations over a corpus, to sharded Parquet (the layout
//! of `monoscope export`), with progress in rows/s, cancel, and a button to open the folder.

use std::path::PathBuf;

use super::{Panel, PanelKind, need_model, running, take};
use crate::export::{Existing, ExportSettings, export};
use crate::gui::widgets::{folder_field, job_row};
use crate::gui::workbench::{Workbench, window_segments};
use crate::jobs::Job;
use crate::sae::activations::Corpus;
use crate::table::ROW_GROUP_ROWS;

/// The export form.
#[derive(Clone, Debug)]
pub struct ExportForm {
    pub corpus: String,
    pub tokens: u64,
    pub out: String,
    pub resume: bool,
}

impl Default for ExportForm {
    fn default() -> Self {
        Self {
            corpus: "world".into(),
            tokens: 100_000,
            out: "export".into(),
            resume: false,
        }
    }
}

struct Exported {
    dir: PathBuf,
    rows: u64,
    tokens: u64,
    shards: usize,
    cancelled: bool,
    seconds: f64,
}

#[derive(Default)]
pub struct Export {
    pub form: ExportForm,
    job: Option<Job<Exported>>,
    last: Option<Exported>,
}

impl Panel for Export {
    fn kind(&self) -> PanelKind {
        PanelKind::Export
    }

    fn busy(&self) -> bool {
        running(&self.job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        if let Some(done) = take(&mut self.job, wb) {
            self.last = Some(done);
        }
        if need_model(ui, wb).is_none() {
            return;
        }
        if wb.sae.is_none() {
            ui.label("Open an SAE first: the export holds its feature activations.");
            return;
        }
        let f = &mut self.form;
        ui.add_enabled_ui(self.job.is_none(), |ui| {
            egui::Grid::new("export-form")
                .num_columns(2)
                .show(ui, |ui| {
                    ui.label("Corpus").on_hover_text(
                        "world (the bundled generated corpus), or a .txt / .jsonl / .parquet file",
                    );
                    ui.text_edit_singleline(&mut f.corpus);
                    ui.end_row();
                    let label = ui.label("Tokens");
                    ui.add(
                        egui::DragValue::new(&mut f.tokens)
                            .range(1..=10_000_000_000u64)
                            .speed(1_000),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Output folder");
                    ui.horizontal(|ui| {
                        folder_field(ui, &mut f.out, "Folder for the export").labelled_by(label.id);
                    });
                    ui.end_row();
                    ui.label("");
                    ui.checkbox(&mut f.resume, "resume an interrupted export in this folder");
                    ui.end_row();
                });
        });
        ui.horizontal(|ui| match &self.job {
            None => {
                if ui.button("Start export").clicked() {
                    self.start(wb);
                }
            }
            Some(job) => job_row(ui, job),
        });
        if let Some(e) = &self.last {
            ui.separator();
            ui.label(format!(
                "{} {} activation rows over {} tokens in {} shard(s), {:.1}s ({:.0} rows/s), in {}",
                if e.cancelled {
                    "Stopped after"
                } else {
                    "Exported"
                },
                e.rows,
                e.tokens,
                e.shards,
                e.seconds,
                e.rows as f64 / e.seconds.max(1e-9),
                e.dir.display()
            ));
            if ui.button("Open the output folder").clicked()
                && let Err(err) = open_folder(&e.dir)
            {
                wb.error(err);
            }
        }
    }
}

impl Export {
    pub fn start(&mut self, wb: &Workbench) {
        let (Some(model), Some(sae)) = (wb.model.clone(), wb.sae.clone()) else {
            return;
        };
        let form = self.form.clone();
        self.job = Some(wb.spawn("export", move |job| {
            let out = PathBuf::from(form.out.trim());
            let corpus = Corpus::parse(form.corpus.trim(), "text")?;
            let settings = ExportSettings {
                segment: window_segments(&model, sae.sae.metadata.context_size),
                tokens: Some(form.tokens),
                shard_rows: 8 * ROW_GROUP_ROWS as u64,
                row_group_rows: ROW_GROUP_ROWS,
                logit_tokens: 10,
            };
            let input = sae.coding_input(&model, &corpus);
            let existing = if form.resume {
                Existing::Resume
            } else {
                Existing::Refuse
            };
            let started = std::time::Instant::now();
            let report = export(&input, &out, &settings, existing, job.cancel_flag(), |p| {
                job.set_progress(p.tokens, form.tokens, "tokens");
                let rate = p.rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
                job.set_message(format!("{} rows, {rate:.0} rows/s", p.rows));
            })?;
            Ok(Exported {
                rows: report.manifest.activation_count,
                tokens: report.manifest.token_count,
                shards: report.manifest.shards.len(),
                cancelled: report.cancelled,
                seconds: report.total_time.as_secs_f64(),
                dir: out,
            })
        }));
    }
}

/// Opens a folder in the desktop's file manager.
fn open_folder(dir: &std::path::Path) -> Result<(), String> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(dir)
        .spawn()
        .map(|_| ())
        .map_err(|e| format!("could not run {opener} {}: {e}", dir.display()))
}
