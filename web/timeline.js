// The live picture of one session: per channel, when speech was active, and the model's
// segments on a time axis (interim results replaced by the final one for the same audio),
// plus the list of segments underneath. Plain DOM: a few dozen absolutely positioned boxes.

const FOLLOW_WINDOW_S = 30;
const MIN_SPAN_S = 10;
const TICK_STEPS_S = [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];
const TICK_MIN_PX = 56;
// Fields of a segment event that are framing, not model output.
const FRAMING = new Set(["type", "start_time", "end_time", "is_final", "channel"]);
// Shown as text rather than as fields when a segment has text.
const TEXT_DETAILS = new Set(["text", "words", "language"]);

export function formatTime(s) {
  if (s < 60) return `${Number(s.toFixed(s < 10 ? 2 : 1))} s`;
  const m = Math.floor(s / 60);
  const rest = s - m * 60;
  return `${m}:${rest.toFixed(0).padStart(2, "0")}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A model with text (Whisper): its words are the output; its word list and language are
 * details for the tooltip. */
function hasText(segment) {
  return typeof segment.text === "string";
}

function outputText(segment) {
  const parts = [];
  if (hasText(segment)) parts.push(segment.text || "…");
  for (const [key, value] of Object.entries(segment)) {
    if (FRAMING.has(key) || (hasText(segment) && TEXT_DETAILS.has(key))) continue;
    parts.push(`${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`);
  }
  return parts.join(" · ");
}

function wordsTitle(segment) {
  if (!Array.isArray(segment.words) || !segment.words.length) return "";
  return segment.words
    .map((w) => `${formatTime(w.start)} ${w.word}${typeof w.probability === "number" ? ` (${w.probability.toFixed(2)})` : ""}`)
    .join("\n");
}

class Lane {
  constructor(channel) {
    this.channel = channel;
    this.speech = []; // {start, end|null, el}
    this.interims = []; // {start, end, data, el, row}
    this.finals = []; // {start, end, data, el, row}
    this.errors = []; // {start, end, data, el}
    this.root = el("div", "lane");
    this.root.dataset.channel = String(channel);
    this.root.append(el("div", "lane-label", channel === null ? "Session" : `Channel ${channel}`));
    this.track = el("div", "track");
    this.cursor = el("div", "cursor");
    this.track.append(this.cursor);
    this.root.append(this.track);
  }
}

export class Timeline {
  constructor({ container, results, counts }) {
    this.container = container;
    this.resultsEl = results;
    this.countsEl = counts;
    this.follow = false;
    this.lanes = new Map();
    this.now = 0;
    this.live = false;
    this.axisTrack = null; // built by reset(), when the first session starts
  }

  reset() {
    this.lanes = new Map();
    this.now = 0;
    this.live = false;
    this.container.replaceChildren();
    this.axis = el("div", "axis");
    this.axisTrack = el("div", "axis-track");
    this.axis.append(el("div", "lane-label"), this.axisTrack);
    this.lanesEl = el("div", "lanes");
    this.container.append(this.axis, this.lanesEl);
    this.container.dataset.empty = "true";
    this.resultsEl.replaceChildren();
    this.countsEl.textContent = "";
  }

  /** Show channel 0 before any event, so a recording has somewhere to appear. */
  ensureLane(channel) {
    let lane = this.lanes.get(channel);
    if (!lane) {
      lane = new Lane(channel);
      this.lanes.set(channel, lane);
      const ordered = [...this.lanes.values()].sort((a, b) => (a.channel ?? -1) - (b.channel ?? -1));
      this.lanesEl.replaceChildren(...ordered.map((l) => l.root));
      this.container.dataset.empty = "false";
    }
    return lane;
  }

  /** Session time known to have been reached (the clock while recording, or event times). */
  advance(t) {
    if (t > this.now) this.now = t;
  }

  add(event) {
    const d = event.data;
    switch (event.type) {
      case "active": {
        const lane = this.ensureLane(d.channel);
        const band = { start: d.time, end: null, el: el("div", "band active") };
        lane.speech.push(band);
        lane.track.prepend(band.el);
        this.advance(d.time);
        break;
      }
      case "inactive": {
        const lane = this.ensureLane(d.channel);
        const band = lane.speech.findLast((b) => b.end === null);
        if (band) {
          band.end = d.time;
          band.el.classList.remove("active");
        }
        this.advance(d.time);
        break;
      }
      case "segment":
        this.#segment(d);
        break;
      case "error":
        if (d.start_time !== undefined && d.start_time !== null) {
          const lane = this.ensureLane(d.channel ?? 0);
          const item = { start: d.start_time, end: d.end_time, data: d, el: el("div", "bar error") };
          item.el.title = `${d.code}: ${d.message}`;
          lane.errors.push(item);
          lane.track.append(item.el);
        }
        break;
      case "end":
        this.live = false;
        if (typeof d.audio_seconds === "number") this.advance(d.audio_seconds);
        for (const lane of this.lanes.values()) {
          for (const band of lane.speech) if (band.end === null) band.end = this.now;
        }
        break;
      default:
        break;
    }
    this.render();
  }

  #segment(d) {
    const lane = this.ensureLane(d.channel);
    const overlaps = (item) => item.start < d.end_time && d.start_time < item.end;
    const superseded = lane.interims.filter((i) => overlaps(i) || i.start === d.start_time);
    lane.interims = lane.interims.filter((i) => !superseded.includes(i));
    for (const old of superseded) {
      old.el.remove();
      old.row.remove();
    }
    const item = {
      start: d.start_time,
      end: d.end_time,
      data: d,
      el: el("div", d.is_final ? "bar segment final" : "bar segment interim"),
      row: this.#row(d),
    };
    item.el.dataset.final = String(d.is_final);
    item.el.title = `${formatTime(d.start_time)} – ${formatTime(d.end_time)}\n${outputText(d)}`;
    if (hasText(d)) {
      item.el.classList.add("has-text");
      item.el.append(el("span", "bar-label", d.text || "…"));
    } else {
      item.el.append(el("span", "bar-label", formatTime(d.end_time - d.start_time)));
    }
    (d.is_final ? lane.finals : lane.interims).push(item);
    lane.track.append(item.el);
    this.#placeRow(item.row, d);
    this.advance(d.end_time);
  }

  #row(d) {
    const row = el("li", d.is_final ? "result final" : "result interim");
    row.dataset.final = String(d.is_final);
    row.dataset.channel = String(d.channel);
    row.dataset.start = String(d.start_time);
    const time = el("span", "result-time", `${d.start_time.toFixed(2)} – ${d.end_time.toFixed(2)} s`);
    const length = el("span", "result-length", `${(d.end_time - d.start_time).toFixed(2)} s`);
    const tag = el("span", "result-tag", d.is_final ? "final" : "interim");
    const chan = el("span", "result-channel", `ch ${d.channel}`);
    const out = el("span", "result-output", outputText(d));
    if (hasText(d)) {
      out.classList.add("text");
      out.title = wordsTitle(d);
      if (d.language) row.dataset.language = d.language;
    }
    row.append(chan, time, length, tag, out);
    return row;
  }

  #placeRow(row, d) {
    const after = [...this.resultsEl.children].find((r) => Number(r.dataset.start) > d.start_time);
    this.resultsEl.insertBefore(row, after ?? null);
  }

  view() {
    if (this.follow && this.now > FOLLOW_WINDOW_S) {
      return [this.now - FOLLOW_WINDOW_S, this.now];
    }
    // Grow in whole steps so bars do not creep every frame.
    const span = Math.max(MIN_SPAN_S, Math.ceil((this.now * 1.1) / 5) * 5);
    return [0, span];
  }

  render() {
    if (!this.axisTrack) return;
    const [t0, t1] = this.view();
    const span = t1 - t0;
    const pct = (t) => `${(((t - t0) / span) * 100).toFixed(3)}%`;
    const place = (node, start, end) => {
      const a = Math.max(start, t0);
      const b = Math.min(end, t1);
      node.hidden = b <= a && !(end === start && start >= t0 && start <= t1);
      node.style.left = pct(a);
      node.style.width = `${Math.max(0, ((b - a) / span) * 100).toFixed(3)}%`;
    };

    this.#ticks(t0, t1);
    let finals = 0;
    let interims = 0;
    const trackPx = this.lanes.values().next().value?.track.clientWidth || 600;
    for (const lane of this.lanes.values()) {
      for (const band of lane.speech) place(band.el, band.start, band.end ?? this.now);
      for (const item of [...lane.finals, ...lane.interims, ...lane.errors]) {
        place(item.el, item.start, item.end);
        item.el.classList.toggle("narrow", ((item.end - item.start) / span) * trackPx < 44);
      }
      lane.cursor.hidden = !this.live;
      lane.cursor.style.left = pct(Math.min(this.now, t1));
      finals += lane.finals.length;
      interims += lane.interims.length;
    }
    this.countsEl.textContent = finals || interims
      ? `${finals} final${finals === 1 ? "" : "s"}${interims ? `, ${interims} interim` : ""}`
      : "";
    this.container.dataset.finals = String(finals);
  }

  #ticks(t0, t1) {
    const span = t1 - t0;
    const maxTicks = Math.max(2, Math.min(10, Math.floor((this.axisTrack.clientWidth || 600) / TICK_MIN_PX)));
    const step = TICK_STEPS_S.find((s) => span / s <= maxTicks) ?? TICK_STEPS_S.at(-1);
    const ticks = [];
    for (let t = Math.ceil(t0 / step) * step; t <= t1 + 1e-9; t += step) {
      const tick = el("span", "tick", formatTime(Number(t.toFixed(3))));
      tick.style.left = `${(((t - t0) / span) * 100).toFixed(3)}%`;
      ticks.push(tick);
    }
    this.axisTrack.replaceChildren(...ticks);
  }
}
