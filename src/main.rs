//! Easel: `easel` opens the app window; `easel generate …` runs headless.

use clap::Parser;

/// Tensors are allocated and freed at a high rate; glibc returns large blocks to the kernel
/// and gets fresh zeroed pages back each time (≈11% of a U-Net step in `perf`). mimalloc keeps
/// and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
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
