//! permessage-deflate (RFC 7692) on client WebSockets: the negotiation, the compression of a
//! server frame — once, whoever receives it — and bounded inflation of client frames.
//!
//! The gateway always answers with `server_no_context_takeover` and
//! `client_no_context_takeover`: every message, both ways, is a deflate stream of its own. So
//! the compressed bytes of an event do not depend on the connection, and a fanout compresses
//! each event once for all its recipients ([`confab_shared::link::Frame::deflated`]) instead
//! of once per recipient; and no connection holds a deflate or inflate context (about 300 KiB
//! and 40 KiB each with zlib's defaults): each worker thread has one compressor and one
//! inflater, reset between messages.
//!
//! A batch (`?batch=1`) of compressed events is one message made of the events' own
//! compressed bytes: each ends on a sync flush (an empty stored block, so the next starts on
//! a byte boundary with nothing it refers back to), and the brackets and commas between them
//! are one-byte stored blocks ([`BatchWriter`]).

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// What the gateway answers to an acceptable offer.
const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The same, for an offer that asked for `server_max_window_bits=15` (which must be echoed).
const RESPONSE_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; \
                                  client_no_context_takeover; server_max_window_bits=15";

/// Texts shorter than this go out uncompressed: deflate's framing would eat most of the gain,
/// and small frames are mostly per-session replies, compressed once per recipient.
pub const MIN_COMPRESS_BYTES: usize = 128;
/// zlib's level 6 by default costs 2–3× level 1's time for a few percent of size; an event is
/// compressed once however many sessions receive it, so its cost is small either way, but a
/// reply is compressed per session.
const LEVEL: u32 = 1;
/// The sync flush that ends every message's deflate data, which RFC 7692 §7.2.1 leaves off
/// the wire and the receiver appends again.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Inflated output grows by at most this much at a time, so a bomb is caught before it costs
/// more than one step beyond the limit.
const INFLATE_STEP: usize = 16 * 1024;

/// What a client's `Sec-WebSocket-Extensions` offers lead to: the header value to answer
/// with, when one of the offers is permessage-deflate with parameters the gateway can honour.
/// `headers` are the values of every `Sec-WebSocket-Extensions` header of the request.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    headers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(accept)
}

/// The answer to one offer (`permessage-deflate; param; param=value`), if acceptable.
fn accept(offer: &str) -> Option<&'static str> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut window_15 = false;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        // RFC 7692 §7: an offer with a parameter twice is declined.
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // The client may limit its own window; the inflater takes any window up to 15.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) if window_bits(bits).is_some() => {}
            // A client may ask the server for a smaller window than 32 KiB: the compressor has
            // only the full one, so such an offer is declined (and the client gets frames
            // uncompressed, or another of its offers).
            ("server_max_window_bits", Some(bits)) if window_bits(bits) == Some(15) => {
                window_15 = true;
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(if window_15 {
        RESPONSE_WINDOW_15
    } else {
        RESPONSE
    })
}

/// A window size parameter: 8 to 15, in decimal without leading zeros (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// This thread's compressor, reset before each message (no context takeover).
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(Compression::new(LEVEL), false));
    /// This thread's inflater, reset before each message.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// `text` compressed as one message on its own (RFC 7692 §7.2.1: raw deflate, sync flush, the
/// final `00 00 ff ff` left off); `None` when that would not make it smaller, or `text` is
/// shorter than [`MIN_COMPRESS_BYTES`]: it then goes out as it is.
pub fn compress(text: &[u8]) -> Option<Bytes> {
    if text.len() < MIN_COMPRESS_BYTES {
        return None;
    }
    COMPRESSOR.with_borrow_mut(|compressor| {
        compressor.reset();
        let mut out = Vec::with_capacity(text.len() / 2 + 64);
        loop {
            let consumed = compressor.total_in() as usize;
            compressor
                .compress_vec(&text[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            // Done once all input is in and the flush had room to spare.
            if compressor.total_in() as usize == text.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < text.len()).then(|| Bytes::from(out))
    })
}

/// Why a compressed client message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (close `1009`).
    TooBig,
    /// It is not valid deflate data.
    Corrupt,
}

/// Inflates one compressed client message (its payload as sent, without the tail), to at most
/// `limit` bytes: output beyond that stops the inflation, so a small message that would
/// inflate to gigabytes costs at most `limit` plus one step of memory.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        let mut out: Vec<u8> = Vec::new();
        for input in [compressed, &TAIL[..]] {
            let mut consumed = 0;
            loop {
                if out.len() == out.capacity() {
                    // One byte past the limit is enough to know it is over.
                    out.reserve_exact(INFLATE_STEP.min(limit + 1 - out.len()));
                }
                let (in_before, out_before) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::None)
                    .map_err(|_| InflateError::Corrupt)?;
                consumed += (inflater.total_in() - in_before) as usize;
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block ends the message; what follows it is not deflate data.
                    return Ok(Bytes::from(out));
                }
                let input_done = consumed == input.len();
                // All input in and room left (or no progress at all): nothing more comes out.
                if input_done && (out.len() < out.capacity() || out.len() == out_before) {
                    break;
                }
            }
        }
        Ok(Bytes::from(out))
    })
}

/// Builds one compressed message holding a JSON array of texts, from each text's own
/// compressed bytes (or the text itself, as stored blocks, for one without).
#[derive(Debug, Default)]
pub struct BatchWriter {
    buf: BytesMut,
    elements: usize,
}

impl BatchWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut writer = BatchWriter {
            buf: BytesMut::with_capacity(bytes + 16),
            elements: 0,
        };
        stored(&mut writer.buf, b"[");
        writer
    }

    /// Adds the next element: `deflated`, its compressed form from [`compress`], or `text`
    /// when it has none.
    pub fn push(&mut self, text: &[u8], deflated: Option<&Bytes>) {
        if self.elements > 0 {
            stored(&mut self.buf, b",");
        }
        self.elements += 1;
        match deflated {
            Some(deflated) => {
                self.buf.extend_from_slice(deflated);
                // Completes the element's sync flush: the next block starts on a byte boundary.
                self.buf.extend_from_slice(&TAIL);
            }
            None => stored(&mut self.buf, text),
        }
    }

    /// The message's payload: `]`, then the start of the empty stored block whose length the
    /// receiver appends (`00 00 ff ff`).
    pub fn finish(mut self) -> BytesMut {
        stored(&mut self.buf, b"]");
        self.buf.put_u8(0x00);
        self.buf
    }
}

/// `bytes` as stored (uncompressed) deflate blocks, each on a byte boundary: a header byte
/// (not final, type 00), the length and its complement, the bytes.
fn stored(buf: &mut BytesMut, bytes: &[u8]) {
    for chunk in bytes.chunks(u16::MAX as usize) {
        let len = chunk.len() as u16;
        buf.put_u8(0x00);
        buf.put_u16_le(len);
        buf.put_u16_le(!len);
        buf.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client does with a compressed message (RFC 7692 §7.2.2), with its own inflater.
    fn client_inflate(payload: &[u8]) -> Vec<u8> {
        let mut inflater = Decompress::new(false);
        let mut input = payload.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        inflater
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(inflater.total_in() as usize, input.len(), "all input used");
        out
    }

    fn text(n: usize) -> String {
        let mut s = String::from(r#"{"op":"event","type":"message","text":""#);
        for i in 0..n {
            s.push_str(["lorem ", "ipsum ", "dolor ", "sit ", "amet "][i % 5]);
        }
        s.push_str(r#""}"#);
        s
    }

    #[test]
    fn offers_are_answered_with_no_context_takeover_both_ways() {
        assert_eq!(negotiate(["permessage-deflate"]), Some(RESPONSE));
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits"]),
            Some(RESPONSE)
        );
        assert_eq!(
            negotiate(["x-webkit-deflate-frame", "Permessage-Deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=10"]),
            Some(RESPONSE)
        );
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=\"15\""]),
            Some(RESPONSE_WINDOW_15)
        );
    }

    #[test]
    fn offers_the_gateway_cannot_honour_are_declined_and_the_next_is_taken() {
        assert_eq!(negotiate([]), None);
        assert_eq!(negotiate(["foo"]), None);
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=10"]),
            None
        );
        assert_eq!(negotiate(["permessage-deflate; what=1"]), None);
        assert_eq!(
            negotiate([
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
            ]),
            None
        );
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits=16"]),
            None
        );
        assert_eq!(
            negotiate(["permessage-deflate; server_no_context_takeover=1"]),
            None
        );
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=9, permessage-deflate"]),
            Some(RESPONSE)
        );
    }

    #[test]
    fn a_compressed_text_inflates_back_and_small_ones_stay_plain() {
        let t = text(200);
        let deflated = compress(t.as_bytes()).expect("worth compressing");
        assert!(deflated.len() < t.len() / 3);
        assert_eq!(client_inflate(&deflated), t.as_bytes());
        assert_eq!(compress(b"{\"op\":\"pong\",\"id\":1}"), None);
        // Random bytes do not get smaller: sent as they are.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        assert_eq!(compress(&noise), None);
    }

    #[test]
    fn a_batch_of_compressed_and_plain_texts_inflates_to_the_json_array() {
        let (a, b, c) = (text(100), r#"{"op":"ack"}"#.to_string(), text(300));
        let (da, dc) = (compress(a.as_bytes()), compress(c.as_bytes()));
        assert!(da.is_some() && dc.is_some());
        let mut batch = BatchWriter::with_capacity(64);
        batch.push(a.as_bytes(), da.as_ref());
        batch.push(b.as_bytes(), None);
        batch.push(c.as_bytes(), dc.as_ref());
        let payload = batch.finish();
        let json = String::from_utf8(client_inflate(&payload)).unwrap_or_default();
        assert_eq!(json, format!("[{a},{b},{c}]"));
        assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
        // The gateway's own inflater reads it too.
        assert_eq!(inflate(&payload, 1 << 20).as_deref(), Ok(json.as_bytes()));
    }

    #[test]
    fn inflation_stops_at_the_limit_so_a_bomb_costs_no_memory() {
        // 64 MiB of zeros compress to about 64 KiB.
        let zeros = vec![0u8; 64 << 20];
        let mut compressor = Compress::new(Compression::best(), false);
        let mut bomb = Vec::with_capacity(1 << 20);
        compressor
            .compress_vec(&zeros, &mut bomb, FlushCompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(bomb.len() < 1 << 20);
        bomb.truncate(bomb.len() - TAIL.len());
        assert_eq!(inflate(&bomb, 64 * 1024), Err(InflateError::TooBig));
        // Exactly at the limit is fine; one byte over is not.
        let exact = vec![b'a'; 1000];
        let mut compressor = Compress::new(Compression::fast(), false);
        let mut deflated = Vec::with_capacity(4096);
        compressor
            .compress_vec(&exact, &mut deflated, FlushCompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        deflated.truncate(deflated.len() - TAIL.len());
        assert_eq!(inflate(&deflated, 1000).map(|b| b.len()), Ok(1000));
        assert_eq!(inflate(&deflated, 999), Err(InflateError::TooBig));
        assert_eq!(inflate(b"\xff\xff\xff", 1000), Err(InflateError::Corrupt));
    }
}
