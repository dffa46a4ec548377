//! Easel Mini draws what it is asked: captions it never saw in training (new combinations of
//! its grammar, `assets/models/easel-mini/heldout.json`), two seeds each, judged by measuring
//! the picture — colour masks, the largest blob's centroid and area, its compactness. A model
//! with random weights scores near zero here; so does one whose text conditioning is broken.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use easel_engine::metadata::RgbImage;
use easel_engine::models::LoadOptions;
use easel_engine::pipeline::{GenerationRequest, Pipeline};
use easel_engine::rng::RngKind;
use easel_engine::schedulers::{SamplerId, Schedule};
use serde_json::Value;

/// The shipped model, or a candidate export in `EASEL_MINI_MODEL` (as the app honours it).
fn model_dir() -> PathBuf {
    match std::env::var_os("EASEL_MINI_MODEL") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/models/easel-mini"),
    }
}

struct Palette(Vec<(String, [f32; 3])>);

impl Palette {
    /// The palette colour nearest to `rgb`, if it is near enough to be that colour at all.
    fn classify(&self, rgb: &[u8]) -> Option<usize> {
        let mut best = None;
        let mut best_distance = 70.0f32;
        for (i, (_, c)) in self.0.iter().enumerate() {
            let d = (0..3).map(|k| (rgb[k] as f32 - c[k]).powi(2)).sum::<f32>().sqrt();
            if d < best_distance {
                best_distance = d;
                best = Some(i);
            }
        }
        best
    }

    fn index(&self, name: &str) -> usize {
        self.0.iter().position(|(n, _)| n == name).unwrap_or_else(|| panic!("colour {name}"))
    }
}

/// The largest 4-connected region of pixels of colour `colour`.
#[derive(Debug, Clone, Copy)]
struct Blob {
    area: usize,
    /// Centroid as fractions of the width and height.
    cx: f32,
    cy: f32,
    /// Area over bounding-box area (square ≈ 1, circle ≈ 0.79, triangle ≈ 0.5, star ≈ 0.4).
    fill: f32,
}

fn largest_blob(labels: &[Option<usize>], width: usize, height: usize, colour: usize) -> Option<Blob> {
    let mut seen = vec![false; labels.len()];
    let mut best: Option<Blob> = None;
    for start in 0..labels.len() {
        if seen[start] || labels[start] != Some(colour) {
            continue;
        }
        let (mut area, mut sx, mut sy) = (0usize, 0f64, 0f64);
        let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            area += 1;
            sx += x as f64;
            sy += y as f64;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == Some(colour) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width);
            }
            if y + 1 < height {
                visit(i + width);
            }
        }
        if best.is_none_or(|b| area > b.area) {
            let box_area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
            best = Some(Blob {
                area,
                cx: (sx / area as f64 + 0.5) as f32 / width as f32,
                cy: (sy / area as f64 + 0.5) as f32 / height as f32,
                fill: area as f32 / box_area,
            });
        }
    }
    best
}

/// The object of colour `colour`: its largest blob, if big enough to be an object and not so
/// big that it is the background.
fn find(image: &RgbImage, labels: &[Option<usize>], colour: usize) -> Option<Blob> {
    let (w, h) = (image.width as usize, image.height as usize);
    let blob = largest_blob(labels, w, h, colour)?;
    let fraction = blob.area as f32 / (w * h) as f32;
    (0.004..0.45).contains(&fraction).then_some(blob)
}

fn position_ok(blob: &Blob, position: &str) -> bool {
    let (left, right) = (blob.cx < 0.4, blob.cx > 0.6);
    let (top, bottom) = (blob.cy < 0.4, blob.cy > 0.6);
    let middle = |v: f32| (0.3..0.7).contains(&v);
    match position {
        "on the left" => left && middle(blob.cy),
        "on the right" => right && middle(blob.cy),
        "at the top" => top && middle(blob.cx),
        "at the bottom" => bottom && middle(blob.cx),
        "in the centre" => middle(blob.cx) && middle(blob.cy),
        "in the top left corner" => top && left,
        "in the top right corner" => top && right,
        "in the bottom left corner" => bottom && left,
        "in the bottom right corner" => bottom && right,
        other => panic!("unknown position {other}"),
    }
}

fn relation_ok(a: &Blob, b: &Blob, relation: &str) -> bool {
    const MARGIN: f32 = 0.1;
    match relation {
        "above" => a.cy + MARGIN < b.cy,
        "below" => a.cy > b.cy + MARGIN,
        "to the left of" => a.cx + MARGIN < b.cx,
        "to the right of" => a.cx > b.cx + MARGIN,
        other => panic!("unknown relation {other}"),
    }
}

/// The shape whose usual fill ratio is nearest (informational: rings and stars overlap).
fn shape_of(blob: &Blob) -> &'static str {
    let shapes = [("square", 1.0), ("circle", 0.79), ("heart", 0.66), ("triangle", 0.5), ("star", 0.38)];
    shapes.iter().min_by(|a, b| (a.1 - blob.fill).abs().total_cmp(&(b.1 - blob.fill).abs())).map(|s| s.0).unwrap()
}

#[derive(Default, Debug)]
struct Score {
    colour: (usize, usize),
    position: (usize, usize),
    shape: (usize, usize),
    relation: (usize, usize),
}

fn percent((ok, n): (usize, usize)) -> f64 {
    100.0 * ok as f64 / n.max(1) as f64
}

/// Easel Mini's native 128×128 with DPM++ 2M and the CPU generator.
fn request(prompt: &str, steps: usize, guidance_scale: f64, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        steps,
        guidance_scale,
        seed,
        width: 128,
        height: 128,
        sampler: SamplerId::DpmPp2m,
        schedule: Schedule::Default,
        rng: RngKind::Cpu,
        emphasis: Default::default(),
        clip_skip: 1,
        loras: Vec::new(),
        embeddings: Vec::new(),
    }
}

/// Adds `image`'s marks for `case` to `score`.
fn score_image(image: &RgbImage, case: &Value, palette: &Palette, score: &mut Score) {
    let labels: Vec<Option<usize>> = image.data.chunks(3).map(|p| palette.classify(p)).collect();
    let first = find(image, &labels, palette.index(case["colour"].as_str().unwrap()));
    match case["kind"].as_str().unwrap() {
        "single" => {
            score.colour.1 += 1;
            score.position.1 += 1;
            score.shape.1 += 1;
            if let Some(blob) = first {
                score.colour.0 += 1;
                score.position.0 += position_ok(&blob, case["position"].as_str().unwrap()) as usize;
                score.shape.0 += (shape_of(&blob) == case["shape"].as_str().unwrap()) as usize;
            }
        }
        _ => {
            score.relation.1 += 1;
            let second = find(image, &labels, palette.index(case["colour_2"].as_str().unwrap()));
            if let (Some(a), Some(b)) = (first, second) {
                score.relation.0 += relation_ok(&a, &b, case["relation"].as_str().unwrap()) as usize;
            }
        }
    }
}

fn judge(pipeline: &Pipeline, cases: &[Value], palette: &Palette, guidance: f64, seeds: &[u64]) -> Score {
    let mut score = Score::default();
    for case in cases {
        for &seed in seeds {
            // DPM++ 2M needs fewer steps than Euler for the same picture: 15 keep the suite
            // short (20 is what an artist would use).
            let request = request(case["caption"].as_str().unwrap(), 15, guidance, seed);
            let image = pipeline.generate(&request, &mut |_| ControlFlow::Continue(())).unwrap();
            score_image(&image, case, palette, &mut score);
        }
    }
    score
}

fn heldout() -> (Palette, Vec<Value>) {
    let text = std::fs::read_to_string(model_dir().join("heldout.json")).unwrap();
    let heldout: Value = serde_json::from_str(&text).unwrap();
    let colours: HashMap<String, Vec<f32>> = serde_json::from_value(heldout["colours"].clone()).unwrap();
    let mut palette: Vec<(String, [f32; 3])> = colours.into_iter().map(|(n, c)| (n, [c[0], c[1], c[2]])).collect();
    palette.sort_by(|a, b| a.0.cmp(&b.0));
    (Palette(palette), heldout["cases"].as_array().unwrap().clone())
}

/// The checker itself: on the held-out captions drawn as the training data draws them
/// (scripts/train_mini/grammar.py `draw_heldout`), it must find what each caption says.
#[test]
fn the_checker_recognises_true_drawings() {
    let (palette, cases) = heldout();
    let sheet_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/easel-mini/heldout-drawn.png");
    let sheet = easel_engine::metadata::read_png(&sheet_path).unwrap();
    let side = sheet.height as usize;
    assert_eq!(sheet.width as usize, side * cases.len());
    let mut score = Score::default();
    for (i, case) in cases.iter().enumerate() {
        let mut data = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            let row = (y * sheet.width as usize + i * side) * 3;
            data.extend_from_slice(&sheet.data[row..row + side * 3]);
        }
        score_image(&RgbImage { width: side as u32, height: side as u32, data }, case, &palette, &mut score);
    }
    println!("checker on true drawings: {score:?}");
    assert_eq!(score.colour.0, score.colour.1, "{score:?}");
    assert_eq!(score.position.0, score.position.1, "{score:?}");
    assert_eq!(score.relation.0, score.relation.1, "{score:?}");
}

#[test]
fn easel_mini_draws_held_out_captions_and_guidance_matters() {
    let (palette, cases) = heldout();
    assert!(cases.len() >= 60, "at least 60 held-out captions");

    let pipeline = Pipeline::load(&model_dir(), LoadOptions::default()).unwrap();
    let seeds = [1, 2];
    let guided = judge(&pipeline, &cases, &palette, 6.0, &seeds);
    let unguided = judge(&pipeline, &cases, &palette, 1.0, &seeds);
    for (name, s) in [("guidance 6", &guided), ("guidance 1", &unguided)] {
        println!(
            "Easel Mini, {} held-out captions x {} seeds, {name}: colour {:.0}%, position {:.0}%, shape {:.0}% \
             (single objects), relation {:.0}% (two objects)",
            cases.len(),
            seeds.len(),
            percent(s.colour),
            percent(s.position),
            percent(s.shape),
            percent(s.relation)
        );
    }
    // The shipped model measures colour 94%, position 94%, relation 83% at guidance 6 and 90%,
    // 85%, 55% at guidance 1 (the model card). Chance is about 11% for a position (9 of them)
    // and 25% for a relation before both colours must be found; a random model scores near 0.
    assert!(percent(guided.colour) >= 90.0, "colours follow the words: {guided:?}");
    assert!(percent(guided.position) >= 90.0, "positions follow the words: {guided:?}");
    assert!(percent(guided.relation) >= 70.0, "two objects where the words put them: {guided:?}");
    // Guidance matters: where things go and what goes with what is followed more closely.
    let layout = |s: &Score| s.position.0 + s.relation.0;
    assert!(layout(&guided) >= layout(&unguided) + 10, "guidance must matter: {unguided:?} vs {guided:?}");
    assert!(
        percent(guided.relation) >= percent(unguided.relation) + 15.0,
        "guidance must matter for relations: {unguided:?} vs {guided:?}"
    );
}

/// diffusers' StableDiffusionPipeline loads the shipped folder and paints Easel's picture
/// (reference made by scripts/train_mini/reference.sh with the pinned diffusers).
#[test]
fn easel_mini_matches_diffusers() {
    let reference_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/easel-mini/diffusers.png");
    let reference = easel_engine::metadata::read_png(&reference_path).unwrap();
    let pipeline = Pipeline::load(&model_dir(), LoadOptions::default()).unwrap();
    let request = request("a red circle above a blue square", 20, 6.0, 1);
    let image = pipeline.generate(&request, &mut |_| ControlFlow::Continue(())).unwrap();
    let mse = image.data.iter().zip(&reference.data).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>()
        / image.data.len() as f64;
    let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64.powi(2) / mse).log10() };
    println!("Easel Mini vs diffusers: PSNR {psnr:.1} dB");
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
}

/// Trained on a zero-terminal-SNR schedule with "trailing" spacing, as Turbo models are spaced:
/// it is still an ordinary model with the usual steps and guidance (not one step, no CFG).
#[test]
fn easel_mini_is_not_taken_for_a_turbo_model() {
    let info = easel_engine::models::inspect_model(&model_dir()).unwrap();
    assert!(!info.turbo, "{info:?}");
    assert_eq!((info.default_steps(), info.default_guidance(), info.default_size()), (25, 7.0, 128));
}

/// The live preview of Easel Mini uses its own latent-to-RGB map (vae/latent_rgb.json, fitted
/// by train.py): on the final latents of a few pictures it is much nearer the decoded picture
/// (8×8 averages) than SD 1.x's map, which belongs to another VAE.
#[test]
fn easel_mini_previews_with_its_own_colours() {
    use easel_engine::models::Family;
    let pipeline = Pipeline::load(&model_dir(), LoadOptions::default()).unwrap();
    let info = pipeline.info();
    assert!(info.latent_rgb.is_some(), "vae/latent_rgb.json is read");
    let (mut own, mut sd1) = (0.0, 0.0);
    let prompts = ["a red circle above a blue square", "the sun over the sea at sunset", "a green star on the left"];
    for prompt in prompts {
        let request = request(prompt, 15, 6.0, 3);
        let latents = pipeline.denoise(&request, &mut |_| ControlFlow::Continue(())).unwrap();
        let image = easel_engine::pipeline::to_rgb8(&pipeline.decode_latents(&latents).unwrap()).unwrap();
        let values: Vec<f32> = latents.flatten_all().unwrap().to_vec1().unwrap();
        own += preview_error(&values, &image, info.latent_rgb_factors()) / prompts.len() as f32;
        sd1 += preview_error(&values, &image, Family::Sd1.latent_rgb_factors()) / prompts.len() as f32;
    }
    println!("preview vs picture, mean abs error in 0-255: own map {own:.1}, SD 1.x map {sd1:.1}");
    assert!(own * 2.0 < sd1, "own map {own:.1} vs SD 1.x {sd1:.1}");
}

/// Mean absolute difference (0–255) between a linear preview of 16×16×4 `latents` and the 8×8
/// averages of the 128×128 picture they decode to.
fn preview_error(latents: &[f32], image: &RgbImage, (factors, bias): ([[f32; 3]; 4], [f32; 3])) -> f32 {
    let (w, plane) = (16usize, 256usize);
    let mut total = 0.0;
    for p in 0..plane {
        let (px, py) = (p % w, p / w);
        for c in 0..3 {
            let v = bias[c] + (0..4).map(|ch| latents[ch * plane + p] * factors[ch][c]).sum::<f32>();
            let shown = ((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0;
            let mean =
                (0..64).map(|k| image.data[(((py * 8 + k / 8) * 128 + px * 8 + k % 8) * 3) + c] as f32).sum::<f32>()
                    / 64.0;
            total += (shown - mean).abs();
        }
    }
    total / (plane * 3) as f32
}
