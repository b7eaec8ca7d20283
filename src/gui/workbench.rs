//! What the panels share: the open model, SAE and feature store, the edit history, messages,
//! and requests from one panel to another. Opening anything is a background job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::edit::history::EditHistory;
use crate::features::score::{ScoreReport, ScoreSettings};
use crate::features::store::{self, FeatureStore};
use crate::features::{BuildSettings, build};
use crate::jobs::{Job, JobHandle, lower_thread_priority};
use crate::model::{HookPoint, Model};
use crate::sae::activations::Corpus;
use crate::sae::codes::{CodingInput, SegmentSettings};
use crate::sae::load_for_model;
use crate::sae::saelens::SaeDir;
use crate::world::knowledge::KnowledgeBase;

use super::PanelKind;
use super::widgets::job_row;

/// An SAE opened for the current model.
pub struct OpenSae {
    pub dir: PathBuf,
    pub sae: SaeDir,
    pub hook: HookPoint,
    /// The hook its decoder writes: `hook` for an SAE, a transcoder's output hook.
    pub hook_out: HookPoint,
    /// Where what the window derives from this SAE and model (feature store, labels) is
    /// cached; named by both contents' hashes, computed once when the SAE opens.
    pub cache_dir: PathBuf,
    /// The SAE's and the model's content hashes, which a store's `features.json` names.
    pub sae_hash: String,
    pub model_hash: String,
}

impl OpenSae {
    /// The hooks it reads and writes, as text (what kept scores of it are keyed by too: an SAE
    /// placed by its path reads another hook when given one).
    pub fn hooks(&self) -> String {
        format!("{} → {}", self.hook, self.hook_out)
    }

    /// The hooks it reads and writes.
    pub fn site(&self) -> crate::sae::SaeSite {
        crate::sae::SaeSite {
            input: self.hook,
            output: self.hook_out,
        }
    }

    /// The SAE on `model` over `corpus`, as feature statistics and exports read it.
    pub fn coding_input<'a>(&'a self, model: &'a Model, corpus: &'a Corpus) -> CodingInput<'a> {
        CodingInput {
            model,
            sae: &self.sae.sae,
            sae_dir: &self.dir,
            hook: self.hook,
            writes: self.hook_out,
            corpus,
        }
    }
}

/// Tokens of the world corpus a feature store is built from when an SAE has none.
pub const STORE_TOKENS: u64 = 30_000;

/// A message shown in the window.
struct Notice {
    text: String,
    error: bool,
    at: Instant,
}

/// What a panel can ask another to show.
#[derive(Clone, Debug, PartialEq)]
pub enum PanelRequest {
    /// Steer with this SAE feature in the playground.
    Steer(u32),
    /// Open this feature's page.
    Feature(u32),
    /// Start this panel's main action (the screenshot tour's demo).
    Start(PanelKind),
    /// Trace the Circuits panel's prompt through the transcoders in this folder.
    Trace(PathBuf),
    /// Show head `layer.head`'s attention pattern on `prompt`.
    Pattern {
        prompt: String,
        layer: usize,
        head: usize,
    },
}

pub struct Workbench {
    pub ctx: egui::Context,
    pub model_dir: PathBuf,
    pub model: Option<Arc<Model>>,
    /// Bumped whenever the model's weights change (opened, edited, undone): panels drop
    /// results computed on an older model.
    pub model_version: u64,
    pub sae_dir: Option<PathBuf>,
    pub sae: Option<Arc<OpenSae>>,
    pub store: Option<Arc<FeatureStore>>,
    /// Ground-truth concept names of features (world model only), from `features score`.
    pub labels: HashMap<u32, String>,
    /// The Concepts panel's last scores: feature pages list what each feature does for the
    /// concepts. Read from the SAE's cache folder when it opens; dropped by an edit.
    pub concept_scores: Option<ConceptScores>,
    pub history: EditHistory,
    pub kb: Arc<KnowledgeBase>,
    /// Panel to switch to, set by a panel.
    pub goto: Option<PanelKind>,
    pub requests: Vec<PanelRequest>,
    notices: Vec<Notice>,
    model_job: Option<Job<Model>>,
    sae_job: Option<Job<OpenSae>>,
    store_job: Option<Job<FeatureStore>>,
    label_job: Option<Job<HashMap<u32, String>>>,
    cached_scores_job: Option<Job<Option<ConceptScores>>>,
    /// SAE to open once the model has loaded.
    pending_sae: Option<PathBuf>,
}

impl Workbench {
    pub fn new(ctx: egui::Context) -> Self {
        let (kb, notice) = match KnowledgeBase::bundled() {
            Ok(kb) => (kb, None),
            Err(e) => (
                KnowledgeBase {
                    path: PathBuf::new(),
                    countries: Vec::new(),
                },
                Some(format!("world facts: {e}")),
            ),
        };
        let mut wb = Self {
            ctx,
            model_dir: PathBuf::new(),
            model: None,
            model_version: 0,
            sae_dir: None,
            sae: None,
            store: None,
            labels: HashMap::new(),
            concept_scores: None,
            history: EditHistory::new(),
            kb: Arc::new(kb),
            goto: None,
            requests: Vec::new(),
            notices: Vec::new(),
            model_job: None,
            sae_job: None,
            store_job: None,
            label_job: None,
            cached_scores_job: None,
            pending_sae: None,
        };
        if let Some(n) = notice {
            wb.error(n);
        }
        wb
    }

    /// Starts `work` in the background, below the window's priority. Its reports (at most
    /// every [`crate::jobs::REPORT_INTERVAL`]) and its end repaint the window at once: an
    /// immediate request always reaches eframe's event loop, so a redraw the loop lost is
    /// made good by the next report instead of leaving the window asleep.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: impl Into<String>,
        work: impl FnOnce(&JobHandle) -> anyhow::Result<T> + Send + 'static,
    ) -> Job<T> {
        let ctx = self.ctx.clone();
        Job::spawn(
            name,
            move || ctx.request_repaint(),
            move |handle| {
                lower_thread_priority();
                work(handle)
            },
        )
    }

    /// Removes `request` from the queue; whether it was there.
    pub fn take_request(&mut self, request: &PanelRequest) -> bool {
        match self.requests.iter().position(|r| r == request) {
            Some(i) => {
                self.requests.remove(i);
                true
            }
            None => false,
        }
    }

    pub fn error(&mut self, text: impl Into<String>) {
        self.notices.push(Notice {
            text: text.into(),
            error: true,
            at: Instant::now(),
        });
    }

    pub fn info(&mut self, text: impl Into<String>) {
        self.notices.push(Notice {
            text: text.into(),
            error: false,
            at: Instant::now(),
        });
    }

    /// The message texts (tests read them).
    pub fn messages(&self) -> Vec<&str> {
        self.notices.iter().map(|n| n.text.as_str()).collect()
    }

    /// Opens a model folder (and then `sae`, if given); the SAE and edits of the old model go.
    pub fn open_model(&mut self, dir: PathBuf, sae: Option<PathBuf>) {
        self.drop_sae_jobs();
        drop_off_ui_thread((self.model.take(), self.sae.take(), self.store.take()));
        self.sae_dir = None;
        self.labels.clear();
        self.history = EditHistory::new();
        self.model_dir = dir.clone();
        self.pending_sae = sae;
        self.model_job = Some(self.spawn("open model", move |job| {
            job.set_message(format!("loading {}", dir.display()));
            let device = crate::device::DeviceChoice::Auto.open()?;
            Ok(Model::load(&dir, &device, candle_core::DType::F32)?)
        }));
    }

    /// Opens an SAE for the current model, then its feature store (building one if needed).
    pub fn open_sae(&mut self, dir: PathBuf) {
        let Some(model) = self.model.clone() else {
            self.pending_sae = Some(dir);
            return;
        };
        self.drop_sae_jobs();
        drop_off_ui_thread((self.sae.take(), self.store.take()));
        self.labels.clear();
        self.sae_dir = Some(dir.clone());
        self.sae_job = Some(self.spawn("open SAE", move |job| {
            job.set_message(format!("loading {}", dir.display()));
            let (sae, hook) = load_for_model(&dir, None, &model, &candle_core::Device::Cpu)?;
            crate::sae::codes::check_sae_fits(&model, hook, &sae.sae, &dir)?;
            let hook_out = crate::sae::output_hook(&sae, hook, &model)?;
            let model_hash = model.content_hash()?;
            let sae_hash = crate::table::sae_hash(&dir)?;
            Ok(OpenSae {
                cache_dir: store_cache_dir(&sae_hash, &model_hash),
                dir,
                sae,
                hook,
                hook_out,
                sae_hash,
                model_hash,
            })
        }));
    }

    /// Drops (and so cancels) the loading of the SAE open until now, its store and labels:
    /// their results would belong to what is being replaced.
    fn drop_sae_jobs(&mut self) {
        self.sae_job = None;
        self.store_job = None;
        self.label_job = None;
        self.cached_scores_job = None;
    }

    /// Replaces the model's weights (after an edit or an undo).
    pub fn set_edited_model(&mut self, model: Model, history: EditHistory) {
        drop_off_ui_thread(self.model.replace(Arc::new(model)));
        self.history = history;
        self.model_version += 1;
        // Scores of the model before the edit; a kept one would be read again for it.
        self.concept_scores = None;
        self.cached_scores_job = None;
    }

    /// Is anything of the workbench's own still loading?
    pub fn busy(&self) -> bool {
        self.model_job.is_some()
            || self.sae_job.is_some()
            || self.store_job.is_some()
            || self.label_job.is_some()
            || self.cached_scores_job.is_some()
    }

    /// Is the model being (re)loaded?
    pub fn loading_model(&self) -> bool {
        self.model_job.is_some()
    }

    /// Takes finished jobs' results. Called once per frame.
    pub fn poll(&mut self) {
        if let Some(result) = self.model_job.as_mut().and_then(Job::poll) {
            self.model_job = None;
            match result {
                Ok(model) => {
                    self.model = Some(Arc::new(model));
                    self.model_version += 1;
                    if let Some(sae) = self.pending_sae.take() {
                        self.open_sae(sae);
                    }
                }
                Err(e) => self.error(format!("opening {}: {e}", self.model_dir.display())),
            }
        }
        if let Some(result) = self.sae_job.as_mut().and_then(Job::poll) {
            self.sae_job = None;
            match result {
                Ok(sae) => {
                    let sae = Arc::new(sae);
                    self.sae = Some(sae.clone());
                    self.read_cached_scores(sae.clone());
                    self.open_store(sae);
                }
                Err(e) => {
                    let dir = self.sae_dir.take().unwrap_or_default();
                    self.error(format!("opening SAE {}: {e}", dir.display()));
                }
            }
        }
        if let Some(result) = self.store_job.as_mut().and_then(Job::poll) {
            self.store_job = None;
            match result {
                Ok(store) => {
                    self.store = Some(Arc::new(store));
                    self.start_labels();
                }
                Err(e) => self.error(format!("feature statistics: {e}")),
            }
        }
        if let Some(result) = self.label_job.as_mut().and_then(Job::poll) {
            self.label_job = None;
            match result {
                Ok(labels) => self.labels = labels,
                Err(e) => self.error(format!("concept labels: {e}")),
            }
        }
        if let Some(result) = self.cached_scores_job.as_mut().and_then(Job::poll) {
            self.cached_scores_job = None;
            match result {
                // A score made meanwhile for this SAE is newer than the newest kept one.
                Ok(Some(scores)) => {
                    let current = self.sae.as_ref();
                    let shown = (self.concept_scores.as_ref())
                        .is_some_and(|c| current.is_some_and(|sae| c.is_for(sae)));
                    if !shown {
                        self.concept_scores = Some(scores);
                    }
                }
                Ok(None) => {}
                Err(e) => self.error(format!("cached concept scores: {e}")),
            }
        }
        let now = Instant::now();
        self.notices
            .retain(|n| n.error || now.duration_since(n.at) < Duration::from_secs(8));
    }

    /// The SAE's feature store: `DIR/features` when the SAE folder has one, else one built
    /// from the world corpus into the cache.
    fn open_store(&mut self, sae: Arc<OpenSae>) {
        let Some(model) = self.model.clone() else {
            return;
        };
        self.store_job = Some(self.spawn("feature statistics", move |job| {
            let local = sae.dir.join("features");
            let info_file = local.join(store::INFO_FILE);
            let mut stale = None;
            if info_file.is_file() {
                // A store made before the SAE was trained further (or for another model)
                // would describe other features.
                let info: store::StoreInfo = crate::files::read_json(&info_file)?;
                if info.sae_hash == sae.sae_hash && info.model_hash == sae.model_hash {
                    job.set_message(format!("reading {}", local.display()));
                    return Ok(store::open(&local)?);
                }
                stale = Some(format!(
                    "{} was made for another SAE or model; ",
                    local.display()
                ));
            }
            let dir = &sae.cache_dir;
            if dir.join(store::INFO_FILE).is_file() {
                job.set_message(format!("reading {}", dir.display()));
                return Ok(store::open(dir)?);
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
            job.set_message(format!(
                "{}first look at this SAE: statistics over {STORE_TOKENS} tokens",
                stale.unwrap_or_default()
            ));
            let corpus = Corpus::parse("world", "text")?;
            let settings = BuildSettings {
                segment: window_segments(&model, 0),
                tokens: STORE_TOKENS,
                stats: Default::default(),
                logit_tokens: 10,
                neighbours: 10,
            };
            let input = sae.coding_input(&model, &corpus);
            let report = build(&input, dir, &settings, true, job.cancel_flag(), |t| {
                job.set_progress(t, STORE_TOKENS, "tokens")
            })?;
            if report.info.is_none() {
                anyhow::bail!("cancelled");
            }
            Ok(store::open(dir)?)
        }));
    }

    /// The newest concept score of `sae` in its cache folder (any settings), so feature
    /// pages and the Concepts panel show it without scoring again. An edited model is not
    /// the one the cache was made for.
    fn read_cached_scores(&mut self, sae: Arc<OpenSae>) {
        if !self.history.is_empty() {
            return;
        }
        self.cached_scores_job = Some(self.spawn("cached concept scores", move |_| {
            let Ok(entries) = std::fs::read_dir(&sae.cache_dir) else {
                return Ok(None);
            };
            let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with(CONCEPT_SCORES_PREFIX) && name.ends_with(".json")
                })
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
            files.sort_by_key(|&(modified, _)| std::cmp::Reverse(modified));
            Ok(files.iter().find_map(|(_, path)| {
                let cached = CachedScore::read(path).filter(|c| c.hooks == sae.hooks())?;
                Some(ConceptScores::new(&sae, cached.report))
            }))
        }));
    }

    /// Ground-truth labels for the bundled model's features (cached beside the store).
    fn start_labels(&mut self) {
        let (Some(model), Some(sae)) = (self.model.clone(), self.sae.clone()) else {
            return;
        };
        if model.dir != crate::cli::bundled_model_dir() {
            return;
        }
        self.label_job = Some(self.spawn("concept labels", move |job| {
            let path = sae.cache_dir.join("labels.json");
            if path.is_file() {
                return Ok(crate::files::read_json(&path)?);
            }
            job.set_message("scoring features against the world's labels");
            let mut settings =
                crate::features::score::ScoreSettings::new(window_segments(&model, 0));
            settings.docs_per_country = 1;
            settings.fact_lists = 100;
            settings.probes = false;
            settings.sparse_probe_ks.clear();
            let report = score_in_job(&model, &sae, &settings, None, job)?;
            let labels: HashMap<u32, String> = report
                .concepts
                .iter()
                .filter(|c| c.scored)
                .map(|c| {
                    let label = format!("{} (F1 {:.2})", c.concept, c.evaluation.f1);
                    (c.best_feature, label)
                })
                .collect();
            let text = serde_json::to_vec_pretty(&labels)?;
            std::fs::create_dir_all(&sae.cache_dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", sae.cache_dir.display()))?;
            crate::files::write_atomic(&path, |tmp| {
                std::fs::write(tmp, &text).map_err(|e| crate::Error::io(tmp, e))
            })?;
            Ok(labels)
        }));
    }

    /// The bottom bar: what is open, and the workbench's own jobs with cancel buttons.
    pub fn status_ui(&mut self, ui: &mut egui::Ui) {
        match &self.model {
            Some(m) => {
                let d = m.dims();
                ui.label(format!(
                    "model {} ({}, {} layers, d_model {}){}",
                    short_path(&m.dir),
                    m.model_type,
                    d.n_layers,
                    d.d_model,
                    if self.history.is_empty() {
                        String::new()
                    } else {
                        format!(", {} edit(s)", self.history.edits().len())
                    }
                ));
            }
            None => {
                ui.label(format!("model {} (loading)", short_path(&self.model_dir)));
            }
        }
        if let Some(sae) = &self.sae {
            ui.separator();
            let site = if sae.sae.sae.transcoder {
                format!("transcoder {} → {}", sae.hook, sae.hook_out)
            } else {
                sae.hook.to_string()
            };
            ui.label(format!(
                "SAE {} ({} on {site}, {} latents)",
                short_path(&sae.dir),
                sae.sae.sae.architecture.name(),
                sae.sae.sae.d_sae()
            ));
        }
        for job in [
            self.model_job.as_ref().map(|j| j as &dyn JobView),
            self.sae_job.as_ref().map(|j| j as &dyn JobView),
            self.store_job.as_ref().map(|j| j as &dyn JobView),
            self.label_job.as_ref().map(|j| j as &dyn JobView),
        ]
        .into_iter()
        .flatten()
        {
            ui.separator();
            job_row(ui, job);
        }
    }

    /// Errors stay until dismissed; other messages fade after a few seconds.
    pub fn show_notices(&mut self, ctx: &egui::Context) {
        if self.notices.is_empty() {
            return;
        }
        let mut dismiss = None;
        egui::Area::new(egui::Id::new("notices"))
            .anchor(egui::Align2::RIGHT_BOTTOM, [-12.0, -40.0])
            .show(ctx, |ui| {
                ui.set_max_width(480.0);
                for (i, n) in self.notices.iter().enumerate() {
                    let colour = if n.error {
                        ui.visuals().error_fg_color
                    } else {
                        ui.visuals().text_color()
                    };
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.horizontal(|ui| {
                            ui.colored_label(colour, if n.error { "⚠" } else { "ℹ" });
                            ui.add(egui::Label::new(&n.text).wrap());
                            if ui.small_button("🗙").on_hover_text("Dismiss").clicked() {
                                dismiss = Some(i);
                            }
                        });
                    });
                }
            });
        if let Some(i) = dismiss {
            self.notices.remove(i);
        }
    }
}

/// A job as the status bar sees it, whatever it produces.
pub trait JobView {
    fn name(&self) -> &str;
    fn progress(&self) -> crate::jobs::Progress;
    fn rate(&self) -> f64;
    fn elapsed(&self) -> Duration;
    fn cancel(&self);
}

impl<T> JobView for Job<T> {
    fn name(&self) -> &str {
        &self.name
    }
    fn progress(&self) -> crate::jobs::Progress {
        Job::progress(self)
    }
    fn rate(&self) -> f64 {
        Job::rate(self)
    }
    fn elapsed(&self) -> Duration {
        Job::elapsed(self)
    }
    fn cancel(&self) {
        Job::cancel(self)
    }
}

/// Scores the open SAE against the world's labels (`features score`) in a job: its phases as
/// the job's message, its cancel flag obeyed. With `kept`, a score kept there is read instead
/// (if `kept.read`), and a new one is kept there.
pub fn score_in_job(
    model: &Model,
    sae: &OpenSae,
    settings: &ScoreSettings,
    kept: Option<Kept<'_>>,
    job: &crate::jobs::JobHandle,
) -> anyhow::Result<ScoreReport> {
    if let Some(cached) = (kept.filter(|k| k.read)).and_then(|k| CachedScore::read(k.path))
        && &cached.settings == settings
    {
        return Ok(cached.report);
    }
    let report = crate::features::score::score(
        model,
        &sae.sae.sae,
        sae.hook,
        settings,
        job.cancel_flag(),
        |phase, tokens| job.set_message(format!("{phase}: {tokens} tokens")),
    )?
    .ok_or_else(|| anyhow::anyhow!("cancelled"))?;
    if let Some(Kept { path, .. }) = kept {
        let cached = CachedScore {
            version: env!("CARGO_PKG_VERSION").into(),
            format: crate::features::score::REPORT_FORMAT,
            hooks: sae.hooks(),
            settings: settings.clone(),
            report,
        };
        // The cache only saves time: a score that cannot be kept is still shown.
        if let Err(e) = cached.write(path) {
            eprintln!("monoscope: not keeping the concept scores: {e}");
        }
        return Ok(cached.report);
    }
    Ok(report)
}

/// Where a concept score is kept ([`concept_score_file`]), and whether one kept there may be
/// read instead of scoring.
#[derive(Clone, Copy, Debug)]
pub struct Kept<'a> {
    pub path: &'a Path,
    pub read: bool,
}

/// A concept score and the SAE and model it is of.
#[derive(Clone, Debug, PartialEq)]
pub struct ConceptScores {
    pub sae_dir: PathBuf,
    /// The SAE's cache folder, named by the SAE's and the model's contents: what the score is
    /// of (a path alone may hold another SAE, or be opened with another model, later).
    of: PathBuf,
    pub report: Arc<ScoreReport>,
}

impl ConceptScores {
    pub fn new(sae: &OpenSae, report: ScoreReport) -> Self {
        Self {
            sae_dir: sae.dir.clone(),
            of: sae.cache_dir.clone(),
            report: Arc::new(report),
        }
    }

    /// Whether the scores are of `sae` with the model it was opened for.
    pub fn is_for(&self, sae: &OpenSae) -> bool {
        self.of == sae.cache_dir
    }
}

const CONCEPT_SCORES_PREFIX: &str = "concepts-";

/// Where a concept score of `sae` with `settings` is kept: in the SAE's cache folder (named
/// by the SAE's and the model's contents), one file per settings. A score takes about a
/// minute; the same settings give the same score (the splits and probes are seeded).
pub fn concept_score_file(sae: &OpenSae, settings: &ScoreSettings) -> PathBuf {
    let key = format!(
        "{} {}",
        sae.hooks(),
        serde_json::to_string(settings).unwrap_or_default()
    );
    let digest = crate::table::sha256_hex(key.as_bytes());
    sae.cache_dir
        .join(format!("{CONCEPT_SCORES_PREFIX}{}.json", &digest[..16]))
}

/// A concept score as kept in the cache, with what made it.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedScore {
    /// The monoscope that scored, and its report's format: another may score differently.
    version: String,
    format: u32,
    /// The hooks the SAE was read at ([`OpenSae::hooks`]).
    hooks: String,
    settings: ScoreSettings,
    report: ScoreReport,
}

impl CachedScore {
    /// The score kept at `path`, if there is one this version of monoscope made.
    fn read(path: &Path) -> Option<Self> {
        let cached: Self = crate::files::read_json(path).ok()?;
        (cached.version == env!("CARGO_PKG_VERSION")
            && cached.format == crate::features::score::REPORT_FORMAT)
            .then_some(cached)
    }

    fn write(&self, path: &Path) -> crate::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        }
        crate::files::write_atomic(path, |tmp| crate::files::write_json(tmp, self))
    }
}

/// How the window cuts documents for an SAE: its context size (`sae_context`, 0: unknown →
/// 128), capped by the model's; BOS first; special tokens left out.
pub fn window_segments(model: &Model, sae_context: usize) -> SegmentSettings {
    let context = if sae_context > 0 { sae_context } else { 128 };
    SegmentSettings {
        context_size: context.min(model.dims().context_length),
        prepend_bos: true,
        exclude_special: true,
        segments_per_forward: 16,
    }
}

/// Drops `value` on a thread of its own. A feature store is millions of small allocations
/// (each context's tokens): freeing one took a 280 ms frame when a trained SAE replaced the
/// bundled one. Only the last `Arc` frees anything; the others just count down.
fn drop_off_ui_thread<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || drop(value));
    // Without a thread (none left to spawn), the value was dropped here, which is still right.
    drop(spawned);
}

/// Where the feature store of an SAE without one is kept.
fn store_cache_dir(sae_hash: &str, model_hash: &str) -> PathBuf {
    let base = crate::edit::covariance::default_cache_dir()
        .and_then(|stats| stats.parent().map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir);
    let short = |hash: &str| hash.chars().take(16).collect::<String>();
    base.join("features")
        .join(format!("{}-{}", short(sae_hash), short(model_hash)))
}

/// The last two components of a path, for labels.
pub fn short_path(path: &Path) -> String {
    let parts: Vec<_> = path.components().rev().take(2).collect();
    parts
        .iter()
        .rev()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}
