//! Compressed exchanges (`p2p.compression`): int8, int4 and top-k with error feedback send a
//! fraction of the bytes, keep replicas identical, give the PS the same model as P2P, and a
//! peer killed and restarted (its residual resumed from its checkpoint) still ends with the
//! others' model.

use std::path::Path;

use crate::{assert_completed_and_agreed, peerless, run, summary};

/// Trains digits (3 nodes × 2 functions, 30 rounds) with `compression`; returns the final
/// digest and the bytes the nodes sent.
fn compressed(arch: &str, compression: &str, out: &Path) -> (String, u64) {
    let o = run(peerless()
        .args(["train", "--arch", arch, "--compression", compression, "--peers", "3"])
        .args(["--functions-per-peer", "2", "--rounds", "30", "--lr", "0.05", "--seed", "4", "--config"])
        .arg(out.with_extension("toml"))
        .arg("--out")
        .arg(out));
    assert!(o.status.success(), "{arch} with {compression} failed");
    let s = summary(out);
    if arch == "ps" {
        let ps = summary(&out.join("ps"));
        return (ps["param_digest"].as_str().unwrap().to_owned(), 0);
    }
    assert_completed_and_agreed(&s);
    let sent = s["per_peer"].as_array().unwrap().iter().map(|p| p["bytes_out"].as_u64().unwrap()).sum();
    (s["param_digests"][0][1].as_str().unwrap().to_owned(), sent)
}

#[test]
fn int8_int4_and_top_k_send_a_fraction_of_the_bytes_and_p2p_equals_the_ps() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sent = Vec::new();
    for c in ["none", "int8", "int4", "topk"] {
        let out = tmp.path().join(c);
        std::fs::write(out.with_extension("toml"), format!("{}topk_fraction = 0.05\n", crate::CALM)).unwrap();
        let (p2p, bytes) = compressed("p2p", c, &out);
        let ps_out = tmp.path().join(format!("{c}-ps"));
        std::fs::copy(out.with_extension("toml"), ps_out.with_extension("toml")).unwrap();
        let (ps, _) = compressed("ps", c, &ps_out);
        assert_eq!(p2p, ps, "{c}: P2P and PS differ");
        sent.push((c, p2p, bytes));
    }
    let [(_, dense, d), (_, int8, i), (_, int4, i4), (_, topk, t)] = &sent[..] else { unreachable!() };
    let digests = [dense, int8, int4, topk];
    assert!(digests.iter().enumerate().all(|(k, a)| digests[k + 1..].iter().all(|b| a != b)), "{sent:?}");
    // The MLP on digits has 2,410 parameters: a gradient message is ~9.7 KB dense, ~2.5 KB
    // as int8, ~1.3 KB as int4 and ~1 KB as 5 % top-k; acknowledgements and lists are the
    // same in all four.
    assert!(i * 2 < *d, "int8 sent {i} bytes, dense {d}");
    assert!(i4 < i, "int4 sent {i4} bytes, int8 {i}");
    assert!(t * 3 < *d, "top-k sent {t} bytes, dense {d}");
}

#[test]
fn a_compressing_peer_killed_and_restarted_ends_with_the_others_model() {
    crate::faults::a_killed_peer_rejoins("p2p.compression = \"topk\"\np2p.topk_fraction = 0.05\n", 600, 40);
}
