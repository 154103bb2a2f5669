//! The command line of SPEC §1. Every flag also reads `CONFAB_<FLAG>` from the environment.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};
use confab_cells::{CellConfig, WebhookConfig};
use confab_gateway::Limits;
use confab_shared::{limits, CellId};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "confab",
    version,
    about = "Self-hostable real-time messaging backend"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything in one process with in-memory engines: a gateway and one cell.
    Dev(DevArgs),
    /// A stateless gateway: client WebSockets, HTTP and admin APIs.
    Gateway(GatewayArgs),
    /// A cell: owns workspaces, registers in the directory.
    Cell(CellArgs),
    /// Operator commands over the admin API.
    Ctl(CtlArgs),
}

/// The limits of SPEC §4, flags of `dev` and `gateway`.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest client frame in bytes (close 1009 beyond).
    #[arg(long, env = "CONFAB_MAX_FRAME_BYTES", default_value_t = limits::MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Largest message text in bytes of UTF-8 (`too_large` beyond).
    #[arg(long, env = "CONFAB_MAX_TEXT_BYTES", default_value_t = limits::MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,
    /// Client frames per second per connection; bursts of twice this.
    #[arg(long, env = "CONFAB_CLIENT_RATE", default_value_t = limits::CLIENT_RATE)]
    pub client_rate: u32,
    /// Outbound queue per session, in events (`--queue-bytes` is the byte bound).
    #[arg(long, env = "CONFAB_QUEUE_EVENTS", default_value_t = limits::QUEUE_EVENTS)]
    pub queue_events: usize,
    /// Outbound queue per session, in bytes of the frames queued (4008 beyond).
    #[arg(long, env = "CONFAB_QUEUE_BYTES", default_value_t = limits::QUEUE_BYTES)]
    pub queue_bytes: usize,
    /// Heartbeat interval announced in `ready`; silence for twice this closes with 4000.
    #[arg(long, env = "CONFAB_HEARTBEAT_MS", default_value_t = limits::HEARTBEAT_MS)]
    pub heartbeat_ms: u64,
    /// Time allowed between connecting and `hello` (4002 beyond).
    #[arg(long, env = "CONFAB_HELLO_TIMEOUT_MS", default_value_t = limits::HELLO_TIMEOUT_MS)]
    pub hello_timeout_ms: u64,
    /// Client WebSockets served at once; further upgrades are answered 503.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS", default_value_t = limits::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Upgraded connections from one IP address still without `hello`; further upgrades from
    /// it are answered 429.
    #[arg(long, env = "CONFAB_MAX_PENDING_HELLO_PER_IP", default_value_t = limits::MAX_PENDING_HELLO_PER_IP)]
    pub max_pending_hello_per_ip: usize,
    /// Time allowed for an HTTP request body to arrive (408 beyond).
    #[arg(long, env = "CONFAB_HTTP_BODY_TIMEOUT_MS", default_value_t = limits::HTTP_BODY_TIMEOUT_MS)]
    pub http_body_timeout_ms: u64,
}

impl LimitArgs {
    pub fn to_limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes.max(1),
            max_text_bytes: self.max_text_bytes.max(1),
            client_rate: self.client_rate.max(1),
            queue_events: self.queue_events.max(1),
            queue_bytes: self.queue_bytes.max(1),
            heartbeat_ms: self.heartbeat_ms.max(1),
            hello_timeout_ms: self.hello_timeout_ms.max(1),
            max_connections: self.max_connections.max(1),
            max_pending_hello_per_ip: self.max_pending_hello_per_ip.max(1),
            http_body_timeout_ms: self.http_body_timeout_ms.max(1),
        }
    }
}

/// Bounds on what one workspace's users can create, flags of `dev` and `cell`. They keep
/// every reply the API can produce far below what one gateway↔cell link frame carries (see
/// `confab_shared::limits` for the worst cases).
#[derive(Debug, Clone, Args)]
pub struct CellLimitArgs {
    /// Public and private channels one workspace may have (DMs are not counted); creating
    /// one more answers 409 `conflict`.
    #[arg(long, env = "CONFAB_MAX_CHANNELS_PER_WORKSPACE", default_value_t = limits::MAX_CHANNELS_PER_WORKSPACE)]
    pub max_channels_per_workspace: usize,
    /// Channels, DMs included, one user may be a member of; a join, an add or a creation
    /// that would make it one more answers 409 `conflict`.
    #[arg(long, env = "CONFAB_MAX_CHANNELS_PER_USER", default_value_t = limits::MAX_CHANNELS_PER_USER)]
    pub max_channels_per_user: usize,
    /// Members one channel may have (at least 2); a join or add beyond answers 409
    /// `conflict`, a creation naming more answers 400 `bad_request`.
    #[arg(long, env = "CONFAB_MAX_MEMBERS_PER_CHANNEL", default_value_t = limits::MAX_MEMBERS_PER_CHANNEL)]
    pub max_members_per_channel: usize,
    /// Threads the cell's channel and user actors run on (default: one per core). Each
    /// channel keeps one actor, on the thread its id hashes to.
    #[arg(long, env = "CONFAB_ACTOR_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub actor_threads: Option<u16>,
}

impl CellLimitArgs {
    /// The cell's config with these limits.
    pub fn to_config(&self, id: CellId, retention_events: u64) -> CellConfig {
        CellConfig {
            retention_events: retention_events.max(1),
            max_channels_per_workspace: self.max_channels_per_workspace.max(1),
            max_channels_per_user: self.max_channels_per_user.max(1),
            max_members_per_channel: self.max_members_per_channel.max(2),
            actor_threads: self
                .actor_threads
                .map_or_else(confab_cells::default_actor_threads, usize::from),
            ..CellConfig::new(id)
        }
    }
}

/// Webhook delivery (SPEC §6), flags of `dev` and `cell`.
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// An attempt without a 2xx answer within this long has failed and is retried.
    #[arg(long, env = "CONFAB_WEBHOOK_TIMEOUT_MS", default_value_t = 5000)]
    pub webhook_timeout_ms: u64,
    /// Longest wait between two attempts of one delivery (the wait starts at 1 s and doubles).
    #[arg(long, env = "CONFAB_WEBHOOK_BACKOFF_MAX_S", default_value_t = 600)]
    pub webhook_backoff_max_s: u64,
    /// A delivery not done this long after its event was created is dropped (and counted).
    #[arg(long, env = "CONFAB_WEBHOOK_GIVE_UP_AFTER_S", default_value_t = 86_400)]
    pub webhook_give_up_after_s: u64,
    /// A webhook whose attempts all failed for this long becomes `disabled`.
    #[arg(long, env = "CONFAB_WEBHOOK_DISABLE_AFTER_S", default_value_t = 3600)]
    pub webhook_disable_after_s: u64,
    /// Refuse webhook destinations on loopback, private, link-local and unique-local
    /// addresses, at registration and after DNS resolution at delivery.
    #[arg(long, env = "CONFAB_WEBHOOK_DENY_PRIVATE")]
    pub webhook_deny_private: bool,
    /// Webhooks one user may register (409 beyond).
    #[arg(long, env = "CONFAB_MAX_WEBHOOKS_PER_USER", default_value_t = 20)]
    pub max_webhooks_per_user: usize,
    /// Webhook attempts in flight at once to one destination host and port.
    #[arg(long, env = "CONFAB_WEBHOOK_PER_HOST", default_value_t = 16)]
    pub webhook_per_host: usize,
}

impl WebhookArgs {
    /// The cell's webhook config from these flags.
    pub fn to_config(&self) -> WebhookConfig {
        WebhookConfig {
            timeout: Duration::from_millis(self.webhook_timeout_ms.max(1)),
            backoff_max: Duration::from_secs(self.webhook_backoff_max_s.max(1)),
            give_up_after: Duration::from_secs(self.webhook_give_up_after_s.max(1)),
            disable_after: Duration::from_secs(self.webhook_disable_after_s.max(1)),
            deny_private: self.webhook_deny_private,
            max_per_user: self.max_webhooks_per_user.max(1),
            per_host: self.webhook_per_host.max(1),
        }
    }
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address to serve HTTP and WebSockets on (port 0 picks a free port).
    #[arg(long, env = "CONFAB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Secret of the HS256 client and bot tokens.
    #[arg(long, env = "CONFAB_JWT_SECRET", default_value = "dev-secret")]
    pub jwt_secret: String,
    /// Bearer token of the admin API.
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", default_value = "dev-admin")]
    pub admin_token: String,
    /// Events kept per channel for `resume` and `client_msg_id` de-duplication.
    #[arg(long, env = "CONFAB_RETENTION_EVENTS", default_value_t = limits::RETENTION_EVENTS)]
    pub retention_events: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub cell_limits: CellLimitArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[arg(long, env = "CONFAB_LISTEN")]
    pub listen: SocketAddr,
    /// The presence + directory Redis: `redis://HOST:PORT`, or a Redis Cluster by its seed
    /// nodes, `redis+cluster://HOST:PORT,HOST:PORT,…`.
    #[arg(long, env = "CONFAB_REDIS")]
    pub redis: String,
    #[arg(long, env = "CONFAB_JWT_SECRET")]
    pub jwt_secret: String,
    #[arg(long, env = "CONFAB_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Authenticates links to cells in both directions when set (see docs/operations.md).
    #[arg(long, env = "CONFAB_CLUSTER_SECRET")]
    pub cluster_secret: Option<String>,
    /// Largest WebSocket frame a link sends or accepts (at least 4096); a larger message
    /// crosses as several frames.
    #[arg(long, env = "CONFAB_LINK_MAX_FRAME_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub link_max_frame_bytes: usize,
    /// A session whose gateway stopped refreshing it counts as gone after this long.
    #[arg(long, env = "CONFAB_PRESENCE_TTL_MS", default_value_t = 30_000)]
    pub presence_ttl_ms: u64,
    /// A request a cell has not answered after this long is answered `unavailable` (at least
    /// 100).
    #[arg(long, env = "CONFAB_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Pause between the pages of a workspace move's bulk copy, to spare a busy source
    /// store (0: none). The frozen part of a move never waits.
    #[arg(long, env = "CONFAB_MOVE_PAGE_DELAY_MS", default_value_t = 0)]
    pub move_page_delay_ms: u64,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

/// How a gateway shuts down on SIGTERM or SIGINT (SPEC §1).
#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// Sessions are closed with `1001` evenly over this long, so that their clients do not all
    /// reconnect in the same instant.
    #[arg(long, env = "CONFAB_SHUTDOWN_SPREAD_MS", default_value_t = limits::SHUTDOWN_SPREAD_MS)]
    pub shutdown_spread_ms: u64,
    /// The process exits at the latest this long after the signal, sessions still open or not.
    #[arg(long, env = "CONFAB_SHUTDOWN_TIMEOUT_MS", default_value_t = limits::SHUTDOWN_TIMEOUT_MS)]
    pub shutdown_timeout_ms: u64,
}

impl ShutdownArgs {
    /// Sets the gateway's shutdown timing from these flags.
    pub fn apply(&self, config: &mut confab_gateway::GatewayConfig) {
        config.shutdown_spread = std::time::Duration::from_millis(self.shutdown_spread_ms);
        config.drain_timeout = std::time::Duration::from_millis(self.shutdown_timeout_ms);
    }
}

#[derive(Debug, Args)]
pub struct CellArgs {
    #[arg(long, env = "CONFAB_ID")]
    pub id: String,
    #[arg(long, env = "CONFAB_REGION")]
    pub region: String,
    #[arg(long, env = "CONFAB_LISTEN")]
    pub listen: SocketAddr,
    /// Base URL gateways use to reach this cell (its `/v1/link`).
    #[arg(long, env = "CONFAB_ADVERTISE")]
    pub advertise: String,
    /// The cell's own store.
    #[arg(long, env = "CONFAB_REDIS")]
    pub redis: String,
    /// The shared presence + directory Redis: `redis://HOST:PORT`, or a Redis Cluster by its
    /// seed nodes, `redis+cluster://HOST:PORT,HOST:PORT,…`.
    #[arg(long, env = "CONFAB_DIRECTORY")]
    pub directory: String,
    /// Authenticates gateways' links in both directions when set; without it the cell
    /// accepts links from loopback addresses only.
    #[arg(long, env = "CONFAB_CLUSTER_SECRET")]
    pub cluster_secret: Option<String>,
    /// Largest WebSocket frame a link sends or accepts (at least 4096); a larger message
    /// crosses as several frames.
    #[arg(long, env = "CONFAB_LINK_MAX_FRAME_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub link_max_frame_bytes: usize,
    /// Events kept per channel for `resume` and `client_msg_id` de-duplication.
    #[arg(long, env = "CONFAB_RETENTION_EVENTS", default_value_t = limits::RETENTION_EVENTS)]
    pub retention_events: u64,
    #[command(flatten)]
    pub cell_limits: CellLimitArgs,
    /// How the store fsyncs, as the operator states it. Unset (the default): the store must be
    /// verified (`CONFIG GET`) to run `appendonly yes` with `appendfsync always`, else the cell
    /// refuses to start. `always`: the same, and where `CONFIG GET` is refused (managed Redis)
    /// the operator vouches for it. `everysec`: `appendfsync everysec` is accepted too, with up
    /// to a second of acked events lost on a crash of the store.
    #[arg(long, env = "CONFAB_STORE_FSYNC", value_enum)]
    pub store_fsync: Option<crate::durability::StoreFsync>,
    /// Workspaces this cell takes at most: placement skips it once it holds this many
    /// (default: no bound).
    #[arg(long, env = "CONFAB_MAX_WORKSPACES")]
    pub max_workspaces: Option<u64>,
    /// Client sessions this cell serves at most: one more attach answers `unavailable`, and
    /// placement skips the cell while it is at the bound (default: no bound).
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Base URL of any gateway, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "CONFAB_GATEWAY")]
    pub gateway: String,
    #[arg(long, env = "CONFAB_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Print the admin API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List cells with their region, status and load.
    Cells,
    /// Operate on one cell.
    Cell {
        #[command(subcommand)]
        command: CellCommand,
    },
    /// Create, show or move workspaces.
    Workspace {
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// Mint a client or bot token.
    Token {
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        bot: bool,
        /// Lifetime in seconds (default: one day).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// List workspaces with their cell and region.
    Workspaces {
        /// Only the workspaces of this cell.
        #[arg(long)]
        cell: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CellCommand {
    /// Place no new workspace on the cell; with --move, also move its workspaces off it and
    /// wait until it holds none.
    Drain {
        id: String,
        /// Move the cell's workspaces, one at a time, to the healthy cells of its region.
        #[arg(long = "move")]
        move_workspaces: bool,
    },
    /// Let the cell take new workspaces again.
    Undrain { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace in a region (placed on its least loaded healthy cell).
    Create {
        #[arg(long)]
        region: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Show where a workspace lives.
    Show { id: String },
    /// Move a workspace to another cell, live; returns once the new cell serves it.
    Move {
        id: String,
        #[arg(long)]
        to: String,
    },
}
