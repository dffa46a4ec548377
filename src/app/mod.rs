//! The window: egui panels and their state. Inference runs on the [`Worker`]; this module only
//! sends it commands and drains its events once per frame.

pub mod gallery;
pub mod import;
pub mod mask;
pub mod preview;
pub mod settings;
mod ui;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use easel_engine::metadata::{read_png, read_png_text, RgbImage};
use easel_engine::models::clip::EOS_TOKEN_ID;
use easel_engine::pipeline::fit::fit_image;
use easel_engine::pipeline::inpaint::{Inpaint, InpaintArea, Mask, Outpaint};
use easel_engine::pipeline::text::ClipTokenizer;
use easel_engine::pipeline::{GenerationRequest, HiresFix, ImageToImage, Task};
use easel_engine::rng::random_seed;
use eframe::egui;

use crate::worker::{Command, Event, JobId, ModelSummary, Worker};
pub use gallery::{GalleryImage, Loading};
use import::{import_settings, ImportedSettings};
use preview::LatentFrame;
use settings::Settings;

/// Opens the window and runs until it is closed.
pub fn run() -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Easel")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([720.0, 480.0]),
        ..Default::default()
    };
    eframe::run_native("Easel", options, Box::new(|cc| Ok(Box::new(EaselApp::new(cc)))))
        .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

#[derive(Debug, Clone)]
pub enum ModelState {
    None,
    Loading(PathBuf),
    Ready(ModelSummary),
    Failed { path: PathBuf, error: String },
}

#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub job: JobId,
    pub request: GenerationRequest,
    /// Text to image, image to image or inpainting (the picture fitted to the request's
    /// size), or a hires fix.
    pub task: Task,
}

/// The picture image to image starts from (runtime state: it is not persisted).
pub struct InitImage {
    pub image: Arc<RgbImage>,
    /// Where it came from, for the side panel ("00042-7.png", "gallery image").
    pub name: String,
    pub texture: Option<egui::TextureHandle>,
    /// What to repaint, at the picture's own size; empty means image to image.
    pub mask: mask::MaskCanvas,
    /// Outpainting: how far the canvas is extended on each side.
    pub outpaint: Outpaint,
}

#[derive(Debug, Clone)]
pub struct RunningJob {
    pub job: JobId,
    pub request: GenerationRequest,
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
    pub cancelling: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Info,
    Error,
}

#[derive(Debug, Clone)]
pub struct Notice {
    pub kind: NoticeKind,
    pub text: String,
}

/// What the central view shows.
#[derive(Clone)]
pub enum CentralView {
    Empty,
    Preview(Arc<LatentFrame>),
    Gallery(usize),
    /// The init image with the mask painter.
    Canvas,
}

/// A download the app started, as the Models panel shows it.
#[derive(Debug, Clone, Default)]
pub struct DownloadState {
    pub progress: Option<easel_engine::hub::DownloadProgress>,
    pub running: bool,
    pub error: Option<String>,
}

pub struct EaselApp {
    pub settings: Settings,
    /// Where downloads go and where downloaded models are found (the shared HF cache).
    pub downloader: easel_engine::hub::Downloader,
    pub downloads: std::collections::BTreeMap<String, DownloadState>,
    pub local_models: Vec<easel_engine::models::library::LocalModel>,
    /// Snapshot folders of the curated models already in the cache, by repository.
    pub curated_local: std::collections::HashMap<&'static str, PathBuf>,
    pub model: ModelState,
    pub queue: VecDeque<QueuedJob>,
    pub running: Option<RunningJob>,
    pub gallery: Vec<GalleryImage>,
    pub view: CentralView,
    pub notices: Vec<Notice>,
    pub last_seed: Option<u64>,
    /// Set: jobs start from this picture instead of noise.
    pub init_image: Option<InitImage>,
    /// The LoRA folder's files and what each is (the LoRAs panel).
    pub lora_files: Vec<(PathBuf, Result<String, String>)>,
    /// The embeddings folder's usable files (the Embeddings panel).
    pub embedding_files: Vec<PathBuf>,
    /// The weight the LoRAs panel's Add writes.
    pub lora_weight: f64,
    worker: Worker,
    image_loader: gallery::ImageLoader,
    /// Steps, guidance and size a model change may replace (see `adopt_model_defaults`).
    previous_defaults: (usize, f64, usize),
    next_job: JobId,
    tokenizer: Option<ClipTokenizer>,
    token_counts: [(String, easel_engine::pipeline::prompt::Emphasis, usize, usize); 2],
    /// The wgpu preview renderer is installed (absent under glow and in headless tests).
    gpu_preview: bool,
    preview_texture: Option<(usize, egui::TextureHandle)>,
    preview_generation: usize,
}

impl EaselApp {
    pub fn new(cc: &eframe::CreationContext<'_>) -> Self {
        let stored = cc.storage.and_then(|s| s.get_string(settings::STORAGE_KEY));
        let settings = Settings::from_stored(stored.as_deref());
        let gpu_preview = match cc.wgpu_render_state.as_ref() {
            Some(render_state) => {
                preview::LatentPreviewRenderer::install(render_state);
                true
            }
            None => false,
        };
        Self::with_settings(&cc.egui_ctx, settings, gpu_preview)
    }

    /// Builds the app around `settings` (tests use this to start from a known state); with no
    /// model chosen, Easel Mini is loaded.
    pub fn with_settings(ctx: &egui::Context, settings: Settings, gpu_preview: bool) -> Self {
        Self::with_default_model(ctx, settings, gpu_preview, easel_engine::models::library::easel_mini())
    }

    /// As [`Self::with_settings`], with `default_model` loaded when the settings name no model.
    pub fn with_default_model(
        ctx: &egui::Context,
        settings: Settings,
        gpu_preview: bool,
        default_model: Option<PathBuf>,
    ) -> Self {
        let repaint_ctx = ctx.clone();
        let repaint: Arc<dyn Fn() + Send + Sync> = Arc::new(move || repaint_ctx.request_repaint());
        let worker = Worker::spawn(repaint.clone());
        let mut app = Self {
            settings,
            downloader: easel_engine::hub::Downloader::from_env(),
            downloads: Default::default(),
            local_models: Vec::new(),
            curated_local: Default::default(),
            model: ModelState::None,
            queue: VecDeque::new(),
            running: None,
            gallery: Vec::new(),
            view: CentralView::Empty,
            notices: Vec::new(),
            last_seed: None,
            init_image: None,
            lora_files: Vec::new(),
            embedding_files: Vec::new(),
            lora_weight: 1.0,
            worker,
            image_loader: gallery::ImageLoader::spawn(repaint),
            previous_defaults: {
                let d = Settings::default();
                (d.steps, d.guidance, d.width)
            },
            next_job: 1,
            tokenizer: ClipTokenizer::bundled(EOS_TOKEN_ID).ok(),
            token_counts: Default::default(),
            gpu_preview,
            preview_texture: None,
            preview_generation: 0,
        };
        match (app.settings.model_path.clone(), default_model) {
            (Some(path), _) => app.load_model(path),
            // Not remembered as the artist's choice: a later Easel may ship another default.
            (None, Some(mini)) => app.send_load(mini),
            (None, None) => {}
        }
        app.refresh_local_models();
        app.refresh_loras();
        app.refresh_embeddings();
        app.gallery = gallery::history(&app.settings.outputs_dir()).into_iter().map(GalleryImage::on_disk).collect();
        app
    }

    /// Asks for the strip's thumbnail (or, with `full`, the whole image) of gallery entry
    /// `index` if it is a file not loaded yet; it arrives through `handle_events`.
    pub fn request_image(&mut self, index: usize, full: bool) {
        let Some(item) = self.gallery.get_mut(index) else { return };
        let Some(path) = &item.path else { return };
        let needed = if full { item.texture.is_none() } else { item.strip_texture().is_none() };
        let busy =
            matches!(item.loading, Loading::Full | Loading::Failed(_)) || (!full && item.loading == Loading::Thumbnail);
        if needed && !busy {
            self.image_loader.request(path, full);
            item.loading = if full { Loading::Full } else { Loading::Thumbnail };
        }
    }

    fn handle_loaded_images(&mut self, ctx: &egui::Context) {
        for loaded in self.image_loader.drain() {
            let Some(item) = self.gallery.iter_mut().find(|g| g.path.as_ref() == Some(&loaded.path)) else { continue };
            match loaded.result {
                Ok((image, parameters)) => {
                    let name = format!("{}-{}", loaded.path.display(), loaded.full);
                    let texture = ctx.load_texture(name, color_image(&image), egui::TextureOptions::LINEAR);
                    if loaded.full {
                        item.image = Some(Arc::new(image));
                        item.texture = Some(texture);
                    } else {
                        item.thumbnail = Some(texture);
                    }
                    item.parameters = parameters;
                    item.loading = Loading::Idle;
                }
                Err(error) => item.loading = Loading::Failed(error),
            }
        }
    }

    /// Rescans the HF cache and the models folder (reads headers and configs only).
    pub fn refresh_local_models(&mut self) {
        use easel_engine::models::library::{scan_hf_cache, scan_models_folder};
        let mut models = scan_hf_cache(self.downloader.cache_dir());
        if let Some(dir) = &self.settings.models_dir {
            models.extend(scan_models_folder(dir));
        }
        self.local_models = models;
        self.curated_local = easel_engine::hub::CURATED
            .iter()
            .filter_map(|m| self.downloader.find_local(m.repo, m.revision).map(|path| (m.repo, path)))
            .collect();
    }

    pub fn start_download(&mut self, repo: &str) {
        self.downloads.insert(repo.to_string(), DownloadState { running: true, ..Default::default() });
        self.worker.start_download(self.downloader.clone(), repo.to_string());
    }

    pub fn cancel_download(&mut self, repo: &str) {
        self.worker.cancel_download(repo);
    }

    pub fn load_model(&mut self, path: PathBuf) {
        self.settings.model_path = Some(path.clone());
        self.send_load(path);
    }

    fn send_load(&mut self, path: PathBuf) {
        self.model = ModelState::Loading(path.clone());
        self.worker.send(Command::LoadModel {
            path,
            vae: self.settings.vae_path.clone(),
            cpu_bf16: self.settings.cpu_bf16,
        });
    }

    /// Uses another VAE (or the model's own with `None`), reloading the model.
    pub fn set_vae(&mut self, vae: Option<PathBuf>) {
        self.settings.vae_path = vae;
        if let Some(path) = self.settings.model_path.clone() {
            self.load_model(path);
        }
    }

    /// Switches the CPU bf16 mode and reloads the model in it.
    pub fn set_cpu_bf16(&mut self, on: bool) {
        self.settings.cpu_bf16 = on;
        if let Some(path) = self.settings.model_path.clone() {
            self.load_model(path);
        }
    }

    /// A newly loaded model's steps, guidance and size replace those the artist had not
    /// changed from the previous model's defaults (or from Easel's, for the first model):
    /// Turbo wants 1 step and no guidance, Easel Mini 128×128.
    fn adopt_model_defaults(&mut self, model: &ModelSummary) {
        let s = &mut self.settings;
        let (steps, guidance, size) = self.previous_defaults;
        if s.steps == steps {
            s.steps = model.default_steps;
        }
        if s.guidance == guidance {
            s.guidance = model.default_guidance;
        }
        if (s.width, s.height) == (size, size) {
            (s.width, s.height) = (model.default_size, model.default_size);
        }
        self.previous_defaults = (model.default_steps, model.default_guidance, model.default_size);
    }

    /// Whether the loaded model is Easel Mini, the one that ships with Easel.
    pub fn is_easel_mini(&self) -> bool {
        matches!(&self.model, ModelState::Ready(m) if m.name == easel_engine::models::library::EASEL_MINI)
    }

    pub fn is_busy(&self) -> bool {
        self.running.is_some() || !self.queue.is_empty()
    }

    fn notify(&mut self, kind: NoticeKind, text: impl Into<String>) {
        self.notices.push(Notice { kind, text: text.into() });
        // Keep the list short: the newest messages matter.
        if self.notices.len() > 4 {
            self.notices.remove(0);
        }
    }

    /// A prompt's tokens and its 75-token chunks as A1111 counts them ("92/150"), recounted
    /// only when the text or the emphasis changes.
    pub fn token_count(&mut self, which: usize) -> Option<(usize, usize)> {
        let text = if which == 0 { &self.settings.prompt } else { &self.settings.negative_prompt };
        let emphasis = self.settings.emphasis;
        let cached = &self.token_counts[which];
        if cached.0 != *text || cached.1 != emphasis {
            let tokenizer = self.tokenizer.as_ref()?;
            let words = easel_engine::models::lora::extract_lora_tags(text).0;
            let (chunks, count) = easel_engine::pipeline::prompt::chunk_prompt(tokenizer, &words, emphasis).ok()?;
            self.token_counts[which] = (text.clone(), emphasis, count, chunks.len());
        }
        let (_, _, count, chunks) = self.token_counts[which];
        Some((count, chunks))
    }

    /// The prompt's `<lora:NAME:…>` tags as files of the LoRA folder.
    fn prompt_loras(&self) -> Result<Vec<easel_engine::models::lora::LoraWeight>, String> {
        use easel_engine::models::lora::{extract_lora_tags, find_in_dir, LoraWeight};
        let tags = extract_lora_tags(&self.settings.prompt).1;
        let mut loras = Vec::with_capacity(tags.len());
        for (name, text_weight, unet_weight) in tags {
            let Some(dir) = &self.settings.lora_dir else {
                return Err(format!("The prompt asks for <lora:{name}>: choose the LoRA folder first (LoRAs panel)."));
            };
            let Some(path) = find_in_dir(dir, &name) else {
                return Err(format!(
                    "The prompt asks for <lora:{name}>, but the LoRA folder has no {name}.safetensors."
                ));
            };
            loras.push(LoraWeight { path, text_weight, unet_weight });
        }
        Ok(loras)
    }

    /// The LoRA folder's files with the family their names point to, read again.
    pub fn refresh_loras(&mut self) {
        let dir = self.settings.lora_dir.clone();
        self.lora_files = dir
            .map(|dir| {
                easel_engine::models::lora::list_dir(&dir)
                    .into_iter()
                    .map(|path| {
                        let kind = easel_engine::models::lora::describe_file(&path);
                        (path, kind)
                    })
                    .collect()
            })
            .unwrap_or_default();
    }

    /// The embeddings folder's `.safetensors` files, read again (pickles are never listed).
    pub fn refresh_embeddings(&mut self) {
        self.embedding_files = self
            .settings
            .embeddings_dir
            .as_deref()
            .map(|dir| easel_engine::pipeline::embeddings::embedding_files(dir).0)
            .unwrap_or_default();
    }

    /// Adds an embedding's name to the prompt or the negative prompt.
    pub fn insert_embedding(&mut self, path: &Path, negative: bool) {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let text = if negative { &mut self.settings.negative_prompt } else { &mut self.settings.prompt };
        if !text.is_empty() && !text.ends_with([' ', ',']) {
            text.push_str(", ");
        }
        text.push_str(&name);
    }

    /// Adds `<lora:NAME:WEIGHT>` to the prompt (A1111's way: the tag is part of the prompt).
    pub fn insert_lora(&mut self, path: &Path, weight: f64) {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let prompt = &mut self.settings.prompt;
        if !prompt.is_empty() && !prompt.ends_with(' ') {
            prompt.push(' ');
        }
        prompt.push_str(&format!("<lora:{name}:{weight}>"));
    }

    /// Builds the request from the current settings, refusing bad values with a message.
    pub fn build_request(&self, seed: u64) -> Result<GenerationRequest, String> {
        let request = GenerationRequest {
            prompt: self.settings.prompt.clone(),
            negative_prompt: self.settings.negative_prompt.clone(),
            steps: self.settings.steps,
            guidance_scale: self.settings.guidance,
            seed,
            width: self.settings.width,
            height: self.settings.height,
            sampler: self.settings.sampler,
            schedule: self.settings.schedule,
            rng: self.settings.rng,
            emphasis: self.settings.emphasis,
            clip_skip: self.settings.clip_skip,
            loras: self.prompt_loras()?,
            embeddings: self.embedding_files.clone(),
        };
        let multiple = match &self.model {
            ModelState::Ready(m) => m.size_multiple,
            _ => 8,
        };
        request.validate_for(multiple).map_err(|e| match e {
            easel_engine::Error::InvalidSetting(message) => message,
            other => other.to_string(),
        })?;
        Ok(request)
    }

    /// What a job of `request` does: text to image (with the hires fix when it is on), or from
    /// the init image: image to image, or inpainting where a mask is painted or the canvas
    /// extended (the request then grows to the extended size).
    fn task_for(&self, request: &mut GenerationRequest) -> Result<Task, String> {
        let message = |e: easel_engine::Error| e.to_string();
        let inpainting_model = matches!(&self.model, ModelState::Ready(m) if m.inpainting);
        let Some(init) = &self.init_image else {
            if inpainting_model {
                return Err("This is an inpainting model: open an init image and paint a mask first.".into());
            }
            if !self.settings.hires_enabled {
                return Ok(Task::TextToImage);
            }
            let s = &self.settings;
            let hires = HiresFix {
                scale: s.hires_scale,
                steps: s.hires_steps,
                denoise: s.hires_denoise,
                upscaler: s.hires_upscaler,
            };
            let second = hires.second_pass(request).map_err(message)?;
            second.validate_for(8).map_err(message)?;
            easel_engine::pipeline::first_step(hires.denoise, second.steps).map_err(message)?;
            return Ok(Task::HiresFix(hires));
        };
        let (w, h) = (request.width as u32, request.height as u32);
        let mode = self.settings.resize_mode;
        let image = fit_image(&init.image, w, h, mode).map_err(message)?;
        let painted = !init.mask.is_empty();
        let mask = if painted {
            let m = init.mask.mask();
            let grey =
                RgbImage { width: m.width, height: m.height, data: m.data.iter().flat_map(|&v| [v, v, v]).collect() };
            Some(Mask::from_rgb(&fit_image(&grey, w, h, mode).map_err(message)?))
        } else {
            None
        };
        let (image, mask) = if init.outpaint.is_none() {
            (image, mask)
        } else {
            let (big, border) = init.outpaint.extend(&image).map_err(message)?;
            let mask = match mask {
                Some(inner) => {
                    let inner = init.outpaint.extend_mask(&inner);
                    Mask { data: inner.data.iter().zip(&border.data).map(|(&a, &b)| a.max(b)).collect(), ..border }
                }
                None => border,
            };
            request.width = big.width as usize;
            request.height = big.height as usize;
            request.validate_for(8).map_err(|e| format!("The extended canvas: {}", message(e)))?;
            (big, Some(mask))
        };
        let strength = self.settings.strength;
        match mask {
            Some(mask) => {
                let area = if self.settings.inpaint_only_masked {
                    InpaintArea::Masked { padding: self.settings.inpaint_padding }
                } else {
                    InpaintArea::Whole
                };
                let inpaint = Inpaint { image, mask, strength, mask_blur: self.settings.mask_blur, area };
                inpaint.validate(request).map_err(message)?;
                Ok(Task::Inpaint(inpaint))
            }
            None if inpainting_model => Err("This is an inpainting model: paint a mask over the init image.".into()),
            None => {
                let init = ImageToImage { image, strength };
                init.validate(request).map_err(message)?;
                Ok(Task::ImageToImage(init))
            }
        }
    }

    /// Makes `image` the init image: the next jobs start from it.
    pub fn set_init_image(&mut self, image: Arc<RgbImage>, name: impl Into<String>) {
        let mask = mask::MaskCanvas::new(image.width, image.height);
        self.init_image =
            Some(InitImage { image, name: name.into(), texture: None, mask, outpaint: Outpaint::default() });
        self.view = CentralView::Canvas;
    }

    pub fn clear_init_image(&mut self) {
        self.init_image = None;
        if matches!(self.view, CentralView::Canvas) {
            self.view = CentralView::Empty;
        }
    }

    /// Reads a PNG as the init image, saying what is wrong with a file that is not one.
    pub fn open_init_image(&mut self, path: &Path) {
        match read_png(path) {
            Ok(image) => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                self.set_init_image(Arc::new(image), name);
            }
            Err(e) => self.notify(NoticeKind::Error, format!("Cannot use it as the init image: {e}")),
        }
    }

    /// A gallery image as the init image (loaded from disk first when it is not yet).
    pub fn use_as_init_image(&mut self, index: usize) {
        let Some(item) = self.gallery.get(index) else { return };
        let name = item.path.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        match (&item.image, &item.path) {
            (Some(image), _) => {
                let image = image.clone();
                self.set_init_image(image, name.unwrap_or_else(|| "gallery image".into()));
            }
            (None, Some(path)) => {
                let path = path.clone();
                self.open_init_image(&path);
            }
            (None, None) => {}
        }
    }

    /// Queues `batch_count` jobs (seed, seed+1, … like AUTOMATIC1111, or fresh random seeds).
    pub fn generate(&mut self) {
        if !matches!(self.model, ModelState::Ready(_)) {
            self.notify(
                NoticeKind::Error,
                "Open a model first (Open model folder… or Open checkpoint… at the top of the side panel).",
            );
            return;
        }
        if self.settings.prompt.trim().is_empty() {
            // Painted all the same (an unconditional picture, as A1111 and the CLI do), but the
            // placeholder in the empty box is not the prompt, and the artist should know that.
            self.notify(NoticeKind::Info, "The prompt is empty: this picture follows no text.");
        }
        let base_seed = if self.settings.random_seed { random_seed() } else { self.settings.seed };
        for i in 0..self.settings.batch_count.max(1) {
            let seed =
                if self.settings.random_seed && i > 0 { random_seed() } else { base_seed.wrapping_add(i as u64) };
            match self.build_request(seed) {
                Ok(mut request) => {
                    if let Some(init) = self.init_image.as_ref().filter(|_| i == 0) {
                        let (w, h) = (init.image.width as usize, init.image.height as usize);
                        if (w, h) != (request.width, request.height) {
                            let mode = self.settings.resize_mode.label();
                            let size = (request.width, request.height);
                            self.notify(
                                NoticeKind::Info,
                                format!("The init image is {w}×{h}: fitted to {}×{} ({mode}).", size.0, size.1),
                            );
                        }
                    }
                    let task = match self.task_for(&mut request) {
                        Ok(task) => task,
                        Err(message) => {
                            self.notify(NoticeKind::Error, message);
                            return;
                        }
                    };
                    let job = self.next_job;
                    self.next_job += 1;
                    self.queue.push_back(QueuedJob { job, request, task });
                }
                Err(message) => {
                    self.notify(NoticeKind::Error, message);
                    return;
                }
            }
        }
        self.last_seed = Some(base_seed);
        self.pump_queue();
    }

    pub fn cancel_running(&mut self) {
        if let Some(running) = &mut self.running {
            running.cancelling = true;
            self.worker.cancel(running.job);
        }
    }

    pub fn remove_queued(&mut self, job: JobId) {
        self.queue.retain(|q| q.job != job);
    }

    fn pump_queue(&mut self) {
        if self.running.is_some() || !matches!(self.model, ModelState::Ready(_)) {
            return;
        }
        let Some(next) = self.queue.pop_front() else { return };
        let save_dir = self.settings.autosave.then(|| self.settings.outputs_dir());
        self.worker.send(Command::Generate {
            job: next.job,
            request: Box::new(next.request.clone()),
            task: next.task,
            save_dir,
        });
        let total = next.request.steps;
        self.running = Some(RunningJob {
            job: next.job,
            request: next.request,
            step: 0,
            total,
            elapsed: Duration::ZERO,
            cancelling: false,
        });
    }

    /// Applies the worker's events; called once per frame.
    pub fn handle_events(&mut self, ctx: &egui::Context) {
        if self.worker.restart_if_dead() {
            self.worker_restarted();
        }
        self.handle_loaded_images(ctx);
        for event in self.worker.drain() {
            match event {
                Event::ModelLoading { .. } => {}
                Event::ModelLoaded { model, seconds } => {
                    self.adopt_model_defaults(&model);
                    self.notify(
                        NoticeKind::Info,
                        format!("Loaded {} ({}) in {seconds:.1} s.", model.name, model.family),
                    );
                    self.model = ModelState::Ready(model);
                }
                Event::ModelFailed { path, error } => {
                    self.notify(
                        NoticeKind::Error,
                        format!("Could not load the model: {error}. Choose another model folder."),
                    );
                    self.model = ModelState::Failed { path, error };
                }
                Event::JobStarted { .. } => {}
                Event::Progress { job, step, total, elapsed, preview } => {
                    if let Some(running) = self.running.as_mut().filter(|r| r.job == job) {
                        running.step = step;
                        running.total = total;
                        running.elapsed = elapsed;
                        self.preview_generation += 1;
                        self.view = CentralView::Preview(preview);
                    }
                }
                Event::JobFinished { job, image, request, parameters, saved, seconds, warnings } => {
                    self.finish_job(job);
                    for warning in warnings {
                        self.notify(NoticeKind::Info, warning);
                    }
                    let path = match saved {
                        Some(Ok(path)) => Some(path),
                        Some(Err(error)) => {
                            self.notify(
                                NoticeKind::Error,
                                format!(
                                    "The image was not saved: {error}. Choose another outputs folder, or use Save as…"
                                ),
                            );
                            None
                        }
                        None => None,
                    };
                    let texture =
                        ctx.load_texture(format!("image-{job}"), color_image(&image), egui::TextureOptions::LINEAR);
                    self.gallery.push(GalleryImage::in_memory(image, texture, parameters, Some(request), path));
                    self.view = CentralView::Gallery(self.gallery.len() - 1);
                    self.notify(NoticeKind::Info, format!("Finished in {seconds:.1} s."));
                }
                Event::JobFailed { job, error } => {
                    self.finish_job(job);
                    self.notify(NoticeKind::Error, format!("Generation failed: {error}"));
                }
                Event::DownloadProgress { repo, progress } => {
                    self.downloads.entry(repo).or_default().progress = Some(progress);
                }
                Event::DownloadFinished { repo, path } => {
                    self.downloads.remove(&repo);
                    self.notify(NoticeKind::Info, format!("Downloaded {repo}."));
                    self.refresh_local_models();
                    if !matches!(self.model, ModelState::Ready(_) | ModelState::Loading(_)) {
                        self.load_model(path);
                    }
                }
                Event::DownloadFailed { repo, error } => {
                    let state = self.downloads.entry(repo.clone()).or_default();
                    state.running = false;
                    state.error = Some(error.clone());
                    self.notify(NoticeKind::Error, format!("Download of {repo} stopped: {error}"));
                }
                Event::JobCancelled { job } => {
                    self.finish_job(job);
                    self.notify(NoticeKind::Info, "Cancelled.");
                    if matches!(self.view, CentralView::Preview(_)) {
                        self.view = if self.gallery.is_empty() {
                            CentralView::Empty
                        } else {
                            CentralView::Gallery(self.gallery.len() - 1)
                        };
                    }
                }
            }
        }
        self.pump_queue();
    }

    /// The worker thread ended (a bug the per-command recovery did not catch) and a new one
    /// took its place: the running job is lost, the model is loaded again, the queue waits.
    fn worker_restarted(&mut self) {
        let lost = self.running.take().map(|r| format!(" Job {} was lost.", r.job)).unwrap_or_default();
        self.notify(
            NoticeKind::Error,
            format!("The engine stopped unexpectedly and was restarted.{lost} Please report this as a bug."),
        );
        if let ModelState::Ready(ModelSummary { path, .. }) | ModelState::Loading(path) = self.model.clone() {
            self.send_load(path);
        }
    }

    fn finish_job(&mut self, job: JobId) {
        if self.running.as_ref().is_some_and(|r| r.job == job) {
            self.running = None;
        }
    }

    /// Restores settings read from an image (the parts it had).
    pub fn apply_imported(&mut self, imported: &ImportedSettings) {
        let s = &mut self.settings;
        if let Some(v) = &imported.prompt {
            s.prompt = v.clone();
        }
        if let Some(v) = &imported.negative_prompt {
            s.negative_prompt = v.clone();
        }
        if let Some(v) = imported.steps {
            s.steps = v;
        }
        if let Some(v) = imported.guidance {
            s.guidance = v;
        }
        if let Some(v) = imported.seed {
            s.seed = v;
            s.random_seed = false;
        }
        if let Some(v) = imported.width {
            s.width = v;
        }
        if let Some(v) = imported.height {
            s.height = v;
        }
        if let Some((sampler, schedule)) = imported.sampler {
            s.sampler = sampler;
            s.schedule = schedule;
        }
        if let Some(v) = imported.rng {
            s.rng = v;
        }
        if let Some(v) = imported.strength {
            s.strength = v;
        }
        if let Some(v) = imported.mask_blur {
            s.mask_blur = v;
        }
        if let Some((only, padding)) = imported.only_masked {
            s.inpaint_only_masked = only;
            s.inpaint_padding = padding;
        }
        if let Some(v) = imported.clip_skip {
            s.clip_skip = v;
        }
        if let Some(v) = imported.emphasis {
            s.emphasis = v;
        }
        match &imported.hires {
            Some(Some(hires)) => {
                s.hires_enabled = true;
                s.hires_scale = hires.scale;
                s.hires_steps = hires.steps;
                s.hires_denoise = hires.denoise;
                s.hires_upscaler = hires.upscaler;
            }
            Some(None) => s.hires_enabled = false,
            None => {}
        }
    }

    /// Reuses the parameters of a gallery image: the request that made it, or for an image
    /// from disk the `parameters` text it carries.
    pub fn reuse(&mut self, index: usize) {
        let Some(item) = self.gallery.get(index) else { return };
        let Some(request) = item.request.clone() else {
            let chunks = [(easel_engine::metadata::PARAMETERS_KEYWORD.to_string(), item.parameters.clone())];
            match import_settings(&chunks) {
                Some(imported) => self.apply_imported(&imported),
                None => self.notify(NoticeKind::Info, "This image carries no generation settings."),
            }
            return;
        };
        let imported = ImportedSettings {
            source: "Easel",
            prompt: Some(request.prompt),
            negative_prompt: Some(request.negative_prompt),
            steps: Some(request.steps),
            guidance: Some(request.guidance_scale),
            seed: Some(request.seed),
            width: Some(request.width),
            height: Some(request.height),
            sampler: Some((request.sampler, request.schedule)),
            rng: Some(request.rng),
            ..Default::default()
        };
        // Strength, mask and hires settings are in the parameters the job wrote.
        let chunks = [(easel_engine::metadata::PARAMETERS_KEYWORD.to_string(), item.parameters.clone())];
        let written = import_settings(&chunks).unwrap_or_default();
        let imported = ImportedSettings {
            strength: written.strength,
            mask_blur: written.mask_blur,
            only_masked: written.only_masked,
            hires: written.hires,
            clip_skip: Some(request.clip_skip),
            emphasis: Some(request.emphasis),
            ..imported
        };
        self.apply_imported(&imported);
    }

    /// Shows a dropped PNG and restores its settings when it carries any.
    pub fn open_image(&mut self, ctx: &egui::Context, path: &Path) {
        let image = match read_png(path) {
            Ok(image) => Arc::new(image),
            Err(e) => return self.notify(NoticeKind::Error, format!("Could not open {}: {e}", path.display())),
        };
        let chunks = read_png_text(path).unwrap_or_default();
        let imported = import_settings(&chunks);
        let parameters = chunks.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).unwrap_or_default();
        let texture =
            ctx.load_texture(format!("dropped-{}", path.display()), color_image(&image), egui::TextureOptions::LINEAR);
        self.gallery.push(GalleryImage::in_memory(image, texture, parameters, None, Some(path.to_path_buf())));
        self.view = CentralView::Gallery(self.gallery.len() - 1);
        match imported {
            Some(settings) => {
                self.apply_imported(&settings);
                self.notify(NoticeKind::Info, format!("Restored the settings of this {} image.", settings.source));
            }
            None => self.notify(NoticeKind::Info, "This image carries no generation settings."),
        }
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        for path in dropped {
            let is_checkpoint = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
            if path.is_dir() || is_checkpoint {
                self.load_model(path);
            } else {
                self.open_image(ctx, &path);
            }
        }
    }
}

impl eframe::App for EaselApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.handle_events(&ctx);
        self.handle_dropped_files(&ctx);
        ui::draw(self, ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        storage.set_string(settings::STORAGE_KEY, self.settings.to_stored());
    }
}

pub fn color_image(image: &RgbImage) -> egui::ColorImage {
    egui::ColorImage::from_rgb([image.width as usize, image.height as usize], &image.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_until(app: &mut EaselApp, ctx: &egui::Context, mut done: impl FnMut(&EaselApp) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !done(app) {
            assert!(std::time::Instant::now() < deadline, "timed out; notices: {:?}", app.notices);
            app.handle_events(ctx);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_loaded_model_brings_its_defaults_where_the_artist_changed_nothing() {
        let ctx = egui::Context::default();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/engine/tests/fixtures/models/sd1-tiny");
        // Easel's defaults (512×512): the tiny model's native 64×64 replaces them...
        let mut app = EaselApp::with_default_model(&ctx, Settings::default(), false, Some(model.clone()));
        run_until(&mut app, &ctx, |a| matches!(a.model, ModelState::Ready(_)));
        assert_eq!((app.settings.width, app.settings.height), (64, 64));
        assert_eq!(app.settings.model_path, None, "the default model is not remembered as a choice");
        // ...but a size the artist chose stays.
        let chosen = Settings { width: 96, height: 64, steps: 12, ..Default::default() };
        let mut app = EaselApp::with_default_model(&ctx, chosen, false, Some(model));
        run_until(&mut app, &ctx, |a| matches!(a.model, ModelState::Ready(_)));
        assert_eq!((app.settings.width, app.settings.height, app.settings.steps), (96, 64, 12));
    }

    /// The tiny test model, 2 steps at 64×64, saving into `outputs`.
    fn tiny_model_settings(outputs: &Path, prompt: &str) -> Settings {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/engine/tests/fixtures/models/sd1-tiny");
        Settings {
            model_path: Some(model),
            outputs_dir: Some(outputs.to_path_buf()),
            prompt: prompt.into(),
            steps: 2,
            width: 64,
            height: 64,
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_prompt_paints_and_says_so() {
        let ctx = egui::Context::default();
        let outputs = tempfile::tempdir().unwrap();
        let mut app = EaselApp::with_settings(&ctx, tiny_model_settings(outputs.path(), "  "), false);
        run_until(&mut app, &ctx, |a| matches!(a.model, ModelState::Ready(_)));
        app.generate();
        assert!(app.notices.iter().any(|n| n.text.contains("prompt is empty")), "{:?}", app.notices);
        run_until(&mut app, &ctx, |a| !a.gallery.is_empty());
    }

    #[test]
    fn a_dead_worker_is_restarted_the_model_reloaded_and_the_next_job_runs() {
        let ctx = egui::Context::default();
        let outputs = tempfile::tempdir().unwrap();
        let mut app = EaselApp::with_settings(&ctx, tiny_model_settings(outputs.path(), "a fox"), false);
        run_until(&mut app, &ctx, |a| matches!(a.model, ModelState::Ready(_)));

        app.worker.send(Command::KillThread);
        run_until(&mut app, &ctx, |a| a.notices.iter().any(|n| n.text.contains("stopped unexpectedly")));
        assert!(matches!(app.model, ModelState::Loading(_)), "the model is loaded again");
        run_until(&mut app, &ctx, |a| matches!(a.model, ModelState::Ready(_)));

        app.generate();
        run_until(&mut app, &ctx, |a| !a.gallery.is_empty());
        assert!(app.gallery[0].path.as_ref().is_some_and(|p| p.is_file()), "saved after the restart");
    }
}
