//! A real HTTP receiver for webhook tests: a small HTTP/1.1 server on a free loopback port
//! that records every request (headers, raw body, arrival time) and answers as the test says
//! (a status, or never), with keep-alive so the cell's connection reuse is exercised.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How the receiver answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// This status at once.
    Status(u16),
    /// Nothing, ever: the connection stays open and silent.
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub headers: HashMap<String, String>,
    pub raw: Vec<u8>,
    pub body: Value,
    pub at: Instant,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    pub fn delivery_id(&self) -> &str {
        self.header("confab-delivery")
    }
    pub fn attempt(&self) -> u32 {
        self.header("confab-attempt").parse().unwrap_or(0)
    }
}

struct Shared {
    hits: Mutex<Vec<Hit>>,
    /// Answers to give first, in order; then `default`.
    script: Mutex<VecDeque<Answer>>,
    default: Mutex<Answer>,
    arrived: Notify,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// A receiver answering 200 to everything, on a free port.
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        Self::serve(listener)
    }

    /// A receiver on `port` (one that was down until now).
    pub async fn start_on(port: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver on its old port");
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Receiver {
        let port = listener.local_addr().expect("receiver address").port();
        let shared = Arc::new(Shared {
            hits: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Answer::Status(200)),
            arrived: Notify::new(),
        });
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(connection(stream, serving.clone()));
            }
        });
        Receiver { port, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Answers `answers` to the next requests, in order, then the default again.
    pub fn script(&self, answers: &[Answer]) {
        self.shared
            .script
            .lock()
            .expect("script lock")
            .extend(answers.iter().cloned());
    }

    /// The answer to every request beyond the script.
    pub fn answer(&self, answer: Answer) {
        *self.shared.default.lock().expect("default lock") = answer;
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().expect("hits lock").clone()
    }

    /// Waits (bounded by `wait`) until `done` holds for the hits, and returns them.
    pub async fn wait_until(&self, wait: Duration, done: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.shared.arrived.notified();
            let hits = self.hits();
            if done(&hits) {
                return hits;
            }
            if Instant::now() >= deadline {
                panic!(
                    "receiver on port {} did not get what the test waited for within {wait:?}; it got {} requests: {:?}",
                    self.port,
                    hits.len(),
                    hits.iter().map(|h| (h.delivery_id().to_string(), h.attempt())).collect::<Vec<_>>()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// Waits for at least `n` requests.
    pub async fn wait_for(&self, n: usize, wait: Duration) -> Vec<Hit> {
        self.wait_until(wait, |hits| hits.len() >= n).await
    }
}

async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(head_end) = read_until_head(&mut stream, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut headers = HashMap::new();
        for line in head.split("\r\n").skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        while buf.len() < body_start + length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let raw = buf[body_start..body_start + length].to_vec();
        buf.drain(..body_start + length);
        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        let answer = {
            let scripted = shared.script.lock().expect("script lock").pop_front();
            scripted.unwrap_or_else(|| shared.default.lock().expect("default lock").clone())
        };
        shared.hits.lock().expect("hits lock").push(Hit {
            headers,
            raw,
            body,
            at: Instant::now(),
        });
        shared.arrived.notify_waiters();
        match answer {
            Answer::Hang => {
                // Hold the connection open and silent until the client gives up on it.
                let mut sink = [0u8; 1024];
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        return;
                    }
                }
                return;
            }
            Answer::Status(status) => {
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads until the end of a request head; its offset, or `None` when the peer closed.
async fn read_until_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Verifies `Confab-Signature: t=<t>,v1=<hex>` over the raw body with `secret`, as a receiver
/// would: recompute the HMAC and compare in constant time.
pub fn signature_is_valid(secret: &str, header: &str, raw: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value),
            Some(("v1", value)) => v1 = Some(value),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(expected) = decode_hex(v1) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(raw);
    mac.verify_slice(&expected).is_ok()
}

fn decode_hex(s: &str) -> Result<Vec<u8>, ()> {
    if !s.len().is_multiple_of(2) {
        return Err(());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| ()))
        .collect()
}
