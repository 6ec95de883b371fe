//! The text of `report.md`: header, summary table, per-scenario detail, the two comparison
//! sections and the definitions of every measure.

use peerless_core::cost::RightSizing;
use std::fmt::Write as _;

use super::run::{Figures, Run};
use super::stats::{self, Estimate};
use super::{ChartFiles, Experiment, ScenarioRuns, goodput};

/// Published reference: serverless P2P needs this much less gradient computation time than
/// serverful P2P (per cent)…
const PUBLISHED_COMPUTE_REDUCTION: f64 = 97.34;
/// …at up to this multiple of the cost.
const PUBLISHED_COST_RATIO: f64 = 5.4;
/// Published reference: in-store aggregation needs this much less update time than
/// fetch-then-aggregate (per cent).
const PUBLISHED_UPDATE_REDUCTION: f64 = 82.0;

/// `P2P`, `PS`, or the name in capitals.
pub fn arch_label(arch: &str) -> String {
    match arch {
        "p2p" => "P2P".into(),
        "ps" => "PS".into(),
        other => other.to_uppercase(),
    }
}

/// Decimals that show about four significant digits of `v`.
fn decimals(v: f64) -> usize {
    if v == 0.0 || !v.is_finite() {
        return 0;
    }
    (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize
}

/// `mean ± half-width` with the half-width to two significant digits and the mean to the same
/// place (at most four significant digits), or `value (n=1)`. Counts (`integer`) show no
/// decimals unless their interval is narrower than one.
fn fmt_estimate(e: &Estimate, integer: bool) -> String {
    let by_width = e
        .half_width
        .filter(|h| *h > 0.0 && h.is_finite())
        .map(|h| (1 - h.log10().floor() as i32).clamp(0, 8) as usize);
    let d = match (integer, by_width) {
        (true, None) => 0,
        (true, Some(w)) => w.min(1),
        (false, None) => decimals(e.mean),
        (false, Some(w)) => w.min(decimals(e.mean).max(1)),
    };
    match e.half_width {
        Some(h) => format!("{:.d$} ± {:.d$}", e.mean, h),
        None => format!("{:.d$} (n=1)", e.mean),
    }
}

fn fmt_values(values: &[f64]) -> String {
    stats::estimate(values).map_or_else(|| "—".into(), |e| fmt_estimate(&e, false))
}

fn fmt_counts(values: &[f64]) -> String {
    stats::estimate(values).map_or_else(|| "—".into(), |e| fmt_estimate(&e, true))
}

/// One row of a scenario's table: a measure and how to compute its cell from the runs' figures.
struct Measure {
    name: &'static str,
    cell: fn(&[Figures]) -> String,
}

const MEASURES: [Measure; 15] = [
    Measure { name: "Time to target accuracy (s)", cell: cell_time_to_target },
    Measure { name: "Final test accuracy (%)", cell: |f| values(f, |x| Some(x.final_accuracy * 100.0)) },
    Measure { name: "Wall time (s)", cell: |f| values(f, |x| Some(x.wall_time_s)) },
    Measure { name: "Throughput (samples/s)", cell: |f| values(f, |x| x.throughput) },
    Measure { name: "Goodput (% of fault-free)", cell: goodput_cell },
    Measure { name: "Faults injected", cell: |f| counts(f, |x| x.faults_injected as f64) },
    Measure { name: "Downtime (s)", cell: |f| values(f, |x| Some(x.downtime_s)) },
    Measure { name: "Recovery time (s)", cell: cell_recovery },
    Measure { name: "Rounds lost", cell: |f| counts(f, |x| x.rounds_lost as f64) },
    Measure { name: "Function invocations", cell: |f| counts(f, |x| x.invocations as f64) },
    Measure { name: "Cold starts", cell: |f| counts(f, |x| x.cold_starts as f64) },
    Measure { name: "Retries", cell: |f| counts(f, |x| x.retries as f64) },
    Measure { name: "Cost ($)", cell: |f| values(f, |x| Some(x.cost_usd)) },
    Measure { name: "Cost per accuracy point ($)", cell: |f| values(f, Figures::cost_per_point) },
    Measure { name: "Peak node memory (MB)", cell: |f| values(f, |x| x.max_node_memory_mb) },
];

/// Measures shown in the summary table, by index into [`MEASURES`].
const SUMMARY_MEASURES: [usize; 8] = [0, 1, 4, 5, 6, 7, 8, 12];

fn values(f: &[Figures], get: impl Fn(&Figures) -> Option<f64>) -> String {
    fmt_values(&f.iter().filter_map(get).collect::<Vec<_>>())
}

fn counts(f: &[Figures], get: impl Fn(&Figures) -> f64) -> String {
    fmt_counts(&f.iter().map(get).collect::<Vec<_>>())
}

/// Goodput in per cent: the mean over the seeds that have a twin run, "—" when none has.
pub(super) fn goodput_cell(f: &[Figures]) -> String {
    values(f, |x| x.goodput.map(|g| g * 100.0))
}

fn cell_time_to_target(f: &[Figures]) -> String {
    if f.is_empty() {
        return "—".into();
    }
    if f.iter().all(|x| x.time_to_target.is_none()) {
        return "no target".into();
    }
    let reached: Vec<f64> = f.iter().filter_map(|x| x.time_to_target.flatten()).collect();
    let not = f.len() - reached.len();
    match (reached.is_empty(), not) {
        (true, _) => format!("not reached ({not}/{})", f.len()),
        (false, 0) => fmt_values(&reached),
        (false, _) => format!("{}; not reached {not}/{}", fmt_values(&reached), f.len()),
    }
}

fn cell_recovery(f: &[Figures]) -> String {
    let faults: usize = f.iter().map(|x| x.recoveries.len()).sum();
    if f.is_empty() {
        return "—".into();
    }
    if faults == 0 {
        return "no fault".into();
    }
    // Per run: the mean over its faults that recovered.
    let per_run: Vec<f64> = f
        .iter()
        .filter_map(|x| {
            let r: Vec<f64> = x.recoveries.iter().flatten().copied().collect();
            stats::estimate(&r).map(|e| e.mean)
        })
        .collect();
    let not: usize = f.iter().map(|x| x.recoveries.iter().filter(|r| r.is_none()).count()).sum();
    match (per_run.is_empty(), not) {
        (true, _) => format!("not recovered ({not}/{faults} faults)"),
        (false, 0) => fmt_values(&per_run),
        (false, _) => format!("{}; {not}/{faults} faults not recovered", fmt_values(&per_run)),
    }
}

/// Each run's figures for one scenario and architecture, with its goodput against the same
/// seed of the scenario's twin in `exp`.
pub(super) fn figures(exp: &Experiment, s: &ScenarioRuns, arch: &str) -> Vec<Figures> {
    let twin = goodput::twin(exp, s).map_or(&[][..], |t| t.runs(arch));
    let runs = s.runs(arch);
    runs.iter()
        .zip(goodput::per_seed(runs, twin))
        .map(|((_, r), goodput)| Figures { goodput, ..r.figures(s.spec.target_accuracy) })
        .collect()
}

/// Markdown table cell text: pipes escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The whole report.
pub(super) fn render(exp: &Experiment, charts: &[Vec<ChartFiles>]) -> String {
    let mut md = String::new();
    header(&mut md, exp);
    summary(&mut md, exp);
    for (s, files) in exp.scenarios.iter().zip(charts) {
        scenario(&mut md, exp, s, files);
    }
    serverless_vs_serverful(&mut md, exp);
    communication(&mut md, exp);
    right_sizing(&mut md, exp);
    aggregation(&mut md, exp);
    robustness(&mut md, exp);
    definitions(&mut md);
    md
}

fn header(md: &mut String, exp: &Experiment) {
    let f = &exp.file;
    let _ = writeln!(
        md,
        "# Experiment report: {}\n",
        exp.dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );
    let _ = writeln!(
        md,
        "Written by `peerless report` from the run files; every number below is computed from them.\n"
    );
    let cmd = f.command.as_deref().unwrap_or("(not recorded in experiment.json)");
    let _ = writeln!(md, "- Command: `{cmd}`");
    let _ = writeln!(md, "- Machine: {} cores, {}", cores(), cpu_model());
    let _ = writeln!(md, "- Report written: {} UTC", utc(std::time::SystemTime::now()));
    let seeds: Vec<String> = f.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(md, "- Seeds: {}", if seeds.is_empty() { "none".into() } else { seeds.join(", ") });
    let archs: Vec<String> = f.archs.iter().map(|a| arch_label(a)).collect();
    let _ = writeln!(md, "- Architectures: {}", archs.join(", "));
    let expected = f.scenarios.len() * f.archs.len() * f.seeds.len();
    let found: usize = exp.scenarios.iter().flat_map(|s| &s.cells).map(|c| c.runs.len()).sum();
    let _ = writeln!(md, "- Runs: {found} of {expected} finished");
    let missing: Vec<String> = exp
        .scenarios
        .iter()
        .flat_map(|s| {
            s.cells.iter().flat_map(move |c| {
                c.missing.iter().map(move |seed| format!("`{}/{}/seed-{seed}`", s.spec.name, c.arch))
            })
        })
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(md, "- Missing or unfinished (no summary.json): {}", missing.join(", "));
    }
    let _ = writeln!(
        md,
        "\nCells are means over seeds ± the half-width of the 95 % Student-t interval; a single run shows its value and \"n=1\". The measures are defined at the [end](#definitions).\n"
    );
}

fn summary(md: &mut String, exp: &Experiment) {
    let archs = &exp.file.archs;
    let _ = writeln!(md, "## Summary\n");
    let mut head = vec!["Scenario".to_string(), "Target".to_string()];
    for &m in &SUMMARY_MEASURES {
        for a in archs {
            head.push(format!("{} {}", MEASURES[m].name, arch_label(a)));
        }
    }
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(md, "|{}", " --- |".repeat(head.len()));
    for s in &exp.scenarios {
        let target = s.spec.target_accuracy.map_or_else(|| "—".into(), |t| format!("{:.1} %", t * 100.0));
        let mut row = vec![format!("[{}](#{})", s.spec.name, anchor(&s.spec.name)), target];
        let figs: Vec<Vec<Figures>> = archs.iter().map(|a| figures(exp, s, a)).collect();
        for &m in &SUMMARY_MEASURES {
            for f in &figs {
                row.push(cell(&(MEASURES[m].cell)(f)));
            }
        }
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    let _ = writeln!(md);
}

/// GitHub's heading anchor for `name`.
fn anchor(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn scenario(md: &mut String, exp: &Experiment, s: &ScenarioRuns, charts: &[ChartFiles]) {
    let _ = writeln!(md, "## {}\n", s.spec.name);
    if !s.spec.description.is_empty() {
        let _ = writeln!(md, "{}\n", s.spec.description.trim());
    }
    if let Some(t) = s.spec.target_accuracy {
        let _ = writeln!(md, "- Target accuracy: {:.1} %", t * 100.0);
    }
    if let Some(f) = &s.spec.file {
        let _ = writeln!(md, "- Scenario file: `{f}`");
    }
    let twin = goodput::twin_name(&s.spec);
    match goodput::twin(exp, s) {
        Some(t) if t.spec.name == s.spec.name => {}
        Some(_) => {
            let _ = writeln!(md, "- Goodput against: [{twin}](#{}), the same seeds", anchor(twin));
        }
        None => {
            let _ = writeln!(
                md,
                "- Goodput: not measured, its fault-free twin `{twin}` is not in this experiment"
            );
        }
    }
    for c in &s.cells {
        let seeds: Vec<String> = c.runs.iter().map(|(seed, _)| seed.to_string()).collect();
        let mut line = format!("- {}: {} run(s)", arch_label(&c.arch), c.runs.len());
        if !seeds.is_empty() {
            let _ = write!(line, " (seeds {})", seeds.join(", "));
        }
        if let Some((_, r)) = c.runs.first() {
            let _ = write!(line, ", compute = {}", r.compute);
            if let Some(a) = &r.aggregation {
                let _ = write!(line, ", aggregation {a}");
            }
        }
        if !c.missing.is_empty() {
            let m: Vec<String> = c.missing.iter().map(u64::to_string).collect();
            let _ = write!(line, "; missing seeds {}", m.join(", "));
        }
        let _ = writeln!(md, "{line}");
    }
    let faults: Vec<String> = s
        .cells
        .iter()
        .flat_map(|c| c.runs.iter().map(move |(seed, r)| (c, seed, r)))
        .flat_map(|(c, seed, r)| {
            r.faults.iter().map(move |f| {
                format!(
                    "{} seed {seed}: {} of {} at {:.2} s",
                    arch_label(&c.arch),
                    f.kind,
                    f.targets.join(", "),
                    f.t
                )
            })
        })
        .collect();
    if !faults.is_empty() {
        let _ = writeln!(md, "- Faults injected ({}):", faults.len());
        for f in faults.iter().take(12) {
            let _ = writeln!(md, "  - {f}");
        }
        if faults.len() > 12 {
            let _ = writeln!(md, "  - … and {} more", faults.len() - 12);
        }
    }
    let _ = writeln!(md);
    let archs = &exp.file.archs;
    let figs: Vec<Vec<Figures>> = archs.iter().map(|a| figures(exp, s, a)).collect();
    let head: Vec<String> = archs.iter().map(|a| arch_label(a)).collect();
    let _ = writeln!(md, "| Measure | {} |", head.join(" | "));
    let _ = writeln!(md, "| --- |{}", " --- |".repeat(head.len()));
    for m in &MEASURES {
        let cells: Vec<String> = figs.iter().map(|f| cell(&(m.cell)(f))).collect();
        let _ = writeln!(md, "| {} | {} |", m.name, cells.join(" | "));
    }
    let _ = writeln!(md);
    for c in charts {
        let _ = writeln!(md, "![{} {}]({}) ([SVG]({}))\n", s.spec.name, c.what, c.png, c.svg);
    }
}

/// P2P runs of a scenario.
fn p2p(s: &ScenarioRuns) -> &[(u64, Run)] {
    s.runs("p2p")
}

/// A fault-free P2P scenario computing in functions with in-store aggregation; a scenario
/// named like `no-faults` or `baseline` is preferred.
fn baseline(exp: &Experiment) -> Option<&ScenarioRuns> {
    let clean = |s: &&ScenarioRuns| {
        let runs = p2p(s);
        !runs.is_empty()
            && runs.iter().all(|(_, r)| {
                r.compute == "functions"
                    && r.faults.is_empty()
                    && !r.function_faults
                    && r.aggregation.as_deref() != Some("fetch")
            })
    };
    let named = |s: &&ScenarioRuns| {
        let n = s.spec.name.to_lowercase();
        ["no-fault", "no_fault", "nofault", "baseline", "none"].iter().any(|k| n.contains(k))
    };
    exp.scenarios.iter().filter(clean).find(named).or_else(|| exp.scenarios.iter().find(clean))
}

fn column_values(s: &ScenarioRuns, column: &str) -> Vec<f64> {
    p2p(s).iter().filter_map(|(_, r)| r.column_means.get(column).copied()).collect()
}

fn cost_values(s: &ScenarioRuns) -> Vec<f64> {
    p2p(s).iter().map(|(_, r)| r.summary.total_cost_usd).collect()
}

fn wall_values(s: &ScenarioRuns) -> Vec<f64> {
    p2p(s).iter().map(|(_, r)| r.summary.wall_time_s).collect()
}

fn mean(v: &[f64]) -> Option<f64> {
    stats::estimate(v).map(|e| e.mean)
}

/// `x % less` / `x % more` of `a` relative to `b`.
fn reduction(a: &[f64], b: &[f64]) -> String {
    match (mean(a), mean(b)) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = 100.0 * (1.0 - a / b);
            if r >= 0.0 { format!("{r:.2} % less") } else { format!("{:.2} % more", -r) }
        }
        _ => "—".into(),
    }
}

fn ratio(a: &[f64], b: &[f64]) -> String {
    match (mean(a), mean(b)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn serverless_vs_serverful(md: &mut String, exp: &Experiment) {
    let _ = writeln!(md, "## Serverless vs serverful P2P\n");
    let serverful =
        exp.scenarios.iter().find(|s| !p2p(s).is_empty() && p2p(s).iter().all(|(_, r)| r.compute == "local"));
    let base = baseline(exp);
    let (Some(sf), Some(sl)) = (serverful, base) else {
        let mut need = Vec::new();
        if serverful.is_none() {
            need.push(
                "a scenario whose P2P runs compute gradients in the peers (`cluster.compute = \"local\"`)",
            );
        }
        if base.is_none() {
            need.push("a fault-free scenario whose P2P runs compute gradients in functions (`cluster.compute = \"functions\"`)");
        }
        let _ = writeln!(md, "Not measured: this experiment lacks {}.\n", need.join(" and "));
        let _ = writeln!(
            md,
            "Published reference: serverless P2P needs {PUBLISHED_COMPUTE_REDUCTION} % less gradient computation time than serverful P2P, at up to {PUBLISHED_COST_RATIO}× the cost.\n"
        );
        return;
    };
    let _ = writeln!(
        md,
        "Serverless: scenario `{}` ({} runs); serverful: scenario `{}` ({} runs). Gradient computation time is the mean of the `compute_ms` column over the peers' round rows.\n",
        sl.spec.name,
        p2p(sl).len(),
        sf.spec.name,
        p2p(sf).len()
    );
    let (cl, cf) = (column_values(sl, "compute_ms"), column_values(sf, "compute_ms"));
    let (kl, kf) = (cost_values(sl), cost_values(sf));
    let (wl, wf) = (wall_values(sl), wall_values(sf));
    let _ = writeln!(md, "| Measure | Serverless | Serverful | Measured | Published |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    let _ = writeln!(
        md,
        "| Gradient computation time per round (ms) | {} | {} | {} with serverless | {PUBLISHED_COMPUTE_REDUCTION} % less |",
        fmt_values(&cl),
        fmt_values(&cf),
        reduction(&cl, &cf)
    );
    let _ = writeln!(
        md,
        "| Cost ($) | {} | {} | serverless costs {} serverful | up to {PUBLISHED_COST_RATIO}× |",
        fmt_values(&kl),
        fmt_values(&kf),
        ratio(&kl, &kf)
    );
    let _ = writeln!(
        md,
        "| Wall time (s) | {} | {} | {} with serverless | — |\n",
        fmt_values(&wl),
        fmt_values(&wf),
        reduction(&wl, &wf)
    );
}

/// Bytes, time to target and accuracy per scenario and architecture, with each run's sync
/// mode and compression: what communication-efficient training buys and costs.
fn communication(md: &mut String, exp: &Experiment) {
    let _ = writeln!(md, "## Communication\n");
    let _ = writeln!(
        md,
        "Bytes sent per node: the mean over the nodes of each run (every request and answer), then over the seeds.\n"
    );
    let _ = writeln!(
        md,
        "| Scenario | Architecture | Sync | Compression | MB sent per node | Time to target (s) | Final accuracy |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    for s in &exp.scenarios {
        for c in &s.cells {
            let Some((_, first)) = c.runs.first() else { continue };
            let f = figures(exp, s, &c.arch);
            let mb: Vec<f64> =
                c.runs.iter().filter_map(|(_, r)| r.bytes_per_node()).map(|b| b / 1e6).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                cell(&s.spec.name),
                arch_label(&c.arch),
                cell(&first.sync),
                cell(&first.compression),
                fmt_values(&mb),
                cell_time_to_target(&f),
                values(&f, |x| Some(x.final_accuracy * 100.0)),
            );
        }
    }
    let _ = writeln!(md);
}

/// Per scenario and architecture, what the functions' measured peak memory says about the
/// size they were configured with.
fn right_sizing(md: &mut String, exp: &Experiment) {
    let _ = writeln!(md, "## Right-sizing the functions\n");
    let rows: Vec<(String, String, RightSizing)> = exp
        .scenarios
        .iter()
        .flat_map(|s| s.cells.iter().map(move |c| (s, c)))
        .filter_map(|(s, c)| {
            let sizes: Vec<RightSizing> = c.runs.iter().filter_map(|(_, r)| r.right_sizing()).collect();
            let peak = sizes.iter().map(|r| r.peak_mb).max()?;
            let configured = sizes.iter().map(|r| r.configured_mb).max()?;
            Some((s.spec.name.clone(), arch_label(&c.arch), RightSizing::new(peak, configured)))
        })
        .collect();
    let Some(largest) = rows.iter().map(|(_, _, r)| *r).max_by_key(|r| r.peak_mb) else {
        let _ = writeln!(
            md,
            "No run measured its functions' memory (runs before it was recorded, or no invocations).\n"
        );
        return;
    };
    let _ = writeln!(md, "Over every run: {}.\n", largest.describe());
    let _ = writeln!(
        md,
        "| Scenario | Architecture | Function peak (MB) | Configured (MB) | Suggested (MB) | Duration charge at it | Compute-bound slowdown |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    for (scenario, arch, r) in &rows {
        let _ = writeln!(
            md,
            "| {} | {arch} | {} | {} | {} | {:.1} % | {:.1}× |",
            cell(scenario),
            r.peak_mb,
            r.configured_mb,
            r.suggested_mb,
            r.duration_charge_ratio() * 100.0,
            r.slowdown()
        );
    }
    let _ = writeln!(md);
}

fn aggregation(md: &mut String, exp: &Experiment) {
    let _ = writeln!(md, "## In-store vs fetch-then-aggregate aggregation\n");
    let fetch =
        exp.scenarios.iter().find(|s| p2p(s).iter().any(|(_, r)| r.aggregation.as_deref() == Some("fetch")));
    let base = baseline(exp);
    let (Some(fe), Some(st)) = (fetch, base) else {
        let mut need = Vec::new();
        if fetch.is_none() {
            need.push("a scenario whose P2P runs aggregate by fetching (`cluster.aggregation = \"fetch\"`)");
        }
        if base.is_none() {
            need.push("a fault-free scenario whose P2P runs aggregate in the store with functions");
        }
        let _ = writeln!(md, "Not measured: this experiment lacks {}.\n", need.join(" and "));
        let _ = writeln!(
            md,
            "Published reference: in-store aggregation needs {PUBLISHED_UPDATE_REDUCTION} % less update time than fetch-then-aggregate.\n"
        );
        return;
    };
    let has_gather = |s: &ScenarioRuns| p2p(s).iter().all(|(_, r)| r.column_means.contains_key("gather_ms"));
    let column = if has_gather(fe) && has_gather(st) { "gather_ms" } else { "compute_ms" };
    let _ = writeln!(
        md,
        "In-store: scenario `{}` ({} runs); fetch-then-aggregate: scenario `{}` ({} runs). Update time is the mean of the `{column}` column over the peers' round rows.\n",
        st.spec.name,
        p2p(st).len(),
        fe.spec.name,
        p2p(fe).len()
    );
    let (us, uf) = (column_values(st, column), column_values(fe, column));
    let (gs, gf) = (column_values(st, "aggregate_ms"), column_values(fe, "aggregate_ms"));
    let (ks, kf) = (cost_values(st), cost_values(fe));
    let _ = writeln!(md, "| Measure | In-store | Fetch-then-aggregate | Measured | Published |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    let _ = writeln!(
        md,
        "| Update time per round, `{column}` (ms) | {} | {} | {} in-store | {PUBLISHED_UPDATE_REDUCTION} % less |",
        fmt_values(&us),
        fmt_values(&uf),
        reduction(&us, &uf)
    );
    let _ = writeln!(
        md,
        "| `aggregate_ms` per round (ms) | {} | {} | {} in-store | — |",
        fmt_values(&gs),
        fmt_values(&gf),
        reduction(&gs, &gf)
    );
    let _ = writeln!(
        md,
        "| Cost ($) | {} | {} | in-store costs {} fetch | — |\n",
        fmt_values(&ks),
        fmt_values(&kf),
        ratio(&ks, &kf)
    );
}

/// Attack names in table order (`peerless_core::attack::AttackKind::ALL`), after `none`.
fn attack_order(a: &str) -> usize {
    let all = peerless_core::attack::AttackKind::ALL;
    if a == "none" { 0 } else { 1 + all.iter().position(|k| k.name() == a).unwrap_or(all.len()) }
}

/// What a run's nodes did: `None` when it is neither clean nor attacked (crashes, function
/// faults: not part of the robustness table); else `(attack or "none", attackers)`.
fn attack_of(r: &Run) -> Option<(String, usize)> {
    if r.function_faults {
        return None;
    }
    let byz: Vec<_> = r.faults.iter().filter(|f| f.kind == "byzantine").collect();
    if byz.len() < r.faults.len() {
        return None;
    }
    let mut names: Vec<&str> = byz.iter().filter_map(|f| f.attack.as_deref()).collect();
    names.sort_unstable();
    names.dedup();
    let attackers: usize = byz.iter().map(|f| f.targets.len()).sum();
    Some(match names.as_slice() {
        [] => ("none".to_owned(), 0),
        [one] => ((*one).to_owned(), attackers),
        many => (many.join(" + "), attackers),
    })
}

/// Final accuracies (%) by aggregation rule.
type ByRule = std::collections::BTreeMap<String, Vec<f64>>;
/// The rows of one robustness table: (attack order, attack, attackers) → accuracies by rule.
type AttackRows = std::collections::BTreeMap<(usize, String, usize), ByRule>;

/// Final accuracy for each attack × aggregation rule, per architecture and cluster size, from
/// the scenarios whose runs are clean or only attacked.
fn robustness(md: &mut String, exp: &Experiment) {
    let _ = writeln!(
        md,
        "## Byzantine robustness: attack × aggregation rule
"
    );
    let tables = robustness_tables(exp);
    if tables.is_empty() {
        let _ = writeln!(
            md,
            "Not measured: this experiment has no scenario with a `byzantine` fault (see `scenarios/attacks/`).\n"
        );
        return;
    }
    let _ = writeln!(
        md,
        "Final test accuracy (%) of the honest nodes' model, mean ± 95 % interval over seeds; in brackets the \
         difference to the clean run with the same rule and cluster size (points). Scenarios with other faults \
         are left out. `sign-flip`, `gaussian` and `label-flip` send well-formed gradients that only a robust rule \
         can limit; `nan`, `wrong-length` and `replay` are refused by the codec or the round protocol before \
         aggregation, whatever the rule.\n"
    );
    for ((arch, n), rows) in &tables {
        robustness_table(md, arch, *n, rows);
    }
}

/// The robustness tables by (arch, cluster size): the clean or only attacked runs computed by
/// functions and aggregated in the store, for cluster sizes that were attacked.
fn robustness_tables(exp: &Experiment) -> std::collections::BTreeMap<(String, u32), AttackRows> {
    let mut tables: std::collections::BTreeMap<(String, u32), AttackRows> = Default::default();
    for s in &exp.scenarios {
        for c in &s.cells {
            for (_, r) in &c.runs {
                let Some((attack, k)) = attack_of(r) else { continue };
                if r.compute != "functions" || r.aggregation.as_deref() == Some("fetch") {
                    continue;
                }
                tables
                    .entry((c.arch.clone(), r.summary.peers))
                    .or_default()
                    .entry((attack_order(&attack), attack, k))
                    .or_default()
                    .entry(r.aggregator.clone())
                    .or_default()
                    .push(f64::from(r.summary.test_accuracy) * 100.0);
            }
        }
    }
    // Only cluster sizes that were attacked, with their clean runs as the reference.
    tables.retain(|_, rows| rows.keys().any(|(_, a, _)| a.as_str() != "none"));
    tables
}

/// One robustness table (a row per attack, a column per rule) and its verdict.
fn robustness_table(md: &mut String, arch: &str, n: u32, rows: &AttackRows) {
    let mut rules: Vec<&String> = rows.values().flat_map(|m| m.keys()).collect();
    rules.sort_by_key(|r| (r.as_str() != "mean", r.as_str()));
    rules.dedup();
    let clean = rows.iter().find(|((_, a, _), _)| a.as_str() == "none").map(|(_, m)| m);
    let _ = writeln!(md, "### {} with {n} nodes\n", arch_label(arch));
    let head: Vec<String> = rules.iter().map(|r| format!("`{r}`")).collect();
    let _ = writeln!(md, "| Attack (attackers) | {} |", head.join(" | "));
    let _ = writeln!(md, "| --- |{}", " --- |".repeat(rules.len()));
    let mut comparison = CleanComparison::default();
    for ((_, attack, k), by_rule) in rows {
        let mut cells = Vec::new();
        for rule in &rules {
            let Some(v) = by_rule.get(*rule) else {
                cells.push("—".to_owned());
                continue;
            };
            let base = clean.and_then(|c| c.get(*rule)).and_then(|c| mean(c));
            let delta = comparison.delta(rule, attack, base, mean(v));
            cells.push(format!("{}{delta}", fmt_values(v)));
        }
        let who =
            if attack.as_str() == "none" { "none".to_owned() } else { format!("{attack} ({k} of {n})") };
        let _ = writeln!(md, "| {} | {} |", cell(&who), cells.join(" | "));
    }
    let _ = writeln!(md);
    comparison.verdict(md);
}

/// The attacked cells of a robustness table compared with their clean runs.
#[derive(Debug, Default)]
struct CleanComparison {
    /// Cells compared.
    compared: usize,
    /// Cells more than 2 points below their clean run, described.
    drops: Vec<String>,
}

impl CleanComparison {
    /// The bracketed difference of `rule`'s mean accuracy `m` under `attack` to its clean
    /// run's `base` (empty for the clean row or without both means), counted.
    fn delta(&mut self, rule: &str, attack: &str, base: Option<f64>, m: Option<f64>) -> String {
        match (attack, base, m) {
            ("none", ..) | (_, None, _) | (_, _, None) => String::new(),
            (_, Some(b), Some(m)) => {
                self.compared += 1;
                if m - b < -2.0 {
                    self.drops.push(format!("`{rule}` under {attack}: {:+.1} points", m - b));
                }
                format!(" ({:+.1})", m - b)
            }
        }
    }

    /// The sentence under the table.
    fn verdict(&self, md: &mut String) {
        if self.compared == 0 {
            let _ = writeln!(
                md,
                "No attacked cell has a clean run (attack `none`) with its rule to compare with.\n"
            );
        } else if self.drops.is_empty() {
            let _ = writeln!(md, "Every attacked cell is within 2 points of its clean run.\n");
        } else {
            let _ = writeln!(md, "More than 2 points below the clean run: {}.\n", self.drops.join("; "));
        }
    }
}

fn definitions(md: &mut String) {
    let _ = writeln!(md, "## Definitions\n");
    let f = stats::DOWNTIME_FACTOR;
    let text = format!(
        "- **Interval**: over the seeds' values x₁…xₙ, mean ± t₀.₉₇₅,ₙ₋₁ · s/√n (Student t, n − 1 degrees of freedom, s the sample standard deviation). One seed: its value, marked n=1.
- **Run start**: the launcher's `start` event in `events.jsonl`; every time below is measured from it, on the `t_ms` clock of the files.
- **Global progress**: P2P: the highest round completed by any peer (every peer's rows in `metrics.csv`); PS: the parameter server's model version (only its rows). A progress timestamp is a row whose round exceeds every round before it, so rounds redone after a restart are not progress.
- **Time to target accuracy**: from the run start to the first evaluation row (non-empty `test_accuracy`) at or above the scenario's `target_accuracy`. Runs that never reach it are counted as \"not reached\" and left out of the mean.
- **Final test accuracy, wall time, invocations, cold starts, cost**: `summary.json` (`test_accuracy`, `wall_time_s`, `invocations`, `cold_starts`, `total_cost_usd`). **Retries**: the sum of `per_peer[].retries`.
- **Downtime**: time without global progress beyond normal. With g the gaps between consecutive progress timestamps, downtime = Σ max(0, g − {f} × median(g)); a run that progresses steadily has none.
- **Recovery time**: for each `fault_injected` event, the time from the injection to the first completion of a global round above the highest round completed at the injection (a PS killed and restarted includes its restart). A run's value is the mean over its faults; faults after which no such round came are counted as not recovered.
- **Rounds lost**: every row of the global counter whose round is not above the previous row's adds previous − round + 1 (rounds done again, e.g. a PS resumed from an older checkpoint). The launcher's `rounds_lost` in `summary.json`'s `recoveries` measures the same restarts, so the larger of the two is reported, not their sum.
- **Throughput**: samples trained per second of wall time. P2P: the samples behind the gradients each round applied (`metrics.csv`'s `applied_samples`, once per round), so a gradient computed but left out of its round (a crashed peer's, a joiner's first) does not count; PS: the sum of the `samples` column (every node process's rows, those of a process later killed included); over `wall_time_s`. For a run whose metrics lack these columns, `summary.json`'s `samples_per_s`.
- **Goodput**: a run's throughput over the throughput of the run with the same seed of the scenario's fault-free twin (the scenario its `baseline` key names, default `no-faults`), in per cent; the mean is over the seeds that have a twin run, and the cell is \"—\" when none has (the twin was not part of the experiment).
- **Faults injected**: the run's `fault_injected` events (each draw of a `churn` stream is one; the function runtime's failure rates, `function_faults`, are not counted).
- **Cost per accuracy point**: cost / (final test accuracy × 100).
- **Peak node memory**: the largest peak resident memory (`VmHWM`) of a node process of the run, its own `summary.json`'s `max_memory_mb`; function instances are in `function_metrics.json`.
- **Charts**: accuracy from the evaluation rows, training loss per global round (the mean over peers in P2P, the PS's in PS) as a moving average over 1 % of the rounds; bold lines are the mean over seeds on their common time span, faint lines the seeds; dashed vertical lines mark fault injections.
"
    );
    md.push_str(&text);
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "CPU model unknown".into())
}

/// `YYYY-MM-DD HH:MM` in UTC.
fn utc(t: std::time::SystemTime) -> String {
    let (y, m, d, h, mi, _) = crate::common::civil_utc(t);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_match_known_instants() {
        let at = |s: u64| utc(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01 00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00");
        assert_eq!(at(1_700_000_000), "2023-11-14 22:13");
    }

    #[test]
    fn estimates_round_the_mean_to_the_interval_precision() {
        let e = |mean, half_width, n| Estimate { mean, half_width, n };
        assert_eq!(fmt_estimate(&e(97.1831, Some(0.3512), 3), false), "97.18 ± 0.35");
        assert_eq!(fmt_estimate(&e(97.32, Some(1.79), 2), false), "97.3 ± 1.8");
        assert_eq!(fmt_estimate(&e(0.011, Some(0.1398), 2), false), "0.01 ± 0.14");
        assert_eq!(fmt_estimate(&e(0.000822, None, 1), false), "0.0008220 (n=1)");
        assert_eq!(fmt_estimate(&e(1200.0, Some(0.0), 2), true), "1200 ± 0");
        assert_eq!(fmt_estimate(&e(6.0, None, 1), true), "6 (n=1)");
        assert_eq!(fmt_estimate(&e(0.5, Some(6.3531), 2), true), "0.5 ± 6.4");
        assert_eq!(fmt_estimate(&e(3293.0, Some(12.7), 2), true), "3293 ± 13");
    }

    #[test]
    fn reductions_and_ratios_read_the_right_way_round() {
        assert_eq!(reduction(&[1.0], &[4.0]), "75.00 % less");
        assert_eq!(reduction(&[5.0], &[4.0]), "25.00 % more");
        assert_eq!(ratio(&[5.4], &[1.0]), "5.40×");
        assert_eq!(ratio(&[], &[1.0]), "—");
    }

    #[test]
    fn time_to_target_counts_runs_that_never_reach_it() {
        let base = Figures {
            time_to_target: Some(Some(10.0)),
            final_accuracy: 0.97,
            wall_time_s: 20.0,
            downtime_s: 0.0,
            recoveries: vec![],
            rounds_lost: 0,
            invocations: 0,
            cold_starts: 0,
            retries: 0,
            cost_usd: 0.0,
            throughput: None,
            faults_injected: 0,
            max_node_memory_mb: None,
            goodput: None,
        };
        let missed = Figures { time_to_target: Some(None), ..base.clone() };
        assert_eq!(cell_time_to_target(&[base.clone(), missed.clone()]), "10.00 (n=1); not reached 1/2");
        assert_eq!(cell_time_to_target(&[missed]), "not reached (1/1)");
        assert_eq!(cell_time_to_target(&[Figures { time_to_target: None, ..base.clone() }]), "no target");
        assert_eq!(cell_recovery(&[base]), "no fault");
    }
}
