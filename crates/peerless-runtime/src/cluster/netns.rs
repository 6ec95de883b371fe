//! Hosts of their own on one machine: a network namespace per node, with an address of its
//! own on a bridge in a namespace of its own, and real network faults on them (a partition
//! moves the cut-off side's links to a bridge of their own, `ip link set … down` takes one
//! host off, `tc … tbf` caps a host's links). Root and iproute2 only.
//!
//! Nothing is made in the machine's own namespace: each link is created with one end in the
//! bridge's namespace (`v<i>`) and the other in the node's (`eth0`). Namespace names carry the
//! creating process's id, so [`Hosts::new`] removes those of processes that are gone (a
//! launcher killed with SIGKILL) and [`Hosts`] removes its own when dropped, also on a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// What every namespace of ours is named after.
const PREFIX: &str = "peerless-";
/// The port every node listens on (each host has its own address).
pub const PORT: u16 = 4001;

/// Why namespaces cannot be used here (not root, no `ip` or `tc`), or `None` when they can.
pub fn unavailable() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
    let has = |tool: &str| Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = ["ip", "tc"].into_iter().filter(|t| !has(t)).collect();
    match (root, missing.is_empty()) {
        (true, true) => None,
        (false, _) => Some("network namespaces need root".into()),
        (true, false) => Some(format!("network namespaces need iproute2 ({} not found)", missing.join(", "))),
    }
}

/// Runs `ip`/`tc` with `args`; the error names the command and what it said.
fn tool(program: &str, args: &[&str]) -> Result<()> {
    let o = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !o.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// The namespaces of `n` hosts and their bridge; removed when dropped.
#[derive(Debug)]
pub struct Hosts {
    /// `peerless-<pid>-<k>`: unique to this process and this set of hosts.
    name: String,
    n: usize,
    /// Bridge each host's link is attached to (0 unless partitioned).
    bridges: Mutex<(Vec<usize>, BTreeSet<usize>)>,
}

impl Hosts {
    /// Creates `n` hosts: namespaces `<name>-<i>`, each with `eth0` at [`Hosts::addr`]`(i)`,
    /// linked to bridge 0 in namespace `<name>-br`. Also removes namespaces left by processes
    /// that are gone.
    pub fn new(n: usize) -> Result<Hosts> {
        if let Some(why) = unavailable() {
            bail!("{why}");
        }
        if n > 250 * 250 {
            bail!("{n} hosts: at most {} fit the address range", 250 * 250);
        }
        sweep_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let hosts = Hosts { name, n, bridges: Mutex::new((vec![0; n], BTreeSet::from([0]))) };
        // From here on, dropping `hosts` removes whatever was made.
        let br = hosts.bridge_ns();
        tool("ip", &["netns", "add", &br])?;
        tool("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        tool("ip", &["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let (ns, outer) = (hosts.ns(i), format!("v{i}"));
            tool("ip", &["netns", "add", &ns])?;
            tool(
                "ip",
                &["-n", &br, "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns],
            )?;
            tool("ip", &["-n", &br, "link", "set", &outer, "master", "br0", "up"])?;
            tool("ip", &["-n", &ns, "addr", "add", &format!("{}/16", hosts.addr(i)), "dev", "eth0"])?;
            tool("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            tool("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Hosts.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.name)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.name)
    }

    /// Host `i`'s address (10.213.0.0/16, a private range seen only inside the bridge).
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, (i / 250) as u8, (i % 250) as u8 + 1)
    }

    /// Host `i`'s listen address, port [`PORT`].
    pub fn multiaddr(&self, i: usize) -> String {
        format!("/ip4/{}/tcp/{PORT}", self.addr(i))
    }

    /// `program` run inside host `i`'s namespace (`ip netns exec` execs it: the process's id is
    /// the program's, so signals reach it directly).
    pub fn command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Host `i`'s link up or down (the others cannot reach it, nor it them).
    pub fn link(&self, i: usize, up: bool) -> Result<()> {
        tool(
            "ip",
            &["-n", &self.bridge_ns(), "link", "set", &format!("v{i}"), if up { "up" } else { "down" }],
        )
    }

    /// Applies the active partitions `cuts` (each a set of hosts cut off from those outside
    /// it): hosts on the same side of every cut share a bridge; the rest stay on bridge 0.
    /// Connections across a cut see their packets vanish, as across a real partition.
    pub fn partition(&self, cuts: &[BTreeSet<usize>]) -> Result<()> {
        let mut sides: BTreeMap<Vec<bool>, usize> = BTreeMap::new();
        sides.insert(vec![false; cuts.len()], 0);
        let want: Vec<usize> = (0..self.n)
            .map(|i| {
                let side: Vec<bool> = cuts.iter().map(|c| c.contains(&i)).collect();
                let next = sides.len();
                *sides.entry(side).or_insert(next)
            })
            .collect();
        let br = self.bridge_ns();
        let mut state = self.bridges.lock().expect("bridges");
        for b in 0..sides.len() {
            if state.1.insert(b) {
                tool("ip", &["-n", &br, "link", "add", &format!("br{b}"), "type", "bridge"])?;
                tool("ip", &["-n", &br, "link", "set", &format!("br{b}"), "up"])?;
            }
        }
        for (i, &b) in want.iter().enumerate() {
            if state.0[i] != b {
                tool("ip", &["-n", &br, "link", "set", &format!("v{i}"), "master", &format!("br{b}")])?;
                state.0[i] = b;
            }
        }
        Ok(())
    }

    /// Caps host `i`'s uplink and downlink at `mbit` Mbit/s each (`tc … tbf` on both ends of
    /// its link), or lifts the cap (`None`).
    pub fn cap(&self, i: usize, mbit: Option<f64>) -> Result<()> {
        let (ns, br, outer) = (self.ns(i), self.bridge_ns(), format!("v{i}"));
        for (space, dev) in [(ns.as_str(), "eth0"), (br.as_str(), outer.as_str())] {
            match mbit {
                Some(r) => {
                    // A bucket of 4 ms at the rate (at least 16 KiB), a queue of 100 ms.
                    let burst = ((r * 1e6 / 8.0 * 0.004) as u64).max(16 * 1024);
                    let (rate, burst) = (format!("{}kbit", (r * 1000.0).round() as u64), burst.to_string());
                    let args = [
                        "-n", space, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                        &burst,
                    ];
                    let args: Vec<&str> = args.into_iter().chain(["latency", "100ms"]).collect();
                    tool("tc", &args)?;
                }
                None => {
                    // Nothing to delete is fine: the link had no cap.
                    let _ = tool("tc", &["-n", space, "qdisc", "del", "dev", dev, "root"]);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the link ends inside it, and so their peers.
        for i in 0..self.n {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge_ns()]).status();
    }
}

/// Removes the namespaces of ours whose creating process is gone.
fn sweep_stale() {
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(namespace = name, "removing a namespace left by a process that is gone");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// `f` on a thread that has entered namespace `ns` (sockets it makes live there).
    fn inside<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace file");
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .expect("setns");
                f()
            })
            .join()
            .expect("thread")
        })
    }

    /// Whether host `from` can open a TCP connection to host `to` (listening meanwhile).
    fn reaches(h: &Hosts, from: usize, to: usize) -> bool {
        let at = SocketAddr::from((h.addr(to), 5555));
        let listener = inside(&h.ns(to), || TcpListener::bind(at).expect("bind in the namespace"));
        let ok = inside(&h.ns(from), || TcpStream::connect_timeout(&at, Duration::from_millis(500)).is_ok());
        drop(listener);
        ok
    }

    #[test]
    fn partitions_cut_exactly_the_pairs_across_them_and_heal() {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        let h = Hosts::new(4).unwrap();
        let names: Vec<String> = (0..4).map(|i| h.ns(i)).chain([h.bridge_ns()]).collect();
        assert!(reaches(&h, 0, 3) && reaches(&h, 1, 2));
        h.partition(&[BTreeSet::from([2, 3])]).unwrap();
        assert!(reaches(&h, 2, 3) && reaches(&h, 0, 1), "each side stays connected");
        assert!(!reaches(&h, 0, 3) && !reaches(&h, 2, 1), "the cut holds");
        h.partition(&[BTreeSet::from([2, 3]), BTreeSet::from([3])]).unwrap();
        assert!(!reaches(&h, 2, 3) && !reaches(&h, 3, 0) && reaches(&h, 0, 1), "cuts combine");
        h.partition(&[]).unwrap();
        assert!(reaches(&h, 0, 3) && reaches(&h, 2, 3), "healed");
        h.link(1, false).unwrap();
        assert!(!reaches(&h, 0, 1), "a link set down");
        h.link(1, true).unwrap();
        h.cap(1, Some(50.0)).unwrap();
        assert!(reaches(&h, 0, 1), "a capped link carries traffic");
        h.cap(1, None).unwrap();
        drop(h);
        let left =
            String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
        let left: BTreeSet<&str> = left.lines().filter_map(|l| l.split_whitespace().next()).collect();
        assert!(names.iter().all(|n| !left.contains(n.as_str())), "namespaces removed: {left:?}");
    }
}
