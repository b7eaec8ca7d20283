//! Playground: a prompt's tokens (coloured by a feature or neuron), the next-token
//! distribution, and generation with and without steering — by SAE features, by a vector from
//! contrasting prompts, or both.

use std::sync::Arc;

use candle_core::{D, IndexOp};
use egui_plot::{Bar, BarChart, Plot};

use super::{Panel, PanelKind, need_model, running, take};
use crate::features::steer::{Steer, SteerMode, steering_hooks};
use crate::gui::widgets::{display_token, prompt_row, spinner, token_chips};
use crate::gui::workbench::{OpenSae, PanelRequest, Workbench};
use crate::jobs::Job;
use crate::model::generate::{GenerateOptions, TokenProb, generate, top_tokens};
use crate::model::{HookPoint, Hooks, Model};
use crate::saliency::{SaliencyRequest, saliency};
use crate::steering::{Readout, SteeringVectors};

/// What colours the token chips.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ColourBy {
    Nothing,
    Feature(u32),
    Neuron {
        layer: usize,
        index: usize,
    },
    /// Each token's integrated gradient towards the most likely next token.
    Saliency,
}

/// Integrated-gradients steps for the saliency colouring.
const SALIENCY_STEPS: usize = 16;

/// One forward pass over the prompt.
struct Reading {
    tokens: Vec<String>,
    top: Vec<TokenProb>,
    values: Option<Vec<f32>>,
    /// With an SAE open: each token's most active features, strongest first.
    active: Option<Vec<Vec<(u32, f32)>>>,
    /// The SAE open when it was read.
    sae_dir: Option<std::path::PathBuf>,
    prompt: String,
    colour: ColourBy,
    version: u64,
}

struct Continuations {
    plain: String,
    steered: Option<String>,
    /// The steering vector used, described (hook, norms).
    vector: Option<String>,
}

/// A steering vector made from two lists of prompts when Generate is pressed.
#[derive(Clone)]
struct VectorForm {
    on: bool,
    /// One prompt per line.
    positive: String,
    negative: String,
    /// Empty: the middle block's `hook_resid_post`.
    hook: String,
    coefficient: f64,
}

impl Default for VectorForm {
    fn default() -> Self {
        Self {
            on: false,
            positive:
                "日本の首都は東京です。\nフランスの首都はパリです。\nイタリアの通貨はユーロです。"
                    .into(),
            negative: "The capital of Japan is Tokyo.\nThe capital of France is Paris.\n\
                       The currency of Italy is the euro."
                .into(),
            hook: String::new(),
            coefficient: 2.0,
        }
    }
}

pub struct Playground {
    prompt: String,
    colour: ColourBy,
    feature_input: u32,
    neuron_layer: usize,
    neuron_index: usize,
    reading: Option<Reading>,
    read_job: Option<Job<Reading>>,
    /// The token whose active features are listed (`None`: the last).
    picked_token: Option<usize>,
    steers: Vec<Steer>,
    steer_mode: SteerMode,
    max_new_tokens: usize,
    vector: VectorForm,
    continuations: Option<Continuations>,
    generate_job: Option<Job<Continuations>>,
}

impl Default for Playground {
    fn default() -> Self {
        Self {
            prompt: "The capital of Japan is".into(),
            colour: ColourBy::Nothing,
            feature_input: 0,
            neuron_layer: 0,
            neuron_index: 0,
            reading: None,
            read_job: None,
            picked_token: None,
            steers: Vec::new(),
            steer_mode: SteerMode::Add,
            max_new_tokens: 12,
            vector: VectorForm::default(),
            continuations: None,
            generate_job: None,
        }
    }
}

impl Panel for Playground {
    fn kind(&self) -> PanelKind {
        PanelKind::Playground
    }

    fn busy(&self) -> bool {
        running(&self.read_job) || running(&self.generate_job)
    }

    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench) {
        self.take_requests(wb);
        if let Some(r) = take(&mut self.read_job, wb) {
            self.reading = Some(r);
        }
        if let Some(c) = take(&mut self.generate_job, wb) {
            self.continuations = Some(c);
        }
        let Some(model) = need_model(ui, wb) else {
            return;
        };
        if prompt_row(ui, &mut self.prompt, "Run") {
            self.start_reading(wb, &model);
        }
        self.colour_picker(ui, wb, &model);
        let stale = match &self.reading {
            Some(r) => {
                r.version != wb.model_version
                    || r.colour != self.colour
                    || r.prompt != self.prompt
                    || r.sae_dir.as_ref() != wb.sae.as_ref().map(|s| &s.dir)
            }
            None => true,
        };
        if stale && self.read_job.is_none() && !self.prompt.trim().is_empty() {
            self.start_reading(wb, &model);
        }
        ui.separator();
        if let Some(r) = &self.reading {
            match self.show_reading(ui, r, wb) {
                Some(Pick::Token(i)) => self.picked_token = Some(i),
                Some(Pick::Colour(f)) => {
                    self.colour = ColourBy::Feature(f);
                    self.feature_input = f;
                }
                Some(Pick::Page(f)) => {
                    wb.requests.push(PanelRequest::Feature(f));
                    wb.goto = Some(PanelKind::Features);
                }
                None => {}
            }
        } else if self.read_job.is_some() {
            spinner(ui);
        }
        ui.separator();
        self.steering_ui(ui, wb, &model);
    }
}

impl Playground {
    fn take_requests(&mut self, wb: &mut Workbench) {
        wb.requests.retain(|r| match r {
            PanelRequest::Steer(f) => {
                if !self.steers.iter().any(|s| s.feature == *f) {
                    self.steers.push(Steer {
                        feature: *f,
                        value: 10.0,
                    });
                }
                self.colour = ColourBy::Feature(*f);
                self.feature_input = *f;
                false
            }
            _ => true,
        });
    }

    fn colour_picker(&mut self, ui: &mut egui::Ui, wb: &Workbench, model: &Model) {
        ui.horizontal(|ui| {
            ui.label("Colour tokens by");
            ui.radio_value(&mut self.colour, ColourBy::Nothing, "nothing");
            let has_sae = wb.sae.is_some();
            ui.add_enabled_ui(has_sae, |ui| {
                let d_sae = wb.sae.as_ref().map_or(1, |s| s.sae.sae.d_sae()) as u32;
                if ui
                    .radio(matches!(self.colour, ColourBy::Feature(_)), "SAE feature")
                    .on_disabled_hover_text("open an SAE first")
                    .clicked()
                {
                    self.colour = ColourBy::Feature(self.feature_input);
                }
                if ui
                    .add(egui::DragValue::new(&mut self.feature_input).range(0..=d_sae - 1))
                    .changed()
                {
                    self.colour = ColourBy::Feature(self.feature_input);
                }
            });
            let dims = model.dims();
            if ui
                .radio(
                    matches!(self.colour, ColourBy::Neuron { .. }),
                    "MLP neuron (layer, index)",
                )
                .on_hover_text("blocks.L.mlp.hook_post: the FFN key activations")
                .clicked()
            {
                self.colour = self.neuron();
            }
            let l =
                ui.add(egui::DragValue::new(&mut self.neuron_layer).range(0..=dims.n_layers - 1));
            let n = ui.add(egui::DragValue::new(&mut self.neuron_index).range(0..=dims.d_mlp - 1));
            if l.changed() || n.changed() {
                self.colour = self.neuron();
            }
            ui.radio_value(&mut self.colour, ColourBy::Saliency, "saliency")
                .on_hover_text(
                    "integrated gradients of the most likely next token's logit at each token's \
                     embedding, from the start token's (monoscope saliency): orange pushes \
                     towards it, blue away",
                );
        });
    }

    fn neuron(&self) -> ColourBy {
        ColourBy::Neuron {
            layer: self.neuron_layer,
            index: self.neuron_index,
        }
    }

    fn start_reading(&mut self, wb: &Workbench, model: &Arc<Model>) {
        let model = model.clone();
        let sae = wb.sae.clone();
        let prompt = self.prompt.clone();
        let colour = self.colour;
        let version = wb.model_version;
        self.read_job = Some(wb.spawn("run prompt", move |_| {
            read_prompt(&model, sae.as_deref(), &prompt, colour, version)
        }));
    }

    fn show_reading(&self, ui: &mut egui::Ui, r: &Reading, wb: &Workbench) -> Option<Pick> {
        let max = r.values.as_ref().map_or(0.0, |v| {
            v.iter().copied().fold(0.0f32, |a, b| a.max(b.abs()))
        });
        ui.label(format!("{} tokens", r.tokens.len()));
        let picked = self
            .picked_token
            .filter(|&i| i < r.tokens.len())
            .unwrap_or(r.tokens.len().saturating_sub(1));
        let highlight = r.active.is_some().then_some(picked);
        let mut pick =
            token_chips(ui, &r.tokens, r.values.as_deref(), max, highlight).map(Pick::Token);
        if r.values.is_some() {
            ui.weak(format!("colour scale: 0 … {max:.3}"));
        }
        if let Some(active) = r.active.as_ref().and_then(|a| a.get(picked)) {
            pick = pick.or(active_features(ui, &r.tokens[picked], picked, active, wb));
        }
        ui.add_space(6.0);
        ui.strong("Next token");
        let bars: Vec<Bar> = r
            .top
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Bar::new(i as f64, t.prob as f64)
                    .name(format!("{:?} {:.3}", t.token, t.prob))
                    .width(0.7)
            })
            .collect();
        let names: Vec<String> = r.top.iter().map(|t| format!("{:?}", t.token)).collect();
        Plot::new("next-token")
            .height(180.0)
            .allow_scroll(false)
            .allow_zoom(false)
            .allow_drag(false)
            .include_y(0.0)
            .include_y(1.0)
            .y_axis_label("probability")
            .x_axis_formatter(move |mark, _| {
                let i = mark.value.round();
                if (mark.value - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .show(ui, |plot| plot.bar_chart(BarChart::new("p(next)", bars)));
        for t in r.top.iter().take(3) {
            ui.label(format!("{:?}  {:.1}%", t.token, 100.0 * t.prob));
        }
        pick
    }

    fn steering_ui(&mut self, ui: &mut egui::Ui, wb: &Workbench, model: &Arc<Model>) {
        ui.strong("Generate");
        ui.horizontal(|ui| {
            ui.label("new tokens");
            ui.add(egui::DragValue::new(&mut self.max_new_tokens).range(1..=200));
            if wb.sae.is_some() {
                ui.label("steering");
                ui.radio_value(&mut self.steer_mode, SteerMode::Add, "add")
                    .on_hover_text("add VALUE × the feature's decoder direction at every token");
                ui.radio_value(&mut self.steer_mode, SteerMode::Clamp, "clamp")
                    .on_hover_text("set the feature to VALUE, keeping the SAE's error term");
                if ui.button("+ feature").clicked() {
                    self.steers.push(Steer {
                        feature: self.feature_input,
                        value: 10.0,
                    });
                }
            }
        });
        let d_sae = wb.sae.as_ref().map_or(1, |s| s.sae.sae.d_sae()) as u32;
        let mut remove = None;
        for (i, s) in self.steers.iter_mut().enumerate() {
            ui.horizontal(|ui| {
                ui.label("feature");
                ui.add(egui::DragValue::new(&mut s.feature).range(0..=d_sae - 1));
                ui.add(egui::Slider::new(&mut s.value, -40.0..=40.0).text("value"));
                if ui.small_button("🗙").clicked() {
                    remove = Some(i);
                }
            });
        }
        if let Some(i) = remove {
            self.steers.remove(i);
        }
        vector_form(ui, &mut self.vector, model);
        let running = self.generate_job.is_some();
        if ui
            .add_enabled(!running, egui::Button::new("Generate"))
            .clicked()
        {
            let model = model.clone();
            let sae = wb.sae.clone();
            let prompt = self.prompt.clone();
            let steers = self.steers.clone();
            let mode = self.steer_mode;
            let n = self.max_new_tokens;
            let vector = self.vector.clone();
            self.generate_job = Some(wb.spawn("generate", move |_| {
                let sae_steering = sae.as_deref().map(|s| (s, steers.as_slice(), mode));
                continue_prompt(&model, sae_steering, &vector, &prompt, n)
            }));
        }
        if running {
            spinner(ui);
        }
        if let Some(c) = &self.continuations {
            egui::Grid::new("continuations")
                .num_columns(2)
                .striped(true)
                .show(ui, |ui| {
                    ui.label("plain");
                    ui.label(format!("{}⟨{}⟩", self.prompt, c.plain));
                    ui.end_row();
                    if let Some(steered) = &c.steered {
                        ui.label("steered");
                        ui.label(format!("{}⟨{}⟩", self.prompt, steered));
                        ui.end_row();
                    }
                    if let Some(vector) = &c.vector {
                        ui.label("");
                        ui.weak(vector);
                        ui.end_row();
                    }
                });
        }
    }
}

/// What a click in the reading asks for.
enum Pick {
    /// List this token's active features.
    Token(usize),
    /// Colour the tokens by this feature.
    Colour(u32),
    /// Open this feature's page.
    Page(u32),
}

/// Features listed per token.
const ACTIVE_SHOWN: usize = 8;

/// The picked token's most active SAE features: a button to open each one's page, its
/// concept label, its activation, and a button to colour the prompt by it.
fn active_features(
    ui: &mut egui::Ui,
    token: &str,
    position: usize,
    active: &[(u32, f32)],
    wb: &Workbench,
) -> Option<Pick> {
    ui.add_space(4.0);
    ui.strong(format!(
        "SAE features active at token {position} ({}) — click a token to choose another",
        display_token(token)
    ));
    if active.is_empty() {
        ui.weak("no feature fires here");
        return None;
    }
    let mut pick = None;
    egui::Grid::new("active features")
        .striped(true)
        .num_columns(4)
        .show(ui, |ui| {
            for &(feature, activation) in active {
                if ui
                    .button(format!("#{feature}"))
                    .on_hover_text("open its page")
                    .clicked()
                {
                    pick = Some(Pick::Page(feature));
                }
                ui.label(wb.labels.get(&feature).map_or("", String::as_str));
                ui.label(format!("{activation:.3}"));
                if ui
                    .small_button("colour")
                    .on_hover_text("colour the prompt's tokens by this feature")
                    .clicked()
                {
                    pick = Some(Pick::Colour(feature));
                }
                ui.end_row();
            }
        });
    pick
}

fn read_prompt(
    model: &Model,
    sae: Option<&OpenSae>,
    prompt: &str,
    colour: ColourBy,
    version: u64,
) -> anyhow::Result<Reading> {
    let ids = model.encode_prompt(prompt)?;
    let point = match colour {
        ColourBy::Nothing | ColourBy::Saliency => None,
        ColourBy::Feature(_) => sae.map(|s| s.hook),
        ColourBy::Neuron { layer, .. } => Some(HookPoint::MlpPost(layer)),
    };
    let hooks = Hooks::new().capture(point).capture(sae.map(|s| s.hook));
    let out = model.forward(&model.ids_tensor(&ids)?, &hooks)?;
    let active = match sae {
        Some(open) => {
            let x = out.cache.require(open.hook)?.i(0)?;
            Some(open.sae.sae.strongest_latents(&x, ACTIVE_SHOWN)?)
        }
        None => None,
    };
    let last: Vec<f32> = out
        .logits
        .i((0, ids.len() - 1))?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let values = match (colour, point) {
        (ColourBy::Feature(f), Some(p)) => {
            let sae = sae
                .map(|s| &s.sae.sae)
                .ok_or_else(|| anyhow::anyhow!("no SAE"))?;
            let x = out
                .cache
                .require(p)?
                .i(0)?
                .to_dtype(candle_core::DType::F32)?;
            let acts = sae.encode(&x)?;
            Some(
                acts.narrow(D::Minus1, f as usize, 1)?
                    .flatten_all()?
                    .to_vec1()?,
            )
        }
        (ColourBy::Saliency, _) => {
            let top = top_tokens(model, &last, 1);
            let request = SaliencyRequest {
                position: ids.len() - 1,
                ids: ids.clone(),
                target: top.first().map_or(0, |t| t.id),
                wrong: None,
                steps: SALIENCY_STEPS,
                baseline: SaliencyRequest::default_baseline(model),
            };
            let never = std::sync::atomic::AtomicBool::new(false);
            saliency(model, &request, &never, &mut |_, _| {})?.map(|report| {
                report
                    .tokens
                    .iter()
                    .map(|t| t.integrated_gradients)
                    .collect()
            })
        }
        (ColourBy::Neuron { index, .. }, Some(p)) => {
            let x = out
                .cache
                .require(p)?
                .i(0)?
                .to_dtype(candle_core::DType::F32)?;
            Some(x.narrow(D::Minus1, index, 1)?.flatten_all()?.to_vec1()?)
        }
        _ => None,
    };
    Ok(Reading {
        tokens: model.tokenizer.tokens_display(&ids),
        top: top_tokens(model, &last, 10),
        values,
        active,
        sae_dir: sae.map(|s| s.dir.clone()),
        prompt: prompt.to_string(),
        colour,
        version,
    })
}

/// The hook a steering vector is read and added at when the form names none: the residual
/// stream after the middle block.
fn default_vector_hook(model: &Model) -> String {
    HookPoint::ResidPost(model.dims().n_layers.saturating_sub(1) / 2).to_string()
}

/// The steering-vector controls: on/off, hook, coefficient, and the two prompt lists.
fn vector_form(ui: &mut egui::Ui, form: &mut VectorForm, model: &Model) {
    ui.horizontal(|ui| {
        ui.checkbox(&mut form.on, "steer with a vector")
            .on_hover_text(
                "activation addition: the mean activation of the positive prompts minus that of \
             the negative ones, added × coefficient at the hook on every token",
            );
        let label = ui.label("vector hook");
        ui.add(
            egui::TextEdit::singleline(&mut form.hook)
                .desired_width(220.0)
                .hint_text(default_vector_hook(model)),
        )
        .labelled_by(label.id);
        ui.add(egui::Slider::new(&mut form.coefficient, -10.0..=10.0).text("coefficient"));
    });
    if !form.on {
        return;
    }
    ui.columns(2, |columns| {
        for (ui, (name, prompts)) in columns.iter_mut().zip([
            ("positive prompts, one per line", &mut form.positive),
            ("negative prompts, one per line", &mut form.negative),
        ]) {
            let label = ui.label(name);
            ui.add(
                egui::TextEdit::multiline(prompts)
                    .desired_rows(3)
                    .desired_width(f32::INFINITY),
            )
            .labelled_by(label.id);
        }
    });
}

/// The plain continuation, and the steered one when SAE features or a vector steer.
fn continue_prompt(
    model: &Model,
    sae_steering: Option<(&OpenSae, &[Steer], SteerMode)>,
    vector: &VectorForm,
    prompt: &str,
    max_new_tokens: usize,
) -> anyhow::Result<Continuations> {
    let ids = model.encode_prompt(prompt)?;
    let options = GenerateOptions {
        max_new_tokens,
        ..Default::default()
    };
    let plain = generate(model, &ids, &options, &Hooks::new())?.text;
    let mut hooks = match sae_steering {
        Some((s, steers, mode)) if !steers.is_empty() => Some(steering_hooks(
            &s.sae.sae,
            s.site(),
            steers,
            mode,
            &model.device,
        )?),
        _ => None,
    };
    let mut described = None;
    if vector.on {
        let hook = match vector.hook.trim() {
            "" => default_vector_hook(model),
            named => named.to_string(),
        };
        let lines = |text: &str| -> Vec<String> {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        };
        let vectors = SteeringVectors::from_contrast(
            model,
            &model.resolve_hooks(&[&hook])?,
            &lines(&vector.positive),
            &lines(&vector.negative),
            Readout::Mean,
        )?;
        let v = &vectors.vectors[0];
        let norm = v.vector.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        described = Some(format!(
            "vector at {}: norm {norm:.2} (the activations it came from: {:.2}), × {:.2}",
            v.hook,
            v.activation_norm.unwrap_or_default(),
            vector.coefficient
        ));
        hooks =
            Some(vectors.add_to(hooks.unwrap_or_default(), vector.coefficient, &model.device)?);
    }
    let steered = match hooks {
        Some(hooks) => Some(generate(model, &ids, &options, &hooks)?.text),
        None => None,
    };
    Ok(Continuations {
        plain,
        steered,
        vector: described,
    })
}
