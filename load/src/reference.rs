//! The reference fanout server: the limit confab is measured against.
//!
//! It does the least a fanout server can do: accept WebSockets on any path, and broadcast the
//! bytes of every text frame it receives, unchanged, to every connected client, the sender
//! included. No auth, no parsing, no storage, no seq. What confab delivers per second next to
//! what this delivers on the same machine, with the same client, is the ratio the benchmarks
//! report.
//!
//! It is built the way a fast server is: each frame is received once and shared by reference
//! (`Utf8Bytes` is reference-counted), every connection drains what is queued for it before one
//! socket flush, per-connection buffers are small, and a client that falls more than `queue`
//! frames behind is disconnected (close 4008), like confab's slow-consumer rule.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Frames a connection may fall behind before it is disconnected; confab's default queue.
pub const DEFAULT_QUEUE: usize = confab_shared::limits::QUEUE_EVENTS;
/// Frames drained from the queue into the socket's buffer before one flush.
const WRITE_BATCH: usize = 256;

/// The reference server's settings.
#[derive(Debug, Clone, Copy)]
pub struct ReferenceConfig {
    /// How far (in frames) a client may fall behind before it is disconnected.
    pub queue: usize,
}

impl Default for ReferenceConfig {
    fn default() -> Self {
        ReferenceConfig {
            queue: DEFAULT_QUEUE,
        }
    }
}

/// WebSocket buffers sized for many connections: a small eager read buffer (the default is
/// 128 KiB per connection) and frames bounded like confab's (64 KiB).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(32 * 1024)
        .max_message_size(Some(confab_shared::limits::MAX_FRAME_BYTES))
        .max_frame_size(Some(confab_shared::limits::MAX_FRAME_BYTES))
}

/// Serves until `shutdown` is cancelled. Connections are closed when the server stops.
pub async fn serve(
    listener: TcpListener,
    config: ReferenceConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (tx, _) = broadcast::channel::<Utf8Bytes>(config.queue.max(1));
    info!(addr = ?listener.local_addr().ok(), queue = config.queue, "reference server started");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Subscribe before the handshake: once the client sees its handshake answer, every
        // frame broadcast afterwards reaches it.
        let rx = tx.subscribe();
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, peer, tx, rx, shutdown).await {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    info!("reference server stopped");
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tx: broadcast::Sender<Utf8Bytes>,
    mut rx: broadcast::Receiver<Utf8Bytes>,
    shutdown: CancellationToken,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = ws.close(Some(close(CloseCode::Away, "server shutting down"))).await;
                return Ok(());
            }
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // No receivers is not an error: the frame simply reaches nobody.
                    let _ = tx.send(text);
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                // Pings are answered by tungstenite itself; binary frames are ignored.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
            },
            queued = rx.recv() => match queued {
                Ok(frame) => {
                    ws.feed(Message::Text(frame)).await?;
                    // Drain what else is already queued into the same socket write.
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(frame) => ws.feed(Message::Text(frame)).await?,
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                return slow_consumer(&mut ws, peer, n).await;
                            }
                            Err(_) => break,
                        }
                    }
                    ws.flush().await?;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return slow_consumer(&mut ws, peer, n).await;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

async fn slow_consumer(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    peer: SocketAddr,
    missed: u64,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    warn!(%peer, missed, "slow consumer disconnected");
    let _ = ws
        .close(Some(close(CloseCode::Library(4008), "slow consumer")))
        .await;
    Ok(())
}

fn close(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// A reference server running inside this process, for tests and quick runs.
#[derive(Debug)]
pub struct InProcess {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(config: ReferenceConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, config, shutdown.clone()));
        Ok(InProcess {
            addr,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn broadcasts_each_frame_to_every_client_sender_included() {
        let server = InProcess::start(ReferenceConfig::default()).await.unwrap();
        let url = format!("ws://{}/v1/ws", server.addr);
        let (mut a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let (mut b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        a.send(Message::text("one")).await.unwrap();
        b.send(Message::text("two")).await.unwrap();
        for ws in [&mut a, &mut b] {
            let mut got = Vec::new();
            while got.len() < 2 {
                match ws.next().await.unwrap().unwrap() {
                    Message::Text(t) => got.push(t.to_string()),
                    _ => continue,
                }
            }
            got.sort();
            assert_eq!(got, ["one", "two"]);
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_disconnected_with_4008() {
        let server = InProcess::start(ReferenceConfig { queue: 8 })
            .await
            .unwrap();
        let url = format!("ws://{}/v1/ws", server.addr);
        let (mut slow, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let (mut fast, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        // Enough big frames to fill the socket buffers of the client that does not read, so
        // its connection task falls behind the broadcast queue.
        let big = "x".repeat(60_000);
        for _ in 0..400 {
            fast.send(Message::text(big.clone())).await.unwrap();
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(std::time::Duration::from_millis(1), fast.next()).await
            {
            }
        }
        let mut code = None;
        while let Ok(Some(frame)) =
            tokio::time::timeout(std::time::Duration::from_secs(5), slow.next()).await
        {
            match frame {
                Ok(Message::Close(Some(f))) => {
                    code = Some(u16::from(f.code));
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        assert_eq!(code, Some(4008));
        server.stop().await;
    }
}
