//! The client WebSocket transport: the upgrade, a reader of client frames, and each session's
//! [`Outbox`] — its bounded outbound queue — drained directly by the HTTP response body.
//!
//! Hot path, on purpose without a writer task: delivering an event to a session is a lock,
//! a `VecDeque` push of a reference-counted frame and a wake of the connection; when the
//! connection's dispatcher has room, [`OutboxBody`] encodes everything queued into one buffer
//! and hands it to the socket in one write. No per-recipient task, channel hop or allocation
//! beyond the queue slot, and an idle session's queue allocates nothing.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use actix_codec::{Decoder, Encoder};
use actix_http::body::{BodyStream, MessageBody};
use actix_http::ws::{CloseReason, Codec, Frame as WsFrame, Item, Message, ProtocolError};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use confab_shared::link::Frame;
use confab_shared::CloseCode;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Most bytes one body poll encodes before yielding to the socket.
const MAX_WRITE_BATCH: usize = 64 * 1024;
/// An emptied queue whose capacity grew past this many frames gives the memory back.
const SHRINK_ABOVE: usize = 64;

/// A frame received from the client.
#[derive(Debug)]
pub enum Incoming {
    Text(ByteString),
    /// A text frame whose payload is not UTF-8.
    InvalidText,
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

/// Completes the upgrade: the `101` response (whose body is the outbox) and a reader of the
/// client's frames, each bounded by `max_frame_bytes`.
pub fn upgrade(
    req: &HttpRequest,
    payload: web::Payload,
    max_frame_bytes: usize,
    outbox: Arc<Outbox>,
) -> Result<(HttpResponse, FrameReader), actix_web::Error> {
    let mut response = actix_http::ws::handshake(req.head()).map_err(|e| {
        crate::api_error::ApiError::bad_request(format!("websocket handshake failed: {e}"))
    })?;
    let body = OutboxBody::new(outbox);
    let reader = FrameReader {
        payload,
        buf: BytesMut::new(),
        codec: Codec::new().max_size(max_frame_bytes),
        partial: None,
        max_frame_bytes,
    };
    let response = response.message_body(BodyStream::new(body).boxed())?;
    Ok((response.into(), reader))
}

/// Reads whole client frames (continuations aggregated, bounded).
pub struct FrameReader {
    payload: web::Payload,
    buf: BytesMut,
    codec: Codec,
    /// A fragmented message being aggregated: whether it is text, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
    max_frame_bytes: usize,
}

impl FrameReader {
    /// The next frame; `None` when the client went away. `ProtocolError::Overflow` means a
    /// frame or message over the size limit (close `1009`).
    pub async fn next(&mut self) -> Option<Result<Incoming, ProtocolError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    if let Some(incoming) = self.take(frame).transpose() {
                        return Some(incoming);
                    }
                }
                Ok(None) => {
                    if self.buf.is_empty() {
                        // An idle connection keeps no read buffer.
                        self.buf = BytesMut::new();
                    }
                    match self.payload.next().await? {
                        Ok(chunk) => self.buf.extend_from_slice(&chunk),
                        Err(e) => return Some(Err(ProtocolError::Io(std::io::Error::other(e)))),
                    }
                }
                Err(e) => return Some(Err(e)),
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
        state.frames.push_back(Outgoing::Text(Frame {
            text: ready,
            created_us: 0,
        }));
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
}

/// The body of the `101` response: the outbox, encoded to WebSocket frames as the socket takes
/// them. Dropped when the connection ends.
struct OutboxBody {
    outbox: Arc<Outbox>,
    codec: Codec,
    done: bool,
    frames_out: metrics::Counter,
    latency: metrics::Histogram,
}

impl OutboxBody {
    fn new(outbox: Arc<Outbox>) -> Self {
        OutboxBody {
            outbox,
            codec: Codec::new(),
            done: false,
            // Resolved once per connection, not once per frame.
            frames_out: metrics::counter!(m::FRAMES_OUT),
            latency: metrics::histogram!(m::DELIVERY_LATENCY),
        }
    }

    fn encode(&mut self, message: Message, buf: &mut BytesMut) {
        // Encoding a server frame into a growable buffer cannot fail.
        let _ = self.codec.encode(message, buf);
    }
}

impl Stream for OutboxBody {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let outbox = Arc::clone(&this.outbox);
        let mut state = outbox.state.lock();
        // Sized for what is queued (payload plus frame headers): one allocation per write.
        let queued: usize = state.bytes.min(MAX_WRITE_BATCH) + state.frames.len().min(4096) * 10;
        let mut buf = BytesMut::with_capacity(queued);
        let mut texts = 0u64;
        let mut oldest_us = 0u64;
        while buf.len() < MAX_WRITE_BATCH {
            let Some(outgoing) = state.frames.pop_front() else {
                break;
            };
            match outgoing {
                Outgoing::Text(frame) => {
                    state.bytes = state.bytes.saturating_sub(frame.text.len());
                    if frame.created_us > 0 && oldest_us == 0 {
                        oldest_us = frame.created_us;
                    }
                    texts += 1;
                    this.encode(Message::Text(frame.text), &mut buf);
                }
                Outgoing::Pong(payload) => {
                    state.bytes = state.bytes.saturating_sub(payload.len());
                    this.encode(Message::Pong(payload), &mut buf);
                }
            }
        }
        // Metrics once per socket write, not per frame (they were a tenth of the fanout CPU):
        // the latency sample is the write's oldest event, the one that waited longest.
        if texts > 0 {
            this.frames_out.increment(texts);
        }
        if oldest_us > 0 {
            let seconds = confab_shared::now_us().saturating_sub(oldest_us) as f64 / 1e6;
            this.latency.record(seconds);
        }
        if state.frames.is_empty() && state.frames.capacity() > SHRINK_ABOVE {
            // A burst grew the queue; an idle session should not keep that memory.
            state.frames = VecDeque::new();
        }
        if let Some(code) = state.close.filter(|_| state.frames.is_empty()) {
            this.done = true;
            let reason = CloseReason {
                code: code.code().into(),
                description: Some(code.reason().to_string()),
            };
            this.encode(Message::Close(Some(reason)), &mut buf);
        }
        if buf.is_empty() {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(buf.freeze())))
    }
}

impl Drop for OutboxBody {
    fn drop(&mut self) {
        // The connection is gone: nothing more can be written, the session must end.
        self.outbox.closing.cancel();
    }
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

    #[test]
    fn other_closes_keep_what_is_queued_before_the_close_frame() {
        let outbox = Outbox::new(10, 1000);
        outbox.push_reply(ByteString::from_static("error")).unwrap();
        outbox.close(CloseCode::ReconnectNow);
        assert_eq!(outbox.state.lock().frames.len(), 1);
    }
}
