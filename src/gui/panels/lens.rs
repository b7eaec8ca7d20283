//! Lens: the logit lens at every position (what the stream would predict if the model stopped
//! after each block) and the direct logit attribution of one token's logit to the embeddings
//! and each block's attention and MLP output (TransformerLens's `accumulated_resid` and
//! `decompose_resid`). A tuned lens, trained here as a background job or loaded from a file,
//! can stand in for the logit lens.

use std::sync::Arc;

use egui::{Color32, Sense, Stroke, vec2};
use egui_plot::{AxisHints, Bar, BarChart, Line, Plot, PlotPoints, uniform_grid_spacer};

use super::{Panel, PanelKind, Reader, need_model, running, take};
use crate::gui::style::{explain, heat_colour};
use crate::gui::widgets::{display_token, entered, labelled_field, prompt_row};
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::Job;
use crate::lens::{LensCell, LensReport, LensRequest, continuation_token, lens};
use crate::model::Model;
use crate::sae::activations::Corpus;
use crate::tuned_lens::{TrainSettings, TunedLens, train};

/// Tokens listed when a grid cell is hovered.
const TOP_K: usize = 5;
/// Width of the grid's row labels.
const LABEL_WIDTH: f32 = 96.0;

/// What the lens is asked; a reading answers one.
#[derive(Clone, Debug, PartialEq)]
struct Query {
    prompt: String,
    target: String,
    versus: String,
    /// `None`: the last token.
    position: Option<usize>,
    /// Which tuned lens reads the stream (its number), `None`: the logit lens.
    tuned: Option<u64>,
}

/// What colours a grid cell.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shade {
    /// The probability of the cell's own top token.
    Top,
    /// The probability of the token that really comes next in the prompt.
    Next,
}

pub struct Lens {
    prompt: String,
    target: String,
    versus: String,
    shade: Shade,
    reader: Reader<Query, LensReport>,
    tuned: TunedForm,
}

/// The tuned lens: one trained here or loaded, and whether the lens reads through it.
struct TunedForm {
    /// With the number it was made under (a new one re-reads).
    lens: Option<(u64, Arc<TunedLens>)>,
    made: u64,
    on: bool,
    tokens: u64,
    file: String,
    job: Option<Job<TunedLens>>,
}

impl Default for TunedForm {
    fn default() -> Self {
        Self {
            lens: None,
            made: 0,
            on: false,
            tokens: 50_000,
            file: String::new(),
            job: None,
        }
    }
}

impl Default for Lens {
    fn default() -> Self {
        Self {
            prompt: "The capital of Japan is".into(),
            target: String::new(),
            versus: String::new(),
            shade: Shade::Top,
            reader: Reader::default(),
            tuned: TunedForm::default(),
        }
    }
}

impl Panel for Lens {
    fn kind(&self) -> PanelKind {
        PanelKind::Lens
    }

    fn busy(&self) -> bool {
        self.reader.busy() || running(&self.tuned.job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        self.reader.poll(wb);
        if let Some(trained) = take(&mut self.tuned.job, wb) {
            self.tuned.adopt(trained);
        }
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        let asked = self.form(ui);
        tuned_form(ui, &mut self.tuned, wb, &model);
        if asked || self.reader.asked_mut().is_none() {
            self.reader.ask(self.query());
        }
        // Switching lenses re-reads the same question.
        let reading = self.tuned.reading_number();
        if let Some(asked) = self.reader.asked_mut() {
            asked.tuned = reading;
        }
        let translators = self.tuned.reading().cloned();
        self.reader.run_due(wb, "logit lens", move |query, _| {
            read(&model, query, translators)
        });
        if let Some(job) = &self.tuned.job {
            ui.horizontal(|ui| crate::gui::widgets::job_row(ui, job));
        }
        if let Some(job) = self.reader.job() {
            ui.horizontal(|ui| crate::gui::widgets::job_row(ui, job));
        }
        let Some(answer) = self.reader.answer() else {
            return;
        };
        let (query, report) = (&answer.question, &answer.value);
        ui.separator();
        let mut picked = None;
        if let Some(grid) = &report.grid {
            ui.horizontal(|ui| {
                match report.tuned {
                    true => ui.strong("Tuned lens").on_hover_text(explain::TUNED_LENS),
                    false => ui.strong("Logit lens").on_hover_text(explain::LOGIT_LENS),
                };
                ui.label("colour:");
                ui.radio_value(&mut self.shade, Shade::Top, "P(top token)")
                    .on_hover_text("the probability of the token written in the cell");
                ui.radio_value(&mut self.shade, Shade::Next, "P(actual next token)")
                    .on_hover_text("how early the stream predicts the prompt's own next token");
            });
            ui.weak("rows: the stream after each block; columns: the prompt's tokens (click one to attribute there)");
            picked = lens_grid(ui, report, grid, self.shade);
        }
        ui.add_space(6.0);
        show_attribution(ui, report);
        ui.add_space(6.0);
        if let Some((layer, head)) = head_grid(ui, report) {
            wb.requests.push(PanelRequest::Pattern {
                prompt: query.prompt.clone(),
                layer,
                head,
            });
            wb.goto = Some(PanelKind::Attention);
        }
        if answer.model_version != wb.model_version {
            ui.weak("(computed before the model's last change; reading again)");
        }
        if let (Some(p), Some(asked)) = (picked, self.reader.asked_mut()) {
            asked.position = Some(p);
        }
    }
}

impl Lens {
    /// The prompt, target and versus fields; whether the user asked to run.
    fn form(&mut self, ui: &mut egui::Ui) -> bool {
        let mut run = prompt_row(ui, &mut self.prompt, "Run lens");
        ui.horizontal(|ui| {
            let target = labelled_field(
                ui,
                "Target",
                explain::DLA_TARGET,
                &mut self.target,
                "the model's prediction",
                140.0,
            );
            let versus = labelled_field(
                ui,
                "versus",
                "attribute logit(target) − logit(versus) instead",
                &mut self.versus,
                "nothing",
                140.0,
            );
            run |= entered(ui, &target) || entered(ui, &versus);
        });
        run
    }

    /// The form's question, read at the last token.
    fn query(&self) -> Query {
        Query {
            prompt: self.prompt.clone(),
            target: self.target.clone(),
            versus: self.versus.clone(),
            position: None,
            tuned: self.tuned.reading_number(),
        }
    }
}

impl TunedForm {
    /// The lens the rows are read through, if it is on.
    fn reading(&self) -> Option<&Arc<TunedLens>> {
        self.lens.as_ref().filter(|_| self.on).map(|(_, lens)| lens)
    }

    /// The number of the lens the rows are read through, if it is on.
    fn reading_number(&self) -> Option<u64> {
        self.lens.as_ref().filter(|_| self.on).map(|(n, _)| *n)
    }

    /// A new lens, read through at once.
    fn adopt(&mut self, lens: TunedLens) {
        self.made += 1;
        self.lens = Some((self.made, Arc::new(lens)));
        self.on = true;
    }
}

/// Train (a background job on the world corpus) or load a tuned lens, and switch the rows to
/// it.
fn tuned_form(ui: &mut egui::Ui, form: &mut TunedForm, wb: &mut Workbench, model: &Arc<Model>) {
    ui.horizontal(|ui| {
        ui.add_enabled(
            form.lens.is_some(),
            egui::Checkbox::new(&mut form.on, "tuned lens"),
        )
        .on_hover_text(explain::TUNED_LENS)
        .on_disabled_hover_text("train or load one first");
        let training = form.job.is_some();
        if ui
            .add_enabled(!training, egui::Button::new("Train tuned lens"))
            .on_hover_text("one translator per depth, on the world corpus; the model stays frozen")
            .clicked()
        {
            let model = model.clone();
            let tokens = form.tokens;
            form.job = Some(wb.spawn("tuned lens", move |job| {
                let settings = TrainSettings::new(Corpus::World { seed: 0 }, tokens);
                train(&model, &settings, job.cancel_flag(), &mut |r| {
                    job.set_progress(r.step, r.steps, "steps");
                    job.set_message(format!("KL {:.3}", r.kl));
                })?
                .ok_or_else(|| anyhow::anyhow!("cancelled"))
            }));
        }
        ui.add(
            egui::DragValue::new(&mut form.tokens)
                .range(512..=10_000_000)
                .speed(1000),
        );
        ui.label("tokens");
        let label = ui.label("or a lens file");
        let field = ui
            .add(
                egui::TextEdit::singleline(&mut form.file)
                    .desired_width(220.0)
                    .hint_text("monoscope tuned-lens train --out …"),
            )
            .labelled_by(label.id);
        if ui.button("Load lens").clicked() || entered(ui, &field) {
            match TunedLens::load(std::path::Path::new(form.file.trim()), model) {
                Ok(lens) => form.adopt(lens),
                Err(e) => wb.error(format!("tuned lens: {e}")),
            }
        }
    });
}

fn read(model: &Model, q: &Query, tuned: Option<Arc<TunedLens>>) -> anyhow::Result<LensReport> {
    let ids = model.encode_prompt(&q.prompt)?;
    // A column picked for another prompt may be past this one's end.
    let position = q.position.filter(|&p| p < ids.len());
    let token = |text: &str| -> anyhow::Result<Option<u32>> {
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(continuation_token(
            model, &q.prompt, &ids, position, text,
        )?))
    };
    let (target, versus) = (token(&q.target)?, token(&q.versus)?);
    Ok(lens(
        model,
        &LensRequest {
            ids,
            position,
            target,
            versus,
            top_k: TOP_K,
            grid: true,
            tuned,
        },
    )?)
}

/// A depth's name in the grid: the embeddings, then "after block L".
fn depth_label(depth: usize) -> String {
    match depth {
        0 => "embeddings".into(),
        d => format!("after block {}", d - 1),
    }
}

/// Depth × position, each cell the top token there coloured by a probability. Column heads
/// are buttons; returns the position clicked (a head or a cell).
fn lens_grid(
    ui: &mut egui::Ui,
    report: &LensReport,
    grid: &[Vec<LensCell>],
    shade: Shade,
) -> Option<usize> {
    let positions = report.tokens.len();
    let cell = vec2(
        ((ui.available_width() - LABEL_WIDTH) / positions.max(1) as f32).clamp(48.0, 110.0),
        22.0,
    );
    let mut picked = None;
    egui::ScrollArea::horizontal()
        .id_salt("lens-grid")
        .show(ui, |ui| {
            ui.spacing_mut().item_spacing = vec2(0.0, 2.0);
            ui.horizontal(|ui| {
                ui.add_space(LABEL_WIDTH);
                for (p, token) in report.tokens.iter().enumerate() {
                    let head = egui::Button::selectable(p == report.position, display_token(token));
                    if ui
                        .add_sized(cell, head)
                        .on_hover_text(format!("token {p}: {token:?}; attribute the logit here"))
                        .clicked()
                    {
                        picked = Some(p);
                    }
                }
            });
            let size = vec2(
                LABEL_WIDTH + cell.x * positions as f32,
                cell.y * grid.len() as f32,
            );
            let (rect, response) = ui.allocate_exact_size(size, Sense::click());
            let painter = ui.painter_at(rect);
            let font = egui::FontId::monospace(11.0);
            let text = ui.visuals().text_color();
            let at = |depth: usize, p: usize| {
                egui::Rect::from_min_size(
                    rect.min + vec2(LABEL_WIDTH + p as f32 * cell.x, depth as f32 * cell.y),
                    cell,
                )
            };
            for (depth, row) in grid.iter().enumerate() {
                painter.text(
                    egui::pos2(rect.left() + LABEL_WIDTH - 6.0, at(depth, 0).center().y),
                    egui::Align2::RIGHT_CENTER,
                    depth_label(depth),
                    egui::FontId::proportional(11.0),
                    text,
                );
                for (p, c) in row.iter().enumerate() {
                    let value = match shade {
                        Shade::Top => c.top.first().map(|t| t.prob),
                        Shade::Next => c.next_prob,
                    };
                    let r = at(depth, p).shrink(0.5);
                    let fill = value.map_or(ui.visuals().faint_bg_color, heat_colour);
                    painter.rect_filled(r, 2.0, fill);
                    let ink = if value.is_some_and(|v| v > 0.6) {
                        Color32::BLACK
                    } else {
                        Color32::WHITE
                    };
                    let top = c.top.first().map(|t| display_token(&t.token));
                    painter.with_clip_rect(r).text(
                        r.left_center() + vec2(4.0, 0.0),
                        egui::Align2::LEFT_CENTER,
                        top.unwrap_or_default(),
                        font.clone(),
                        ink,
                    );
                }
            }
            let selected = egui::Rect::from_min_size(
                at(0, report.position).min,
                vec2(cell.x, cell.y * grid.len() as f32),
            );
            painter.rect_stroke(
                selected,
                2.0,
                Stroke::new(2.0, ui.visuals().selection.stroke.color),
                egui::StrokeKind::Inside,
            );
            let hovered = response.hover_pos().and_then(|pos| {
                let x = pos.x - rect.left() - LABEL_WIDTH;
                let (p, depth) = (
                    (x / cell.x).floor(),
                    ((pos.y - rect.top()) / cell.y).floor(),
                );
                (x >= 0.0 && (p as usize) < positions && (depth as usize) < grid.len())
                    .then_some((depth as usize, p as usize))
            });
            if let Some((depth, p)) = hovered {
                if response.clicked() {
                    picked = Some(p);
                }
                let c = &grid[depth][p];
                let mut lines = vec![format!(
                    "{} at token {p} ({:?})",
                    depth_label(depth),
                    report.tokens[p]
                )];
                lines.extend(
                    c.top
                        .iter()
                        .map(|t| format!("{:?}  {:.1}%", t.token, 100.0 * t.prob)),
                );
                if let (Some(prob), Some(next)) = (c.next_prob, report.tokens.get(p + 1)) {
                    lines.push(format!("P(actual next {next:?}) = {:.1}%", 100.0 * prob));
                }
                response.on_hover_text(lines.join("\n"));
            }
        });
    picked
}

/// The target's probability by depth beside the attribution's bar chart.
fn show_attribution(ui: &mut egui::Ui, r: &LensReport) {
    let what = match &r.versus {
        Some(v) => format!("logit({:?}) − logit({:?})", r.target.token, v.token),
        None => format!("logit({:?})", r.target.token),
    };
    ui.label(format!(
        "At token {} ({:?}): the model gives {:?} {:.1}%",
        r.position,
        r.tokens[r.position],
        r.target.token,
        100.0 * r.target.prob
    ));
    ui.strong(format!(
        "Direct logit attribution: {what} = {:.3}, the sum of {} terms",
        r.logit,
        r.attribution.len()
    ))
    .on_hover_text(explain::DLA);
    ui.columns(2, |columns| {
        let ui = &mut columns[0];
        ui.label(format!("P({:?}) read at each depth", r.target.token));
        let points: PlotPoints = r
            .lens
            .iter()
            .enumerate()
            .map(|(d, row)| [d as f64, row.target_prob as f64])
            .collect();
        let depths = r.lens.len();
        Plot::new("lens-target")
            .height(200.0)
            .allow_scroll(false)
            .allow_zoom(false)
            .allow_drag(false)
            .include_y(0.0)
            .include_y(1.0)
            .y_axis_label("probability")
            .x_grid_spacer(uniform_grid_spacer(|_| [1.0, 5.0, 10.0]))
            .x_axis_formatter(move |mark, _| {
                let d = mark.value.round();
                if (mark.value - d).abs() < 1e-6 && d >= 0.0 && (d as usize) < depths {
                    match d as usize {
                        0 => "emb".into(),
                        d => format!("{}", d - 1),
                    }
                } else {
                    String::new()
                }
            })
            .show(ui, |plot| plot.line(Line::new("P(target)", points)));

        let ui = &mut columns[1];
        ui.label("each component's direct share");
        let names: Vec<String> = r
            .attribution
            .iter()
            .map(|c| short_component(&c.component))
            .collect();
        let bars: Vec<Bar> = r
            .attribution
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let colour = if c.logit >= 0.0 {
                    PUSHES_UP
                } else {
                    PUSHES_DOWN
                };
                Bar::new(i as f64, c.logit as f64)
                    .name(format!("{} {:+.3}", c.component, c.logit))
                    .fill(colour)
                    .width(0.7)
            })
            .collect();
        Plot::new("lens-attribution")
            .height(200.0)
            .allow_scroll(false)
            .allow_zoom(false)
            .allow_drag(false)
            .y_axis_label("logit")
            .x_grid_spacer(uniform_grid_spacer(|_| [1.0, 5.0, 10.0]))
            // One label per bar: short names, closer together than the default allows.
            .custom_x_axes(vec![
                AxisHints::new_x()
                    .label_spacing(20.0..=24.0)
                    .formatter(move |mark, _| {
                        let i = mark.value.round();
                        if (mark.value - i).abs() < 1e-6 && i >= 0.0 {
                            names.get(i as usize).cloned().unwrap_or_default()
                        } else {
                            String::new()
                        }
                    }),
            ])
            .show(ui, |plot| {
                plot.bar_chart(BarChart::new("direct logit", bars))
            });
    });
}

/// Positive and negative direct logit, as the attribution chart colours them.
const PUSHES_UP: Color32 = Color32::from_rgb(230, 130, 20);
const PUSHES_DOWN: Color32 = Color32::from_rgb(60, 130, 255);

/// The attention terms split per head: one row per block, one cell per head, shaded by the
/// head's direct logit (orange up, blue down) with the value written in, and the three
/// largest as links. Returns a head clicked (in the grid or as a link), whose attention
/// pattern the caller shows.
fn head_grid(ui: &mut egui::Ui, r: &LensReport) -> Option<(usize, usize)> {
    let heads = r.heads.first().map_or(0, Vec::len);
    if heads == 0 {
        return None;
    }
    ui.strong("Direct logit per attention head")
        .on_hover_text(explain::DLA_HEADS);
    ui.weak(
        "rows: blocks; columns: heads (each block's heads and its output bias add up to its A bar)",
    );
    let largest = r
        .heads
        .iter()
        .flatten()
        .map(|v| v.abs())
        .fold(f32::MIN_POSITIVE, f32::max);
    let cell = vec2(52.0, 20.0);
    let size = vec2(
        LABEL_WIDTH + cell.x * heads as f32,
        cell.y * (r.heads.len() + 1) as f32,
    );
    let (rect, response) = ui.allocate_exact_size(size, Sense::click());
    let painter = ui.painter_at(rect);
    let font = egui::FontId::proportional(11.0);
    let text = ui.visuals().text_color();
    let background = ui.visuals().extreme_bg_color;
    let at = |row: usize, col: usize| {
        egui::Rect::from_min_size(
            rect.min + vec2(LABEL_WIDTH + col as f32 * cell.x, row as f32 * cell.y),
            cell,
        )
    };
    for h in 0..heads {
        painter.text(
            at(0, h).center(),
            egui::Align2::CENTER_CENTER,
            format!("H{h}"),
            font.clone(),
            text,
        );
    }
    for (l, row) in r.heads.iter().enumerate() {
        let label = rect.min + vec2(LABEL_WIDTH - 6.0, (l + 1) as f32 * cell.y + cell.y / 2.0);
        painter.text(
            label,
            egui::Align2::RIGHT_CENTER,
            format!("block {l}"),
            font.clone(),
            text,
        );
        for (h, &v) in row.iter().enumerate() {
            let full = if v >= 0.0 { PUSHES_UP } else { PUSHES_DOWN };
            let strength = (v.abs() / largest).min(1.0);
            let c = at(l + 1, h).shrink(1.0);
            painter.rect_filled(c, 2.0, background.lerp_to_gamma(full, strength));
            // Dark figures on the strong colours, the theme's text on the faint ones.
            let ink = if strength > 0.5 { Color32::BLACK } else { text };
            painter.text(
                c.center(),
                egui::Align2::CENTER_CENTER,
                format!("{v:+.2}"),
                font.clone(),
                ink,
            );
        }
    }
    let mut picked = None;
    ui.horizontal(|ui| {
        ui.label("largest:");
        for (l, h, v) in r.heads_by_effect().into_iter().take(3) {
            if ui
                .link(format!("head {l}.{h} {v:+.3}"))
                .on_hover_text("see its attention pattern on this prompt")
                .clicked()
            {
                picked = Some((l, h));
            }
        }
    });
    if let Some(pos) = response.hover_pos() {
        let col = ((pos.x - rect.left() - LABEL_WIDTH) / cell.x).floor();
        let row = ((pos.y - rect.top()) / cell.y).floor() as usize;
        if col >= 0.0 && row >= 1 {
            let (l, h) = (row - 1, col as usize);
            if let Some(v) = r.heads.get(l).and_then(|row| row.get(h)) {
                let clicked = response.clicked();
                response.on_hover_text(format!(
                    "head {l}.{h}: direct logit {v:+.4} (click: its attention pattern)"
                ));
                if clicked {
                    picked = Some((l, h));
                }
            }
        }
    }
    picked
}

/// `blocks.3.hook_attn_out` → `A3`, `blocks.3.hook_mlp_out` → `M3`: bar labels.
fn short_component(component: &str) -> String {
    let block = |suffix: &str| {
        component
            .strip_prefix("blocks.")?
            .strip_suffix(suffix)
            .map(str::to_string)
    };
    if let Some(l) = block(".hook_attn_out") {
        format!("A{l}")
    } else if let Some(l) = block(".hook_mlp_out") {
        format!("M{l}")
    } else {
        match component {
            "hook_embed" => "emb".into(),
            "hook_pos_embed" => "pos".into(),
            "ln_final bias" => "bias".into(),
            "unembed bias" => "U bias".into(),
            other => other.into(),
        }
    }
}
