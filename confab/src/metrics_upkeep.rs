//! Keeps the Prometheus recorder's histograms drained whether or not anything scrapes them.
//!
//! `metrics-exporter-prometheus` keeps every histogram observation in a pending bucket until
//! something folds the pending ones into the histogram's buckets: a scrape (`render`) or an
//! upkeep. `install_recorder`, unlike the exporter's own `install`, starts no upkeep, so a
//! process that is never scraped (`confab dev` on a laptop, a deployment without
//! Prometheus) kept one pending sample per socket write forever: memory that grew with
//! traffic, about 8 bytes per write, hundreds of MiB an hour at max rate.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

/// How often pending observations are folded in: the exporter's own upkeep period.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Starts a thread that folds `handle`'s pending histogram observations in every
/// [`UPKEEP_EVERY`], for the life of the process.
pub fn spawn(handle: &PrometheusHandle) -> std::io::Result<()> {
    let handle = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        })?;
    Ok(())
}
