//! Easel: `easel` opens the app window; `easel generate …` runs headless.

use clap::Parser;

/// Tensors are allocated and freed at a high rate; glibc returns large blocks to the kernel
/// and gets fresh zeroed pages back each time (≈11% of a U-Net step in `perf`). mimalloc keeps
/// and reuses small blocks; tensors' large blocks come from a first-fit arena that holds them
/// with less fragmentation (`easel::allocator`).
#[global_allocator]
static GLOBAL: easel::allocator::TensorArena<mimalloc::MiMalloc> =
    easel::allocator::TensorArena::new(mimalloc::MiMalloc);

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay outside the denoising loop: mimalloc's default, or the user's
/// `MIMALLOC_PURGE_DELAY`.
static USUAL_PURGE_DELAY: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1000);

/// Whether the user set `MIMALLOC_PURGE_DELAY` (then mimalloc keeps to it).
static USER_PURGE_DELAY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Allocators give freed memory back to the OS soon (mimalloc: after a second), so every step
/// of the denoising loop would fault in and zero its activations again (measured: the bf16
/// U-Net step 15–20% slower). The engine asks for freed memory to be held while the loop runs
/// and given back where it ends (`easel_engine::memory`): the tensor arena holds its blocks,
/// and mimalloc its own unless the user set `MIMALLOC_PURGE_DELAY`.
fn configure_allocator() {
    use std::sync::atomic::Ordering;
    // SAFETY: mimalloc's option getters and setters and `mi_collect` are thread-safe.
    let usual = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    USUAL_PURGE_DELAY.store(usual as i64, Ordering::Relaxed);
    USER_PURGE_DELAY.store(std::env::var_os("MIMALLOC_PURGE_DELAY").is_some(), Ordering::Relaxed);
    easel_engine::memory::set_allocator_control(easel_engine::memory::AllocatorControl {
        hold: || {
            GLOBAL.hold();
            if !USER_PURGE_DELAY.load(Ordering::Relaxed) {
                // Ten minutes: longer than any step. What earlier phases freed is returned
                // first, so that only the loop's own memory is held.
                unsafe {
                    libmimalloc_sys::mi_collect(true);
                    libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 600_000)
                }
            }
        },
        release: || {
            GLOBAL.release();
            unsafe {
                libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, USUAL_PURGE_DELAY.load(Ordering::Relaxed) as _);
                libmimalloc_sys::mi_collect(true);
            }
        },
    });
}

fn main() -> std::process::ExitCode {
    configure_allocator();
    let args = easel::cli::Cli::parse();
    easel::cli::init_logging(args.verbose);
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
