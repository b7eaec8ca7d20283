//! Attention: every head scored by the standard detectors (previous-token, first-token,
//! duplicate-token, induction) on a prompt or on the induction probe, and one head's pattern
//! as a query × key heatmap (CircuitsVis's attention view), with the heads it composes with
//! (Q-, K- and V-composition scores from the weights).

use egui::vec2;

use super::{Panel, PanelKind, Reader, need_model};
use crate::attention::{
    Detector, DetectorScores, HeadAblation, Patterns, ablate_heads, next_token_loss, patterns,
    probe_copies, repeated_random_tokens,
};
use crate::composition::{Composition, HeadPartners, head_composition};
use crate::gui::style::explain;
use crate::gui::widgets::{Heatmap, display_token, job_row, prompt_row};
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::JobHandle;
use crate::model::{Hooks, Model};

/// Length of the random run the induction probe repeats.
const PROBE_LENGTH: usize = 20;
/// Heads offered as buttons under the detector grid.
const STRONGEST: usize = 3;

/// Which tokens the heads are read on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sequence {
    Prompt,
    /// A start token and `PROBE_LENGTH` random tokens, twice.
    InductionProbe,
}

/// What a reading answers.
#[derive(Clone, Debug, PartialEq)]
struct Query {
    prompt: String,
    sequence: Sequence,
}

struct Reading {
    patterns: Patterns,
    detectors: Vec<DetectorScores>,
    /// The probe's clean loss on its first and second copy.
    probe_losses: Option<[f32; 2]>,
    /// Each head zeroed in turn: over the prompt, or the probe's second copy.
    ablation: HeadAblation,
}

pub struct Attention {
    prompt: String,
    sequence: Sequence,
    detector: Detector,
    /// The head whose pattern is shown (`None`: the chosen detector's strongest).
    head: Option<(usize, usize)>,
    reader: Reader<Query, Reading>,
    /// Which composition the shown head's writers and readers are ranked by.
    composition: Composition,
    /// The shown head's Q-, K- and V-composition partners.
    partners: Reader<(usize, usize), Vec<HeadPartners>>,
}

impl Default for Attention {
    fn default() -> Self {
        Self {
            prompt: "The capital of Japan is Tokyo. The capital of Japan is".into(),
            sequence: Sequence::Prompt,
            detector: Detector::PreviousToken,
            head: None,
            reader: Reader::default(),
            composition: Composition::K,
            partners: Reader::default(),
        }
    }
}

impl Panel for Attention {
    fn kind(&self) -> PanelKind {
        PanelKind::Attention
    }

    fn busy(&self) -> bool {
        self.reader.busy() || self.partners.busy()
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        self.reader.poll(wb);
        self.partners.poll(wb);
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        // A head picked in the Lens: its pattern on the Lens's prompt.
        let mut run = false;
        wb.requests.retain(|r| match r {
            PanelRequest::Pattern {
                prompt,
                layer,
                head,
            } => {
                self.prompt = prompt.clone();
                self.sequence = Sequence::Prompt;
                self.head = Some((*layer, *head));
                run = true;
                false
            }
            _ => true,
        });
        run |= prompt_row(ui, &mut self.prompt, "Show");
        ui.horizontal(|ui| {
            ui.label("Read the heads on");
            run |= ui
                .radio_value(&mut self.sequence, Sequence::Prompt, "the prompt")
                .clicked();
            run |= ui
                .radio_value(
                    &mut self.sequence,
                    Sequence::InductionProbe,
                    format!("the induction probe ({PROBE_LENGTH} random tokens, repeated)"),
                )
                .on_hover_text(explain::INDUCTION_PROBE)
                .clicked();
            // Here rather than on a row of its own, so that nothing below moves while a
            // reading runs.
            if let Some(job) = self.reader.job() {
                ui.separator();
                job_row(ui, job);
            }
        });
        if run || self.reader.asked_mut().is_none() {
            self.reader.ask(Query {
                prompt: self.prompt.clone(),
                sequence: self.sequence,
            });
        }
        let weights = model.clone();
        self.reader
            .run_due(wb, "attention patterns", move |query, job| {
                read(&model, query, job)
            });
        let Some(answer) = self.reader.answer() else {
            return;
        };
        let reading = &answer.value;
        ui.separator();
        ui.horizontal(|ui| {
            ui.strong("Heads by detector")
                .on_hover_text(explain::HEAD_DETECTORS);
            for d in Detector::ALL {
                ui.radio_value(&mut self.detector, d, d.name());
            }
        });
        let Some(scores) = reading
            .detectors
            .iter()
            .find(|s| s.detector == self.detector)
        else {
            return;
        };
        if let Some(picked) = detector_grid(ui, scores) {
            self.head = Some(picked);
        }
        ui.horizontal(|ui| {
            ui.label("strongest:");
            for (l, h, s) in scores.ranked().into_iter().take(STRONGEST) {
                if ui.button(format!("head {l}.{h} {s:.2}")).clicked() {
                    self.head = Some((l, h));
                }
            }
        });
        let (layer, head) = self
            .head
            .filter(|&(l, h)| l < reading.patterns.n_layers && h < reading.patterns.n_heads)
            .or_else(|| scores.ranked().first().map(|&(l, h, _)| (l, h)))
            .unwrap_or((0, 0));
        // Above the pattern, whose heatmap grows with the sequence.
        if self.partners.asked_mut().copied() != Some((layer, head)) {
            self.partners.ask((layer, head));
        }
        self.partners
            .run_due(wb, "composition scores", move |&(layer, head), job| {
                head_composition(&weights, layer, head, job.cancel_flag())?
                    .ok_or_else(|| anyhow::anyhow!("cancelled"))
            });
        if let Some(picked) = composition_ui(
            ui,
            &mut self.composition,
            &self.partners,
            (layer, head),
            wb.model_version,
        ) {
            self.head = Some(picked);
        }
        ui.add_space(6.0);
        pattern_view(ui, reading, layer, head);
        if answer.model_version != wb.model_version {
            ui.weak("(computed before the model's last change; reading again)");
        }
    }
}

/// Pairs offered as buttons on each side of the shown head.
const PARTNERS: usize = 4;

/// The shown head's strongest writers and readers by the chosen composition, and the earlier
/// heads' scores into it as a blocks × heads grid; returns a picked head.
fn composition_ui(
    ui: &mut egui::Ui,
    mode: &mut Composition,
    partners: &Reader<(usize, usize), Vec<HeadPartners>>,
    (layer, head): (usize, usize),
    model_version: u64,
) -> Option<(usize, usize)> {
    ui.add_space(6.0);
    ui.horizontal(|ui| {
        ui.strong(format!("Composition of head {layer}.{head}"))
            .on_hover_text(explain::COMPOSITION);
        for m in Composition::ALL {
            ui.radio_value(mode, m, format!("{m}-composition"));
        }
        if let Some(job) = partners.job() {
            job_row(ui, job);
        }
    });
    let answer = partners.answer()?;
    if answer.question != (layer, head) {
        return None;
    }
    if answer.model_version != model_version {
        ui.weak("(computed before the model's last change; computing again)");
    }
    let scores = answer.value.iter().find(|p| p.mode == *mode)?;
    let mut picked = None;
    let mut buttons = |ui: &mut egui::Ui, what: &str, heads: Vec<((usize, usize), f32)>| {
        ui.horizontal(|ui| {
            ui.label(what);
            if heads.is_empty() {
                ui.weak("none");
            }
            for ((l, h), score) in heads.into_iter().take(PARTNERS) {
                if ui
                    .button(format!("{l}.{h} {score:.2}"))
                    .on_hover_text("show its pattern")
                    .clicked()
                {
                    picked = Some((l, h));
                }
            }
        });
    };
    buttons(ui, "reads most from:", scores.strongest_writers());
    buttons(ui, "read most by:", scores.strongest_readers());
    if layer > 0 {
        ui.weak(format!(
            "rows: earlier blocks; columns: heads; each cell how much of that head's output \
             head {layer}.{head} reads ({mode}); a reader at random to its writer scores about \
             {:.3} (click a head to see its pattern)",
            scores.baseline
        ));
        let heads = scores.writers.first().map_or(0, Vec::len);
        let values: Vec<f32> = scores.writers[..layer].iter().flatten().copied().collect();
        let rows: Vec<String> = (0..layer).map(|l| format!("block {l}")).collect();
        let cols: Vec<String> = (0..heads).map(|h| format!("H{h}")).collect();
        let what = format!("{mode}-composition into {layer}.{head}");
        let max = values.iter().copied().fold(scores.baseline, f32::max);
        if let Some(clicked) = (Heatmap {
            values: &values,
            rows: layer,
            cols: heads,
            row_labels: &rows,
            col_labels: &cols,
            cell: vec2(40.0, 18.0),
            what: &what,
            max: Some(max),
            centre: None,
        })
        .show(ui)
        {
            picked = Some(clicked);
        }
    }
    picked
}

/// Patterns, detector scores and head ablation for one query.
fn read(model: &Model, query: &Query, job: &JobHandle) -> anyhow::Result<Reading> {
    let ids = match query.sequence {
        Sequence::Prompt => model.encode_prompt(&query.prompt)?,
        Sequence::InductionProbe => repeated_random_tokens(model, PROBE_LENGTH, 0)?,
    };
    anyhow::ensure!(ids.len() >= 2, "the prompt needs two tokens or more");
    let patterns = patterns(model, &ids)?;
    let detectors = patterns.detect();
    let (probe_losses, scored) = match query.sequence {
        Sequence::Prompt => (None, 0..ids.len() - 1),
        Sequence::InductionProbe => {
            let [first, second] = probe_copies(ids.len(), PROBE_LENGTH);
            let loss = |r| next_token_loss(model, &ids, r, &Hooks::new());
            (Some([loss(first)?, loss(second.clone())?]), second)
        }
    };
    job.set_message("zeroing each head");
    let ablation = ablate_heads(model, &ids, scored, job.cancel_flag())?
        .ok_or_else(|| anyhow::anyhow!("cancelled"))?;
    Ok(Reading {
        patterns,
        detectors,
        probe_losses,
        ablation,
    })
}

/// Blocks × heads coloured by the detector's score; returns a clicked head.
fn detector_grid(ui: &mut egui::Ui, scores: &DetectorScores) -> Option<(usize, usize)> {
    if scores.queries == 0 {
        ui.weak(format!(
            "no query on this sequence for the {} detector (try the induction probe)",
            scores.detector.name()
        ));
        return None;
    }
    ui.weak(format!(
        "rows: blocks; columns: heads; each cell the head's mean attention on the detector's \
         keys over {} queries (click a head to see its pattern)",
        scores.queries
    ));
    let heads = scores.scores.first().map_or(0, Vec::len);
    let values: Vec<f32> = scores.scores.iter().flatten().copied().collect();
    let rows: Vec<String> = (0..scores.scores.len())
        .map(|l| format!("block {l}"))
        .collect();
    let cols: Vec<String> = (0..heads).map(|h| format!("H{h}")).collect();
    Heatmap {
        values: &values,
        rows: rows.len(),
        cols: heads,
        row_labels: &rows,
        col_labels: &cols,
        cell: vec2(40.0, 18.0),
        what: scores.detector.name(),
        max: Some(1.0),
        centre: None,
    }
    .show(ui)
}

/// One head's pattern: queries down, keys across, with its detector scores.
fn pattern_view(ui: &mut egui::Ui, reading: &Reading, layer: usize, head: usize) {
    let scores: Vec<String> = reading
        .detectors
        .iter()
        .filter(|d| d.queries > 0)
        .map(|d| format!("{} {:.2}", d.detector.name(), d.scores[layer][head]))
        .collect();
    ui.strong(format!("Attention pattern of head {layer}.{head}"))
        .on_hover_text(explain::ATTENTION_PATTERN);
    ui.label(scores.join(" · "));
    let a = &reading.ablation;
    let over = match reading.probe_losses {
        Some([first, second]) => format!(
            "the second copy (clean {:.3} nats per token; the first copy {first:.3})",
            second
        ),
        None => format!("the prompt (clean {:.3} nats per token)", a.clean_loss),
    };
    ui.label(format!(
        "zeroing this head changes the next-token loss over {over} by {:+.3}",
        a.delta[layer][head]
    ))
    .on_hover_text(explain::HEAD_ABLATION);
    let p = &reading.patterns;
    let tokens: Vec<String> = p.tokens.iter().map(|t| display_token(t)).collect();
    let seq = p.seq() as f32;
    let side = ((ui.available_width() - 140.0) / seq).clamp(6.0, 28.0);
    let what = format!("attention of head {layer}.{head}");
    Heatmap {
        values: p.head(layer, head),
        rows: p.seq(),
        cols: p.seq(),
        row_labels: &tokens,
        col_labels: &tokens,
        cell: vec2(side, side.min(18.0)),
        what: &what,
        max: Some(1.0),
        centre: None,
    }
    .show(ui);
}
