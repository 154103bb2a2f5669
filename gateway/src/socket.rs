//! The client WebSocket transport: a reader of client frames, and each session's [`Outbox`] —
//! its bounded outbound queue — drained by a write pump on the raw socket.
//!
//! `/v1/ws` leaves actix-http's HTTP/1 dispatcher at the upgrade (see [`crate::ws::upgrade`]):
//! from then on the connection is the bare `TcpStream`, with no fixed per-connection buffers.
//! An idle session holds no read buffer (one is taken only while bytes are waiting) and no write
//! buffer (one is allocated per write and released after it).
//!
//! Hot path, on purpose without a channel: delivering an event to a session is a lock, a
//! `VecDeque` push of a reference-counted frame and a wake of its write pump, all on the worker
//! thread that serves the session (see [`crate::shards`]); the pump then encodes everything
//! queued into one buffer and hands it to the socket in one write.
//!
//! With `?batch=1` (SPEC §4, [`SocketOptions::batch`]) the text frames found queued together
//! go out as one JSON array in one WebSocket frame: a reader that lags behind then costs one
//! frame header and one frame to parse per write instead of one per event. Nothing waits for a
//! batch to fill; a lone frame goes out as itself.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame as WsFrame, Item, ProtocolError};
use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use confab_shared::link::Frame;
use confab_shared::CloseCode;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Most bytes one write takes from the queue.
const MAX_WRITE_BATCH: usize = 64 * 1024;
/// An emptied queue whose capacity grew past this many frames gives the memory back.
const SHRINK_ABOVE: usize = 64;
/// Most bytes taken from the socket per read (a frame larger than this takes several reads).
const READ_CHUNK: usize = 4096;
/// Once a session is closing, how long its last frames and close frame may take to be written
/// before the socket is dropped (a client that stopped reading cannot hold it longer).
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(5);
/// After the close frame, how long the client's remaining bytes are read and discarded so that
/// closing does not reset the connection under the close frame.
const LINGER: Duration = Duration::from_secs(1);
/// Most payload bytes of one batched frame (`?batch=1`); a frame larger than this alone still
/// goes out, as itself.
const MAX_ARRAY_BYTES: usize = 64 * 1024;

/// The first byte of each frame the server writes: FIN and the opcode (RFC 6455 §5.2).
const FIN_TEXT: u8 = 0x81;
const FIN_CLOSE: u8 = 0x88;
const FIN_PONG: u8 = 0x8A;

/// How a client asked its socket to be spoken to, at the upgrade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketOptions {
    /// `?batch=1`: text frames queued together go out as one JSON array per WebSocket frame.
    pub batch: bool,
}

/// A frame received from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(ByteString),
    /// A text frame whose payload is not UTF-8.
    InvalidText,
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

/// Reads whole client frames (continuations aggregated, bounded) from the socket.
pub struct FrameReader {
    socket: OwnedReadHalf,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// The client closed its side (or the socket failed).
    ended: bool,
}

impl FrameReader {
    /// A reader of `socket`, starting with `already_read` (bytes that came with the upgrade).
    pub fn new(socket: OwnedReadHalf, already_read: &[u8], max_frame_bytes: usize) -> Self {
        FrameReader {
            socket,
            buf: BytesMut::from(already_read),
            decoder: FrameDecoder::new(max_frame_bytes),
            ended: false,
        }
    }

    /// The next frame; `None` when the client went away. `ProtocolError::Overflow` means a
    /// frame or message over the size limit (close `1009`). Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Incoming, ProtocolError>> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(incoming)) => return Some(Ok(incoming)),
                Ok(None) => {
                    if self.buf.is_empty() {
                        // An idle connection keeps no read buffer.
                        self.buf = BytesMut::new();
                    }
                    if self.ended {
                        return None;
                    }
                    match self.fill().await {
                        Ok(0) => {
                            self.ended = true;
                            return None;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.ended = true;
                            return Some(Err(ProtocolError::Io(e)));
                        }
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Waits for bytes and appends them to the buffer; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        loop {
            self.socket.readable().await?;
            match self.read_available() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => return read,
            }
        }
    }

    /// Reads what the socket holds through a stack buffer, so the read buffer is sized to the
    /// bytes that came (a `hello` takes a few hundred bytes, not a fixed chunk that would be
    /// freed again and fragment the heap under the session's long-lived allocations).
    fn read_available(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.socket.try_read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// After the close frame went out: reads and discards what the client still sends, until
    /// it closes or [`LINGER`] passes. Closing a socket with unread bytes would reset the
    /// connection, and a reset can destroy the close frame before the client reads it.
    pub async fn linger(self) {
        if self.ended {
            return;
        }
        let mut sink = [0u8; 1024];
        let discard = async {
            loop {
                if self.socket.readable().await.is_err() {
                    return;
                }
                match self.socket.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, discard).await;
    }
}

/// The pure half of [`FrameReader`]: turns the bytes a client sent into whole frames
/// (continuations aggregated, bounded), with no socket, so it can be fuzzed on byte buffers.
pub struct FrameDecoder {
    codec: Codec,
    /// A fragmented message being aggregated: whether it is text, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder of frames and messages of at most `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            codec: Codec::new().max_size(max_frame_bytes),
            partial: None,
            max_frame_bytes,
        }
    }

    /// The next whole frame in `buf`, consuming its bytes; `Ok(None)` when `buf` holds no
    /// whole frame yet (more bytes are needed). After an error the connection must close.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ProtocolError> {
        loop {
            match self.codec.decode(buf)? {
                Some(frame) => {
                    if let Some(incoming) = self.take(frame)? {
                        return Ok(Some(incoming));
                    }
                }
                None => return Ok(None),
            }
        }
    }

    /// Turns a decoded frame into what the connection sees; `Ok(None)` while a fragmented
    /// message is still incomplete.
    fn take(&mut self, frame: WsFrame) -> Result<Option<Incoming>, ProtocolError> {
        Ok(Some(match frame {
            WsFrame::Text(bytes) => text(bytes),
            WsFrame::Binary(_) => Incoming::Binary,
            WsFrame::Ping(payload) => Incoming::Ping(payload),
            WsFrame::Pong(_) => Incoming::Pong,
            WsFrame::Close(_) => Incoming::Close,
            WsFrame::Continuation(item) => return self.aggregate(item),
        }))
    }

    fn aggregate(&mut self, item: Item) -> Result<Option<Incoming>, ProtocolError> {
        let (first, is_text, bytes, last) = match item {
            Item::FirstText(b) => (true, true, b, false),
            Item::FirstBinary(b) => (true, false, b, false),
            Item::Continue(b) => (false, false, b, false),
            Item::Last(b) => (false, false, b, true),
        };
        if first {
            self.partial = Some((is_text, BytesMut::new()));
        }
        let Some((is_text, collected)) = self.partial.as_mut() else {
            return Err(ProtocolError::ContinuationNotStarted);
        };
        if collected.len() + bytes.len() > self.max_frame_bytes {
            self.partial = None;
            return Err(ProtocolError::Overflow);
        }
        collected.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let is_text = *is_text;
        let collected = self
            .partial
            .take()
            .map(|(_, b)| b.freeze())
            .unwrap_or_default();
        Ok(Some(if is_text {
            text(collected)
        } else {
            Incoming::Binary
        }))
    }
}

fn text(bytes: Bytes) -> Incoming {
    match ByteString::try_from(bytes) {
        Ok(text) => Incoming::Text(text),
        Err(_) => Incoming::InvalidText,
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full (in frames or bytes): the session must close with `4008`.
    Overflow,
    /// The session is closing or gone.
    Closed,
}

/// A session's outbound queue, bounded in frames and bytes.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    max_frames: usize,
    max_bytes: usize,
    closing: CancellationToken,
}

#[derive(Debug, Default)]
struct OutboxState {
    /// Frames to write, in order.
    frames: VecDeque<Outgoing>,
    /// Events that arrived before `ready` was queued; they follow it.
    held: VecDeque<Frame>,
    live: bool,
    bytes: usize,
    close: Option<CloseCode>,
    waker: Option<Waker>,
}

#[derive(Debug)]
enum Outgoing {
    Text(Frame),
    /// `ready`: always a frame of its own, never part of a batch, so that the handshake reads
    /// the same with and without `?batch=1`.
    Ready(ByteString),
    Pong(Bytes),
}

impl OutboxState {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn admit(&mut self, len: usize, max_frames: usize, max_bytes: usize) -> Result<(), Refused> {
        if self.close.is_some() {
            return Err(Refused::Closed);
        }
        if self.frames.len() + self.held.len() >= max_frames || self.bytes + len > max_bytes {
            return Err(Refused::Overflow);
        }
        self.bytes += len;
        Ok(())
    }
}

impl Outbox {
    /// An empty outbox of at most `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState::default()),
            max_frames: max_frames.max(1),
            max_bytes: max_bytes.max(1),
            closing: CancellationToken::new(),
        })
    }

    /// Queues an event; before `ready` it is held back until `ready` is queued.
    pub fn push_event(&self, frame: Frame) -> Result<(), Refused> {
        let mut state = self.state.lock();
        state.admit(frame.text.len(), self.max_frames, self.max_bytes)?;
        if state.live {
            state.frames.push_back(Outgoing::Text(frame));
            state.wake();
        } else {
            state.held.push_back(frame);
        }
        Ok(())
    }

    /// Queues a reply or error, in order with everything queued before it.
    pub fn push_reply(&self, text: ByteString) -> Result<(), Refused> {
        let mut state = self.state.lock();
        state.admit(text.len(), self.max_frames, self.max_bytes)?;
        state.frames.push_back(Outgoing::Text(Frame {
            text,
            created_us: 0,
        }));
        state.wake();
        Ok(())
    }

    /// Answers a client ping.
    pub fn push_pong(&self, payload: Bytes) -> Result<(), Refused> {
        let mut state = self.state.lock();
        state.admit(payload.len(), self.max_frames, self.max_bytes)?;
        state.frames.push_back(Outgoing::Pong(payload));
        state.wake();
        Ok(())
    }

    /// Queues `ready`, then every event held back before it; events flow directly from now on.
    pub fn go_live(&self, ready: ByteString) {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return;
        }
        state.bytes += ready.len();
        state.frames.push_back(Outgoing::Ready(ready));
        let held = std::mem::take(&mut state.held);
        state.frames.extend(held.into_iter().map(Outgoing::Text));
        state.live = true;
        state.wake();
    }

    /// Closes with `code`: the close frame follows what is already queued, except for a slow
    /// consumer (`4008`), whose queue is dropped. Nothing more is queued after it. The first
    /// code wins; returns whether this call decided it.
    pub fn close(&self, code: CloseCode) -> bool {
        let decided = {
            let mut state = self.state.lock();
            let decided = state.close.is_none();
            if decided {
                state.close = Some(code);
                state.held.clear();
                if code == CloseCode::SlowConsumer {
                    state.frames.clear();
                    state.bytes = 0;
                }
            }
            state.wake();
            decided
        };
        self.closing.cancel();
        decided
    }

    /// The close code decided so far.
    pub fn close_code(&self) -> Option<CloseCode> {
        self.state.lock().close
    }

    /// A token cancelled once the session closes (or its connection is gone).
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// The texts queued for the socket, in order (tests).
    #[cfg(test)]
    pub(crate) fn queued_texts(&self) -> Vec<String> {
        self.state
            .lock()
            .frames
            .iter()
            .filter_map(|o| match o {
                Outgoing::Text(f) => Some(f.text.to_string()),
                Outgoing::Ready(text) => Some(text.to_string()),
                Outgoing::Pong(_) => None,
            })
            .collect()
    }
}

/// Writes a session's outbox to its socket until the close frame is out or the socket fails;
/// then closes the socket's write side. A task of its own, on the thread of the session's reader.
pub async fn write_outbox(outbox: Arc<Outbox>, mut socket: OwnedWriteHalf, options: SocketOptions) {
    let mut encoder = OutboxEncoder::new(Arc::clone(&outbox), options);
    while let Some(batch) = poll_fn(|cx| encoder.poll_batch(cx)).await {
        if write_batch(&outbox, &mut socket, &batch).await.is_err() {
            break;
        }
    }
    // The connection can carry nothing more: the session must end (if it has not already).
    outbox.closing.cancel();
    let _ = tokio::time::timeout(CLOSE_WRITE_GRACE, socket.shutdown()).await;
}

/// One write. The common case is a single non-blocking write that takes it all; otherwise it
/// waits for the socket, for at most [`CLOSE_WRITE_GRACE`] once the session is closing.
async fn write_batch(outbox: &Outbox, socket: &mut OwnedWriteHalf, batch: &[u8]) -> io::Result<()> {
    let written = match socket.try_write(batch) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written == batch.len() {
        return Ok(());
    }
    let rest = &batch[written..];
    tokio::select! {
        written = socket.write_all(rest) => written,
        () = closing_grace(outbox) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading while its session closed",
        )),
    }
}

async fn closing_grace(outbox: &Outbox) {
    outbox.closing.cancelled().await;
    tokio::time::sleep(CLOSE_WRITE_GRACE).await;
}

/// Turns what is queued in an outbox into WebSocket frames, a batch per socket write.
struct OutboxEncoder {
    outbox: Arc<Outbox>,
    options: SocketOptions,
    done: bool,
    frames_out: metrics::Counter,
    latency: metrics::Histogram,
}

/// What one write carries, for the metrics recorded once per write.
#[derive(Default)]
struct WriteTally {
    /// Server frames (texts) in the write; a batched frame counts each of its elements.
    texts: u64,
    /// Creation time of the write's oldest event, 0 when it carries none.
    oldest_us: u64,
}

impl WriteTally {
    fn count(&mut self, frame: &Frame) {
        self.texts += 1;
        if frame.created_us > 0 && self.oldest_us == 0 {
            self.oldest_us = frame.created_us;
        }
    }
}

impl OutboxEncoder {
    fn new(outbox: Arc<Outbox>, options: SocketOptions) -> Self {
        OutboxEncoder {
            outbox,
            options,
            done: false,
            // Resolved once per connection, not once per frame.
            frames_out: metrics::counter!(m::FRAMES_OUT),
            latency: metrics::histogram!(m::DELIVERY_LATENCY),
        }
    }

    /// The next batch to write; `None` after the close frame. Pending while nothing is queued.
    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<BytesMut>> {
        if self.done {
            return Poll::Ready(None);
        }
        let outbox = Arc::clone(&self.outbox);
        let mut state = outbox.state.lock();
        // Sized for what is queued (payload plus frame headers): one allocation per write.
        let queued: usize = state.bytes.min(MAX_WRITE_BATCH) + state.frames.len().min(4096) * 10;
        let mut buf = BytesMut::with_capacity(queued);
        let mut tally = WriteTally::default();
        while buf.len() < MAX_WRITE_BATCH {
            let Some(outgoing) = state.frames.pop_front() else {
                break;
            };
            match outgoing {
                Outgoing::Text(frame) => {
                    state.bytes = state.bytes.saturating_sub(frame.text.len());
                    tally.count(&frame);
                    let (joining, array_len) = if self.options.batch {
                        joining(&state.frames, frame.text.len())
                    } else {
                        (0, 0)
                    };
                    if joining == 0 {
                        put_frame(&mut buf, FIN_TEXT, frame.text.as_bytes());
                        continue;
                    }
                    // One array of this frame and the `joining` texts queued behind it, its
                    // elements copied straight from the shared encoded frames.
                    put_header(&mut buf, FIN_TEXT, array_len);
                    buf.put_u8(b'[');
                    buf.extend_from_slice(frame.text.as_bytes());
                    for _ in 0..joining {
                        let Some(Outgoing::Text(next)) = state.frames.pop_front() else {
                            unreachable!("joining counts queued texts only");
                        };
                        state.bytes = state.bytes.saturating_sub(next.text.len());
                        tally.count(&next);
                        buf.put_u8(b',');
                        buf.extend_from_slice(next.text.as_bytes());
                    }
                    buf.put_u8(b']');
                }
                Outgoing::Ready(text) => {
                    state.bytes = state.bytes.saturating_sub(text.len());
                    tally.texts += 1;
                    put_frame(&mut buf, FIN_TEXT, text.as_bytes());
                }
                Outgoing::Pong(payload) => {
                    state.bytes = state.bytes.saturating_sub(payload.len());
                    put_frame(&mut buf, FIN_PONG, &payload);
                }
            }
        }
        // Metrics once per socket write, not per frame (they were a tenth of the fanout CPU):
        // the latency sample is the write's oldest event, the one that waited longest.
        if tally.texts > 0 {
            self.frames_out.increment(tally.texts);
        }
        if tally.oldest_us > 0 {
            let seconds = confab_shared::now_us().saturating_sub(tally.oldest_us) as f64 / 1e6;
            self.latency.record(seconds);
        }
        if state.frames.is_empty() && state.frames.capacity() > SHRINK_ABOVE {
            // A burst grew the queue; an idle session should not keep that memory.
            state.frames = VecDeque::new();
        }
        if let Some(code) = state.close.filter(|_| state.frames.is_empty()) {
            self.done = true;
            put_close(&mut buf, code);
        }
        if buf.is_empty() {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Some(buf))
    }
}

/// How many of the texts at the front of `queued` join a text of `first_len` bytes in one
/// batched frame, and that array's length in bytes (`[`, the texts, their commas, `]`).
fn joining(queued: &VecDeque<Outgoing>, first_len: usize) -> (usize, usize) {
    let mut count = 0;
    let mut len = first_len + 2;
    for outgoing in queued {
        match outgoing {
            Outgoing::Text(frame) if len + 1 + frame.text.len() <= MAX_ARRAY_BYTES => {
                count += 1;
                len += 1 + frame.text.len();
            }
            _ => break,
        }
    }
    (count, len)
}

/// Writes the header of an unmasked server frame with a payload of `len` bytes.
fn put_header(buf: &mut BytesMut, first: u8, len: usize) {
    buf.put_u8(first);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        buf.put_u8(126);
        buf.put_u16(len);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

fn put_frame(buf: &mut BytesMut, first: u8, payload: &[u8]) {
    put_header(buf, first, payload.len());
    buf.extend_from_slice(payload);
}

/// The close frame: the code, then its reason (SPEC §4's reasons are well under the 123 bytes
/// a close frame has room for).
fn put_close(buf: &mut BytesMut, code: CloseCode) {
    let reason = code.reason().as_bytes();
    let reason = &reason[..reason.len().min(123)];
    put_header(buf, FIN_CLOSE, 2 + reason.len());
    buf.put_u16(code.code());
    buf.extend_from_slice(reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &'static str) -> Frame {
        Frame {
            text: ByteString::from_static(text),
            created_us: 0,
        }
    }

    #[test]
    fn events_before_ready_are_held_and_follow_it() {
        let outbox = Outbox::new(10, 1000);
        outbox.push_event(frame("e1")).unwrap();
        outbox.push_reply(ByteString::from_static("err")).unwrap();
        outbox.go_live(ByteString::from_static("ready"));
        outbox.push_event(frame("e2")).unwrap();
        let order: Vec<String> = outbox
            .state
            .lock()
            .frames
            .iter()
            .map(|o| match o {
                Outgoing::Text(f) => f.text.to_string(),
                Outgoing::Ready(text) => text.to_string(),
                Outgoing::Pong(_) => "pong".into(),
            })
            .collect();
        assert_eq!(order, ["err", "ready", "e1", "e2"]);
    }

    #[test]
    fn the_bounds_count_frames_and_bytes() {
        let outbox = Outbox::new(2, 1000);
        outbox.go_live(ByteString::from_static("r"));
        assert_eq!(outbox.push_event(frame("a")), Ok(()));
        assert_eq!(outbox.push_event(frame("b")), Err(Refused::Overflow));
        let outbox = Outbox::new(100, 4);
        assert_eq!(outbox.push_event(frame("abc")), Ok(()));
        assert_eq!(outbox.push_event(frame("de")), Err(Refused::Overflow));
    }

    #[test]
    fn closing_drops_the_queue_and_refuses_more() {
        let outbox = Outbox::new(10, 1000);
        outbox.go_live(ByteString::from_static("r"));
        assert!(outbox.close(CloseCode::SlowConsumer));
        assert!(!outbox.close(CloseCode::Normal));
        assert_eq!(outbox.close_code(), Some(CloseCode::SlowConsumer));
        assert_eq!(outbox.push_event(frame("a")), Err(Refused::Closed));
        assert!(outbox.closing().is_cancelled());
        assert!(outbox.state.lock().frames.is_empty());
    }

    /// Everything the encoder writes while frames are queued, decoded as a client would.
    fn written(outbox: &Arc<Outbox>, options: SocketOptions) -> Vec<String> {
        let mut encoder = OutboxEncoder::new(Arc::clone(outbox), options);
        let mut cx = Context::from_waker(Waker::noop());
        let mut wire = match encoder.poll_batch(&mut cx) {
            Poll::Ready(Some(buf)) => buf,
            other => panic!("nothing to write: {other:?}"),
        };
        let mut codec = Codec::new().client_mode();
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(&mut wire).unwrap_or_else(|e| panic!("{e}")) {
            out.push(match frame {
                WsFrame::Text(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                WsFrame::Pong(_) => "pong".into(),
                WsFrame::Close(reason) => format!("close {:?}", reason.map(|r| r.code)),
                other => panic!("unexpected frame {other:?}"),
            });
        }
        assert!(wire.is_empty(), "a partial frame was written");
        out
    }

    const BATCH: SocketOptions = SocketOptions { batch: true };

    #[test]
    fn with_batch_texts_queued_together_go_out_as_one_array() {
        let outbox = Outbox::new(10, 1000);
        outbox.go_live(ByteString::from_static(r#"{"op":"ready"}"#));
        for text in [r#"{"e":1}"#, r#"{"e":2}"#, r#"{"e":3}"#] {
            outbox.push_event(frame(text)).unwrap();
        }
        assert_eq!(
            written(&outbox, BATCH),
            [r#"{"op":"ready"}"#, r#"[{"e":1},{"e":2},{"e":3}]"#]
        );
        assert_eq!(outbox.state.lock().bytes, 0);
    }

    #[test]
    fn with_batch_a_lone_frame_is_not_wrapped_and_a_pong_splits_a_batch() {
        let outbox = Outbox::new(10, 1000);
        outbox.go_live(ByteString::from_static("{}"));
        outbox.push_event(frame("[1]")).unwrap();
        outbox.push_event(frame("[2]")).unwrap();
        outbox.push_pong(Bytes::from_static(b"p")).unwrap();
        outbox.push_event(frame("[3]")).unwrap();
        assert_eq!(written(&outbox, BATCH), ["{}", "[[1],[2]]", "pong", "[3]"]);
    }

    #[test]
    fn without_batch_every_text_is_a_frame_of_its_own() {
        let outbox = Outbox::new(10, 1000);
        outbox.go_live(ByteString::from_static("r"));
        outbox.push_event(frame("a")).unwrap();
        outbox.push_event(frame("b")).unwrap();
        outbox.close(CloseCode::Normal);
        assert_eq!(
            written(&outbox, SocketOptions::default()),
            ["r", "a", "b", "close Some(Normal)"]
        );
    }

    #[test]
    fn a_batch_stops_at_its_size_bound_and_the_rest_follows_in_order() {
        let big: &'static str = "x".repeat(MAX_ARRAY_BYTES / 3).leak();
        let outbox = Outbox::new(10, 1 << 20);
        outbox.go_live(ByteString::from_static("r"));
        for _ in 0..4 {
            outbox.push_event(frame(big)).unwrap();
        }
        let out = written(&outbox, BATCH);
        assert_eq!(out.len(), 3, "ready, an array of two, then the rest");
        assert_eq!(out[1], format!("[{big},{big}]"));
        assert_eq!(out[2], format!("[{big},{big}]"));
    }

    #[test]
    fn other_closes_keep_what_is_queued_before_the_close_frame() {
        let outbox = Outbox::new(10, 1000);
        outbox.push_reply(ByteString::from_static("error")).unwrap();
        outbox.close(CloseCode::ReconnectNow);
        assert_eq!(outbox.state.lock().frames.len(), 1);
    }
}
