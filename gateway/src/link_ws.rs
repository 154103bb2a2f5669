//! The gateway's end of a link over a WebSocket (tokio-tungstenite): [`WsConnector`] opens
//! `<advertise>/v1/link`, runs the gateway's side of the handshake (the cell proves itself
//! first) and pumps frames both ways. The handshake, the bounds and the framing both ends
//! share are in [`confab_shared::link_transport`]; the cell's end is `confab_cells::link_ws`.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_directory::CellRecord;
use confab_shared::link::{
    self, FrameWriter, Framing, LinkAuth, LinkChallenge, LinkHello, LinkRole, LinkWelcome,
    Reassembler, ToCell, ToGateway,
};
use confab_shared::link_transport::{
    fill_batch, link_url, prove, verify, HANDSHAKE_DEADLINE, LINK_DEADLINE, LINK_PING, LINK_QUEUE,
};
use confab_shared::recipient_lists::{Incoming, ListDecoder};
use confab_shared::CellId;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::links::{CellConnection, CellConnector, LinkError, LinkSink};

/// Drains what is queued (at least one message) into the frames of one write.
async fn next_frames(
    queue: &mut mpsc::Receiver<ToCell>,
    writer: &mut FrameWriter,
) -> Option<Vec<Vec<u8>>> {
    let first = queue.recv().await?;
    Some(fill_batch(
        writer,
        first,
        || queue.try_recv().ok(),
        |w, m| w.push(m),
        |_| None,
    ))
}

/// Opens WebSocket links to cells.
pub struct WsConnector {
    pub gateway: String,
    pub secret: Option<String>,
    /// Largest frame the link sends or accepts.
    pub max_frame: usize,
}

struct QueueSink(mpsc::Sender<ToCell>);

impl LinkSink for QueueSink {
    fn send(&self, message: ToCell) -> Result<(), LinkError> {
        self.0
            .try_send(message)
            .map_err(|e| LinkError(format!("link queue: {e}")))
    }
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next handshake message from the cell.
async fn read_from_cell<T: serde::de::DeserializeOwned>(
    socket: &mut ClientSocket,
) -> Result<T, LinkError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                return link::decode(&bytes)
                    .map_err(|e| LinkError(format!("bad handshake from the cell: {e}")))
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(LinkError(format!("cell refused the link: {frame:?}")))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(LinkError(format!("during the handshake: {e}"))),
            None => return Err(LinkError("cell closed during the handshake".into())),
        }
    }
}

impl WsConnector {
    /// Opens the WebSocket and runs the handshake (module docs): the cell proves itself first.
    async fn open(&self, url: &str, cell: &CellId) -> Result<ClientSocket, LinkError> {
        let config = WebSocketConfig::default()
            .max_frame_size(Some(self.max_frame))
            .max_message_size(Some(self.max_frame));
        let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .map_err(|e| LinkError(format!("connecting to {url}: {e}")))?;
        let gateway_nonce: link::LinkNonce = rand::random();
        let hello = LinkHello {
            gateway: self.gateway.clone(),
            nonce: gateway_nonce,
            protocol: link::LINK_PROTOCOL,
        };
        socket
            .send(Message::Binary(link::encode(&hello).into()))
            .await
            .map_err(|e| LinkError(format!("sending hello: {e}")))?;
        let challenge: LinkChallenge = read_from_cell(&mut socket).await?;
        if challenge.protocol != link::LINK_PROTOCOL {
            let _ = socket.close(None).await;
            return Err(LinkError(format!(
                "{url} speaks link protocol {}, this gateway {}: run one build on both sides",
                challenge.protocol,
                link::LINK_PROTOCOL
            )));
        }
        if &challenge.cell != cell {
            return Err(LinkError(format!(
                "{url} is cell {}, not {cell}",
                challenge.cell
            )));
        }
        let transcript =
            |role| link::transcript(role, &self.gateway, cell, &gateway_nonce, &challenge.nonce);
        let proof = match (&self.secret, &challenge.proof) {
            (None, _) => None,
            (Some(secret), Some(proof)) if verify(secret, &transcript(LinkRole::Cell), proof) => {
                Some(prove(secret, &transcript(LinkRole::Gateway)))
            }
            (Some(_), Some(_)) => {
                let _ = socket.close(None).await;
                return Err(LinkError(format!(
                    "{url} failed to prove it holds the cluster secret; refused"
                )));
            }
            (Some(_), None) => {
                let _ = socket.close(None).await;
                return Err(LinkError(format!("{url} has no cluster secret; refused")));
            }
        };
        socket
            .send(Message::Binary(link::encode(&LinkAuth { proof }).into()))
            .await
            .map_err(|e| LinkError(format!("sending the proof: {e}")))?;
        let welcome: LinkWelcome = read_from_cell(&mut socket).await?;
        if &welcome.cell != cell {
            return Err(LinkError(format!(
                "{url} is cell {}, not {cell}",
                welcome.cell
            )));
        }
        Ok(socket)
    }
}

#[async_trait]
impl CellConnector for WsConnector {
    async fn connect(&self, cell: &CellRecord) -> Result<CellConnection, LinkError> {
        let url = link_url(&cell.url);
        let socket = tokio::time::timeout(HANDSHAKE_DEADLINE, self.open(&url, &cell.id))
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
            Framing::for_max_frame(self.max_frame),
        ));
        Ok(CellConnection {
            sink: Box::new(QueueSink(to_cell)),
            inbound,
            lost,
        })
    }
}

/// Moves messages between the link socket and the gateway's queues until either side ends.
async fn pump_gateway_link(
    socket: ClientSocket,
    mut outbound: mpsc::Receiver<ToCell>,
    inbound: mpsc::Sender<ToGateway>,
    lost: CancellationToken,
    framing: Framing,
) {
    let (mut write, mut read) = socket.split();
    let writer_lost = lost.clone();
    let writer = tokio::spawn(async move {
        let mut frames = FrameWriter::new(framing);
        let mut ping = tokio::time::interval(LINK_PING);
        'pump: loop {
            let batch = tokio::select! {
                () = writer_lost.cancelled() => break,
                batch = next_frames(&mut outbound, &mut frames) => match batch {
                    Some(batch) => batch,
                    None => break,
                },
                _ = ping.tick() => vec![],
            };
            if batch.is_empty() {
                if write.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
                continue;
            }
            for frame in batch {
                if write.feed(Message::Binary(frame.into())).await.is_err() {
                    break 'pump;
                }
            }
            if write.flush().await.is_err() {
                break;
            }
        }
        let _ = write.close().await;
        writer_lost.cancel();
    });
    let mut reassembler = Reassembler::default();
    let mut lists = ListDecoder::default();
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(Duration::from_secs(1));
    'read: loop {
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
                let messages = match reassembler.push::<Incoming>(&bytes) {
                    Ok(messages) => messages,
                    Err(e) => {
                        tracing::error!(error = %e, "bad frame on a cell link");
                        break;
                    }
                };
                for incoming in messages {
                    let message = match lists.resolve(incoming) {
                        Ok(Some(message)) => message,
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "bad message on a cell link");
                            break 'read;
                        }
                    };
                    if inbound.send(message).await.is_err() {
                        break 'read;
                    }
                }
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "cell link failed");
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    lost.cancel();
    let _ = writer.await;
}
