//! Edit: trace a fact (hidden / MLP / attention restoration heatmaps), edit it with ROME at
//! the layer the trace suggests, compare before and after on the edit prompt, paraphrases,
//! neighbours and the Japanese prompt; undo edits; save the edited model to a new folder.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Panel, PanelKind, need_model, running, take};
use crate::causal::{
    Fact, HeadTrace, Restore, Trace, TraceSettings, subject_embedding_std, trace, trace_heads,
};
use crate::edit::covariance::default_cache_dir;
use crate::edit::editor::{Editor, StatsSource};
use crate::edit::history::{AppliedEdit, EditHistory};
use crate::edit::locate::{KeyChoice, KeySelect, choose_key, current_answer, locate_request};
use crate::edit::rome::{KeyPosition, Request, RomeSettings};
use crate::edit::save::save_edited;
use crate::edit::verify::{Check, Outcome, measure, request_checks};
use crate::gui::style::explain;
use crate::gui::widgets::{Heatmap, display_token, folder_field, spinner};
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::Job;
use crate::model::{Hooks, Model};
use crate::sae::activations::Corpus;

/// Tokens of the world corpus the key statistics C = E[kkᵀ] are measured on (as the CLI).
const STATS_TOKENS: u64 = 100_000;

/// One row of the before/after table.
pub struct CheckRow {
    pub check: Check,
    pub before: Outcome,
    pub after: Outcome,
}

/// What one applied edit changed.
struct EditResult {
    choice: KeyChoice,
    rows: Vec<CheckRow>,
    /// Greedy continuations of the edit prompt, before and after.
    continuation: [String; 2],
    seconds: f64,
}

struct EditDone {
    model: Model,
    history: EditHistory,
    result: EditResult,
}

struct Undone {
    model: Model,
    history: EditHistory,
    removed: AppliedEdit,
}

pub struct Edit {
    prompt: String,
    /// Another phrasing of the same fact ("{}'s capital is"); empty: the prompt alone.
    also_prompt: String,
    subject: String,
    target: String,
    target_ja: String,
    auto_layer: bool,
    layer: usize,
    key: KeySelect,
    traces: Vec<Trace>,
    /// The same corruption restored one attention head at a time.
    head_trace: Option<HeadTrace>,
    /// The layer and key the last trace suggests: what an edit "from the trace" uses.
    suggestion: Option<Suggestion>,
    trace_job: Option<Job<Traced>>,
    /// The editor (its key statistics cached per layer) and the model version it was made
    /// for; made in the first edit job, as it runs the model.
    editor: Arc<Mutex<Option<(u64, Editor)>>>,
    edit_job: Option<Job<EditDone>>,
    last: Option<EditResult>,
    undo_job: Option<Job<Undone>>,
    save_to: String,
    save_job: Option<Job<PathBuf>>,
}

impl Default for Edit {
    fn default() -> Self {
        Self {
            prompt: "The capital of {} is".into(),
            also_prompt: String::new(),
            subject: "Japan".into(),
            target: " Yokohama".into(),
            target_ja: "横浜".into(),
            auto_layer: true,
            layer: 0,
            // ROME's key; `auto` may choose the prompt's last token, which small models
            // often read facts at but where an edit rarely generalises.
            key: KeySelect::Fixed(KeyPosition::SubjectLast),
            traces: Vec::new(),
            head_trace: None,
            suggestion: None,
            trace_job: None,
            editor: Arc::new(Mutex::new(None)),
            edit_job: None,
            last: None,
            undo_job: None,
            save_to: String::new(),
            save_job: None,
        }
    }
}

impl Panel for Edit {
    fn kind(&self) -> PanelKind {
        PanelKind::Edit
    }

    fn busy(&self) -> bool {
        running(&self.trace_job)
            || running(&self.edit_job)
            || running(&self.undo_job)
            || running(&self.save_job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        self.poll(wb);
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        if wb.take_request(&PanelRequest::Start(PanelKind::Edit)) {
            self.start_trace(wb, &model);
            self.start_edit(wb, &model);
        }
        self.fact_form(ui, &model);
        ui.horizontal(|ui| {
            let tracing = self.trace_job.is_some();
            if ui
                .add_enabled(!tracing, egui::Button::new("Trace"))
                .on_hover_text(explain::RECOVERY)
                .clicked()
            {
                self.start_trace(wb, &model);
            }
            if tracing {
                spinner(ui);
                ui.label("tracing…");
            }
            let editing = self.edit_job.is_some();
            if ui
                .add_enabled(
                    !editing && !self.busy(),
                    egui::Button::new("Apply ROME edit"),
                )
                .on_hover_text("rank-one update of the chosen layer's MLP down projection")
                .clicked()
            {
                self.start_edit(wb, &model);
            }
            if let Some(job) = &self.edit_job {
                crate::gui::widgets::job_row(ui, job);
            }
        });
        self.show_traces(ui);
        self.show_result(ui);
        ui.separator();
        self.history_ui(ui, wb, &model);
    }
}

impl Edit {
    fn poll(&mut self, wb: &mut Workbench) {
        if let Some(traced) = take(&mut self.trace_job, wb) {
            self.layer = traced.suggestion.choice.layer;
            self.traces = traced.traces;
            self.head_trace = Some(traced.heads);
            self.suggestion = Some(traced.suggestion);
        }
        if let Some(done) = take(&mut self.edit_job, wb) {
            wb.info(format!(
                "edited layer {} in {:.1}s",
                done.result.choice.layer, done.result.seconds
            ));
            wb.set_edited_model(done.model, done.history);
            self.last = Some(done.result);
        }
        if let Some(undone) = take(&mut self.undo_job, wb) {
            wb.info(format!(
                "undid edit #{} ({} on layers {:?})",
                undone.removed.id, undone.removed.method, undone.removed.layers
            ));
            wb.set_edited_model(undone.model, undone.history);
            self.last = None;
        }
        if let Some(dir) = take(&mut self.save_job, wb) {
            wb.info(format!("saved the edited model to {}", dir.display()));
        }
    }

    fn request(&self) -> Request {
        Request {
            prompt: self.prompt.clone(),
            subject: self.subject.clone(),
            target: self.target.clone(),
        }
    }

    fn fact_form(&mut self, ui: &mut egui::Ui, model: &Model) {
        egui::Grid::new("edit-form").num_columns(2).show(ui, |ui| {
            ui.label("Prompt template")
                .on_hover_text("{} marks where the subject goes");
            ui.text_edit_singleline(&mut self.prompt);
            ui.end_row();
            let label = ui.label("Also as (optional)");
            ui.text_edit_singleline(&mut self.also_prompt)
                .labelled_by(label.id)
                .on_hover_text(
                    "the same fact in another word order, {} for the subject \
                     (\"{}'s capital is\"): one more ROME update at its own key, which \
                     carries the edit to paraphrases in that order",
                );
            ui.end_row();
            let label = ui.label("Subject");
            ui.text_edit_singleline(&mut self.subject)
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("New target");
            ui.text_edit_singleline(&mut self.target)
                .labelled_by(label.id)
                .on_hover_text("what should follow the prompt, with its leading space");
            ui.end_row();
            ui.label("New target (Japanese)")
                .on_hover_text("checked on the Japanese prompt of the same fact");
            ui.text_edit_singleline(&mut self.target_ja);
            ui.end_row();
            ui.label("Layer");
            ui.horizontal(|ui| {
                ui.checkbox(&mut self.auto_layer, "from the trace")
                    .on_hover_text(
                        "trace the MLP at the subject's and the prompt's last token; \
                         edit where restoring it matters most",
                    );
                ui.add_enabled(
                    !self.auto_layer,
                    egui::DragValue::new(&mut self.layer).range(0..=model.dims().n_layers - 1),
                );
                ui.label("key");
                ui.radio_value(&mut self.key, KeySelect::Auto, "auto");
                ui.radio_value(
                    &mut self.key,
                    KeySelect::Fixed(KeyPosition::SubjectLast),
                    "subject-last",
                );
                ui.radio_value(
                    &mut self.key,
                    KeySelect::Fixed(KeyPosition::PromptLast),
                    "prompt-last",
                );
            });
            ui.end_row();
        });
    }

    fn start_trace(&mut self, wb: &Workbench, model: &Arc<Model>) {
        let model = model.clone();
        let kb = wb.kb.clone();
        let request = self.request();
        let key = self.key;
        let model_version = wb.model_version;
        self.trace_job = Some(wb.spawn("causal trace", move |job| {
            request.validate().map_err(anyhow::Error::msg)?;
            let prompt = request.text();
            let answer = current_answer(&model, &prompt)?;
            let sigma = subject_embedding_std(&model, &kb.subject_names())?;
            let fact = Fact {
                prompt: &prompt,
                subject: &request.subject,
                target: &answer,
            };
            let mut traces = Vec::new();
            let steps = Restore::ALL.len() as u64 + 2;
            for (i, restore) in Restore::ALL.into_iter().enumerate() {
                job.set_progress(i as u64, steps, "traces");
                if job.is_cancelled() {
                    anyhow::bail!("cancelled");
                }
                traces.push(trace(
                    &model,
                    &fact,
                    &TraceSettings::default(),
                    sigma,
                    None,
                    restore,
                )?);
            }
            job.set_progress(steps - 2, steps, "traces");
            if job.is_cancelled() {
                anyhow::bail!("cancelled");
            }
            let heads = trace_heads(&model, &fact, &TraceSettings::default(), sigma)?;
            job.set_progress(steps - 1, steps, "traces");
            let choice = choose_key(&model, &fact, &TraceSettings::default(), sigma, None, key)?;
            let suggestion = Suggestion {
                prompt: request.prompt.clone(),
                subject: request.subject.clone(),
                key,
                model_version,
                choice,
            };
            Ok(Traced {
                traces,
                heads,
                suggestion,
            })
        }));
    }

    fn show_traces(&self, ui: &mut egui::Ui) {
        let Some(first) = self.traces.first() else {
            return;
        };
        ui.label(format!(
            "Causal trace of the model's answer: P(clean) {:.3}, P(subject corrupted) {:.3}; \
             cells show P(answer) with one state restored",
            first.p_clean, first.p_corrupt
        ))
        .on_hover_text(explain::RECOVERY);
        ui.horizontal_wrapped(|ui| {
            for t in &self.traces {
                ui.vertical(|ui| {
                    ui.strong(match t.restore {
                        Restore::Hidden => "hidden state (resid_post)",
                        Restore::Mlp => "MLP output (window)",
                        Restore::Attn => "attention output (window)",
                    });
                    // Rows are token positions, columns layers (as in the ROME paper).
                    let row_labels: Vec<String> = t
                        .positions
                        .iter()
                        .map(|&p| {
                            let token = display_token(t.tokens.get(p).map_or("", String::as_str));
                            if t.subject.contains(&p) {
                                format!("{token}*")
                            } else {
                                token
                            }
                        })
                        .collect();
                    layers_as_columns(ui, &t.p_restored, &row_labels, None);
                });
            }
            if let Some(t) = &self.head_trace {
                ui.vertical(|ui| head_heatmap(ui, t));
            }
        });
        ui.weak("* subject tokens; columns are layers");
        if let Some(Suggestion { choice, .. }) = &self.suggestion {
            ui.label(format!(
                "Suggested edit layer: {} ({} key): {}. An edit \"from the trace\" uses it.",
                choice.layer,
                choice.key.name(),
                choice.reason
            ));
        }
    }

    fn start_edit(&mut self, wb: &mut Workbench, model: &Arc<Model>) {
        let request = self.request();
        if let Err(m) = request.validate() {
            wb.error(format!("edit: {m}"));
            return;
        }
        let editor = self.editor.clone();
        let version = wb.model_version;
        let model = model.clone();
        let kb = wb.kb.clone();
        let mut history = wb.history.clone();
        let layer = (!self.auto_layer).then_some(self.layer);
        let key = self.key;
        // An edit "from the trace" of the fact just traced takes the trace's choice as it is.
        let traced = self
            .suggestion
            .as_ref()
            .filter(|s| self.auto_layer && s.applies_to(&request, key, wb.model_version))
            .map(|s| s.choice.clone());
        let target_ja = (!self.target_ja.trim().is_empty()).then(|| self.target_ja.clone());
        let also: Vec<String> = (!self.also_prompt.trim().is_empty())
            .then(|| self.also_prompt.clone())
            .into_iter()
            .collect();
        let phrasings = match request.with_phrasings(&also) {
            Ok(p) => p,
            Err(e) => {
                wb.error(format!("edit: {e}"));
                return;
            }
        };
        self.edit_job = Some(wb.spawn("ROME edit", move |job| {
            let started = Instant::now();
            job.set_message("locating the fact");
            let choice = match traced {
                Some(choice) => choice,
                None => locate_request(&model, &kb, &request, layer, key)?,
            };
            let checks = request_checks(&kb, &request, target_ja.as_deref(), 10, &[]);
            let before = checks
                .iter()
                .map(|c| measure(&model, c, 3, &Hooks::new()))
                .collect::<crate::Result<Vec<_>>>()?;
            job.set_message(format!(
                "key statistics and v* at layer {} ({} key)",
                choice.layer,
                choice.key.name()
            ));
            let mut slot = editor
                .lock()
                .map_err(|_| anyhow::anyhow!("an earlier edit failed midway"))?;
            if slot.as_ref().is_none_or(|(v, _)| *v != version) {
                let stats = StatsSource {
                    corpus: Corpus::parse("world", "text")?,
                    tokens: STATS_TOKENS,
                    cache_dir: default_cache_dir(),
                };
                let editor = Editor::new(
                    &model,
                    stats,
                    crate::edit::DEFAULT_CONTEXTS_PER_START,
                    RomeSettings::default(),
                )?;
                *slot = Some((version, editor));
            }
            let Some((_, editor)) = slot.as_mut() else {
                anyhow::bail!("no editor");
            };
            editor.covariance(&model, choice.layer, |t| {
                job.set_progress(t, STATS_TOKENS, "tokens")
            })?;
            if job.is_cancelled() {
                anyhow::bail!("cancelled");
            }
            job.set_message("optimising v* and applying the edit");
            let (_, applied) = editor.rome(&model, &phrasings, &choice)?;
            let mut edited = (*model).clone();
            history.apply(&mut edited, applied)?;
            let after = checks
                .iter()
                .map(|c| measure(&edited, c, 3, &Hooks::new()))
                .collect::<crate::Result<Vec<_>>>()?;
            let continuation = [&*model, &edited].map(|m| greedy(m, &request.text()));
            let rows = checks
                .into_iter()
                .zip(before)
                .zip(after)
                .map(|((check, before), after)| CheckRow {
                    check,
                    before,
                    after,
                })
                .collect();
            let [before, after] = continuation;
            Ok(EditDone {
                model: edited,
                history,
                result: EditResult {
                    choice,
                    rows,
                    continuation: [before?, after?],
                    seconds: started.elapsed().as_secs_f64(),
                },
            })
        }));
    }

    fn show_result(&self, ui: &mut egui::Ui) {
        let Some(EditResult {
            choice,
            rows,
            continuation,
            seconds,
        }) = &self.last
        else {
            return;
        };
        ui.separator();
        ui.label(format!(
            "Edited layer {} at the {} key in {seconds:.1}s: {}",
            choice.layer,
            choice.key.name(),
            choice.reason
        ));
        ui.horizontal_wrapped(|ui| {
            for (kind, tip) in [
                ("edit", explain::ES),
                ("paraphrase", explain::PS),
                ("neighbour", explain::NS),
                (
                    "japanese",
                    "the Japanese prompt of the fact gives the new Japanese target",
                ),
            ] {
                let of_kind: Vec<&CheckRow> = rows
                    .iter()
                    .filter(|r| r.check.kind.name() == kind)
                    .collect();
                if of_kind.is_empty() {
                    continue;
                }
                let top1 = of_kind.iter().filter(|r| r.after.top1_wanted).count();
                let wins = of_kind.iter().filter(|r| r.after.wins()).count();
                let n = of_kind.len();
                ui.label(format!(
                    "{kind}: top-1 {top1}/{n}, beats the rival {wins}/{n}"
                ))
                .on_hover_text(tip);
                ui.separator();
            }
        });
        egui::Grid::new("continuations")
            .num_columns(2)
            .show(ui, |ui| {
                for (when, text) in ["before", "after"].iter().zip(continuation) {
                    ui.label(format!("greedy {when}"));
                    ui.label(text);
                    ui.end_row();
                }
            });
        egui::ScrollArea::vertical()
            .id_salt("after-table")
            .max_height(320.0)
            .show(ui, |ui| {
                egui::Grid::new("before-after")
                    .num_columns(7)
                    .striped(true)
                    .show(ui, |ui| {
                        ui.strong("check");
                        ui.strong("prompt");
                        ui.strong("wanted");
                        ui.strong("before (top 3)");
                        ui.strong("after (top 3)");
                        ui.strong("top-1").on_hover_text(
                            "the wanted answer's first token is the most likely next token",
                        );
                        ui.strong("beats the rival").on_hover_text(
                            "CounterFact's criterion: the whole wanted answer is likelier \
                             (teacher-forced) than the rival (the old answer, or for \
                             neighbours the new target)",
                        );
                        ui.end_row();
                        for r in rows {
                            ui.label(r.check.kind.name());
                            ui.label(&r.check.prompt);
                            ui.label(format!("{:?}", r.check.wanted));
                            ui.label(top_text(&r.before));
                            ui.label(top_text(&r.after));
                            let mark = |ok: bool| if ok { "✔ yes" } else { "no" };
                            ui.label(mark(r.after.top1_wanted));
                            ui.label(mark(r.after.wins()));
                            ui.end_row();
                        }
                    });
            });
    }

    fn history_ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench, model: &Arc<Model>) {
        ui.strong("Edit history");
        if wb.history.is_empty() {
            ui.weak("no edits yet");
        }
        let mut undo = None;
        for e in wb.history.edits() {
            ui.horizontal(|ui| {
                let what: Vec<String> = e
                    .requests
                    .iter()
                    .map(|r| format!("{} → {:?}", r.text(), r.target))
                    .collect();
                ui.label(format!(
                    "#{} {} layers {:?} ({} key): {}",
                    e.id,
                    e.method,
                    e.layers,
                    e.key,
                    what.join("; ")
                ));
                if ui
                    .add_enabled(!self.busy(), egui::Button::new(format!("Undo #{}", e.id)))
                    .on_hover_text("restores the touched layers bit for bit, replaying the others")
                    .clicked()
                {
                    undo = Some(e.id);
                }
            });
        }
        if let Some(id) = undo {
            let model = model.clone();
            let mut history = wb.history.clone();
            self.undo_job = Some(wb.spawn("undo edit", move |_| {
                let mut restored = (*model).clone();
                let removed = history.undo(&mut restored, id)?;
                Ok(Undone {
                    model: restored,
                    history,
                    removed,
                })
            }));
        }
        ui.horizontal(|ui| {
            ui.label("Save to a new folder");
            folder_field(ui, &mut self.save_to, "Folder to save the edited model in");
            let can_save = !wb.history.is_empty() && !self.save_to.trim().is_empty();
            if ui
                .add_enabled(can_save && !self.busy(), egui::Button::new("Save"))
                .on_hover_text("writes config, tokenizer, weights (same layout and dtype) and the edit log; never into a non-empty folder")
                .clicked()
            {
                let model = model.clone();
                let history = wb.history.clone();
                let out = PathBuf::from(self.save_to.trim());
                self.save_job = Some(wb.spawn("save edited model", move |_| {
                    save_edited(&model, &history, &out)?;
                    Ok(out)
                }));
            }
        });
    }
}

/// What the trace job hands back: the heatmaps and the layer they suggest.
struct Traced {
    traces: Vec<Trace>,
    heads: HeadTrace,
    suggestion: Suggestion,
}

/// A trace's layer and key choice, and the fact, key setting and model it was made for.
struct Suggestion {
    prompt: String,
    subject: String,
    key: KeySelect,
    model_version: u64,
    choice: KeyChoice,
}

impl Suggestion {
    /// Whether an edit of `request` with `key` on model `version` would choose the same
    /// (the trace follows the model's own answer, so the new target does not matter).
    fn applies_to(&self, request: &Request, key: KeySelect, version: u64) -> bool {
        self.prompt == request.prompt
            && self.subject == request.subject
            && self.key == key
            && self.model_version == version
    }
}

/// The per-head trace: one row per head, one column per layer, P(answer) with that head's
/// output restored at every token.
fn head_heatmap(ui: &mut egui::Ui, t: &HeadTrace) {
    ui.strong("one attention head (all tokens)")
        .on_hover_text(explain::HEAD_RECOVERY);
    let heads = t.p_restored.first().map_or(0, Vec::len);
    let row_labels: Vec<String> = (0..heads).map(|h| format!("head {h}")).collect();
    // On the clean probability's scale: a head that brings back little stays dark.
    layers_as_columns(ui, &t.p_restored, &row_labels, Some(t.p_clean));
}

/// A trace's `p_restored[layer][row]` as a heatmap with one column per layer.
fn layers_as_columns(
    ui: &mut egui::Ui,
    p_restored: &[Vec<f32>],
    row_labels: &[String],
    max: Option<f32>,
) {
    let layers = p_restored.len();
    let rows = row_labels.len();
    let mut values = vec![0f32; rows * layers];
    for (l, row) in p_restored.iter().enumerate() {
        for (i, &p) in row.iter().enumerate().take(rows) {
            values[i * layers + l] = p;
        }
    }
    let col_labels: Vec<String> = (0..layers).map(|l| l.to_string()).collect();
    Heatmap {
        values: &values,
        rows,
        cols: layers,
        row_labels,
        col_labels: &col_labels,
        cell: egui::vec2(18.0, 16.0),
        what: "P(answer)",
        max,
        centre: None,
    }
    .show(ui);
}

/// The prompt and its greedy continuation of a few tokens.
fn greedy(model: &Model, prompt: &str) -> anyhow::Result<String> {
    let ids = model.encode_prompt(prompt)?;
    let options = crate::model::generate::GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let generation = crate::model::generate::generate(model, &ids, &options, &Hooks::new())?;
    Ok(format!("{prompt}{}", generation.text))
}

fn top_text(o: &Outcome) -> String {
    o.top
        .iter()
        .map(|t| format!("{:?} {:.2}", t.token, t.prob))
        .collect::<Vec<_>>()
        .join(", ")
}
