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
/// Clock leeway on token expiry, in seconds.
pub const JWT_LEEWAY_S: u64 = 60;
