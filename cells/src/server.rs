//! The cell process: [`run`] claims the cell id, starts the actors, serves `/v1/link`,
//! `/healthz`, `/readyz` and `/metrics`, heartbeats in the directory, and owns shutdown. It is
//! what `confab cell` calls after parsing its flags and binding, and what tests call on a port
//! of their own.
//!
//! Read top to bottom, `run` is the cell's start-up: nothing is served before this process
//! holds the cell id (a new epoch in the directory, then the store's fence), so only one
//! process ever writes the store; then the actors start, the heartbeat begins, and the HTTP
//! server listens. It ends on the shutdown token (graceful, see [`drain`]) or when the
//! process finds itself fenced (at once, with [`ServerError::Fenced`]).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use confab_directory::directory::CELL_DOWN_AFTER_MS;
use confab_directory::{CellLoad, CellRegistration, CellTenure, Directory};
use confab_shared::link_transport::MIN_LINK_FRAME;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::link_ws::{link_route, LinkEndpoint};
use crate::store::{RedisStore, StoreError, TimedStore};
use crate::{Cell, CellConfig};

/// How often a cell heartbeats in the directory.
pub const CELL_HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a starting cell waits between attempts to reach its store or the directory.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// The longest a graceful shutdown waits for the writes already taken and for the links'
/// queues; a store write is bounded well below it (Redis commands fail within about 2 s).
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How long the HTTP server waits for open connections (links closing) once drained.
const HTTP_STOP_SECS: u64 = 3;

/// How a cell process is set up.
#[derive(Debug, Clone)]
pub struct CellServerConfig {
    /// The actors' settings, the cell id among them.
    pub cell: CellConfig,
    pub region: String,
    /// Base URL gateways use to reach this cell (its `/v1/link`).
    pub advertise: String,
    /// Authenticates links in both directions; `None` serves loopback peers only.
    pub cluster_secret: Option<String>,
    /// Largest WebSocket frame a link sends or accepts (raised to [`MIN_LINK_FRAME`]).
    pub link_max_frame: usize,
    /// `pid N on HOST`: how this process names itself to a later holder of its id.
    pub process: String,
    /// Renders `/metrics` (the process's recorder); `None` serves an empty page.
    pub metrics: Option<PrometheusHandle>,
}

/// Why a cell process stopped other than by its shutdown token.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("cell {cell} claimed by a newer process: {source}")]
    Claimed { cell: String, source: StoreError },
    /// The store holds data this version cannot take over (see `RedisStore::claim`): retrying
    /// would not help, an operator must act.
    #[error("cell {cell} cannot claim its store: {source}")]
    Unusable { cell: String, source: StoreError },
    #[error("cell {cell} (epoch {epoch}) fenced: {reason}")]
    Fenced {
        cell: String,
        epoch: u64,
        reason: &'static str,
    },
}

/// This process as the directory records the holder of its cell id.
#[derive(Debug, Clone)]
struct Holder {
    process: String,
    /// The epoch this process claimed the id with.
    epoch: u64,
}

/// Shared state of the cell's HTTP endpoints.
struct CellHttp {
    cell: Cell,
    store: Arc<RedisStore>,
    directory: Arc<dyn Directory>,
    metrics: Option<PrometheusHandle>,
}

/// Runs a cell on `listener` until `shutdown` fires or the process is fenced. Call from
/// within an actix System.
pub async fn run(
    listener: TcpListener,
    config: CellServerConfig,
    store: Arc<RedisStore>,
    directory: Arc<dyn Directory>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let id = config.cell.id.clone();
    let registration = CellRegistration {
        id: id.clone(),
        region: config.region.clone(),
        url: config.advertise.clone(),
    };
    let epoch = claim_cell_id(directory.as_ref(), &store, &registration, &config.process).await?;
    let holder = Holder {
        process: config.process.clone(),
        epoch,
    };
    crate::metrics::describe();
    let measured = Arc::new(TimedStore::new(store.clone()));
    let cell = Cell::start(config.cell.clone(), measured);
    actix_rt::spawn(crate::metrics::sample(cell.clone(), shutdown.clone()));
    let superseded = CancellationToken::new();
    actix_rt::spawn(heartbeat(
        cell.clone(),
        Arc::clone(&directory),
        registration,
        holder.clone(),
        shutdown.clone(),
        superseded.clone(),
    ));
    let secret = config.cluster_secret.clone().filter(|s| !s.is_empty());
    if secret.is_none() {
        tracing::warn!(
            "no --cluster-secret: this cell accepts links from loopback addresses only; \
             set one to accept gateways on other hosts"
        );
    }
    let endpoint = web::Data::new(LinkEndpoint::new(
        cell.clone(),
        id.clone(),
        secret,
        config.link_max_frame.max(MIN_LINK_FRAME),
    ));
    let http = web::Data::new(CellHttp {
        cell: cell.clone(),
        store: store.clone(),
        directory,
        metrics: config.metrics.clone(),
    });
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(endpoint.clone())
            .app_data(http.clone())
            .route("/v1/link", web::get().to(link_route))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(render_metrics))
    })
    .disable_signals()
    .shutdown_timeout(HTTP_STOP_SECS)
    .tcp_nodelay(true)
    .listen(listener)?
    .run();
    println!(
        "confab cell {id} (region {}, epoch {}) listening on http://{addr}",
        config.region, holder.epoch
    );
    let stopper = server.handle();
    let fenced = store.fenced();
    let stopping = actix_rt::spawn(stop_when_told(cell, shutdown, fenced, superseded, stopper));
    server.await?;
    if let Ok(Some(reason)) = stopping.await {
        tracing::error!(cell = %id, epoch = holder.epoch, reason, "cell fenced, exiting");
        return Err(ServerError::Fenced {
            cell: id.to_string(),
            epoch: holder.epoch,
            reason,
        });
    }
    Ok(())
}

/// Waits for the shutdown token or for this process to find itself fenced, and stops the
/// server accordingly: after the graceful drain ([`Cell::shut_down`]) on the token, at once
/// when fenced. Returns why it was fenced, if it was.
async fn stop_when_told(
    cell: Cell,
    shutdown: CancellationToken,
    fenced: WaitForCancellationFutureOwned,
    superseded: CancellationToken,
    stopper: actix_web::dev::ServerHandle,
) -> Option<&'static str> {
    let reason = tokio::select! {
        () = shutdown.cancelled() => None,
        () = fenced => Some("a store write was refused: the store is claimed by a newer process"),
        () = superseded.cancelled() => Some("the directory names a newer process for this cell id"),
    };
    match reason {
        // A fenced process stops at once: its links drop, and gateways reconnect to the
        // process now registered for the cell and tell their sessions to resume (4010).
        Some(_) => stopper.stop(false).await,
        None => {
            tracing::info!(
                sessions = cell.stats().connections,
                "shutting down: refusing new writes, finishing those taken"
            );
            let report = cell.shut_down(DRAIN_DEADLINE).await;
            tracing::info!(
                sessions_told = report.sessions_told,
                unanswered = report.unanswered,
                flushed = report.flushed,
                "drained, stopping"
            );
            stopper.stop(true).await;
        }
    }
    reason
}

/// Claims the cell id: a new epoch in the directory, at least one above the epoch that holds
/// the store (a directory that lost its data must not hand out an old epoch again), then the
/// store's fence. Never waits for an earlier holder, so a restart after a crash serves at once;
/// a holder still running is fenced by the claim.
async fn claim_cell_id(
    directory: &dyn Directory,
    store: &RedisStore,
    registration: &CellRegistration,
    process: &str,
) -> Result<u64, ServerError> {
    loop {
        let floor = match store.fence_epoch().await {
            Ok(held) => held + 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the store's fence yet");
                tokio::time::sleep(STORE_WAIT).await;
                continue;
            }
        };
        let now = confab_shared::now_ms();
        let claim = match directory
            .claim_cell(registration.clone(), process, floor, now)
            .await
        {
            Ok(claim) => claim,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim the cell id in the directory yet");
                tokio::time::sleep(STORE_WAIT).await;
                continue;
            }
        };
        match store.claim(claim.epoch).await {
            Ok(()) => {}
            // A process that claimed after this one holds the store already: it is the cell.
            Err(source @ StoreError::Fenced(_)) => {
                return Err(ServerError::Claimed {
                    cell: registration.id.to_string(),
                    source,
                })
            }
            Err(source @ StoreError::Corrupt(_)) => {
                return Err(ServerError::Unusable {
                    cell: registration.id.to_string(),
                    source,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim the store yet");
                tokio::time::sleep(STORE_WAIT).await;
                continue;
            }
        }
        if let Some(previous) = claim
            .previous
            .filter(|p| now.saturating_sub(p.last_heartbeat_ms) <= CELL_DOWN_AFTER_MS)
        {
            tracing::warn!(
                cell = %registration.id,
                holder = %previous.process,
                url = %previous.url,
                epoch = previous.epoch,
                heartbeat_age_ms = now.saturating_sub(previous.last_heartbeat_ms),
                "another process held this cell id recently and may still run; it is fenced \
                 from now on and stops at its next write or heartbeat"
            );
        }
        tracing::info!(cell = %registration.id, epoch = claim.epoch, "claimed the cell id");
        return Ok(claim.epoch);
    }
}

/// Heartbeats in the directory under this process's epoch (registering again if the
/// directory lost the record); cancels `superseded` when a newer process claimed the id.
async fn heartbeat(
    cell: Cell,
    directory: Arc<dyn Directory>,
    registration: CellRegistration,
    holder: Holder,
    shutdown: CancellationToken,
    superseded: CancellationToken,
) {
    let mut tick = tokio::time::interval(CELL_HEARTBEAT);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = confab_shared::now_ms();
        let bounds = cell.bounds();
        let load = CellLoad {
            connections: cell.stats().connections,
            max_workspaces: bounds.max_workspaces,
            max_connections: bounds.max_connections,
        };
        let tenure = match directory
            .heartbeat_cell(&registration.id, holder.epoch, load, now)
            .await
        {
            Ok(CellTenure::Unregistered) => {
                directory
                    .register_cell(registration.clone(), &holder.process, holder.epoch, now)
                    .await
            }
            other => other,
        };
        match tenure {
            Ok(CellTenure::Held) => {}
            Ok(CellTenure::Unregistered) => {}
            Ok(CellTenure::Superseded { epoch }) => {
                tracing::error!(cell = %registration.id, ours = holder.epoch, newer = epoch, "a newer process claimed this cell id");
                superseded.cancel();
                break;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(http: web::Data<CellHttp>) -> HttpResponse {
    if http.cell.is_stopping() {
        return HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "not ready", "reason": "shutting down"}));
    }
    let store = http.store.ping().await;
    let directory = http.directory.cells().await;
    match (store, directory) {
        (Ok(()), Ok(_)) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        (store, directory) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "not ready",
            "store": store.err().map(|e| e.to_string()),
            "directory": directory.err().map(|e| e.to_string()),
        })),
    }
}

async fn render_metrics(http: web::Data<CellHttp>) -> HttpResponse {
    let body = http
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}
