//! Reads one run directory (summary.json, config.toml, metrics.csv, events.jsonl) into the
//! series and figures the report needs.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::stats::{self, Completion};

/// A cluster run's `summary.json`, read through the launcher's own type (fields a run
/// predates read as their default).
pub type Summary = peerless_runtime::cluster::ClusterSummary;

/// A fault the launcher injected, `t` in seconds since the run's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Seconds since the run's start.
    pub t: f64,
    /// `kill`, `stop`, `partition`, …
    pub kind: String,
    /// The nodes it hit, as the launcher names them.
    pub targets: Vec<String>,
    /// `byzantine`: the attack.
    pub attack: Option<String>,
}

/// One run directory, read.
#[derive(Debug, Clone)]
pub struct Run {
    /// The summary.
    pub summary: Summary,
    /// `cluster.compute` from config.toml (`functions` unless set).
    pub compute: String,
    /// `cluster.aggregation` from config.toml, when the key exists.
    pub aggregation: Option<String>,
    /// `cluster.aggregator` from config.toml as a label: `mean`, `krum`, `trimmed-mean (beta = 0.2)`.
    pub aggregator: String,
    /// Whether config.toml sets a non-zero function fault rate (`[function.faults]`).
    pub function_faults: bool,
    /// `p2p.sync` from config.toml (`every-step` unless set), with DiLoCo's `inner_steps`:
    /// `diloco (H = 50)`.
    pub sync: String,
    /// `p2p.compression` from config.toml (`none` unless set), with top-k's fraction.
    pub compression: String,
    /// Global round completions in time order (see [`global_series`]).
    pub global: Vec<Completion>,
    /// Test evaluations `(t s, accuracy 0..1)` in time order, one per evaluated round.
    pub evals: Vec<(f64, f64)>,
    /// Training loss `(t s, loss)` per global round, in time order.
    pub loss: Vec<(f64, f64)>,
    /// Injected faults in time order.
    pub faults: Vec<Fault>,
    /// Mean of each time column (`compute_ms`, `gather_ms`, …) over the rows that have it.
    pub column_means: BTreeMap<String, f64>,
    /// Samples trained: in P2P runs, the samples behind the gradients each round applied
    /// (`applied_samples`, once per round); otherwise the sum of `metrics.csv`'s `samples`
    /// column over every node process, restarted ones included; `None` when no row has it.
    pub samples_trained: Option<u64>,
}

/// Columns whose per-round mean the comparisons use.
const TIME_COLUMNS: [&str; 5] = ["compute_ms", "gather_ms", "aggregate_ms", "update_ms", "exchange_ms"];

/// `"krum"` → `krum`; `{ rule = "krum", f = 2 }` → `krum (f = 2)`.
fn rule_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(t) => {
            let rule = t.get("rule").and_then(|r| r.as_str()).unwrap_or("?");
            let params: Vec<String> =
                t.iter().filter(|(k, _)| *k != "rule").map(|(k, v)| format!("{k} = {v}")).collect();
            if params.is_empty() { rule.to_owned() } else { format!("{rule} ({})", params.join(", ")) }
        }
        other => other.to_string(),
    }
}

impl Run {
    /// Reads the run in `dir`; `Ok(None)` when it has no summary.json (unfinished).
    pub fn load(dir: &Path) -> Result<Option<Run>> {
        let Some(summary) = read_summary(&dir.join("summary.json"))? else { return Ok(None) };
        let labels = ConfigLabels::read(&dir.join("config.toml"), &summary)?;
        let events = read_events(&dir.join("events.jsonl"))?;
        let table = Table::read(&dir.join("metrics.csv"))?;
        let start_ms = start_ms(&events, &table);
        let secs = |t_ms: u64| (t_ms as f64 - start_ms as f64) / 1000.0;
        let faults = fault_series(&events, secs);

        // In a PS run only the PS's rows (index = number of workers) are global versions.
        let ps_index = (summary.arch == "ps").then_some(u64::from(summary.peers));
        let rows: Vec<&Row> = table.rows.iter().filter(|r| ps_index.is_none_or(|ps| r.peer == ps)).collect();
        let global = global_series(&rows, ps_index.is_some(), secs);
        let evals = eval_series(&rows, secs);
        let loss = loss_series(&rows, ps_index.is_some(), secs);
        let column_means = table.column_means();
        let samples_trained = table.samples_trained();

        Ok(Some(Run {
            summary,
            compute: labels.compute,
            aggregation: labels.aggregation,
            aggregator: labels.aggregator,
            function_faults: labels.function_faults,
            sync: labels.sync,
            compression: labels.compression,
            global,
            evals,
            loss,
            faults,
            column_means,
            samples_trained,
        }))
    }

    /// Training throughput, samples per second of wall time: samples trained (`metrics.csv`,
    /// which keeps the rows of a process later killed) over `wall_time_s`; failing that, the
    /// summary's `samples_per_s` (whose count covers each node's last process only). `None`
    /// without a positive figure.
    pub fn throughput(&self) -> Option<f64> {
        let wall = self.summary.wall_time_s;
        let from_rows = self.samples_trained.filter(|_| wall > 0.0).map(|s| s as f64 / wall);
        from_rows.or(Some(self.summary.samples_per_s)).filter(|t| t.is_finite() && *t > 0.0)
    }

    /// The right-sizing of this run's functions: their largest "Max Memory Used" against
    /// their configured size; `None` without invocations that measured it.
    pub fn right_sizing(&self) -> Option<peerless_core::cost::RightSizing> {
        let nodes = &self.summary.per_peer;
        let peak = nodes.iter().map(|n| n.function_max_memory_mb).max().filter(|&m| m > 0)?;
        let configured = nodes.iter().map(|n| n.function_memory_mb).max().filter(|&m| m > 0)?;
        Some(peerless_core::cost::RightSizing::new(peak, configured))
    }

    /// Bytes each node sent, on average over the nodes (requests and answers; the PS counts as
    /// a node); `None` when the summary has no node.
    pub fn bytes_per_node(&self) -> Option<f64> {
        let nodes = &self.summary.per_peer;
        (!nodes.is_empty())
            .then(|| nodes.iter().map(|n| n.bytes_out as f64).sum::<f64>() / nodes.len() as f64)
    }

    /// Faults the launcher injected: its `fault_injected` events, churn draws included, the
    /// function runtime's failure rates (`function_faults`, not an event in time) left out.
    pub fn faults_injected(&self) -> u64 {
        self.faults.iter().filter(|f| f.kind != "function_faults").count() as u64
    }

    /// Per-run figures the tables aggregate over seeds.
    pub fn figures(&self, target_accuracy: Option<f64>) -> Figures {
        let progress = stats::progress_times(&self.global);
        let from_metrics = stats::rounds_lost(&self.global);
        let from_launcher: u64 = self.summary.recoveries.iter().filter_map(|r| r.rounds_lost).sum();
        Figures {
            time_to_target: target_accuracy.map(|t| stats::time_to_target(&self.evals, t)),
            final_accuracy: f64::from(self.summary.test_accuracy),
            wall_time_s: self.summary.wall_time_s,
            downtime_s: stats::downtime(&progress),
            // An attack is not an outage: nothing to recover from.
            recoveries: self
                .faults
                .iter()
                .filter(|f| f.kind != "byzantine")
                .map(|f| stats::recovery_time(&self.global, f.t))
                .collect(),
            rounds_lost: from_metrics.max(from_launcher),
            invocations: self.summary.invocations,
            cold_starts: self.summary.cold_starts,
            retries: self.summary.per_peer.iter().map(|p| p.retries).sum(),
            cost_usd: self.summary.total_cost_usd,
            throughput: self.throughput(),
            faults_injected: self.faults_injected(),
            max_node_memory_mb: self
                .summary
                .per_peer
                .iter()
                .map(|n| n.max_memory_mb)
                .max()
                .filter(|&m| m > 0)
                .map(|m| m as f64),
            goodput: None,
        }
    }
}

/// What one run contributes to its cell of the tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// `None`: the scenario has no target; `Some(None)`: target not reached.
    pub time_to_target: Option<Option<f64>>,
    /// Final test accuracy, 0..1.
    pub final_accuracy: f64,
    /// Launcher wall time, s.
    pub wall_time_s: f64,
    /// Time without global progress beyond normal, s ([`stats::downtime`]).
    pub downtime_s: f64,
    /// Per injected fault, its recovery time (`None`: not recovered).
    pub recoveries: Vec<Option<f64>>,
    /// Rounds done again.
    pub rounds_lost: u64,
    /// Function invocation attempts.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Retried invocation attempts.
    pub retries: u64,
    /// Total cost, USD.
    pub cost_usd: f64,
    /// Training throughput, samples/s ([`Run::throughput`]).
    pub throughput: Option<f64>,
    /// Faults injected ([`Run::faults_injected`]).
    pub faults_injected: u64,
    /// The largest peak resident memory of a node process, MB (`None` for runs before it
    /// was recorded).
    pub max_node_memory_mb: Option<f64>,
    /// Throughput over that of the same seed's fault-free twin; `None` without a twin run
    /// (filled in by the report, which knows the twin: see `super::goodput`).
    pub goodput: Option<f64>,
}

impl Figures {
    /// Dollars per percentage point of final accuracy; `None` at zero accuracy.
    pub fn cost_per_point(&self) -> Option<f64> {
        (self.final_accuracy > 0.0).then(|| self.cost_usd / (self.final_accuracy * 100.0))
    }
}

/// Reads summary.json; `Ok(None)` when there is none.
fn read_summary(path: &Path) -> Result<Option<Summary>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display())).map(Some)
}

/// What config.toml says about the run, as the tables label it.
struct ConfigLabels {
    compute: String,
    aggregation: Option<String>,
    aggregator: String,
    function_faults: bool,
    sync: String,
    compression: String,
}

impl ConfigLabels {
    /// Reads config.toml at `path` (a missing file reads as empty); `compute` defaults to
    /// the summary's.
    fn read(path: &Path, summary: &Summary) -> Result<ConfigLabels> {
        let config: toml::Value = match std::fs::read_to_string(path) {
            Ok(t) => toml::from_str(&t).with_context(|| format!("parsing {}", path.display()))?,
            Err(_) => toml::Value::Table(Default::default()),
        };
        // `[cluster]`; runs before 0.2 have these keys under `[p2p]`.
        let value = |k: &str| ["cluster", "p2p"].iter().find_map(|s| config.get(s).and_then(|t| t.get(k)));
        let key = |k: &str| value(k).and_then(|v| v.as_str()).map(str::to_owned);
        let function_faults =
            config.get("function").and_then(|f| f.get("faults")).and_then(|f| f.as_table()).is_some_and(
                |t| t.iter().any(|(k, v)| k.ends_with("_rate") && v.as_float().is_some_and(|r| r > 0.0)),
            );
        let p2p = |k: &str| config.get("p2p").and_then(|t| t.get(k));
        let sync = match p2p("sync").and_then(|v| v.as_str()) {
            Some("diloco") => {
                format!("diloco (H = {})", p2p("inner_steps").and_then(|v| v.as_integer()).unwrap_or(50))
            }
            Some(other) => other.to_owned(),
            None => "every-step".to_owned(),
        };
        let compression = match p2p("compression").and_then(|v| v.as_str()) {
            Some("topk") => {
                format!("topk ({})", p2p("topk_fraction").and_then(|v| v.as_float()).unwrap_or(0.01))
            }
            Some(other) => other.to_owned(),
            None => "none".to_owned(),
        };
        Ok(ConfigLabels {
            compute: key("compute").unwrap_or_else(|| summary.compute.clone()),
            aggregation: key("aggregation"),
            aggregator: value("aggregator").map_or_else(|| "mean".to_owned(), rule_label),
            function_faults,
            sync,
            compression,
        })
    }
}

/// When the run started, ms: the launcher's start event (the one naming no peer); failing
/// that, the earliest start or metrics row.
fn start_ms(events: &[serde_json::Value], table: &Table) -> u64 {
    let launcher_start = events
        .iter()
        .filter(|e| e["event"] == "start" && e.get("peer").is_none())
        .filter_map(|e| e["t_ms"].as_u64())
        .min();
    launcher_start
        .or_else(|| events.iter().filter(|e| e["event"] == "start").filter_map(|e| e["t_ms"].as_u64()).min())
        .or_else(|| table.rows.iter().map(|r| r.t_ms).min())
        .unwrap_or(0)
}

/// The injected faults of `events`, in time order.
fn fault_series(events: &[serde_json::Value], secs: impl Fn(u64) -> f64) -> Vec<Fault> {
    let mut faults: Vec<Fault> = events
        .iter()
        .filter(|e| e["event"] == "fault_injected")
        .filter_map(|e| {
            Some(Fault {
                t: secs(e["t_ms"].as_u64()?),
                kind: e["fault"].as_str().unwrap_or("fault").to_owned(),
                targets: e["targets"]
                    .as_array()
                    .map(|a| {
                        a.iter().map(|t| t.as_str().map_or_else(|| t.to_string(), str::to_owned)).collect()
                    })
                    .unwrap_or_default(),
                attack: e["attack"].as_str().map(str::to_owned),
            })
        })
        .collect();
    faults.sort_by(|a, b| a.t.total_cmp(&b.t));
    faults
}

/// Test evaluations `(t s, accuracy)` of `rows`, the first row of each evaluated round.
fn eval_series(rows: &[&Row], secs: impl Fn(u64) -> f64) -> Vec<(f64, f64)> {
    let mut evals: Vec<(f64, f64)> = Vec::new();
    let mut seen_eval = std::collections::BTreeSet::new();
    for r in rows {
        if let Some(acc) = r.test_accuracy
            && seen_eval.insert(r.eval_round.unwrap_or(r.round))
        {
            evals.push((secs(r.t_ms), acc));
        }
    }
    evals
}

/// Loss per global round: mean over the rows of that round, at its first completion; a PS
/// run's rows as they come (its counter can go back after a restart).
fn loss_series(rows: &[&Row], is_ps: bool, secs: impl Fn(u64) -> f64) -> Vec<(f64, f64)> {
    let mut by_round: BTreeMap<u64, (u64, f64, u32)> = BTreeMap::new();
    let mut loss: Vec<(f64, f64)> = Vec::new();
    if is_ps {
        loss.extend(rows.iter().filter_map(|r| Some((secs(r.t_ms), r.train_loss?))));
    } else {
        for r in rows {
            if let Some(l) = r.train_loss {
                let e = by_round.entry(r.round).or_insert((r.t_ms, 0.0, 0));
                e.0 = e.0.min(r.t_ms);
                e.1 += l;
                e.2 += 1;
            }
        }
        loss.extend(by_round.values().map(|&(t, sum, n)| (secs(t), sum / f64::from(n))));
        loss.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    loss
}

/// Global round completions from node rows in time order. A PS run's rows are the PS's own,
/// kept as they are (its counter goes back when it resumes from an older checkpoint). In a P2P
/// run global progress is the highest round any peer completed: a row counts when it raises it.
fn global_series(rows: &[&Row], is_ps: bool, secs: impl Fn(u64) -> f64) -> Vec<Completion> {
    let mut out = Vec::new();
    let mut best: Option<u64> = None;
    for r in rows {
        if is_ps || best.is_none_or(|b| r.round > b) {
            best = Some(best.map_or(r.round, |b| b.max(r.round)));
            out.push(Completion { t: secs(r.t_ms), round: r.round });
        }
    }
    out
}

fn read_events(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // A line cut short by a killed writer is skipped, not fatal.
    Ok(text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect())
}

/// One metrics row, with the columns the series need.
#[derive(Debug, Clone)]
struct Row {
    t_ms: u64,
    peer: u64,
    round: u64,
    train_loss: Option<f64>,
    eval_round: Option<u64>,
    test_accuracy: Option<f64>,
    /// Samples the node's gradient work covered in this round.
    samples: Option<u64>,
    /// Samples behind the gradients the round applied (P2P rows).
    applied_samples: Option<u64>,
}

/// metrics.csv: rows sorted by time, and the raw cells for the column means.
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Row>,
    raw: Vec<Vec<String>>,
}

impl Table {
    /// Reads and parses metrics.csv at `path`.
    fn read(path: &Path) -> Result<Table> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Table::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// What training used: each round's `applied_samples` once (every peer applies the
    /// same gradients), so a gradient computed but left out of its round does not count;
    /// for runs without that column, every row's `samples`.
    fn samples_trained(&self) -> Option<u64> {
        let mut per_round: BTreeMap<u64, u64> = BTreeMap::new();
        for r in &self.rows {
            if let Some(a) = r.applied_samples {
                let e = per_round.entry(r.round).or_default();
                *e = (*e).max(a);
            }
        }
        if !per_round.is_empty() {
            return Some(per_round.values().sum());
        }
        self.rows.iter().filter_map(|r| r.samples).reduce(|a, b| a + b)
    }

    fn parse(text: &str) -> Result<Table> {
        let mut lines = text.lines();
        let header: Vec<String> = lines.next().unwrap_or_default().split(',').map(str::to_owned).collect();
        let col = |name: &str| header.iter().position(|h| h == name);
        let (Some(t), Some(peer), Some(round)) = (col("t_ms"), col("peer"), col("round")) else {
            bail!("the header lacks t_ms, peer or round: {:?}", header.join(","));
        };
        let (loss, er, acc) = (col("train_loss"), col("eval_round"), col("test_accuracy"));
        let (samples, applied) = (col("samples"), col("applied_samples"));
        let mut rows = Vec::new();
        let mut raw = Vec::new();
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let cells: Vec<String> = line.split(',').map(str::to_owned).collect();
            let get = |i: Option<usize>| i.and_then(|i| cells.get(i)).filter(|s| !s.is_empty());
            // A row cut short by a killed node lacks its leading cells only if it is garbage.
            let (Some(t_ms), Some(p), Some(r)) = (
                get(Some(t)).and_then(|s| s.parse().ok()),
                get(Some(peer)).and_then(|s| s.parse().ok()),
                get(Some(round)).and_then(|s| s.parse().ok()),
            ) else {
                continue;
            };
            rows.push(Row {
                t_ms,
                peer: p,
                round: r,
                train_loss: get(loss).and_then(|s| s.parse().ok()).filter(|v: &f64| v.is_finite()),
                eval_round: get(er).and_then(|s| s.parse().ok()),
                test_accuracy: get(acc).and_then(|s| s.parse().ok()).filter(|v: &f64| v.is_finite()),
                samples: get(samples).and_then(|s| s.parse().ok()),
                applied_samples: get(applied).and_then(|s| s.parse().ok()),
            });
            raw.push(cells);
        }
        rows.sort_by_key(|r| (r.t_ms, r.peer));
        Ok(Table { header, rows, raw })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// Mean of each of [`TIME_COLUMNS`] over the rows that have it.
    fn column_means(&self) -> BTreeMap<String, f64> {
        TIME_COLUMNS
            .iter()
            .filter_map(|c| {
                let i = self.column(c)?;
                let v: Vec<f64> =
                    self.raw.iter().filter_map(|r| r.get(i).and_then(|s| s.parse().ok())).collect();
                stats::estimate(&v).map(|e| ((*c).to_owned(), e.mean))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "t_ms,peer,round,train_loss,eval_round,test_accuracy,compute_ms";

    #[test]
    fn p2p_global_progress_is_the_highest_round_of_any_peer() {
        let csv = format!(
            "{HEADER}\n1000,0,1,2.0,,,10\n1001,1,1,2.2,,,12\n1100,1,2,1.0,,,\n1150,0,2,1.2,1,0.5,8\n1200,0,3,0.5,,,\n"
        );
        let t = Table::parse(&csv).unwrap();
        let rows: Vec<&Row> = t.rows.iter().collect();
        let g = global_series(&rows, false, |ms| ms as f64 / 1000.0);
        assert_eq!(g.iter().map(|c| c.round).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(g.iter().map(|c| c.t).collect::<Vec<_>>(), vec![1.0, 1.1, 1.2]);
        assert_eq!(t.column("compute_ms"), Some(6));
    }

    #[test]
    fn ps_series_keeps_a_counter_that_goes_back() {
        let csv = format!("{HEADER}\n1000,3,5,1.0,,,\n2000,3,4,1.0,,,\n3000,3,5,1.0,,,\n");
        let t = Table::parse(&csv).unwrap();
        let rows: Vec<&Row> = t.rows.iter().collect();
        let g = global_series(&rows, true, |ms| ms as f64 / 1000.0);
        assert_eq!(stats::rounds_lost(&g), 2);
    }

    #[test]
    fn short_and_empty_rows_are_skipped() {
        let csv = format!("{HEADER}\n1000,0,1,2.0\n\n17958,0\n");
        let t = Table::parse(&csv).unwrap();
        assert_eq!(t.rows.len(), 1);
        assert_eq!(t.rows[0].train_loss, Some(2.0));
        assert_eq!(t.rows[0].test_accuracy, None);
        assert!(Table::parse("a,b\n1,2\n").is_err());
    }

    #[test]
    fn samples_trained_counts_each_applied_round_once_and_not_the_work_left_out() {
        // Round 1: both peers applied 128 samples; round 2: peer 1's 64 were left out, but it
        // still computed them.
        let csv =
            "t_ms,peer,round,samples,applied_samples\n1,0,1,64,128\n2,1,1,64,128\n3,0,2,64,64\n4,1,2,64,64\n";
        assert_eq!(Table::parse(csv).unwrap().samples_trained(), Some(192));
        // Without the column (PS rows, older runs): every row's work.
        let old = "t_ms,peer,round,samples\n1,0,1,64\n2,1,1,64\n";
        assert_eq!(Table::parse(old).unwrap().samples_trained(), Some(128));
    }
}
