//! The live-preview shader against the engine's CPU reference, rendered offscreen.
//!
//! Needs a wgpu adapter; without a GPU, Mesa's lavapipe (mesa-vulkan-drivers) or llvmpipe
//! serve. With none the GPU tests fail, unless `EASEL_SKIP_GPU_TESTS=1`.

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use easel::app::preview::{self, LatentFrame, LatentPreviewRenderer};
use easel_engine::models::Family;
use easel_engine::pipeline::preview::latent_to_rgb;
use eframe::egui;
use eframe::egui_wgpu;
use eframe::wgpu;

const FAMILIES: [Family; 3] = [Family::Sd1, Family::Sd2, Family::Sdxl];

/// Deterministic values in [-3, 3]: wide enough that the clamp to [0, 1] is exercised.
fn random_latents(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
        })
        .collect()
}

fn frame(family: Family, width: usize, height: usize, seed: u64) -> LatentFrame {
    let (factors, bias) = family.latent_rgb_factors();
    LatentFrame { channels: 4, width, height, data: random_latents(4 * width * height, seed), factors, bias }
}

fn engine_rgb(frame: &LatentFrame, family: Family) -> Vec<u8> {
    let shape = (1, frame.channels, frame.height, frame.width);
    let latents = Tensor::from_vec(frame.data.clone(), shape, &Device::Cpu).unwrap();
    let image = latent_to_rgb(&latents, family).unwrap();
    assert_eq!((image.width, image.height), (frame.width as u32, frame.height as u32));
    image.data
}

/// Compares RGBA8 from the GPU with RGB8 expectations, ±1 per channel for rounding.
fn assert_close(rgba: &[u8], rgb: &[u8], what: &str) {
    assert_eq!(rgba.len() / 4, rgb.len() / 3, "{what}: pixel count");
    for (i, (got, want)) in rgba.chunks(4).zip(rgb.chunks(3)).enumerate() {
        let close = got[..3].iter().zip(want).all(|(&g, &w)| g.abs_diff(w) <= 1);
        assert!(close, "{what}: pixel {i}: GPU {:?}, CPU {want:?}", &got[..3]);
        assert_eq!(got[3], 255, "{what}: pixel {i} is not opaque");
    }
}

/// One device for the whole test binary; None only when skipping is allowed.
fn gpu() -> Option<&'static (wgpu::Device, wgpu::Queue)> {
    static GPU: OnceLock<Option<(wgpu::Device, wgpu::Queue)>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&Default::default())).ok()?;
        eprintln!("preview shader tests on {:?}", adapter.get_info());
        let descriptor = wgpu::DeviceDescriptor {
            required_limits: wgpu::Limits::downlevel_defaults().using_resolution(adapter.limits()),
            ..Default::default()
        };
        pollster::block_on(adapter.request_device(&descriptor)).ok()
    });
    if gpu.is_none() {
        assert!(
            std::env::var("EASEL_SKIP_GPU_TESTS").as_deref() == Ok("1"),
            "no wgpu adapter/device found: install a Vulkan or GL driver (without a GPU, Mesa's \
             lavapipe: `apt-get install mesa-vulkan-drivers libvulkan1`) or set \
             EASEL_SKIP_GPU_TESTS=1 to skip the GPU preview tests"
        );
        eprintln!("EASEL_SKIP_GPU_TESTS=1: skipping a GPU preview test");
    }
    gpu.as_ref()
}

/// Bilinear resampling of `frame` to `width × height` with the shader's conventions (texel
/// centres at half-integers, clamp to edge), so `cpu_rgb` of the result is the expected image.
fn resample(frame: &LatentFrame, width: usize, height: usize) -> LatentFrame {
    let (w, h) = (frame.width, frame.height);
    let at = |c: usize, x: isize, y: isize| {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        frame.data[c * w * h + y * w + x]
    };
    let mut data = Vec::with_capacity(4 * width * height);
    for c in 0..4 {
        for oy in 0..height {
            let py = (oy as f32 + 0.5) / height as f32 * h as f32 - 0.5;
            let (y0, fy) = (py.floor(), py - py.floor());
            for ox in 0..width {
                let px = (ox as f32 + 0.5) / width as f32 * w as f32 - 0.5;
                let (x0, fx) = (px.floor(), px - px.floor());
                let (x0, y0) = (x0 as isize, y0 as isize);
                let top = at(c, x0, y0) * (1.0 - fx) + at(c, x0 + 1, y0) * fx;
                let bottom = at(c, x0, y0 + 1) * (1.0 - fx) + at(c, x0 + 1, y0 + 1) * fx;
                data.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    LatentFrame { width, height, data, ..frame.clone() }
}

#[test]
fn cpu_fallback_equals_engine_reference() {
    for (seed, family) in FAMILIES.into_iter().enumerate() {
        let frame = frame(family, 16, 12, seed as u64);
        assert_eq!(frame.cpu_rgb(), engine_rgb(&frame, family), "{family}");
    }
}

#[test]
fn shader_matches_engine_reference_at_latent_resolution() {
    let Some((device, queue)) = gpu() else { return };
    for (seed, family) in FAMILIES.into_iter().enumerate() {
        // Non-square, so a transposed texture or swapped axis shows.
        let frame = frame(family, 16, 12, 100 + seed as u64);
        let expected = engine_rgb(&frame, family);
        // The values reach both ends of the clamp.
        assert!(expected.contains(&0) && expected.contains(&255));
        let rgba = LatentPreviewRenderer::render_offscreen(device, queue, &frame, 16, 12);
        assert_close(&rgba, &expected, &format!("{family}"));
    }
}

#[test]
fn srgb_target_stores_the_reference_values() {
    let Some((device, queue)) = gpu() else { return };
    for family in [Family::Sd1, Family::Sdxl] {
        let frame = frame(family, 16, 12, 7);
        let format = wgpu::TextureFormat::Rgba8UnormSrgb;
        let rgba = LatentPreviewRenderer::render_offscreen_as(device, queue, &frame, 16, 12, format);
        assert_close(&rgba, &engine_rgb(&frame, family), &format!("{family} sRGB"));
    }
}

#[test]
fn upscaling_is_bilinear_over_latents() {
    let Some((device, queue)) = gpu() else { return };
    let frame = frame(Family::Sdxl, 5, 3, 11);
    // An integer and a fractional scale.
    for (width, height) in [(20, 12), (13, 11)] {
        let rgba = LatentPreviewRenderer::render_offscreen(device, queue, &frame, width, height);
        let expected = resample(&frame, width as usize, height as usize).cpu_rgb();
        assert_close(&rgba, &expected, &format!("{width}×{height}"));
    }
}

/// The real path: `paint` inside an egui frame, rendered by egui-wgpu's renderer.
#[test]
fn paint_callback_draws_through_egui_wgpu() {
    let Some((device, queue)) = gpu() else { return };
    let format = wgpu::TextureFormat::Rgba8Unorm;
    let (screen_w, screen_h) = (64u32, 48u32);
    let mut renderer = egui_wgpu::Renderer::new(device, format, Default::default());
    renderer.callback_resources.insert(LatentPreviewRenderer::new(device, format));

    let frame = Arc::new(frame(Family::Sd1, 8, 6, 21));
    // Fully inside the screen, and half scrolled out to the left (egui would squash that one).
    let inside = egui::Rect::from_min_size(egui::pos2(4.0, 2.0), egui::vec2(32.0, 24.0));
    let clipped = egui::Rect::from_min_size(egui::pos2(-16.0, 26.0), egui::vec2(32.0, 24.0) * 0.75);

    let ctx = egui::Context::default();
    let input = egui::RawInput {
        screen_rect: Some(egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(screen_w as f32, screen_h as f32))),
        ..Default::default()
    };
    let uploaded = |renderer: &egui_wgpu::Renderer| {
        let resources = &renderer.callback_resources;
        resources.get::<LatentPreviewRenderer>().unwrap().uploaded_frames()
    };
    let mut pixels = Vec::new();
    // Twice: both callbacks and both renders share one upload.
    for _ in 0..2 {
        let output = ctx.run_ui(input.clone(), |ui| {
            preview::paint(ui, inside, frame.clone());
            preview::paint(ui, clipped, frame.clone());
        });
        pixels = render_egui(device, queue, &mut renderer, &ctx, output, [screen_w, screen_h]);
        assert_eq!(uploaded(&renderer), 1);
    }

    let pixel = |x: u32, y: u32| {
        let i = ((y * screen_w + x) * 4) as usize;
        &pixels[i..i + 4]
    };
    let check = |rect: egui::Rect, what: &str| {
        let (w, h) = (rect.width() as usize, rect.height() as usize);
        let expected = resample(&frame, w, h).cpu_rgb();
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = (rect.min.x as i64 + x as i64, rect.min.y as i64 + y as i64);
                if sx < 0 || sy < 0 || sx >= screen_w as i64 || sy >= screen_h as i64 {
                    continue;
                }
                let got = pixel(sx as u32, sy as u32);
                let want = &expected[(y * w + x) * 3..][..3];
                let close = got[..3].iter().zip(want).all(|(&g, &w)| g.abs_diff(w) <= 1);
                assert!(close, "{what}: ({x}, {y}): GPU {got:?}, CPU {want:?}");
            }
        }
    };
    check(inside, "inside");
    check(clipped, "scrolled out");
    // Outside both rects the clear colour stays.
    assert_eq!(pixel(screen_w - 1, 0), &[0, 0, 0, 0]);

    // A new frame replaces the old one's upload instead of piling up.
    let next = Arc::new(LatentFrame::clone(&frame));
    let output = ctx.run_ui(input.clone(), |ui| preview::paint(ui, inside, next.clone()));
    render_egui(device, queue, &mut renderer, &ctx, output, [screen_w, screen_h]);
    assert_eq!(uploaded(&renderer), 1);
}

fn render_egui(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    renderer: &mut egui_wgpu::Renderer,
    ctx: &egui::Context,
    output: egui::FullOutput,
    [width, height]: [u32; 2],
) -> Vec<u8> {
    let screen =
        egui_wgpu::ScreenDescriptor { size_in_pixels: [width, height], pixels_per_point: output.pixels_per_point };
    let mut textures = output.textures_delta;
    for (id, deltas) in textures.set.drain() {
        for delta in &deltas {
            renderer.update_texture(device, queue, id, delta);
        }
    }
    for id in textures.free.drain() {
        renderer.free_texture(&id);
    }
    let jobs = ctx.tessellate(output.shapes, output.pixels_per_point);
    let target = device.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size: wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba8Unorm,
        usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
        view_formats: &[],
    });
    let view = target.create_view(&Default::default());
    let mut encoder = device.create_command_encoder(&Default::default());
    let user_buffers = renderer.update_buffers(device, queue, &mut encoder, &jobs, &screen);
    {
        let mut pass = encoder
            .begin_render_pass(&wgpu::RenderPassDescriptor {
                label: None,
                color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                    view: &view,
                    depth_slice: None,
                    resolve_target: None,
                    ops: wgpu::Operations {
                        load: wgpu::LoadOp::Clear(wgpu::Color::TRANSPARENT),
                        store: wgpu::StoreOp::Store,
                    },
                })],
                depth_stencil_attachment: None,
                timestamp_writes: None,
                occlusion_query_set: None,
                multiview_mask: None,
            })
            .forget_lifetime();
        renderer.render(&mut pass, &jobs, &screen);
    }
    let row = (width * 4).next_multiple_of(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT);
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (row * height) as u64,
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        mapped_at_creation: false,
    });
    encoder.copy_texture_to_buffer(
        target.as_image_copy(),
        wgpu::TexelCopyBufferInfo {
            buffer: &readback,
            layout: wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(row), rows_per_image: None },
        },
        target.size(),
    );
    queue.submit(user_buffers.into_iter().chain([encoder.finish()]));
    readback.slice(..).map_async(wgpu::MapMode::Read, |r| r.unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let mapped = readback.slice(..).get_mapped_range().unwrap();
    mapped.chunks(row as usize).flat_map(|r| &r[..width as usize * 4]).copied().collect()
}
