// Load generator of bench/compare.py: one process holding its share of the benchmark's clients.
//
//   node loadgen.js '<json config>'
//
// config: {kind: "ws" | "sio", urls: [server urls], first, count, clients, groups, concurrency}.
// Client number c (first <= c < first + count) is in group c % groups and connects to server
// floor(c / groups) % urls.length, so every group has members on every server.
//
// "ws" clients (the ws package) connect to `${url}/?group=g<n>` and take their first frame as "admitted";
// "sio" clients (socket.io-client, websocket transport only, no reconnection) pass {group} in the
// handshake query and wait for the server's "ready" event. Neither side compresses.
//
// Every benchmark message is "<phase> <seq> <publisher wall-clock ms> <padding>"; the latency is measured
// on arrival against performance.timeOrigin + performance.now() (sub-ms wall clock) into a histogram of
// 10 us bins (1 ms past 10 s). Control is JSON lines: commands on stdin, answers on stdout.
//
//   {"cmd": "phase", "id": k, "kind": "group" | "all", "expect": [count per group]}  -> {"phase": k}
//     then {"complete": k} as soon as every client of this process has its expected messages
//     and {"progress": k, "received": n} every second while frames keep arriving
//   {"cmd": "report", "id": k}  -> {"report": k, received, expected, short, extra, wrong, stale, ...}
//   {"cmd": "quit"}

"use strict";

const readline = require("node:readline");
const { performance } = require("node:perf_hooks");
const WebSocket = require("ws");
const { io } = require("socket.io-client");

const config = JSON.parse(process.argv[2]);
// latency histogram: 10 us bins up to 10 s, then 1 ms bins up to 300 s (the last bin takes anything longer)
const FINE = 1_000_000;
const BINS = FINE + 290_000;
const hist = new Uint32Array(BINS);
function bin(ms) {
  if (ms < 10_000) return Math.max(0, Math.floor(ms * 100));
  return Math.min(BINS - 1, FINE + Math.floor(ms - 10_000));
}
const clients = [];
let phase = { id: -1, kind: "all", expect: [], complete: true };
let doneClients = 0;
let stale = 0; // frames of another phase (late or duplicated)
let closed = 0; // connections lost after admission
let negative = 0; // latencies below zero (clock step)
let maxMs = 0;

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function onFrame(client, text) {
  const a = text.indexOf(" ");
  const b = text.indexOf(" ", a + 1);
  const c = text.indexOf(" ", b + 1);
  const id = +text.slice(0, a);
  if (id !== phase.id) {
    stale++;
    return;
  }
  const seq = +text.slice(a + 1, b);
  const latency = performance.timeOrigin + performance.now() - +text.slice(b + 1, c > 0 ? c : undefined);
  if (latency < 0) negative++;
  if (latency > maxMs) maxMs = latency;
  hist[bin(latency)]++;
  if (phase.kind === "group" && seq % config.groups !== client.group) client.wrong++;
  client.received++;
  const want = phase.expect[client.group];
  if (client.received === want) {
    doneClients++;
    if (doneClients === clients.length && !phase.complete) {
      phase.complete = true;
      send({ complete: phase.id });
    }
  } else if (client.received > want) {
    client.extra++;
  }
}

function connectWs(client, url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url}/?group=g${client.group}`, {
      perMessageDeflate: false,
      skipUTF8Validation: true,
      maxPayload: 0,
    });
    let admitted = false;
    ws.on("message", (data) => {
      if (!admitted) {
        admitted = true;
        resolve();
        return;
      }
      onFrame(client, data.toString("latin1", 0, 64));
    });
    ws.on("error", (err) => {
      if (!admitted) reject(err);
    });
    ws.on("close", () => {
      if (admitted && !quitting) closed++;
    });
    client.close = () => ws.terminate();
  });
}

function connectSio(client, url) {
  return new Promise((resolve, reject) => {
    const socket = io(url, {
      transports: ["websocket"],
      forceNew: true,
      reconnection: false,
      perMessageDeflate: false,
      query: { group: `g${client.group}` },
      timeout: 30000,
    });
    let admitted = false;
    socket.on("ready", () => {
      admitted = true;
      resolve();
    });
    socket.on("m", (text) => onFrame(client, text));
    socket.on("connect_error", (err) => {
      if (!admitted) reject(err);
    });
    socket.on("disconnect", () => {
      if (admitted && !quitting) closed++;
    });
    client.close = () => socket.disconnect();
  });
}

let quitting = false;

async function connectAll() {
  const connect = config.kind === "sio" ? connectSio : connectWs;
  let next = 0;
  async function worker() {
    while (next < config.count) {
      const c = config.first + next++;
      const client = {
        group: c % config.groups,
        received: 0,
        extra: 0,
        wrong: 0,
        close: () => {},
      };
      clients.push(client);
      const url = config.urls[Math.floor(c / config.groups) % config.urls.length];
      for (let attempt = 0; ; attempt++) {
        try {
          await connect(client, url);
          break;
        } catch (err) {
          client.close();
          if (attempt >= 4) throw new Error(`client ${c} could not connect to ${url}: ${err.message}`);
          await new Promise((r) => setTimeout(r, 200 * (attempt + 1)));
        }
      }
    }
  }
  await Promise.all(Array.from({ length: config.concurrency }, worker));
}

function report(id) {
  let received = 0;
  let expected = 0;
  let short = 0;
  let extra = 0;
  let wrong = 0;
  for (const client of clients) {
    const want = phase.expect[client.group];
    received += client.received;
    expected += want;
    if (client.received < want) short++;
    extra += client.extra;
    wrong += client.wrong;
  }
  const bins = [];
  for (let i = 0; i < BINS; i++) if (hist[i]) bins.push([i, hist[i]]);
  send({ report: id, received, expected, short, extra, wrong, stale, closed, negative, max_ms: maxMs, bins });
  stale = 0; // counted once: what arrives later belongs to the next report
}

function startPhase(cmd) {
  hist.fill(0);
  maxMs = 0;
  negative = 0;
  doneClients = 0;
  for (const client of clients) {
    client.received = 0;
    client.extra = 0;
    client.wrong = 0;
    if (cmd.expect[client.group] === 0) doneClients++;
  }
  phase = { id: cmd.id, kind: cmd.kind, expect: cmd.expect, complete: false };
  lastProgress = 0;
  send({ phase: cmd.id });
  if (doneClients === clients.length) {
    phase.complete = true;
    send({ complete: cmd.id });
  }
}

let lastProgress = 0;
setInterval(() => {
  if (phase.complete) return;
  let received = 0;
  for (const client of clients) received += client.received;
  if (received !== lastProgress) {
    lastProgress = received;
    send({ progress: phase.id, received });
  }
}, 1000).unref();

async function main() {
  const started = performance.now();
  await connectAll();
  send({ ready: clients.length, seconds: (performance.now() - started) / 1000 });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const cmd = JSON.parse(line);
    if (cmd.cmd === "phase") startPhase(cmd);
    else if (cmd.cmd === "report") report(cmd.id);
    else if (cmd.cmd === "quit") break;
  }
  quitting = true;
  for (const client of clients) client.close();
  setTimeout(() => process.exit(0), 200);
}

main().catch((err) => {
  process.stderr.write(`loadgen: ${err.stack || err}\n`);
  process.exit(1);
});
