//! Run configurations (`peerless_runtime::config`, TOML): `--config` files, the effective
//! `config.toml` of every run directory, the `[run]` table of scenarios.
//!
//! First byte: bit 7 picks the mode.
//! - Raw text: a config that loads is valid, and its effective config (`to_toml`, what a run
//!   directory keeps so that the run can be replayed) loads back equal.
//! - The default config with fields set from the input (names, paths and secrets with any
//!   characters; numbers mostly in range, sometimes anything): when it validates, its
//!   effective config loads back equal (and writing it does not panic).
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use peerless_core::optim::OptimizerConfig;
use peerless_runtime::config::RunConfig;

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            let mut p2p = RunConfig::default();
            p2p.cluster.nodes = 5;
            p2p.optimizer = OptimizerConfig::adam(0.001);
            vec![
                ("default".into(), RunConfig::default().to_toml().into_bytes()),
                ("p2p-adam".into(), p2p.to_toml().into_bytes()),
                ("krum".into(), b"[p2p]\npeers = 5\naggregator = { rule = \"krum\", f = 1 }\n".to_vec()),
                (
                    "clipping".into(),
                    b"[cluster.aggregator]\nrule = \"centered-clipping\"\ntau = 0.5\niters = 3\n".to_vec(),
                ),
                ("trimmed".into(), b"[p2p]\naggregator = { rule = \"trimmed-mean\", beta = 0.2 }\n".to_vec()),
                ("ps".into(), b"[train]\narch = \"ps\"\n[ps]\nmode = \"async\"\nmax_staleness = 4\n".to_vec()),
            ]
            .into_iter()
            .map(|(name, text)| (name, [&[0u8][..], &text].concat()))
            .collect()
        })
    },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        if mode & 0x80 == 0 {
            if let Ok(text) = std::str::from_utf8(rest) {
                check_load(text);
            }
        } else {
            let _ = check_built(&mut Unstructured::new(rest));
        }
    }
);

fn check_load(text: &str) {
    match RunConfig::from_toml(text, "fuzz.toml") {
        Ok(cfg) => {
            cfg.validate().expect("a loaded config is valid");
            replays(&cfg);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The effective config loads back as the same config.
fn replays(cfg: &RunConfig) {
    let text = cfg.to_toml();
    let back = RunConfig::from_toml(&text, "effective config")
        .unwrap_or_else(|e| panic!("the effective config does not load: {e}\n{text}"));
    assert_eq!(&back, cfg, "{text}");
}

fn check_built(u: &mut Unstructured) -> Result<()> {
    let mut cfg = RunConfig::default();
    cfg.name = u.arbitrary()?;
    cfg.seed = num(u, 0..=1000)?;
    cfg.data.dir = PathBuf::from(u.arbitrary::<String>()?);
    cfg.model.hidden = (0..u.int_in_range(1..=3)?).map(|_| num(u, 1..=512)).collect::<Result<_>>()?;
    cfg.train.epochs = num(u, 1..=10)?;
    cfg.train.rounds = num(u, 0..=1000)?;
    cfg.train.batch_size = num(u, 1..=256)?;
    cfg.train.eval_every = num(u, 0..=100)?;
    cfg.train.checkpoint_every = num(u, 0..=100)?;
    cfg.cluster.nodes = num(u, 1..=64)?;
    cfg.cluster.functions_per_node = num(u, 1..=64)?;
    cfg.cluster.deadline_floor_ms = num(u, 1..=1000)?;
    cfg.cluster.deadline_ceiling_ms = num(u, 1000..=100_000)?;
    cfg.cluster.deadline_factor = float(u, 1.0, 10.0)?;
    cfg.cluster.secret = u.arbitrary()?;
    cfg.cluster.store =
        if u.arbitrary()? { "embedded".into() } else { format!("redis://{}", u.arbitrary::<&str>()?) };
    cfg.ps.restart_delay_ms = num(u, 0..=10_000)?;
    cfg.ps.max_staleness = num(u, 0..=64)?;
    let lr = float(u, 1e-6, 1.0)?;
    cfg.optimizer = if u.arbitrary()? { OptimizerConfig::sgd(lr) } else { OptimizerConfig::adam(lr) };
    if cfg.validate().is_ok() {
        replays(&cfg);
    }
    Ok(())
}

/// Usually a value in `usual`; one time in eight any value of the type.
fn num<T>(u: &mut Unstructured, usual: std::ops::RangeInclusive<T>) -> Result<T>
where
    T: libfuzzer_sys::arbitrary::unstructured::Int + for<'a> libfuzzer_sys::arbitrary::Arbitrary<'a>,
{
    if u.ratio(1, 8)? { u.arbitrary() } else { u.int_in_range(usual) }
}

/// Usually a value in `[lo, hi]`; one time in eight any f64 (NaN and infinities included).
fn float(u: &mut Unstructured, lo: f64, hi: f64) -> Result<f64> {
    if u.ratio(1, 8)? {
        Ok(f64::from_bits(u.arbitrary()?))
    } else {
        Ok(lo + (hi - lo) * f64::from(u.arbitrary::<u32>()?) / f64::from(u32::MAX))
    }
}
