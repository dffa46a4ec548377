//! Frame time of the mask painter at 1024² (issue: painting must stay at 60 fps on a laptop
//! CPU). Drives the real window (`EaselApp` in egui_kittest, no model loaded) with a brush
//! stroke across a 1024×1024 init image, one pointer move per frame, and times each frame's
//! CPU work: input, painting, layout, tessellation and the texture delta. The GPU upload of the
//! delta is not included (a brush dab's rectangle is a few KB).
//!
//!   cargo bench --bench mask_painting
//!
//! Prints the median and 95th-percentile frame time of idle frames, painting frames, and
//! frames that replace the whole mask (Invert each frame: what painting would cost if every
//! frame uploaded the full 4 MB tint), as ratios in one run.

use std::time::Instant;

use easel::app::settings::Settings;
use easel::app::EaselApp;
use easel_engine::metadata::RgbImage;
use eframe::egui;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;

const SIDE: u32 = 1024;
const FRAMES: usize = 240;

fn percentile(times: &mut [f64], p: f64) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[((times.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, times: &mut [f64]) -> f64 {
    let (median, p95) = (percentile(times, 0.5), percentile(times, 0.95));
    println!(
        "{what:<26} median {:6.2} ms   p95 {:6.2} ms   ({:5.0} fps at the median)",
        median * 1e3,
        p95 * 1e3,
        1.0 / median
    );
    median
}

fn main() {
    let settings = Settings { brush_size: 64.0, ..Default::default() };
    let mut h: Harness<'static, EaselApp> = Harness::builder()
        .with_size([1400.0, 1100.0])
        .build_eframe(move |cc| EaselApp::with_default_model(&cc.egui_ctx, settings, false, None));
    let data = (0..SIDE).flat_map(|y| (0..SIDE).flat_map(move |x| [(x / 4) as u8, (y / 4) as u8, 128])).collect();
    h.state_mut().set_init_image(std::sync::Arc::new(RgbImage { width: SIDE, height: SIDE, data }), "bench");
    h.run_steps(3);
    let rect = h.get_by_label("Mask painter").rect();
    let at = |t: f32| {
        // A zig-zag over the whole picture, so the stroke keeps painting new pixels.
        let x = rect.min.x + rect.width() * (0.05 + 0.9 * (t * 7.0).fract());
        let y = rect.min.y + rect.height() * (0.05 + 0.9 * t);
        egui::pos2(x, y)
    };
    let timed = |h: &mut Harness<'static, EaselApp>| {
        let start = Instant::now();
        h.step();
        start.elapsed().as_secs_f64()
    };

    let mut idle: Vec<f64> = (0..FRAMES).map(|_| timed(&mut h)).collect();
    h.hover_at(at(0.0));
    h.step();
    h.drag_at(at(0.0));
    h.step();
    let mut painting = Vec::with_capacity(FRAMES);
    for i in 0..FRAMES {
        h.hover_at(at(i as f32 / FRAMES as f32));
        painting.push(timed(&mut h));
    }
    h.drop_at(at(1.0));
    h.step();
    let painted = h.state().init_image.as_ref().map(|i| i.mask.mask().repainted_pixels()).unwrap_or(0);
    let mut full = Vec::with_capacity(FRAMES / 4);
    for _ in 0..FRAMES / 4 {
        if let Some(init) = h.state_mut().init_image.as_mut() {
            init.mask.invert();
        }
        full.push(timed(&mut h));
    }

    println!("mask painter, {SIDE}×{SIDE} init image, brush 64 px, {FRAMES} frames each ({painted} pixels painted)");
    let idle = report("idle frame", &mut idle);
    let paint = report("painting frame", &mut painting);
    let whole = report("whole-mask upload frame", &mut full);
    println!("painting / idle {:.2}×, whole-mask / painting {:.2}×", paint / idle, whole / paint);
}
