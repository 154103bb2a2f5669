// The SDK against a distributed deployment (directory Redis, a cell with its own Redis, two
// gateways): the gateway a sender and a reader are on is killed with SIGKILL in the middle of a
// burst of 200 sends. After recovery every member's client shows every message exactly once,
// in seq order, and the channel stores each once.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Client, State } from "../src/confab.js";
import { startCluster, kill9, until, recorder } from "./harness.js";

let cluster;
before(async () => {
  // A fast burst (the gateways allow 1,000 frames/s) so that many sends are in flight, written
  // and maybe stored but not acked, at the moment of the kill.
  cluster = await startCluster({ gateways: 2, gatewayArgs: ["--client-rate", "1000"] });
});
after(async () => {
  await cluster?.stop();
});

test("200 sends while the sender's gateway is kill -9ed: every message once, in seq order, for every member", async () => {
  const add = await cluster.api(await cluster.token("alice"), "POST", "/v1/channels/general/members", { user: "carol" });
  assert.equal(add.status, 200, JSON.stringify(add.body));
  // alice (the sender) and bob start on gateway 0, carol on gateway 1; each knows both.
  const urls = cluster.wsUrls();
  const mk = (user, first) =>
    new Client({ url: first === 0 ? urls : [...urls].reverse(), token: () => cluster.token(user), backoffInitialMs: 200, backoffMaxMs: 2000, framesPerSecond: 400, frameBurst: 50 });
  const alice = mk("alice", 0);
  const bob = mk("bob", 0);
  const carol = mk("carol", 1);
  const members = { alice, bob, carol };
  const rec = Object.fromEntries(Object.entries(members).map(([u, c]) => [u, recorder(c)]));
  await Promise.all(Object.values(members).map((c) => c.connect()));

  const N = 200;
  const texts = Array.from({ length: N }, (_, i) => `burst ${i}`);
  const started = Date.now();
  let acked = 0;
  const ackedAt = new Array(N);
  const sends = texts.map((t, i) => alice.send("general", t).then((a) => ((ackedAt[i] = Date.now()), acked++, a)));
  await until("60 acks before the kill", () => acked >= 60, 30000);
  await kill9(cluster.gateways[0].child);
  const killedAt = Date.now();
  const killedAfter = acked;
  await until("alice to be ready again (on gateway 1)", () => alice.state.state === State.READY && alice.stats.connects === 2);
  const recoveredAt = Date.now();
  const acks = await Promise.all(sends);
  const seqs = acks.map((a) => a.seq);
  assert.equal(new Set(seqs).size, N, "each send has its own seq");
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), "acks in the order of the sends");

  for (const [user, r] of Object.entries(rec)) {
    await until(`${user} to see all ${N}`, () => r.texts("general").filter((t) => t.startsWith("burst ")).length >= N);
    const got = r.messages("general").filter((m) => m.text.startsWith("burst "));
    assert.deepEqual(got.map((m) => m.text), texts, `${user}: every message once, in order`);
    assert.deepEqual(got.map((m) => m.seq), seqs, `${user}: the seqs of the acks`);
  }
  // Stored once: the channel's history holds each text exactly once.
  const stored = [];
  let before = undefined;
  for (;;) {
    const q = before ? `?limit=200&before=${before}` : "?limit=200";
    const page = await cluster.api(await cluster.token("bob"), "GET", `/v1/channels/general/messages${q}`);
    assert.equal(page.status, 200);
    stored.unshift(...page.body.messages);
    if (!page.body.has_more) break;
    before = page.body.messages[0].seq;
  }
  assert.deepEqual(stored.filter((m) => m.text.startsWith("burst ")).map((m) => m.text), texts);

  const report = {
    sends: N,
    acked_before_kill: killedAfter,
    recovery_ms: recoveredAt - killedAt,
    total_ms: Date.now() - started,
    retransmits: alice.stats.retransmits,
    // Stored before the kill (server ts) but acked only after it, through a retransmission
    // with the same client_msg_id that the server answered with the first ack.
    stored_before_kill_acked_after: acks.filter((a, i) => a.ts < killedAt && ackedAt[i] > killedAt).length,
    duplicates_dropped: Object.fromEntries(Object.entries(members).map(([u, c]) => [u, c.stats.duplicates])),
    reconnects: Object.fromEntries(Object.entries(members).map(([u, c]) => [u, c.stats.connects - 1])),
  };
  console.log(`kill-the-gateway: ${JSON.stringify(report)}`);
  for (const c of Object.values(members)) c.close();
});
