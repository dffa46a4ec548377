//! Easel: `easel` opens the app window; `easel generate …` runs headless.

use clap::Parser;

/// Tensors are allocated and freed at a high rate; glibc returns large blocks to the kernel
/// and gets fresh zeroed pages back each time (≈11% of a U-Net step in `perf`). mimalloc keeps
/// and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay outside the denoising loop: mimalloc's default, or the user's
/// `MIMALLOC_PURGE_DELAY`.
static USUAL_PURGE_DELAY: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1000);

/// mimalloc gives freed memory back to the OS after a second, so every step of the denoising
/// loop would fault in and zero its activations again (measured: the bf16 U-Net step 15–20%
/// slower). The engine asks for freed memory to be held while the loop runs and given back
/// where it ends (`easel_engine::memory`). A `MIMALLOC_PURGE_DELAY` set by the user wins.
fn configure_allocator() {
    use std::sync::atomic::Ordering;
    // SAFETY: mimalloc's option getters and setters and `mi_collect` are thread-safe.
    let usual = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    USUAL_PURGE_DELAY.store(usual as i64, Ordering::Relaxed);
    let user_set = std::env::var_os("MIMALLOC_PURGE_DELAY").is_some();
    let hold: fn() = if user_set {
        || {}
    } else {
        // Ten minutes: longer than any step. What earlier phases freed is returned first, so
        // that only the loop's own memory is held.
        || unsafe {
            libmimalloc_sys::mi_collect(true);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 600_000)
        }
    };
    easel_engine::memory::set_allocator_control(easel_engine::memory::AllocatorControl {
        hold,
        release: || unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, USUAL_PURGE_DELAY.load(Ordering::Relaxed) as _);
            libmimalloc_sys::mi_collect(true);
        },
    });
}

fn main() -> std::process::ExitCode {
    configure_allocator();
    let args = easel::cli::Cli::parse();
    let result = match args.command {
        None => easel::app::run(),
        Some(command) => easel::cli::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
