//! The invocation ledger (one record per attempt, `ledger.csv`) and the runtime's counters.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use peerless_core::function::{InvocationRecord, Outcome};
use serde::{Deserialize, Serialize};

/// The ledger: every invocation attempt's [`InvocationRecord`], in completion order.
/// Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    records: Arc<Mutex<Vec<InvocationRecord>>>,
}

/// Column names of `ledger.csv`, in order.
pub const LEDGER_CSV_HEADER: &str =
    "function,request_id,node,round,batch,attempt,memory_mb,billed_ms,cold_start,init_us,outcome,cost_pico";

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Vec<InvocationRecord>> {
        // Records are only ever pushed whole, so a poisoned lock still holds valid records.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one record.
    pub fn push(&self, r: InvocationRecord) {
        self.lock().push(r);
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

    /// Writes the ledger as CSV (header [`LEDGER_CSV_HEADER`]).
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        let records = self.snapshot();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(out, "{LEDGER_CSV_HEADER}")?;
        for r in &records {
            writeln!(out, "{}", csv_line(r))?;
        }
        out.flush()
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

/// One record as a CSV line (no newline).
pub fn csv_line(r: &InvocationRecord) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}",
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
        r.cost_pico
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

/// Counters kept by the runtime (also derivable from the ledger, but cheaper to read).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub attempts: u64,
    pub ok: u64,
    pub function_errors: u64,
    pub cold_starts: u64,
    pub retries: u64,
    pub throttles: u64,
    pub timeouts: u64,
    pub crashes: u64,
    pub oom_kills: u64,
    pub retired: u64,
    pub injected: u64,
    /// Latency (µs) of every attempt that reached an instance, cold start included.
    pub latencies_us: Vec<u64>,
    /// Cold-start times (µs).
    pub init_us: Vec<u64>,
    pub billed_ms: u64,
    pub cost_pico: u64,
}

/// What the function runtime did, for a run directory's `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Sum of charges, pico-dollars.
    pub cost_pico: u64,
}

/// The `q`-quantile (0..=1) of `v` by nearest rank; 0 for an empty slice.
pub fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((q.clamp(0.0, 1.0) * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

impl Counters {
    pub fn summary(&self) -> Summary {
        Summary {
            invocations: self.attempts,
            ok: self.ok,
            function_errors: self.function_errors,
            cold_starts: self.cold_starts,
            retries: self.retries,
            throttles: self.throttles,
            timeouts: self.timeouts,
            crashes: self.crashes,
            oom_kills: self.oom_kills,
            retired: self.retired,
            faults_injected: self.injected,
            latency_p50_us: quantile(&self.latencies_us, 0.5),
            latency_p99_us: quantile(&self.latencies_us, 0.99),
            cold_start_p50_us: quantile(&self.init_us, 0.5),
            cold_start_p99_us: quantile(&self.init_us, 0.99),
            billed_ms: self.billed_ms,
            cost_pico: self.cost_pico,
        }
    }

    pub fn record(&mut self, r: &InvocationRecord) {
        self.attempts += 1;
        if r.attempt > 0 {
            self.retries += 1;
        }
        if r.cold_start {
            self.cold_starts += 1;
            self.init_us.push(r.init_us);
        }
        match r.outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::FunctionError => self.function_errors += 1,
            Outcome::Crashed => self.crashes += 1,
            Outcome::Timeout => self.timeouts += 1,
            Outcome::OutOfMemory => self.oom_kills += 1,
            Outcome::Throttled => self.throttles += 1,
        }
        self.billed_ms = self.billed_ms.saturating_add(r.billed_ms);
        self.cost_pico = self.cost_pico.saturating_add(r.cost_pico);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            c.record(&r);
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
        assert_eq!(lines[1], "echo,\"n,1\",n,1,2,0,128,3,true,10,crashed,5");
        assert_eq!(lines.len(), 3);
    }
}
