//! `peerless keygen`, `peerless run init`, `peerless admit`: a node's identity, a run with an
//! admission key, and the certificates that admit nodes to it.

use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use libp2p::PeerId;
use peerless_core::admission::Role;
use peerless_runtime::admission::Run;
use peerless_runtime::config::{RunConfig, TrainArch};
use peerless_runtime::node::transport;

use crate::cli::{AdmitArgs, TrainArgs};

/// Writes a fresh identity to `out` (which must not exist) and prints its peer id.
pub fn keygen(out: &Path) -> Result<ExitCode> {
    let key = transport::generate_keypair();
    transport::write_new_keypair(out, &key).with_context(|| format!("--out {}", out.display()))?;
    println!("{}", key.public().to_peer_id());
    Ok(ExitCode::SUCCESS)
}

/// Writes a new run into `--out`: its config (from `--config` and the flags; P2P unless
/// `--arch` says otherwise) and its admission key.
pub fn run_init(args: &TrainArgs) -> Result<ExitCode> {
    let Some(out) = &args.out else { bail!("peerless run init needs --out DIR") };
    for (given, flag) in [
        (args.scenario.is_some(), "--scenario"),
        (args.resume.is_some(), "--resume"),
        (args.halt_at_round.is_some(), "--halt-at-round"),
    ] {
        if given {
            bail!("{flag} does not apply to peerless run init");
        }
    }
    let mut cfg = match &args.config {
        Some(p) => RunConfig::load(p)?,
        None => RunConfig::default(),
    };
    args.apply(&mut cfg)?;
    if cfg.train.arch == TrainArch::Local {
        cfg.train.arch = TrainArch::P2p;
    }
    let run = Run::init(out, cfg)?;
    println!("run {}", run.owner.run);
    println!("run file       {}", out.join("run.toml").display());
    println!("admission key  {} (private: keep it on this host)", out.join("admission.key").display());
    Ok(ExitCode::SUCCESS)
}

/// Signs a certificate for `--peer` and writes it to `--out`.
pub fn admit(args: &AdmitArgs) -> Result<ExitCode> {
    let peer: PeerId =
        args.peer.parse().with_context(|| format!("--peer {:?} is not a peer id", args.peer))?;
    let role: Role = args.role.parse().with_context(|| format!("--role {:?}", args.role))?;
    let lifetime =
        parse_duration(&args.expires_in).with_context(|| format!("--expires-in {:?}", args.expires_in))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
    let run = Run::open(&args.run).with_context(|| format!("--run {}", args.run.display()))?;
    let (record, cert) = run
        .admit(&peer, role, args.index, now + lifetime)
        .with_context(|| format!("--run {}", args.run.display()))?;
    std::fs::write(&args.out, cert).with_context(|| format!("--out {}", args.out.display()))?;
    println!(
        "admitted {} as {} {} until unix time {} ({})",
        record.peer_id,
        record.role,
        record.index,
        record.expires,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Seconds in `90d`, `12h`, `30m`, `45s` (a whole number and one unit).
fn parse_duration(text: &str) -> Result<u64> {
    let unit = text.chars().last().context("empty duration")?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("want a number and s, m, h or d (e.g. 90d, 12h)"),
    };
    let n: u64 = text[..text.len() - 1].parse().context("want a whole number before the unit (e.g. 90d)")?;
    n.checked_mul(scale).context("too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_a_number_and_a_unit() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("0s").unwrap(), 0);
        for bad in ["", "12", "h", "1.5h", "-3d", "3w"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
