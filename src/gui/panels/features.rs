//! Features: a searchable, sortable list of the SAE's features and a page per feature — top
//! contexts with per-token highlighting, quantile-bin samples, the activation histogram,
//! logit effects and nearest features (Neuronpedia / sae_vis style).

use egui_plot::{Bar, BarChart, Plot};

use super::{Panel, PanelKind, running, take};
use crate::features::store::{FeatureStore, StoredFeature};
use crate::gui::style::explain;
use crate::gui::widgets::token_chips;
use crate::gui::widgets::{job_row, spinner};
use crate::gui::workbench::window_segments;
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::Job;
use crate::sae::activations::{ActivationSource, Corpus, WindowSettings};
use crate::sae::eval::{EvalReport, EvalSettings, evaluate};

#[derive(Clone, Copy, Debug, PartialEq)]
enum SortBy {
    Index,
    Density,
    MaxActivation,
    Labelled,
}

pub struct Features {
    search: String,
    sort: SortBy,
    descending: bool,
    hide_dead: bool,
    selected: Option<u32>,
    /// The filtered, sorted feature rows (indices into the store), rebuilt when the query
    /// changes.
    rows: Vec<usize>,
    rows_for: Option<(String, SortBy, bool, bool, usize, usize)>,
    eval_job: Option<Job<EvalReport>>,
    /// The SAE's evaluation and the SAE it was made for.
    eval: Option<(std::path::PathBuf, EvalReport)>,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            search: String::new(),
            sort: SortBy::Density,
            descending: true,
            hide_dead: true,
            selected: None,
            rows: Vec::new(),
            rows_for: None,
            eval_job: None,
            eval: None,
        }
    }
}

impl Panel for Features {
    fn kind(&self) -> PanelKind {
        PanelKind::Features
    }

    fn busy(&self) -> bool {
        running(&self.eval_job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        wb.requests.retain(|r| match r {
            PanelRequest::Feature(f) => {
                self.selected = Some(*f);
                false
            }
            _ => true,
        });
        let Some(store) = wb.store.clone() else {
            if wb.sae.is_none() && wb.sae_dir.is_none() {
                ui.label("No SAE is open. Open one (top right), or train one in Train.");
            } else {
                ui.horizontal(|ui| {
                    spinner(ui);
                    ui.label("Reading the SAE and its feature statistics (progress below)…");
                });
            }
            return;
        };
        if let Some(report) = take(&mut self.eval_job, wb)
            && let Some(sae) = &wb.sae
        {
            self.eval = Some((sae.dir.clone(), report));
        }
        self.eval_ui(ui, wb);
        ui.horizontal(|ui| {
            ui.label(format!(
                "{} features of {} on {}, statistics over {} tokens of {}",
                store.info.d_sae,
                crate::gui::workbench::short_path(std::path::Path::new(&store.info.sae_dir)),
                store.info.hook,
                store.info.tokens,
                store.info.corpus
            ));
        });
        ui.columns(2, |columns| {
            self.list_ui(&mut columns[0], wb, &store);
            match self.selected.and_then(|f| store.features.get(f as usize)) {
                Some(feature) => feature_page(&mut columns[1], wb, &store, feature),
                None => {
                    columns[1].label("Pick a feature on the left.");
                }
            }
        });
    }
}

impl Features {
    /// The SAE's quality on the world corpus: L0, FVU, dead/dense latents, CE loss recovered.
    fn eval_ui(&mut self, ui: &mut egui::Ui, wb: &Workbench) {
        let (Some(model), Some(sae)) = (wb.model.clone(), wb.sae.clone()) else {
            return;
        };
        ui.horizontal_wrapped(|ui| {
            match &self.eval_job {
                Some(job) => job_row(ui, job),
                None => {
                    if ui
                        .button("Evaluate SAE")
                        .on_hover_text(
                            "splice the SAE into the model at its hook over 64 windows of the world corpus",
                        )
                        .clicked()
                    {
                        let (model, sae) = (model.clone(), sae.clone());
                        self.eval_job = Some(wb.spawn("evaluate SAE", move |job| {
                            let context = window_segments(&model, sae.sae.metadata.context_size)
                                .context_size;
                            let settings = WindowSettings {
                                context_size: context,
                                prepend_bos: true,
                                exclude_special: true,
                                windows_per_forward: 16,
                            };
                            let corpus = Corpus::parse("world", "text")?;
                            let hook = sae.hook.to_string();
                            let mut source =
                                ActivationSource::new(&model, corpus, &hook, settings)?;
                            let settings = EvalSettings {
                                windows: 64,
                                ..Default::default()
                            };
                            let writes = sae.hook_out;
                            Ok(evaluate(
                                &mut source,
                                &sae.sae.sae,
                                writes,
                                &settings,
                                |done, total| job.set_progress(done as u64, total as u64, "windows"),
                            )?)
                        }));
                    }
                }
            }
            if let Some((dir, r)) = &self.eval
                && *dir == sae.dir
            {
                for (text, tip) in [
                    (format!("L0 {:.1}", r.l0), explain::L0),
                    (format!("FVU {:.3}", r.fvu), explain::FVU),
                    (format!("dead {:.1}%", 100.0 * r.dead_fraction), explain::DEAD),
                    (format!("dense {:.1}%", 100.0 * r.dense_fraction), explain::DENSE),
                    (
                        format!("CE loss recovered {:.1}%", 100.0 * r.ce_loss_recovered),
                        explain::CE_RECOVERED,
                    ),
                    (format!("ΔLM loss {:.3}", r.delta_lm_loss), explain::DELTA_LM),
                ] {
                    ui.label(text).on_hover_text(tip);
                }
                ui.weak(format!("({} tokens)", r.tokens));
            }
        });
    }

    fn list_ui(&mut self, ui: &mut egui::Ui, wb: &Workbench, store: &FeatureStore) {
        ui.horizontal(|ui| {
            let label = ui.label("Search");
            ui.add(
                egui::TextEdit::singleline(&mut self.search)
                    .hint_text("id, concept or logit token")
                    .desired_width(180.0),
            )
            .labelled_by(label.id);
            ui.checkbox(&mut self.hide_dead, "hide dead");
        });
        ui.horizontal(|ui| {
            ui.label("Sort by");
            egui::ComboBox::from_id_salt("sort")
                .selected_text(match self.sort {
                    SortBy::Index => "index",
                    SortBy::Density => "density",
                    SortBy::MaxActivation => "max activation",
                    SortBy::Labelled => "concept label",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.sort, SortBy::Index, "index");
                    ui.selectable_value(&mut self.sort, SortBy::Density, "density")
                        .on_hover_text(explain::DENSITY);
                    ui.selectable_value(&mut self.sort, SortBy::MaxActivation, "max activation")
                        .on_hover_text(explain::MAX_ACT);
                    ui.selectable_value(&mut self.sort, SortBy::Labelled, "concept label");
                });
            ui.checkbox(&mut self.descending, "descending");
        });
        let key = (
            self.search.clone(),
            self.sort,
            self.descending,
            self.hide_dead,
            wb.labels.len(),
            store.features.len(),
        );
        if self.rows_for.as_ref() != Some(&key) {
            self.rows = filter_and_sort(store, wb, &self.search, self.sort, self.hide_dead);
            if self.descending {
                self.rows.reverse();
            }
            self.rows_for = Some(key);
        }
        ui.label(format!("{} shown", self.rows.len()));
        let row_height = ui.text_style_height(&egui::TextStyle::Body) + 6.0;
        egui::ScrollArea::vertical()
            .id_salt("feature-list")
            .max_height(ui.available_height().max(400.0))
            .show_rows(ui, row_height, self.rows.len(), |ui, range| {
                egui::Grid::new("feature-rows")
                    .num_columns(4)
                    .striped(true)
                    .show(ui, |ui| {
                        for &i in &self.rows[range] {
                            let f = &store.features[i];
                            let selected = self.selected == Some(f.feature);
                            if ui
                                .selectable_label(selected, format!("#{}", f.feature))
                                .clicked()
                            {
                                self.selected = Some(f.feature);
                            }
                            ui.label(format!("{:.2e}", f.density))
                                .on_hover_text(explain::DENSITY);
                            ui.label(format!("{:.2}", f.max_activation))
                                .on_hover_text(explain::MAX_ACT);
                            let label = wb
                                .labels
                                .get(&f.feature)
                                .cloned()
                                .unwrap_or_else(|| top_logits_text(f, 3));
                            ui.label(label);
                            ui.end_row();
                        }
                    });
            });
    }
}

fn top_logits_text(f: &StoredFeature, n: usize) -> String {
    f.top_logits
        .iter()
        .take(n)
        .map(|(t, _)| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Feature rows matching `search` (a feature id, or text found in its label or top logit
/// tokens), in ascending `sort` order.
fn filter_and_sort(
    store: &FeatureStore,
    wb: &Workbench,
    search: &str,
    sort: SortBy,
    hide_dead: bool,
) -> Vec<usize> {
    let query = search.trim().to_lowercase();
    let id: Option<u32> = query.trim_start_matches('#').parse().ok();
    let mut rows: Vec<usize> = store
        .features
        .iter()
        .enumerate()
        .filter(|(_, f)| !hide_dead || f.fire_count > 0 || id == Some(f.feature))
        .filter(|(_, f)| {
            query.is_empty()
                || id == Some(f.feature)
                || wb
                    .labels
                    .get(&f.feature)
                    .is_some_and(|l| l.to_lowercase().contains(&query))
                || f.top_logits
                    .iter()
                    .any(|(t, _)| t.to_lowercase().contains(&query))
        })
        .map(|(i, _)| i)
        .collect();
    let f = |i: usize| &store.features[i];
    match sort {
        SortBy::Index => rows.sort_by_key(|&i| f(i).feature),
        SortBy::Density => rows.sort_by(|&a, &b| f(a).density.total_cmp(&f(b).density)),
        SortBy::MaxActivation => {
            rows.sort_by(|&a, &b| f(a).max_activation.total_cmp(&f(b).max_activation))
        }
        SortBy::Labelled => rows.sort_by_key(|&i| {
            (
                wb.labels.contains_key(&f(i).feature),
                wb.labels.get(&f(i).feature).cloned(),
            )
        }),
    }
    rows
}

fn feature_page(ui: &mut egui::Ui, wb: &mut Workbench, store: &FeatureStore, f: &StoredFeature) {
    ui.horizontal(|ui| {
        ui.heading(format!("Feature #{}", f.feature));
        if ui
            .button("Steer with it in the Playground")
            .on_hover_text("adds it to the Playground's steering sliders and colours tokens by it")
            .clicked()
        {
            wb.requests.push(PanelRequest::Steer(f.feature));
            wb.goto = Some(PanelKind::Playground);
        }
    });
    if let Some(label) = wb.labels.get(&f.feature) {
        ui.label(format!("ground-truth concept: {label}"))
            .on_hover_text("the world concept this feature detects best (features score)");
    }
    let scores =
        (wb.concept_scores.as_ref()).filter(|c| wb.sae.as_ref().is_some_and(|sae| c.is_for(sae)));
    if let Some(scores) = scores {
        let roles = scores.report.roles_of(f.feature);
        if !roles.is_empty() {
            ui.label("In the Concepts panel's scores:")
                .on_hover_text(explain::ABSORPTION);
            for role in roles {
                ui.label(format!("  • {role}"));
            }
        }
    }
    egui::Grid::new("feature-stats")
        .num_columns(2)
        .show(ui, |ui| {
            ui.label("density").on_hover_text(explain::DENSITY);
            ui.label(format!("{:.3e} ({} firings)", f.density, f.fire_count));
            ui.end_row();
            ui.label("max activation").on_hover_text(explain::MAX_ACT);
            ui.label(format!("{:.3}", f.max_activation));
            ui.end_row();
            ui.label("mean activation (when firing)");
            ui.label(format!("{:.3}", f.mean_activation));
            ui.end_row();
        });

    ui.add_space(4.0);
    ui.strong("Activation histogram");
    let bars: Vec<Bar> = f
        .histogram
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            Bar::new(
                (i as f64 + 0.5) * f.histogram_bin_width as f64,
                (n as f64 + 1.0).log10(),
            )
            .width(f.histogram_bin_width as f64 * 0.9)
            .name(format!("{n} tokens"))
        })
        .collect();
    Plot::new(("histogram", f.feature))
        .height(120.0)
        .allow_scroll(false)
        .allow_zoom(false)
        .allow_drag(false)
        .x_axis_label("activation")
        .y_axis_label("log10(1 + tokens)")
        .show(ui, |plot| plot.bar_chart(BarChart::new("tokens", bars)));

    ui.add_space(4.0);
    ui.horizontal_top(|ui| {
        ui.vertical(|ui| {
            ui.strong("Promotes (logit effect)").on_hover_text(
                "W_dec row through the rest of the model's direct path to the unembedding",
            );
            for (t, v) in &f.top_logits {
                ui.label(format!("{v:+.3}  {t:?}"));
            }
        });
        ui.vertical(|ui| {
            ui.strong("Suppresses");
            for (t, v) in &f.bottom_logits {
                ui.label(format!("{v:+.3}  {t:?}"));
            }
        });
        ui.vertical(|ui| {
            ui.strong("Nearest features")
                .on_hover_text("cosine similarity of decoder directions");
            for &(n, cos) in &f.neighbours {
                if ui.link(format!("#{n}  cos {cos:.2}")).clicked() {
                    wb.requests.push(PanelRequest::Feature(n));
                }
            }
        });
    });

    ui.add_space(4.0);
    ui.strong("Top contexts");
    let max = f.max_activation.max(1e-6);
    let mut shown_interval = None;
    for c in &f.contexts {
        if let Some((low, high)) = c.interval
            && shown_interval != Some((low, high))
        {
            ui.add_space(4.0);
            ui.strong(format!("Activations in [{low:.2}, {high:.2})"))
                .on_hover_text("random samples from this quantile bin of the activations");
            shown_interval = Some((low, high));
        }
        ui.horizontal(|ui| {
            ui.label(egui::RichText::new(format!("{:.2}", c.activation)).monospace());
            token_chips(
                ui,
                &c.tokens,
                Some(&c.token_activations),
                max,
                Some(c.peak as usize),
            );
        });
    }
    if f.contexts.is_empty() {
        ui.weak(format!(
            "never fired in the {} tokens of the statistics",
            store.info.tokens
        ));
    }
}
