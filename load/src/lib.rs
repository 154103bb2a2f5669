//! `confab-load`: the load generator and benchmark suite that measures confab against the
//! limit of this machine.
//!
//! The limit is [`reference`], a minimal fanout server (every text frame to every client),
//! driven by the same client fleet with the same parameters in the same run, so that
//! confab's figures come with confab÷reference ratios rather than as absolute numbers on a
//! shared two-core machine.
//!
//! - [`client`]: connecting, the confab handshake, and the receive side every connection
//!   shares (seq tracking, latency recording, counters).
//! - [`payload`]: the wire texts: message texts carrying their publish time, confab requests,
//!   reference frames shaped like confab's `message` events.
//! - [`seq`]: per-stream loss, duplicate and order-violation tracking.
//! - [`stats`]: latency histograms (HDR) and the run's counters.
//! - [`scenario`]: fanout, chat mix, idle, reconnect storm (and distributed, as fanout over
//!   several gateways).
//! - [`suite`]: `compare` (reference vs confab, back to back, with ratios and a plot),
//!   `scale` (CPU per delivery from few to many connections) and `smoke` (every scenario,
//!   small, for CI).
//! - [`target`]: the server under load, started here (`confab dev`, the reference server) or
//!   already running; [`procfs`] reads its CPU time and RSS; [`pin`] puts it and the load
//!   generator on separate cores (`--pin`).
//! - [`api`]: tokens and channel setup over confab's HTTP API.
//! - [`capacity`]: unit costs measured on a local distributed deployment, and the capacity
//!   model of `docs/capacity.md` built from them.
//! - [`report`], [`plot`], [`progress`]: results as JSON, Markdown and PNG; progress bars.
//! - [`moving`]: the live-move benchmark (a workspace's pause while it moves between cells).
//! - [`nats`]: NATS's WebSocket server as a third fanout target (its client protocol over
//!   WebSocket frames), for the `?batch=1` comparison of issue 13.
//! - [`wire`]: the socket beneath each client WebSocket: wire byte counts, and inflating
//!   permessage-deflate messages for tungstenite.
//! - [`cli`]: the command line.
//!
//! Traffic goes only to the targets given (in practice 127.0.0.1); every run is bounded in
//! connections and time.

pub mod api;
pub mod capacity;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod moving;
pub mod nats;
pub mod payload;
pub mod pin;
pub mod plot;
pub mod procfs;
pub mod progress;
pub mod reference;
pub mod report;
pub mod scenario;
pub mod seq;
pub mod stats;
pub mod suite;
pub mod target;
pub mod wire;
