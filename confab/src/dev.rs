//! `confab dev`: a gateway and one cell (region `local`) in one process, with in-memory
//! presence, directory and store; seeds workspace `demo` and prints how to connect.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use confab_cells::{Cell, MemoryStore};
use confab_directory::{
    CellLoad, CellRegistration, Directory, MemoryDirectory, MemoryPresence, WorkspaceRecord,
};
use confab_gateway::{Gateway, GatewayConfig};
use confab_shared::link::AdminOp;
use confab_shared::server::ChannelKind;
use confab_shared::{CellId, ChannelId, UserId, WorkspaceId};
use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;
use crate::inproc::InProcessConnector;

const CELL_ID: &str = "local-1";
const REGION: &str = "local";
const DEMO_WORKSPACE: &str = "demo";
const DEMO_CHANNEL: &str = "general";
const DEMO_USERS: [&str; 2] = ["alice", "bob"];
/// Lifetime of the printed dev tokens: a week.
const DEV_TOKEN_TTL_S: u64 = 7 * 24 * 3600;
/// How often the cell reports its load to the directory.
const HEARTBEAT: Duration = Duration::from_secs(2);

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let metrics = confab_gateway::metrics::install().context("installing metrics")?;
    crate::metrics_upkeep::spawn(&metrics).context("starting the metrics upkeep")?;
    let listener = crate::listen::bind(args.listen)?;
    actix_rt::System::new().block_on(serve(args, listener, metrics))
}

async fn serve(
    args: DevArgs,
    listener: TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let cell_id = id::<CellId>(CELL_ID)?;
    let mut cell_config = args
        .cell_limits
        .to_config(cell_id.clone(), args.retention_events);
    cell_config.webhooks = args.webhooks.to_config();
    let cell = Cell::start(cell_config, Arc::new(MemoryStore::new()));
    let directory: Arc<dyn Directory> = Arc::new(MemoryDirectory::new());
    let claim = directory
        .claim_cell(
            CellRegistration {
                id: cell_id.clone(),
                region: REGION.into(),
                url: format!("inproc://{CELL_ID}"),
            },
            "dev",
            0,
            confab_shared::now_ms(),
        )
        .await?;
    let shutdown = CancellationToken::new();
    spawn_cell_heartbeat(
        cell.clone(),
        Arc::clone(&directory),
        (cell_id.clone(), claim.epoch),
        shutdown.clone(),
    );

    let mut config = GatewayConfig::new("dev-gateway".into(), args.jwt_secret, args.admin_token);
    config.limits = args.limits.to_limits();
    args.shutdown.apply(&mut config);
    let admin_token = config.admin_token.clone();
    let connector = Arc::new(InProcessConnector {
        cell,
        gateway: "dev-gateway".into(),
    });
    let gateway = Gateway::new(
        config,
        Arc::clone(&directory),
        Arc::new(MemoryPresence::new()),
        connector,
        Some(metrics),
        shutdown.clone(),
    );
    seed_demo(&gateway, &cell_id).await?;
    let handle = confab_gateway::server::start(Arc::clone(&gateway), listener)?;

    let demo = id::<WorkspaceId>(DEMO_WORKSPACE)?;
    println!("confab dev listening on http://{addr}");
    println!("web client: http://{addr}/");
    for user in DEMO_USERS {
        let token = gateway
            .tokens
            .mint(&demo, &id(user)?, false, DEV_TOKEN_TTL_S)?;
        println!("token {user}: {token}");
    }
    println!("admin token: {admin_token}");

    actix_rt::spawn(wait_for_signal(shutdown));
    handle.run().await?;
    Ok(())
}

/// Creates workspace `demo` with public channel `general` whose members are alice and bob.
async fn seed_demo(gateway: &Arc<Gateway>, cell: &CellId) -> anyhow::Result<()> {
    let demo = id::<WorkspaceId>(DEMO_WORKSPACE)?;
    gateway
        .directory
        .create_workspace(WorkspaceRecord {
            id: demo.clone(),
            cell: cell.clone(),
            region: REGION.into(),
            name: Some("Demo".into()),
        })
        .await?;
    let create = AdminOp::CreateWorkspace {
        workspace: demo.clone(),
        name: Some("Demo".into()),
    };
    gateway.links.admin(cell, create).await?;
    let seed = AdminOp::SeedChannel {
        workspace: demo,
        channel: id::<ChannelId>(DEMO_CHANNEL)?,
        kind: ChannelKind::Public,
        members: DEMO_USERS
            .iter()
            .map(|u| id::<UserId>(u))
            .collect::<Result<_, _>>()?,
    };
    gateway.links.admin(cell, seed).await?;
    Ok(())
}

fn spawn_cell_heartbeat(
    cell: Cell,
    directory: Arc<dyn Directory>,
    (id, epoch): (CellId, u64),
    shutdown: CancellationToken,
) {
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let load = CellLoad {
                connections: cell.stats().connections,
                ..CellLoad::default()
            };
            if let Err(e) = directory
                .heartbeat_cell(&id, epoch, load, confab_shared::now_ms())
                .await
            {
                tracing::warn!(error = %e, "cell heartbeat failed");
            }
        }
    });
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
pub async fn wait_for_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received, shutting down");
    shutdown.cancel();
}

fn id<T: std::str::FromStr<Err = confab_shared::IdError>>(s: &str) -> anyhow::Result<T> {
    s.parse::<T>()
        .map_err(|e| anyhow::anyhow!("invalid id {s:?}: {e}"))
}
