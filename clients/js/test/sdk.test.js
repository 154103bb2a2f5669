// The SDK against a live `confab dev`: delivery, de-duplication, the outbox, token refresh,
// resync beyond retention, a slow consumer closed with 4008, typing, presence and read markers
// across reconnects. Network faults are made on real sockets by a TCP proxy (harness.js).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, State, CloseCode } from "../src/confab.js";
import { startDev, startProxy, until, sleep, jwt, recorder } from "./harness.js";
import WebSocket from "ws";

let dev;
before(async () => {
  dev = await startDev(["--retention-events", "30", "--queue-events", "64", "--client-rate", "200"]);
});
after(async () => {
  await dev?.stop();
});

const clients = [];
function client(opts) {
  const c = new Client({ framesPerSecond: 150, frameBurst: 150, backoffInitialMs: 100, backoffMaxMs: 1000, ...opts });
  clients.push(c);
  return c;
}
after(() => clients.forEach((c) => c.close()));

/** A fresh public channel with the given members (so tests do not see each other's events). */
async function channel(creatorToken, members) {
  const r = await dev.api(creatorToken, "POST", "/v1/channels", { name: `t-${Math.random().toString(36).slice(2, 10)}`, kind: "public", members });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return r.body.id;
}

function seqsStrictlyIncrease(events) {
  for (let i = 1; i < events.length; i++) if (!(events[i].seq > events[i - 1].seq)) return false;
  return true;
}

test("send, edit, delete and a thread reply reach every member once, in seq order", async () => {
  const [ta, tb] = [await dev.token("alice"), await dev.token("bob")];
  const ch = await channel(ta, ["bob"]);
  const alice = client({ url: dev.wsUrl(), token: ta });
  const bob = client({ url: dev.wsUrl(), token: () => dev.token("bob") });
  const rb = recorder(bob);
  await Promise.all([alice.connect(), bob.connect()]);
  assert.equal(alice.state.state, State.READY);
  assert.ok(bob.channels.has(ch));

  const ack = await alice.send(ch, "first");
  assert.match(ack.client_msg_id, /^[0-9a-f]{24}$/);
  const reply = await alice.reply(ch, ack.seq, "in the thread");
  const edit = await alice.edit(ch, ack.seq, "first, edited");
  const del = await alice.delete(ch, reply.seq);
  await until("bob to see the delete", () => rb.events.some((e) => e.type === "message_deleted" && e.seq === del.seq));
  const log = rb.events.filter((e) => e.channel === ch && e.seq != null && e.seq >= ack.seq);
  assert.deepEqual(log.map((e) => e.type), ["message", "message", "message_edited", "message_deleted"]);
  assert.ok(seqsStrictlyIncrease(log));
  assert.equal(log[1].thread, ack.seq);
  assert.equal(log[2].target, ack.seq);
  assert.equal(edit.seq, log[2].seq);

  const page = await bob.history(ch, { limit: 10 });
  assert.deepEqual(page.messages.map((m) => [m.text, m.edited, m.deleted]), [["first, edited", true, false], ["", false, true]]);
  void tb;
});

test("a send retried with the same client_msg_id is stored and shown once", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, ["bob"]);
  const alice = client({ url: dev.wsUrl(), token: ta });
  const bob = client({ url: dev.wsUrl(), token: await dev.token("bob") });
  const rb = recorder(bob);
  await Promise.all([alice.connect(), bob.connect()]);
  const a1 = await alice.send(ch, "once", { clientMsgId: "dup-1" });
  const a2 = await alice.send(ch, "once", { clientMsgId: "dup-1" });
  assert.deepEqual([a2.seq, a2.ts], [a1.seq, a1.ts]);
  await alice.send(ch, "after");
  await until("bob to see 'after'", () => rb.texts(ch).includes("after"));
  assert.deepEqual(rb.texts(ch), ["once", "after"]);
  const page = await bob.history(ch);
  assert.equal(page.messages.filter((m) => m.client_msg_id === "dup-1").length, 1);
});

test("sends made while the network is down are delivered once after it comes back", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, ["bob"]);
  const proxy = await startProxy(Number(new URL(dev.base).port));
  const alice = client({ url: proxy.wsUrl(), token: ta });
  const bob = client({ url: dev.wsUrl(), token: await dev.token("bob") });
  const ra = recorder(alice);
  const rb = recorder(bob);
  await Promise.all([alice.connect(), bob.connect()]);
  const states = [];
  alice.on("state", (s) => states.push(s.state));

  proxy.refuse(true);
  proxy.cut();
  const sends = [];
  for (let i = 0; i < 20; i++) sends.push(alice.send(ch, `offline ${i}`));
  await until("alice to notice the cut", () => alice.state.state !== State.READY);
  assert.equal(alice.outbox.length, 20);
  await sleep(300);
  proxy.refuse(false);
  const acks = await Promise.all(sends);
  assert.equal(new Set(acks.map((a) => a.seq)).size, 20);
  const want = Array.from({ length: 20 }, (_, i) => `offline ${i}`);
  await until("bob to see all 20", () => rb.texts(ch).length >= 20);
  await until("alice to see all 20", () => ra.texts(ch).length >= 20);
  assert.deepEqual(rb.texts(ch), want);
  assert.deepEqual(ra.texts(ch), want);
  assert.ok(states.includes(State.RECONNECTING));
  assert.equal(alice.outbox.length, 0);
  proxy.close();
});

test("an expired token is replaced by the provider's next one (4001, then ready)", async () => {
  const expired = await jwt({ sub: "alice", wsp: "demo", exp: Math.floor(Date.now() / 1000) - 3600 });
  let calls = 0;
  const closes = [];
  const alice = client({
    url: dev.wsUrl(),
    token: async () => (++calls === 1 ? expired : dev.token("alice")),
  });
  alice.on("close", (c) => closes.push(c.code));
  await alice.connect();
  assert.equal(calls, 2);
  assert.deepEqual(closes, [CloseCode.BAD_TOKEN]);
  assert.equal(alice.user, "alice");
});

test("a provider that only gives bad tokens stops the client with an error", async () => {
  const bad = await jwt({ sub: "alice", wsp: "demo", exp: Math.floor(Date.now() / 1000) + 3600 }, "wrong-secret");
  const alice = client({ url: dev.wsUrl(), token: async () => bad });
  await assert.rejects(alice.connect(), (err) => err.code === "unauthorized");
  assert.equal(alice.state.state, State.CLOSED);
});

test("an unknown workspace (4004) stops the client and says so", async () => {
  const t = await jwt({ sub: "alice", wsp: "nowhere", exp: Math.floor(Date.now() / 1000) + 3600 });
  const alice = client({ url: dev.wsUrl(), token: t });
  await assert.rejects(alice.connect(), (err) => err.code === "unknown_workspace" && err.closeCode === 4004);
});

test("resume beyond retention gets resync, and the SDK pages history: nothing missing, nothing twice", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, ["bob"]);
  const proxy = await startProxy(Number(new URL(dev.base).port));
  const bob = client({ url: proxy.wsUrl(), token: await dev.token("bob") });
  const alice = client({ url: dev.wsUrl(), token: ta });
  const rb = recorder(bob);
  await Promise.all([alice.connect(), bob.connect()]);
  await alice.send(ch, "before");
  await until("bob to see 'before'", () => rb.texts(ch).includes("before"));

  proxy.refuse(true);
  proxy.cut();
  // Over 30 events (the retention of this dev server) while bob is away, edits among them.
  const want = ["before"];
  for (let i = 0; i < 70; i++) {
    const a = await alice.send(ch, `away ${i}`);
    want.push(`away ${i}`);
    if (i === 5) await alice.edit(ch, a.seq, `away ${i} (edited)`), (want[want.length - 1] = `away ${i} (edited)`);
  }
  proxy.refuse(false);
  await until("bob to catch up", () => rb.texts(ch).length >= want.length);
  await alice.send(ch, "live again");
  want.push("live again");
  await until("bob to see the live message", () => rb.texts(ch).includes("live again"));
  assert.ok(rb.events.some((e) => e.type === "resync" && e.channel === ch), "bob got a resync");
  assert.deepEqual(rb.texts(ch), want);
  assert.ok(seqsStrictlyIncrease(rb.messages(ch)));
  assert.ok(rb.messages(ch).some((m) => m.replayed));
  proxy.close();
});

test("a slow consumer closed with 4008 resumes with nothing missing", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, ["bob"]);
  const proxy = await startProxy(Number(new URL(dev.base).port));
  // Without permessage-deflate (which ws would negotiate): the texts below fill the buffers
  // on the way only at their full size.
  class PlainWebSocket extends WebSocket {
    constructor(url) {
      super(url, { perMessageDeflate: false });
    }
  }
  const bob = client({ url: proxy.wsUrl(), token: await dev.token("bob"), WebSocket: PlainWebSocket });
  const alice = client({ url: dev.wsUrl(), token: ta, framesPerSecond: 190, frameBurst: 190 });
  const rb = recorder(bob);
  const closes = [];
  bob.on("close", (c) => closes.push(c.code));
  await Promise.all([alice.connect(), bob.connect()]);
  // Bob stops reading; alice sends until the gateway gives him up (its slow-consumer counter
  // moves): more than his queue (64 events) and the socket buffers on the way hold. Bob must
  // read again within 5 s of that, or the server drops the socket before its 4008 gets through.
  const slowCloses = async () => {
    const text = await (await fetch(`${dev.base}/metrics`)).text();
    const m = text.match(/^confab_slow_consumer_closes_total(?:\{[^}]*\})? (\d+)/m);
    return m ? Number(m[1]) : 0;
  };
  const baseline = await slowCloses();
  proxy.stall(true);
  const big = "x".repeat(12000);
  const want = [];
  for (let i = 0; i < 2500; i += 20) {
    const chunk = [];
    for (let j = i; j < i + 20; j++) {
      want.push(`${j} ${big}`);
      chunk.push(alice.send(ch, `${j} ${big}`));
    }
    await Promise.all(chunk);
    if ((await slowCloses()) > baseline) break;
  }
  proxy.stall(false);
  await until("bob to be closed as a slow consumer", () => closes.includes(CloseCode.SLOW_CONSUMER), 60000);
  await until("bob to see every message", () => rb.texts(ch).length >= want.length, 60000);
  assert.equal(rb.texts(ch).length, want.length);
  assert.ok(rb.texts(ch).every((t, i) => t === want[i]), "in order, each once");
  assert.ok(seqsStrictlyIncrease(rb.messages(ch)));
  proxy.close();
});

test("typing is throttled on the client and reaches the others across a reconnect", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, ["bob"]);
  const proxy = await startProxy(Number(new URL(dev.base).port));
  const alice = client({ url: proxy.wsUrl(), token: ta, typingThrottleMs: 500 });
  const bob = client({ url: dev.wsUrl(), token: await dev.token("bob") });
  const rb = recorder(bob);
  await Promise.all([alice.connect(), bob.connect()]);
  assert.equal(alice.typing(ch), true);
  assert.equal(alice.typing(ch), false, "a second typing within the throttle is not sent");
  await until("bob to see alice typing", () => rb.events.some((e) => e.type === "typing" && e.channel === ch && e.user === "alice"));
  const before = rb.events.filter((e) => e.type === "typing").length;
  proxy.cut();
  await until("alice to reconnect", async () => alice.state.state === State.READY && alice.stats.connects === 2);
  // The server drops typing from the same user within 3 s; wait that out, then type again.
  await sleep(3100);
  assert.equal(alice.typing(ch), true);
  await until("bob to see alice typing again", () => rb.events.filter((e) => e.type === "typing").length > before);
  proxy.close();
});

test("the presence subscription survives reconnects", async () => {
  const ta = await dev.token("alice");
  const proxy = await startProxy(Number(new URL(dev.base).port));
  const alice = client({ url: proxy.wsUrl(), token: ta });
  await alice.connect();
  const statuses = await alice.subscribePresence(["carol"]);
  assert.equal(statuses.carol, "offline");
  const seen = [];
  alice.on("presence", (e) => seen.push(`${e.user}:${e.status}`));
  proxy.cut();
  await until("alice to reconnect", () => alice.state.state === State.READY && alice.stats.connects === 2);
  const carol = client({ url: dev.wsUrl(), token: await dev.token("carol") });
  await carol.connect();
  await until("alice to see carol online", () => alice.presence.get("carol") === "online");
  carol.close();
  await until("alice to see carol offline", () => alice.presence.get("carol") === "offline");
  assert.deepEqual(seen, ["carol:online", "carol:offline"]);
  proxy.close();
});

test("read markers reach the user's other devices, live and after a reconnect", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, ["bob"]);
  const proxy = await startProxy(Number(new URL(dev.base).port));
  const phone = client({ url: dev.wsUrl(), token: ta });
  const laptop = client({ url: proxy.wsUrl(), token: ta });
  const reads = [];
  laptop.on("read", (e) => e.channel === ch && reads.push(e.seq));
  await Promise.all([phone.connect(), laptop.connect()]);
  const a1 = await phone.send(ch, "one");
  await phone.markRead(ch, a1.seq);
  await until("the laptop to get the read marker", () => reads.includes(a1.seq));
  assert.equal(laptop.readSeq(ch), a1.seq);

  proxy.refuse(true);
  proxy.cut();
  const a2 = await phone.send(ch, "two");
  await phone.markRead(ch, a2.seq);
  proxy.refuse(false);
  await until("the laptop to learn the marker from ready", () => laptop.readSeq(ch) === a2.seq);
  assert.ok(reads.includes(a2.seq));
  proxy.close();
});

test("events come as an async iterator too, ended by close()", async () => {
  const ta = await dev.token("alice");
  const ch = await channel(ta, []);
  const alice = client({ url: dev.wsUrl(), token: ta });
  await alice.connect();
  const it = alice.events("message");
  await alice.send(ch, "via the iterator");
  const { value } = await it.next();
  assert.equal(value.text, "via the iterator");
  const rest = it.next();
  alice.close();
  assert.deepEqual(await rest, { value: undefined, done: true });
});

test("requests time out when no reply comes", async () => {
  const ta = await dev.token("alice");
  const proxy = await startProxy(Number(new URL(dev.base).port));
  const alice = client({ url: proxy.wsUrl(), token: ta, requestTimeoutMs: 500 });
  await alice.connect();
  proxy.stall(true);
  await assert.rejects(alice.history("general"), (err) => err.code === "timeout");
  proxy.close();
});
