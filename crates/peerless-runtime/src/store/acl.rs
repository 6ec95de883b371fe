//! Per-node Redis ACL users: one user per node of a run on a shared Redis, allowed only that
//! node's keys and the commands the node and its functions send.
//!
//! Every key a node and its functions touch starts with the node's prefix
//! ([`node_key_prefix`], `peer<index>/`), so a user with the key pattern `~peer<index>/*`
//! reaches its own node's keys and no other node's. The accumulate script
//! ([`super::redis::ACCUMULATE_LUA`]) declares all five keys it touches in `KEYS`, so Redis
//! checks each against the pattern too; a call on another node's key is refused (`NOPERM`)
//! before the script runs.
//!
//! The commands allowed are the ones [`super::RedisStore`] sends and the script calls
//! ([`NODE_COMMANDS`]), nothing else: no `KEYS`, `SCAN`, `FLUSHALL`, `CONFIG`, `ACL`, `DEBUG`,
//! `MODULE`, `FUNCTION` or `SCRIPT FLUSH`. `SELECT` is allowed (a URL may name a database);
//! key patterns hold in every database.
//!
//! [`Admin`] creates and deletes the users over a connection with the administrator's URL
//! (`cluster.store`, which must allow `ACL SETUSER` and `ACL DELUSER`); the launcher keeps the
//! users of a run in [`NodeUsers`], which deletes them when dropped, whatever ends the run.
//! Redis 6.2 or later is needed (`ACL SETUSER … reset`); an older server is refused with an
//! error naming the version problem.

use std::time::Duration;

use redis::{Client, Connection, IntoConnectionInfo, RedisError};
use tracing::{info, warn};

use super::StoreError;
use super::redis::elide_password;

/// The prefix of every store key of node `index` (its parameters, gradients, sums, and the
/// accumulators' bookkeeping keys, warm-up included).
pub fn node_key_prefix(index: u32) -> String {
    format!("peer{index}/")
}

/// The commands a node's user may run: `PING` (the connect check), `SELECT`, the store's
/// `GET`/`SET`/`MGET`/`DEL`, `EVALSHA`/`EVAL`/`SCRIPT LOAD` for the accumulate script, and
/// the commands that script calls (a script's commands are checked against its caller's
/// permissions too).
pub const NODE_COMMANDS: &[&str] = &[
    "ping",
    "select",
    "get",
    "set",
    "mget",
    "del",
    "evalsha",
    "eval",
    "script|load",
    "sismember",
    "hget",
    "hexists",
    "hset",
    "hdel",
    "hkeys",
    "sadd",
    "incr",
];

/// A node's Redis user.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeUser {
    /// The user name, e.g. `peerless-1f2e3d4c-peer0`.
    pub name: String,
    /// Its password (drawn at random per node and run).
    pub password: String,
    /// The node's key prefix ([`node_key_prefix`]).
    pub prefix: String,
}

impl std::fmt::Debug for NodeUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeUser").field("name", &self.name).field("prefix", &self.prefix).finish()
    }
}

impl NodeUser {
    /// The rules after `ACL SETUSER <name>`: reset to nothing, then on, the password, the
    /// key pattern and the commands.
    pub fn rules(&self) -> Vec<String> {
        let mut rules = vec![
            "reset".to_owned(),
            "on".to_owned(),
            format!(">{}", self.password),
            format!("~{}*", self.prefix),
        ];
        rules.extend(NODE_COMMANDS.iter().map(|c| format!("+{c}")));
        rules
    }

    /// The `ACL SETUSER` line an operator runs for a node started by hand (`redis-cli`).
    pub fn setuser_line(&self) -> String {
        format!("ACL SETUSER {} {}", self.name, self.rules().join(" "))
    }

    /// `admin_url` with its credentials replaced by this user's: the URL the node and its
    /// functions use.
    pub fn url(&self, admin_url: &str) -> String {
        with_credentials(admin_url, Some((&self.name, &self.password)))
    }
}

/// `url` with its userinfo (`user:password@`) replaced by `credentials`, or removed.
pub fn with_credentials(url: &str, credentials: Option<(&str, &str)>) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let rest = match rest[..host_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    match credentials {
        Some((user, password)) => {
            format!("{scheme}://{}:{}@{rest}", crate::percent::encode(user), crate::percent::encode(password))
        }
        None => format!("{scheme}://{rest}"),
    }
}

/// A connection as the Redis administrator (the URL of `cluster.store`).
pub struct Admin {
    conn: Connection,
    /// The URL with the password elided.
    url: String,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("url", &self.url).finish_non_exhaustive()
    }
}

/// How long the administrator's connection has to connect, and each reply to come.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What serves a shared store's URL.
#[derive(Debug)]
pub enum SharedStore {
    /// A Redis with ACL users, and a connection as its administrator.
    Redis(Admin),
    /// A peerless embedded store: one password, no users.
    Embedded,
}

impl Admin {
    /// Connects to `url` and checks that the server has ACL users.
    ///
    /// # Errors
    /// As [`Admin::probe`]; also if `url` is served by a peerless embedded store.
    pub fn connect(url: &str) -> Result<Admin, StoreError> {
        match Admin::probe(url)? {
            SharedStore::Redis(admin) => Ok(admin),
            SharedStore::Embedded => Err(StoreError::Connect {
                url: elide_password(url),
                reason: "a peerless embedded store has no ACL users".to_owned(),
            }),
        }
    }

    /// Connects to `url` and finds what serves it: a Redis with ACL users, or a peerless
    /// embedded store.
    ///
    /// # Errors
    /// [`StoreError::Connect`] if the server is unreachable, the credentials are refused, or
    /// the server has no ACLs (Redis before 6) or the user may not run `ACL`.
    pub fn probe(url: &str) -> Result<SharedStore, StoreError> {
        let shown = elide_password(url);
        let fail = |reason: String| StoreError::Connect { url: shown.clone(), reason };
        let info = url.into_connection_info().map_err(|e| fail(format!("invalid URL: {e}")))?;
        let client = Client::open(info).map_err(|e| fail(format!("invalid URL: {e}")))?;
        let mut conn = client.get_connection_with_timeout(ADMIN_TIMEOUT).map_err(|e| fail(e.to_string()))?;
        conn.set_read_timeout(Some(ADMIN_TIMEOUT)).map_err(|e| fail(e.to_string()))?;
        conn.set_write_timeout(Some(ADMIN_TIMEOUT)).map_err(|e| fail(e.to_string()))?;
        if let Err(e) = redis::cmd("PING").query::<String>(&mut conn) {
            return Err(fail(e.to_string()));
        }
        if redis::cmd("PEERLESS.PING").query::<String>(&mut conn).is_ok_and(|s| s == "PEERLESS") {
            return Ok(SharedStore::Embedded);
        }
        if let Err(e) = redis::cmd("ACL").arg("WHOAMI").query::<String>(&mut conn) {
            return Err(fail(acl_problem(&e)));
        }
        Ok(SharedStore::Redis(Admin { conn, url: shown }))
    }

    /// Creates (or resets) `user`.
    ///
    /// # Errors
    /// [`StoreError::Command`] naming the user if the server refuses it.
    pub fn create(&mut self, user: &NodeUser) -> Result<(), StoreError> {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user.name)
            .arg(user.rules())
            .query::<()>(&mut self.conn)
            .map_err(|e| StoreError::Command {
                command: format!("ACL SETUSER {}", user.name),
                reason: scrub_password(&acl_problem(&e), &user.password),
            })
    }

    /// Deletes the users named `names`; how many existed.
    ///
    /// # Errors
    /// [`StoreError::Command`] if the server refuses.
    pub fn delete(&mut self, names: &[&str]) -> Result<u64, StoreError> {
        if names.is_empty() {
            return Ok(0);
        }
        redis::cmd("ACL")
            .arg("DELUSER")
            .arg(names)
            .query::<u64>(&mut self.conn)
            .map_err(|e| StoreError::Command { command: "ACL DELUSER".to_owned(), reason: acl_problem(&e) })
    }

    /// The names of the server's users.
    ///
    /// # Errors
    /// [`StoreError::Command`] if the server refuses.
    pub fn users(&mut self) -> Result<Vec<String>, StoreError> {
        redis::cmd("ACL")
            .arg("USERS")
            .query(&mut self.conn)
            .map_err(|e| StoreError::Command { command: "ACL USERS".to_owned(), reason: acl_problem(&e) })
    }
}

/// What an error of an `ACL` command means: no ACLs on the server (Redis before 6, or 6.0
/// without `reset`), the administrator may not manage users, or the server's own words.
fn acl_problem(e: &RedisError) -> String {
    explain(&e.to_string(), e.code())
}

fn explain(text: &str, code: Option<&str>) -> String {
    let lower = text.to_ascii_lowercase();
    if lower.contains("unknown command") {
        format!("the server has no ACL users (Redis 6.2 or later is needed for per-node users): {text}")
    } else if lower.contains("'reset'") || lower.contains("modifier 'reset'") {
        format!("the server does not know `ACL SETUSER … reset` (Redis 6.2 or later is needed): {text}")
    } else if code == Some("NOPERM") {
        format!("the store URL's user may not manage ACL users (it needs +acl): {text}")
    } else {
        text.to_owned()
    }
}

fn scrub_password(text: &str, password: &str) -> String {
    if password.is_empty() { text.to_owned() } else { text.replace(password, "***") }
}

/// The Redis users of a run's nodes, created on a shared Redis: deleted when dropped.
#[derive(Debug)]
pub struct NodeUsers {
    admin: Admin,
    names: Vec<String>,
}

impl NodeUsers {
    /// Creates `users` through `admin`. A user that fails is not left behind: those created
    /// before it are deleted.
    ///
    /// # Errors
    /// As [`Admin::create`].
    pub fn create(admin: Admin, users: &[NodeUser]) -> Result<NodeUsers, StoreError> {
        let mut created = NodeUsers { admin, names: Vec::with_capacity(users.len()) };
        for user in users {
            created.admin.create(user)?;
            created.names.push(user.name.clone());
        }
        info!(users = created.names.len(), store = %created.admin.url, "per-node Redis users created");
        Ok(created)
    }

    /// The users' names.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl Drop for NodeUsers {
    fn drop(&mut self) {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        match self.admin.delete(&names) {
            Ok(n) => info!(deleted = n, store = %self.admin.url, "per-node Redis users deleted"),
            Err(e) => warn!(
                error = %e,
                users = ?names,
                "could not delete the run's Redis users; remove them with ACL DELUSER"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> NodeUser {
        NodeUser {
            name: "peerless-ab12cd34-peer1".into(),
            password: "f00d".into(),
            prefix: node_key_prefix(1),
        }
    }

    #[test]
    fn a_user_may_touch_only_its_node_prefix_with_the_store_commands() {
        let line = user().setuser_line();
        assert!(
            line.starts_with("ACL SETUSER peerless-ab12cd34-peer1 reset on >f00d ~peer1/* +ping "),
            "{line}"
        );
        assert!(line.ends_with(" +incr"), "{line}");
        let words: Vec<&str> = line.split(' ').collect();
        for absent in
            ["~*", "allkeys", "allcommands", "+@all", "+keys", "+scan", "+flushall", "+config", "+acl"]
        {
            assert!(!words.contains(&absent), "{absent} in {line}");
        }
        assert!(!line.contains("+@"), "no command category is allowed whole: {line}");
        assert!(!format!("{:?}", user()).contains("f00d"));
    }

    #[test]
    fn the_setuser_line_in_the_multi_host_guide_is_the_one_the_launcher_sends() {
        let doc = include_str!("../../../../docs/multi-host.md");
        let u = NodeUser {
            name: "peerless-run1-peer0".into(),
            password: "PASSWORD".into(),
            prefix: node_key_prefix(0),
        };
        assert!(doc.contains(&u.setuser_line()), "docs/multi-host.md lacks {}", u.setuser_line());
    }

    #[test]
    fn node_urls_carry_the_node_user_instead_of_the_admin() {
        let u = user();
        assert_eq!(
            u.url("redis://:admin@10.0.0.5:6379/"),
            "redis://peerless-ab12cd34-peer1:f00d@10.0.0.5:6379/"
        );
        assert_eq!(u.url("redis://root:a@b@h:1/2"), "redis://peerless-ab12cd34-peer1:f00d@h:1/2");
        assert_eq!(u.url("redis://h:1"), "redis://peerless-ab12cd34-peer1:f00d@h:1");
        assert_eq!(with_credentials("redis://:admin@h:1/", None), "redis://h:1/");
        assert_eq!(with_credentials("redis://h:1/?x=a@b", Some(("u", "p w"))), "redis://u:p%20w@h:1/?x=a@b");
    }

    #[test]
    fn an_old_server_is_named_as_the_problem() {
        let why =
            explain("An error was signalled by the server - ResponseError: unknown command 'ACL'", None);
        assert!(why.contains("no ACL users (Redis 6.2 or later"), "{why}");
        let why = explain("ERR Error in ACL SETUSER modifier 'reset': Syntax error", Some("ERR"));
        assert!(why.contains("Redis 6.2 or later"), "{why}");
        let why = explain("NOPERM this user has no permissions to run the 'acl' command", Some("NOPERM"));
        assert!(why.contains("may not manage ACL users"), "{why}");
    }
}
