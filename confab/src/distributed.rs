//! `confab gateway` and `confab cell`: the processes of a distributed deployment, with Redis
//! as the one shared engine and WebSocket links between them.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use confab_cells::{Cell, RedisStore};
use confab_directory::{
    CellLoad, CellRegistration, CellTenure, Directory, RedisDirectory, RedisPresence,
};
use confab_gateway::{Gateway, GatewayConfig};
use confab_shared::CellId;
use tokio_util::sync::CancellationToken;

use crate::cli::{CellArgs, GatewayArgs};
use crate::dev::wait_for_signal;
use crate::link_ws::{link_route, LinkEndpoint, WsConnector};

/// How often a cell heartbeats in the directory.
const CELL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Smallest `--link-max-frame-bytes` honoured: every handshake message fits in it.
const MIN_LINK_FRAME: usize = 4096;
/// How long a starting cell waits between attempts to reach its store or the directory.
const STORE_WAIT: Duration = Duration::from_secs(1);

pub fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let metrics = confab_gateway::metrics::install().context("installing metrics")?;
    let listener = crate::listen::bind(args.listen)?;
    actix_rt::System::new().block_on(async move {
        let gateway_id = gateway_id();
        let directory = RedisDirectory::start(&args.redis)?;
        let ttl = Duration::from_millis(args.presence_ttl_ms.max(300));
        let presence = RedisPresence::start_with_ttl(&args.redis, ttl)?;
        let mut config = GatewayConfig::new(gateway_id.clone(), args.jwt_secret, args.admin_token);
        config.limits = args.limits.to_limits();
        config.presence_refresh = ttl / 3;
        let secret = args.cluster_secret.filter(|s| !s.is_empty());
        if secret.is_none() {
            tracing::warn!(
                "no --cluster-secret: links to cells are not authenticated, and cells without \
                 one accept links from loopback addresses only"
            );
        }
        let connector = Arc::new(WsConnector {
            gateway: gateway_id.clone(),
            secret,
            max_frame: args.link_max_frame_bytes.max(MIN_LINK_FRAME),
        });
        let shutdown = CancellationToken::new();
        let gateway = Gateway::new(
            config,
            directory,
            presence,
            connector,
            Some(metrics),
            shutdown.clone(),
        );
        let addr = listener.local_addr()?;
        let handle = confab_gateway::server::start(gateway, listener)?;
        println!("confab gateway {gateway_id} listening on http://{addr}");
        actix_rt::spawn(wait_for_signal(shutdown));
        handle.run().await?;
        Ok(())
    })
}

/// Shared state of the cell's HTTP endpoints.
struct CellHttp {
    store: Arc<RedisStore>,
    directory: Arc<RedisDirectory>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub fn run_cell(args: CellArgs) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(confab_cells::webhooks::LATENCY.into()),
            confab_cells::webhooks::LATENCY_BUCKETS,
        )
        .context("webhook latency buckets")?
        .install_recorder()
        .context("installing metrics")?;
    let listener = crate::listen::bind(args.listen)?;
    let id: CellId = args
        .id
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --id {:?}: {e}", args.id))?;
    actix_rt::System::new().block_on(async move {
        // Nothing is served before the store is known to be durable and this process holds
        // the cell id: an ack must mean "on disk", and only one process may write the store.
        let store = Arc::new(RedisStore::connect(&args.redis)?);
        check_store_durability(&store, args.store_fsync).await?;
        let directory = RedisDirectory::start(&args.directory)?;
        let registration = CellRegistration {
            id: id.clone(),
            region: args.region.clone(),
            url: args.advertise.clone(),
        };
        let process = process_name();
        let epoch = claim_cell_id(&directory, &store, &registration, &process).await?;
        let holder = Holder { process, epoch };
        let mut cell_config = args
            .cell_limits
            .to_config(id.clone(), args.retention_events);
        cell_config.webhooks = args.webhooks.to_config();
        let cell = Cell::start(cell_config, store.clone());
        let shutdown = CancellationToken::new();
        let superseded = CancellationToken::new();
        actix_rt::spawn(heartbeat(
            cell.clone(),
            Arc::clone(&directory),
            registration,
            holder.clone(),
            shutdown.clone(),
            superseded.clone(),
        ));
        let secret = args.cluster_secret.filter(|s| !s.is_empty());
        if secret.is_none() {
            tracing::warn!(
                "no --cluster-secret: this cell accepts links from loopback addresses only; \
                 set one to accept gateways on other hosts"
            );
        }
        let endpoint = web::Data::new(LinkEndpoint::new(
            cell,
            id.clone(),
            secret,
            args.link_max_frame_bytes.max(MIN_LINK_FRAME),
        ));
        let http = web::Data::new(CellHttp {
            store: store.clone(),
            directory,
            metrics,
        });
        let addr = listener.local_addr()?;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(endpoint.clone())
                .app_data(http.clone())
                .route("/v1/link", web::get().to(link_route))
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(cell_readyz))
                .route("/metrics", web::get().to(cell_metrics))
        })
        .disable_signals()
        .tcp_nodelay(true)
        .listen(listener)?
        .run();
        println!(
            "confab cell {id} (region {}, epoch {}) listening on http://{addr}",
            args.region, holder.epoch
        );
        let stopper = server.handle();
        let fenced = store.fenced();
        let stopping = actix_rt::spawn(async move {
            let reason = tokio::select! {
                () = wait_for_signal(shutdown) => None,
                () = fenced => Some("a store write was refused: the store is claimed by a newer process"),
                () = superseded.cancelled() => Some("the directory names a newer process for this cell id"),
            };
            // A fenced process stops at once: its links drop, and gateways reconnect to the
            // process now registered for the cell and tell their sessions to resume (4010).
            stopper.stop(reason.is_none()).await;
            reason
        });
        server.await?;
        if let Ok(Some(reason)) = stopping.await {
            tracing::error!(cell = %id, epoch = holder.epoch, reason, "cell fenced, exiting");
            anyhow::bail!("cell {id} (epoch {}) fenced: {reason}", holder.epoch);
        }
        Ok(())
    })
}

/// This process as the directory records the holder of its cell id.
#[derive(Debug, Clone)]
struct Holder {
    /// `pid N on HOST`, named in the warning of a process that starts while this one runs.
    process: String,
    /// The epoch this process claimed the id with.
    epoch: u64,
}

fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into());
    format!("pid {} on {host}", std::process::id())
}

/// Reads the store's persistence settings (waiting while the store is unreachable) and
/// refuses to go on unless they are durable enough for what `--store-fsync` states.
async fn check_store_durability(
    store: &RedisStore,
    stated: Option<crate::durability::StoreFsync>,
) -> anyhow::Result<()> {
    let persistence = loop {
        match store.persistence().await {
            Ok(persistence) => break persistence,
            Err(e) => {
                tracing::warn!(error = %e, "store unreachable; waiting for it before starting");
                tokio::time::sleep(STORE_WAIT).await;
            }
        }
    };
    match crate::durability::check(&persistence, stated) {
        Ok(accepted) => {
            match accepted.warning {
                Some(warning) => tracing::warn!(?persistence, "{warning}"),
                None => tracing::info!(?persistence, "store is durable"),
            }
            Ok(())
        }
        Err(refusal) => anyhow::bail!("refusing to start: {refusal}"),
    }
}

/// Claims the cell id: a new epoch in the directory, at least one above the epoch that holds
/// the store (a directory that lost its data must not hand out an old epoch again), then the
/// store's fence. Never waits for an earlier holder, so a restart after a crash serves at once;
/// a holder still running is fenced by the claim.
async fn claim_cell_id(
    directory: &RedisDirectory,
    store: &RedisStore,
    registration: &CellRegistration,
    process: &str,
) -> anyhow::Result<u64> {
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
            Err(e @ confab_cells::StoreError::Fenced(_)) => {
                anyhow::bail!("cell {} claimed by a newer process: {e}", registration.id)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim the store yet");
                tokio::time::sleep(STORE_WAIT).await;
                continue;
            }
        }
        if let Some(previous) = claim.previous.filter(|p| {
            now.saturating_sub(p.last_heartbeat_ms)
                <= confab_directory::directory::CELL_DOWN_AFTER_MS
        }) {
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
    directory: Arc<RedisDirectory>,
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
        let load = CellLoad {
            connections: cell.stats().connections,
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

async fn cell_readyz(http: web::Data<CellHttp>) -> HttpResponse {
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

async fn cell_metrics(http: web::Data<CellHttp>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(http.metrics.render())
}

/// A name for this gateway process, unique among the gateways of a deployment (a cell's logs
/// tell its links apart by it): 12 hex characters from the clock and the process id. The clock's low
/// bits change every nanosecond, so gateways started apart differ; the process id keeps apart
/// gateways started at the same instant on one host.
fn gateway_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Truncation on purpose: only the fast-changing low bits of the clock are wanted.
    let clock = nanos as u64;
    let mixed = clock ^ (u64::from(std::process::id()) << 28);
    format!("gw-{:012x}", mixed & 0xffff_ffff_ffff)
}
