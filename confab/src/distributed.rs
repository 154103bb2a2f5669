//! `confab gateway` and `confab cell`: the processes of a distributed deployment, with Redis
//! as the one shared engine and WebSocket links between them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use confab_cells::server::CellServerConfig;
use confab_cells::{CellBounds, RedisStore};
use confab_directory::{RedisDirectory, RedisPresence};
use confab_gateway::link_ws::WsConnector;
use confab_gateway::{Gateway, GatewayConfig};
use confab_shared::link_transport::MIN_LINK_FRAME;
use confab_shared::CellId;
use tokio_util::sync::CancellationToken;

use crate::cli::{CellArgs, GatewayArgs};
use crate::dev::wait_for_signal;

/// How long a starting cell waits between attempts to reach its store.
const STORE_WAIT: Duration = Duration::from_secs(1);

pub fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let metrics = confab_gateway::metrics::install().context("installing metrics")?;
    crate::metrics_upkeep::spawn(&metrics).context("starting the metrics upkeep")?;
    let listener = crate::listen::bind(args.listen)?;
    actix_rt::System::new().block_on(async move {
        let gateway_id = gateway_id();
        let directory = RedisDirectory::start(&args.redis)?;
        let ttl = Duration::from_millis(args.presence_ttl_ms.max(300));
        let presence = RedisPresence::start_with_ttl(&args.redis, ttl)?;
        let mut config = GatewayConfig::new(gateway_id.clone(), args.jwt_secret, args.admin_token);
        config.limits = args.limits.to_limits();
        config.presence_refresh = ttl / 3;
        args.shutdown.apply(&mut config);
        config.move_page_delay = Duration::from_millis(args.move_page_delay_ms);
        config.request_timeout = Duration::from_millis(args.request_timeout_ms.max(100));
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

pub fn run_cell(args: CellArgs) -> anyhow::Result<()> {
    let metrics = confab_cells::metrics::install().context("installing metrics")?;
    crate::metrics_upkeep::spawn(&metrics).context("starting the metrics upkeep")?;
    let listener = crate::listen::bind(args.listen)?;
    let id: CellId = args
        .id
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --id {:?}: {e}", args.id))?;
    actix_rt::System::new().block_on(async move {
        // Nothing is served before the store is known to be durable: an ack must mean
        // "on disk".
        let store = Arc::new(RedisStore::connect(&args.redis)?);
        check_store_durability(&store, args.store_fsync).await?;
        let directory = RedisDirectory::start(&args.directory)?;
        let mut cell = args.cell_limits.to_config(id, args.retention_events);
        cell.bounds = CellBounds {
            max_workspaces: args.max_workspaces,
            max_connections: args.max_connections,
        };
        cell.webhooks = args.webhooks.to_config();
        let config = CellServerConfig {
            cell,
            region: args.region,
            advertise: args.advertise,
            cluster_secret: args.cluster_secret,
            link_max_frame: args.link_max_frame_bytes,
            process: process_name(),
            metrics: Some(metrics),
        };
        let shutdown = CancellationToken::new();
        actix_rt::spawn(wait_for_signal(shutdown.clone()));
        confab_cells::server::run(listener, config, store, directory, shutdown).await?;
        Ok(())
    })
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
