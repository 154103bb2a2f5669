//! Where the client-facing APIs meet the link: the one conversion from a client request to
//! the cell op that performs it ([`request_op`], used by the WebSocket and the HTTP API alike,
//! so both check a request the same way), and the one error type both faces answer with
//! ([`WireError`]: an `error` frame on a socket, `{"error":{...}}` over HTTP).

use serde_json::{json, Value};

use crate::client::{validate, ClientRequest, RequestId};
use crate::codes::ErrorCode;
use crate::ids::UserId;
use crate::limits;
use crate::link::{CellError, CellOp, ChannelOp, UserOp};
use crate::server::ServerFrame;

/// A SPEC error as clients see it: its code, a message for humans and, where the client
/// should wait before retrying, how long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> WireError {
        WireError::new(ErrorCode::BadRequest, message)
    }

    /// The error as a WebSocket `error` frame answering request `id`.
    pub fn to_frame(&self, id: Option<RequestId>) -> ServerFrame {
        ServerFrame::Error {
            id,
            code: self.code,
            message: self.message.clone(),
            retry_after_ms: self.retry_after_ms,
        }
    }

    /// The error's object in an HTTP body (`{"error": <this>}`).
    pub fn to_json(&self) -> Value {
        let mut error = json!({"code": self.code.as_str(), "message": self.message});
        if let Some(ms) = self.retry_after_ms {
            error["retry_after_ms"] = json!(ms);
        }
        error
    }
}

impl From<CellError> for WireError {
    fn from(e: CellError) -> WireError {
        WireError::new(e.code, e.message)
    }
}

impl From<(ErrorCode, String)> for WireError {
    fn from((code, message): (ErrorCode, String)) -> WireError {
        WireError::new(code, message)
    }
}

/// The cell op that performs a client request made by `user`, after checking the bounds
/// serde cannot express (text size, `client_msg_id` length, history limit). `Ok(None)` for
/// the requests the gateway answers itself (`hello`, `ping`, `presence_sub`).
pub fn request_op(
    request: ClientRequest,
    user: &UserId,
    max_text_bytes: usize,
) -> Result<Option<CellOp>, WireError> {
    validate(&request, max_text_bytes)?;
    let on = |channel, op| Some(CellOp::Channel { channel, op });
    Ok(match request {
        ClientRequest::Send {
            channel,
            text,
            client_msg_id,
            thread,
        } => on(
            channel,
            ChannelOp::Send {
                text,
                client_msg_id,
                thread,
            },
        ),
        ClientRequest::Edit { channel, seq, text } => on(channel, ChannelOp::Edit { seq, text }),
        ClientRequest::Delete { channel, seq } => on(channel, ChannelOp::Delete { seq }),
        ClientRequest::Typing { channel } => on(channel, ChannelOp::Typing),
        ClientRequest::History {
            channel,
            before,
            after,
            limit,
        } => on(
            channel,
            ChannelOp::History {
                before,
                after,
                limit: limit.unwrap_or(limits::HISTORY_DEFAULT_LIMIT),
            },
        ),
        ClientRequest::Join { channel } => on(channel, ChannelOp::AddMember { user: user.clone() }),
        ClientRequest::Leave { channel } => {
            on(channel, ChannelOp::RemoveMember { user: user.clone() })
        }
        ClientRequest::Read { channel, seq } => Some(CellOp::User(UserOp::Read { channel, seq })),
        ClientRequest::Hello { .. }
        | ClientRequest::Ping {}
        | ClientRequest::PresenceSub { .. } => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ChannelId;

    fn id<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn op(request: ClientRequest) -> Result<Option<CellOp>, WireError> {
        request_op(request, &id("alice"), limits::MAX_TEXT_BYTES)
    }

    #[test]
    fn a_send_becomes_the_same_send_in_the_cell() {
        let channel: ChannelId = id("general");
        let request = ClientRequest::Send {
            channel: channel.clone(),
            text: "hi".into(),
            client_msg_id: Some("m1".into()),
            thread: Some(3),
        };
        assert_eq!(
            op(request),
            Ok(Some(CellOp::Channel {
                channel,
                op: ChannelOp::Send {
                    text: "hi".into(),
                    client_msg_id: Some("m1".into()),
                    thread: Some(3),
                },
            }))
        );
    }

    #[test]
    fn join_and_leave_name_the_caller() {
        let join = op(ClientRequest::Join {
            channel: id("general"),
        });
        assert_eq!(
            join,
            Ok(Some(CellOp::Channel {
                channel: id("general"),
                op: ChannelOp::AddMember { user: id("alice") },
            }))
        );
        let leave = op(ClientRequest::Leave {
            channel: id("general"),
        });
        assert!(
            matches!(leave, Ok(Some(CellOp::Channel { op: ChannelOp::RemoveMember { user }, .. })) if user.as_str() == "alice")
        );
    }

    #[test]
    fn history_takes_the_default_limit_and_refuses_one_out_of_range() {
        let history = |limit| ClientRequest::History {
            channel: id("general"),
            before: None,
            after: Some(4),
            limit,
        };
        assert!(matches!(
            op(history(None)),
            Ok(Some(CellOp::Channel { op: ChannelOp::History { limit, after: Some(4), .. }, .. })) if limit == limits::HISTORY_DEFAULT_LIMIT
        ));
        let refused = op(history(Some(limits::HISTORY_MAX_LIMIT + 1)));
        assert_eq!(refused.map_err(|e| e.code), Err(ErrorCode::BadRequest));
    }

    #[test]
    fn a_text_too_large_or_empty_is_refused_with_its_code() {
        let send = |text: String| ClientRequest::Send {
            channel: id("general"),
            text,
            client_msg_id: None,
            thread: None,
        };
        let big = op(send("x".repeat(limits::MAX_TEXT_BYTES + 1)));
        assert_eq!(big.map_err(|e| e.code), Err(ErrorCode::TooLarge));
        let empty = op(send("  ".into()));
        assert_eq!(empty.map_err(|e| e.code), Err(ErrorCode::BadRequest));
    }

    #[test]
    fn channel_requests_go_to_their_channel_and_read_to_the_caller() {
        let on = |op| {
            Ok(Some(CellOp::Channel {
                channel: id("general"),
                op,
            }))
        };
        let edit = ClientRequest::Edit {
            channel: id("general"),
            seq: 3,
            text: "fixed".into(),
        };
        assert_eq!(
            op(edit),
            on(ChannelOp::Edit {
                seq: 3,
                text: "fixed".into()
            })
        );
        let delete = ClientRequest::Delete {
            channel: id("general"),
            seq: 3,
        };
        assert_eq!(op(delete), on(ChannelOp::Delete { seq: 3 }));
        let typing = ClientRequest::Typing {
            channel: id("general"),
        };
        assert_eq!(op(typing), on(ChannelOp::Typing));
        let read = ClientRequest::Read {
            channel: id("general"),
            seq: 5,
        };
        assert_eq!(
            op(read),
            Ok(Some(CellOp::User(UserOp::Read {
                channel: id("general"),
                seq: 5,
            })))
        );
    }

    #[test]
    fn requests_the_gateway_answers_itself_have_no_cell_op() {
        assert_eq!(op(ClientRequest::Ping {}), Ok(None));
        assert_eq!(op(ClientRequest::PresenceSub { users: vec![] }), Ok(None));
    }

    #[test]
    fn an_error_reads_the_same_as_a_frame_and_as_an_http_body() {
        let mut error = WireError::new(ErrorCode::RateLimited, "slow down");
        error.retry_after_ms = Some(1500);
        assert_eq!(
            error.to_json(),
            json!({"code": "rate_limited", "message": "slow down", "retry_after_ms": 1500})
        );
        let frame: Value =
            serde_json::from_str(&crate::server::encode(&error.to_frame(None))).unwrap_or_default();
        assert_eq!(frame["code"], "rate_limited");
        assert_eq!(frame["message"], "slow down");
        assert_eq!(frame["retry_after_ms"], 1500);
        let from_cell = WireError::from(CellError::unavailable("later"));
        assert_eq!(
            from_cell.to_json(),
            json!({"code": "unavailable", "message": "later"})
        );
    }
}
