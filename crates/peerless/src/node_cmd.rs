//! `peerless peer`, `peerless ps`, `peerless worker`: one node of a run, in this process, from
//! its node file. Its progress, readiness and errors go to stdout as `NodeLine`s for the
//! launcher; its log goes to stderr.

use std::process::ExitCode;

use anyhow::{Context, Result};
use peerless_runtime::function::FunctionCommand;
use peerless_runtime::node::NodeFile;
use peerless_runtime::node::NodeLine;

use crate::cli::NodeArgs;
use peerless_runtime::cluster::supervise::Role;

/// Runs one node until training is over; SIGINT or SIGTERM stop it after writing its summary.
/// An error is also told to the launcher (a `failed` line on stdout), which shows it.
pub fn run_node(role: Role, args: NodeArgs) -> Result<ExitCode> {
    let mut index = None;
    let result = serve(role, args, &mut index);
    if let Err(e) = &result {
        NodeLine::Failed { failed: index, error: format!("{e:#}") }.print();
    }
    result
}

fn serve(role: Role, args: NodeArgs, index: &mut Option<u32>) -> Result<ExitCode> {
    if std::env::var_os("PEERLESS_LAUNCHED").is_some() {
        // Started by a launcher: do not outlive it.
        peerless_runtime::node::die_with_parent().context("setting the parent-death signal")?;
    }
    let mut file = NodeFile::load(&args.config)?;
    *index = Some(file.node.index);
    if args.join {
        file.node.join = true;
    }
    let data_dir = crate::common::data_dir(args.data_dir.as_deref().or(Some(&file.run.data.dir)));
    std::fs::create_dir_all(&file.node.dir)
        .with_context(|| format!("creating {}", file.node.dir.display()))?;
    // Written then renamed: whoever sees `pid` (tests, tools) never reads it half-written.
    let tmp = file.node.dir.join("pid.tmp");
    std::fs::write(&tmp, std::process::id().to_string())
        .and_then(|()| std::fs::rename(&tmp, file.node.dir.join("pid")))
        .with_context(|| format!("writing the pid into {}", file.node.dir.display()))?;
    let exe = std::env::current_exe().context("locating the peerless executable")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let summary = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        let command = FunctionCommand::peerless(exe);
        match role {
            Role::Peer => peerless_runtime::p2p::peer::run(file, command, data_dir, stop_rx).await,
            Role::Ps => peerless_runtime::ps::run_server(file, data_dir, stop_rx).await,
            Role::Worker => peerless_runtime::ps::run_worker(file, command, data_dir, stop_rx).await,
        }
    })?;
    eprintln!(
        "{} {} done: round {}, test accuracy {:.2} %, digest {}",
        role.name(),
        summary.peer,
        summary.rounds,
        summary.test_accuracy * 100.0,
        summary.param_digest.get(..16).unwrap_or("-")
    );
    Ok(ExitCode::SUCCESS)
}
