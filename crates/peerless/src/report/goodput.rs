//! Goodput: a run's training throughput over that of the same seed of its scenario's
//! fault-free twin, the scenario its `baseline` names (default `no-faults`) in the same
//! experiment. Pure functions over runs already read.

use super::run::Run;
use super::{Experiment, ScenarioRuns, ScenarioSpec};

/// The twin of a scenario that names none.
pub const DEFAULT_TWIN: &str = "no-faults";

/// The name of the fault-free twin of `spec`: its `baseline`, else [`DEFAULT_TWIN`].
pub fn twin_name(spec: &ScenarioSpec) -> &str {
    spec.baseline.as_deref().unwrap_or(DEFAULT_TWIN)
}

/// The fault-free twin of `s` in `exp`; `None` when the experiment has no scenario of that name.
pub(super) fn twin<'a>(exp: &'a Experiment, s: &ScenarioRuns) -> Option<&'a ScenarioRuns> {
    let name = twin_name(&s.spec);
    exp.scenarios.iter().find(|t| t.spec.name == name)
}

/// The goodput of each of `runs` (seed, run): its throughput over that of the run of the same
/// seed in `twin`; `None` when that seed has no twin run or either has no throughput.
pub(super) fn per_seed(runs: &[(u64, Run)], twin: &[(u64, Run)]) -> Vec<Option<f64>> {
    runs.iter()
        .map(|(seed, r)| {
            let base = twin.iter().find(|(s, _)| s == seed)?.1.throughput()?;
            Some(r.throughput()? / base)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::{Cell, ExperimentFile, markdown};
    use super::*;
    use crate::report::run::Summary;

    /// A finished run of `wall_s` seconds: its summary says `samples_per_s`, its metrics
    /// `samples` in all (`None`: a run whose metrics have no samples column).
    fn run(samples_per_s: f64, wall_s: f64, samples: Option<u64>) -> Run {
        Run {
            summary: Summary { samples_per_s, wall_time_s: wall_s, completed: true, ..Summary::default() },
            compute: "functions".into(),
            aggregation: None,
            aggregator: "mean".into(),
            function_faults: false,
            sync: "every-step".into(),
            compression: "none".into(),
            global: Vec::new(),
            evals: Vec::new(),
            loss: Vec::new(),
            faults: Vec::new(),
            column_means: Default::default(),
            samples_trained: samples,
        }
    }

    fn scenario(name: &str, baseline: Option<&str>, cells: Vec<(&str, Vec<(u64, Run)>)>) -> ScenarioRuns {
        let spec = ScenarioSpec {
            name: name.into(),
            description: String::new(),
            target_accuracy: None,
            file: None,
            baseline: baseline.map(str::to_owned),
        };
        let cells = cells
            .into_iter()
            .map(|(arch, runs)| Cell { arch: arch.into(), runs, missing: Vec::new() })
            .collect();
        ScenarioRuns { spec, cells }
    }

    #[test]
    fn goodput_divides_by_the_same_seed_of_the_twin_and_is_missing_without_one() {
        // The twin ran P2P seeds 1 and 2 (100 and 80 samples/s), never PS.
        let twin = scenario(
            "no-faults",
            None,
            vec![("p2p", vec![(1, run(100.0, 10.0, None)), (2, run(0.0, 10.0, Some(800)))])],
        );
        // Seed 1 from the summary (95/s), seed 2 from its metrics rows (600 samples in 10 s),
        // seed 3 has no twin run.
        let churn = scenario(
            "churn",
            None,
            vec![
                (
                    "p2p",
                    vec![
                        (1, run(95.0, 20.0, None)),
                        (2, run(1e6, 10.0, Some(600))),
                        (3, run(70.0, 10.0, None)),
                    ],
                ),
                ("ps", vec![(1, run(50.0, 10.0, None))]),
            ],
        );
        let orphan = scenario("calm-churn", Some("calm"), vec![("p2p", vec![(1, run(90.0, 10.0, None))])]);
        let exp = Experiment {
            dir: PathBuf::from("exp"),
            file: ExperimentFile {
                scenarios: Vec::new(),
                archs: vec!["p2p".into(), "ps".into()],
                seeds: vec![1, 2, 3],
                command: None,
            },
            scenarios: vec![twin, churn, orphan],
        };
        let (twin, churn, orphan) = (&exp.scenarios[0], &exp.scenarios[1], &exp.scenarios[2]);
        assert_eq!(super::twin(&exp, churn).map(|t| t.spec.name.as_str()), Some("no-faults"));
        assert!(super::twin(&exp, orphan).is_none(), "calm was not run");
        let g = per_seed(churn.runs("p2p"), twin.runs("p2p"));
        assert_eq!(g.len(), 3);
        assert!((g[0].unwrap() - 0.95).abs() < 1e-12, "{g:?}");
        assert!((g[1].unwrap() - 0.75).abs() < 1e-12, "{g:?}");
        assert_eq!(g[2], None, "seed 3 has no twin run");
        assert_eq!(per_seed(churn.runs("ps"), twin.runs("ps")), [None]);
        // The report's cells: the mean over seeds with its interval, "—" without a twin.
        let cell = |s: &ScenarioRuns, arch: &str| markdown::goodput_cell(&markdown::figures(&exp, s, arch));
        assert_eq!(cell(churn, "p2p"), "85 ± 127");
        assert_eq!(cell(churn, "ps"), "—");
        assert_eq!(cell(orphan, "p2p"), "—");
        assert_eq!(cell(twin, "p2p"), "100.0 ± 0.0", "the twin against itself");
    }
}
