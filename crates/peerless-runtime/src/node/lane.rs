//! The tensor lane (`p2p.tensor_transport = "tcp"`): gradients between peers over plain TCP
//! connections, one for each direction of a pair, each opened with a token that the receiving
//! peer handed out over the authenticated libp2p channel ([`Message::LaneOffer`]).
//!
//! Why: libp2p's Noise encryption and yamux's copies move about 550 MB/s on one of this
//! machine's cores, a plain TCP copy several GB/s. Under every-step sync a peer sends its whole
//! gradient to every other peer every round, and that transport cost more CPU than the training
//! step itself (docs/benchmarks.md, the profile). What the lane gives up: past the token its
//! frames are neither encrypted nor authenticated, as with PyTorch's gloo and NCCL, so it is
//! for networks one trusts (docs/threat-model.md). Only gradients and each round's `Received`
//! announcement travel on it (both are on every round's critical path); admission, joins,
//! states and heartbeats stay on libp2p. A `Received` whose lane breaks goes again over
//! libp2p. A gradient in flight when its lane breaks is reported failed, not sent again (the
//! receiver may have taken it in: a second copy would be a replay); a receiver missing it asks
//! for it again (`Resend`), over libp2p, where the next gradients go too until a new lane is
//! up, and so does any gradient sent after the kernel closed the connection, before this node's
//! tasks reported it closed.
//!
//! On a lane connection the dialler first writes the token, then requests; the listener answers
//! each. A frame is a `u64` request id, a `u32` length and that many bytes, little-endian.
//!
//! [`Message::LaneOffer`]: peerless_core::wire::Message::LaneOffer

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut as _, Bytes, BytesMut};
use peerless_core::protocol::PeerIdx;
use peerless_core::wire::{self, GRADIENT_HEAD, LANE_TOKEN};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::transport::MAX_FRAME;
use crate::store::floats;

/// A lane token.
pub(crate) type Token = [u8; LANE_TOKEN];

/// How long a lane connection may take to open and present its token.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// What the lane's tasks report to the node's loop.
#[derive(Debug)]
pub(crate) enum LaneEvent {
    /// A connection came in and presented `token`.
    Accepted { token: Token, stream: TcpStream },
    /// The connection this node dialled to `peer` is up.
    Dialed { peer: PeerIdx, stream: TcpStream },
    /// Dialling `peer`'s lane failed.
    DialFailed { peer: PeerIdx, error: String },
    /// Request `id` came from `peer` on incoming connection `conn`.
    Request { peer: PeerIdx, conn: u64, id: u64, payload: Payload },
    /// The answer to request `id`.
    Answer { id: u64, bytes: Bytes },
    /// Connection `conn` (with `peer`) closed.
    Closed { peer: PeerIdx, conn: u64, error: String },
}

/// A request as it came: its bytes, or a gradient read apart, its vector straight into the
/// `f32`s it is ([`wire::gradient_len`]). Three gradients a round come in at four peers, each a
/// megabyte that decoding from bytes copied once more: about a tenth of a peer's CPU.
#[derive(Debug)]
pub(crate) enum Payload {
    /// A frame's bytes, to decode whole.
    Bytes(Bytes),
    /// A gradient's first [`GRADIENT_HEAD`] bytes and its vector (decode with
    /// [`wire::decode_gradient`]).
    Gradient { head: Box<[u8; GRADIENT_HEAD]>, grad: Vec<f32> },
}

impl Payload {
    /// The frame's length on the wire.
    pub(crate) fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Gradient { grad, .. } => GRADIENT_HEAD + 4 * grad.len(),
        }
    }
}

/// Vectors of gradients already applied, kept to read the next gradients into. A vector read
/// into is written whole; a new one would be zeroed first, a pass over a megabyte that
/// measured as costly as the copy that reading in place saves. At most as many are kept as
/// the last round applied: the memory is what one round's gradients held anyway.
#[derive(Debug, Default)]
pub(crate) struct Spare(Mutex<Vec<Vec<f32>>>);

impl Spare {
    /// A vector of `len` values, whatever they are (reading overwrites them).
    fn take(&self, len: usize) -> Vec<f32> {
        let mut v = self.0.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default();
        // Only what it grows by is zeroed; a spare is most often the same length already.
        v.resize(len, 0.0);
        v
    }

    /// Keeps the vectors of one round's gradients, up to as many as there are.
    fn refill(&self, vs: Vec<Vec<f32>>) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = vs.len().saturating_sub(kept.len());
        kept.extend(vs.into_iter().filter(|v| v.capacity() > 0).take(room));
    }
}

/// One open lane connection: its writing side, the frames queued for its writing task, and
/// its tasks.
struct Conn {
    conn: u64,
    peer: PeerIdx,
    out: Arc<Out>,
    frames: mpsc::UnboundedSender<Frame>,
    tasks: [AbortHandle; 2],
}

/// A connection's writing side, shared by the node's loop and the connection's writing task.
struct Out {
    half: OwnedWriteHalf,
    /// Frames handed to the writing task and not yet written whole.
    queued: AtomicUsize,
}

/// A frame for the writing task: its head, its bytes, and how much of both is already written.
struct Frame {
    head: [u8; 12],
    bytes: Bytes,
    written: usize,
}

impl Conn {
    /// Writes frame `id` of `bytes`: right here when nothing is queued before it and the
    /// socket takes it whole (a gradient fits the socket's buffer), else (or what is left of
    /// it) through the writing task, in order. Writing here spares a wake-up of that task, and
    /// often of another runtime thread, for each frame: at 4 peers, a dozen a round.
    ///
    /// False, with nothing written, when the connection is gone, even if this node has not
    /// heard so from its tasks yet: the caller sends the frame another way. A frame queued on a
    /// connection the kernel already closed would be lost with nobody to ask for it again (the
    /// receiver asked for what was in flight when it saw the connection close, before this
    /// frame existed).
    fn send(&self, id: u64, bytes: Bytes) -> bool {
        // A closed TCP socket has no peer address: one system call, a frame of a megabyte.
        if self.out.half.peer_addr().is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        head[..8].copy_from_slice(&id.to_le_bytes());
        head[8..].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        let mut written = 0;
        if self.out.queued.load(Ordering::Acquire) == 0 {
            match self.out.half.try_write_vectored(&[IoSlice::new(&head), IoSlice::new(&bytes)]) {
                Ok(n) if n == head.len() + bytes.len() => return true,
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed since the check above: nothing of the frame went out.
                Err(_) => return false,
            }
        }
        self.out.queued.fetch_add(1, Ordering::AcqRel);
        self.frames.send(Frame { head, bytes, written }).is_ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A node's lane: its listener, the tokens it handed out, its connections and the requests
/// in flight on them.
pub(crate) struct Lane {
    port: u16,
    tx: mpsc::UnboundedSender<LaneEvent>,
    rx: mpsc::UnboundedReceiver<LaneEvent>,
    listener: AbortHandle,
    /// The token handed to each peer (the newest; an older one is no longer accepted).
    tokens: HashMap<PeerIdx, Token>,
    /// Connections this node dialled, by the peer they go to.
    out: HashMap<PeerIdx, Conn>,
    /// Connections that came in, by their number.
    incoming: HashMap<u64, Conn>,
    /// Requests sent and not yet answered: to whom, on which connection, and the bytes (sent
    /// again elsewhere if that connection breaks).
    inflight: HashMap<u64, (PeerIdx, u64, Bytes)>,
    next_id: u64,
    next_conn: u64,
    /// Vectors to read the next gradients into.
    spare: Arc<Spare>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Lane {
    /// A lane listening on `ip` (any free port). Called within the node's runtime.
    pub(crate) fn listen(ip: IpAddr) -> io::Result<Lane> {
        let socket = socket_for(ip)?;
        socket.bind(SocketAddr::new(ip, 0))?;
        // Connections accepted inherit the listener's buffer sizes.
        let listener = socket.listen(64)?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = mpsc::unbounded_channel();
        let accepting = tokio::spawn(accept(listener, tx.clone())).abort_handle();
        Ok(Lane {
            port,
            tx,
            rx,
            listener: accepting,
            tokens: HashMap::new(),
            out: HashMap::new(),
            incoming: HashMap::new(),
            inflight: HashMap::new(),
            next_id: 0,
            next_conn: 0,
            spare: Arc::default(),
        })
    }

    /// Gives back the vectors of one round's gradients once applied, to read the next
    /// gradients into.
    pub(crate) fn recycle(&self, vs: Vec<Vec<f32>>) {
        self.spare.refill(vs);
    }

    /// The listener's port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The next event of the lane's tasks.
    pub(crate) async fn next(&mut self) -> LaneEvent {
        self.rx.recv().await.expect("invariant: the lane holds a sender")
    }

    /// A fresh token for `peer`, replacing the one it had.
    pub(crate) fn issue(&mut self, peer: PeerIdx) -> io::Result<Token> {
        let mut token = [0u8; LANE_TOKEN];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut token)?;
        self.tokens.insert(peer, token);
        Ok(token)
    }

    /// Forgets `peer`: its token and every connection with it (its requests in flight are
    /// returned, to be sent again or failed).
    pub(crate) fn forget(&mut self, peer: PeerIdx) -> Vec<(u64, Bytes)> {
        self.tokens.remove(&peer);
        self.incoming.retain(|_, c| c.peer != peer);
        match self.out.remove(&peer) {
            Some(c) => self.orphans(c.conn),
            None => Vec::new(),
        }
    }

    /// Dials `peer`'s lane at `addr`, presenting `token`.
    pub(crate) fn dial(&self, peer: PeerIdx, addr: SocketAddr, token: Token) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let ev = match tokio::time::timeout(HANDSHAKE, open(addr, &token)).await {
                Ok(Ok(stream)) => LaneEvent::Dialed { peer, stream },
                Ok(Err(e)) => LaneEvent::DialFailed { peer, error: format!("{addr}: {e}") },
                Err(_) => LaneEvent::DialFailed { peer, error: format!("{addr}: timed out") },
            };
            let _ = tx.send(ev);
        });
    }

    /// Takes the connection this node dialled to `peer` into use (replacing an older one,
    /// whose requests in flight are returned).
    pub(crate) fn dialed(&mut self, peer: PeerIdx, stream: TcpStream) -> Vec<(u64, Bytes)> {
        let conn = self.start(peer, stream, Side::Dialer);
        match self.out.insert(peer, conn) {
            Some(old) => self.orphans(old.conn),
            None => Vec::new(),
        }
    }

    /// Takes an incoming connection into use if `token` is the one handed to some peer;
    /// returns that peer.
    pub(crate) fn accepted(&mut self, token: &Token, stream: TcpStream) -> Option<PeerIdx> {
        let peer = self.tokens.iter().find(|(_, t)| same(t, token)).map(|(p, _)| *p)?;
        let conn = self.start(peer, stream, Side::Listener);
        self.incoming.insert(conn.conn, conn);
        Some(peer)
    }

    /// Whether a lane to `peer` is up.
    pub(crate) fn is_up(&self, peer: PeerIdx) -> bool {
        self.out.contains_key(&peer)
    }

    /// Sends request `bytes` to `peer` on its lane; its id, or `None` when no lane is up.
    pub(crate) fn request(&mut self, peer: PeerIdx, bytes: Bytes) -> Option<u64> {
        let c = self.out.get(&peer)?;
        self.next_id += 1;
        let id = self.next_id;
        c.send(id, bytes.clone()).then_some(())?;
        self.inflight.insert(id, (peer, c.conn, bytes));
        Some(id)
    }

    /// Request `id` was answered: true when it was this lane's.
    pub(crate) fn answered(&mut self, id: u64) -> bool {
        self.inflight.remove(&id).is_some()
    }

    /// Answers request `id` of incoming connection `conn` with `bytes` (dropped when that
    /// connection is gone: the requester sends again elsewhere).
    pub(crate) fn answer(&self, conn: u64, id: u64, bytes: Bytes) {
        if let Some(c) = self.incoming.get(&conn) {
            c.send(id, bytes);
        }
    }

    /// Whether `conn` is a connection another peer dialled (it sends its requests on it).
    pub(crate) fn is_incoming(&self, conn: u64) -> bool {
        self.incoming.contains_key(&conn)
    }

    /// Connection `conn` closed; the requests that were in flight on it.
    pub(crate) fn closed(&mut self, peer: PeerIdx, conn: u64) -> Vec<(u64, Bytes)> {
        self.incoming.remove(&conn);
        if self.out.get(&peer).is_some_and(|c| c.conn == conn) {
            self.out.remove(&peer);
        }
        self.orphans(conn)
    }

    /// The requests in flight on connection `conn`, taken.
    fn orphans(&mut self, conn: u64) -> Vec<(u64, Bytes)> {
        let ids: Vec<u64> =
            self.inflight.iter().filter(|(_, (_, c, _))| *c == conn).map(|(id, _)| *id).collect();
        let mut out: Vec<(u64, Bytes)> =
            ids.into_iter().filter_map(|id| self.inflight.remove(&id).map(|(_, _, b)| (id, b))).collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Starts the reading and writing tasks of a connection with `peer`.
    fn start(&mut self, peer: PeerIdx, stream: TcpStream, side: Side) -> Conn {
        self.next_conn += 1;
        let conn = self.next_conn;
        let (read, write) = stream.into_split();
        let out = Arc::new(Out { half: write, queued: AtomicUsize::new(0) });
        let (frames, queue) = mpsc::unbounded_channel();
        let tx = self.tx.clone();
        let spare = Arc::clone(&self.spare);
        let reader = tokio::spawn(async move {
            let error = match read_frames(read, &tx, &spare, peer, conn, side).await {
                Ok(()) => "closed".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = tx.send(LaneEvent::Closed { peer, conn, error });
        });
        let writer = tokio::spawn(write_frames(Arc::clone(&out), queue));
        Conn { conn, peer, out, frames, tasks: [reader.abort_handle(), writer.abort_handle()] }
    }
}

/// Which end of a connection this node is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// It dialled: it sends requests and reads answers.
    Dialer,
    /// It accepted: it reads requests and sends answers.
    Listener,
}

/// Whether two tokens are equal, in time independent of where they differ.
fn same(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Accepts connections for ever; each must present a token within [`HANDSHAKE`].
async fn accept(listener: TcpListener, tx: mpsc::UnboundedSender<LaneEvent>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut token = [0u8; LANE_TOKEN];
            if let Ok(Ok(_)) = tokio::time::timeout(HANDSHAKE, stream.read_exact(&mut token)).await {
                let _ = stream.set_nodelay(true);
                let _ = tx.send(LaneEvent::Accepted { token, stream });
            }
        });
    }
}

/// Socket buffers a whole gradient fits in (the kernel caps them at `net.core.wmem_max` and
/// `rmem_max`).
const SOCKET_BUFFER: u32 = 4 << 20;

/// A TCP socket for `ip`'s family whose buffers hold [`SOCKET_BUFFER`] bytes: a gradient then
/// leaves in one write and arrives in few reads, instead of a wake-up on each side for every
/// 100 kB or so the default buffers hold at first.
fn socket_for(ip: IpAddr) -> io::Result<TcpSocket> {
    let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    Ok(socket)
}

/// Opens a lane connection to `addr` and presents `token`.
async fn open(addr: SocketAddr, token: &Token) -> io::Result<TcpStream> {
    let mut stream = socket_for(addr.ip())?.connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(token).await?;
    Ok(stream)
}

/// Writes the frames queued for a connection, in order, until the queue closes.
async fn write_frames(out: Arc<Out>, mut queue: mpsc::UnboundedReceiver<Frame>) -> io::Result<()> {
    while let Some(f) = queue.recv().await {
        let mut rest = Buf::chain(&f.head[..], &f.bytes[..]);
        rest.advance(f.written);
        while rest.has_remaining() {
            out.half.writable().await?;
            let mut slices = [IoSlice::new(&[]); 2];
            let n = rest.chunks_vectored(&mut slices);
            match out.half.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        out.queued.fetch_sub(1, Ordering::AcqRel);
    }
    Ok(())
}

/// Reads frames from a connection until it closes, reporting each.
async fn read_frames(
    mut r: OwnedReadHalf,
    tx: &mpsc::UnboundedSender<LaneEvent>,
    spare: &Spare,
    peer: PeerIdx,
    conn: u64,
    side: Side,
) -> io::Result<()> {
    loop {
        let mut head = [0u8; 12];
        match r.read_exact(&mut head).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        };
        let id = u64::from_le_bytes(head[..8].try_into().expect("invariant: 8 bytes"));
        let n = u32::from_le_bytes(head[8..].try_into().expect("invariant: 4 bytes")) as usize;
        if n > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lane frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"),
            ));
        }
        let ev = match side {
            Side::Listener => {
                LaneEvent::Request { peer, conn, id, payload: read_request(&mut r, n, spare).await? }
            }
            Side::Dialer => {
                LaneEvent::Answer { id, bytes: read_bytes(&mut r, BytesMut::with_capacity(n), n).await? }
            }
        };
        if tx.send(ev).is_err() {
            return Ok(());
        }
    }
}

/// Reads a request of `n` bytes: a gradient apart, its vector straight into its `f32`s (a
/// spare vector's), anything else as bytes.
async fn read_request(r: &mut OwnedReadHalf, n: usize, spare: &Spare) -> io::Result<Payload> {
    if n < GRADIENT_HEAD {
        return Ok(Payload::Bytes(read_bytes(r, BytesMut::with_capacity(n), n).await?));
    }
    let mut head = Box::new([0u8; GRADIENT_HEAD]);
    r.read_exact(&mut head[..]).await?;
    let Some(len) = wire::gradient_len(&head, n) else {
        let mut buf = BytesMut::with_capacity(n);
        buf.put_slice(&head[..]);
        return Ok(Payload::Bytes(read_bytes(r, buf, n).await?));
    };
    let mut grad = spare.take(len);
    r.read_exact(floats::bytes_mut(&mut grad)).await?;
    floats::from_le_in_place(&mut grad);
    Ok(Payload::Gradient { head, grad })
}

/// Reads into `buf` until it holds `n` bytes, into spare capacity: a megabyte is not zeroed
/// first only to be overwritten.
async fn read_bytes(r: &mut OwnedReadHalf, mut buf: BytesMut, n: usize) -> io::Result<Bytes> {
    while buf.len() < n {
        let want = n - buf.len();
        if r.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerless_core::flat::Digest;
    use peerless_core::wire::{GradientMsg, Limits, Message};

    async fn until<T>(lane: &mut Lane, mut f: impl FnMut(LaneEvent) -> Option<T>) -> T {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(5), lane.next())
                .await
                .expect("a lane event in time");
            if let Some(t) = f(ev) {
                return t;
            }
        }
    }

    /// Lanes of nodes 0 (`a`) and 1 (`b`), `a` connected to `b`'s; the token `b` handed out.
    async fn connected(ip: IpAddr) -> (Lane, Lane, Token) {
        let (mut a, mut b) = (Lane::listen(ip).unwrap(), Lane::listen(ip).unwrap());
        // b hands node 0 (a) a token; a dials b's lane with it.
        let token = b.issue(0).unwrap();
        a.dial(1, SocketAddr::new(ip, b.port()), token);
        let stream = until(&mut a, |e| match e {
            LaneEvent::Dialed { peer: 1, stream } => Some(stream),
            _ => None,
        })
        .await;
        assert!(a.dialed(1, stream).is_empty());
        let (token, stream) = until(&mut b, |e| match e {
            LaneEvent::Accepted { token, stream } => Some((token, stream)),
            _ => None,
        })
        .await;
        assert_eq!(b.accepted(&token, stream), Some(0));
        (a, b, token)
    }

    #[tokio::test]
    async fn a_lane_carries_requests_and_answers_and_refuses_a_wrong_token() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (mut a, mut b, token) = connected(ip).await;
        // A megabyte request and its answer.
        let big = Bytes::from((0..1_000_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let id = a.request(1, big.clone()).unwrap();
        let (conn, got) = until(&mut b, |e| match e {
            LaneEvent::Request { peer: 0, conn, id: got, payload: Payload::Bytes(bytes) } if got == id => {
                Some((conn, bytes))
            }
            _ => None,
        })
        .await;
        assert_eq!(got, big);
        b.answer(conn, id, Bytes::from_static(b"ack"));
        let ans = until(&mut a, |e| match e {
            LaneEvent::Answer { id: got, bytes } if got == id => Some(bytes),
            _ => None,
        })
        .await;
        assert_eq!(&ans[..], b"ack");
        assert!(a.answered(id));
        // A stranger's token is not accepted, nor an old one once a new one was issued.
        let old = token;
        b.issue(0).unwrap();
        a.dial(1, SocketAddr::new(ip, b.port()), old);
        let (token, stream) = until(&mut b, |e| match e {
            LaneEvent::Accepted { token, stream } => Some((token, stream)),
            _ => None,
        })
        .await;
        assert_eq!(b.accepted(&token, stream), None);
        // When b goes, a's request in flight comes back to be sent elsewhere.
        let id = a.request(1, Bytes::from_static(b"lost")).unwrap();
        drop(b);
        let back = until(&mut a, |e| match e {
            LaneEvent::Closed { peer: 1, conn, .. } => Some(conn),
            _ => None,
        })
        .await;
        let orphans = a.closed(1, back);
        assert_eq!(orphans, vec![(id, Bytes::from_static(b"lost"))]);
        assert!(!a.is_up(1));
    }

    /// What `ss -K` does to a lane mid-run: the kernel closes the connection, and a frame
    /// sent before this node has taken in its tasks' report of that is refused (the caller
    /// sends it over libp2p), not queued on the dead connection and lost.
    #[tokio::test]
    async fn a_frame_for_a_connection_the_kernel_closed_is_refused_before_the_close_is_reported() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut a = Lane::listen(ip).unwrap();
        let far = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        a.dial(1, far.local_addr().unwrap(), [7; LANE_TOKEN]);
        let (far, _) = far.accept().await.unwrap();
        let stream = until(&mut a, |e| match e {
            LaneEvent::Dialed { peer: 1, stream } => Some(stream),
            _ => None,
        })
        .await;
        assert!(a.dialed(1, stream).is_empty());
        let before = a.request(1, Bytes::from_static(b"before")).expect("the lane is up");
        // The far end resets the connection; a's reading task reports it, a has not taken that
        // in yet.
        far.set_zero_linger().unwrap();
        drop(far);
        let conn = until(&mut a, |e| match e {
            LaneEvent::Closed { peer: 1, conn, .. } => Some(conn),
            _ => None,
        })
        .await;
        assert!(a.is_up(1), "the close is not taken in yet");
        assert_eq!(a.request(1, Bytes::from_static(b"after")), None, "a frame on a closed connection");
        assert_eq!(
            a.closed(1, conn),
            vec![(before, Bytes::from_static(b"before"))],
            "only the frame sent before"
        );
        assert!(!a.is_up(1));
    }

    #[test]
    fn spare_vectors_are_kept_up_to_one_rounds_worth_and_fit_any_length() {
        let spare = Spare::default();
        let kept = |s: &Spare| s.0.lock().unwrap().len();
        assert_eq!(spare.take(3), vec![0.0; 3], "none kept: a new vector");
        spare.refill(vec![vec![1.0; 4], vec![2.0; 4], Vec::new()]);
        assert_eq!(kept(&spare), 2, "an empty vector is not kept");
        spare.refill(vec![vec![3.0; 4]]);
        assert_eq!(kept(&spare), 2, "no more than the last round applied");
        assert_eq!(spare.take(6).len(), 6);
        assert_eq!(spare.take(2).len(), 2);
        assert_eq!(kept(&spare), 0);
    }

    #[tokio::test]
    async fn frames_beyond_what_the_socket_holds_arrive_whole_and_in_order() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (mut a, mut b, _) = connected(ip).await;
        // 24 MB sent at once, before b reads anything: the first frames are written by the
        // sender itself, the rest (and what is left of a frame the socket took only part of)
        // by the connection's task. Every other frame is a gradient, read apart into its
        // floats.
        const N: usize = 250_000;
        let frame = |k: u32| {
            if k % 2 == 0 {
                return Bytes::from((0..4 * N as u32).map(|i| (i * 7 + k) as u8).collect::<Vec<u8>>());
            }
            let grad = (0..N).map(|i| i as f32 * 0.5 - k as f32).collect();
            let g =
                GradientMsg { round: k.into(), digest: Digest([k as u8; 32]), samples: 64, loss: 0.25, grad };
            Bytes::from(wire::encode(&Message::Gradient(g)))
        };
        let frames: Vec<Bytes> = (0..24u32).map(frame).collect();
        let ids: Vec<u64> = frames.iter().map(|f| a.request(1, f.clone()).expect("lane up")).collect();
        assert!(a.out[&1].out.queued.load(Ordering::Acquire) > 0, "the socket took all 24 MB at once");
        for (k, (want_id, want)) in ids.iter().zip(&frames).enumerate() {
            let (id, got) = until(&mut b, |e| match e {
                LaneEvent::Request { peer: 0, id, payload, .. } => Some((id, payload)),
                _ => None,
            })
            .await;
            assert_eq!((id, got.len()), (*want_id, want.len()));
            let limits = Limits { params: N };
            match got {
                Payload::Bytes(got) => {
                    assert!(k % 2 == 0, "gradient {id} was not read apart");
                    assert!(got == want, "frame {id} arrived changed");
                }
                Payload::Gradient { head, grad } => {
                    assert!(k % 2 == 1, "frame {id} was taken for a gradient");
                    let got = wire::decode_gradient(&head, grad, limits).expect("a valid gradient");
                    assert_eq!(got, wire::decode(want, limits).unwrap(), "gradient {id} arrived changed");
                }
            }
        }
    }
}
