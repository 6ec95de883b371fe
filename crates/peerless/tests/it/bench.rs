//! `peerless bench step` and `bench p2p --against ddp`: every contender of the build against the
//! reference, in one run, and what they print when the reference (PyTorch) is missing; `bench
//! invoke --memory-sizes`: the gradient function at Lambda memory sizes, in cgroups it removes.

use crate::{peerless, run};

#[test]
fn bench_step_measures_every_backend_and_names_the_missing_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("step.json");
    let o = run(peerless()
        .args(["bench", "step", "--steps", "10", "--passes", "2", "--python", "/nonexistent/python3"])
        .env("PEERLESS_PYTHON", "/nonexistent/python3")
        .env("PATH", "/nonexistent")
        .arg("--json")
        .arg(&json));
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("default/flex") || out.contains("default/ndarray"), "{out}");
    assert!(out.contains("PyTorch: no PyTorch reference"), "{out}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "ndarray and flex: {r}");
    assert_eq!(rows.iter().filter(|x| x["default"] == true).count(), 1, "one default: {r}");
    for row in rows {
        assert_eq!(row["passes"].as_array().unwrap().len(), 2, "{row}");
        assert!(row["steps_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[test]
fn bench_p2p_against_ddp_without_torch_says_so_and_prints_the_peerless_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("versus.json");
    let o = run(peerless()
        .args(["bench", "p2p", "--against", "ddp", "--python", "/nonexistent/python"])
        .args(["--rounds", "5", "--passes", "1", "--dataset", "digits"])
        .env("PEERLESS_PYTHON", "/nonexistent/python3")
        .env("PATH", "/nonexistent")
        .arg("--out")
        .arg(tmp.path().join("runs"))
        .arg("--json")
        .arg(&json));
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("PyTorch DDP: no PyTorch reference"), "{out}");
    assert!(out.contains("summary: DDP not measured"), "{out}");
    for variant in ["serverful", "serverless"] {
        assert_eq!(out.lines().filter(|l| l.split_whitespace().nth(1) == Some(variant)).count(), 3, "{out}");
    }
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["functions_per_peer"], 1, "{r}");
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|x| x["world"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 4], "{r}");
    for row in rows {
        assert!(row["ddp"].is_null() && row["serverful_ratio"].is_null(), "{row}");
        for variant in ["serverful", "serverless"] {
            assert!(row[variant]["steady_samples_per_s"].as_f64().unwrap() > 0.0, "{row}");
        }
    }
    assert_eq!(r["runs"].as_array().unwrap().len(), 3, "one pass × three world sizes: {r}");
}

#[test]
fn bench_p2p_python_needs_against() {
    let o = peerless().args(["bench", "p2p", "--python", "python3"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--against"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Whether this test process may create cgroups (root with a CPU controller mounted).
fn can_make_cgroups() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
    let cpu = std::path::Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").is_ok_and(|c| c.contains("cpu"));
    root && cpu
}

fn bench_cgroups_left() -> Vec<String> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu"]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("peerless-bench-"))
        .collect()
}

#[test]
fn bench_invoke_memory_sizes_measures_each_size_at_its_cpu_share_and_removes_its_cgroups() {
    let o = peerless().args(["bench", "invoke", "--memory-sizes", "64,1769", "--n", "2"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("64 MB is not a Lambda memory size"), "{err}");
    if !can_make_cgroups() {
        eprintln!("SKIPPED: needs root and a cgroup CPU controller");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("sizes.json");
    let o = run(peerless()
        .args(["bench", "invoke", "--memory-sizes", "128,1769", "--n", "5", "--json"])
        .arg(&json));
    assert!(o.status.success());
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["memory_mb"].as_u64().unwrap()).collect::<Vec<_>>(), [128, 1769]);
    for r in rows {
        assert_eq!(r["failed"], 0, "{r}");
        assert!(r["max_memory_mb"].as_u64().unwrap() > 0, "{r}");
        assert!(r["billed_p50_ms"].as_f64().unwrap() >= 1.0, "{r}");
    }
    assert!((rows[0]["cpu_share"].as_f64().unwrap() - 128.0 / 1769.0).abs() < 1e-9);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("vs 1769 MB"), "{out}");
    assert!(bench_cgroups_left().is_empty(), "{:?}", bench_cgroups_left());
}
