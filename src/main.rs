//! Easel: `easel` opens the app window; `easel generate …` runs headless.

use clap::Parser;

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
