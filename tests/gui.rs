//! The workbench driven through its widgets' labels (egui_kittest, headless): every panel on
//! the bundled world model and SAE, with real jobs running behind them.
#![allow(clippy::unwrap_used)] // tests may panic on failure

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::down_proj;
use egui_kittest::Harness;
use egui_kittest::kittest::{By, NodeT, Queryable};
use monoscope::gui::{App, GuiOptions, PanelKind, Remembered};
use monoscope::model::generate::{GenerateOptions, generate, next_token_top_k};
use monoscope::model::{HookPoint, Hooks, Model};
use monoscope::path_patching::{PathRequest, Receiver, path_patch};
use monoscope::sae::activations::{ActivationSource, Corpus, WindowSettings};
use monoscope::saliency::{SaliencyRequest, saliency};
use monoscope::steering::{Readout, SteeringVectors};
use std::sync::atomic::AtomicBool;

fn harness() -> Harness<'static, App> {
    harness_with(App::new(GuiOptions::default(), Remembered::default()))
}

fn harness_with(app: App) -> Harness<'static, App> {
    Harness::builder()
        .with_size(egui::vec2(1400.0, 1000.0))
        .build_state(|ctx, app: &mut App| app.ui(ctx), app)
}

/// Steps frames until `done` (jobs run on their own threads meanwhile); fails after a
/// generous time, showing the window's messages.
fn wait_for(h: &mut Harness<'static, App>, what: &str, done: impl Fn(&Harness<App>) -> bool) {
    let start = Instant::now();
    loop {
        h.step();
        if done(h) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "timed out waiting for {what}; messages: {:?}",
            h.state().workbench.messages()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The texts (labels and values) of the window's nodes that contain `needle`.
fn texts_containing(h: &Harness<App>, needle: &str) -> Vec<String> {
    let matches = |n: &egui_kittest::kittest::AccessKitNode<'_>| {
        [n.label(), n.value()]
            .into_iter()
            .flatten()
            .find(|t| t.contains(needle))
    };
    h.query_all(By::new().predicate(move |n| matches(n).is_some()))
        .filter_map(|n| matches(&n.accesskit_node()))
        .collect()
}

/// Whether one of the window's messages contains every one of `parts`.
fn has_message(h: &Harness<App>, parts: &[&str]) -> bool {
    h.state()
        .workbench
        .messages()
        .iter()
        .any(|m| parts.iter().all(|p| m.contains(p)))
}

fn has_label(h: &Harness<App>, text: &str) -> bool {
    !texts_containing(h, text).is_empty()
}

/// Clicks into a labelled text field, selects everything and types `text` over it.
fn replace_text(h: &mut Harness<'static, App>, label: &str, text: &str) {
    h.get_by_label(label).click();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.step();
    h.get_by_label(label).type_text(text);
    h.step();
}

/// Scrolls the last node labelled `label` into the 1000-pixel-high window (scrolling takes a
/// few frames).
fn scroll_into_view(h: &mut Harness<'static, App>, label: &str) {
    h.query_all_by_label(label).last().unwrap().scroll_to_me();
    for _ in 0..20 {
        h.step();
        let rect = h.query_all_by_label(label).last().unwrap().rect();
        if rect.min.y >= 0.0 && rect.max.y <= 1000.0 {
            return;
        }
    }
    panic!("{label} stays out of view");
}

fn open_panel(h: &mut Harness<'static, App>, title: &str) {
    h.get_by_label(title).click();
    h.step();
    h.step();
}

/// The Playground's row for the model's most likely next token after `prompt`.
fn top_prediction_label(h: &Harness<App>, prompt: &str) -> String {
    let model = h.state().workbench.model.clone().unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    let top = next_token_top_k(&model, &ids, 1, &Hooks::new()).unwrap();
    format!("{:?}  {:.1}%", top[0].token, 100.0 * top[0].prob)
}

fn model_loaded(h: &Harness<App>) -> bool {
    h.state().workbench.model.is_some()
}

#[test]
fn the_bundled_font_draws_every_name_in_the_knowledge_base() {
    let ctx = egui::Context::default();
    monoscope::gui::style::install_fonts(&ctx);
    let _ = ctx.run(egui::RawInput::default(), |_| {});
    let kb = monoscope::world::KnowledgeBase::bundled().unwrap();
    let mut names = Vec::new();
    for c in &kb.countries {
        for n in [
            &c.name,
            &c.capital,
            &c.language,
            &c.currency,
            &c.continent,
            &c.largest_city,
            &c.landmark,
        ]
        .into_iter()
        .chain(&c.cities)
        {
            names.extend([n.en.clone(), n.ja.clone()]);
        }
    }
    for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
        let font = egui::FontId::new(14.0, family);
        let missing = ctx.fonts(|f| {
            names
                .iter()
                .flat_map(|n| n.chars())
                .filter(|&ch| !f.has_glyph(&font, ch))
                .collect::<std::collections::BTreeSet<char>>()
        });
        assert!(missing.is_empty(), "no glyph for {missing:?}");
    }
}

/// eframe's key-value storage, in memory (eframe writes the same strings to a RON file).
#[derive(Default)]
struct MemoryStorage(std::collections::HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
    fn flush(&mut self) {}
}

#[test]
fn the_next_run_reopens_the_last_model_panel_and_theme() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Neurons");
    h.get_by_label("☀ Light").click();
    h.step();
    let mut storage = MemoryStorage::default();
    eframe::App::save(h.state_mut(), &mut storage);
    assert!(!storage.0.is_empty(), "save wrote nothing");

    let remembered = Remembered::load(&storage);
    let mut again = harness_with(App::new(GuiOptions::default(), remembered));
    wait_for(&mut again, "the model", model_loaded);
    assert_eq!(again.state().current, PanelKind::Neurons);
    assert_eq!(
        again.state().workbench.model_dir,
        monoscope::cli::bundled_model_dir()
    );
    assert!(!again.ctx.style().visuals.dark_mode, "the light theme");
    assert!(has_label(&again, "☾ Dark"));
    // Storage from another program (or none) opens the defaults.
    let mut foreign = MemoryStorage::default();
    eframe::Storage::set_string(&mut foreign, "monoscope", "not RON".into());
    let fresh = App::new(GuiOptions::default(), Remembered::load(&foreign));
    assert_eq!(fresh.current, PanelKind::Playground);
}

/// The fonts' first pass (atlas built, first glyphs rasterised: the costliest frame) is drawn
/// before the model starts loading, not while it loads.
#[test]
fn the_window_draws_with_its_fonts_before_it_starts_loading() {
    let mut app = App::new(GuiOptions::default(), Remembered::default());
    let ctx = egui::Context::default();
    let pass = |app: &mut App| {
        let _ = ctx.run(egui::RawInput::default(), |ctx| app.ui(ctx));
    };
    pass(&mut app); // installs the fonts, which take effect on the next pass
    assert!(
        app.starting() && !app.busy(),
        "loading started on the first pass"
    );
    pass(&mut app); // the fonts' pass
    assert!(
        app.starting() && !app.busy(),
        "loading started beside the fonts"
    );
    pass(&mut app);
    assert!(
        !app.starting() && app.busy(),
        "the model did not start loading"
    );
}

#[test]
fn the_playground_shows_the_models_prediction_for_a_typed_prompt() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    let prompt = "The capital of France is";
    replace_text(&mut h, "Prompt", prompt);
    h.key_press(egui::Key::Enter);
    let expected = top_prediction_label(&h, prompt);
    wait_for(&mut h, &expected, |h| has_label(h, &expected));
    let model = h.state().workbench.model.clone().unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    // The prompt's tokens are shown as chips.
    for token in model.tokenizer.tokens_display(&ids) {
        let chip = monoscope::gui::widgets::display_token(&token);
        assert!(
            h.query_by_label(&chip).is_some(),
            "no chip {chip:?} for {prompt:?}"
        );
    }

    // What the open SAE finds on each token, as the library reads it.
    wait_for(&mut h, "the SAE", |h| h.state().workbench.sae.is_some());
    let open = h.state().workbench.sae.clone().unwrap();
    let out = model
        .forward(
            &model.ids_tensor(&ids).unwrap(),
            &Hooks::new().capture([open.hook]),
        )
        .unwrap();
    let x = out.cache.require(open.hook).unwrap().get(0).unwrap();
    let active = open.sae.sae.strongest_latents(&x, 8).unwrap();
    let header = |i: usize| {
        format!(
            "SAE features active at token {i} ({})",
            monoscope::gui::widgets::display_token(&model.tokenizer.token_display(ids[i]))
        )
    };
    // The last token's features are listed first; clicking another token lists its own.
    let last = ids.len() - 1;
    wait_for(&mut h, &header(last), |h| has_label(h, &header(last)));
    let subject = ids.len() - 2;
    h.get_by_label(&monoscope::gui::widgets::display_token(
        &model.tokenizer.token_display(ids[subject]),
    ))
    .click();
    wait_for(&mut h, &header(subject), |h| has_label(h, &header(subject)));
    let (strongest, activation) = active[subject][0];
    assert!(has_label(&h, &format!("{activation:.3}")));
    // Its "colour" button colours the prompt by it: the scale tops out at its largest value.
    let row = active[subject].len();
    assert_eq!(h.query_all_by_label("colour").count(), row);
    h.query_all_by_label("colour").next().unwrap().click();
    let top = open
        .sae
        .sae
        .encode(&x)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|row| row[strongest as usize])
        .fold(0.0f32, f32::max);
    let scale = format!("colour scale: 0 … {top:.3}");
    wait_for(&mut h, &scale, |h| has_label(h, &scale));
    // Its number opens its page.
    h.get_by_label(&format!("#{strongest}")).click();
    let page = format!("Feature #{strongest}");
    wait_for(&mut h, &page, |h| has_label(h, &page));
}

/// A steering vector typed into the Playground — one Japanese and one English sentence —
/// steers its continuation exactly as the library's vector at the middle block does.
#[test]
fn a_steering_vector_from_typed_prompts_steers_the_playgrounds_continuation() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    let prompt = "The capital of Germany is";
    replace_text(&mut h, "Prompt", prompt);
    h.get_by_label("steer with a vector").click();
    h.step();
    let (positive, negative) = ("日本の首都は東京です。", "The capital of Japan is Tokyo.");
    replace_text(&mut h, "positive prompts, one per line", positive);
    replace_text(&mut h, "negative prompts, one per line", negative);
    h.get_by_role_and_label(egui::accesskit::Role::Button, "Generate")
        .click();
    let note = "vector at blocks.3.hook_resid_post";
    wait_for(&mut h, note, |h| has_label(h, note));

    let model = h.state().workbench.model.clone().unwrap();
    let vectors = SteeringVectors::from_contrast(
        &model,
        &[HookPoint::ResidPost(3)],
        &[positive.to_string()],
        &[negative.to_string()],
        Readout::Mean,
    )
    .unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let hooks = vectors.add_to(Hooks::new(), 2.0, &model.device).unwrap();
    let steered = generate(&model, &ids, &options, &hooks).unwrap().text;
    let plain = generate(&model, &ids, &options, &Hooks::new())
        .unwrap()
        .text;
    assert_ne!(steered, plain, "the vector should change the continuation");
    for text in [plain, steered] {
        let row = format!("{prompt}⟨{text}⟩");
        assert!(has_label(&h, &row), "no row {row:?}");
    }
}

/// "Colour tokens by saliency" colours the prompt by each token's integrated gradient towards
/// the top prediction: the scale tops out where the library's report does.
#[test]
fn saliency_colours_the_prompt_as_the_library_attributes_it() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    let prompt = "The capital of Japan is";
    replace_text(&mut h, "Prompt", prompt);
    h.key_press(egui::Key::Enter);
    h.get_by_label("saliency").click();
    let model = h.state().workbench.model.clone().unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    let top = next_token_top_k(&model, &ids, 1, &Hooks::new()).unwrap();
    let request = SaliencyRequest {
        position: ids.len() - 1,
        target: top[0].id,
        wrong: None,
        steps: 16,
        baseline: SaliencyRequest::default_baseline(&model),
        ids,
    };
    let report = saliency(&model, &request, &AtomicBool::new(false), &mut |_, _| {})
        .unwrap()
        .unwrap();
    let max = report
        .tokens
        .iter()
        .fold(0f32, |m, t| m.max(t.integrated_gradients.abs()));
    let scale = format!("colour scale: 0 … {max:.3}");
    wait_for(&mut h, &scale, |h| has_label(h, &scale));
}

/// The Lens panel reads through a tuned lens loaded from a file (its heading says so, and
/// unticking goes back to the logit lens), and trains one as a background job that shows its
/// progress and cancels, keeping the loaded lens.
#[test]
fn the_lens_panel_loads_a_tuned_lens_and_trains_one_in_the_background() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Lens");
    wait_for(&mut h, "the logit lens", |h| has_label(h, "Logit lens"));
    let model = h.state().workbench.model.clone().unwrap();
    let mut tuned = monoscope::tuned_lens::TunedLens::identity(&model).unwrap();
    let d = model.dims().d_model;
    for t in &mut tuned.translators {
        t.bias = candle_core::Tensor::randn(0f32, 1.0, d, &candle_core::Device::Cpu).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lens.safetensors");
    tuned.save(&file).unwrap();
    replace_text(&mut h, "or a lens file", file.to_str().unwrap());
    h.get_by_label("Load lens").click();
    wait_for(&mut h, "the tuned lens", |h| {
        has_label(h, "Tuned lens") && !h.state().busy()
    });
    h.get_by_label("tuned lens").click();
    wait_for(&mut h, "the logit lens again", |h| {
        has_label(h, "Logit lens") && !has_label(h, "Tuned lens")
    });
    h.get_by_label("tuned lens").click();
    wait_for(&mut h, "the tuned lens again", |h| {
        has_label(h, "Tuned lens")
    });

    h.get_by_label("Train tuned lens").click();
    wait_for(&mut h, "training progress", |h| {
        !texts_containing(h, "steps ·").is_empty()
    });
    h.get_by_label("Cancel tuned lens").click();
    wait_for(&mut h, "the job to stop", |h| {
        h.query_by_label("Cancel tuned lens").is_none()
    });
    assert!(has_label(&h, "Tuned lens"), "the loaded lens should stay");
}

#[test]
fn the_lens_attributes_a_typed_target_and_moves_to_a_picked_token() {
    use monoscope::lens::{LensReport, LensRequest, continuation_token, lens};
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Lens");
    let prompt = "The capital of France is";
    replace_text(&mut h, "Prompt", prompt);
    h.key_press(egui::Key::Enter);
    let model = h.state().workbench.model.clone().unwrap();
    let ids = model.encode_prompt(prompt).unwrap();
    // What the library says, in the words the panel shows it.
    let expect = |position: Option<usize>, target: Option<&str>, versus: Option<&str>| {
        let token = |t: Option<&str>| {
            t.map(|t| continuation_token(&model, prompt, &ids, position, t).unwrap())
        };
        lens(
            &model,
            &LensRequest {
                ids: ids.clone(),
                position,
                target: token(target),
                versus: token(versus),
                top_k: 1,
                grid: false,
                tuned: None,
            },
        )
        .unwrap()
    };
    let shown = |r: &LensReport| {
        let what = match &r.versus {
            Some(v) => format!("logit({:?}) − logit({:?})", r.target.token, v.token),
            None => format!("logit({:?})", r.target.token),
        };
        format!(
            "{what} = {:.3}, the sum of {} terms",
            r.logit,
            r.attribution.len()
        )
    };
    let wait_for_report = |h: &mut Harness<'static, App>, r: &LensReport| {
        let label = shown(r);
        wait_for(h, &label, |h| has_label(h, &label) && !h.state().busy());
    };

    let own = expect(None, None, None);
    wait_for_report(&mut h, &own);
    let prediction = format!(
        "the model gives {:?} {:.1}%",
        own.target.token,
        100.0 * own.target.prob
    );
    assert!(has_label(&h, &prediction), "{prediction}");
    // The per-head grid names the heads with the largest direct effect, as links.
    let strongest: Vec<String> = own
        .heads_by_effect()
        .iter()
        .take(3)
        .map(|(l, h, v)| format!("head {l}.{h} {v:+.3}"))
        .collect();
    for link in &strongest {
        assert!(h.query_by_label(link).is_some(), "no link {link:?}");
    }
    // The prompt's tokens head the grid's columns.
    for token in model.tokenizer.tokens_display(&ids) {
        let head = monoscope::gui::widgets::display_token(&token);
        assert!(h.query_by_label(&head).is_some(), "no column {head:?}");
    }

    // A typed target against another: the logit difference.
    replace_text(&mut h, "Target", " Paris");
    replace_text(&mut h, "versus", " Tokyo");
    h.key_press(egui::Key::Enter);
    wait_for_report(&mut h, &expect(None, Some(" Paris"), Some(" Tokyo")));

    // Clicking a column head reads the same target there.
    h.get_by_label(&monoscope::gui::widgets::display_token(" capital"))
        .click();
    wait_for_report(&mut h, &expect(Some(1), Some(" Paris"), Some(" Tokyo")));
    assert!(has_label(&h, "At token 1 (\" capital\")"));

    // The strongest head's link opens its attention pattern on the same prompt.
    let (l, head, v) = expect(Some(1), Some(" Paris"), Some(" Tokyo")).heads_by_effect()[0];
    h.get_by_label(&format!("head {l}.{head} {v:+.3}")).click();
    let title = format!("Attention pattern of head {l}.{head}");
    let p = monoscope::attention::patterns(&model, &ids).unwrap();
    let shown = p.detect()[0].scores[l][head];
    let line = format!("previous-token {shown:.2}");
    wait_for(&mut h, &title, |h| {
        has_label(h, &title) && has_label(h, &line) && !h.state().busy()
    });
    assert_eq!(h.state().current, PanelKind::Attention);
}

#[test]
fn the_attention_panel_shows_the_heads_the_detectors_rank_and_their_patterns() {
    use monoscope::attention::{Detector, Patterns, patterns, repeated_random_tokens};
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Attention");
    let model = h.state().workbench.model.clone().unwrap();
    // What the library says, in the words the panel shows it.
    let scores_line = |p: &Patterns, l: usize, head: usize| {
        let parts: Vec<String> = p
            .detect()
            .iter()
            .filter(|d| d.queries > 0)
            .map(|d| format!("{} {:.2}", d.detector.name(), d.scores[l][head]))
            .collect();
        parts.join(" · ")
    };
    let ranked = |p: &Patterns, d: Detector| {
        p.detect()
            .into_iter()
            .find(|s| s.detector == d)
            .unwrap()
            .ranked()
    };
    let wait_for_head = |h: &mut Harness<'static, App>, p: &Patterns, l: usize, head: usize| {
        let title = format!("Attention pattern of head {l}.{head}");
        let line = scores_line(p, l, head);
        wait_for(h, &title, |h| {
            has_label(h, &title) && has_label(h, &line) && !h.state().busy()
        });
    };

    // A prompt: the strongest previous-token head is shown first, and offered as a button.
    let prompt = "Tokyo is the capital of Japan. Tokyo is";
    replace_text(&mut h, "Prompt", prompt);
    h.key_press(egui::Key::Enter);
    let on_prompt = patterns(&model, &model.encode_prompt(prompt).unwrap()).unwrap();
    let (l, head, score) = ranked(&on_prompt, Detector::PreviousToken)[0];
    wait_for_head(&mut h, &on_prompt, l, head);
    assert!(has_label(&h, &format!("head {l}.{head} {score:.2}")));
    // What zeroing the head does to the loss over the prompt.
    let ids = model.encode_prompt(prompt).unwrap();
    let never = std::sync::atomic::AtomicBool::new(false);
    let ablation = monoscope::attention::ablate_heads(&model, &ids, 0..ids.len() - 1, &never)
        .unwrap()
        .unwrap();
    let zeroed = format!(
        "zeroing this head changes the next-token loss over the prompt (clean {:.3} nats per token) by {:+.3}",
        ablation.clean_loss, ablation.delta[l][head]
    );
    assert!(has_label(&h, &zeroed), "{zeroed}");

    // The induction probe, ranked by the induction detector; picking the second head by its
    // button shows that head's pattern.
    h.get_by_label("the induction probe (20 random tokens, repeated)")
        .click();
    let probe = patterns(&model, &repeated_random_tokens(&model, 20, 0).unwrap()).unwrap();
    let (l, head, _) = ranked(&probe, Detector::PreviousToken)[0];
    wait_for_head(&mut h, &probe, l, head);
    h.get_by_label("induction").click();
    let induction = ranked(&probe, Detector::Induction);
    let (l, head, _) = induction[0];
    wait_for_head(&mut h, &probe, l, head);
    let (l, head, score) = induction[1];
    h.get_by_label(&format!("head {l}.{head} {score:.2}"))
        .click();
    wait_for_head(&mut h, &probe, l, head);

    // The shown head's composition partners, K by default then Q: a partner's button shows
    // that head's pattern.
    use monoscope::composition::{Composition, composition_scores};
    for mode in [Composition::K, Composition::Q] {
        h.get_by_label(&format!("{mode}-composition")).click();
        let ranked = composition_scores(&model, mode).unwrap().ranked();
        let shown = (l, head);
        let pair = ranked
            .iter()
            .find(|p| p.reader == shown)
            .or_else(|| ranked.iter().find(|p| p.writer == shown))
            .unwrap();
        let (pl, ph) = if pair.reader == shown {
            pair.writer
        } else {
            pair.reader
        };
        let button = format!("{pl}.{ph} {:.2}", pair.score);
        wait_for(&mut h, &button, |h| {
            has_label(h, &button) && !h.state().busy()
        });
        h.get_by_label(&button).click();
        wait_for_head(&mut h, &probe, pl, ph);
        let title = format!("Composition of head {pl}.{ph}");
        wait_for(&mut h, &title, |h| has_label(h, &title));
        // Back to the head the partners were read for.
        h.get_by_label(&format!("head {l}.{head} {score:.2}"))
            .click();
        wait_for_head(&mut h, &probe, l, head);
    }
}

#[test]
fn the_patching_panel_shows_where_the_clean_answer_comes_back_and_opens_a_head() {
    use monoscope::gui::widgets::display_token;
    use monoscope::patching::{Direction, PatchRequest, PromptPair, Site, patch};
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Patching");
    let model = h.state().workbench.model.clone().unwrap();
    // What the library gives for the panel's default pair, in the words the panel shows.
    let request = |clean, corrupted, direction| {
        let pair = PromptPair {
            clean,
            corrupted,
            answer: None,
            wrong: None,
        };
        PatchRequest::from_prompts(&model, &pair, direction).unwrap()
    };
    let never = std::sync::atomic::AtomicBool::new(false);
    let report = |clean, corrupted, direction| {
        let request = PatchRequest {
            attribution: true,
            ..request(clean, corrupted, direction)
        };
        patch(&model, &request, &never, &mut |_, _| {})
            .unwrap()
            .unwrap()
    };
    let headline = |r: &monoscope::patching::PatchReport| {
        format!(
            "logit({}) − logit({}): clean {:.3}, corrupted {:.3}",
            display_token(&r.answer),
            display_token(&r.wrong),
            r.clean_logit_diff,
            r.corrupted_logit_diff
        )
    };
    let expected = report(
        "The capital of Japan is",
        "The capital of France is",
        Direction::Denoise,
    );
    let line = headline(&expected);
    wait_for(&mut h, &line, |h| has_label(h, &line) && !h.state().busy());
    // The residual stream's strongest cell is named beneath its grid, and the estimate's
    // agreement beside it.
    let resid = expected.grid(Site::ResidPre).unwrap();
    let (layer, position, v) = resid.ranked(Direction::Denoise)[0];
    let strongest = format!(
        "block {layer} at {} {v:.2}",
        display_token(&expected.clean_tokens[position])
    );
    assert!(has_label(&h, &strongest), "{strongest}");
    let agreement = format!(
        "correlation with patching {:.3}",
        resid.agreement().unwrap()
    );
    assert!(has_label(&h, &agreement), "{agreement}");

    // The open SAE's features between the two runs; the strongest one's button opens its page.
    wait_for(&mut h, "the SAE", |h| h.state().workbench.sae.is_some());
    let open = h.state().workbench.sae.clone().unwrap();
    let request = request(
        "The capital of Japan is",
        "The capital of France is",
        Direction::Denoise,
    );
    let found = monoscope::features::patching::patch_features(
        &model,
        &open.sae.sae,
        open.hook,
        &request,
        8,
        &never,
    )
    .unwrap()
    .unwrap();
    let summary = format!(
        "every feature's change patched at once: {:.2}; the hook's whole value: {:.2}",
        found.all_features, found.whole_hook
    );
    wait_for(&mut h, &summary, |h| {
        has_label(h, &summary) && !h.state().busy()
    });
    let strongest = found.features[0].feature;
    h.get_by_label(&format!("#{strongest}")).click();
    let page = format!("Feature #{strongest}");
    wait_for(&mut h, &page, |h| has_label(h, &page));
    assert_eq!(h.state().current, PanelKind::Features);
    open_panel(&mut h, "Patching");

    // Noising, on another pair: the form runs again.
    replace_text(&mut h, "Corrupted prompt", "The capital of Italy is");
    h.get_by_label("corrupted values into the clean run")
        .click();
    let noised = report(
        "The capital of Japan is",
        "The capital of Italy is",
        Direction::Noise,
    );
    let line = headline(&noised);
    wait_for(&mut h, &line, |h| has_label(h, &line) && !h.state().busy());

    // The head grid's strongest head opens its attention pattern on the clean prompt.
    h.get_by_label("heads").click();
    h.step();
    let (l, head, v) = noised.grid(Site::Heads).unwrap().ranked(Direction::Noise)[0];
    h.get_by_label(&format!("head {l}.{head} {v:.2}")).click();
    let title = format!("Attention pattern of head {l}.{head}");
    wait_for(&mut h, &title, |h| {
        has_label(h, &title) && !h.state().busy()
    });
    assert_eq!(h.state().current, PanelKind::Attention);

    // Each head at each token: the strongest cell names its head and token, and opens the
    // head's pattern too.
    open_panel(&mut h, "Patching");
    h.get_by_label("heads_by_pos").click();
    h.step();
    let (l, column, v) = noised
        .grid(Site::HeadsByPos)
        .unwrap()
        .ranked(Direction::Noise)[0];
    let (head, position) = Site::HeadsByPos.cell(column, noised.clean_tokens.len());
    let (head, position) = (head.unwrap(), position.unwrap());
    let button = format!(
        "head {l}.{head} at {} {v:.2}",
        display_token(&noised.clean_tokens[position])
    );
    h.get_by_label(&button).click();
    let title = format!("Attention pattern of head {l}.{head}");
    wait_for(&mut h, &title, |h| {
        has_label(h, &title) && !h.state().busy()
    });
    assert_eq!(h.state().current, PanelKind::Attention);

    // Each key head's values: the strongest opens the pattern of the head that reads them
    // (the world model has a key head per head).
    open_panel(&mut h, "Patching");
    h.get_by_label("values").click();
    h.step();
    let (l, head, v) = noised.grid(Site::Values).unwrap().ranked(Direction::Noise)[0];
    h.get_by_label(&format!("key head {l}.{head} {v:.2}"))
        .click();
    let title = format!("Attention pattern of head {l}.{head}");
    wait_for(&mut h, &title, |h| {
        has_label(h, &title) && !h.state().busy()
    });
    assert_eq!(h.state().current, PanelKind::Attention);

    // Path patching on the same pair: each head's direct path to the logits by default; the
    // strongest sender opens its pattern; heads' inputs as typed; a bad receiver is a message.
    open_panel(&mut h, "Patching");
    let paths = |receivers: Vec<Receiver>| {
        let pair = PromptPair {
            clean: "The capital of Japan is",
            corrupted: "The capital of Italy is",
            answer: None,
            wrong: None,
        };
        let request = PathRequest {
            pair: PatchRequest::from_prompts(&model, &pair, Direction::Noise).unwrap(),
            receivers,
        };
        path_patch(&model, &request, &never, &mut |_, _| {})
            .unwrap()
            .unwrap()
    };
    wait_for(&mut h, "the paths to the logits", |h| {
        has_label(h, "paths to logits") && !h.state().busy()
    });
    let (l, head, v) = paths(vec![Receiver::Logits]).ranked()[0];
    h.get_by_label(&format!("sender {l}.{head} {v:.2}")).click();
    let title = format!("Attention pattern of head {l}.{head}");
    wait_for(&mut h, &title, |h| {
        has_label(h, &title) && !h.state().busy()
    });
    open_panel(&mut h, "Patching");
    replace_text(&mut h, "Receivers", "4.0:v, 4.1:q");
    h.key_press(egui::Key::Enter);
    let receivers = vec!["4.0:v".parse().unwrap(), "4.1:q".parse().unwrap()];
    let (l, head, v) = paths(receivers).ranked()[0];
    let button = format!("sender {l}.{head} {v:.2}");
    wait_for(&mut h, "the paths to two heads", |h| {
        has_label(h, "paths to 4.0:v, 4.1:q") && has_label(h, &button) && !h.state().busy()
    });
    replace_text(&mut h, "Receivers", "9.0:q");
    h.get_by_label("Trace paths").click();
    wait_for(&mut h, "the refused receiver", |h| {
        has_message(h, &["path patching", "9.0:q", "8 layers"])
    });

    // A pair of different lengths is refused with a message, not a crash.
    open_panel(&mut h, "Patching");
    replace_text(
        &mut h,
        "Corrupted prompt",
        "The capital city of the United Kingdom is",
    );
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "the refusal", |h| {
        has_message(h, &["activation patching", "same number of tokens"])
    });
}

/// The Circuits panel traces its prompt through the bundled transcoders as it opens, shows the
/// top logit selected with the strongest kept inputs the library finds, and steps to one.
#[test]
fn the_circuits_panel_traces_a_prompt_and_walks_from_the_logit_to_its_inputs() {
    use monoscope::attribution_graph::intervene::{FeatureChange, intervene};
    use monoscope::attribution_graph::{GraphSettings, Node, load_transcoders};
    use monoscope::gui::widgets::display_token;

    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Circuits");
    wait_for(&mut h, "the graph", |h| {
        has_label(h, "Selected: logit") && !h.state().busy()
    });
    // The library's graph of the same prompt, pruned at the panel's thresholds.
    let model = h.state().workbench.model.clone().unwrap();
    let transcoders =
        load_transcoders(&[monoscope::cli::bundled_transcoders_dir()], &model).unwrap();
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let cancel = AtomicBool::new(false);
    let graph = common::attribution_graph(&model, &transcoders, &ids, &GraphSettings::default());
    let pruned = graph.prune(0.8, 0.98).unwrap();
    let top = graph.index(Node::Logit(0));
    let top_name = graph.describe(top, display_token);
    assert!(
        has_label(&h, &format!("Selected: {top_name}")),
        "{top_name}"
    );
    let n = graph.n_nodes();
    let kept = |t: usize, s: usize| pruned.nodes[s] && pruned.edges[t * n + s];
    let (source, weight) = graph
        .strongest_inputs(top)
        .into_iter()
        .find(|&(s, _)| kept(top, s))
        .unwrap();
    let name = graph.describe(source, display_token);
    assert!(h.query_all_by_label(&name).next().is_some(), "{name}");
    let shown = format!("{weight:+.3}");
    assert!(
        h.query_all_by_label(&shown).next().is_some(),
        "{name} {weight}"
    );
    // Step to the logit's strongest kept feature input: it lists the logit among its outputs,
    // and its top contexts in the world corpus, the library's.
    let (source, _) = graph
        .strongest_inputs(top)
        .into_iter()
        .find(|&(s, _)| kept(top, s) && matches!(graph.node(s), Node::Feature(_)))
        .unwrap();
    let name = graph.describe(source, display_token);
    h.get_by_label(&name).click();
    h.run_steps(2);
    assert!(has_label(&h, &format!("Selected: {name}")), "{name}");
    assert!(
        h.query_all_by_label(&top_name).next().is_some(),
        "{top_name}"
    );
    let Node::Feature(i) = graph.node(source) else {
        unreachable!()
    };
    let feature = &graph.features[i];
    let transcoder = &transcoders[feature.layer];
    let corpus = Corpus::parse("world", "text").unwrap();
    let hook = transcoder.site.input;
    let tops = monoscope::features::top_contexts(
        &model,
        &transcoder.sae,
        hook,
        &corpus,
        20_000,
        3,
        &cancel,
    )
    .unwrap()
    .unwrap();
    let best = &tops[feature.feature as usize][0];
    let shown = format!("{:.2}", best.activation);
    // (A job that has ended is no longer busy, but its result shows a frame later.)
    wait_for(&mut h, "the feature's contexts", |h| {
        h.query_all_by_label(&shown).next().is_some() && !h.state().busy()
    });
    // The graph saved as circuit-tracer's graph file, with its folder's index; saving over it
    // is refused.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("japan.json");
    replace_text(&mut h, "Graph file", file.to_str().unwrap());
    h.get_by_label("Save graph").click();
    wait_for(&mut h, "the graph file", |h| {
        has_message(h, &["wrote", "japan.json"]) && !h.state().busy()
    });
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let kept_count = pruned.nodes.iter().filter(|&&k| k).count();
    assert_eq!(saved["nodes"].as_array().unwrap().len(), kept_count);
    assert!(tmp.path().join("graph-metadata.json").is_file());
    h.get_by_label("Save graph").click();
    wait_for(&mut h, "the refusal to replace it", |h| {
        has_message(h, &["already exists"]) && !h.state().busy()
    });
    // Ablating it: the logits before and after are the library's intervention's. (Waited
    // for by the row itself: an ended job is no longer busy a frame before its result shows.)
    let change = FeatureChange {
        feature: i,
        value: 0.0,
    };
    let result = intervene(&model, &transcoders, &graph, &[change], 8).unwrap();
    let row = format!("{:.3} → {:.3}", result.before[0], result.after[0]);
    h.get_by_label("Ablate").click();
    h.run_steps(2);
    wait_for(&mut h, "the intervention's row", |h| {
        h.query_all_by_label(&row).next().is_some() && !h.state().busy()
    });
    // A supernode of the logit's two strongest kept feature inputs: its summed effect on each
    // logit is the library's, its ablation sets both to zero, and the saved graph carries it.
    let features: Vec<usize> = graph
        .strongest_inputs(top)
        .into_iter()
        .filter(|&(s, _)| kept(top, s) && matches!(graph.node(s), Node::Feature(_)))
        .map(|(s, _)| s)
        .take(2)
        .collect();
    assert_eq!(features[0], source);
    replace_text(&mut h, "group name", "capital");
    h.get_by_label("Add to supernode").click();
    h.run_steps(2);
    h.get_by_label(&top_name).click(); // back to the logit, then its second feature
    h.run_steps(2);
    let second = graph.describe(features[1], display_token);
    assert!(
        has_label(&h, &format!("Selected: {top_name}")),
        "{top_name}"
    );
    h.get_by_label(&second).click();
    h.run_steps(2);
    assert!(has_label(&h, &format!("Selected: {second}")), "{second}");
    // (Its contexts arrive and move the buttons below: click once they are in.)
    wait_for(&mut h, "the second feature's contexts", |h| {
        !h.state().busy()
    });
    h.run_steps(2);
    h.get_by_label("Add to supernode").click();
    h.run_steps(2);
    let effects: Vec<String> = (0..graph.logits.len().min(8))
        .map(|l| {
            let w = graph.group_effect(&[graph.index(Node::Logit(l))], &features);
            format!("'{}' {w:+.3}", display_token(&graph.logits[l].token))
        })
        .collect();
    let line = format!("capital → {}", effects.join(", "));
    assert!(
        has_label(&h, &line),
        "{line} / {:?}",
        texts_containing(&h, "capital →")
    );
    h.get_by_label("Ablate supernode").click();
    h.run_steps(2);
    wait_for(&mut h, "the supernode's ablation", |h| !h.state().busy());
    let both: Vec<FeatureChange> = features
        .iter()
        .map(|&s| FeatureChange {
            feature: match graph.node(s) {
                Node::Feature(f) => f,
                _ => unreachable!(),
            },
            value: 0.0,
        })
        .collect();
    let result = intervene(&model, &transcoders, &graph, &both, 8).unwrap();
    let row = format!("{:.3} → {:.3}", result.before[0], result.after[0]);
    assert!(h.query_all_by_label(&row).next().is_some(), "{row}");
    let grouped = tmp.path().join("grouped.json");
    replace_text(&mut h, "Graph file", grouped.to_str().unwrap());
    h.get_by_label("Save graph").click();
    wait_for(&mut h, "the graph file with its supernode", |h| {
        has_message(h, &["wrote", "grouped.json"]) && !h.state().busy()
    });
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&grouped).unwrap()).unwrap();
    let id = |s: usize| match graph.node(s) {
        Node::Feature(f) => {
            let f = &graph.features[f];
            format!("{}_{}_{}", f.layer, f.feature, f.position)
        }
        _ => unreachable!(),
    };
    assert_eq!(
        saved["qParams"]["supernodes"],
        serde_json::json!([["capital", id(features[0]), id(features[1])]])
    );
    // Another prompt is traced anew (not the last graph pruned again): its own top logit.
    let france = "The capital of France is";
    replace_text(&mut h, "Prompt", france);
    h.key_press(egui::Key::Enter);
    let ids = model.encode_prompt(france).unwrap();
    let graph = common::attribution_graph(&model, &transcoders, &ids, &GraphSettings::default());
    let top_name = graph.describe(graph.index(Node::Logit(0)), display_token);
    wait_for(&mut h, &top_name, |h| {
        has_label(h, &format!("Selected: {top_name}")) && !h.state().busy()
    });
    // With the graph drawn and no job left, the window comes to rest (no redraw loop), for a
    // prompt whose graph fits and for one wide enough to scroll sideways.
    h.try_run()
        .expect("the Circuits panel keeps asking for frames");
    let long = "The capital of France is Paris. 日本の首都は東京です。 The capital of Italy is";
    replace_text(&mut h, "Prompt", long);
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "the long prompt's graph", |h| {
        has_label(h, "over 23 tokens") && !h.state().busy()
    });
    h.try_run()
        .expect("the scrolled graph keeps asking for frames");
    // A folder that holds no transcoders is a message, not a crash.
    replace_text(&mut h, "Transcoders", "/nonexistent/transcoders");
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "the refusal", |h| {
        has_message(h, &["/nonexistent/transcoders"]) && !h.state().busy()
    });
}

#[test]
fn a_feature_page_shows_its_top_contexts() {
    let mut h = harness();
    wait_for(&mut h, "the feature store", |h| {
        h.state().workbench.store.is_some()
    });
    let store = h.state().workbench.store.clone().unwrap();
    let busiest = store
        .features
        .iter()
        .max_by_key(|f| f.fire_count)
        .unwrap()
        .clone();
    open_panel(&mut h, "Features");
    replace_text(&mut h, "Search", &busiest.feature.to_string());
    let row = format!("#{}", busiest.feature);
    wait_for(&mut h, &row, |h| h.query_by_label(&row).is_some());
    h.get_by_label(&row).click();
    wait_for(&mut h, "the feature page", |h| has_label(h, "Top contexts"));
    assert!(has_label(&h, &format!("Feature #{}", busiest.feature)));
    // The best context's peak token is on the page, as a chip.
    let top = &busiest.contexts[0];
    let peak = monoscope::gui::widgets::display_token(&top.tokens[top.peak as usize]);
    assert!(h.query_all_by_label(&peak).count() >= 1, "no chip {peak:?}");
    assert!(has_label(&h, "Activation histogram"));

    // The SAE's evaluation, with CE loss recovered.
    h.get_by_label("Evaluate SAE").click();
    wait_for(&mut h, "the evaluation", |h| {
        has_label(h, "CE loss recovered")
    });
    assert!(has_label(&h, "FVU "));
}

#[test]
fn editing_japan_to_yokohama_shows_in_the_after_table_and_undo_restores_the_weights() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Edit");
    // The trace suggests a layer, and an edit "from the trace" (the default) writes there.
    h.get_by_label("Trace").click();
    wait_for(&mut h, "the trace", |h| {
        !texts_containing(h, "Suggested edit layer: ").is_empty()
    });
    let suggestion = texts_containing(&h, "Suggested edit layer: ").remove(0);
    let suggested: usize = suggestion["Suggested edit layer: ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no layer in {suggestion:?}"));
    assert!(suggestion.contains("subject-last key"), "{suggestion}");
    // Beside the three layer traces, the same corruption restored one head at a time.
    assert!(has_label(&h, "one attention head (all tokens)"));
    // The form opens on Japan → " Yokohama"; a second phrasing in the other word order
    // carries the edit to the paraphrases that put the subject first.
    replace_text(&mut h, "Also as (optional)", "{}'s capital is");
    h.get_by_label("Apply ROME edit").click();
    wait_for(&mut h, "the edit", |h| {
        !h.state().workbench.history.is_empty()
    });
    h.step();
    // The after table: " Yokohama" is now the top answer (its first token is top-1 on the
    // edit prompt), the whole word beats " Tokyo", and the greedy continuation spells it
    // (the world model knows Yokohama as a city of Japan).
    let model = h.state().workbench.model.clone().unwrap();
    let prompt = "The capital of Japan is";
    let first = monoscope::causal::target_tokens(&model, prompt, " Yokohama").unwrap()[0];
    let ids = model.encode_prompt(prompt).unwrap();
    let top = next_token_top_k(&model, &ids, 1, &Hooks::new()).unwrap();
    assert_eq!(top[0].id, first, "the window's model is the edited one");
    assert!(
        has_label(&h, "edit: top-1 1/1"),
        "{:?}",
        texts_containing(&h, "top-1")
    );
    assert!(!texts_containing(&h, "\" Yokohama\"").is_empty());
    assert!(
        has_label(&h, "edit: top-1 1/1, beats the rival 1/1"),
        "{:?}",
        texts_containing(&h, "rival")
    );
    assert!(
        has_label(&h, "The capital of Japan is Yokohama"),
        "{:?}",
        texts_containing(&h, "The capital of Japan is")
    );
    // 27 of the 28 held-out paraphrases with both phrasings (22 with the prompt alone).
    let paraphrases = texts_containing(&h, "paraphrase: top-1 ");
    let moved: usize = paraphrases
        .first()
        .and_then(|t| t["paraphrase: top-1 ".len()..].split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no paraphrase count in {paraphrases:?}"));
    assert!(moved >= 25, "{paraphrases:?}");
    let requests = &h.state().workbench.history.edits()[0].requests;
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].prompt, "{}'s capital is");
    let edited_layer = h.state().workbench.history.edits()[0].layers[0];
    assert_eq!(
        edited_layer, suggested,
        "the edit writes where the trace pointed"
    );

    h.get_by_label("Undo #0").click();
    wait_for(&mut h, "the undo", |h| {
        h.state().workbench.history.is_empty()
    });
    let restored = h.state().workbench.model.clone().unwrap();
    let original = Model::load(
        &monoscope::cli::bundled_model_dir(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    assert!(
        down_proj(&restored, edited_layer) == down_proj(&original, edited_layer),
        "undo gives back the loaded weights bit for bit"
    );
}

#[test]
fn a_training_job_reports_progress_and_cancels_to_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sae");
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Train");
    train_then_cancel(&mut h, &out, "32768", "Cancel train SAE");
    assert!(out.join("training/checkpoint").is_dir());
    assert!(!out.join("sae_weights.safetensors").exists());

    // Continued from the checkpoint, the run goes on from where it stopped to the end, and the
    // SAE opens.
    h.get_by_label("continue the stopped run").click();
    h.step();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the continued run's SAE", |h| {
        h.state()
            .workbench
            .sae
            .as_ref()
            .is_some_and(|s| s.dir == out)
    });
    assert!(out.join("sae_weights.safetensors").is_file());
    // One log for both parts, its steps rising to the last without repeats.
    let steps = logged_steps(&out.join("training/metrics.jsonl"));
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&(32_768 / 1024)), "{steps:?}");
}

/// Starts the Train panel's form into `out` for `tokens` tokens in batches of 1,024, pauses
/// once the charts show, and cancels with the button labelled `cancel`.
fn train_then_cancel(h: &mut Harness<'static, App>, out: &Path, tokens: &str, cancel: &str) {
    replace_text(h, "Output folder", out.to_str().unwrap());
    replace_text(h, "Tokens", tokens);
    replace_text(h, "Batch size", "1024");
    h.key_press(egui::Key::Enter);
    h.step();
    h.get_by_label("Start training").click();
    wait_for(h, "the first training steps", |h| has_label(h, "FVU:"));
    h.get_by_label("Pause").click();
    h.step();
    h.get_by_label(cancel).click();
    wait_for(h, "the cancel", |h| {
        has_message(h, &["training stopped at step"])
    });
}

/// The `step` of every line of a JSON-lines training log.
fn logged_steps(path: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let m: serde_json::Value = serde_json::from_str(line).unwrap();
            m["step"].as_u64().unwrap()
        })
        .collect()
}

/// "MLP transcoder" turns the form into a transcoder from the layer's `mlp.hook_in` to its
/// `hook_mlp_out`; a short run saves one whose config names both hooks, and it opens at them.
#[test]
fn a_transcoder_trains_from_the_form_and_opens_at_its_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("transcoder");
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Train");
    h.get_by_label("MLP transcoder").click();
    h.step();
    replace_text(&mut h, "Output folder", out.to_str().unwrap());
    replace_text(&mut h, "Tokens", "8192");
    h.key_press(egui::Key::Enter);
    h.step();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the transcoder", |h| {
        h.state()
            .workbench
            .sae
            .as_ref()
            .is_some_and(|s| s.sae.sae.transcoder)
    });
    let sae = h.state().workbench.sae.as_ref().unwrap();
    assert_eq!(
        (sae.hook.to_string(), sae.hook_out.to_string()),
        (
            "blocks.4.mlp.hook_in".to_string(),
            "blocks.4.hook_mlp_out".to_string()
        )
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["metadata"]["hook_name"], "blocks.4.mlp.hook_in");
    assert_eq!(cfg["metadata"]["hook_name_out"], "blocks.4.hook_mlp_out");
}

/// "a cross-layer transcoder" trains a CLT over every layer from the form; it opens in Circuits,
/// which traces its prompt through it: the active features are the library's through the saved
/// folder.
#[test]
fn a_cross_layer_transcoder_trains_from_the_form_and_is_traced_in_circuits() {
    use monoscope::attribution_graph::{GraphSettings, load_each};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clt");
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Train");
    h.get_by_label("a cross-layer transcoder").click();
    h.step();
    replace_text(&mut h, "Output folder", out.to_str().unwrap());
    replace_text(&mut h, "Tokens", "8192");
    h.key_press(egui::Key::Enter);
    h.step();
    h.get_by_label("Start training").click();
    // (Checked as it shows: messages fade after a few seconds.)
    wait_for(&mut h, "the saved CLT", |h| {
        has_message(h, &["cross-layer transcoder written to"])
    });
    wait_for(&mut h, "the graph through the CLT", |h| {
        h.state().current == PanelKind::Circuits
            && has_label(h, "Selected: logit")
            && !h.state().busy()
    });
    let model = h.state().workbench.model.clone().unwrap();
    let transcoders = load_each(std::slice::from_ref(&out), &model).unwrap();
    assert_eq!(transcoders.len(), model.dims().n_layers);
    let ids = model.encode_prompt("The capital of Japan is").unwrap();
    let graph = common::attribution_graph(&model, &transcoders, &ids, &GraphSettings::default());
    let shown = format!("{} active features over", graph.active_features.len());
    assert!(has_label(&h, &shown), "{shown}");
}

/// A cross-layer transcoder's run cancelled in the window leaves a checkpoint beside its folder;
/// continued, it finishes into the folder with one log for both parts.
#[test]
fn a_cross_layer_transcoder_run_cancels_to_a_checkpoint_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clt");
    let staging = dir.path().join(".clt.partial");
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Train");
    h.get_by_label("a cross-layer transcoder").click();
    h.step();
    train_then_cancel(&mut h, &out, "16384", "Cancel train CLT");
    assert!(staging.join("training/checkpoint").is_dir());
    assert!(!out.exists());
    // Started again without "continue", the run is refused: the checkpoint is named.
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the refusal", |h| {
        has_message(h, &["pass --resume to continue it"])
    });
    h.get_by_label("continue the stopped run").click();
    h.step();
    h.get_by_label("Start training").click();
    wait_for(&mut h, "the continued CLT", |h| {
        has_message(h, &["cross-layer transcoder written to"])
    });
    wait_for(&mut h, "the trace through it", |h| !h.state().busy());
    assert!(
        !staging.exists(),
        "the staging folder is renamed into place"
    );
    assert!(!out.join("training").exists(), "the checkpoint is dropped");
    let steps = logged_steps(&out.join("training-metrics.jsonl"));
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&(16_384 / 1024)), "{steps:?}");
}

/// "Score the replacement model" scores the graph's transcoders on held-out text: the line
/// shown is the library's score with the panel's settings (world:1, 16 windows of 64 tokens).
#[test]
fn the_circuits_panel_scores_its_replacement_model() {
    use monoscope::attribution_graph::fidelity::score;
    use monoscope::attribution_graph::load_transcoders;
    use monoscope::sae::activations::{ActivationSource, Corpus, WindowSettings};

    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Circuits");
    wait_for(&mut h, "the graph", |h| {
        has_label(h, "Selected: logit") && !h.state().busy()
    });
    // Scored on another held-out corpus than the default world:1.
    replace_text(&mut h, "on", "world:2");
    h.get_by_label("Score the replacement model").click();
    let model = h.state().workbench.model.clone().unwrap();
    let transcoders =
        load_transcoders(&[monoscope::cli::bundled_transcoders_dir()], &model).unwrap();
    let settings = WindowSettings {
        context_size: 64,
        windows_per_forward: 8,
        ..WindowSettings::default()
    };
    let mut source = ActivationSource::new(
        &model,
        Corpus::parse("world:2", "text").unwrap(),
        &transcoders[0].site.input.to_string(),
        settings,
    )
    .unwrap();
    let report = score(&mut source, &transcoders, 16, |_, _| {}).unwrap();
    let line = format!(
        "over {} held-out tokens: CE loss recovered {:.3}, KL {:.3}",
        report.tokens, report.ce_loss_recovered, report.kl_replaced
    );
    wait_for(&mut h, "the score", |h| has_label(h, &line));
}

#[test]
fn the_concepts_panel_scores_the_sae_and_opens_a_concepts_best_feature() {
    use monoscope::features::score::{ScoreReport, ScoreSettings, score};

    let mut h = harness();
    wait_for(&mut h, "the SAE and its feature store", |h| {
        h.state().workbench.store.is_some() && !h.state().busy()
    });
    open_panel(&mut h, "Concepts");
    replace_text(&mut h, "Paragraphs per country", "0");
    replace_text(&mut h, "Fact lists", "30");
    replace_text(&mut h, "k-sparse probes", "1,5");
    h.key_press(egui::Key::Enter);
    h.step();
    let (model, sae) = {
        let wb = &h.state().workbench;
        (wb.model.clone().unwrap(), wb.sae.clone().unwrap())
    };
    let mut settings = ScoreSettings::new(monoscope::gui::workbench::window_segments(
        &model,
        sae.sae.metadata.context_size,
    ));
    settings.docs_per_country = 0;
    settings.fact_lists = 30;
    settings.sparse_probe_ks = vec![1, 5];
    // A score kept by an earlier run would be read instead of made.
    let cache = monoscope::gui::workbench::concept_score_file(&sae, &settings);
    let _ = std::fs::remove_file(&cache);
    h.get_by_label("Score the SAE").click();

    // The same scoring through the library: the window must show its figures.
    let never = AtomicBool::new(false);
    let report = score(&model, &sae.sae.sae, sae.hook, &settings, &never, |_, _| {})
        .unwrap()
        .unwrap();
    let summary = format!(
        "Mean best-feature F1 {:.3} over 27 concepts ({} held-out tokens)",
        report.mean_f1, report.evaluation_tokens
    );
    // A score kept by an earlier run may be shown when the SAE opens: wait for this one (an
    // ended job stops counting as busy a frame before its result is taken).
    let best =
        |r: &ScoreReport| -> Vec<u32> { r.concepts.iter().map(|c| c.best_feature).collect() };
    let expected = best(&report);
    wait_for(&mut h, "the score", |h| {
        let scores = h.state().workbench.concept_scores.as_ref();
        scores.is_some_and(|s| best(&s.report) == expected) && !h.state().busy()
    });
    let shown = h.state().workbench.concept_scores.clone().unwrap();
    assert!(has_label(&h, &summary), "{summary}");
    assert!(has_label(&h, "k-sparse probes: mean F1 k=1 "));
    assert!(has_label(&h, "Dense probes of the hook: mean F1 "));
    let absorption = format!(
        "Feature absorption: mean fraction {:.3}",
        report.mean_absorption.unwrap()
    );
    assert!(has_label(&h, &absorption), "{absorption}");

    // A concept's own k-sparse curve, then its best feature's page in Features.
    let japanese = report
        .concepts
        .iter()
        .find(|c| c.concept == "lang:ja")
        .unwrap();
    // The table runs below the window's bottom: scroll to the row first.
    scroll_into_view(&mut h, "lang:ja");
    h.get_by_label("lang:ja").click();
    h.step();
    h.step();
    assert!(has_label(
        &h,
        "F1 of the k-sparse probes: the mean, and lang:ja"
    ));
    let button = format!("#{}", japanese.best_feature);
    scroll_into_view(&mut h, &button);
    h.query_all_by_label(&button).last().unwrap().click();
    wait_for(&mut h, "the feature page", |h| {
        h.state().current == PanelKind::Features
            && has_label(h, &format!("Feature #{}", japanese.best_feature))
    });
    // The page says what the feature does for the scored concepts.
    for role in report.roles_of(japanese.best_feature) {
        assert!(has_label(&h, &role), "{role}");
    }
    assert!(has_label(&h, "best feature of lang:ja"));

    // The score was kept: a new window shows it (and the roles) without scoring again.
    assert!(cache.is_file(), "{} was not written", cache.display());
    drop(h);
    let mut h = harness();
    wait_for(&mut h, "the kept scores", |h| {
        h.state().workbench.sae.is_some() && !h.state().busy()
    });
    let kept = h.state().workbench.concept_scores.clone().unwrap();
    assert_eq!(kept, shown);
    open_panel(&mut h, "Concepts");
    assert!(has_label(&h, &summary), "{summary}");
    // Asked again with the same settings, the panel reads the kept score.
    replace_text(&mut h, "Paragraphs per country", "0");
    replace_text(&mut h, "Fact lists", "30");
    replace_text(&mut h, "k-sparse probes", "1,5");
    h.key_press(egui::Key::Enter);
    h.step();
    let written = std::fs::metadata(&cache).unwrap().modified().unwrap();
    h.get_by_label("Score the SAE").click();
    wait_for(&mut h, "the kept score", |h| !h.state().busy());
    h.run_steps(3);
    assert_eq!(h.state().workbench.concept_scores.as_ref(), Some(&shown));
    assert!(has_label(&h, &summary), "{summary}");
    assert_eq!(
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
        written
    );
}

#[test]
fn a_tiny_export_writes_parquet_that_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let mut h = harness();
    wait_for(&mut h, "the SAE", |h| h.state().workbench.sae.is_some());
    open_panel(&mut h, "Export");
    replace_text(&mut h, "Output folder", out.to_str().unwrap());
    replace_text(&mut h, "Tokens", "3000");
    h.key_press(egui::Key::Enter);
    h.step();
    h.get_by_label("Start export").click();
    wait_for(&mut h, "the export", |h| has_label(h, "Exported"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], true);
    let tokens = manifest["token_count"].as_u64().unwrap();
    // The typed token budget, not the form's default of 100,000, was used.
    assert!((3000..10_000).contains(&tokens), "{tokens} tokens");
    let mut rows = 0;
    for shard in manifest["shards"].as_array().unwrap() {
        rows += parquet_rows(&out.join(shard["activations"]["path"].as_str().unwrap()));
    }
    assert_eq!(rows, manifest["activation_count"].as_u64().unwrap());
    assert!(rows > 0);
}

fn parquet_rows(path: &Path) -> u64 {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    reader.metadata().file_metadata().num_rows() as u64
}

#[test]
fn knowledge_neurons_are_found_and_suppressing_them_is_shown() {
    let mut h = harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Neurons");
    h.get_by_label("Find neurons").click();
    wait_for(&mut h, "the neurons", |h| has_label(h, "P(target) = "));
    assert!(has_label(&h, "Attribution, layer × neuron"));
    assert!(has_label(&h, "value (what it writes)"));
    h.get_by_label("Suppress (×0)").click();
    wait_for(&mut h, "the suppression", |h| {
        has_label(h, "P with neurons ×0")
    });
    // The table shows what the library computes with the listed neurons zeroed.
    use monoscope::neurons::{Neuron, fact_prompts, paraphrased, probabilities, scale_neurons};
    let neurons: Vec<Neuron> = texts_containing(&h, "attribution ")
        .iter()
        .filter_map(|t| {
            let (l, rest) = t.strip_prefix('L')?.split_once(" N")?;
            let (n, _) = rest.split_once(' ')?;
            Some(Neuron {
                layer: l.parse().ok()?,
                neuron: n.parse().ok()?,
                attribution: 0.0,
                shared_by: 0.0,
            })
        })
        .collect();
    assert!(!neurons.is_empty(), "no neuron listed");
    let model = h.state().workbench.model.clone().unwrap();
    let facts = fact_prompts(
        &model,
        &paraphrased("The capital of {} is"),
        "Japan",
        " Tokyo",
    )
    .unwrap();
    let after = probabilities(&model, &facts, &scale_neurons(&neurons, 0.0)).unwrap();
    // A label's text is both its node's label and its value.
    let mut shown: Vec<String> = texts_containing(&h, "%)");
    shown.dedup();
    assert_eq!(shown.len(), facts.len(), "{shown:?}");
    for (text, p) in shown.iter().zip(&after) {
        assert!(text.starts_with(&format!("{p:.3} (")), "{text} vs {p:.3}");
    }
    let before = probabilities(&model, &facts, &monoscope::model::Hooks::new()).unwrap();
    assert!(
        before.iter().zip(&after).any(|(b, a)| (b - a).abs() > 1e-3),
        "zeroing the neurons changed nothing: {before:?} {after:?}"
    );
}

#[test]
fn a_bad_folder_is_a_message_in_the_window_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-sae");
    let mut h = harness();
    wait_for(&mut h, "the SAE", |h| h.state().workbench.sae.is_some());
    // What the Open menu's "Open as SAE" does with a typed path.
    h.state_mut().workbench.open_sae(missing.clone());
    wait_for(&mut h, "the error", |h| {
        has_message(h, &["cfg.json", "no-such-sae"])
    });
    h.step();
    assert!(
        has_label(&h, "no-such-sae"),
        "the message is shown in the window"
    );
    // The window goes on with the model; the failed SAE is not half-open.
    assert!(h.state().workbench.model.is_some());
    assert!(h.state().workbench.sae.is_none());
}

/// A harness that also renders: through wgpu, on Mesa's software Vulkan (lavapipe) here.
fn rendering_harness() -> Harness<'static, App> {
    Harness::builder()
        .with_size(egui::vec2(1400.0, 1000.0))
        .wgpu()
        .build_state(
            |ctx, app: &mut App| app.ui(ctx),
            App::new(GuiOptions::default(), Remembered::default()),
        )
}

#[test]
fn every_panel_renders_like_its_snapshot() {
    let mut h = rendering_harness();
    wait_for(&mut h, "the model, SAE and feature store", |h| {
        h.state().workbench.store.is_some() && !h.state().busy()
    });
    let prompt = "The capital of Japan is";
    replace_text(&mut h, "Prompt", prompt);
    h.key_press(egui::Key::Enter);
    let expected = top_prediction_label(&h, prompt);
    wait_for(&mut h, &expected, |h| {
        has_label(h, &expected) && !h.state().busy()
    });
    // Unfocus the prompt (no blinking cursor) and move the pointer off the window (no hover
    // highlight, no tooltip), so that the image depends on the window's content alone.
    h.key_press(egui::Key::Escape);
    let mut results = egui_kittest::SnapshotResults::new();
    // Text is rasterised on the CPU, the rest by the software driver: allow a few pixels of
    // antialiasing to differ between driver builds (0.1% of the 1400 × 1000 window).
    let options = egui_kittest::SnapshotOptions::new().failed_pixel_count_threshold(1400);
    // Concept scores kept on this machine by earlier runs show in Concepts: not in the image.
    h.state_mut().workbench.concept_scores = None;
    for kind in PanelKind::ALL {
        if kind != PanelKind::Playground {
            open_panel(&mut h, kind.title());
        }
        // A panel that reads on opening (the lens) finishes first, and so does any job its
        // answer starts (the Attention panel's composition scores): a job that has ended but
        // not yet been taken no longer counts as busy, so wait again after a few frames.
        h.input_mut().events.push(egui::Event::PointerGone);
        loop {
            wait_for(&mut h, kind.title(), |h| !h.state().busy());
            h.run_steps(3);
            if !h.state().busy() {
                break;
            }
        }
        results.add(
            h.try_snapshot_options(format!("panel_{}", kind.title().to_lowercase()), &options),
        );
    }
    results.unwrap();
}

/// Supernodes are drawn merged over the graph: the logit and its two strongest kept inputs in
/// two groups, their rings, names and the arrow of their summed effect, compared with an image.
#[test]
fn supernodes_are_drawn_over_the_graph_like_their_snapshot() {
    let mut h = rendering_harness();
    wait_for(&mut h, "the model", model_loaded);
    open_panel(&mut h, "Circuits");
    wait_for(&mut h, "the graph", |h| {
        has_label(h, "Selected: logit") && !h.state().busy()
    });
    let selected = texts_containing(&h, "Selected: logit").remove(0);
    let logit = selected.trim_start_matches("Selected: ").to_string();
    replace_text(&mut h, "group name", "say T");
    h.get_by_label("Add to supernode").click();
    h.run_steps(2);
    // The logit's two strongest inputs that are features, from its Inputs list.
    let inputs: Vec<String> = texts_containing(&h, " @")
        .into_iter()
        .filter(|t| t.starts_with('L') && t.contains(" f"))
        .take(2)
        .collect();
    assert_eq!(inputs.len(), 2, "{inputs:?}");
    replace_text(&mut h, "group name", "Japan → T");
    for input in &inputs {
        assert!(has_label(&h, "Selected: logit"), "{input}");
        h.query_all_by_label(input).next().unwrap().click();
        h.run_steps(2);
        wait_for(&mut h, "the feature's contexts", |h| !h.state().busy());
        h.run_steps(2);
        h.get_by_label("Add to supernode").click();
        h.run_steps(2);
        // Back to the logit (its button in the group) for the next input.
        h.query_all_by_label(&logit).next().unwrap().click();
        h.run_steps(2);
    }
    assert!(
        has_label(&h, "Japan → T → "),
        "{:?}",
        texts_containing(&h, "→")
    );
    h.key_press(egui::Key::Escape);
    h.input_mut().events.push(egui::Event::PointerGone);
    wait_for(&mut h, "a quiet window", |h| !h.state().busy());
    h.run_steps(3);
    let options = egui_kittest::SnapshotOptions::new().failed_pixel_count_threshold(1400);
    h.snapshot_options("circuits_supernodes", &options);
}

/// A transcoder opens in the window at both its hooks: the status line names the hook it reads
/// and the one it writes.
#[test]
fn a_transcoder_opens_at_the_hooks_it_reads_and_writes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let options = GuiOptions {
        model: Some(root.join("tests/fixtures/models/gpt2")),
        sae: Some(root.join("tests/fixtures/sparsify/transcoders/gpt2/h.0.mlp")),
        screenshots: None,
    };
    let mut h = harness_with(App::new(options, Remembered::default()));
    wait_for(&mut h, "the transcoder", |h| {
        h.state().workbench.sae.is_some()
    });
    let sae = h.state().workbench.sae.as_ref().unwrap();
    assert!(sae.sae.sae.transcoder);
    assert_eq!(
        (sae.hook.to_string(), sae.hook_out.to_string()),
        (
            "blocks.0.mlp.hook_in".to_string(),
            "blocks.0.hook_mlp_out".to_string()
        )
    );
    h.step();
    assert!(
        has_label(
            &h,
            "transcoder blocks.0.mlp.hook_in → blocks.0.hook_mlp_out"
        ),
        "the status line names both hooks"
    );

    // "Evaluate SAE" judges it where it writes: the figures the library gives with the
    // prediction spliced in at hook_mlp_out over the same windows.
    open_panel(&mut h, "Features");
    wait_for(&mut h, "the evaluate button", |h| {
        has_label(h, "Evaluate SAE")
    });
    h.get_by_label("Evaluate SAE").click();
    wait_for(&mut h, "the evaluation", |h| {
        has_label(h, "CE loss recovered")
    });
    let shown = |prefix: &str| -> f64 {
        let text = texts_containing(&h, prefix)
            .into_iter()
            .find(|t| t.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` label"));
        text[prefix.len()..].trim_end_matches('%').parse().unwrap()
    };
    let open = h.state().workbench.sae.clone().unwrap();
    let model = h.state().workbench.model.clone().unwrap();
    let segments =
        monoscope::gui::workbench::window_segments(&model, open.sae.metadata.context_size);
    let settings = WindowSettings {
        context_size: segments.context_size,
        prepend_bos: true,
        exclude_special: true,
        windows_per_forward: 16,
    };
    let mut source = ActivationSource::new(
        &model,
        Corpus::parse("world", "text").unwrap(),
        &open.hook.to_string(),
        settings,
    )
    .unwrap();
    let want = monoscope::sae::eval::evaluate(
        &mut source,
        &open.sae.sae,
        open.hook_out,
        &monoscope::sae::eval::EvalSettings {
            windows: 64,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap();
    assert!((shown("FVU ") - want.fvu).abs() < 1e-3, "FVU {}", want.fvu);
    assert!(
        (shown("CE loss recovered ") - 100.0 * want.ce_loss_recovered).abs() < 0.1,
        "CE loss recovered {}",
        want.ce_loss_recovered
    );
}
