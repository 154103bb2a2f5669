//! The cell's metric names (all `confab_*`, fixed: alerts and dashboards are written against
//! them), the Prometheus recorder of a cell process, and the sampler that keeps the gauges
//! current. Every name is present from the process's first second, zero until it changes.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::Cell;

/// Gauge, always 1, labelled with the `version` of the running binary.
pub const BUILD_INFO: &str = "confab_build_info";
/// Gauge: workspaces held by this cell's store.
pub const WORKSPACES: &str = "confab_cell_workspaces";
/// Gauge: channel actors alive in this cell (channels used since they were last idle).
pub const CHANNEL_ACTORS: &str = "confab_cell_channel_actors";
/// Gauge: user actors alive in this cell (users with sessions, or recently active).
pub const USER_ACTORS: &str = "confab_cell_user_actors";
/// Gauge: gateway links open to this cell.
pub const LINKS: &str = "confab_cell_links";
/// Gauge: client sessions attached to this cell (through every gateway).
pub const CONNECTIONS: &str = "confab_cell_connections";
/// Histogram: seconds one store operation took, by `op` (`append`, `load_channel`, …).
pub const STORE_OP_DURATION: &str = "confab_store_op_duration_seconds";
/// Counter: events appended to channel logs (each acked send, edit, delete, join, leave).
pub const EVENTS_APPENDED: &str = "confab_events_appended_total";

/// How often the gauges are sampled from the cell.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Installs the process-wide Prometheus recorder of a cell process; call once, at start-up.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    // Store operations take from tens of microseconds (memory, local Redis) to seconds (a
    // Redis that is failing over); the buckets cover both ends.
    let buckets = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STORE_OP_DURATION.to_string()), &buckets)?
        .set_buckets_for_metric(
            Matcher::Full(crate::webhooks::LATENCY.to_string()),
            crate::webhooks::LATENCY_BUCKETS,
        )?
        .install_recorder()?;
    Ok(handle)
}

/// Describes the cell's metrics and gives each its starting value, so that a scrape in the
/// cell's first second already finds every name.
pub fn describe() {
    metrics::describe_gauge!(BUILD_INFO, "1, labelled with the running version");
    metrics::describe_gauge!(WORKSPACES, "workspaces held by this cell");
    metrics::describe_gauge!(CHANNEL_ACTORS, "channel actors alive in this cell");
    metrics::describe_gauge!(USER_ACTORS, "user actors alive in this cell");
    metrics::describe_gauge!(LINKS, "gateway links open to this cell");
    metrics::describe_gauge!(CONNECTIONS, "client sessions attached to this cell");
    metrics::describe_histogram!(
        STORE_OP_DURATION,
        metrics::Unit::Seconds,
        "store operation latency, by op"
    );
    metrics::describe_counter!(EVENTS_APPENDED, "events appended to channel logs");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for gauge in [WORKSPACES, CHANNEL_ACTORS, USER_ACTORS, LINKS, CONNECTIONS] {
        metrics::gauge!(gauge).set(0.0);
    }
    metrics::counter!(EVENTS_APPENDED).absolute(0);
}

/// Sets the gauges from the cell now and every second until `shutdown`.
pub async fn sample(cell: Cell, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let stats = cell.stats();
        // Gauges are f64; counts of this size are exact in it.
        metrics::gauge!(WORKSPACES).set(stats.workspaces as f64);
        metrics::gauge!(CONNECTIONS).set(stats.connections as f64);
        let actors = cell.actors();
        metrics::gauge!(CHANNEL_ACTORS).set(actors.channel_actors as f64);
        metrics::gauge!(USER_ACTORS).set(actors.user_actors as f64);
        metrics::gauge!(LINKS).set(actors.links as f64);
    }
}
