//! The local function runtime: AWS Lambda's contract (Runtime API, limits, billing) on local processes.
//!
//! # Layout
//! - [`handler`] — the function side: [`serve`] (a Lambda custom runtime) and [`Handlers`].
//! - [`api`] — the Runtime API server each instance polls (`/2018-06-01/runtime/…`).
//! - `instance` — one instance: an OS process, its supervisor, timeout/memory watch.
//! - `pool` — warm pools, concurrency limits, keep-alive.
//! - [`invoke`] — the [`Invoker`] trait and [`LocalRuntime`]: attempts, retries, ledger.
//! - `retry` — the retry loop and seeded backoff every invoker shares.
//! - [`faults`] — seeded fault injection (crash, hang, throttle, slow cold start).
//! - [`metrics`] — the ledger (`ledger.csv`), the [`Summary`] counters (`function_metrics.json`)
//!   and [`write_run_metrics`](metrics::write_run_metrics), which leaves both in a run directory.
//! - [`invoke_api`] — AWS's Invoke API (`POST /2015-03-31/functions/{name}/invocations`)
//!   in front of a [`LocalRuntime`].
//! - [`remote`] — [`Remote`](remote::Remote): the [`Invoker`] of a node whose instances live
//!   in a function service (`peerless function-service`: a [`LocalRuntime`] behind an
//!   [`InvokeApi`]), so that they outlive the node.
//! - [`config`] — [`Config`] with Lambda's defaults and validation, and the backend choice.
//! - [`report`] — Lambda's `REPORT` log line and the base64 log tail that carries it.
//! - `aws` (feature `aws-lambda`) — [`AwsLambda`](aws::AwsLambda): the [`Invoker`] on AWS
//!   Lambda's Invoke API (`aws-sdk-lambda`), with the local runtime's retries and ledger.

//!
//! Only `config`, `faults` and `report` build without the crate's `drivers` feature.

#[cfg(feature = "drivers")]
pub mod api;
#[cfg(feature = "aws-lambda")]
pub mod aws;
pub mod config;
pub mod faults;
#[cfg(feature = "drivers")]
pub mod handler;
#[cfg(feature = "drivers")]
pub(crate) mod instance;
#[cfg(feature = "drivers")]
pub mod invoke;
#[cfg(feature = "drivers")]
pub mod invoke_api;
#[cfg(feature = "drivers")]
pub mod metrics;
#[cfg(feature = "drivers")]
pub(crate) mod pool;
#[cfg(feature = "drivers")]
pub mod remote;
pub mod report;
#[cfg(feature = "drivers")]
pub(crate) mod retry;

#[cfg(feature = "drivers")]
pub use api::FunctionError;
pub use config::{AwsConfig, Config, Service};
pub use faults::{Fault, FaultConfig, FaultInjector, FaultPlan};
#[cfg(feature = "drivers")]
pub use handler::{HandlerError, HandlerFuture, Handlers, ServeError, serve};
#[cfg(feature = "drivers")]
pub use instance::FunctionCommand;
#[cfg(feature = "drivers")]
pub use invoke::{Attempted, Invocation, InvokeCtx, InvokeError, InvokeFuture, Invoker, LocalRuntime, start};
#[cfg(feature = "drivers")]
pub use invoke_api::InvokeApi;
#[cfg(feature = "drivers")]
pub use metrics::{Ledger, Summary};
