//! The gateway↔cell link against hostile peers and hostile networks (issue 10, items 1–4):
//! authentication in both directions, the loopback rule without a secret, the limits a
//! stranger meets before it authenticates, replies larger than a frame, and link opening that
//! answers `unavailable` within a bound whatever the network does. Real `confab` processes,
//! real Redis, real sockets; impostors and black holes are real listeners made here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{wait_http_ok, Client, Cluster, ADMIN_TOKEN, CLUSTER_SECRET, JWT_SECRET, WAIT};
use confab_directory::{CellRegistration, Directory, RedisDirectory, WorkspaceRecord};
use confab_shared::link::{
    self, CellReply, FrameWriter, Framing, LinkAuth, LinkChallenge, LinkHello, LinkRole,
    LinkWelcome, Reassembler, ToCell, ToGateway,
};
use confab_shared::recipient_lists::Incoming;
use confab_shared::{CellId, WorkspaceId};
use confab_testkit::{free_port, RedisServer};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_confab")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `confab <args>` on a free port (`{port}` in `args` is replaced), retrying when
/// another test took the port first; returns the process and its port.
fn spawn_on_free_port(args: &[&str], stderr: Stdio) -> (Proc, u16) {
    let mut stderr = Some(stderr);
    loop {
        let port = free_port();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let mut child = Command::new(binary())
            .args(&args)
            .env("CONFAB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr.take().unwrap_or_else(Stdio::inherit))
            .spawn()
            .expect("start confab");
        std::thread::sleep(Duration::from_millis(300));
        if matches!(child.try_wait(), Ok(Some(_))) {
            continue;
        }
        return (Proc(child), port);
    }
}

/// A cell with its own store; `extra` are more flags (e.g. `--cluster-secret`).
struct TestCell {
    port: u16,
    proc: Proc,
    _store: RedisServer,
}

fn start_cell(directory: &RedisServer, listen_ip: &str, extra: &[&str], stderr: Stdio) -> TestCell {
    let store = RedisServer::start();
    let listen = format!("{listen_ip}:{{port}}");
    let (store_url, directory_url) = (store.url(), directory.url());
    let mut args = vec![
        "cell",
        "--id",
        "c1",
        "--region",
        "r1",
        "--listen",
        &listen,
        "--advertise",
        "http://127.0.0.1:{port}",
        "--redis",
        &store_url,
        "--directory",
        &directory_url,
    ];
    args.extend_from_slice(extra);
    let (proc, port) = spawn_on_free_port(&args, stderr);
    TestCell {
        port,
        proc,
        _store: store,
    }
}

fn start_gateway(directory: &RedisServer, extra: &[&str]) -> (Proc, String) {
    let directory_url = directory.url();
    let mut args = vec![
        "gateway",
        "--listen",
        "127.0.0.1:{port}",
        "--redis",
        &directory_url,
        "--jwt-secret",
        JWT_SECRET,
        "--admin-token",
        ADMIN_TOKEN,
        "--client-rate",
        "1000",
    ];
    args.extend_from_slice(extra);
    let (proc, port) = spawn_on_free_port(&args, Stdio::inherit());
    (proc, format!("http://127.0.0.1:{port}"))
}

/// An HTTP call with a bearer token: (status, body).
async fn call(
    base: &str,
    bearer: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut request = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(bearer);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("http request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create_workspace(gateway: &str, id: &str) {
    let (status, body) = call(
        gateway,
        ADMIN_TOKEN,
        Method::POST,
        "/admin/v1/workspaces",
        Some(json!({"id": id, "region": "r1"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

async fn token(gateway: &str, workspace: &str, user: &str) -> String {
    let (status, body) = call(
        gateway,
        ADMIN_TOKEN,
        Method::POST,
        "/admin/v1/tokens",
        Some(json!({"workspace": workspace, "user": user})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

/// Puts a cell that is not a confab cell in the directory, at `url`, with one workspace.
async fn register_foreign_cell(directory_url: &str, cell: &str, url: &str, workspace: &str) {
    let engine = RedisDirectory::start(directory_url).unwrap();
    let id = CellId::new(cell).unwrap();
    engine
        .claim_cell(
            CellRegistration {
                id: id.clone(),
                region: format!("{cell}-region"),
                url: url.to_string(),
            },
            "a foreign process",
            0,
            confab_shared::now_ms(),
        )
        .await
        .unwrap();
    engine
        .create_workspace(WorkspaceRecord {
            id: WorkspaceId::new(workspace).unwrap(),
            cell: id,
            region: format!("{cell}-region"),
            name: None,
        })
        .await
        .unwrap();
}

/// Opens a raw WebSocket to a cell's `/v1/link`.
async fn raw_link(addr: &str) -> Socket {
    let url = format!("ws://{addr}/v1/link");
    let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .expect("upgrade timed out")
        .expect("upgrade");
    socket
}

/// The next binary frame, or `Err(close code)` when the socket closes first.
async fn next_binary(socket: &mut Socket, within: Duration) -> Result<Vec<u8>, Option<u16>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("nothing from the cell within {within:?}"),
            Ok(Some(Ok(Message::Binary(bytes)))) => return Ok(bytes.to_vec()),
            Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(None) | Ok(Some(Err(_))) => return Err(None),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn proof(secret: &str, transcript: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(transcript);
    mac.finalize().into_bytes().into()
}

/// Runs the gateway's side of the handshake with `secret` (`None`: no proof, `Some(wrong)`:
/// a wrong one); the cell's last handshake frame, or the close code it answered with.
async fn handshake_as_gateway(
    socket: &mut Socket,
    secret: Option<&str>,
) -> Result<LinkWelcome, Option<u16>> {
    handshake_speaking(socket, secret, link::LINK_PROTOCOL).await
}

/// [`handshake_as_gateway`], saying it speaks link protocol `protocol`.
async fn handshake_speaking(
    socket: &mut Socket,
    secret: Option<&str>,
    protocol: u32,
) -> Result<LinkWelcome, Option<u16>> {
    let gateway_nonce = [7u8; 32];
    let hello = LinkHello {
        gateway: "gw-test".into(),
        nonce: gateway_nonce,
        protocol,
    };
    socket
        .send(Message::Binary(link::encode(&hello).into()))
        .await
        .unwrap();
    let challenge: LinkChallenge = link::decode(&next_binary(socket, WAIT).await?).unwrap();
    let proof = secret.map(|secret| {
        let transcript = link::transcript(
            LinkRole::Gateway,
            "gw-test",
            &challenge.cell,
            &gateway_nonce,
            &challenge.nonce,
        );
        proof(secret, &transcript)
    });
    socket
        .send(Message::Binary(link::encode(&LinkAuth { proof }).into()))
        .await
        .unwrap();
    Ok(link::decode(&next_binary(socket, WAIT).await?).unwrap())
}

/// One framed `ToCell` request on a link, as a linked gateway would send it.
fn request_frame(workspace: &str) -> Vec<u8> {
    let mut writer = FrameWriter::new(Framing::for_max_frame(1 << 20));
    writer
        .push(&ToCell::Request {
            req: 1,
            caller: link::Caller {
                workspace: WorkspaceId::new(workspace).unwrap(),
                user: confab_shared::UserId::new("mallory").unwrap(),
                session: None,
            },
            op: link::CellOp::User(link::UserOp::ListChannels { public: true }),
        })
        .unwrap();
    writer.take().remove(0)
}

fn cell_addr(cluster: &cluster::Running) -> String {
    format!("127.0.0.1:{}", cluster.cells[0].port)
}

// ---------------------------------------------------------------------------------------
// Item 1: authentication

#[tokio::test]
async fn a_cell_refuses_a_gateway_that_cannot_prove_the_cluster_secret() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    cluster.create_workspace("acme", "us-east").await;
    let addr = cell_addr(&cluster);

    for secret in [Some("not-the-secret"), None] {
        let mut socket = raw_link(&addr).await;
        let outcome = handshake_as_gateway(&mut socket, secret).await;
        assert_eq!(
            outcome.err(),
            Some(Some(1008)),
            "proof made with {secret:?}"
        );
        // Whatever it sends now, it gets no reply: the link is closed.
        let _ = socket
            .send(Message::Binary(request_frame("acme").into()))
            .await;
        assert!(next_binary(&mut socket, WAIT).await.is_err());
    }

    // The same handshake with the right secret opens the link and serves requests.
    let mut socket = raw_link(&addr).await;
    let welcome = handshake_as_gateway(&mut socket, Some(CLUSTER_SECRET))
        .await
        .expect("welcome");
    assert_eq!(welcome.cell.as_str(), "c1");
    socket
        .send(Message::Binary(request_frame("acme").into()))
        .await
        .unwrap();
    let frame = next_binary(&mut socket, WAIT).await.expect("a reply");
    let replies: Vec<Incoming> = Reassembler::default().push(&frame).unwrap();
    assert!(
        matches!(
            &replies[..],
            [Incoming::Message(ToGateway::Reply {
                req: 1,
                result: Ok(CellReply::Channels(_))
            })]
        ),
        "{replies:?}"
    );
}

#[tokio::test]
async fn a_cell_refuses_a_gateway_that_speaks_another_link_protocol() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    let addr = cell_addr(&cluster);
    let mut socket = raw_link(&addr).await;
    let outcome =
        handshake_speaking(&mut socket, Some(CLUSTER_SECRET), link::LINK_PROTOCOL - 1).await;
    assert_eq!(outcome.err(), Some(Some(1008)));
    // The same gateway speaking this build's protocol is welcome.
    let mut socket = raw_link(&addr).await;
    handshake_as_gateway(&mut socket, Some(CLUSTER_SECRET))
        .await
        .expect("welcome");
}

/// A WebSocket server that plays a cell without knowing the secret: it answers the hello
/// with `proof` and, if a gateway ever sent its own proof or a request, says so.
async fn impostor_cell(cell: &'static str, proof: Option<[u8; 32]>) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let fooled = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&fooled);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let flag = Arc::clone(&flag);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let Some(Ok(Message::Binary(_hello))) = ws.next().await else {
                    return;
                };
                let challenge = LinkChallenge {
                    cell: CellId::new(cell).unwrap(),
                    nonce: [1u8; 32],
                    proof,
                    protocol: link::LINK_PROTOCOL,
                };
                let _ = ws
                    .send(Message::Binary(link::encode(&challenge).into()))
                    .await;
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Binary(_) = message {
                        // A proof from the gateway, or anything after it.
                        flag.store(true, Ordering::SeqCst);
                        let welcome = LinkWelcome {
                            cell: CellId::new(cell).unwrap(),
                        };
                        let _ = ws
                            .send(Message::Binary(link::encode(&welcome).into()))
                            .await;
                    }
                }
            });
        }
    });
    (url, fooled)
}

#[tokio::test]
async fn a_gateway_refuses_a_cell_that_cannot_prove_the_cluster_secret() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    let gateway = cluster.gateway(0).url();
    for (cell, workspace, proof) in [("c8", "lured", Some([9u8; 32])), ("c9", "baited", None)] {
        let (url, fooled) = impostor_cell(cell, proof).await;
        register_foreign_cell(&cluster.directory.url(), cell, &url, workspace).await;
        let user = token(&gateway, workspace, "alice").await;
        for _ in 0..3 {
            let (status, body) = call(&gateway, &user, Method::GET, "/v1/channels", None).await;
            assert_eq!(status, 503, "{cell}: {body}");
            assert_eq!(body["error"]["code"], "unavailable", "{body}");
        }
        assert!(
            !fooled.load(Ordering::SeqCst),
            "the gateway answered impostor {cell}'s handshake"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Item 1: no secret, loopback only

/// This machine's IPv4 addresses other than loopback (`ip -4 -o addr`).
fn non_loopback_ipv4() -> Option<String> {
    let output = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next())
        .find(|ip| !ip.starts_with("127."))
        .map(str::to_string)
}

#[tokio::test]
async fn without_a_secret_a_cell_warns_and_links_with_loopback_peers_only() {
    let directory = RedisServer::start();
    let mut cell = start_cell(&directory, "0.0.0.0", &[], Stdio::piped());
    // The warning: read the cell's stderr (piped above) in a thread.
    let mut warning = None;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stderr) = cell.proc.0.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        while warning.is_none() && Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if line.contains("loopback addresses only") {
                    warning = Some(line);
                }
            }
        }
    }
    let warning = warning.expect("a warning about the missing cluster secret");
    assert!(warning.contains("WARN"), "{warning}");

    // A gateway on loopback links and is served.
    wait_http_ok(&format!("http://127.0.0.1:{}/readyz", cell.port)).await;
    let (_gateway, gateway) = start_gateway(&directory, &[]);
    wait_http_ok(&format!("{gateway}/readyz")).await;
    create_workspace(&gateway, "acme").await;
    let user = token(&gateway, "acme", "alice").await;
    let (status, body) = call(
        &gateway,
        &user,
        Method::POST,
        "/v1/channels",
        Some(json!({"name": "general", "kind": "public", "members": []})),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // From a non-loopback address of this machine, the upgrade itself is refused.
    match non_loopback_ipv4() {
        Some(ip) => {
            let url = format!("ws://{ip}:{}/v1/link", cell.port);
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 403)
                }
                other => panic!("a link from {ip} was not refused: {:?}", other.map(|_| ())),
            }
        }
        None => eprintln!("no non-loopback IPv4 address here: only the loopback half ran"),
    }
}

// ---------------------------------------------------------------------------------------
// Item 2: limits before authentication

#[tokio::test]
async fn an_oversized_hello_is_refused_without_the_cell_reading_it() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    let mut socket = raw_link(&cell_addr(&cluster)).await;
    // A masked binary frame announcing 16 MiB, then 9 KiB of it: the cell must refuse once
    // the stranger is past its few KiB, not wait for (or buffer) the rest.
    let mut bytes = vec![0x82, 0x80 | 127];
    bytes.extend_from_slice(&(16u64 * 1024 * 1024).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    bytes.extend_from_slice(&[0u8; 9 * 1024]);
    let _ = socket.get_mut().write_all(&bytes).await;
    let _ = socket.get_mut().flush().await;
    assert_eq!(next_binary(&mut socket, WAIT).await, Err(Some(1009)));
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_closed_within_the_deadline() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    let mut socket = raw_link(&cell_addr(&cluster)).await;
    let started = Instant::now();
    assert_eq!(next_binary(&mut socket, WAIT).await, Err(Some(1008)));
    // The handshake deadline is 3 s; anything near WAIT would mean there is none.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn links_beyond_the_cap_in_their_handshake_are_refused_while_a_linked_gateway_serves() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    cluster.create_workspace("acme", "us-east").await;
    let gateway = cluster.gateway(0).url();
    let user = token(&gateway, "acme", "alice").await;
    // The gateway's link is open before the flood.
    let (status, body) = call(&gateway, &user, Method::GET, "/v1/channels", None).await;
    assert_eq!(status, 200, "{body}");

    let addr = cell_addr(&cluster);
    let squatters = futures_util::future::join_all((0..64).map(|_| raw_link(&addr))).await;
    let url = format!("ws://{addr}/v1/link");
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503)
        }
        other => panic!("link 65 was not refused: {:?}", other.map(|_| ())),
    }
    let (status, body) = call(&gateway, &user, Method::GET, "/v1/channels", None).await;
    assert_eq!(status, 200, "the linked gateway stopped serving: {body}");

    // Once the strangers are gone, a gateway links again.
    drop(squatters);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut socket = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((socket, _)) => socket,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("no link once the strangers left: {e}"),
        };
        handshake_as_gateway(&mut socket, Some(CLUSTER_SECRET))
            .await
            .expect("welcome");
        break;
    }
}

// ---------------------------------------------------------------------------------------
// Item 3 (link half): a reply larger than a frame

#[tokio::test]
async fn a_reply_larger_than_a_link_frame_arrives_whole_and_the_link_stays_up() {
    let directory = RedisServer::start();
    let small_frames = [
        "--cluster-secret",
        CLUSTER_SECRET,
        "--link-max-frame-bytes",
        "65536",
    ];
    let cell = start_cell(&directory, "127.0.0.1", &small_frames, Stdio::inherit());
    wait_http_ok(&format!("http://127.0.0.1:{}/readyz", cell.port)).await;
    let (_gateway, gateway) = start_gateway(&directory, &small_frames);
    wait_http_ok(&format!("{gateway}/readyz")).await;
    create_workspace(&gateway, "acme").await;
    let user = token(&gateway, "acme", "alice").await;
    let (status, body) = call(
        &gateway,
        &user,
        Method::POST,
        "/v1/channels",
        Some(json!({"name": "big", "kind": "public", "members": []})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let channel = body["id"].as_str().unwrap().to_string();
    let text = "x".repeat(8 * 1024);
    for _ in 0..40 {
        let (status, body) = call(
            &gateway,
            &user,
            Method::POST,
            &format!("/v1/channels/{channel}/messages"),
            Some(json!({"text": text})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let ws_url = gateway.replace("http://", "ws://") + "/v1/ws";
    let mut client = Client::connect(&ws_url, &user, None).await;

    // About 330 KiB of history: five times the largest frame either side accepts.
    let (status, body) = call(
        &gateway,
        &user,
        Method::GET,
        &format!("/v1/channels/{channel}/messages?limit=40"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 40);
    assert!(messages.iter().all(|m| m["text"] == text.as_str()));

    // The link survived: the session on it is still served.
    let ack = client
        .request(json!({"op": "send", "channel": channel, "text": "still here"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
}

// ---------------------------------------------------------------------------------------
// Item 4: opening a link has a deadline

#[tokio::test]
async fn requests_to_a_cell_behind_a_black_hole_answer_unavailable_within_a_bound() {
    let cluster = Cluster::new().cell("c1", "us-east").start().await;
    let gateway = cluster.gateway(0).url();
    // A listener that accepts connections and never says a word.
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    register_foreign_cell(&cluster.directory.url(), "void", &url, "dark").await;
    let user = token(&gateway, "dark", "alice").await;

    let started = Instant::now();
    let requests = (0..10).map(|_| async {
        let (status, body) = call(&gateway, &user, Method::GET, "/v1/channels", None).await;
        (status, body, started.elapsed())
    });
    for (status, body, elapsed) in futures_util::future::join_all(requests).await {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        // Each waits for the one shared attempt (3 s), never for the attempts of the others.
        assert!(
            elapsed < Duration::from_secs(8),
            "answered after {elapsed:?}"
        );
    }

    // A session's hello answers too: an `unavailable` error, then 4010 to retry.
    let ws_url = cluster.gateway(0).ws_url();
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .unwrap();
    let started = Instant::now();
    ws.send(Message::text(
        json!({"op": "hello", "token": user}).to_string(),
    ))
    .await
    .unwrap();
    let mut saw_unavailable = false;
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an answer to hello")
        {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                saw_unavailable |= frame["code"] == "unavailable";
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(saw_unavailable);
    assert_eq!(code, Some(4010));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}
