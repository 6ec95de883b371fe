//! The command line's types (clap derive): every subcommand and its flags. Nothing runs here;
//! `main` dispatches each command to its module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use peerless_ml::DatasetName;
use peerless_runtime::config::{
    Aggregation, CompressionName, Compute, PsModeName, SyncMode, TensorTransport, TrainArch, parse_name,
};

/// peerless: serverless peer-to-peer ML training, and the parameter-server baseline it is
/// measured against.
#[derive(Debug, Parser)]
#[command(name = "peerless", version, about)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model: `--arch local` in one process, `--arch p2p` on a local cluster of peer
    /// processes.
    Train(Box<TrainArgs>),
    /// Run one peer of a P2P run (the launcher starts these).
    Peer(NodeArgs),
    /// Run the parameter server of a PS run (the launcher starts it).
    Ps(NodeArgs),
    /// Run one worker of a PS run (the launcher starts these).
    Worker(NodeArgs),
    /// Write a fresh random ed25519 identity for a node of this host (prints its peer id).
    Keygen {
        /// The identity file to write (must not exist; mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// A run across hosts: `peerless run init`.
    #[command(subcommand)]
    Run(RunCommand),
    /// Sign an admission certificate for a node of a run (the run's owner does this).
    Admit(AdmitArgs),
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
    /// Hold one node's function instances in a process of their own, serving AWS's Invoke API
    /// on loopback, so that they stay warm when the node restarts (the launcher starts one per
    /// node; a node uses it through `function.service_addr` or `--function-service`). Prints
    /// `{"listening":"ADDR"}` once it serves.
    FunctionService(FunctionServiceArgs),
    /// Invoke a function once on a local function runtime; prints the answer, then each
    /// attempt's ledger record (JSON lines).
    Invoke(Box<InvokeArgs>),
    /// Run scenarios (files or directories of them) × architectures × seeds, one run
    /// directory each, injecting each scenario's faults; resumable.
    Experiment(Box<ExperimentArgs>),
    /// Write `report.md` and charts for an experiment directory from its run files.
    Report {
        /// The experiment directory (holding experiment.json).
        dir: PathBuf,
    },
}

/// `peerless run …`.
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Write a new run into `--out DIR`: `DIR/run.toml` (the training config from `--config`
    /// and the training flags, with `[admission]`: a random run id and the run's public
    /// admission key) and `DIR/admission.key` (the private key; keep it).
    Init(Box<TrainArgs>),
}

/// `peerless admit`.
#[derive(Debug, Args)]
pub struct AdmitArgs {
    /// The run's directory (holding `run.toml` and `admission.key`, from `peerless run init`).
    #[arg(long)]
    pub run: PathBuf,
    /// The node's peer id (what `peerless keygen` printed).
    #[arg(long)]
    pub peer: String,
    /// `peer`, `worker` or `ps`.
    #[arg(long)]
    pub role: String,
    /// The node's index (default: the next free one of its role; the PS's is `cluster.nodes`).
    #[arg(long)]
    pub index: Option<u32>,
    /// How long the certificate is valid: a number and `s`, `m`, `h` or `d` (`90d`, `12h`).
    #[arg(long, default_value = "90d")]
    pub expires_in: String,
    /// The certificate file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `peerless bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Warm invocation overhead of `echo` through the local function runtime against a direct
    /// in-process call, and cold-start time.
    Invoke(BenchInvokeArgs),
    /// The same P2P run on uncapped links and on links capped at `--rate-mbit` (the fault
    /// proxy, or `tc tbf` on hosts of their own with `--netns`), interleaved: each one's round
    /// time split (compute / exchange / wait) and the capped ÷ uncapped ratios.
    Link(BenchLinkArgs),
    /// Peak resident memory (and PSS) of a small P2P cluster's processes, per kind (peers,
    /// function instances), and the total, against the dataset's size on disk.
    Memory(BenchMemoryArgs),
    /// P2P rounds on 1, 2 and 4 local peers (time split, samples/s) and the peer network's
    /// exchange throughput as a ratio of a plain TCP copy.
    P2p(BenchP2pArgs),
    /// One MLP training step (flat vectors in and out) on every backend of this build (the
    /// default one, and OpenBLAS in a `--features openblas` build) against PyTorch on one
    /// thread, interleaved in one run; prints the default's ratio to each.
    Step(BenchStepArgs),
}

/// `peerless data …`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
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

/// `--data-dir` of the data commands.
#[derive(Debug, Args)]
pub struct DataDirArg {
    /// Directory holding `<dataset>/` IDX files, or one dataset's IDX files directly
    /// [default: $PEERLESS_DATA_DIR, else ~/.local/share/peerless].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
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
    #[arg(long, value_parser = parse_name::<TrainArch>)]
    pub arch: Option<TrainArch>,
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
    /// `cluster.nodes`: P2P peers to start, or PS workers (`--workers` and `--nodes` are the
    /// same flag).
    #[arg(long, visible_alias = "workers", alias = "nodes")]
    pub peers: Option<u32>,
    /// `cluster.functions_per_node`: gradient functions each peer (PS: worker) invokes per
    /// round, one mini-batch each (`--functions-per-worker`, `--functions-per-node`: the same).
    #[arg(long, visible_alias = "functions-per-worker", alias = "functions-per-node")]
    pub functions_per_peer: Option<u32>,
    /// Where gradients are computed: `functions` (serverless) or `local` (in the node).
    #[arg(long, value_parser = parse_name::<Compute>)]
    pub compute: Option<Compute>,
    /// Functions: sum a node's gradients `in-store` (as they land) or `fetch` each and sum
    /// them in the node (the comparison baseline).
    #[arg(long, value_parser = parse_name::<Aggregation>)]
    pub aggregation: Option<Aggregation>,
    /// PS: `sync` rounds (the default) or `async` updates with a staleness bound.
    #[arg(long, value_parser = parse_name::<PsModeName>)]
    pub ps_mode: Option<PsModeName>,
    /// PS, asynchronous mode: drop gradients more than this many versions old.
    #[arg(long)]
    pub max_staleness: Option<u64>,
    /// `p2p.sync`: `every-step` (exchange gradients every step) or `diloco` (exchange
    /// parameter deltas every `--inner-steps` local steps); P2P and synchronous PS.
    #[arg(long, value_parser = parse_name::<SyncMode>)]
    pub sync: Option<SyncMode>,
    /// `p2p.inner_steps`: DiLoCo's local steps per round.
    #[arg(long)]
    pub inner_steps: Option<u32>,
    /// `p2p.outer_lr`: DiLoCo's outer learning rate (SGD with Nesterov momentum).
    #[arg(long)]
    pub outer_lr: Option<f64>,
    /// `p2p.compression`: what nodes send of a gradient or delta: `none`, `int8`, `int4` or `topk`
    /// (the `p2p.topk_fraction` largest), with error feedback.
    #[arg(long, value_parser = parse_name::<CompressionName>)]
    pub compression: Option<CompressionName>,
    /// `p2p.tensor_transport`: how peers send each other gradients: `libp2p` (encrypted) or
    /// `tcp` (a plain TCP lane per pair, opened with a token sent over libp2p; unencrypted,
    /// like PyTorch's gloo: for networks you trust).
    #[arg(long, value_parser = parse_name::<TensorTransport>)]
    pub tensor_transport: Option<TensorTransport>,
    /// `launcher.netns`: each node on a host of its own (a network namespace with its own
    /// address, linked through a bridge); partitions and bandwidth caps on real links. Root
    /// and iproute2 only.
    #[arg(long)]
    pub netns: bool,
}

/// `peerless bench link`.
#[derive(Debug, Args)]
pub struct BenchLinkArgs {
    /// Peers.
    #[arg(long, default_value_t = 3)]
    pub peers: u32,
    /// The cap on every peer's uplink and downlink, Mbit/s.
    #[arg(long, default_value_t = 50.0)]
    pub rate_mbit: f64,
    /// Rounds per run.
    #[arg(long, default_value_t = 60)]
    pub rounds: u64,
    /// Interleaved pairs of runs (uncapped, capped); the table shows medians.
    #[arg(long, default_value_t = 1)]
    pub passes: usize,
    /// Each peer on a host of its own (network namespaces; root and iproute2), the cap made
    /// by `tc … tbf` on both ends of its link; else by the loopback fault proxy.
    #[arg(long)]
    pub netns: bool,
    /// Dataset [default: the embedded digits].
    #[arg(long)]
    pub dataset: Option<DatasetName>,
    /// Gradient functions per peer.
    #[arg(long, default_value_t = 1)]
    pub functions_per_peer: u32,
    /// `functions` or `local`.
    #[arg(long, default_value = "functions", value_parser = parse_name::<Compute>)]
    pub compute: Compute,
    /// `p2p.sync`: `every-step` or `diloco`.
    #[arg(long, value_parser = parse_name::<SyncMode>)]
    pub sync: Option<SyncMode>,
    /// `p2p.inner_steps` with `--sync diloco`.
    #[arg(long)]
    pub inner_steps: Option<u32>,
    /// Directory for the runs (default: a temporary one).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `peerless bench p2p`.
#[derive(Debug, Args)]
pub struct BenchP2pArgs {
    /// Rounds per cluster size (with `--against ddp`, also the DDP steps).
    #[arg(long, default_value_t = 60)]
    pub rounds: u64,
    /// Dataset (default: MNIST when present, else the embedded digits).
    #[arg(long)]
    pub dataset: Option<DatasetName>,
    /// `functions` or `local` (with `--against`, both run and this is ignored).
    #[arg(long, default_value = "functions", value_parser = parse_name::<Compute>)]
    pub compute: Compute,
    /// Gradient functions per peer [default: 1 with `--against ddp`, a batch of 64 per node as
    /// per DDP rank; else 4].
    #[arg(long)]
    pub functions_per_peer: Option<u32>,
    /// Run a reference side by side, interleaved with peerless serverful and serverless runs:
    /// `ddp` (PyTorch DistributedDataParallel over gloo, one thread per rank).
    #[arg(long, value_enum)]
    pub against: Option<Against>,
    /// `p2p.tensor_transport` of the peerless runs [default: `tcp` with `--against ddp`, the
    /// same trust as gloo's plain TCP; else `libp2p`].
    #[arg(long, value_parser = parse_name::<TensorTransport>)]
    pub tensor_transport: Option<TensorTransport>,
    /// The Python to run the reference with [default: $PEERLESS_PYTHON, else python3].
    #[arg(long, requires = "against")]
    pub python: Option<String>,
    /// With `--against`: interleaved passes, each running every world size on every side
    /// once; the table shows medians of the passes.
    #[arg(long, default_value_t = 3)]
    pub passes: usize,
    /// Directory for the runs (default: a temporary one).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What `peerless bench p2p --against` compares peerless with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Against {
    /// PyTorch DistributedDataParallel over gloo, one thread per rank.
    Ddp,
}

/// `peerless bench memory`.
#[derive(Debug, Args)]
pub struct BenchMemoryArgs {
    /// Peers.
    #[arg(long, default_value_t = 4)]
    pub peers: u32,
    /// Function instances per peer (gradient functions invoked in parallel each round).
    #[arg(long, default_value_t = 2)]
    pub functions_per_peer: u32,
    /// Rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Dataset [default: mnist].
    #[arg(long)]
    pub dataset: Option<DatasetName>,
    /// Directory for the run (default: a temporary one).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `peerless bench step`.
#[derive(Debug, Args)]
pub struct BenchStepArgs {
    /// burn backend: `ndarray` or `flex`; `all` measures both.
    #[arg(long, default_value = "all")]
    pub backend: String,
    /// Steps per measurement.
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    /// Interleaved passes (each measures every contender once); medians are compared.
    #[arg(long, default_value_t = 5)]
    pub passes: usize,
    /// The Python to run the PyTorch reference with [default: $PEERLESS_PYTHON, else
    /// python3].
    #[arg(long)]
    pub python: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `peerless peer`, `peerless ps`, `peerless worker`: one node of a run.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node file (`[node]` and `[run]`), as the launcher writes it. Without it, the node
    /// is started from `--run`, `--identity`, `--cert` and `--listen`.
    #[arg(long, required_unless_present = "run", conflicts_with_all = ["run", "identity", "cert", "listen", "bootstrap", "external", "out"])]
    pub config: Option<PathBuf>,
    /// The run file (`run.toml` from `peerless run init`).
    #[arg(long, requires_all = ["identity", "cert", "listen"])]
    pub run: Option<PathBuf>,
    /// This node's identity (`peerless keygen`).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// This node's certificate (`peerless admit`); its index is the node's.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// The address to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`.
    #[arg(long)]
    pub listen: Option<String>,
    /// An address of another node to dial (repeat for several; dialled until reachable).
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Where other nodes can dial this one, if not the first listening address (e.g. the
    /// host's public address behind a NAT or with `--listen /ip4/0.0.0.0/…`).
    #[arg(long)]
    pub external: Option<String>,
    /// This node's directory (checkpoint, metrics, events, summary); default `node-<index>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Join a run in progress (fetch the state from a live peer, or resume the own checkpoint).
    #[arg(long)]
    pub join: bool,
    /// Directory of IDX datasets (overrides `run.data.dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Invoke the functions through the function service at this address
    /// (`peerless function-service`; overrides `function.service_addr`).
    #[arg(long)]
    pub function_service: Option<String>,
    /// The store this node's functions use (overrides `cluster.store`): on a shared Redis, a
    /// URL with this node's own ACL user, `redis://USER:PASSWORD@HOST:PORT/` (see
    /// docs/multi-host.md for the `ACL SETUSER` line).
    #[arg(long)]
    pub store: Option<String>,
}

/// `peerless function-service`.
#[derive(Debug, Args)]
pub struct FunctionServiceArgs {
    /// The node file of the node it serves (its `[function]` configuration, seed and index).
    #[arg(long, required_unless_present = "run", conflicts_with_all = ["run", "index"])]
    pub config: Option<PathBuf>,
    /// The run file (`run.toml`), for a node started from the command line.
    #[arg(long, requires = "index")]
    pub run: Option<PathBuf>,
    /// That node's index (its certificate's).
    #[arg(long)]
    pub index: Option<u32>,
    /// The address to serve on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

/// `peerless invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// Function name (e.g. `echo`, `sleep`, `fail`, `gradient`).
    #[arg(long)]
    pub function: String,
    /// The payload: JSON text, or `@path` to read it from a file.
    #[arg(long, default_value = "null")]
    pub payload: String,
    /// Function runtime configuration (TOML, the `[function]` keys, `backend` and `[aws]`
    /// included).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Memory, MB (overrides the config).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Timeout, ms (overrides the config).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Retries after retryable failures (overrides the config).
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// Seed of request ids, backoff jitter and fault injection.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the ledger (one line per attempt) as CSV here.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Run directory (created if missing) to write `function_metrics.json` (invocations, cold
    /// starts, retries, throttles, timeouts, crashes, OOM kills, latency p50/p99, billed ms,
    /// cost) and `ledger.csv` into.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `peerless bench invoke`.
#[derive(Debug, Args)]
pub struct BenchInvokeArgs {
    /// Warm invocations measured (after 20 warm-ups).
    #[arg(long, default_value_t = 500)]
    pub n: usize,
    /// Cold starts measured.
    #[arg(long, default_value_t = 30)]
    pub cold: usize,
    /// Instead: the gradient function at each of these Lambda memory sizes (MB,
    /// comma-separated, e.g. `128,512,1024,1769`), its instances held to the CPU share Lambda
    /// gives the size (a cgroup CPU quota; needs root), with each size's duration and cost.
    #[arg(long, value_delimiter = ',')]
    pub memory_sizes: Vec<u64>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `peerless experiment`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// Scenario files, or directories of them (every `*.toml` inside).
    #[arg(required = true)]
    pub scenarios: Vec<PathBuf>,
    /// Architectures, comma-separated: `p2p`, `ps`.
    #[arg(long, default_value = "p2p,ps", value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Seeds per scenario and architecture: the scenario's `seed`, `seed + 1`, ….
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Experiment directory (default: `experiments/<name of the first scenario argument>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Directory of IDX datasets (passed to every run).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Every run with each node on a host of its own (`peerless train --netns`): network
    /// namespaces linked through a bridge, partitions and bandwidth caps on real links. Root
    /// and iproute2 only.
    #[arg(long)]
    pub netns: bool,
}
