//! The desktop workbench: an eframe window with one panel per task, on top of everything
//! else in the crate. Heavy work goes through [`crate::jobs`], so a frame only draws.
//!
//! Structure (after rerun's viewer): [`Workbench`] holds what panels share (the model, the
//! SAE and its feature store, the edit history, messages); each panel is one file in
//! [`panels`] implementing [`panels::Panel`]; [`App`] draws the frame around them.

pub mod panels;
pub mod style;
pub mod widgets;
pub mod workbench;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use panels::PanelKind;
pub use workbench::Workbench;

use panels::Panel;

/// What is remembered between runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Remembered {
    pub model: Option<PathBuf>,
    pub sae: Option<PathBuf>,
    pub panel: Option<PanelKind>,
    pub dark: Option<bool>,
}

const REMEMBERED_KEY: &str = "monoscope";

impl Remembered {
    /// What the last run saved into eframe's storage (nothing if it is absent or unreadable).
    pub fn load(storage: &dyn eframe::Storage) -> Self {
        eframe::get_value(storage, REMEMBERED_KEY).unwrap_or_default()
    }
}

/// How the window starts.
#[derive(Clone, Debug, Default)]
pub struct GuiOptions {
    /// `None`: the last model opened, else the bundled world model.
    pub model: Option<PathBuf>,
    /// `None`: the last SAE opened, else the bundled SAE (with the bundled model).
    pub sae: Option<PathBuf>,
    /// Save a screenshot of every panel into this folder, then quit (for the README).
    pub screenshots: Option<PathBuf>,
}

/// The bundled SAE (on `blocks.4.mlp.hook_post` of the world model).
pub fn bundled_sae_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/sae/world-l4-topk")
}

/// The window's state.
pub struct App {
    pub workbench: Workbench,
    panels: Vec<Box<dyn Panel>>,
    pub current: PanelKind,
    dark: bool,
    screenshots: Option<screenshots::Tour>,
    /// Fonts and theme are installed on the first frame (when the window's context exists).
    styled: bool,
    /// The model and SAE to open once the window has drawn with its fonts (see [`App::ui`]).
    startup: Option<(PathBuf, Option<PathBuf>)>,
    /// The path typed in the Open menu.
    typed_path: String,
}

impl App {
    /// The window opens the model and SAE in `options`, else those remembered, else the
    /// bundled ones.
    pub fn new(options: GuiOptions, remembered: Remembered) -> Self {
        let bundled = crate::cli::bundled_model_dir();
        let model = options
            .model
            .clone()
            .or(remembered.model.clone())
            .unwrap_or(bundled.clone());
        let sae = options
            .sae
            .clone()
            .or(remembered.sae.clone())
            .or_else(|| (model == bundled && bundled_sae_dir().is_dir()).then(bundled_sae_dir));
        Self {
            workbench: Workbench::new(egui::Context::default()),
            panels: panels::all(),
            current: remembered.panel.unwrap_or(PanelKind::Playground),
            dark: remembered.dark.unwrap_or(true),
            screenshots: options.screenshots.map(screenshots::Tour::new),
            styled: false,
            startup: Some((model, sae)),
            typed_path: String::new(),
        }
    }

    fn remembered(&self) -> Remembered {
        Remembered {
            model: Some(self.workbench.model_dir.clone()),
            sae: self.workbench.sae_dir.clone(),
            panel: Some(self.current),
            dark: Some(self.dark),
        }
    }

    /// Is any background job running, the workbench's or a panel's?
    pub fn busy(&self) -> bool {
        self.workbench.busy() || self.panels.iter().any(|p| p.busy())
    }

    /// Has the window still to start opening its model?
    pub fn starting(&self) -> bool {
        self.startup.is_some()
    }

    /// One frame (also what the kittest tests drive).
    pub fn ui(&mut self, ctx: &egui::Context) {
        if !self.styled {
            style::install_fonts(ctx);
            style::apply_theme(ctx, self.dark);
            self.workbench.ctx = ctx.clone();
            self.styled = true;
        }
        // The fonts take effect on the next pass, which builds their atlas and rasterises the
        // first glyphs: the costliest frame of a run. Loading starts after it, not beside it.
        if self.startup.is_some() {
            if ctx.cumulative_pass_nr() >= 2 {
                if let Some((model, sae)) = self.startup.take() {
                    self.workbench.open_model(model, sae);
                }
            } else {
                ctx.request_repaint();
            }
        }
        self.workbench.poll();
        if let Some(kind) = self.workbench.goto.take() {
            self.current = kind;
        }
        egui::TopBottomPanel::top("top").show(ctx, |ui| self.top_bar(ui));
        egui::TopBottomPanel::bottom("status").show(ctx, |ui| self.status_bar(ui));
        egui::CentralPanel::default().show(ctx, |ui| {
            let current = self.current;
            if let Some(panel) = self.panels.iter_mut().find(|p| p.kind() == current) {
                egui::ScrollArea::vertical()
                    .id_salt(current.title())
                    .auto_shrink([false, false])
                    .show(ui, |ui| panel.ui(ui, &mut self.workbench));
            }
        });
        self.workbench.show_notices(ctx);
        if self.busy() {
            // Jobs also request repaints when they report; this keeps timers moving.
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.heading("monoscope");
            ui.separator();
            for kind in PanelKind::ALL {
                ui.selectable_value(&mut self.current, kind, kind.title())
                    .on_hover_text(kind.about());
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                let label = if self.dark { "☀ Light" } else { "☾ Dark" };
                if ui.button(label).on_hover_text("Switch theme").clicked() {
                    self.dark = !self.dark;
                    style::apply_theme(ui.ctx(), self.dark);
                }
                ui.menu_button("Open…", |ui| self.open_menu(ui));
            });
        });
    }

    /// A folder from the desktop's dialog, or typed (no dialog service, remote sessions).
    fn open_menu(&mut self, ui: &mut egui::Ui) {
        if ui
            .button("Model folder…")
            .on_hover_text(
                "A local Hugging Face model folder (config.json, *.safetensors, tokenizer.json)",
            )
            .clicked()
        {
            ui.close();
            if let Some(dir) = pick_folder("Open a model folder") {
                self.workbench.open_model(dir, None);
            }
        }
        if ui
            .button("SAE folder…")
            .on_hover_text(
                "An SAE folder: SAELens format (cfg.json, sae_weights.safetensors), one \
                 hookpoint of an EleutherAI sparsify run (cfg.json, sae.safetensors), a \
                 Gemma Scope SAE (params.npz under gemma-scope-…/layer_L/…), a Gemma \
                 Scope 2 one (params.safetensors under <site>/layer_L_…), or a \
                 dictionary_learning / SAEBench one (ae.pt and config.json)",
            )
            .clicked()
        {
            ui.close();
            if let Some(dir) = pick_folder("Open an SAE folder") {
                self.workbench.open_sae(dir);
            }
        }
        ui.separator();
        let label = ui.label("or a path");
        ui.text_edit_singleline(&mut self.typed_path)
            .labelled_by(label.id);
        ui.horizontal(|ui| {
            let path = PathBuf::from(self.typed_path.trim());
            let ok = !self.typed_path.trim().is_empty();
            if ui
                .add_enabled(ok, egui::Button::new("Open as model"))
                .clicked()
            {
                self.workbench.open_model(path.clone(), None);
                ui.close();
            }
            if ui
                .add_enabled(ok, egui::Button::new("Open as SAE"))
                .clicked()
            {
                self.workbench.open_sae(path);
                ui.close();
            }
        });
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            self.workbench.status_ui(ui);
        });
    }
}

/// A native folder dialog (`None` when cancelled or when no dialog service is available).
pub fn pick_folder(title: &str) -> Option<PathBuf> {
    rfd::FileDialog::new().set_title(title).pick_folder()
}

impl eframe::App for App {
    fn update(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        let thread_cpu = self
            .screenshots
            .as_ref()
            .and_then(|_| screenshots::thread_cpu_time());
        self.ui(ctx);
        let busy = self.busy();
        let starting = self.starting();
        if let Some(tour) = &mut self.screenshots {
            let cpu = frame.info().cpu_usage;
            tour.step(
                ctx,
                &mut self.current,
                &mut self.workbench,
                (busy, starting),
                cpu,
                thread_cpu,
            );
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, REMEMBERED_KEY, &self.remembered());
    }
}

/// Opens the window and runs until it is closed.
pub fn run(options: GuiOptions) -> anyhow::Result<()> {
    if let Some(dir) = &options.screenshots {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create the screenshot folder {}: {e}", dir.display())
        })?;
    }
    // The compute threads (rayon's, which candle's matrix products use too) yield to the
    // window as the jobs that start them do. Only the first build of the pool counts.
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| crate::jobs::lower_thread_priority())
        .build_global();
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("monoscope")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([720.0, 480.0]),
        persist_window: options.screenshots.is_none(),
        ..Default::default()
    };
    eframe::run_native(
        "monoscope",
        native,
        Box::new(move |cc| {
            let remembered = match (&options.screenshots, cc.storage) {
                (None, Some(storage)) => Remembered::load(storage),
                _ => Remembered::default(),
            };
            Ok(Box::new(App::new(options, remembered)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// `--screenshots DIR`: visit each panel, start its main action (a feature page, a ROME edit,
/// knowledge neurons), save a PNG of it once its jobs are done, and report the frame times
/// measured while jobs ran.
mod screenshots {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::workbench::PanelRequest;
    use super::{PanelKind, Workbench};

    /// Training last: its result becomes the open SAE.
    const TOUR: [PanelKind; 11] = [
        PanelKind::Playground,
        PanelKind::Lens,
        PanelKind::Attention,
        PanelKind::Patching,
        PanelKind::Circuits,
        PanelKind::Features,
        PanelKind::Concepts,
        PanelKind::Neurons,
        PanelKind::Edit,
        PanelKind::Export,
        PanelKind::Train,
    ];

    pub struct Tour {
        dir: PathBuf,
        next: usize,
        shown_since: Option<Instant>,
        /// When the screenshot was asked for. A pass that egui discards does not see the
        /// input of the pass before it, so the screenshot's event can be lost; after a while
        /// it is asked for again.
        requested: Option<Instant>,
        /// Time of frames drawn while a job ran (eframe's: wall clock from update to painted),
        /// seconds, with the UI thread's own CPU time in it and the panel shown.
        busy_frames: Vec<(f32, Option<f32>, PanelKind)>,
        /// The UI thread's CPU clock at the start of the last update.
        last_thread_cpu: Option<f64>,
        /// Wall-clock gaps between consecutive frames while a job ran, seconds: a window
        /// that stalls shows here even when each frame is quick.
        busy_gaps: Vec<f32>,
        /// When the last frame drawn while a job ran started.
        last_busy_frame: Option<Instant>,
        /// The panel the last frame drew: `cpu` and the thread clock measure the last frame,
        /// which may have drawn another panel than this one (a job that ends switches).
        last_drawn: Option<PanelKind>,
        writers: Vec<std::thread::JoinHandle<()>>,
    }

    impl Tour {
        pub fn new(dir: PathBuf) -> Self {
            Self {
                dir,
                next: 0,
                shown_since: None,
                requested: None,
                busy_frames: Vec::new(),
                last_thread_cpu: None,
                busy_gaps: Vec::new(),
                last_busy_frame: None,
                last_drawn: None,
                writers: Vec::new(),
            }
        }

        /// One frame of the tour; `busy`: some job is running; `starting`: the window has yet
        /// to start loading its model; `cpu`: the last frame's time; `thread_cpu`: the UI
        /// thread's CPU clock at the start of this update, so that its change since the last
        /// one is what the last frame (update, tessellation, painting) cost the UI thread —
        /// the frame's own work, without the time it waited for a core.
        pub fn step(
            &mut self,
            ctx: &egui::Context,
            current: &mut PanelKind,
            wb: &mut Workbench,
            (busy, starting): (bool, bool),
            cpu: Option<f32>,
            thread_cpu: Option<f64>,
        ) {
            ctx.request_repaint_after(super::widgets::BUSY_FRAME);
            let own = thread_cpu
                .zip(self.last_thread_cpu)
                .map(|(now, then)| (now - then) as f32);
            self.last_thread_cpu = thread_cpu;
            // `current` is what this update drew; the figures are the last frame's.
            let drawn = self.last_drawn.replace(*current);
            if busy && let (Some(cpu), Some(drawn)) = (cpu, drawn) {
                self.busy_frames.push((cpu, own, drawn));
            }
            let now = Instant::now();
            if busy && let Some(then) = self.last_busy_frame {
                self.busy_gaps.push((now - then).as_secs_f32());
            }
            self.last_busy_frame = busy.then_some(now);
            let Some(&kind) = TOUR.get(self.next) else {
                self.report();
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                return;
            };
            // (A panel may switch to another when its job ends: switch back, same stop.)
            *current = kind;
            if (starting || wb.busy()) && self.shown_since.is_none() {
                return; // the model, SAE and feature store first
            }
            if self.shown_since.is_none() {
                self.shown_since = Some(Instant::now());
                match kind {
                    PanelKind::Features => {
                        let densest = wb.store.as_ref().and_then(|s| {
                            s.features
                                .iter()
                                .max_by_key(|f| f.fire_count)
                                .map(|f| f.feature)
                        });
                        wb.requests.extend(densest.map(PanelRequest::Feature));
                    }
                    PanelKind::Edit
                    | PanelKind::Neurons
                    | PanelKind::Train
                    | PanelKind::Circuits
                    | PanelKind::Concepts => wb.requests.push(PanelRequest::Start(kind)),
                    _ => {}
                }
            }
            let since = self.shown_since.unwrap_or_else(Instant::now);
            if busy || since.elapsed() < Duration::from_secs(2) {
                return;
            }
            if self
                .requested
                .is_none_or(|at| at.elapsed() > Duration::from_secs(3))
            {
                ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(egui::UserData::default()));
                self.requested = Some(Instant::now());
                return;
            }
            let image = ctx.input(|i| {
                i.raw.events.iter().find_map(|e| match e {
                    egui::Event::Screenshot { image, .. } => Some(image.clone()),
                    _ => None,
                })
            });
            if let Some(image) = image {
                let path = self
                    .dir
                    .join(format!("{}.png", kind.title().to_lowercase()));
                // Encoding takes a while: not in a frame.
                self.writers
                    .push(std::thread::spawn(move || match save_png(&path, &image) {
                        Ok(()) => eprintln!("saved {}", path.display()),
                        Err(err) => eprintln!("screenshot {}: {err:#}", path.display()),
                    }));
                self.next += 1;
                self.shown_since = None;
                self.requested = None;
            }
        }

        fn report(&mut self) {
            for writer in self.writers.drain(..) {
                let _ = writer.join();
            }
            if self.busy_frames.is_empty() {
                return;
            }
            self.busy_frames.sort_by(|a, b| a.0.total_cmp(&b.0));
            let ms: Vec<f32> = self.busy_frames.iter().map(|f| 1000.0 * f.0).collect();
            let slowest: Vec<String> = self
                .busy_frames
                .iter()
                .rev()
                .take(5)
                .map(|(s, own, kind)| {
                    let own = own.map_or(String::new(), |o| {
                        format!(" ({:.1} ms of it on the UI thread)", 1000.0 * o)
                    });
                    format!("{:.1} ms on {}{own}", 1000.0 * s, kind.title())
                })
                .collect();
            let at = |q: f32| ms[((ms.len() - 1) as f32 * q).round() as usize];
            eprintln!(
                "frame CPU time while jobs ran: {} frames, median {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms.len(),
                at(0.5),
                at(0.95),
                at(0.99),
                at(1.0)
            );
            eprintln!("slowest: {}", slowest.join(", "));
            let mut own: Vec<f32> = self.busy_frames.iter().filter_map(|f| f.1).collect();
            own.sort_by(f32::total_cmp);
            if let Some(&max) = own.last() {
                eprintln!(
                    "frames over 16 ms: {}; the UI thread's own CPU time per frame: median {:.2} ms, max {:.2} ms",
                    ms.iter().filter(|&&m| m > 16.0).count(),
                    1000.0 * own[own.len() / 2],
                    1000.0 * max
                );
            }
            self.busy_gaps.sort_by(f32::total_cmp);
            if let Some(&max) = self.busy_gaps.last() {
                eprintln!(
                    "time between frames while jobs ran: median {:.1} ms, max {:.1} ms",
                    1000.0 * self.busy_gaps[self.busy_gaps.len() / 2],
                    1000.0 * max
                );
            }
            self.busy_frames.clear();
        }
    }

    /// The calling thread's CPU time, seconds (Linux with glibc; `None` elsewhere).
    pub fn thread_cpu_time() -> Option<f64> {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec, which `t` is.
            let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
            ok.then_some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        None
    }

    fn save_png(path: &std::path::Path, image: &egui::ColorImage) -> anyhow::Result<()> {
        let [w, h] = image.size;
        let bytes: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
        crate::files::write_atomic(path, |tmp| {
            crate::files::write_png(tmp, w, h, png::ColorType::Rgba, &bytes)
        })?;
        Ok(())
    }
}
