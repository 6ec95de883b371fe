//! A cluster's layout on this machine: the nodes' files (`peer.toml`, `ps.toml`,
//! `worker.toml`), their identities and admission certificates (the launcher is the run's
//! owner), their addresses (loopback ports, or hosts of their own with `launcher.netns`),
//! their store credentials (a password per embedded store, or a Redis ACL user per node on a
//! shared Redis), the fault schedule and who attacks.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use peerless_core::attack::Attack;

use super::faults::{self, Injector, Net, Proxy, Record};
use super::netns::Hosts;
use super::supervise::{Node, Role};
use crate::admission::Run;
use crate::config::{RunConfig, TrainArch};
use crate::node::transport;
use crate::node::{NodeFile, NodeSection};
use crate::scenario::FaultSpec;
use crate::store::acl::{NodeUser, node_key_prefix, with_credentials};

/// The scenario's Byzantine attacks, by the index of the node that carries each out.
pub(super) type Attacks = BTreeMap<usize, Attack>;

/// The nodes of a run, and the faults planned for them.
pub(super) struct Layout {
    pub(super) nodes: Vec<Node>,
    pub(super) injector: Injector,
    /// Faults whose target does not exist in this architecture.
    pub(super) skipped: Vec<Record>,
    pub(super) attacks: Attacks,
    /// The nodes' hosts, with `launcher.netns` (node `i` on host `i`).
    pub(super) hosts: Option<Arc<Hosts>>,
    /// On a shared Redis (`cluster.store = "redis://…"`): the Redis user of each node that
    /// uses the store, to be created before the nodes start.
    pub(super) store_users: Vec<NodeUser>,
}

/// Lays out a run of `arch` in `dir` (`cfg.cluster.nodes` peers, or as many workers and a PS).
/// With `users` (`cluster.store` is a Redis with ACLs), each node that uses the store gets a
/// Redis user of its own ([`Layout::store_users`]), written into its file.
pub(super) fn lay_out(
    cfg: &RunConfig,
    dir: &Path,
    faults: &[FaultSpec],
    arch: TrainArch,
    users: bool,
) -> Result<Layout> {
    let n = cfg.cluster.nodes as usize;
    // A PS run's server is node n; a P2P run's joiners (started by `join` faults) follow the
    // starting peers.
    let nodes = if arch == TrainArch::Ps { n + 1 } else { n + faults::joiners(faults, arch, n).len() };
    let hosts = if cfg.launcher.netns { Some(Arc::new(hosts(cfg, nodes, faults)?)) } else { None };
    let net = match &hosts {
        Some(h) if faults::network_faults(faults) => {
            Net::Hosts { hosts: h.clone(), cuts: Vec::new(), caps: Vec::new() }
        }
        None if faults::network_faults(faults) => {
            if arch == TrainArch::P2p && cfg.p2p.tensor_transport == crate::config::TensorTransport::Tcp {
                anyhow::bail!(
                    "p2p.tensor_transport = \"tcp\" with network faults (partition, delay, bandwidth) needs \
                     launcher.netns: the loopback fault proxy stands between libp2p connections and would not \
                     see the tensor lanes. Use --netns, or tensor_transport = \"libp2p\""
                );
            }
            Net::Proxy(Proxy::new()?)
        }
        _ => Net::None,
    };
    let (injector, skipped) = Injector::new(faults, arch, n, nodes, net, cfg.seed);
    let attacks: Attacks = faults::attacks(faults, arch, n).into_iter().collect();
    let mut run = cfg.clone();
    let shared_store = users.then(|| cfg.cluster.store.clone());
    if let Some(admin) = &shared_store {
        // The administrator's credentials stay with the launcher: neither the run file nor
        // any node file holds them.
        run.cluster.store = with_credentials(admin, None);
    }
    // The run file is shareable: it names a shared store without credentials in any case.
    let mut shareable = run.clone();
    if shareable.cluster.store.starts_with("redis://") {
        shareable.cluster.store = with_credentials(&shareable.cluster.store, None);
    }
    let owner = owner(dir, &shareable)?;
    run.admission = owner.config.admission.clone();
    let run_short = run.admission.run_id.get(..8).unwrap_or("run").to_owned();
    let mut store_users = Vec::new();
    let ports = if hosts.is_some() { Vec::new() } else { free_ports(nodes)? };
    let listen = |i: usize| match &hosts {
        Some(h) => h.multiaddr(i),
        None => multiaddr(ports[i]),
    };
    let nodes = (0..nodes)
        .map(|i| {
            let (role, ndir, bootstrap) = place(arch, n, i, dir);
            let joins = role == Role::Peer && i >= n;
            let bootstrap = bootstrap
                .iter()
                .map(|&j| match hosts {
                    Some(_) => Ok(listen(j)),
                    None => dial_addr(injector.proxy(), i, j, ports[j]),
                })
                .collect::<Result<_>>()?;
            let (identity, certificate) = credentials(&owner, &ndir, role, i as u32)?;
            let section = NodeSection {
                index: i as u32,
                listen: listen(i),
                bootstrap,
                allow: Vec::new(),
                dir: ndir.clone(),
                external: String::new(),
                // The launcher connects every pair itself (through the fault proxy if any).
                share_addresses: false,
                identity,
                certificate,
                join: joins,
                // Progress lines come from the nodes that hold the model.
                progress: role != Role::Worker,
                threads: node_threads(n),
                halt_at_round: None,
                attack: attacks.get(&i).copied(),
            };
            let config = ndir.join(format!("{}.toml", role.name()));
            // Each node's embedded store has a password of its own, given only to its node (and
            // by it to its functions); a configured one is kept.
            let mut run = run.clone();
            if run.cluster.secret.is_empty() {
                run.cluster.secret = random_secret();
            }
            // On a shared Redis, each node that uses the store (not the PS) gets a user of its
            // own, limited to its keys; the PS's file names the server without credentials.
            if let (Some(admin), true) = (&shared_store, role != Role::Ps) {
                let user = NodeUser {
                    name: format!("peerless-{run_short}-{}{i}", role.name()),
                    password: random_secret(),
                    prefix: node_key_prefix(i as u32),
                };
                run.cluster.store = user.url(admin);
                store_users.push(user);
            }
            write_node_file(&config, NodeFile { node: section, run })?;
            let restart = (role == Role::Ps).then(|| Duration::from_millis(cfg.ps.restart_delay_ms));
            let netns = hosts.as_ref().map(|h| h.ns(i));
            Ok(Node { role, config, restart, at_launch: !joins, netns })
        })
        .collect::<Result<_>>()?;
    Ok(Layout { nodes, injector, skipped, attacks, hosts, store_users })
}

/// A host for each of `nodes` (`launcher.netns`); refused, naming the reason, when this
/// machine cannot make them, a fault needs the loopback proxy, or the nodes would need a store
/// outside their hosts.
fn hosts(cfg: &RunConfig, nodes: usize, faults: &[FaultSpec]) -> Result<Hosts> {
    if cfg.cluster.store != "embedded" {
        anyhow::bail!(
            "launcher.netns: cluster.store = {:?} is outside the hosts' network, which reaches \
             only the other hosts; use cluster.store = \"embedded\" (each node serves its own)",
            crate::store::redis::elide_password(&cfg.cluster.store)
        );
    }
    if faults.iter().any(|f| f.kind == crate::scenario::FaultKind::Delay) {
        anyhow::bail!(
            "launcher.netns: a `delay` fault needs the loopback fault proxy (this kernel has no \
             netem to delay packets on a link); run it without --netns"
        );
    }
    Hosts::new(nodes).context("launcher.netns: nodes on hosts of their own")
}

/// Node `i`'s role, directory and the nodes it dials, in a run of `arch` with `n` peers or
/// workers. A joiner (`i >= n`) dials every node before it, the joiners too (one that is not
/// up yet is redialled); the others learn of it when it connects.
fn place(arch: TrainArch, n: usize, i: usize, dir: &Path) -> (Role, PathBuf, Vec<usize>) {
    match arch {
        TrainArch::Ps if i == n => (Role::Ps, dir.join("ps"), Vec::new()),
        TrainArch::Ps => (Role::Worker, dir.join("workers").join(i.to_string()), vec![n]),
        _ if i >= n => (Role::Peer, dir.join("peers").join(i.to_string()), (0..i).collect()),
        _ => (Role::Peer, dir.join("peers").join(i.to_string()), (0..n).filter(|&j| j != i).collect()),
    }
}

/// How long the launcher's certificates are valid, s.
const CERTIFICATE_LIFETIME_S: u64 = 30 * 24 * 3600;

/// The run in `dir` the launcher owns (`run.toml`, `admission.key`, `admitted.toml`, as
/// `peerless run init` and `peerless admit` write them, so more nodes can be admitted): the one
/// there (a resumed run), or a new one for `cfg`.
fn owner(dir: &Path, cfg: &RunConfig) -> Result<Run> {
    if dir.join("admission.key").exists() {
        return Run::open(dir).with_context(|| format!("the run's admission files in {}", dir.display()));
    }
    Run::init(dir, cfg.clone()).with_context(|| format!("the run's admission files in {}", dir.display()))
}

/// Node `index`'s identity (generated in `ndir`, or the one already there) and its certificate
/// from `owner` (`ndir/node.cert`): their paths.
fn credentials(owner: &Run, ndir: &Path, role: Role, index: u32) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(ndir).with_context(|| format!("creating {}", ndir.display()))?;
    let identity = ndir.join("identity.key");
    let key =
        transport::load_or_generate_keypair(&identity).with_context(|| format!("{}", identity.display()))?;
    let role = match role {
        Role::Peer => peerless_core::admission::Role::Peer,
        Role::Worker => peerless_core::admission::Role::Worker,
        Role::Ps => peerless_core::admission::Role::Ps,
    };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (_, cert) =
        owner.admit(&key.public().to_peer_id(), role, Some(index), now + CERTIFICATE_LIFETIME_S)?;
    let certificate = ndir.join("node.cert");
    std::fs::write(&certificate, cert).with_context(|| format!("writing {}", certificate.display()))?;
    Ok((identity, certificate))
}

fn write_node_file(path: &Path, file: NodeFile) -> Result<()> {
    let dir = &file.node.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(path, file.to_toml()).with_context(|| format!("writing {}", path.display()))
}

/// `n` loopback ports free now, below the kernel's ephemeral range: the nodes bind them only
/// when they start, and a port the kernel hands out for `bind(…:0)` meanwhile (a function
/// service's, an instance's Runtime API) can never be one of them. Ports of that range are
/// the fallback when the range starts too low to leave room below it.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    const FIRST: u16 = 10_000;
    let mut held: Vec<TcpListener> = Vec::new();
    if low > FIRST + 1_000 {
        // Start at a point that differs between processes, so concurrent runs rarely try
        // the same ports, then walk the range.
        let span = u32::from(low - FIRST);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let start = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % span;
        for k in 0..span {
            if held.len() == n {
                break;
            }
            let port = FIRST + ((start + k) % span) as u16;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                held.push(l);
            }
        }
    }
    while held.len() < n {
        held.push(TcpListener::bind("127.0.0.1:0")?);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The runtime threads of each of `nodes` nodes that share this machine: its share of the
/// CPUs, 1 to 2 ([`NodeSection::threads`]).
fn node_threads(nodes: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    (cpus / nodes.max(1)).clamp(1, 2)
}

fn random_secret() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!(
        "{}{:x}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
        nanos ^ u128::from(std::process::id())
    )
}

fn multiaddr(port: u16) -> String {
    format!("/ip4/127.0.0.1/tcp/{port}")
}

/// The address node `from` dials to reach node `to` listening on `port`: direct, or through
/// the fault proxy when the run injects network faults.
fn dial_addr(proxy: Option<&Proxy>, from: usize, to: usize, port: u16) -> Result<String> {
    Ok(match proxy {
        Some(px) => multiaddr(px.route(from, to, ([127, 0, 0, 1], port).into())?.port()),
        None => multiaddr(port),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_share_the_cpus_with_one_or_two_threads_each() {
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
        assert_eq!(node_threads(1), cpus.min(2));
        assert_eq!(node_threads(cpus), 1, "as many nodes as CPUs");
        assert_eq!(node_threads(4 * cpus), 1, "more nodes than CPUs");
        assert_eq!(node_threads(0), cpus.min(2));
    }

    #[test]
    fn a_ps_run_is_laid_out_as_workers_dialling_the_ps_after_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = RunConfig::default();
        cfg.cluster.nodes = 3;
        let layout = lay_out(&cfg, tmp.path(), &[], TrainArch::Ps, false).unwrap();
        let roles: Vec<Role> = layout.nodes.iter().map(|n| n.role).collect();
        assert_eq!(roles, [Role::Worker, Role::Worker, Role::Worker, Role::Ps]);
        let files: Vec<NodeFile> = layout.nodes.iter().map(|n| NodeFile::load(&n.config).unwrap()).collect();
        let ps = &files[3].node;
        assert_eq!((ps.index, ps.bootstrap.len(), ps.progress), (3, 0, true));
        for (i, w) in files[..3].iter().enumerate() {
            assert_eq!(w.node.index as usize, i);
            assert_eq!(w.node.bootstrap, std::slice::from_ref(&ps.listen), "worker {i} dials the PS");
            assert!(!w.node.progress);
        }
        assert!(files.iter().all(|f| !f.run.cluster.secret.is_empty()), "a secret is drawn");
        let secrets: std::collections::BTreeSet<&str> =
            files.iter().map(|f| f.run.cluster.secret.as_str()).collect();
        assert_eq!(secrets.len(), files.len(), "each node's store has its own password");
        assert!(!files[0].run.admission.run_id.is_empty(), "the launcher owns a run");
        assert!(
            files
                .iter()
                .all(|f| f.node.allow.is_empty() && f.node.certificate.exists() && f.node.identity.exists())
        );
        assert!(layout.nodes[3].restart.is_some() && layout.nodes[0].restart.is_none());
    }

    #[test]
    fn on_a_shared_redis_each_node_gets_a_user_of_its_own_and_no_file_holds_the_admin_password() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = RunConfig::default();
        cfg.cluster.nodes = 2;
        cfg.cluster.store = "redis://:adminpw@10.1.2.3:6379/".into();
        let layout = lay_out(&cfg, tmp.path(), &[], TrainArch::Ps, true).unwrap();
        let files: Vec<NodeFile> = layout.nodes.iter().map(|n| NodeFile::load(&n.config).unwrap()).collect();
        let users = &layout.store_users;
        assert_eq!(users.len(), 2, "a user per worker, none for the PS");
        let run_id = &files[0].run.admission.run_id;
        for (i, (f, u)) in files[..2].iter().zip(users).enumerate() {
            assert_eq!(u.name, format!("peerless-{}-worker{i}", &run_id[..8]));
            assert_eq!(u.prefix, format!("peer{i}/"));
            assert_eq!(f.run.cluster.store, format!("redis://{}:{}@10.1.2.3:6379/", u.name, u.password));
        }
        assert_ne!(users[0].password, users[1].password);
        assert_eq!(files[2].run.cluster.store, "redis://10.1.2.3:6379/", "the PS uses no store");
        for path in layout.nodes.iter().map(|n| n.config.clone()).chain([tmp.path().join("run.toml")]) {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("adminpw"), "{} holds the administrator's password", path.display());
        }
    }

    #[test]
    fn each_peer_dials_every_other_peer() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = RunConfig::default();
        cfg.cluster.nodes = 3;
        let layout = lay_out(&cfg, tmp.path(), &[], TrainArch::P2p, false).unwrap();
        let files: Vec<NodeFile> = layout.nodes.iter().map(|n| NodeFile::load(&n.config).unwrap()).collect();
        for (i, f) in files.iter().enumerate() {
            let others: Vec<String> = files
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, g)| g.node.listen.clone())
                .collect();
            assert_eq!(f.node.bootstrap, others);
            assert_eq!(f.node.dir, tmp.path().join("peers").join(i.to_string()));
        }
    }
}
