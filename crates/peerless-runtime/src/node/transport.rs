//! The network of every node on libp2p: TCP + Noise + Yamux, ed25519 identities, an allow-list, and one
//! request-response protocol that carries [`peerless_core::wire`] messages as raw frames.
//!
//! Every identity is a fresh random ed25519 key kept in a file of its host (`peerless keygen`,
//! or `identity.key` in the node's directory, libp2p's protobuf encoding, mode 0600); nothing
//! derives a private key from a shared value. Whom a node admits is decided either by an
//! allow-list of peer ids (libp2p's `allow_block_list` refuses the others right after the Noise
//! handshake authenticated them) or, with no allow-list, by admission certificates checked after
//! the connection is up ([`super::admit`]).

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{PeerId, StreamProtocol, Swarm, allow_block_list, noise, ping, tcp, yamux};

/// The protocol name of peerless messages.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peerless/round/1");

/// Largest frame accepted, bytes (a LeNet state with Adam is ~4 MB; MLPs of 10M params fit).
pub const MAX_FRAME: usize = 256 << 20;

/// A fresh random ed25519 identity (from the OS's RNG), never derived from anything shared.
pub fn generate_keypair() -> Keypair {
    Keypair::generate_ed25519()
}

/// Reads the identity saved at `path` (libp2p's protobuf encoding).
pub fn read_keypair(path: &Path) -> io::Result<Keypair> {
    let bytes = std::fs::read(path)?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a libp2p key: {e}", path.display()))
    })
}

/// Writes `keypair` to `path`, a file that must not exist yet, readable by its owner only
/// (mode 0600).
pub fn write_new_keypair(path: &Path, keypair: &Keypair) -> io::Result<()> {
    let bytes = keypair.to_protobuf_encoding().map_err(io::Error::other)?;
    write_private(path, &bytes)
}

/// Writes `bytes` to `path`, which must not exist yet, with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Reads the identity saved at `path`, or generates a fresh one and saves it there.
pub fn load_or_generate_keypair(path: &Path) -> io::Result<Keypair> {
    match read_keypair(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let k = generate_keypair();
            write_new_keypair(path, &k)?;
            Ok(k)
        }
        other => other,
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
    /// Refuses peers off the allow-list (off when admission is by certificate).
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
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

/// Builds a swarm for `keypair` admitting only `allowed`, or any peer id when `None` (admission
/// by certificate). `request_timeout` bounds a request from send to answer (a state request is
/// answered at the next round boundary).
pub fn build_swarm(
    keypair: Keypair,
    allowed: Option<&[PeerId]>,
    request_timeout: Duration,
) -> Result<Swarm<Behaviour>, Box<dyn std::error::Error + Send + Sync>> {
    let allow = allowed.map(|ids| {
        let mut allow = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for p in ids {
            allow.allow_peer(*p);
        }
        allow
    });
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_| Behaviour {
            allow: Toggle::from(allow),
            rr: request_response::Behaviour::with_codec(
                FrameCodec,
                [(PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(request_timeout)
                    .with_max_concurrent_streams(256),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(1))),
        })?
        .with_swarm_config(|c| {
            // A request's substream sends its data with its protocol's name instead of after
            // the listener confirmed it (multistream-select's lazy dialer): every node speaks
            // the one protocol, and each request (a gradient, a `Received`) no longer waits a
            // round trip first, 40 ms over a link with 20 ms delay.
            c.with_idle_connection_timeout(Duration::from_secs(24 * 3600))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_fresh_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("identity.key");
        let a = load_or_generate_keypair(&p).unwrap();
        let b = load_or_generate_keypair(&p).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id(), "reloaded, not regenerated");
        assert_ne!(generate_keypair().public(), generate_keypair().public());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let err = write_new_keypair(&p, &generate_keypair()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(read_keypair(&p).unwrap().public(), a.public());
        std::fs::write(&p, b"garbage").unwrap();
        let err = load_or_generate_keypair(&p).unwrap_err();
        assert!(err.to_string().contains("not a libp2p key"), "{err}");
    }
}
