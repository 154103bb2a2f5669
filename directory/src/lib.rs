//! Presence and directory engines: the state of a confab deployment that lives outside cells and
//! gateways (SPEC §1, "presence + directory").
//!
//! - [`directory`]: which cells exist (id, region, URL, status, heartbeat, load) and which cell
//!   owns which workspace, with placement by region ([`directory::choose_cell`]).
//! - [`presence`]: which sessions are online; a user's status is derived from its sessions, and
//!   status changes are published to every subscriber.
//! - [`memory`]: the in-memory engines of `confab dev`.
//! - [`moves`]: the record of a workspace move under way (epoch, phase, lease).
//!
//! Each engine is a trait with an in-memory implementation here and a Redis one for
//! production ([`redis_engine`], on a single Redis or a Redis Cluster through
//! [`redis_conn`]), chosen once at start-up; the code above them does not know which it has.

pub mod directory;
pub mod memory;
pub mod moves;
pub mod presence;
pub mod redis_conn;
pub mod redis_engine;
mod redis_moves;

pub use directory::{
    choose_cell, place, CellClaim, CellHolder, CellLoad, CellRecord, CellRegistration, CellStatus,
    CellTenure, CreateWorkspaceError, Directory, DirectoryChange, NoPlacement, WorkspaceRecord,
};
pub use memory::{MemoryDirectory, MemoryPresence};
pub use moves::{MoveBegun, MovePhase, MoveRecord, MOVE_LEASE_MS};
pub use presence::{PresenceChange, PresenceSession, PresenceStore};
pub use redis_conn::{RedisConn, Timeouts as RedisTimeouts};
pub use redis_engine::{RedisDirectory, RedisPresence};

/// An engine could not do what was asked (its backing service is unreachable or answered
/// something unexpected). Callers answer `unavailable`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("engine unavailable: {0}")]
pub struct EngineError(pub String);
