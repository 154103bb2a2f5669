//! Test harness: a real `Cell` with a `MemoryStore`, driven through `connect()` like a gateway.
//! Tests that should hold on every store engine take an [`Engine`] and are instantiated for
//! each by [`on_every_engine!`] (the Redis one runs a fresh real `redis-server`, the Redis
//! Cluster one a fresh cluster of three masters).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use confab_cells::{Cell, CellConfig, CellStore, LinkHandle, MemoryStore, RedisStore};
use confab_shared::link::{
    AdminOp, Attach, Caller, CellError, CellOp, CellReply, ChannelOp, ToCell, ToGateway,
};
use confab_shared::server::{ChannelInfo, ChannelKind};
use confab_shared::{CellId, ChannelId, SessionId, UserId, WorkspaceId};
use confab_testkit::{RedisCluster, RedisServer};
use serde_json::Value;
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(5);

pub fn ws(s: &str) -> WorkspaceId {
    WorkspaceId::new(s).unwrap()
}
pub fn ch(s: &str) -> ChannelId {
    ChannelId::new(s).unwrap()
}
pub fn user(s: &str) -> UserId {
    UserId::new(s).unwrap()
}
pub fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

/// Starts a cell over `store` with workspace `w` holding public `general` {alice, bob}.
pub async fn start_with(store: Arc<dyn CellStore>, retention: u64) -> (Cell, Gw) {
    start_configured(
        store,
        CellConfig {
            retention_events: retention,
            ..CellConfig::new(CellId::new("c1").unwrap())
        },
    )
    .await
}

/// Starts a cell of `config` over `store` with workspace `w` holding public `general`
/// {alice, bob}.
pub async fn start_configured(store: Arc<dyn CellStore>, config: CellConfig) -> (Cell, Gw) {
    let cell = Cell::start(config, store);
    let mut gw = Gw::connect(&cell, "g1", 10_000);
    gw.admin(AdminOp::CreateWorkspace {
        workspace: ws("w"),
        name: None,
    })
    .await
    .unwrap();
    gw.seed("general", ChannelKind::Public, &["alice", "bob"])
        .await;
    (cell, gw)
}

pub async fn start() -> (Cell, Gw) {
    start_with(Arc::new(MemoryStore::new()), 10_000).await
}

/// A store engine a cell test can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Memory,
    Redis,
    RedisCluster,
}

/// A fresh store and, for Redis, the server behind it: keep it alive for the whole test (the
/// server is killed when it drops).
pub struct TestStore {
    pub store: Arc<dyn CellStore>,
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
}

impl Engine {
    pub fn store(self) -> TestStore {
        match self {
            Engine::Memory => TestStore {
                store: Arc::new(MemoryStore::new()),
                redis: None,
                cluster: None,
            },
            Engine::Redis => {
                let server = RedisServer::start();
                let store = RedisStore::connect(&server.url()).unwrap();
                TestStore {
                    store: Arc::new(store),
                    redis: Some(server),
                    cluster: None,
                }
            }
            Engine::RedisCluster => {
                let cluster = RedisCluster::start(3);
                let store = RedisStore::connect(&cluster.url()).unwrap();
                TestStore {
                    store: Arc::new(store),
                    redis: None,
                    cluster: Some(cluster),
                }
            }
        }
    }
}

/// [`start_with`] on a fresh store of `engine`.
pub async fn start_on(engine: Engine, retention: u64) -> (Cell, Gw, TestStore) {
    let store = engine.store();
    let (cell, gw) = start_with(store.store.clone(), retention).await;
    (cell, gw, store)
}

/// Turns each `async fn name(engine: Engine)` named into the tests `name::memory`,
/// `name::redis` and `name::redis_cluster`, so one body checks the cell on every store engine.
#[allow(unused_macros)] // not every test file runs tests on both engines
macro_rules! on_every_engine {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[actix_rt::test]
                async fn memory() {
                    super::$name(crate::common::Engine::Memory).await;
                }

                #[actix_rt::test]
                async fn redis() {
                    super::$name(crate::common::Engine::Redis).await;
                }

                #[actix_rt::test]
                async fn redis_cluster() {
                    super::$name(crate::common::Engine::RedisCluster).await;
                }
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use on_every_engine;

/// One fake gateway: its link and everything the cell sent it, sorted by kind.
pub struct Gw {
    pub link: LinkHandle,
    rx: mpsc::Receiver<ToGateway>,
    /// Every `Deliver`, in arrival order: recipients and the parsed frame.
    pub delivers: Vec<(Vec<String>, Value)>,
    inbox: HashMap<String, VecDeque<Value>>,
    replies: HashMap<u64, Result<CellReply, CellError>>,
    attaches: HashMap<String, Result<Vec<ChannelInfo>, CellError>>,
    /// Order of arrival of `Ready` relative to deliveries, per session: index into `delivers`.
    pub ready_at: HashMap<String, usize>,
    /// Every `Close`, in arrival order, with how many replies had arrived before it.
    pub closes: Vec<(String, confab_shared::CloseCode, usize)>,
    /// Replies received so far (answered requests).
    pub replies_seen: usize,
    next_req: u64,
}

impl Gw {
    pub fn connect(cell: &Cell, name: &str, capacity: usize) -> Gw {
        let (tx, rx) = mpsc::channel(capacity);
        Gw {
            link: cell.connect(name.to_string(), tx),
            rx,
            delivers: Vec::new(),
            inbox: HashMap::new(),
            replies: HashMap::new(),
            attaches: HashMap::new(),
            ready_at: HashMap::new(),
            closes: Vec::new(),
            replies_seen: 0,
            next_req: 1,
        }
    }

    fn file(&mut self, message: ToGateway) {
        match message {
            ToGateway::Deliver { sessions, frame } => {
                let value: Value = serde_json::from_str(&frame.text).unwrap();
                let names: Vec<String> = sessions.iter().map(|s| s.to_string()).collect();
                for name in &names {
                    self.inbox
                        .entry(name.clone())
                        .or_default()
                        .push_back(value.clone());
                }
                self.delivers.push((names, value));
            }
            ToGateway::Reply { req, result } => {
                self.replies_seen += 1;
                self.replies.insert(req, result);
            }
            ToGateway::Ready { session, channels } => {
                self.ready_at
                    .insert(session.to_string(), self.delivers.len());
                self.attaches.insert(session.to_string(), Ok(channels));
            }
            ToGateway::AttachFailed { session, error } => {
                self.attaches.insert(session.to_string(), Err(error));
            }
            ToGateway::Close { session, code } => {
                self.closes
                    .push((session.to_string(), code, self.replies_seen));
            }
            // Only a moving workspace is answered so; these tests move none.
            ToGateway::Moved { req } => {
                self.replies
                    .insert(req, Err(CellError::unavailable("moved")));
            }
            ToGateway::AttachMoved { session } => {
                self.attaches
                    .insert(session.to_string(), Err(CellError::unavailable("moved")));
            }
        }
    }

    /// Receives one message within `wait`; `false` on timeout or closed link.
    pub async fn pump(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some(message)) => {
                self.file(message);
                true
            }
            _ => false,
        }
    }

    /// Takes everything already sent or arriving within a short quiet period.
    pub async fn settle(&mut self) {
        while self.pump(Duration::from_millis(150)).await {}
    }

    pub fn send(&self, message: ToCell) {
        self.link.send(message);
    }

    pub fn send_request(
        &mut self,
        workspace: &str,
        who: &str,
        session: Option<&str>,
        op: CellOp,
    ) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        self.link.send(ToCell::Request {
            req,
            caller: Caller {
                workspace: ws(workspace),
                user: user(who),
                session: session.map(sid),
            },
            op,
        });
        req
    }

    pub async fn reply(&mut self, req: u64) -> Result<CellReply, CellError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(result) = self.replies.remove(&req) {
                return result;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(self.pump(left).await, "no reply to request {req}");
        }
    }

    /// A request by `who` of workspace `w` from session `session`.
    pub async fn op(
        &mut self,
        who: &str,
        session: Option<&str>,
        op: CellOp,
    ) -> Result<CellReply, CellError> {
        self.op_in("w", who, session, op).await
    }

    pub async fn op_in(
        &mut self,
        workspace: &str,
        who: &str,
        session: Option<&str>,
        op: CellOp,
    ) -> Result<CellReply, CellError> {
        let req = self.send_request(workspace, who, session, op);
        self.reply(req).await
    }

    pub async fn admin(&mut self, op: AdminOp) -> Result<CellReply, CellError> {
        let req = self.next_req;
        self.next_req += 1;
        self.link.send(ToCell::Admin { req, op });
        self.reply(req).await
    }

    pub async fn seed(&mut self, channel: &str, kind: ChannelKind, members: &[&str]) {
        let reply = self
            .admin(AdminOp::SeedChannel {
                workspace: ws("w"),
                channel: ch(channel),
                kind,
                members: members.iter().map(|m| user(m)).collect(),
            })
            .await;
        assert_eq!(reply, Ok(CellReply::Done));
    }

    pub fn send_attach(
        &self,
        workspace: &str,
        who: &str,
        session: &str,
        resume: &[(&str, u64)],
        replay_limit: u32,
    ) {
        self.link.send(ToCell::Attach(Attach {
            session: sid(session),
            workspace: ws(workspace),
            user: user(who),
            resume: resume.iter().map(|(c, s)| (ch(c), *s)).collect(),
            replay_limit,
        }));
    }

    pub async fn attach_result(&mut self, session: &str) -> Result<Vec<ChannelInfo>, CellError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(result) = self.attaches.remove(session) {
                return result;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(self.pump(left).await, "no attach outcome for {session}");
        }
    }

    /// Attaches `session` of `who` in `w` without resume and returns its channels.
    pub async fn attach(&mut self, who: &str, session: &str) -> Vec<ChannelInfo> {
        self.send_attach("w", who, session, &[], 4096);
        self.attach_result(session).await.unwrap()
    }

    /// The next event delivered to `session`.
    pub async fn event(&mut self, session: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = self.inbox.get_mut(session).and_then(VecDeque::pop_front) {
                return v;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(self.pump(left).await, "no event for {session}");
        }
    }

    /// Events delivered to `session` so far (after settling), removed from its inbox.
    pub async fn drain(&mut self, session: &str) -> Vec<Value> {
        self.settle().await;
        self.inbox
            .get_mut(session)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

pub fn send_op(channel: &str, text: &str) -> CellOp {
    CellOp::channel(
        ch(channel),
        ChannelOp::Send {
            text: text.to_string(),
            client_msg_id: None,
            thread: None,
        },
    )
}

pub fn ack_seq(reply: &Result<CellReply, CellError>) -> u64 {
    match reply {
        Ok(CellReply::Ack { seq, .. }) => *seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

pub fn code(reply: &Result<CellReply, CellError>) -> confab_shared::ErrorCode {
    match reply {
        Err(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}
