//! Patching: activation patching between a clean and a corrupted prompt, one site at a time
//! (residual stream, attention and MLP outputs per block × position; each head's output and
//! pattern, at every position or at each), with attribution patching's estimate beside it.

use egui::vec2;

use super::{Panel, PanelKind, Reader, need_model};
use crate::features::patching::{FeaturePatchReport, patch_features};
use crate::gui::style::explain;
use crate::gui::widgets::{Heatmap, display_token, job_row};
use crate::gui::workbench::{OpenSae, PanelRequest, Workbench};
use crate::jobs::JobHandle;
use crate::model::Model;
use crate::patching::{
    Direction, Layout, PatchGrid, PatchReport, PatchRequest, PromptPair, Site, passes, patch,
};
use crate::path_patching::{PathReport, PathRequest, Receiver, path_patch};

/// Cells offered as buttons under the grid.
const STRONGEST: usize = 3;

/// What a run answers: the form as it was when asked.
#[derive(Clone, Debug, PartialEq)]
struct Query {
    clean: String,
    corrupted: String,
    /// Empty: the model's prediction after the prompt.
    answer: String,
    wrong: String,
    direction: Direction,
    /// The open SAE, whose features are patched too.
    sae: Option<std::path::PathBuf>,
}

/// A run's answer.
struct Reading {
    report: PatchReport,
    features: Option<FeaturePatchReport>,
}

/// A path-patching run: the pair as the form had it, and the receivers as typed.
#[derive(Clone, Debug, PartialEq)]
struct PathQuery {
    pair: Query,
    receivers: String,
}

pub struct Patching {
    form: Query,
    site: Site,
    reader: Reader<Query, Reading>,
    /// Receivers of path patching, as typed (`logits`, `4.0:q,4.0:k`).
    receivers: String,
    paths: Reader<PathQuery, PathReport>,
}

impl Default for Patching {
    fn default() -> Self {
        Self {
            form: Query {
                clean: "The capital of Japan is".into(),
                corrupted: "The capital of France is".into(),
                answer: String::new(),
                wrong: String::new(),
                direction: Direction::Denoise,
                sae: None,
            },
            site: Site::ResidPre,
            reader: Reader::default(),
            receivers: "logits".into(),
            paths: Reader::default(),
        }
    }
}

impl Panel for Patching {
    fn kind(&self) -> PanelKind {
        PanelKind::Patching
    }

    fn busy(&self) -> bool {
        self.reader.busy() || self.paths.busy()
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        self.reader.poll(wb);
        self.paths.poll(wb);
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        let dims = model.dims().clone();
        let mut run = self.form_ui(ui);
        ui.horizontal(|ui| {
            ui.label("Patch");
            run |= ui
                .radio_value(
                    &mut self.form.direction,
                    Direction::Denoise,
                    "clean values into the corrupted run",
                )
                .on_hover_text(explain::DENOISING)
                .clicked();
            run |= ui
                .radio_value(
                    &mut self.form.direction,
                    Direction::Noise,
                    "corrupted values into the clean run",
                )
                .on_hover_text(explain::NOISING)
                .clicked();
            run |= ui.button("Patch").clicked();
            if let Some(job) = self.reader.job() {
                ui.separator();
                job_row(ui, job);
            }
        });
        // A newly opened SAE is patched too.
        self.form.sae = wb.sae.as_ref().map(|s| s.dir.clone());
        let sae_changed = self
            .reader
            .asked_mut()
            .is_some_and(|asked| asked.sae != self.form.sae);
        if run || sae_changed || self.reader.asked_mut().is_none() {
            self.reader.ask(self.form.clone());
        }
        if run || self.paths.asked_mut().is_none() {
            ask_paths(&mut self.paths, &self.form, &self.receivers);
        }
        let path_model = model.clone();
        self.paths.run_due(wb, "path patching", move |query, job| {
            run_paths(&path_model, query, job)
        });
        let sae = wb.sae.clone();
        self.reader
            .run_due(wb, "activation patching", move |query, job| {
                run_patch(&model, sae.as_deref(), query, job)
            });
        let Some(answer) = self.reader.answer() else {
            return;
        };
        let report = &answer.value.report;
        ui.separator();
        ui.label(format!(
            "logit({}) − logit({}): clean {:.3}, corrupted {:.3}. Each cell: the patched run's \
             logit difference, 0 = the corrupted run, 1 = the clean run.",
            display_token(&report.answer),
            display_token(&report.wrong),
            report.clean_logit_diff,
            report.corrupted_logit_diff
        ))
        .on_hover_text(explain::PATCHING_SCALE);
        ui.horizontal_wrapped(|ui| {
            ui.label("Site");
            for site in Site::ALL {
                ui.radio_value(&mut self.site, site, site.name())
                    .on_hover_text(explain::patching_site(site));
            }
        });
        let Some(grid) = report.grid(self.site) else {
            return;
        };
        let scale = colour_scale(report, grid);
        ui.weak(format!(
            "red: above the unpatched run ({}), blue: below it; the colours saturate {scale:.2} \
             away, this site's largest effect",
            report.direction.unpatched(),
        ));
        ui.weak(match grid.site.layout() {
            Layout::Heads if grid.site.patches_key_heads() => {
                "rows: blocks; columns: key heads (click one to see the first of its heads' \
                 attention patterns)"
            }
            Layout::Heads => {
                "rows: blocks; columns: heads (click a head to see its attention pattern)"
            }
            Layout::HeadsByPosition if grid.site.patches_key_heads() => {
                "rows: key heads (block.K head); columns: tokens (click one to see the first of \
                 its heads' attention patterns)"
            }
            Layout::HeadsByPosition => {
                "rows: heads (block.head); columns: tokens (click a head to see its attention \
                 pattern)"
            }
            Layout::Positions => "rows: tokens (a changed one as clean→corrupted); columns: blocks",
        });
        let mut picked = None;
        ui.horizontal_top(|ui| {
            ui.vertical(|ui| {
                ui.strong("activation patching");
                picked = grid_view(ui, report, grid, &grid.patched, scale);
            });
            if let Some(estimate) = &grid.attribution {
                ui.add_space(12.0);
                ui.vertical(|ui| {
                    ui.strong("attribution patching's estimate")
                        .on_hover_text(explain::ATTRIBUTION_PATCHING);
                    grid_view(ui, report, grid, estimate, scale);
                    if let Some(r) = grid.agreement() {
                        ui.label(format!("correlation with patching {r:.3}"));
                    }
                });
            }
        });
        ui.horizontal(|ui| {
            ui.label("moved most by:");
            let seq = report.clean_tokens.len();
            for (layer, column, v) in grid.ranked(report.direction).into_iter().take(STRONGEST) {
                let at = |p: usize| display_token(&report.clean_tokens[p]);
                let kind = if grid.site.patches_key_heads() {
                    "key head"
                } else {
                    "head"
                };
                match grid.site.cell(column, seq) {
                    (Some(head), position) => {
                        let text = match position {
                            Some(p) => format!("{kind} {layer}.{head} at {} {v:.2}", at(p)),
                            None => format!("{kind} {layer}.{head} {v:.2}"),
                        };
                        if ui
                            .button(text)
                            .on_hover_text("show its attention pattern")
                            .clicked()
                        {
                            picked = Some((layer, head));
                        }
                    }
                    (None, position) => {
                        let p = position.unwrap_or_default();
                        ui.label(format!("block {layer} at {} {v:.2}", at(p)));
                    }
                }
            }
        });
        if let Some((layer, head)) = picked {
            // A key head's pattern is that of the first query head reading it.
            let head = head * (dims.n_heads / grid.site.heads(&dims)).max(1);
            wb.requests.push(PanelRequest::Pattern {
                prompt: answer.question.clean.clone(),
                layer,
                head,
            });
            wb.goto = Some(PanelKind::Attention);
        }
        ui.separator();
        if let Some((layer, head)) = paths_ui(
            ui,
            &mut self.receivers,
            &mut self.paths,
            &self.form,
            wb.model_version,
        ) {
            wb.requests.push(PanelRequest::Pattern {
                prompt: answer.question.clean.clone(),
                layer,
                head,
            });
            wb.goto = Some(PanelKind::Attention);
        }
        if let Some(features) = &answer.value.features {
            ui.add_space(6.0);
            if let Some(feature) = feature_table(ui, features, wb) {
                wb.requests.push(PanelRequest::Feature(feature));
                wb.goto = Some(PanelKind::Features);
            }
        }
        if answer.model_version != wb.model_version {
            ui.weak("(computed before the model's last change; patching again)");
        }
    }
}

/// SAE features listed under the grids.
const FEATURES_SHOWN: usize = 8;

/// The SAE features whose change moves the answer most; returns a clicked feature.
fn feature_table(ui: &mut egui::Ui, f: &FeaturePatchReport, wb: &Workbench) -> Option<u32> {
    let at = if f.hook == f.hook_out {
        f.hook.clone()
    } else {
        format!("{} → {}", f.hook, f.hook_out)
    };
    ui.strong(format!("SAE features at {at}"))
        .on_hover_text(explain::FEATURE_PATCHING);
    ui.label(format!(
        "every feature's change patched at once: {:.2}; the hook's whole value: {:.2} \
         (the rest is the SAE's error term, and a skip transcoder's skip path); {} token × \
         feature activations differ",
        f.all_features, f.whole_hook, f.changed
    ));
    let mut clicked = None;
    egui::Grid::new("patched features")
        .striped(true)
        .num_columns(7)
        .show(ui, |ui| {
            for title in [
                "feature",
                "concept",
                "token",
                "clean",
                "corrupted",
                "estimate",
                "patched",
            ] {
                ui.strong(title);
            }
            ui.end_row();
            for e in f.features.iter().take(FEATURES_SHOWN) {
                if ui
                    .button(format!("#{}", e.feature))
                    .on_hover_text("open its page")
                    .clicked()
                {
                    clicked = Some(e.feature);
                }
                ui.label(wb.labels.get(&e.feature).map_or("", String::as_str));
                ui.label(display_token(&f.tokens[e.position]));
                for v in [e.clean, e.corrupted, e.estimate, e.patched] {
                    ui.label(format!("{v:.3}"));
                }
                ui.end_row();
            }
        });
    clicked
}

/// Asks path patching for the pair in `form` and the receivers as typed.
fn ask_paths(paths: &mut Reader<PathQuery, PathReport>, form: &Query, receivers: &str) {
    paths.ask(PathQuery {
        pair: Query {
            sae: None,
            ..form.clone()
        },
        receivers: receivers.to_string(),
    });
}

/// Path patching: the receivers' field and the senders' grid for the pair in `form`; returns
/// a clicked head.
fn paths_ui(
    ui: &mut egui::Ui,
    receivers: &mut String,
    paths: &mut Reader<PathQuery, PathReport>,
    form: &Query,
    model_version: u64,
) -> Option<(usize, usize)> {
    let mut ask = false;
    ui.horizontal(|ui| {
        ui.strong("Path patching")
            .on_hover_text(explain::PATH_PATCHING);
        let label = ui.label("Receivers");
        let response = ui
            .add_sized(
                [220.0, ui.spacing().interact_size.y],
                egui::TextEdit::singleline(receivers).hint_text("logits, or 4.0:q,4.0:k,4.0:v"),
            )
            .labelled_by(label.id)
            .on_hover_text(explain::PATH_PATCHING);
        ask |= crate::gui::widgets::entered(ui, &response);
        ask |= ui.button("Trace paths").clicked();
        if let Some(job) = paths.job() {
            job_row(ui, job);
        }
    });
    if ask {
        ask_paths(paths, form, receivers);
    }
    let answer = paths.answer()?;
    if answer.model_version != model_version {
        ui.weak("(computed before the model's last change; tracing again)");
    }
    let report = &answer.value;
    let unpatched = report.direction.unpatched();
    let scale = largest_effect(report.senders.iter().flatten(), unpatched);
    ui.weak(format!(
        "paths to {}: rows: sender blocks; columns: heads (click one to see its attention \
         pattern); the colours saturate {scale:.2} from the unpatched run",
        report.receivers.join(", ")
    ));
    let layers = report.senders.len();
    let heads = report.senders.first().map_or(0, Vec::len);
    let flat: Vec<f32> = report.senders.iter().flatten().copied().collect();
    let rows: Vec<String> = (0..layers).map(|l| format!("block {l}")).collect();
    let cols: Vec<String> = (0..heads).map(|h| format!("H{h}")).collect();
    let mut picked = Heatmap {
        values: &flat,
        rows: layers,
        cols: heads,
        row_labels: &rows,
        col_labels: &cols,
        cell: vec2(34.0, 18.0),
        what: "sender patched",
        max: Some(scale),
        centre: Some(unpatched),
    }
    .show(ui);
    ui.horizontal(|ui| {
        ui.label("sent most by:");
        for (layer, head, v) in report.ranked().into_iter().take(STRONGEST) {
            if ui
                .button(format!("sender {layer}.{head} {v:.2}"))
                .on_hover_text("show its attention pattern")
                .clicked()
            {
                picked = Some((layer, head));
            }
        }
    });
    picked
}

impl Patching {
    /// The prompts and answers; true when Enter was pressed in one of them.
    fn form_ui(&mut self, ui: &mut egui::Ui) -> bool {
        let mut entered = false;
        let mut field =
            |ui: &mut egui::Ui, label: &str, text: &mut String, hint: &str, width: f32| {
                let label = ui.label(label);
                // Sized explicitly: a text field in a grid cell shrinks to the cell's width.
                let response = ui
                    .add_sized(
                        [width, ui.spacing().interact_size.y],
                        egui::TextEdit::singleline(text).hint_text(hint),
                    )
                    .labelled_by(label.id);
                entered |= crate::gui::widgets::entered(ui, &response);
            };
        // Measured outside the grid, whose cells start narrow.
        let width = (ui.available_width() - 360.0).max(200.0);
        egui::Grid::new("patching form")
            .num_columns(4)
            .spacing(vec2(8.0, 4.0))
            .show(ui, |ui| {
                field(
                    ui,
                    "Clean prompt",
                    &mut self.form.clean,
                    "The capital of Japan is",
                    width,
                );
                field(ui, "Answer", &mut self.form.answer, "its prediction", 90.0);
                ui.end_row();
                field(
                    ui,
                    "Corrupted prompt",
                    &mut self.form.corrupted,
                    "the same number of tokens, a few changed",
                    width,
                );
                field(
                    ui,
                    "Wrong answer",
                    &mut self.form.wrong,
                    "its prediction",
                    90.0,
                );
                ui.end_row();
            });
        entered
    }
}

/// Every site patched and estimated for one query, and the open SAE's features.
fn run_patch(
    model: &Model,
    sae: Option<&OpenSae>,
    query: &Query,
    job: &JobHandle,
) -> anyhow::Result<Reading> {
    let pair = PromptPair {
        clean: &query.clean,
        corrupted: &query.corrupted,
        answer: Some(query.answer.as_str()).filter(|t| !t.is_empty()),
        wrong: Some(query.wrong.as_str()).filter(|t| !t.is_empty()),
    };
    let request = PatchRequest {
        attribution: true,
        ..PatchRequest::from_prompts(model, &pair, query.direction)?
    };
    let total = passes(model, &request) as u64;
    let cancelled = || anyhow::anyhow!("cancelled");
    let report = patch(model, &request, job.cancel_flag(), &mut |done, _| {
        job.set_progress(done as u64, total, "passes")
    })?
    .ok_or_else(cancelled)?;
    let features = match sae {
        Some(open) => {
            job.set_message("SAE features");
            let found = patch_features(
                model,
                &open.sae.sae,
                open.site(),
                &request,
                FEATURES_SHOWN,
                job.cancel_flag(),
            )?;
            Some(found.ok_or_else(cancelled)?)
        }
        None => None,
    };
    Ok(Reading { report, features })
}

/// Path patching for one query; a receiver list that does not parse is the job's error.
fn run_paths(model: &Model, query: &PathQuery, job: &JobHandle) -> anyhow::Result<PathReport> {
    let receivers = query
        .receivers
        .split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.trim().parse::<Receiver>())
        .collect::<crate::Result<Vec<_>>>()?;
    let pair = PromptPair {
        clean: &query.pair.clean,
        corrupted: &query.pair.corrupted,
        answer: Some(query.pair.answer.as_str()).filter(|t| !t.is_empty()),
        wrong: Some(query.pair.wrong.as_str()).filter(|t| !t.is_empty()),
    };
    let request = PathRequest {
        pair: PatchRequest::from_prompts(model, &pair, query.pair.direction)?,
        receivers,
    };
    let total = request.passes(model) as u64;
    path_patch(model, &request, job.cancel_flag(), &mut |done, _| {
        job.set_progress(done as u64, total, "passes")
    })?
    .ok_or_else(|| anyhow::anyhow!("cancelled"))
}

/// How far from the unpatched run a site's colours saturate: its largest effect, patched or
/// estimated, so that both grids of a site share one scale and small effects still show.
fn colour_scale(report: &PatchReport, grid: &PatchGrid) -> f32 {
    largest_effect(
        std::iter::once(&grid.patched)
            .chain(&grid.attribution)
            .flatten()
            .flatten(),
        report.direction.unpatched(),
    )
}

/// The largest finite distance of `values` from the unpatched run's score (at least 1e-6, so
/// that a flat grid still has a scale).
fn largest_effect<'a>(values: impl Iterator<Item = &'a f32>, unpatched: f32) -> f32 {
    values
        .filter(|v| v.is_finite())
        .map(|v| (v - unpatched).abs())
        .fold(0.0f32, f32::max)
        .max(1e-6)
}

/// One grid: block × position grids drawn with tokens down and blocks across (the prompt
/// reads down, as in causal tracing), the head grid with blocks down and heads across, the
/// head × position grids with heads down and tokens across; colours saturate `scale` from
/// the unpatched run. Returns a clicked head as (block, head).
fn grid_view(
    ui: &mut egui::Ui,
    report: &PatchReport,
    grid: &PatchGrid,
    values: &[Vec<f32>],
    scale: f32,
) -> Option<(usize, usize)> {
    let layers = values.len();
    let columns = values.first().map_or(0, Vec::len);
    let what = format!("{} patched", grid.site.name());
    let tokens: Vec<String> = report
        .position_labels()
        .iter()
        .map(|t| display_token(t))
        .collect();
    if grid.site.layout() == Layout::HeadsByPosition {
        // Row-major over (block, head), a row's cells the positions: as stored.
        let seq = tokens.len().max(1);
        let heads = columns / seq;
        let flat: Vec<f32> = values.iter().flatten().copied().collect();
        let prefix = if grid.site.patches_key_heads() {
            "K"
        } else {
            ""
        };
        let rows: Vec<String> = (0..layers * heads)
            .map(|r| format!("{}.{prefix}{}", r / heads, r % heads))
            .collect();
        let clicked = Heatmap {
            values: &flat,
            rows: layers * heads,
            cols: seq,
            row_labels: &rows,
            col_labels: &tokens,
            cell: vec2(64.0, 11.0),
            what: &what,
            max: Some(scale),
            centre: Some(report.direction.unpatched()),
        }
        .show(ui);
        return clicked.map(|(r, _)| (r / heads, r % heads));
    }
    if grid.site.layout() == Layout::Heads {
        let flat: Vec<f32> = values.iter().flatten().copied().collect();
        let rows: Vec<String> = (0..layers).map(|l| format!("block {l}")).collect();
        let prefix = if grid.site.patches_key_heads() {
            "K"
        } else {
            "H"
        };
        let cols: Vec<String> = (0..columns).map(|h| format!("{prefix}{h}")).collect();
        return Heatmap {
            values: &flat,
            rows: layers,
            cols: columns,
            row_labels: &rows,
            col_labels: &cols,
            cell: vec2(34.0, 18.0),
            what: &what,
            max: Some(scale),
            centre: Some(report.direction.unpatched()),
        }
        .show(ui);
    }
    let transposed: Vec<f32> = (0..columns)
        .flat_map(|p| values.iter().map(move |row| row[p]))
        .collect();
    let cols: Vec<String> = (0..layers).map(|l| format!("{l}")).collect();
    Heatmap {
        values: &transposed,
        rows: columns,
        cols: layers,
        row_labels: &tokens,
        col_labels: &cols,
        cell: vec2(26.0, 18.0),
        what: &what,
        max: Some(scale),
        centre: Some(report.direction.unpatched()),
    }
    .show(ui);
    None
}
