//! Progress bars for the long phases (connecting thousands of clients, timed runs). They draw
//! on stderr only when it is a terminal, so CI logs and piped output stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn target() -> ProgressDrawTarget {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar counting `len` items.
pub fn counter(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>24} [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

/// A bar for a timed phase, advanced once a second by the caller, in seconds.
pub fn timer(duration: Duration, label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(duration.as_secs().max(1)), target());
    if let Ok(style) = ProgressStyle::with_template("{prefix:>24} [{bar:40}] {pos}/{len}s {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}
