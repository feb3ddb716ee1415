// Headless Chromium driven over the DevTools protocol, for the dashboard's
// browser test. No npm package: Node 20's WebSocket (--experimental-websocket)
// talks to the browser, and the test drives this script with one JSON
// command per line on stdin; each gets one JSON answer per line on stdout:
//
//   {"cmd":"open","url":"http://...","width":1440,"height":900,"mobile":false,"scheme":"dark"}
//   {"cmd":"eval","expr":"document.title"}            -> {"ok":true,"value":...}
//   {"cmd":"viewport","width":390,"height":844,"mobile":true}
//   {"cmd":"screenshot","path":".local/x.png","full":true}
//   {"cmd":"errors"}   -> console errors, uncaught exceptions, failed loads
//   {"cmd":"quit"}
//
// Usage: node --experimental-websocket cdp.mjs [/usr/bin/chromium]

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { createRequire } from "node:module";

// Node 21+ (or 20.10+ with --experimental-websocket) has WebSocket built in;
// older Node uses the `ws` package that scripts/lib/common.sh installs
// (found through NODE_PATH), which offers the same onopen/onmessage API.
const WebSocketImpl = globalThis.WebSocket ?? createRequire(import.meta.url)("ws").WebSocket;

const chromiumPath = process.argv[2] || process.env.CHROMIUM || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "dashboard-chromium-"));
const browser = spawn(chromiumPath, [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
  "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
  "--mute-audio", "--force-color-profile=srgb",
  `--user-data-dir=${profile}`, "--remote-debugging-port=0", "about:blank",
], { stdio: ["ignore", "ignore", "pipe"] });

function cleanup() {
  try { browser.kill("SIGKILL"); } catch (_) { /* gone */ }
  try { rmSync(profile, { recursive: true, force: true }); } catch (_) { /* best effort */ }
}
process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(1));

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const fail = (msg) => { reply({ ok: false, error: msg }); process.exit(1); };

const wsUrl = await new Promise((resolve) => {
  let buf = "";
  const timer = setTimeout(() => fail("chromium printed no DevTools URL within 30 s"), 30000);
  browser.stderr.on("data", (d) => {
    buf += d.toString();
    const m = buf.match(/DevTools listening on (ws:\/\/\S+)/);
    if (m) { clearTimeout(timer); resolve(m[1]); }
  });
  browser.on("exit", (code) => fail(`chromium exited (${code}) before it listened: ${buf.slice(-500)}`));
});

const ws = new WebSocketImpl(wsUrl);
await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("websocket error")); });
let nextId = 1;
const pending = new Map();
const waiters = [];
const problems = [];
ws.onmessage = (ev) => {
  const msg = JSON.parse(ev.data);
  if (msg.id && pending.has(msg.id)) {
    const { resolve, reject } = pending.get(msg.id);
    pending.delete(msg.id);
    msg.error ? reject(new Error(msg.error.message)) : resolve(msg.result);
    return;
  }
  const p = msg.params || {};
  if (msg.method === "Runtime.consoleAPICalled" && (p.type === "error" || p.type === "assert")) {
    problems.push("console." + p.type + ": " + (p.args || []).map((a) => a.value ?? a.description ?? "").join(" "));
  } else if (msg.method === "Runtime.exceptionThrown") {
    const d = p.exceptionDetails || {};
    problems.push("exception: " + ((d.exception && d.exception.description) || d.text));
  } else if (msg.method === "Log.entryAdded" && p.entry && p.entry.level === "error") {
    problems.push("log: " + p.entry.text + (p.entry.url ? " (" + p.entry.url + ")" : ""));
  }
  for (let i = waiters.length - 1; i >= 0; i--) {
    if (waiters[i].method === msg.method) { waiters[i].resolve(p); waiters.splice(i, 1); }
  }
};
let session = null;
function send(method, params = {}, withSession = true) {
  const id = nextId++;
  const msg = { id, method, params };
  if (withSession && session) msg.sessionId = session;
  ws.send(JSON.stringify(msg));
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    setTimeout(() => { if (pending.delete(id)) reject(new Error(method + " timed out")); }, 30000);
  });
}
const waitFor = (method, ms) => new Promise((resolve, reject) => {
  const w = { method, resolve };
  waiters.push(w);
  setTimeout(() => { const i = waiters.indexOf(w); if (i >= 0) { waiters.splice(i, 1); reject(new Error(method + " not seen in " + ms + " ms")); } }, ms);
});

const { targetId } = await send("Target.createTarget", { url: "about:blank" }, false);
({ sessionId: session } = await send("Target.attachToTarget", { targetId, flatten: true }, false));
await send("Page.enable");
await send("Runtime.enable");
await send("Log.enable");

async function viewport(c) {
  await send("Emulation.setDeviceMetricsOverride", {
    width: c.width || 1440, height: c.height || 900, deviceScaleFactor: c.scale || 1, mobile: !!c.mobile,
  });
  if (c.scheme) {
    await send("Emulation.setEmulatedMedia", { features: [{ name: "prefers-color-scheme", value: c.scheme }] });
  }
}

const handlers = {
  async open(c) {
    await viewport(c);
    const loaded = waitFor("Page.loadEventFired", 30000);
    const nav = await send("Page.navigate", { url: c.url });
    if (nav.errorText) throw new Error("navigation failed: " + nav.errorText);
    await loaded;
    return null;
  },
  async viewport(c) { await viewport(c); return null; },
  async eval(c) {
    const r = await send("Runtime.evaluate", { expression: c.expr, returnByValue: true, awaitPromise: true });
    if (r.exceptionDetails) throw new Error("evaluation threw: " + ((r.exceptionDetails.exception || {}).description || r.exceptionDetails.text));
    return r.result.value;
  },
  async screenshot(c) {
    let clip;
    if (c.full) {
      const m = await send("Page.getLayoutMetrics");
      const size = m.cssContentSize || m.contentSize;
      clip = { x: 0, y: 0, width: Math.ceil(size.width), height: Math.ceil(size.height), scale: 1 };
    }
    const shot = await send("Page.captureScreenshot", { format: "png", captureBeyondViewport: !!c.full, ...(clip ? { clip } : {}) });
    writeFileSync(c.path, Buffer.from(shot.data, "base64"));
    return c.path;
  },
  async errors() { return problems.slice(); },
  async quit() { setTimeout(() => process.exit(0), 10); return null; },
};

reply({ ok: true, value: "ready" });
const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let c;
  try { c = JSON.parse(line); } catch (e) { reply({ ok: false, error: "bad command: " + e.message }); continue; }
  const h = handlers[c.cmd];
  if (!h) { reply({ ok: false, error: "unknown command " + c.cmd }); continue; }
  try { reply({ ok: true, value: await h(c) }); } catch (e) { reply({ ok: false, error: String(e.message || e) }); }
}
process.exit(0);
