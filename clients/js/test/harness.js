// Test support: real `confab dev` and real distributed deployments (redis-server, `confab cell`,
// `confab gateway`) on free loopback ports, started and killed by the tests themselves.
//
// The binary is $CONFAB_BIN, or target/debug/confab of this repository (build it first with
// `cargo build -p confab`).

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { createServer, connect as netConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "../../..");
export const BIN = process.env.CONFAB_BIN || join(REPO, "target/debug/confab");
export const ADMIN_TOKEN = "dev-admin";
export const JWT_SECRET = "dev-secret";
/** Generous bound for anything a test waits for; never a pass/fail timing assertion. */
export const WAIT_MS = 30000;

const children = new Set();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
});

export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns something truthy; fails naming `what` after `ms`. */
export async function until(what, fn, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last: ${last instanceof Error ? last.stack : JSON.stringify(last)}`);
    await sleep(50);
  }
}

/** A child process that dies with the test process. */
function run(cmd, args, { env = {}, onLine } = {}) {
  if (cmd === BIN && !existsSync(BIN)) throw new Error(`${BIN} is missing: run \`cargo build -p confab\` first or set CONFAB_BIN`);
  const child = spawn(cmd, args, { env: { ...process.env, CONFAB_LOG: "warn", ...env }, stdio: ["ignore", "pipe", "inherit"] });
  children.add(child);
  child.on("exit", () => children.delete(child));
  let buf = "";
  child.stdout.on("data", (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (onLine) onLine(line);
    }
  });
  return child;
}

function exited(child) {
  return new Promise((r) => (child.exitCode != null || child.signalCode != null ? r() : child.once("exit", r)));
}

export async function kill9(child) {
  if (child.exitCode == null && child.signalCode == null) {
    child.kill("SIGKILL");
    await exited(child);
  }
}

async function waitHttp(url) {
  await until(`${url} to answer 200`, async () => (await fetch(url)).ok);
}

async function call(base, bearer, method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${bearer}`, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, body: json, headers: res.headers };
}

/** `confab dev` on a free port, with extra flags. */
export async function startDev(extra = []) {
  let resolveUrl;
  const got = new Promise((r) => (resolveUrl = r));
  const child = run(BIN, ["dev", "--listen", "127.0.0.1:0", ...extra], {
    onLine: (line) => {
      const m = line.match(/^confab dev listening on (\S+)/);
      if (m) resolveUrl(m[1].replace(/\/$/, ""));
    },
  });
  let timer;
  const timeout = new Promise((_, fail) => (timer = setTimeout(() => fail(new Error("confab dev did not print its URL")), WAIT_MS)));
  const base = await Promise.race([got, exited(child).then(() => Promise.reject(new Error("confab dev exited"))), timeout]).finally(() => clearTimeout(timer));
  await waitHttp(`${base}/readyz`);
  return new Deployment([base], { stop: () => kill9(child) });
}

/** Starts a durable redis-server on a free port. */
async function startRedis(dir) {
  const port = await freePort();
  const child = run("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--appendonly", "yes", "--appendfsync", "always", "--save", ""]);
  await until(`redis on ${port}`, () => pingRedis(port));
  return { child, url: `redis://127.0.0.1:${port}`, port };
}

function pingRedis(port) {
  return new Promise((done) => {
    const s = netConnect(port, "127.0.0.1");
    s.on("connect", () => s.write("PING\r\n"));
    s.on("data", (d) => {
      s.destroy();
      done(String(d).startsWith("+PONG"));
    });
    s.on("error", () => done(false));
  });
}

/**
 * A TCP proxy in front of `port`, for network faults on real sockets: `cut()` resets every
 * connection through it, `refuse(true)` turns new ones away, `stall(true)` stops reading from
 * the server (so its socket buffers fill, as with a client that stopped reading).
 */
export async function startProxy(port) {
  const pairs = new Set();
  let refusing = false;
  let stalled = false;
  const server = createServer((client) => {
    if (refusing) return client.destroy();
    const upstream = netConnect(port, "127.0.0.1");
    const pair = { client, upstream };
    pairs.add(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    if (stalled) upstream.pause();
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: server.address().port,
    wsUrl: () => `ws://127.0.0.1:${server.address().port}/v1/ws`,
    cut() {
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    refuse(on) {
      refusing = on;
    },
    stall(on) {
      stalled = on;
      for (const { upstream, client } of pairs) {
        if (on) {
          upstream.unpipe(client);
          upstream.pause();
        } else {
          upstream.pipe(client);
          upstream.resume();
        }
      }
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/**
 * A distributed deployment: a directory Redis, one cell (with its own Redis) in region
 * `local`, and `gateways` gateways. Workspace `demo` with a public channel `general` whose
 * members are alice and bob, as `confab dev` seeds it.
 */
export async function startCluster({ gateways = 2, cellArgs = [], gatewayArgs = [] } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "confab-js-"));
  const directory = await startRedis(dir + "/");
  const { mkdirSync } = await import("node:fs");
  mkdirSync(join(dir, "c1"));
  const store = await startRedis(join(dir, "c1"));
  const cellPort = await freePort();
  const cell = run(BIN, [
    "cell", "--id", "c1", "--region", "local",
    "--listen", `127.0.0.1:${cellPort}`, "--advertise", `http://127.0.0.1:${cellPort}`,
    "--redis", store.url, "--directory", directory.url, "--cluster-secret", "js-test-secret", ...cellArgs,
  ]);
  await waitHttp(`http://127.0.0.1:${cellPort}/readyz`);
  const gws = [];
  for (let i = 0; i < gateways; i++) gws.push(await startGateway(directory.url, gatewayArgs));
  const dep = new Deployment(gws.map((g) => g.base), {
    stop: async () => {
      for (const g of gws) await kill9(g.child);
      await kill9(cell);
      await kill9(store.child);
      await kill9(directory.child);
      rmSync(dir, { recursive: true, force: true });
    },
  });
  dep.gateways = gws;
  dep.restartGateway = async (i) => {
    gws[i] = await startGateway(directory.url, gatewayArgs, gws[i].port);
    dep.bases[i] = gws[i].base;
  };
  const ws = await dep.admin("POST", "/admin/v1/workspaces", { id: "demo", region: "local" });
  if (ws.status !== 201) throw new Error(`create workspace: ${ws.status} ${JSON.stringify(ws.body)}`);
  const ch = await dep.admin("POST", "/admin/v1/workspaces/demo/channels", { id: "general", kind: "public", members: ["alice", "bob"] });
  if (ch.status !== 201) throw new Error(`seed general: ${ch.status} ${JSON.stringify(ch.body)}`);
  return dep;
}

async function startGateway(directoryUrl, extra, port) {
  port = port || (await freePort());
  const child = run(BIN, [
    "gateway", "--listen", `127.0.0.1:${port}`, "--redis", directoryUrl,
    "--jwt-secret", JWT_SECRET, "--admin-token", ADMIN_TOKEN, "--cluster-secret", "js-test-secret",
    "--presence-ttl-ms", "3000", ...extra,
  ]);
  const base = `http://127.0.0.1:${port}`;
  await waitHttp(`${base}/readyz`);
  return { child, base, port };
}

/** Something the tests talk to: base URLs of its gateways, the admin and HTTP APIs. */
export class Deployment {
  constructor(bases, { stop }) {
    this.bases = bases;
    this._stop = stop;
  }
  get base() {
    return this.bases[0];
  }
  wsUrl(i = 0) {
    return this.bases[i].replace(/^http/, "ws") + "/v1/ws";
  }
  wsUrls() {
    return this.bases.map((_, i) => this.wsUrl(i));
  }
  admin(method, path, body) {
    return this._any(ADMIN_TOKEN, method, path, body);
  }
  api(token, method, path, body) {
    return this._any(token, method, path, body);
  }
  /** The call on the first gateway that answers (tests kill some of them). */
  async _any(bearer, method, path, body) {
    let last;
    for (const base of this.bases) {
      try {
        return await call(base, bearer, method, path, body);
      } catch (err) {
        last = err;
      }
    }
    throw last;
  }
  async token(user, { workspace = "demo", ttl_s } = {}) {
    const r = await this.admin("POST", "/admin/v1/tokens", { workspace, user, ...(ttl_s ? { ttl_s } : {}) });
    if (r.status !== 201) throw new Error(`mint token: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body.token;
  }
  stop() {
    return this._stop();
  }
}

/** An HS256 JWT signed with the test secret, with any claims (e.g. an `exp` in the past). */
export async function jwt(claims, secret = JWT_SECRET) {
  const { createHmac } = await import("node:crypto");
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Records every event a client delivers, for assertions. */
export function recorder(client) {
  const events = [];
  client.on("event", (e) => events.push(e));
  return {
    events,
    messages: (channel) => events.filter((e) => e.type === "message" && e.channel === channel),
    texts: (channel) => events.filter((e) => e.type === "message" && e.channel === channel).map((e) => e.text),
  };
}
