//! The socket beneath every client WebSocket of the load generator: it counts the bytes that
//! arrive (the wire cost of a run), and with permessage-deflate (RFC 7692) it inflates the
//! server's compressed messages before tungstenite sees them.
//!
//! tungstenite has no extension support and refuses a frame with RSV1 set, so the extension
//! lives one layer down: once the handshake accepted it, [`WireStream`] parses the server's
//! frames itself and hands tungstenite each compressed message inflated, as an ordinary frame
//! with RSV1 clear. Frames the client writes go out as they are (uncompressed messages are
//! allowed on a connection that negotiated the extension).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use confab_shared::server::put_frame_header;
use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What the load generator offers when it asks for compression.
pub const DEFLATE_OFFER: &str =
    "permessage-deflate; client_no_context_takeover; server_no_context_takeover";
/// Largest message inflated (the client-side `max_message_size` tungstenite also applies).
const MAX_MESSAGE: usize = 64 << 20;
/// The sync flush the sender left off each message (RFC 7692 §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Bytes read per socket read in inflating mode.
const READ_CHUNK: usize = 16 * 1024;

/// Bytes read from every client socket of this process so far, as they came off the wire.
static BYTES_IN: AtomicU64 = AtomicU64::new(0);

/// Bytes read from every client socket of this process so far.
pub fn bytes_in() -> u64 {
    BYTES_IN.load(Ordering::Relaxed)
}

/// A client's TCP stream, passing bytes through until [`WireStream::inflate`] is called.
#[derive(Debug)]
pub struct WireStream {
    inner: TcpStream,
    inflating: Option<Inflating>,
}

#[derive(Debug)]
struct Inflating {
    /// Bytes from the socket not yet parsed into whole frames.
    raw: BytesMut,
    /// Frames ready for tungstenite, compressed ones inflated.
    ready: BytesMut,
    inflater: Decompress,
    /// The server answered `server_no_context_takeover`: each message inflates on its own.
    reset_each: bool,
}

impl WireStream {
    pub fn new(inner: TcpStream) -> Self {
        WireStream {
            inner,
            inflating: None,
        }
    }

    /// From now on, inflates the server's compressed messages. Call it right after the
    /// handshake accepted the extension (the server sends nothing before `hello`).
    pub fn inflate(&mut self, server_no_context_takeover: bool) {
        self.inflating = Some(Inflating {
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            inflater: Decompress::new(false),
            reset_each: server_no_context_takeover,
        });
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

/// Whether a `Sec-WebSocket-Extensions` answer accepted permessage-deflate, and whether it
/// said `server_no_context_takeover`.
pub fn accepted(extensions: Option<&str>) -> Option<bool> {
    let value = extensions?;
    let offer = value.split(',').find(|e| {
        e.trim_start()
            .to_ascii_lowercase()
            .starts_with("permessage-deflate")
    })?;
    Some(
        offer
            .split(';')
            .any(|p| p.trim().eq_ignore_ascii_case("server_no_context_takeover")),
    )
}

impl Inflating {
    /// Moves every whole frame of `raw` to `ready`, inflating compressed messages.
    fn translate(&mut self) -> io::Result<()> {
        loop {
            let Some((header, len)) = header(&self.raw) else {
                return Ok(());
            };
            let total = header + len;
            if self.raw.len() < total {
                return Ok(());
            }
            let first = self.raw[0];
            if first & 0x40 == 0 {
                self.ready.extend_from_slice(&self.raw[..total]);
                self.raw.advance(total);
                continue;
            }
            if first & 0x80 == 0 {
                return Err(invalid(
                    "a fragmented compressed message (confab never sends one)",
                ));
            }
            let mut payload = self.raw.split_to(total);
            payload.advance(header);
            let text = self.inflate_message(&payload)?;
            put_frame_header(&mut self.ready, first & !0x40, text.len());
            self.ready.extend_from_slice(&text);
        }
    }

    fn inflate_message(&mut self, payload: &[u8]) -> io::Result<Vec<u8>> {
        if self.reset_each {
            self.inflater.reset(false);
        }
        let mut out = Vec::with_capacity(payload.len() * 4 + 64);
        for input in [payload, &TAIL[..]] {
            let mut consumed = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= MAX_MESSAGE {
                        return Err(invalid("a compressed message inflates past 64 MiB"));
                    }
                    out.reserve(out.capacity());
                }
                let (in_before, out_before) = (self.inflater.total_in(), out.len());
                let status = self
                    .inflater
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .map_err(|e| invalid(&format!("bad deflate data: {e}")))?;
                consumed += (self.inflater.total_in() - in_before) as usize;
                if status == Status::StreamEnd {
                    return Ok(out);
                }
                let done = consumed == input.len();
                if done && (out.len() < out.capacity() || out.len() == out_before) {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// The header length and payload length of the server frame at the start of `buf`, once
/// its header is complete (server frames are unmasked).
fn header(buf: &[u8]) -> Option<(usize, usize)> {
    let second = *buf.get(1)?;
    match second & 0x7f {
        126 => Some((4, u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize)),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some((10, u64::from_be_bytes(bytes) as usize))
        }
        len => Some((2, len as usize)),
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

impl AsyncRead for WireStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inflating) = this.inflating.as_mut() else {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let read = buf.filled().len() - before;
            BYTES_IN.fetch_add(read as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        };
        loop {
            if !inflating.ready.is_empty() {
                let n = inflating.ready.len().min(buf.remaining());
                buf.put_slice(&inflating.ready[..n]);
                inflating.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read_buf))?;
            let read = read_buf.filled().len();
            if read == 0 {
                // The end of the stream (a partial frame left in `raw` is lost with it).
                return Poll::Ready(Ok(()));
            }
            BYTES_IN.fetch_add(read as u64, Ordering::Relaxed);
            inflating.raw.extend_from_slice(read_buf.filled());
            inflating.translate()?;
        }
    }
}

impl AsyncWrite for WireStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn compressed(text: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(text.len() + 64);
        c.compress_vec(text, &mut out, FlushCompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        out.truncate(out.len() - TAIL.len());
        out
    }

    #[test]
    fn compressed_frames_are_handed_on_inflated_and_others_untouched() {
        let text = "hello hello hello hello hello hello".repeat(20);
        let deflated = compressed(text.as_bytes());
        let mut wire = BytesMut::new();
        put_frame_header(&mut wire, 0x81 | 0x40, deflated.len());
        wire.extend_from_slice(&deflated);
        put_frame_header(&mut wire, 0x81, 2);
        wire.extend_from_slice(b"{}");
        let mut inflating = Inflating {
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            inflater: Decompress::new(false),
            reset_each: true,
        };
        // In two pieces, split inside the first frame.
        inflating.raw.extend_from_slice(&wire[..5]);
        inflating.translate().unwrap_or_else(|e| panic!("{e}"));
        assert!(inflating.ready.is_empty());
        inflating.raw.extend_from_slice(&wire[5..]);
        inflating.translate().unwrap_or_else(|e| panic!("{e}"));
        let mut expected = BytesMut::new();
        put_frame_header(&mut expected, 0x81, text.len());
        expected.extend_from_slice(text.as_bytes());
        put_frame_header(&mut expected, 0x81, 2);
        expected.extend_from_slice(b"{}");
        assert_eq!(inflating.ready, expected);
        assert!(inflating.raw.is_empty());
    }

    #[test]
    fn the_answer_says_whether_deflate_was_accepted() {
        assert_eq!(accepted(None), None);
        assert_eq!(accepted(Some("x-other")), None);
        assert_eq!(
            accepted(Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
            )),
            Some(true)
        );
        assert_eq!(accepted(Some("permessage-deflate")), Some(false));
    }
}
