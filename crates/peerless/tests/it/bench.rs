//! `peerless bench step`: every backend of the build against the reference, in one run.

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
