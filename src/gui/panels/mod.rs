//! One file per panel. Adding a panel: write the file, add its [`PanelKind`] and its line in
//! [`all`].

mod attention;
mod circuits;
mod concepts;
mod edit;
mod export;
mod features;
mod lens;
mod neurons;
mod patching;
mod playground;
mod train;

use serde::{Deserialize, Serialize};

use super::Workbench;
use super::widgets::spinner;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PanelKind {
    Playground,
    Lens,
    Attention,
    Patching,
    Circuits,
    Train,
    Features,
    Concepts,
    Neurons,
    Edit,
    Export,
}

impl PanelKind {
    pub const ALL: [PanelKind; 11] = [
        PanelKind::Playground,
        PanelKind::Lens,
        PanelKind::Attention,
        PanelKind::Patching,
        PanelKind::Circuits,
        PanelKind::Train,
        PanelKind::Features,
        PanelKind::Concepts,
        PanelKind::Neurons,
        PanelKind::Edit,
        PanelKind::Export,
    ];

    pub fn title(self) -> &'static str {
        match self {
            PanelKind::Playground => "Playground",
            PanelKind::Lens => "Lens",
            PanelKind::Attention => "Attention",
            PanelKind::Patching => "Patching",
            PanelKind::Circuits => "Circuits",
            PanelKind::Train => "Train",
            PanelKind::Features => "Features",
            PanelKind::Concepts => "Concepts",
            PanelKind::Neurons => "Neurons",
            PanelKind::Edit => "Edit",
            PanelKind::Export => "Export",
        }
    }

    pub fn about(self) -> &'static str {
        match self {
            PanelKind::Playground => {
                "Run a prompt: tokens, next-token probabilities, feature colouring, steering"
            }
            PanelKind::Lens => {
                "Logit lens at every position and direct logit attribution of a token"
            }
            PanelKind::Attention => {
                "Attention patterns, and heads found by detectors (previous-token, induction, …)"
            }
            PanelKind::Patching => {
                "Activation patching: which blocks, tokens and heads carry a clean prompt's answer"
            }
            PanelKind::Circuits => {
                "Attribution graph of a prompt through per-layer transcoders (circuit tracing)"
            }
            PanelKind::Train => "Capture a hook's activations and train a sparse autoencoder",
            PanelKind::Features => "Browse the SAE's features: contexts, histograms, logit effects",
            PanelKind::Concepts => {
                "Score the SAE against the world's ground-truth concepts: best features, probes"
            }
            PanelKind::Neurons => "Knowledge neurons of a fact (integrated gradients)",
            PanelKind::Edit => "Trace a fact, edit it with ROME, check, undo, save",
            PanelKind::Export => "Export feature activations to Parquet",
        }
    }
}

/// A panel: draws itself and owns its jobs.
pub trait Panel {
    fn kind(&self) -> PanelKind;
    fn ui(&mut self, ui: &mut egui::Ui, wb: &mut Workbench);
    /// Has a job running (the window keeps repainting while one does; see [`running`]).
    fn busy(&self) -> bool;
}

pub fn all() -> Vec<Box<dyn Panel>> {
    vec![
        Box::<playground::Playground>::default(),
        Box::<lens::Lens>::default(),
        Box::<attention::Attention>::default(),
        Box::<patching::Patching>::default(),
        Box::<circuits::Circuits>::default(),
        Box::<train::Train>::default(),
        Box::<features::Features>::default(),
        Box::<concepts::Concepts>::default(),
        Box::<neurons::Neurons>::default(),
        Box::<edit::Edit>::default(),
        Box::<export::Export>::default(),
    ]
}

/// "Waiting for the model" when it is not loaded yet; the model otherwise.
fn need_model(ui: &mut egui::Ui, wb: &Workbench) -> Option<std::sync::Arc<crate::Model>> {
    if wb.model.is_none() {
        ui.horizontal(|ui| {
            spinner(ui);
            ui.label("Loading the model…");
        });
    }
    wb.model.clone()
}

/// Whether a panel's job slot holds a job still at work. A finished job waits in its slot
/// until the panel is drawn again and takes the result, but it no longer counts as busy.
fn running<T>(slot: &Option<crate::jobs::Job<T>>) -> bool {
    slot.as_ref().is_some_and(crate::jobs::Job::is_running)
}

/// Polls a panel's job slot: the result once it is done (errors go to the messages).
fn take<T: Send + 'static>(
    slot: &mut Option<crate::jobs::Job<T>>,
    wb: &mut Workbench,
) -> Option<T> {
    let result = slot.as_mut()?.poll()?;
    let name = slot.take().map(|j| j.name.clone()).unwrap_or_default();
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            wb.error(format!("{name}: {e}"));
            None
        }
    }
}

/// An answer a [`Reader`] got: the question, the model version it was computed on, the value.
pub(super) struct Answer<Q, R> {
    pub question: Q,
    pub model_version: u64,
    pub value: R,
}

/// A panel's question answered by a background job (the Lens's reading, the Attention panel's
/// patterns): the latest question asked runs once the previous job is done, a question that
/// failed is not retried until it is asked again, and an edit or undo of the model runs the
/// same question again on the new weights.
pub(super) struct Reader<Q, R> {
    asked: Option<Q>,
    /// The latest question a job was started for, and on which model version.
    started: Option<(Q, u64)>,
    answer: Option<Answer<Q, R>>,
    job: Option<crate::jobs::Job<Answer<Q, R>>>,
}

impl<Q, R> Default for Reader<Q, R> {
    fn default() -> Self {
        Self {
            asked: None,
            started: None,
            answer: None,
            job: None,
        }
    }
}

impl<Q: Clone + PartialEq + Send + 'static, R: Send + 'static> Reader<Q, R> {
    pub fn busy(&self) -> bool {
        running(&self.job)
    }

    pub fn job(&self) -> Option<&crate::jobs::Job<Answer<Q, R>>> {
        self.job.as_ref()
    }

    pub fn answer(&self) -> Option<&Answer<Q, R>> {
        self.answer.as_ref()
    }

    /// Keeps a finished job's answer (its error goes to the window's messages).
    pub fn poll(&mut self, wb: &mut Workbench) {
        if let Some(answer) = take(&mut self.job, wb) {
            self.answer = Some(answer);
        }
    }

    /// Asks `question`, even if it is the one that last ran (and failed). A job still at work
    /// on another question is dropped, which cancels it: its answer would be stale on arrival,
    /// and the new question's job starts at once instead of after it.
    pub fn ask(&mut self, question: Q) {
        if running(&self.job) && self.started.as_ref().is_some_and(|(q, _)| *q != question) {
            self.job = None;
        }
        self.asked = Some(question);
        self.started = None;
    }

    pub fn asked(&self) -> Option<&Q> {
        self.asked.as_ref()
    }

    pub fn asked_mut(&mut self) -> Option<&mut Q> {
        self.asked.as_mut()
    }

    /// Starts `work` on the question asked unless a job runs or it already ran on this model.
    pub fn run_due(
        &mut self,
        wb: &Workbench,
        name: &str,
        work: impl FnOnce(&Q, &crate::jobs::JobHandle) -> anyhow::Result<R> + Send + 'static,
    ) {
        let Some(question) = self.asked.clone() else {
            return;
        };
        let due = (question, wb.model_version);
        if self.job.is_some() || self.started.as_ref() == Some(&due) {
            return;
        }
        self.started = Some(due.clone());
        let (question, model_version) = due;
        self.job = Some(wb.spawn(name, move |job| {
            let value = work(&question, job)?;
            Ok(Answer {
                question,
                model_version,
                value,
            })
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    /// A new question cancels the job at work on the last one, whose end then shows no
    /// error, and the new question's answer arrives.
    #[test]
    fn a_new_question_cancels_the_job_at_work_on_the_last_one() {
        let mut wb = Workbench::new(egui::Context::default());
        let mut reader: Reader<u32, u32> = Reader::default();
        let (stopped_tx, stopped) = mpsc::channel();
        let started = Arc::new(AtomicBool::new(false));
        let work = |started: Arc<AtomicBool>, stopped_tx: mpsc::Sender<u32>| {
            move |q: &u32, job: &crate::jobs::JobHandle| {
                started.store(true, Ordering::SeqCst);
                if *q == 1 {
                    // The slow question: works until it is cancelled.
                    while !job.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    stopped_tx.send(*q)?;
                    anyhow::bail!("cancelled");
                }
                Ok(q * 10)
            }
        };
        reader.ask(1);
        reader.run_due(&wb, "slow", work(started.clone(), stopped_tx.clone()));
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(reader.busy());
        reader.ask(2);
        reader.run_due(&wb, "quick", work(started.clone(), stopped_tx));
        assert_eq!(stopped.recv_timeout(Duration::from_secs(10)), Ok(1));
        for _ in 0..10_000 {
            reader.poll(&mut wb);
            if reader.answer().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let answer = reader.answer().expect("the second question's answer");
        assert_eq!((answer.question, answer.value), (2, 20));
        assert!(wb.messages().is_empty(), "{:?}", wb.messages());

        // The same question asked again while it runs keeps its job.
        reader.ask(1);
        reader.run_due(&wb, "slow", work(started.clone(), mpsc::channel().0));
        reader.ask(1);
        assert!(reader.busy());
    }
}
