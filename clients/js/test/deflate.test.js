// permessage-deflate (RFC 7692) between confab dev and the `ws` package, an implementation of
// the extension independent of confab's: the gateway accepts ws's offer with no context
// takeover either way, its compressed events arrive intact and smaller on the wire, and it
// reads ws's compressed frames. A client that offers nothing is unaffected.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { startDev, until } from "./harness.js";

let dev;
before(async () => {
  dev = await startDev(["--client-rate", "200"]);
});
after(async () => {
  await dev?.stop();
});

/** An open WebSocket with every JSON frame it receives recorded in `frames`. */
function open(url, options) {
  return new Promise((ok, fail) => {
    const ws = new WebSocket(url, options);
    ws.frames = [];
    ws.once("upgrade", (res) => (ws.answer = res.headers["sec-websocket-extensions"] ?? ""));
    ws.on("message", (data) => ws.frames.push(JSON.parse(data.toString())));
    ws.once("open", () => ok(ws));
    ws.once("error", fail);
  });
}

async function hello(ws, user) {
  ws.send(JSON.stringify({ op: "hello", token: await dev.token(user) }));
  await until(`${user}'s ready`, () => ws.frames.find((f) => f.op === "ready"));
}

/** About 1 KiB of words, as a chat message is. */
function chatText(seed) {
  const words = ["the", "release", "is", "ready", "for", "review", "please", "check", "logs", "and", "tests", "today"];
  let text = "";
  for (let i = 0; text.length < 1024; i++) text += words[(i * 7 + seed) % words.length] + " ";
  return text;
}

test("ws negotiates permessage-deflate: events arrive intact and compressed, its compressed sends are read", async () => {
  // threshold 0: ws compresses every frame it sends.
  const alice = await open(dev.wsUrl(), { perMessageDeflate: { threshold: 0 } });
  const plain = await open(dev.wsUrl(), { perMessageDeflate: false });
  try {
    assert.equal(alice.extensions, "permessage-deflate");
    assert.match(alice.answer, /^permessage-deflate/);
    assert.match(alice.answer, /server_no_context_takeover/);
    assert.match(alice.answer, /client_no_context_takeover/);
    assert.equal(plain.extensions, "");
    assert.equal(plain.answer, "", "nothing offered, nothing accepted");
    await hello(alice, "alice");
    await hello(plain, "bob");
    const [aliceBefore, plainBefore] = [alice._socket.bytesRead, plain._socket.bytesRead];

    const texts = Array.from({ length: 10 }, (_, i) => chatText(i));
    texts.forEach((text, i) => alice.send(JSON.stringify({ op: "send", id: i + 1, channel: "general", text })));
    await until("10 acks", () => alice.frames.filter((f) => f.op === "ack").length === 10);
    const events = (ws) => ws.frames.filter((f) => f.type === "message" && texts.includes(f.text));
    await until("alice's 10 events", () => events(alice).length === 10);
    await until("bob's 10 events", () => events(plain).length === 10);
    assert.deepEqual(events(alice), events(plain), "the same events, field for field");
    assert.deepEqual(events(alice).map((e) => e.text), texts, "in order");

    // alice got acks too, and bob nothing but the events: compressed, hers are still smaller.
    const aliceWire = alice._socket.bytesRead - aliceBefore;
    const plainWire = plain._socket.bytesRead - plainBefore;
    assert.ok(aliceWire < plainWire / 2, `compressed ${aliceWire} bytes on the wire, plain ${plainWire}`);
  } finally {
    alice.close();
    plain.close();
  }
});

test("a compressed frame over the limit once inflated is closed with 1009", async () => {
  const ws = await open(dev.wsUrl(), { perMessageDeflate: { threshold: 0 } });
  await hello(ws, "carol");
  const closed = new Promise((ok) => ws.once("close", (code) => ok(code)));
  // 200 KiB of words compress to a few KiB, within 64 KiB as sent, far over it inflated.
  ws.send(JSON.stringify({ op: "send", channel: "general", text: chatText(1).repeat(200) }));
  assert.equal(await closed, 1009);
});
