//! `peerless train`: resolves the effective config, opens the run directory, runs, summarizes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use peerless_core::optim::OptimizerConfig;
use peerless_ml::{Arch, Backend};
use peerless_runtime::checkpoint::Checkpoint;
use peerless_runtime::config::{RunConfig, TrainArch};
use peerless_runtime::local::{self, Controls, Summary};
use peerless_runtime::rundir::RunDir;
use peerless_runtime::scenario::Scenario;

use crate::cli::TrainArgs;
use crate::common::data_dir;
use crate::progress::RunProgress;

/// Runs `peerless train`.
pub fn run(args: TrainArgs) -> Result<ExitCode> {
    if std::env::var_os("PEERLESS_LAUNCHED").is_some() {
        // Started by `peerless experiment`: do not outlive it (its nodes then follow).
        peerless_runtime::node::die_with_parent().context("setting the parent-death signal")?;
    }
    let scenario = args.scenario.as_deref().map(Scenario::load).transpose()?;
    let faults = scenario.as_ref().map(|s| s.faults.clone()).unwrap_or_default();
    let (cfg, mut dir, resume) = match &args.resume {
        Some(path) => {
            let (cfg, dir, ck) = open_resumed(&args, path)?;
            (cfg, dir, Some(ck))
        }
        None => {
            let (cfg, dir) = open_new(&args, scenario.as_ref())?;
            (cfg, dir, None)
        }
    };
    if cfg.train.arch == TrainArch::P2p {
        if resume.is_some() {
            bail!("--resume of a P2P run is not supported: restart peers with `peerless peer --join`");
        }
        return crate::launch::launch(&cfg, &mut dir, &faults);
    }
    if cfg.train.arch == TrainArch::Ps {
        if resume.is_some() {
            bail!("--resume of a PS run is not supported: the launcher restarts the PS from its checkpoint");
        }
        return crate::launch::launch_ps(&cfg, &mut dir, &faults);
    }
    if !faults.is_empty() {
        bail!("the scenario's faults need a cluster: use --arch p2p or --arch ps");
    }
    train_locally(&cfg, &mut dir, resume, args.halt_at_round)
}

/// Reopens the run directory `path` to continue it: its config (with the schedule flags and
/// `--data-dir` applied, written back), the directory and its checkpoint.
fn open_resumed(args: &TrainArgs, path: &Path) -> Result<(RunConfig, RunDir, Checkpoint)> {
    let given = args.computation_flags();
    if !given.is_empty() {
        bail!(
            "--resume continues a run with its own config.toml; {} cannot change when resuming \
             (allowed: --epochs, --rounds, --eval-every, --checkpoint-every, --data-dir)",
            given.join(", ")
        );
    }
    let mut cfg = RunConfig::load(&path.join("config.toml"))
        .with_context(|| format!("{} is not a run directory", path.display()))?;
    args.apply_schedule(&mut cfg);
    if let Some(d) = &args.data_dir {
        cfg.data.dir = d.clone();
    }
    cfg.validate()?;
    let ck_path = path.join("checkpoint.safetensors");
    let ck = Checkpoint::read(&ck_path).with_context(|| format!("cannot resume {}", path.display()))?;
    peerless_runtime::checkpoint::write_atomic(&path.join("config.toml"), cfg.to_toml().as_bytes())
        .with_context(|| format!("writing {}", path.join("config.toml").display()))?;
    let dir = RunDir::reopen(path, ck.round)?;
    Ok((cfg, dir, ck))
}

/// Creates the run directory of a new run: its config from `--config`, the scenario's
/// workload or the defaults, with the flags applied; the scenario file is copied in.
fn open_new(args: &TrainArgs, scenario: Option<&Scenario>) -> Result<(RunConfig, RunDir)> {
    let mut cfg = match (&args.config, scenario) {
        (Some(p), _) => RunConfig::load(p)?,
        (None, Some(s)) => s.run.clone(),
        (None, None) => RunConfig::default(),
    };
    args.apply(&mut cfg)?;
    cfg.data.dir = data_dir(Some(&cfg.data.dir));
    cfg.validate()?;
    if cfg.name.is_empty() {
        cfg.name = format!(
            "{}-{}-{}-{}",
            cfg.train.arch,
            cfg.model.arch,
            cfg.data.dataset,
            crate::common::timestamp()
        );
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let dir = RunDir::create(&out, &cfg)?;
    if let (Some(path), Some(_)) = (&args.scenario, scenario) {
        let copy = dir.path().join("scenario.toml");
        std::fs::copy(path, &copy).with_context(|| format!("copying {}", path.display()))?;
    }
    Ok((cfg, dir))
}

/// Trains `cfg` in this process (`--arch local`) with a progress bar and Ctrl-C handling;
/// prints the summary. Exits with 130 when interrupted.
fn train_locally(
    cfg: &RunConfig,
    dir: &mut RunDir,
    resume: Option<Checkpoint>,
    halt_at_round: Option<u64>,
) -> Result<ExitCode> {
    tracing::info!(seed = cfg.seed, run = %dir.path().display(), "starting");
    let data = data_dir(Some(&cfg.data.dir));
    let split = peerless_ml::data::load(cfg.data.dataset, &data)?;

    let stop = Arc::new(AtomicBool::new(false));
    spawn_ctrl_c(stop.clone());
    let mut bar = RunProgress::new(&format!("{} {} on {}", cfg.train.arch, cfg.model.arch, cfg.data.dataset));
    let controls = Controls { stop: Some(&stop), halt_at_round };
    let summary = local::train(cfg, &split, dir, resume, controls, &mut |p| bar.update(&p))?;
    bar.finish();
    print_summary(&summary, dir);
    if !summary.completed {
        eprintln!(
            "stopped at round {}; continue with: peerless train --resume {}",
            summary.rounds,
            dir.path().display()
        );
        if stop.load(Ordering::Relaxed) {
            return Ok(ExitCode::from(130));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C sets `stop`; the loop then finishes its round, checkpoints and exits. A second
/// Ctrl-C exits at once.
fn spawn_ctrl_c(stop: Arc<AtomicBool>) {
    crate::common::on_interrupt(move |presses| {
        if presses > 1 {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this round and writing a checkpoint (Ctrl-C again to abort)");
        stop.store(true, Ordering::Relaxed);
    });
}

fn print_summary(s: &Summary, dir: &RunDir) {
    println!("run          {}", dir.path().display());
    println!("model        {} on {} (seed {})", s.model, s.dataset, s.seed);
    println!(
        "rounds       {} ({:.2} epochs){}",
        s.rounds,
        s.epochs,
        if s.completed { "" } else { ", interrupted" }
    );
    println!("test acc     {:.2} %", s.test_accuracy * 100.0);
    println!("test loss    {:.4}", s.test_loss);
    println!("train loss   {:.4}", s.train_loss);
    println!("wall time    {:.2} s", s.wall_time_s);
    println!("throughput   {:.0} samples/s", s.samples_per_s);
    println!("digest       {}", s.param_digest);
}

/// What the flags of `peerless train` do to the configuration.
impl TrainArgs {
    /// Applies the flags that change what is computed onto `cfg`.
    pub fn apply(&self, cfg: &mut RunConfig) -> Result<()> {
        if let Some(a) = self.arch {
            cfg.train.arch = a;
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
            cfg.cluster.nodes = n;
        }
        if let Some(k) = self.functions_per_peer {
            cfg.cluster.functions_per_node = k;
        }
        if let Some(c) = self.compute {
            cfg.cluster.compute = c;
        }
        if let Some(a) = self.aggregation {
            cfg.cluster.aggregation = a;
        }
        if let Some(m) = self.ps_mode {
            cfg.ps.mode = m;
        }
        if let Some(s) = self.max_staleness {
            cfg.ps.max_staleness = s;
        }
        if let Some(s) = self.sync {
            cfg.p2p.sync = s;
        }
        if let Some(h) = self.inner_steps {
            cfg.p2p.inner_steps = h;
        }
        if let Some(lr) = self.outer_lr {
            cfg.p2p.outer_lr = lr;
        }
        if let Some(c) = self.compression {
            cfg.p2p.compression = c;
        }
        if let Some(t) = self.tensor_transport {
            cfg.p2p.tensor_transport = t;
        }
        if self.netns {
            cfg.launcher.netns = true;
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
        let checks: [(&'static str, bool); 22] = [
            ("--compression", self.compression.is_some()),
            ("--aggregation", self.aggregation.is_some()),
            ("--sync", self.sync.is_some()),
            ("--inner-steps", self.inner_steps.is_some()),
            ("--outer-lr", self.outer_lr.is_some()),
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
