//! The network of every node on libp2p: TCP + Noise + Yamux, ed25519 identities, an allow-list, and one
//! request-response protocol that carries [`peerless_core::wire`] messages as raw frames.
//!
//! Identities derive from the run secret and the peer's index (`SHA-256("peerless-peer-key" ‖
//! secret ‖ index)` as the ed25519 secret key), so a launcher that knows the secret knows every
//! member's peer id without an exchange; each peer also saves its key in its directory
//! (`identity.key`, libp2p's protobuf encoding). Connections from peer ids off the allow-list are
//! refused by libp2p's `allow_block_list` right after the Noise handshake authenticated them.

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{PeerId, StreamProtocol, Swarm, allow_block_list, noise, ping, tcp, yamux};
use sha2::{Digest as _, Sha256};

/// The protocol name of peerless messages.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peerless/round/1");

/// Largest frame accepted, bytes (a LeNet state with Adam is ~4 MB; MLPs of 10M params fit).
pub const MAX_FRAME: usize = 256 << 20;

/// The ed25519 keypair of peer `index` of the run with `secret`.
pub fn derive_keypair(secret: &str, index: u32) -> Keypair {
    let mut h = Sha256::new();
    h.update(b"peerless-peer-key");
    h.update((secret.len() as u64).to_le_bytes());
    h.update(secret.as_bytes());
    h.update(index.to_le_bytes());
    let bytes: [u8; 32] = h.finalize().into();
    Keypair::ed25519_from_bytes(bytes).expect("invariant: any 32 bytes are an ed25519 secret key")
}

/// The peer id of peer `index` of the run with `secret`.
pub fn derive_peer_id(secret: &str, index: u32) -> PeerId {
    derive_keypair(secret, index).public().to_peer_id()
}

/// Loads the keypair saved at `path`, or saves `fallback` there and returns it.
pub fn load_or_save_keypair(path: &Path, fallback: Keypair) -> io::Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a libp2p key: {e}", path.display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let bytes = fallback.to_protobuf_encoding().map_err(io::Error::other)?;
            crate::checkpoint::write_atomic(path, &bytes)?;
            Ok(fallback)
        }
        Err(e) => Err(e),
    }
}

/// Length-prefixed raw frames: a `u32` little-endian length, then the bytes. Decoding into
/// messages (and validation) happens in the peer loop, which knows who sent them.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Bytes> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; n];
    io.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(io: &mut T, frame: &[u8]) -> io::Result<()> {
    io.write_all(&(frame.len() as u32).to_le_bytes()).await?;
    io.write_all(frame).await?;
    io.flush().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Bytes;
    type Response = Bytes;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Bytes>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Bytes>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Bytes) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Bytes) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// The peer's network behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refuses peers off the allow-list.
    pub allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    /// Gradients, joins and state transfers.
    pub rr: request_response::Behaviour<FrameCodec>,
    /// Liveness and round-trip times.
    pub ping: ping::Behaviour,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

/// Builds a swarm for `keypair` admitting only `allowed`. `request_timeout` bounds a request
/// from send to answer (a state request is answered at the next round boundary).
pub fn build_swarm(
    keypair: Keypair,
    allowed: &[PeerId],
    request_timeout: Duration,
) -> Result<Swarm<Behaviour>, Box<dyn std::error::Error + Send + Sync>> {
    let mut allow = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
    for p in allowed {
        allow.allow_peer(*p);
    }
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_| Behaviour {
            allow,
            rr: request_response::Behaviour::with_codec(
                FrameCodec,
                [(PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(request_timeout)
                    .with_max_concurrent_streams(256),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(1))),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(24 * 3600)))
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_derive_from_secret_and_index() {
        assert_eq!(derive_peer_id("s", 0), derive_peer_id("s", 0));
        assert_ne!(derive_peer_id("s", 0), derive_peer_id("s", 1));
        assert_ne!(derive_peer_id("s", 0), derive_peer_id("t", 0));
    }

    #[test]
    fn saved_identity_is_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("identity.key");
        let a = load_or_save_keypair(&p, derive_keypair("x", 3)).unwrap();
        let b = load_or_save_keypair(&p, derive_keypair("y", 9)).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(&p, b"garbage").unwrap();
        let err = load_or_save_keypair(&p, derive_keypair("x", 3)).unwrap_err();
        assert!(err.to_string().contains("not a libp2p key"), "{err}");
    }
}
