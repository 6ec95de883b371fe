//! What the function runtime records and leaves in a run directory: the invocation ledger (one
//! record per attempt, `ledger.csv`) and the counters summarised in `function_metrics.json`.
//!
//! [`write_run_metrics`] writes both files; [`Invoker::write_run_metrics`](super::Invoker::write_run_metrics)
//! does it for a live invoker (the `peerless invoke --out` command, a peer's or worker's run
//! directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
///
/// It keeps its records in memory until it is told to stream them to a file
/// ([`Ledger::stream_to`]); from then on each record is appended to that CSV file as it
/// comes (one `write` of a line, a few µs) and nothing is kept. A node streams: kept, its
/// ledger grew by a record per invocation for the whole run (about 140 MB an hour at 300
/// rounds a second), and a node that is killed now leaves every finished attempt behind.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    records: Arc<Mutex<Records>>,
    /// Records are dropped instead of kept ([`Ledger::discard`]).
    discarding: Arc<AtomicBool>,
}

/// The records a [`Ledger`] holds: all of them, or those not yet streamed to its file.
#[derive(Debug, Default)]
struct Records {
    kept: Vec<InvocationRecord>,
    stream: Option<Stream>,
}

/// The file a streaming [`Ledger`] appends to, and the lines a failed write left waiting.
#[derive(Debug)]
struct Stream {
    path: PathBuf,
    file: std::fs::File,
    pending: String,
    /// The last write failed (warned once; retried with the next record).
    failing: bool,
}

/// Column names of `ledger.csv`, in order. `max_memory_mb` came last, so a reader of the older
/// columns by position reads a new ledger unchanged.
pub const LEDGER_CSV_HEADER: &str = "function,request_id,node,round,batch,attempt,memory_mb,billed_ms,cold_start,init_us,outcome,cost_pico,max_memory_mb";

impl Stream {
    /// Opens `path` for appending: a ledger already there (this node's before a restart) is
    /// continued, cut back to its last whole line; otherwise the file starts with the header.
    fn open(path: &Path) -> std::io::Result<Stream> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file =
            std::fs::OpenOptions::new().read(true).append(true).create(true).truncate(false).open(path)?;
        let header = format!("{LEDGER_CSV_HEADER}\n");
        let mut head = vec![0; header.len()];
        let is_ledger = file.read_exact(&mut head).is_ok() && head == header.as_bytes();
        // A line is a few hundred bytes: the last whole one ends within the file's tail.
        let len = file.seek(SeekFrom::End(0))?;
        let keep = if is_ledger {
            let from = len.saturating_sub(64 * 1024).max(header.len() as u64 - 1);
            let mut tail = Vec::new();
            file.seek(SeekFrom::Start(from))?;
            file.read_to_end(&mut tail)?;
            tail.iter().rposition(|&b| b == b'\n').map_or(header.len() as u64, |i| from + i as u64 + 1)
        } else {
            0
        };
        if keep != len {
            file.set_len(keep)?;
        }
        let pending = if keep == 0 { header } else { String::new() };
        Ok(Stream { path: path.to_owned(), file, pending, failing: false })
    }

    /// Adds `r`'s line to those waiting for the next write.
    fn queue(&mut self, r: &InvocationRecord) {
        self.pending.push_str(&csv_line(r));
        self.pending.push('\n');
    }

    fn push(&mut self, r: &InvocationRecord) {
        self.queue(r);
        let _ = self.flush();
    }

    /// Appends the waiting lines in one write (whole lines only: a reader sees no half line
    /// unless the write itself is cut short).
    fn flush(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if self.pending.is_empty() {
            return Ok(());
        }
        match self.file.write_all(self.pending.as_bytes()) {
            Ok(()) => {
                self.pending.clear();
                self.failing = false;
                Ok(())
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(path = %self.path.display(), error = %e, "appending to the ledger failed; the records wait in memory for the next try");
                }
                self.failing = true;
                Err(e)
            }
        }
    }
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Records> {
        // Records are only ever pushed whole, so a poisoned lock still holds valid records.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one record (unless the ledger discards them).
    pub fn push(&self, r: InvocationRecord) {
        if self.discarding.load(Ordering::Relaxed) {
            return;
        }
        let mut records = self.lock();
        match &mut records.stream {
            Some(stream) => stream.push(&r),
            None => records.kept.push(r),
        }
    }

    /// From now on drops every record instead of keeping it, and forgets those kept: for a
    /// runtime whose caller keeps its own ledger (a function service's callers do), where
    /// keeping them would only grow the process by a record per invocation for the whole run.
    pub fn discard(&self) {
        self.discarding.store(true, Ordering::Relaxed);
        self.lock().kept = Vec::new();
    }

    /// From now on appends every record to the CSV file at `path` (see the type's docs),
    /// starting with those kept so far; a ledger already at `path` is continued.
    ///
    /// # Errors
    /// If the file cannot be opened, read or written; the ledger then keeps its records.
    pub fn stream_to(&self, path: &Path) -> std::io::Result<()> {
        let mut stream = Stream::open(path)?;
        let mut records = self.lock();
        std::mem::take(&mut records.kept).iter().for_each(|r| stream.queue(r));
        let written = stream.flush();
        records.stream = Some(stream);
        written
    }

    /// The records held in memory: all of them, or, once streaming, only those not yet
    /// appended to the file.
    pub fn snapshot(&self) -> Vec<InvocationRecord> {
        self.lock().kept.clone()
    }

    /// Number of records held in memory (see [`Ledger::snapshot`]).
    pub fn len(&self) -> usize {
        self.lock().kept.len()
    }

    /// Whether no record is held in memory (see [`Ledger::snapshot`]).
    pub fn is_empty(&self) -> bool {
        self.lock().kept.is_empty()
    }

    /// Writes the ledger as CSV to `path`: the records held, replacing the file atomically
    /// (see [`write_ledger_csv`]); a ledger streaming to `path` appends what waits instead.
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        let mut records = self.lock();
        match &mut records.stream {
            Some(stream) if stream.path == path => stream.flush(),
            _ => write_ledger_csv(path, &records.kept),
        }
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
pub fn write_run_metrics(dir: &Path, summary: &Summary, ledger: &Ledger) -> std::io::Result<()> {
    ledger.write_csv(&dir.join(LEDGER_FILE))?;
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

    /// `ledger.csv` as lines.
    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_streaming_ledger_keeps_nothing_and_writes_every_record_once_as_it_comes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let ledger = Ledger::default();
        ledger.push(rec(Outcome::Ok, 0, 1));
        ledger.stream_to(&path).unwrap();
        assert!(ledger.is_empty(), "the record kept before streaming is in the file");
        assert_eq!(lines(&path).len(), 2, "header and the first record");
        let n = 1000;
        for i in 0..n {
            ledger.push(rec(Outcome::Ok, 1, i as u64));
            assert!(ledger.is_empty());
        }
        // In the file before any final write: a node killed now leaves them all.
        let text = lines(&path);
        assert_eq!(text.len(), 1 + 1 + n);
        assert_eq!(text[0], LEDGER_CSV_HEADER);
        assert_eq!(text.last().unwrap(), &csv_line(&rec(Outcome::Ok, 1, n as u64 - 1)));
        // Writing again adds nothing: every record is in the file once.
        ledger.write_csv(&path).unwrap();
        assert_eq!(lines(&path).len(), 2 + n);
    }

    #[test]
    fn a_streaming_ledger_continues_the_file_of_a_restarted_node_from_its_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let before =
            format!("{LEDGER_CSV_HEADER}\n{}\n{}", csv_line(&rec(Outcome::Ok, 0, 1)), "echo,half-a-li");
        std::fs::write(&path, before).unwrap();
        let ledger = Ledger::default();
        ledger.stream_to(&path).unwrap();
        ledger.push(rec(Outcome::Crashed, 2, 9));
        ledger.write_csv(&path).unwrap();
        assert_eq!(
            lines(&path),
            [
                LEDGER_CSV_HEADER.to_owned(),
                csv_line(&rec(Outcome::Ok, 0, 1)),
                csv_line(&rec(Outcome::Crashed, 2, 9))
            ]
        );
        // A file that is not a ledger is started over.
        std::fs::write(&path, "something else\n").unwrap();
        let other = Ledger::default();
        other.stream_to(&path).unwrap();
        other.write_csv(&path).unwrap();
        assert_eq!(lines(&path), [LEDGER_CSV_HEADER]);
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
        assert_eq!(l.snapshot().iter().map(|r| r.cost_pico).sum::<u64>(), 12);
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
        let ledger = Ledger::default();
        for r in &records {
            c.record(r, Some(42), false);
            ledger.push(r.clone());
        }
        write_run_metrics(&run, &c.summary(), &ledger).unwrap();
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
        write_run_metrics(&run, &Summary::default(), &Ledger::default()).unwrap();
        assert_eq!(std::fs::read_to_string(run.join(LEDGER_FILE)).unwrap(), format!("{LEDGER_CSV_HEADER}\n"));
        let names: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    }
}
