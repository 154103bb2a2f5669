//! The cells this gateway can route to, as a metric: `confab_gateway_cells{status}` counts the
//! directory's cells by status, so an alert can name a gateway that knows no healthy cell (the
//! same condition that makes its `/readyz` answer 503) without probing `/readyz`. Each read
//! also refreshes the gateway's last-known copy of the cells ([`Links::remember_cells`]); a
//! directory that does not answer never marks a cell down here.

use std::sync::Arc;
use std::time::Duration;

use confab_directory::{CellStatus, Directory};
use tokio_util::sync::CancellationToken;

use crate::links::Links;
use crate::metrics as m;

/// How often the gauge is refreshed from the directory (a cell heartbeats every 2 s).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// Sets `confab_gateway_cells{status}` from the directory every [`REFRESH_EVERY`] until
/// `shutdown`; while the directory does not answer the gauges keep their last values (its
/// errors are counted in `confab_redis_errors_total{engine="directory"}`).
pub async fn export_cell_counts(
    directory: Arc<dyn Directory>,
    links: Arc<Links>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(cells) = directory.cells().await else {
            continue;
        };
        // Also the gateway's last-known copy of the cells, to open links with while the
        // directory does not answer.
        links.remember_cells(&cells);
        let now = confab_shared::now_ms();
        for (status, label) in [
            (CellStatus::Healthy, "healthy"),
            (CellStatus::Draining, "draining"),
            (CellStatus::Down, "down"),
        ] {
            let count = cells.iter().filter(|c| c.status(now) == status).count();
            metrics::gauge!(m::GATEWAY_CELLS, "status" => label).set(count as f64);
        }
    }
}
