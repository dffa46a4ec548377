//! Inpainting and outpainting around the denoising loop: the mask (white = repaint), its blur,
//! A1111's "only masked" crop, the overlay that pastes the result back, and the canvas that
//! outpainting extends. The numbers follow diffusers' `VaeImageProcessor` (`get_crop_region`,
//! binarising at 0.5, `apply_overlay`), so a job without blur is diffusers' pipeline exactly.

use image::{imageops, GrayImage, ImageBuffer, Luma};

use super::fit::{fit_image, ResizeMode};
use super::{GenerationRequest, ImageToImage};
use crate::metadata::{GenerationParams, RgbImage};
use crate::{Error, Result};

/// A grey mask the size of its image: 255 repaints, 0 keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Mask {
    /// An all-keep mask.
    pub fn empty(width: u32, height: u32) -> Self {
        Mask { width, height, data: vec![0; width as usize * height as usize] }
    }

    /// The grey of an RGB picture, as PIL's `convert("L")` (ITU-R 601, integer rounding), which
    /// diffusers' mask processor applies to colour masks.
    pub fn from_rgb(image: &RgbImage) -> Self {
        let data = image
            .data
            .chunks_exact(3)
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect();
        Mask { width: image.width, height: image.height, data }
    }

    /// The mask as a grey RGB picture (to resize it as images are).
    fn to_rgb(&self) -> RgbImage {
        RgbImage { width: self.width, height: self.height, data: self.data.iter().flat_map(|&v| [v, v, v]).collect() }
    }

    fn check(&self) -> Result<()> {
        if self.data.len() != self.width as usize * self.height as usize {
            return Err(Error::InvalidSetting(format!("the mask's pixels do not fill {}×{}", self.width, self.height)));
        }
        Ok(())
    }

    /// Whether pixel `i` is repainted once binarised (diffusers: value / 255 ≥ 0.5).
    pub fn repaints(value: u8) -> bool {
        value >= 128
    }

    /// How many pixels are repainted.
    pub fn repainted_pixels(&self) -> usize {
        self.data.iter().filter(|&&v| Self::repaints(v)).count()
    }

    /// Repaint and keep swapped.
    pub fn inverted(&self) -> Self {
        Mask { data: self.data.iter().map(|&v| 255 - v).collect(), ..self.clone() }
    }

    /// The mask softened by a Gaussian of `sigma` pixels (A1111's "Mask blur"; 0 leaves it).
    pub fn blurred(&self, sigma: f64) -> Result<Self> {
        self.check()?;
        if sigma <= 0.0 {
            return Ok(self.clone());
        }
        let gray: GrayImage = ImageBuffer::<Luma<u8>, _>::from_raw(self.width, self.height, self.data.clone())
            .ok_or_else(|| Error::InvalidSetting("the mask's pixels do not fill it".into()))?;
        let soft = imageops::blur(&gray, sigma as f32);
        Ok(Mask { width: self.width, height: self.height, data: soft.into_raw() })
    }

    /// 0 or 255 only, at diffusers' threshold.
    pub fn binarized(&self) -> Self {
        Mask { data: self.data.iter().map(|&v| if Self::repaints(v) { 255 } else { 0 }).collect(), ..self.clone() }
    }

    /// The mask sampled at the latents' size as `F.interpolate(mask, size)` (nearest: the pixel
    /// at `floor(i × in / out)`), as 0.0 / 1.0 after binarising.
    pub fn latent_mask(&self, latent_width: usize, latent_height: usize) -> Vec<f32> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut out = Vec::with_capacity(latent_width * latent_height);
        for y in 0..latent_height {
            let sy = (y * h / latent_height).min(h - 1);
            for x in 0..latent_width {
                let sx = (x * w / latent_width).min(w - 1);
                out.push(if Self::repaints(self.data[sy * w + sx]) { 1.0 } else { 0.0 });
            }
        }
        out
    }

    fn crop(&self, region: &CropRegion) -> Self {
        let mut data = Vec::with_capacity((region.width() * region.height()) as usize);
        for y in region.y1..region.y2 {
            let row = (y * self.width) as usize;
            data.extend_from_slice(&self.data[row + region.x1 as usize..row + region.x2 as usize]);
        }
        Mask { width: region.width(), height: region.height(), data }
    }
}

/// Which part of the picture is rendered (A1111's "Inpaint area").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InpaintArea {
    /// The whole picture at the requested size.
    #[default]
    Whole,
    /// Only the masked region plus `padding` pixels, rendered at the requested size and pasted
    /// back (A1111's "Only masked", diffusers' `padding_mask_crop`).
    Masked { padding: u32 },
}

impl InpaintArea {
    pub fn id(&self) -> &'static str {
        match self {
            InpaintArea::Whole => "whole",
            InpaintArea::Masked { .. } => "masked",
        }
    }
}

/// An inpainting job: the picture, what to repaint, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Inpaint {
    /// At the request's size.
    pub image: RgbImage,
    /// The picture's size; white repaints.
    pub mask: Mask,
    /// 0 < strength ≤ 1, as in image to image.
    pub strength: f64,
    /// Gaussian sigma in pixels; 0 renders diffusers' hard-edged result with no overlay.
    pub mask_blur: f64,
    pub area: InpaintArea,
}

impl Inpaint {
    /// Checks everything before any work starts.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        ImageToImage { image: self.image.clone(), strength: self.strength }.validate(req)?;
        self.mask.check()?;
        if (self.mask.width, self.mask.height) != (self.image.width, self.image.height) {
            return Err(Error::InvalidSetting(format!(
                "the mask is {}×{} but the image {}×{}: they must be the same size",
                self.mask.width, self.mask.height, self.image.width, self.image.height
            )));
        }
        if !(self.mask_blur.is_finite() && (0.0..=64.0).contains(&self.mask_blur)) {
            return Err(Error::InvalidSetting(format!(
                "the mask blur must be from 0 to 64 pixels, got {}",
                self.mask_blur
            )));
        }
        if self.mask.repainted_pixels() == 0 {
            return Err(Error::InvalidSetting(
                "the mask is all black: nothing to repaint (white marks what to repaint)".into(),
            ));
        }
        Ok(())
    }

    /// The mask after its blur: what the overlay blends with and the model sees binarised.
    pub fn soft_mask(&self) -> Result<Mask> {
        self.mask.blurred(self.mask_blur)
    }

    /// Writes the inpainting settings in AUTOMATIC1111's words.
    pub fn write_params(&self, params: &mut GenerationParams) {
        params.denoising_strength = Some(self.strength);
        params.extra.push(("Mask blur".into(), format!("{}", self.mask_blur)));
        if let InpaintArea::Masked { padding } = self.area {
            params.extra.push(("Inpaint area".into(), "Only masked".into()));
            params.extra.push(("Masked area padding".into(), padding.to_string()));
        }
    }
}

/// A rectangle of the picture, `x1..x2` × `y1..y2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRegion {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

impl CropRegion {
    pub fn width(&self) -> u32 {
        self.x2 - self.x1
    }

    pub fn height(&self) -> u32 {
        self.y2 - self.y1
    }
}

/// The region "only masked" renders, as diffusers' `VaeImageProcessor.get_crop_region`: the
/// box around every non-zero mask pixel, grown by `pad`, then widened or heightened to the
/// processing size's aspect ratio, kept inside the picture. `None` when the mask is empty.
pub fn crop_region(mask: &Mask, width: u32, height: u32, pad: u32) -> Option<CropRegion> {
    let (w, h) = (mask.width as i64, mask.height as i64);
    let at = |x: i64, y: i64| mask.data[(y * w + x) as usize];
    let column_used = |x: i64| (0..h).any(|y| at(x, y) != 0);
    let row_used = |y: i64| (0..w).any(|x| at(x, y) != 0);
    let left = (0..w).find(|&x| column_used(x))?;
    let right = (0..w).rev().find(|&x| column_used(x))?;
    let top = (0..h).find(|&y| row_used(y))?;
    let bottom = (0..h).rev().find(|&y| row_used(y))?;
    let pad = pad as i64;
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + 1 + pad).min(w), (bottom + 1 + pad).min(h));
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = width as f64 / height as f64;
    if ratio_crop > ratio_processing {
        (y1, y2) = widen(y1, y2, (x2 - x1) as f64 / ratio_processing, h);
    } else {
        (x1, x2) = widen(x1, x2, (y2 - y1) as f64 * ratio_processing, w);
    }
    Some(CropRegion { x1: x1.max(0) as u32, y1: y1.max(0) as u32, x2: x2.min(w) as u32, y2: y2.min(h) as u32 })
}

/// `lo..hi` grown evenly to `desired` and shifted back inside `0..limit`: diffusers' arithmetic
/// in `get_crop_region`, step for step (its `>=` edge checks included).
fn widen(mut lo: i64, mut hi: i64, desired: f64, limit: i64) -> (i64, i64) {
    let diff = (desired - (hi - lo) as f64) as i64;
    lo -= diff / 2;
    hi += diff - diff / 2;
    if hi >= limit {
        let over = hi - limit;
        hi -= over;
        lo -= over;
    }
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    if hi >= limit {
        hi = limit;
    }
    (lo, hi)
}

/// `image` cut to `region`.
pub fn crop_image(image: &RgbImage, region: &CropRegion) -> RgbImage {
    let mut data = Vec::with_capacity((region.width() * region.height() * 3) as usize);
    for y in region.y1..region.y2 {
        let row = (y * image.width * 3) as usize;
        data.extend_from_slice(&image.data[row + region.x1 as usize * 3..row + region.x2 as usize * 3]);
    }
    RgbImage { width: region.width(), height: region.height(), data }
}

/// The picture and mask "only masked" renders: both cut to `region` and fitted to the
/// processing size (diffusers' `resize_mode="fill"`).
pub fn crop_for_processing(
    image: &RgbImage,
    mask: &Mask,
    region: &CropRegion,
    width: u32,
    height: u32,
) -> Result<(RgbImage, Mask)> {
    let picture = fit_image(&crop_image(image, region), width, height, ResizeMode::Fill)?;
    let grey = fit_image(&mask.crop(region).to_rgb(), width, height, ResizeMode::Fill)?;
    Ok((picture, Mask::from_rgb(&grey)))
}

/// The generated picture over the original through the mask, as diffusers' `apply_overlay`:
/// the original where the mask is black, the new picture where white, blended between. With
/// `region`, `generated` is the rendered crop and is first fitted back into it.
pub fn overlay(
    original: &RgbImage,
    generated: &RgbImage,
    mask: &Mask,
    region: Option<&CropRegion>,
) -> Result<RgbImage> {
    mask.check()?;
    if (mask.width, mask.height) != (original.width, original.height) {
        return Err(Error::InvalidSetting("the overlay mask and the picture differ in size".into()));
    }
    let placed = match region {
        Some(r) => {
            let fitted = fit_image(generated, r.width(), r.height(), ResizeMode::Crop)?;
            // Outside the region stays black, as diffusers pastes into a blank canvas (the
            // mask is black there, so none of it shows).
            let mut canvas = RgbImage { data: vec![0; original.data.len()], ..original.clone() };
            for y in 0..r.height() {
                let src = (y * r.width() * 3) as usize;
                let dst = (((r.y1 + y) * original.width + r.x1) * 3) as usize;
                let n = r.width() as usize * 3;
                canvas.data[dst..dst + n].copy_from_slice(&fitted.data[src..src + n]);
            }
            canvas
        }
        None if (generated.width, generated.height) == (original.width, original.height) => generated.clone(),
        None => return Err(Error::InvalidSetting("the generated and original pictures differ in size".into())),
    };
    let data = original
        .data
        .iter()
        .zip(&placed.data)
        .enumerate()
        .map(|(i, (&keep, &new))| {
            let a = mask.data[i / 3] as u32;
            ((keep as u32 * (255 - a) + new as u32 * a + 127) / 255) as u8
        })
        .collect();
    Ok(RgbImage { width: original.width, height: original.height, data })
}

/// How far outpainting extends each side, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outpaint {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

impl Outpaint {
    pub fn is_none(&self) -> bool {
        self.left == 0 && self.top == 0 && self.right == 0 && self.bottom == 0
    }

    /// The canvas size for a picture of `width` × `height`.
    pub fn extended_size(&self, width: u32, height: u32) -> (u32, u32) {
        (width + self.left + self.right, height + self.top + self.bottom)
    }

    /// The picture on a larger canvas whose new border repeats its nearest edge pixels (so
    /// image to image keeps the colours going), and the mask that repaints that border.
    pub fn extend(&self, image: &RgbImage) -> Result<(RgbImage, Mask)> {
        if image.width == 0 || image.height == 0 || image.data.len() != (image.width * image.height * 3) as usize {
            return Err(Error::InvalidSetting("the picture to outpaint is empty or broken".into()));
        }
        let (w, h) = self.extended_size(image.width, image.height);
        if w as usize > super::MAX_SIDE || h as usize > super::MAX_SIDE {
            return Err(Error::InvalidSetting(format!(
                "outpainting to {w}×{h} is larger than {} pixels a side",
                super::MAX_SIDE
            )));
        }
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        let mut mask = Vec::with_capacity((w * h) as usize);
        for y in 0..h {
            let inside_y = y >= self.top && y < self.top + image.height;
            let sy = y.saturating_sub(self.top).min(image.height - 1);
            for x in 0..w {
                let inside = inside_y && x >= self.left && x < self.left + image.width;
                let sx = x.saturating_sub(self.left).min(image.width - 1);
                let i = ((sy * image.width + sx) * 3) as usize;
                data.extend_from_slice(&image.data[i..i + 3]);
                mask.push(if inside { 0 } else { 255 });
            }
        }
        Ok((RgbImage { width: w, height: h, data }, Mask { width: w, height: h, data: mask }))
    }

    /// `mask` on the larger canvas, the new border kept (black): for a mask painted before.
    pub fn extend_mask(&self, mask: &Mask) -> Mask {
        let (w, h) = self.extended_size(mask.width, mask.height);
        let mut out = Mask::empty(w, h);
        for y in 0..mask.height {
            let src = (y * mask.width) as usize;
            let dst = ((y + self.top) * w + self.left) as usize;
            out.data[dst..dst + mask.width as usize].copy_from_slice(&mask.data[src..src + mask.width as usize]);
        }
        out
    }

    /// `left,top,right,bottom` in pixels (one number extends every side by it).
    pub fn parse(text: &str) -> Result<Self> {
        let numbers: std::result::Result<Vec<u32>, _> = text.split(',').map(|n| n.trim().parse::<u32>()).collect();
        match numbers.as_deref() {
            Ok([all]) => Ok(Outpaint { left: *all, top: *all, right: *all, bottom: *all }),
            Ok([left, top, right, bottom]) => Ok(Outpaint { left: *left, top: *top, right: *right, bottom: *bottom }),
            _ => Err(Error::InvalidSetting(format!(
                "outpaint takes LEFT,TOP,RIGHT,BOTTOM in pixels (or one number for all four), got {text:?}"
            ))),
        }
    }

    /// `left,top,right,bottom`, as `parse` reads it.
    pub fn to_param(&self) -> String {
        format!("{},{},{},{}", self.left, self.top, self.right, self.bottom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_with_box(w: u32, h: u32, x1: u32, y1: u32, x2: u32, y2: u32) -> Mask {
        let mut m = Mask::empty(w, h);
        for y in y1..y2 {
            for x in x1..x2 {
                m.data[(y * w + x) as usize] = 255;
            }
        }
        m
    }

    #[test]
    fn the_crop_region_follows_diffusers() {
        // Values from diffusers 0.42 `VaeImageProcessor.get_crop_region` on the same masks.
        let m = mask_with_box(64, 64, 20, 24, 36, 32);
        assert_eq!(crop_region(&m, 64, 64, 4), Some(CropRegion { x1: 16, y1: 16, x2: 40, y2: 40 }));
        assert_eq!(crop_region(&m, 64, 32, 0), Some(CropRegion { x1: 20, y1: 24, x2: 36, y2: 32 }));
        // Near an edge the box is shifted back inside.
        let m = mask_with_box(64, 64, 56, 2, 64, 6);
        assert_eq!(crop_region(&m, 64, 64, 2), Some(CropRegion { x1: 54, y1: 0, x2: 64, y2: 10 }));
        assert_eq!(crop_region(&Mask::empty(8, 8), 8, 8, 0), None);
    }

    #[test]
    fn the_latent_mask_takes_every_eighth_pixel_binarised() {
        let mut m = mask_with_box(16, 16, 8, 0, 16, 8);
        m.data[0] = 127; // below the threshold: kept
        m.data[8 * 16] = 128; // at it: repainted
        assert_eq!(m.latent_mask(2, 2), vec![0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn the_overlay_keeps_the_original_where_the_mask_is_black() {
        let original = RgbImage { width: 2, height: 1, data: vec![10, 20, 30, 40, 50, 60] };
        let generated = RgbImage { width: 2, height: 1, data: vec![200, 200, 200, 0, 0, 0] };
        let mask = Mask { width: 2, height: 1, data: vec![0, 255] };
        assert_eq!(overlay(&original, &generated, &mask, None).unwrap().data, vec![10, 20, 30, 0, 0, 0]);
        let half = Mask { width: 2, height: 1, data: vec![128, 128] };
        assert_eq!(overlay(&original, &generated, &half, None).unwrap().data[0], 105);
    }

    #[test]
    fn outpainting_extends_the_canvas_and_masks_the_border() {
        let image = RgbImage { width: 2, height: 1, data: vec![1, 2, 3, 4, 5, 6] };
        let (big, mask) = Outpaint { left: 1, top: 0, right: 0, bottom: 1 }.extend(&image).unwrap();
        assert_eq!((big.width, big.height), (3, 2));
        assert_eq!(big.data, vec![1, 2, 3, 1, 2, 3, 4, 5, 6, 1, 2, 3, 1, 2, 3, 4, 5, 6]);
        assert_eq!(mask.data, vec![255, 0, 0, 255, 255, 255]);
        assert_eq!(Outpaint::parse("8").unwrap(), Outpaint { left: 8, top: 8, right: 8, bottom: 8 });
        assert_eq!(Outpaint::parse("0, 8,16,0").unwrap().to_param(), "0,8,16,0");
        assert!(Outpaint::parse("1,2,3").is_err());
        assert!(Outpaint::parse("-8").is_err());
    }

    #[test]
    fn blur_softens_and_colour_masks_turn_grey_as_pil_does() {
        let m = mask_with_box(32, 32, 16, 0, 32, 32).blurred(2.0).unwrap();
        assert!(m.data[15] > 0 && m.data[15] < 255 && m.data[0] == 0 && m.data[31] == 255);
        let rgb = RgbImage { width: 2, height: 1, data: vec![255, 255, 255, 255, 0, 0] };
        assert_eq!(Mask::from_rgb(&rgb).data, vec![255, 76]);
    }
}
