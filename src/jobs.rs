//! Background jobs: long work (loading, training, building stores, exporting, editing) runs
//! on its own thread and reports progress through a [`JobHandle`]; whoever started it polls
//! for the result, and can pause or cancel it. The GUI keeps every heavy call here so a frame
//! never waits on one.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a job has told its watchers so far.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Units done out of `total` (tokens, steps, rows…); `total == 0`: unknown.
    pub done: u64,
    pub total: u64,
    /// What the units are ("tokens", "steps"…), for rates.
    pub unit: String,
    /// The current phase, in words.
    pub message: String,
    /// Named metric curves, `[x, y]` points (loss, L0, FVU… against tokens).
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
}

impl Progress {
    /// `done / total`, when the total is known.
    pub fn fraction(&self) -> Option<f32> {
        (self.total > 0).then(|| (self.done as f64 / self.total as f64).min(1.0) as f32)
    }

    /// The latest value of a series.
    pub fn last(&self, series: &str) -> Option<f64> {
        self.series.get(series)?.last().map(|p| p[1])
    }
}

/// The job's side: report progress, check for cancel and pause.
#[derive(Clone)]
pub struct JobHandle {
    cancel: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    progress: Arc<Mutex<Progress>>,
    notify: Arc<dyn Fn() + Send + Sync>,
    /// When the watcher was last woken by a report.
    last_notified: Arc<Mutex<Option<Instant>>>,
}

/// A job wakes its watcher at most this often while it reports (a window then redraws ~20
/// times a second for it, not once per training step), and always once when it ends.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(50);

impl JobHandle {
    fn new(notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self {
            cancel: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(Mutex::new(Progress::default())),
            notify,
            last_notified: Arc::new(Mutex::new(None)),
        }
    }

    /// A handle for work run in the foreground (tests, the CLI): nobody watches it.
    pub fn detached() -> Self {
        Self::new(Arc::new(|| {}))
    }

    /// The flag the library's long functions take; set when the job is cancelled.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the progress and wakes the watcher, unless it was woken less than
    /// [`REPORT_INTERVAL`] ago.
    pub fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut self.lock());
        let now = Instant::now();
        let mut last = self.last_notified.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|then| now - then >= REPORT_INTERVAL) {
            *last = Some(now);
            drop(last);
            (self.notify)();
        }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        self.update(|p| p.message = message);
    }

    pub fn set_progress(&self, done: u64, total: u64, unit: &str) {
        self.update(|p| {
            p.done = done;
            p.total = total;
            if p.unit != unit {
                p.unit = unit.to_string();
            }
        });
    }

    /// Appends a point to a metric curve.
    pub fn record(&self, series: &str, x: f64, y: f64) {
        self.update(|p| p.series.entry(series.to_string()).or_default().push([x, y]));
    }

    /// Blocks while the job is paused (and not cancelled). Long loops call it at safe points.
    pub fn wait_while_paused(&self) {
        while self.pause.load(Ordering::Relaxed) && !self.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Lowers the calling thread's CPU priority: on Linux its own nice value goes to +10 (other
/// systems: nothing). The window runs its jobs and their compute threads so, because a frame
/// needs a core for ~2 ms the moment the window's thread wakes, and on a machine with few
/// cores it would otherwise wait for a job's time slice to end; the jobs still get every
/// cycle the window leaves.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority on the caller's own thread id changes
    // only that thread's nice value. A failure leaves the priority as it was, which is safe.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// A running or finished job producing a `T`.
pub struct Job<T> {
    pub name: String,
    handle: JobHandle,
    started: Instant,
    finished: Option<Duration>,
    /// Set by the job's thread when it ends: a finished job whose result nobody has taken yet
    /// (its panel is not shown) is no longer running.
    ended: Arc<AtomicBool>,
    receiver: Receiver<Result<T, String>>,
}

impl<T: Send + 'static> Job<T> {
    /// Runs `work` on a new thread. `notify` is called whenever the job reports (the GUI
    /// passes "request a repaint"). A panic in `work` becomes an error, not a crash.
    pub fn spawn(
        name: impl Into<String>,
        notify: impl Fn() + Send + Sync + 'static,
        work: impl FnOnce(&JobHandle) -> anyhow::Result<T> + Send + 'static,
    ) -> Self {
        let name = name.into();
        let handle = JobHandle::new(Arc::new(notify));
        let (sender, receiver) = channel();
        let job_handle = handle.clone();
        let ended = Arc::new(AtomicBool::new(false));
        let thread_ended = ended.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job: {name}"))
            .spawn(move || {
                let result = match catch_unwind(AssertUnwindSafe(|| work(&job_handle))) {
                    Ok(Ok(value)) => Ok(value),
                    Ok(Err(err)) => Err(format!("{err:#}")),
                    Err(panic) => Err(format!("internal error: {}", panic_message(&panic))),
                };
                thread_ended.store(true, Ordering::Release);
                // The watcher may have gone (window closed): nothing to tell then.
                let _ = sender.send(result);
                (job_handle.notify)();
            });
        if let Err(err) = spawned {
            let (sender, failed) = channel();
            let _ = sender.send(Err(format!("could not start a thread: {err}")));
            return Self {
                name,
                handle,
                started: Instant::now(),
                finished: None,
                ended: Arc::new(AtomicBool::new(true)),
                receiver: failed,
            };
        }
        Self {
            name,
            handle,
            started: Instant::now(),
            finished: None,
            ended,
            receiver,
        }
    }

    /// The result, once, when the job has finished; errors are messages ready to show.
    pub fn poll(&mut self) -> Option<Result<T, String>> {
        match self.receiver.try_recv() {
            Ok(result) => {
                self.finished = Some(self.started.elapsed());
                Some(result)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.finished.get_or_insert_with(|| self.started.elapsed());
                None
            }
        }
    }

    /// Blocks until the job ends (tests and the CLI).
    pub fn wait(self) -> Result<T, String> {
        self.receiver
            .recv()
            .unwrap_or_else(|_| Err("the job ended without a result".into()))
    }
}

/// A job nobody can take the result of any more (its panel replaced it or closed) is asked to
/// stop, so superseded work does not keep the cores from the work that replaced it.
impl<T> Drop for Job<T> {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl<T> Job<T> {
    /// Whether the work is still going (false once it ended, taken or not).
    pub fn is_running(&self) -> bool {
        !self.ended.load(Ordering::Acquire)
    }

    pub fn progress(&self) -> Progress {
        self.handle.lock().clone()
    }

    pub fn elapsed(&self) -> Duration {
        self.finished.unwrap_or_else(|| self.started.elapsed())
    }

    /// Units per second since the start.
    pub fn rate(&self) -> f64 {
        let done = self.handle.lock().done as f64;
        done / self.elapsed().as_secs_f64().max(1e-9)
    }

    /// Asks the job to stop at its next safe point.
    pub fn cancel(&self) {
        self.handle.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.handle.is_cancelled()
    }

    pub fn set_paused(&self, paused: bool) {
        self.handle.pause.store(paused, Ordering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.handle.pause.load(Ordering::Relaxed)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a background job panicked".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window's frame time rests on this: a job's thread runs below the caller's
    /// priority, and only that thread.
    #[cfg(target_os = "linux")]
    #[test]
    fn lowering_the_priority_changes_only_the_calling_thread() {
        // SAFETY: getpriority on a thread id has no preconditions.
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = nice();
        let in_thread = std::thread::spawn(move || {
            lower_thread_priority();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(in_thread, (before + 10).min(19));
        assert_eq!(nice(), before);
    }

    /// A job that reports a thousand times in a blink wakes its watcher for the first report
    /// and once at its end, not a thousand times.
    #[test]
    fn reports_wake_the_watcher_at_most_every_interval_and_always_at_the_end() {
        use std::sync::atomic::AtomicUsize;
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        let reports = 1000;
        let mut job: Job<()> = Job::spawn(
            "chatty",
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            move |h| {
                for i in 0..reports {
                    h.set_progress(i + 1, reports, "steps");
                }
                Ok(())
            },
        );
        while job.poll().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The end's wake comes right after the result is sent.
        std::thread::sleep(Duration::from_millis(50));
        let wakes = wakes.load(Ordering::SeqCst);
        assert!(wakes >= 2, "the first report and the end: {wakes}");
        assert!(
            wakes < reports as usize,
            "{wakes} wakes for {reports} reports"
        );
        assert_eq!(job.progress().done, reports);
    }

    #[test]
    fn a_job_reports_progress_and_its_result() {
        let job: Job<i32> = Job::spawn(
            "count",
            || {},
            |h| {
                for i in 0..10 {
                    h.set_progress(i + 1, 10, "steps");
                    h.record("loss", i as f64, 1.0 / (i + 1) as f64);
                }
                Ok(42)
            },
        );
        let mut job = job;
        let result = loop {
            if let Some(r) = job.poll() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let p = job.progress();
        assert_eq!((p.done, p.total, p.unit.as_str()), (10, 10, "steps"));
        assert_eq!(p.series["loss"].len(), 10);
        assert_eq!(p.fraction(), Some(1.0));
        assert_eq!(result, Ok(42));
    }

    #[test]
    fn cancel_stops_a_paused_job() {
        let job = Job::spawn(
            "wait",
            || {},
            |h| {
                loop {
                    h.wait_while_paused();
                    if h.is_cancelled() {
                        anyhow::bail!("cancelled");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            },
        );
        job.set_paused(true);
        assert!(job.is_paused());
        job.cancel();
        let result: Result<(), String> = job.wait();
        assert_eq!(result, Err("cancelled".into()));
    }

    /// Dropping a job's only handle (a panel replacing it) stops its work.
    #[test]
    fn a_dropped_job_is_cancelled() {
        let (sender, stopped) = channel();
        let started = Arc::new(AtomicBool::new(false));
        let running = started.clone();
        let job: Job<()> = Job::spawn(
            "endless",
            || {},
            move |h| {
                running.store(true, Ordering::SeqCst);
                while !h.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                sender.send(()).unwrap();
                Ok(())
            },
        );
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(job.is_running());
        drop(job);
        assert_eq!(stopped.recv_timeout(Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn a_panic_in_a_job_becomes_an_error() {
        let job = Job::spawn("boom", || {}, |_| -> anyhow::Result<()> { panic!("boom") });
        let err = job.wait().unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }
}
