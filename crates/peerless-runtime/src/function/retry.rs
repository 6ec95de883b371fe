//! What every invoker shares around its attempts: the request body check, the seeded backoff
//! and the retry loop (one [`InvocationRecord`](peerless_core::function::InvocationRecord) per
//! attempt, retryable outcomes retried up to a bound).

use std::future::Future;
use std::time::Duration;

use peerless_core::function::SYNC_PAYLOAD_LIMIT;
use peerless_core::rng::Rng;
use serde_json::Value;

use super::config::Config;
use super::invoke::{Invocation, InvokeCtx, InvokeError};

/// The JSON body of `payload` for `function`; refused over Lambda's synchronous payload limit.
pub(crate) fn request_body(function: &str, payload: &Value) -> Result<Vec<u8>, InvokeError> {
    let body = serde_json::to_vec(payload).map_err(|e| InvokeError::Spawn {
        function: function.to_owned(),
        reason: format!("payload does not serialize: {e}"),
    })?;
    if body.len() > SYNC_PAYLOAD_LIMIT {
        return Err(InvokeError::RequestTooLarge { size: body.len() });
    }
    Ok(body)
}

/// Backoff before retry `attempt` (≥ 1) of `(function, ctx)`: equal jitter over a cap that
/// doubles per retry from `backoff_base_ms` up to `backoff_max_ms`, drawn from `seed`.
pub(crate) fn backoff(c: &Config, seed: u64, function: &str, ctx: &InvokeCtx, attempt: u32) -> Duration {
    let cap = c.backoff_base_ms.saturating_mul(1u64 << (attempt - 1).min(20)).min(c.backoff_max_ms);
    let mut rng = Rng::derive(
        seed,
        &format!("backoff/{function}/{}/{}/{}", ctx.node, ctx.round, ctx.batch),
        u64::from(attempt),
    );
    let half = cap / 2;
    let jitter = if cap - half > 0 { rng.below(cap - half + 1) } else { 0 };
    Duration::from_millis(half + jitter)
}

/// Runs `attempt(0)`, then `attempt(1)`, … after each retryable outcome (waiting the
/// [`backoff`]) until one is not retryable or `max_retries` retries are spent. Returns the last
/// attempt's invocation carrying every attempt's records, in order.
pub(crate) async fn with_retries<F, Fut>(
    config: &Config,
    seed: u64,
    function: &str,
    ctx: &InvokeCtx,
    max_retries: u32,
    mut attempt: F,
) -> Result<Invocation, InvokeError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<Invocation, InvokeError>>,
{
    let mut attempts = Vec::new();
    for n in 0..=max_retries {
        if n > 0 {
            let wait = backoff(config, seed, function, ctx, n);
            tracing::debug!(function, node = %ctx.node, round = ctx.round, batch = ctx.batch, attempt = n, wait_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait).await;
        }
        let mut inv = attempt(n).await?;
        attempts.append(&mut inv.attempts);
        if !inv.outcome.is_retryable() || n == max_retries {
            inv.attempts = attempts;
            return Ok(inv);
        }
    }
    unreachable!("the loop returns on its last attempt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_replays() {
        let cfg = Config { backoff_base_ms: 100, backoff_max_ms: 300, ..Config::for_test() };
        let ctx = InvokeCtx::new("p", 1, 0);
        let b1 = backoff(&cfg, 7, "f", &ctx, 1);
        let b3 = backoff(&cfg, 7, "f", &ctx, 3);
        assert!((50..=100).contains(&(b1.as_millis() as u64)), "{b1:?}");
        assert!((150..=300).contains(&(b3.as_millis() as u64)), "{b3:?}");
        assert_eq!(b1, backoff(&cfg, 7, "f", &ctx, 1));
    }

    #[test]
    fn oversize_payloads_are_refused() {
        let big = Value::String("x".repeat(SYNC_PAYLOAD_LIMIT));
        let err = request_body("echo", &big).unwrap_err();
        assert!(matches!(err, InvokeError::RequestTooLarge { .. }), "{err}");
        assert_eq!(request_body("echo", &Value::Null).unwrap(), b"null");
    }
}
