//! The gateway↔cell link over a WebSocket: the transport of `confab gateway` and `confab cell`.
//!
//! The gateway opens one WebSocket per cell, to `<advertise>/v1/link`, sends a [`LinkHello`]
//! (with the cluster secret when the deployment sets one) and gets a [`LinkWelcome`]. Then
//! both sides send binary frames, each a batch of postcard-encoded link messages: a writer
//! drains everything queued so far into one frame, so a burst of deliveries costs one frame
//! and one syscall, not one per message. Pings keep the link honest: silence for
//! [`LINK_DEADLINE`] counts as a lost link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use async_trait::async_trait;
use confab_cells::Cell;
use confab_directory::CellRecord;
use confab_gateway::{CellConnection, CellConnector, LinkError, LinkSink};
use confab_shared::link::{self, LinkHello, LinkWelcome, ToCell, ToGateway};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Messages queued per link direction before the link counts as overloaded.
pub const LINK_QUEUE: usize = 64 * 1024;
/// Largest batch frame a writer builds (it stops adding messages past this).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Largest frame a link accepts.
const MAX_LINK_FRAME: usize = 16 * 1024 * 1024;
/// Ping interval on an idle link.
const LINK_PING: Duration = Duration::from_secs(3);
/// A link silent for this long is lost.
pub const LINK_DEADLINE: Duration = Duration::from_secs(10);
/// Time allowed to open a link and exchange hello/welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Drains what is queued (at least one message) into one batch.
async fn next_batch<T: serde::Serialize>(queue: &mut mpsc::Receiver<T>) -> Option<Vec<u8>> {
    let first = queue.recv().await?;
    let mut batch = Vec::with_capacity(1024);
    link::encode_into(&first, &mut batch);
    while batch.len() < MAX_BATCH_BYTES {
        match queue.try_recv() {
            Ok(message) => link::encode_into(&message, &mut batch),
            Err(_) => break,
        }
    }
    Some(batch)
}

// ---------------------------------------------------------------------------------------
// Gateway side

/// Opens WebSocket links to cells.
pub struct WsConnector {
    pub gateway: String,
    pub secret: Option<String>,
}

struct QueueSink(mpsc::Sender<ToCell>);

impl LinkSink for QueueSink {
    fn send(&self, message: ToCell) -> Result<(), LinkError> {
        self.0
            .try_send(message)
            .map_err(|e| LinkError(format!("link queue: {e}")))
    }
}

fn link_url(base: &str) -> String {
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

#[async_trait]
impl CellConnector for WsConnector {
    async fn connect(&self, cell: &CellRecord) -> Result<CellConnection, LinkError> {
        let url = link_url(&cell.url);
        let open = async {
            let (mut socket, _) =
                tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
                    .await
                    .map_err(|e| LinkError(format!("connecting to {url}: {e}")))?;
            let hello = LinkHello {
                gateway: self.gateway.clone(),
                secret: self.secret.clone(),
            };
            socket
                .send(Message::Binary(link::encode(&hello).into()))
                .await
                .map_err(|e| LinkError(format!("sending hello: {e}")))?;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Binary(bytes))) => {
                        let welcome: LinkWelcome = link::decode(&bytes)
                            .map_err(|e| LinkError(format!("bad welcome: {e}")))?;
                        if welcome.cell != cell.id {
                            return Err(LinkError(format!(
                                "{url} is cell {}, not {}",
                                welcome.cell, cell.id
                            )));
                        }
                        return Ok(socket);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(LinkError(format!("cell refused the link: {frame:?}")))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(LinkError(format!("during hello: {e}"))),
                    None => return Err(LinkError("cell closed during hello".into())),
                }
            }
        };
        let socket = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| LinkError(format!("opening {url} timed out")))??;
        let (to_cell, outbound) = mpsc::channel(LINK_QUEUE);
        let (inbound_tx, inbound) = mpsc::channel(LINK_QUEUE);
        let lost = CancellationToken::new();
        tokio::spawn(pump_gateway_link(
            socket,
            outbound,
            inbound_tx,
            lost.clone(),
        ));
        Ok(CellConnection {
            sink: Box::new(QueueSink(to_cell)),
            inbound,
            lost,
        })
    }
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Moves messages between the link socket and the gateway's queues until either side ends.
async fn pump_gateway_link(
    socket: ClientSocket,
    mut outbound: mpsc::Receiver<ToCell>,
    inbound: mpsc::Sender<ToGateway>,
    lost: CancellationToken,
) {
    let (mut write, mut read) = socket.split();
    let writer_lost = lost.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(LINK_PING);
        loop {
            let frame = tokio::select! {
                () = writer_lost.cancelled() => break,
                batch = next_batch(&mut outbound) => match batch {
                    Some(batch) => Message::Binary(batch.into()),
                    None => break,
                },
                _ = ping.tick() => Message::Ping(Vec::new().into()),
            };
            if write.send(frame).await.is_err() {
                break;
            }
        }
        let _ = write.close().await;
        writer_lost.cancel();
    });
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let frame = tokio::select! {
            () = lost.cancelled() => break,
            _ = check.tick() => {
                if last_heard.elapsed() > LINK_DEADLINE {
                    tracing::warn!("cell link silent too long");
                    break;
                }
                continue;
            }
            frame = read.next() => frame,
        };
        last_heard = Instant::now();
        match frame {
            Some(Ok(Message::Binary(bytes))) => {
                let Ok(messages) = link::decode_batch::<ToGateway>(&bytes) else {
                    tracing::error!("undecodable frame on a cell link");
                    break;
                };
                for message in messages {
                    if inbound.send(message).await.is_err() {
                        break;
                    }
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    lost.cancel();
    let _ = writer.await;
}

// ---------------------------------------------------------------------------------------
// Cell side

/// What the cell's `/v1/link` endpoint needs.
pub struct LinkEndpoint {
    pub cell: Cell,
    pub cell_id: confab_shared::CellId,
    pub secret: Option<String>,
}

/// `GET /v1/link`: a gateway's link.
pub async fn link_route(
    req: HttpRequest,
    body: web::Payload,
    endpoint: web::Data<LinkEndpoint>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream
        .max_frame_size(MAX_LINK_FRAME)
        .aggregate_continuations()
        .max_continuation_size(MAX_LINK_FRAME);
    actix_rt::spawn(serve_link(endpoint.into_inner(), session, stream));
    Ok(response)
}

async fn serve_link(
    endpoint: Arc<LinkEndpoint>,
    mut session: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
) {
    let hello = match tokio::time::timeout(CONNECT_TIMEOUT, read_hello(&mut stream)).await {
        Ok(Some(hello)) => hello,
        _ => {
            let _ = session.close(None).await;
            return;
        }
    };
    if !secret_ok(endpoint.secret.as_deref(), hello.secret.as_deref()) {
        tracing::warn!(gateway = %hello.gateway, "link refused: wrong cluster secret");
        let reason = actix_ws::CloseReason {
            code: actix_ws::CloseCode::Policy,
            description: Some("wrong cluster secret".into()),
        };
        let _ = session.close(Some(reason)).await;
        return;
    }
    let welcome = LinkWelcome {
        cell: endpoint.cell_id.clone(),
    };
    if session.binary(link::encode(&welcome)).await.is_err() {
        return;
    }
    tracing::info!(gateway = %hello.gateway, "gateway linked");
    let (outbound_tx, outbound) = mpsc::channel(LINK_QUEUE);
    let handle = endpoint.cell.connect(hello.gateway.clone(), outbound_tx);
    let lost = handle.lost_token();
    let writer = actix_rt::spawn(write_cell_link(session.clone(), outbound, lost.clone()));
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let message = tokio::select! {
            () = lost.cancelled() => break,
            _ = check.tick() => {
                if last_heard.elapsed() > LINK_DEADLINE { break; }
                continue;
            }
            message = stream.recv() => message,
        };
        last_heard = Instant::now();
        match message {
            Some(Ok(actix_ws::AggregatedMessage::Binary(bytes))) => {
                let Ok(messages) = link::decode_batch::<ToCell>(&bytes) else {
                    tracing::error!(gateway = %hello.gateway, "undecodable frame on a link");
                    break;
                };
                for message in messages {
                    handle.send(message);
                }
            }
            Some(Ok(actix_ws::AggregatedMessage::Ping(payload))) => {
                let _ = session.pong(&payload).await;
            }
            Some(Ok(actix_ws::AggregatedMessage::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    lost.cancel();
    drop(handle);
    let _ = writer.await;
    tracing::info!(gateway = %hello.gateway, "gateway link closed");
}

async fn read_hello(stream: &mut actix_ws::AggregatedMessageStream) -> Option<LinkHello> {
    loop {
        match stream.recv().await? {
            Ok(actix_ws::AggregatedMessage::Binary(bytes)) => return link::decode(&bytes).ok(),
            Ok(actix_ws::AggregatedMessage::Ping(_) | actix_ws::AggregatedMessage::Pong(_)) => {}
            _ => return None,
        }
    }
}

fn secret_ok(expected: Option<&str>, given: Option<&str>) -> bool {
    match expected {
        None => true,
        Some(expected) => given.is_some_and(|g| confab_gateway::auth::secrets_match(g, expected)),
    }
}

async fn write_cell_link(
    mut session: actix_ws::Session,
    mut outbound: mpsc::Receiver<ToGateway>,
    lost: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            () = lost.cancelled() => break,
            batch = next_batch(&mut outbound) => batch,
        };
        let Some(batch) = batch else { break };
        if session.binary(batch).await.is_err() {
            break;
        }
    }
    lost.cancel();
    let _ = session.close(None).await;
}
