//! The progress view of a run: one indicatif bar with loss, accuracy and throughput.

use indicatif::{ProgressBar, ProgressStyle};
use peerless_runtime::local::Progress;

/// A progress bar fed by the training loop's [`Progress`] reports.
#[derive(Debug)]
pub struct RunProgress {
    bar: ProgressBar,
    accuracy: Option<f32>,
}

impl RunProgress {
    /// A bar titled `title`; hidden automatically when stderr is not a terminal.
    pub fn new(title: &str) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} rounds (eta {eta}) {msg}",
            )
            .expect("invariant: valid template"),
        );
        bar.set_prefix(title.to_string());
        RunProgress { bar, accuracy: None }
    }

    /// Applies one report.
    pub fn update(&mut self, p: &Progress) {
        match p {
            Progress::Start { total, done } => {
                self.bar.set_length(*total);
                self.bar.set_position(*done);
                self.bar.reset_eta();
            }
            Progress::Round(row) => {
                if let Some(a) = row.test_accuracy {
                    self.accuracy = Some(a);
                }
                self.bar.set_position(row.round);
                let acc = self.accuracy.map(|a| format!(" acc {:.2}%", a * 100.0)).unwrap_or_default();
                self.bar.set_message(format!(
                    "loss {:.4}{acc} {:.0} samples/s",
                    row.train_loss, row.samples_per_s
                ));
            }
            Progress::Checkpoint { .. } => {}
        }
    }

    /// Removes the bar so the summary prints cleanly.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
