//! The cost model: Lambda-style billing of invocations and per-hour billing of nodes, in integers.
//!
//! Money is never a float sum. Prices are held as integer **pico-dollars** (10⁻¹² $) per unit,
//! converted once from the configured decimal dollars; each invocation's charge is computed in
//! integers (rounded up to a whole pico-dollar) and ledgers add integers. Reports show
//! micro-dollars or dollars derived from the integer total.

use serde::{Deserialize, Serialize};

/// Pico-dollars per dollar.
pub const PICO_PER_USD: u64 = 1_000_000_000_000;

/// A price table; every field in US dollars as AWS lists it, with AWS's us-east-1 prices as
/// defaults (Lambda x86: $0.0000166667 per GB-second, arm64: $0.0000133334, both $0.20 per
/// million requests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceTable {
    /// `x86_64` or `arm64`: which Lambda price applies.
    pub arch: LambdaArch,
    /// x86_64 price per GB-second of function duration.
    pub x86_gb_second_usd: f64,
    /// arm64 price per GB-second of function duration.
    pub arm64_gb_second_usd: f64,
    /// Price per request (invocation attempt), any architecture.
    pub request_usd: f64,
    /// Price per hour of a node (peer, worker, parameter server) process; default an
    /// on-demand c7g.large ($0.0725/h).
    pub node_hour_usd: f64,
    /// Price per hour of a Redis host; default a cache.t4g.small ($0.032/h).
    pub redis_hour_usd: f64,
}

/// Lambda instruction-set architecture (it sets the price).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LambdaArch {
    /// x86_64.
    #[default]
    X86_64,
    /// Graviton.
    Arm64,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable {
            arch: LambdaArch::X86_64,
            x86_gb_second_usd: 0.000_016_666_7,
            arm64_gb_second_usd: 0.000_013_333_4,
            request_usd: 0.000_000_2,
            node_hour_usd: 0.0725,
            redis_hour_usd: 0.032,
        }
    }
}

/// A price table converted to integers, ready to charge with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    gb_second_pico: u64,
    request_pico: u64,
    node_hour_pico: u64,
    redis_hour_pico: u64,
}

/// A configured price that is negative or not finite.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("prices.{key} = {value}: must be a finite, non-negative dollar amount")]
pub struct PriceError {
    /// Key.
    pub key: &'static str,
    /// Value.
    pub value: f64,
}

fn to_pico(key: &'static str, usd: f64) -> Result<u64, PriceError> {
    if !usd.is_finite() || !(0.0..=1e6).contains(&usd) {
        return Err(PriceError { key, value: usd });
    }
    Ok((usd * PICO_PER_USD as f64).round() as u64)
}

impl PriceTable {
    /// Validates and converts to integer pico-dollars.
    pub fn prices(&self) -> Result<Prices, PriceError> {
        let gb = match self.arch {
            LambdaArch::X86_64 => to_pico("x86_gb_second_usd", self.x86_gb_second_usd)?,
            LambdaArch::Arm64 => to_pico("arm64_gb_second_usd", self.arm64_gb_second_usd)?,
        };
        Ok(Prices {
            gb_second_pico: gb,
            request_pico: to_pico("request_usd", self.request_usd)?,
            node_hour_pico: to_pico("node_hour_usd", self.node_hour_usd)?,
            redis_hour_pico: to_pico("redis_hour_usd", self.redis_hour_usd)?,
        })
    }
}

impl Prices {
    /// Charge for one invocation attempt: `billed_ms` (already rounded up to whole ms) at
    /// `memory_mb`, plus the request price. Lambda bills memory in MB as GB = MB / 1024.
    pub fn invocation_pico(&self, billed_ms: u64, memory_mb: u64) -> u64 {
        // pico = ms/1000 s × MB/1024 GB × price/GB-s, rounded up, in u128 to avoid overflow.
        let num = u128::from(billed_ms) * u128::from(memory_mb) * u128::from(self.gb_second_pico);
        let duration = num.div_ceil(1000 * 1024);
        u64::try_from(duration).unwrap_or(u64::MAX).saturating_add(self.request_pico)
    }

    /// Charge for `ms` milliseconds of a node process.
    pub fn node_pico(&self, ms: u64) -> u64 {
        (u128::from(ms) * u128::from(self.node_hour_pico)).div_ceil(3_600_000).try_into().unwrap_or(u64::MAX)
    }

    /// Charge for `ms` milliseconds of a Redis host.
    pub fn redis_pico(&self, ms: u64) -> u64 {
        (u128::from(ms) * u128::from(self.redis_hour_pico)).div_ceil(3_600_000).try_into().unwrap_or(u64::MAX)
    }
}

/// Lambda's smallest and largest memory sizes, MB.
pub const LAMBDA_MEMORY_MB: std::ops::RangeInclusive<u64> = 128..=10_240;

/// The memory size at which Lambda gives a function one full vCPU, MB (CPU is in
/// proportion to memory below it).
pub const ONE_VCPU_MB: u64 = 1_769;

/// What a function's measured peak memory says about the size it is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RightSizing {
    /// The largest "Max Memory Used" measured, MB.
    pub peak_mb: u64,
    /// The configured size, MB.
    pub configured_mb: u64,
    /// The smallest Lambda size that holds the peak with a fifth to spare, in 64 MB steps.
    pub suggested_mb: u64,
}

impl RightSizing {
    /// The sizing for a function that peaked at `peak_mb` and is configured with
    /// `configured_mb`.
    pub fn new(peak_mb: u64, configured_mb: u64) -> RightSizing {
        let with_headroom = peak_mb.saturating_mul(6).div_ceil(5);
        let suggested = with_headroom.div_ceil(64).saturating_mul(64);
        let suggested_mb = suggested.clamp(*LAMBDA_MEMORY_MB.start(), *LAMBDA_MEMORY_MB.end());
        RightSizing { peak_mb, configured_mb, suggested_mb }
    }

    /// The duration charge at the suggested size for the same billed milliseconds, as a
    /// share of the configured size's (request charges are the same at any size).
    pub fn duration_charge_ratio(&self) -> f64 {
        self.suggested_mb as f64 / self.configured_mb.max(1) as f64
    }

    /// How much longer a compute-bound invocation would run at the suggested size than at
    /// the configured one, because Lambda gives CPU in proportion to memory up to one vCPU at
    /// [`ONE_VCPU_MB`] (more memory adds vCPUs a single-threaded function cannot use).
    pub fn slowdown(&self) -> f64 {
        let cpu = |mb: u64| mb.min(ONE_VCPU_MB) as f64 / ONE_VCPU_MB as f64;
        cpu(self.configured_mb) / cpu(self.suggested_mb)
    }

    /// One sentence for reports and `peerless invoke`.
    pub fn describe(&self) -> String {
        format!(
            "functions peaked at {} MB; the smallest Lambda size with 20 % headroom is {} MB (configured {} MB): \
             the same billed time costs {:.1} % of the duration charge there, but Lambda gives CPU in proportion \
             to memory (one vCPU at {} MB), so a compute-bound invocation runs about {:.1}× longer and costs about \
             {:.0} % as much",
            self.peak_mb,
            self.suggested_mb,
            self.configured_mb,
            self.duration_charge_ratio() * 100.0,
            ONE_VCPU_MB,
            self.slowdown(),
            self.duration_charge_ratio() * self.slowdown() * 100.0
        )
    }
}

/// Lambda rounds duration up to the next millisecond.
pub fn billed_ms(duration_us: u64) -> u64 {
    duration_us.div_ceil(1000).max(1)
}

/// Integer pico-dollars as micro-dollars (rounded down) for reports.
pub fn pico_to_micro(pico: u64) -> u64 {
    pico / 1_000_000
}

/// Integer pico-dollars as a dollar figure for display only.
pub fn pico_to_usd(pico: u64) -> f64 {
    pico as f64 / PICO_PER_USD as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_charge_matches_aws_published_examples() {
        let p = PriceTable::default().prices().unwrap();
        // 1 GB for 1 s on x86: $0.0000166667 + $0.0000002 request.
        assert_eq!(p.invocation_pico(1000, 1024), 16_666_700 + 200_000);
        // AWS's 128 MB per-ms price: $0.0000000021 per ms (rounded on their page).
        let per_ms = p.invocation_pico(1, 128) - 200_000;
        assert_eq!(per_ms, 2_084); // 16_666_700 / 8 / 1000 = 2083.3 → rounded up
        // Rounding up to whole ms.
        assert_eq!(billed_ms(1), 1);
        assert_eq!(billed_ms(1000), 1);
        assert_eq!(billed_ms(1001), 2);
    }

    #[test]
    fn arm_is_cheaper_and_bad_prices_name_the_key() {
        let x86 = PriceTable::default().prices().unwrap();
        let arm = PriceTable { arch: LambdaArch::Arm64, ..PriceTable::default() }.prices().unwrap();
        assert!(arm.invocation_pico(100, 1769) < x86.invocation_pico(100, 1769));
        let bad = PriceTable { request_usd: -1.0, ..PriceTable::default() }.prices().unwrap_err();
        assert_eq!(bad.key, "request_usd");
        assert!(bad.to_string().contains("prices.request_usd"));
    }

    #[test]
    fn node_hours_charge_per_ms() {
        let p = PriceTable::default().prices().unwrap();
        assert_eq!(p.node_pico(3_600_000), 72_500_000_000);
        assert_eq!(pico_to_micro(p.node_pico(3_600_000)), 72_500);
    }

    #[test]
    fn right_sizing_keeps_a_fifth_of_headroom_in_64_mb_steps_and_prices_the_cpu_share() {
        let r = RightSizing::new(43, 1769);
        assert_eq!(r.suggested_mb, 128, "Lambda's floor");
        assert!((r.duration_charge_ratio() - 128.0 / 1769.0).abs() < 1e-12);
        assert!((r.slowdown() - 1769.0 / 128.0).abs() < 1e-9);
        assert_eq!(RightSizing::new(300, 1769).suggested_mb, 384, "300 × 1.2 = 360 → 384");
        assert_eq!(RightSizing::new(320, 1769).suggested_mb, 384, "exactly 384");
        assert_eq!(RightSizing::new(9_000, 1769).suggested_mb, 10_240, "Lambda's ceiling");
        // Above one vCPU more memory adds no CPU for one thread.
        assert!((RightSizing::new(1_000, 3_008).slowdown() - 1769.0 / 1216.0).abs() < 1e-9);
        assert!(r.describe().contains("128 MB (configured 1769 MB)"), "{}", r.describe());
    }
}
