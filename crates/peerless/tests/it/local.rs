//! Local training: the run directory is complete and the accuracy targets are met.

use crate::{peerless, real_data, run, summary};

#[test]
fn digits_run_writes_config_metrics_events_summary_and_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o =
        run(peerless().args(["train", "--arch", "local", "--epochs", "8", "--seed", "3", "--out"]).arg(&out));
    assert!(o.status.success());
    let s = summary(&out);
    assert_eq!(s["completed"], true);
    assert_eq!(s["seed"], 3);
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "embedded digits should train to >= 90 %, got {acc}");
    // The printed summary carries the same figures as summary.json.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(&format!("{:.2} %", acc * 100.0)), "{stdout}");
    assert!(stdout.contains(s["param_digest"].as_str().unwrap()), "{stdout}");
    // Effective config, replayable: seed and dataset written out.
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("seed = 3") && cfg.contains("dataset = \"digits\""), "{cfg}");
    // One metrics row per round after the header.
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rounds = s["rounds"].as_u64().unwrap() as usize;
    assert_eq!(metrics.lines().count(), rounds + 1);
    assert!(metrics.starts_with("round,epoch,wall_s,train_loss"));
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    for kind in ["\"start\"", "\"eval\"", "\"checkpoint\"", "\"finish\""] {
        assert!(events.contains(kind), "events.jsonl lacks {kind}: {events}");
    }
    assert!(out.join("checkpoint.safetensors").is_file());
    // The same config replays to the same parameters.
    let replay = tmp.path().join("replay");
    let o =
        run(peerless().args(["train", "--config"]).arg(out.join("config.toml")).arg("--out").arg(&replay));
    assert!(o.status.success());
    assert_eq!(summary(&replay)["param_digest"], s["param_digest"]);
}

#[test]
fn an_existing_run_directory_is_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert!(run(peerless().args(["train", "--rounds", "3", "--out"]).arg(&out)).status.success());
    let o = run(peerless().args(["train", "--rounds", "3", "--out"]).arg(&out));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn lenet_and_logreg_train_on_digits() {
    for model in ["lenet", "logreg"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(model);
        let o = run(peerless().args(["train", "--model", model, "--epochs", "15", "--out"]).arg(&out));
        assert!(o.status.success(), "{model}");
        let acc = summary(&out)["test_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.85, "{model} reached only {acc}");
    }
}

#[test]
fn mlp_on_mnist_reaches_97_5_percent_in_3_epochs() {
    let Some(data) = real_data("mnist") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mnist");
    let o = run(peerless()
        .args([
            "train",
            "--arch",
            "local",
            "--model",
            "mlp",
            "--dataset",
            "mnist",
            "--epochs",
            "3",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&out));
    assert!(o.status.success());
    let acc = summary(&out)["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.975, "MNIST MLP 3 epochs: {acc}");
}

#[test]
fn mlp_on_fashion_mnist_reaches_87_percent() {
    let Some(data) = real_data("fashion-mnist") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fashion");
    let o = run(peerless()
        .args(["train", "--model", "mlp", "--dataset", "fashion-mnist", "--epochs", "5", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&out));
    assert!(o.status.success());
    let acc = summary(&out)["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.87, "Fashion-MNIST MLP: {acc}");
}
