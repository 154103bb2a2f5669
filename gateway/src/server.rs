//! The gateway process: its shared state ([`Gateway`]), the actix-web application, and one
//! shutdown path (stop accepting, close sessions with `1001`, drain under a deadline).

use std::net::{IpAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::body::BoxBody;
use actix_http::HttpService;
use actix_service::{fn_service, map_config, ServiceFactory};
use actix_web::dev::{AppConfig, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpResponse};
use confab_directory::{CellStatus, Directory, PresenceStore};
use confab_shared::{CloseCode, UserId, WorkspaceId};
use dashmap::DashMap;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::api_error::{json_error, path_error, query_error, ApiError};
use crate::auth::TokenKeys;
use crate::config::GatewayConfig;
use crate::links::{CellConnector, Links};
use crate::presence::PresenceHub;
use crate::rate::TokenBucket;
use crate::sessions::SessionRegistry;
use crate::{admin, http_api, web as web_client, ws};

/// HTTP rate buckets idle this long are forgotten, so the map stays bounded by active users.
const HTTP_BUCKET_IDLE: Duration = Duration::from_secs(60);

/// Everything the gateway's handlers share.
pub struct Gateway {
    pub config: GatewayConfig,
    pub tokens: TokenKeys,
    pub directory: Arc<dyn Directory>,
    pub presence: Arc<PresenceHub>,
    pub links: Arc<Links>,
    pub sessions: Arc<SessionRegistry>,
    pub metrics: Option<PrometheusHandle>,
    pub shutdown: CancellationToken,
    /// Client sockets past the upgrade (see [`SocketGuard`]).
    sockets: AtomicUsize,
    /// Per client address, its sockets past the upgrade that have not sent `hello` yet (see
    /// [`PendingHello`]); an address is removed when its count returns to zero.
    pending_hello: DashMap<IpAddr, usize>,
    http_buckets: DashMap<(WorkspaceId, UserId), Mutex<(TokenBucket, Instant)>>,
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        directory: Arc<dyn Directory>,
        presence: Arc<dyn PresenceStore>,
        connector: Arc<dyn CellConnector>,
        metrics: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> Arc<Gateway> {
        let sessions = Arc::new(SessionRegistry::default());
        let links = Links::new(
            Arc::clone(&directory),
            connector,
            Arc::clone(&sessions),
            config.request_timeout,
        );
        let presence = PresenceHub::new(presence, Arc::clone(&sessions), config.gateway_id.clone());
        Arc::new(Gateway {
            tokens: TokenKeys::new(&config.jwt_secret),
            config,
            directory,
            presence,
            links,
            sessions,
            metrics,
            shutdown,
            sockets: AtomicUsize::new(0),
            pending_hello: DashMap::new(),
            http_buckets: DashMap::new(),
        })
    }

    /// Client sockets still open: a session leaves the registry before its close frame is
    /// written, and actix-server does not track sockets past the upgrade.
    pub fn open_sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    /// Counts a client socket as open until the returned guard drops; `None` when
    /// `max_connections` sockets are open already.
    pub fn try_open_socket(self: &Arc<Self>) -> Option<SocketGuard> {
        let max = self.config.limits.max_connections;
        self.sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()?;
        Some(SocketGuard(Arc::clone(self)))
    }

    /// Counts a socket from `ip` as waiting for its `hello` until the returned guard drops;
    /// `None` when `ip` has `max_pending_hello_per_ip` such sockets already. Without this
    /// bound, one address could hold every connection slot for a hello timeout each, over and
    /// over, without ever authenticating.
    pub fn try_pending_hello(self: &Arc<Self>, ip: IpAddr) -> Option<PendingHello> {
        let max = self.config.limits.max_pending_hello_per_ip;
        let mut count = self.pending_hello.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(PendingHello {
            gateway: Arc::clone(self),
            ip,
        })
    }

    /// Takes one token from the HTTP bucket of a user.
    pub fn http_rate(
        &self,
        workspace: &WorkspaceId,
        user: &UserId,
        now: Instant,
    ) -> Result<(), u64> {
        let entry = self
            .http_buckets
            .entry((workspace.clone(), user.clone()))
            .or_insert_with(|| {
                Mutex::new((TokenBucket::per_second(self.config.limits.client_rate), now))
            });
        let mut bucket = entry.lock();
        bucket.1 = now;
        bucket.0.take(now)
    }

    fn prune_http_buckets(&self) {
        let now = Instant::now();
        self.http_buckets
            .retain(|_, b| now.duration_since(b.lock().1) < HTTP_BUCKET_IDLE);
    }

    /// Ready to serve: not shutting down, and the directory answers and knows at least one
    /// healthy cell.
    async fn is_ready(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("shutting down".into());
        }
        let cells = self.directory.cells().await.map_err(|e| e.to_string())?;
        let now = confab_shared::now_ms();
        if cells.iter().any(|c| c.status(now) != CellStatus::Down) {
            Ok(())
        } else {
            Err("no healthy cell is known".into())
        }
    }

    /// Background duties: follow directory and presence changes, refresh presence, prune.
    fn spawn_background(self: &Arc<Self>) {
        actix_rt::spawn(Arc::clone(&self.links).follow_directory());
        actix_rt::spawn(crate::moves::recover_abandoned(Arc::clone(self)));
        actix_rt::spawn(Arc::clone(&self.presence).follow_changes());
        actix_rt::spawn(Arc::clone(&self.presence).recover_when_back(self.shutdown.clone()));
        actix_rt::spawn(crate::cell_watch::export_cell_counts(
            Arc::clone(&self.directory),
            Arc::clone(&self.links),
            self.shutdown.clone(),
        ));
        let gateway = Arc::clone(self);
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(gateway.config.presence_refresh);
            loop {
                tokio::select! {
                    () = gateway.shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                gateway.prune_http_buckets();
                if let Err(e) = gateway.presence.keep_alive().await {
                    tracing::warn!(error = %e, "presence refresh failed");
                }
            }
        });
    }
}

/// An open client socket, counted in [`Gateway::open_sockets`] until dropped.
pub struct SocketGuard(Arc<Gateway>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket that has not sent `hello` yet, counted against its address until dropped.
pub struct PendingHello {
    gateway: Arc<Gateway>,
    ip: IpAddr,
}

impl Drop for PendingHello {
    fn drop(&mut self) {
        let pending = &self.gateway.pending_hello;
        let now_zero = pending.get_mut(&self.ip).is_some_and(|mut count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
        if now_zero {
            pending.remove_if(&self.ip, |_, count| *count == 0);
        }
    }
}

/// A running gateway's HTTP server.
pub struct GatewayHandle {
    pub server: actix_web::dev::Server,
    pub gateway: Arc<Gateway>,
}

impl GatewayHandle {
    /// Serves until the shutdown token fires, then shuts down as SPEC §1 says: `/readyz`
    /// answers 503 and new WebSockets are refused at once (both check the token), sessions
    /// are closed with `1001` evenly over `shutdown_spread`, and the server stops once the
    /// last socket has closed or at `drain_timeout` after the signal, whichever comes first.
    pub async fn run(self) -> std::io::Result<()> {
        let server_handle = self.server.handle();
        let gateway = Arc::clone(&self.gateway);
        actix_rt::spawn(async move {
            gateway.shutdown.cancelled().await;
            let deadline = Instant::now() + gateway.config.drain_timeout;
            tracing::info!(
                sessions = gateway.sessions.len(),
                spread_ms = gateway.config.shutdown_spread.as_millis() as u64,
                "shutting down"
            );
            close_spread(&gateway, deadline).await;
            // Sessions end first; their sockets follow once the close frame is written.
            while (!gateway.sessions.is_empty() || gateway.open_sockets() > 0)
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let drained = gateway.sessions.is_empty() && gateway.open_sockets() == 0;
            tracing::info!(
                drained,
                left = gateway.open_sockets(),
                "stopping the server"
            );
            // Past the deadline nothing more is waited for, HTTP requests included.
            server_handle.stop(drained).await;
        });
        self.server.await
    }
}

/// Closes every session with `1001`, one after another at even intervals over the
/// configured spread (never past `deadline`), then any that attached meanwhile.
async fn close_spread(gateway: &Gateway, deadline: Instant) {
    let ids = gateway.sessions.snapshot(|s| s.id.clone());
    let start = tokio::time::Instant::now();
    let spread = gateway
        .config
        .shutdown_spread
        .min(deadline.saturating_duration_since(Instant::now()));
    let count = ids.len().max(1) as u32;
    for (i, id) in ids.iter().enumerate() {
        // Session i of n closes at i/n of the spread: the first at once, the last one step
        // before its end.
        tokio::time::sleep_until(start + spread * (i as u32) / count).await;
        if let Some(session) = gateway.sessions.get(id) {
            session.close(CloseCode::GoingAway);
        }
    }
    gateway.sessions.close_where(CloseCode::GoingAway, |_| true);
}

/// Builds the gateway's HTTP server on `listener`. Call from within an actix System.
///
/// Plain HTTP goes to the actix-web application; WebSocket upgrades go to [`ws::upgrade`],
/// which takes the connection out of actix-http's dispatcher (so it is built from
/// `actix-http`'s service builder rather than with `HttpServer`, which has no upgrade hook).
pub fn start(gateway: Arc<Gateway>, listener: TcpListener) -> std::io::Result<GatewayHandle> {
    gateway.spawn_background();
    let local_addr = listener.local_addr()?;
    let builder = actix_server::Server::build();
    let shutdown_signal = builder.graceful_shutdown_signal();
    let served = Arc::clone(&gateway);
    let server = builder
        .disable_signals()
        .shutdown_timeout(5)
        .listen("confab-gateway", listener, move || {
            let shutdown_signal = shutdown_signal.clone();
            let upgrade_gateway = Arc::clone(&served);
            HttpService::build()
                // Events are small and latency matters: no Nagle delay on client sockets.
                .tcp_nodelay(true)
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(local_addr)
                .graceful_shutdown_signal(move || {
                    let signal = shutdown_signal.clone();
                    async move { signal.notified().await }
                })
                .upgrade(fn_service(move |(req, framed)| {
                    ws::upgrade(Arc::clone(&upgrade_gateway), req, framed)
                }))
                .finish(map_config(app(Arc::clone(&served)), |()| {
                    AppConfig::default()
                }))
                .tcp()
        })?
        .run();
    Ok(GatewayHandle { server, gateway })
}

/// The actix-web application: everything but WebSocket upgrades.
fn app(
    gateway: Arc<Gateway>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let body_limit = gateway.config.limits.max_frame_bytes;
    let body_timeout = Duration::from_millis(gateway.config.limits.http_body_timeout_ms);
    App::new()
        .wrap_fn(move |req, service| crate::body_timeout::call(req, service, body_timeout))
        .app_data(web::Data::from(gateway))
        .app_data(
            web::JsonConfig::default()
                .limit(body_limit)
                .error_handler(|e, _| json_error(e)),
        )
        .app_data(web::QueryConfig::default().error_handler(|e, _| query_error(e)))
        .app_data(web::PathConfig::default().error_handler(|e, _| path_error(e)))
        .route(ws::WS_PATH, web::get().to(ws::route))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .configure(http_api::configure)
        .configure(admin::configure)
        .configure(web_client::configure)
        .default_service(web::to(not_found))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(gateway: web::Data<Gateway>) -> HttpResponse {
    match gateway.is_ready().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "not ready", "reason": reason})),
    }
}

async fn metrics(gateway: web::Data<Gateway>) -> HttpResponse {
    let body = gateway
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("no such endpoint"))
}
