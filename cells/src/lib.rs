//! confab's cell: an actix actor system that owns workspaces — their channels, message logs,
//! memberships and read markers — and talks to gateways only through the link messages of
//! `confab_shared::link`.
//!
//! A tour, from the edge inwards:
//! - [`cell`]: [`Cell::start`] and [`Cell::connect`]; a gateway pushes [`ToCell`] messages into
//!   its [`LinkHandle`], which routes each one to the actor that owns it, without waiting.
//! - `link`: the cell's end of a link — a bounded outbound queue (`try_send` only; overflow
//!   gives the whole link up and fires [`LinkHandle::lost`]) and reply guards that answer every
//!   request exactly once.
//! - `registry`: `DashMap`s of live channel and user actors and of attached sessions, looked up
//!   synchronously on the hot path.
//! - `channel`: `ChannelActor`, one per active channel: the only assigner of its seqs, the
//!   holder of its members and subscribers, the source of its fanout.
//! - `user`: `UserActor`, one per user with sessions: attach (`Ready`, subscriptions,
//!   replay), read markers, channel listings.
//! - `workspace`: channel creation, DMs and admin ops.
//! - `fanout`: subscribers grouped per gateway link; an event is encoded once and costs one
//!   `Deliver` per gateway.
//! - `messages`: the actors' messages.
//! - [`webhooks`]: webhook registration and the delivery worker (SPEC §6), which replays each
//!   channel's durable log from per-webhook cursors kept in the store.
//! - `moving`: the move gate — requests to a workspace that is moving in or out wait there,
//!   or are answered "moved" — and the cell's steps of a live workspace move.
//! - [`store`]: the [`CellStore`] trait (shaped for Redis) and the in-memory engine.
//! - [`link_ws`]: the cell's end of a gateway link over a WebSocket (`/v1/link`: the
//!   authenticated handshake, the bounds on a peer that has not authenticated yet, the pumps).
//! - [`metrics`]: the cell's metric names, its Prometheus recorder and the gauges' sampler.
//! - `shutdown`: [`Cell::shut_down`], the drain on SIGTERM (no new writes, the taken ones
//!   finish, sessions told `4010`, queues handed over).
//! - [`server`]: the cell process ([`server::run`]): claim of the cell id, heartbeat,
//!   `/v1/link`, `/healthz`, `/readyz`, `/metrics`, shutdown.
//!
//! Architecture invariants: a channel's seq is assigned by exactly one actor; every event is
//! durable in the store before it is acked or delivered; no actor ever blocks on a gateway.
//!
//! [`ToCell`]: confab_shared::link::ToCell

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cell;
mod channel;
mod fanout;
mod link;
pub mod link_ws;
mod messages;
pub mod metrics;
mod moving;
mod registry;
pub mod server;
mod shutdown;
pub mod store;
mod user;
pub mod webhooks;
mod workspace;

pub use cell::{
    default_actor_threads, ActorCounts, Cell, CellBounds, CellConfig, CellStats, LinkHandle,
};
pub use shutdown::DrainReport;
pub use store::{CellStore, MemoryStore, RedisStore, StoreError};
pub use webhooks::WebhookConfig;
