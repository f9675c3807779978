// Getting audio bytes to the service while they are still being produced.
//
// Two uploads with one interface: open(config) -> {sessionId}, send(bytes), finish(), abort().
// - FetchUpload: POST /v1/sessions, then one fetch whose body is a ReadableStream. Chrome streams
//   a request body only over HTTP/2, so this needs the page on https: (TLS with ALPN h2).
// - WebSocketUpload: /v1/ws, a start message, binary frames, a stop message. Works on HTTP/1.1.
//   Its session is resumable: a dropped connection is resumed, and no audio is lost.
// Observations do not come back through either: the page reads them from the session's SSE.
//
// The audio is a container the service sniffs (a recorder's webm/opus, a file), or raw PCM when
// `pcm: {sampleRate, channels}` is given: s16le, declared as `?encoding=s16le&sample_rate=...&
// channels=...` on the fetch upload's URL and as the start message's `format` on the WebSocket.

/** Chrome's documented feature test: a stream body is accepted (no Content-Type is added for
 * it) and the `duplex` option is read. */
export function supportsRequestStreams() {
  try {
    let duplexAccessed = false;
    const hasContentType = new Request("data:,", {
      body: new ReadableStream(),
      method: "POST",
      get duplex() {
        duplexAccessed = true;
        return "half";
      },
    }).headers.has("Content-Type");
    return duplexAccessed && !hasContentType;
  } catch {
    return false;
  }
}

/** The protocol the page itself arrived over ("h2", "http/1.1"; "" when the browser won't say). */
function pageProtocol() {
  try {
    return performance.getEntriesByType("navigation")[0]?.nextHopProtocol ?? "";
  } catch {
    return "";
  }
}

/** Which upload to use, and why, for a preference of "auto", "fetch" or "websocket". */
export function chooseTransport(preference = "auto", loc = location) {
  if (preference === "websocket") {
    return { name: "websocket", reason: "chosen in settings" };
  }
  const protocol = pageProtocol();
  let why = "";
  if (loc.protocol !== "https:") {
    why = "the page is not on HTTPS, and browsers stream request bodies only over HTTP/2";
  } else if (!supportsRequestStreams()) {
    why = "this browser cannot stream request bodies";
  } else if (protocol.startsWith("http/1")) {
    why = `the page came over ${protocol.toUpperCase()}; streaming a request body needs HTTP/2`;
  }
  if (!why) {
    return {
      name: "fetch",
      reason: preference === "fetch" ? "chosen in settings" : "HTTPS with HTTP/2, and streaming request bodies",
    };
  }
  return { name: "websocket", reason: preference === "fetch" ? `fetch unavailable: ${why}` : why };
}

export class ApiError extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

async function apiError(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body?.error) ({ code, message } = body.error);
  } catch {
    // Not JSON (a proxy's error page): the status line is all we have.
  }
  if (response.status === 401) message += " (Settings → Connection → API key)";
  return new ApiError(code, message, response.status);
}

function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

async function explainRefusal(apiKey) {
  try {
    const r = await fetch("/v1/sessions/-", { headers: authHeaders(apiKey) });
    if (r.status === 401) {
      return await apiError(r);
    }
  } catch {
    // The service is unreachable; the WebSocket's own failure says enough.
  }
  return null;
}

export function withToken(url, apiKey) {
  if (!apiKey) return url;
  const u = new URL(url, location.href);
  u.searchParams.set("token", apiKey);
  return u.href;
}

const CHUNKS_AHEAD = 8;

/** The upload URL's query declaring raw s16le PCM; "" for a container. */
function pcmQuery(pcm) {
  if (!pcm) return "";
  const q = new URLSearchParams({ encoding: "s16le", sample_rate: String(pcm.sampleRate), channels: String(pcm.channels) });
  return `?${q}`;
}

// What is kept of the audio already sent, to send again after a cut from the service's offset:
// the bytes in flight when a connection drops are far fewer; a recording's last minutes fit.
const KEPT_BYTES = 16 << 20;
// How long to keep trying to resume after a cut: under the service's grace period (60 s by
// default), after which the session ends by itself.
const RESUME_PATIENCE_MS = 55_000;
// Refusals after which trying again cannot help.
const RESUME_FATAL = new Set(["session_ended", "not_resumable", "session_not_found", "unauthorized"]);

/** The last bytes of the stream handed to an upload, to send again from an offset. */
class KeptAudio {
  constructor(limit = KEPT_BYTES) {
    this.limit = limit;
    this.chunks = [];
    this.from = 0; // the stream offset of chunks[0]
    this.bytes = 0;
    this.total = 0; // bytes handed over so far
  }

  add(bytes) {
    this.chunks.push(bytes);
    this.bytes += bytes.byteLength;
    this.total += bytes.byteLength;
    while (this.bytes - this.chunks[0].byteLength >= this.limit) {
      const old = this.chunks.shift();
      this.bytes -= old.byteLength;
      this.from += old.byteLength;
    }
  }

  /** The kept bytes from stream offset `offset` on, as chunks. */
  since(offset) {
    if (offset < this.from || offset > this.total) {
      throw new ApiError("resume_failed", `cannot resume at byte ${offset}: bytes ${this.from}-${this.total} are at hand`);
    }
    const out = [];
    let at = this.from;
    for (const chunk of this.chunks) {
      const end = at + chunk.byteLength;
      if (end > offset) out.push(at >= offset ? chunk : chunk.subarray(offset - at));
      at = end;
    }
    return out;
  }
}

/** Retries `attempt()` with backoff until it succeeds, a refusal is final, or the patience
 * runs out; resolves true on success. */
async function withBackoff(attempt) {
  const deadline = Date.now() + RESUME_PATIENCE_MS;
  let delay = 100;
  let last = null;
  while (Date.now() < deadline) {
    try {
      await attempt();
      return { ok: true };
    } catch (err) {
      last = err;
      if (RESUME_FATAL.has(err.code)) break;
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 4000);
  }
  return { ok: false, error: last };
}

/** The upload as one streaming fetch. Its session is resumable: when the fetch fails on the
 * network (the connection dropped), it asks the service how much arrived (`HEAD`, header
 * `Upload-Offset`) and streams the rest in a new fetch with `Upload-Offset` (docs/resume.md). */
export class FetchUpload {
  name = "fetch";

  constructor({ apiKey = "", contentType = "", pcm = null } = {}) {
    this.apiKey = apiKey;
    this.contentType = contentType;
    this.pcm = pcm;
    this.url = "";
    this.controller = null;
    this.wake = null;
    this.failure = null;
    this.finishing = false;
    this.aborted = false;
    this.onerror = null;
    this.onstatus = null; // "open", "reconnecting"
    this.resumes = 0;
    this.kept = new KeptAudio();
    this.resuming = null;
    // Settles with the upload that ends the audio: its response, after the service drained.
    this.response = new Promise((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    this.response.catch(() => {}); // reported through onerror / finish()
  }

  async open(config) {
    const created = await fetch("/v1/sessions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders(this.apiKey) },
      body: JSON.stringify({ ...config, resumable: true }),
    });
    if (!created.ok) throw await apiError(created);
    const session = await created.json();
    this.url = `/v1/sessions/${session.id}/audio${pcmQuery(this.pcm)}`;
    this.stream(0);
    return { sessionId: session.id };
  }

  /** One fetch whose body starts at byte `offset` of the audio: what is kept from there, then
   * what send() hands over next. */
  stream(offset) {
    const body = new ReadableStream(
      {
        start: (controller) => {
          this.controller = controller;
          for (const chunk of this.kept.since(offset)) controller.enqueue(chunk);
          if (this.finishing) controller.close();
        },
        pull: () => {
          this.wake?.();
        },
      },
      { highWaterMark: CHUNKS_AHEAD },
    );
    const headers = { ...authHeaders(this.apiKey), "Upload-Offset": String(offset) };
    if (this.contentType) headers["Content-Type"] = this.contentType;
    // Resolves only after the body has ended and the service has drained the session.
    fetch(this.url, { method: "POST", headers, body, duplex: "half" }).then(
      async (r) => {
        if (r.ok) return this.settle.resolve(await r.json());
        const err = await apiError(r);
        if (err.code === "offset_mismatch" && !this.aborted) {
          return this.stream(Number(r.headers.get("Upload-Offset")));
        }
        this.failed(err);
      },
      (err) => {
        // A network failure (TypeError): the connection dropped. Resume, unless we stopped it.
        if (this.aborted) return this.failed(err);
        this.resume(err.message || String(err));
      },
    );
  }

  failed(err) {
    // An early failure (HTTP/1.1 refusing a stream body, the service ending the session) must
    // show now, not when the recording stops.
    this.failure = err;
    this.wake?.();
    this.settle.reject(err);
    if (!this.finishing && !this.aborted) this.onerror?.(err);
  }

  resume(why) {
    if (this.resuming) return;
    this.onstatus?.("reconnecting", why);
    // From now on send() only keeps bytes, until stream() has a new body (which starts with
    // everything kept from the service's offset on).
    this.controller = null;
    this.wake?.();
    this.resuming = withBackoff(async () => {
      const r = await fetch(this.url, { method: "HEAD", headers: authHeaders(this.apiKey) });
      if (!r.ok) throw new ApiError(r.status === 404 ? "session_not_found" : `http_${r.status}`, `HEAD ${r.status}`);
      if (r.headers.get("Session-State") === "ended") throw new ApiError("session_ended", "the session ended");
      this.stream(Number(r.headers.get("Upload-Offset")));
    }).then(({ ok, error }) => {
      this.resuming = null;
      this.wake?.();
      if (ok) {
        this.resumes += 1;
        this.onstatus?.("open");
      } else {
        this.failed(error ?? new ApiError("upload_failed", `the upload could not be resumed: ${why}`));
      }
    });
  }

  /** Queues bytes; resolves when the stream has room again (backpressure for files). */
  async send(bytes) {
    if (this.failure) throw this.failure;
    this.kept.add(bytes);
    if (!this.controller) return; // kept: the resumed fetch's body starts with it
    this.controller.enqueue(bytes);
    while (this.controller && this.controller.desiredSize <= 0 && !this.failure) {
      await new Promise((resolve) => {
        this.wake = resolve;
      });
    }
  }

  async finish() {
    if (this.resuming) await this.resuming;
    this.finishing = true;
    if (!this.failure) {
      try {
        this.controller?.close();
      } catch {
        // A stream already closed by a failure: the response says how it went.
      }
    }
    return this.response;
  }

  abort() {
    this.aborted = true;
    try {
      this.controller?.error(new Error("aborted"));
    } catch {
      // Already closed.
    }
  }
}

const WS_HIGH_WATER_BYTES = 1 << 20;
const WS_START_TIMEOUT_MS = 15_000;

/** The upload over /v1/ws. Its session is resumable: when the connection drops while audio is
 * still being sent, it reconnects, resumes the session at the byte offset the service received
 * (`{"request": "resume"}`, docs/websocket.md), and sends from there what it had sent and what
 * was recorded meanwhile. Nothing is lost and nothing reaches the decoder twice. */
export class WebSocketUpload {
  name = "websocket";

  constructor({ apiKey = "", pcm = null, lastEventId = () => 0 } = {}) {
    this.apiKey = apiKey;
    this.pcm = pcm;
    this.lastEventId = lastEventId;
    this.startMessage = null;
    this.ws = null;
    this.sessionId = "";
    this.finishing = false;
    this.onerror = null;
    this.onstatus = null; // "open", "reconnecting"
    this.resumes = 0;
    this.kept = new KeptAudio();
    this.resuming = null; // the reconnection in progress (a promise), or null
    // Whether send() goes to the socket now; false between a cut and the resumed connection's
    // catching up (then send() only keeps the bytes, and the catch-up sends them).
    this.live = false;
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return withToken(`${scheme}//${location.host}/v1/ws`, this.apiKey);
  }

  open(config) {
    this.startMessage = { request: "start", ...config, resumable: true };
    if (this.pcm) {
      this.startMessage.format = { channels: this.pcm.channels, sample_rate: this.pcm.sampleRate, bit_depth: 16, is_float: false };
    }
    return this.connect((ws) => ws.send(JSON.stringify(this.startMessage))).then((msg) => {
      this.sessionId = msg.session_id;
      this.live = true;
      return { sessionId: msg.session_id };
    });
  }

  /** A new WebSocket; `greet(ws)` once it is open; resolves with the `started` message. */
  connect(greet, onMessage = null) {
    const ws = new WebSocket(this.url());
    ws.binaryType = "arraybuffer";
    return new Promise((resolve, reject) => {
      let started = false;
      const timer = setTimeout(() => {
        reject(new ApiError("timeout", "the WebSocket did not start a session in time"));
        ws.close();
      }, WS_START_TIMEOUT_MS);
      ws.addEventListener("open", () => greet(ws));
      ws.addEventListener("message", (e) => {
        if (started || typeof e.data !== "string") return;
        let msg;
        try {
          msg = JSON.parse(e.data);
        } catch {
          return;
        }
        if (msg.type === "started") {
          started = true;
          clearTimeout(timer);
          this.ws = ws;
          resolve(msg);
        } else if (msg.type === "error" && !onMessage?.(ws, msg)) {
          clearTimeout(timer);
          reject(new ApiError(msg.code, msg.message));
        }
        // After "started" every event arrives on SSE too; the page reads that one.
      });
      ws.addEventListener("close", async (e) => {
        clearTimeout(timer);
        if (!started) {
          // A refused handshake reaches a page as a bare 1006; ask over HTTP what is wrong.
          const refusal = e.code === 1006 ? await explainRefusal(this.apiKey) : null;
          const why = e.reason || (e.code === 1006 ? "connection failed" : `code ${e.code}`);
          reject(refusal ?? new ApiError("websocket_closed", `WebSocket closed before the session started: ${why}`));
        } else if (!this.finishing && ws === this.ws) {
          // Cut while sending: resume, unless the service itself closed it (an error it sent
          // says why, and the session has ended; resuming would be refused).
          if (e.code === 1006 || e.code === 1001 || e.code === 1013) {
            this.resume(e.reason || `code ${e.code}`);
          } else {
            const why = e.reason || `code ${e.code}`;
            this.onerror?.(new ApiError("websocket_closed", `WebSocket closed while sending audio: ${why}`));
          }
        }
      });
    });
  }

  /** Reconnect and resume the session; retried with backoff until the patience runs out. */
  resume(why) {
    if (this.resuming) return this.resuming;
    this.live = false;
    this.onstatus?.("reconnecting", why);
    this.resuming = withBackoff(() => this.resumeOnce()).then(({ ok, error }) => {
      this.resuming = null;
      if (ok) {
        this.resumes += 1;
        this.onstatus?.("open");
      } else {
        this.onerror?.(error ?? new ApiError("websocket_closed", `WebSocket closed while sending audio: ${why}`));
      }
      return ok;
    });
    return this.resuming;
  }

  /** One attempt: a resume at the offset the service reports (a guess first, corrected by its
   * `offset_mismatch` answer), then everything kept from that offset on. */
  async resumeOnce() {
    const message = (offset) => JSON.stringify({ request: "resume", id: this.sessionId, offset, last_event_id: this.lastEventId() });
    const started = await this.connect(
      (ws) => ws.send(message(this.kept.total)),
      (ws, msg) => {
        if (msg.code !== "offset_mismatch") return false;
        ws.send(message(msg.offset));
        return true;
      },
    );
    for (const chunk of this.kept.since(started.offset)) this.ws.send(chunk);
    this.live = true; // in the same turn as the catch-up: nothing handed over falls between
  }

  async send(bytes) {
    this.kept.add(bytes);
    if (!this.live) return; // kept: it goes out with the resumed connection's catch-up
    if (this.ws.readyState !== WebSocket.OPEN) {
      // Kept: the close that is coming starts a resume, which sends it.
      if (!this.finishing) return;
      throw new ApiError("websocket_closed", "WebSocket is closed");
    }
    this.ws.send(bytes);
    // WebSocket has no drain event; a file read faster than the network would fill memory.
    while (this.ws.bufferedAmount > WS_HIGH_WATER_BYTES && this.ws.readyState === WebSocket.OPEN) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  async finish() {
    // Audio kept during a cut goes out first; the stop follows it on the resumed connection.
    if (this.resuming) await this.resuming;
    this.finishing = true;
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ request: "stop", disconnect: true }));
    }
    return null;
  }

  abort() {
    this.finishing = true;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      // The session is resumable: a close alone would leave it waiting for a resume.
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ request: "stop", disconnect: true }));
      this.ws.close(1000, "client stopped");
    }
  }
}

export function createUpload(name, options) {
  return name === "fetch" ? new FetchUpload(options) : new WebSocketUpload(options);
}
