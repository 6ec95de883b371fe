//! The store suite, run against both backends: the embedded store and a real `redis-server`.

use std::future::Future;
use std::time::{Duration, Instant};

use peerless_runtime::store::{EmbeddedServer, RedisStore, ServerKind, Store, StoreError};

use crate::{RedisServer, random_token};

/// Deterministic pseudo-random bytes (64-bit LCG), so corruption anywhere is caught.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Deterministic non-integer floats in about [-1, 1).
fn floats(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The backend-independent suite. `connect` opens a new, independent connection each call.
async fn suite<S, F, Fut>(connect: F)
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let s = connect().await;

    // put / get / delete.
    assert_eq!(s.get("missing").await.expect("get missing"), None);
    s.put("k", b"hello").await.expect("put");
    assert_eq!(s.get("k").await.expect("get").as_deref(), Some(&b"hello"[..]));
    s.put("k", b"").await.expect("overwrite with empty");
    assert_eq!(s.get("k").await.expect("get empty").as_deref(), Some(&b""[..]));
    s.delete(&["k", "never-existed"]).await.expect("delete");
    s.delete(&[]).await.expect("delete nothing");
    assert_eq!(s.get("k").await.expect("get deleted"), None);

    for (key, len) in [("one-mb", 1 << 20), ("forty-mb", 40 * 1000 * 1000)] {
        let value = pattern(len, len as u64);
        s.put(key, &value).await.expect("put large");
        let back = s.get(key).await.expect("get large").expect("present");
        assert!(back == value, "{key}: {} bytes back, content differs", back.len());
        s.delete(&[key]).await.expect("delete large");
        assert_eq!(s.get(key).await.expect("get deleted large"), None);
    }

    // accumulate: create, add, duplicate, wrong length.
    assert_eq!(s.read_accumulated("acc").await.expect("read none"), None);
    assert!(s.accumulate("acc", "t0", 0, &[1.0, 2.0, 3.0]).await.expect("first"));
    let a = s.read_accumulated("acc").await.expect("read").expect("some");
    assert_eq!((a.sum.as_slice(), a.count), (&[1.0, 2.0, 3.0][..], 1));
    assert!(s.accumulate("acc", "t1", 1, &[10.0, 20.0, 30.0]).await.expect("second"));
    assert!(!s.accumulate("acc", "t0", 0, &[100.0, 100.0, 100.0]).await.expect("duplicate"));
    let a = s.read_accumulated("acc").await.expect("read").expect("some");
    assert_eq!((a.sum.as_slice(), a.count), (&[11.0, 22.0, 33.0][..], 2));
    match s.accumulate("acc", "t2", 2, &[1.0, 2.0]).await {
        Err(StoreError::BadValue { key, .. }) => assert_eq!(key, "acc"),
        other => panic!("wrong length must be refused with BadValue, got {other:?}"),
    }
    let a = s.read_accumulated("acc").await.expect("read").expect("some");
    assert_eq!((a.sum.as_slice(), a.count), (&[11.0, 22.0, 33.0][..], 2), "refused call changed nothing");
    // The refused call recorded no token.
    assert!(s.accumulate("acc", "t2", 2, &[0.5, 0.5, 0.5]).await.expect("t2 after refusal"));
    assert_eq!(s.read_accumulated("acc").await.expect("read").expect("some").count, 3);
    // delete clears the sum, the count and the tokens.
    s.delete(&["acc"]).await.expect("delete acc");
    assert_eq!(s.read_accumulated("acc").await.expect("read deleted"), None);
    assert!(s.accumulate("acc", "t0", 0, &[1.0]).await.expect("t0 after delete"));
    assert_eq!(s.read_accumulated("acc").await.expect("read").expect("some").count, 1);
    s.delete(&["acc"]).await.expect("delete acc");

    // A plain value is not an accumulator.
    s.put("plain", b"abcd").await.expect("put plain");
    assert!(matches!(s.read_accumulated("plain").await, Err(StoreError::BadValue { .. })));
    s.delete(&["plain"]).await.expect("delete plain");

    // A model-sized vector of non-integer floats: the sum is bit-identical to f32 addition in
    // the same order (on Redis, Lua adds in f64 and rounds once to f32).
    let n = 235_146;
    let mut expected = vec![0.0f32; n];
    for i in 0..3u64 {
        let g = floats(n, i + 1);
        assert!(s.accumulate("big", &format!("b{i}"), i as u32, &g).await.expect("accumulate big"));
        if i == 0 {
            expected = g;
        } else {
            expected.iter_mut().zip(&g).for_each(|(e, x)| *e += x);
        }
    }
    let a = s.read_accumulated("big").await.expect("read big").expect("some");
    assert_eq!(a.count, 3);
    assert!(bits(&a.sum) == bits(&expected), "big sum differs from sequential f32 addition");
    s.delete(&["big"]).await.expect("delete big");

    // Out of order: slots 2, 0, 3, 1 give ((v0 + v1) + v2) + v3, the sum in slot order.
    let vs: Vec<Vec<f32>> = (0..4u64).map(|i| floats(n, 10 + i)).collect();
    let mut ordered = vs[0].clone();
    for v in &vs[1..] {
        ordered.iter_mut().zip(v).for_each(|(e, x)| *e += x);
    }
    for j in [2usize, 0, 3, 1] {
        assert!(s.accumulate("ord", &format!("o{j}"), j as u32, &vs[j]).await.expect("accumulate ord"));
    }
    assert!(s.accumulate("ord", "other", 3, &vs[3]).await.is_err(), "a filled slot is refused");
    let a = s.read_accumulated("ord").await.expect("read ord").expect("some");
    assert_eq!(a.count, 4);
    assert!(bits(&a.sum) == bits(&ordered), "out-of-order sum differs from the sum in slot order");
    s.delete(&["ord"]).await.expect("delete ord");

    // 32 tasks on 32 connections add into one key at once; each also races a duplicate of its
    // own token. Small integers, so the order of additions cannot change the sum.
    const TASKS: usize = 32;
    const LEN: usize = 10_000;
    let mut conns = Vec::with_capacity(TASKS);
    for _ in 0..TASKS {
        conns.push(connect().await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let g: Vec<f32> = (0..LEN).map(|j| (i + j % 7) as f32).collect();
            let token = format!("task-{i}");
            let (a, b) = tokio::join!(
                c.accumulate("conc", &token, i as u32, &g),
                c.accumulate("conc", &token, i as u32, &g)
            );
            u32::from(a.expect("accumulate")) + u32::from(b.expect("accumulate duplicate"))
        });
    }
    let mut applied = 0;
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.expect("task"), 1, "exactly one of a token's two calls applies");
        applied += 1;
    }
    assert_eq!(applied, TASKS);
    let a = s.read_accumulated("conc").await.expect("read conc").expect("some");
    assert_eq!(a.count, TASKS as u64);
    let want: Vec<f32> = (0..LEN).map(|j| (496 + 32 * (j % 7)) as f32).collect();
    assert!(a.sum == want, "concurrent sum wrong");
    s.delete(&["conc"]).await.expect("delete conc");
}

/// Connecting without the password, or with a wrong one, fails — and never shows the password.
async fn auth_refused(port: u16) {
    let url = format!("redis://127.0.0.1:{port}/");
    match RedisStore::connect(&url).await {
        Err(e @ StoreError::Connect { .. }) => assert!(e.to_string().contains("authentication"), "{e}"),
        other => panic!("unauthenticated connect must fail, got {other:?}"),
    }
    let wrong = random_token();
    match RedisStore::connect(&format!("redis://:{wrong}@127.0.0.1:{port}/")).await {
        Err(e @ StoreError::Connect { .. }) => {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(&wrong), "password leaked: {shown}");
            assert!(shown.contains(":***@"), "URL shown elided: {shown}");
        }
        other => panic!("wrong password must fail, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend() {
    let password = random_token();
    let server =
        EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), Some(password.clone())).expect("spawn");
    let url = server.url();
    assert_eq!(url, format!("redis://:{password}@{}/", server.addr()));
    let s = RedisStore::connect(&url).await.expect("connect");
    assert_eq!(s.backend(), ServerKind::Embedded);
    assert!(!format!("{s:?}").contains(&password));
    suite(|| async { RedisStore::connect(&url).await.expect("connect") }).await;
    auth_refused(server.addr().port()).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_backend_without_password() {
    let server = EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), None).expect("spawn");
    assert_eq!(server.url(), format!("redis://{}/", server.addr()));
    let s = RedisStore::connect(&server.url()).await.expect("connect");
    assert_eq!(s.backend(), ServerKind::Embedded);
    s.put("k", b"v").await.expect("put");
    assert_eq!(s.get("k").await.expect("get").as_deref(), Some(&b"v"[..]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend() {
    let Some(server) = RedisServer::start() else { return };
    let url = server.url();
    let s = RedisStore::connect(&url).await.expect("connect");
    assert_eq!(s.backend(), ServerKind::Redis);
    suite(|| async { RedisStore::connect(&url).await.expect("connect") }).await;
    auth_refused(server.port()).await;
}

#[tokio::test]
async fn connect_to_nothing_fails_quickly() {
    let port = crate::free_loopback_port();
    let started = Instant::now();
    let r = RedisStore::connect(&format!("redis://:pw@127.0.0.1:{port}/")).await;
    assert!(matches!(r, Err(StoreError::Connect { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
}

/// Mean time of `n` runs of `f`.
async fn time<F: AsyncFnMut()>(n: u32, mut f: F) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        f().await;
    }
    start.elapsed() / n
}

async fn measure(name: &str, s: &RedisStore) {
    for len in [1usize << 20, 40 * 1000 * 1000] {
        let value = pattern(len, 7);
        let put = time(5, async || s.put("m", &value).await.expect("put")).await;
        let get = time(5, async || {
            s.get("m").await.expect("get").expect("present");
        })
        .await;
        println!("{name}: {len} B  put {put:?}  get {get:?}");
        s.delete(&["m"]).await.expect("delete");
    }
    let g = floats(235_146, 3);
    let mut i = 0u32;
    let first = time(1, async || {
        s.accumulate("macc", "first", 0, &g).await.expect("accumulate");
    })
    .await;
    let add = time(10, async || {
        i += 1;
        s.accumulate("macc", &format!("t{i}"), i, &g).await.expect("accumulate");
    })
    .await;
    let read = time(5, async || {
        s.read_accumulated("macc").await.expect("read").expect("some");
    })
    .await;
    println!("{name}: accumulate 235146 f32  first (store) {first:?}  add {add:?}  read {read:?}");
    s.delete(&["macc"]).await.expect("delete");
}

/// Timings for the report: `cargo test --workspace --tests -- --ignored --nocapture measure_store_timings`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a test"]
async fn measure_store_timings() {
    let server =
        EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), Some(random_token())).expect("spawn");
    let s = RedisStore::connect(&server.url()).await.expect("connect");
    measure("embedded", &s).await;
    server.shutdown().await;
    if let Some(redis) = RedisServer::start() {
        let s = RedisStore::connect(&redis.url()).await.expect("connect");
        measure("redis", &s).await;
    }
}
