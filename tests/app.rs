//! The real app driven through egui_kittest with a tiny random model: generate, cancel, queue,
//! refuse a bad size, restore settings from a dropped PNG, survive a broken model.

#[path = "../crates/engine/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use easel::app::settings::Settings;
use easel::app::{CentralView, EaselApp, ModelState, NoticeKind};
use easel_engine::metadata::{read_png_parameters, write_png, RgbImage};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};
use eframe::egui::accesskit::Role;
use eframe::egui::{self, Key, Modifiers};
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;

fn settings(outputs: &Path) -> Settings {
    Settings {
        model_path: Some(common::model_dir("sd1-tiny")),
        outputs_dir: Some(outputs.to_path_buf()),
        width: 64,
        height: 64,
        steps: 3,
        seed: 5,
        random_seed: false,
        ..Default::default()
    }
}

fn harness(settings: Settings) -> Harness<'static, EaselApp> {
    Harness::builder()
        .with_size([1200.0, 800.0])
        .build_eframe(move |cc| EaselApp::with_settings(&cc.egui_ctx, settings, false))
}

/// The app as it starts where Easel Mini is missing (an installation without its assets).
fn harness_without_default_model(settings: Settings) -> Harness<'static, EaselApp> {
    Harness::builder()
        .with_size([1200.0, 800.0])
        .build_eframe(move |cc| EaselApp::with_default_model(&cc.egui_ctx, settings, false, None))
}

/// Steps frames (the UI keeps repainting while busy, so `run()` would never settle).
fn step_until(h: &mut Harness<'static, EaselApp>, what: &str, done: impl Fn(&EaselApp) -> bool) {
    let start = Instant::now();
    while !done(h.state()) {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}; notices: {:?}",
            h.state().notices
        );
    }
    h.step();
}

fn model_ready(app: &EaselApp) -> bool {
    matches!(app.model, ModelState::Ready(_))
}

fn errors(app: &EaselApp) -> Vec<String> {
    app.notices.iter().filter(|n| n.kind == NoticeKind::Error).map(|n| n.text.clone()).collect()
}

fn png_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn typing_a_prompt_and_generating_saves_the_image_with_its_parameters() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h = harness(settings(outputs.path()));
    step_until(&mut h, "the model to load", model_ready);

    let prompt = h.get_all_by_role(Role::MultilineTextInput).next().expect("prompt field");
    prompt.click();
    h.step();
    h.get_all_by_role(Role::MultilineTextInput).next().unwrap().type_text("a lighthouse at dusk");
    h.step();
    assert_eq!(h.state().settings.prompt, "a lighthouse at dusk");

    h.get_by_label("Generate").click();
    h.step();
    assert!(h.state().running.is_some(), "the job started on the worker");
    step_until(&mut h, "the image", |app| !app.gallery.is_empty());

    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    assert!(app.running.is_none());
    assert!(matches!(app.view, CentralView::Gallery(0)));
    let files = png_files(outputs.path());
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].file_name().unwrap(), "00000-5.png");
    assert_eq!(app.gallery[0].path.as_deref(), Some(files[0].as_path()));
    let parameters = read_png_parameters(&files[0]).unwrap().unwrap();
    assert!(parameters.starts_with("a lighthouse at dusk\nSteps: 3, Sampler: Euler"), "{parameters}");
    assert!(parameters.contains("Seed: 5, Size: 64x64"), "{parameters}");
}

#[test]
fn ctrl_enter_generates_and_a_second_image_never_overwrites_the_first() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h = harness(Settings { prompt: "a fox".into(), steps: 1, ..settings(outputs.path()) });
    step_until(&mut h, "the model to load", model_ready);
    for expected in 1..=2 {
        h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
        h.step();
        step_until(&mut h, "the image", |app| app.gallery.len() == expected);
    }
    let names: Vec<String> =
        png_files(outputs.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["00000-5.png", "00001-5.png"]);
}

#[test]
fn cancel_stops_the_run_and_the_ui_is_idle_again() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h =
        harness(Settings { prompt: "slow".into(), steps: 1000, width: 128, height: 128, ..settings(outputs.path()) });
    step_until(&mut h, "the model to load", model_ready);
    h.get_by_label("Generate").click();
    step_until(&mut h, "the first step", |app| app.running.as_ref().is_some_and(|r| r.step >= 1));
    assert!(matches!(h.state().view, CentralView::Preview(_)), "the live preview is shown while running");
    h.get_by_label("Cancel").click();
    step_until(&mut h, "the cancel", |app| app.running.is_none());
    let app = h.state();
    assert!(app.gallery.is_empty());
    assert!(png_files(outputs.path()).is_empty(), "nothing saved for a cancelled job");
    assert!(app.notices.iter().any(|n| n.text.contains("Cancelled")));
    assert!(h.query_by_label("Cancel").is_none(), "no Cancel button once idle");
}

#[test]
fn jobs_queue_up_and_can_be_removed() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h =
        harness(Settings { prompt: "queue".into(), steps: 2, batch_count: 3, seed: 10, ..settings(outputs.path()) });
    step_until(&mut h, "the model to load", model_ready);
    h.get_by_label("Generate").click();
    h.step();
    assert_eq!(h.state().queue.len(), 2, "one runs, two wait");
    let second = h.state().queue[0].job;
    h.state_mut().remove_queued(second);
    step_until(&mut h, "the queue to drain", |app| !app.is_busy());
    let seeds: Vec<u64> = h.state().gallery.iter().map(|g| g.request.as_ref().unwrap().seed).collect();
    assert_eq!(seeds, [10, 12], "the removed job (seed 11) never ran");
}

#[test]
fn an_invalid_size_is_refused_with_a_message() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h = harness(Settings { prompt: "x".into(), width: 100, ..settings(outputs.path()) });
    step_until(&mut h, "the model to load", model_ready);
    h.get_by_label("Generate").click();
    h.step();
    let app = h.state();
    assert!(app.running.is_none() && app.queue.is_empty());
    assert!(errors(app).iter().any(|e| e.contains("width must be a multiple of 8")), "{:?}", errors(app));
}

#[derive(Debug)]
struct TestDrop(PathBuf);

impl egui::DroppedFile for TestDrop {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn dropping_an_a1111_png_restores_its_settings() {
    let (outputs, downloads) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let png = downloads.path().join("from-a1111.png");
    let image = RgbImage { width: 8, height: 8, data: vec![128; 8 * 8 * 3] };
    let text = "a castle on a hill\nNegative prompt: fog\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 987654, Size: 512x768, Model: v1-5, Version: v1.10.1";
    write_png(&png, &image, &[("parameters", text)], false).unwrap();

    let mut h = harness(settings(outputs.path()));
    h.input_mut().dropped_files.push(Arc::new(TestDrop(png)));
    h.step();
    h.step();
    let s = &h.state().settings;
    assert_eq!(s.prompt, "a castle on a hill");
    assert_eq!(s.negative_prompt, "fog");
    assert_eq!((s.steps, s.seed, s.width, s.height), (30, 987654, 512, 768));
    assert_eq!(s.guidance, 6.5);
    assert_eq!((s.sampler, s.schedule), (SamplerId::DpmPp2m, Schedule::Karras));
    assert!(!s.random_seed, "a restored seed is kept");
    assert_eq!(s.rng, RngKind::Nv, "A1111 without an RNG key used the GPU generator");
    assert_eq!(h.state().gallery.len(), 1, "the dropped image is shown");
}

#[test]
fn a_broken_model_is_reported_and_the_app_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    common::copy_dir(&common::model_dir("sd1-tiny"), &broken);
    let vae = broken.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    std::fs::write(&vae, &bytes[..bytes.len() - 100]).unwrap();

    let mut h = harness(Settings { model_path: Some(broken), ..settings(dir.path()) });
    step_until(&mut h, "the load to fail", |app| matches!(app.model, ModelState::Failed { .. }));
    let errs = errors(h.state());
    assert!(errs.iter().any(|e| e.contains("truncated")), "{errs:?}");
    assert!(h.query_by_label("Open a model folder…").is_some(), "the first-run panel offers another model");

    h.state_mut().load_model(common::model_dir("sd1-tiny"));
    step_until(&mut h, "the good model", model_ready);
}

#[test]
fn without_a_model_the_first_run_panel_explains_what_to_do() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h = harness_without_default_model(Settings { model_path: None, ..settings(outputs.path()) });
    h.step();
    assert!(h.query_by_label("Open a model folder…").is_some());
    assert!(h.query_by_label_contains("easel models download sd-turbo").is_some());
    h.state_mut().generate();
    assert!(errors(h.state()).iter().any(|e| e.contains("Open a model first")));
}

#[test]
fn the_models_panel_lists_the_hf_cache_and_reports_offline_downloads() {
    let outputs = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    common::copy_dir(&common::model_dir("sd1-tiny"), &cache.path().join("models--easel--sd1-tiny/snapshots/abc"));
    let mut h = harness_without_default_model(Settings { model_path: None, ..settings(outputs.path()) });
    // Nothing listens on port 9: the "hub" is offline.
    h.state_mut().downloader = easel_engine::hub::Downloader::new("http://127.0.0.1:9", cache.path(), None);
    h.state_mut().refresh_local_models();
    h.step();
    assert_eq!(h.state().local_models.len(), 1);
    // Low in the side panel (below the fold where the CPU adds the bf16 switch): scrolled to.
    h.get_by_label("Load").scroll_to_me();
    h.run_steps(3);
    h.get_by_label("Load").click();
    step_until(&mut h, "the cached model to load", model_ready);

    // The Models panel sits low in the side panel: scrolled to first, as an artist would.
    h.get_all_by_label("Download").next().expect("a Download button").scroll_to_me();
    h.run_steps(3);
    h.get_all_by_label("Download").next().expect("a Download button").click();
    step_until(&mut h, "the download to fail", |app| app.downloads.values().any(|d| !d.running));
    let errs = errors(h.state());
    assert!(errs.iter().any(|e| e.contains("offline")), "{errs:?}");
}

#[test]
fn choosing_a_vae_reloads_the_model_with_it() {
    let outputs = tempfile::tempdir().unwrap();
    let mut h = harness(settings(outputs.path()));
    step_until(&mut h, "the model to load", model_ready);
    // A LoRA is no VAE: the load fails with a message, and the model's own VAE works again.
    h.state_mut().set_vae(Some(common::fixtures().join("bad/lora.safetensors")));
    step_until(&mut h, "the load to fail", |app| matches!(app.model, ModelState::Failed { .. }));
    assert!(errors(h.state()).iter().any(|e| e.contains("not a VAE")), "{:?}", errors(h.state()));
    h.state_mut().set_vae(None);
    step_until(&mut h, "the model to load again", model_ready);
    assert_eq!(h.state().settings.vae_path, None);
}

#[test]
fn the_bf16_switch_reloads_the_model_and_gives_a_close_image() {
    if !easel_engine::kernels::bf16_supported() {
        eprintln!("skipped: this CPU has no AVX-512 BF16 (the switch is hidden there)");
        return;
    }
    let outputs = tempfile::tempdir().unwrap();
    let mut h = harness(Settings { prompt: "a fox".into(), ..settings(outputs.path()) });
    step_until(&mut h, "the model to load", model_ready);
    h.get_by_label("Generate").click();
    h.step();
    step_until(&mut h, "the f32 image", |app| app.gallery.len() == 1);

    h.get_by_label("Fast bf16 mode").click();
    h.step();
    assert!(h.state().settings.cpu_bf16);
    step_until(&mut h, "the model to reload", model_ready);
    h.get_by_label("Generate").click();
    h.step();
    step_until(&mut h, "the bf16 image", |app| app.gallery.len() == 2);

    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    // Newest first or last, either way the two images are the same seed in both modes.
    let image = |i: usize| app.gallery[i].image.as_ref().unwrap().data.clone();
    let (a, b) = (&image(0), &image(1));
    assert_ne!(a, b, "bf16 mode produced the f32 image bit for bit");
    let psnr = common::psnr(a, b);
    assert!(psnr >= 40.0, "bf16 vs f32 PSNR {psnr} dB");
}

#[test]
fn the_gallery_shows_earlier_images_after_a_restart_and_reuses_their_parameters() {
    let outputs = tempfile::tempdir().unwrap();
    // A first run of the app makes two images...
    {
        let mut h = harness(settings(outputs.path()));
        step_until(&mut h, "the model to load", model_ready);
        h.state_mut().settings.prompt = "a red fox".into();
        h.state_mut().settings.batch_count = 2;
        h.state_mut().generate();
        step_until(&mut h, "two images", |app| app.gallery.len() == 2);
    }
    let saved = png_files(outputs.path());
    assert_eq!(saved.len(), 2);

    // ...and the next run, with other settings, lists them newest first and loads them lazily.
    let restarted = Settings { prompt: "something else".into(), steps: 9, seed: 77, ..settings(outputs.path()) };
    let mut h = harness(restarted);
    assert_eq!(h.state().gallery.len(), 2);
    assert_eq!(h.state().gallery[1].path.as_deref(), Some(saved[1].as_path()), "the newest is last (shown first)");
    step_until(&mut h, "the thumbnails", |app| app.gallery.iter().all(|g| g.thumbnail.is_some()));
    assert!(h.state().gallery.iter().all(|g| g.parameters.starts_with("a red fox")), "parameters come with them");

    h.state_mut().view = CentralView::Gallery(0);
    step_until(&mut h, "the full image", |app| app.gallery[0].image.is_some());
    assert_eq!(h.state().gallery[0].image.as_ref().map(|i| (i.width, i.height)), Some((64, 64)));
    h.get_by_label("Reuse parameters").click();
    h.step();
    h.step();
    let s = &h.state().settings;
    assert_eq!((s.prompt.as_str(), s.steps, s.seed), ("a red fox", 3, 5), "the first image's own settings");
}

#[test]
fn with_no_model_chosen_the_app_paints_with_easel_mini() {
    let outputs = tempfile::tempdir().unwrap();
    let first_run = Settings { outputs_dir: Some(outputs.path().to_path_buf()), ..Default::default() };
    let mut h = harness(first_run);
    step_until(&mut h, "Easel Mini to load", model_ready);
    assert!(h.state().is_easel_mini());
    assert_eq!(h.state().settings.model_path, None, "not remembered as the artist's choice");
    assert_eq!((h.state().settings.width, h.state().settings.height), (128, 128), "its native size");
    assert!(h.query_by_label_contains("Easel Mini is loaded").is_some());
    assert!(h.query_by_label_contains("SD-Turbo").is_some(), "the real models are offered beside it");
    // One click on an example paints it.
    h.get_by_label("the sun over the sea at sunset").click();
    step_until(&mut h, "the image", |app| !app.gallery.is_empty());
    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    let saved = png_files(outputs.path());
    assert_eq!(saved.len(), 1);
    let parameters = read_png_parameters(&saved[0]).unwrap().unwrap();
    assert!(parameters.starts_with("the sun over the sea at sunset"), "{parameters}");
    assert!(parameters.contains("Model: easel-mini"), "{parameters}");
}

fn mse(a: &RgbImage, b: &RgbImage) -> f64 {
    a.data.iter().zip(&b.data).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.data.len() as f64
}

/// Image to image in the window: a gallery image becomes the init image, a low strength keeps
/// it (far closer than a fresh picture of the same prompt), and the PNG records the strength.
#[test]
fn a_gallery_image_used_as_init_image_is_kept_at_low_strength() {
    let outputs = tempfile::tempdir().unwrap();
    let first = Settings {
        outputs_dir: Some(outputs.path().to_path_buf()),
        prompt: "the sun over the sea at sunset".into(),
        steps: 15,
        seed: 5,
        random_seed: false,
        sampler: SamplerId::DpmPp2m,
        ..Default::default()
    };
    let mut h = harness(first);
    step_until(&mut h, "Easel Mini to load", model_ready);
    h.state_mut().generate();
    step_until(&mut h, "the first image", |app| app.gallery.len() == 1 && app.running.is_none());
    let init = h.state().gallery[0].image.clone().expect("this session's image");

    // A fresh picture of another prompt, then the same prompt from the first picture.
    h.state_mut().settings.prompt = "a house with a tree at night".into();
    h.state_mut().generate();
    step_until(&mut h, "the text-to-image picture", |app| app.gallery.len() == 2 && app.running.is_none());
    let fresh = h.state().gallery[1].image.clone().unwrap();

    h.state_mut().view = CentralView::Gallery(0);
    h.run_steps(2);
    h.get_by_label("Use as init image").click();
    h.run_steps(2);
    assert!(h.state().init_image.is_some(), "the gallery image is the init image");
    assert!(h.query_by_label_contains("Image to image (on)").is_some(), "the side panel says so");
    h.state_mut().settings.strength = 0.3;
    h.state_mut().generate();
    step_until(&mut h, "the image-to-image picture", |app| app.gallery.len() == 3 && app.running.is_none());
    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    let repainted = app.gallery[2].image.clone().unwrap();
    let (kept, changed) = (mse(&repainted, &init), mse(&fresh, &init));
    assert!(kept * 4.0 < changed, "strength 0.3 keeps the init image: MSE {kept:.0} vs a fresh picture's {changed:.0}");
    assert!(kept > 0.0, "and repaints some of it");
    let newest = png_files(outputs.path()).pop().unwrap();
    let parameters = read_png_parameters(&newest).unwrap().unwrap();
    assert!(parameters.contains("Denoising strength: 0.3"), "{parameters}");

    // Cleared: the next job starts from noise again.
    h.state_mut().clear_init_image();
    assert!(h.state().init_image.is_none());
}

/// Inpainting in the window: an init image opened, a band painted across it with the brush,
/// generated: the pixels outside the painted band (and its blur) are the init image's, those
/// inside are repainted, and the PNG records the mask blur and strength. Then undo empties the
/// mask and the next job is image to image again.
#[test]
fn a_painted_mask_repaints_only_what_is_painted() {
    let outputs = tempfile::tempdir().unwrap();
    let settings = Settings {
        outputs_dir: Some(outputs.path().to_path_buf()),
        prompt: "a red apple on a table".into(),
        steps: 8,
        seed: 3,
        random_seed: false,
        ..Default::default()
    };
    let mut h = harness(settings);
    step_until(&mut h, "Easel Mini to load", model_ready);
    h.state_mut().settings.width = 128;
    h.state_mut().settings.height = 128;
    h.state_mut().settings.strength = 1.0;
    h.state_mut().settings.brush_size = 24.0;
    // A picture of the request's size: a gradient.
    let data = (0..128u32).flat_map(|y| (0..128u32).flat_map(move |x| [(x * 2) as u8, (y * 2) as u8, 160])).collect();
    let picture = RgbImage { width: 128, height: 128, data };
    let init_path = outputs.path().join("init.png");
    easel_engine::metadata::write_png(&init_path, &picture, &[], false).unwrap();
    h.state_mut().open_init_image(&init_path);
    h.run_steps(2);
    assert!(matches!(h.state().view, CentralView::Canvas), "the canvas opens with the init image");

    // Paint a band across the middle: press, move in steps, release.
    let rect = h.get_by_label("Mask painter").rect();
    let at = |fx: f32, fy: f32| egui::pos2(rect.min.x + fx * rect.width(), rect.min.y + fy * rect.height());
    h.hover_at(at(0.1, 0.5));
    h.run_steps(1);
    h.drag_at(at(0.1, 0.5));
    h.run_steps(1);
    for i in 1..=8 {
        h.hover_at(at(0.1 + 0.1 * i as f32, 0.5));
        h.run_steps(1);
    }
    h.drop_at(at(0.9, 0.5));
    h.run_steps(2);
    let mask = h.state().init_image.as_ref().unwrap().mask.mask().clone();
    let painted = mask.repainted_pixels();
    assert!(painted > 128 * 16 && painted < 128 * 40, "a band about 24 px high is painted: {painted} pixels");
    assert_eq!(mask.data[10 * 128 + 64], 0, "above the band nothing is painted");

    h.state_mut().generate();
    step_until(&mut h, "the inpainted picture", |app| app.gallery.len() == 1 && app.running.is_none());
    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    let out = app.gallery[0].image.clone().unwrap();
    assert_eq!((out.width, out.height), (128, 128));
    let soft = mask.blurred(app.settings.mask_blur).unwrap();
    let (mut kept, mut inside, mut changed) = (0, 0, 0);
    for (i, &m) in soft.data.iter().enumerate() {
        let d = (0..3).map(|c| (out.data[i * 3 + c] as i32 - picture.data[i * 3 + c] as i32).abs()).max().unwrap();
        if m == 0 {
            assert_eq!(d, 0, "pixel {i} is outside the mask and must be the init image's");
            kept += 1;
        } else if m >= 250 {
            inside += 1;
            changed += (d > 12) as usize;
        }
    }
    assert!(kept > 128 * 60, "most of the picture is kept: {kept}");
    assert!(changed * 2 > inside, "the painted band is repainted: {changed} of {inside} pixels changed");
    let newest = png_files(outputs.path()).into_iter().rfind(|p| p != &init_path).unwrap();
    let parameters = read_png_parameters(&newest).unwrap().unwrap();
    for words in ["Mask blur: 4", "Denoising strength: 1"] {
        assert!(parameters.contains(words), "{words}: {parameters}");
    }

    // Undo takes the stroke back: the mask is empty, so the job would be image to image.
    h.state_mut().view = CentralView::Canvas;
    h.run_steps(1);
    h.get_by_label("Undo").click();
    h.run_steps(2);
    assert!(h.state().init_image.as_ref().unwrap().mask.is_empty());
}

/// The prompt's token counter shows its 75-token chunks, as A1111's does ("145/150").
#[test]
fn the_token_counter_counts_chunks() {
    let long = (0..30).map(|i| format!("a red fox number {i}")).collect::<Vec<_>>().join(", ");
    let settings = Settings { prompt: "a red fox".into(), ..Default::default() };
    let mut h = harness_without_default_model(settings);
    h.run_steps(2);
    assert!(h.query_by_label("3/75").is_some(), "a short prompt: one chunk");
    h.state_mut().settings.prompt = long;
    h.run_steps(2);
    let (count, chunks) = h.state_mut().token_count(0).unwrap();
    assert!(chunks >= 2 && count > 75, "{count} tokens in {chunks} chunks");
    let label = format!("{count}/{}", chunks * 75);
    assert!(h.query_by_label(&label).is_some(), "the counter shows {label}");
}

/// LoRAs in the window: the LoRA folder's files are listed with their kind, "Add" puts the tag
/// into the prompt, the job applies it and the PNG names it; without the tag the next picture
/// is the base model's again, bit for bit, with no reload.
#[test]
fn a_lora_from_the_folder_changes_the_picture_and_goes_away_again() {
    let outputs = tempfile::tempdir().unwrap();
    let lora_dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/engine/tests/fixtures");
    for file in ["sd1-tiny-kohya.safetensors", "sdxl-tiny-peft.safetensors"] {
        std::fs::copy(fixtures.join("lora").join(file), lora_dir.path().join(file)).unwrap();
    }
    std::fs::write(lora_dir.path().join("broken.safetensors"), b"nope").unwrap();
    let settings = Settings {
        model_path: Some(fixtures.join("models/sd1-tiny")),
        outputs_dir: Some(outputs.path().to_path_buf()),
        lora_dir: Some(lora_dir.path().to_path_buf()),
        prompt: "a red fox in the snow".into(),
        steps: 4,
        seed: 9,
        random_seed: false,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let mut h = harness(settings);
    step_until(&mut h, "sd1-tiny to load", model_ready);
    h.state_mut().settings.width = 64;
    h.state_mut().settings.height = 64;
    let kinds: Vec<_> = h.state().lora_files.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(kinds.len(), 3);
    assert!(kinds.iter().any(|k| k.as_ref().is_ok_and(|k| k == "LoRA, SD 1.x / 2.x")), "{kinds:?}");
    assert!(kinds.iter().any(|k| k.as_ref().is_ok_and(|k| k.contains("SDXL"))), "{kinds:?}");
    assert!(kinds.iter().any(|k| k.is_err()), "the broken file is marked: {kinds:?}");

    h.state_mut().generate();
    step_until(&mut h, "the base picture", |app| app.gallery.len() == 1 && app.running.is_none());
    let base = h.state().gallery[0].image.clone().unwrap();

    let kohya = h.state().lora_files.iter().find(|(p, _)| p.ends_with("sd1-tiny-kohya.safetensors")).unwrap().0.clone();
    h.state_mut().insert_lora(&kohya, 1.0);
    assert!(h.state().settings.prompt.ends_with("<lora:sd1-tiny-kohya:1>"), "{}", h.state().settings.prompt);
    h.state_mut().generate();
    step_until(&mut h, "the LoRA picture", |app| app.gallery.len() == 2 && app.running.is_none());
    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    let with_lora = app.gallery[1].image.clone().unwrap();
    assert!(mse(&with_lora, &base) > 1.0, "the LoRA changes the picture");
    let newest = png_files(outputs.path()).pop().unwrap();
    let parameters = read_png_parameters(&newest).unwrap().unwrap();
    assert!(
        parameters.contains("<lora:sd1-tiny-kohya:1>") && parameters.contains("Lora hashes: \"sd1-tiny-kohya: "),
        "{parameters}"
    );

    h.state_mut().settings.prompt = "a red fox in the snow".into();
    h.state_mut().generate();
    step_until(&mut h, "the base picture again", |app| app.gallery.len() == 3 && app.running.is_none());
    assert_eq!(h.state().gallery[2].image.clone().unwrap().data, base.data, "the base model exactly");

    // An unknown tag is a message, and no job.
    h.state_mut().settings.prompt = "a fox <lora:nowhere:1>".into();
    h.state_mut().generate();
    assert!(errors(h.state()).iter().any(|e| e.contains("nowhere.safetensors")), "{:?}", errors(h.state()));
    assert!(h.state().queue.is_empty() && h.state().running.is_none());
}

/// The hires fix and outpainting in the window: the pictures come out at the larger sizes and
/// their PNGs say how they were made.
#[test]
fn hires_fix_and_outpainting_make_larger_pictures() {
    let outputs = tempfile::tempdir().unwrap();
    let settings = Settings {
        outputs_dir: Some(outputs.path().to_path_buf()),
        prompt: "a house with a tree".into(),
        steps: 4,
        seed: 2,
        random_seed: false,
        hires_enabled: true,
        hires_scale: 2.0,
        hires_denoise: 0.5,
        ..Default::default()
    };
    let mut h = harness(settings);
    step_until(&mut h, "Easel Mini to load", model_ready);
    h.state_mut().settings.width = 64;
    h.state_mut().settings.height = 64;
    h.run_steps(2);
    assert!(h.query_by_label_contains("Hires fix (on)").is_some());
    h.state_mut().generate();
    step_until(&mut h, "the hires picture", |app| app.gallery.len() == 1 && app.running.is_none());
    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    let big = app.gallery[0].image.clone().unwrap();
    assert_eq!((big.width, big.height), (128, 128));
    let parameters = read_png_parameters(&png_files(outputs.path()).pop().unwrap()).unwrap().unwrap();
    assert!(parameters.contains("Hires upscale: 2") && parameters.contains("Size: 64x64"), "{parameters}");

    // Outpainting: the picture extended by 64 pixels on the right, the border painted.
    h.state_mut().set_init_image(Arc::new((*big).clone()), "hires");
    h.state_mut().settings.width = 128;
    h.state_mut().settings.height = 128;
    h.state_mut().init_image.as_mut().unwrap().outpaint.right = 64;
    h.state_mut().generate();
    step_until(&mut h, "the outpainted picture", |app| app.gallery.len() == 2 && app.running.is_none());
    let app = h.state();
    assert!(errors(app).is_empty(), "{:?}", errors(app));
    let wide = app.gallery[1].image.clone().unwrap();
    assert_eq!((wide.width, wide.height), (192, 128));
    // The original part far from the seam is kept (the mask blur overlays it exactly).
    let at = |img: &RgbImage, x: u32, y: u32| img.data[((y * img.width + x) * 3) as usize];
    assert_eq!(at(&wide, 10, 10), at(&big, 10, 10));
    let parameters = read_png_parameters(&png_files(outputs.path()).pop().unwrap()).unwrap().unwrap();
    assert!(parameters.contains("Outpaint") || parameters.contains("Mask blur"), "{parameters}");
}
