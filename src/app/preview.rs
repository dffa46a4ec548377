//! Live preview of diffusion latents: the family's 4→3 linear map from latent channels to RGB,
//! run in a WGSL shader through egui-wgpu's paint callbacks, with a CPU fallback for painters
//! without wgpu (glow, kittest).
//!
//! Upscaling is bilinear over the latents (then projected and clamped per pixel): a latent pixel
//! covers 8×8 image pixels, and nearest-neighbour blocks that size read as noise, not a preview.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use eframe::egui;
use eframe::egui_wgpu::{self, CallbackResources, CallbackTrait, ScreenDescriptor};
use eframe::wgpu;
use eframe::wgpu::util::DeviceExt as _;

/// One latent image for preview: channel-major f32 (channels × height × width), plus the
/// family's projection (`easel_engine::models::Family::latent_rgb_factors`).
#[derive(Clone, Debug)]
pub struct LatentFrame {
    /// Usually 4; only the first 4 are projected, missing ones count as 0.
    pub channels: usize,
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
    /// Rows per latent channel: its (r, g, b) contributions.
    pub factors: [[f32; 3]; 4],
    pub bias: [f32; 3],
}

impl LatentFrame {
    /// Whether `data` holds exactly `channels × height × width` values of a non-empty image.
    pub fn is_valid(&self) -> bool {
        let expected = self.channels.checked_mul(self.width).and_then(|n| n.checked_mul(self.height));
        self.width > 0 && self.height > 0 && expected == Some(self.data.len())
    }

    /// RGB8, `width × height × 3` bytes, with the same math (and float order) as the engine's
    /// `latent_to_rgb`. Values missing from a short `data` read as 0 so the size always holds.
    pub fn cpu_rgb(&self) -> Vec<u8> {
        let plane = self.width * self.height;
        let mut out = Vec::with_capacity(plane * 3);
        for p in 0..plane {
            for (rgb, &b) in self.bias.iter().enumerate() {
                let mut v = b;
                for (ch, row) in self.factors.iter().enumerate().take(self.channels) {
                    v += self.value(ch, p) * row[rgb];
                }
                out.push((((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        out
    }

    fn value(&self, channel: usize, pixel: usize) -> f32 {
        if channel >= self.channels {
            return 0.0;
        }
        let index = channel * self.width * self.height + pixel;
        self.data.get(index).copied().unwrap_or(0.0)
    }

    /// Pixel-major RGBA texels holding channels 0..3, as the shader's texture wants them.
    fn texels(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = Vec::with_capacity(plane * 4);
        for p in 0..plane {
            for ch in 0..4 {
                out.push(self.value(ch, p));
            }
        }
        out
    }

    fn params(&self, srgb_target: bool) -> Params {
        let mut proj = [[0.0; 4]; 4];
        for (column, row) in proj.iter_mut().zip(&self.factors) {
            column[..3].copy_from_slice(row);
        }
        Params { proj, bias: [self.bias[0], self.bias[1], self.bias[2], 0.0], flags: [u32::from(srgb_target), 0, 0, 0] }
    }
}

/// The shader's uniform; every member is a vec4 (or mat4x4) so Rust and WGSL layouts agree.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    proj: [[f32; 4]; 4],
    bias: [f32; 4],
    flags: [u32; 4],
}

/// A frame's texture and uniform on the GPU.
struct Uploaded {
    /// Held so the `Arc` address used as the cache key cannot be reused by another frame.
    _frame: Arc<LatentFrame>,
    bind_group: wgpu::BindGroup,
}

/// GPU resources (pipeline, bind group layout; no sampler: the shader uses textureLoad),
/// registered once in egui-wgpu's callback resources, plus the frames uploaded for drawing.
pub struct LatentPreviewRenderer {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    srgb_target: bool,
    max_texture_size: u32,
    /// Uploaded frames by `Arc` address: a frame is uploaded once, however often it is drawn.
    uploads: HashMap<usize, Uploaded>,
    /// Frames drawn in the current egui render; the rest are dropped in `finish_prepare`.
    used: HashSet<usize>,
    /// Set by the first `finish_prepare` of a render, so the next `prepare` starts a new one.
    render_finished: bool,
}

impl LatentPreviewRenderer {
    /// Pipeline for a render pass with one `target_format` colour attachment, no multisampling
    /// and no depth buffer (eframe's defaults for `multisampling` and `depth_buffer`).
    pub fn new(device: &wgpu::Device, target_format: wgpu::TextureFormat) -> Self {
        let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("latent_preview"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/latent_preview.wgsl").into()),
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("latent_preview"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: wgpu::BufferSize::new(size_of::<Params>() as u64),
                    },
                    count: None,
                },
                wgpu::BindGroupLayoutEntry {
                    binding: 1,
                    visibility: wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D2,
                        multisampled: false,
                    },
                    count: None,
                },
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("latent_preview"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("latent_preview"),
            layout: Some(&pipeline_layout),
            vertex: wgpu::VertexState {
                module: &shader,
                entry_point: Some("vs_main"),
                compilation_options: Default::default(),
                buffers: &[],
            },
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            fragment: Some(wgpu::FragmentState {
                module: &shader,
                entry_point: Some("fs_main"),
                compilation_options: Default::default(),
                // Opaque: the preview replaces whatever is under it.
                targets: &[Some(wgpu::ColorTargetState {
                    format: target_format,
                    blend: None,
                    write_mask: wgpu::ColorWrites::ALL,
                })],
            }),
            multiview_mask: None,
            cache: None,
        });
        Self {
            pipeline,
            layout,
            srgb_target: target_format.is_srgb(),
            max_texture_size: device.limits().max_texture_dimension_2d,
            uploads: HashMap::new(),
            used: HashSet::new(),
            render_finished: false,
        }
    }

    /// Register in eframe's render state (call from the app's creation context if
    /// `cc.wgpu_render_state` is Some); without it `paint` draws nothing.
    pub fn install(render_state: &egui_wgpu::RenderState) {
        let renderer = Self::new(&render_state.device, render_state.target_format);
        render_state.renderer.write().callback_resources.insert(renderer);
    }

    /// Offscreen render of `frame` at `width × height` into an `Rgba8Unorm` texture, read back
    /// as tightly packed RGBA8; for tests. Panics on device errors.
    pub fn render_offscreen(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        frame: &LatentFrame,
        width: u32,
        height: u32,
    ) -> Vec<u8> {
        Self::render_offscreen_as(device, queue, frame, width, height, wgpu::TextureFormat::Rgba8Unorm)
    }

    /// `render_offscreen` into any 4-byte-per-pixel colour format, e.g. `Rgba8UnormSrgb` to
    /// check that the stored bytes still equal the CPU reference on an sRGB target.
    pub fn render_offscreen_as(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        frame: &LatentFrame,
        width: u32,
        height: u32,
        format: wgpu::TextureFormat,
    ) -> Vec<u8> {
        let renderer = Self::new(device, format);
        let bind_group =
            renderer.upload(device, queue, frame).expect("frame is valid and fits the device's texture limits");
        let size = wgpu::Extent3d { width, height, depth_or_array_layers: 1 };
        let target = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("latent_preview_offscreen"),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let view = target.create_view(&wgpu::TextureViewDescriptor::default());
        // Buffer copies need rows padded to 256 bytes.
        let row = width as usize * 4;
        let padded_row = row.next_multiple_of(wgpu::COPY_BYTES_PER_ROW_ALIGNMENT as usize);
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("latent_preview_readback"),
            size: (padded_row * height as usize) as u64,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });

        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_render_pass(&wgpu::RenderPassDescriptor {
                label: Some("latent_preview_offscreen"),
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
            });
            renderer.draw(&mut pass, &bind_group);
        }
        encoder.copy_texture_to_buffer(
            target.as_image_copy(),
            wgpu::TexelCopyBufferInfo {
                buffer: &readback,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(padded_row as u32),
                    rows_per_image: None,
                },
            },
            size,
        );
        queue.submit([encoder.finish()]);

        let slice = readback.slice(..);
        let (sender, receiver) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        device.poll(wgpu::PollType::wait_indefinitely()).expect("device poll");
        receiver.recv().expect("map callback ran").expect("readback buffer mapped");
        let mapped = slice.get_mapped_range().expect("readback buffer is mapped");
        mapped.chunks(padded_row).flat_map(|r| &r[..row]).copied().collect()
    }

    /// How many frames are uploaded now (those drawn in the latest egui render).
    pub fn uploaded_frames(&self) -> usize {
        self.uploads.len()
    }

    /// Texture + uniform for `frame`; None if it is malformed or too large for the device.
    fn upload(&self, device: &wgpu::Device, queue: &wgpu::Queue, frame: &LatentFrame) -> Option<wgpu::BindGroup> {
        let width = u32::try_from(frame.width).ok()?;
        let height = u32::try_from(frame.height).ok()?;
        if !frame.is_valid() || width > self.max_texture_size || height > self.max_texture_size {
            return None;
        }
        let size = wgpu::Extent3d { width, height, depth_or_array_layers: 1 };
        let texture = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("latent_preview_latents"),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        queue.write_texture(
            texture.as_image_copy(),
            bytemuck::cast_slice(&frame.texels()),
            wgpu::TexelCopyBufferLayout { offset: 0, bytes_per_row: Some(width * 16), rows_per_image: None },
            size,
        );
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("latent_preview_params"),
            contents: bytemuck::bytes_of(&frame.params(self.srgb_target)),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        Some(device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("latent_preview"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(&view) },
            ],
        }))
    }

    fn draw(&self, pass: &mut wgpu::RenderPass<'_>, bind_group: &wgpu::BindGroup) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.draw(0..3, 0..1);
    }
}

/// The paint callback: carries the frame so `prepare` can upload it when it is new.
struct PreviewCallback {
    frame: Arc<LatentFrame>,
}

impl PreviewCallback {
    fn key(&self) -> usize {
        Arc::as_ptr(&self.frame) as usize
    }
}

impl CallbackTrait for PreviewCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen_descriptor: &ScreenDescriptor,
        _egui_encoder: &mut wgpu::CommandEncoder,
        resources: &mut CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(renderer) = resources.get_mut::<LatentPreviewRenderer>() else {
            return Vec::new();
        };
        if renderer.render_finished {
            renderer.render_finished = false;
            renderer.used.clear();
        }
        let key = self.key();
        renderer.used.insert(key);
        if !renderer.uploads.contains_key(&key) {
            if let Some(bind_group) = renderer.upload(device, queue, &self.frame) {
                let uploaded = Uploaded { _frame: self.frame.clone(), bind_group };
                renderer.uploads.insert(key, uploaded);
            }
        }
        Vec::new()
    }

    fn finish_prepare(
        &self,
        _device: &wgpu::Device,
        _queue: &wgpu::Queue,
        _egui_encoder: &mut wgpu::CommandEncoder,
        resources: &mut CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        // Runs once per callback; the first one of a render drops frames no longer drawn.
        if let Some(renderer) = resources.get_mut::<LatentPreviewRenderer>() {
            if !renderer.render_finished {
                renderer.render_finished = true;
                let used = &renderer.used;
                renderer.uploads.retain(|key, _| used.contains(key));
            }
        }
        Vec::new()
    }

    fn paint(
        &self,
        info: egui::PaintCallbackInfo,
        pass: &mut wgpu::RenderPass<'static>,
        resources: &CallbackResources,
    ) {
        let Some(renderer) = resources.get::<LatentPreviewRenderer>() else {
            return;
        };
        let Some(uploaded) = renderer.uploads.get(&self.key()) else {
            return;
        };
        // egui clamps the viewport to the screen, which would squash a partly scrolled-out
        // preview; use the whole rect when wgpu accepts it (the scissor still clips).
        // Rounded like egui's own viewport, so adjacent rects neither overlap nor gap.
        let ppp = info.pixels_per_point;
        let rect = info.viewport;
        let (x, y) = ((rect.min.x * ppp).round(), (rect.min.y * ppp).round());
        let (w, h) = ((rect.max.x * ppp).round() - x, (rect.max.y * ppp).round() - y);
        let limit = renderer.max_texture_size as f32;
        let fits = w > 0.0
            && h > 0.0
            && w <= limit
            && h <= limit
            && x >= -2.0 * limit
            && y >= -2.0 * limit
            && x + w <= 2.0 * limit - 1.0
            && y + h <= 2.0 * limit - 1.0;
        if fits {
            pass.set_viewport(x, y, w, h, 0.0, 1.0);
        }
        renderer.draw(pass, &uploaded.bind_group);
    }
}

/// Adds a paint callback drawing `frame` scaled to `rect` (bilinear, see the module docs).
/// The frame is uploaded once per `Arc`: pass the same `Arc` while the latents are unchanged.
/// Draws nothing unless `LatentPreviewRenderer::install` ran (no wgpu: show `cpu_rgb` instead).
pub fn paint(ui: &mut egui::Ui, rect: egui::Rect, frame: Arc<LatentFrame>) {
    let callback = PreviewCallback { frame };
    ui.painter().add(egui_wgpu::Callback::new_paint_callback(rect, callback));
}
