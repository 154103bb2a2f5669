// Types of the confab client SDK (confab.js) and of the wire protocol it speaks (SPEC §4).
// The wire types below are checked against docs/asyncapi.yaml by test/contract.test.js: every
// interface named in `WireSchemas` must have exactly the properties of the AsyncAPI schema.

// ---------- the wire protocol ----------

export type ChannelKind = "public" | "private" | "dm";
export type PresenceStatus = "online" | "offline";
export type ErrorCode =
  | "bad_request"
  | "not_found"
  | "forbidden"
  | "too_large"
  | "rate_limited"
  | "unavailable";
/** Request ids: an integer, or a string of at most 64 characters. */
export type RequestId = number | string;

/** A channel as listed in `ready` and `channel_added`. */
export interface ChannelInfo {
  id: string;
  name: string;
  kind: ChannelKind;
  last_seq: number;
  read_seq: number;
}

/** A message as `history` returns it: as it stands now. */
export interface HistoryMessage {
  seq: number;
  ts: number;
  user: string;
  text: string;
  client_msg_id: string | null;
  thread: number | null;
  edited: boolean;
  deleted: boolean;
}

// Client frames.
export interface HelloFrame {
  op: "hello";
  token: string;
  resume?: Record<string, number>;
}
export interface SendFrame {
  op: "send";
  id?: RequestId;
  channel: string;
  text: string;
  client_msg_id?: string;
  thread?: number;
}
export interface EditFrame {
  op: "edit";
  id?: RequestId;
  channel: string;
  seq: number;
  text: string;
}
export interface DeleteFrame {
  op: "delete";
  id?: RequestId;
  channel: string;
  seq: number;
}
export interface TypingFrame {
  op: "typing";
  id?: RequestId;
  channel: string;
}
export interface HistoryFrame {
  op: "history";
  id?: RequestId;
  channel: string;
  before?: number;
  after?: number;
  limit?: number;
}
export interface JoinFrame {
  op: "join";
  id?: RequestId;
  channel: string;
}
export interface LeaveFrame {
  op: "leave";
  id?: RequestId;
  channel: string;
}
export interface ReadFrame {
  op: "read";
  id?: RequestId;
  channel: string;
  seq: number;
}
export interface PresenceSubFrame {
  op: "presence_sub";
  id?: RequestId;
  users: string[];
}
export interface PingFrame {
  op: "ping";
  id?: RequestId;
}
export type ClientFrame =
  | HelloFrame
  | SendFrame
  | EditFrame
  | DeleteFrame
  | TypingFrame
  | HistoryFrame
  | JoinFrame
  | LeaveFrame
  | ReadFrame
  | PresenceSubFrame
  | PingFrame;

// Server frames.
export interface ReadyFrame {
  op: "ready";
  session: string;
  user: string;
  workspace: string;
  heartbeat_ms: number;
  channels: ChannelInfo[];
}
export interface AckFrame {
  op: "ack";
  id: RequestId | null;
  channel: string;
  seq: number;
  ts: number;
}
export interface HistoryReplyFrame {
  op: "history";
  id: RequestId | null;
  channel: string;
  messages: HistoryMessage[];
  has_more: boolean;
}
export interface PresenceReplyFrame {
  op: "presence";
  id: RequestId | null;
  users: Record<string, PresenceStatus>;
}
export interface PongFrame {
  op: "pong";
  id: RequestId | null;
}
export interface ErrorFrame {
  op: "error";
  id: RequestId | null;
  code: ErrorCode;
  message: string;
  retry_after_ms?: number;
}

// Events (`op: "event"`).
export interface MessageEvent {
  op: "event";
  type: "message";
  channel: string;
  seq: number;
  ts: number;
  user: string;
  text: string;
  client_msg_id: string | null;
  thread: number | null;
  /** SDK only: recovered from `history` after a gap or a resync (then `edited`/`deleted` are set). */
  replayed?: boolean;
  /** SDK only, on replayed messages. */
  edited?: boolean;
  /** SDK only, on replayed messages. */
  deleted?: boolean;
}
export interface MessageEditedEvent {
  op: "event";
  type: "message_edited";
  channel: string;
  seq: number;
  ts: number;
  user: string;
  target: number;
  text: string;
}
export interface MessageDeletedEvent {
  op: "event";
  type: "message_deleted";
  channel: string;
  seq: number;
  ts: number;
  user: string;
  target: number;
}
export interface MemberJoinedEvent {
  op: "event";
  type: "member_joined";
  channel: string;
  seq: number;
  ts: number;
  user: string;
}
export interface MemberLeftEvent {
  op: "event";
  type: "member_left";
  channel: string;
  seq: number;
  ts: number;
  user: string;
}
export interface TypingEvent {
  op: "event";
  type: "typing";
  channel: string;
  user: string;
}
export interface ReadEvent {
  op: "event";
  type: "read";
  channel: string;
  seq: number;
  /** SDK only: learnt from `ready` after a reconnect rather than from a live event. */
  synced?: boolean;
}
export interface PresenceEvent {
  op: "event";
  type: "presence";
  user: string;
  status: PresenceStatus;
}
export interface ChannelAddedEvent {
  op: "event";
  type: "channel_added";
  channel: string;
  info: ChannelInfo;
}
export interface ResyncEvent {
  op: "event";
  type: "resync";
  channel: string;
}
/** SDK only: the history paging a `resync` started is over (`complete: false` if it was cut short). */
export interface ResyncDoneEvent {
  op: "event";
  type: "resync_done";
  channel: string;
  complete: boolean;
}
export type ServerEvent =
  | MessageEvent
  | MessageEditedEvent
  | MessageDeletedEvent
  | MemberJoinedEvent
  | MemberLeftEvent
  | TypingEvent
  | ReadEvent
  | PresenceEvent
  | ChannelAddedEvent
  | ResyncEvent;
export type ServerFrame =
  | ReadyFrame
  | AckFrame
  | HistoryReplyFrame
  | PresenceReplyFrame
  | PongFrame
  | ErrorFrame
  | ServerEvent;

/** The wire types the contract test checks against docs/asyncapi.yaml (schema name → type). */
export interface WireSchemas {
  ChannelInfo: ChannelInfo;
  HistoryMessage: HistoryMessage;
  Hello: HelloFrame;
  Send: SendFrame;
  Edit: EditFrame;
  Delete: DeleteFrame;
  Typing: TypingFrame;
  History: HistoryFrame;
  Join: JoinFrame;
  Leave: LeaveFrame;
  Read: ReadFrame;
  PresenceSub: PresenceSubFrame;
  Ping: PingFrame;
  Ready: ReadyFrame;
  Ack: AckFrame;
  HistoryReply: HistoryReplyFrame;
  PresenceReply: PresenceReplyFrame;
  Pong: PongFrame;
  Error: ErrorFrame;
  MessageEvent: MessageEvent;
  MessageEditedEvent: MessageEditedEvent;
  MessageDeletedEvent: MessageDeletedEvent;
  MemberJoinedEvent: MemberJoinedEvent;
  MemberLeftEvent: MemberLeftEvent;
  TypingEvent: TypingEvent;
  ReadEvent: ReadEvent;
  PresenceEvent: PresenceEvent;
  ChannelAddedEvent: ChannelAddedEvent;
  ResyncEvent: ResyncEvent;
}

// ---------- the SDK ----------

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  TOO_BIG: 1009;
  HEARTBEAT: 4000;
  BAD_TOKEN: 4001;
  NO_HELLO: 4002;
  ABUSE: 4003;
  UNKNOWN_WORKSPACE: 4004;
  SLOW_CONSUMER: 4008;
  RECONNECT_NOW: 4010;
}>;

export type ConnectionStateName = "idle" | "connecting" | "ready" | "reconnecting" | "closed";
export declare const State: Readonly<{
  IDLE: "idle";
  CONNECTING: "connecting";
  READY: "ready";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;

/** What a UI shows: the state, how many attempts since the last ready, the next retry. */
export interface ConnectionState {
  state: ConnectionStateName;
  attempt: number;
  /** Milliseconds until the next attempt, while `reconnecting`. */
  retryInMs: number | null;
  lastClose: { code: number; reason: string } | null;
  /** Why the client stopped, once `closed` by the server (4003, 4004, repeated 4001). */
  error: ConfabError | null;
}

/** Protocol errors (`code` as in SPEC §4) and the client's own: `timeout`, `closed`, `overflow`, `unauthorized`, `abuse`, `unknown_workspace`, `unsupported`. */
export declare class ConfabError extends Error {
  constructor(code: string, message?: string, extra?: object);
  code: ErrorCode | "timeout" | "closed" | "overflow" | "unauthorized" | "abuse" | "unknown_workspace" | "unsupported" | string;
  retry_after_ms?: number;
  closeCode?: number;
}

export interface ClientOptions {
  /** `ws(s)://host/v1/ws`; several are tried in turn when one cannot be reached or goes away. */
  url: string | string[];
  /** A token, or an async function called on every (re)connect, so tokens can be refreshed. */
  token: string | (() => string | Promise<string>);
  /** A WebSocket constructor; by default the global one, or the `ws` package on Node. */
  WebSocket?: unknown;
  /** Per request (default 15000); a send is retransmitted after this long without an ack. */
  requestTimeoutMs?: number;
  /** Give up on a send after this long (default 0: retry until acked or closed). */
  sendTimeoutMs?: number;
  /** Start over if `ready` has not come this long after opening (default 15000). */
  connectTimeoutMs?: number;
  /** Backoff: the first cap (default 500) and the largest (default 15000); full jitter. */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** At most one `typing` frame per channel this often (default 3000). */
  typingThrottleMs?: number;
  /** Client-side pacing under the server's limit (defaults 18 frames/s, bursts of 36). */
  framesPerSecond?: number;
  frameBurst?: number;
  /** Texts longer than this in UTF-8 are refused without a round trip (default 16384). */
  maxTextBytes?: number;
  /** Ask the server for batched frames (`?batch=1`; default true). */
  batch?: boolean;
  /** History pages (of 200) read at most to catch up after a resync (default 100). */
  maxCatchUpPages?: number;
  /** Events an `events()` iterator holds before it fails with `overflow` (default 10000). */
  iteratorBuffer?: number;
}

export interface Ack {
  channel: string;
  seq: number;
  ts: number;
}
export interface SendAck extends Ack {
  client_msg_id: string;
}
export interface SendOptions {
  /** Your own id for the message (1–64 characters); generated when absent. */
  clientMsgId?: string;
  /** The seq of the parent message, for a thread reply. */
  thread?: number;
}
export interface HistoryOptions {
  before?: number;
  after?: number;
  limit?: number;
}
export interface HistoryPage {
  channel: string;
  messages: HistoryMessage[];
  has_more: boolean;
}
export interface OutboxEntry {
  channel: string;
  text: string;
  client_msg_id: string;
  thread?: number;
  attempts: number;
}

export type SdkEvent = ServerEvent | ResyncDoneEvent;
type EventByType = { [E in SdkEvent as E["type"]]: E };
export interface ClientEvents extends EventByType {
  /** Every event. */
  event: SdkEvent;
  state: ConnectionState;
  ready: ReadyFrame;
  close: { code: number; reason: string };
  error: ConfabError | Error;
}

export declare class Client {
  constructor(options: ClientOptions);
  readonly options: Required<Omit<ClientOptions, "WebSocket">> & { WebSocket?: unknown };
  /** Channels you are a member of, as of the last `ready` plus what happened since. */
  channels: Map<string, ChannelInfo>;
  /** Statuses of the users in the presence subscription. */
  presence: Map<string, PresenceStatus>;
  user: string | null;
  workspace: string | null;
  session: string | null;
  stats: { connects: number; duplicates: number; gapsFilled: number; resyncs: number; retransmits: number };
  readonly state: ConnectionState;
  readonly outbox: OutboxEntry[];

  connect(): Promise<ReadyFrame>;
  close(): void;
  lastSeq(channel: string): number | undefined;
  readSeq(channel: string): number;

  on<K extends keyof ClientEvents>(type: K, fn: (payload: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, fn: (payload: ClientEvents[K]) => void): void;
  events(): AsyncIterableIterator<SdkEvent>;
  events<K extends SdkEvent["type"]>(types: K | K[]): AsyncIterableIterator<EventByType[K]>;

  send(channel: string, text: string, options?: SendOptions): Promise<SendAck>;
  reply(channel: string, parentSeq: number, text: string, options?: Omit<SendOptions, "thread">): Promise<SendAck>;
  edit(channel: string, seq: number, text: string): Promise<AckFrame>;
  /** Resolves with `seq: null` when a retried delete finds its target already gone. */
  delete(channel: string, seq: number): Promise<AckFrame | (Omit<AckFrame, "seq"> & { seq: null })>;
  history(channel: string, options?: HistoryOptions): Promise<HistoryPage>;
  join(channel: string): Promise<AckFrame>;
  leave(channel: string): Promise<AckFrame>;
  markRead(channel: string, seq: number): Promise<AckFrame | { channel: string; seq: number }>;
  typing(channel: string): boolean;
  subscribePresence(users: string[]): Promise<Record<string, PresenceStatus>>;
  ping(): Promise<PongFrame>;
}

export declare function connect(options: ClientOptions): Promise<Client>;
export declare function newClientMsgId(): string;
