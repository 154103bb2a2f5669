// confab web client: a chat page on the confab SDK (/sdk/confab.js, clients/js in the
// repository). The SDK owns the WebSocket session — reconnects, resume, de-duplication, gap
// filling, the outbox of unacked sends, typing throttle, presence and read markers — so this
// file only renders what it delivers and calls the HTTP API (SPEC §5) for channel management.
// User-supplied text only ever reaches the page through textContent, never innerHTML.

import { Client, State, newClientMsgId } from "/sdk/confab.js";

const $ = (sel) => document.querySelector(sel);
const TYPING_SHOW_MS = 4000; // show "x is typing…" this long after the last typing event
const HISTORY_PAGE = 50;

const state = {
  client: null,
  token: null, // the current token, for the HTTP API
  me: null,
  selected: null,
  members: [], // members of the selected channel
  authors: new Set(), // users seen in the selected channel's messages
  typers: new Map(), // user -> timeout handle
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

function formatTime(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function channels() {
  return state.client ? state.client.channels : new Map();
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

// ---------- the session (all of it in the SDK) ----------

/** The token provider the SDK calls on every (re)connect: a pasted token, or one the admin API mints. */
function tokenProvider() {
  const pasted = $("#token").value.trim();
  if (pasted) {
    return async () => (state.token = pasted);
  }
  const user = $("#user").value.trim();
  const workspace = $("#workspace").value.trim();
  const admin = $("#admin-token").value;
  return async () => {
    const minted = await api("POST", "/admin/v1/tokens", { workspace, user }, admin);
    return (state.token = minted.token);
  };
}

function connect() {
  if (!$("#token").value.trim() && (!$("#user").value.trim() || !$("#workspace").value.trim())) {
    return showError("paste a token, or enter a workspace and a user id");
  }
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const client = new Client({ url: `${proto}//${location.host}/v1/ws`, token: tokenProvider() });
  state.client = client;
  setFormConnected(true);
  client.on("state", (s) => onState(client, s));
  client.on("ready", (f) => client === state.client && onReady(f));
  client.on("event", (e) => client === state.client && onEvent(e));
  client.on("error", (err) => client === state.client && showError(err.message || String(err)));
  client.connect().catch(() => {}); // failures arrive as state and error events
}

function disconnect() {
  const client = state.client;
  state.client = null;
  if (client) client.close();
  setFormConnected(false);
  state.selected = null;
  renderChannels();
  selectChannel(null);
}

function onState(client, s) {
  if (client !== state.client) return;
  switch (s.state) {
    case State.CONNECTING:
      setStatus(s.attempt ? `connecting… (attempt ${s.attempt + 1})` : "connecting…", "busy");
      break;
    case State.READY:
      setStatus(`connected as ${client.user} (${client.workspace})`, "up");
      break;
    case State.RECONNECTING: {
      const why = s.lastClose ? `closed: ${s.lastClose.code}${s.lastClose.reason ? " " + s.lastClose.reason : ""}` : "offline";
      setStatus(`${why} — reconnecting in ${(s.retryInMs / 1000).toFixed(1)} s`, "down");
      break;
    }
    case State.CLOSED:
      if (s.error) {
        setStatus(`stopped: ${s.error.message}`, "down");
        state.client = null;
        setFormConnected(false);
      }
      break;
  }
  updateComposer();
}

function setFormConnected(on) {
  for (const id of ["#workspace", "#user", "#admin-token", "#token", "#connect"]) $(id).disabled = on;
  document.querySelectorAll("[data-quick-user]").forEach((b) => (b.disabled = on));
  $("#connect").hidden = on;
  $("#disconnect").hidden = !on;
  if (!on) setStatus("disconnected", "");
}

function onReady(f) {
  state.me = f.user;
  renderChannels();
  if (state.selected && channels().has(state.selected)) {
    // Missed events arrive through the SDK's resume; members and presence are refreshed.
    loadMembers(state.selected);
    updateComposer();
  } else {
    const first = channels().has("general") ? "general" : f.channels.length ? f.channels[0].id : null;
    selectChannel(first);
  }
}

// ---------- events ----------

function onEvent(e) {
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
    case "presence":
      renderPresence();
      break;
    case "resync_done":
      // After a resync the SDK delivered what history has; a cut-short one shows the latest.
      if (!e.complete && e.channel === state.selected) selectChannel(e.channel);
      break;
  }
  renderChannels();
}

function onMembership(e) {
  const joined = e.type === "member_joined";
  if (e.user === state.me && !joined) {
    if (state.selected === e.channel) selectChannel(null);
    return;
  }
  if (e.user === state.me && joined && !channels().has(e.channel)) {
    // Joined from elsewhere (e.g. another tab): learn the channel's name.
    api("GET", `/v1/channels/${encodeURIComponent(e.channel)}`)
      .then((info) => {
        if (!channels().has(info.id)) channels().set(info.id, info);
        renderChannels();
      })
      .catch((err) => showError(err.message));
  }
  if (e.channel !== state.selected) return;
  upsertSystem(e.seq, `${e.user} ${joined ? "joined" : "left"} the channel`);
  state.members = joined ? [...new Set([...state.members, e.user])] : state.members.filter((u) => u !== e.user);
  subscribePresence();
  renderPresence();
}

// ---------- channels ----------

function renderChannels() {
  const list = $("#channels");
  list.replaceChildren();
  const sorted = [...channels().values()].sort((a, b) => displayName(a).localeCompare(displayName(b)));
  for (const ch of sorted) {
    const read = state.client ? Math.max(state.client.readSeq(ch.id), ch.read_seq || 0) : 0;
    const unread = ch.id === state.selected ? 0 : Math.max(0, ch.last_seq - read);
    list.append(
      el(
        "li",
        {
          dataset: { channel: ch.id, kind: ch.kind },
          class: ch.id === state.selected ? "selected" : "",
          onclick: () => selectChannel(ch.id),
        },
        el("span", { class: "name", text: displayName(ch) }),
        unread ? el("span", { class: "unread", text: String(unread), title: "unread" }) : null
      )
    );
  }
}

function selectChannel(id) {
  if (readTimer) flushRead();
  state.selected = id;
  state.members = [];
  state.authors.clear();
  for (const t of state.typers.values()) clearTimeout(t);
  state.typers.clear();
  renderTyping();
  $("#messages").replaceChildren();
  $("#load-older").hidden = true;
  const ch = id ? channels().get(id) : null;
  $("#channel-title").textContent = ch ? displayName(ch) : "No channel selected";
  renderChannels();
  renderPresence();
  updateComposer();
  if (!ch) return;
  loadHistory(id, null);
  loadMembers(id);
}

function updateComposer() {
  // Sends made while reconnecting wait in the SDK's outbox, so the composer stays usable.
  const ok = !!(state.selected && state.client);
  $("#composer").disabled = !ok;
  $("#send").disabled = !ok;
}

async function loadHistory(channel, before) {
  if (!state.client) return;
  let page;
  try {
    page = await state.client.history(channel, before != null ? { before, limit: HISTORY_PAGE } : { limit: HISTORY_PAGE });
  } catch (err) {
    return showError(`history: ${err.code}: ${err.message}`);
  }
  if (channel !== state.selected) return;
  const scroller = $("#scroller");
  const atBottom = before == null;
  const oldHeight = scroller.scrollHeight;
  for (const m of page.messages) upsertMessage(m);
  $("#load-older").hidden = !page.has_more;
  // Keep the reader's place when older messages are added above.
  scroller.scrollTop = atBottom ? scroller.scrollHeight : scroller.scrollHeight - oldHeight;
  markRead();
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
  const ch = channels().get(readChannel);
  if (!ch || !state.client) return;
  state.client.markRead(ch.id, ch.last_seq).catch((err) => showError(`read: ${err.code}: ${err.message}`));
}

async function loadBrowse() {
  const list = $("#public-channels");
  try {
    const { channels: all } = await api("GET", "/v1/channels?scope=public");
    list.replaceChildren();
    for (const ch of all) {
      const joined = channels().has(ch.id);
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
    if (!all.length) list.append(el("li", { class: "muted", text: "no public channels" }));
  } catch (e) {
    showError(e.message);
  }
}

async function joinChannel(info) {
  try {
    const ack = await state.client.join(info.id);
    if (!channels().has(info.id)) channels().set(info.id, { ...info, last_seq: ack.seq, read_seq: 0 });
    selectChannel(info.id);
    loadBrowse();
  } catch (err) {
    showError(`join: ${err.code}: ${err.message}`);
  }
}

function addAndSelect(info) {
  if (!channels().has(info.id)) channels().set(info.id, info);
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
  const status = state.client && state.client.presence.get(m.user);
  const node = el(
    "li",
    { class: "msg" + (m.deleted ? " deleted" : "") + (mine ? " mine" : ""), dataset: { seq: m.seq, author: m.user } },
    el(
      "div",
      { class: "meta" },
      el("span", { class: "dot" + (status === "online" ? " online" : ""), dataset: { presenceOf: m.user } }),
      el("span", { class: "author", text: m.user }),
      el("time", { text: formatTime(m.ts), title: new Date(m.ts).toLocaleString() }),
      m.thread ? el("span", { class: "muted", text: `↳ reply to #${m.thread}` }) : null,
      m.edited && !m.deleted ? el("span", { class: "muted edited", text: "(edited)" }) : null
    ),
    el("span", { class: "text", text: m.deleted ? "message deleted" : m.text })
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
  state.client.edit(state.selected, seq, text).catch((err) => showError(`edit: ${err.code}: ${err.message}`));
}

function requestDelete(seq) {
  state.client.delete(state.selected, seq).catch((err) => showError(`delete: ${err.code}: ${err.message}`));
}

function sendMessage() {
  const box = $("#composer");
  const text = box.value;
  if (!text.trim() || !state.selected || !state.client) return;
  const channel = state.selected;
  // The id is chosen here so the pending line can be matched to its event; the SDK keeps the
  // send in its outbox and retries it with this same id until the server acks it.
  const clientMsgId = newClientMsgId();
  const pend = el(
    "li",
    { class: "msg mine pending", dataset: { cmid: clientMsgId } },
    el("div", { class: "meta" }, el("span", { class: "author", text: state.me }), el("span", { class: "muted", text: "sending…" })),
    el("span", { class: "text", text })
  );
  $("#messages").append(pend);
  $("#scroller").scrollTop = $("#scroller").scrollHeight;
  box.value = "";
  state.client
    .send(channel, text, { clientMsgId })
    .then((ack) => {
      // The message event normally replaces the pending line; if the ack wins the race, the
      // line stays until the event arrives, marked as delivered.
      pend.querySelector(".meta .muted").textContent = "";
      if (pend.isConnected && findSeq(ack.seq)) pend.remove();
    })
    .catch((err) => {
      pend.classList.add("failed");
      pend.querySelector(".meta .muted").textContent = `not sent: ${err.code}`;
      showError(`send: ${err.code}: ${err.message}`);
    });
}

// ---------- typing ----------

function onComposerInput() {
  // The SDK throttles typing frames per channel.
  if (state.selected && state.client && $("#composer").value) state.client.typing(state.selected);
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
  $("#typing").textContent = users.length === 0 ? "" : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
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
  if (!state.client) return;
  // The SDK subscribes this set again after every reconnect.
  const users = [...new Set([...state.members, ...state.authors])].slice(0, 500);
  state.client
    .subscribePresence(users)
    .then(renderPresence)
    .catch((err) => showError(`presence: ${err.code}: ${err.message}`));
}

function renderPresence() {
  const list = $("#members");
  list.replaceChildren();
  const presence = state.client ? state.client.presence : new Map();
  for (const u of [...state.members].sort()) {
    const status = presence.get(u) === "online" ? "online" : "offline";
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
    dot.classList.toggle("online", presence.get(dot.dataset.presenceOf) === "online");
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
  // `#token=<jwt>`: a page served by a production gateway logs in with the user's own token,
  // never the admin token. The fragment never reaches a server; it is taken off the address bar.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const fromFragment = fragment.get("token");
  if (fromFragment) {
    $("#token").value = fromFragment;
    history.replaceState(null, "", location.pathname + location.search);
  }

  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("#disconnect").addEventListener("click", disconnect);
  document.querySelectorAll("[data-quick-user]").forEach((b) =>
    b.addEventListener("click", () => {
      $("#user").value = b.dataset.quickUser;
      $("#token").value = "";
    })
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
  if (fromFragment) connect();
}

init();
