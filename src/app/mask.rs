//! The inpainting mask an artist paints over the init image: brush and eraser, clear, invert,
//! undo, and the red tint it is shown as. Runtime state only (never persisted).
//!
//! Painting touches a few thousand pixels a frame, so only the rectangle a stroke changed is
//! sent to the GPU (`TextureHandle::set_partial`), not the whole mask: at 1024² a full upload
//! is 4 MB a frame, a brush dab's rectangle a few KB (see benches/mask_painting.rs).

use easel_engine::pipeline::inpaint::Mask;
use eframe::egui;

/// What a stroke does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tool {
    #[default]
    Brush,
    Eraser,
}

/// How many edits can be undone (each keeps a copy of the mask: 1 MB at 1024²).
const UNDO_DEPTH: usize = 30;
/// The tint of repainted pixels, at full mask (premultiplied by the mask value / 2).
const TINT: [u8; 3] = [255, 48, 64];

/// A rectangle of mask pixels, `x1..x2` × `y1..y2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dirty {
    x1: usize,
    y1: usize,
    x2: usize,
    y2: usize,
}

impl Dirty {
    fn union(self, other: Dirty) -> Dirty {
        Dirty {
            x1: self.x1.min(other.x1),
            y1: self.y1.min(other.y1),
            x2: self.x2.max(other.x2),
            y2: self.y2.max(other.y2),
        }
    }
}

pub struct MaskCanvas {
    mask: Mask,
    undo: Vec<Vec<u8>>,
    pub tool: Tool,
    texture: Option<egui::TextureHandle>,
    /// Changed since the texture was last updated.
    dirty: Option<Dirty>,
    /// The previous point of the stroke under way, in mask pixels.
    last: Option<(f32, f32)>,
}

impl MaskCanvas {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            mask: Mask::empty(width, height),
            undo: Vec::new(),
            tool: Tool::Brush,
            texture: None,
            dirty: None,
            last: None,
        }
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    pub fn size(&self) -> (u32, u32) {
        (self.mask.width, self.mask.height)
    }

    /// Nothing is painted: the job is image to image, not inpainting.
    pub fn is_empty(&self) -> bool {
        self.mask.data.iter().all(|&v| v == 0)
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    fn remember(&mut self) {
        if self.undo.len() == UNDO_DEPTH {
            self.undo.remove(0);
        }
        self.undo.push(self.mask.data.clone());
    }

    fn touch_all(&mut self) {
        self.dirty = Some(Dirty { x1: 0, y1: 0, x2: self.mask.width as usize, y2: self.mask.height as usize });
    }

    /// Starts a stroke at `(x, y)` (mask pixels): one undo step for the whole stroke.
    pub fn begin_stroke(&mut self, x: f32, y: f32, diameter: f32) {
        self.remember();
        self.last = Some((x, y));
        self.stroke_to(x, y, diameter);
    }

    /// Paints (or erases) a round-ended line from the stroke's last point to `(x, y)`.
    pub fn stroke_to(&mut self, x: f32, y: f32, diameter: f32) {
        let Some((x0, y0)) = self.last.replace((x, y)) else { return };
        let value = match self.tool {
            Tool::Brush => 255,
            Tool::Eraser => 0,
        };
        let r = (diameter / 2.0).max(0.5);
        let (w, h) = (self.mask.width as f32, self.mask.height as f32);
        let x1 = (x0.min(x) - r).floor().clamp(0.0, w) as usize;
        let x2 = (x0.max(x) + r).ceil().clamp(0.0, w) as usize;
        let y1 = (y0.min(y) - r).floor().clamp(0.0, h) as usize;
        let y2 = (y0.max(y) + r).ceil().clamp(0.0, h) as usize;
        if x1 >= x2 || y1 >= y2 {
            return;
        }
        let (dx, dy) = (x - x0, y - y0);
        let length2 = dx * dx + dy * dy;
        let width = self.mask.width as usize;
        for py in y1..y2 {
            for px in x1..x2 {
                // Distance from the pixel's centre to the segment.
                let (cx, cy) = (px as f32 + 0.5 - x0, py as f32 + 0.5 - y0);
                let t = if length2 > 0.0 { ((cx * dx + cy * dy) / length2).clamp(0.0, 1.0) } else { 0.0 };
                let (ex, ey) = (cx - t * dx, cy - t * dy);
                if ex * ex + ey * ey <= r * r {
                    self.mask.data[py * width + px] = value;
                }
            }
        }
        let changed = Dirty { x1, y1, x2, y2 };
        self.dirty = Some(self.dirty.map_or(changed, |d| d.union(changed)));
    }

    pub fn end_stroke(&mut self) {
        self.last = None;
    }

    pub fn clear(&mut self) {
        if !self.is_empty() {
            self.remember();
            self.mask.data.fill(0);
            self.touch_all();
        }
    }

    pub fn invert(&mut self) {
        self.remember();
        self.mask = self.mask.inverted();
        self.touch_all();
    }

    pub fn undo(&mut self) {
        if let Some(previous) = self.undo.pop() {
            self.mask.data = previous;
            self.touch_all();
        }
    }

    /// The tint of `rect`'s pixels as an egui image.
    fn tint(&self, d: Dirty) -> egui::ColorImage {
        let width = self.mask.width as usize;
        let mut pixels = Vec::with_capacity((d.x2 - d.x1) * (d.y2 - d.y1));
        for y in d.y1..d.y2 {
            for &m in &self.mask.data[y * width + d.x1..y * width + d.x2] {
                let a = m / 2;
                let scale = |c: u8| ((c as u16 * a as u16) / 255) as u8;
                pixels.push(egui::Color32::from_rgba_premultiplied(scale(TINT[0]), scale(TINT[1]), scale(TINT[2]), a));
            }
        }
        egui::ColorImage::new([d.x2 - d.x1, d.y2 - d.y1], pixels)
    }

    /// The tint texture, brought up to date by sending only what changed since the last frame.
    pub fn texture(&mut self, ctx: &egui::Context) -> egui::TextureId {
        let options = egui::TextureOptions::NEAREST;
        let dirty = self.dirty.take();
        if let (Some(texture), Some(d)) = (&self.texture, dirty) {
            let mut texture = texture.clone();
            texture.set_partial([d.x1, d.y1], self.tint(d), options);
        }
        if let Some(texture) = &self.texture {
            return texture.id();
        }
        let all = Dirty { x1: 0, y1: 0, x2: self.mask.width as usize, y2: self.mask.height as usize };
        let texture = ctx.load_texture("inpaint-mask", self.tint(all), options);
        let id = texture.id();
        self.texture = Some(texture);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stroke_paints_a_round_ended_line_and_undo_takes_it_back() {
        let mut canvas = MaskCanvas::new(64, 64);
        canvas.begin_stroke(10.0, 32.0, 8.0);
        canvas.stroke_to(50.0, 32.0, 8.0);
        canvas.end_stroke();
        let at = |c: &MaskCanvas, x: usize, y: usize| c.mask().data[y * 64 + x];
        assert_eq!((at(&canvas, 30, 32), at(&canvas, 30, 35), at(&canvas, 30, 37)), (255, 255, 0));
        assert_eq!((at(&canvas, 7, 32), at(&canvas, 54, 32), at(&canvas, 56, 32)), (255, 0, 0));
        canvas.tool = Tool::Eraser;
        canvas.begin_stroke(30.0, 32.0, 4.0);
        canvas.end_stroke();
        assert_eq!(at(&canvas, 30, 32), 0);
        canvas.undo();
        assert_eq!(at(&canvas, 30, 32), 255);
        canvas.invert();
        assert_eq!((at(&canvas, 30, 32), at(&canvas, 0, 0)), (0, 255));
        canvas.undo();
        canvas.undo();
        assert!(canvas.is_empty() && !canvas.can_undo());
    }

    #[test]
    fn only_the_changed_rectangle_is_uploaded() {
        let ctx = egui::Context::default();
        let mut canvas = MaskCanvas::new(256, 256);
        let mut id = None;
        let mut first = ctx.run_ui(Default::default(), |ui| {
            id = Some(canvas.texture(ui.ctx()));
        });
        first.textures_delta.clear();
        canvas.begin_stroke(100.0, 100.0, 10.0);
        canvas.stroke_to(120.0, 104.0, 10.0);
        assert_eq!(canvas.dirty, Some(Dirty { x1: 95, y1: 95, x2: 125, y2: 109 }));
        let mut out = ctx.run_ui(Default::default(), |ui| {
            canvas.texture(ui.ctx());
        });
        let deltas: Vec<_> = out.textures_delta.set.get(&id.unwrap()).into_iter().flatten().collect();
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].pos, Some([95, 95]));
        assert_eq!(deltas[0].image.size(), [30, 14]);
        out.textures_delta.clear();
        assert!(canvas.dirty.is_none());
    }
}
