//! `peerless report` on an experiment directory made of real P2P and PS runs.

use std::path::Path;

use crate::{peerless, run, summary};

/// The report's number format for a single run: about four significant digits.
fn single(v: f64) -> String {
    let d = (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
    format!("{v:.d$} (n=1)")
}

fn train(arch: &str, out: &Path) -> serde_json::Value {
    let o = run(peerless()
        .args(["train", "--arch", arch, "--peers", "2", "--functions-per-peer", "1"])
        .args(["--rounds", "60", "--lr", "0.05", "--eval-every", "20", "--seed", "1", "--out"])
        .arg(out));
    assert!(o.status.success(), "peerless train --arch {arch} failed");
    summary(out)
}

#[test]
fn report_holds_the_runs_numbers_and_writes_png_and_svg_charts() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path();
    let p2p = train("p2p", &exp.join("no-faults/p2p/seed-1"));
    let ps = train("ps", &exp.join("no-faults/ps/seed-1"));
    // Seed 2 was started but never finished: a run directory without summary.json.
    std::fs::create_dir_all(exp.join("no-faults/p2p/seed-2")).unwrap();
    let experiment = serde_json::json!({
        "scenarios": [{"name": "no-faults", "description": "Two peers, no fault.", "target_accuracy": 0.5,
                       "file": "scenarios/no-faults.toml"}],
        "archs": ["p2p", "ps"], "seeds": [1, 2], "command": "peerless experiment scenarios/no-faults.toml",
    });
    std::fs::write(exp.join("experiment.json"), experiment.to_string()).unwrap();

    let o = run(peerless().arg("report").arg(exp));
    assert!(o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(&exp.join("report.md").display().to_string()), "{stdout}");
    assert!(stdout.contains("2 found, 2 missing"), "{stdout}");

    let md = std::fs::read_to_string(exp.join("report.md")).unwrap();
    let row = |name: &str| md.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_default();
    let f = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap();
    let expect = |name: &str, get: &dyn Fn(&serde_json::Value) -> String| {
        assert_eq!(row(name), format!("| {name} | {} | {} |", get(&p2p), get(&ps)), "{md}");
    };
    expect("Final test accuracy (%)", &|s| single(f(s, "test_accuracy") * 100.0));
    expect("Wall time (s)", &|s| single(f(s, "wall_time_s")));
    expect("Cost ($)", &|s| single(f(s, "total_cost_usd")));
    expect("Function invocations", &|s| format!("{} (n=1)", s["invocations"]));
    expect("Cold starts", &|s| format!("{} (n=1)", s["cold_starts"]));
    expect("Recovery time (s)", &|_| "no fault".into());
    assert!(md.contains("peerless experiment scenarios/no-faults.toml"), "{md}");
    assert!(md.contains("`no-faults/p2p/seed-2`"), "{md}");
    assert!(
        md.contains("## Serverless vs serverful P2P") && md.contains("cluster.compute = \"local\""),
        "{md}"
    );

    // The charts need DejaVu Sans (fonts-dejavu-core); without it the report says so and keeps
    // its tables. `.ci/run` installs the font and requires the charts.
    let font = std::path::Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists();
    if !font && std::env::var("PEERLESS_REQUIRE_FONT").as_deref() != Ok("1") {
        assert!(stdout.contains("charts       none: the charts need the font"), "{stdout}");
        eprintln!("SKIPPED: the report's charts (no DejaVu Sans; apt-get install fonts-dejavu-core)");
        return;
    }
    for what in ["accuracy", "loss"] {
        assert!(md.contains(&format!("(report/no-faults-{what}.png)")), "{md}");
        let png = std::fs::read(exp.join(format!("report/no-faults-{what}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "{what}.png is no PNG");
        let svg = std::fs::read_to_string(exp.join(format!("report/no-faults-{what}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{what}.svg is no SVG");
        assert!(svg.contains("P2P") && svg.contains("PS"), "{what}.svg lacks its legend");
    }
}

#[test]
fn report_on_a_directory_without_experiment_json_fails_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(peerless().arg("report").arg(tmp.path()));
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("experiment.json"), "{stderr}");
}
