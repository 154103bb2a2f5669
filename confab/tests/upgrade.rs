//! SPEC §4, the WebSocket upgrade at `/v1/ws`, spoken byte by byte on a raw TCP socket: what
//! a client library hides (pipelined first frames, upgrades to other paths, requests that are
//! not upgrades) must still get a clear answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{DevServer, WAIT};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 exchange: the response head, and whatever bytes came after it so far.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(server: &DevServer) -> Raw {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(server.addr()))
            .await
            .expect("connect timed out")
            .expect("connect");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads until at least `n` bytes are buffered; panics if the connection ends first.
    async fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("read timed out")
                .expect("read");
            assert!(read > 0, "connection ended after {:?}", self.text());
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// The response head (status line and headers), removed from the buffer.
    async fn response_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.buf[..end].to_vec()).expect("utf-8 head");
                self.buf.drain(..end + 4);
                return head;
            }
            let want = self.buf.len() + 1;
            self.fill(want).await;
        }
    }

    /// A response with a `Content-Length` body: its head and the body as JSON.
    async fn json_response(&mut self) -> (String, Value) {
        let head = self.response_head().await;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        self.fill(length).await;
        let body = serde_json::from_slice(&self.buf[..length]).expect("JSON body");
        (head, body)
    }

    /// The next unmasked server frame: its opcode and payload.
    async fn server_frame(&mut self) -> (u8, Vec<u8>) {
        self.fill(2).await;
        let opcode = self.buf[0] & 0x0f;
        let (len, header) = match self.buf[1] & 0x7f {
            126 => {
                self.fill(4).await;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => panic!("a frame over 64 KiB was not expected here"),
            n => (n as usize, 2),
        };
        self.fill(header + len).await;
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        (opcode, payload)
    }
}

fn upgrade_request(path: &str, method: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A masked client text frame (RFC 6455 §5.3: clients mask every frame).
fn masked_text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn status(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

#[tokio::test]
async fn a_hello_sent_in_the_same_write_as_the_upgrade_request_is_answered_with_ready() {
    let server = DevServer::start().await;
    let mut raw = Raw::connect(&server).await;
    let hello = format!(r#"{{"op":"hello","token":"{}"}}"#, server.token("alice"));
    let mut bytes = upgrade_request("/v1/ws", "GET").into_bytes();
    bytes.extend(masked_text_frame(&hello));
    raw.send(&bytes).await;

    let head = raw.response_head().await;
    assert_eq!(status(&head), "101", "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let (opcode, payload) = raw.server_frame().await;
    assert_eq!(opcode, 1, "a text frame");
    let ready: Value = serde_json::from_slice(&payload).expect("JSON");
    assert_eq!(ready["op"], "ready", "{ready}");
    assert_eq!(ready["user"], "alice");
}

/// Sends an upgrade request for `method` `path` and checks the JSON `404` it gets.
async fn assert_upgrade_is_answered_404(method: &str, path: &str) {
    let server = DevServer::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.send(upgrade_request(path, method).as_bytes()).await;
    let (head, body) = raw.json_response().await;
    assert_eq!(status(&head), "404", "{method} {path}: {head}");
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}

#[tokio::test]
async fn an_upgrade_request_for_another_path_is_answered_404_with_a_json_error() {
    assert_upgrade_is_answered_404("GET", "/v1/elsewhere").await;
}

#[tokio::test]
async fn an_upgrade_request_with_another_method_is_answered_404() {
    assert_upgrade_is_answered_404("POST", "/v1/ws").await;
}

#[tokio::test]
async fn an_upgrade_without_a_websocket_key_is_answered_400_naming_the_problem() {
    let server = DevServer::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.send(
        b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let (head, body) = raw.json_response().await;
    assert_eq!(status(&head), "400", "{head}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("websocket handshake failed"), "{body}");
}

#[tokio::test]
async fn a_plain_get_of_the_websocket_path_is_answered_400_and_http_goes_on() {
    let server = DevServer::start().await;
    let mut raw = Raw::connect(&server).await;
    raw.send(b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let (head, body) = raw.json_response().await;
    assert_eq!(status(&head), "400", "{head}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    // The connection is still an ordinary keep-alive HTTP connection.
    raw.buf.clear();
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let (head, body) = raw.json_response().await;
    assert_eq!(status(&head), "200", "{head}");
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn an_upgrade_beyond_max_connections_is_answered_503_until_one_closes() {
    let server = DevServer::builder()
        .arg("--max-connections", "2")
        .start()
        .await;
    let alice = server.client("alice").await;
    let _bob = server.client("bob").await;

    let mut raw = Raw::connect(&server).await;
    raw.send(upgrade_request("/v1/ws", "GET").as_bytes()).await;
    let (head, body) = raw.json_response().await;
    assert_eq!(status(&head), "503", "{head}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );

    // Once alice's socket is gone, there is room again.
    drop(alice);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut raw = Raw::connect(&server).await;
        raw.send(upgrade_request("/v1/ws", "GET").as_bytes()).await;
        let head = raw.response_head().await;
        if status(&head) == "101" {
            break;
        }
        assert_eq!(status(&head), "503", "{head}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn upgrades_beyond_max_pending_hello_per_ip_are_answered_429_until_one_says_hello() {
    let server = DevServer::builder()
        .arg("--max-pending-hello-per-ip", "3")
        .start()
        .await;
    // Sessions past hello do not count: more of them than the cap are fine.
    let mut ready = Vec::new();
    for user in ["alice", "bob", "carol", "dave"] {
        ready.push(server.client(user).await);
    }
    // Three upgraded connections from this address that say nothing.
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut raw = Raw::connect(&server).await;
        raw.send(upgrade_request("/v1/ws", "GET").as_bytes()).await;
        let head = raw.response_head().await;
        assert_eq!(status(&head), "101", "{head}");
        silent.push(raw);
    }
    let mut raw = Raw::connect(&server).await;
    raw.send(upgrade_request("/v1/ws", "GET").as_bytes()).await;
    let (head, body) = raw.json_response().await;
    assert_eq!(status(&head), "429", "{head}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );

    // One of them says hello: it no longer counts, and there is room for another.
    let hello = format!(r#"{{"op":"hello","token":"{}"}}"#, server.token("erin"));
    silent[0].send(&masked_text_frame(&hello)).await;
    let (opcode, payload) = silent[0].server_frame().await;
    assert_eq!(opcode, 1, "a text frame");
    let frame: Value = serde_json::from_slice(&payload).expect("JSON");
    assert_eq!(frame["op"], "ready", "{frame}");
    let mut raw = Raw::connect(&server).await;
    raw.send(upgrade_request("/v1/ws", "GET").as_bytes()).await;
    let head = raw.response_head().await;
    assert_eq!(status(&head), "101", "{head}");

    // A silent connection that goes away frees its place too.
    drop(raw);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut raw = Raw::connect(&server).await;
        raw.send(upgrade_request("/v1/ws", "GET").as_bytes()).await;
        let head = raw.response_head().await;
        if status(&head) == "101" {
            break;
        }
        assert_eq!(status(&head), "429", "{head}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a silent connection closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
