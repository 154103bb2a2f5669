//! The protocol's default limits (SPEC §4); each is a flag of `confab dev` and `confab gateway`.

/// Largest client frame in bytes (close `1009` beyond).
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest message text in bytes of UTF-8 (`too_large` beyond).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Client frames per second per connection; bursts of twice this.
pub const CLIENT_RATE: u32 = 20;
/// Outbound queue bound per session, in events.
pub const QUEUE_EVENTS: usize = 4096;
/// Outbound queue bound per session, in bytes.
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Heartbeat interval announced in `ready`; silence for twice this closes with `4000`.
pub const HEARTBEAT_MS: u64 = 30_000;
/// Time allowed between connecting and `hello` (`4002` beyond).
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// Client WebSockets one gateway serves at once; an upgrade beyond gets `503`.
pub const MAX_CONNECTIONS: usize = 50_000;
/// Connections from one IP address upgraded but still without `hello`; an upgrade beyond gets
/// `429`.
pub const MAX_PENDING_HELLO_PER_IP: usize = 64;
/// Time allowed for an HTTP request's body to arrive, from the end of its headers (`408`
/// beyond).
pub const HTTP_BODY_TIMEOUT_MS: u64 = 10_000;
/// Refused frames (`bad_request` or `rate_limited`) tolerated in [`ABUSE_WINDOW_MS`] before
/// `4003`.
pub const ABUSE_BAD_REQUESTS: u32 = 20;
/// The window of [`ABUSE_BAD_REQUESTS`].
pub const ABUSE_WINDOW_MS: u64 = 10_000;
/// Events kept per channel for `resume` and `client_msg_id` de-duplication.
pub const RETENTION_EVENTS: u64 = 10_000;
/// Most users in one `presence_sub`.
pub const MAX_PRESENCE_USERS: usize = 500;
/// Most channels named in one `resume`.
pub const MAX_RESUME_CHANNELS: usize = 1000;
/// Default and largest `history` page.
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;
pub const HISTORY_MAX_LIMIT: u32 = 200;
/// Typing events from one user in one channel within this window after a forwarded one are
/// dropped.
pub const TYPING_THROTTLE_MS: u64 = 3_000;
/// Longest `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
/// Longest channel name, in bytes.
pub const MAX_CHANNEL_NAME_BYTES: usize = 80;
/// Most members named when creating a channel.
pub const MAX_INITIAL_MEMBERS: usize = 1000;

// Bounds on what the API can be made to produce (flags of `dev` and `cell`). They keep every
// reply far below the 16 MiB a single gateway↔cell link frame may carry. Worst cases, with
// 64-character ids, 80-byte names of control characters (each escaped as `\u00XX` in JSON:
// 480 bytes) and 20-digit seqs:
// - one channel: 167 bytes on the link (postcard), 645 bytes in a client's JSON;
// - `ready` and `GET /v1/channels` (the caller's channels, DMs included): 2,000 channels =
//   334 KB on the link, 1.3 MB of JSON (a third of the 4 MiB session queue);
// - `GET /v1/channels?scope=public`: 10,000 channels = 1.7 MB on the link, 6.5 MB of JSON
//   (HTTP only, so no session queue holds it);
// - `GET /v1/channels/{id}/members`: 10,000 members = 650 KB on the link, 670 KB of JSON.
/// Public and private channels of one workspace (DMs are not counted: each is bounded by its
/// two members' [`MAX_CHANNELS_PER_USER`]).
pub const MAX_CHANNELS_PER_WORKSPACE: usize = 10_000;
/// Channels (DMs included) one user may be a member of.
pub const MAX_CHANNELS_PER_USER: usize = 2_000;
/// Members of one channel.
pub const MAX_MEMBERS_PER_CHANNEL: usize = 10_000;
/// Clock leeway on token expiry, in seconds.
pub const JWT_LEEWAY_S: u64 = 60;

/// `--shutdown-spread-ms`: a gateway closes its sessions with `1001` evenly over this long
/// (SPEC §1).
pub const SHUTDOWN_SPREAD_MS: u64 = 5_000;
/// `--shutdown-timeout-ms`: a gateway exits at the latest this long after its signal.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 30_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{encode, CellReply, ToGateway};
    use crate::server::{self, ChannelInfo, ChannelKind, ServerFrame};
    use crate::{UserId, WorkspaceId};

    /// The largest WebSocket message a gateway↔cell link accepts (`confab/src/link_ws.rs`).
    const LINK_FRAME_BYTES: usize = 16 * 1024 * 1024;

    fn id<T: std::str::FromStr>(prefix: char, n: usize) -> T
    where
        T::Err: std::fmt::Debug,
    {
        let s = format!("{prefix}{n:063}");
        s.parse().unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    /// A channel whose every field has its longest encoding.
    fn worst_channel(n: usize) -> ChannelInfo {
        ChannelInfo {
            id: id('C', n),
            name: "\u{1}".repeat(MAX_CHANNEL_NAME_BYTES),
            kind: ChannelKind::Private,
            last_seq: u64::MAX,
            read_seq: u64::MAX,
        }
    }

    #[test]
    fn the_biggest_replies_at_the_default_limits_stay_far_below_a_link_frame() {
        let one = encode(&worst_channel(0)).len();
        assert!(one <= 167, "one channel takes {one} bytes on the link");
        let mine: Vec<ChannelInfo> = (0..MAX_CHANNELS_PER_USER).map(worst_channel).collect();
        let ready = encode(&ToGateway::Ready {
            session: id('s', 0),
            channels: mine.clone(),
        });
        let public: Vec<ChannelInfo> = (0..MAX_CHANNELS_PER_WORKSPACE).map(worst_channel).collect();
        let listing = encode(&ToGateway::Reply {
            req: u64::MAX,
            result: Ok(CellReply::Channels(public)),
        });
        let members: Vec<UserId> = (0..MAX_MEMBERS_PER_CHANNEL).map(|n| id('u', n)).collect();
        let members = encode(&ToGateway::Reply {
            req: u64::MAX,
            result: Ok(CellReply::Members(members)),
        });
        for (what, len) in [
            ("ready", ready.len()),
            ("public listing", listing.len()),
            ("member list", members.len()),
        ] {
            assert!(
                len < LINK_FRAME_BYTES / 8,
                "{what} takes {len} bytes on the link"
            );
        }
        // The client's JSON `ready` fits the session queue with room to spare.
        let json = server::encode(&ServerFrame::Ready {
            session: id('s', 0),
            user: id('u', 0),
            workspace: id::<WorkspaceId>('w', 0),
            heartbeat_ms: HEARTBEAT_MS,
            channels: mine,
        });
        assert!(
            json.len() < QUEUE_BYTES / 2,
            "ready is {} bytes",
            json.len()
        );
    }
}
