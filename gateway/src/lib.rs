//! The confab gateway: the stateless edge of the deployment (SPEC §1).
//!
//! It terminates client WebSockets at `/v1/ws`, serves the HTTP API for bots and apps
//! (`/v1/...`), the admin API (`/admin/v1/...`), health, readiness and metrics, and the web chat
//! client at `/`. It owns no durable state: it routes each session and request to the cell that
//! owns the workspace, over a link, and fans out what cells send back.
//!
//! - [`config`]: limits and secrets.
//! - [`auth`]: JWT verification and minting, admin token check.
//! - [`links`]: links to cells (in-process or over the network, behind [`links::CellConnector`]):
//!   routing by workspace, request/reply correlation, delivery of cell frames to sessions.
//! - [`link_ws`]: [`link_ws::WsConnector`], the gateway's end of a link over a WebSocket.
//! - [`sessions`]: the registry of local sessions.
//! - [`shards`]: delivery of cells' events on the worker threads that serve the sessions.
//! - [`socket`]: the WebSocket transport: frame reader, each session's bounded outbound queue,
//!   and the write pump that drains it into the socket.
//! - [`ws`]: one client WebSocket, from `hello` to close.
//! - [`presence`]: local presence subscriptions fed by the presence engine's change stream.
//! - [`rate`]: token buckets.
//! - [`http_api`], [`admin`]: the HTTP and admin APIs; [`api_error`] maps errors to HTTP.
//! - [`moves`]: live workspace moves and drains, and the sweep that finishes or undoes a move
//!   whose gateway died.
//! - [`body_timeout`]: a deadline on HTTP request bodies (`408` for a body that trickles in).
//! - [`metrics`]: metric names and the Prometheus exporter; [`cell_watch`] exports the cells
//!   the gateway knows, by status.
//! - [`server`]: builds the HTTP server (the actix-web application, and the upgrade service
//!   that takes WebSockets out of the HTTP/1 dispatcher) and runs it until shutdown.
//!
//! Architecture invariant: the gateway talks to cells only through `confab_shared::link`
//! messages; it never calls cell code.

pub mod admin;
pub mod api_error;
pub mod auth;
pub mod body_timeout;
pub mod cell_watch;
pub mod config;
pub mod deflate;
pub mod http_api;
pub mod link_ws;
pub mod links;
pub mod metrics;
pub mod moves;
pub mod presence;
pub mod rate;
pub mod server;
pub mod sessions;
pub mod shards;
pub mod socket;
pub mod web;
pub mod ws;

pub use config::{GatewayConfig, Limits};
pub use links::{CellConnection, CellConnector, LinkError, LinkSink, Links};
pub use server::{Gateway, GatewayHandle};
