//! Integration tests of peerless-runtime: one test binary, one module per area, shared helpers here.

mod acl;
mod store;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago (bind port 0, read it, release it).
pub fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// 32 random hex characters (from std's randomly seeded hasher; no RNG dependency).
pub fn random_token() -> String {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(0u8);
    let b = RandomState::new().hash_one(1u8);
    format!("{a:016x}{b:016x}")
}

/// A `redis-server` child process with a random password, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    password: String,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer").field("port", &self.port).finish_non_exhaustive()
    }
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it answers. Returns `None`
    /// (after printing `SKIPPED`) if it is not installed — unless `PEERLESS_REQUIRE_REDIS=1`,
    /// then it panics.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// As [`RedisServer::start`], with more configuration arguments (`--name value`).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        let required = std::env::var("PEERLESS_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_loopback_port();
        let password = random_token();
        let spawned = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--requirepass")
            .arg(&password)
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .args(extra)
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
        let server = Self { child, port, password, dir };
        server.wait_until_answering();
        Some(server)
    }

    /// `redis://:password@127.0.0.1:port/`.
    pub fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}/", self.password, self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn wait_until_answering(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) {
                let mut reply = [0u8; 64];
                let answered = s.set_read_timeout(Some(Duration::from_secs(1))).is_ok()
                    && s.write_all(b"*1\r\n$4\r\nPING\r\n").is_ok()
                    && s.read(&mut reply).is_ok_and(|n| n > 0);
                // Unauthenticated, it refuses PING with -NOAUTH: that is an answer.
                if answered {
                    return;
                }
            }
            let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}; log:\n{log}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
