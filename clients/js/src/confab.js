// confab client SDK: one WebSocket session (SPEC §4) that survives everything a network and a
// deployment do to it, so that what a user sees is every message once, in seq order.
//
// Plain ES module, no runtime dependency in browsers. On Node it uses the global WebSocket
// where there is one (Node ≥ 22) and the `ws` package otherwise. Types: confab.d.ts.
//
// What it does for its user, and where:
//   - reconnects with exponential backoff and full jitter, by each close code's meaning (_onClose);
//   - resumes with the last seq seen per channel, drops duplicates, fills gaps and resyncs from
//     `history` (_onEvent, _catchUp);
//   - keeps every `send` in an outbox until acked and retries it with the same client_msg_id,
//     so the server stores it once (_outbox, _transmitSend);
//   - paces its own frames under the server's rate limit (_write, _pump);
//   - restores the presence subscription and read markers on every reconnect (_onReady).

/** Close codes of SPEC §4. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  TOO_BIG: 1009,
  HEARTBEAT: 4000,
  BAD_TOKEN: 4001,
  NO_HELLO: 4002,
  ABUSE: 4003,
  UNKNOWN_WORKSPACE: 4004,
  SLOW_CONSUMER: 4008,
  RECONNECT_NOW: 4010,
});

/** Connection states, in the order a session goes through them. */
export const State = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  READY: "ready",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/** Event types that carry a channel seq (the channel log, SPEC §2). */
const LOG_EVENTS = new Set(["message", "message_edited", "message_deleted", "member_joined", "member_left"]);
/** Close codes after which reconnecting cannot help. */
const FATAL_CLOSES = new Set([CloseCode.ABUSE, CloseCode.UNKNOWN_WORKSPACE]);
/** Close codes that ask for a reconnect at once rather than after a backoff. */
const RECONNECT_NOW = new Set([CloseCode.GOING_AWAY, CloseCode.RECONNECT_NOW]);
/** Error codes after which a request is worth sending again. */
const RETRYABLE = new Set(["unavailable", "rate_limited"]);
/** Consecutive 4001 closes, each with a freshly provided token, after which the client stops. */
const MAX_AUTH_FAILURES = 3;
const HISTORY_MAX = 200;
const MAX_RESUME_CHANNELS = 1000;
const MAX_PRESENCE_USERS = 500;

const DEFAULTS = {
  requestTimeoutMs: 15000,
  sendTimeoutMs: 0,
  connectTimeoutMs: 15000,
  backoffInitialMs: 500,
  backoffMaxMs: 15000,
  typingThrottleMs: 3000,
  framesPerSecond: 18,
  frameBurst: 36,
  maxTextBytes: 16 * 1024,
  batch: true,
  maxCatchUpPages: 100,
  iteratorBuffer: 10000,
};

/** An error of the protocol (`code` as in SPEC §4), or of the client: `timeout`, `closed`. */
export class ConfabError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "ConfabError";
    this.code = code;
    Object.assign(this, extra);
  }
}

/** A fresh random client_msg_id (24 hex characters). Works outside secure contexts too. */
export function newClientMsgId() {
  const bytes = new Uint8Array(12);
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

let wsModule = null;
/** The WebSocket constructor: the given one, the global one, or the `ws` package on Node. */
async function webSocketClass(given) {
  if (given) return given;
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  if (!wsModule) {
    const name = "ws"; // through a variable, so browser bundlers do not try to resolve it
    wsModule = await import(name).catch(() => {
      throw new ConfabError("unsupported", "no global WebSocket: install the `ws` package (npm i ws)");
    });
  }
  return wsModule.WebSocket || wsModule.default;
}

const utf8 = new TextEncoder();

/**
 * A confab client. `new Client({ url, token })`, then `connect()`; see confab.d.ts and the
 * README for the whole surface.
 */
export class Client {
  constructor(options) {
    if (!options || !options.url) throw new TypeError("confab: `url` is required");
    if (options.token == null) throw new TypeError("confab: `token` is required");
    this.options = { ...DEFAULTS, ...options };
    const urls = Array.isArray(options.url) ? options.url : [options.url];
    this._urls = urls.map(String);
    this._urlIndex = 0;
    this._token = typeof options.token === "function" ? options.token : async () => options.token;

    /** @type {Map<string, object>} channel id -> the channel object as in `ready` */
    this.channels = new Map();
    /** @type {Map<string, "online"|"offline">} statuses of the subscribed users */
    this.presence = new Map();
    this.user = null;
    this.workspace = null;
    this.session = null;
    /** Counters a UI or a test can show. */
    this.stats = { connects: 0, duplicates: 0, gapsFilled: 0, resyncs: 0, retransmits: 0 };

    this._state = { state: State.IDLE, attempt: 0, retryInMs: null, lastClose: null, error: null };
    this._handlers = new Map();
    this._iterators = new Set();
    this._ws = null;
    this._ready = false;
    this._stopped = false;
    this._attempt = 0;
    this._authFailures = 0;
    this._timers = new Set();
    this._pingTimer = null;
    this._connectTimer = null;
    this._lastRx = 0;
    this._heartbeatMs = 30000;
    this._nextId = 1;
    this._inflight = new Map(); // request id -> request entry (transmitted, waiting for a reply)
    this._waiting = []; // request entries to transmit once ready
    this._outbox = []; // unacked send entries, in the order they were made
    this._tx = []; // frames waiting for a rate token
    this._tokens = this.options.frameBurst;
    this._refilled = now();
    this._pumpTimer = null;
    this._seq = new Map(); // channel id -> { last, known, busy, buffer }
    this._read = new Map(); // channel id -> highest read seq this client knows of
    this._presenceUsers = null;
    this._typingSent = new Map();
    this._connectWaiters = [];
  }

  // ---------- lifecycle ----------

  /** The connection state and why it is what it is. */
  get state() {
    return { ...this._state };
  }

  /** Starts connecting; resolves on the first `ready`, rejects if the client stops before. */
  connect() {
    if (this._state.state === State.READY) return Promise.resolve(this._readyFrame);
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this._state.state === State.IDLE) {
      this._stopped = false;
      this._open();
    } else if (this._state.state === State.CLOSED) {
      this._stopped = false;
      this._attempt = 0;
      this._open();
    }
    return p;
  }

  /** Closes the session for good: every unacked send and pending request fails with `closed`. */
  close() {
    this._stop(null);
  }

  /** Unacked sends, oldest first: what a UI shows as "sending…". */
  get outbox() {
    return this._outbox.map((e) => ({ channel: e.frame.channel, text: e.frame.text, client_msg_id: e.frame.client_msg_id, thread: e.frame.thread, attempts: e.attempts }));
  }

  /** The last seq delivered to the app in `channel` (what the next `resume` sends). */
  lastSeq(channel) {
    const st = this._seq.get(channel);
    return st ? st.last ?? st.known : undefined;
  }

  // ---------- events ----------

  /** Registers `fn` for an event type, `"event"` (every event), `"state"`, `"ready"` or `"error"`; returns an unsubscribe function. */
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const set = this._handlers.get(type);
    if (set) set.delete(fn);
  }

  /** The events (every type, or the given ones) as an async iterator, ended by `close()`. */
  events(types) {
    const wanted = types ? new Set(Array.isArray(types) ? types : [types]) : null;
    const queue = [];
    let waiter = null;
    let done = false;
    let overflow = null;
    const sink = {
      push: (e) => {
        if (done || (wanted && !wanted.has(e.type))) return;
        if (waiter) {
          const w = waiter;
          waiter = null;
          w.resolve({ value: e, done: false });
        } else if (queue.length >= this.options.iteratorBuffer) {
          overflow = new ConfabError("overflow", "the event iterator was not read for too long");
          sink.end();
        } else queue.push(e);
      },
      end: () => {
        done = true;
        this._iterators.delete(sink);
        if (waiter) {
          const w = waiter;
          waiter = null;
          if (overflow) w.reject(overflow);
          else w.resolve({ value: undefined, done: true });
        }
      },
    };
    this._iterators.add(sink);
    if (this._stopped && this._state.state === State.CLOSED) sink.end();
    return {
      next: () => {
        if (queue.length) return Promise.resolve({ value: queue.shift(), done: false });
        if (overflow) return Promise.reject(overflow);
        if (done) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => (waiter = { resolve, reject }));
      },
      return: () => {
        sink.end();
        queue.length = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  _emit(type, payload) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (err) {
        // A failing handler must not break delivery to the others, nor the session.
        if (type !== "error") this._emit("error", err);
        else setTimeout(() => { throw err; });
      }
    }
  }

  _dispatch(event) {
    this._emit(event.type, event);
    this._emit("event", event);
    for (const sink of [...this._iterators]) sink.push(event);
  }

  _setState(state, extra = {}) {
    this._state = { ...this._state, state, ...extra };
    this._emit("state", this.state);
  }

  // ---------- requests ----------

  /**
   * Sends a message. Resolves with the ack `{channel, seq, ts, client_msg_id}` once the server
   * stored it; retried with the same client_msg_id across reconnects and `unavailable`.
   */
  send(channel, text, opts = {}) {
    if (typeof text !== "string" || !text.length) return Promise.reject(new ConfabError("bad_request", "text must be a non-empty string"));
    if (utf8.encode(text).length > this.options.maxTextBytes) return Promise.reject(new ConfabError("too_large", `text is over ${this.options.maxTextBytes} bytes of UTF-8`));
    if (this._stopped && this._state.state === State.CLOSED) return Promise.reject(new ConfabError("closed", "the client is closed"));
    const frame = { op: "send", channel, text, client_msg_id: opts.clientMsgId || newClientMsgId() };
    if (opts.thread != null) frame.thread = opts.thread;
    return new Promise((resolve, reject) => {
      const entry = { frame, resolve, reject, attempts: 0, id: null, timer: null, retryTimer: null, deadline: null };
      if (this.options.sendTimeoutMs > 0) {
        entry.deadline = this._later(() => this._finishSend(entry, new ConfabError("timeout", "send was not acked in time")), this.options.sendTimeoutMs);
      }
      this._outbox.push(entry);
      if (this._ready) this._transmitSend(entry);
    });
  }

  _transmitSend(entry) {
    if (!this._ready || entry.done) return;
    this._clear(entry.retryTimer);
    this._clear(entry.timer);
    if (entry.id != null) this._inflight.delete(entry.id);
    entry.id = this._nextId++;
    entry.attempts++;
    this._inflight.set(entry.id, entry);
    entry.isSend = true;
    // No ack in time on a live connection: send it again, the same client_msg_id keeps it once.
    entry.timer = this._later(() => this._transmitSend(entry), this.options.requestTimeoutMs);
    this._write({ ...entry.frame, id: entry.id }, entry);
  }

  _finishSend(entry, err, ack) {
    if (entry.done) return;
    entry.done = true;
    this._clear(entry.timer);
    this._clear(entry.retryTimer);
    this._clear(entry.deadline);
    if (entry.id != null) this._inflight.delete(entry.id);
    const i = this._outbox.indexOf(entry);
    if (i >= 0) this._outbox.splice(i, 1);
    if (err) entry.reject(err);
    else entry.resolve({ channel: ack.channel, seq: ack.seq, ts: ack.ts, client_msg_id: entry.frame.client_msg_id });
  }

  /** Edits one of your messages; resolves with the ack of the edit event. */
  edit(channel, seq, text) {
    if (utf8.encode(String(text)).length > this.options.maxTextBytes) return Promise.reject(new ConfabError("too_large", "text is too large"));
    return this._request({ op: "edit", channel, seq, text });
  }

  /** Deletes one of your messages; resolves with the ack of the delete event. */
  delete(channel, seq) {
    return this._request({ op: "delete", channel, seq });
  }

  /** A page of messages: `{messages, has_more}` (see SPEC §4 `history`). */
  history(channel, opts = {}) {
    const frame = { op: "history", channel };
    if (opts.before != null) frame.before = opts.before;
    if (opts.after != null) frame.after = opts.after;
    if (opts.limit != null) frame.limit = opts.limit;
    return this._request(frame).then((r) => ({ channel: r.channel, messages: r.messages, has_more: r.has_more }));
  }

  /** Replies in a thread: a `send` whose parent is the message `parentSeq`. */
  reply(channel, parentSeq, text, opts = {}) {
    return this.send(channel, text, { ...opts, thread: parentSeq });
  }

  join(channel) {
    return this._request({ op: "join", channel });
  }

  leave(channel) {
    return this._request({ op: "leave", channel });
  }

  /**
   * Moves your read marker in `channel` to `seq` (never back). Your other sessions get a `read`
   * event; a marker set while offline is sent on reconnect.
   */
  markRead(channel, seq) {
    const known = this._read.get(channel) || 0;
    if (seq <= known) return Promise.resolve({ channel, seq: known });
    this._read.set(channel, seq);
    const ch = this.channels.get(channel);
    if (ch) ch.read_seq = Math.max(ch.read_seq || 0, seq);
    return this._request({ op: "read", channel, seq });
  }

  /** The read marker this client knows for `channel`. */
  readSeq(channel) {
    return this._read.get(channel) || 0;
  }

  /**
   * Says you are typing in `channel`; throttled to one frame per channel every
   * `typingThrottleMs` (the server forwards at most one in 3 s anyway). Returns whether a frame
   * went out. Not queued while disconnected: a stale typing indicator is worse than none.
   */
  typing(channel) {
    const t = now();
    const last = this._typingSent.get(channel) || -Infinity;
    if (!this._ready || t - last < this.options.typingThrottleMs) return false;
    this._typingSent.set(channel, t);
    this._write({ op: "typing", channel });
    return true;
  }

  /**
   * Subscribes to the presence of `users` (replacing the previous set; at most 500). The set
   * is subscribed again on every reconnect; changes arrive as `presence` events.
   */
  subscribePresence(users) {
    const list = [...new Set(users)];
    if (list.length > MAX_PRESENCE_USERS) return Promise.reject(new ConfabError("bad_request", "at most 500 users"));
    this._presenceUsers = list;
    for (const u of [...this.presence.keys()]) if (!list.includes(u)) this.presence.delete(u);
    return this._subscribePresence();
  }

  _subscribePresence() {
    const users = this._presenceUsers;
    return this._request({ op: "presence_sub", users }).then((r) => {
      // Only the latest subscription's answer counts.
      if (users !== this._presenceUsers) return r.users;
      for (const [user, status] of Object.entries(r.users || {})) {
        const before = this.presence.get(user);
        this.presence.set(user, status);
        // A change noticed through a (re)subscription is reported like a live one.
        if (before !== undefined && before !== status) this._dispatch({ op: "event", type: "presence", user, status });
      }
      return r.users;
    });
  }

  ping() {
    return this._request({ op: "ping" });
  }

  /**
   * Any request (`frame` without an id); resolves with its reply. Retried after a reconnect,
   * `unavailable` or `rate_limited` until `requestTimeoutMs` from the call.
   */
  _request(frame, timeoutMs = this.options.requestTimeoutMs) {
    if (this._stopped && this._state.state === State.CLOSED) return Promise.reject(new ConfabError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const entry = { frame, resolve, reject, id: null, attempts: 0, done: false, retryTimer: null };
      entry.timer = this._later(() => this._finishRequest(entry, new ConfabError("timeout", `${frame.op} got no reply within ${timeoutMs} ms`)), timeoutMs);
      if (this._ready) this._transmit(entry);
      else this._waiting.push(entry);
    });
  }

  _transmit(entry) {
    if (entry.done) return;
    if (!this._ready) return void this._waiting.push(entry);
    if (entry.id != null) this._inflight.delete(entry.id);
    entry.id = this._nextId++;
    entry.attempts++;
    this._inflight.set(entry.id, entry);
    this._write({ ...entry.frame, id: entry.id });
  }

  _finishRequest(entry, err, reply) {
    if (entry.done) return;
    entry.done = true;
    this._clear(entry.timer);
    this._clear(entry.retryTimer);
    if (entry.id != null) this._inflight.delete(entry.id);
    const i = this._waiting.indexOf(entry);
    if (i >= 0) this._waiting.splice(i, 1);
    if (err) entry.reject(err);
    else entry.resolve(reply);
  }

  _onReply(f) {
    const entry = this._inflight.get(f.id);
    if (!entry) return; // a reply to an attempt given up on (its retransmission answers too)
    this._inflight.delete(f.id);
    entry.id = null;
    if (f.op === "error") {
      if (RETRYABLE.has(f.code)) {
        const delay = f.code === "rate_limited" ? Math.max(50, f.retry_after_ms || 1000) : this._jitter(Math.min(5000, 250 * 2 ** Math.min(entry.attempts, 5)));
        this._clear(entry.retryTimer);
        entry.retryTimer = this._later(() => (entry.isSend ? this._transmitSend(entry) : this._transmit(entry)), delay);
        return;
      }
      // A delete retried after a lost reply finds its target already deleted: that is success.
      if (entry.frame.op === "delete" && f.code === "not_found" && entry.attempts > 1) {
        return this._finishRequest(entry, null, { op: "ack", channel: entry.frame.channel, seq: null });
      }
      const err = new ConfabError(f.code, f.message, { retry_after_ms: f.retry_after_ms });
      return entry.isSend ? this._finishSend(entry, err) : this._finishRequest(entry, err);
    }
    if (entry.isSend) return this._finishSend(entry, null, f);
    this._finishRequest(entry, null, f);
  }

  // ---------- the connection ----------

  async _open() {
    if (this._stopped) return;
    this._setState(State.CONNECTING, { attempt: this._attempt, retryInMs: null });
    let token;
    let WS;
    try {
      WS = await webSocketClass(this.options.WebSocket);
      token = await this._token();
      if (typeof token !== "string" || !token) throw new ConfabError("unauthorized", "the token provider gave no token");
    } catch (err) {
      if (this._stopped) return;
      if (err && err.code === "unsupported") return this._stop(err);
      this._emit("error", err);
      return this._scheduleReconnect(false);
    }
    if (this._stopped) return;
    let url = this._urls[this._urlIndex % this._urls.length];
    if (this.options.batch) url += (url.includes("?") ? "&" : "?") + "batch=1";
    let ws;
    try {
      ws = new WS(url);
    } catch (err) {
      this._emit("error", err);
      return this._scheduleReconnect(false);
    }
    this._ws = ws;
    const conn = { opened: false, ready: false };
    this._conn = conn;
    this._tx = [];
    this._connectTimer = this._later(() => {
      // No ready in time (a half-open socket, a stuck proxy): start over.
      if (this._ws === ws && !conn.ready) this._drop(ws, 4000, "no ready in time");
    }, this.options.connectTimeoutMs);
    ws.onopen = () => {
      if (this._ws !== ws) return;
      conn.opened = true;
      this._lastRx = now();
      const hello = { op: "hello", token };
      const resume = this._resume();
      if (resume) hello.resume = resume;
      this._write(hello);
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._lastRx = now();
      let data;
      try {
        data = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return this._emit("error", new ConfabError("bad_frame", "the server sent a frame that is not JSON"));
      }
      for (const f of Array.isArray(data) ? data : [data]) {
        try {
          this._onFrame(f);
        } catch (err) {
          this._emit("error", err);
        }
      }
    };
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._onClose(ev.code, ev.reason || "", conn);
    };
  }

  /** `resume`: the last seq seen in each known channel (at most the server's 1,000). */
  _resume() {
    const resume = {};
    let n = 0;
    for (const [id, st] of this._seq) {
      const seq = st.last ?? st.known;
      if (seq == null || n >= MAX_RESUME_CHANNELS) continue;
      resume[id] = seq;
      n++;
    }
    return n ? resume : null;
  }

  _onFrame(f) {
    if (!f || typeof f !== "object") return;
    switch (f.op) {
      case "ready":
        return this._onReady(f);
      case "event":
        return this._onEvent(f);
      default:
        if (f.id != null && this._inflight.has(f.id)) return this._onReply(f);
        if (f.op === "error") this._emit("error", new ConfabError(f.code, f.message, { retry_after_ms: f.retry_after_ms }));
    }
  }

  _onReady(f) {
    this._conn.ready = true;
    this._ready = true;
    this._clear(this._connectTimer);
    this._attempt = 0;
    this._authFailures = 0;
    this.stats.connects++;
    this._readyFrame = f;
    this.user = f.user;
    this.workspace = f.workspace;
    this.session = f.session;
    this._heartbeatMs = f.heartbeat_ms || 30000;

    // `ready` is the truth about membership; seq state of channels left meanwhile goes.
    const fresh = new Map();
    const resync = [];
    for (const ch of f.channels || []) {
      fresh.set(ch.id, { ...ch });
      const st = this._seqState(ch.id);
      if (st.last == null && st.known == null) st.last = ch.last_seq; // new to us: nothing to replay
      else if ((st.last ?? st.known) > ch.last_seq) resync.push(ch.id); // the server went back
      const mine = this._read.get(ch.id) || 0;
      if (mine > ch.read_seq) {
        // A marker moved while offline: tell the server now.
        this._request({ op: "read", channel: ch.id, seq: mine }).catch((err) => this._emit("error", err));
        fresh.get(ch.id).read_seq = mine;
      } else if (ch.read_seq > mine) {
        this._read.set(ch.id, ch.read_seq);
        // Moved on another device while this one was away.
        if (this.channels.has(ch.id)) this._dispatch({ op: "event", type: "read", channel: ch.id, seq: ch.read_seq, synced: true });
      }
    }
    for (const id of [...this._seq.keys()]) if (!fresh.has(id)) this._seq.delete(id);
    this.channels = fresh;

    const hb = Math.max(1000, Math.floor(this._heartbeatMs / 2));
    this._clearInterval(this._pingTimer);
    this._pingTimer = setInterval(() => this._heartbeat(), hb);

    // Sends first, in the order they were made, then everything else that waited.
    for (const entry of this._outbox) this._transmitSend(entry);
    for (const entry of this._waiting.splice(0)) this._transmit(entry);
    if (this._presenceUsers) this._subscribePresence().catch((err) => this._emit("error", err));
    for (const id of resync) this._catchUp(id, true);

    this._setState(State.READY, { attempt: 0, retryInMs: null, error: null });
    this._emit("ready", f);
    for (const w of this._connectWaiters.splice(0)) w.resolve(f);
  }

  _heartbeat() {
    if (!this._ready || !this._ws) return;
    if (now() - this._lastRx > this._heartbeatMs) {
      // Nothing, not even a pong, for a whole heartbeat: the connection is dead.
      return this._drop(this._ws, 4000, "no frame from the server");
    }
    this._write({ op: "ping" });
  }

  /** Gives up on socket `ws` and handles it as closed with `code`. */
  _drop(ws, code, reason) {
    try {
      ws.close(code === 4000 ? 4000 : 1000, reason);
    } catch {
      // closing a socket that never opened throws in some implementations
    }
    if (this._ws === ws) this._onClose(code, reason, this._conn);
  }

  _onClose(code, reason, conn) {
    this._ws = null;
    this._ready = false;
    this._tx = [];
    this._clear(this._connectTimer);
    this._clearInterval(this._pingTimer);
    this._clear(this._pumpTimer);
    this._pumpTimer = null;
    this._state.lastClose = { code, reason };
    // Every request in flight goes back to wait for the next session; sends stay in the outbox.
    for (const entry of this._inflight.values()) {
      this._clear(entry.timer && entry.isSend ? entry.timer : null);
      entry.id = null;
      if (!entry.isSend && !entry.done) this._waiting.push(entry);
    }
    this._inflight.clear();
    this._emit("close", { code, reason });
    if (this._stopped) return;
    if (FATAL_CLOSES.has(code)) {
      const what = code === CloseCode.ABUSE ? "protocol abuse" : "unknown workspace";
      return this._stop(new ConfabError(code === CloseCode.ABUSE ? "abuse" : "unknown_workspace", `closed by the server: ${code} ${what}`, { closeCode: code }));
    }
    if (code === CloseCode.BAD_TOKEN && ++this._authFailures >= MAX_AUTH_FAILURES) {
      return this._stop(new ConfabError("unauthorized", "the server refused every token the provider gave (4001)", { closeCode: code }));
    }
    // Another gateway may serve us: a socket that never opened, or a gateway going away.
    if (!conn.opened || code === CloseCode.GOING_AWAY) this._urlIndex++;
    this._scheduleReconnect(RECONNECT_NOW.has(code) && conn.ready);
  }

  _scheduleReconnect(now) {
    if (this._stopped) return;
    const attempt = this._attempt++;
    const cap = Math.min(this.options.backoffMaxMs, this.options.backoffInitialMs * 2 ** Math.min(attempt, 20));
    // Full jitter: clients closed together do not come back together.
    const delay = now ? Math.floor(Math.random() * 100) : Math.floor(Math.random() * cap);
    this._setState(State.RECONNECTING, { attempt: this._attempt, retryInMs: delay });
    this._reconnectTimer = this._later(() => this._open(), delay);
  }

  _stop(error) {
    if (this._stopped && this._state.state === State.CLOSED) return;
    this._stopped = true;
    this._ready = false;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000, "bye");
      } catch {
        // already closed
      }
    }
    this._clearInterval(this._pingTimer);
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    const err = error || new ConfabError("closed", "the client is closed");
    for (const entry of [...this._outbox]) this._finishSend(entry, err);
    for (const entry of [...this._inflight.values(), ...this._waiting]) if (!entry.isSend) this._finishRequest(entry, err);
    this._inflight.clear();
    this._waiting = [];
    this._setState(State.CLOSED, { error: error || null, retryInMs: null });
    if (error) this._emit("error", error);
    for (const w of this._connectWaiters.splice(0)) w.reject(err);
    for (const sink of [...this._iterators]) sink.end();
  }

  // ---------- rate-paced writes ----------

  /** Queues one client frame; frames leave at most `framesPerSecond` (bursts of `frameBurst`). */
  _write(frame, send) {
    this._tx.push({ data: JSON.stringify(frame), send });
    this._pump();
  }

  _pump() {
    const t = now();
    const { framesPerSecond: rate, frameBurst: burst } = this.options;
    this._tokens = Math.min(burst, this._tokens + ((t - this._refilled) / 1000) * rate);
    this._refilled = t;
    const ws = this._ws;
    while (this._tx.length && this._tokens >= 1 && ws) {
      this._tokens -= 1;
      const { data, send } = this._tx.shift();
      if (send) {
        // Counted only when a copy really went out before: queued copies dropped do not count.
        if (send.written) this.stats.retransmits++;
        send.written = true;
      }
      try {
        ws.send(data);
      } catch {
        return; // the close event follows and sorts it out
      }
    }
    if (this._tx.length && !this._pumpTimer) {
      const wait = Math.ceil(((1 - this._tokens) / rate) * 1000);
      this._pumpTimer = this._later(() => {
        this._pumpTimer = null;
        this._pump();
      }, Math.max(1, wait));
    }
  }

  // ---------- the channel log: order, duplicates, gaps, resync ----------

  _seqState(channel) {
    let st = this._seq.get(channel);
    if (!st) {
      st = { last: undefined, known: undefined, busy: false, buffer: [] };
      this._seq.set(channel, st);
    }
    return st;
  }

  _onEvent(e) {
    if (LOG_EVENTS.has(e.type) && e.channel != null && typeof e.seq === "number") {
      const st = this._seqState(e.channel);
      if (st.busy) return void st.buffer.push(e);
      if (st.last != null && e.seq <= st.last) {
        this.stats.duplicates++;
        return;
      }
      if (st.last != null && e.seq > st.last + 1) {
        st.buffer.push(e);
        this._catchUp(e.channel, false);
        return;
      }
      return this._deliver(e);
    }
    switch (e.type) {
      case "resync":
        this.stats.resyncs++;
        this._dispatch(e);
        return this._catchUp(e.channel, true);
      case "channel_added": {
        this.channels.set(e.info.id, { ...e.info });
        const st = this._seqState(e.info.id);
        // Its first log event (our member_joined) sets where we are; resume until then from here.
        if (st.last == null) st.known = Math.max(0, (e.info.last_seq || 0) - 1);
        this._read.set(e.info.id, Math.max(this._read.get(e.info.id) || 0, e.info.read_seq || 0));
        break;
      }
      case "read": {
        const seq = Math.max(this._read.get(e.channel) || 0, e.seq);
        this._read.set(e.channel, seq);
        const ch = this.channels.get(e.channel);
        if (ch) ch.read_seq = Math.max(ch.read_seq || 0, e.seq);
        break;
      }
      case "presence":
        if (this._presenceUsers && this._presenceUsers.includes(e.user)) this.presence.set(e.user, e.status);
        break;
    }
    this._dispatch(e);
  }

  _deliver(e) {
    const st = this._seqState(e.channel);
    st.last = e.seq;
    const ch = this.channels.get(e.channel);
    if (ch) ch.last_seq = Math.max(ch.last_seq || 0, e.seq);
    if (e.type === "member_left" && e.user === this.user) {
      this.channels.delete(e.channel);
      this._seq.delete(e.channel);
    }
    this._dispatch(e);
  }

  /**
   * Catches `channel` up from `history`: after a gap (live events buffered meanwhile) or a
   * `resync`. Delivers the missing messages as `message` events marked `replayed`, then the
   * buffered events. History holds messages only: edits, deletes, joins and leaves inside the
   * gap are not replayed as events, but the messages come as they stand now.
   */
  async _catchUp(channel, resync) {
    const st = this._seqState(channel);
    if (st.busy) {
      st.again = st.again || resync; // a resync during a gap fill: page again once it is done
      return;
    }
    st.busy = true;
    st.again = false;
    let complete = true;
    try {
      let after = st.last ?? st.known ?? 0;
      const ch = this.channels.get(channel);
      if (resync && ch && after > ch.last_seq) after = 0; // the server's log went back: start over
      for (let page = 0; ; page++) {
        if (page >= this.options.maxCatchUpPages) {
          complete = false;
          break;
        }
        // Stop at the first live event buffered: from there on, live events are the truth.
        const until = minSeq(st.buffer);
        if (after + 1 >= until) break;
        const r = await this._request({ op: "history", channel, after, limit: HISTORY_MAX });
        let reached = false;
        for (const m of r.messages) {
          if (m.seq <= after) continue;
          const stop = minSeq(st.buffer);
          if (m.seq >= stop) {
            reached = true;
            break;
          }
          after = m.seq;
          this.stats.gapsFilled++;
          this._deliver({ op: "event", type: "message", channel, ...m, replayed: true });
        }
        if (reached || !r.has_more || !r.messages.length) break;
      }
    } catch (err) {
      // History failed: resume on a new session fills the gap instead.
      st.busy = false;
      st.buffer = [];
      this._emit("error", err);
      if (this._ws) this._drop(this._ws, 4000, "catch-up failed");
      return;
    }
    st.busy = false;
    if (!this._seq.has(channel)) return;
    // Sorted: a reconnect during the catch-up replays events behind ones already held.
    const buffered = st.buffer.splice(0).sort((a, b) => a.seq - b.seq);
    if (resync) this._dispatch({ op: "event", type: "resync_done", channel, complete });
    for (const e of buffered) {
      if (st.last != null && e.seq <= st.last) {
        this.stats.duplicates++;
        continue;
      }
      // What history did not have between here and this event were not messages: move on.
      this._deliver(e);
    }
    if (st.again && this._seq.has(channel)) this._catchUp(channel, true);
  }

  // ---------- small helpers ----------

  _later(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clear(t) {
    if (t != null) {
      clearTimeout(t);
      this._timers.delete(t);
    }
  }

  _clearInterval(t) {
    if (t != null) clearInterval(t);
  }

  _jitter(ms) {
    return Math.floor(ms / 2 + Math.random() * (ms / 2));
  }
}

function minSeq(events) {
  let min = Infinity;
  for (const e of events) if (e.seq < min) min = e.seq;
  return min;
}

function now() {
  return typeof performance !== "undefined" ? performance.now() : Date.now();
}

/** Shorthand: `connect({url, token, ...})` makes a client and starts it; resolves once ready. */
export async function connect(options) {
  const client = new Client(options);
  await client.connect();
  return client;
}
