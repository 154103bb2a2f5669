//! The checks behind confab's fuzz targets: one function per parser that reads bytes a hostile
//! client or peer controls. Each takes arbitrary bytes, must never panic, and asserts what is
//! cheap to assert beyond that (round trips, limits, chunking invariance, no forgeries).
//!
//! `fuzz/fuzz_targets/*` (cargo-fuzz, coverage-guided) call these; so does this crate's stable
//! test (`tests/corpus.rs`), which replays the committed seed corpus, the kept regressions and
//! seeded random inputs in CI. See `docs/fuzzing.md`.

use std::sync::OnceLock;

use actix_codec::Encoder;
use actix_http::ws::{Codec, Item, Message};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use confab_gateway::auth::TokenKeys;
use confab_gateway::socket::{FrameDecoder, Incoming};
use confab_shared::client::{parse_frame, validate, ClientFrame, ClientRequest, RequestId};
use confab_shared::limits;
use confab_shared::link::{
    self, LinkAuth, LinkChallenge, LinkHello, LinkWelcome, Reassembler, ToCell, ToGateway,
};
use confab_shared::recipient_lists::{Incoming as FromCell, ListDecoder};
use confab_shared::{UserId, WorkspaceId};
use serde::Serialize;

/// The frame and message limit the WebSocket check runs with: small, so that inputs of a few
/// KiB reach the overflow paths.
pub const WS_MAX_FRAME_BYTES: usize = 1024;

/// The secret the JWT check verifies with.
pub const JWT_SECRET: &str = "fuzz-secret";

/// The client frame parser (`confab_shared::client::parse_frame`) on arbitrary text.
///
/// An accepted frame respects every limit of SPEC §4 and reads back the same after being
/// written out again; a refused frame echoes only an id that is itself valid.
pub fn client_frame(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // The default limit, and a tiny one so that `too_large` is reachable.
    for max_text in [limits::MAX_TEXT_BYTES, 8] {
        match parse_frame(&text, max_text) {
            Ok(frame) => check_accepted_frame(&frame, max_text),
            Err(e) => {
                if let Some(RequestId::Str(id)) = &e.id {
                    assert!(id.chars().count() <= 64, "an echoed id over 64 characters");
                }
                assert!(!e.message.is_empty(), "an error without a message");
            }
        }
    }
}

fn check_accepted_frame(frame: &ClientFrame, max_text: usize) {
    assert!(
        validate(&frame.request, max_text).is_ok(),
        "accepted but invalid: {frame:?}"
    );
    if let Some(RequestId::Str(id)) = &frame.id {
        assert!(
            id.chars().count() <= 64,
            "an id over 64 characters accepted"
        );
    }
    match &frame.request {
        ClientRequest::Send {
            text,
            client_msg_id,
            ..
        } => {
            assert!(text.len() <= max_text && !text.trim().is_empty());
            if let Some(cmid) = client_msg_id {
                assert!(!cmid.is_empty() && cmid.len() <= limits::MAX_CLIENT_MSG_ID_BYTES);
            }
        }
        ClientRequest::Edit { text, .. } => {
            assert!(text.len() <= max_text && !text.trim().is_empty());
        }
        ClientRequest::History {
            limit: Some(limit), ..
        } => assert!((1..=limits::HISTORY_MAX_LIMIT).contains(limit)),
        ClientRequest::PresenceSub { users } => {
            assert!(users.len() <= limits::MAX_PRESENCE_USERS);
        }
        ClientRequest::Hello {
            resume: Some(resume),
            ..
        } => assert!(resume.len() <= limits::MAX_RESUME_CHANNELS),
        _ => {}
    }
    // Written back out, the frame parses to the same frame.
    let mut value = match serde_json::to_value(&frame.request) {
        Ok(serde_json::Value::Object(object)) => object,
        other => panic!("a request that does not serialize to an object: {other:?}"),
    };
    if let Some(id) = &frame.id {
        let id = serde_json::to_value(id).unwrap_or_else(|e| panic!("id: {e}"));
        value.insert("id".to_string(), id);
    }
    let text = serde_json::Value::Object(value).to_string();
    let again = parse_frame(&text, max_text).unwrap_or_else(|e| panic!("{text} refused: {e:?}"));
    assert_eq!(&again, frame, "{text}");
}

/// The link decoder (`confab_shared::link::decode` / `decode_batch`) on arbitrary bytes, as
/// every message type a peer sends over a link.
///
/// A decoded message encodes to at most the bytes it came from and decodes back to itself; a
/// decoded batch holds at most one message per byte and round-trips through `encode_into`.
pub fn link_decode(data: &[u8]) {
    round_trip::<ToCell>(data);
    round_trip::<ToGateway>(data);
    round_trip::<FromCell>(data);
    round_trip::<LinkHello>(data);
    round_trip::<LinkChallenge>(data);
    round_trip::<LinkAuth>(data);
    round_trip::<LinkWelcome>(data);
    batch_round_trip::<ToCell>(data);
    batch_round_trip::<ToGateway>(data);
    batch_round_trip::<FromCell>(data);
    recipient_lists(data);
    reassemble(data);
}

/// Bound of one reassembled message in [`reassemble`]: small, so fragments reach it.
const FUZZ_MAX_MESSAGE: usize = 256;

/// The link's frame reassembly on arbitrary frames: `data` is cut into frames, each led by a
/// length byte. Whatever the frames, the reassembler errs or yields messages, and never holds
/// more than its bound of one unfinished message.
fn reassemble(mut data: &[u8]) {
    let mut to_cell = Reassembler::new(FUZZ_MAX_MESSAGE);
    let mut to_gateway = Reassembler::new(FUZZ_MAX_MESSAGE);
    while let Some((&len, rest)) = data.split_first() {
        let (frame, after) = rest.split_at(usize::from(len).min(rest.len()));
        data = after;
        if let Ok(messages) = to_cell.push::<ToCell>(frame) {
            for message in messages {
                assert!(link::encode(&message).len() <= FUZZ_MAX_MESSAGE.max(frame.len()));
            }
        }
        let _ = to_gateway.push::<FromCell>(frame);
    }
}

/// A gateway's recipient lists fed whatever a batch of cell messages decodes to: each message
/// resolves or errs, a `DeliverTo` resolves only to a list sent before it, and the decoder
/// holds no more lists than it was sent.
fn recipient_lists(data: &[u8]) {
    let Ok(messages) = link::decode_batch::<FromCell>(data) else {
        return;
    };
    let mut lists = ListDecoder::default();
    // What the decoder accepted: each list number's sessions, while it is held.
    let mut held = std::collections::HashMap::new();
    for incoming in messages {
        let outcome = lists.resolve(incoming.clone());
        match (incoming, outcome) {
            (FromCell::Recipients { list, sessions }, Ok(None)) => {
                held.insert(list, sessions);
            }
            (FromCell::Forget { list }, Ok(None)) => {
                assert!(held.remove(&list).is_some(), "forgot {list}, never held");
            }
            (FromCell::DeliverTo { list, .. }, Ok(Some(ToGateway::Deliver { sessions, .. }))) => {
                assert_eq!(held.get(&list), Some(&sessions), "list {list}");
            }
            (FromCell::DeliverTo { list, .. }, Err(_)) => {
                assert!(!held.contains_key(&list), "list {list} held but refused");
            }
            (FromCell::Message(message), outcome) => assert_eq!(outcome, Ok(Some(message))),
            (incoming, Ok(Some(message))) => panic!("{incoming:?} resolved to {message:?}"),
            (_, _) => {}
        }
        assert_eq!(lists.held(), held.len());
    }
}

fn round_trip<T>(data: &[u8])
where
    T: Serialize + for<'a> serde::Deserialize<'a> + PartialEq + std::fmt::Debug,
{
    let Ok(message) = link::decode::<T>(data) else {
        return;
    };
    let bytes = link::encode(&message);
    assert!(!bytes.is_empty(), "{message:?} encodes to nothing");
    assert!(bytes.len() <= data.len(), "{message:?} re-encodes longer");
    let back: T = link::decode(&bytes).unwrap_or_else(|e| panic!("{message:?}: {e}"));
    assert_eq!(back, message);
}

fn batch_round_trip<T>(data: &[u8])
where
    T: Serialize + for<'a> serde::Deserialize<'a> + PartialEq + std::fmt::Debug,
{
    let Ok(messages) = link::decode_batch::<T>(data) else {
        return;
    };
    assert!(messages.len() <= data.len(), "more messages than bytes");
    let mut batch = Vec::new();
    for message in &messages {
        link::encode_into(message, &mut batch);
    }
    assert!(batch.len() <= data.len(), "a batch re-encodes longer");
    let back: Vec<T> = link::decode_batch(&batch).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, messages);
}

/// What a decoder made of a byte stream: the frames, then the error that ended it, if any.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<Incoming>,
    error: Option<String>,
}

/// Feeds `data` to a fresh decoder `chunk` bytes at a time, as a socket might deliver it;
/// with `deflate`, a decoder of a connection that negotiated permessage-deflate.
fn decode_stream(data: &[u8], chunk: usize, deflate: bool) -> Decoded {
    let mut decoder = if deflate {
        FrameDecoder::with_deflate(WS_MAX_FRAME_BYTES)
    } else {
        FrameDecoder::new(WS_MAX_FRAME_BYTES)
    };
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        error: Some(format!("{e:?}")),
                    }
                }
            }
        }
    }
    Decoded {
        frames,
        error: None,
    }
}

fn check_frame_bounds(decoded: &Decoded) {
    for frame in &decoded.frames {
        match frame {
            Incoming::Text(text) => assert!(text.len() <= WS_MAX_FRAME_BYTES, "text over limit"),
            Incoming::Ping(payload) => assert!(payload.len() <= WS_MAX_FRAME_BYTES),
            _ => {}
        }
    }
}

/// The bare-socket WebSocket frame reader (`confab_gateway::socket::FrameDecoder`).
///
/// The first byte picks the mode. Odd: the rest is raw client bytes; decoding them whole and
/// decoding them split into small chunks (as TCP may deliver them) must give the same frames
/// and the same error, and no frame is over the limit, inflated or not (bit 1 of the first
/// byte picks a decoder with permessage-deflate). Even: the rest is a script of client
/// messages (texts, binaries, pings, fragmented texts with pings in between), encoded as a
/// conforming client would (masked); decoding must give exactly those messages back.
pub fn ws_frames(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        // Bit 1 picks a decoder with permessage-deflate (RSV1 messages inflated, bounded).
        let deflate = mode & 2 == 2;
        let whole = decode_stream(rest, rest.len(), deflate);
        check_frame_bounds(&whole);
        let chunk = usize::from(mode >> 2) % 16 + 1;
        let split = decode_stream(rest, chunk, deflate);
        assert_eq!(whole, split, "chunks of {chunk} bytes decode differently");
    } else {
        scripted_ws_frames(rest);
    }
}

fn scripted_ws_frames(script: &[u8]) {
    let mut client = Codec::new().client_mode();
    let mut wire = BytesMut::new();
    let mut expected = Vec::new();
    let mut bytes = script.iter().copied();
    let mut send = |message: Message, wire: &mut BytesMut| {
        client
            .encode(message, wire)
            .unwrap_or_else(|e| panic!("client encode: {e:?}"));
    };
    while let (Some(op), Some(len)) = (bytes.next(), bytes.next()) {
        // Payloads up to 4 x 255 bytes: within the 1 KiB limit.
        let len = usize::from(len) * usize::from(op >> 6 & 3).max(1);
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        match op % 5 {
            0 => {
                let text = ByteString::from(String::from_utf8_lossy(&payload).into_owned());
                expected.push(Incoming::Text(text.clone()));
                send(Message::Text(text), &mut wire);
            }
            1 => {
                expected.push(Incoming::Binary);
                send(Message::Binary(Bytes::from(payload)), &mut wire);
            }
            2 => {
                // Control frames carry at most 125 bytes.
                let payload = Bytes::from(payload[..len.min(125)].to_vec());
                expected.push(Incoming::Ping(payload.clone()));
                send(Message::Ping(payload), &mut wire);
            }
            3 => {
                expected.push(Incoming::Pong);
                send(Message::Pong(Bytes::new()), &mut wire);
            }
            _ => {
                // A text in up to four fragments (within the limit), a ping between two.
                let pieces = usize::from(op >> 3 & 3) + 1;
                let size = len.div_ceil(pieces).max(1);
                let parts: Vec<&[u8]> = payload.chunks(size).collect();
                if parts.len() < 2 {
                    continue;
                }
                let last = parts.len() - 1;
                for (i, part) in parts.iter().enumerate() {
                    let part = Bytes::copy_from_slice(part);
                    let item = match i {
                        0 => Item::FirstText(part),
                        i if i == last => Item::Last(part),
                        _ => Item::Continue(part),
                    };
                    send(Message::Continuation(item), &mut wire);
                    if i == 0 {
                        expected.push(Incoming::Ping(Bytes::from_static(b"mid")));
                        send(Message::Ping(Bytes::from_static(b"mid")), &mut wire);
                    }
                }
                let text = ByteString::from(String::from_utf8_lossy(&payload).into_owned());
                expected.push(Incoming::Text(text));
            }
        }
    }
    let decoded = decode_stream(&wire, wire.len(), false);
    assert_eq!(
        decoded,
        Decoded {
            frames: expected,
            error: None
        }
    );
}

fn token_keys() -> &'static TokenKeys {
    static KEYS: OnceLock<TokenKeys> = OnceLock::new();
    KEYS.get_or_init(|| TokenKeys::new(JWT_SECRET))
}

/// Maps bytes onto the id alphabet, so that any input names a valid id.
fn id_from(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
    let id: String = bytes
        .iter()
        .take(64)
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    if id.is_empty() {
        "u".to_string()
    } else {
        id
    }
}

/// Token verification (`confab_gateway::auth::TokenKeys::verify`).
///
/// The first byte picks the mode. Odd: the rest, as text, is verified; an accepted token's
/// claims are unexpired (within the leeway). Even: a token is minted for ids taken from the
/// input, must verify to its claims, and then one byte of it is changed (position and value
/// from the input): a changed token must never verify.
pub fn jwt_verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = token_keys();
    if mode & 1 == 1 {
        let token = String::from_utf8_lossy(rest);
        if let Ok(claims) = keys.verify(&token) {
            let now_s = confab_shared::now_ms() / 1000;
            assert!(
                claims.exp + limits::JWT_LEEWAY_S >= now_s,
                "an expired token verified"
            );
        }
        return;
    }
    let (ids, mutation) = rest.split_at(rest.len().min(16));
    let (user, workspace) = ids.split_at(ids.len() / 2);
    let user = UserId::new(&id_from(user)).unwrap_or_else(|e| panic!("{e}"));
    let workspace = WorkspaceId::new(&id_from(workspace)).unwrap_or_else(|e| panic!("{e}"));
    let bot = mode & 2 == 2;
    let token = keys
        .mint(&workspace, &user, bot, 3600)
        .unwrap_or_else(|e| panic!("mint: {e}"));
    let claims = keys
        .verify(&token)
        .unwrap_or_else(|e| panic!("a minted token refused: {e}"));
    assert_eq!((&claims.sub, &claims.wsp), (&user, &workspace));
    assert_eq!(claims.bot, bot.then_some(true));
    let [position, value, ..] = mutation else {
        return;
    };
    let mut forged = token.clone().into_bytes();
    let at = usize::from(*position) * forged.len() / 256;
    forged[at] = *value;
    let forged = String::from_utf8_lossy(&forged);
    if forged != token {
        assert!(
            keys.verify(&forged).is_err(),
            "a changed token verified: {forged}"
        );
    }
}
