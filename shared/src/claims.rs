//! JWT claims of client and bot tokens (SPEC §3). Signing and verification live in the
//! gateway; this is only their shape.

use serde::{Deserialize, Serialize};

use crate::ids::{UserId, WorkspaceId};

/// The claims of a client or bot token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: UserId,
    /// The workspace id.
    pub wsp: WorkspaceId,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether the token is a bot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<bool>,
}
