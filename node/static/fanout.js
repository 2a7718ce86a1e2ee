// fanout.js: the browser client of fanout nodes. An ES module with no dependencies; every node serves
// it at GET /fanout.js, so a page can `import { connect } from "/fanout.js"`.
//
//   const client = connect(["wss://a.example/ws", "wss://b.example/ws"], {
//     getToken: async () => (await (await fetch("/chat/token")).json()).token,  // before every attempt
//     onWelcome: (clientId) => ..., onMessage: (data) => ..., onClose: (info) => ...,
//   });
//   client.send({ text: "hi" });  // objects are sent as JSON text
//   client.close();               // for good: no reconnection
//
// Reconnection: capped exponential backoff with full jitter (a random delay in [0, min(maxDelay,
// minDelay * 2^failures)]), trying the next URL of the list each time. Close codes decide whether to
// come back (see shouldReconnect): 1000 (closed by the application), 1008 (policy: e.g. over the node's
// message rate) and the application codes 4000-4999 mean "don't come back"; every other code (1001 going
// away, 1006 connection lost or handshake refused, 1011 server error, 1012 restart, 1013 try again
// later, ...) means reconnect.
//
// Recovery (`recover: true`, SPEC "Continuity"): the client asks for the `fanout.v1` subprotocol, keeps
// the welcome's resume token and its position ({epoch, offset}) in every history stream, and after every
// reconnection (to any URL of the list) sends `resume` as its first frame: the node replays what was
// missed, in order, once, then answers `resumed`, handed to `onResumed({ recovered, streams })`; when
// `recovered` is false, something may be missing: reload the page's state from the application. 3010
// (the node lost track of a stream) reconnects at once, without backoff, and resumes. A node that does not
// speak fanout.v1 (from before it) gets a raw client: the browser fails a handshake whose answer selects no
// subprotocol, so when one fails before opening the client probes the same URL without asking for one;
// if the probe opens, it is closed and fanout.v1 asked for once more (the first failure may have been the
// network's), and only if that fails again does the client connect raw.

/** The close codes after which the client does not reconnect (besides 4000-4999). */
export const STOP_CODES = Object.freeze([1000, 1008]);

/** The subprotocol of SPEC's client protocol, asked for with `recover: true`. */
export const V1 = "fanout.v1";

/** The close code of a node that lost track of a stream: reconnect at once and resume. */
export const INSUFFICIENT_STATE = 3010;

/** Whether a connection closed with `code` should be retried: false for 1000, 1008 and 4000-4999. */
export function shouldReconnect(code) {
  return !(STOP_CODES.includes(code) || (code >= 4000 && code <= 4999));
}

/** The wait before reconnection attempt number `failures` (0 for the first): full jitter, capped. */
export function backoff(failures, minDelay = 500, maxDelay = 10000, random = Math.random) {
  return Math.floor(random() * Math.min(maxDelay, minDelay * 2 ** failures));
}

/** The node id in a client id (`<node id>.<boot>.<seq>`), "" if it is not one. */
export function nodeOf(clientId) {
  const parts = String(clientId || "").split(".");
  return parts.length >= 3 ? parts.slice(0, -2).join(".") : "";
}

const DEFAULTS = {
  token: null, // the token for the first attempt (or every one, without getToken)
  getToken: null, // async ({ url, failures }) => token: called before every attempt but a first with `token`
  tokenParam: "token", // the query parameter that carries it
  protocols: undefined,
  minDelay: 500, // ms: backoff base
  maxDelay: 10000, // ms: backoff cap
  connectTimeout: 10000, // ms a handshake may take before the attempt counts as failed
  stableAfter: 5000, // ms a connection must stay open before the backoff starts over
  reconnect: true, // false: never reconnect
  shouldReconnect, // (code, reason) => boolean: replace the close-code policy
  WebSocket: globalThis.WebSocket,
  onOpen: null, // ({ url }) => ...: the socket is open (the welcome frame follows)
  onWelcome: null, // (clientId, frame) => ...: the node's welcome frame (not passed to onMessage)
  onMessage: null, // (data, event) => ...: text frames JSON-decoded when they are JSON, else raw
  onClose: null, // ({ code, reason, wasClean, url, reconnect, delay }) => ...
  onError: null, // (error) => ...: getToken failed (the client retries with backoff)
  recover: false, // true: ask for fanout.v1, keep positions and the resume token, resume after reconnections
  onResumed: null, // ({ recovered, streams }) => ...: the node's answer to a resume, after the replay
};

export class FanoutClient {
  constructor(urls, options = {}) {
    this.urls = (Array.isArray(urls) ? urls : [urls]).map(String);
    if (!this.urls.length) throw new TypeError("fanout: no URL to connect to");
    const given = Object.entries(options).filter(([, value]) => value !== undefined);
    this.options = { ...DEFAULTS, ...Object.fromEntries(given) };
    this.index = 0; // this.urls[this.index] is the URL of the current (or next) attempt
    this.failures = 0; // consecutive attempts that failed or did not last stableAfter
    this.socket = null;
    this.clientId = null;
    this.nodeId = null;
    this.state = "connecting"; // "connecting" | "open" | "waiting" (to reconnect) | "closed"
    this.closeCode = null; // the code of the last close
    this.v1 = false; // the current connection speaks fanout.v1
    this.positions = {}; // fanout.v1: { stream: { epoch, offset } }, the last position received in each
    this.resumeToken = null; // fanout.v1: the last welcome's token, sent in the next connection's resume
    this.resumed = null; // fanout.v1: the last { recovered, streams } the node answered a resume with
    this.duplicates = 0; // fanout.v1: messages dropped because all their offsets were received already
    this._ready = false; // the current connection may send (fanout.v1: welcomed, resume sent)
    this._resuming = null; // fanout.v1, from the open of a connection that resumes to resumed (_v1Message)
    this._quick = false; // a 3010 got an immediate reconnection since the last stable connection
    this._timer = null;
    this._stopped = false;
    this._attempt(this.options.token);
  }

  /** The URL of the current (or next) connection. */
  get url() {
    return this.urls[this.index];
  }

  /** Send `data`: strings and binary (ArrayBuffer, typed arrays, Blob) as they are, anything else as
   * JSON text. Returns false (and sends nothing) when not connected. In fanout.v1, a `message` frame
   * (binary as `data_b64`: ArrayBuffer and typed arrays, not Blob), and false until the welcome. */
  send(data) {
    if (!this.socket || this.socket.readyState !== 1 || !this._ready) return false;
    if (this.v1) {
      if (typeof Blob !== "undefined" && data instanceof Blob) {
        throw new TypeError("fanout.v1: send an ArrayBuffer or a typed array, not a Blob");
      }
      const binary = data instanceof ArrayBuffer || ArrayBuffer.isView(data);
      const frame = binary ? { type: "message", data_b64: toBase64(data) } : { type: "message", data };
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    const binary =
      typeof data === "string" ||
      data instanceof ArrayBuffer ||
      ArrayBuffer.isView(data) ||
      (typeof Blob !== "undefined" && data instanceof Blob);
    this.socket.send(binary ? data : JSON.stringify(data));
    return true;
  }

  /** Close for good: no reconnection, including a pending one. */
  close(code = 1000, reason = "") {
    this._stopped = true;
    clearTimeout(this._timer);
    this.state = "closed";
    if (this.socket && this.socket.readyState < 2) this.socket.close(code, reason);
  }

  // mode: "v1" (recover: true), "probe" (does the URL answer a handshake without fanout.v1?), "v1-again"
  // (after a probe that opened), "raw" (the node does not speak fanout.v1)
  async _attempt(token, mode = "v1") {
    const o = this.options;
    const url = this.url;
    this.state = "connecting";
    if (token == null && o.getToken) {
      try {
        token = await o.getToken({ url, failures: this.failures });
      } catch (error) {
        if (o.onError) o.onError(error);
        this._retry({ code: 1006, reason: "no token", wasClean: false }, url);
        return;
      }
    }
    if (this._stopped) return;
    const asked = o.recover && (mode === "v1" || mode === "v1-again");
    const protocols = asked ? [V1, ...[].concat(o.protocols ?? [])] : o.protocols;
    const socket = new o.WebSocket(withToken(url, o.tokenParam, token), protocols);
    this.socket = socket;
    this.clientId = this.nodeId = null;
    this.v1 = this._ready = false;
    let stable = null;
    let opened = false;
    const timeout = setTimeout(() => socket.readyState === 0 && socket.close(), o.connectTimeout);
    socket.onopen = () => {
      clearTimeout(timeout);
      opened = true;
      if (mode === "probe") {
        // the URL answers without fanout.v1: an old node, or the v1 attempt failed for another reason
        socket.onclose = socket.onmessage = null;
        socket.close(1000);
        this._attempt(token, "v1-again");
        return;
      }
      this.state = "open";
      this.v1 = socket.protocol === V1;
      // it will resume: until resumed, hold the messages of the streams it asks for (see _v1Message)
      const asked = new Set(Object.keys(this.positions));
      this._resuming = this.v1 && this.resumeToken ? { asked, held: [] } : null;
      this._ready = !this.v1;
      stable = setTimeout(() => {
        this.failures = 0;
        this._quick = false;
      }, o.stableAfter);
      if (o.onOpen) o.onOpen({ url });
    };
    socket.onmessage = (event) => {
      if (this.v1) {
        if (this.socket === socket) this._v1Frame(socket, event);
        return;
      }
      let data = event.data;
      if (typeof data === "string") {
        try {
          data = JSON.parse(data);
        } catch {
          // not JSON: the raw text
        }
      }
      if (this.clientId === null && data && data.type === "welcome" && typeof data.client_id === "string") {
        this.clientId = data.client_id;
        this.nodeId = nodeOf(data.client_id);
        if (o.onWelcome) o.onWelcome(this.clientId, data);
        return;
      }
      if (o.onMessage) o.onMessage(data, event);
    };
    socket.onclose = (event) => {
      clearTimeout(timeout);
      clearTimeout(stable);
      if (this.socket !== socket) return;
      this.socket = null;
      this._ready = false;
      this._resuming = null; // what it held is dropped: positions did not move, the next resume asks again
      if (asked && !opened && !this._stopped) {
        // maybe a node from before fanout.v1 (its answer selects no subprotocol, which a browser refuses):
        // probe the same URL at once without it, or after a probe that opened, connect raw; if the probe
        // fails too, the whole counts as one failed attempt
        this._attempt(token, mode === "v1" ? "probe" : "raw");
        return;
      }
      this._retry(event, url); // a connection that lasted stableAfter has already reset the failures
    };
  }

  _v1Frame(socket, event) {
    let frame;
    try {
      frame = typeof event.data === "string" ? JSON.parse(event.data) : null;
    } catch {
      frame = null; // not a fanout.v1 frame: the node sends none
    }
    if (!frame || typeof frame !== "object") return;
    const o = this.options;
    switch (frame.type) {
      case "message": {
        const offsets = Object.entries(asObject(frame.streams)).filter(([, n]) => typeof n === "number");
        const data = typeof frame.data_b64 === "string" ? fromBase64(frame.data_b64) : frame.data;
        const resuming = this._resuming;
        if (resuming && offsets.some(([s]) => resuming.asked.has(s))) {
          // until resumed, a message of a stream the resume asks for may be a live one the node delivered
          // before it read the resume, ahead of the replay that brings it again: held, sorted out then
          resuming.held.push({ offsets, data, event });
          return;
        }
        this._v1Message(offsets, data, event);
        return;
      }
      case "welcome": {
        if (this.clientId !== null || typeof frame.client_id !== "string") return;
        this.clientId = frame.client_id;
        this.nodeId = nodeOf(frame.client_id);
        const welcomed = positionsOf(frame.streams);
        const previous = this.resumeToken;
        this.resumeToken = typeof frame.resume === "string" ? frame.resume : null;
        if (previous && this._resuming) {
          // first frame after the welcome: the last token, and the positions received (not the welcome's:
          // they are this connection's, ahead of what the replay brings)
          socket.send(JSON.stringify({ type: "resume", token: previous, streams: this.positions }));
          this._resuming.welcomed = welcomed;
          this.positions = { ...welcomed, ...this.positions };
        } else {
          this._resuming = null;
          this.positions = welcomed;
        }
        this._ready = true;
        if (o.onWelcome) o.onWelcome(this.clientId, frame);
        return;
      }
      case "joined":
        if (typeof frame.stream === "string" && isPosition(frame)) {
          this.positions[frame.stream] = { epoch: frame.epoch, offset: frame.offset };
        }
        return;
      case "left":
        delete this.positions[frame.stream];
        return;
      case "resumed": {
        const streams = asObject(frame.streams);
        const resuming = this._resuming;
        this._resuming = null;
        if (resuming) {
          for (const { offsets, data, event: held } of this._firstCopiesDropped(resuming.held)) {
            this._v1Message(offsets, data, held);
          }
          // a stream it asked for that the node did not answer for: the connection is not in it (any
          // more), unless this connection's welcome has it
          const welcomed = resuming.welcomed || {};
          for (const stream of [...resuming.asked].filter((s) => !(s in streams))) {
            if (welcomed[stream]) this.positions[stream] = welcomed[stream];
            else delete this.positions[stream];
          }
        }
        for (const [stream, answer] of Object.entries(streams)) {
          if (isPosition(answer)) this.positions[stream] = { epoch: answer.epoch, offset: answer.offset };
        }
        this.resumed = { recovered: frame.recovered === true, streams };
        if (o.onResumed) o.onResumed(this.resumed);
        return;
      }
      default:
    }
  }

  _v1Message(offsets, data, event) {
    const kept = this.positions;
    if (offsets.length && offsets.every(([s, n]) => kept[s] && n <= kept[s].offset)) {
      this.duplicates += 1; // every offset already received: a duplicate
      return;
    }
    for (const [stream, offset] of offsets) {
      if (!kept[stream]) kept[stream] = { epoch: "", offset }; // not announced: resumes as not recovered
      else if (offset > kept[stream].offset) kept[stream] = { epoch: kept[stream].epoch, offset };
    }
    if (this.options.onMessage) this.options.onMessage(data, event);
  }

  // The held messages without those that came again later (the same offset in one of their streams):
  // live copies that overtook the replay; the later copy is in the replay's order.
  _firstCopiesDropped(held) {
    const later = new Set();
    const kept = [];
    for (const message of [...held].reverse()) {
      const pairs = message.offsets.map(([s, n]) => s + "\n" + n);
      if (pairs.some((pair) => later.has(pair))) {
        this.duplicates += 1;
        continue;
      }
      pairs.forEach((pair) => later.add(pair));
      kept.push(message);
    }
    return kept.reverse();
  }

  _retry(event, url) {
    const o = this.options;
    const code = event.code;
    this.closeCode = code;
    const again = !this._stopped && o.reconnect && o.shouldReconnect(code, event.reason);
    // 3010: at once, once per stable connection (a node that keeps answering 3010 gets the backoff)
    const quick = again && code === INSUFFICIENT_STATE && !this._quick;
    const delay = again ? (quick ? 0 : backoff(this.failures, o.minDelay, o.maxDelay)) : null;
    if (quick) this._quick = true;
    else if (again) this.failures += 1;
    if (again) {
      this.index = (this.index + 1) % this.urls.length;
      this.state = "waiting";
      this._timer = setTimeout(() => this._attempt(o.getToken ? null : o.token), delay);
    } else {
      this._stopped = true;
      this.state = "closed";
    }
    if (o.onClose) {
      o.onClose({ code, reason: event.reason, wasClean: event.wasClean, url, reconnect: again, delay });
    }
  }
}

/** Connect to a node (or the first of a list of node URLs, the next ones tried on reconnection). */
export function connect(urls, options = {}) {
  return new FanoutClient(urls, options);
}

/** `url` (ws:, wss:, http:, https: or relative to the page) as a websocket URL carrying the token. */
export function withToken(url, param = "token", token = null) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (token != null) u.searchParams.set(param, token);
  return u.href;
}

function asObject(value) {
  return value && typeof value === "object" ? value : {};
}

function isPosition(value) {
  return !!value && typeof value.epoch === "string" && typeof value.offset === "number";
}

function positionsOf(streams) {
  const positions = {};
  for (const [stream, p] of Object.entries(asObject(streams))) {
    if (isPosition(p)) positions[stream] = { epoch: p.epoch, offset: p.offset };
  }
  return positions;
}

/** base64 text as a Uint8Array (fanout.v1's `data_b64`). */
export function fromBase64(text) {
  const chars = atob(text);
  const bytes = new Uint8Array(chars.length);
  for (let i = 0; i < chars.length; i += 1) bytes[i] = chars.charCodeAt(i);
  return bytes;
}

/** An ArrayBuffer or a typed array as base64 text. */
export function toBase64(data) {
  const bytes = ArrayBuffer.isView(data)
    ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    : new Uint8Array(data);
  let chars = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    chars += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(chars);
}

export default connect;
