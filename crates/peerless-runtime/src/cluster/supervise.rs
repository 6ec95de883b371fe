//! The local cluster's supervisor: starts the node processes, shows their progress, injects the
//! scenario's faults, restarts the PS, and decides when the run ends.
//!
//! A run ends when every node has exited, or earlier:
//! - a node that fails before it is ready (bad data, bad config, a port it cannot bind) stops
//!   the run at once, with that node's own error;
//! - a PS that dies `ps.max_restarts` times in a row without a round done in between ends the
//!   run with its last error;
//! - once a node holding the result has finished (a peer, or the PS), nodes still running
//!   `launcher.grace_ms` later (frozen, hung) are stopped: SIGCONT + SIGTERM, SIGKILL 3 s later;
//! - Ctrl-C sends every node SIGINT (they write their summaries) and kills what is left after
//!   `launcher.grace_ms`; a second Ctrl-C kills at once.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::process::Signal;

use super::events::ClusterEvent;
use super::faults::{Injector, Order};
use super::{Exit, NodeOutcome, Recovery, Show};
use crate::config::RunConfig;
use crate::node::NodeLine;
use crate::rundir::RunDir;

/// How long a node told to stop has before it is killed.
const KILL_AFTER: Duration = Duration::from_secs(3);

/// The role of a process of a local cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A P2P peer.
    Peer,
    /// The parameter server.
    Ps,
    /// A PS worker.
    Worker,
}

impl Role {
    /// The subcommand that runs it, and its name in events and summaries.
    pub fn name(self) -> &'static str {
        match self {
            Role::Peer => "peer",
            Role::Ps => "ps",
            Role::Worker => "worker",
        }
    }

    /// Whether a clean exit of this node means the run's result is in.
    fn holds_result(self) -> bool {
        matches!(self, Role::Peer | Role::Ps)
    }
}

/// One process of a local cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// What it runs.
    pub role: Role,
    /// Its configuration file (its directory holds its log, pid and run files).
    pub config: PathBuf,
    /// Restart after this delay when it dies (the PS: the cloud restarting its instance).
    pub restart: Option<Duration>,
    /// Started with the run (else by a `join` fault, when it is due).
    pub at_launch: bool,
    /// The network namespace it runs in (`launcher.netns`), with its function service.
    pub netns: Option<String>,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.config.with_file_name(format!("{}.log", self.role.name()))
    }

    fn label(&self, index: usize) -> String {
        match self.role {
            Role::Ps => "the PS".into(),
            r => format!("{} {index}", r.name()),
        }
    }
}

/// What the supervisor hands back when every node is gone.
#[derive(Debug)]
pub struct Supervised {
    /// Launcher wall time, s.
    pub wall_s: f64,
    /// PS restarts.
    pub recoveries: Vec<Recovery>,
    /// Each node's end, by index.
    pub outcomes: Vec<NodeOutcome>,
    /// Why the run failed as a whole (bad input, a PS that keeps dying).
    pub fatal: Option<String>,
    /// Ctrl-C stopped it.
    pub interrupted: bool,
}

/// Sends `sig` to `pid`; a process already gone is not an error.
pub fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The last line of a node's log that reads like its error (what a node that died without
/// saying why left behind: a panic, an error printed before its configuration was read).
fn last_error_in_log(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let found = lines.iter().rev().find(|l| l.contains("error") || l.contains("panicked"));
    found.or(lines.last()).map(|l| (*l).to_owned())
}

/// The supervisor's view of one node.
#[derive(Debug, Default)]
struct Slot {
    child: Option<Child>,
    /// Ready since its latest start.
    ready: bool,
    /// The error its latest process reported.
    error: Option<String>,
    /// Restarts since its last round done (a PS that keeps dying).
    restarts_in_a_row: u32,
    /// Its highest round (PS: version) reported.
    round: u64,
    exit: Option<ExitStatus>,
    exit_at_s: Option<f64>,
    /// A pending restart: when, and whether it rejoins (`--join`).
    restart_at: Option<(Instant, bool)>,
    /// Restarted, waiting for its first round (for the recovery's downtime).
    restarted: bool,
    stopped: Option<String>,
}

/// The run is being stopped: since when, and when what is left gets SIGKILL.
#[derive(Debug)]
struct Stopping {
    kill_at: Instant,
    killed: bool,
}

/// Supervises a local cluster until every node is gone.
pub struct Supervisor<'a> {
    cfg: &'a RunConfig,
    dir: &'a mut RunDir,
    nodes: Vec<Node>,
    slots: Vec<Slot>,
    injector: Injector,
    tx: mpsc::Sender<(usize, NodeLine)>,
    rx: mpsc::Receiver<(usize, NodeLine)>,
    show: &'a dyn Show,
    /// The executable nodes run (`peerless peer|ps|worker --config …`).
    exe: PathBuf,
    started: Instant,
    recoveries: Vec<Recovery>,
    /// When a node holding the result first finished cleanly.
    result_at: Option<Instant>,
    stopping: Option<Stopping>,
    fatal: Option<String>,
    interrupts: Arc<AtomicU32>,
    /// Ctrl-C presses already acted on.
    interrupts_seen: u32,
    /// The PS's versions per synchronous round (fault schedules count synchronous rounds).
    versions_per_round: u64,
    acc: Option<f32>,
}

impl std::fmt::Debug for Supervisor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("nodes", &self.nodes).finish_non_exhaustive()
    }
}

impl<'a> Supervisor<'a> {
    /// A supervisor for `nodes` run by `exe`, with the fault `injector`; it shows what
    /// happens through `show` and stops the run on the Ctrl-C presses `interrupts` counts.
    pub fn new(
        cfg: &'a RunConfig,
        dir: &'a mut RunDir,
        nodes: Vec<Node>,
        injector: Injector,
        launcher: &'a super::Launcher,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let is_ps = nodes.iter().any(|n| n.role == Role::Ps);
        let versions_per_round = if is_ps { cfg.ps.versions_per_round(cfg.cluster.nodes) } else { 1 };
        let slots = nodes.iter().map(|_| Slot::default()).collect();
        Supervisor {
            cfg,
            dir,
            nodes,
            slots,
            injector,
            tx,
            rx,
            show: launcher.show,
            exe: launcher.exe.clone(),
            started: Instant::now(),
            recoveries: Vec::new(),
            result_at: None,
            stopping: None,
            fatal: None,
            interrupts: launcher.interrupts.clone(),
            interrupts_seen: 0,
            versions_per_round,
            acc: None,
        }
    }

    /// Starts every node and supervises the run until every node is gone.
    pub fn run(mut self) -> Result<Supervised> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].at_launch {
                self.start(i, false)?;
            }
        }
        loop {
            self.read_lines();
            self.tick_faults()?;
            self.handle_interrupts();
            self.reap()?;
            self.restart_due()?;
            self.stop_after_grace()?;
            self.escalate();
            let alive = self.slots.iter().any(|s| s.child.is_some());
            let pending = self.slots.iter().any(|s| s.restart_at.is_some());
            if !alive && (!pending || self.stopping.is_some()) {
                break;
            }
            if !alive {
                // Nobody left to rejoin: only the PS is restarted into an empty cluster.
                for (slot, node) in self.slots.iter_mut().zip(&self.nodes) {
                    if node.restart.is_none() {
                        slot.restart_at = None;
                    }
                }
            }
        }
        let round = self.global_round();
        for rec in self.injector.finish(round) {
            self.dir.record(&rec)?;
        }
        self.show.finish();
        let outcomes = self
            .nodes
            .iter()
            .zip(&self.slots)
            .enumerate()
            .map(|(index, (node, slot))| NodeOutcome {
                node: node.role.name().into(),
                index,
                exit: slot.exit.map_or(Exit::NeverStarted, Exit::of),
                completed: slot.exit.is_some_and(|s| s.success()),
                stopped: slot.stopped.clone(),
                error: slot.error.clone(),
            })
            .collect();
        Ok(Supervised {
            wall_s: self.started.elapsed().as_secs_f64(),
            recoveries: self.recoveries,
            outcomes,
            fatal: self.fatal,
            interrupted: self.interrupts_seen > 0,
        })
    }

    /// A line for the user.
    fn say(&self, line: impl AsRef<str>) {
        self.show.say(line.as_ref());
    }

    fn start(&mut self, i: usize, join: bool) -> Result<()> {
        let mut child = spawn_node(&self.exe, &self.nodes[i], join)?;
        let out = child.stdout.take().expect("invariant: stdout is piped");
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(l) = NodeLine::parse(&line) {
                    let _ = tx.send((i, l));
                }
            }
        });
        self.injector.set_pid(i, Some(child.id()));
        let slot = &mut self.slots[i];
        slot.child = Some(child);
        slot.ready = false;
        slot.error = None;
        Ok(())
    }

    fn global_round(&self) -> u64 {
        self.slots.iter().map(|s| s.round).max().unwrap_or(0) / self.versions_per_round
    }

    /// Takes in what the nodes printed during one tick (50 ms).
    fn read_lines(&mut self) {
        let tick_end = Instant::now() + Duration::from_millis(50);
        while let Ok((i, line)) = self.rx.recv_timeout(tick_end.saturating_duration_since(Instant::now())) {
            match line {
                NodeLine::Ready { .. } => self.slots[i].ready = true,
                NodeLine::Failed { error, .. } => self.slots[i].error = Some(error),
                NodeLine::Notice { says, .. } => self.say(format!("{}: {says}", self.nodes[i].label(i))),
                NodeLine::Progress(p) => {
                    let slot = &mut self.slots[i];
                    slot.ready = true;
                    slot.round = p.round;
                    slot.restarts_in_a_row = 0;
                    if std::mem::take(&mut slot.restarted)
                        && let Some(rec) =
                            self.recoveries.iter_mut().find(|r| r.index == i && r.downtime_s.is_none())
                    {
                        rec.downtime_s = Some(self.started.elapsed().as_secs_f64() - rec.died_at_s);
                    }
                    self.acc = p.test_accuracy.or(self.acc);
                    let position = self.slots.iter().map(|s| s.round).max().unwrap_or(0);
                    self.show.progress(position, &p, self.acc);
                }
            }
        }
    }

    fn tick_faults(&mut self) -> Result<()> {
        if self.stopping.is_some() {
            return Ok(());
        }
        let (records, orders) = self.injector.tick(self.started.elapsed(), self.global_round());
        for rec in records {
            self.say(rec.line());
            self.dir.record(&rec)?;
        }
        for order in orders {
            match order {
                Order::Restart { index, after } => {
                    self.slots[index].restart_at =
                        Some((Instant::now() + after, self.nodes[index].role == Role::Peer));
                }
                Order::Join { index } => self.start(index, true)?,
            }
        }
        Ok(())
    }

    fn handle_interrupts(&mut self) {
        let pressed = self.interrupts.load(Ordering::Relaxed);
        if pressed == self.interrupts_seen {
            return;
        }
        self.interrupts_seen = pressed;
        if pressed == 1 && self.stopping.is_none() {
            self.say("interrupt: stopping the nodes (they write their summaries; Ctrl-C again kills them)");
            let grace = Duration::from_millis(self.cfg.launcher.grace_ms);
            self.stop_all(Signal::INT, grace);
        } else {
            self.say("interrupt: killing the nodes");
            self.kill_all();
        }
    }

    /// Sends every live node `sig` (and SIGCONT, so a frozen one acts on it), cancels pending
    /// restarts, and has what is left killed after `kill_after`.
    fn stop_all(&mut self, sig: Signal, kill_after: Duration) {
        for slot in &mut self.slots {
            slot.restart_at = None;
            if let Some(c) = &slot.child {
                signal(c.id(), sig);
                signal(c.id(), Signal::CONT);
            }
        }
        if self.stopping.is_none() {
            self.stopping = Some(Stopping { kill_at: Instant::now() + kill_after, killed: false });
        }
    }

    fn kill_all(&mut self) {
        for slot in &mut self.slots {
            slot.restart_at = None;
            if let Some(c) = &slot.child {
                signal(c.id(), Signal::KILL);
            }
        }
        self.stopping = Some(Stopping { kill_at: Instant::now(), killed: true });
    }

    fn escalate(&mut self) {
        if let Some(s) = &self.stopping
            && !s.killed
            && Instant::now() >= s.kill_at
        {
            self.kill_all();
        }
    }

    /// Ends the run with `why`: every node is stopped; the launcher exits with this error.
    fn fail(&mut self, why: String) -> Result<()> {
        self.dir.record(&ClusterEvent::RunFailed { error: why.clone() })?;
        self.fatal.get_or_insert(why);
        self.stop_all(Signal::TERM, KILL_AFTER);
        Ok(())
    }

    /// Records every node that exited since the last tick, and decides what follows.
    fn reap(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            if let Some(status) = self.slots[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.on_exit(i, status)?;
            }
        }
        Ok(())
    }

    fn on_exit(&mut self, i: usize, status: ExitStatus) -> Result<()> {
        let now_s = self.started.elapsed().as_secs_f64();
        let node = self.nodes[i].clone();
        let slot = &mut self.slots[i];
        slot.child = None;
        slot.exit = Some(status);
        slot.exit_at_s = Some(now_s);
        let (ready, restarts_in_a_row) = (slot.ready, slot.restarts_in_a_row);
        let reported = slot.error.clone();
        self.injector.set_pid(i, None);
        let how = Exit::of(status).to_string();
        let exit = Exit::of(status);
        self.dir.record(&ClusterEvent::NodeExit { node: node.role.name().into(), index: i, status: exit })?;
        if node.role == Role::Peer {
            self.dir.record(&ClusterEvent::PeerExit { peer: i, status: exit })?;
        }
        if self.stopping.is_some() {
            return Ok(());
        }
        // What the node said; a signal's death says nothing, so the status is its error;
        // otherwise the last error its log holds (a panic, say).
        let error = || match (&reported, status.signal()) {
            (Some(e), _) => e.clone(),
            (None, Some(_)) => how.clone(),
            (None, None) => last_error_in_log(&node.log_path()).unwrap_or_else(|| how.clone()),
        };
        // An error exit (not a signal) before it was ready: bad input, not a crash.
        if !ready && status.code().is_some_and(|c| c != 0) {
            return self.fail(format!("{} failed before its first round: {}", node.label(i), error()));
        }
        if status.success() {
            if node.role.holds_result() && self.result_at.is_none() {
                self.result_at = Some(Instant::now());
                // Training is over: churn would only hit nodes on their way out.
                self.injector.end_streams();
            }
            return Ok(());
        }
        let said = reported.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        self.say(format!("{} stopped: {how}{said}; log: {}", node.label(i), node.log_path().display()));
        let Some(delay) = node.restart else { return Ok(()) };
        let max = self.cfg.ps.max_restarts;
        if restarts_in_a_row >= max {
            return self.fail(format!(
                "{} died {} times in a row without a round done in between (ps.max_restarts = {max}); its last error: {}",
                node.label(i),
                restarts_in_a_row + 1,
                error()
            ));
        }
        let slot = &mut self.slots[i];
        slot.restarts_in_a_row += 1;
        slot.restart_at = Some((Instant::now() + delay, false));
        slot.restarted = false;
        self.record_death(i);
        Ok(())
    }

    /// Opens a recovery for node `i`, which died at its last exit, at its last round.
    fn record_death(&mut self, i: usize) {
        let slot = &self.slots[i];
        self.recoveries.push(Recovery {
            node: self.nodes[i].role.name().into(),
            index: i,
            died_at_s: slot.exit_at_s.unwrap_or(0.0),
            died_at_round: slot.round,
            resumed_from_round: None,
            rounds_lost: None,
            downtime_s: None,
        });
    }

    /// Starts the nodes whose restart is due.
    fn restart_due(&mut self) -> Result<()> {
        for i in 0..self.slots.len() {
            let Some((at, join)) = self.slots[i].restart_at else { continue };
            if Instant::now() < at || self.slots[i].child.is_some() {
                continue;
            }
            self.slots[i].restart_at = None;
            self.start(i, join)?;
            self.slots[i].restarted = true;
            if !self.recoveries.iter().any(|r| r.index == i && r.downtime_s.is_none()) {
                self.record_death(i);
            }
            self.dir
                .record(&ClusterEvent::NodeRestart { node: self.nodes[i].role.name().into(), index: i })?;
            self.say(format!("{} restarted", self.nodes[i].label(i)));
        }
        Ok(())
    }

    /// Stops the nodes still running `launcher.grace_ms` after the result came in.
    fn stop_after_grace(&mut self) -> Result<()> {
        let grace = Duration::from_millis(self.cfg.launcher.grace_ms);
        let Some(at) = self.result_at else { return Ok(()) };
        if self.stopping.is_some() || at.elapsed() < grace {
            return Ok(());
        }
        let why = format!("still running {:.0} s after the run's result was in", grace.as_secs_f64());
        for i in 0..self.slots.len() {
            if self.slots[i].child.is_some() {
                let label = self.nodes[i].label(i);
                self.say(format!("{label} stopped by the launcher: {why}"));
                let node = self.nodes[i].role.name().into();
                self.dir.record(&ClusterEvent::NodeStopped { node, index: i, reason: why.clone() })?;
                self.slots[i].stopped = Some(why.clone());
            }
        }
        self.stop_all(Signal::TERM, KILL_AFTER);
        Ok(())
    }
}

/// `exe subcommand --config config`, as the launcher starts its processes: in the network
/// namespace `netns` if one is given (`ip netns exec` execs `exe`, so the process is the
/// node's own), marked launched (it dies with the launcher), stdout piped, stderr appended to
/// `log_path`, logging at `info` unless `RUST_LOG` says otherwise.
pub(super) fn launched(
    exe: &Path,
    subcommand: &str,
    config: &Path,
    log_path: &Path,
    netns: Option<&str>,
) -> Result<Command> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg(subcommand).arg("--config").arg(config).env("PEERLESS_LAUNCHED", "1");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(log)).stdin(Stdio::null());
    Ok(cmd)
}

fn spawn_node(exe: &Path, node: &Node, join: bool) -> Result<Child> {
    let config = &node.config;
    // A stale pid file must not be mistaken for the new process's.
    let _ = std::fs::remove_file(config.with_file_name("pid"));
    let mut cmd = launched(exe, node.role.name(), config, &node.log_path(), node.netns.as_deref())?;
    if join {
        cmd.arg("--join");
    }
    cmd.spawn().with_context(|| format!("starting the {} of {}", node.role.name(), config.display()))
}

#[cfg(test)]
mod tests {
    //! The supervisor on real processes: a shell script stands in for `peerless`, printing the
    //! lines a node prints and exiting as a node would.
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::cluster::{Launcher, Show};
    use crate::node::Progress;

    /// Collects what the supervisor shows.
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<String>>);

    impl Show for Seen {
        fn say(&self, line: &str) {
            self.0.lock().unwrap().push(line.to_owned());
        }
        fn progress(&self, _: u64, _: &Progress, _: Option<f32>) {}
        fn finish(&self) {}
    }

    /// A stand-in executable: `$1` is the role, `$3` the node file, whose directory's name
    /// picks the behaviour written into `behaviours` (one shell snippet per node).
    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("node.sh");
        std::fs::write(&path, format!("#!/bin/sh\nnode=$(basename $(dirname \"$3\"))\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn nodes(dir: &Path, n: usize) -> Vec<Node> {
        (0..n)
            .map(|i| {
                let ndir = dir.join(i.to_string());
                std::fs::create_dir_all(&ndir).unwrap();
                Node {
                    role: Role::Peer,
                    config: ndir.join("peer.toml"),
                    restart: None,
                    at_launch: true,
                    netns: None,
                }
            })
            .collect()
    }

    fn supervise(body: &str, n: usize, grace_ms: u64) -> (Supervised, Vec<String>) {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = RunConfig::default();
        cfg.launcher.grace_ms = grace_ms;
        let mut dir = RunDir::create(&tmp.path().join("run"), &cfg).unwrap();
        let seen = Seen::default();
        let launcher =
            Launcher { exe: script(tmp.path(), body), show: &seen, interrupts: Arc::new(AtomicU32::new(0)) };
        let (injector, _) =
            Injector::new(&[], crate::config::TrainArch::P2p, n, n, crate::cluster::faults::Net::None, 1);
        let ran = Supervisor::new(&cfg, &mut dir, nodes(tmp.path(), n), injector, &launcher).run().unwrap();
        let said = seen.0.lock().unwrap().clone();
        (ran, said)
    }

    #[test]
    fn a_node_that_fails_before_it_is_ready_ends_the_run_with_its_own_error() {
        let body = r#"if [ "$node" = 1 ]; then echo '{"failed":1,"error":"no dataset in /nowhere"}'; exit 2; fi
echo '{"ready":0}'; sleep 30"#;
        let (ran, _) = supervise(body, 2, 60_000);
        let fatal = ran.fatal.expect("the run failed");
        assert!(fatal.contains("peer 1 failed before its first round: no dataset in /nowhere"), "{fatal}");
        assert_eq!(ran.outcomes[1].exit, Exit::Code(2));
        // The healthy node was stopped, not left behind.
        assert!(ran.outcomes[0].exit != Exit::NeverStarted && !ran.outcomes[0].exit.success());
    }

    #[test]
    fn a_node_still_running_after_the_result_is_in_is_stopped_after_the_grace_period() {
        let body = r#"echo "{\"ready\":$node}"
if [ "$node" = 0 ]; then echo '{"node":0,"round":1,"total":1,"loss":0.5,"view":2}'; exit 0; fi
sleep 30"#;
        let (ran, said) = supervise(body, 2, 200);
        assert!(ran.fatal.is_none(), "{:?}", ran.fatal);
        assert!(ran.outcomes[0].exit.success());
        assert!(ran.outcomes[1].stopped.as_deref().is_some_and(|s| s.contains("after the run's result")));
        assert!(said.iter().any(|l| l.starts_with("peer 1 stopped by the launcher")), "{said:?}");
    }

    #[test]
    fn a_crash_after_ready_is_not_bad_input() {
        let body = r#"echo "{\"ready\":$node}"; if [ "$node" = 1 ]; then kill -9 $$; fi; exit 0"#;
        let (ran, said) = supervise(body, 2, 60_000);
        assert!(ran.fatal.is_none(), "{:?}", ran.fatal);
        assert_eq!(ran.outcomes[1].exit, Exit::Signal(9));
        assert!(said.iter().any(|l| l.contains("peer 1 stopped: killed by signal 9")), "{said:?}");
    }
}
