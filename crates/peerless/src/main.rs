//! The `peerless` command line: parses arguments, starts tracing, and calls into the library.

mod admission_cmd;
mod bench;
mod cli;
mod common;
mod data_cmd;
mod experiment;
mod function_cmd;
mod launch;
mod node_cmd;
mod progress;
mod report;
mod train;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{BenchCommand, Command, RunCommand};
use peerless_runtime::cluster::supervise::Role;

/// Every training step allocates and frees tensors of up to a few MB. glibc's malloc hands
/// such blocks back to the kernel and page-faults them in again on the next step, which
/// measured as ~half of the MLP step's time (`peerless bench step`: 240 → 460 steps/s with
/// an allocator that keeps them). mimalloc keeps them. It is built without transparent huge
/// pages (`no_thp`, see the workspace's Cargo.toml): a restarted peer would otherwise spend tens
/// of ms zeroing 2 MiB pages on its first touches of fresh memory, while it takes in a state.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
    match run(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command: each is a module that calls the library and prints its result.
fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Train(args) => train::run(*args),
        Command::Peer(args) => node_cmd::run_node(Role::Peer, args),
        Command::Ps(args) => node_cmd::run_node(Role::Ps, args),
        Command::Worker(args) => node_cmd::run_node(Role::Worker, args),
        Command::Keygen { out } => admission_cmd::keygen(&out),
        Command::Run(RunCommand::Init(args)) => admission_cmd::run_init(&args),
        Command::Admit(args) => admission_cmd::admit(&args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Bench(BenchCommand::Step(args)) => bench::run_step(args),
        Command::Bench(BenchCommand::P2p(args)) => bench::p2p::run_cli(args),
        Command::Bench(BenchCommand::Link(args)) => bench::link::run_cli(args),
        Command::Bench(BenchCommand::Memory(args)) => bench::memory::run_cli(args),
        Command::Bench(BenchCommand::Invoke(args)) => function_cmd::run_bench_invoke(args),
        Command::Function => function_cmd::run_function(),
        Command::FunctionService(args) => function_cmd::run_function_service(&args),
        Command::Invoke(args) => function_cmd::run_invoke(*args),
        Command::Experiment(args) => experiment::run(*args),
        Command::Report { dir } => report::run_cli(&dir),
    }
}
