//! Per-node store credentials: a node's credentials open its own store keys and no other
//! node's, on the embedded store (one server and password per node) and on a shared Redis
//! (one ACL user per node).

use peerless_runtime::store::acl::{Admin, NodeUser, NodeUsers, SharedStore, node_key_prefix};
use peerless_runtime::store::{Accumulated, EmbeddedServer, RedisStore, Store, StoreError};

use crate::{RedisServer, random_token};

/// Asserts that `r` is a refusal for lack of permission (Redis `NOPERM`).
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    match r {
        Err(StoreError::Command { reason, .. })
            if reason.contains("NOPERM") || reason.contains("no permissions") => {}
        other => panic!("{what}: expected a NOPERM refusal, got {other:?}"),
    }
}

fn node_user(i: u32) -> NodeUser {
    NodeUser { name: format!("peerless-test-peer{i}"), password: random_token(), prefix: node_key_prefix(i) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_redis_user_reaches_its_own_keys_and_is_refused_another_nodes() {
    let Some(server) = RedisServer::start() else { return };
    let admin_url = server.url();
    let users = vec![node_user(0), node_user(1)];
    let created = {
        let (url, users) = (admin_url.clone(), users.clone());
        tokio::task::spawn_blocking(move || NodeUsers::create(Admin::connect(&url)?, &users))
            .await
            .unwrap()
            .expect("create users")
    };
    let a = RedisStore::connect(&users[0].url(&admin_url)).await.expect("node 0 connects as its user");
    let b = RedisStore::connect(&users[1].url(&admin_url)).await.expect("node 1 connects as its user");

    // Each node's own keys work, the accumulate script included (twice: the second call of a
    // token is not applied).
    a.put("peer0/params/1", b"mine").await.expect("A sets its key");
    assert_eq!(a.get("peer0/params/1").await.expect("A gets its key").as_deref(), Some(&b"mine"[..]));
    assert!(a.accumulate("peer0/grad/1", "t0", 0, &[1.0, 2.0]).await.expect("A accumulates"));
    assert!(!a.accumulate("peer0/grad/1", "t0", 0, &[1.0, 2.0]).await.expect("A accumulates again"));
    assert!(a.accumulate("peer0/warm-up/grad/0", "t0", 1, &[1.0]).await.expect("A's warm-up key"));
    let got = a.read_accumulated("peer0/grad/1").await.expect("A reads its sum");
    assert_eq!(got, Some(Accumulated { sum: vec![1.0, 2.0], count: 1 }));
    b.put("peer1/params/1", b"theirs").await.expect("B sets its key");
    assert!(b.accumulate("peer1/grad/1", "t0", 0, &[5.0, 5.0]).await.expect("B accumulates"));

    // Node A's user on node B's keys: every read and write is refused.
    refused("A reads B's params", a.get("peer1/params/1").await);
    refused("A writes B's params", a.put("peer1/params/1", b"evil").await);
    refused("A accumulates into B's sum", a.accumulate("peer1/grad/1", "evil", 1, &[1e9, 1e9]).await);
    refused("A starts an accumulator of B's", a.accumulate("peer1/grad/2", "evil", 0, &[1.0]).await);
    refused("A reads B's sum", a.read_accumulated("peer1/grad/1").await);
    refused("A deletes B's keys", a.delete(&["peer1/params/1"]).await);
    // A prefix is a whole path segment: node 1 does not reach node 10's keys.
    refused("B writes node 10's key", b.put("peer10/params/1", b"x").await);
    refused("A writes an unprefixed key", a.put("params/1", b"x").await);

    // B's values are untouched.
    assert_eq!(b.get("peer1/params/1").await.expect("B gets").as_deref(), Some(&b"theirs"[..]));
    let got = b.read_accumulated("peer1/grad/1").await.expect("B reads its sum");
    assert_eq!(got, Some(Accumulated { sum: vec![5.0, 5.0], count: 1 }));
    assert_eq!(b.read_accumulated("peer1/grad/2").await.expect("B reads"), None);

    // Commands the store does not send are refused whatever the key.
    let mut raw = redis::Client::open(users[0].url(&admin_url)).unwrap().get_connection().unwrap();
    for cmd in [
        redis::cmd("KEYS").arg("*").clone(),
        redis::cmd("SCAN").arg(0).clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("CONFIG").arg("GET").arg("requirepass").clone(),
        redis::cmd("ACL").arg("LIST").clone(),
        redis::cmd("SCRIPT").arg("FLUSH").clone(),
    ] {
        let r = cmd.query::<redis::Value>(&mut raw);
        assert!(r.as_ref().is_err_and(|e| e.code() == Some("NOPERM")), "{cmd:?} as node 0: {r:?}");
    }

    // The users are gone when the guard drops; their credentials no longer connect.
    let names: Vec<String> = created.names().to_vec();
    tokio::task::spawn_blocking(move || drop(created)).await.unwrap();
    let left = tokio::task::spawn_blocking(move || Admin::connect(&admin_url).unwrap().users().unwrap())
        .await
        .unwrap();
    assert!(names.iter().all(|n| !left.contains(n)), "users left behind: {left:?}");
    assert_eq!(left, ["default"]);
    let r = RedisStore::connect(&users[0].url(&server.url())).await;
    assert!(matches!(r, Err(StoreError::Connect { .. })), "a deleted user still connects: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_password_does_not_open_another_nodes_embedded_store() {
    let (pa, pb) = (random_token(), random_token());
    let a = EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), Some(pa.clone())).unwrap();
    let b = EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), Some(pb.clone())).unwrap();
    let own_b = RedisStore::connect(&b.url()).await.expect("B's password opens B's store");
    own_b.put("peer1/params/1", b"theirs").await.unwrap();
    let own_a = RedisStore::connect(&a.url()).await.expect("A's password opens A's store");
    own_a.put("peer0/params/1", b"mine").await.unwrap();

    // A's password against B's store: refused at AUTH, so nothing can be read or written.
    let with_a_password = format!("redis://:{pa}@{}/", b.addr());
    match RedisStore::connect(&with_a_password).await {
        Err(e @ StoreError::Connect { .. }) => assert!(!e.to_string().contains(&pa), "password leaked: {e}"),
        other => panic!("node A's password opened node B's store: {other:?}"),
    }
    // The raw protocol too: commands after a refused AUTH are refused (NOAUTH).
    let mut raw = redis::Client::open(format!("redis://{}/", b.addr())).unwrap().get_connection().unwrap();
    let auth = redis::cmd("AUTH").arg(&pa).query::<redis::Value>(&mut raw);
    assert!(auth.is_err(), "AUTH with A's password: {auth:?}");
    for cmd in [
        redis::cmd("GET").arg("peer1/params/1").clone(),
        redis::cmd("SET").arg("peer1/params/1").arg("evil").clone(),
    ] {
        let r = cmd.query::<redis::Value>(&mut raw);
        assert!(r.as_ref().is_err_and(|e| e.code() == Some("NOAUTH")), "{cmd:?}: {r:?}");
    }
    assert_eq!(own_b.get("peer1/params/1").await.unwrap().as_deref(), Some(&b"theirs"[..]));

    // An embedded store named as a shared store is recognised: it has no users to make.
    let url = b.url();
    let probed =
        tokio::task::spawn_blocking(move || (Admin::probe(&url), Admin::connect(&url))).await.unwrap();
    assert!(matches!(probed.0, Ok(SharedStore::Embedded)), "{:?}", probed.0);
    let e = probed.1.expect_err("no ACL administrator on an embedded store");
    assert!(e.to_string().contains("embedded store has no ACL users") && !e.to_string().contains(&pb), "{e}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A server without the `ACL` command (as Redis before 6; here a Redis 7 with it renamed away)
/// is refused with an error that names the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_without_acl_users_is_refused_naming_the_version_needed() {
    let Some(server) = RedisServer::start_with(&["--rename-command", "ACL", ""]) else { return };
    let url = server.url();
    let e = tokio::task::spawn_blocking(move || Admin::connect(&url)).await.unwrap().expect_err("no ACL");
    let shown = e.to_string();
    assert!(shown.contains("no ACL users (Redis 6.2 or later is needed"), "{shown}");
}
