//! `peerless data fetch` and `peerless data verify`.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::DataCommand;
use crate::common::data_dir;

/// Runs a data command.
pub fn run(cmd: DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Fetch { name, dir } => fetch(name, dir.data_dir.as_deref()),
        DataCommand::Verify { name, dir } => verify(name, dir.data_dir.as_deref()),
    }
}

/// Obtains `name` into the data directory, printing each source tried.
fn fetch(name: peerless_ml::DatasetName, dir: Option<&std::path::Path>) -> Result<ExitCode> {
    let dir = data_dir(dir);
    let report = peerless_ml::data::fetch(name, &dir)?;
    if report.embedded {
        println!("{name} is embedded in the binary; nothing to fetch");
        return Ok(ExitCode::SUCCESS);
    }
    for a in &report.attempts {
        match &a.error {
            None => println!("  {}: ok ({} files)", a.source, a.installed.len()),
            Some(e) => println!("  {}: {} file(s), then failed: {e}", a.source, a.installed.len()),
        }
    }
    println!(
        "{name}: verified in {} ({} already present, {} fetched)",
        report.dir.display(),
        report.already_present.len(),
        report.fetched.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Verifies `name`'s files (the IDX files themselves, not the cache) and loads them.
fn verify(name: peerless_ml::DatasetName, dir: Option<&std::path::Path>) -> Result<ExitCode> {
    let dir = data_dir(dir);
    peerless_ml::data::verify_files(name, &dir)?;
    let split = peerless_ml::data::load(name, &dir)?;
    println!(
        "{name}: ok — {} train / {} test samples, {:?} inputs, {} classes",
        split.train.len(),
        split.test.len(),
        split.train.shape,
        split.train.classes
    );
    Ok(ExitCode::SUCCESS)
}
