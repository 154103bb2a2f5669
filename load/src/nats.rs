//! NATS's WebSocket server as a fanout target beside the reference server: the server that
//! packs many messages into one WebSocket frame, which issue 13 measures `?batch=1` against.
//!
//! The load generator speaks NATS's client protocol (`CONNECT`, `SUB`, `PUB`, `MSG`,
//! `PING`/`PONG`, text lines ending in CRLF) over binary WebSocket frames. The payload of each
//! message is the same `message`-shaped JSON frame the reference server broadcasts, so a
//! subscriber parses and measures exactly what it parses against the reference server and
//! confab. Each publisher `j` publishes on `confabload.<run>.p<j>`; subscribers take the
//! whole run (`confabload.<run>.>`), and a publisher takes its own subject, so that the echo
//! of its last message says every earlier one was read by the server (as with the reference
//! server).
//!
//! The server sends protocol messages without regard to frame boundaries: a `MSG` may start
//! in one WebSocket frame and end in the next, so [`Parser`] keeps what is left of a frame.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Ws;

/// Longest protocol line (`MSG <subject> <sid> [reply] <bytes>`, `INFO {...}`, `-ERR ...`).
const MAX_LINE: usize = 64 * 1024;
/// Largest payload accepted: NATS's own default `max_payload`.
const MAX_PAYLOAD: usize = 1024 * 1024;

/// The subject publisher `j` of run `run_id` publishes on (also its stream name).
pub fn subject(run_id: &str, j: usize) -> String {
    format!("confabload.{run_id}.p{j}")
}

/// The subject every subscriber of run `run_id` takes: all its publishers.
pub fn every_subject(run_id: &str) -> String {
    format!("confabload.{run_id}.>")
}

/// The frame that publishes `payload` on `subject`.
pub fn publish(subject: &str, payload: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(subject.len() + payload.len() + 24);
    frame.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    frame.extend_from_slice(payload.as_bytes());
    frame.extend_from_slice(b"\r\n");
    frame
}

/// The answer to the server's `PING`.
pub const PONG: &[u8] = b"PONG\r\n";

/// Waits for the server's `INFO`, connects, subscribes to `subject` and waits for the `PONG`
/// that says the subscription is in place (NATS answers a `PING` after everything before it).
pub async fn greet(ws: &mut Ws, subject: &str, timeout: std::time::Duration) -> Result<()> {
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":true,\"protocol\":1,\"name\":\"confab-load\"}}\r\nSUB {subject} 1\r\nPING\r\n"
    );
    ws.send(Message::binary(hello.into_bytes()))
        .await
        .context("sending CONNECT")?;
    let mut parser = Parser::default();
    tokio::time::timeout(timeout, async {
        loop {
            let data = match ws.next().await {
                Some(Ok(Message::Binary(data))) => data,
                Some(Ok(Message::Close(close))) => bail!("closed by NATS: {close:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(anyhow!(e).context("reading NATS's answer")),
                None => bail!("NATS ended the connection during CONNECT"),
            };
            let mut ponged = false;
            parser.feed(&data, |op| {
                if op == Op::Pong {
                    ponged = true;
                }
            })?;
            if ponged {
                return Ok(());
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no PONG from NATS within {timeout:?}"))?
}

/// A protocol message from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// A message's payload.
    Msg(&'a [u8]),
    /// The server's keep-alive: answer [`PONG`].
    Ping,
    Pong,
    /// `INFO` and `+OK`.
    Other,
}

/// Why the server's bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("NATS sent an error: {0}")]
    Server(String),
    #[error("unreadable NATS protocol line: {0:?}")]
    Line(String),
    #[error("a NATS protocol line or payload past the bound ({0} bytes)")]
    TooLong(usize),
}

/// Reads the server's protocol messages out of the WebSocket frames they arrive in.
#[derive(Debug, Default)]
pub struct Parser {
    /// The start of a protocol message whose end is in a later frame.
    rest: Vec<u8>,
}

impl Parser {
    /// Calls `each` for every whole protocol message that `data` completes or holds, in order.
    pub fn feed(&mut self, data: &[u8], mut each: impl FnMut(Op<'_>)) -> Result<(), ParseError> {
        if self.rest.is_empty() {
            // The common case: the frame holds whole messages; nothing is copied but a tail.
            let used = parse(data, &mut each)?;
            self.rest.extend_from_slice(&data[used..]);
            return Ok(());
        }
        self.rest.extend_from_slice(data);
        let rest = std::mem::take(&mut self.rest);
        let used = parse(&rest, &mut each)?;
        self.rest = rest;
        self.rest.drain(..used);
        Ok(())
    }
}

/// Parses whole protocol messages from the start of `buf`; returns the bytes they took.
fn parse(buf: &[u8], each: &mut impl FnMut(Op<'_>)) -> Result<usize, ParseError> {
    let mut at = 0;
    loop {
        let tail = &buf[at..];
        let Some(end) = tail.windows(2).position(|w| w == b"\r\n") else {
            if tail.len() > MAX_LINE {
                return Err(ParseError::TooLong(tail.len()));
            }
            return Ok(at);
        };
        let line = &tail[..end];
        let after_line = end + 2;
        if let Some(args) = line.strip_prefix(b"MSG ") {
            let len = payload_len(args)?;
            let whole = after_line + len + 2;
            if tail.len() < whole {
                return Ok(at);
            }
            each(Op::Msg(&tail[after_line..after_line + len]));
            at += whole;
            continue;
        }
        match line {
            b"PING" => each(Op::Ping),
            b"PONG" => each(Op::Pong),
            _ if line.starts_with(b"INFO ") || line == b"+OK" => each(Op::Other),
            _ if line.starts_with(b"-ERR") => {
                return Err(ParseError::Server(
                    String::from_utf8_lossy(line).into_owned(),
                ))
            }
            _ => return Err(ParseError::Line(String::from_utf8_lossy(line).into_owned())),
        }
        at += after_line;
    }
}

/// The payload length of `MSG <subject> <sid> [reply-to] <bytes>`: its last argument.
fn payload_len(args: &[u8]) -> Result<usize, ParseError> {
    let unreadable = || ParseError::Line(format!("MSG {}", String::from_utf8_lossy(args)));
    let last = args
        .rsplit(|b| *b == b' ')
        .next()
        .filter(|_| args.iter().filter(|b| **b == b' ').count() >= 2)
        .ok_or_else(unreadable)?;
    let len: usize = std::str::from_utf8(last)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(unreadable)?;
    if len > MAX_PAYLOAD {
        return Err(ParseError::TooLong(len));
    }
    Ok(len)
}

/// The configuration of a `nats-server` with its WebSocket listener on `ws_port` (loopback,
/// no TLS, no compression: the same plain frames confab and the reference server send) and
/// its client port wherever the kernel puts it.
pub fn server_config(ws_port: u16) -> String {
    format!(
        "listen: \"127.0.0.1:-1\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n  compression: false\n}}\n"
    )
}

/// Writes [`server_config`] for `ws_port` into `dir` and returns its path.
pub fn write_server_config(dir: &Path, ws_port: u16) -> Result<std::path::PathBuf> {
    let path = dir.join(format!(
        "confab-load-nats-{}-{ws_port}.conf",
        std::process::id()
    ));
    std::fs::write(&path, server_config(ws_port))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(parser: &mut Parser, data: &[u8]) -> Vec<String> {
        let mut seen = Vec::new();
        parser
            .feed(data, |op| {
                seen.push(match op {
                    Op::Msg(p) => format!("msg {}", String::from_utf8_lossy(p)),
                    other => format!("{other:?}"),
                })
            })
            .unwrap_or_else(|e| panic!("{e}"));
        seen
    }

    #[test]
    fn messages_split_across_frames_are_read_whole_and_in_order() {
        let wire = b"INFO {\"proto\":1}\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nMSG a.c 1 r.x 2\r\nhi\r\nPONG\r\n";
        for split in 0..wire.len() {
            let mut parser = Parser::default();
            let mut seen = ops(&mut parser, &wire[..split]);
            seen.extend(ops(&mut parser, &wire[split..]));
            assert_eq!(
                seen,
                ["Other", "msg hello", "Ping", "msg hi", "Pong"],
                "split at {split}"
            );
            assert!(parser.rest.is_empty());
        }
    }

    #[test]
    fn a_payload_may_hold_crlf_and_is_taken_by_its_length() {
        let mut parser = Parser::default();
        assert_eq!(
            ops(&mut parser, b"MSG s 1 6\r\na\r\nb\r\n\r\n"),
            ["msg a\r\nb\r\n"]
        );
    }

    #[test]
    fn errors_and_oversized_or_unreadable_lines_fail_the_connection() {
        let mut parser = Parser::default();
        let err = parser.feed(b"-ERR 'Slow Consumer'\r\n", |_| {});
        assert!(matches!(err, Err(ParseError::Server(e)) if e.contains("Slow Consumer")));
        let err = Parser::default().feed(b"MSG s 1 99999999\r\n", |_| {});
        assert!(matches!(err, Err(ParseError::TooLong(_))));
        let err = Parser::default().feed(b"MSG s x\r\n", |_| {});
        assert!(matches!(err, Err(ParseError::Line(_))));
        let err = Parser::default().feed(&vec![b'x'; MAX_LINE + 1], |_| {});
        assert!(matches!(err, Err(ParseError::TooLong(_))));
    }

    #[test]
    fn a_publish_frame_names_its_payload_length() {
        assert_eq!(publish("a.b", "{}"), b"PUB a.b 2\r\n{}\r\n");
    }
}
