//! Timing the pipeline's parts on a loaded model, for `easel bench`. Reports medians, so one
//! slow run (page cache, another process) does not decide the number.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::models::unet::AddedCond;
use crate::models::Family;
use crate::pipeline::preview::{latent_planes, latent_to_rgb};
use crate::pipeline::{GenerationRequest, Pipeline};
use crate::Result;

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub family: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub sampler: String,
    pub threads: usize,
    /// The vector instructions the CPU kernels use (AVX-512, AVX2, …): the same model and
    /// thread count run at very different speeds on CPUs with and without AVX-512.
    pub cpu_vector_isa: String,
    pub text_encoding_s: f64,
    pub unet_step_cfg_s: f64,
    pub unet_step_no_cfg_s: f64,
    pub vae_decode_s: f64,
    /// The per-step live preview: copying the x0 estimate to the host and projecting it to RGB
    /// on the CPU (the app draws it with a shader; this is the fallback's cost, an upper bound).
    pub preview_s: f64,
    pub end_to_end_s: f64,
    /// Peak resident host memory (RAM) of the process so far — not GPU memory (Linux; `None` elsewhere).
    pub peak_memory_bytes: Option<u64>,
    /// Peak of the private part of it (RssAnon: everything but mapped files such as the model's
    /// weights), sampled every 10 ms while measuring (Linux; `None` elsewhere).
    pub peak_private_memory_bytes: Option<u64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// A field of /proc/self/status in bytes (Linux).
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak resident set size of this process, from /proc/self/status (VmHWM).
pub fn peak_memory_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}

/// Samples the process's private resident memory (RssAnon) on a thread of its own. The kernel
/// keeps a peak only for the whole resident set, which also counts the pages of mapped files —
/// both Easel and diffusers map the weights — so the private part's peak is sampled.
struct PrivateMemorySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<u64>>,
}

impl PrivateMemorySampler {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = status_bytes("RssAnon")?;
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(10));
                peak = peak.max(status_bytes("RssAnon").unwrap_or(0));
            }
            Some(peak)
        });
        Self { stop, thread }
    }

    fn peak(self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

/// Times text encoding, one U-Net step with and without CFG batching, the VAE decode and a
/// whole generation of `request`, each the median of `runs` runs (the whole generation: one).
pub fn run(pipeline: &Pipeline, request: &GenerationRequest, runs: usize) -> Result<BenchReport> {
    request.validate(pipeline.info())?;
    // Timings of the steady state: a generation right after a load overlaps the two.
    crate::models::mapped::wait_for_page_in();
    let sampler = PrivateMemorySampler::start();
    let sd = pipeline.model();
    let info = pipeline.info();
    let device = &sd.options.device;
    let dtype = sd.options.dtype;
    let sync = || device.synchronize();

    let text_encoding_s = time_runs(runs, || {
        pipeline.encode_text(&request.prompt, &request.negative_prompt, &request.prompt_options())?;
        Ok(sync()?)
    })?;

    let cond = pipeline.encode_text(&request.prompt, &request.negative_prompt, &request.prompt_options())?;
    // The benchmark's prompts fit one chunk each, so they batch.
    let both = cond.context()?.ok_or_else(|| crate::Error::InvalidSetting("bench prompts must be one chunk".into()))?;
    let factor = info.vae.downscale_factor();
    let (h, w) = (request.height / factor, request.width / factor);
    let unet_step = |batch: usize| -> Result<f64> {
        let context = both.narrow(0, 2 - batch, batch)?;
        let sample = Tensor::randn(0f32, 1f32, (batch, info.unet.in_channels, h, w), device)?.to_dtype(dtype)?;
        let pooled = cond.pooled.as_ref().map(|p| p.narrow(0, 2 - batch, batch)).transpose()?;
        let time_ids = if info.family == Family::Sdxl {
            let row =
                [request.height as f32, request.width as f32, 0.0, 0.0, request.height as f32, request.width as f32];
            Some(Tensor::from_vec(row.repeat(batch), (batch, 6), device)?.to_dtype(dtype)?)
        } else {
            None
        };
        time_runs(runs, || {
            let added = match (&pooled, &time_ids) {
                (Some(text_embeds), Some(time_ids)) => Some(AddedCond { text_embeds, time_ids }),
                _ => None,
            };
            sd.unet.forward(&sample, 500.0, &context, added)?;
            Ok(sync()?)
        })
    };
    // As in the denoising loop: only the U-Net's weights resident (see `Pipeline::denoise`),
    // freed memory held (see `memory`).
    sd.keep_resident_only(crate::models::Component::Unet);
    let hold = crate::memory::HoldFreedMemory::new();
    let unet_step_cfg_s = unet_step(2)?;
    let unet_step_no_cfg_s = unet_step(1)?;
    drop(hold);

    let latents = Tensor::randn(0f32, 1f32, (1, info.vae.latent_channels, h, w), device)?;
    let vae_decode_s = time_runs(runs, || {
        pipeline.decode_latents(&latents)?;
        Ok(sync()?)
    })?;
    crate::memory::release_free_memory();

    // Many repetitions: one preview is far below the timer's noise on its own.
    const PREVIEW_REPEATS: usize = 20;
    let preview_s = time_runs(runs, || {
        for _ in 0..PREVIEW_REPEATS {
            let planes = latent_planes(&latents)?;
            latent_to_rgb(&latents, info.family)?;
            std::hint::black_box(planes);
        }
        Ok(())
    })? / PREVIEW_REPEATS as f64;

    let start = Instant::now();
    pipeline.generate(request, &mut |_| ControlFlow::Continue(()))?;
    let end_to_end_s = start.elapsed().as_secs_f64();

    Ok(BenchReport {
        model: info.name.clone(),
        family: info.family.to_string(),
        width: request.width,
        height: request.height,
        steps: request.steps,
        sampler: request.sampler.combined_id(request.schedule),
        threads: candle_core::utils::get_num_threads(),
        cpu_vector_isa: crate::kernels::cpu_vector_isa().to_string(),
        text_encoding_s,
        unet_step_cfg_s,
        unet_step_no_cfg_s,
        vae_decode_s,
        preview_s,
        end_to_end_s,
        peak_memory_bytes: peak_memory_bytes(),
        peak_private_memory_bytes: sampler.peak(),
    })
}
