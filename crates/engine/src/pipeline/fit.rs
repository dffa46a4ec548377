//! Fitting an init image to the size a job asks for, in AUTOMATIC1111's three ways.

use std::fmt;
use std::str::FromStr;

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Rgb};

use crate::metadata::RgbImage;
use crate::{Error, Result};

/// How an init image of another size is fitted (A1111's "Resize mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// Stretched to the size ("Just resize").
    #[default]
    Resize,
    /// Scaled to cover the size, the overflow cut off evenly ("Crop and resize").
    Crop,
    /// Scaled to fit inside, the empty bands filled by stretching its edges ("Resize and fill").
    Fill,
}

impl ResizeMode {
    pub const ALL: [ResizeMode; 3] = [ResizeMode::Resize, ResizeMode::Crop, ResizeMode::Fill];

    pub fn id(&self) -> &'static str {
        match self {
            ResizeMode::Resize => "resize",
            ResizeMode::Crop => "crop",
            ResizeMode::Fill => "fill",
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            ResizeMode::Resize => "Just resize",
            ResizeMode::Crop => "Crop and resize",
            ResizeMode::Fill => "Resize and fill",
        }
    }
}

impl fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for ResizeMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.id().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::InvalidSetting(format!("unknown resize mode {s:?}; expected resize, crop or fill")))
    }
}

fn buffer(image: &RgbImage) -> Result<ImageBuffer<Rgb<u8>, Vec<u8>>> {
    ImageBuffer::from_raw(image.width, image.height, image.data.clone()).ok_or_else(|| {
        Error::InvalidSetting(format!("the image's pixels do not fill {}×{}", image.width, image.height))
    })
}

fn lanczos(image: &ImageBuffer<Rgb<u8>, Vec<u8>>, width: u32, height: u32) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    imageops::resize(image, width.max(1), height.max(1), FilterType::Lanczos3)
}

/// `image` at `width` × `height`, fitted as `mode` says (unchanged when it has that size).
pub fn fit_image(image: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> Result<RgbImage> {
    if width == 0 || height == 0 || image.width == 0 || image.height == 0 {
        return Err(Error::InvalidSetting(format!(
            "cannot fit a {}×{} image to {width}×{height}",
            image.width, image.height
        )));
    }
    if (image.width, image.height) == (width, height) {
        return Ok(image.clone());
    }
    let source = buffer(image)?;
    let (iw, ih) = (image.width as f64, image.height as f64);
    let scaled = |ratio: f64| ((iw * ratio).round() as u32, (ih * ratio).round() as u32);
    let out = match mode {
        ResizeMode::Resize => lanczos(&source, width, height),
        ResizeMode::Crop => {
            let (sw, sh) = scaled((width as f64 / iw).max(height as f64 / ih));
            let (sw, sh) = (sw.max(width), sh.max(height));
            let big = lanczos(&source, sw, sh);
            imageops::crop_imm(&big, (sw - width) / 2, (sh - height) / 2, width, height).to_image()
        }
        ResizeMode::Fill => {
            let (sw, sh) = scaled((width as f64 / iw).min(height as f64 / ih));
            let (sw, sh) = (sw.clamp(1, width), sh.clamp(1, height));
            let small = lanczos(&source, sw, sh);
            let (x0, y0) = ((width - sw) / 2, (height - sh) / 2);
            // Each pixel outside takes the colour of the nearest edge pixel of the picture.
            ImageBuffer::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(x0).min(sw - 1);
                let sy = y.saturating_sub(y0).min(sh - 1);
                *small.get_pixel(sx, sy)
            })
        }
    };
    Ok(RgbImage { width, height, data: out.into_raw() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w`×`h` image whose left half is red and right half blue.
    fn halves(w: u32, h: u32) -> RgbImage {
        let data = (0..h).flat_map(|_| (0..w).flat_map(move |x| if x < w / 2 { [255, 0, 0] } else { [0, 0, 255] }));
        RgbImage { width: w, height: h, data: data.collect() }
    }

    fn pixel(image: &RgbImage, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * image.width + x) * 3) as usize;
        [image.data[i], image.data[i + 1], image.data[i + 2]]
    }

    #[test]
    fn each_mode_fits_a_wide_image_into_a_square() {
        let wide = halves(128, 64);
        for mode in ResizeMode::ALL {
            let out = fit_image(&wide, 64, 64, mode).unwrap();
            assert_eq!((out.width, out.height, out.data.len()), (64, 64, 64 * 64 * 3), "{mode}");
        }
        // Stretched and cropped: red on the left, blue on the right, top to bottom.
        for mode in [ResizeMode::Resize, ResizeMode::Crop] {
            let out = fit_image(&wide, 64, 64, mode).unwrap();
            assert_eq!(pixel(&out, 2, 2), [255, 0, 0], "{mode}");
            assert_eq!(pixel(&out, 61, 61), [0, 0, 255], "{mode}");
        }
        // Filled: the picture in the middle band (rows 16..48), its edges stretched above and below.
        let out = fit_image(&wide, 64, 64, ResizeMode::Fill).unwrap();
        assert_eq!(pixel(&out, 2, 0), [255, 0, 0]);
        assert_eq!(pixel(&out, 61, 63), [0, 0, 255]);
    }

    #[test]
    fn the_same_size_is_left_alone_and_nonsense_is_refused() {
        let image = halves(64, 32);
        assert_eq!(fit_image(&image, 64, 32, ResizeMode::Crop).unwrap(), image);
        assert!(fit_image(&image, 0, 32, ResizeMode::Resize).is_err());
        let broken = RgbImage { width: 64, height: 32, data: vec![0; 10] };
        assert!(fit_image(&broken, 32, 32, ResizeMode::Resize).is_err());
        assert_eq!("Crop".parse::<ResizeMode>().unwrap(), ResizeMode::Crop);
        assert!("zoom".parse::<ResizeMode>().is_err());
    }
}
