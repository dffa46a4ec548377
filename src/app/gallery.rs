//! The gallery: this session's images and, across restarts, the outputs folder's. Images from
//! disk are listed at start (file names only) and decoded on a loader thread when their
//! thumbnail first scrolls into view, so a folder of thousands of PNGs costs nothing up front.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use easel_engine::metadata::{read_png, read_png_text, RgbImage, PARAMETERS_KEYWORD};
use easel_engine::pipeline::GenerationRequest;
use eframe::egui;

/// At most this many of the outputs folder's images are listed (the newest).
pub const HISTORY_LIMIT: usize = 1000;
/// Thumbnails are decoded down to this many pixels on their longer side.
pub const THUMBNAIL_SIDE: u32 = 192;

pub struct GalleryImage {
    pub path: Option<PathBuf>,
    /// The PNG's `parameters` text (empty until a file from disk is loaded, or when it has none).
    pub parameters: String,
    /// The request that made it, for this session's images.
    pub request: Option<GenerationRequest>,
    /// The full image and its texture: this session's images have them from the start,
    /// images from disk once they are opened.
    pub image: Option<Arc<RgbImage>>,
    pub texture: Option<egui::TextureHandle>,
    /// A small texture for the strip (images from disk).
    pub thumbnail: Option<egui::TextureHandle>,
    pub loading: Loading,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Loading {
    Idle,
    Thumbnail,
    Full,
    Failed(String),
}

impl GalleryImage {
    /// An image made (or opened) in this session, already in memory.
    pub fn in_memory(
        image: Arc<RgbImage>,
        texture: egui::TextureHandle,
        parameters: String,
        request: Option<GenerationRequest>,
        path: Option<PathBuf>,
    ) -> Self {
        Self {
            path,
            parameters,
            request,
            image: Some(image),
            texture: Some(texture),
            thumbnail: None,
            loading: Loading::Idle,
        }
    }

    /// An image of an earlier session, known by its path until it is loaded.
    pub fn on_disk(path: PathBuf) -> Self {
        Self {
            path: Some(path),
            parameters: String::new(),
            request: None,
            image: None,
            texture: None,
            thumbnail: None,
            loading: Loading::Idle,
        }
    }

    /// What the strip shows: the thumbnail, else the full texture.
    pub fn strip_texture(&self) -> Option<&egui::TextureHandle> {
        self.thumbnail.as_ref().or(self.texture.as_ref())
    }
}

/// The outputs folder's PNGs, oldest first (the gallery shows its last entries first). Easel
/// names them `NNNNN-<seed>.png`, so the number orders them; other PNGs sort by modification time
/// before them.
pub fn history(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(Option<u64>, std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")) && p.is_file())
        .map(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
            let modified = p.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            (digits.parse().ok(), modified, p)
        })
        .collect();
    found.sort();
    let skip = found.len().saturating_sub(HISTORY_LIMIT);
    found.into_iter().skip(skip).map(|(_, _, p)| p).collect()
}

pub struct Loaded {
    pub path: PathBuf,
    pub full: bool,
    pub result: Result<(RgbImage, String), String>,
}

/// Decodes PNGs off the UI thread: thumbnails for the strip, full images when one is opened.
pub struct ImageLoader {
    requests: Sender<(PathBuf, bool)>,
    results: Receiver<Loaded>,
}

impl ImageLoader {
    pub fn spawn(repaint: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (requests, request_rx) = channel::<(PathBuf, bool)>();
        let (result_tx, results) = channel();
        // Without its thread the gallery only lacks history thumbnails; nothing else depends on it.
        let _ = std::thread::Builder::new().name("easel-gallery".into()).spawn(move || {
            for (path, full) in request_rx {
                let result = load(&path, full);
                if result_tx.send(Loaded { path, full, result }).is_err() {
                    break;
                }
                repaint();
            }
        });
        Self { requests, results }
    }

    pub fn request(&self, path: &Path, full: bool) {
        let _ = self.requests.send((path.to_path_buf(), full));
    }

    pub fn drain(&self) -> Vec<Loaded> {
        self.results.try_iter().collect()
    }
}

fn load(path: &Path, full: bool) -> Result<(RgbImage, String), String> {
    let image = read_png(path).map_err(|e| e.to_string())?;
    let parameters = read_png_text(path)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == PARAMETERS_KEYWORD)
        .map(|(_, v)| v)
        .unwrap_or_default();
    let image = if full { image } else { downscale(&image, THUMBNAIL_SIDE) };
    Ok((image, parameters))
}

/// Box-filters `image` by the integer factor that brings its longer side to at most `side`.
pub fn downscale(image: &RgbImage, side: u32) -> RgbImage {
    let factor = image.width.max(image.height).div_ceil(side.max(1)).max(1);
    if factor == 1 {
        return image.clone();
    }
    let (w, h) = ((image.width / factor).max(1), (image.height / factor).max(1));
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let mut sum = [0u32; 3];
            let mut count = 0;
            for sy in y * factor..((y + 1) * factor).min(image.height) {
                for sx in x * factor..((x + 1) * factor).min(image.width) {
                    let i = ((sy * image.width + sx) * 3) as usize;
                    for (c, s) in sum.iter_mut().enumerate() {
                        *s += image.data[i + c] as u32;
                    }
                    count += 1;
                }
            }
            data.extend(sum.iter().map(|s| (s / count.max(1)) as u8));
        }
    }
    RgbImage { width: w, height: h, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_lists_pngs_oldest_first_by_easel_number() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["00010-5.png", "00002-9.png", "notes.txt", "00100-1.PNG"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let names: Vec<String> =
            history(dir.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["00002-9.png", "00010-5.png", "00100-1.PNG"]);
        assert!(history(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn downscale_averages_blocks() {
        let image = RgbImage { width: 4, height: 2, data: [[0u8, 10, 20], [100, 110, 120]].repeat(4).concat() };
        let small = downscale(&image, 2);
        assert_eq!((small.width, small.height), (2, 1));
        assert_eq!(small.data, vec![50, 60, 70, 50, 60, 70]);
    }
}
