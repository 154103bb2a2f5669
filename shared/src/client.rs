//! Frames a client sends over `/v1/ws` (SPEC §4) and their parsing.
//!
//! Parsing is two-step on purpose: the frame is first read as a JSON object so that its `id`
//! can be echoed in the error even when the rest of the frame is ill-typed, then the object is
//! read as the typed request named by its `op`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::ids::{ChannelId, UserId};
use crate::limits;

/// A request id: an integer or a string of at most 64 characters, echoed in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Int(i64),
    Str(String),
}

/// The requests of SPEC §4, by `op`. `Serialize` writes the frame back (without its `id`):
/// clients and the fuzz round-trip check use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientRequest {
    Hello {
        token: String,
        #[serde(default)]
        resume: Option<BTreeMap<ChannelId, u64>>,
    },
    Send {
        channel: ChannelId,
        text: String,
        #[serde(default)]
        client_msg_id: Option<String>,
        #[serde(default)]
        thread: Option<u64>,
    },
    Edit {
        channel: ChannelId,
        seq: u64,
        text: String,
    },
    Delete {
        channel: ChannelId,
        seq: u64,
    },
    Typing {
        channel: ChannelId,
    },
    History {
        channel: ChannelId,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Join {
        channel: ChannelId,
    },
    Leave {
        channel: ChannelId,
    },
    Read {
        channel: ChannelId,
        seq: u64,
    },
    PresenceSub {
        users: Vec<UserId>,
    },
    Ping {},
}

impl ClientRequest {
    /// The op name, for logs and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            ClientRequest::Hello { .. } => "hello",
            ClientRequest::Send { .. } => "send",
            ClientRequest::Edit { .. } => "edit",
            ClientRequest::Delete { .. } => "delete",
            ClientRequest::Typing { .. } => "typing",
            ClientRequest::History { .. } => "history",
            ClientRequest::Join { .. } => "join",
            ClientRequest::Leave { .. } => "leave",
            ClientRequest::Read { .. } => "read",
            ClientRequest::PresenceSub { .. } => "presence_sub",
            ClientRequest::Ping {} => "ping",
        }
    }
}

/// A parsed client frame: its request and the id to echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    pub id: Option<RequestId>,
    pub request: ClientRequest,
}

/// Why a frame was refused, with the id to echo when one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    fn bad_request(id: Option<RequestId>, message: impl Into<String>) -> Self {
        FrameError {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

/// Parses and validates one text frame. `max_text_bytes` bounds `send` and `edit` texts.
pub fn parse_frame(text: &str, max_text_bytes: usize) -> Result<ClientFrame, FrameError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| FrameError::bad_request(None, format!("frame is not JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(FrameError::bad_request(None, "frame is not a JSON object"));
    };
    let id = match object.remove("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(raw) => Some(parse_request_id(raw)?),
    };
    match object.get("op") {
        Some(serde_json::Value::String(_)) => {}
        Some(_) => return Err(FrameError::bad_request(id, "\"op\" must be a string")),
        None => return Err(FrameError::bad_request(id, "missing \"op\"")),
    }
    let request: ClientRequest = serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| FrameError::bad_request(id.clone(), describe_serde_error(&e)))?;
    validate(&request, max_text_bytes).map_err(|(code, message)| FrameError {
        id: id.clone(),
        code,
        message,
    })?;
    Ok(ClientFrame { id, request })
}

fn parse_request_id(raw: serde_json::Value) -> Result<RequestId, FrameError> {
    match raw {
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(RequestId::Int)
            .ok_or_else(|| FrameError::bad_request(None, "\"id\" must be an integer or a string")),
        serde_json::Value::String(s) if s.chars().count() <= 64 => Ok(RequestId::Str(s)),
        serde_json::Value::String(_) => Err(FrameError::bad_request(
            None,
            "\"id\" is longer than 64 characters",
        )),
        _ => Err(FrameError::bad_request(
            None,
            "\"id\" must be an integer or a string",
        )),
    }
}

fn describe_serde_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("unknown variant") {
        // "unknown variant `foo`, expected one of ..." names the op; keep it short.
        let op = text.split('`').nth(1).unwrap_or("");
        format!("unknown op {op:?}")
    } else {
        text
    }
}

/// Checks the bounds serde cannot express.
pub fn validate(request: &ClientRequest, max_text_bytes: usize) -> Result<(), (ErrorCode, String)> {
    let bad = |m: &str| Err((ErrorCode::BadRequest, m.to_string()));
    match request {
        ClientRequest::Hello {
            resume: Some(resume),
            ..
        } if resume.len() > limits::MAX_RESUME_CHANNELS => bad("resume names too many channels"),
        ClientRequest::Send {
            text,
            client_msg_id,
            ..
        } => {
            check_text(text, max_text_bytes)?;
            match client_msg_id {
                Some(cmid) if cmid.is_empty() || cmid.len() > limits::MAX_CLIENT_MSG_ID_BYTES => {
                    bad("client_msg_id must be 1 to 64 bytes")
                }
                _ => Ok(()),
            }
        }
        ClientRequest::Edit { text, .. } => check_text(text, max_text_bytes),
        ClientRequest::History {
            limit: Some(limit), ..
        } if !(1..=limits::HISTORY_MAX_LIMIT).contains(limit) => {
            bad("limit must be between 1 and 200")
        }
        ClientRequest::PresenceSub { users } if users.len() > limits::MAX_PRESENCE_USERS => {
            bad("presence_sub names more than 500 users")
        }
        _ => Ok(()),
    }
}

/// A message text must be non-empty and at most `max_text_bytes` of UTF-8.
pub fn check_text(text: &str, max_text_bytes: usize) -> Result<(), (ErrorCode, String)> {
    if text.len() > max_text_bytes {
        return Err((
            ErrorCode::TooLarge,
            format!("text is over {max_text_bytes} bytes"),
        ));
    }
    if text.trim().is_empty() {
        return Err((ErrorCode::BadRequest, "text is empty".to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        parse_frame(text, limits::MAX_TEXT_BYTES)
    }

    #[test]
    fn parses_send_with_its_id() {
        let frame = parse(r#"{"op":"send","id":7,"channel":"general","text":"hi"}"#)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(frame.id, Some(RequestId::Int(7)));
        assert!(matches!(frame.request, ClientRequest::Send { .. }));
    }

    #[test]
    fn unknown_op_is_bad_request_with_the_id() {
        let err = parse(r#"{"op":"dance","id":"x"}"#).err();
        let err = err.unwrap_or_else(|| panic!("accepted"));
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(err.id, Some(RequestId::Str("x".into())));
        assert!(err.message.contains("dance"), "{}", err.message);
    }

    #[test]
    fn ill_typed_field_is_bad_request() {
        let err = parse(r#"{"op":"send","id":1,"channel":5,"text":"hi"}"#).err();
        assert_eq!(err.map(|e| e.code), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn not_json_and_not_object_are_bad_request() {
        assert_eq!(
            parse("nope").err().map(|e| e.code),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            parse("[1]").err().map(|e| e.code),
            Some(ErrorCode::BadRequest)
        );
    }

    #[test]
    fn oversize_text_is_too_large() {
        let text = "x".repeat(limits::MAX_TEXT_BYTES + 1);
        let frame = format!(r#"{{"op":"send","channel":"general","text":"{text}"}}"#);
        assert_eq!(
            parse(&frame).err().map(|e| e.code),
            Some(ErrorCode::TooLarge)
        );
    }

    #[test]
    fn history_limit_is_bounded() {
        let err = parse(r#"{"op":"history","channel":"g","limit":201}"#).err();
        assert_eq!(err.map(|e| e.code), Some(ErrorCode::BadRequest));
        assert!(parse(r#"{"op":"history","channel":"g","limit":200}"#).is_ok());
    }

    #[test]
    fn ping_accepts_an_id() {
        let frame = parse(r#"{"op":"ping","id":"p"}"#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(frame.request, ClientRequest::Ping {});
    }
}
