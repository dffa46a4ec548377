//! The AUTOMATIC1111 `parameters` text (what civitai and image viewers read), and PNG files
//! carrying it.
//!
//! The text ("infotext") follows A1111's `modules/processing.py` (`create_infotext`) and is read
//! back with the algorithm of `modules/infotext_utils.py` (`parse_generation_parameters`):
//!
//! ```text
//! <prompt, may span several lines>
//! Negative prompt: <negative prompt, may span lines>      (left out when empty)
//! Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, ...
//! ```
//!
//! Keys A1111 leaves out mean its defaults; [`GenerationParams`] keeps them as `None` so that
//! text round-trips, and its `*_or_default` methods supply A1111's meaning (Clip skip 1, RNG
//! "GPU", Schedule type "Automatic").

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use crate::rng::RngKind;
use crate::{Error, Result};

/// The PNG text keyword A1111 stores the infotext under.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// A1111's schedule types (`modules/sd_schedulers.py`) as (label, aliases), in A1111's order.
/// Before 1.9 the schedule was part of the sampler name ("DPM++ 2M Karras").
pub const A1111_SCHEDULE_TYPES: &[(&str, &[&str])] = &[
    ("Automatic", &[]),
    ("Uniform", &[]),
    ("Karras", &[]),
    ("Exponential", &[]),
    ("Polyexponential", &[]),
    ("SGM Uniform", &["SGMUniform"]),
    ("KL Optimal", &[]),
    ("Align Your Steps", &[]),
    ("Simple", &[]),
    ("Normal", &[]),
    ("DDIM", &[]),
    ("Beta", &[]),
    // Added by Forge (and kept by its forks).
    ("Turbo", &[]),
    ("Align Your Steps GITS", &[]),
    ("Align Your Steps 11", &[]),
    ("Align Your Steps 32", &[]),
];

/// What A1111 records about one generated image.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: u32,
    /// A1111's display name without the schedule, e.g. "Euler a", "DPM++ 2M".
    pub sampler: String,
    /// e.g. "Karras"; `None` when absent (A1111: "Automatic", the sampler's own default).
    pub schedule_type: Option<String>,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// First 10 hex digits of the checkpoint's SHA-256; early files have an 8-digit legacy hash.
    pub model_hash: Option<String>,
    pub model: Option<String>,
    pub vae_hash: Option<String>,
    pub vae: Option<String>,
    pub denoising_strength: Option<f64>,
    /// Written only when > 1; `None` means 1.
    pub clip_skip: Option<u32>,
    /// "CPU" or "NV"; `None` means A1111's default "GPU" (torch on the GPU that made the image).
    pub rng: Option<String>,
    /// e.g. "v1.10.1".
    pub version: Option<String>,
    /// Every other key, in order, values unquoted (e.g. "Hires upscale", "Lora hashes").
    pub extra: Vec<(String, String)>,
}

impl GenerationParams {
    pub fn clip_skip_or_default(&self) -> u32 {
        self.clip_skip.unwrap_or(1)
    }

    pub fn schedule_type_or_default(&self) -> &str {
        self.schedule_type.as_deref().unwrap_or("Automatic")
    }

    pub fn rng_or_default(&self) -> &str {
        self.rng.as_deref().unwrap_or("GPU")
    }

    /// The generator that reproduces this image's noise (see [`RngKind::parse`]).
    pub fn rng_kind(&self) -> Result<RngKind> {
        RngKind::parse(self.rng_or_default())
    }

    /// The value of an `extra` key.
    pub fn extra_value(&self, key: &str) -> Option<&str> {
        self.extra.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The infotext exactly as A1111 writes it.
    pub fn to_infotext(&self) -> String {
        let mut entries: Vec<(&str, String)> =
            vec![("Steps", self.steps.to_string()), ("Sampler", self.sampler.clone())];
        if let Some(schedule) = non_empty(&self.schedule_type) {
            entries.push(("Schedule type", schedule.to_owned()));
        }
        entries.push(("CFG scale", format_number(self.cfg_scale)));
        entries.push(("Seed", self.seed.to_string()));
        entries.push(("Size", format!("{}x{}", self.width, self.height)));
        for (key, value) in
            [("Model hash", &self.model_hash), ("Model", &self.model), ("VAE hash", &self.vae_hash), ("VAE", &self.vae)]
        {
            if let Some(value) = non_empty(value) {
                entries.push((key, value.to_owned()));
            }
        }
        if let Some(strength) = self.denoising_strength {
            entries.push(("Denoising strength", format_number(strength)));
        }
        if let Some(clip_skip) = self.clip_skip.filter(|&c| c > 1) {
            entries.push(("Clip skip", clip_skip.to_string()));
        }
        if let Some(rng) = non_empty(&self.rng).filter(|r| !r.eq_ignore_ascii_case("GPU")) {
            entries.push(("RNG", rng.to_owned()));
        }
        if let Some(version) = non_empty(&self.version) {
            entries.push(("Version", version.to_owned()));
        }
        for (key, value) in &self.extra {
            entries.push((key, value.clone()));
        }
        // Stable, so extras keep their order within A1111's slot for them.
        entries.sort_by_key(|(key, _)| key_rank(key));

        let params_line = entries
            .iter()
            .map(|(key, value)| {
                // A1111 writes a key alone when its value is the key itself (a flag).
                if key == value {
                    (*key).to_owned()
                } else {
                    format!("{key}: {}", quote(value))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");

        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        text.push('\n');
        text.push_str(&params_line);
        text.trim_matches(is_python_space).to_owned()
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Like Python's `str()` of the numbers A1111 gets from its UI: integral values without ".0".
fn format_number(value: f64) -> String {
    format!("{value}")
}

/// The order of `create_infotext`'s dictionary (A1111 1.10). Keys not listed are extension
/// parameters (`extra_generation_params`), which come after "Tiling" and before "Version".
const A1111_KEY_ORDER: &[&str] = &[
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
];

fn key_rank(key: &str) -> usize {
    let extension_slot = A1111_KEY_ORDER.len();
    match key {
        "Version" => extension_slot + 1,
        "User" => extension_slot + 2,
        _ => A1111_KEY_ORDER.iter().position(|k| *k == key).unwrap_or(extension_slot),
    }
}

/// A1111's `quote`: values containing ',', ':' or a newline become JSON strings
/// (`json.dumps(ensure_ascii=False)`).
fn quote(value: &str) -> Cow<'_, str> {
    if !value.contains([',', ':', '\n']) {
        return Cow::Borrowed(value);
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            '\u{8}' => quoted.push_str("\\b"),
            '\u{c}' => quoted.push_str("\\f"),
            c if (c as u32) < 0x20 => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    Cow::Owned(quoted)
}

/// A1111's `unquote`: a value in double quotes is read as a JSON string, or kept as it is when
/// that fails.
fn unquote(value: &str) -> String {
    if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        if let Ok(text) = serde_json::from_str::<String>(value) {
            return text;
        }
    }
    value.to_owned()
}

/// Python's `\s` and `str.strip()`: Unicode white space plus the separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` for str patterns: alphanumerics of any script, and '_'.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One match of A1111's `re_param`,
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`, at `start` (char indices):
/// `(key, raw value, end)`.
fn match_param_at(chars: &[char], start: usize) -> Option<(String, String, usize)> {
    let len = chars.len();
    let mut i = start;
    while i < len && is_python_space(chars[i]) {
        i += 1;
    }
    // The key: a word character, then one or more of [\w \-/]; the run must end at ':'
    // (backtracking cannot help, ':' is not in the class).
    if i >= len || !is_word_char(chars[i]) {
        return None;
    }
    let key_start = i;
    i += 1;
    let run_start = i;
    while i < len && (is_word_char(chars[i]) || matches!(chars[i], ' ' | '-' | '/')) {
        i += 1;
    }
    if i == run_start || i >= len || chars[i] != ':' {
        return None;
    }
    let key: String = chars[key_start..i].iter().collect();
    i += 1;
    while i < len && is_python_space(chars[i]) {
        i += 1;
    }
    let value_start = i;
    // First alternative: a double-quoted string of escapes (`\\.`, '.' excluding newline) and
    // other characters, followed by ',' or the end.
    if i < len && chars[i] == '"' {
        let mut j = i + 1;
        let mut pieces = 0;
        loop {
            if j + 1 < len && chars[j] == '\\' && chars[j + 1] != '\n' {
                j += 2;
            } else if j < len && chars[j] != '\\' && chars[j] != '"' {
                j += 1;
            } else {
                break;
            }
            pieces += 1;
        }
        if pieces > 0 && j < len && chars[j] == '"' && (j + 1 == len || chars[j + 1] == ',') {
            let value: String = chars[value_start..=j].iter().collect();
            let end = if j + 1 < len { j + 2 } else { j + 1 };
            return Some((key, value, end));
        }
    }
    // Second alternative: everything up to the next ',' (or the end).
    let mut j = i;
    while j < len && chars[j] != ',' {
        j += 1;
    }
    let value: String = chars[value_start..j].iter().collect();
    let end = if j < len { j + 1 } else { j };
    Some((key, value, end))
}

/// Python's `re_param.findall(line)`.
fn find_params(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut found = Vec::new();
    let mut position = 0;
    while position < chars.len() {
        match match_param_at(&chars, position) {
            Some((key, value, end)) => {
                found.push((key, value));
                position = end.max(position + 1);
            }
            None => position += 1,
        }
    }
    found
}

/// `^(\d+)x(\d+)$`
fn parse_size(value: &str) -> Option<(u32, u32)> {
    let (width, height) = value.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(width) || !digits(height) {
        return None;
    }
    Some((width.parse().ok()?, height.parse().ok()?))
}

/// Splits an old-style sampler name ("DPM++ 2M Karras") into sampler and schedule type, as
/// A1111's `get_sampler_and_scheduler` does: every schedule label or alias found at the end
/// (after a space) is cut off, in [`A1111_SCHEDULE_TYPES`] order.
pub fn split_sampler_and_schedule(name: &str) -> (String, Option<String>) {
    let mut sampler = name;
    let mut schedule = None;
    for (label, aliases) in A1111_SCHEDULE_TYPES {
        for option in std::iter::once(label).chain(aliases.iter()) {
            let Some(rest) = sampler.strip_suffix(option) else {
                continue;
            };
            if let Some(rest) = rest.strip_suffix(' ') {
                sampler = rest;
                schedule = Some((*label).to_owned());
                break;
            }
        }
    }
    (sampler.to_owned(), schedule)
}

/// The first half of A1111's `parse_generation_parameters`: (prompt, negative prompt, the
/// raw `re_param` matches of the last line), the matches empty when there are fewer than
/// three (then the last line belongs to the prompt).
fn split_infotext(text: &str) -> (String, String, Vec<(String, String)>) {
    let mut lines: Vec<&str> = text.trim_matches(is_python_space).split('\n').collect();
    let last_line = lines.pop().unwrap_or_default();
    let mut pairs = find_params(last_line);
    if pairs.len() < 3 {
        lines.push(last_line);
        pairs.clear();
    }
    let (mut prompt, mut negative_prompt) = (String::new(), String::new());
    let mut in_negative_prompt = false;
    for line in lines {
        let mut line = line.trim_matches(is_python_space);
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative_prompt = true;
            line = rest.trim_matches(is_python_space);
        }
        let target = if in_negative_prompt { &mut negative_prompt } else { &mut prompt };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    (prompt, negative_prompt, pairs)
}

/// Reads A1111's infotext. Fails when there is no parameters line (at least three `Key: value`
/// pairs on the last line) or when Steps, Sampler, CFG scale, Seed or Size is missing or not a
/// valid value, or another known number is not one.
pub fn parse_infotext(text: &str) -> Result<GenerationParams> {
    let (prompt, negative_prompt, pairs) = split_infotext(text);
    if pairs.is_empty() {
        return Err(Error::Metadata(
            "no A1111 parameters line (\"Steps: …, Sampler: …\") at the end of the text".into(),
        ));
    }
    let mut params = GenerationParams { prompt, negative_prompt, ..Default::default() };

    // A dictionary in A1111: a repeated key keeps its first place and its last value.
    let mut values: Vec<(String, String)> = Vec::new();
    for (key, raw) in pairs {
        if raw.is_empty() {
            // A1111 skips these (indexing the empty value raises inside its try).
            continue;
        }
        let value = if raw.starts_with('"') && raw.ends_with('"') { unquote(&raw) } else { raw };
        match values.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => values.push((key, value)),
        }
    }

    let mut sampler = None;
    let mut size = None;
    let (mut steps, mut cfg_scale, mut seed) = (None, None, None);
    for (key, value) in values {
        match key.as_str() {
            "Steps" => steps = Some(parse_number::<u32>(&key, &value)?),
            "Sampler" => sampler = Some(value),
            "Schedule type" => params.schedule_type = Some(value),
            "CFG scale" => cfg_scale = Some(parse_number::<f64>(&key, &value)?),
            "Seed" => seed = Some(parse_number::<u64>(&key, &value)?),
            "Size" => size = Some(parse_size(&value).ok_or_else(|| invalid(&key, &value))?),
            "Model hash" => params.model_hash = Some(value),
            "Model" => params.model = Some(value),
            "VAE hash" => params.vae_hash = Some(value),
            "VAE" => params.vae = Some(value),
            "Denoising strength" => params.denoising_strength = Some(parse_number::<f64>(&key, &value)?),
            "Clip skip" => params.clip_skip = Some(parse_number::<u32>(&key, &value)?),
            "RNG" => params.rng = Some(value),
            "Version" => params.version = Some(value),
            _ => params.extra.push((key, value)),
        }
    }

    let sampler = sampler.ok_or_else(|| missing("Sampler"))?;
    let (sampler, schedule_from_name) = split_sampler_and_schedule(&sampler);
    params.sampler = sampler;
    if schedule_from_name.is_some() {
        // A1111 lets the name's suffix win over a "Schedule type" key.
        params.schedule_type = schedule_from_name;
    }
    params.steps = steps.ok_or_else(|| missing("Steps"))?;
    params.cfg_scale = cfg_scale.ok_or_else(|| missing("CFG scale"))?;
    params.seed = seed.ok_or_else(|| missing("Seed"))?;
    (params.width, params.height) = size.ok_or_else(|| missing("Size"))?;
    Ok(params)
}

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value.trim().parse().map_err(|_| invalid(key, value))
}

fn invalid(key: &str, value: &str) -> Error {
    Error::Metadata(format!("invalid {key}: {value:?}"))
}

fn missing(key: &str) -> Error {
    Error::Metadata(format!("the parameters line has no {key}"))
}

// ------------------------------------------------------------------------------------- PNG

/// An 8-bit RGB image, rows top to bottom, `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    fn expected_len(width: u32, height: u32) -> Option<usize> {
        usize::try_from(u64::from(width) * u64::from(height) * 3).ok()
    }
}

/// Writes `image` as a PNG with the given text chunks (keyword, text), e.g.
/// `[(PARAMETERS_KEYWORD, &infotext)]`.
///
/// Like A1111 (PIL's `PngInfo.add_text`), text that Latin-1 can hold goes into a `tEXt`
/// chunk, anything else (emoji, CJK) into an uncompressed UTF-8 `iTXt` chunk.
///
/// The file is written to a temporary file in the same directory and then renamed into
/// place, so readers never see half a file. With `overwrite == false` an existing file is left
/// alone and [`Error::FileExists`] is returned; the final rename refuses to replace a file that
/// appears meanwhile (no window for a race).
pub fn write_png(path: &Path, image: &RgbImage, text_chunks: &[(&str, &str)], overwrite: bool) -> Result<()> {
    let png_error = |message: String| Error::Png { path: path.to_owned(), message };
    let io_error = |source: std::io::Error| Error::Io { path: path.to_owned(), source };
    if RgbImage::expected_len(image.width, image.height) != Some(image.data.len())
        || image.width == 0
        || image.height == 0
    {
        return Err(png_error(format!(
            "image data is {} bytes, expected {}×{}×3",
            image.data.len(),
            image.width,
            image.height
        )));
    }
    for (keyword, _) in text_chunks {
        let valid = (1..=79).contains(&keyword.chars().count())
            && keyword.chars().all(|c| matches!(c as u32, 0x20..=0x7e | 0xa1..=0xff))
            && !keyword.starts_with(' ')
            && !keyword.ends_with(' ')
            && !keyword.contains("  ");
        if !valid {
            return Err(png_error(format!("{keyword:?} is not a valid PNG text keyword (1-79 Latin-1 characters)")));
        }
    }
    if !overwrite && path.exists() {
        return Err(Error::FileExists { path: path.to_owned() });
    }

    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let temporary =
        tempfile::Builder::new().prefix(".easel-").suffix(".png.part").tempfile_in(&directory).map_err(io_error)?;

    {
        let mut encoder = png::Encoder::new(BufWriter::new(temporary.as_file()), image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (keyword, text) in text_chunks {
            let added = if text.chars().all(|c| (c as u32) <= 0xff) {
                encoder.add_text_chunk((*keyword).to_owned(), (*text).to_owned())
            } else {
                encoder.add_itxt_chunk((*keyword).to_owned(), (*text).to_owned())
            };
            added.map_err(|e| png_error(e.to_string()))?;
        }
        let mut writer = encoder.write_header().map_err(|e| png_error(e.to_string()))?;
        writer.write_image_data(&image.data).map_err(|e| png_error(e.to_string()))?;
        // Writes IEND and flushes the buffer into the file.
        writer.finish().map_err(|e| png_error(e.to_string()))?;
    }
    // On disk before it gets its name, so a crash cannot leave a truncated image behind.
    temporary.as_file().sync_all().map_err(io_error)?;

    let persisted = if overwrite { temporary.persist(path) } else { temporary.persist_noclobber(path) };
    match persisted {
        Ok(_) => Ok(()),
        Err(e) if !overwrite && e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::FileExists { path: path.to_owned() })
        }
        Err(e) => Err(io_error(e.error)),
    }
}

/// Largest decompressed zTXt/iTXt text accepted (ComfyUI workflows can be a few MB).
const MAX_TEXT_BYTES: usize = 64 << 20;

fn open_png(path: &Path) -> Result<png::Decoder<BufReader<File>>> {
    let file = File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    Ok(png::Decoder::new(BufReader::new(file)))
}

fn png_decode_error(path: &Path, error: png::DecodingError) -> Error {
    match error {
        png::DecodingError::IoError(source) => Error::Io { path: path.to_owned(), source },
        other => Error::Png { path: path.to_owned(), message: other.to_string() },
    }
}

/// Every text chunk of a PNG as (keyword, text): the `tEXt` chunks, then `zTXt`, then `iTXt`
/// (each group in file order), compressed ones inflated. Chunks after the image data count too.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let decode_error = |e| png_decode_error(path, e);
    let mut reader = open_png(path)?.read_info().map_err(decode_error)?;
    // Reads to the end of the file, so text chunks after IDAT are seen too.
    reader.finish().map_err(decode_error)?;
    let info = reader.info();
    let mut texts = Vec::new();
    for chunk in &info.uncompressed_latin1_text {
        texts.push((chunk.keyword.clone(), chunk.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        let mut chunk = chunk.clone();
        chunk.decompress_text_with_limit(MAX_TEXT_BYTES).map_err(decode_error)?;
        texts.push((chunk.keyword.clone(), chunk.get_text().map_err(decode_error)?));
    }
    for chunk in &info.utf8_text {
        let mut chunk = chunk.clone();
        chunk.decompress_text_with_limit(MAX_TEXT_BYTES).map_err(decode_error)?;
        texts.push((chunk.keyword.clone(), chunk.get_text().map_err(decode_error)?));
    }
    Ok(texts)
}

/// The A1111 `parameters` text of a PNG, if it has one.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    Ok(read_png_text(path)?.into_iter().find(|(keyword, _)| keyword == PARAMETERS_KEYWORD).map(|(_, text)| text))
}

/// The pixels of a PNG as 8-bit RGB (grey is widened, alpha dropped, 16-bit narrowed).
pub fn read_png(path: &Path) -> Result<RgbImage> {
    let decode_error = |e| png_decode_error(path, e);
    let mut decoder = open_png(path)?;
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(decode_error)?;
    let buffer_size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::Png { path: path.to_owned(), message: "image too large".into() })?;
    let mut buffer = vec![0u8; buffer_size];
    let frame = reader.next_frame(&mut buffer).map_err(decode_error)?;
    buffer.truncate(frame.buffer_size());
    let data = match frame.color_type {
        png::ColorType::Rgb => buffer,
        png::ColorType::Rgba => buffer.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Grayscale => buffer.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => buffer.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        png::ColorType::Indexed => {
            return Err(Error::Png { path: path.to_owned(), message: "palette image was not expanded".into() })
        }
    };
    Ok(RgbImage { width: frame.width, height: frame.height, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_params() -> GenerationParams {
        GenerationParams {
            prompt: "a red fox in the snow".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.0,
            seed: 1_234_567_890,
            width: 512,
            height: 512,
            model_hash: Some("6ce0161689".into()),
            model: Some("v1-5-pruned-emaonly".into()),
            version: Some("v1.10.1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn writes_the_a1111_layout() {
        assert_eq!(
            base_params().to_infotext(),
            "a red fox in the snow\n\
             Negative prompt: blurry\n\
             Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, \
             Seed: 1234567890, Size: 512x512, Model hash: 6ce0161689, \
             Model: v1-5-pruned-emaonly, Version: v1.10.1"
        );
    }

    #[test]
    fn leaves_out_defaults_like_a1111() {
        let params = GenerationParams {
            negative_prompt: String::new(),
            schedule_type: None,
            cfg_scale: 7.5,
            clip_skip: Some(1),
            rng: Some("GPU".into()),
            model_hash: None,
            model: None,
            version: None,
            ..base_params()
        };
        assert_eq!(
            params.to_infotext(),
            "a red fox in the snow\n\
             Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1234567890, Size: 512x512"
        );
        let params = GenerationParams {
            clip_skip: Some(2),
            rng: Some("CPU".into()),
            denoising_strength: Some(0.45),
            ..base_params()
        };
        assert!(params.to_infotext().ends_with(
            "Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, RNG: CPU, \
             Version: v1.10.1"
        ));
    }

    #[test]
    fn quotes_like_python_json_dumps() {
        // Expected values printed by Python's json.dumps(v, ensure_ascii=False).
        assert_eq!(quote("a, b"), "\"a, b\"");
        assert_eq!(quote("key: \"value\""), r#""key: \"value\"""#);
        assert_eq!(quote("line1\nline2"), r#""line1\nline2""#);
        assert_eq!(quote("tab\there: \\ back"), r#""tab\there: \\ back""#);
        assert_eq!(quote("ctl\u{1}\u{1f}: é 🦊"), r#""ctl\u0001\u001f: é 🦊""#);
        assert_eq!(quote("no special \"quotes\" here"), "no special \"quotes\" here");
    }

    #[test]
    fn round_trips() {
        let cases = [
            base_params(),
            GenerationParams {
                prompt: "line one\nline two, with commas: and colons".into(),
                negative_prompt: "bad hands,\nextra fingers\n(worst quality:1.4)".into(),
                ..base_params()
            },
            GenerationParams {
                prompt: "🦊 狐狸 in the snow, \"quoted\" \\ backslash".into(),
                negative_prompt: String::new(),
                schedule_type: None,
                cfg_scale: 4.25,
                seed: u64::MAX,
                width: 1024,
                height: 768,
                model: Some("juggernautXL, v9: final".into()),
                vae: Some("sdxl_vae.safetensors".into()),
                vae_hash: Some("235745af8d".into()),
                denoising_strength: Some(0.7),
                clip_skip: Some(2),
                rng: Some("NV".into()),
                extra: vec![
                    ("Hires upscale".into(), "2".into()),
                    ("Hires upscaler".into(), "R-ESRGAN 4x+".into()),
                    ("Lora hashes".into(), "fox_v2: 9c1a3e5b7d21, snow: 0123456789ab".into()),
                    ("Odd value".into(), "tab\t, newline\n, quote \", ctl \u{7}".into()),
                ],
                ..base_params()
            },
            GenerationParams {
                prompt: String::new(),
                negative_prompt: "only a negative prompt".into(),
                sampler: "Euler a".into(),
                schedule_type: Some("Automatic".into()),
                ..base_params()
            },
        ];
        for params in cases {
            let text = params.to_infotext();
            match parse_infotext(&text) {
                Ok(parsed) => assert_eq!(parsed, params, "{text}"),
                Err(e) => panic!("{e}: {text}"),
            }
        }
    }

    fn parse(text: &str) -> GenerationParams {
        parse_infotext(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// A1111 1.6 (before "Schedule type" existed): the schedule is in the sampler name.
    #[test]
    fn reads_a1111_1_6_with_the_schedule_in_the_sampler_name() {
        let text = "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, \
                    (cherry blossoms:1.2), outdoors\n\
                    Negative prompt: (worst quality, low quality:1.4), easynegative, bad-hands-5\n\
                    Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2687396584, \
                    Size: 512x768, Model hash: 7f96a1a9ca, Model: anything-v5-PrtRE, \
                    Clip skip: 2, ENSD: 31337, Version: v1.6.0";
        let params = parse(text);
        assert_eq!(params.sampler, "DPM++ 2M");
        assert_eq!(params.schedule_type.as_deref(), Some("Karras"));
        assert_eq!((params.steps, params.seed), (28, 2_687_396_584));
        assert_eq!((params.width, params.height), (512, 768));
        assert_eq!(params.cfg_scale, 7.0);
        assert_eq!(params.clip_skip_or_default(), 2);
        assert_eq!(params.extra, vec![("ENSD".into(), "31337".into())]);
        assert_eq!(params.version.as_deref(), Some("v1.6.0"));
        assert_eq!(params.rng_or_default(), "GPU");
        assert_eq!(params.rng_kind().ok(), Some(RngKind::Nv));
        assert_eq!(params.negative_prompt, "(worst quality, low quality:1.4), easynegative, bad-hands-5");

        for (name, sampler, schedule) in [
            ("Euler a", "Euler a", None),
            ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", Some("Karras")),
            ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", Some("Exponential")),
            ("DPM2 a Karras", "DPM2 a", Some("Karras")),
            ("Euler SGMUniform", "Euler", Some("SGM Uniform")),
            ("DDIM", "DDIM", None),
            ("LCM", "LCM", None),
        ] {
            let (s, t) = split_sampler_and_schedule(name);
            assert_eq!((s.as_str(), t.as_deref()), (sampler, schedule), "{name}");
        }
    }

    /// A1111 1.10 with hires fix and extension keys: parsing and writing give back the text.
    #[test]
    fn reads_and_rewrites_a1111_1_10_with_hires_fix() {
        let text = "photo of a red fox in the snow, golden hour, <lora:fox_v2:0.8>, highly detailed\n\
                    Negative prompt: blurry, lowres, watermark\n\
                    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, \
                    Seed: 1234567890, Size: 768x512, Model hash: 6ce0161689, \
                    Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, \
                    VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, \
                    Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, \
                    Lora hashes: \"fox_v2: 9c1a3e5b7d21\", TI hashes: \"EasyNegative: c74b4e810b03\", \
                    Version: v1.10.1";
        let params = parse(text);
        assert_eq!(params.sampler, "DPM++ 2M");
        assert_eq!(params.schedule_type.as_deref(), Some("Karras"));
        assert_eq!(params.cfg_scale, 6.5);
        assert_eq!(params.denoising_strength, Some(0.45));
        assert_eq!(params.vae_hash.as_deref(), Some("735e4c3a44"));
        assert_eq!(params.extra_value("Lora hashes"), Some("fox_v2: 9c1a3e5b7d21"));
        assert_eq!(params.extra_value("Hires upscaler"), Some("R-ESRGAN 4x+"));
        assert_eq!(params.version.as_deref(), Some("v1.10.1"));
        assert_eq!(params.to_infotext(), text);
    }

    /// Multi-line prompts, RNG: CPU and "Schedule type: Automatic" as A1111 1.9 writes them.
    #[test]
    fn reads_and_rewrites_multi_line_prompts_and_cpu_rng() {
        let text = "a cozy cabin in the woods\n\
                    winter, snow, warm light from the windows\n\
                    Negative prompt: people,\n\
                    text, signature\n\
                    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, \
                    Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, \
                    Version: v1.9.4";
        let params = parse(text);
        assert_eq!(params.prompt, "a cozy cabin in the woods\nwinter, snow, warm light from the windows");
        assert_eq!(params.negative_prompt, "people,\ntext, signature");
        assert_eq!(params.schedule_type.as_deref(), Some("Automatic"));
        assert_eq!(params.rng_kind().ok(), Some(RngKind::Cpu));
        assert_eq!(params.to_infotext(), text);
    }

    /// SDXL with a quoted model name, variation seed (an A1111 key Easel does not model) and
    /// ADetailer's keys; the original order comes back.
    #[test]
    fn reads_and_rewrites_quoted_values_and_unknown_keys_in_place() {
        let text = "cinematic photo of an astronaut riding a horse on mars, 35mm\n\
                    Negative prompt: drawing, painting, (worst quality:1.2)\n\
                    Steps: 25, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 5, \
                    Seed: 3141592653, Size: 1024x1024, Model hash: 31e35c80fc, \
                    Model: \"juggernautXL, v9\", Variation seed: 99, Variation seed strength: 0.3, \
                    ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, \
                    ADetailer version: 24.9.0, Version: v1.10.1";
        let params = parse(text);
        assert_eq!(params.model.as_deref(), Some("juggernautXL, v9"));
        assert_eq!(params.extra_value("Variation seed"), Some("99"));
        assert_eq!(params.extra.len(), 5);
        assert_eq!((params.width, params.height), (1024, 1024));
        assert_eq!(params.to_infotext(), text);
    }

    /// The example in A1111's own docstring (2022, 8-digit legacy model hash).
    #[test]
    fn reads_the_oldest_a1111_format() {
        let text = "girl with an artist's beret, determined, blue eyes, desert scene, \
                    computer monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, \
                    ((eyeshadow)), (coquettish), detailed, intricate\n\
                    Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], \
                    bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), \
                    (ugly), (poorly drawn hands), messy drawing\n\
                    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, \
                    Model hash: 45dee52b";
        let params = parse(text);
        assert_eq!(params.sampler, "Euler a");
        assert_eq!(params.schedule_type, None);
        assert_eq!(params.schedule_type_or_default(), "Automatic");
        assert_eq!(params.model_hash.as_deref(), Some("45dee52b"));
        assert_eq!(params.seed, 965_400_086);
        assert_eq!(params.to_infotext(), text);
    }

    #[test]
    fn tolerates_windows_line_endings_and_spaces() {
        let text = "  a prompt  \r\nNegative prompt:   bad  \r\n\
                    Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64\r\n";
        let params = parse(text);
        assert_eq!(params.prompt, "a prompt");
        assert_eq!(params.negative_prompt, "bad");
        assert_eq!((params.width, params.height), (64, 64));
    }

    #[test]
    fn reports_bad_input() {
        for text in [
            "",
            "just a prompt",
            "a prompt\nSteps: 20, Sampler: Euler",
            "Steps: twenty, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512",
            "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: -1, Size: 512x512",
            "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512",
            "Steps: 20, Sampler: Euler, CFG scale: 7, Size: 512x512",
            "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Clip skip: x",
        ] {
            assert!(parse_infotext(text).is_err(), "accepted {text:?}");
        }
    }

    /// A small xorshift: deterministic "random" input without a dependency.
    struct Scramble(u64);
    impl Scramble {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn never_panics_on_arbitrary_or_truncated_text() {
        let valid = GenerationParams { extra: vec![("Lora hashes".into(), "a: 1, b: 2".into())], ..base_params() }
            .to_infotext();
        for (end, _) in valid.char_indices() {
            let _ = parse_infotext(&valid[..end]);
            let _ = parse_infotext(&valid[end..]);
        }
        let alphabet: Vec<char> = "ab Z09_-/:,\"\\\n\r\t xé🦊 Steps: Size: 12x34 Negative prompt:".chars().collect();
        let mut scramble = Scramble(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let len = (scramble.next() % 80) as usize;
            let text: String = (0..len).map(|_| alphabet[(scramble.next() % alphabet.len() as u64) as usize]).collect();
            let _ = parse_infotext(&text);
            // Mutate one character of a valid text, too.
            let mut chars: Vec<char> = valid.chars().collect();
            let at = (scramble.next() % chars.len() as u64) as usize;
            chars[at] = alphabet[(scramble.next() % alphabet.len() as u64) as usize];
            let mutated: String = chars.into_iter().collect();
            if let Ok(params) = parse_infotext(&mutated) {
                // Whatever parses must write out and parse again.
                assert!(parse_infotext(&params.to_infotext()).is_ok(), "{mutated:?}");
            }
        }
    }

    fn test_image(width: u32, height: u32) -> RgbImage {
        let data = (0..width * height * 3).map(|i| (i * 7 % 256) as u8).collect();
        RgbImage { width, height, data }
    }

    #[test]
    fn png_round_trips_pixels_and_unicode_text() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("fox.png");
        let image = test_image(7, 5);
        let infotext = GenerationParams { prompt: "🦊 a fox, 狐狸, café".into(), ..base_params() }.to_infotext();
        let chunks = [
            (PARAMETERS_KEYWORD, infotext.as_str()),
            ("Comment", "café au lait"), // Latin-1: stays tEXt
        ];
        write_png(&path, &image, &chunks, false).unwrap_or_else(|e| panic!("{e}"));

        assert_eq!(read_png(&path).ok(), Some(image));
        let texts = read_png_text(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(texts.contains(&("Comment".into(), "café au lait".into())));
        assert!(texts.contains(&(PARAMETERS_KEYWORD.into(), infotext.clone())));
        let parameters = read_png_parameters(&path).ok().flatten();
        assert_eq!(parameters.as_deref(), Some(infotext.as_str()));

        // The emoji text went into iTXt, the Latin-1 one into tEXt (as PIL does).
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"iTXtparameters\0\0\0\0\0"));
        assert!(has(b"tEXtComment\0caf\xe9"));
        let leftovers = std::fs::read_dir(dir.path()).map(|d| d.count()).ok();
        assert_eq!(leftovers, Some(1), "temporary file left behind");
    }

    #[test]
    fn png_refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("image.png");
        let first = test_image(2, 2);
        let second = test_image(3, 1);
        write_png(&path, &first, &[], false).unwrap_or_else(|e| panic!("{e}"));
        match write_png(&path, &second, &[], false) {
            Err(Error::FileExists { path: reported }) => assert_eq!(reported, path),
            other => panic!("expected FileExists, got {other:?}"),
        }
        assert_eq!(read_png(&path).ok(), Some(first));
        write_png(&path, &second, &[], true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_png(&path).ok(), Some(second));
    }

    #[test]
    fn png_errors_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A "directory" that is a file cannot hold anything, even for root.
        let not_a_dir = dir.path().join("file.txt");
        std::fs::write(&not_a_dir, b"x").unwrap_or_else(|e| panic!("{e}"));
        let path = not_a_dir.join("out.png");
        let error = write_png(&path, &test_image(1, 1), &[], false).err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("out.png"), "{message}");

        let missing = dir.path().join("missing").join("out.png");
        assert!(write_png(&missing, &test_image(1, 1), &[], true).is_err());

        let wrong_size = RgbImage { width: 4, height: 4, data: vec![0; 5] };
        assert!(write_png(&dir.path().join("a.png"), &wrong_size, &[], false).is_err());
        let bad_keyword = write_png(&dir.path().join("b.png"), &test_image(1, 1), &[("", "x")], false);
        assert!(bad_keyword.is_err());

        assert!(read_png_text(&not_a_dir).is_err());
        assert!(read_png(&dir.path().join("nothing.png")).is_err());
    }
}
