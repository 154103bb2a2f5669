//! What the load generator writes and reads on the wire.
//!
//! Every message text carries its publish time: `t<unix µs>;` followed by `x` padding up to
//! the requested size, so the receiver computes publish→receive latency from the text alone.
//! Against the reference server the publisher sends the very frame shape confab delivers (a
//! `message` event with its own seq), so receivers parse the same bytes from both servers and
//! the client-side cost is identical.

use std::borrow::Cow;

use serde::Deserialize;

/// Builds a message text of exactly `size` bytes (or just the timestamp when `size` is smaller).
pub fn make_text(publish_us: u64, size: usize) -> String {
    let mut text = String::with_capacity(size.max(24));
    text.push('t');
    text.push_str(&publish_us.to_string());
    text.push(';');
    while text.len() < size {
        text.push('x');
    }
    text
}

/// A message text of exactly `size` bytes (or just the timestamp when smaller) whose padding
/// is words, picked by `seed`: it compresses about as well as real chat does (2–3×), where
/// [`make_text`]'s single repeated letter compresses to almost nothing.
pub fn make_words_text(publish_us: u64, size: usize, seed: u64) -> String {
    const WORDS: [&str; 48] = [
        "the", "a", "to", "and", "of", "in", "is", "it", "you", "that", "for", "on", "we", "this",
        "with", "be", "are", "have", "not", "at", "can", "will", "just", "so", "meeting", "today",
        "tomorrow", "deploy", "review", "build", "please", "thanks", "looks", "good", "fixed",
        "issue", "branch", "release", "customer", "call", "later", "check", "now", "yes", "no",
        "maybe", "ticket", "update",
    ];
    let mut text = String::with_capacity(size.max(24));
    text.push('t');
    text.push_str(&publish_us.to_string());
    text.push(';');
    // A small LCG: cheap, and the same seed gives the same text.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while text.len() < size {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
        text.push(if (state >> 20) & 7 == 0 { '.' } else { ' ' });
    }
    text.truncate(size.max(text.find(';').map_or(0, |i| i + 1)));
    text
}

/// Reads the publish time back from a text made by [`make_text`].
pub fn parse_publish_us(text: &str) -> Option<u64> {
    let rest = text.strip_prefix('t')?;
    let end = rest.find(';')?;
    rest[..end].parse().ok()
}

/// Current Unix time in microseconds.
pub fn now_us() -> u64 {
    confab_shared::now_us()
}

/// A confab `send` request. Channel ids are `[A-Za-z0-9_-]` and texts from [`make_text`] are
/// plain ASCII, so no JSON escaping is needed; this runs once per published message. Like every
/// client confab ships, it carries a `client_msg_id` (see [`client_msg_id`]), so the server
/// de-duplicates it and the store does the work real clients cause.
pub fn send_frame(channel: &str, text: &str, client_msg_id: &str) -> String {
    debug_assert!(!needs_escape(channel) && !needs_escape(text) && !needs_escape(client_msg_id));
    format!(
        r#"{{"op":"send","channel":"{channel}","text":"{text}","client_msg_id":"{client_msg_id}"}}"#
    )
}

/// A `client_msg_id` unique per sender: the publish time and the sender's own count.
pub fn client_msg_id(publish_us: u64, count: u64) -> String {
    format!("l{publish_us:x}-{count}")
}

/// A confab `typing` request.
pub fn typing_frame(channel: &str) -> String {
    debug_assert!(!needs_escape(channel));
    format!(r#"{{"op":"typing","channel":"{channel}"}}"#)
}

/// A confab `ping` request: the client heartbeat.
pub const PING_FRAME: &str = r#"{"op":"ping"}"#;

/// A frame for the reference server, shaped like the `message` event confab would deliver for
/// the same send, with the publisher's own seq on its own stream.
pub fn reference_frame(stream: &str, seq: u64, user: &str, text: &str) -> String {
    debug_assert!(!needs_escape(stream) && !needs_escape(user) && !needs_escape(text));
    let ts = now_us() / 1000;
    format!(
        r#"{{"op":"event","type":"message","channel":"{stream}","seq":{seq},"ts":{ts},"user":"{user}","text":"{text}","client_msg_id":null,"thread":null}}"#
    )
}

/// A `hello` with an optional `resume` map.
pub fn hello_frame<'a>(token: &str, resume: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let resume: serde_json::Map<String, serde_json::Value> = resume
        .into_iter()
        .map(|(channel, seq)| (channel.to_string(), serde_json::Value::from(seq)))
        .collect();
    let mut hello = serde_json::json!({"op": "hello", "token": token});
    if !resume.is_empty() {
        hello["resume"] = serde_json::Value::Object(resume);
    }
    hello.to_string()
}

fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
}

/// The fields of a server frame the load generator looks at, borrowed from the frame's text
/// where possible. Unknown fields are skipped, so this reads every frame of SPEC §4.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(borrow, default)]
    pub text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub message: Option<Cow<'a, str>>,
}

impl<'a> Incoming<'a> {
    pub fn parse(frame: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(frame)
    }

    /// Whether this is an event of the given type.
    pub fn is_event(&self, kind: &str) -> bool {
        self.op == "event" && self.kind.as_deref() == Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_texts_have_the_size_and_timestamp_and_compress_like_chat() {
        for size in [0, 10, 100, 1024] {
            let text = make_words_text(1_700_000_000_123_456, size, 7);
            assert_eq!(text.len(), size.max(18));
            assert_eq!(parse_publish_us(&text), Some(1_700_000_000_123_456));
            assert!(!needs_escape(&text));
        }
        let text = make_words_text(1, 1024, 3);
        assert_ne!(
            text,
            make_words_text(1, 1024, 4),
            "the seed picks the words"
        );
        let mut compressor = flate2::Compress::new(flate2::Compression::fast(), false);
        let mut out = Vec::with_capacity(2048);
        compressor
            .compress_vec(text.as_bytes(), &mut out, flate2::FlushCompress::Sync)
            .unwrap_or_else(|e| panic!("{e}"));
        let ratio = text.len() as f64 / out.len() as f64;
        assert!((1.5..5.0).contains(&ratio), "compresses {ratio:.1}x");
    }

    #[test]
    fn text_round_trips_its_timestamp_at_the_requested_size() {
        for size in [0, 10, 100, 1024] {
            let text = make_text(1_700_000_000_123_456, size);
            assert!(text.len() >= size);
            if size >= 24 {
                assert_eq!(text.len(), size);
            }
            assert_eq!(parse_publish_us(&text), Some(1_700_000_000_123_456));
        }
        assert_eq!(parse_publish_us("hello"), None);
        assert_eq!(parse_publish_us("t12x"), None);
    }

    #[test]
    fn reference_frame_parses_like_a_confab_message_event() {
        let text = make_text(42, 100);
        let frame = reference_frame("ref-p0", 7, "p0", &text);
        let incoming = Incoming::parse(&frame).unwrap();
        assert!(incoming.is_event("message"));
        assert_eq!(incoming.channel.as_deref(), Some("ref-p0"));
        assert_eq!(incoming.seq, Some(7));
        assert_eq!(
            incoming.text.as_deref().and_then(parse_publish_us),
            Some(42)
        );
        // And it is what confab's own encoder produces for such an event, field for field.
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        let event: confab_shared::server::ServerFrame = serde_json::from_value(value).unwrap();
        assert!(matches!(
            event,
            confab_shared::server::ServerFrame::Event(confab_shared::server::Event::Message {
                seq: 7,
                ..
            })
        ));
    }

    #[test]
    fn send_and_hello_frames_are_valid_json() {
        let send: serde_json::Value = serde_json::from_str(&send_frame(
            "general",
            &make_text(1, 30),
            &client_msg_id(1, 7),
        ))
        .unwrap();
        assert_eq!(send["op"], "send");
        assert_eq!(send["channel"], "general");
        assert_eq!(send["client_msg_id"], "l1-7");
        let hello: serde_json::Value =
            serde_json::from_str(&hello_frame("tok", [("general", 5)])).unwrap();
        assert_eq!(hello["resume"]["general"], 5);
        let bare: serde_json::Value = serde_json::from_str(&hello_frame("tok", [])).unwrap();
        assert!(bare.get("resume").is_none());
    }

    #[test]
    fn incoming_reads_errors_and_acks() {
        let e = Incoming::parse(
            r#"{"op":"error","id":null,"code":"rate_limited","message":"slow down","retry_after_ms":50}"#,
        )
        .unwrap();
        assert_eq!(e.op, "error");
        assert_eq!(e.code.as_deref(), Some("rate_limited"));
        let a = Incoming::parse(r#"{"op":"ack","id":3,"channel":"c","seq":9,"ts":1}"#).unwrap();
        assert_eq!(a.seq, Some(9));
        // Escaped text still parses (owned instead of borrowed).
        let m = Incoming::parse(
            r#"{"op":"event","type":"message","channel":"c","seq":1,"text":"a\"b"}"#,
        )
        .unwrap();
        assert_eq!(m.text.as_deref(), Some("a\"b"));
    }
}
