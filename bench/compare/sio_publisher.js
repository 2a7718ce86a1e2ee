// socket.io publisher of bench/compare.py: @socket.io/redis-emitter on its own Redis connection.
//
//   node sio_publisher.js REDIS_URL KEY
//
// Commands on stdin (JSON lines), answers on stdout, the same protocol as the Python publishers:
//   {"cmd": "run", "phase": k, "kind": "group" | "all", "count": N, "groups": G, "size": S,
//    "interval": seconds between sends (0 = flat out), "concurrency": C}  -> {"done": k, "sent": N, ...}
// emitter.emit() does not return the publish's promise; node-redis pipelines what is written in one tick,
// so flat out sends C emits then awaits a PING behind them (C publishes in flight, like C concurrent
// callers), and paced sends await a PING after each emit (one round trip, as an awaited publish).

"use strict";

const readline = require("node:readline");
const { performance } = require("node:perf_hooks");
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

function payload(phase, seq, size) {
  const head = `${phase} ${seq} ${(performance.timeOrigin + performance.now()).toFixed(3)} `;
  return head + "x".repeat(Math.max(0, size - head.length));
}

async function run(client, emitter, cmd) {
  const started = performance.now();
  const emit = (seq) => {
    const data = payload(cmd.phase, seq, cmd.size);
    if (cmd.kind === "group") emitter.to(`g${seq % cmd.groups}`).emit("m", data);
    else emitter.emit("m", data);
  };
  if (cmd.interval > 0) {
    for (let seq = 0; seq < cmd.count; seq++) {
      emit(seq);
      await client.ping();
      const wait = started + (seq + 1) * cmd.interval * 1000 - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    }
  } else {
    for (let seq = 0; seq < cmd.count; ) {
      const end = Math.min(cmd.count, seq + cmd.concurrency);
      for (; seq < end; seq++) emit(seq);
      await client.ping();
    }
  }
  return (performance.now() - started) / 1000;
}

async function main() {
  const [url, key] = process.argv.slice(2);
  const client = createClient({ url });
  await client.connect();
  const emitter = new Emitter(client, { key });
  process.stdout.write(JSON.stringify({ ready: true }) + "\n");
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const cmd = JSON.parse(line);
    if (cmd.cmd === "quit") break;
    const seconds = await run(client, emitter, cmd);
    process.stdout.write(JSON.stringify({ done: cmd.phase, sent: cmd.count, seconds }) + "\n");
  }
  await client.quit();
}

main().catch((err) => {
  process.stderr.write(`sio_publisher: ${err.stack || err}\n`);
  process.exit(1);
});
