//! `peerless train`: resolves the effective config, opens the run directory, runs, summarizes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use peerless_runtime::checkpoint::Checkpoint;
use peerless_runtime::config::{RunConfig, TrainArch};
use peerless_runtime::local::{self, Controls, Summary};
use peerless_runtime::rundir::RunDir;
use peerless_runtime::scenario::Scenario;

use crate::cli::{TrainArgs, data_dir};
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
            let ck =
                Checkpoint::read(&ck_path).with_context(|| format!("cannot resume {}", path.display()))?;
            peerless_runtime::checkpoint::write_atomic(&path.join("config.toml"), cfg.to_toml().as_bytes())
                .with_context(|| format!("writing {}", path.join("config.toml").display()))?;
            let dir = RunDir::reopen(path, ck.round)?;
            (cfg, dir, Some(ck))
        }
        None => {
            let mut cfg = match (&args.config, &scenario) {
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
                    arch_name(cfg.train.arch),
                    cfg.model.arch,
                    cfg.data.dataset,
                    timestamp()
                );
            }
            let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
            let dir = RunDir::create(&out, &cfg)?;
            if let (Some(path), Some(_)) = (&args.scenario, &scenario) {
                let copy = dir.path().join("scenario.toml");
                std::fs::copy(path, &copy).with_context(|| format!("copying {}", path.display()))?;
            }
            (cfg, dir, None)
        }
    };
    if cfg.train.arch == TrainArch::P2p {
        if resume.is_some() {
            bail!("--resume of a P2P run is not supported: restart peers with `peerless peer --join`");
        }
        return crate::p2p_cmd::launch(&cfg, &mut dir, &faults);
    }
    if cfg.train.arch == TrainArch::Ps {
        if resume.is_some() {
            bail!("--resume of a PS run is not supported: the launcher restarts the PS from its checkpoint");
        }
        return crate::p2p_cmd::launch_ps(&cfg, &mut dir, &faults);
    }
    if !faults.is_empty() {
        bail!("the scenario's faults need a cluster: use --arch p2p or --arch ps");
    }
    if cfg.train.arch != TrainArch::Local {
        bail!("--arch {} is not available in this build yet; use --arch local", arch_name(cfg.train.arch));
    }
    tracing::info!(seed = cfg.seed, run = %dir.path().display(), "starting");
    let data = data_dir(Some(&cfg.data.dir));
    let split = peerless_ml::data::load(cfg.data.dataset, &data)?;

    let stop = Arc::new(AtomicBool::new(false));
    spawn_ctrl_c(stop.clone());
    let mut bar = RunProgress::new(&format!(
        "{} {} on {}",
        arch_name(cfg.train.arch),
        cfg.model.arch,
        cfg.data.dataset
    ));
    let controls = Controls { stop: Some(&stop), halt_at_round: args.halt_at_round };
    let summary = local::train(&cfg, &split, &mut dir, resume, controls, &mut |p| bar.update(&p))?;
    bar.finish();
    print_summary(&summary, &dir);
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

fn arch_name(a: TrainArch) -> &'static str {
    match a {
        TrainArch::Local => "local",
        TrainArch::P2p => "p2p",
        TrainArch::Ps => "ps",
    }
}

/// Ctrl-C sets `stop`; the loop then finishes its round, checkpoints and exits. A second
/// Ctrl-C exits at once.
fn spawn_ctrl_c(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else {
            return;
        };
        rt.block_on(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\ninterrupt: finishing this round and writing a checkpoint (Ctrl-C again to abort)"
                );
                stop.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
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

/// `YYYYmmdd-HHMMSS` in UTC, for default run names.
fn timestamp() -> String {
    let (y, m, d, h, mi, s) = civil_utc(SystemTime::now());
    format!("{y:04}{m:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// (year, month, day, hour, minute, second) of `t` in UTC.
pub(crate) fn civil_utc(t: SystemTime) -> (i64, i64, i64, u64, u64, u64) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}
