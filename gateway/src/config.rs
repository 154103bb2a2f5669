//! Gateway configuration: secrets and the protocol limits of SPEC §4, all injectable so tests
//! never depend on the process environment.

use std::time::Duration;

use confab_shared::limits;

/// The per-connection limits of SPEC §4 (flags of `confab dev` and `confab gateway`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_text_bytes: usize,
    /// Client frames per second per connection; bursts of twice this.
    pub client_rate: u32,
    pub queue_events: usize,
    pub queue_bytes: usize,
    pub heartbeat_ms: u64,
    pub hello_timeout_ms: u64,
    /// Client WebSockets served at once; further upgrades are answered `503`.
    pub max_connections: usize,
    /// Upgraded connections from one IP address that have not sent `hello` yet; further
    /// upgrades from it are answered `429`.
    pub max_pending_hello_per_ip: usize,
    /// Time allowed for an HTTP request body to arrive (`408` beyond).
    pub http_body_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: limits::MAX_FRAME_BYTES,
            max_text_bytes: limits::MAX_TEXT_BYTES,
            client_rate: limits::CLIENT_RATE,
            queue_events: limits::QUEUE_EVENTS,
            queue_bytes: limits::QUEUE_BYTES,
            heartbeat_ms: limits::HEARTBEAT_MS,
            hello_timeout_ms: limits::HELLO_TIMEOUT_MS,
            max_connections: limits::MAX_CONNECTIONS,
            max_pending_hello_per_ip: limits::MAX_PENDING_HELLO_PER_IP,
            http_body_timeout_ms: limits::HTTP_BODY_TIMEOUT_MS,
        }
    }
}

/// Everything a gateway needs to know at start-up.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Identifies this gateway process in presence and in links.
    pub gateway_id: String,
    pub jwt_secret: String,
    pub admin_token: String,
    pub limits: Limits,
    /// How long a request may wait for its cell before answering `unavailable`.
    pub request_timeout: Duration,
    /// `--shutdown-timeout-ms`: the longest a shutdown takes, from the signal to the exit,
    /// however many sessions are still open then.
    pub drain_timeout: Duration,
    /// `--shutdown-spread-ms`: shutdown closes sessions with `1001` evenly over this long,
    /// so that their clients do not all reconnect elsewhere in the same instant.
    pub shutdown_spread: Duration,
    /// How often the gateway tells the presence engine its sessions are alive (well within
    /// the engine's session lifetime).
    pub presence_refresh: Duration,
    /// Pause between the pages of a move's bulk copy (`--move-page-delay-ms`), to spare a
    /// busy source store; the frozen part of a move never waits.
    pub move_page_delay: Duration,
}

impl GatewayConfig {
    /// A configuration with default limits.
    pub fn new(gateway_id: String, jwt_secret: String, admin_token: String) -> Self {
        GatewayConfig {
            gateway_id,
            jwt_secret,
            admin_token,
            limits: Limits::default(),
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_millis(limits::SHUTDOWN_TIMEOUT_MS),
            shutdown_spread: Duration::from_millis(limits::SHUTDOWN_SPREAD_MS),
            presence_refresh: Duration::from_secs(10),
            move_page_delay: Duration::ZERO,
        }
    }
}
