//! Pieces several panels draw: a job's progress row, token chips coloured by activation, a
//! heatmap.

use egui::{Color32, RichText, Sense, Stroke, Ui, vec2};

use super::style::{activation_colour, diverging_colour, heat_colour};
use super::workbench::JobView;

/// A folder path typed, or picked with the desktop's dialog (titled `dialog_title`) through
/// a "Browse…" button. Returns the text field, so a label can be linked to it.
pub fn folder_field(ui: &mut Ui, path: &mut String, dialog_title: &str) -> egui::Response {
    let field = ui.text_edit_singleline(path);
    if ui.button("Browse…").clicked()
        && let Some(dir) = super::pick_folder(dialog_title)
    {
        *path = dir.display().to_string();
    }
    field
}

/// A text field with its label (linked, so tests and screen readers find it by name), the
/// label's hover text and a hint shown while empty.
pub fn labelled_field(
    ui: &mut Ui,
    label: &str,
    about: &str,
    text: &mut String,
    hint: &str,
    width: f32,
) -> egui::Response {
    let label = ui.label(label).on_hover_text(about);
    ui.add(
        egui::TextEdit::singleline(text)
            .desired_width(width)
            .hint_text(hint),
    )
    .labelled_by(label.id)
}

/// Whether Enter was pressed in `field` (a single-line field loses focus on Enter).
pub fn entered(ui: &Ui, field: &egui::Response) -> bool {
    field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter))
}

/// A "Prompt" field across the panel with a run button; whether the prompt should run (the
/// button clicked or Enter pressed in the field).
pub fn prompt_row(ui: &mut Ui, prompt: &mut String, button: &str) -> bool {
    ui.horizontal(|ui| {
        let label = ui.label("Prompt");
        let field = ui
            .add(
                egui::TextEdit::singleline(prompt)
                    .desired_width(ui.available_width() - 80.0)
                    .hint_text("type a prompt and press Enter"),
            )
            .labelled_by(label.id);
        let entered = entered(ui, &field);
        ui.button(button).clicked() || entered
    })
    .inner
}

/// How often a spinner redraws the window while work goes on: about 30 frames a second (job
/// reports add at most 20, `jobs::REPORT_INTERVAL`). egui starts a delayed repaint early by its predicted frame time (1/60 s
/// without a known refresh rate), so 50 ms here is ~33 ms between frames. egui's own spinner
/// asks for a new frame every frame, which on a display without vsync (Xvfb, remote desktops)
/// draws as fast as the cores allow and leaves the running job less of them.
pub const BUSY_FRAME: std::time::Duration = std::time::Duration::from_millis(50);

/// A turning arc that says "working", redrawn at ~30 frames a second.
pub fn spinner(ui: &mut Ui) -> egui::Response {
    let size = ui.style().spacing.interact_size.y;
    let (rect, response) = ui.allocate_exact_size(vec2(size, size), Sense::hover());
    response.widget_info(|| egui::WidgetInfo::new(egui::WidgetType::ProgressIndicator));
    if ui.is_rect_visible(rect) {
        ui.ctx().request_repaint_after(BUSY_FRAME);
        let radius = rect.height() / 2.0 - 2.0;
        let start = ui.input(|i| i.time) * std::f64::consts::TAU;
        let points: Vec<egui::Pos2> = (0..=24)
            .map(|i| {
                let angle = start + 1.5 * std::f64::consts::PI * f64::from(i) / 24.0;
                let (sin, cos) = angle.sin_cos();
                rect.center() + radius * vec2(cos as f32, sin as f32)
            })
            .collect();
        let stroke = Stroke::new(3.0, ui.visuals().strong_text_color());
        ui.painter().add(egui::Shape::line(points, stroke));
    }
    response
}

/// Name, message, progress bar with rate and a Cancel button.
pub fn job_row(ui: &mut Ui, job: &dyn JobView) {
    let p = job.progress();
    spinner(ui);
    let mut text = job.name().to_string();
    if !p.message.is_empty() {
        text = format!("{text}: {}", p.message);
    }
    ui.label(text);
    if let Some(fraction) = p.fraction() {
        let rate = job.rate();
        let bar = egui::ProgressBar::new(fraction)
            .desired_width(160.0)
            .text(format!("{} / {} {} · {rate:.0}/s", p.done, p.total, p.unit));
        ui.add(bar);
    } else {
        ui.label(format!("{:.0}s", job.elapsed().as_secs_f64()));
    }
    if ui
        .small_button(format!("Cancel {}", job.name()))
        .on_hover_text("Stop at the next safe point")
        .clicked()
    {
        job.cancel();
    }
}

/// Tokens as chips; `values[i]` colours chip `i` (scale top `max`); the hover text shows it.
/// Returns the index of a clicked chip.
pub fn token_chips(
    ui: &mut Ui,
    tokens: &[String],
    values: Option<&[f32]>,
    max: f32,
    highlight: Option<usize>,
) -> Option<usize> {
    let dark = ui.visuals().dark_mode;
    let mut clicked = None;
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing = vec2(2.0, 4.0);
        for (i, token) in tokens.iter().enumerate() {
            let value = values.and_then(|v| v.get(i)).copied();
            let fill = value.map_or(Color32::TRANSPARENT, |v| activation_colour(v, max, dark));
            let shown = display_token(token);
            let mut frame = egui::Frame::new()
                .fill(fill)
                .corner_radius(3.0)
                .inner_margin(egui::Margin::symmetric(3, 1))
                .stroke(Stroke::new(
                    1.0,
                    ui.visuals().widgets.noninteractive.bg_stroke.color,
                ));
            if highlight == Some(i) {
                frame = frame.stroke(Stroke::new(2.0, ui.visuals().selection.stroke.color));
            }
            let response = frame
                .show(ui, |ui| ui.label(RichText::new(shown).monospace()))
                .response
                .interact(Sense::click());
            let response = match value {
                Some(v) => response.on_hover_text(format!("token {i}: {token:?}\nvalue {v:.3}")),
                None => response.on_hover_text(format!("token {i}: {token:?}")),
            };
            if response.clicked() {
                clicked = Some(i);
            }
        }
    });
    clicked
}

/// A token as a chip shows it: spaces as `·`, newlines as `⏎`.
pub fn display_token(token: &str) -> String {
    let t = token.replace('\n', "⏎").replace(' ', "·");
    if t.is_empty() { "∅".into() } else { t }
}

/// A heatmap of `rows × cols` values (row-major), scaled to the largest value; row and column
/// labels drawn as given (tokens through [`display_token`] first); a hovered cell shows its value; returns a clicked cell. Values ≤ 0 draw as the
/// colour map's bottom, unless the map is signed (`centre`).
pub struct Heatmap<'a> {
    pub values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_labels: &'a [String],
    pub col_labels: &'a [String],
    pub cell: egui::Vec2,
    /// What a value is, for the hover text.
    pub what: &'a str,
    /// The value drawn brightest (`None`: the largest one), so that maps of the same quantity
    /// can share a scale.
    pub max: Option<f32>,
    /// A signed map instead: values drawn by their distance from this one, red above and
    /// blue below ([`diverging_colour`]), saturating `max` away (`None`: the largest
    /// distance).
    pub centre: Option<f32>,
}

impl Heatmap<'_> {
    pub fn show(&self, ui: &mut Ui) -> Option<(usize, usize)> {
        let max = self.max.unwrap_or_else(|| {
            self.values
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .map(|v| self.centre.map_or(v, |c| (v - c).abs()))
                .fold(0.0f32, f32::max)
        });
        let label_w = 120.0;
        let size = vec2(
            label_w + self.cell.x * self.cols as f32,
            self.cell.y * self.rows as f32 + 18.0,
        );
        let (rect, response) = ui.allocate_exact_size(size, Sense::click());
        let painter = ui.painter_at(rect);
        let font = egui::FontId::proportional(11.0);
        let text = ui.visuals().text_color();
        let dark = ui.visuals().dark_mode;
        for r in 0..self.rows {
            let y = rect.top() + r as f32 * self.cell.y;
            if let Some(label) = self.row_labels.get(r) {
                painter.text(
                    egui::pos2(rect.left() + label_w - 4.0, y + self.cell.y / 2.0),
                    egui::Align2::RIGHT_CENTER,
                    label,
                    font.clone(),
                    text,
                );
            }
            for c in 0..self.cols {
                let v = self.values.get(r * self.cols + c).copied().unwrap_or(0.0);
                let t = match (max > 0.0, self.centre) {
                    (false, _) => 0.0,
                    (true, None) => v / max,
                    (true, Some(centre)) => (v - centre) / max,
                };
                let colour = match self.centre {
                    None => heat_colour(t),
                    Some(_) => diverging_colour(t, dark),
                };
                let cell = egui::Rect::from_min_size(
                    egui::pos2(rect.left() + label_w + c as f32 * self.cell.x, y),
                    self.cell,
                );
                painter.rect_filled(cell, 0.0, colour);
            }
        }
        let bottom = rect.top() + self.rows as f32 * self.cell.y;
        let step = (self.col_labels.len() / 12).max(1);
        for (c, label) in self.col_labels.iter().enumerate().step_by(step) {
            painter.text(
                egui::pos2(
                    rect.left() + label_w + (c as f32 + 0.5) * self.cell.x,
                    bottom + 2.0,
                ),
                egui::Align2::CENTER_TOP,
                label,
                font.clone(),
                text,
            );
        }
        let pos = response.hover_pos()?;
        let c = ((pos.x - rect.left() - label_w) / self.cell.x).floor();
        let r = ((pos.y - rect.top()) / self.cell.y).floor();
        if c < 0.0 || r < 0.0 || c as usize >= self.cols || r as usize >= self.rows {
            return None;
        }
        let (r, c) = (r as usize, c as usize);
        let v = self.values.get(r * self.cols + c).copied().unwrap_or(0.0);
        let row = self.row_labels.get(r).cloned().unwrap_or_default();
        let col = self.col_labels.get(c).cloned().unwrap_or_default();
        let clicked = response.clicked();
        response.on_hover_text(format!("{row} × {col}: {} {v:.4}", self.what));
        clicked.then_some((r, c))
    }
}
