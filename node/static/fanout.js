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

/** The close codes after which the client does not reconnect (besides 4000-4999). */
export const STOP_CODES = Object.freeze([1000, 1008]);

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
    this._timer = null;
    this._stopped = false;
    this._attempt(this.options.token);
  }

  /** The URL of the current (or next) connection. */
  get url() {
    return this.urls[this.index];
  }

  /** Send `data`: strings and binary (ArrayBuffer, typed arrays, Blob) as they are, anything else as
   * JSON text. Returns false (and sends nothing) when not connected. */
  send(data) {
    if (!this.socket || this.socket.readyState !== 1) return false;
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

  async _attempt(token) {
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
    const socket = new o.WebSocket(withToken(url, o.tokenParam, token), o.protocols);
    this.socket = socket;
    this.clientId = this.nodeId = null;
    let stable = null;
    const timeout = setTimeout(() => socket.readyState === 0 && socket.close(), o.connectTimeout);
    socket.onopen = () => {
      clearTimeout(timeout);
      this.state = "open";
      stable = setTimeout(() => (this.failures = 0), o.stableAfter);
      if (o.onOpen) o.onOpen({ url });
    };
    socket.onmessage = (event) => {
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
      this._retry(event, url); // a connection that lasted stableAfter has already reset the failures
    };
  }

  _retry(event, url) {
    const o = this.options;
    const code = event.code;
    this.closeCode = code;
    const again = !this._stopped && o.reconnect && o.shouldReconnect(code, event.reason);
    const delay = again ? backoff(this.failures, o.minDelay, o.maxDelay) : null;
    if (again) {
      this.failures += 1;
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

export default connect;
