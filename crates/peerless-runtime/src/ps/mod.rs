//! The serverless parameter-server baseline: the PS and its workers, on the same node driver,
//! network, functions, stores, sampler and checkpoints as P2P.
//!
//! The PS is node index `n` (after the `n` workers) of the run's identities. Workers long-poll
//! it for model version `r` ([`Message::ParamsRequest`]), compute their gradient for `r`
//! through their functions (the same batches peer `i` would use in P2P), and push it. When the
//! PS is gone, workers redial every second and re-request with backoff and jitter; a gradient
//! whose push failed is dropped, never re-sent, and the PS drops pushes for any other round than
//! its current one, so nothing is applied twice. A restarted PS resumes from its checkpoint.
//!
//! - [`server`] — the PS role: carries out [`peerless_core::ps::Ps`]'s actions.
//! - [`worker`] — the worker role: carries out [`peerless_core::worker::Worker`]'s actions.
//!
//! [`Message::ParamsRequest`]: peerless_core::wire::Message::ParamsRequest

use std::path::PathBuf;
use std::time::Duration;

use peerless_core::admission::Role;
use tokio::sync::watch;

use crate::function::FunctionCommand;
use crate::node::driver::{NetPlan, Node, drive};
use crate::node::net::members;
use crate::node::{NodeError, NodeFile, NodeSummary};

pub(crate) mod server;
pub(crate) mod worker;

/// How the network of a PS run is set up: the workers and the PS (a node talks to `accepts`),
/// and requests that may wait (a long poll) up to an hour past the round deadline.
fn plan(file: &NodeFile, accepts: Role) -> Result<NetPlan, NodeError> {
    let cluster = &file.run.cluster;
    Ok(NetPlan {
        members: members(file, cluster.nodes + 1, vec![accepts])?,
        request_timeout: Duration::from_millis(
            3 * cluster.deadline_ceiling_ms + cluster.start_timeout_ms + 3_600_000,
        ),
        // Workers push one gradient a round to one PS: the lane is a peer-to-peer matter.
        lane: false,
    })
}

/// Runs the parameter server until every round is done (or `stop`).
pub async fn run_server(
    file: NodeFile,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<NodeSummary, NodeError> {
    let plan = plan(&file, Role::Worker)?;
    let mut node = Node::open(file, data_dir, plan)?;
    let mut server = server::Server::start(&mut node)?;
    drive(&mut node, &mut server, &mut stop).await?;
    server.finish(node).await
}

/// Runs one worker until the PS publishes the last version (or `stop`).
pub async fn run_worker(
    file: NodeFile,
    command: FunctionCommand,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<NodeSummary, NodeError> {
    let plan = plan(&file, Role::Ps)?;
    let mut node = Node::open(file, data_dir, plan)?;
    let mut worker = worker::Worker::start(&mut node, command).await?;
    let ending = drive(&mut node, &mut worker, &mut stop).await?;
    worker.finish(node, ending).await
}
