// confab web client: one WebSocket session (SPEC §4) plus a few HTTP calls (SPEC §5, §7).
// User-supplied text only ever reaches the page through textContent, never innerHTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TYPING_SEND_MS = 2000; // send `typing` at most this often
const TYPING_SHOW_MS = 4000; // show "x is typing…" this long after the last typing event
const BACKOFF_MAX_MS = 15000;
const HISTORY_PAGE = 50;

const state = {
  ws: null,
  token: null,
  me: null,
  workspace: null,
  wanted: false, // true while the user wants to be connected (drives reconnects)
  backoffMs: 500,
  reconnectTimer: null,
  pingTimer: null,
  nextId: 1,
  pending: new Map(), // request id -> what the reply completes
  channels: new Map(), // channel id -> {id,name,kind,last_seq,read_seq}
  seen: new Map(), // channel id -> last log seq seen, sent as `resume` on reconnect
  selected: null,
  hasMore: false,
  members: [], // members of the selected channel
  authors: new Set(), // users seen in the selected channel's messages
  presence: new Map(), // user -> "online" | "offline"
  typers: new Map(), // user -> timeout handle
  lastTypingSent: 0,
};

// ---------- small helpers ----------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function setStatus(text, cls) {
  const s = $("#status");
  s.textContent = text;
  s.className = "status " + (cls || "");
}

let errorTimer = null;
function showError(text) {
  const e = $("#error");
  e.textContent = text;
  e.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => (e.hidden = true), 8000);
}

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function formatTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function displayName(ch) {
  if (ch.kind !== "dm") return (ch.kind === "private" ? "🔒 " : "# ") + ch.name;
  const other = ch.name.split(",").find((u) => u !== state.me);
  return "@ " + (other || state.me);
}

async function api(method, path, body, token) {
  const res = await fetch(path, {
    method,
    headers: {
      Authorization: "Bearer " + (token || state.token),
      ...(body ? { "Content-Type": "application/json" } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = data.error || {};
    const e = new Error(`${method} ${path}: ${res.status} ${err.code || ""} ${err.message || ""}`.trim());
    e.status = res.status;
    throw e;
  }
  return data;
}

// ---------- the WebSocket session ----------

function send(frame, onReply) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return null;
  if (onReply) {
    frame.id = state.nextId++;
    state.pending.set(frame.id, onReply);
  }
  state.ws.send(JSON.stringify(frame));
  return frame.id;
}

async function connect() {
  const user = $("#user").value.trim();
  const workspace = $("#workspace").value.trim();
  if (!user || !workspace) return showError("enter a workspace and a user id");
  state.wanted = true;
  state.me = user;
  state.workspace = workspace;
  setFormConnected(true);
  setStatus("connecting…", "busy");
  try {
    // A fresh token on every (re)connect, so an expired one never blocks a reconnect.
    const minted = await api("POST", "/admin/v1/tokens", { workspace, user }, $("#admin-token").value);
    state.token = minted.token;
  } catch (e) {
    showError(e.message);
    // A refused admin token or a bad user id will not get better by retrying.
    if (e.status === 400 || e.status === 401 || e.status === 404) state.wanted = false;
    return scheduleReconnect();
  }
  if (!state.wanted) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/v1/ws`);
  state.ws = ws;
  ws.onopen = () => {
    const hello = { op: "hello", token: state.token };
    if (state.seen.size) hello.resume = Object.fromEntries(state.seen);
    ws.send(JSON.stringify(hello));
  };
  ws.onmessage = (ev) => {
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return showError("server sent a frame that is not JSON");
    }
    onFrame(frame);
  };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    state.ws = null;
    clearInterval(state.pingTimer);
    failPending("connection closed");
    setStatus(`closed: ${ev.code}${ev.reason ? " " + ev.reason : ""}`, "down");
    // 4004 (unknown workspace) will not get better by retrying.
    if (ev.code === 4004) state.wanted = false;
    if (state.wanted) scheduleReconnect();
    else setFormConnected(false);
  };
}

function scheduleReconnect() {
  if (!state.wanted) return setFormConnected(false);
  const delay = state.backoffMs * (0.75 + Math.random() / 2);
  state.backoffMs = Math.min(state.backoffMs * 2, BACKOFF_MAX_MS);
  const base = $("#status").textContent.replace(/ — reconnecting.*$/, "");
  setStatus(`${base} — reconnecting in ${(delay / 1000).toFixed(1)} s`, "down");
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay);
}

function disconnect() {
  state.wanted = false;
  clearTimeout(state.reconnectTimer);
  if (state.ws) state.ws.close(1000, "bye");
  else setFormConnected(false);
  // A new login starts from scratch: nothing of the previous user's session is resumed.
  state.seen.clear();
  state.channels.clear();
  state.selected = null;
  renderChannels();
  selectChannel(null);
}

function failPending(reason) {
  for (const [, done] of state.pending) done({ op: "error", code: "unavailable", message: reason });
  state.pending.clear();
}

function setFormConnected(on) {
  for (const id of ["#workspace", "#user", "#admin-token", "#connect"]) $(id).disabled = on;
  document.querySelectorAll("[data-quick-user]").forEach((b) => (b.disabled = on));
  $("#connect").hidden = on;
  $("#disconnect").hidden = !on;
  if (!on) setStatus("disconnected", "");
}

function onFrame(f) {
  if (f.op === "ready") return onReady(f);
  if (f.op === "event") return onEvent(f);
  if (f.id != null && state.pending.has(f.id)) {
    const done = state.pending.get(f.id);
    state.pending.delete(f.id);
    return done(f);
  }
  if (f.op === "error") showError(`${f.code}: ${f.message}`);
}

function onReady(f) {
  state.backoffMs = 500;
  state.me = f.user;
  setStatus(`connected as ${f.user} (${f.workspace})`, "up");
  clearInterval(state.pingTimer);
  state.pingTimer = setInterval(() => send({ op: "ping" }, () => {}), Math.max(1000, f.heartbeat_ms / 2));
  // ready is authoritative for membership and counters; `seen` survives so resume works.
  state.channels.clear();
  for (const ch of f.channels) {
    state.channels.set(ch.id, ch);
    if (!state.seen.has(ch.id)) state.seen.set(ch.id, ch.last_seq);
  }
  for (const id of state.seen.keys()) if (!state.channels.has(id)) state.seen.delete(id);
  renderChannels();
  if (state.selected && state.channels.has(state.selected)) {
    // Events missed while away arrive as the resume replay; members and presence are refreshed.
    loadMembers(state.selected);
    updateComposer();
  } else {
    const first = state.channels.has("general") ? "general" : f.channels.length ? f.channels[0].id : null;
    selectChannel(first);
  }
}

// ---------- events ----------

function onEvent(e) {
  const ch = e.channel ? state.channels.get(e.channel) : null;
  if (e.seq != null && e.channel) {
    state.seen.set(e.channel, Math.max(state.seen.get(e.channel) || 0, e.seq));
    if (ch) ch.last_seq = Math.max(ch.last_seq, e.seq);
  }
  switch (e.type) {
    case "message":
      clearTyping(e.user);
      if (e.channel === state.selected) {
        upsertMessage(e);
        markRead();
      }
      break;
    case "message_edited":
      if (e.channel === state.selected) editMessage(e.target, e.text);
      break;
    case "message_deleted":
      if (e.channel === state.selected) deleteMessage(e.target);
      break;
    case "member_joined":
    case "member_left":
      onMembership(e);
      break;
    case "typing":
      if (e.channel === state.selected && e.user !== state.me) showTyping(e.user);
      break;
    case "read":
      if (ch) ch.read_seq = Math.max(ch.read_seq, e.seq);
      break;
    case "presence":
      state.presence.set(e.user, e.status);
      renderPresence();
      break;
    case "channel_added":
      state.channels.set(e.info.id, e.info);
      state.seen.set(e.info.id, Math.max(state.seen.get(e.info.id) || 0, e.info.last_seq));
      break;
    case "resync":
      // The gap was beyond the retention window: what is on screen may be stale.
      if (ch) state.seen.set(e.channel, ch.last_seq);
      if (e.channel === state.selected) selectChannel(e.channel);
      break;
  }
  renderChannels();
}

function onMembership(e) {
  const joined = e.type === "member_joined";
  if (e.user === state.me && !joined) {
    state.channels.delete(e.channel);
    state.seen.delete(e.channel);
    if (state.selected === e.channel) selectChannel(null);
    return;
  }
  if (e.user === state.me && joined && !state.channels.has(e.channel)) {
    // Joined from elsewhere (e.g. another tab): learn the channel's name.
    api("GET", `/v1/channels/${encodeURIComponent(e.channel)}`)
      .then((info) => {
        state.channels.set(info.id, info);
        renderChannels();
      })
      .catch((err) => showError(err.message));
  }
  if (e.channel !== state.selected) return;
  upsertSystem(e.seq, `${e.user} ${joined ? "joined" : "left"} the channel`);
  state.members = joined
    ? [...new Set([...state.members, e.user])]
    : state.members.filter((u) => u !== e.user);
  subscribePresence();
  renderPresence();
}

// ---------- channels ----------

function renderChannels() {
  const list = $("#channels");
  list.replaceChildren();
  const sorted = [...state.channels.values()].sort((a, b) => displayName(a).localeCompare(displayName(b)));
  for (const ch of sorted) {
    const unread = ch.id === state.selected ? 0 : Math.max(0, ch.last_seq - ch.read_seq);
    const item = el(
      "li",
      {
        dataset: { channel: ch.id, kind: ch.kind },
        class: ch.id === state.selected ? "selected" : "",
        onclick: () => selectChannel(ch.id),
      },
      el("span", { class: "name", text: displayName(ch) }),
      unread ? el("span", { class: "unread", text: String(unread), title: "unread" }) : null
    );
    list.append(item);
  }
}

function selectChannel(id) {
  if (readTimer) flushRead();
  state.selected = id;
  state.hasMore = false;
  state.members = [];
  state.authors.clear();
  for (const t of state.typers.values()) clearTimeout(t);
  state.typers.clear();
  renderTyping();
  $("#messages").replaceChildren();
  $("#load-older").hidden = true;
  const ch = id ? state.channels.get(id) : null;
  $("#channel-title").textContent = ch ? displayName(ch) : "No channel selected";
  renderChannels();
  renderPresence();
  updateComposer();
  if (!ch) return;
  loadHistory(id, null);
  loadMembers(id);
}

function updateComposer() {
  const ok = !!(state.selected && state.ws);
  $("#composer").disabled = !ok;
  $("#send").disabled = !ok;
}

function loadHistory(channel, before) {
  const req = { op: "history", channel, limit: HISTORY_PAGE };
  if (before != null) req.before = before;
  send(req, (r) => {
    if (r.op === "error") return showError(`history: ${r.code}: ${r.message}`);
    if (r.channel !== state.selected) return;
    const scroller = $("#scroller");
    const atBottom = before == null;
    const oldHeight = scroller.scrollHeight;
    for (const m of r.messages) upsertMessage(m);
    state.hasMore = r.has_more;
    $("#load-older").hidden = !r.has_more;
    // Keep the reader's place when older messages are added above.
    scroller.scrollTop = atBottom ? scroller.scrollHeight : scroller.scrollHeight - oldHeight;
    markRead();
  });
}

// Debounced, so a burst of messages on screen costs one `read` frame, not one each; flushed
// when the user switches channels so the one just viewed is still marked read.
let readTimer = null;
let readChannel = null;
function markRead() {
  if (document.visibilityState !== "visible") return;
  if (readTimer && readChannel !== state.selected) flushRead();
  readChannel = state.selected;
  clearTimeout(readTimer);
  readTimer = setTimeout(flushRead, 300);
}

function flushRead() {
  clearTimeout(readTimer);
  readTimer = null;
  const ch = state.channels.get(readChannel);
  if (!ch || ch.last_seq <= ch.read_seq) return;
  ch.read_seq = ch.last_seq;
  send({ op: "read", channel: ch.id, seq: ch.last_seq }, (r) => {
    if (r.op === "error") showError(`read: ${r.code}: ${r.message}`);
  });
}

async function loadBrowse() {
  const list = $("#public-channels");
  try {
    const { channels } = await api("GET", "/v1/channels?scope=public");
    list.replaceChildren();
    for (const ch of channels) {
      const joined = state.channels.has(ch.id);
      list.append(
        el(
          "li",
          { dataset: { publicChannel: ch.id } },
          el("span", { text: "# " + ch.name }),
          joined
            ? el("span", { class: "muted", text: "joined" })
            : el("button", { type: "button", text: "Join", onclick: () => joinChannel(ch) })
        )
      );
    }
    if (!channels.length) list.append(el("li", { class: "muted", text: "no public channels" }));
  } catch (e) {
    showError(e.message);
  }
}

function joinChannel(info) {
  send({ op: "join", channel: info.id }, (r) => {
    if (r.op === "error") return showError(`join: ${r.code}: ${r.message}`);
    if (!state.channels.has(info.id)) state.channels.set(info.id, { ...info, last_seq: r.seq, read_seq: 0 });
    state.seen.set(info.id, Math.max(state.seen.get(info.id) || 0, r.seq));
    selectChannel(info.id);
    loadBrowse();
  });
}

function addAndSelect(info) {
  if (!state.channels.has(info.id)) state.channels.set(info.id, info);
  selectChannel(info.id);
}

// ---------- messages ----------

function findSeq(seq) {
  return $("#messages").querySelector(`[data-seq="${Number(seq)}"]`);
}

// Inserts an item in seq order, so history pages and live events may arrive in any order.
function placeBySeq(node, seq) {
  const list = $("#messages");
  const existing = findSeq(seq);
  if (existing) return existing.replaceWith(node);
  const after = [...list.querySelectorAll("[data-seq]")].find((n) => Number(n.dataset.seq) > seq);
  const pendingFirst = list.querySelector(".pending");
  list.insertBefore(node, after || pendingFirst || null);
}

function messageNode(m) {
  const mine = m.user === state.me;
  const text = el("span", { class: "text", text: m.deleted ? "message deleted" : m.text });
  const node = el(
    "li",
    { class: "msg" + (m.deleted ? " deleted" : "") + (mine ? " mine" : ""), dataset: { seq: m.seq, author: m.user } },
    el(
      "div",
      { class: "meta" },
      el("span", {
        class: "dot" + (state.presence.get(m.user) === "online" ? " online" : ""),
        dataset: { presenceOf: m.user },
      }),
      el("span", { class: "author", text: m.user }),
      el("time", { text: formatTime(m.ts), title: new Date(m.ts).toLocaleString() }),
      m.thread ? el("span", { class: "muted", text: `↳ reply to #${m.thread}` }) : null,
      m.edited && !m.deleted ? el("span", { class: "muted edited", text: "(edited)" }) : null
    ),
    text
  );
  if (mine && !m.deleted) {
    node.append(
      el(
        "span",
        { class: "actions" },
        el("button", { type: "button", text: "edit", onclick: () => promptEdit(m.seq) }),
        el("button", { type: "button", text: "delete", onclick: () => requestDelete(m.seq) })
      )
    );
  }
  return node;
}

function upsertMessage(m) {
  if (m.client_msg_id) {
    const pend = $("#messages").querySelector(`.pending[data-cmid="${CSS.escape(m.client_msg_id)}"]`);
    if (pend) pend.remove();
  }
  if (!state.authors.has(m.user) && !state.members.includes(m.user)) {
    state.authors.add(m.user);
    subscribePresence();
  }
  placeBySeq(messageNode(m), m.seq);
  const scroller = $("#scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

function upsertSystem(seq, text) {
  placeBySeq(el("li", { class: "system", dataset: { seq }, text }), seq);
}

function editMessage(seq, text) {
  const node = findSeq(seq);
  if (!node || !node.classList.contains("msg")) return;
  node.querySelector(".text").textContent = text;
  if (!node.querySelector(".edited")) node.querySelector(".meta").append(el("span", { class: "muted edited", text: "(edited)" }));
}

function deleteMessage(seq) {
  const node = findSeq(seq);
  if (!node || !node.classList.contains("msg")) return;
  node.classList.add("deleted");
  node.querySelector(".text").textContent = "message deleted";
  node.querySelector(".actions")?.remove();
  node.querySelector(".edited")?.remove();
}

function promptEdit(seq) {
  const node = findSeq(seq);
  const text = prompt("Edit message", node ? node.querySelector(".text").textContent : "");
  if (text == null || !text.trim()) return;
  send({ op: "edit", channel: state.selected, seq, text }, (r) => {
    if (r.op === "error") showError(`edit: ${r.code}: ${r.message}`);
  });
}

function requestDelete(seq) {
  send({ op: "delete", channel: state.selected, seq }, (r) => {
    if (r.op === "error") showError(`delete: ${r.code}: ${r.message}`);
  });
}

// A send that answered `unavailable` may still have been stored (the store timed out after
// the write), so it is retried with the same client_msg_id, which the server de-duplicates:
// the retry gets the first ack instead of storing the message twice.
const SEND_RETRY_FIRST_MS = 500;
const SEND_RETRY_MAX_MS = 8000;
const SEND_ATTEMPTS = 12;

function sendMessage() {
  const box = $("#composer");
  const text = box.value;
  if (!text.trim() || !state.selected) return;
  const channel = state.selected;
  const cmid = randomId();
  const pend = el(
    "li",
    { class: "msg mine pending", dataset: { cmid } },
    el("div", { class: "meta" }, el("span", { class: "author", text: state.me }), el("span", { class: "muted", text: "sending…" })),
    el("span", { class: "text", text })
  );
  $("#messages").append(pend);
  $("#scroller").scrollTop = $("#scroller").scrollHeight;
  trySend({
    channel,
    text,
    cmid,
    pend,
    user: state.me,
    workspace: state.workspace,
    attempts: 0,
    delayMs: SEND_RETRY_FIRST_MS,
  });
  box.value = "";
  state.lastTypingSent = 0;
}

// One attempt of a send; `unavailable` (including a connection lost before the reply, or no
// connection at all) schedules another with the same client_msg_id.
function trySend(msg) {
  const fail = (why) => {
    msg.pend.classList.add("failed");
    msg.pend.querySelector(".meta .muted").textContent = `not sent: ${why}`;
  };
  // A logout (or a login as someone else) ends the retries: never send as another user.
  if (!state.wanted || state.me !== msg.user || state.workspace !== msg.workspace) return fail("offline");
  const retry = (why) => {
    if (msg.attempts >= SEND_ATTEMPTS) {
      fail(why);
      return showError(`send: ${why}`);
    }
    msg.pend.querySelector(".meta .muted").textContent = "sending… (retrying)";
    const delay = msg.delayMs * (0.75 + Math.random() / 2);
    msg.delayMs = Math.min(msg.delayMs * 2, SEND_RETRY_MAX_MS);
    setTimeout(() => trySend(msg), delay);
  };
  const id = send({ op: "send", channel: msg.channel, text: msg.text, client_msg_id: msg.cmid }, (r) => {
    if (r.op === "error") {
      if (r.code === "unavailable") return retry(r.code);
      fail(r.code);
      return showError(`send: ${r.code}: ${r.message}`);
    }
    // The message event normally replaces the pending line; if the ack wins the race, the
    // line stays until the event arrives, marked as delivered.
    msg.pend.querySelector(".meta .muted").textContent = "";
    if (msg.pend.isConnected && findSeq(r.seq)) msg.pend.remove();
  });
  // Offline: wait for the reconnect without spending an attempt.
  if (id == null) return retry("offline");
  msg.attempts += 1;
}

// ---------- typing ----------

function onComposerInput() {
  const now = Date.now();
  if (!state.selected || !$("#composer").value || now - state.lastTypingSent < TYPING_SEND_MS) return;
  state.lastTypingSent = now;
  send({ op: "typing", channel: state.selected });
}

function showTyping(user) {
  clearTimeout(state.typers.get(user));
  state.typers.set(user, setTimeout(() => clearTyping(user), TYPING_SHOW_MS));
  renderTyping();
}

function clearTyping(user) {
  if (!state.typers.has(user)) return;
  clearTimeout(state.typers.get(user));
  state.typers.delete(user);
  renderTyping();
}

function renderTyping() {
  const users = [...state.typers.keys()];
  $("#typing").textContent =
    users.length === 0 ? "" : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
}

// ---------- members and presence ----------

async function loadMembers(channel) {
  try {
    const { members } = await api("GET", `/v1/channels/${encodeURIComponent(channel)}/members`);
    if (channel !== state.selected) return;
    state.members = members;
    subscribePresence();
    renderPresence();
  } catch (e) {
    showError(e.message);
  }
}

function subscribePresence() {
  const users = [...new Set([...state.members, ...state.authors])].slice(0, 500);
  send({ op: "presence_sub", users }, (r) => {
    if (r.op === "error") return showError(`presence: ${r.code}: ${r.message}`);
    for (const [u, s] of Object.entries(r.users)) state.presence.set(u, s);
    renderPresence();
  });
}

function renderPresence() {
  const list = $("#members");
  list.replaceChildren();
  const sorted = [...state.members].sort();
  for (const u of sorted) {
    const status = state.presence.get(u) === "online" ? "online" : "offline";
    list.append(
      el(
        "li",
        { dataset: { user: u, status }, title: status },
        el("span", { class: "dot " + status }),
        el("span", { class: "name", text: u + (u === state.me ? " (you)" : "") }),
        el("span", { class: "muted", text: status }),
        u !== state.me ? el("button", { type: "button", class: "link", text: "DM", onclick: () => openDm(u) }) : null
      )
    );
  }
  document.querySelectorAll("#messages [data-presence-of]").forEach((dot) => {
    dot.classList.toggle("online", state.presence.get(dot.dataset.presenceOf) === "online");
  });
}

async function openDm(user) {
  try {
    addAndSelect(await api("POST", "/v1/dms", { user }));
  } catch (e) {
    showError(e.message);
  }
}

// ---------- wiring ----------

function init() {
  const params = new URLSearchParams(location.search);
  if (params.get("user")) $("#user").value = params.get("user");
  if (params.get("workspace")) $("#workspace").value = params.get("workspace");

  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("#disconnect").addEventListener("click", disconnect);
  document.querySelectorAll("[data-quick-user]").forEach((b) =>
    b.addEventListener("click", () => ($("#user").value = b.dataset.quickUser))
  );
  $("#compose").addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });
  $("#composer").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  $("#composer").addEventListener("input", onComposerInput);
  $("#load-older").addEventListener("click", () => {
    const first = $("#messages [data-seq]");
    if (state.selected && first) loadHistory(state.selected, Number(first.dataset.seq));
  });
  $("#browse").addEventListener("toggle", (e) => e.target.open && state.token && loadBrowse());
  $("#browse-refresh").addEventListener("click", loadBrowse);
  $("#new-channel").addEventListener("submit", async (e) => {
    e.preventDefault();
    const members = $("#new-channel-members").value.split(/[\s,]+/).filter(Boolean);
    try {
      const info = await api("POST", "/v1/channels", {
        name: $("#new-channel-name").value.trim(),
        kind: $("#new-channel-kind").value,
        members,
      });
      e.target.reset();
      addAndSelect(info);
    } catch (err) {
      showError(err.message);
    }
  });
  $("#new-dm").addEventListener("submit", (e) => {
    e.preventDefault();
    const user = $("#dm-user").value.trim();
    if (user) openDm(user).then(() => e.target.reset());
  });
  document.addEventListener("visibilitychange", markRead);
}

init();
