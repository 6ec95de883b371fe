//! Fault injection for the local cluster launcher: signals to node processes on a schedule,
//! and network faults (partitions, delays, bandwidth caps) made by a loopback fault proxy
//! between nodes, or, with nodes on hosts of their own ([`super::netns`]), on their links.
//!
//! A `churn` fault is a stream ([`super::churn::Stream`]): each of its draws becomes a `kill`,
//! `stop` or `partition` of one node, injected and cleared like a hand-written one and
//! recorded the same way, with the draw's number (`churn`).
//!
//! The proxy: node `i` reaches node `j` through its own listener `(i → j)`, so every
//! connection's two ends are known and a partition can cut exactly the pairs across it
//! (closing live connections, refusing new ones) while delays hold each chunk until
//! `arrival + delay`. A bandwidth cap gives each capped node an uplink and a downlink of that
//! rate, shared by all its connections (what `tc tbf` on a host's interface does): a chunk
//! goes out once the sender's uplink has carried what it took before (its bytes take
//! `len / rate`), comes in through the receiver's downlink likewise, then the delay runs.
//! Without network faults there is no proxy: nodes dial each other directly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::churn::{Draw, Stream};
use super::events::{ClusterEvent, FaultRecord};
use super::netns::Hosts;
use crate::config::TrainArch;
use crate::scenario::{FaultKind, FaultSpec, NodeRef, resolve_target};
use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Live network faults, shared by every proxied connection.
#[derive(Debug, Default)]
struct LinkFaults {
    /// Active partitions: each set is cut off from the nodes outside it.
    cuts: Vec<(usize, BTreeSet<usize>)>,
    /// Active delays: (fault id, nodes, ms).
    delays: Vec<(usize, BTreeSet<usize>, u64)>,
    /// Active bandwidth caps: (fault id, nodes, bytes per second).
    rates: Vec<(usize, BTreeSet<usize>, f64)>,
    /// When each capped node's uplink (`true`) or downlink (`false`) is free again.
    free: std::collections::HashMap<(usize, bool), tokio::time::Instant>,
}

impl LinkFaults {
    fn blocked(&self, a: usize, b: usize) -> bool {
        self.cuts.iter().any(|(_, s)| s.contains(&a) != s.contains(&b))
    }

    fn delay(&self, a: usize, b: usize) -> Duration {
        let ms = self
            .delays
            .iter()
            .filter(|(_, s, _)| s.contains(&a) || s.contains(&b))
            .map(|(_, _, ms)| *ms)
            .max()
            .unwrap_or(0);
        Duration::from_millis(ms)
    }

    /// The lowest cap on node `n`'s links, bytes per second.
    fn rate(&self, n: usize) -> Option<f64> {
        self.rates.iter().filter(|(_, s, _)| s.contains(&n)).map(|(_, _, r)| *r).reduce(f64::min)
    }

    /// When `src`'s capped uplink is free again (`None`: not capped).
    fn ready(&self, src: usize) -> Option<tokio::time::Instant> {
        self.rate(src).and(self.free.get(&(src, true)).copied())
    }

    /// When `len` bytes that arrived at `t` from `src` for `dst` are through: out of `src`'s
    /// uplink once it has sent what it took before, then through `dst`'s downlink once that
    /// has delivered what it took before (a switch's output queue). `t` itself without caps.
    fn carry(&mut self, src: usize, dst: usize, t: tokio::time::Instant, len: usize) -> tokio::time::Instant {
        let (mut start, mut done) = (t, t);
        for (node, up) in [(src, true), (dst, false)] {
            let Some(rate) = self.rate(node) else { continue };
            let free = self.free.entry((node, up)).or_insert(t);
            // Cut-through: the downlink starts on a chunk as its first bytes come in, and
            // cannot finish before its last ones have.
            start = start.max(*free);
            done = done.max(start + Duration::from_secs_f64(len as f64 / rate));
            *free = done;
        }
        done
    }
}

/// The loopback fault proxy: one listener per ordered pair of nodes that dial each other.
#[derive(Debug)]
pub struct Proxy {
    state: Arc<Mutex<LinkFaults>>,
    changed: watch::Sender<u64>,
    rt: tokio::runtime::Runtime,
}

impl Proxy {
    /// Starts a proxy runtime (one thread).
    pub fn new() -> Result<Proxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .context("starting the fault proxy")?;
        let (changed, _) = watch::channel(0);
        Ok(Proxy { state: Arc::default(), changed, rt })
    }

    /// A listener through which node `from` reaches node `to` at `target`; returns its address.
    pub fn route(&self, from: usize, to: usize, target: SocketAddr) -> Result<SocketAddr> {
        let listener =
            self.rt.block_on(TcpListener::bind("127.0.0.1:0")).context("binding a fault-proxy listener")?;
        let addr = listener.local_addr()?;
        let (state, changed) = (self.state.clone(), self.changed.clone());
        self.rt.spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if state.lock().expect("proxy state").blocked(from, to) {
                    continue; // dropped: the dialer sees the connection close
                }
                let (state, cut) = (state.clone(), changed.subscribe());
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        relay(inbound, outbound, from, to, state, cut).await;
                    }
                });
            }
        });
        Ok(addr)
    }

    fn update(&self, f: impl FnOnce(&mut LinkFaults)) {
        f(&mut self.state.lock().expect("proxy state"));
        self.changed.send_modify(|g| *g += 1);
    }
}

/// Forwards both ways between `a` (node `from`) and `b` (node `to`) until either side closes
/// or a partition cuts the pair.
async fn relay(
    a: TcpStream,
    b: TcpStream,
    from: usize,
    to: usize,
    state: Arc<Mutex<LinkFaults>>,
    mut cut: watch::Receiver<u64>,
) {
    let _ = (a.set_nodelay(true), b.set_nodelay(true));
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let watch_cut = async {
        while cut.changed().await.is_ok() {
            if state.lock().expect("proxy state").blocked(from, to) {
                return;
            }
        }
    };
    tokio::select! {
        _ = pipe(ar, bw, from, to, &state) => {}
        _ = pipe(br, aw, to, from, &state) => {}
        _ = watch_cut => {}
    }
}

/// One direction, from node `src` to node `dst`: chunks are delivered in order, each no
/// earlier than its arrival plus the delay in force; under bandwidth caps, no earlier than the
/// capped links have carried it, plus the delay.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    src: usize,
    dst: usize,
    state: &Mutex<LinkFaults>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    // Reads a chunk only once the capped links are (nearly) free, so a busy link pushes back
    // on its senders' sockets instead of queueing without bound: connections sharing a
    // link take turns, and a small message (an acknowledgement, a heartbeat) waits behind
    // at most one chunk of another connection, as on a link with a short queue.
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            loop {
                let ready = state.lock().expect("proxy state").ready(src);
                match ready {
                    Some(at) if at > tokio::time::Instant::now() + Duration::from_millis(1) => {
                        tokio::time::sleep_until(at).await;
                    }
                    _ => break,
                }
            }
            let Ok(n) = r.read(&mut buf).await else { break };
            let now = tokio::time::Instant::now();
            let sent = state.lock().expect("proxy state").carry(src, dst, now, n);
            if n == 0 || tx.send((sent, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async {
        while let Some((sent, data)) = rx.recv().await {
            let d = state.lock().expect("proxy state").delay(src, dst);
            if sent + d > tokio::time::Instant::now() {
                tokio::time::sleep_until(sent + d).await;
            }
            if w.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Whether any of `faults` is a network fault (made by the proxy, or on the hosts' links).
pub fn network_faults(faults: &[FaultSpec]) -> bool {
    faults.iter().any(|f| match f.kind {
        FaultKind::Partition | FaultKind::Delay | FaultKind::Bandwidth => true,
        FaultKind::Churn => f.churn_kinds().contains(&FaultKind::Partition),
        _ => false,
    })
}

/// Where a run's network faults are made.
#[derive(Debug)]
pub enum Net {
    /// Nowhere: the run has no network fault.
    None,
    /// The loopback fault proxy, which every connection goes through.
    Proxy(Proxy),
    /// The links of the nodes' hosts (network namespaces), with the faults active on them.
    Hosts {
        /// The hosts.
        hosts: Arc<Hosts>,
        /// Active partitions: (fault id, the side cut off).
        cuts: Vec<(usize, BTreeSet<usize>)>,
        /// Active bandwidth caps: (fault id, nodes, Mbit/s).
        caps: Vec<(usize, BTreeSet<usize>, f64)>,
    },
}

impl Net {
    /// The proxy, if that is where faults are made.
    fn proxy(&self) -> Option<&Proxy> {
        match self {
            Net::Proxy(px) => Some(px),
            _ => None,
        }
    }

    /// Cuts `set` off from the other nodes (fault `id`).
    fn cut(&mut self, id: usize, set: BTreeSet<usize>) {
        match self {
            Net::Proxy(px) => px.update(|s| s.cuts.push((id, set))),
            Net::Hosts { cuts, .. } => {
                cuts.push((id, set));
                self.apply();
            }
            Net::None => {}
        }
    }

    /// Caps the links of `set` at `mbit` (fault `id`).
    fn cap(&mut self, id: usize, set: BTreeSet<usize>, mbit: f64) {
        match self {
            Net::Proxy(px) => px.update(|s| s.rates.push((id, set, mbit * 1e6 / 8.0))),
            Net::Hosts { caps, .. } => {
                caps.push((id, set, mbit));
                self.apply();
            }
            Net::None => {}
        }
    }

    /// Delays every message to or from `set` by `ms` (fault `id`; the proxy only).
    fn delay(&mut self, id: usize, set: BTreeSet<usize>, ms: u64) {
        if let Net::Proxy(px) = self {
            px.update(|s| s.delays.push((id, set, ms)));
        }
    }

    /// Lifts whatever fault `id` made.
    fn clear(&mut self, id: usize) {
        match self {
            Net::Proxy(px) => px.update(|s| {
                s.cuts.retain(|(f, _)| *f != id);
                s.delays.retain(|(f, _, _)| *f != id);
                s.rates.retain(|(f, _, _)| *f != id);
            }),
            Net::Hosts { cuts, caps, .. } => {
                cuts.retain(|(f, _)| *f != id);
                caps.retain(|(f, _, _)| *f != id);
                self.apply();
            }
            Net::None => {}
        }
    }

    /// Makes the hosts' links what the active faults say: the partitions, and each host's
    /// lowest cap. A link that cannot be changed is logged (the run goes on).
    fn apply(&self) {
        let Net::Hosts { hosts, cuts, caps } = self else { return };
        let sides: Vec<BTreeSet<usize>> = cuts.iter().map(|(_, s)| s.clone()).collect();
        if let Err(e) = hosts.partition(&sides) {
            tracing::warn!(error = %e, "cannot partition the hosts");
        }
        for i in 0..hosts.len() {
            let cap = caps.iter().filter(|(_, s, _)| s.contains(&i)).map(|(_, _, r)| *r).reduce(f64::min);
            if let Err(e) = hosts.cap(i, cap) {
                tracing::warn!(host = i, error = %e, "cannot cap the host's link");
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    Pending,
    /// Injected; cleared at this instant (if it ends).
    Active(Option<Instant>),
    Done,
}

#[derive(Debug)]
struct Planned {
    /// Unique among the run's faults (the proxy's faults are removed by it).
    id: usize,
    spec: FaultSpec,
    /// A churn stream's draw: its number.
    churn: Option<u64>,
    targets: Vec<NodeRef>,
    stage: Stage,
    /// Straggle: tells its thread to stop.
    stop: Option<Arc<AtomicBool>>,
}

/// The attack of each Byzantine node of a run of `arch` with `n` peers or workers, by launcher
/// node index (faults with a target missing in `arch` are skipped, as [`Injector::new`] does).
pub fn attacks(
    faults: &[FaultSpec],
    arch: TrainArch,
    n: usize,
) -> Vec<(usize, peerless_core::attack::Attack)> {
    let mut out = Vec::new();
    for f in faults {
        let Some(attack) = f.byzantine() else { continue };
        let targets: Vec<NodeRef> = f.targets.iter().filter_map(|t| resolve_target(t, arch, n)).collect();
        if targets.len() == f.targets.len() {
            out.extend(targets.iter().filter(|t| t.role != "ps").map(|t| (t.index, attack)));
        }
    }
    out
}

/// What the launcher must do after a tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    /// Start node `index` again after `after` (peers rejoin with `--join`).
    Restart {
        /// Node.
        index: usize,
        /// Delay.
        after: Duration,
    },
    /// Start node `index`, laid out for a `join` fault, for the first time.
    Join {
        /// Node.
        index: usize,
    },
}

/// The launcher nodes of the `join` faults of `faults` in a run of `arch` with `n` peers: the
/// peers after the starting members, in the order of the faults (none in a PS run).
pub fn joiners(faults: &[FaultSpec], arch: TrainArch, n: usize) -> Vec<NodeRef> {
    let count = match arch {
        TrainArch::P2p => faults.iter().filter(|f| f.kind == FaultKind::Join).count(),
        _ => 0,
    };
    (n..n + count).map(|index| NodeRef { index, role: "peer" }).collect()
}

/// The fault schedule of one run, driven by the launcher's loop.
#[derive(Debug)]
pub struct Injector {
    planned: Vec<Planned>,
    /// The churn streams; each draw is added to `planned` when due.
    streams: Vec<Stream>,
    /// The next id of a drawn fault.
    next_id: usize,
    net: Net,
    /// Current pid of each launcher node (`None` while it is down).
    pids: Arc<Mutex<Vec<Option<u32>>>>,
}

/// What the injector records in `events.jsonl`.
pub type Record = ClusterEvent;

impl Injector {
    /// Resolves `faults` for a run of `arch` with `n` peers or workers and seed `seed`;
    /// targets that do not exist in this architecture are reported in the returned records and
    /// skipped.
    pub fn new(
        faults: &[FaultSpec],
        arch: TrainArch,
        n: usize,
        nodes: usize,
        net: Net,
        seed: u64,
    ) -> (Injector, Vec<Record>) {
        let mut skipped = Vec::new();
        let mut streams = Vec::new();
        for (id, spec) in faults.iter().enumerate().filter(|(_, f)| f.kind == FaultKind::Churn) {
            match Stream::new(spec, id, seed, arch, n) {
                Some(s) => streams.push(s),
                None => skipped.push(ClusterEvent::FaultSkipped(FaultRecord {
                    fault: spec.kind.name().into(),
                    targets: spec.targets.clone(),
                    reason: Some("no target exists in this architecture".into()),
                    ..FaultRecord::default()
                })),
            }
        }
        let mut joiners = joiners(faults, arch, n).into_iter();
        let planned = faults
            .iter()
            .enumerate()
            .filter(|(_, spec)| spec.kind != FaultKind::Churn)
            .filter_map(|(id, spec)| {
                let targets: Vec<NodeRef> = match spec.kind {
                    FaultKind::Join => joiners.next().into_iter().collect(),
                    _ => spec.targets.iter().filter_map(|t| resolve_target(t, arch, n)).collect(),
                };
                if spec.kind == FaultKind::Join && targets.is_empty() {
                    skipped.push(ClusterEvent::FaultSkipped(FaultRecord {
                        fault: spec.kind.name().into(),
                        reason: Some(
                            "the PS baseline has a fixed set of workers: a join adds a P2P peer".into(),
                        ),
                        ..FaultRecord::default()
                    }));
                    return None;
                }
                if targets.len() < spec.targets.len() {
                    skipped.push(ClusterEvent::FaultSkipped(FaultRecord {
                        fault: spec.kind.name().into(),
                        targets: spec.targets.clone(),
                        reason: Some("a target does not exist in this architecture".into()),
                        ..FaultRecord::default()
                    }));
                    return None;
                }
                Some(Planned {
                    id,
                    spec: spec.clone(),
                    churn: None,
                    targets,
                    stage: Stage::Pending,
                    stop: None,
                })
            })
            .collect();
        let pids = Arc::new(Mutex::new(vec![None; nodes]));
        (Injector { planned, streams, next_id: faults.len(), net, pids }, skipped)
    }

    /// Ends the churn streams: no more of their faults are drawn (the run's result is in);
    /// those already injected are cleared when due.
    pub fn end_streams(&mut self) {
        self.streams.iter_mut().for_each(Stream::end);
    }

    /// The proxy, to route node addresses through (if the schedule has network faults made
    /// by it).
    pub fn proxy(&self) -> Option<&Proxy> {
        self.net.proxy()
    }

    /// Records node `index`'s current process (or `None` when it exited).
    pub fn set_pid(&self, index: usize, pid: Option<u32>) {
        if let Some(p) = self.pids.lock().expect("pids").get_mut(index) {
            *p = pid;
        }
    }

    /// Injects and clears what is due at `elapsed` since the launch, with the cluster at
    /// `round`; returns the event records and the launcher's orders.
    pub fn tick(&mut self, elapsed: Duration, round: u64) -> (Vec<Record>, Vec<Order>) {
        let (mut records, mut orders) = (self.draw_due(elapsed.as_secs_f64()), Vec::new());
        let now = Instant::now();
        for i in 0..self.planned.len() {
            let p = &self.planned[i];
            match p.stage {
                Stage::Pending => {
                    let due = match (p.spec.at_round, p.spec.at_s) {
                        (Some(r), _) => round >= r,
                        (_, Some(s)) => elapsed.as_secs_f64() >= s,
                        _ => false,
                    };
                    if due {
                        let (rec, ord) = self.inject(i, round);
                        records.push(rec);
                        orders.extend(ord);
                    }
                }
                Stage::Active(Some(until)) if now >= until => records.push(self.clear(i, round)),
                _ => {}
            }
        }
        (records, orders)
    }

    /// Draws the churn faults due at `elapsed_s` and plans each (injected by this tick);
    /// returns the records of the ticks skipped because every target was down.
    fn draw_due(&mut self, elapsed_s: f64) -> Vec<Record> {
        let mut skipped = Vec::new();
        for s in 0..self.streams.len() {
            while self.streams[s].next_at().is_some_and(|t| t <= elapsed_s) {
                let nodes = self.pids.lock().expect("pids").len();
                let up: Vec<bool> = (0..nodes).map(|i| self.is_up(i)).collect();
                let Some(draw) = self.streams[s].draw(|t| up.get(t.index).copied().unwrap_or(false)) else {
                    break;
                };
                let down_s = self.streams[s].down_s();
                match draw.target {
                    Some(target) => self.plan_draw(&draw, target, down_s),
                    None => skipped.push(ClusterEvent::FaultSkipped(FaultRecord {
                        fault: draw.kind.name().into(),
                        targets: self.streams[s].targets().iter().map(ToString::to_string).collect(),
                        reason: Some("churn: every target is down".into()),
                        churn: Some(draw.index),
                        ..FaultRecord::default()
                    })),
                }
            }
        }
        skipped
    }

    /// Plans a churn draw on `target` as the fault it is, due at once: a kill restarted after
    /// `down_s`, a stop or partition lasting `down_s`.
    fn plan_draw(&mut self, draw: &Draw, target: NodeRef, down_s: f64) {
        let lasts = matches!(draw.kind, FaultKind::Stop | FaultKind::Partition);
        let spec = FaultSpec {
            kind: draw.kind,
            targets: vec![target.to_string()],
            at_round: None,
            at_s: Some(draw.at_s),
            duration_s: lasts.then_some(down_s),
            restart_after_s: (draw.kind == FaultKind::Kill).then_some(down_s),
            delay_ms: None,
            rate_mbit: None,
            stop_ms: None,
            period_ms: None,
            attack: None,
            every_s: None,
            kinds: None,
            down_s: None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let churn = Some(draw.index);
        self.planned.push(Planned {
            id,
            spec,
            churn,
            targets: vec![target],
            stage: Stage::Pending,
            stop: None,
        });
    }

    /// Whether node `index` is up: its process is running, no fault has it stopped or cut
    /// off, and no churn draw about to be injected hits it.
    fn is_up(&self, index: usize) -> bool {
        let running = self.pids.lock().expect("pids").get(index).copied().flatten().is_some();
        let held = self.planned.iter().any(|p| {
            let holds = match p.stage {
                Stage::Active(_) => matches!(p.spec.kind, FaultKind::Stop | FaultKind::Partition),
                Stage::Pending => p.churn.is_some(),
                Stage::Done => false,
            };
            holds && p.targets.iter().any(|t| t.index == index)
        });
        running && !held
    }

    fn signal(&self, t: NodeRef, sig: rustix::process::Signal) -> Option<u32> {
        let pid = self.pids.lock().expect("pids").get(t.index).copied().flatten()?;
        signal_pid(Some(pid), sig);
        Some(pid)
    }

    fn inject(&mut self, i: usize, round: u64) -> (Record, Vec<Order>) {
        use rustix::process::Signal;
        let p = &self.planned[i];
        let (spec, targets, id) = (p.spec.clone(), p.targets.clone(), p.id);
        let until = spec.duration_s.map(|s| Instant::now() + Duration::from_secs_f64(s));
        let mut orders = Vec::new();
        let mut stop = None;
        let mut fields = FaultRecord {
            fault: spec.kind.name().into(),
            targets: targets.iter().map(ToString::to_string).collect(),
            round: Some(round),
            duration_s: spec.duration_s,
            churn: p.churn,
            ..FaultRecord::default()
        };
        match spec.kind {
            FaultKind::Kill => orders = self.kill(&spec, &targets, &mut fields),
            FaultKind::Stop => {
                for t in &targets {
                    self.signal(*t, Signal::STOP);
                }
            }
            FaultKind::Straggle => stop = Some(self.straggle(&spec, &targets, &mut fields)),
            FaultKind::Partition => self.net.cut(id, targets.iter().map(|t| t.index).collect()),
            // The targets' node files carry the attack (see `attacks`); they start at this
            // round on their own.
            FaultKind::Byzantine => {
                fields.attack = spec.attack.map(|a| a.name().to_owned());
            }
            FaultKind::Delay => {
                let set: BTreeSet<usize> = targets.iter().map(|t| t.index).collect();
                let ms = spec.delay_ms.unwrap_or(0);
                fields.delay_ms = Some(ms);
                self.net.delay(id, set, ms);
            }
            FaultKind::Bandwidth => {
                let set: BTreeSet<usize> = targets.iter().map(|t| t.index).collect();
                let mbit = spec.rate_mbit.unwrap_or(f64::INFINITY);
                fields.rate_mbit = Some(mbit);
                self.net.cap(id, set, mbit);
            }
            // A stream is never planned itself: its draws are (see `draw_due`).
            FaultKind::Churn => debug_assert!(false, "invariant: a churn fault is drawn, not injected"),
            FaultKind::Join => orders.extend(targets.iter().map(|t| Order::Join { index: t.index })),
        }
        let p = &mut self.planned[i];
        p.stop = stop;
        p.stage = match spec.kind {
            FaultKind::Kill | FaultKind::Byzantine | FaultKind::Churn | FaultKind::Join => Stage::Done,
            _ => Stage::Active(until),
        };
        (ClusterEvent::FaultInjected(fields), orders)
    }

    /// SIGKILLs the targets; orders the restart of those that restart (never the PS: the
    /// launcher restarts it on its own).
    fn kill(&self, spec: &FaultSpec, targets: &[NodeRef], fields: &mut FaultRecord) -> Vec<Order> {
        let pids: Vec<Option<u32>> =
            targets.iter().map(|t| self.signal(*t, rustix::process::Signal::KILL)).collect();
        fields.pids = Some(pids);
        let Some(after) = spec.restart_after_s else { return Vec::new() };
        fields.restart_after_s = Some(after);
        let after = Duration::from_secs_f64(after);
        targets.iter().filter(|t| t.role != "ps").map(|t| Order::Restart { index: t.index, after }).collect()
    }

    /// Freezes the targets for `stop_ms` of every `period_ms` on a thread of its own, until the
    /// returned flag is set.
    fn straggle(&self, spec: &FaultSpec, targets: &[NodeRef], fields: &mut FaultRecord) -> Arc<AtomicBool> {
        use rustix::process::Signal;
        let (stop_ms, period_ms) = (spec.stop_ms.unwrap_or(0), spec.period_ms.unwrap_or(1));
        fields.stop_ms = Some(stop_ms);
        fields.period_ms = Some(period_ms);
        let flag = Arc::new(AtomicBool::new(false));
        let (stop, pids) = (flag.clone(), self.pids.clone());
        let idx: Vec<usize> = targets.iter().map(|t| t.index).collect();
        std::thread::spawn(move || {
            let each = |sig: Signal| {
                for &i in &idx {
                    signal_pid(pids.lock().expect("pids").get(i).copied().flatten(), sig);
                }
            };
            while !stop.load(Ordering::Relaxed) {
                each(Signal::STOP);
                std::thread::sleep(Duration::from_millis(stop_ms));
                each(Signal::CONT);
                std::thread::sleep(Duration::from_millis(period_ms - stop_ms));
            }
            each(Signal::CONT);
        });
        flag
    }

    fn clear(&mut self, i: usize, round: u64) -> Record {
        use rustix::process::Signal;
        let (kind, targets, id, churn) = {
            let p = &mut self.planned[i];
            p.stage = Stage::Done;
            if let Some(f) = p.stop.take() {
                f.store(true, Ordering::Relaxed);
            }
            (p.spec.kind, p.targets.clone(), p.id, p.churn)
        };
        match kind {
            FaultKind::Stop => {
                for t in &targets {
                    self.signal(*t, Signal::CONT);
                }
            }
            FaultKind::Partition | FaultKind::Delay | FaultKind::Bandwidth => self.net.clear(id),
            FaultKind::Kill
            | FaultKind::Straggle
            | FaultKind::Byzantine
            | FaultKind::Churn
            | FaultKind::Join => {}
        }
        ClusterEvent::FaultCleared(FaultRecord {
            fault: kind.name().into(),
            targets: targets.iter().map(ToString::to_string).collect(),
            round: Some(round),
            churn,
            ..FaultRecord::default()
        })
    }

    /// Clears every active fault (the run is over): stopped nodes continue, partitions heal.
    pub fn finish(&mut self, round: u64) -> Vec<Record> {
        (0..self.planned.len())
            .filter(|&i| matches!(self.planned[i].stage, Stage::Active(_)))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|i| self.clear(i, round))
            .collect()
    }
}

/// Sends `sig` to `pid`, if there is one; a process already gone is not an error.
fn signal_pid(pid: Option<u32>, sig: rustix::process::Signal) {
    if let Some(pid) = pid {
        super::supervise::signal(pid, sig);
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        for p in &self.planned {
            if let Some(f) = &p.stop {
                f.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn echo_server() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(s: &mut std::net::TcpStream) -> std::io::Result<Duration> {
        let t = Instant::now();
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        assert_eq!(&buf, b"ping");
        Ok(t.elapsed())
    }

    #[test]
    fn churn_draws_are_injected_and_recorded_like_hand_written_faults_and_skip_nodes_that_are_down() {
        use std::os::unix::process::ExitStatusExt;
        let text = "[run]\ncluster.nodes = 3\n[[fault]]\nkind = \"churn\"\nevery_s = 1\ndown_s = 0.5\n";
        let faults = crate::scenario::Scenario::from_toml(text, "c.toml", "c").unwrap().faults;
        let (mut inj, skipped) = Injector::new(&faults, TrainArch::P2p, 3, 3, Net::None, 5);
        assert!(skipped.is_empty());
        // Only peer 2 runs (a stand-in process): the first draw can only hit it.
        let mut victim = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        inj.set_pid(2, Some(victim.id()));
        assert_eq!(inj.tick(Duration::from_millis(900), 0), (vec![], vec![]), "nothing before at_s");
        let (records, orders) = inj.tick(Duration::from_secs(1), 4);
        let want = FaultRecord {
            fault: "kill".into(),
            targets: vec!["peer 2".into()],
            round: Some(4),
            pids: Some(vec![Some(victim.id())]),
            restart_after_s: Some(0.5),
            churn: Some(0),
            ..FaultRecord::default()
        };
        assert_eq!(records, [ClusterEvent::FaultInjected(want)]);
        assert_eq!(orders, [Order::Restart { index: 2, after: Duration::from_millis(500) }]);
        assert_eq!(victim.wait().unwrap().signal(), Some(9));
        // Peer 2 is down now (the supervisor reaped it), like the others: the tick is skipped.
        inj.set_pid(2, None);
        let (records, orders) = inj.tick(Duration::from_secs(2), 5);
        assert!(orders.is_empty());
        let [ClusterEvent::FaultSkipped(rec)] = records.as_slice() else { panic!("{records:?}") };
        assert_eq!((rec.churn, rec.reason.as_deref()), (Some(1), Some("churn: every target is down")));
        // Once the result is in, the stream draws nothing more.
        inj.end_streams();
        assert_eq!(inj.tick(Duration::from_secs(60), 9), (vec![], vec![]));
    }

    #[test]
    fn two_churn_streams_due_at_once_never_hit_the_same_node() {
        let stream = "[[fault]]\nkind = \"churn\"\nevery_s = 1\ndown_s = 5\nkinds = [\"stop\"]\n\
                      targets = [\"node:1\", \"node:2\"]\n";
        let text = format!("[run]\ncluster.nodes = 3\n{stream}{stream}");
        let faults = crate::scenario::Scenario::from_toml(&text, "c.toml", "c").unwrap().faults;
        for seed in 0..8 {
            let (mut inj, _) = Injector::new(&faults, TrainArch::P2p, 3, 3, Net::None, seed);
            let mut nodes: Vec<std::process::Child> =
                (0..3).map(|_| std::process::Command::new("sleep").arg("30").spawn().unwrap()).collect();
            for (i, c) in nodes.iter().enumerate() {
                inj.set_pid(i, Some(c.id()));
            }
            let (records, _) = inj.tick(Duration::from_secs(1), 0);
            let mut hit: Vec<&str> = records
                .iter()
                .map(|r| match r {
                    ClusterEvent::FaultInjected(f) => f.targets[0].as_str(),
                    other => panic!("seed {seed}: {other:?}"),
                })
                .collect();
            hit.sort_unstable();
            assert_eq!(hit, ["peer 1", "peer 2"], "seed {seed}");
            for c in &mut nodes {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    #[test]
    fn the_proxy_forwards_delays_and_cuts_across_a_partition_until_it_heals() {
        let server = echo_server();
        let px = Proxy::new().unwrap();
        let via = px.route(0, 1, server).unwrap();
        let mut s = std::net::TcpStream::connect(via).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        round_trip(&mut s).unwrap();
        // A delay applies to each direction: a round trip takes at least twice the delay.
        px.update(|st| st.delays.push((7, BTreeSet::from([1]), 100)));
        assert!(round_trip(&mut s).unwrap() >= Duration::from_millis(200));
        px.update(|st| st.delays.clear());
        // A partition closes the live connection and refuses new ones …
        px.update(|st| st.cuts.push((1, BTreeSet::from([1]))));
        let mut buf = [0u8; 4];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)), "the live connection was closed");
        let mut s2 = std::net::TcpStream::connect(via).unwrap();
        s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(round_trip(&mut s2).is_err(), "a new connection across the partition is refused");
        // … a pair on the same side is not cut, and after healing the route works again.
        px.update(|st| st.cuts = vec![(1, BTreeSet::from([0, 1]))]);
        let mut s3 = std::net::TcpStream::connect(via).unwrap();
        s3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        round_trip(&mut s3).unwrap();
    }

    #[test]
    fn a_bandwidth_cap_paces_each_direction_and_lifts_when_cleared() {
        let server = echo_server();
        let px = Proxy::new().unwrap();
        let via = px.route(0, 1, server).unwrap();
        let mut s = std::net::TcpStream::connect(via).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // 2 Mbit/s = 250 kB/s on node 1's links: 100 kB in and the same back out take at
        // least 0.4 s.
        px.update(|st| st.rates.push((3, BTreeSet::from([1]), 2e6 / 8.0)));
        let data = vec![7u8; 100_000];
        let t = Instant::now();
        let echo = {
            let mut r = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut back = vec![0u8; 100_000];
                r.read_exact(&mut back).map(|()| back)
            })
        };
        s.write_all(&data).unwrap();
        assert_eq!(echo.join().unwrap().unwrap(), data);
        assert!(t.elapsed() >= Duration::from_millis(400), "{:?}", t.elapsed());
        px.update(|st| st.rates.clear());
        round_trip(&mut s).unwrap();
        assert_eq!(LinkFaults::default().rate(0), None);
        let mut two = LinkFaults {
            rates: vec![(1, BTreeSet::from([0, 1]), 5.0), (2, BTreeSet::from([1]), 2.0)],
            ..LinkFaults::default()
        };
        assert_eq!((two.rate(0), two.rate(1)), (Some(5.0), Some(2.0)), "the lowest cap on a node");
        // 10 bytes from 0 (uplink 5 B/s: 2 s) to 1 (downlink 2 B/s: 5 s) take 5 s; the next
        // 10 bytes from 0 to 1 queue behind them on 1's downlink.
        let t = tokio::time::Instant::now();
        assert_eq!(two.carry(0, 1, t, 10), t + Duration::from_secs(5));
        assert_eq!(two.carry(0, 1, t, 10), t + Duration::from_secs(10));
        assert_eq!(two.carry(2, 3, t, 10), t, "an uncapped link is not held up");
    }
}
