//! Seeded fault injection: which attempts crash, hang, are throttled or start slowly.
//!
//! Every decision is drawn from `Rng::derive(seed, "faults/<function>/<node>/<round>/<batch>",
//! attempt)`, i.e. it depends only on the seed and on *which* attempt it is, never on the order
//! in which concurrent invocations happen to arrive, so a run with the same seed replays the
//! same faults. Callers that want different decisions for repeated calls give them different
//! [`InvokeCtx`](super::InvokeCtx) values.

use peerless_core::rng::Rng;
use serde::{Deserialize, Serialize};

/// Fault rates (probabilities per attempt). All default to 0: no faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// The runtime SIGKILLs the instance part-way through the invocation (`Crashed`): at a
    /// uniform fraction of the function's typical duration (a moving mean of its successful
    /// durations; 100 ms before the first). If the answer comes first it is discarded and the
    /// instance killed then, so the rate holds exactly and side effects may have happened.
    pub crash_rate: f64,
    /// The instance is SIGSTOPped part-way through (or its answer withheld) so the invocation
    /// runs into its timeout and is killed (`Timeout`).
    pub hang_rate: f64,
    /// The invocation is refused as if at the concurrency limit (`Throttled`).
    pub throttle_rate: f64,
    /// A cold start is slowed by `slow_cold_start_ms` before the instance gets the event.
    pub slow_cold_start_rate: f64,
    /// Extra cold-start delay, ms. Default 500.
    pub slow_cold_start_ms: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            crash_rate: 0.0,
            hang_rate: 0.0,
            throttle_rate: 0.0,
            slow_cold_start_rate: 0.0,
            slow_cold_start_ms: 500,
        }
    }
}

impl FaultConfig {
    /// No faults.
    pub fn none() -> Self {
        FaultConfig::default()
    }

    /// Whether any fault can be injected.
    pub fn any(&self) -> bool {
        self.crash_rate > 0.0
            || self.hang_rate > 0.0
            || self.throttle_rate > 0.0
            || self.slow_cold_start_rate > 0.0
    }

    /// Checks the rates: each in [0, 1], and crash + hang + throttle ≤ 1 (they exclude each
    /// other). On error: (key, value, reason).
    pub fn validate(&self) -> Result<(), (&'static str, String, &'static str)> {
        let rates = [
            ("crash_rate", self.crash_rate),
            ("hang_rate", self.hang_rate),
            ("throttle_rate", self.throttle_rate),
            ("slow_cold_start_rate", self.slow_cold_start_rate),
        ];
        for (key, v) in rates {
            if !(0.0..=1.0).contains(&v) {
                return Err((key, v.to_string(), "must be a probability in [0, 1]"));
            }
        }
        let sum = self.crash_rate + self.hang_rate + self.throttle_rate;
        if sum > 1.0 + 1e-9 {
            return Err((
                "crash_rate",
                self.crash_rate.to_string(),
                "crash_rate + hang_rate + throttle_rate must be at most 1",
            ));
        }
        if self.slow_cold_start_ms > 600_000 {
            return Err((
                "slow_cold_start_ms",
                self.slow_cold_start_ms.to_string(),
                "must be at most 600000",
            ));
        }
        Ok(())
    }
}

/// What happens to one attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Nothing injected.
    None,
    /// Refused before any instance is involved.
    Throttle,
    /// SIGKILL after this fraction (0..1) of the expected work.
    Crash(f64),
    /// SIGSTOP after this fraction (0..1) of the expected work; the timeout then kills it.
    Hang(f64),
}

/// The faults of one attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// The main fault.
    pub fault: Fault,
    /// Extra delay, ms, if this attempt needs a cold start.
    pub slow_cold_start_ms: u64,
}

impl FaultPlan {
    /// No faults.
    pub const NONE: FaultPlan = FaultPlan { fault: Fault::None, slow_cold_start_ms: 0 };
}

/// Draws [`FaultPlan`]s from a seed.
#[derive(Debug, Clone)]
pub struct FaultInjector {
    config: FaultConfig,
    seed: u64,
}

impl FaultInjector {
    /// An injector with these rates and this seed.
    pub fn new(config: FaultConfig, seed: u64) -> Self {
        FaultInjector { config, seed }
    }

    /// The plan for one attempt, a pure function of (seed, identity of the attempt).
    pub fn plan(&self, function: &str, node: &str, round: u64, batch: u32, attempt: u32) -> FaultPlan {
        if !self.config.any() {
            return FaultPlan::NONE;
        }
        let c = &self.config;
        let mut rng =
            Rng::derive(self.seed, &format!("faults/{function}/{node}/{round}/{batch}"), u64::from(attempt));
        let u = rng.f64();
        let frac = rng.f64();
        let fault = if u < c.throttle_rate {
            Fault::Throttle
        } else if u < c.throttle_rate + c.crash_rate {
            Fault::Crash(frac)
        } else if u < c.throttle_rate + c.crash_rate + c.hang_rate {
            Fault::Hang(frac)
        } else {
            Fault::None
        };
        let slow = rng.f64() < c.slow_cold_start_rate;
        FaultPlan { fault, slow_cold_start_ms: if slow { c.slow_cold_start_ms } else { 0 } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_replay_and_rates_are_roughly_honoured() {
        let cfg = FaultConfig {
            crash_rate: 0.1,
            hang_rate: 0.05,
            throttle_rate: 0.2,
            slow_cold_start_rate: 0.5,
            slow_cold_start_ms: 7,
        };
        let a = FaultInjector::new(cfg.clone(), 42);
        let b = FaultInjector::new(cfg, 42);
        let (mut crash, mut hang, mut thr, mut slow) = (0, 0, 0, 0);
        let n = 20_000u32;
        for i in 0..n {
            let p = a.plan("gradient", "p0", u64::from(i / 8), i % 8, 0);
            assert_eq!(p, b.plan("gradient", "p0", u64::from(i / 8), i % 8, 0));
            match p.fault {
                Fault::Crash(f) | Fault::Hang(f) => {
                    assert!((0.0..1.0).contains(&f));
                    if matches!(p.fault, Fault::Crash(_)) { crash += 1 } else { hang += 1 }
                }
                Fault::Throttle => thr += 1,
                Fault::None => {}
            }
            if p.slow_cold_start_ms == 7 {
                slow += 1;
            }
        }
        let rate = |k: u32| f64::from(k) / f64::from(n);
        assert!((rate(crash) - 0.1).abs() < 0.01, "{crash}");
        assert!((rate(hang) - 0.05).abs() < 0.01, "{hang}");
        assert!((rate(thr) - 0.2).abs() < 0.015, "{thr}");
        assert!((rate(slow) - 0.5).abs() < 0.02, "{slow}");
    }

    #[test]
    fn no_rates_no_faults_and_bad_rates_are_refused() {
        let f = FaultInjector::new(FaultConfig::none(), 1);
        assert_eq!(f.plan("echo", "n", 0, 0, 0), FaultPlan::NONE);
        let bad = FaultConfig { crash_rate: 0.6, hang_rate: 0.6, ..FaultConfig::none() };
        assert_eq!(bad.validate().unwrap_err().0, "crash_rate");
        let bad = FaultConfig { throttle_rate: -0.1, ..FaultConfig::none() };
        assert_eq!(bad.validate().unwrap_err().0, "throttle_rate");
    }
}
