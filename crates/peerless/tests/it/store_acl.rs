//! Runs on a shared Redis (`cluster.store = "redis://…"`): each node gets a Redis ACL user of
//! its own from the launcher, the run trains with them, and no user outlives the run, whether
//! it finishes, is interrupted (SIGINT) or terminated (SIGTERM); nodes started by hand take
//! their own user with `--store`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peerless_runtime::store::acl::{Admin, NodeUser, node_key_prefix};

use crate::admission::{keygen, listening};
use crate::{assert_completed_and_agreed, digests, peer_round, peerless, run, summary, wait_for};

/// A `redis-server` child process with a random password on a free loopback port, killed on
/// drop. `None` (after printing `SKIPPED`) if it is not installed, unless
/// `PEERLESS_REQUIRE_REDIS=1`.
struct RedisServer {
    child: Child,
    port: u16,
    password: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let required = std::env::var("PEERLESS_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
        let password = {
            use std::hash::{BuildHasher, RandomState};
            format!("{:016x}{:016x}", RandomState::new().hash_one(0u8), RandomState::new().hash_one(1u8))
        };
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", &password])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                println!(
                    "SKIPPED: redis-server is not installed (set PEERLESS_REQUIRE_REDIS=1 to fail instead)"
                );
                return None;
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let server = RedisServer { child, port, password, _dir: dir };
        wait_for("redis-server to answer", Duration::from_secs(10), || {
            let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else { return false };
            let mut reply = [0u8; 64];
            s.set_read_timeout(Some(Duration::from_secs(1))).is_ok()
                && s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
                && s.read(&mut reply).is_ok_and(|n| n > 0)
        });
        Some(server)
    }

    /// The administrator's URL (the default user, with the server's password).
    fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}/", self.password, self.port)
    }

    /// The users the server has now.
    fn users(&self) -> Vec<String> {
        Admin::connect(&self.url()).expect("admin connects").users().expect("ACL USERS")
    }

    /// The administrator's answer to `cmd`.
    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut conn = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        cmd.query(&mut conn).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 2-peer digits run on the Redis at `store`, deadlines long enough that no peer misses one.
fn launch(dir: &Path, out: &Path, store: &str, rounds: u32) -> Child {
    let config = dir.join("shared-redis.toml");
    std::fs::write(&config, crate::CALM.replace("[p2p]", &format!("store = \"{store}\"\n[p2p]"))).unwrap();
    peerless()
        .args(["train", "--arch", "p2p", "--peers", "2", "--functions-per-peer", "2"])
        .args(["--rounds", &rounds.to_string(), "--lr", "0.05", "--seed", "3", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the launcher")
}

#[test]
fn two_peers_on_a_shared_redis_train_each_as_its_own_user_and_leave_no_user_behind() {
    let Some(redis) = RedisServer::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = launch(tmp.path(), &out, &redis.url(), 30).wait_with_output().unwrap();
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let s = summary(&out);
    assert_completed_and_agreed(&s);
    let d = digests(&s);
    assert!(d.len() == 2 && d[0] == d[1], "replicas differ: {d:?}");
    assert!(s["invocations"].as_u64().unwrap() > 0, "the functions ran: {s}");
    // The functions accumulated on this Redis (the script ran), and nothing was refused.
    let stats: String = redis.query(redis::cmd("INFO").arg("commandstats"));
    let calls = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|r| r.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(calls("evalsha") + calls("eval") >= 2 * 2 * 30, "{stats}");
    let refusals: Vec<redis::Value> = redis.query(redis::cmd("ACL").arg("LOG"));
    assert!(refusals.is_empty(), "refused during the run: {refusals:?}");

    // Each peer and its functions used a user of their own, and no node file holds the
    // administrator's password.
    let mut names = Vec::new();
    for i in 0..2 {
        let text = std::fs::read_to_string(out.join(format!("peers/{i}/peer.toml"))).unwrap();
        assert!(!text.contains(&redis.password), "peers/{i}/peer.toml holds the admin password");
        let file: toml::Table = toml::from_str(&text).unwrap();
        let url = file["run"]["cluster"]["store"].as_str().unwrap().to_owned();
        let user = url.strip_prefix("redis://").and_then(|r| r.split(':').next()).unwrap().to_owned();
        assert!(user.starts_with("peerless-") && user.ends_with(&format!("-peer{i}")), "{url}");
        names.push(user);
    }
    assert_ne!(names[0], names[1]);
    assert!(!std::fs::read_to_string(out.join("run.toml")).unwrap().contains(&redis.password));
    assert_eq!(redis.users(), ["default"], "the run's users are deleted when it ends");
}

#[test]
fn an_interrupted_or_terminated_run_on_a_shared_redis_leaves_no_user_behind() {
    for sig in [rustix::process::Signal::INT, rustix::process::Signal::TERM] {
        stopped_run_leaves_no_user_behind(sig);
    }
}

fn stopped_run_leaves_no_user_behind(sig: rustix::process::Signal) {
    let Some(redis) = RedisServer::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let child = launch(tmp.path(), &out, &redis.url(), 100_000);
    wait_for("round 5", Duration::from_secs(120), || peer_round(&out, 0) >= 5);
    let users = redis.users();
    assert_eq!(users.iter().filter(|u| u.starts_with("peerless-")).count(), 2, "{users:?}");
    let t = Instant::now();
    assert!(crate::signal(child.id(), sig));
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{sig:?}; stderr: {}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_eq!(redis.users(), ["default"], "the run stopped by {sig:?} left its users");
}

/// The operator's way (docs/multi-host.md): the run file names the Redis without credentials,
/// the administrator makes a user per worker with the documented `ACL SETUSER` rules, and each
/// worker, started from the command line, gets its own with `--store`.
#[test]
fn workers_started_by_hand_train_on_a_shared_redis_each_with_its_own_user() {
    let Some(redis) = RedisServer::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("shared.toml");
    std::fs::write(&config, format!("[cluster]\nstore = \"redis://127.0.0.1:{}/\"\n", redis.port)).unwrap();
    let run_dir = dir.join("run");
    let flags =
        ["--arch", "ps", "--workers", "2", "--functions-per-worker", "2", "--rounds", "20", "--seed", "3"];
    let o = run(peerless()
        .args(["run", "init"])
        .args(flags)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&run_dir));
    assert!(o.status.success());
    let start = |role: &str, name: &str, bootstrap: Option<&str>, store: Option<String>| -> Child {
        let (key, cert) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.cert")));
        let id = keygen(&key);
        let o = run(peerless()
            .args(["admit", "--run"])
            .arg(&run_dir)
            .args(["--peer", &id, "--role", role, "--out"])
            .arg(&cert));
        assert!(o.status.success());
        let mut cmd = peerless();
        cmd.args([role, "--run"])
            .arg(run_dir.join("run.toml"))
            .arg("--identity")
            .arg(&key)
            .arg("--cert")
            .arg(&cert);
        cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(bootstrap.map(|b| ["--bootstrap", b]).into_iter().flatten());
        cmd.args(store.map(|s| ["--store".to_owned(), s]).into_iter().flatten());
        cmd.arg("--out").arg(dir.join(name)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let ps = start("ps", "ps", None, None);
    let addr = listening(&dir.join("ps"));
    let mut workers = Vec::new();
    for i in 0..2u32 {
        let user = NodeUser {
            name: format!("peerless-hand-worker{i}"),
            password: format!("pw{i}-{}", redis.password),
            prefix: node_key_prefix(i),
        };
        let () = redis.query(redis::cmd("ACL").arg("SETUSER").arg(&user.name).arg(user.rules()));
        let url = user.url(&format!("redis://127.0.0.1:{}/", redis.port));
        workers.push(start("worker", &format!("worker{i}"), Some(&addr), Some(url)));
    }
    for (name, c) in std::iter::once(("ps".to_owned(), ps))
        .chain(workers.into_iter().enumerate().map(|(i, c)| (format!("worker {i}"), c)))
    {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(summary(&dir.join("ps"))["completed"], true);
    for i in 0..2 {
        let s = summary(&dir.join(format!("worker{i}")));
        assert!(s["invocations"].as_u64().unwrap_or(0) > 0, "worker {i}'s functions ran: {s}");
    }
    let refusals: Vec<redis::Value> = redis.query(redis::cmd("ACL").arg("LOG"));
    assert!(refusals.is_empty(), "refused during the run: {refusals:?}");
}
