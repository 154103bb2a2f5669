//! `confab gateway` and `confab cell`: the processes of a distributed deployment, with Redis
//! as the one shared engine and WebSocket links between them.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use confab_cells::{Cell, RedisStore};
use confab_directory::{CellLoad, CellRegistration, Directory, RedisDirectory, RedisPresence};
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
        .install_recorder()
        .context("installing metrics")?;
    let listener = crate::listen::bind(args.listen)?;
    let id: CellId = args
        .id
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --id {:?}: {e}", args.id))?;
    actix_rt::System::new().block_on(async move {
        let store = Arc::new(RedisStore::connect(&args.redis)?);
        let cell = Cell::start(
            args.cell_limits
                .to_config(id.clone(), args.retention_events),
            store.clone(),
        );
        let directory = RedisDirectory::start(&args.directory)?;
        let shutdown = CancellationToken::new();
        let registration = CellRegistration {
            id: id.clone(),
            region: args.region.clone(),
            url: args.advertise.clone(),
        };
        actix_rt::spawn(heartbeat(
            cell.clone(),
            Arc::clone(&directory),
            registration,
            shutdown.clone(),
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
            store,
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
            "confab cell {id} (region {}) listening on http://{addr}",
            args.region
        );
        let stopper = server.handle();
        actix_rt::spawn(async move {
            wait_for_signal(shutdown).await;
            stopper.stop(true).await;
        });
        server.await?;
        Ok(())
    })
}

/// Registers the cell (again after any failure, e.g. a directory restart) and heartbeats.
async fn heartbeat(
    cell: Cell,
    directory: Arc<RedisDirectory>,
    registration: CellRegistration,
    shutdown: CancellationToken,
) {
    let mut registered = false;
    let mut tick = tokio::time::interval(CELL_HEARTBEAT);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = confab_shared::now_ms();
        if !registered {
            match directory.register_cell(registration.clone(), now).await {
                Ok(()) => {
                    registered = true;
                    tracing::info!(cell = %registration.id, "registered in the directory");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register in the directory yet");
                    continue;
                }
            }
        }
        let load = CellLoad {
            connections: cell.stats().connections,
        };
        if let Err(e) = directory.heartbeat_cell(&registration.id, load, now).await {
            tracing::warn!(error = %e, "heartbeat failed");
            registered = false;
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
