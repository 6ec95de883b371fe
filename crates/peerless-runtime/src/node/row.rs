//! One row of a node's `metrics.csv` (peer, PS or worker): every column named once, typed, in
//! one order that gives both the header and the row. A column a role does not measure is empty.

/// One round (PS: model version; worker: gradient) of one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeRow {
    /// Wall clock, ms since the Unix epoch.
    pub t_ms: u64,
    /// The node's index.
    pub node: u32,
    /// Rounds (versions, gradients) done.
    pub round: u64,
    /// Epochs done.
    pub epoch: f64,
    /// Seconds since the node started.
    pub wall_s: f64,
    /// The round's training loss.
    pub train_loss: Option<f32>,
    /// Nodes expected in the round.
    pub view: Option<usize>,
    /// Gradients aggregated.
    pub contributors: Option<usize>,
    /// Samples this node's gradient work covered.
    pub samples: Option<u64>,
    /// Bytes received from other nodes so far.
    pub bytes_in: u64,
    /// Bytes sent to other nodes so far.
    pub bytes_out: u64,
    /// Function invocation attempts in the round.
    pub invocations: Option<u64>,
    /// Cold starts in the round.
    pub cold_starts: Option<u64>,
    /// Retries in the round.
    pub retries: Option<u64>,
    /// Gradient work, ms.
    pub compute_ms: Option<f64>,
    /// Waiting for the others (PS: the whole round), ms.
    pub wait_ms: Option<f64>,
    /// Sending the gradient, ms.
    pub exchange_ms: Option<f64>,
    /// Aggregating, ms.
    pub aggregate_ms: Option<f64>,
    /// The optimizer step, ms.
    pub update_ms: Option<f64>,
    /// Cost so far, pico-dollars.
    pub cost_pico: Option<u64>,
    /// The round an evaluation in this row is of.
    pub eval_round: Option<u64>,
    /// Test loss of that evaluation.
    pub test_loss: Option<f32>,
    /// Test accuracy of that evaluation.
    pub test_accuracy: Option<f32>,
    /// Versions between the gradients' and the model's (PS).
    pub staleness: Option<u64>,
    /// From the last function's answer to the node holding the sum, ms.
    pub gather_ms: Option<f64>,
    /// The Byzantine bound the aggregation rule worked with.
    pub effective_f: Option<usize>,
    /// Samples behind the gradients the round applied (P2P: every included peer's; what
    /// training actually used, unlike `samples`, which counts this node's work even when the
    /// round left it out).
    pub applied_samples: Option<u64>,
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

fn fixed(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_default()
}

impl NodeRow {
    /// Every column: its name, and this row's value as written.
    fn cells(&self) -> [(&'static str, String); 27] {
        [
            ("t_ms", self.t_ms.to_string()),
            ("peer", self.node.to_string()),
            ("round", self.round.to_string()),
            ("epoch", format!("{:.4}", self.epoch)),
            ("wall_s", format!("{:.4}", self.wall_s)),
            ("train_loss", fixed(self.train_loss.map(f64::from), 6)),
            ("view", opt(self.view)),
            ("contributors", opt(self.contributors)),
            ("samples", opt(self.samples)),
            ("bytes_in", self.bytes_in.to_string()),
            ("bytes_out", self.bytes_out.to_string()),
            ("invocations", opt(self.invocations)),
            ("cold_starts", opt(self.cold_starts)),
            ("retries", opt(self.retries)),
            ("compute_ms", fixed(self.compute_ms, 2)),
            ("wait_ms", fixed(self.wait_ms, 2)),
            ("exchange_ms", fixed(self.exchange_ms, 2)),
            ("aggregate_ms", fixed(self.aggregate_ms, 3)),
            ("update_ms", fixed(self.update_ms, 3)),
            ("cost_pico", opt(self.cost_pico)),
            ("eval_round", opt(self.eval_round)),
            ("test_loss", fixed(self.test_loss.map(f64::from), 6)),
            ("test_accuracy", fixed(self.test_accuracy.map(f64::from), 6)),
            ("staleness", opt(self.staleness)),
            ("gather_ms", fixed(self.gather_ms, 3)),
            ("effective_f", opt(self.effective_f)),
            ("applied_samples", opt(self.applied_samples)),
        ]
    }

    /// The header line of `metrics.csv`.
    pub fn header() -> String {
        NodeRow::default().cells().map(|(name, _)| name).join(",")
    }

    /// This row as a CSV line.
    pub fn to_csv(&self) -> String {
        self.cells().map(|(_, value)| value).join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_rows_have_the_same_columns_and_empty_cells_for_what_a_role_lacks() {
        let header = NodeRow::header();
        assert!(header.starts_with("t_ms,peer,round,epoch,wall_s,train_loss,view,contributors"));
        assert!(header.ends_with("staleness,gather_ms,effective_f,applied_samples"));
        let row = NodeRow { t_ms: 5, node: 1, round: 2, epoch: 0.5, wall_s: 1.0, ..NodeRow::default() };
        let line = row.to_csv();
        assert_eq!(line.split(',').count(), header.split(',').count());
        assert!(line.starts_with("5,1,2,0.5000,1.0000,,,"), "{line}");
        let full = NodeRow { train_loss: Some(0.25), effective_f: Some(1), compute_ms: Some(1.234), ..row };
        assert!(full.to_csv().starts_with("5,1,2,0.5000,1.0000,0.250000,"), "{}", full.to_csv());
        assert!(full.to_csv().contains(",1.23,") && full.to_csv().ends_with(",1,"), "{}", full.to_csv());
    }
}
