//! One function instance: a real OS process, its Runtime API server, its supervisor task.
//!
//! The process is spawned with Lambda's environment (`AWS_LAMBDA_RUNTIME_API`,
//! `AWS_LAMBDA_FUNCTION_NAME`, …); its cold start lasts until its first `GET /next`. A
//! supervisor task owns the `Child`: it reaps it when it exits (no zombies) and delivers
//! signals, so a signal can never hit a recycled pid. During an invocation the instance is
//! watched for its answer, its exit, its timeout and its resident set size.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio::time::{MissedTickBehavior, sleep_until};

use super::api::{ApiServer, Event, FunctionError, Reply, Status};
use super::faults::Fault;

/// How to start a function instance: a program, its arguments and extra environment.
/// The runtime adds Lambda's variables (`AWS_LAMBDA_RUNTIME_API`, …) and
/// `OPENBLAS_NUM_THREADS=1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCommand {
    /// Executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
}

impl FunctionCommand {
    /// Runs `program` with no arguments.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        FunctionCommand { program: program.into(), args: Vec::new(), env: Vec::new() }
    }

    /// `<peerless> function`: the peerless binary at `exe` as a function instance.
    pub fn peerless(exe: impl Into<PathBuf>) -> Self {
        FunctionCommand::new(exe).arg("function")
    }

    /// Appends an argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

#[derive(Debug, Clone, Copy)]
enum Sig {
    Kill,
    Stop,
}

/// Why an instance could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("cannot start {program}: {source}")]
    Exec { program: String, source: std::io::Error },
    #[error("runtime API server: {0}")]
    Api(std::io::Error),
    #[error("init error: {0}")]
    Init(FunctionError),
    #[error("the instance exited during init ({0})")]
    Exited(String),
    #[error("the instance did not poll for events within the init timeout")]
    InitTimeout,
}

/// How an invocation on an instance ended.
#[derive(Debug)]
pub(crate) enum RunEnd {
    Ok(Bytes),
    Error(FunctionError),
    /// The process died (`what` says how), or the runtime killed it (injected crash).
    Crashed(String),
    Timeout,
    OutOfMemory {
        rss_kb: u64,
    },
}

/// How an invocation is watched.
#[derive(Debug)]
pub(crate) struct Watch {
    /// Kill (SIGKILL) after this long: `Timeout`.
    pub timeout: Duration,
    /// Kill when the resident set exceeds this many kB: `OutOfMemory`.
    pub limit_kb: u64,
    /// Resident set sampling period.
    pub poll: Duration,
    /// Injected fault, placed at its fraction of `expected`.
    pub fault: Fault,
    /// The function's typical duration.
    pub expected: Duration,
    /// Flips to true when the runtime shuts down: kill.
    pub shutdown: watch::Receiver<bool>,
}

/// A live (or dead, if `dead`) function instance. Dropping it kills and reaps the process.
#[derive(Debug)]
pub(crate) struct Instance {
    pub id: u64,
    pub pid: u32,
    /// Dropped first (fields drop in order): the supervisor kills the process before the
    /// Runtime API server goes away under it.
    signals: mpsc::Sender<Sig>,
    api: ApiServer,
    exit: watch::Receiver<Option<String>>,
    /// Killed or exited: never reuse.
    pub dead: bool,
    pub last_used: Instant,
    pub invocations: u64,
    /// Largest `VmHWM` read so far, kB (kept once the process is gone).
    peak_kb: u64,
}

impl Instance {
    /// Spawns `cmd` as an instance of `function` and waits for its first `GET /next`.
    /// Returns the instance and its cold-start time in µs.
    pub async fn spawn(
        cmd: &FunctionCommand,
        function: &str,
        memory_mb: u64,
        id: u64,
        init_timeout: Duration,
    ) -> Result<(Instance, u64), SpawnError> {
        let api = ApiServer::bind().await.map_err(SpawnError::Api)?;
        let start = Instant::now();
        let mut c = tokio::process::Command::new(&cmd.program);
        c.args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .env("AWS_LAMBDA_RUNTIME_API", api.addr().to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", function)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory_mb.to_string())
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{function}"))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", format!("local/{function}/{id}"))
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
            .env("_HANDLER", function)
            .env("OPENBLAS_NUM_THREADS", "1")
            .env_remove("AWS_LAMBDA_MAX_CONCURRENCY")
            .stdin(Stdio::null())
            // The function's stdout is its log (CloudWatch on Lambda): keep ours clean.
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = c
            .spawn()
            .map_err(|source| SpawnError::Exec { program: cmd.program.display().to_string(), source })?;
        let pid = child.id().unwrap_or(0);
        let (sig_tx, sig_rx) = mpsc::channel(4);
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(supervise(child, sig_rx, exit_tx));
        let mut inst = Instance {
            id,
            pid,
            signals: sig_tx,
            api,
            exit: exit_rx,
            dead: false,
            last_used: Instant::now(),
            invocations: 0,
            peak_kb: 0,
        };
        let mut status = inst.api.status();
        let mut exit = inst.exit.clone();
        let deadline = tokio::time::Instant::from_std(start + init_timeout);
        let outcome = tokio::select! {
            biased;
            s = async { status.wait_for(|s| *s != Status::Starting).await.map(|s| s.clone()) } => match s {
                Ok(Status::InitError(e)) => Err(SpawnError::Init(e)),
                Ok(_) => Ok(()),
                Err(_) => Err(SpawnError::Exited("runtime API closed".into())),
            },
            what = async { exit.wait_for(Option::is_some).await.ok().and_then(|e| e.clone()) } => {
                // An init error is posted before the process exits: prefer it.
                match inst.api.status().borrow().clone() {
                    Status::InitError(fe) => Err(SpawnError::Init(fe)),
                    _ => Err(SpawnError::Exited(what.unwrap_or_else(|| "supervisor gone".into()))),
                }
            }
            _ = sleep_until(deadline) => Err(SpawnError::InitTimeout),
        };
        let init_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        match outcome {
            Ok(()) => {
                tracing::debug!(function, pid, id = inst.id, init_us, "instance ready");
                Ok((inst, init_us))
            }
            Err(e) => {
                inst.kill_and_reap().await;
                Err(e)
            }
        }
    }

    /// Whether the process is still running and was never killed.
    pub fn is_alive(&self) -> bool {
        !self.dead && self.exit.borrow().is_none()
    }

    /// Kills the process (SIGKILL) and waits (bounded) until it has been reaped.
    pub async fn kill_and_reap(&mut self) {
        self.dead = true;
        self.api.cancel();
        let _ = self.signals.try_send(Sig::Kill);
        let mut exit = self.exit.clone();
        let reaped = async { exit.wait_for(Option::is_some).await.map(|_| ()) };
        if tokio::time::timeout(Duration::from_secs(10), reaped).await.is_err() {
            tracing::warn!(pid = self.pid, "instance not reaped 10 s after SIGKILL");
        }
    }

    /// Runs one invocation: hands `event` to the instance and watches it per [`Watch`] until
    /// it answers, exits, passes its timeout, exceeds its memory, or an injected fault fires.
    /// Returns how it ended and its duration (µs). Cancel-safe only in the sense that a
    /// dropped future leaves the instance marked busy; the pool then discards it.
    pub async fn run(&mut self, event: Event, w: Watch) -> (RunEnd, u64) {
        let Watch { timeout, limit_kb, poll, fault, expected, mut shutdown } = w;
        self.invocations += 1;
        let start = Instant::now();
        let elapsed = |s: Instant| u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut rx = match self.api.dispatch(event) {
            Ok(rx) => rx,
            Err(e) => {
                // Cannot happen for an idle instance; treat it as broken.
                self.kill_and_reap().await;
                return (RunEnd::Crashed(e.to_string()), elapsed(start));
            }
        };
        let deadline = tokio::time::Instant::from_std(start + timeout);
        let fault_at = match fault {
            Fault::Crash(f) | Fault::Hang(f) => {
                Some(tokio::time::Instant::from_std(start + expected.mul_f64(f)))
            }
            _ => None,
        };
        let mut fault_pending = fault_at.is_some();
        let mut held_answer = false;
        let mut exit = self.exit.clone();
        // The first look is one poll in: at the start the instance holds what it held when
        // it last answered (read then), and each look reads `/proc`, on the invocation's path.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::from_std(start) + poll, poll);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                biased;
                reply = &mut rx, if !held_answer => match self.on_reply(reply, fault).await {
                    Some(end) => break end,
                    None => {
                        held_answer = true;
                        fault_pending = false;
                    }
                },
                what = async { exit.wait_for(Option::is_some).await.ok().and_then(|e| e.clone()) } => {
                    break self.on_exit(what);
                }
                _ = sleep_until(deadline) => {
                    self.kill_and_reap().await;
                    break RunEnd::Timeout;
                }
                _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => {
                    self.kill_and_reap().await;
                    break RunEnd::Crashed("the runtime shut down".into());
                }
                _ = sleep_until(fault_at.unwrap_or(deadline)), if fault_pending => {
                    fault_pending = false;
                    if let Some(end) = self.on_fault(fault).await {
                        break end;
                    }
                }
                _ = ticker.tick() => {
                    if let Some(end) = self.check_memory(limit_kb).await {
                        break end;
                    }
                }
            }
        };
        self.last_used = Instant::now();
        (end, elapsed(start))
    }

    /// The instance answered (or the Runtime API dropped the invocation): how the invocation
    /// ends, or `None` when an injected hang holds the answer back.
    async fn on_reply(&mut self, reply: Result<Reply, RecvError>, fault: Fault) -> Option<RunEnd> {
        match (reply, fault) {
            (Ok(_), Fault::Crash(_)) => {
                self.kill_and_reap().await;
                Some(RunEnd::Crashed("injected crash: killed before its answer was delivered".into()))
            }
            // The work is done but the answer never arrives: wait out the timeout.
            (Ok(_), Fault::Hang(_)) => None,
            (Ok(Reply::Response(b)), _) => Some(RunEnd::Ok(b)),
            (Ok(Reply::Error(e)), _) => Some(RunEnd::Error(e)),
            (Err(_), _) => {
                self.kill_and_reap().await;
                Some(RunEnd::Crashed("runtime API dropped the invocation".into()))
            }
        }
    }

    /// The process exited mid-invocation (`what` says how).
    fn on_exit(&mut self, what: Option<String>) -> RunEnd {
        let what = what.unwrap_or_else(|| "supervisor gone".into());
        self.dead = true;
        self.api.cancel();
        RunEnd::Crashed(what)
    }

    /// The injected fault's time came: a crash ends the invocation, a hang stops the process.
    async fn on_fault(&mut self, fault: Fault) -> Option<RunEnd> {
        match fault {
            Fault::Crash(_) => {
                self.kill_and_reap().await;
                Some(RunEnd::Crashed("injected crash: SIGKILL mid-invocation".into()))
            }
            _ => {
                tracing::debug!(pid = self.pid, "injected hang: SIGSTOP");
                let _ = self.signals.try_send(Sig::Stop);
                None
            }
        }
    }

    /// The instance's peak resident memory so far, kB: its process's `VmHWM`, the kernel's
    /// high-water mark of the resident set since the process started (Linux), which is what
    /// Lambda's "Max Memory Used" reports for an execution environment (the most it has held,
    /// not what one invocation added). Read now while the process lives, else the last value
    /// read (every memory poll reads it, so a killed instance keeps its peak up to then).
    pub fn max_memory_kb(&mut self) -> u64 {
        if let Some(kb) = peak_rss_kb(self.pid) {
            self.peak_kb = self.peak_kb.max(kb);
        }
        self.peak_kb
    }

    /// Kills the instance when its resident set exceeds `limit_kb`.
    async fn check_memory(&mut self, limit_kb: u64) -> Option<RunEnd> {
        let [rss_kb, peak_kb] = status_kbs(self.pid, ["VmRSS:", "VmHWM:"]);
        self.peak_kb = self.peak_kb.max(peak_kb.unwrap_or(0));
        let rss_kb = rss_kb.filter(|kb| *kb > limit_kb)?;
        self.peak_kb = self.peak_kb.max(rss_kb);
        tracing::debug!(pid = self.pid, rss_kb, limit_kb, "instance over its memory limit");
        self.kill_and_reap().await;
        Some(RunEnd::OutOfMemory { rss_kb })
    }
}

/// Peak resident set size of `pid` in kB (`VmHWM` in `/proc/<pid>/status`, Linux); `None`
/// once it is gone.
pub(crate) fn peak_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// The kB value of the `key` line of `/proc/<pid>/status`.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let [kb] = status_kbs(pid, [key]);
    kb
}

/// The kB values of the `keys` lines of `/proc/<pid>/status`, read once (the kernel formats
/// the whole file for every read).
fn status_kbs<const N: usize>(pid: u32, keys: [&str; N]) -> [Option<u64>; N] {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return [None; N];
    };
    keys.map(|key| {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    })
}

/// Owns the child: reaps it when it exits, delivers signals, kills it when the instance is
/// dropped (the signal channel closes).
async fn supervise(
    mut child: tokio::process::Child,
    mut signals: mpsc::Receiver<Sig>,
    exit: watch::Sender<Option<String>>,
) {
    let describe = |st: std::io::Result<std::process::ExitStatus>| match st {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    loop {
        tokio::select! {
            st = child.wait() => {
                exit.send_replace(Some(describe(st)));
                return;
            }
            sig = signals.recv() => match sig {
                Some(Sig::Stop) => {
                    // `id()` is `None` once reaped, so the pid cannot have been recycled.
                    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw)
                        && let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::STOP)
                    {
                        tracing::warn!(cause = %e, "SIGSTOP failed");
                    }
                }
                Some(Sig::Kill) | None => {
                    let _ = child.start_kill();
                    let st = child.wait().await;
                    exit.send_replace(Some(describe(st)));
                    return;
                }
            }
        }
    }
}
