//! Byzantine nodes injected by scenarios (`kind = "byzantine"`), on real processes: the
//! attackers' own processes send attacked gradients; honest nodes refuse what is malformed or
//! stale before aggregation, and a robust rule limits what is well-formed.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::faults::train;
use crate::summary;

/// A digits scenario with `nodes` nodes × 1 function, `rounds` rounds, aggregation `rule`,
/// and the given `(node, attack, from_round)` attackers.
fn scenario(dir: &Path, name: &str, nodes: u32, rule: &str, attackers: &[(u32, &str, u64)]) -> PathBuf {
    let mut text = format!(
        "description = \"test\"\ntarget_accuracy = 0.5\n[run]\ndata.dataset = \"digits\"\n\
         train.rounds = 100\ntrain.checkpoint_every = 0\ncluster.nodes = {nodes}\ncluster.functions_per_node = 1\n\
         cluster.aggregator = \"{rule}\"\noptimizer = {{ kind = \"sgd\", lr = 0.05, momentum = 0.9 }}\n"
    );
    for (node, attack, from) in attackers {
        text.push_str(&format!(
            "[[fault]]\nkind = \"byzantine\"\ntargets = [\"node:{node}\"]\nat_round = {from}\nattack = \"{attack}\"\n"
        ));
    }
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn count(ev: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    ev.iter().filter(|e| pred(e)).count()
}

/// `(peer, round, contributors)` of every metrics row with a contributor count.
fn contributors(out: &Path) -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| head.iter().position(|h| *h == n).unwrap();
    let (p, r, c) = (col("peer"), col("round"), col("contributors"));
    lines
        .filter_map(|l| {
            let v: Vec<&str> = l.split(',').collect();
            Some((v[p].parse().ok()?, v[r].parse().ok()?, v[c].parse().ok()?))
        })
        .collect()
}

#[test]
fn a_sign_flipping_peer_wrecks_the_mean_but_not_krum() {
    let tmp = tempfile::tempdir().unwrap();
    let mut acc = Vec::new();
    for rule in ["mean", "krum"] {
        let f = scenario(tmp.path(), &format!("flip-{rule}"), 5, rule, &[(4, "sign-flip", 0)]);
        let out = tmp.path().join(rule);
        let ev = train(&f, "p2p", &out);
        let inj = ev
            .iter()
            .find(|e| e["event"] == "fault_injected" && e["fault"] == "byzantine")
            .expect("the attack is recorded");
        assert_eq!(
            (inj["attack"].as_str(), &inj["targets"]),
            (Some("sign-flip"), &serde_json::json!(["peer 4"]))
        );
        assert_eq!(
            count(&ev, |e| e["event"] == "attacking" && e["peer"] == 4),
            1,
            "the attacker announced itself"
        );
        let s = summary(&out);
        // Well-formed attacked gradients: every replica, the attacker's too, applied the same.
        assert_eq!(s["replicas_agree"], true, "{s}");
        assert_eq!(s["completed"].as_bool(), Some(rule == "krum"), "{s}");
        acc.push((s["test_accuracy"].as_f64().unwrap(), s["diverged"].as_bool().unwrap()));
        // Each round's row says how many Byzantine inputs the rule tolerated: Krum f = 1 with
        // all 5 gradients (n ≥ 2f+3), 0 below that; the mean none.
        let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
        let head: Vec<&str> = text.lines().next().unwrap().split(',').collect();
        let col = |n: &str| head.iter().position(|h| *h == n).unwrap();
        let (c, f) = (col("contributors"), col("effective_f"));
        for row in text.lines().skip(1) {
            let v: Vec<&str> = row.split(',').collect();
            let want = if rule == "krum" && v[c] == "5" { "1" } else { "0" };
            assert_eq!(v[f], want, "{rule}: {row}");
        }
    }
    // The mean steps along −1.2 × the honest gradient: the model diverges, and the run ends
    // with that outcome instead of failing.
    assert!(acc[0].1 && acc[0].0 < 0.5, "mean under a ×−10 attacker: {:?}", acc[0]);
    let acc: Vec<f64> = acc.iter().map(|a| a.0).collect();
    assert!(acc[1] > 0.85, "krum under one attacker of five reached only {:.3}", acc[1]);
}

#[test]
fn malformed_gradients_never_reach_aggregation_and_the_honest_peers_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(tmp.path(), "malformed", 5, "mean", &[(3, "nan", 5), (4, "wrong-length", 5)]);
    let out = tmp.path().join("run");
    let ev = train(&f, "p2p", &out);
    for p in [3, 4] {
        let rejected =
            count(&ev, |e| e["event"] == "rejected" && e["from"] == p && e["peer"].as_u64() < Some(3));
        assert!(rejected >= 10, "peer {p}'s gradients were rejected only {rejected} times");
    }
    let why = |needle: &str| {
        ev.iter().any(|e| e["event"] == "rejected" && e["error"].as_str().is_some_and(|s| s.contains(needle)))
    };
    assert!(why("NaN") || why("inf") || why("finite"), "a rejection names the non-finite value");
    assert!(why("values, the model has"), "a rejection names the wrong length");
    // After the attack started, no honest round had more than the three honest contributors.
    let rows = contributors(&out);
    let attacked: Vec<_> = rows.iter().filter(|(p, r, _)| *p < 3 && *r > 6).collect();
    assert!(attacked.len() > 200, "{} honest rows", attacked.len());
    assert!(attacked.iter().all(|(_, _, c)| *c <= 3), "an attacked gradient was aggregated: {attacked:?}");
    let s = summary(&out);
    crate::assert_completed_and_agreed(&s);
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.85, "{s}");
}

#[test]
fn the_ps_refuses_replayed_and_malformed_pushes_and_its_median_absorbs_a_sign_flip() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(tmp.path(), "ps", 5, "median", &[(1, "replay", 5), (2, "nan", 5), (4, "sign-flip", 5)]);
    let out = tmp.path().join("run");
    let ev = train(&f, "ps", &out);
    assert_eq!(count(&ev, |e| e["event"] == "fault_injected" && e["fault"] == "byzantine"), 3);
    let late = count(&ev, |e| e["event"] == "late_gradient" && e["peer"] == 1);
    assert!(late >= 10, "only {late} replays were dropped as stale");
    assert!(count(&ev, |e| e["event"] == "rejected" && e["from"] == 2) >= 10);
    // Only workers 0, 3 and 4 push valid gradients of the current version; the median of the
    // three keeps the sign-flipped one out.
    let ps: Vec<_> = contributors(&out).into_iter().filter(|(p, r, _)| *p == 5 && *r > 6).collect();
    assert!(ps.len() > 80 && ps.iter().all(|(_, _, c)| *c <= 3), "{ps:?}");
    let s = summary(&out);
    assert_eq!(s["completed"], true, "{s}");
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.85, "{s}");
}

/// A store client holding the cluster secret (any member) writes into an honest peer's
/// accumulators: NaN before rounds 3–5, and an extra finite contribution at round 8. The
/// peers refuse those sums and redo the rounds in fetch mode, so they train the model a clean
/// run trains, bit for bit (two gradients per peer: a + b is the same float sum anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_in_store_sum_is_refused_and_the_round_redone_from_checked_gradients() {
    use peerless_ml::{Arch, ModelSpec};
    use peerless_runtime::store::embedded::EmbeddedServer;
    use peerless_runtime::store::{RedisStore, Store};

    let tmp = tempfile::tempdir().unwrap();
    let server =
        EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), Some("cluster-secret".into())).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let split = peerless_ml::data::load(peerless_ml::DatasetName::Digits, Path::new("/unused")).unwrap();
    let n = ModelSpec::new(Arch::Mlp, split.train.shape, split.train.classes).layout().unwrap().len();
    for peer in 0..2 {
        for round in 3..6 {
            store
                .accumulate(&format!("peer{peer}/grad/{round}"), "hostile", 999, &vec![f32::NAN; n])
                .await
                .unwrap();
        }
        store.accumulate(&format!("peer{peer}/grad/8"), "hostile", 999, &vec![1.0; n]).await.unwrap();
    }
    let args = ["--peers", "2", "--functions-per-peer", "2", "--rounds", "16", "--lr", "0.05", "--seed", "5"];
    let mut digests = Vec::new();
    for (name, store) in [("poisoned", server.url()), ("clean", "embedded".to_string())] {
        let config = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&config, crate::CALM.replace("[p2p]", &format!("store = \"{store}\"\n[p2p]")))
            .unwrap();
        let out = tmp.path().join(name);
        let mut cmd = crate::peerless();
        cmd.args(["train", "--arch", "p2p", "--config"]).arg(&config).args(args).arg("--out").arg(&out);
        let o = tokio::task::spawn_blocking(move || crate::run(&mut cmd)).await.unwrap();
        assert!(o.status.success(), "{name} run failed");
        let s = summary(&out);
        crate::assert_completed_and_agreed(&s);
        digests.push(s["param_digests"][0][1].as_str().unwrap().to_owned());
        if name == "poisoned" {
            for peer in 0..2 {
                let log = std::fs::read_to_string(out.join(format!("peers/{peer}/peer.log"))).unwrap();
                for round in 3..6 {
                    let refused = format!("in-store sum at peer{peer}/grad/{round} refused");
                    assert!(log.contains(&refused), "peer {peer}: no `{refused}` in its log");
                }
                assert!(
                    log.contains(&format!(
                        "in-store sum at peer{peer}/grad/8 refused: 3 contributions for 2 batches"
                    )),
                    "peer {peer}: the extra contribution at round 8 was not refused"
                );
            }
        }
    }
    assert_eq!(digests[0], digests[1], "the refused sums changed the model");
}
