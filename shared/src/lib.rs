//! confab's shared vocabulary: everything the gateway and the cells must agree on, and nothing
//! else.
//!
//! - [`ids`]: validated newtype ids (`WorkspaceId`, `UserId`, `ChannelId`, `CellId`, `SessionId`).
//! - [`client`]: frames a client sends over `/v1/ws` and their parsing into typed requests.
//! - [`server`]: frames the server sends to clients, events included, and their encoding.
//! - [`codes`]: error codes and close codes of the protocol, with their HTTP mapping.
//! - [`claims`]: the JWT claims of client and bot tokens.
//! - [`link`]: the gateway<->cell protocol, the one seam between the `gateway` and `cells` crates,
//!   with its binary encoding.
//! - [`link_transport`]: what both ends of a link over a WebSocket agree on (handshake
//!   proofs, pre-authentication bounds, timing, batching into frames).
//! - [`recipient_lists`]: how a cell→gateway link sends a channel's recipient list once and
//!   then only its number.
//! - [`wire`]: the one conversion from a client request to its cell op, and the one error
//!   type both client-facing APIs answer with.
//! - [`limits`]: the protocol's default limits.
//! - [`moves`]: the steps of a live workspace move and the key pages it copies.
//!
//! Architecture invariant: this crate does no I/O and starts no runtime; it is data and pure
//! functions, so it is tested in isolation.

pub mod claims;
pub mod client;
pub mod codes;
pub mod ids;
pub mod limits;
pub mod link;
pub mod link_transport;
pub mod moves;
pub mod recipient_lists;
pub mod server;
pub mod wire;

pub use codes::{CloseCode, ErrorCode};
pub use ids::{CellId, ChannelId, IdError, SessionId, UserId, WorkspaceId};

/// Current Unix time in milliseconds, the unit of every `ts` in the protocol.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Current Unix time in microseconds, used to measure delivery latency.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
