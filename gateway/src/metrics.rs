//! Metric names (all `confab_*`) and the Prometheus exporter.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge, always 1, labelled with the `version` of the running binary (cells have it too).
pub const BUILD_INFO: &str = "confab_build_info";
/// Gauge: open client WebSockets on this gateway.
pub const CONNECTIONS: &str = "confab_connections";
/// Counter: frames received from clients.
pub const FRAMES_IN: &str = "confab_frames_in_total";
/// Counter: frames written to client sockets.
pub const FRAMES_OUT: &str = "confab_frames_out_total";
/// Histogram: seconds from an event's creation in its cell to its write on a client socket;
/// one sample per socket write, that of the oldest event in it.
pub const DELIVERY_LATENCY: &str = "confab_delivery_latency_seconds";
/// Counter: sessions closed with `4008`.
pub const SLOW_CONSUMER_CLOSES: &str = "confab_slow_consumer_closes_total";
/// Counter: error replies sent, by `code`.
pub const ERRORS: &str = "confab_errors_total";
/// Counter: sessions closed, by close `code`.
pub const CLOSES: &str = "confab_closes_total";
/// Counter: WebSocket upgrades refused because the gateway serves `--max-connections`.
pub const CONNECTIONS_REFUSED: &str = "confab_connections_refused_total";
/// Counter: WebSocket upgrades refused because their address has `--max-pending-hello-per-ip`
/// connections without `hello` already.
pub const PENDING_HELLO_REFUSED: &str = "confab_pending_hello_refused_total";
/// Counter: HTTP requests answered `408` because their body did not arrive in time.
pub const SLOW_BODIES: &str = "confab_http_slow_bodies_total";
/// Gauge: local sessions with a presence subscription (`presence_sub`).
pub const PRESENCE_WATCHERS: &str = "confab_presence_watchers";
/// Gauge: distinct users watched by this gateway's presence subscriptions.
pub const PRESENCE_WATCHED_USERS: &str = "confab_presence_watched_users";
/// Gauge: 1 while presence answers come from this gateway's last-known statuses (the
/// presence + directory Redis does not answer), else 0.
pub const PRESENCE_STALE: &str = "confab_presence_stale";
/// Gauge: the directory's cells as this gateway last read them, by `status` (`healthy`,
/// `draining`, `down`); none but `down` means `/readyz` answers 503.
pub const GATEWAY_CELLS: &str = "confab_gateway_cells";

/// Installs the process-wide Prometheus recorder; call once, at start-up.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.to_string()), &buckets)?
        // `confab dev` runs a cell in this process: its webhook latency histogram
        // (`confab_cells::webhooks::LATENCY`) gets buckets from milliseconds to minutes.
        .set_buckets_for_metric(
            Matcher::Full("confab_webhook_delivery_latency_seconds".to_string()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0, 900.0, 3600.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(crate::moves::FREEZE_SECONDS.to_string()),
            &buckets,
        )?
        .set_buckets_for_metric(
            Matcher::Full(crate::moves::MOVE_SECONDS.to_string()),
            &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
        )?
        .install_recorder()?;
    describe();
    crate::moves::describe();
    Ok(handle)
}

fn describe() {
    metrics::describe_gauge!(BUILD_INFO, "1, labelled with the running version");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::describe_gauge!(CONNECTIONS, "open client websockets on this gateway");
    metrics::describe_counter!(FRAMES_IN, "frames received from clients");
    metrics::describe_counter!(FRAMES_OUT, "frames written to client sockets");
    metrics::describe_histogram!(
        DELIVERY_LATENCY,
        metrics::Unit::Seconds,
        "from an event's creation in its cell to its write on a client socket (one sample per write: its oldest event)"
    );
    metrics::describe_counter!(SLOW_CONSUMER_CLOSES, "sessions closed as slow consumers");
    metrics::describe_counter!(ERRORS, "error replies sent to clients, by code");
    metrics::describe_counter!(CLOSES, "client sessions closed, by close code");
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "websocket upgrades refused: the gateway serves its maximum of connections"
    );
    metrics::describe_counter!(
        PENDING_HELLO_REFUSED,
        "websocket upgrades refused: too many connections without hello from one address"
    );
    metrics::describe_counter!(
        SLOW_BODIES,
        "http requests answered 408: the body did not arrive in time"
    );
    metrics::describe_gauge!(
        PRESENCE_WATCHERS,
        "local sessions with a presence subscription"
    );
    metrics::describe_gauge!(
        PRESENCE_WATCHED_USERS,
        "distinct users watched by this gateway's presence subscriptions"
    );
    metrics::describe_gauge!(
        GATEWAY_CELLS,
        "cells in the directory as this gateway last read them, by status"
    );
    // Zero-valued series exist from the start, so dashboards and scrapers see them.
    metrics::gauge!(CONNECTIONS).set(0.0);
    metrics::gauge!(PRESENCE_WATCHERS).set(0.0);
    metrics::gauge!(PRESENCE_WATCHED_USERS).set(0.0);
    metrics::describe_gauge!(
        PRESENCE_STALE,
        "1 while presence answers come from this gateway's last-known statuses (the directory redis does not answer)"
    );
    metrics::gauge!(PRESENCE_STALE).set(0.0);
    metrics::counter!(FRAMES_IN).absolute(0);
    metrics::counter!(FRAMES_OUT).absolute(0);
    metrics::counter!(SLOW_CONSUMER_CLOSES).absolute(0);
    metrics::counter!(CONNECTIONS_REFUSED).absolute(0);
    metrics::counter!(PENDING_HELLO_REFUSED).absolute(0);
    metrics::counter!(SLOW_BODIES).absolute(0);
    metrics::describe_counter!(
        crate::links::DIRECTORY_FALLBACKS,
        "lookups answered from the gateway's last-known directory because the directory did not answer, by lookup"
    );
    for lookup in ["route", "cell"] {
        metrics::counter!(crate::links::DIRECTORY_FALLBACKS, "lookup" => lookup).absolute(0);
    }
}
