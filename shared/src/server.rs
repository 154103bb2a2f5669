//! Frames the server sends to clients (SPEC §4): replies, errors and events, and the shapes they
//! carry (`ChannelInfo`, `MessageView`).
//!
//! Every frame is encoded to JSON exactly once ([`encode`]) into a [`bytestring::ByteString`],
//! a reference-counted UTF-8 buffer: fanout clones the handle, never the bytes.

use std::collections::BTreeMap;

use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::client::RequestId;
use crate::codes::ErrorCode;
use crate::ids::{ChannelId, SessionId, UserId, WorkspaceId};

/// A channel's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Public,
    Private,
    Dm,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Public => "public",
            ChannelKind::Private => "private",
            ChannelKind::Dm => "dm",
        }
    }
}

/// A channel as listed in `ready`, `channel_added` and the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub id: ChannelId,
    pub name: String,
    pub kind: ChannelKind,
    /// The seq of the channel's latest event (0 when it has none).
    pub last_seq: u64,
    /// The caller's read marker (0 when it has read nothing or is not a member).
    pub read_seq: u64,
}

/// A message as `history` returns it: as it stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    pub seq: u64,
    pub ts: u64,
    pub user: UserId,
    pub text: String,
    pub client_msg_id: Option<String>,
    pub thread: Option<u64>,
    pub edited: bool,
    pub deleted: bool,
}

/// A user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Offline,
}

/// An event (`{"op":"event","type":..}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Message {
        channel: ChannelId,
        seq: u64,
        ts: u64,
        user: UserId,
        text: String,
        client_msg_id: Option<String>,
        thread: Option<u64>,
    },
    MessageEdited {
        channel: ChannelId,
        seq: u64,
        ts: u64,
        user: UserId,
        target: u64,
        text: String,
    },
    MessageDeleted {
        channel: ChannelId,
        seq: u64,
        ts: u64,
        user: UserId,
        target: u64,
    },
    MemberJoined {
        channel: ChannelId,
        seq: u64,
        ts: u64,
        user: UserId,
    },
    MemberLeft {
        channel: ChannelId,
        seq: u64,
        ts: u64,
        user: UserId,
    },
    Typing {
        channel: ChannelId,
        user: UserId,
    },
    Read {
        channel: ChannelId,
        seq: u64,
    },
    Presence {
        user: UserId,
        status: Status,
    },
    ChannelAdded {
        channel: ChannelId,
        info: ChannelInfo,
    },
    Resync {
        channel: ChannelId,
    },
}

impl Event {
    /// The seq of a channel-log event; `None` for ephemeral events.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Event::Message { seq, .. }
            | Event::MessageEdited { seq, .. }
            | Event::MessageDeleted { seq, .. }
            | Event::MemberJoined { seq, .. }
            | Event::MemberLeft { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// The wire name of the event type, as webhooks list them.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Message { .. } => "message",
            Event::MessageEdited { .. } => "message_edited",
            Event::MessageDeleted { .. } => "message_deleted",
            Event::MemberJoined { .. } => "member_joined",
            Event::MemberLeft { .. } => "member_left",
            Event::Typing { .. } => "typing",
            Event::Read { .. } => "read",
            Event::Presence { .. } => "presence",
            Event::ChannelAdded { .. } => "channel_added",
            Event::Resync { .. } => "resync",
        }
    }
}

/// Every frame the server sends, by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame {
    Ready {
        session: SessionId,
        user: UserId,
        workspace: WorkspaceId,
        heartbeat_ms: u64,
        channels: Vec<ChannelInfo>,
    },
    Ack {
        id: Option<RequestId>,
        channel: ChannelId,
        seq: u64,
        ts: u64,
    },
    History {
        id: Option<RequestId>,
        channel: ChannelId,
        messages: Vec<MessageView>,
        has_more: bool,
    },
    Presence {
        id: Option<RequestId>,
        users: BTreeMap<UserId, Status>,
    },
    Pong {
        id: Option<RequestId>,
    },
    Error {
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Event(Event),
}

/// Encodes a frame to its JSON text, once; the result is shared by every recipient.
pub fn encode(frame: &ServerFrame) -> ByteString {
    // Serializing these types cannot fail: every map key is a string and no value is a float.
    ByteString::from(serde_json::to_string(frame).unwrap_or_default())
}

/// Encodes an event as its `{"op":"event",..}` frame.
pub fn encode_event(event: &Event) -> ByteString {
    // Cloning the event keeps `ServerFrame` owned and simple; events are encoded once each.
    encode(&ServerFrame::Event(event.clone()))
}

/// Writes the header of an unmasked WebSocket frame (RFC 6455 §5.2) with a payload of `len`
/// bytes: `first` is the byte of FIN, RSV and opcode. A server's frames are never masked; the
/// gateway's write pump and the load generator's wire layer both build frames with it.
pub fn put_frame_header(buf: &mut bytes::BytesMut, first: u8, len: usize) {
    use bytes::BufMut;
    buf.put_u8(first);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        buf.put_u8(126);
        buf.put_u16(len);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn message_event_has_op_type_and_nullable_fields() {
        let event = Event::Message {
            channel: id("general"),
            seq: 3,
            ts: 1000,
            user: UserId::new("alice").unwrap_or_else(|e| panic!("{e}")),
            text: "hi".into(),
            client_msg_id: None,
            thread: None,
        };
        let json: serde_json::Value =
            serde_json::from_str(&encode_event(&event)).unwrap_or_default();
        assert_eq!(json["op"], "event");
        assert_eq!(json["type"], "message");
        assert_eq!(json["channel"], "general");
        assert_eq!(json["seq"], 3);
        assert!(json["client_msg_id"].is_null());
        assert!(json.as_object().is_some_and(|o| o.contains_key("thread")));
    }

    #[test]
    fn error_frame_echoes_null_id_and_omits_retry_when_absent() {
        let frame = ServerFrame::Error {
            id: None,
            code: ErrorCode::BadRequest,
            message: "no".into(),
            retry_after_ms: None,
        };
        let json: serde_json::Value = serde_json::from_str(&encode(&frame)).unwrap_or_default();
        assert_eq!(json["op"], "error");
        assert!(json["id"].is_null());
        assert_eq!(json["code"], "bad_request");
        assert!(json.get("retry_after_ms").is_none());
    }

    #[test]
    fn presence_event_has_no_channel() {
        let event = Event::Presence {
            user: UserId::new("bob").unwrap_or_else(|e| panic!("{e}")),
            status: Status::Online,
        };
        let json: serde_json::Value =
            serde_json::from_str(&encode_event(&event)).unwrap_or_default();
        assert!(json.get("channel").is_none());
        assert_eq!(json["status"], "online");
    }
}
