//! What both ends of a link over a WebSocket agree on, as pure functions: the handshake's
//! proofs (HMAC-SHA256 over [`link::transcript`]), the bounds on a peer that has not
//! authenticated yet, the link's timing, and how queued messages become the frames of one
//! write. The gateway's connector (`confab_gateway::link_ws`) and the cell's endpoint
//! (`confab_cells::link_ws`) are the two I/O halves built on it.
//!
//! The handshake (the gateway opens the WebSocket to `<advertise>/v1/link`):
//!
//! 1. gateway → cell [`LinkHello`](link::LinkHello): its name and a random nonce;
//! 2. cell → gateway [`LinkChallenge`](link::LinkChallenge): its id, its own nonce and, with
//!    a cluster secret, an HMAC-SHA256 keyed with the secret over both names and both nonces;
//!    a gateway with a secret refuses a cell whose proof is missing or wrong;
//! 3. gateway → cell [`LinkAuth`](link::LinkAuth): the gateway's HMAC over the same transcript
//!    (another role label, so a proof cannot be reflected); a cell with a secret refuses a
//!    wrong one;
//! 4. cell → gateway [`LinkWelcome`](link::LinkWelcome): the link is open.
//!
//! The secret never crosses the wire, and fresh nonces on both sides keep a recorded handshake
//! from being replayed. A cell without a secret accepts links from loopback peers only.
//! Until the handshake is done a peer is a stranger: it may send at most [`PREAUTH_BYTES`]
//! bytes, must finish within [`HANDSHAKE_DEADLINE`], and at most [`MAX_PENDING_LINKS`]
//! strangers are served at once; what it says about itself is logged truncated.
//!
//! Then both sides send binary frames built by [`FrameWriter`]: a writer drains everything
//! queued so far into one batch frame ([`fill_batch`]), so a burst of deliveries costs one
//! frame and one syscall, and a message larger than a frame travels as fragments the other
//! side joins. Pings keep the link honest: silence for [`LINK_DEADLINE`] counts as a lost link.

use std::net::IpAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::codes::ErrorCode;
use crate::link::{CellError, FrameWriter, LinkProof, MessageTooLarge, ToGateway};

/// Messages queued per link direction before the link counts as overloaded.
pub const LINK_QUEUE: usize = 64 * 1024;
/// Ping interval on an idle link.
pub const LINK_PING: Duration = Duration::from_secs(3);
/// A link silent for this long is lost.
pub const LINK_DEADLINE: Duration = Duration::from_secs(10);
/// Time allowed to open a link and finish its handshake, on both sides.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);
/// Bytes a peer may send before it is authenticated (hello, auth and a few pings fit).
pub const PREAUTH_BYTES: usize = 8 * 1024;
/// Links in their handshake a cell serves at once; more are answered `503` at the upgrade.
pub const MAX_PENDING_LINKS: usize = 64;
/// Smallest link frame bound honoured: every handshake message fits in it.
pub const MIN_LINK_FRAME: usize = 4096;
/// Longest gateway name a cell accepts.
const MAX_GATEWAY_NAME: usize = 64;
/// Characters of a peer-supplied string that reach a log line.
pub const LOGGED_CHARS: usize = 64;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, transcript: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("hmac accepts keys of any length"));
    mac.update(transcript);
    mac
}

/// This side's proof that it holds `secret`.
pub fn prove(secret: &str, transcript: &[u8]) -> LinkProof {
    mac(secret, transcript).finalize().into_bytes().into()
}

/// Whether `proof` shows the other side holds `secret` (compared in constant time).
pub fn verify(secret: &str, transcript: &[u8], proof: &LinkProof) -> bool {
    mac(secret, transcript).verify_slice(proof).is_ok()
}

/// A peer-supplied string as it may appear in a log line: at most [`LOGGED_CHARS`]
/// characters, control characters replaced, so a stranger can neither flood nor forge logs.
pub fn for_log(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(LOGGED_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().nth(LOGGED_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Whether a link from `peer` may be served by a cell without a cluster secret.
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// Whether a gateway's self-chosen name is acceptable: short, printable, no spaces.
pub fn valid_gateway_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_GATEWAY_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The link endpoint of a cell advertised at `base` (`http://host:port` becomes
/// `ws://host:port/v1/link`, `https` becomes `wss`).
pub fn link_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{base}/v1/link")
}

/// What a cell says when a reply cannot cross the link at all (over [`link::MAX_LINK_MESSAGE`]):
/// the waiting request gets an error at once instead of waiting out its timeout.
pub fn refusal_of_reply(message: &ToGateway) -> Option<ToGateway> {
    match message {
        ToGateway::Reply { req, .. } => Some(ToGateway::Reply {
            req: *req,
            result: Err(CellError::new(
                ErrorCode::TooLarge,
                "the reply is too large to send",
            )),
        }),
        ToGateway::Ready { session, .. } => Some(ToGateway::AttachFailed {
            session: session.clone(),
            error: CellError::unavailable("the session's channels are too large to send"),
        }),
        _ => None,
    }
}

/// Adds `first` and then whatever `next` yields to `writer` with `add`, until the writer's
/// batch is full or nothing more is queued, and takes the frames of one write.
pub fn fill_batch<T>(
    writer: &mut FrameWriter,
    first: T,
    mut next: impl FnMut() -> Option<T>,
    mut add: impl FnMut(&mut FrameWriter, &T) -> Result<(), MessageTooLarge>,
    refusal: fn(&T) -> Option<T>,
) -> Vec<Vec<u8>> {
    add_or_refuse(writer, &first, &mut add, refusal);
    while !writer.is_full() {
        match next() {
            Some(message) => add_or_refuse(writer, &message, &mut add, refusal),
            None => break,
        }
    }
    writer.take()
}

/// Adds `message`; one the link cannot carry is logged and replaced by what `refusal` makes
/// of it, if anything.
fn add_or_refuse<T>(
    writer: &mut FrameWriter,
    message: &T,
    add: &mut impl FnMut(&mut FrameWriter, &T) -> Result<(), MessageTooLarge>,
    refusal: fn(&T) -> Option<T>,
) {
    if let Err(e) = add(writer, message) {
        tracing::error!(error = %e, "link message dropped");
        if let Some(substitute) = refusal(message) {
            let _ = add(writer, &substitute);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{Framing, Reassembler, RequestKey};

    #[test]
    fn only_loopback_peers_count_as_loopback() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(
                is_loopback(ip.parse().unwrap_or_else(|e| panic!("{e}"))),
                "{ip}"
            );
        }
        for ip in [
            "10.0.0.5",
            "192.168.1.1",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.1",
            "fe80::1",
        ] {
            assert!(
                !is_loopback(ip.parse().unwrap_or_else(|e| panic!("{e}"))),
                "{ip}"
            );
        }
    }

    #[test]
    fn peer_strings_are_logged_bounded_and_without_control_characters() {
        let long = "a".repeat(10_000);
        let logged = for_log(&long);
        assert_eq!(logged.chars().count(), LOGGED_CHARS + 1);
        assert_eq!(for_log("gw\n[fake] line"), "gw?[fake] line");
        assert_eq!(for_log("gw-1"), "gw-1");
    }

    #[test]
    fn gateway_names_are_short_and_plain() {
        assert!(valid_gateway_name("gw-0123456789ab"));
        assert!(!valid_gateway_name(""));
        assert!(!valid_gateway_name(&"g".repeat(65)));
        assert!(!valid_gateway_name("gw 1"));
    }

    #[test]
    fn a_proof_made_with_another_secret_or_transcript_does_not_verify() {
        let proof = prove("s3cret", b"transcript");
        assert!(verify("s3cret", b"transcript", &proof));
        assert!(!verify("other", b"transcript", &proof));
        assert!(!verify("s3cret", b"transcripu", &proof));
    }

    #[test]
    fn link_urls_use_the_websocket_scheme_of_the_advertised_url() {
        assert_eq!(
            link_url("http://10.0.0.5:7000"),
            "ws://10.0.0.5:7000/v1/link"
        );
        assert_eq!(
            link_url("https://cell.example/"),
            "wss://cell.example/v1/link"
        );
        assert_eq!(link_url("ws://c:1"), "ws://c:1/v1/link");
    }

    #[test]
    fn a_batch_takes_everything_queued_and_arrives_whole_in_order() {
        let mut writer = FrameWriter::new(Framing::for_max_frame(64 * 1024));
        let mut queued = (2..=5).map(|req: RequestKey| ToGateway::Reply {
            req,
            result: Err(CellError::unavailable("x")),
        });
        let first = ToGateway::Reply {
            req: 1,
            result: Err(CellError::unavailable("x")),
        };
        let frames = fill_batch(
            &mut writer,
            first,
            || queued.next(),
            |w, m| w.push(m),
            refusal_of_reply,
        );
        let mut reassembler = Reassembler::default();
        let mut reqs = Vec::new();
        for frame in frames {
            for message in reassembler
                .push::<ToGateway>(&frame)
                .unwrap_or_else(|e| panic!("{e}"))
            {
                if let ToGateway::Reply { req, .. } = message {
                    reqs.push(req);
                }
            }
        }
        assert_eq!(reqs, vec![1, 2, 3, 4, 5]);
    }
}
