//! The function runtime's configuration: Lambda's knobs, retries, faults and prices, validated.

use peerless_core::cost::PriceTable;
use serde::{Deserialize, Serialize};

use super::faults::FaultConfig;
use crate::config_error::ConfigError;

/// Lambda's smallest memory setting, MB.
pub const MIN_MEMORY_MB: u64 = 128;
/// Lambda's largest memory setting, MB.
pub const MAX_MEMORY_MB: u64 = 10_240;
/// Lambda's longest invocation, ms (15 min).
pub const MAX_TIMEOUT_MS: u64 = 900_000;

/// Which service runs the functions (`function.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// The local function runtime: instances are processes on this machine.
    #[default]
    Local,
    /// AWS Lambda, or anything that speaks its Invoke API (`[function.aws]`); needs a build
    /// with the `aws-lambda` feature.
    AwsLambda,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Service::Local => "local",
            Service::AwsLambda => "aws-lambda",
        })
    }
}

/// `[function.aws]`: where the `aws-lambda` backend sends invocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Invoke API endpoint, e.g. `http://127.0.0.1:9000` for `cargo lambda watch`. Default
    /// empty: AWS's endpoint for `region`.
    pub endpoint_url: String,
    /// AWS region. Default `us-east-1`.
    pub region: String,
    /// The Lambda function (name, ARN or partial ARN) that serves every invocation, e.g. one
    /// `peerless` custom runtime whose Handler setting is `gradient`. Default empty: the
    /// function name the node invokes (`gradient`).
    pub function_name: String,
    /// Time allowed to open a connection, ms. Default 3000.
    pub connect_timeout_ms: u64,
    /// How much longer than `timeout_ms` the client waits for an answer, ms, so that
    /// Lambda's own timeout answer arrives first. Default 5000.
    pub timeout_margin_ms: u64,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            endpoint_url: String::new(),
            region: "us-east-1".into(),
            function_name: String::new(),
            connect_timeout_ms: 3_000,
            timeout_margin_ms: 5_000,
        }
    }
}

/// Configuration of the function runtime (`[function]` in a run's TOML): the backend, and
/// Lambda's knobs as [`LocalRuntime`](super::LocalRuntime) applies them.
///
/// Every key has a default (below); unknown keys are refused. With `backend = "aws-lambda"`,
/// `memory_mb` is what the ledger charges when Lambda's log tail does not say, `timeout_ms`
/// bounds the client's wait, retries and prices apply as locally; the instance keys (`concurrency`,
/// `keep_alive_ms`, `init_timeout_ms`, `memory_poll_ms`) are Lambda's business and faults
/// cannot be injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `local` (default) or `aws-lambda`.
    pub backend: Service,
    /// Memory per instance, MB (128..=10240). Billed, and enforced: an instance whose resident
    /// set exceeds it is killed (`OutOfMemory`). Default 1769, where Lambda gives one full vCPU.
    pub memory_mb: u64,
    /// Per-invocation timeout, ms (1..=900000); the instance is killed when it passes.
    /// Default 60000.
    pub timeout_ms: u64,
    /// Longest an instance may take from spawn to its first `GET /next`, ms (Lambda's init
    /// phase limit is 10 s). Default 10000.
    pub init_timeout_ms: u64,
    /// Concurrent invocations per function; more are throttled at once. Default 32 (Lambda's
    /// regional default is 1000; this machine is smaller).
    pub concurrency: u32,
    /// An idle instance is retired after this long, ms. Default 300000 (5 min).
    pub keep_alive_ms: u64,
    /// Retries after a retryable outcome (crash, timeout, throttle, OOM); Lambda's asynchronous
    /// invocations retry at most 2 times. Default 2.
    pub max_retries: u32,
    /// First retry's backoff, ms; doubles per retry, with full jitter. Default 20.
    pub backoff_base_ms: u64,
    /// Backoff cap, ms. Default 2000.
    pub backoff_max_ms: u64,
    /// How often an instance's resident set is sampled during an invocation, ms. Default 5.
    pub memory_poll_ms: u64,
    /// Injected faults (all rates default to 0).
    pub faults: FaultConfig,
    /// Prices the ledger charges with (AWS us-east-1 by default).
    pub prices: PriceTable,
    /// The `aws-lambda` backend's endpoint, region and function.
    pub aws: AwsConfig,
    /// With the `local` backend: the address (`127.0.0.1:port`) of a function service
    /// (`peerless function-service`) that holds this node's instances, invoked through its
    /// Invoke API, so that warm instances outlive a restart of the node. Default empty: the
    /// instances are children of the node itself. The launcher sets it per node when
    /// `launcher.function_services` is on.
    pub service_addr: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Service::Local,
            memory_mb: 1769,
            timeout_ms: 60_000,
            init_timeout_ms: 10_000,
            concurrency: 32,
            keep_alive_ms: 300_000,
            max_retries: 2,
            backoff_base_ms: 20,
            backoff_max_ms: 2_000,
            memory_poll_ms: 5,
            faults: FaultConfig::default(),
            prices: PriceTable::default(),
            aws: AwsConfig::default(),
            service_addr: String::new(),
        }
    }
}

fn invalid(key: &str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid { key: format!("function.{key}"), value: value.to_string(), reason: reason.into() }
}

impl Config {
    /// A configuration for tests: 256 MB, 10 s timeout, short backoff, short keep-alive.
    pub fn for_test() -> Self {
        Config {
            memory_mb: 256,
            timeout_ms: 10_000,
            keep_alive_ms: 60_000,
            backoff_base_ms: 1,
            backoff_max_ms: 10,
            ..Config::default()
        }
    }

    /// Sets `memory_mb`.
    pub fn with_memory_mb(mut self, mb: u64) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Sets `timeout_ms`.
    pub fn with_timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = ms;
        self
    }

    /// Sets `concurrency`.
    pub fn with_concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// Sets `max_retries`.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets `keep_alive_ms`.
    pub fn with_keep_alive_ms(mut self, ms: u64) -> Self {
        self.keep_alive_ms = ms;
        self
    }

    /// Sets the fault rates.
    pub fn with_faults(mut self, faults: FaultConfig) -> Self {
        self.faults = faults;
        self
    }

    /// Checks every value's range; the error names the key (`function.memory_mb`, …).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&self.memory_mb) {
            return Err(invalid("memory_mb", self.memory_mb, "must be in 128..=10240 (Lambda's range)"));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(invalid("timeout_ms", self.timeout_ms, "must be in 1..=900000 (Lambda's 15 min)"));
        }
        if !(1..=600_000).contains(&self.init_timeout_ms) {
            return Err(invalid("init_timeout_ms", self.init_timeout_ms, "must be in 1..=600000"));
        }
        if !(1..=10_000).contains(&self.concurrency) {
            return Err(invalid("concurrency", self.concurrency, "must be in 1..=10000"));
        }
        if self.max_retries > 10 {
            return Err(invalid("max_retries", self.max_retries, "must be at most 10"));
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err(invalid("backoff_max_ms", self.backoff_max_ms, "must be at least backoff_base_ms"));
        }
        if self.backoff_max_ms > 600_000 {
            return Err(invalid("backoff_max_ms", self.backoff_max_ms, "must be at most 600000"));
        }
        if !(1..=1_000).contains(&self.memory_poll_ms) {
            return Err(invalid("memory_poll_ms", self.memory_poll_ms, "must be in 1..=1000"));
        }
        self.faults
            .validate()
            .map_err(|(key, value, reason)| invalid(&format!("faults.{key}"), value, reason))?;
        self.prices.prices().map_err(|e| {
            invalid(&format!("prices.{}", e.key), e.value, "must be a finite, non-negative dollar amount")
        })?;
        if !self.service_addr.is_empty() {
            if self.backend != Service::Local {
                return Err(invalid(
                    "service_addr",
                    &self.service_addr,
                    "only the local backend has a function service",
                ));
            }
            if self.service_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "service_addr",
                    &self.service_addr,
                    "must be an IP address and port, e.g. 127.0.0.1:9000",
                ));
            }
        }
        if self.backend == Service::AwsLambda {
            if self.faults != FaultConfig::default() {
                return Err(invalid(
                    "faults",
                    "(non-zero rates)",
                    "faults are injected by the local runtime only; use backend = \"local\"",
                ));
            }
            let aws = &self.aws;
            if aws.region.trim().is_empty() {
                return Err(invalid("aws.region", "\"\"", "must name a region, e.g. us-east-1"));
            }
            let url = &aws.endpoint_url;
            if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid("aws.endpoint_url", url, "must start with http:// or https://"));
            }
            if !(1..=600_000).contains(&aws.connect_timeout_ms) {
                return Err(invalid(
                    "aws.connect_timeout_ms",
                    aws.connect_timeout_ms,
                    "must be in 1..=600000",
                ));
            }
            if aws.timeout_margin_ms > 600_000 {
                return Err(invalid(
                    "aws.timeout_margin_ms",
                    aws.timeout_margin_ms,
                    "must be at most 600000",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let partial: Config = toml::from_str("memory_mb = 512\n[faults]\ncrash_rate = 0.1\n").unwrap();
        assert_eq!(partial.memory_mb, 512);
        assert_eq!(partial.timeout_ms, 60_000);
        assert!((partial.faults.crash_rate - 0.1).abs() < 1e-12);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = toml::from_str::<Config>("memroy_mb = 1").unwrap_err().to_string();
        assert!(err.contains("memroy_mb"), "{err}");
        let err = Config { memory_mb: 64, ..Config::default() }.validate().unwrap_err().to_string();
        assert!(err.starts_with("function.memory_mb = 64"), "{err}");
        let err = Config { timeout_ms: 0, ..Config::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("function.timeout_ms"), "{err}");
        let mut c = Config::default();
        c.faults.hang_rate = 1.5;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("function.faults.hang_rate"), "{err}");
        let mut c = Config::default();
        c.prices.request_usd = f64::NAN;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("function.prices.request_usd"), "{err}");
    }

    #[test]
    fn the_aws_backend_is_chosen_and_checked_by_key() {
        let c: Config = toml::from_str(
            "backend = \"aws-lambda\"\n[aws]\nendpoint_url = \"http://127.0.0.1:9000\"\nfunction_name = \"peerless\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            (c.backend, c.aws.region.as_str(), c.aws.function_name.as_str()),
            (Service::AwsLambda, "us-east-1", "peerless")
        );
        assert_eq!(Config::default().backend, Service::Local);
        let err = toml::from_str::<Config>("backend = \"lambda\"").unwrap_err().to_string();
        assert!(err.contains("aws-lambda"), "{err}");
        let bad = |f: fn(&mut Config)| {
            let mut c = Config { backend: Service::AwsLambda, ..Config::default() };
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(
            bad(|c| c.aws.endpoint_url = "127.0.0.1:9000".into()).starts_with("function.aws.endpoint_url")
        );
        assert!(bad(|c| c.aws.region = " ".into()).starts_with("function.aws.region"));
        assert!(bad(|c| c.faults.crash_rate = 0.1).starts_with("function.faults"));
        // The local backend takes faults, and ignores the [aws] keys.
        let faults = FaultConfig { crash_rate: 0.1, ..FaultConfig::default() };
        Config { backend: Service::Local, faults, ..c }.validate().unwrap();
    }
}
