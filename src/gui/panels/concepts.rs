//! Concepts: the open SAE scored against ground truth (`monoscope features score`). Freshly
//! generated world text is labelled token by token; for every concept the panel shows its best
//! single feature (a button opens it in Features) with precision, recall and F1 on held-out
//! text, a dense linear probe of the hook as the reference, and k-sparse probes whose curve
//! says over how many latents the concept is spread. Scores are kept in the SAE's cache
//! folder ([`concept_score_file`]): the newest is shown when the SAE opens, and asking again
//! with the same settings reads it instead of scoring for a minute.

use egui_plot::{Corner, HLine, Legend, Line, Plot, PlotPoints, uniform_grid_spacer};

use super::{Panel, PanelKind, need_model, running, take};
use crate::features::score::{ConceptScore, ScoreReport, ScoreSettings};
use crate::gui::style::explain;
use crate::gui::widgets::job_row;
use crate::gui::workbench::{
    ConceptScores, Kept, PanelRequest, Workbench, concept_score_file, score_in_job, window_segments,
};
use crate::jobs::Job;

/// The size of the generated splits and the probes to fit.
#[derive(Clone, Debug)]
pub struct ScoreForm {
    pub docs_per_country: usize,
    pub fact_lists: usize,
    /// The k of the k-sparse probes, comma-separated (empty: none).
    pub sparse_probe_ks: String,
    pub dense_probes: bool,
}

impl Default for ScoreForm {
    fn default() -> Self {
        // Half of the command's splits: about 50,000 tokens each, under a minute here.
        Self {
            docs_per_country: 1,
            fact_lists: 100,
            sparse_probe_ks: "1,2,5,10,20".into(),
            dense_probes: true,
        }
    }
}

impl ScoreForm {
    fn ks(&self) -> Result<Vec<usize>, String> {
        (self.sparse_probe_ks.split(','))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| match k.parse::<usize>() {
                Ok(k) if (1..=256).contains(&k) => Ok(k),
                _ => Err(format!(
                    "k-sparse probes: {k:?} is not a k from 1 to 256 (a list such as 1,2,5)"
                )),
            })
            .collect()
    }
}

#[derive(Default)]
pub struct Concepts {
    pub form: ScoreForm,
    job: Option<Job<ConceptScores>>,
    /// The model's version when the job started: a score of a model since edited is dropped.
    job_model: u64,
    /// The concept whose k-sparse curve is drawn beside the mean (an index into the report).
    selected: Option<usize>,
}

impl Panel for Concepts {
    fn kind(&self) -> PanelKind {
        PanelKind::Concepts
    }

    fn busy(&self) -> bool {
        running(&self.job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        if let Some(done) = take(&mut self.job, wb) {
            if wb.model_version == self.job_model {
                self.selected = None;
                wb.concept_scores = Some(done);
            } else {
                wb.info("the model changed while the SAE was scored: score it again");
            }
        }
        if need_model(ui, wb).is_none() {
            return;
        }
        if wb.sae.is_none() {
            ui.label("Open an SAE first: the panel scores its features.");
            return;
        }
        ui.label(
            "Scores the open SAE against ground truth: two world corpora generated with seeds \
             no training used are labelled token by token (entity mentions by kind, the place \
             where a relation's value is said, Japanese text). Each concept's best feature and \
             threshold are chosen on the first and scored on the second.",
        );
        self.form_ui(ui, wb);
        let Some(scores) = wb.concept_scores.clone() else {
            return;
        };
        ui.separator();
        if wb.sae.as_ref().is_some_and(|sae| !scores.is_for(sae)) {
            ui.weak(format!(
                "(scored for {} with another model, or another SAE, than the one open now)",
                scores.sae_dir.display()
            ));
        }
        let report = &scores.report;
        summary_ui(ui, report);
        let selected = self.selected.and_then(|i| report.concepts.get(i));
        if !report.mean_sparse_probe_f1.is_empty() {
            sparse_probe_plot(ui, report, selected);
        }
        if let Some(pick) = concept_table(ui, report, self.selected) {
            match pick {
                Pick::Concept(i) => self.selected = Some(i),
                Pick::Feature(f) => {
                    wb.requests.push(PanelRequest::Feature(f));
                    wb.goto = Some(PanelKind::Features);
                }
            }
        }
    }
}

impl Concepts {
    fn form_ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        let f = &mut self.form;
        ui.add_enabled_ui(self.job.is_none(), |ui| {
            egui::Grid::new("concepts-form")
                .num_columns(2)
                .show(ui, |ui| {
                    let label = ui.label("Paragraphs per country").on_hover_text(
                        "Paragraph documents per country and language in each split",
                    );
                    ui.add(egui::DragValue::new(&mut f.docs_per_country).range(0..=20))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui
                        .label("Fact lists")
                        .on_hover_text("Fact-list documents per language in each split");
                    ui.add(egui::DragValue::new(&mut f.fact_lists).range(0..=5_000))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui
                        .label("k-sparse probes")
                        .on_hover_text(explain::SPARSE_PROBE);
                    ui.text_edit_singleline(&mut f.sparse_probe_ks)
                        .labelled_by(label.id);
                    ui.end_row();
                    ui.label("");
                    ui.checkbox(
                        &mut f.dense_probes,
                        "dense probes of the hook (the reference)",
                    )
                    .on_hover_text(explain::DENSE_PROBE);
                    ui.end_row();
                });
        });
        // The screenshot tour scores afresh: it measures the window while a real job runs.
        let tour = wb.take_request(&PanelRequest::Start(PanelKind::Concepts));
        ui.horizontal(|ui| match &self.job {
            None => {
                if ui.button("Score the SAE").clicked() || tour {
                    self.start(wb, !tour);
                }
            }
            Some(job) => job_row(ui, job),
        });
    }

    /// Scores the open SAE with the form's settings; `read_kept`: a score kept for them is
    /// read instead.
    pub fn start(&mut self, wb: &mut Workbench, read_kept: bool) {
        let (Some(model), Some(sae)) = (wb.model.clone(), wb.sae.clone()) else {
            return;
        };
        let ks = match self.form.ks() {
            Ok(ks) => ks,
            Err(message) => {
                wb.error(message);
                return;
            }
        };
        let context = sae.sae.metadata.context_size;
        let mut settings = ScoreSettings::new(window_segments(&model, context));
        settings.docs_per_country = self.form.docs_per_country;
        settings.fact_lists = self.form.fact_lists;
        settings.probes = self.form.dense_probes;
        settings.sparse_probe_ks = ks;
        // A score kept for this SAE, model and settings is read, not made again (not for
        // an edited model: the cache is named by the model's files).
        let path = (wb.history.is_empty()).then(|| concept_score_file(&sae, &settings));
        self.job_model = wb.model_version;
        self.job = Some(wb.spawn("concept scores", move |job| {
            let kept = path.as_deref().map(|path| Kept {
                path,
                read: read_kept,
            });
            let report = score_in_job(&model, &sae, &settings, kept, job)?;
            Ok(ConceptScores::new(&sae, report))
        }));
    }
}

fn summary_ui(ui: &mut egui::Ui, report: &ScoreReport) {
    let scored = report.concepts.iter().filter(|c| c.scored).count();
    ui.strong(format!(
        "Mean best-feature F1 {:.3} over {scored} concepts ({} held-out tokens); {} split across \
         several features",
        report.mean_f1, report.evaluation_tokens, report.split_concepts
    ))
    .on_hover_text(explain::CONCEPT_F1);
    if let Some(mean) = report.mean_probe_f1 {
        ui.label(format!("Dense probes of the hook: mean F1 {mean:.3}"))
            .on_hover_text(explain::DENSE_PROBE);
    }
    if let (Some(mean), Some(full)) = (report.mean_absorption, report.mean_full_absorption) {
        let by_difference = match (
            report.mean_absorption_by_mean_difference,
            report.mean_full_absorption_by_mean_difference,
        ) {
            (Some(mean), Some(full)) => format!(
                "; along the mean differences {mean:.3}, {:.1}% fully",
                100.0 * full
            ),
            _ => String::new(),
        };
        ui.label(format!(
            "Feature absorption: mean fraction {mean:.3}, tokens fully absorbed {:.1}%{by_difference}",
            100.0 * full
        ))
        .on_hover_text(explain::ABSORPTION);
    }
    if !report.mean_sparse_probe_f1.is_empty() {
        let means: Vec<String> = (report.mean_sparse_probe_f1.iter())
            .map(|m| format!("k={} {:.3}", m.k, m.f1))
            .collect();
        ui.label(format!("k-sparse probes: mean F1 {}", means.join(", ")))
            .on_hover_text(explain::SPARSE_PROBE);
    }
}

/// F1 against k: the mean over the scored concepts and the selected concept, with the best
/// features' and the dense probes' means as lines across.
fn sparse_probe_plot(ui: &mut egui::Ui, report: &ScoreReport, selected: Option<&ConceptScore>) {
    let ks: Vec<usize> = report.mean_sparse_probe_f1.iter().map(|m| m.k).collect();
    let mean: PlotPoints = (report.mean_sparse_probe_f1.iter().enumerate())
        .map(|(i, m)| [i as f64, m.f1])
        .collect();
    let concept = selected.map(|c| {
        let points: PlotPoints = (c.sparse_probes.iter().enumerate())
            .map(|(i, p)| [i as f64, p.evaluation.f1])
            .collect();
        (c.concept.clone(), points)
    });
    ui.label(match selected {
        Some(c) => format!("F1 of the k-sparse probes: the mean, and {}", c.concept),
        None => "F1 of the k-sparse probes (pick a concept below to draw its own)".into(),
    });
    Plot::new("concept-sparse-probes")
        .height(190.0)
        .allow_scroll(false)
        .allow_zoom(false)
        .allow_drag(false)
        .include_y(0.0)
        .include_y(1.0)
        .y_axis_label("F1")
        .legend(Legend::default().position(Corner::RightBottom))
        // The points are the table's figures: no coordinate read-out under the pointer.
        .show_x(false)
        .show_y(false)
        .x_grid_spacer(uniform_grid_spacer(|_| [1.0, 1.0, 1.0]))
        .x_axis_formatter(move |mark, _| {
            let i = mark.value.round();
            match ks.get(i as usize) {
                Some(k) if (mark.value - i).abs() < 1e-6 && i >= 0.0 => format!("k={k}"),
                _ => String::new(),
            }
        })
        .show(ui, |plot| {
            plot.line(Line::new("k-sparse probes, mean", mean));
            plot.hline(HLine::new("best single feature, mean", report.mean_f1));
            if let Some(probe) = report.mean_probe_f1 {
                plot.hline(HLine::new("dense probe, mean", probe));
            }
            if let Some((name, points)) = concept {
                plot.line(Line::new(name, points));
            }
        });
}

/// What a click in the table asks for.
enum Pick {
    Concept(usize),
    Feature(u32),
}

fn concept_table(ui: &mut egui::Ui, report: &ScoreReport, selected: Option<usize>) -> Option<Pick> {
    let mut pick = None;
    let ks: Vec<usize> = report.mean_sparse_probe_f1.iter().map(|m| m.k).collect();
    egui::Grid::new("concept-table")
        .striped(true)
        .num_columns(9 + ks.len())
        .show(ui, |ui| {
            ui.strong("concept");
            ui.strong("tokens");
            ui.strong("best feature")
                .on_hover_text("Opens the feature's page in Features");
            ui.strong("precision");
            ui.strong("recall");
            ui.strong("F1").on_hover_text(explain::CONCEPT_F1);
            ui.strong("probe F1").on_hover_text(explain::DENSE_PROBE);
            for k in &ks {
                ui.strong(format!("k={k}"))
                    .on_hover_text(explain::SPARSE_PROBE);
            }
            ui.strong("absorbed").on_hover_text(explain::ABSORPTION);
            ui.strong("split").on_hover_text(
                "Features that fire almost only on the concept (precision ≥ 0.9) and cover part \
                 of it: two or more mean the SAE split it",
            );
            ui.end_row();
            for (i, c) in report.concepts.iter().enumerate() {
                if !c.scored && i > 0 && report.concepts[i - 1].scored {
                    ui.weak("merged across languages (not scored)");
                    ui.end_row();
                }
                if ui
                    .selectable_label(selected == Some(i), &c.concept)
                    .clicked()
                {
                    pick = Some(Pick::Concept(i));
                }
                ui.label(c.positives.to_string());
                if ui.button(format!("#{}", c.best_feature)).clicked() {
                    pick = Some(Pick::Feature(c.best_feature));
                }
                ui.label(format!("{:.3}", c.evaluation.precision));
                ui.label(format!("{:.3}", c.evaluation.recall));
                ui.label(format!("{:.3}", c.evaluation.f1));
                ui.label(c.probe.map_or("-".into(), |p| format!("{:.3}", p.f1)));
                for p in &c.sparse_probes {
                    ui.label(format!("{:.3}", p.evaluation.f1));
                }
                match &c.absorption {
                    Some(a) => ui.label(format!("{:.3}", a.mean_fraction)).on_hover_text(format!(
                        "main features {:?} (decoder cosines with the probe {:.2?}); fully absorbed on {:.1}% of {} tokens; top absorbers \
                         (latent, tokens): {:?}{}",
                        a.main_features,
                        a.main_cosines,
                        100.0 * a.full_rate,
                        a.tokens,
                        a.top_absorbers,
                        c.absorption_by_mean_difference.as_ref().map_or(String::new(), |d| format!(
                            "\nalong the mean difference: fraction {:.3}, fully absorbed {:.1}%, top absorbers {:?}",
                            d.mean_fraction,
                            100.0 * d.full_rate,
                            d.top_absorbers
                        ))
                    )),
                    None => ui.label("-"),
                };
                ui.label(c.split_text());
                ui.end_row();
            }
        });
    pick
}
