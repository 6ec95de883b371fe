//! `peerless peer`, `peerless ps`, `peerless worker`: one node of a run, in this process, from
//! its node file or from the command line alone (run file, identity, certificate, addresses).
//! Its progress, readiness and errors go to stdout as `NodeLine`s for the launcher; its log
//! goes to stderr.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use peerless_core::admission::Certificate;
use peerless_runtime::config::RunConfig;
use peerless_runtime::function::FunctionCommand;
use peerless_runtime::node::{NodeFile, NodeLine, NodeSection};

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
    let mut file = match &args.config {
        Some(path) => NodeFile::load(path)?,
        None => node_file(&args)?,
    };
    *index = Some(file.node.index);
    if args.join {
        file.node.join = true;
    }
    if let Some(url) = &args.store {
        if !url.starts_with("redis://") {
            // Not echoed: it may hold a password.
            bail!("--store must be a redis:// URL (redis://USER:PASSWORD@HOST:PORT/)");
        }
        file.run.cluster.store = url.clone();
    }
    if let Some(addr) = &args.function_service {
        file.run.function.service_addr = addr.clone();
        file.run.function.validate().context("--function-service")?;
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
    let threads = file.node.runtime_threads();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
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
        let node = async move {
            match role {
                Role::Peer => peerless_runtime::p2p::peer::run(file, command, data_dir, stop_rx).await,
                Role::Ps => peerless_runtime::ps::run_server(file, data_dir, stop_rx).await,
                Role::Worker => peerless_runtime::ps::run_worker(file, command, data_dir, stop_rx).await,
            }
        };
        // The node's event loop runs as a task on a runtime worker, beside the tasks that feed
        // it (the store, the function client, the lanes), not on this thread: each event they
        // sent it was a wake-up of another thread. Serverless rounds: 13 % shorter at W = 2,
        // 4 % at W = 1 (interleaved runs, session 15).
        match tokio::spawn(node).await {
            Ok(summary) => summary,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
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

/// The node file of a node started from the command line: the run file, and the node's index
/// from its certificate.
fn node_file(args: &NodeArgs) -> Result<NodeFile> {
    let (Some(run), Some(identity), Some(cert), Some(listen)) =
        (&args.run, &args.identity, &args.cert, &args.listen)
    else {
        bail!("a node without --config needs --run, --identity, --cert and --listen");
    };
    let mut run_cfg = RunConfig::load(run)?;
    if run_cfg.admission.run_id.is_empty() {
        bail!("--run {}: no [admission] section (make the run with `peerless run init`)", run.display());
    }
    let bytes = std::fs::read(cert).with_context(|| format!("--cert {}", cert.display()))?;
    let index =
        Certificate::decode(&bytes).with_context(|| format!("--cert {}", cert.display()))?.claims.index;
    let dir = args.out.clone().unwrap_or_else(|| format!("node-{index}").into());
    let node = NodeSection {
        index,
        listen: listen.clone(),
        bootstrap: args.bootstrap.clone(),
        external: args.external.clone().unwrap_or_default(),
        dir,
        identity: identity.clone(),
        certificate: cert.clone(),
        ..NodeSection::default()
    };
    if run_cfg.cluster.secret.is_empty() {
        // The embedded store is this node's own: its password need not be shared.
        run_cfg.cluster.secret = store_password()?;
    }
    let file = NodeFile { node, run: run_cfg };
    file.validate()?;
    Ok(file)
}

/// A random password for this node's embedded store (32 hex characters).
fn store_password() -> Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the store's password")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
