//! A node's run files it appends to as it goes: `metrics.csv` (one [`NodeRow`] a round) and
//! `events.jsonl` (one JSON object an event, stamped with the wall clock and the node).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use peerless_core::protocol::PeerIdx;
use serde_json::json;

use super::{NodeError, NodeRow, io_err};

/// A node's open `metrics.csv` and `events.jsonl`.
pub(crate) struct Files {
    dir: PathBuf,
    metrics: BufWriter<File>,
    events: BufWriter<File>,
}

/// Milliseconds since the Unix epoch (the timestamp of rows and events).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Files {
    pub(crate) fn open(dir: &Path) -> Result<Files, NodeError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mp = dir.join("metrics.csv");
        let fresh = !mp.exists();
        let f = OpenOptions::new().create(true).append(true).open(&mp).map_err(io_err(&mp))?;
        let mut metrics = BufWriter::new(f);
        if fresh {
            writeln!(metrics, "{}", NodeRow::header()).map_err(io_err(&mp))?;
        }
        let ep = dir.join("events.jsonl");
        let f = OpenOptions::new().create(true).append(true).open(&ep).map_err(io_err(&ep))?;
        Ok(Files { dir: dir.to_owned(), metrics, events: BufWriter::new(f) })
    }

    /// Appends `ev` (a [`super::NodeEvent`] or a machine's event), stamped with the time and
    /// `peer`, to `events.jsonl`.
    pub(crate) fn event(&mut self, peer: PeerIdx, ev: &impl serde::Serialize) {
        let mut obj = json!({ "t_ms": unix_ms(), "peer": peer });
        let v = serde_json::to_value(ev).unwrap_or_default();
        if let (Some(o), serde_json::Value::Object(extra)) = (obj.as_object_mut(), v) {
            o.extend(extra);
        }
        if writeln!(self.events, "{obj}").and_then(|_| self.events.flush()).is_err() {
            tracing::warn!(dir = %self.dir.display(), "cannot write events.jsonl");
        }
    }

    pub(crate) fn metrics(&mut self, row: &NodeRow) {
        if writeln!(self.metrics, "{}", row.to_csv()).and_then(|_| self.metrics.flush()).is_err() {
            tracing::warn!(dir = %self.dir.display(), "cannot write metrics.csv");
        }
    }
}
