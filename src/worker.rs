//! The background worker: owns the loaded model and runs jobs, so no frame ever waits on
//! inference. Typed commands go in, typed events come out (each tagged with its job id), and
//! every event wakes the UI through the `repaint` callback — the worker knows nothing of egui.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use easel_engine::hub::{DownloadProgress, Downloader};
use easel_engine::metadata::{write_png, RgbImage};
use easel_engine::models::{Family, LatentRgb, ModelInfo};
use easel_engine::pipeline::preview::{latent_planes, LatentPlanes};
use easel_engine::pipeline::{GenerationRequest, Pipeline, StepProgress, Task};

use crate::app::preview::LatentFrame;

pub type JobId = u64;

/// No job is being cancelled.
const NO_JOB: u64 = u64::MAX;

#[derive(Debug)]
pub enum Command {
    /// Load a model, optionally with another VAE than its own.
    LoadModel {
        path: PathBuf,
        vae: Option<PathBuf>,
        /// The CPU bf16 mode (see `LoadOptions::cpu_bf16`).
        cpu_bf16: bool,
    },
    /// Generate one image; when `save_dir` is set the worker saves it there with its parameters.
    Generate {
        job: JobId,
        request: Box<GenerationRequest>,
        /// Text to image, or image to image / inpainting (the picture already of the
        /// request's size), or a hires fix.
        task: Task,
        save_dir: Option<PathBuf>,
    },
    Shutdown,
    /// Panics inside a command, as an engine bug would (tests of the recovery).
    #[cfg(test)]
    Panic {
        job: JobId,
    },
    /// Ends the worker thread with a panic outside any command (tests of the restart).
    #[cfg(test)]
    KillThread,
}

/// Which command a failure belongs to, noted before the command runs (it is moved into it).
enum Origin {
    Load(PathBuf),
    Job(JobId),
    Other,
}

impl Origin {
    fn of(command: &Command) -> Self {
        match command {
            Command::LoadModel { path, .. } => Origin::Load(path.clone()),
            Command::Generate { job, .. } => Origin::Job(*job),
            #[cfg(test)]
            Command::Panic { job } => Origin::Job(*job),
            _ => Origin::Other,
        }
    }

    fn describe(&self) -> String {
        match self {
            Origin::Load(path) => format!("loading {}", path.display()),
            Origin::Job(job) => format!("generation (job {job})"),
            Origin::Other => "the worker".into(),
        }
    }

    /// The event that reports `error` to whoever sent the command.
    fn failed(self, error: String) -> Option<Event> {
        match self {
            Origin::Load(path) => Some(Event::ModelFailed { path, error }),
            Origin::Job(job) => Some(Event::JobFailed { job, error }),
            Origin::Other => None,
        }
    }
}

/// What the UI needs to know about the loaded model (no tensors).
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub path: PathBuf,
    pub name: String,
    pub family: Family,
    pub turbo: bool,
    pub default_steps: usize,
    pub default_guidance: f64,
    pub default_size: usize,
    /// Image sides must be multiples of this (8 for every real SD VAE).
    pub size_multiple: usize,
    /// A 9-channel inpainting model: it runs only with an init image and a mask.
    pub inpainting: bool,
}

impl ModelSummary {
    fn from_info(info: &ModelInfo) -> Self {
        Self {
            path: info.path.clone(),
            name: info.name.clone(),
            family: info.family,
            turbo: info.turbo,
            default_steps: info.default_steps(),
            default_guidance: info.default_guidance(),
            default_size: info.default_size(),
            size_multiple: info.vae.downscale_factor(),
            inpainting: info.is_inpainting(),
        }
    }
}

#[derive(Debug)]
pub enum Event {
    ModelLoading {
        path: PathBuf,
    },
    ModelLoaded {
        model: ModelSummary,
        seconds: f64,
    },
    ModelFailed {
        path: PathBuf,
        error: String,
    },
    JobStarted {
        job: JobId,
    },
    Progress {
        job: JobId,
        step: usize,
        total: usize,
        elapsed: Duration,
        preview: Arc<LatentFrame>,
    },
    JobFinished {
        job: JobId,
        image: Arc<RgbImage>,
        request: GenerationRequest,
        parameters: String,
        saved: Option<Result<PathBuf, String>>,
        seconds: f64,
        /// What the artist should know about the job (e.g. LoRA modules that matched no layer).
        warnings: Vec<String>,
    },
    JobFailed {
        job: JobId,
        error: String,
    },
    JobCancelled {
        job: JobId,
    },
    DownloadProgress {
        repo: String,
        progress: DownloadProgress,
    },
    DownloadFinished {
        repo: String,
        path: PathBuf,
    },
    DownloadFailed {
        repo: String,
        error: String,
    },
}

pub struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    /// For download threads, which report on the same channel as the worker.
    event_sender: Sender<Event>,
    repaint: Arc<dyn Fn() + Send + Sync>,
    downloads: std::collections::HashMap<String, Arc<AtomicBool>>,
    cancel: Arc<AtomicU64>,
    shutting_down: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(repaint: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (event_tx, events) = channel();
        let (commands, _) = channel();
        let mut worker = Self {
            commands,
            events,
            event_sender: event_tx,
            repaint,
            downloads: Default::default(),
            cancel: Arc::new(AtomicU64::new(NO_JOB)),
            shutting_down: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        worker.start_thread();
        worker
    }

    /// A fresh worker thread (no model loaded) on the same event channel, so downloads in
    /// flight keep reporting.
    fn start_thread(&mut self) {
        let (commands, command_rx) = channel();
        let state = WorkerState {
            pipeline: None,
            model_hash: ModelHash::None,
            events: self.event_sender.clone(),
            repaint: self.repaint.clone(),
            cancel: self.cancel.clone(),
            shutting_down: self.shutting_down.clone(),
        };
        self.commands = commands;
        self.thread = std::thread::Builder::new().name("easel-worker".into()).spawn(move || state.run(command_rx)).ok();
    }

    /// Whether the worker thread is still there to take commands.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Starts a new worker thread if the last one ended (a bug that escaped the per-command
    /// recovery). Returns true when it did: the model must then be loaded again.
    pub fn restart_if_dead(&mut self) -> bool {
        // A thread that could not be started at all is not retried every frame.
        if !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return false;
        }
        self.cancel.store(NO_JOB, Ordering::SeqCst);
        self.start_thread();
        true
    }

    pub fn send(&self, command: Command) {
        // A send only fails once the worker thread is gone; the app notices that on its next
        // frame (`restart_if_dead`) and reports it.
        let _ = self.commands.send(command);
    }

    /// Asks the running job to stop; it stops after the step in progress.
    pub fn cancel(&self, job: JobId) {
        self.cancel.store(job, Ordering::SeqCst);
    }

    /// Downloads `repo` on its own thread (downloads never wait for a generation, nor block one).
    pub fn start_download(&mut self, downloader: Downloader, repo: String) {
        let cancel = Arc::new(AtomicBool::new(false));
        self.downloads.insert(repo.clone(), cancel.clone());
        let (events, repaint) = (self.event_sender.clone(), self.repaint.clone());
        let failed = (self.event_sender.clone(), repo.clone());
        let spawned = std::thread::Builder::new().name("easel-download".into()).spawn(move || {
            let mut last: Option<Instant> = None;
            let result = downloader.download(&repo, "main", &mut |progress| {
                // Chunks arrive every few KB; a few updates a second are plenty for the UI.
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
                if due || progress.total_bytes >= progress.total_expected {
                    last = Some(Instant::now());
                    let _ = events.send(Event::DownloadProgress { repo: repo.clone(), progress });
                    repaint();
                }
                if cancel.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            let event = match result {
                Ok(path) => Event::DownloadFinished { repo, path },
                Err(easel_engine::Error::Cancelled) => {
                    Event::DownloadFailed { repo, error: "cancelled; download again to resume".into() }
                }
                Err(e) => Event::DownloadFailed { repo, error: e.to_string() },
            };
            let _ = events.send(event);
            repaint();
        });
        if let Err(e) = spawned {
            let _ = failed.0.send(Event::DownloadFailed { repo: failed.1, error: e.to_string() });
        }
    }

    pub fn cancel_download(&mut self, repo: &str) {
        if let Some(flag) = self.downloads.remove(repo) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// All events that arrived since the last call (drained once per frame).
    pub fn drain(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown);
        // The worker finishes its current step at most; don't block the UI's exit on it.
        drop(self.thread.take());
    }
}

/// AUTOMATIC1111's short hash of the loaded checkpoint file, for the PNG metadata. Hashing a
/// multi-GB file takes seconds the first time, so it runs on its own thread while the model
/// is used; it is only needed when an image is saved.
enum ModelHash {
    None,
    Pending(JoinHandle<Option<String>>),
    Ready(Option<String>),
}

impl ModelHash {
    fn start(path: &Path) -> Self {
        let path = path.to_path_buf();
        match std::thread::Builder::new().name("easel-hash".into()).spawn(move || model_hash(&path)) {
            Ok(handle) => ModelHash::Pending(handle),
            Err(_) => ModelHash::None,
        }
    }

    /// The hash, waiting for it only if it is still being computed.
    fn get(&mut self) -> Option<&str> {
        if matches!(self, ModelHash::Pending(_)) {
            if let ModelHash::Pending(handle) = std::mem::replace(self, ModelHash::None) {
                *self = ModelHash::Ready(handle.join().ok().flatten());
            }
        }
        match self {
            ModelHash::Ready(hash) => hash.as_deref(),
            _ => None,
        }
    }
}

struct WorkerState {
    pipeline: Option<Pipeline>,
    model_hash: ModelHash,
    events: Sender<Event>,
    repaint: Arc<dyn Fn() + Send + Sync>,
    cancel: Arc<AtomicU64>,
    shutting_down: Arc<AtomicBool>,
}

impl WorkerState {
    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
        (self.repaint)();
    }

    fn run(mut self, commands: Receiver<Command>) {
        while let Ok(command) = commands.recv() {
            #[cfg(test)]
            if matches!(command, Command::KillThread) {
                panic!("test: the worker thread dies");
            }
            if matches!(command, Command::Shutdown) {
                break;
            }
            // An engine bug must cost one job, not the worker: the panic becomes that job's
            // error event and the next command runs. (The pipeline is used through `&self`
            // while generating, so a panic leaves no half-updated state behind; a panicking
            // load has already dropped the old model.)
            let origin = Origin::of(&command);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(command)));
            if let Err(payload) = outcome {
                let message = panic_message(payload.as_ref());
                let error = format!("internal error in {}: {message}. Please report this as a bug", origin.describe());
                if let Some(event) = origin.failed(error) {
                    self.emit(event);
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::LoadModel { path, vae, cpu_bf16 } => self.load(path, vae, cpu_bf16),
            Command::Generate { job, request, task, save_dir } => self.generate(job, *request, task, save_dir),
            Command::Shutdown => {}
            #[cfg(test)]
            Command::Panic { .. } => panic!("test: a bug inside a command"),
            #[cfg(test)]
            Command::KillThread => {}
        }
    }

    fn load(&mut self, path: PathBuf, vae: Option<PathBuf>, cpu_bf16: bool) {
        self.emit(Event::ModelLoading { path: path.clone() });
        // Free the old model first: two SDXL models at once may not fit in memory.
        self.pipeline = None;
        self.model_hash = ModelHash::None;
        let started = Instant::now();
        let options = match easel_engine::device::load_options(Default::default()) {
            Ok(options) => easel_engine::models::LoadOptions { vae_override: vae, cpu_bf16, ..options },
            Err(e) => return self.emit(Event::ModelFailed { path, error: e.to_string() }),
        };
        match Pipeline::load(&path, options) {
            Ok(pipeline) => {
                let model = ModelSummary::from_info(pipeline.info());
                self.pipeline = Some(pipeline);
                self.model_hash = ModelHash::start(&path);
                self.emit(Event::ModelLoaded { model, seconds: started.elapsed().as_secs_f64() });
            }
            Err(e) => self.emit(Event::ModelFailed { path, error: e.to_string() }),
        }
    }

    fn generate(&mut self, job: JobId, request: GenerationRequest, task: Task, save_dir: Option<PathBuf>) {
        let Some(pipeline) = &self.pipeline else {
            return self.emit(Event::JobFailed { job, error: "no model is loaded: open a model first".into() });
        };
        if self.cancel.load(Ordering::SeqCst) == job {
            return self.emit(Event::JobCancelled { job });
        }
        self.emit(Event::JobStarted { job });
        let started = Instant::now();
        let latent_rgb = pipeline.info().latent_rgb_factors();
        let (events, repaint, cancel, shutting_down) = (&self.events, &self.repaint, &self.cancel, &self.shutting_down);
        let mut on_step = |p: StepProgress| {
            if let Ok(preview) = latent_frame(&p, latent_rgb) {
                let _ = events.send(Event::Progress {
                    job,
                    step: p.step,
                    total: p.total,
                    elapsed: p.elapsed,
                    preview: Arc::new(preview),
                });
                repaint();
            }
            if cancel.load(Ordering::SeqCst) == job || shutting_down.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let result = pipeline.generate_task(&request, &task, &mut on_step);
        let image = match result {
            Ok(image) => Arc::new(image),
            Err(easel_engine::Error::Cancelled) => return self.emit(Event::JobCancelled { job }),
            Err(e) => return self.emit(Event::JobFailed { job, error: e.to_string() }),
        };
        let name = pipeline.info().name.clone();
        let mut params = request.to_params(Some(&name), self.model_hash.get());
        task.write_params(&mut params);
        let parameters = params.to_infotext();
        let saved =
            save_dir.map(|dir| save_numbered(&dir, &image, &parameters, request.seed).map_err(|e| e.to_string()));
        let seconds = started.elapsed().as_secs_f64();
        // Applying the job's LoRAs again is free (the same list): only its report is wanted.
        let warnings = match pipeline.apply_loras(&request.loras) {
            Ok(report) => report
                .unmatched
                .iter()
                .map(|(name, keys)| {
                    format!("{} of LoRA {name}'s modules match no layer of this model and were not applied", keys.len())
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        self.emit(Event::JobFinished { job, image, request, parameters, saved, seconds, warnings });
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The x0 estimate as plain host data for the preview: the UI never sees tensors.
fn latent_frame(progress: &StepProgress, (factors, bias): LatentRgb) -> easel_engine::Result<LatentFrame> {
    let LatentPlanes { channels, height, width, data } = latent_planes(progress.denoised)?;
    Ok(LatentFrame { channels, width, height, data, factors, bias })
}

/// Saves as `NNNNN-<seed>.png` in `dir` with the next free number, never overwriting; the
/// file is written to a temporary name and renamed into place.
pub fn save_numbered(dir: &Path, image: &RgbImage, parameters: &str, seed: u64) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the outputs folder {}", dir.display()))?;
    let mut next = next_image_number(dir);
    loop {
        let path = dir.join(format!("{next:05}-{seed}.png"));
        match write_png(&path, image, &[(easel_engine::metadata::PARAMETERS_KEYWORD, parameters)], false) {
            Ok(()) => return Ok(path),
            Err(easel_engine::Error::FileExists { .. }) => next += 1,
            Err(e) => return Err(e).with_context(|| format!("cannot save into {}", dir.display())),
        }
    }
}

fn next_image_number(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u64>().ok()
        })
        .max()
        .map(|n| n + 1)
        .unwrap_or(0)
}

/// Where model hashes are cached, shared by the window and the CLI.
pub fn hash_cache_path() -> PathBuf {
    dirs::data_dir().unwrap_or_else(|| PathBuf::from(".")).join("easel").join("model-hashes.json")
}

/// AUTOMATIC1111's short hash for single-file checkpoints (a folder has no single file to hash).
/// A failure only leaves the hash out of the metadata.
pub fn model_hash(model: &Path) -> Option<String> {
    if !model.is_file() {
        return None;
    }
    easel_engine::models::hash::HashCache::open(hash_cache_path()).a1111_hash(model).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_engine::rng::RngKind;
    use easel_engine::schedulers::{SamplerId, Schedule};

    fn tiny_model() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/engine/tests/fixtures/models/sd1-tiny")
    }

    fn request() -> GenerationRequest {
        GenerationRequest {
            prompt: "a fox".into(),
            negative_prompt: String::new(),
            steps: 2,
            guidance_scale: 7.0,
            seed: 1,
            width: 64,
            height: 64,
            sampler: SamplerId::Euler,
            schedule: Schedule::Default,
            rng: RngKind::Cpu,
            emphasis: Default::default(),
            clip_skip: 1,
            loras: Vec::new(),
            embeddings: Vec::new(),
        }
    }

    /// The first event that `wanted` picks, skipping others (progress and the like).
    fn wait_for<T>(worker: &Worker, mut wanted: impl FnMut(Event) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            for event in worker.drain() {
                if let Some(found) = wanted(event) {
                    return found;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the awaited event never came");
    }

    #[test]
    fn a_panic_inside_a_command_fails_that_job_and_the_next_job_runs() {
        let worker = Worker::spawn(Arc::new(|| {}));
        worker.send(Command::LoadModel { path: tiny_model(), vae: None, cpu_bf16: false });
        wait_for(&worker, |e| match e {
            Event::ModelLoaded { .. } => Some(()),
            Event::ModelFailed { error, .. } => panic!("{error}"),
            _ => None,
        });
        worker.send(Command::Panic { job: 7 });
        let error = wait_for(&worker, |e| match e {
            Event::JobFailed { job: 7, error } => Some(error),
            _ => None,
        });
        assert!(error.contains("internal error in generation (job 7)"), "{error}");
        assert!(error.contains("a bug inside a command") && error.contains("report"), "{error}");
        assert!(worker.is_alive());

        // The model survived the panic: the next job runs on it.
        worker.send(Command::Generate {
            job: 8,
            request: Box::new(request()),
            task: Task::TextToImage,
            save_dir: None,
        });
        let image = wait_for(&worker, |e| match e {
            Event::JobFinished { job: 8, image, .. } => Some(image),
            Event::JobFailed { job: 8, error } => panic!("{error}"),
            _ => None,
        });
        assert_eq!((image.width, image.height), (64, 64));
    }

    #[test]
    fn a_dead_worker_thread_is_replaced() {
        let mut worker = Worker::spawn(Arc::new(|| {}));
        assert!(!worker.restart_if_dead(), "a live worker is left alone");
        worker.send(Command::KillThread);
        let deadline = Instant::now() + Duration::from_secs(10);
        while worker.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!worker.is_alive());
        assert!(worker.restart_if_dead());
        assert!(worker.is_alive());
        // The new thread takes commands (no model yet: it says so).
        worker.send(Command::Generate {
            job: 3,
            request: Box::new(request()),
            task: Task::TextToImage,
            save_dir: None,
        });
        let error = wait_for(&worker, |e| match e {
            Event::JobFailed { job: 3, error } => Some(error),
            _ => None,
        });
        assert!(error.contains("no model is loaded"), "{error}");
    }
}
