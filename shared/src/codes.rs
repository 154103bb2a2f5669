//! Error codes and close codes: the one place that names them (SPEC §4, §5).

use serde::{Deserialize, Serialize};

/// An error code, as sent in `{"op":"error","code":..}` and `{"error":{"code":..}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    NotFound,
    Forbidden,
    Conflict,
    TooLarge,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The HTTP status of the code in the HTTP API (SPEC §5).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// WebSocket close codes (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseCode {
    /// `1000`: normal closure.
    Normal,
    /// `1001`: the gateway is shutting down; reconnect elsewhere.
    GoingAway,
    /// `1009`: a frame was too big.
    FrameTooBig,
    /// `4000`: no frame from the client for twice the heartbeat interval.
    HeartbeatTimeout,
    /// `4001`: bad or expired token.
    BadToken,
    /// `4002`: no `hello` in time.
    HelloTimeout,
    /// `4003`: protocol abuse (too many `bad_request` frames).
    ProtocolAbuse,
    /// `4004`: the token's workspace does not exist.
    UnknownWorkspace,
    /// `4008`: the session's outbound queue overflowed.
    SlowConsumer,
    /// `4010`: reconnect now (workspace moving or cell restarting).
    ReconnectNow,
}

impl CloseCode {
    /// The numeric code sent in the close frame.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::FrameTooBig => 1009,
            CloseCode::HeartbeatTimeout => 4000,
            CloseCode::BadToken => 4001,
            CloseCode::HelloTimeout => 4002,
            CloseCode::ProtocolAbuse => 4003,
            CloseCode::UnknownWorkspace => 4004,
            CloseCode::SlowConsumer => 4008,
            CloseCode::ReconnectNow => 4010,
        }
    }

    /// The reason text sent with the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "bye",
            CloseCode::GoingAway => "gateway shutting down, reconnect elsewhere",
            CloseCode::FrameTooBig => "frame too big",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::BadToken => "bad or expired token",
            CloseCode::HelloTimeout => "no hello in time",
            CloseCode::ProtocolAbuse => "protocol abuse",
            CloseCode::UnknownWorkspace => "unknown workspace",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::ReconnectNow => "reconnect now",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_wire_names() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::Forbidden,
            ErrorCode::Conflict,
            ErrorCode::TooLarge,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
        ] {
            let json = serde_json::to_string(&code).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
