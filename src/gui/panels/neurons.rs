//! Neurons: knowledge neurons of a fact (Dai et al.) — the integrated-gradients attribution
//! as a layer × neuron heatmap, the neurons kept across paraphrases, suppress / amplify with
//! the probabilities before and after, and each neuron's key contexts and value tokens.

use std::sync::Arc;

use super::{Panel, PanelKind, need_model, running, take};
use crate::gui::style::explain;
use crate::gui::widgets::{Heatmap, token_chips};
use crate::gui::workbench::{PanelRequest, Workbench};
use crate::jobs::Job;
use crate::model::{Hooks, Model};
use crate::neurons::{
    FactPrompt, Neuron, NeuronSettings, attribute, fact_prompts, key_contexts, mean_attributions,
    paraphrased, probabilities, refine, scale_neurons, value_tokens,
};
use crate::sae::activations::Corpus;

/// Neurons per heatmap column: the layer × neuron map is shown as the maximum over bins.
const BIN: usize = 8;
/// Tokens of the world corpus searched for each neuron's key contexts.
const KEY_TOKENS: u64 = 10_000;

struct NeuronView {
    neuron: Neuron,
    promotes: Vec<String>,
    /// (activation, tokens, per-token activations, peak index).
    keys: Vec<(f32, Vec<String>, Vec<f32>, usize)>,
}

struct Study {
    facts: Vec<FactPrompt>,
    /// Mean attribution over the prompts, `[layer][neuron]`.
    mean: Vec<Vec<f32>>,
    neurons: Vec<NeuronView>,
    p_target: Vec<f32>,
    version: u64,
}

struct Scaled {
    factor: f64,
    before: Vec<f32>,
    after: Vec<f32>,
}

pub struct Neurons {
    prompt: String,
    subject: String,
    target: String,
    study: Option<Study>,
    job: Option<Job<Study>>,
    scaled: Option<Scaled>,
    scale_job: Option<Job<Scaled>>,
}

impl Default for Neurons {
    fn default() -> Self {
        Self {
            prompt: "The capital of {} is".into(),
            subject: "Japan".into(),
            target: " Tokyo".into(),
            study: None,
            job: None,
            scaled: None,
            scale_job: None,
        }
    }
}

impl Panel for Neurons {
    fn kind(&self) -> PanelKind {
        PanelKind::Neurons
    }

    fn busy(&self) -> bool {
        running(&self.job) || running(&self.scale_job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        if let Some(s) = take(&mut self.job, wb) {
            self.study = Some(s);
            self.scaled = None;
        }
        if let Some(s) = take(&mut self.scale_job, wb) {
            self.scaled = Some(s);
        }
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        if wb.take_request(&PanelRequest::Start(PanelKind::Neurons)) {
            self.start(wb, &model);
        }
        egui::Grid::new("neuron-form")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("Prompt template");
                ui.text_edit_singleline(&mut self.prompt);
                ui.end_row();
                ui.label("Subject");
                ui.text_edit_singleline(&mut self.subject);
                ui.end_row();
                ui.label("Target");
                ui.text_edit_singleline(&mut self.target);
                ui.end_row();
            });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(self.job.is_none(), egui::Button::new("Find neurons"))
                .on_hover_text(explain::ATTRIBUTION)
                .clicked()
            {
                self.start(wb, &model);
            }
            if let Some(job) = &self.job {
                crate::gui::widgets::job_row(ui, job);
            }
        });
        let Some(study) = &self.study else {
            return;
        };
        if study.version != wb.model_version {
            ui.weak("(computed before the model's last change; run again to refresh)");
        }
        ui.separator();
        for (f, p) in study.facts.iter().zip(&study.p_target) {
            ui.label(format!("P(target) = {p:.3}   {:?}", f.prompt));
        }
        ui.strong("Attribution, layer × neuron (max over bins of 8 neurons)")
            .on_hover_text(explain::ATTRIBUTION);
        let layers = study.mean.len();
        let d = study.mean.first().map_or(0, Vec::len);
        let cols = d.div_ceil(BIN);
        let mut values = vec![0f32; layers * cols];
        for (l, row) in study.mean.iter().enumerate() {
            for (n, &a) in row.iter().enumerate() {
                let v = &mut values[l * cols + n / BIN];
                *v = v.max(a);
            }
        }
        let row_labels: Vec<String> = (0..layers).map(|l| format!("layer {l}")).collect();
        let col_labels: Vec<String> = (0..cols).map(|c| (c * BIN).to_string()).collect();
        let cell_w = ((ui.available_width() - 140.0) / cols.max(1) as f32).clamp(1.0, 12.0);
        Heatmap {
            values: &values,
            rows: layers,
            cols,
            row_labels: &row_labels,
            col_labels: &col_labels,
            cell: egui::vec2(cell_w, 18.0),
            what: "max attribution",
            max: None,
            centre: None,
        }
        .show(ui);

        ui.add_space(6.0);
        ui.horizontal(|ui| {
            ui.strong(format!("{} knowledge neurons", study.neurons.len()));
            let idle = self.scale_job.is_none();
            for (label, factor) in [("Suppress (×0)", 0.0), ("Amplify (×2)", 2.0)] {
                if ui
                    .add_enabled(idle, egui::Button::new(label))
                    .on_hover_text("scale these neurons at the last token and re-run the prompts")
                    .clicked()
                {
                    let model = model.clone();
                    let facts = study.facts.clone();
                    let neurons: Vec<Neuron> = study.neurons.iter().map(|n| n.neuron).collect();
                    self.scale_job = Some(wb.spawn("scale neurons", move |_| {
                        Ok(Scaled {
                            factor,
                            before: probabilities(&model, &facts, &Hooks::new())?,
                            after: probabilities(&model, &facts, &scale_neurons(&neurons, factor))?,
                        })
                    }));
                }
            }
        });
        if let Some(s) = &self.scaled {
            egui::Grid::new("scaled").striped(true).show(ui, |ui| {
                ui.strong("prompt");
                ui.strong("P before");
                ui.strong(format!("P with neurons ×{}", s.factor));
                ui.end_row();
                for ((f, b), a) in study.facts.iter().zip(&s.before).zip(&s.after) {
                    ui.label(&f.prompt);
                    ui.label(format!("{b:.3}"));
                    ui.label(format!("{a:.3} ({:+.0}%)", 100.0 * (a - b) / b.max(1e-12)));
                    ui.end_row();
                }
            });
        }
        for v in &study.neurons {
            ui.separator();
            ui.label(format!(
                "L{} N{}  attribution {:.4}, in {:.0}% of the prompts",
                v.neuron.layer,
                v.neuron.neuron,
                v.neuron.attribution,
                100.0 * v.neuron.shared_by
            ));
            ui.label(format!("value (what it writes): {}", v.promotes.join(" ")))
                .on_hover_text(
                    "tokens its down-projection column promotes through the unembedding",
                );
            for (a, tokens, acts, peak) in &v.keys {
                ui.horizontal(|ui| {
                    ui.label(egui::RichText::new(format!("key {a:.2}")).monospace())
                        .on_hover_text("a context of the world corpus that fires it");
                    token_chips(ui, tokens, Some(acts), a.abs().max(1e-6), Some(*peak));
                });
            }
        }
    }
}

impl Neurons {
    fn start(&mut self, wb: &Workbench, model: &Arc<Model>) {
        let model = model.clone();
        let (template, subject, target) = (
            self.prompt.clone(),
            self.subject.clone(),
            self.target.clone(),
        );
        let version = wb.model_version;
        self.job = Some(wb.spawn("knowledge neurons", move |job| {
            if !template.contains("{}") {
                anyhow::bail!("the prompt template {template:?} has no {{}} for the subject");
            }
            let facts = fact_prompts(&model, &paraphrased(&template), &subject, &target)?;
            let settings = NeuronSettings::default();
            let mut attributions = Vec::new();
            for (i, f) in facts.iter().enumerate() {
                job.set_progress(i as u64, facts.len() as u64, "prompts");
                if job.is_cancelled() {
                    anyhow::bail!("cancelled");
                }
                let ids = model.encode_prompt(&f.prompt)?;
                attributions.push(attribute(&model, &ids, f.target_id, settings.steps)?);
            }
            let neurons = refine(&attributions, &settings);
            job.set_message("key contexts and value tokens");
            let corpus = Corpus::parse("world", "text")?;
            let contexts = key_contexts(&model, &neurons, &corpus, KEY_TOKENS, 3)?;
            let names = model.token_names();
            let views = neurons
                .iter()
                .zip(contexts)
                .map(|(n, cs)| {
                    Ok(NeuronView {
                        neuron: *n,
                        promotes: value_tokens(&model, n, 8, &names)?
                            .top
                            .into_iter()
                            .map(|t| format!("{:?}", t.token))
                            .collect(),
                        keys: cs
                            .into_iter()
                            .map(|c| {
                                let tokens = model.tokenizer.tokens_display(&c.token_ids);
                                (c.activation, tokens, c.token_activations, c.peak as usize)
                            })
                            .collect(),
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            let mean = mean_attributions(&attributions);
            Ok(Study {
                p_target: probabilities(&model, &facts, &Hooks::new())?,
                facts,
                mean,
                neurons: views,
                version,
            })
        }));
    }
}
