//! The function services of a local cluster: one `peerless function-service` per peer or
//! worker, holding its function instances, so that a node the fault injector kills finds them
//! warm when it restarts (as Lambda's warm pool outlives its caller).
//!
//! They are started before the nodes; each prints the address it serves on, which is written
//! into its node's file (`function.service_addr`; cleared when they stop). They are the
//! launcher's children, not the nodes': a node's death leaves its service running.
//! [`Services`] stops them when it is dropped, so whatever ends the run (its end, Ctrl-C, a
//! failure, an error of the launcher) leaves none behind; started with `PEERLESS_LAUNCHED=1`,
//! each also dies with the launcher (`PR_SET_PDEATHSIG`), and its instances with it (their
//! Runtime API goes away).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::Signal;

use super::supervise::{Node, Role, launched, signal};
use crate::config::{Compute, RunConfig};
use crate::function::Service;
use crate::node::NodeFile;

/// How long a service has to say where it serves.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a service told to stop has to kill its instances before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The running function services of a cluster; dropping it stops them.
#[derive(Debug, Default)]
pub(super) struct Services {
    children: Vec<Child>,
    /// The node files pointed at a service: pointed back at none when the services stop, so
    /// a node started by hand from one later runs its instances itself.
    pointed: Vec<PathBuf>,
}

/// What a service prints once it serves.
#[derive(serde::Deserialize)]
struct Ready {
    listening: String,
}

impl Services {
    /// Starts a service for every node of `nodes` that invokes functions, when `cfg` asks for
    /// them (`launcher.function_services`, functions on the local backend), and points each
    /// node's file at its service. None otherwise.
    pub(super) fn start(cfg: &RunConfig, exe: &Path, nodes: &[Node]) -> Result<Services> {
        let mut services = Services::default();
        let wanted = cfg.launcher.function_services
            && cfg.cluster.compute == Compute::Functions
            && cfg.function.backend == Service::Local
            && cfg.function.service_addr.is_empty();
        if !wanted {
            return Ok(services);
        }
        let served: Vec<&Node> = nodes.iter().filter(|n| n.role != Role::Ps).collect();
        let mut ready = Vec::with_capacity(served.len());
        for node in &served {
            let (child, rx) = spawn(exe, node)?;
            services.children.push(child);
            ready.push(rx);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for (node, rx) in served.iter().zip(ready) {
            let wait = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(wait) else {
                let log = log_path(&node.config);
                bail!(
                    "the function service of {} did not start (see {})",
                    node.config.display(),
                    log.display()
                );
            };
            let addr = serde_json::from_str::<Ready>(&line)
                .with_context(|| format!("the function service of {} said {line:?}", node.config.display()))?
                .listening;
            point_at(&node.config, &addr)?;
            services.pointed.push(node.config.clone());
            tracing::debug!(node = %node.config.display(), %addr, "function service ready");
        }
        Ok(services)
    }
}

impl Drop for Services {
    /// SIGTERM (they kill and reap their instances), then SIGKILL what is left after
    /// [`STOP_TIMEOUT`]; every service is reaped.
    fn drop(&mut self) {
        for c in &self.children {
            signal(c.id(), Signal::CONT);
            signal(c.id(), Signal::TERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for config in &self.pointed {
            if let Err(e) = point_at(config, "") {
                tracing::warn!(config = %config.display(), error = %e, "cannot clear function.service_addr");
            }
        }
    }
}

/// The log of the service of the node whose file is `config`.
fn log_path(config: &Path) -> PathBuf {
    config.with_file_name("function-service.log")
}

/// Starts the service of `node` (on its host, if it has one of its own); its first stdout
/// line arrives on the receiver (a thread drains the rest).
fn spawn(exe: &Path, node: &Node) -> Result<(Child, mpsc::Receiver<String>)> {
    let config = &node.config;
    let mut cmd = launched(exe, "function-service", config, &log_path(config), node.netns.as_deref())?;
    let mut child =
        cmd.spawn().with_context(|| format!("starting the function service of {}", config.display()))?;
    let out = child.stdout.take().expect("invariant: stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines().map_while(Result::ok);
        if let Some(first) = lines.next() {
            let _ = tx.send(first);
        }
        lines.for_each(drop);
    });
    Ok((child, rx))
}

/// Writes `addr` into the node file `config` as its `function.service_addr` (empty: none).
fn point_at(config: &Path, addr: &str) -> Result<()> {
    let mut file = NodeFile::load(config)?;
    file.run.function.service_addr = addr.to_owned();
    file.run.function.validate().with_context(|| format!("function service address {addr}"))?;
    std::fs::write(config, file.to_toml()).with_context(|| format!("writing {}", config.display()))
}
