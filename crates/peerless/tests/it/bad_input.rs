//! Bad input gets a clear error naming what is wrong, never a panic.

use std::path::Path;

use crate::{peerless, run};

fn fails_with(cmd: &mut std::process::Command, needles: &[&str]) {
    let o = run(cmd);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
}

#[test]
fn unknown_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, "seed = 1\n[train]\nepochs = 2\nbatchsize = 32\n").unwrap();
    fails_with(
        peerless().args(["train", "--config"]).arg(&cfg).arg("--out").arg(tmp.path().join("r")),
        &["batchsize"],
    );
}

#[test]
fn negative_learning_rate_is_refused_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(
        peerless().args(["train", "--lr", "-0.1", "--out"]).arg(tmp.path().join("r")),
        &["optimizer.lr", "-0.1"],
    );
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, "[optimizer]\nkind = \"adam\"\nbeta1 = 1.5\n").unwrap();
    fails_with(peerless().args(["train", "--config"]).arg(&cfg), &["optimizer.beta1"]);
}

fn write_truncated_mnist(dir: &Path) {
    let d = dir.join("mnist");
    std::fs::create_dir_all(&d).unwrap();
    // A header promising 60000 28×28 images, followed by far fewer bytes.
    let mut images = vec![0, 0, 8, 3];
    for v in [60000u32, 28, 28] {
        images.extend(v.to_be_bytes());
    }
    images.extend(vec![0u8; 1000]);
    std::fs::write(d.join("train-images-idx3-ubyte"), &images).unwrap();
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(60000u32.to_be_bytes());
    labels.extend(vec![0u8; 60000]);
    std::fs::write(d.join("train-labels-idx1-ubyte"), &labels).unwrap();
}

#[test]
fn truncated_idx_file_is_reported_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    write_truncated_mnist(tmp.path());
    fails_with(
        peerless()
            .args(["train", "--dataset", "mnist", "--data-dir"])
            .arg(tmp.path())
            .arg("--out")
            .arg(tmp.path().join("r")),
        &["train-images-idx3-ubyte", "peerless data fetch mnist"],
    );
}

#[test]
fn missing_dataset_says_what_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(
        peerless()
            .args(["train", "--dataset", "fashion-mnist", "--data-dir"])
            .arg(tmp.path())
            .arg("--out")
            .arg(tmp.path().join("r")),
        &["peerless data fetch fashion-mnist"],
    );
}

#[test]
fn checkpoint_of_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    assert!(run(peerless().args(["train", "--rounds", "5", "--out"]).arg(&out)).status.success());
    // Point the run's config at another model; its checkpoint no longer fits.
    let cfg = std::fs::read_to_string(out.join("config.toml"))
        .unwrap()
        .replace("arch = \"mlp\"", "arch = \"logreg\"");
    std::fs::write(out.join("config.toml"), cfg).unwrap();
    fails_with(
        peerless().args(["train", "--rounds", "10", "--resume"]).arg(&out),
        &["mlp-64-256-128-10", "logreg-64-10"],
    );
}

#[test]
fn corrupt_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    assert!(run(peerless().args(["train", "--rounds", "5", "--out"]).arg(&out)).status.success());
    let ck = out.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        peerless().args(["train", "--rounds", "10", "--resume"]).arg(&out),
        &["checkpoint", "corrupt"],
    );
}

/// Runs `cmd` to its end, failing the test (and killing the command) if it is still running
/// after `limit`: a launcher that never exits must fail the test, not hang the suite.
fn output_within(cmd: &mut std::process::Command, limit: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn peerless");
    let t = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A cluster whose nodes cannot load their data stops at once, printing the dataset's own
/// error once (not "see the logs"), and its summary records the error.
fn cluster_fails_on_its_data(arch: &str, data_dir: &Path, needles: &[&str]) {
    let out = data_dir.join(format!("run-{arch}"));
    let o = output_within(
        peerless()
            .args(["train", "--arch", arch, "--peers", "3", "--dataset", "mnist", "--data-dir"])
            .arg(data_dir)
            .arg("--out")
            .arg(&out),
        std::time::Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{arch}: expected failure: {err}");
    assert!(err.contains("failed before its first round"), "{arch}: {err}");
    for n in needles {
        assert_eq!(err.matches(n).count(), 1, "{arch}: {n:?} should be printed once: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let s = crate::summary(&out);
    assert_eq!(s["completed"], false, "{s}");
    assert!(s["error"].as_str().is_some_and(|e| e.contains(needles[0])), "{s}");
}

#[test]
fn a_cluster_without_its_dataset_stops_at_once_with_the_dataset_error() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["p2p", "ps"] {
        cluster_fails_on_its_data(arch, tmp.path(), &["MNIST not found", "peerless data fetch mnist"]);
    }
}

#[test]
fn a_cluster_with_a_truncated_idx_file_stops_at_once_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_truncated_mnist(tmp.path());
    for arch in ["p2p", "ps"] {
        cluster_fails_on_its_data(arch, tmp.path(), &["train-images-idx3-ubyte is corrupt"]);
    }
}

#[test]
fn a_data_dir_holding_the_idx_files_directly_is_accepted() {
    let Some(root) = crate::real_data("mnist") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The four files straight in the folder, as Debian's dataset packages lay them out.
    for entry in std::fs::read_dir(root.join("mnist")).unwrap() {
        let p = entry.unwrap().path();
        std::os::unix::fs::symlink(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let o = run(peerless().args(["data", "verify", "mnist", "--data-dir"]).arg(tmp.path()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(peerless()
        .args(["train", "--dataset", "mnist", "--rounds", "20", "--data-dir"])
        .arg(tmp.path())
        .arg("--out")
        .arg(tmp.path().join("run")));
    assert!(o.status.success());
    // Fashion-MNIST's name on MNIST's files: the error says whose files they are.
    fails_with(
        peerless()
            .args(["train", "--dataset", "fashion-mnist", "--rounds", "20", "--data-dir"])
            .arg(tmp.path())
            .arg("--out")
            .arg(tmp.path().join("run2")),
        &["this is MNIST's file, not Fashion-MNIST's: pass --dataset mnist"],
    );
}

#[test]
fn an_experiment_reports_a_broken_run_as_failed_with_its_error_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let scenarios = tmp.path().join("scenarios");
    std::fs::create_dir_all(&scenarios).unwrap();
    let scenario = |name: &str, dataset: &str| {
        let text = format!(
            "description = \"test\"\ntarget_accuracy = 0.5\ntimeout_s = 300\n[run]\ndata.dataset = \"{dataset}\"\n\
             train.rounds = 20\ncluster.nodes = 2\ncluster.functions_per_node = 1\n"
        );
        std::fs::write(scenarios.join(format!("{name}.toml")), text).unwrap();
    };
    // "a-broken" runs first: its nodes find no MNIST in the empty data directory.
    scenario("a-broken", "mnist");
    scenario("b-fine", "digits");
    let empty = tmp.path().join("no-data");
    std::fs::create_dir_all(&empty).unwrap();
    let out = tmp.path().join("exp");
    let o = output_within(
        peerless()
            .arg("experiment")
            .arg(&scenarios)
            .args(["--arch", "p2p", "--data-dir"])
            .arg(&empty)
            .arg("--out")
            .arg(&out),
        std::time::Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "a failed run makes the experiment fail: {stdout}");
    assert!(stdout.contains("1 run, 0 already done, 1 failed"), "{stdout}");
    assert!(stdout.contains("a-broken") && stdout.contains("MNIST not found"), "{stdout}");
    let fine = crate::summary(&out.join("b-fine/p2p/seed-1"));
    assert_eq!(fine["completed"], true, "the matrix went on after the broken run: {fine}");
}
