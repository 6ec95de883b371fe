//! The `peerless` command line: parses arguments, starts tracing, and calls into the library.

mod bench;
mod cli;
mod experiment;
mod faults;
mod function_cmd;
mod p2p_cmd;
mod progress;
mod report;
mod supervise;
mod train;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Every training step allocates and frees tensors of up to a few MB. glibc's malloc hands
/// such blocks back to the kernel and page-faults them in again on the next step, which
/// measured as ~half of the MLP step's time (`peerless bench step`: 240 → 460 steps/s with
/// an allocator that keeps them). mimalloc keeps them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = if function_cmd::started_as_lambda_bootstrap() {
        cli::Cli::parse_from(["peerless", "function"])
    } else {
        cli::Cli::parse()
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
