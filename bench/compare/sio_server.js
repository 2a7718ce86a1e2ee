// socket.io peer of bench/compare.py: one server process with the Redis adapter.
//
//   node sio_server.js PORT REDIS_URL KEY
//
// A client joins the room named by its handshake query (?group=g7) on connection and is told "ready".
// Messages come only from the publisher (@socket.io/redis-emitter) through Redis; `KEY` is the adapter's
// channel prefix, unique per run. Prints "listening" once the adapter is subscribed.

"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const [port, url, key] = process.argv.slice(2);
  const pubClient = createClient({ url });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);
  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient, { key }),
    transports: ["websocket"],
    perMessageDeflate: false,
    serveClient: false,
  });
  io.on("connection", (socket) => {
    socket.join(String(socket.handshake.query.group));
    socket.emit("ready");
  });
  // the adapter subscribes asynchronously: a round trip on the subscriber makes sure it is done
  await subClient.pSubscribe(`${key}-ready-probe`, () => {});
  httpServer.listen(Number(port), "127.0.0.1", () => process.stdout.write("listening\n"));
  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  process.stderr.write(`sio_server: ${err.stack || err}\n`);
  process.exit(1);
});
