// The session's observations over Server-Sent Events, exactly once.
//
// EventSource reconnects by itself after a dropped connection and sends Last-Event-ID, so the
// service resumes after the last event received. A stream reopened by the page (a new
// EventSource cannot set headers) passes ?last_event_id= instead. Either way, any id at or below
// the last one seen is ignored, so a replay can never show an event twice.

import { withToken } from "./transport.js";

const TYPES = ["active", "inactive", "segment", "error", "lagging", "end"];

export class EventStream {
  constructor(sessionId, { apiKey = "", onEvent, onStatus }) {
    this.url = `/v1/sessions/${encodeURIComponent(sessionId)}/events`;
    this.apiKey = apiKey;
    this.onEvent = onEvent;
    this.onStatus = onStatus ?? (() => {});
    this.source = null;
    this.lastId = 0;
    this.received = 0;
    this.duplicates = 0;
    this.reconnects = 0;
    this.dropped = false;
    this.ended = false;
  }

  /** (Re)open the stream; `replay` asks for the whole log again (duplicates are dropped). */
  open({ replay = false } = {}) {
    this.source?.close();
    this.dropped = false;
    const url = new URL(withToken(this.url, this.apiKey), location.href);
    if (this.lastId && !replay) url.searchParams.set("last_event_id", String(this.lastId));
    const source = new EventSource(url.href);
    this.source = source;
    this.onStatus("connecting");
    source.addEventListener("open", () => {
      if (this.dropped) this.reconnects += 1; // the browser's own reconnect, with Last-Event-ID
      this.dropped = false;
      this.onStatus("open");
    });
    for (const type of [...TYPES, "message"]) {
      source.addEventListener(type, (e) => this.#receive(source, e));
    }
  }

  reconnect(options) {
    if (this.ended) return;
    this.reconnects += 1;
    this.open(options);
  }

  close() {
    this.source?.close();
    this.source = null;
  }

  #receive(source, e) {
    if (source !== this.source) return;
    // The service's own "error" events and EventSource's connection errors share a name;
    // only the former carry data.
    if (!(e instanceof MessageEvent)) {
      if (source.readyState === EventSource.CLOSED) {
        this.onStatus("closed");
      } else {
        this.dropped = true;
        this.onStatus("reconnecting");
      }
      return;
    }
    const id = Number.parseInt(e.lastEventId, 10);
    if (Number.isFinite(id)) {
      if (id <= this.lastId) {
        this.duplicates += 1;
        this.onStatus("open");
        return;
      }
      this.lastId = id;
    }
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      data = { type: e.type, raw: e.data };
    }
    this.received += 1;
    const type = data.type ?? e.type;
    if (type === "end") {
      // The service closes the stream after "end"; EventSource would otherwise reconnect.
      this.ended = true;
      this.close();
      this.onStatus("ended");
    }
    this.onEvent({ id, type, data });
  }
}
