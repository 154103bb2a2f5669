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
//!
//! With permessage-deflate ([`SocketOptions::deflate`], [`crate::deflate`]) a text frame goes
//! out as its shared compressed form, made once for all sessions, and the reader inflates the
//! client's compressed messages within the frame limit. The pump writes frame headers itself,
//! so that it can set RSV1.

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
use confab_shared::server::put_frame_header;
use confab_shared::CloseCode;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use crate::deflate::{self, BatchWriter, InflateError};
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
    /// permessage-deflate was negotiated ([`crate::deflate`]): text frames worth compressing
    /// go out compressed, and the client's compressed messages are inflated.
    pub deflate: bool,
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
    /// A reader of `socket`, starting with `already_read` (bytes that came with the upgrade);
    /// `options.deflate` says whether the client may send compressed messages.
    pub fn new(
        socket: OwnedReadHalf,
        already_read: &[u8],
        max_frame_bytes: usize,
        options: SocketOptions,
    ) -> Self {
        let decoder = if options.deflate {
            FrameDecoder::with_deflate(max_frame_bytes)
        } else {
            FrameDecoder::new(max_frame_bytes)
        };
        FrameReader {
            socket,
            buf: BytesMut::from(already_read),
            decoder,
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
///
/// With permessage-deflate, a message whose first frame has RSV1 set is inflated once whole,
/// to at most the same bound as any message ([`crate::deflate::inflate`]). actix-http's
/// parser refuses reserved bits, so the decoder reads RSV1 off the head of the buffer and
/// clears it before the parser takes that frame: the parser takes exactly one frame from the
/// start of the buffer per call, and takes nothing until the frame is whole.
pub struct FrameDecoder {
    codec: Codec,
    /// A fragmented message being aggregated: whether it is text, whether it is compressed,
    /// and its bytes so far.
    partial: Option<(bool, bool, BytesMut)>,
    max_frame_bytes: usize,
    /// permessage-deflate was negotiated.
    deflate: bool,
    /// Whether the frame at the head of the buffer had RSV1 set, once its first byte was read
    /// (and the bit cleared).
    head_rsv1: Option<bool>,
}

impl FrameDecoder {
    /// A decoder of frames and messages of at most `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            codec: Codec::new().max_size(max_frame_bytes),
            partial: None,
            max_frame_bytes,
            deflate: false,
            head_rsv1: None,
        }
    }

    /// The same, for a connection that negotiated permessage-deflate.
    pub fn with_deflate(max_frame_bytes: usize) -> Self {
        FrameDecoder {
            deflate: true,
            ..FrameDecoder::new(max_frame_bytes)
        }
    }

    /// The next whole frame in `buf`, consuming its bytes; `Ok(None)` when `buf` holds no
    /// whole frame yet (more bytes are needed). After an error the connection must close.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ProtocolError> {
        loop {
            let compressed = self.head_compressed(buf);
            match self.codec.decode(buf)? {
                Some(frame) => {
                    self.head_rsv1 = None;
                    if let Some(incoming) = self.take(frame, compressed)? {
                        return Ok(Some(incoming));
                    }
                }
                // A frame whose (valid) header announces more than the limit is refused now,
                // before its payload arrives: the parser would first buffer all of it.
                None if declared_len(buf).is_some_and(|len| len > self.max_frame_bytes as u64) => {
                    return Err(ProtocolError::Overflow);
                }
                None => return Ok(None),
            }
        }
    }

    /// Whether the frame at the head of `buf` is compressed (RSV1 with deflate negotiated),
    /// clearing the bit for the parser the first time it is seen. Without deflate the bit is
    /// left alone, and the parser refuses the frame.
    fn head_compressed(&mut self, buf: &mut BytesMut) -> bool {
        if let Some(rsv1) = self.head_rsv1 {
            return rsv1;
        }
        let Some(first) = buf.first_mut() else {
            return false;
        };
        let rsv1 = self.deflate && *first & RSV1 != 0;
        if rsv1 {
            *first &= !RSV1;
        }
        self.head_rsv1 = Some(rsv1);
        rsv1
    }

    /// Turns a decoded frame into what the connection sees; `Ok(None)` while a fragmented
    /// message is still incomplete.
    fn take(
        &mut self,
        frame: WsFrame,
        compressed: bool,
    ) -> Result<Option<Incoming>, ProtocolError> {
        if compressed
            && !matches!(
                frame,
                WsFrame::Text(_)
                    | WsFrame::Binary(_)
                    | WsFrame::Continuation(Item::FirstText(_) | Item::FirstBinary(_))
            )
        {
            // RFC 7692 §6.1: only a message's first frame carries RSV1, and never a control frame.
            return Err(invalid_data("RSV1 on a control or continuation frame"));
        }
        Ok(Some(match frame {
            WsFrame::Text(bytes) if compressed => text(self.inflate(&bytes)?),
            WsFrame::Text(bytes) => text(bytes),
            WsFrame::Binary(_) => Incoming::Binary,
            WsFrame::Ping(payload) => Incoming::Ping(payload),
            WsFrame::Pong(_) => Incoming::Pong,
            WsFrame::Close(_) => Incoming::Close,
            WsFrame::Continuation(item) => return self.aggregate(item, compressed),
        }))
    }

    fn aggregate(
        &mut self,
        item: Item,
        compressed: bool,
    ) -> Result<Option<Incoming>, ProtocolError> {
        let (first, is_text, bytes, last) = match item {
            Item::FirstText(b) => (true, true, b, false),
            Item::FirstBinary(b) => (true, false, b, false),
            Item::Continue(b) => (false, false, b, false),
            Item::Last(b) => (false, false, b, true),
        };
        if first {
            self.partial = Some((is_text, compressed, BytesMut::new()));
        }
        let Some((is_text, _, collected)) = self.partial.as_mut() else {
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
        let (compressed, collected) = self
            .partial
            .take()
            .map(|(_, compressed, b)| (compressed, b.freeze()))
            .unwrap_or_default();
        Ok(Some(match (is_text, compressed) {
            (true, true) => text(self.inflate(&collected)?),
            (true, false) => text(collected),
            (false, _) => Incoming::Binary,
        }))
    }

    /// A compressed message's text, within the same bound as any message (`1009` beyond).
    fn inflate(&self, compressed: &[u8]) -> Result<Bytes, ProtocolError> {
        deflate::inflate(compressed, self.max_frame_bytes).map_err(|e| match e {
            InflateError::TooBig => ProtocolError::Overflow,
            InflateError::Corrupt => invalid_data("bad deflate data"),
        })
    }
}

/// RSV1 in a frame's first byte: the message is compressed (RFC 7692).
const RSV1: u8 = 0x40;

/// The payload length a client frame's header announces, once the header's length bytes are
/// in `buf`.
fn declared_len(buf: &[u8]) -> Option<u64> {
    let second = *buf.get(1)?;
    Some(match second & 0x7f {
        126 => u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
        127 => u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?),
        len => u64::from(len),
    })
}

fn invalid_data(why: &'static str) -> ProtocolError {
    ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, why))
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
        state.frames.push_back(Outgoing::Text(Frame::new(text, 0)));
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

    /// The compressed form of `frame` for this connection, if it negotiated compression and
    /// the frame is worth it: computed by the first session that needs it, whatever thread
    /// that session is on, and shared by every other (the frame's clones share the cache).
    fn deflated<'f>(&self, frame: &'f Frame) -> Option<&'f Bytes> {
        if !self.options.deflate {
            return None;
        }
        frame
            .deflated
            .get_or_init(|| deflate::compress(frame.text.as_bytes()))
    }

    fn put_text(&self, buf: &mut BytesMut, frame: &Frame) {
        match self.deflated(frame) {
            Some(deflated) => put_frame(buf, FIN_TEXT | RSV1, deflated),
            None => put_frame(buf, FIN_TEXT, frame.text.as_bytes()),
        }
    }

    /// `group` as one JSON array of `array_len` bytes in one frame, on a connection with
    /// compression. The array is made of each element's own compressed bytes
    /// ([`BatchWriter`]), so it costs no compression of its own; when no element is worth
    /// compressing it goes out plain.
    fn put_array(&self, buf: &mut BytesMut, group: &[Frame], array_len: usize) {
        let deflated: Vec<Option<&Bytes>> = group.iter().map(|f| self.deflated(f)).collect();
        if deflated.iter().any(Option::is_some) {
            let mut batch = BatchWriter::with_capacity(array_len);
            for (frame, deflated) in group.iter().zip(&deflated) {
                batch.push(frame.text.as_bytes(), *deflated);
            }
            put_frame(buf, FIN_TEXT | RSV1, &batch.finish());
            return;
        }
        put_frame_header(buf, FIN_TEXT, array_len);
        buf.put_u8(b'[');
        for (i, frame) in group.iter().enumerate() {
            if i > 0 {
                buf.put_u8(b',');
            }
            buf.extend_from_slice(frame.text.as_bytes());
        }
        buf.put_u8(b']');
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
                        self.put_text(&mut buf, &frame);
                        continue;
                    }
                    if !self.options.deflate {
                        // One array of this frame and the `joining` texts queued behind it,
                        // copied straight from the shared encoded frames.
                        put_frame_header(&mut buf, FIN_TEXT, array_len);
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
                        continue;
                    }
                    // Compressed, the elements' compressed forms are looked at first.
                    let mut group = Vec::with_capacity(joining + 1);
                    group.push(frame);
                    for _ in 0..joining {
                        let Some(Outgoing::Text(next)) = state.frames.pop_front() else {
                            unreachable!("joining counts queued texts only");
                        };
                        state.bytes = state.bytes.saturating_sub(next.text.len());
                        tally.count(&next);
                        group.push(next);
                    }
                    self.put_array(&mut buf, &group, array_len);
                }
                Outgoing::Ready(text) => {
                    state.bytes = state.bytes.saturating_sub(text.len());
                    tally.texts += 1;
                    // `ready` goes to one session only: compressed here, not cached.
                    let deflated = self
                        .options
                        .deflate
                        .then(|| deflate::compress(text.as_bytes()));
                    match deflated.flatten() {
                        Some(deflated) => put_frame(&mut buf, FIN_TEXT | RSV1, &deflated),
                        None => put_frame(&mut buf, FIN_TEXT, text.as_bytes()),
                    }
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

fn put_frame(buf: &mut BytesMut, first: u8, payload: &[u8]) {
    put_frame_header(buf, first, payload.len());
    buf.extend_from_slice(payload);
}

/// The close frame: the code, then its reason (SPEC §4's reasons are well under the 123 bytes
/// a close frame has room for).
fn put_close(buf: &mut BytesMut, code: CloseCode) {
    let reason = code.reason().as_bytes();
    let reason = &reason[..reason.len().min(123)];
    put_frame_header(buf, FIN_CLOSE, 2 + reason.len());
    buf.put_u16(code.code());
    buf.extend_from_slice(reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(text: &'static str) -> Frame {
        Frame::new(ByteString::from_static(text), 0)
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

    const BATCH: SocketOptions = SocketOptions {
        batch: true,
        deflate: false,
    };

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

    /// The frames of one write as (first byte, payload), read without actix-http's parser
    /// (which refuses RSV1).
    fn raw_frames(outbox: &Arc<Outbox>, options: SocketOptions) -> Vec<(u8, Vec<u8>)> {
        let mut encoder = OutboxEncoder::new(Arc::clone(outbox), options);
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Some(wire)) = encoder.poll_batch(&mut cx) else {
            panic!("nothing to write");
        };
        let mut out = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let len = declared_len(rest).unwrap_or_else(|| panic!("a partial header")) as usize;
            let header = match rest[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            out.push((rest[0], rest[header..header + len].to_vec()));
            rest = &rest[header + len..];
        }
        out
    }

    fn client_inflate(payload: &[u8]) -> String {
        let mut inflater = flate2::Decompress::new(false);
        let mut input = payload.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1 << 20);
        inflater
            .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8(out).unwrap_or_else(|e| panic!("{e}"))
    }

    const DEFLATE: SocketOptions = SocketOptions {
        batch: false,
        deflate: true,
    };

    fn chat(n: usize) -> &'static str {
        let words = ["hello ", "team ", "the ", "build ", "is ", "green "];
        let text: String = (0..n).map(|i| words[i % words.len()]).collect();
        format!(r#"{{"op":"event","text":"{text}"}}"#).leak()
    }

    #[test]
    fn with_deflate_a_frame_is_compressed_once_for_every_session() {
        let event = frame(chat(100));
        let (first, second) = (Outbox::new(10, 1 << 20), Outbox::new(10, 1 << 20));
        for outbox in [&first, &second] {
            outbox.go_live(ByteString::from_static("{}"));
            outbox.push_event(event.clone()).unwrap();
            outbox.push_event(frame(r#"{"op":"pong"}"#)).unwrap();
        }
        let out = raw_frames(&first, DEFLATE);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], (FIN_TEXT, b"{}".to_vec()), "small frames go plain");
        assert_eq!(out[1].0, FIN_TEXT | RSV1);
        assert!(out[1].1.len() < event.text.len() / 2);
        assert_eq!(client_inflate(&out[1].1), event.text.to_string());
        assert_eq!(out[2], (FIN_TEXT, br#"{"op":"pong"}"#.to_vec()));
        // The second session sends the same bytes, without compressing again.
        let cached = event
            .deflated
            .get_or_init(|| panic!("compressed a second time"))
            .cloned();
        assert_eq!(cached.as_deref(), Some(&out[1].1[..]));
        assert_eq!(raw_frames(&second, DEFLATE)[1], out[1]);
        // Without the extension, the same frame goes plain.
        let plain = Outbox::new(10, 1 << 20);
        plain.go_live(ByteString::from_static("{}"));
        plain.push_event(event.clone()).unwrap();
        assert_eq!(
            raw_frames(&plain, SocketOptions::default())[1],
            (FIN_TEXT, event.text.as_bytes().to_vec())
        );
    }

    #[test]
    fn with_deflate_and_batch_an_array_inflates_to_every_frame_in_order() {
        let outbox = Outbox::new(10, 1 << 20);
        outbox.go_live(ByteString::from_static("{}"));
        let texts = [chat(50), r#"{"op":"ack"}"#, chat(80)];
        for text in texts {
            outbox.push_event(frame(text)).unwrap();
        }
        let out = raw_frames(
            &outbox,
            SocketOptions {
                batch: true,
                deflate: true,
            },
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].0, FIN_TEXT | RSV1);
        assert_eq!(client_inflate(&out[1].1), format!("[{}]", texts.join(",")));
    }

    /// A client frame: masked, with `first` as its first byte.
    fn client_frame(first: u8, payload: &[u8]) -> BytesMut {
        let mut codec_free = BytesMut::new();
        codec_free.put_u8(first);
        let mask = [1u8, 2, 3, 4];
        if payload.len() < 126 {
            codec_free.put_u8(0x80 | payload.len() as u8);
        } else {
            codec_free.put_u8(0x80 | 126);
            codec_free.put_u16(payload.len() as u16);
        }
        codec_free.extend_from_slice(&mask);
        codec_free.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        codec_free
    }

    fn client_deflate(text: &[u8]) -> Vec<u8> {
        let mut compressor = flate2::Compress::new(flate2::Compression::fast(), false);
        let mut out = Vec::with_capacity(text.len() + 64);
        compressor
            .compress_vec(text, &mut out, flate2::FlushCompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn compressed_client_messages_are_inflated_whole_or_fragmented() {
        let text = chat(40);
        let deflated = client_deflate(text.as_bytes());
        let mut decoder = FrameDecoder::with_deflate(64 * 1024);
        let mut wire = client_frame(0x81 | RSV1, &deflated);
        // Split in two, as TCP may deliver it: the RSV1 read from the first piece is kept.
        let mut buf = wire.split_to(3);
        assert_eq!(decoder.decode(&mut buf).ok(), Some(None));
        buf.extend_from_slice(&wire);
        assert_eq!(
            decoder.decode(&mut buf).ok().flatten(),
            Some(Incoming::Text(ByteString::from(text)))
        );
        // A compressed message in two fragments, a ping between them, then a plain text.
        let (a, b) = deflated.split_at(deflated.len() / 2);
        let mut buf = client_frame(0x01 | RSV1, a);
        buf.extend_from_slice(&client_frame(0x89, b"p"));
        buf.extend_from_slice(&client_frame(0x80, b));
        buf.extend_from_slice(&client_frame(0x81, b"{}"));
        let mut got = Vec::new();
        while let Ok(Some(incoming)) = decoder.decode(&mut buf) {
            got.push(incoming);
        }
        assert_eq!(
            got,
            [
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Text(ByteString::from(text)),
                Incoming::Text(ByteString::from_static("{}")),
            ]
        );
    }

    #[test]
    fn the_frame_limit_holds_after_inflation_and_on_declared_lengths() {
        let big = "y".repeat(10_000);
        let mut decoder = FrameDecoder::with_deflate(4096);
        let mut buf = client_frame(0x81 | RSV1, &client_deflate(big.as_bytes()));
        assert!(buf.len() < 4096);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(ProtocolError::Overflow)
        ));
        // A header announcing a gigabyte is refused before any payload comes.
        let mut decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&[0x81, 0x80 | 127, 0, 0, 0, 0, 0x40, 0, 0, 0][..]);
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(ProtocolError::Overflow)
        ));
    }

    #[test]
    fn rsv1_is_refused_without_deflate_and_on_control_and_continuation_frames() {
        let deflated = client_deflate(b"{\"op\":\"ping\"}");
        let mut plain = FrameDecoder::new(4096);
        assert!(plain
            .decode(&mut client_frame(0x81 | RSV1, &deflated))
            .is_err());
        let mut decoder = FrameDecoder::with_deflate(4096);
        assert!(decoder.decode(&mut client_frame(0x89 | RSV1, b"")).is_err());
        let mut decoder = FrameDecoder::with_deflate(4096);
        let mut buf = client_frame(0x01, b"{");
        buf.extend_from_slice(&client_frame(0x80 | RSV1, b"}"));
        assert_eq!(decoder.decode(&mut buf).ok(), None);
        let mut decoder = FrameDecoder::with_deflate(4096);
        assert!(decoder
            .decode(&mut client_frame(0x81 | RSV1, b"\xff\xff\xff"))
            .is_err());
    }

    #[test]
    fn other_closes_keep_what_is_queued_before_the_close_frame() {
        let outbox = Outbox::new(10, 1000);
        outbox.push_reply(ByteString::from_static("error")).unwrap();
        outbox.close(CloseCode::ReconnectNow);
        assert_eq!(outbox.state.lock().frames.len(), 1);
    }
}
