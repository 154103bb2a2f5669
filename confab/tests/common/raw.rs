//! A WebSocket client that does its own framing, for what tungstenite cannot do: negotiate
//! permessage-deflate (RFC 7692), read frames with RSV1 set, and send frames a conforming
//! client never would (compressed bombs, a header declaring a gigabyte).
//!
//! Deliberately separate from the gateway's code: it is written from the RFCs, with its own
//! handshake and its own inflater (flate2, a fresh one per message, as
//! `server_no_context_takeover` allows).

use std::net::SocketAddr;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::{Incoming, WAIT};

/// The bytes a sync flush ends with, which RFC 7692 §7.2.1 leaves off the wire.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The most a received message may inflate to here (the test's own bound).
const MAX_INFLATED: usize = 16 << 20;

/// A frame as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// FIN, RSV1–3 and the opcode.
    pub first: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn rsv1(&self) -> bool {
        self.first & 0x40 != 0
    }

    pub fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
}

/// A client socket at `/v1/ws` after the upgrade.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server's `Sec-WebSocket-Extensions` answer, if any.
    pub extensions: Option<String>,
    /// Bytes received since the upgrade.
    pub wire_bytes: u64,
    /// Text frames received compressed (RSV1), and in all.
    pub compressed_texts: u64,
    pub texts: u64,
}

impl RawClient {
    /// Connects to `/v1/ws?<query>` offering `extensions` (a `Sec-WebSocket-Extensions`
    /// value), with a small receive buffer when asked; panics unless the answer is `101`.
    pub async fn connect(
        addr: SocketAddr,
        query: &str,
        extensions: Option<&str>,
        small_receive_buffer: bool,
    ) -> RawClient {
        let socket = TcpSocket::new_v4().expect("tcp socket");
        if small_receive_buffer {
            socket
                .set_recv_buffer_size(1024)
                .expect("set receive buffer size");
        }
        let mut stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        let offer = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /v1/ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write the upgrade request");
        let mut buf = Vec::new();
        let end = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return end + 4;
                }
                let mut chunk = [0u8; 1024];
                let n = stream
                    .read(&mut chunk)
                    .await
                    .expect("read the upgrade answer");
                assert!(n > 0, "connection closed during the upgrade");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("no upgrade answer");
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_string())
        });
        buf.drain(..end);
        RawClient {
            stream,
            buf,
            extensions,
            wire_bytes: 0,
            compressed_texts: 0,
            texts: 0,
        }
    }

    // ---- writing ----

    /// Writes one frame: `first` (FIN, RSV bits, opcode) and `payload`, masked as a client's
    /// frames must be.
    pub async fn send_frame(&mut self, first: u8, payload: &[u8]) {
        let mut frame = vec![first];
        push_length(&mut frame, payload.len() as u64);
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("write a frame");
    }

    /// Writes only a frame header declaring `len` payload bytes (which never follow).
    pub async fn send_header_only(&mut self, first: u8, len: u64) {
        let mut frame = vec![first];
        push_length(&mut frame, len);
        frame.extend_from_slice(&[1, 2, 3, 4]);
        self.stream.write_all(&frame).await.expect("write a header");
    }

    /// A plain text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x81, text.as_bytes()).await;
    }

    /// A text message compressed as RFC 7692 says: raw deflate, sync flush, tail left off,
    /// RSV1 set.
    pub async fn send_compressed(&mut self, text: &[u8]) {
        let payload = deflate(text);
        self.send_frame(0x81 | 0x40, &payload).await;
    }

    /// Sends `hello` (uncompressed) and returns the `ready`.
    pub async fn hello(&mut self, token: &str) -> Value {
        self.send_text(&json!({"op": "hello", "token": token}).to_string())
            .await;
        match self.read(WAIT).await {
            Incoming::Json(ready) if ready["op"] == "ready" => ready,
            other => panic!("expected ready, got {other:?}"),
        }
    }

    // ---- reading ----

    /// The next frame off the wire, as it came; `None` when the connection ended or nothing
    /// arrived by `deadline`.
    pub async fn read_frame(&mut self, deadline: Instant) -> Result<RawFrame, String> {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err("timeout".into()),
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
                Ok(Ok(0)) => return Err("connection ended".into()),
                Ok(Ok(n)) => n,
            };
            self.wire_bytes += n as u64;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame as the harness's [`Incoming`]: text inflated when compressed and parsed
    /// as JSON (an object, or an array with `?batch=1`).
    pub async fn read(&mut self, timeout: Duration) -> Incoming {
        let deadline = Instant::now() + timeout;
        loop {
            let frame = match self.read_frame(deadline).await {
                Ok(frame) => frame,
                Err(e) if e == "timeout" => return Incoming::Timeout,
                Err(e) => return Incoming::Ended(e),
            };
            match frame.opcode() {
                0x1 => {
                    self.texts += 1;
                    let text = if frame.rsv1() {
                        self.compressed_texts += 1;
                        inflate(&frame.payload)
                    } else {
                        frame.payload
                    };
                    return match serde_json::from_slice(&text) {
                        Ok(value) => Incoming::Json(value),
                        Err(e) => panic!(
                            "a text frame that is not JSON ({e}): {}",
                            String::from_utf8_lossy(&text)
                        ),
                    };
                }
                0x2 => return Incoming::Binary(frame.payload),
                0x8 => {
                    let code = (frame.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                    let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or(&[]));
                    return Incoming::Close(code, reason.to_string());
                }
                _ => continue,
            }
        }
    }

    /// Reads until a close frame and returns its code; panics on anything else after `WAIT`.
    pub async fn expect_close(&mut self, code: u16) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Incoming::Json(_) => continue,
                Incoming::Close(got, reason) => {
                    assert_eq!(got, Some(code), "closed with {got:?} {reason}");
                    return;
                }
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
    }
}

fn push_length(frame: &mut Vec<u8>, len: u64) {
    // Client frames are masked: the MASK bit is set in the length byte.
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&len.to_be_bytes());
    }
}

/// A whole server frame at the start of `buf` (unmasked), and the bytes it took.
fn parse(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let first = *buf.first()?;
    let second = *buf.get(1)?;
    assert_eq!(second & 0x80, 0, "a server frame must not be masked");
    let (header, len) = match second & 0x7f {
        126 => (4, u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize),
        127 => (
            10,
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
        ),
        len => (2, len as usize),
    };
    let payload = buf.get(header..header + len)?.to_vec();
    Some((RawFrame { first, payload }, header + len))
}

/// `text` as one compressed message (RFC 7692 §7.2.1).
pub fn deflate(text: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(text.len() / 2 + 1024);
    loop {
        let consumed = compressor.total_in() as usize;
        compressor
            .compress_vec(&text[consumed..], &mut out, FlushCompress::Sync)
            .expect("deflate");
        if compressor.total_in() as usize == text.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

/// Inflates one compressed message (RFC 7692 §7.2.2: append the tail, inflate), with a fresh
/// inflater: the server answered `server_no_context_takeover`.
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut inflater = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(payload.len() * 4 + 1024);
    loop {
        let consumed = inflater.total_in() as usize;
        let status = inflater
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .expect("the server's deflate data inflates");
        if status == Status::StreamEnd
            || (inflater.total_in() as usize == input.len() && out.len() < out.capacity())
        {
            return out;
        }
        assert!(out.len() < MAX_INFLATED, "a message inflating past 16 MiB");
        out.reserve(out.capacity());
    }
}
