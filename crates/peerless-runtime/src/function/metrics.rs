//! What the function runtime records and leaves in a run directory: the invocation ledger (one
//! record per attempt, `ledger.csv`) and the counters summarised in `function_metrics.json`.
//!
//! [`write_run_metrics`] writes both files; [`Invoker::write_run_metrics`](super::Invoker::write_run_metrics)
//! does it for a live invoker (the `peerless invoke --out` command, a peer's or worker's run
//! directory).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use peerless_core::cost::pico_to_micro;
use peerless_core::function::{InvocationRecord, Outcome};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;

/// File name of the [`Summary`] in a run directory.
pub const FUNCTION_METRICS_FILE: &str = "function_metrics.json";
/// File name of the ledger in a run directory.
pub const LEDGER_FILE: &str = "ledger.csv";

/// The ledger: every invocation attempt's [`InvocationRecord`], in completion order.
/// Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    records: Arc<Mutex<Vec<InvocationRecord>>>,
    /// Records are dropped instead of kept ([`Ledger::discard`]).
    discarding: Arc<AtomicBool>,
}

/// Column names of `ledger.csv`, in order. `max_memory_mb` came last, so a reader of the older
/// columns by position reads a new ledger unchanged.
pub const LEDGER_CSV_HEADER: &str = "function,request_id,node,round,batch,attempt,memory_mb,billed_ms,cold_start,init_us,outcome,cost_pico,max_memory_mb";

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Vec<InvocationRecord>> {
        // Records are only ever pushed whole, so a poisoned lock still holds valid records.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one record (unless the ledger discards them).
    pub fn push(&self, r: InvocationRecord) {
        if !self.discarding.load(Ordering::Relaxed) {
            self.lock().push(r);
        }
    }

    /// From now on drops every record instead of keeping it, and forgets those kept: for a
    /// runtime whose caller keeps its own ledger (a function service's callers do), where
    /// keeping them would only grow the process by a record per invocation for the whole run.
    pub fn discard(&self) {
        self.discarding.store(true, Ordering::Relaxed);
        *self.lock() = Vec::new();
    }

    /// A copy of all records so far.
    pub fn snapshot(&self) -> Vec<InvocationRecord> {
        self.lock().clone()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no attempt has been recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Sum of all charges, pico-dollars.
    pub fn total_cost_pico(&self) -> u64 {
        self.lock().iter().map(|r| r.cost_pico).fold(0u64, u64::saturating_add)
    }

    /// Writes the ledger as CSV (see [`write_ledger_csv`]).
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        write_ledger_csv(path, &self.snapshot())
    }
}

/// Writes `records` as CSV (header [`LEDGER_CSV_HEADER`]) to `path`, replacing it atomically.
pub fn write_ledger_csv(path: &Path, records: &[InvocationRecord]) -> std::io::Result<()> {
    let mut out = String::with_capacity(64 * (records.len() + 1));
    out.push_str(LEDGER_CSV_HEADER);
    out.push('\n');
    for r in records {
        out.push_str(&csv_line(r));
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// Writes a run's function metrics into `dir` (created if missing): [`FUNCTION_METRICS_FILE`]
/// (`summary` as JSON) and [`LEDGER_FILE`] (`ledger` as CSV), each replaced atomically, so a
/// reader never sees half a file even when a long run rewrites them as it goes.
pub fn write_run_metrics(dir: &Path, summary: &Summary, ledger: &[InvocationRecord]) -> std::io::Result<()> {
    write_ledger_csv(&dir.join(LEDGER_FILE), ledger)?;
    let mut json = serde_json::to_string_pretty(summary).expect("invariant: a summary serializes");
    json.push('\n');
    write_atomic(&dir.join(FUNCTION_METRICS_FILE), json.as_bytes())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

/// One record as a CSV line (no newline).
pub fn csv_line(r: &InvocationRecord) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{}",
        csv_field(&r.function),
        csv_field(&r.request_id),
        csv_field(&r.node),
        r.round,
        r.batch,
        r.attempt,
        r.memory_mb,
        r.billed_ms,
        r.cold_start,
        r.init_us,
        outcome_name(r.outcome),
        r.cost_pico,
        r.max_memory_mb
    )
}

/// The snake_case name of an outcome (as serde writes it).
pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::FunctionError => "function_error",
        Outcome::Crashed => "crashed",
        Outcome::Timeout => "timeout",
        Outcome::OutOfMemory => "out_of_memory",
        Outcome::Throttled => "throttled",
    }
}

/// What the function runtime did: counts, latency quantiles and cost, as written to a run
/// directory's `function_metrics.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    /// Attempts, throttled ones included.
    pub invocations: u64,
    /// Attempts that answered.
    pub ok: u64,
    /// Attempts whose function reported an error.
    pub function_errors: u64,
    /// Attempts that needed a new instance.
    pub cold_starts: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// Throttled attempts.
    pub throttles: u64,
    /// Attempts killed at their timeout.
    pub timeouts: u64,
    /// Attempts whose instance died (crashes, injected or not).
    pub crashes: u64,
    /// Attempts killed for exceeding the memory limit.
    pub oom_kills: u64,
    /// Idle instances retired after the keep-alive.
    pub retired: u64,
    /// Attempts that had a fault injected.
    pub faults_injected: u64,
    /// Median attempt latency (µs, cold start included); 0 when none.
    pub latency_p50_us: u64,
    /// 99th percentile attempt latency (µs).
    pub latency_p99_us: u64,
    /// Median cold start (µs); 0 when none.
    pub cold_start_p50_us: u64,
    /// 99th percentile cold start (µs).
    pub cold_start_p99_us: u64,
    /// Sum of billed milliseconds.
    pub billed_ms: u64,
    /// Sum of charges, pico-dollars (the exact figure).
    pub cost_pico: u64,
    /// The same in micro-dollars, rounded down (for reading).
    pub cost_micro: u64,
    /// Lambda's "Max Memory Used": the largest `max_memory_mb` of any attempt, MB.
    pub max_memory_mb: u64,
    /// The same per function name.
    pub max_memory_mb_by_function: BTreeMap<String, u64>,
}

/// The `q`-quantile (0..=1) of `v` by nearest rank; 0 for an empty slice.
pub fn quantile(v: &[u64], q: f64) -> u64 {
    peerless_core::stats::quantile(v, q).unwrap_or(0)
}

/// The runtime's running [`Summary`]: the totals, plus the samples its quantiles are taken from
/// (one `u64` per attempt).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Counts and sums; the quantile fields are filled in by [`Counters::summary`].
    totals: Summary,
    /// Latency (µs) of every attempt that reached an instance, cold start included.
    latencies_us: Vec<u64>,
    /// Cold-start times (µs).
    init_us: Vec<u64>,
}

impl Counters {
    /// A snapshot with the quantiles computed (each sorts every latency recorded so far).
    pub fn summary(&self) -> Summary {
        Summary {
            latency_p50_us: quantile(&self.latencies_us, 0.5),
            latency_p99_us: quantile(&self.latencies_us, 0.99),
            cold_start_p50_us: quantile(&self.init_us, 0.5),
            cold_start_p99_us: quantile(&self.init_us, 0.99),
            ..self.totals()
        }
    }

    /// A snapshot of the counts and sums, the quantile fields left at zero: cheap at any
    /// point of a run, for a node's metrics row every round.
    pub fn totals(&self) -> Summary {
        Summary { cost_micro: pico_to_micro(self.totals.cost_pico), ..self.totals.clone() }
    }

    /// Counts one attempt: its record, its latency if it reached an instance, and whether a
    /// fault was injected into it.
    pub fn record(&mut self, r: &InvocationRecord, latency_us: Option<u64>, injected: bool) {
        let t = &mut self.totals;
        t.invocations += 1;
        if r.attempt > 0 {
            t.retries += 1;
        }
        if r.cold_start {
            t.cold_starts += 1;
            self.init_us.push(r.init_us);
        }
        match r.outcome {
            Outcome::Ok => t.ok += 1,
            Outcome::FunctionError => t.function_errors += 1,
            Outcome::Crashed => t.crashes += 1,
            Outcome::Timeout => t.timeouts += 1,
            Outcome::OutOfMemory => t.oom_kills += 1,
            Outcome::Throttled => t.throttles += 1,
        }
        if injected {
            t.faults_injected += 1;
        }
        t.max_memory_mb = t.max_memory_mb.max(r.max_memory_mb);
        let peak = t.max_memory_mb_by_function.entry(r.function.clone()).or_default();
        *peak = (*peak).max(r.max_memory_mb);
        t.billed_ms = t.billed_ms.saturating_add(r.billed_ms);
        t.cost_pico = t.cost_pico.saturating_add(r.cost_pico);
        if let Some(l) = latency_us {
            self.latencies_us.push(l);
        }
    }

    /// Counts `n` idle instances retired.
    pub fn retire(&mut self, n: u64) {
        self.totals.retired += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discarding_ledger_keeps_nothing() {
        let ledger = Ledger::default();
        ledger.push(rec(Outcome::Ok, 0, 1));
        ledger.discard();
        assert!(ledger.is_empty(), "the record kept before is forgotten");
        ledger.push(rec(Outcome::Ok, 0, 1));
        assert!(ledger.is_empty() && ledger.clone().is_empty(), "a record kept after");
    }

    fn rec(outcome: Outcome, attempt: u32, cost: u64) -> InvocationRecord {
        InvocationRecord {
            function: "echo".into(),
            request_id: "n,1".into(),
            node: "n".into(),
            round: 1,
            batch: 2,
            attempt,
            memory_mb: 128,
            billed_ms: 3,
            cold_start: attempt == 0,
            init_us: 10,
            outcome,
            cost_pico: cost,
            max_memory_mb: 40 + u64::from(attempt),
        }
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.99), 7);
    }

    #[test]
    fn ledger_csv_and_counters() {
        let l = Ledger::default();
        let mut c = Counters::default();
        for r in [rec(Outcome::Crashed, 0, 5), rec(Outcome::Ok, 1, 7)] {
            c.record(&r, Some(100), false);
            l.push(r);
        }
        assert_eq!(l.total_cost_pico(), 12);
        let s = c.summary();
        assert_eq!(
            (s.invocations, s.crashes, s.ok, s.retries, s.cold_starts, s.cost_pico),
            (2, 1, 1, 1, 1, 12)
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.csv");
        l.write_csv(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], LEDGER_CSV_HEADER);
        assert_eq!(lines[1], "echo,\"n,1\",n,1,2,0,128,3,true,10,crashed,5,40");
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn counters_summarise_every_outcome_and_the_quantiles() {
        let mut c = Counters::default();
        let outcomes = [
            Outcome::Ok,
            Outcome::FunctionError,
            Outcome::Crashed,
            Outcome::Timeout,
            Outcome::OutOfMemory,
            Outcome::Throttled,
        ];
        for (i, o) in outcomes.into_iter().enumerate() {
            let latency = (o != Outcome::Throttled).then_some(1000 * (i as u64 + 1));
            c.record(&rec(o, u32::from(i % 2 == 1), 1_500_000), latency, o == Outcome::Crashed);
        }
        c.retire(2);
        let s = c.summary();
        assert_eq!(
            s,
            Summary {
                invocations: 6,
                ok: 1,
                function_errors: 1,
                cold_starts: 3,
                retries: 3,
                throttles: 1,
                timeouts: 1,
                crashes: 1,
                oom_kills: 1,
                retired: 2,
                faults_injected: 1,
                latency_p50_us: 3000,
                latency_p99_us: 5000,
                cold_start_p50_us: 10,
                cold_start_p99_us: 10,
                billed_ms: 18,
                cost_pico: 9_000_000,
                cost_micro: 9,
                max_memory_mb: 41,
                max_memory_mb_by_function: [("echo".to_owned(), 41)].into(),
            }
        );
    }

    #[test]
    fn run_metrics_are_written_as_json_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs/one");
        let mut c = Counters::default();
        let records = vec![rec(Outcome::Timeout, 0, 2_000_001), rec(Outcome::Ok, 1, 3)];
        for r in &records {
            c.record(r, Some(42), false);
        }
        write_run_metrics(&run, &c.summary(), &records).unwrap();
        let text = std::fs::read_to_string(run.join(FUNCTION_METRICS_FILE)).unwrap();
        let back: Summary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c.summary());
        assert_eq!((back.timeouts, back.retries, back.cost_pico, back.cost_micro), (1, 1, 2_000_004, 2));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in ["invocations", "cold_starts", "retries", "throttles", "latency_p50_us", "latency_p99_us"]
        {
            assert!(v.get(key).is_some(), "{key} missing from {text}");
        }
        let csv = std::fs::read_to_string(run.join(LEDGER_FILE)).unwrap();
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.lines().nth(1).unwrap().ends_with(",timeout,2000001,40"), "{csv}");
        // Rewriting replaces both files whole.
        write_run_metrics(&run, &Summary::default(), &[]).unwrap();
        assert_eq!(std::fs::read_to_string(run.join(LEDGER_FILE)).unwrap(), format!("{LEDGER_CSV_HEADER}\n"));
        let names: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    }
}
