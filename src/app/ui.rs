//! Drawing the panels. State changes go through `EaselApp` methods so tests can drive them.

use easel_engine::pipeline::fit::ResizeMode;
use easel_engine::pipeline::prompt::Emphasis;
use easel_engine::pipeline::text::PROMPT_TOKEN_WINDOW;
use easel_engine::pipeline::HiresUpscaler;
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};
use eframe::egui::{self, Color32, Key, Modifiers, RichText};

use super::mask::Tool;
use super::{color_image, CentralView, EaselApp, Loading, ModelState, NoticeKind};

const SIZE_PRESETS: [(&str, usize, usize); 7] = [
    ("512 × 512 (SD 1.x)", 512, 512),
    ("768 × 768 (SD 2.x)", 768, 768),
    ("1024 × 1024 (SDXL)", 1024, 1024),
    ("512 × 768 portrait", 512, 768),
    ("768 × 512 landscape", 768, 512),
    ("832 × 1216 SDXL portrait", 832, 1216),
    ("1216 × 832 SDXL landscape", 1216, 832),
];

pub fn draw(app: &mut EaselApp, ui: &mut egui::Ui) {
    if ui.input_mut(|i| i.consume_key(Modifiers::COMMAND, Key::Enter)) {
        app.generate();
    }
    egui::Panel::left("settings").resizable(true).default_size(340.0).show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| settings_panel(app, ui));
    });
    egui::Panel::bottom("gallery").resizable(false).default_size(112.0).show(ui, |ui| gallery_strip(app, ui));
    egui::CentralPanel::default().show(ui, |ui| central(app, ui));
}

fn settings_panel(app: &mut EaselApp, ui: &mut egui::Ui) {
    ui.add_space(6.0);
    ui.heading("Model");
    ui.horizontal(|ui| {
        match &app.model {
            ModelState::None => ui.label("No model"),
            ModelState::Loading(path) => {
                ui.label(format!("Loading {}…", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()))
            }
            ModelState::Ready(m) => ui.label(
                RichText::new(format!("{} · {}{}", m.name, m.family, if m.turbo { " Turbo" } else { "" })).strong(),
            ),
            ModelState::Failed { .. } => ui.colored_label(Color32::LIGHT_RED, "Failed to load"),
        };
    });
    ui.horizontal(|ui| {
        if ui.button("Open model folder…").clicked() {
            if let Some(path) = rfd::FileDialog::new().set_title("Choose a diffusers model folder").pick_folder() {
                app.load_model(path);
            }
        }
        if ui.button("Open checkpoint…").clicked() {
            if let Some(path) = rfd::FileDialog::new()
                .set_title("Choose a .safetensors checkpoint")
                .add_filter("Checkpoint", &["safetensors"])
                .pick_file()
            {
                app.load_model(path);
            }
        }
    });
    ui.horizontal(|ui| {
        let vae_name =
            app.settings.vae_path.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        ui.label(format!("VAE: {}", vae_name.as_deref().unwrap_or("the model's own")));
        if ui.small_button("Choose…").on_hover_text("Use another VAE (.safetensors file)").clicked() {
            if let Some(path) =
                rfd::FileDialog::new().set_title("Choose a VAE").add_filter("VAE", &["safetensors"]).pick_file()
            {
                app.set_vae(Some(path));
            }
        }
        if vae_name.is_some() && ui.small_button("Model's own").clicked() {
            app.set_vae(None);
        }
    });
    if easel_engine::kernels::bf16_supported() {
        let mut bf16 = app.settings.cpu_bf16;
        let hover = "U-Net weights in bf16 on this CPU's AVX-512 BF16 units: faster and half the \
                     memory; images stay very close to f32 but are not bit-identical";
        if ui.checkbox(&mut bf16, "Fast bf16 mode").on_hover_text(hover).changed() {
            app.set_cpu_bf16(bf16);
        }
    }
    if let ModelState::Ready(m) = &app.model {
        let (steps, guidance, size) = (m.default_steps, m.default_guidance, m.default_size);
        if ui
            .small_button("Use the model's defaults")
            .on_hover_text(format!("{steps} steps, guidance {guidance}, {size}×{size}"))
            .clicked()
        {
            app.settings.steps = steps;
            app.settings.guidance = guidance;
            app.settings.width = size;
            app.settings.height = size;
        }
    }
    ui.separator();

    let label = ui.horizontal(|ui| {
        let label = ui.heading("Prompt");
        token_counter(app, ui, 0);
        label
    });
    let hint = if app.is_easel_mini() { EASEL_MINI_EXAMPLES[0] } else { "a watercolor fox in the snow" };
    ui.add(
        egui::TextEdit::multiline(&mut app.settings.prompt)
            .desired_rows(4)
            .desired_width(f32::INFINITY)
            .hint_text(hint)
            .id_salt("prompt"),
    )
    .labelled_by(label.inner.id);
    let label = ui.horizontal(|ui| {
        let label = ui.label("Negative prompt");
        token_counter(app, ui, 1);
        label
    });
    ui.add(
        egui::TextEdit::multiline(&mut app.settings.negative_prompt)
            .desired_rows(2)
            .desired_width(f32::INFINITY)
            .hint_text("blurry, low quality")
            .id_salt("negative"),
    )
    .labelled_by(label.inner.id);
    ui.separator();

    egui::Grid::new("params").num_columns(2).spacing([8.0, 6.0]).show(ui, |ui| {
        let label = ui.label("Steps");
        ui.add(egui::Slider::new(&mut app.settings.steps, 1..=150)).labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Guidance");
        ui.add(egui::Slider::new(&mut app.settings.guidance, 0.0..=20.0).step_by(0.5)).labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Sampler");
        egui::ComboBox::from_id_salt("sampler")
            .selected_text(app.settings.sampler.a1111_name())
            .show_ui(ui, |ui| {
                for sampler in SamplerId::ALL {
                    ui.selectable_value(&mut app.settings.sampler, sampler, sampler.a1111_name());
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Schedule");
        let schedules = app.settings.sampler.schedules();
        if !schedules.contains(&app.settings.schedule) {
            app.settings.schedule = Schedule::Default;
        }
        ui.add_enabled_ui(schedules.len() > 1, |ui| {
            egui::ComboBox::from_id_salt("schedule")
                .selected_text(app.settings.schedule.label())
                .show_ui(ui, |ui| {
                    for &schedule in schedules {
                        ui.selectable_value(&mut app.settings.schedule, schedule, schedule.label());
                    }
                })
                .response
                .labelled_by(label.id)
                .on_disabled_hover_text("This sampler runs the model's own schedule");
        });
        ui.end_row();
        let label = ui.label("Seed");
        ui.horizontal(|ui| {
            ui.add_enabled(!app.settings.random_seed, egui::DragValue::new(&mut app.settings.seed).speed(1.0))
                .labelled_by(label.id);
            if ui.button("Random").on_hover_text("Pick a new random seed").clicked() {
                app.settings.seed = easel_engine::rng::random_seed();
                app.settings.random_seed = false;
            }
            if ui
                .add_enabled(app.last_seed.is_some(), egui::Button::new("Last"))
                .on_hover_text("Reuse the last seed")
                .clicked()
            {
                if let Some(seed) = app.last_seed {
                    app.settings.seed = seed;
                    app.settings.random_seed = false;
                }
            }
        });
        ui.end_row();
        ui.label("");
        ui.checkbox(&mut app.settings.random_seed, "Random seed each time");
        ui.end_row();
        let label = ui.label("Width");
        ui.add(egui::DragValue::new(&mut app.settings.width).speed(8.0).range(8..=2048).suffix(" px"))
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Height");
        ui.add(egui::DragValue::new(&mut app.settings.height).speed(8.0).range(8..=2048).suffix(" px"))
            .labelled_by(label.id);
        ui.end_row();
        ui.label("");
        ui.horizontal(|ui| {
            if ui.button("Swap").clicked() {
                std::mem::swap(&mut app.settings.width, &mut app.settings.height);
            }
            ui.menu_button("Presets", |ui| {
                for (label, w, h) in SIZE_PRESETS {
                    if ui.button(label).clicked() {
                        app.settings.width = w;
                        app.settings.height = h;
                        ui.close();
                    }
                }
            });
        });
        ui.end_row();
        let label = ui.label("Batch count");
        ui.add(egui::DragValue::new(&mut app.settings.batch_count).range(1..=32)).labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Noise");
        egui::ComboBox::from_id_salt("rng")
            .selected_text(if app.settings.rng == RngKind::Nv { "GPU (A1111 NV)" } else { "CPU (diffusers, ComfyUI)" })
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut app.settings.rng, RngKind::Cpu, "CPU (diffusers, ComfyUI)");
                ui.selectable_value(&mut app.settings.rng, RngKind::Nv, "GPU (A1111 NV)");
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Emphasis");
        egui::ComboBox::from_id_salt("emphasis")
            .selected_text(app.settings.emphasis.label())
            .show_ui(ui, |ui| {
                for emphasis in Emphasis::ALL {
                    ui.selectable_value(&mut app.settings.emphasis, emphasis, emphasis.label());
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text("How (word:1.2), [word] and BREAK act in the prompts");
        ui.end_row();
        let label = ui.label("Clip skip");
        ui.add(egui::DragValue::new(&mut app.settings.clip_skip).range(1..=12))
            .labelled_by(label.id)
            .on_hover_text("1: the text encoder's last layer; 2: the one before (what many anime models want)");
        ui.end_row();
    });
    ui.separator();

    ui.horizontal(|ui| {
        let ready = matches!(app.model, ModelState::Ready(_));
        let label = if app.is_busy() { "Generate (queue)" } else { "Generate" };
        if ui
            .add_enabled(ready, egui::Button::new(RichText::new(label).size(18.0)).min_size([150.0, 34.0].into()))
            .on_hover_text("Ctrl+Enter")
            .clicked()
        {
            app.generate();
        }
        if app.running.is_some() && ui.add(egui::Button::new("Cancel").min_size([80.0, 34.0].into())).clicked() {
            app.cancel_running();
        }
    });
    if !app.queue.is_empty() {
        ui.label(format!("Queue ({})", app.queue.len()));
        let mut remove = None;
        for queued in &app.queue {
            ui.horizontal(|ui| {
                if ui.small_button("×").on_hover_text("Remove from the queue").clicked() {
                    remove = Some(queued.job);
                }
                ui.label(format!(
                    "#{} · seed {} · {}",
                    queued.job,
                    queued.request.seed,
                    shorten(&queued.request.prompt, 28)
                ));
            });
        }
        if let Some(job) = remove {
            app.remove_queued(job);
        }
    }
    ui.separator();
    init_image_panel(app, ui);
    loras_panel(app, ui);
    embeddings_panel(app, ui);
    models_panel(app, ui);
    ui.collapsing("Saving", |ui| {
        ui.checkbox(&mut app.settings.autosave, "Save every image automatically");
        ui.label(RichText::new(app.settings.outputs_dir().display().to_string()).small());
        ui.horizontal(|ui| {
            if ui.button("Change folder…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().set_title("Outputs folder").pick_folder() {
                    app.settings.outputs_dir = Some(dir);
                }
            }
            if ui.button("Open outputs folder").clicked() {
                let dir = app.settings.outputs_dir();
                if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| open_in_file_manager(&dir)) {
                    app.notify(NoticeKind::Error, format!("Could not open {}: {e}", dir.display()));
                }
            }
        });
    });
}

fn token_counter(app: &mut EaselApp, ui: &mut egui::Ui, which: usize) {
    if let Some((count, chunks)) = app.token_count(which) {
        let text = format!("{count}/{}", chunks * PROMPT_TOKEN_WINDOW);
        let color = if chunks > 1 { Color32::from_rgb(240, 200, 120) } else { ui.visuals().weak_text_color() };
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            ui.label(RichText::new(text).color(color)).on_hover_text(
                "Tokens against CLIP's 75-token chunks: a longer prompt is split into chunks (after a \
                 comma where it can, and at BREAK), each encoded alone",
            );
        });
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

fn central(app: &mut EaselApp, ui: &mut egui::Ui) {
    for i in (0..app.notices.len()).rev() {
        let notice = app.notices[i].clone();
        let mut dismiss = false;
        ui.horizontal(|ui| {
            let color = if notice.kind == NoticeKind::Error {
                Color32::from_rgb(255, 120, 110)
            } else {
                ui.visuals().text_color()
            };
            if ui.small_button("×").clicked() {
                dismiss = true;
            }
            ui.colored_label(color, &notice.text);
        });
        if dismiss {
            app.notices.remove(i);
        }
    }

    if let Some(running) = &app.running {
        let fraction = if running.total > 0 { running.step as f32 / running.total as f32 } else { 0.0 };
        let secs = running.elapsed.as_secs_f32().max(1e-3);
        let rate = running.step as f32 / secs;
        let eta = if rate > 0.0 { (running.total - running.step) as f32 / rate } else { 0.0 };
        let status = if running.cancelling {
            "cancelling…".to_string()
        } else if running.step > 0 && running.step == running.total {
            format!("decoding the image… ({} steps at {rate:.2} it/s)", running.total)
        } else {
            format!("step {}/{} · {rate:.2} it/s · ETA {eta:.0} s", running.step, running.total)
        };
        ui.add(egui::ProgressBar::new(fraction).text(status));
    }

    match &app.model {
        ModelState::None | ModelState::Failed { .. } if matches!(app.view, CentralView::Empty) => {
            return first_run(app, ui)
        }
        _ => {}
    }

    if matches!(app.view, CentralView::Empty) && app.is_easel_mini() {
        return easel_mini_welcome(app, ui);
    }

    let view = app.view.clone();
    match view {
        CentralView::Empty => {
            ui.centered_and_justified(|ui| {
                ui.label(RichText::new("Type a prompt and press Generate (Ctrl+Enter).").size(16.0).weak())
            });
        }
        CentralView::Preview(frame) => {
            let rect = fit_rect(ui, frame.width as f32, frame.height as f32);
            if app.gpu_preview {
                super::preview::paint(ui, rect, frame);
            } else {
                // No wgpu (glow backend or headless tests): project on the CPU instead.
                let generation = app.preview_generation;
                let stale = app.preview_texture.as_ref().is_none_or(|(g, _)| *g != generation);
                if stale {
                    let rgb = frame.cpu_rgb();
                    let image = egui::ColorImage::from_rgb([frame.width, frame.height], &rgb);
                    let texture = ui.ctx().load_texture("preview", image, egui::TextureOptions::LINEAR);
                    app.preview_texture = Some((generation, texture));
                }
                if let Some((_, texture)) = &app.preview_texture {
                    ui.painter().image(
                        texture.id(),
                        rect,
                        egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                        Color32::WHITE,
                    );
                }
            }
        }
        CentralView::Gallery(index) => image_view(app, ui, index),
        CentralView::Canvas => mask_canvas(app, ui),
    }
}

/// The init image with the mask painter on top: brush and eraser, size, undo, clear, invert;
/// the outpainting border drawn around it.
fn mask_canvas(app: &mut EaselApp, ui: &mut egui::Ui) {
    let brush = &mut app.settings.brush_size;
    let Some(init) = &mut app.init_image else {
        app.view = CentralView::Empty;
        return;
    };
    let mut done = false;
    ui.horizontal(|ui| {
        ui.label(RichText::new("Paint what to repaint").strong());
        ui.separator();
        let tool = &mut init.mask.tool;
        ui.selectable_value(tool, Tool::Brush, "Brush").on_hover_text("Paint the area to repaint (B)");
        ui.selectable_value(tool, Tool::Eraser, "Eraser").on_hover_text("Take painted area back (E)");
        ui.add(egui::Slider::new(brush, 2.0..=256.0).logarithmic(true).text("Size"));
        if ui.add_enabled(init.mask.can_undo(), egui::Button::new("Undo")).on_hover_text("Ctrl+Z").clicked() {
            init.mask.undo();
        }
        if ui.button("Clear mask").clicked() {
            init.mask.clear();
        }
        if ui.button("Invert mask").clicked() {
            init.mask.invert();
        }
        done = ui.button("Done").on_hover_text("Back to the pictures").clicked();
    });
    ui.input_mut(|i| {
        if i.consume_key(Modifiers::COMMAND, Key::Z) {
            init.mask.undo();
        }
    });
    if !ui.ctx().egui_wants_keyboard_input() {
        ui.input(|i| {
            if i.key_pressed(Key::B) {
                init.mask.tool = Tool::Brush;
            }
            if i.key_pressed(Key::E) {
                init.mask.tool = Tool::Eraser;
            }
        });
    }
    let (iw, ih) = (init.image.width as f32, init.image.height as f32);
    let o = init.outpaint;
    let (cw, ch) = (iw + (o.left + o.right) as f32, ih + (o.top + o.bottom) as f32);
    let canvas = fit_rect(ui, cw, ch);
    let scale = canvas.width() / cw;
    let image_rect = egui::Rect::from_min_size(
        canvas.min + egui::vec2(o.left as f32 * scale, o.top as f32 * scale),
        egui::vec2(iw * scale, ih * scale),
    );
    let painter = ui.painter_at(canvas);
    if !o.is_none() {
        // The new border outpainting paints.
        painter.rect_filled(canvas, 0.0, Color32::from_gray(40));
        painter.rect_stroke(
            canvas,
            0.0,
            egui::Stroke::new(1.0, Color32::from_rgb(255, 48, 64)),
            egui::StrokeKind::Inside,
        );
    }
    let texture = init.texture.get_or_insert_with(|| {
        ui.ctx().load_texture("init-image", color_image(&init.image), egui::TextureOptions::LINEAR)
    });
    let uv = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
    painter.image(texture.id(), image_rect, uv, Color32::WHITE);
    let mask_texture = init.mask.texture(ui.ctx());
    painter.image(mask_texture, image_rect, uv, Color32::WHITE);

    let response = ui.interact(image_rect, ui.scope_id().with("mask-painter"), egui::Sense::drag());
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, "Mask painter"));
    let to_mask = |pos: egui::Pos2| ((pos.x - image_rect.min.x) / scale, (pos.y - image_rect.min.y) / scale);
    if let Some(pos) = response.interact_pointer_pos() {
        let (x, y) = to_mask(pos);
        if response.drag_started() {
            init.mask.begin_stroke(x, y, *brush);
        } else if response.dragged() {
            init.mask.stroke_to(x, y, *brush);
        }
    }
    if response.drag_stopped() {
        init.mask.end_stroke();
    }
    if let Some(pos) = response.hover_pos() {
        let color = match init.mask.tool {
            Tool::Brush => Color32::WHITE,
            Tool::Eraser => Color32::from_rgb(120, 200, 255),
        };
        painter.circle_stroke(pos, *brush / 2.0 * scale, egui::Stroke::new(1.0, color));
    }
    if done {
        app.view = match app.gallery.len() {
            0 => CentralView::Empty,
            n => CentralView::Gallery(n - 1),
        };
    }
}

/// The largest rect of the image's aspect ratio that fits the remaining space, centred.
fn fit_rect(ui: &mut egui::Ui, width: f32, height: f32) -> egui::Rect {
    let available = ui.available_rect_before_wrap();
    let scale = (available.width() / width).min(available.height() / height).max(0.01);
    let size = egui::vec2(width * scale, height * scale);
    let rect = egui::Rect::from_center_size(available.center(), size);
    ui.allocate_rect(available, egui::Sense::hover());
    rect
}

fn image_view(app: &mut EaselApp, ui: &mut egui::Ui, index: usize) {
    app.request_image(index, true);
    let Some(item) = app.gallery.get(index) else { return };
    let parameters = item.parameters.clone();
    let path = item.path.clone();
    let can_reuse = item.request.is_some() || !parameters.is_empty();
    let loaded = item.image.is_some();
    let mut reuse = false;
    let mut use_as_init = false;
    ui.horizontal(|ui| {
        if ui.add_enabled(loaded, egui::Button::new("Save as…")).clicked() {
            save_as(app, index);
        }
        if ui.add_enabled(!parameters.is_empty(), egui::Button::new("Copy parameters")).clicked() {
            ui.ctx().copy_text(parameters.clone());
        }
        if ui.add_enabled(can_reuse, egui::Button::new("Reuse parameters")).clicked() {
            reuse = true;
        }
        if ui
            .add_enabled(loaded || path.is_some(), egui::Button::new("Use as init image"))
            .on_hover_text("Start the next images from this one (image to image)")
            .clicked()
        {
            use_as_init = true;
        }
        if let Some(path) = &path {
            ui.label(RichText::new(path.display().to_string()).small().weak());
        }
    });
    if reuse {
        app.reuse(index);
    }
    if use_as_init {
        app.use_as_init_image(index);
    }
    let Some(item) = app.gallery.get(index) else { return };
    let (Some(image), Some(texture)) = (&item.image, &item.texture) else {
        let text = match &item.loading {
            Loading::Failed(error) => format!("Could not open this image: {error}"),
            _ => "Loading…".to_string(),
        };
        ui.centered_and_justified(|ui| ui.label(RichText::new(text).weak()));
        return;
    };
    let (w, h) = (image.width as f32, image.height as f32);
    let texture_id = texture.id();
    let rect = fit_rect(ui, w, h);
    ui.painter().image(
        texture_id,
        rect,
        egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
        Color32::WHITE,
    );
}

fn save_as(app: &mut EaselApp, index: usize) {
    let Some(item) = app.gallery.get(index) else { return };
    let Some(image) = item.image.clone() else { return };
    let default_name = item
        .path
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "easel.png".into());
    let Some(path) = rfd::FileDialog::new().add_filter("PNG image", &["png"]).set_file_name(default_name).save_file()
    else {
        return;
    };
    let chunks = [(easel_engine::metadata::PARAMETERS_KEYWORD, item.parameters.as_str())];
    let chunks: &[(&str, &str)] = if item.parameters.is_empty() { &[] } else { &chunks };
    // The native dialog already asked whether to replace an existing file.
    match easel_engine::metadata::write_png(&path, &image, chunks, true) {
        Ok(()) => app.notify(NoticeKind::Info, format!("Saved {}", path.display())),
        Err(e) => app.notify(NoticeKind::Error, format!("Could not save: {e}. Try another folder.")),
    }
}

fn gallery_strip(app: &mut EaselApp, ui: &mut egui::Ui) {
    const HEIGHT: f32 = 96.0;
    egui::ScrollArea::horizontal().show(ui, |ui| {
        ui.horizontal(|ui| {
            if app.gallery.is_empty() {
                ui.label(RichText::new("Finished images appear here, and stay across restarts.").weak());
            }
            let selected = match app.view {
                CentralView::Gallery(i) => Some(i),
                _ => None,
            };
            let mut clicked = None;
            let mut wanted = Vec::new();
            for (i, item) in app.gallery.iter().enumerate().rev() {
                let response = match item.strip_texture() {
                    Some(texture) => {
                        let [w, h] = texture.size();
                        let size = egui::vec2(HEIGHT * w as f32 / h.max(1) as f32, HEIGHT);
                        ui.add(
                            egui::Button::image(egui::Image::new((texture.id(), size))).selected(selected == Some(i)),
                        )
                    }
                    None => {
                        // Not decoded yet: a square placeholder; decoding starts once it is visible.
                        let (rect, response) = ui.allocate_exact_size(egui::vec2(HEIGHT, HEIGHT), egui::Sense::click());
                        if ui.is_rect_visible(rect) {
                            ui.painter().rect_filled(rect, 4.0, ui.visuals().faint_bg_color);
                            wanted.push(i);
                        }
                        response
                    }
                };
                let response = match &item.path {
                    Some(path) => response.on_hover_text(path.display().to_string()),
                    None => response,
                };
                if response.clicked() {
                    clicked = Some(i);
                }
            }
            for i in wanted {
                app.request_image(i, false);
            }
            if let Some(i) = clicked {
                app.view = CentralView::Gallery(i);
            }
        });
    });
}

/// Prompts Easel Mini can draw (its grammar: assets/models/easel-mini/README.md).
pub const EASEL_MINI_EXAMPLES: [&str; 5] = [
    "the sun over the sea at sunset",
    "a house with a tree",
    "mountains at night",
    "a blue square in the bottom right corner",
    "a red circle above a blue square",
];

/// What the window shows before the first image while Easel Mini is the model: what it is,
/// prompts to try, and the real models beside it.
fn easel_mini_welcome(app: &mut EaselApp, ui: &mut egui::Ui) {
    ui.vertical_centered(|ui| {
        ui.add_space(40.0);
        ui.heading(RichText::new("Welcome to Easel").size(28.0));
        ui.add_space(10.0);
        ui.label("Easel Mini is loaded: a small model that comes with Easel, so you can paint right away.");
        ui.label("It knows twelve colours, simple shapes, where to put them and a few scenes. Try:");
        ui.add_space(8.0);
        for example in EASEL_MINI_EXAMPLES {
            if ui.button(RichText::new(example).size(16.0)).clicked() {
                app.settings.prompt = example.to_string();
                app.generate();
            }
        }
        ui.add_space(16.0);
        ui.label("For real pictures, get a Stable Diffusion model (it stays on this computer):");
        ui.add_space(4.0);
        for curated in easel_engine::hub::CURATED {
            let downloading = app.downloads.get(curated.repo).is_some_and(|d| d.running);
            ui.horizontal(|ui| {
                ui.add_space((ui.available_width() - 320.0).max(0.0) / 2.0);
                match app.curated_local.get(curated.repo).cloned() {
                    Some(path) => {
                        if ui.button("Load").clicked() {
                            app.load_model(path);
                        }
                    }
                    None => {
                        if ui.add_enabled(!downloading, egui::Button::new("Download")).clicked() {
                            app.start_download(curated.repo);
                        }
                    }
                }
                ui.label(curated.title);
                if downloading {
                    ui.spinner();
                }
            });
        }
        ui.add_space(8.0);
        ui.label(RichText::new("Or open a model folder or checkpoint on the left, or drop one on this window.").weak());
    });
}

fn first_run(app: &mut EaselApp, ui: &mut egui::Ui) {
    ui.vertical_centered(|ui| {
        ui.add_space(60.0);
        ui.heading(RichText::new("Welcome to Easel").size(28.0));
        ui.add_space(12.0);
        ui.label("Easel needs a Stable Diffusion model: SD 1.x, SD 2.x, SDXL, SD-Turbo or SDXL-Turbo, as a diffusers folder or a single .safetensors checkpoint.");
        ui.add_space(12.0);
        if ui.add(egui::Button::new(RichText::new("Open a model folder…").size(18.0)).min_size([240.0, 40.0].into())).clicked() {
            if let Some(path) = rfd::FileDialog::new().set_title("Choose a diffusers model folder").pick_folder() {
                app.load_model(path);
            }
        }
        if ui.add(egui::Button::new(RichText::new("Open a checkpoint file…").size(18.0)).min_size([240.0, 40.0].into())).clicked() {
            if let Some(path) = rfd::FileDialog::new().set_title("Choose a .safetensors checkpoint").add_filter("Checkpoint", &["safetensors"]).pick_file() {
                app.load_model(path);
            }
        }
        ui.add_space(16.0);
        ui.label("No model yet? Download one in the Models panel on the left (SD-Turbo is small and makes an");
        ui.label("image in one step), or with `easel models download sd-turbo`. Models that diffusers or the");
        ui.label("Hugging Face CLI already downloaded are listed there too.");
        ui.add_space(8.0);
        ui.label("You can also drop a model folder or checkpoint, or a PNG to read its settings, onto this window.");
    });
}

/// Shows a folder in the platform's file manager.
fn open_in_file_manager(dir: &std::path::Path) -> std::io::Result<()> {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    // Not waited for: the file manager outlives this click.
    std::process::Command::new(program).arg(dir).spawn().map(drop)
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Local models (HF cache, models folder) to load, and the curated ones to download.
/// The LoRA folder: its files, what each is, and a click that puts `<lora:name:weight>` into
/// the prompt.
fn loras_panel(app: &mut EaselApp, ui: &mut egui::Ui) {
    let used = easel_engine::models::lora::extract_lora_tags(&app.settings.prompt).1.len();
    let title = if used > 0 { format!("LoRAs ({used} in the prompt)") } else { "LoRAs".to_string() };
    egui::CollapsingHeader::new(title).id_salt("loras").show(ui, |ui| {
        ui.horizontal(|ui| {
            let folder = app.settings.lora_dir.as_ref().map(|d| shorten(&d.display().to_string(), 28));
            ui.label(folder.unwrap_or_else(|| "no folder chosen".into()));
            if ui.button("Choose folder…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().set_title("LoRA folder").pick_folder() {
                    app.settings.lora_dir = Some(dir);
                    app.refresh_loras();
                }
            }
            if app.settings.lora_dir.is_some() && ui.button("Refresh").on_hover_text("Read the folder again").clicked()
            {
                app.refresh_loras();
            }
        });
        ui.horizontal(|ui| {
            ui.label("Weight");
            ui.add(egui::DragValue::new(&mut app.lora_weight).speed(0.05).range(-4.0..=4.0))
                .on_hover_text("The weight Add writes into the tag; edit it in the prompt afterwards");
        });
        let mut insert = None;
        for (path, kind) in &app.lora_files {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            ui.horizontal(|ui| match kind {
                Ok(kind) => {
                    let tag = format!("<lora:{name}:{}>", app.lora_weight);
                    if ui.button("Add").on_hover_text(format!("Put {tag} into the prompt")).clicked() {
                        insert = Some(path.clone());
                    }
                    ui.label(shorten(&name, 22));
                    ui.label(RichText::new(kind).small().weak());
                }
                Err(problem) => {
                    ui.add_enabled(false, egui::Button::new("Add"));
                    ui.label(shorten(&name, 22));
                    ui.colored_label(Color32::from_rgb(255, 120, 110), RichText::new(problem).small());
                }
            });
        }
        if app.settings.lora_dir.is_some() && app.lora_files.is_empty() {
            ui.label(RichText::new("No .safetensors files in this folder.").small().weak());
        }
        ui.label(RichText::new("Edit the weight in the prompt: <lora:name:0.8>").small().weak());
        if let Some(path) = insert {
            app.insert_lora(&path, app.lora_weight);
        }
    });
}

/// The embeddings folder: its textual-inversion files; a click writes a name into the prompt
/// or the negative prompt.
fn embeddings_panel(app: &mut EaselApp, ui: &mut egui::Ui) {
    egui::CollapsingHeader::new("Embeddings").id_salt("embeddings").show(ui, |ui| {
        ui.horizontal(|ui| {
            let folder = app.settings.embeddings_dir.as_ref().map(|d| shorten(&d.display().to_string(), 28));
            ui.label(folder.unwrap_or_else(|| "no folder chosen".into()));
            if ui.button("Choose folder…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().set_title("Embeddings folder").pick_folder() {
                    app.settings.embeddings_dir = Some(dir);
                    app.refresh_embeddings();
                }
            }
        });
        let mut insert = None;
        for path in &app.embedding_files {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            ui.horizontal(|ui| {
                if ui.small_button("Prompt").clicked() {
                    insert = Some((path.clone(), false));
                }
                if ui.small_button("Negative").clicked() {
                    insert = Some((path.clone(), true));
                }
                ui.label(shorten(&name, 24));
            });
        }
        if app.settings.embeddings_dir.is_some() && app.embedding_files.is_empty() {
            ui.label(RichText::new("No .safetensors embeddings in this folder.").small().weak());
        }
        if let Some((path, negative)) = insert {
            app.insert_embedding(&path, negative);
        }
    });
}

fn models_panel(app: &mut EaselApp, ui: &mut egui::Ui) {
    egui::CollapsingHeader::new("Models")
        .default_open(matches!(app.model, ModelState::None | ModelState::Failed { .. }))
        .show(ui, |ui| {
            let mut load = None;
            if app.local_models.is_empty() {
                ui.label(RichText::new("No models found in the Hugging Face cache or the models folder.").weak());
            }
            for model in &app.local_models {
                ui.horizontal(|ui| {
                    let usable = model.problem.is_none();
                    let button = ui.add_enabled(usable, egui::Button::new("Load"));
                    if button.clicked() {
                        load = Some(model.path.clone());
                    }
                    let kind = model.family.map(|f| f.to_string()).unwrap_or_else(|| "unusable".into());
                    let label = ui.label(format!("{} · {kind} · {}", model.name, gigabytes(model.size_bytes)));
                    if let Some(problem) = &model.problem {
                        label.on_hover_text(problem);
                    }
                });
            }
            if let Some(path) = load {
                app.load_model(path);
            }
            ui.horizontal(|ui| {
                if ui.button("Refresh").clicked() {
                    app.refresh_local_models();
                }
                if ui.button("Models folder…").clicked() {
                    if let Some(dir) = rfd::FileDialog::new().set_title("A folder of checkpoints").pick_folder() {
                        app.settings.models_dir = Some(dir);
                        app.refresh_local_models();
                    }
                }
            });
            ui.add_space(4.0);
            ui.label(RichText::new("Download (into the Hugging Face cache, shared with diffusers)").small());
            for curated in easel_engine::hub::CURATED {
                let state = app.downloads.get(curated.repo).cloned();
                ui.horizontal(|ui| match &state {
                    Some(s) if s.running => {
                        if ui.button("Cancel").clicked() {
                            app.cancel_download(curated.repo);
                        }
                        let (fraction, text) = match &s.progress {
                            Some(p) if p.total_expected > 0 => (
                                p.total_bytes as f32 / p.total_expected as f32,
                                format!(
                                    "{} / {} · {:.1} MB/s",
                                    gigabytes(p.total_bytes),
                                    gigabytes(p.total_expected),
                                    p.bytes_per_second / 1e6
                                ),
                            ),
                            _ => (0.0, "starting…".to_string()),
                        };
                        ui.add(egui::ProgressBar::new(fraction).text(text).desired_width(200.0));
                    }
                    _ => {
                        match app.curated_local.get(curated.repo).cloned() {
                            Some(path) => {
                                if ui.button("Load").clicked() {
                                    app.load_model(path);
                                }
                            }
                            None => {
                                let label = if state.as_ref().is_some_and(|s| s.error.is_some()) {
                                    "Retry"
                                } else {
                                    "Download"
                                };
                                if ui.button(label).clicked() {
                                    app.start_download(curated.repo);
                                }
                            }
                        }
                        ui.label(curated.title);
                    }
                });
            }
        });
}

/// Image to image: the init image (open one, or "Use as init image" on a gallery image), how
/// much of it is repainted, and how it is fitted to the image size.
fn init_image_panel(app: &mut EaselApp, ui: &mut egui::Ui) {
    let title = if app.init_image.is_some() { "Image to image (on)" } else { "Image to image" };
    egui::CollapsingHeader::new(title).id_salt("init-image").default_open(app.init_image.is_some()).show(ui, |ui| {
        let mut clear = false;
        let mut open_canvas = false;
        match &mut app.init_image {
            Some(init) => {
                let texture = init.texture.get_or_insert_with(|| {
                    ui.ctx().load_texture("init-image", color_image(&init.image), egui::TextureOptions::LINEAR)
                });
                let side = 128.0 / init.image.width.max(init.image.height) as f32;
                let size = egui::vec2(init.image.width as f32 * side, init.image.height as f32 * side);
                ui.horizontal(|ui| {
                    ui.add(egui::Image::new((texture.id(), size)));
                    ui.vertical(|ui| {
                        ui.label(shorten(&init.name, 24));
                        ui.label(RichText::new(format!("{}×{}", init.image.width, init.image.height)).small().weak());
                        clear = ui.button("Clear").on_hover_text("Start from noise again").clicked();
                    });
                });
                ui.add(egui::Slider::new(&mut app.settings.strength, 0.01..=1.0).text("Strength"))
                    .on_hover_text("How much is repainted: low keeps the picture, 1 repaints everything");
                let painted = !init.mask.is_empty();
                ui.horizontal(|ui| {
                    let label = if painted { "Edit mask" } else { "Paint mask" };
                    if ui.button(label).on_hover_text("Paint what to repaint (inpainting)").clicked() {
                        open_canvas = true;
                    }
                    let what = if painted { "inpainting the painted area" } else { "no mask: image to image" };
                    ui.label(RichText::new(what).small().weak());
                });
                ui.horizontal(|ui| {
                    ui.label("Extend");
                    let o = &mut init.outpaint;
                    for (value, side) in
                        [(&mut o.left, "left"), (&mut o.top, "top"), (&mut o.right, "right"), (&mut o.bottom, "bottom")]
                    {
                        ui.add(egui::DragValue::new(value).speed(8.0).range(0..=1024).suffix(" px"))
                            .on_hover_text(format!("Outpainting: pixels added on the {side}"));
                    }
                });
                if painted || !init.outpaint.is_none() {
                    ui.add(egui::Slider::new(&mut app.settings.mask_blur, 0.0..=64.0).text("Mask blur"))
                        .on_hover_text("Soft edge of the mask in pixels; 0 leaves a hard edge");
                    ui.horizontal(|ui| {
                        ui.checkbox(&mut app.settings.inpaint_only_masked, "Only masked").on_hover_text(
                            "Render only the masked area (plus padding) at the full size, then paste it back",
                        );
                        if app.settings.inpaint_only_masked {
                            ui.add(
                                egui::DragValue::new(&mut app.settings.inpaint_padding).range(0..=256).suffix(" px"),
                            )
                            .on_hover_text("Padding around the masked area");
                        }
                    });
                }
                egui::ComboBox::from_label("Resize mode")
                    .selected_text(app.settings.resize_mode.label())
                    .show_ui(ui, |ui| {
                        for mode in ResizeMode::ALL {
                            ui.selectable_value(&mut app.settings.resize_mode, mode, mode.label());
                        }
                    })
                    .response
                    .on_hover_text("How an init image of another size is fitted to the image size");
            }
            None => {
                ui.label(RichText::new("Start from a picture instead of noise.").small());
                if ui.button("Open image…").clicked() {
                    if let Some(path) = rfd::FileDialog::new().add_filter("PNG", &["png"]).pick_file() {
                        app.open_init_image(&path);
                    }
                }
                ui.label(RichText::new("or \"Use as init image\" on a gallery image").small().weak());
            }
        }
        if clear {
            app.clear_init_image();
        }
        if open_canvas {
            app.view = CentralView::Canvas;
        }
    });
    if app.init_image.is_none() {
        hires_panel(app, ui);
    }
}

/// A1111's "Hires. fix": paint at the size, upscale, repaint at a strength.
fn hires_panel(app: &mut EaselApp, ui: &mut egui::Ui) {
    let s = &mut app.settings;
    let title = if s.hires_enabled { "Hires fix (on)" } else { "Hires fix" };
    egui::CollapsingHeader::new(title).id_salt("hires-fix").default_open(s.hires_enabled).show(ui, |ui| {
        ui.checkbox(&mut s.hires_enabled, "Upscale and repaint")
            .on_hover_text("Paint at the image size, then upscale and paint the details at the larger size");
        ui.add_enabled_ui(s.hires_enabled, |ui| {
            ui.add(egui::Slider::new(&mut s.hires_scale, 1.0..=4.0).step_by(0.05).text("Upscale by"));
            let (w, h) =
                ((s.width as f64 * s.hires_scale) as usize / 8 * 8, (s.height as f64 * s.hires_scale) as usize / 8 * 8);
            ui.label(RichText::new(format!("makes {w}×{h}")).small().weak());
            ui.add(egui::Slider::new(&mut s.hires_denoise, 0.01..=1.0).text("Denoising strength"));
            ui.add(egui::DragValue::new(&mut s.hires_steps).range(0..=150).prefix("Hires steps "))
                .on_hover_text("0: as many as the first pass");
            egui::ComboBox::from_label("Upscaler").selected_text(s.hires_upscaler.a1111_name()).show_ui(ui, |ui| {
                for upscaler in HiresUpscaler::ALL {
                    ui.selectable_value(&mut s.hires_upscaler, upscaler, upscaler.a1111_name());
                }
            });
        });
    });
}
