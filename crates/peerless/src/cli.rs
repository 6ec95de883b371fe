//! Command-line arguments (clap derive) and dispatch to the subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use peerless_core::optim::OptimizerConfig;
use peerless_ml::{Arch, Backend, DatasetName};
use peerless_runtime::config::{RunConfig, TrainArch};

/// peerless: serverless peer-to-peer ML training, and the parameter-server baseline it is
/// measured against.
#[derive(Debug, Parser)]
#[command(name = "peerless", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model: `--arch local` in one process, `--arch p2p` on a local cluster of peer
    /// processes.
    Train(Box<TrainArgs>),
    /// Run one peer of a P2P run (the launcher starts these).
    Peer(crate::p2p_cmd::PeerArgs),
    /// Run the parameter server of a PS run (the launcher starts it).
    Ps(crate::p2p_cmd::PeerArgs),
    /// Run one worker of a PS run (the launcher starts these).
    Worker(crate::p2p_cmd::PeerArgs),
    /// Datasets: fetch, verify.
    #[command(subcommand)]
    Data(DataCommand),
    /// Benchmarks that report ratios against a reference measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run as a function instance (a Lambda custom runtime); started by the function runtime,
    /// which sets AWS_LAMBDA_RUNTIME_API and the other Lambda variables.
    #[command(hide = true)]
    Function,
    /// Invoke a function once on a local function runtime; prints the answer, then each
    /// attempt's ledger record (JSON lines).
    Invoke(Box<crate::function_cmd::InvokeArgs>),
    /// Run scenarios (files or directories of them) × architectures × seeds, one run
    /// directory each, injecting each scenario's faults; resumable.
    Experiment(Box<crate::experiment::ExperimentArgs>),
    /// Write `report.md` and charts for an experiment directory from its run files.
    Report {
        /// The experiment directory (holding experiment.json).
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Warm invocation overhead of `echo` through the local function runtime against a direct
    /// in-process call, and cold-start time.
    Invoke(crate::function_cmd::BenchInvokeArgs),
    /// P2P rounds on 1, 2 and 4 local peers (time split, samples/s) and the peer network's
    /// exchange throughput as a ratio of a plain TCP copy.
    P2p {
        /// Rounds per cluster size.
        #[arg(long, default_value_t = 60)]
        rounds: u64,
        /// Dataset (default: MNIST when present, else the embedded digits).
        #[arg(long)]
        dataset: Option<DatasetName>,
        /// `functions` or `local`.
        #[arg(long, default_value = "functions")]
        compute: ComputeArg,
        /// Directory for the runs (default: a temporary one).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One MLP training step (flat vectors in and out) on every backend of this build (the
    /// default one, and OpenBLAS in a `--features openblas` build) against PyTorch on one
    /// thread, interleaved in one run; prints the default's ratio to each.
    Step {
        /// burn backend: `ndarray` or `flex`; `all` measures both.
        #[arg(long, default_value = "all")]
        backend: String,
        /// Steps per measurement.
        #[arg(long, default_value_t = 500)]
        steps: usize,
        /// Interleaved passes (each measures every contender once); medians are compared.
        #[arg(long, default_value_t = 5)]
        passes: usize,
        /// The Python to run the PyTorch reference with [default: $PEERLESS_PYTHON, else
        /// python3].
        #[arg(long)]
        python: Option<String>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Obtain a dataset into the data directory and verify its checksums.
    Fetch {
        /// `mnist`, `fashion-mnist` or `digits` (embedded; nothing to fetch).
        name: DatasetName,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Verify a dataset's files against their pinned checksums and load them.
    Verify {
        /// Dataset name.
        name: DatasetName,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Debug, Args)]
struct DataDirArg {
    /// Directory holding `<dataset>/` IDX files, or one dataset's IDX files directly
    /// [default: $PEERLESS_DATA_DIR, else ~/.local/share/peerless].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// `peerless train`. Flags override the `--config` file, which overrides the defaults.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML configuration file (every key documented in the README; unknown keys are errors).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// An experiment scenario: its `[run]` is the config (the other flags override it) and
    /// the launcher injects its `[[fault]]`s (P2P and PS runs).
    #[arg(long, conflicts_with = "config")]
    pub scenario: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// `local` (one process), `p2p` or `ps`.
    #[arg(long)]
    pub arch: Option<TrainArchArg>,
    /// `logreg`, `mlp` or `lenet`.
    #[arg(long)]
    pub model: Option<String>,
    /// `digits` (embedded), `mnist` or `fashion-mnist`.
    #[arg(long)]
    pub dataset: Option<DatasetName>,
    /// Where the dataset is: a folder of dataset folders (`<dir>/mnist/…`), or a folder that
    /// holds one dataset's four IDX files (plain or `.gz`) directly.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Passes over the training set.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Optimizer steps (overrides --epochs when > 0).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Mini-batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate.
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// `sgd` or `adam` (with that optimizer's default hyper-parameters).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// The seed every random choice derives from.
    #[arg(long)]
    pub seed: Option<u64>,
    /// burn CPU backend: `auto`, `ndarray` or `flex`.
    #[arg(long)]
    pub backend: Option<String>,
    /// Evaluate every this many rounds (0: once per epoch).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Checkpoint every this many rounds (0: only at the end).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Run name (the run directory is `runs/<name>/` unless --out is given).
    #[arg(long)]
    pub name: Option<String>,
    /// Run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop after this many rounds with a checkpoint, as if interrupted (for tests of resume).
    #[arg(long, hide = true)]
    pub halt_at_round: Option<u64>,
    /// P2P: peers to start (PS: workers; `--workers` is the same flag).
    #[arg(long, alias = "workers")]
    pub peers: Option<u32>,
    /// P2P: gradient functions each peer invokes per round, one mini-batch each (PS: per
    /// worker; `--functions-per-worker` is the same flag).
    #[arg(long, alias = "functions-per-worker")]
    pub functions_per_peer: Option<u32>,
    /// P2P: where gradients are computed: `functions` (serverless) or `local` (in the peer).
    #[arg(long)]
    pub compute: Option<ComputeArg>,
    /// Functions: sum a node's gradients `in-store` (as they land) or `fetch` each and sum
    /// them in the node (the comparison baseline).
    #[arg(long)]
    pub aggregation: Option<AggregationArg>,
    /// PS: `sync` rounds (the default) or `async` updates with a staleness bound.
    #[arg(long)]
    pub ps_mode: Option<PsModeArg>,
    /// PS, asynchronous mode: drop gradients more than this many versions old.
    #[arg(long)]
    pub max_staleness: Option<u64>,
}

/// `--ps-mode` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PsModeArg {
    /// Synchronous rounds, like P2P.
    Sync,
    /// Asynchronous updates.
    Async,
}

/// `--aggregation` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AggregationArg {
    /// In the store, as gradients land.
    InStore,
    /// Fetched one by one and summed by the node.
    Fetch,
}

/// `--compute` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ComputeArg {
    /// Gradient function invocations.
    Functions,
    /// In the peer process (serverful baseline).
    Local,
}

/// `--arch` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TrainArchArg {
    /// One process.
    Local,
    /// Peer-to-peer serverless.
    P2p,
    /// Parameter server.
    Ps,
}

impl TrainArgs {
    /// Applies the flags that change what is computed onto `cfg`.
    pub fn apply(&self, cfg: &mut RunConfig) -> Result<()> {
        if let Some(a) = self.arch {
            cfg.train.arch = match a {
                TrainArchArg::Local => TrainArch::Local,
                TrainArchArg::P2p => TrainArch::P2p,
                TrainArchArg::Ps => TrainArch::Ps,
            };
        }
        if let Some(m) = &self.model {
            cfg.model.arch = m.parse::<Arch>().context("--model")?;
        }
        if let Some(b) = &self.backend {
            cfg.model.backend = b.parse::<Backend>().context("--backend")?;
        }
        if let Some(d) = self.dataset {
            cfg.data.dataset = d;
        }
        if let Some(d) = &self.data_dir {
            cfg.data.dir = d.clone();
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        if let Some(b) = self.batch_size {
            cfg.train.batch_size = b;
        }
        // `--optimizer` switches to that optimizer with its default hyper-parameters (unless the
        // config already uses it); `--lr` then overrides the learning rate.
        if let Some(o) = self.optimizer.as_deref().filter(|o| *o != cfg.optimizer.name()) {
            cfg.optimizer = match o {
                "sgd" => OptimizerConfig::sgd(0.02),
                "adam" => OptimizerConfig::adam(1e-3),
                other => bail!("--optimizer {other:?}: expected sgd or adam"),
            };
        }
        if let Some(lr) = self.lr {
            cfg.optimizer = cfg.optimizer.clone().with_lr(lr);
        }
        if let Some(n) = &self.name {
            cfg.name = n.clone();
        }
        if let Some(n) = self.peers {
            cfg.p2p.peers = n;
        }
        if let Some(k) = self.functions_per_peer {
            cfg.p2p.functions_per_peer = k;
        }
        if let Some(c) = self.compute {
            cfg.p2p.compute = match c {
                ComputeArg::Functions => peerless_runtime::config::Compute::Functions,
                ComputeArg::Local => peerless_runtime::config::Compute::Local,
            };
        }
        if let Some(a) = self.aggregation {
            cfg.p2p.aggregation = match a {
                AggregationArg::InStore => peerless_runtime::config::Aggregation::InStore,
                AggregationArg::Fetch => peerless_runtime::config::Aggregation::Fetch,
            };
        }
        if let Some(m) = self.ps_mode {
            cfg.ps.mode = match m {
                PsModeArg::Sync => peerless_runtime::config::PsModeName::Sync,
                PsModeArg::Async => peerless_runtime::config::PsModeName::Async,
            };
        }
        if let Some(s) = self.max_staleness {
            cfg.ps.max_staleness = s;
        }
        self.apply_schedule(cfg);
        Ok(())
    }

    /// Flags that only change how long a run goes or how often it reports (allowed on resume).
    pub fn apply_schedule(&self, cfg: &mut RunConfig) {
        if let Some(e) = self.epochs {
            cfg.train.epochs = e;
            if self.rounds.is_none() {
                cfg.train.rounds = 0;
            }
        }
        if let Some(r) = self.rounds {
            cfg.train.rounds = r;
        }
        if let Some(k) = self.eval_every {
            cfg.train.eval_every = k;
        }
        if let Some(k) = self.checkpoint_every {
            cfg.train.checkpoint_every = k;
        }
    }

    /// Names of flags given that would change the computation (refused on resume).
    pub fn computation_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let checks: [(&'static str, bool); 18] = [
            ("--aggregation", self.aggregation.is_some()),
            ("--ps-mode", self.ps_mode.is_some()),
            ("--max-staleness", self.max_staleness.is_some()),
            ("--peers", self.peers.is_some()),
            ("--functions-per-peer", self.functions_per_peer.is_some()),
            ("--compute", self.compute.is_some()),
            ("--arch", self.arch.is_some()),
            ("--model", self.model.is_some()),
            ("--dataset", self.dataset.is_some()),
            ("--seed", self.seed.is_some()),
            ("--batch-size", self.batch_size.is_some()),
            ("--lr", self.lr.is_some()),
            ("--optimizer", self.optimizer.is_some()),
            ("--backend", self.backend.is_some()),
            ("--name", self.name.is_some()),
            ("--out", self.out.is_some()),
            ("--config", self.config.is_some()),
            ("--scenario", self.scenario.is_some()),
        ];
        for (name, given) in checks {
            if given {
                v.push(name);
            }
        }
        v
    }
}

/// The data directory: the flag, else `$PEERLESS_DATA_DIR`, else `$XDG_DATA_HOME/peerless`,
/// else `~/.local/share/peerless`.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag.filter(|p| !p.as_os_str().is_empty()) {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("PEERLESS_DATA_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("peerless");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/peerless")
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train(args) => crate::train::run(*args),
        Command::Function => crate::function_cmd::run_function(),
        Command::Peer(args) => crate::p2p_cmd::run_node(crate::p2p_cmd::Role::Peer, args),
        Command::Ps(args) => crate::p2p_cmd::run_node(crate::p2p_cmd::Role::Ps, args),
        Command::Worker(args) => crate::p2p_cmd::run_node(crate::p2p_cmd::Role::Worker, args),
        Command::Invoke(args) => crate::function_cmd::run_invoke(*args),
        Command::Experiment(args) => crate::experiment::run(*args),
        Command::Report { dir } => crate::report::run_cli(&dir),
        Command::Bench(BenchCommand::Invoke(args)) => crate::function_cmd::run_bench_invoke(args),
        Command::Bench(BenchCommand::P2p { rounds, dataset, compute, out, json }) => {
            let mut cfg = RunConfig::default();
            cfg.data.dir = data_dir(None);
            cfg.data.dataset = dataset.unwrap_or_else(|| {
                if peerless_ml::data::load(DatasetName::Mnist, &cfg.data.dir).is_ok() {
                    DatasetName::Mnist
                } else {
                    DatasetName::Digits
                }
            });
            cfg.p2p.compute = match compute {
                ComputeArg::Functions => peerless_runtime::config::Compute::Functions,
                ComputeArg::Local => peerless_runtime::config::Compute::Local,
            };
            let tmp;
            let dir = match out {
                Some(d) => d,
                None => {
                    tmp = std::env::temp_dir().join(format!("peerless-bench-p2p-{}", std::process::id()));
                    tmp
                }
            };
            let r = crate::bench::p2p::run(&cfg, rounds.max(5), &dir)?;
            println!("\nP2P rounds, {} (medians, ms)", r.dataset);
            println!("peers  samples/s (steady)  round  compute   wait  exchange  aggregate  update");
            for c in &r.clusters {
                println!(
                    "{:>5} {:>9.0} ({:>6.0}) {:>6.1} {:>8.1} {:>6.1} {:>9.1} {:>10.2} {:>7.2}",
                    c.peers,
                    c.samples_per_s,
                    c.steady_samples_per_s,
                    c.round_ms,
                    c.compute_ms,
                    c.wait_ms,
                    c.exchange_ms,
                    c.aggregate_ms,
                    c.update_ms
                );
            }
            println!("\nexchange throughput on loopback (libp2p TCP+Noise+Yamux vs plain TCP, same run)");
            for e in &r.exchange {
                println!(
                    "{:>6.1} MB: libp2p {:>7.0} MB/s, TCP {:>7.0} MB/s, ratio {:.2}",
                    e.bytes as f64 / (1 << 20) as f64,
                    e.libp2p_mb_s,
                    e.tcp_mb_s,
                    e.ratio
                );
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Fetch { name, dir }) => {
            let dir = data_dir(dir.data_dir.as_deref());
            let report = peerless_ml::data::fetch(name, &dir)?;
            if report.embedded {
                println!("{name} is embedded in the binary; nothing to fetch");
                return Ok(ExitCode::SUCCESS);
            }
            for a in &report.attempts {
                match &a.error {
                    None => println!("  {}: ok ({} files)", a.source, a.installed.len()),
                    Some(e) => println!("  {}: {} file(s), then failed: {e}", a.source, a.installed.len()),
                }
            }
            println!(
                "{name}: verified in {} ({} already present, {} fetched)",
                report.dir.display(),
                report.already_present.len(),
                report.fetched.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Step { backend, steps, passes, python, json }) => {
            let backends = match backend.as_str() {
                "all" => vec![Backend::Ndarray, Backend::Flex],
                b => vec![b.parse::<Backend>()?],
            };
            let r = crate::bench::step(&backends, steps.max(1), passes, python.as_deref())?;
            crate::bench::print_step(&r);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Verify { name, dir }) => {
            let dir = data_dir(dir.data_dir.as_deref());
            let split = peerless_ml::data::load(name, &dir)?;
            println!(
                "{name}: ok — {} train / {} test samples, {:?} inputs, {} classes",
                split.train.len(),
                split.test.len(),
                split.train.shape,
                split.train.classes
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
