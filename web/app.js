// The page: settings -> a session -> audio in (microphone or file) -> events out -> timeline.
//
// State lives on <main data-state>: idle, starting, running, stopping, ended, failed; the
// transport in use on data-transport, how a recording is sent (pcm, opus) on data-mic-format.
// Tests wait on those and on [data-final] elements.

import { EventStream } from "./events.js";
import { PCM_SAMPLE_RATE, PcmCapture } from "./pcm.js";
import { Timeline, formatTime } from "./timeline.js";
import { chooseTransport, createUpload } from "./transport.js";

const SLICE_MS = 250;
// After a failure, how long to wait for the session's `end` event before giving up on it.
const END_WAIT_MS = 10_000;
const STORAGE_KEY = "streamer.settings";
const RECORDER_TYPES = [
  "audio/webm;codecs=opus",
  "audio/ogg;codecs=opus",
  "audio/webm",
  "audio/ogg",
  "audio/mp4",
];
const VAD_FIELDS = [
  "positive_threshold",
  "negative_threshold",
  "pre_speech_pad_ms",
  "redemption_ms",
  "min_speech_ms",
  "max_segment_ms",
];
const TONES = {
  idle: "idle",
  starting: "busy",
  running: "live",
  stopping: "busy",
  ended: "done",
  failed: "bad",
};

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  state: $("state"),
  transport: $("transport"),
  eventsStatus: $("events-status"),
  lag: $("lag"),
  sent: $("sent"),
  sessionId: $("session-id"),
  record: $("record"),
  stop: $("stop"),
  file: $("file"),
  fileLabel: $("file-label"),
  reconnect: $("reconnect"),
  micFormat: $("mic-format"),
  level: $("level"),
  clock: $("clock"),
  errors: $("errors"),
  settings: $("settings"),
  follow: $("follow"),
  summary: $("summary"),
  log: $("log"),
  logCount: $("log-count"),
};

const timeline = new Timeline({ container: $("timeline"), results: $("results"), counts: $("counts") });

/** Everything about the session in progress; replaced wholesale by the next one. */
let run = null;

// ---------------------------------------------------------------- settings

function readSettings() {
  const f = ui.settings.elements;
  const num = (name) => Number(f[name].value);
  return {
    config: {
      mode: f.mode.value,
      interim_results: f.interim_results.checked,
      interim_interval_ms: num("interim_interval_ms"),
      vad: Object.fromEntries(VAD_FIELDS.map((name) => [name, num(name)])),
    },
    transport: f.transport.value,
    // How the microphone is sent: raw PCM (cheap for the service) or a recorder's Opus (smaller).
    micFormat: f.mic_format.value === "opus" ? "opus" : "pcm",
    apiKey: f.api_key.value.trim(),
  };
}

function showOutputs() {
  for (const out of ui.settings.querySelectorAll("output[data-for]")) {
    const input = ui.settings.elements[out.dataset.for];
    const v = Number(input.value);
    out.textContent = input.name.endsWith("_ms") ? (v >= 1000 ? `${v / 1000} s` : `${v} ms`) : v.toFixed(2);
  }
  const f = ui.settings.elements;
  f.interim_interval_ms.disabled = !f.interim_results.checked;
  for (const name of VAD_FIELDS) f[name].disabled = f.mode.value !== "segmented";
}

function saveSettings() {
  const f = ui.settings.elements;
  const saved = {};
  for (const input of f) {
    if (!input.name || input.name === "api_key") continue;
    saved[input.name] = input.type === "checkbox" ? input.checked : input.value;
  }
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(saved));
  } catch {
    // Storage can be disabled; settings then last for the page only.
  }
}

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}") ?? {};
  } catch {
    saved = {};
  }
  const f = ui.settings.elements;
  for (const [name, value] of Object.entries(saved)) {
    const input = f[name];
    if (!input || input.name === "api_key") continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = String(value);
  }
  // ?transport=websocket|fetch in the address overrides, handy for comparing the two.
  const forced = new URLSearchParams(location.search).get("transport");
  if (forced && [...f.transport.options].some((o) => o.value === forced)) f.transport.value = forced;
}

ui.settings.addEventListener("input", (e) => {
  const f = ui.settings.elements;
  // The service rejects a silence threshold above the speech threshold; keep them ordered.
  if (Number(f.negative_threshold.value) > Number(f.positive_threshold.value)) {
    if (e.target.name === "positive_threshold") f.negative_threshold.value = f.positive_threshold.value;
    else f.positive_threshold.value = f.negative_threshold.value;
  }
  showOutputs();
  saveSettings();
});
ui.settings.addEventListener("reset", () => {
  setTimeout(() => {
    showOutputs();
    saveSettings();
  });
});
ui.settings.addEventListener("submit", (e) => e.preventDefault());
// Sits with the microphone controls, outside the form (form="settings"): its events do not
// bubble to the form.
ui.micFormat.addEventListener("change", saveSettings);

// ---------------------------------------------------------------- display

function setState(state) {
  ui.app.dataset.state = state;
  ui.state.textContent = state;
  ui.state.dataset.tone = TONES[state];
  const busy = state === "starting" || state === "running" || state === "stopping";
  ui.record.disabled = busy;
  ui.file.disabled = busy;
  ui.fileLabel.classList.toggle("disabled", busy);
  ui.micFormat.disabled = busy;
  ui.stop.disabled = !(state === "running" || state === "starting");
  ui.reconnect.disabled = !(run?.events && (state === "running" || state === "stopping"));
  for (const fs of ui.settings.querySelectorAll("fieldset")) fs.disabled = busy;
}

function showError(code, message, detail = "") {
  const item = document.createElement("div");
  item.className = "error-item";
  const strong = document.createElement("strong");
  strong.textContent = code;
  const text = document.createElement("span");
  text.textContent = message;
  item.append(strong, text);
  if (detail) {
    const small = document.createElement("small");
    small.textContent = detail;
    item.append(small);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "dismiss";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => item.remove());
  item.append(close);
  ui.errors.append(item);
}

function showEventsStatus() {
  const stream = run?.events;
  if (!stream) {
    ui.eventsStatus.textContent = "–";
    return;
  }
  const parts = [run.eventsState, `${stream.received} received`];
  if (stream.duplicates) parts.push(`${stream.duplicates} duplicate${stream.duplicates > 1 ? "s" : ""} ignored`);
  if (stream.reconnects) parts.push(`${stream.reconnects} reconnect${stream.reconnects > 1 ? "s" : ""}`);
  ui.eventsStatus.textContent = parts.join(" · ");
  ui.eventsStatus.dataset.state = run.eventsState;
  ui.eventsStatus.dataset.lastId = String(stream.lastId);
  ui.eventsStatus.dataset.duplicates = String(stream.duplicates);
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

function showSent() {
  ui.sent.textContent = run
    ? `${formatBytes(run.bytes)} (${run.chunks} chunk${run.chunks === 1 ? "" : "s"})`
    : "–";
}

function logEvent(event) {
  const li = document.createElement("li");
  li.dataset.type = event.type;
  const id = document.createElement("span");
  id.className = "log-id";
  id.textContent = Number.isFinite(event.id) ? `#${event.id}` : "";
  const code = document.createElement("code");
  code.textContent = JSON.stringify(event.data);
  li.append(id, code);
  ui.log.append(li);
  ui.logCount.textContent = `(${ui.log.children.length})`;
}

function showSummary(end) {
  const bits = [`Session ended: ${end.reason}`];
  if (typeof end.audio_seconds === "number") bits.push(`${formatTime(end.audio_seconds)} of audio`);
  if (typeof end.segments === "number") bits.push(`${end.segments} segment${end.segments === 1 ? "" : "s"}`);
  if (typeof end.bytes === "number") bits.push(`${formatBytes(end.bytes)} received`);
  ui.summary.textContent = bits.join(" · ");
  if (end.reason !== "completed") {
    ui.state.dataset.tone = "bad";
    ui.state.textContent = `ended: ${end.reason.replaceAll("_", " ")}`;
  }
  ui.summary.dataset.reason = end.reason;
  ui.summary.hidden = false;
}

// The clock and cursor move with the audio while it is being sent.
function tick() {
  if (!run || run.finished) return;
  if (run.clockStart !== null) {
    timeline.advance((performance.now() - run.clockStart) / 1000);
    timeline.render();
  }
  ui.clock.textContent = formatTime(timeline.now);
  if (run.analyser) {
    const buf = run.levelBuf;
    run.analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const x of buf) sum += x * x;
    const db = 10 * Math.log10(sum / buf.length + 1e-10);
    ui.level.style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
  }
  run.frame = requestAnimationFrame(tick);
}

// ---------------------------------------------------------------- a session

function newRun(source) {
  const settings = readSettings();
  const choice = chooseTransport(settings.transport);
  ui.errors.replaceChildren();
  ui.log.replaceChildren();
  ui.logCount.textContent = "";
  ui.summary.hidden = true;
  ui.sessionId.textContent = "–";
  ui.lag.textContent = "–";
  ui.lag.dataset.late = "false";
  timeline.reset();
  timeline.follow = ui.follow.checked;
  run = {
    source,
    settings,
    transport: choice,
    upload: null,
    events: null,
    eventsState: "–",
    recorder: null,
    capture: null,
    stream: null,
    audioContext: null,
    analyser: null,
    levelBuf: null,
    player: null,
    bytes: 0,
    chunks: 0,
    chain: Promise.resolve(),
    clockStart: null,
    frame: 0,
    finished: false,
    uploadDone: false,
    sendFailed: false,
    stopRequested: false,
  };
  ui.app.dataset.transport = choice.name;
  ui.app.dataset.source = source;
  ui.app.dataset.micFormat = source === "microphone" ? settings.micFormat : "";
  ui.transport.textContent = choice.name === "fetch" ? "fetch stream (HTTP/2)" : "WebSocket";
  ui.transport.title = choice.reason;
  showSent();
  showEventsStatus();
  setState("starting");
  return run;
}

async function openSession(r, contentType, pcm = null) {
  r.upload = createUpload(r.transport.name, {
    apiKey: r.settings.apiKey,
    contentType,
    pcm,
    lastEventId: () => r.events?.lastId ?? 0,
  });
  const { sessionId } = await r.upload.open(r.settings.config);
  r.upload.onerror = (err) => uploadFailed(r, err);
  // A dropped connection is resumed by the upload itself; the page says so meanwhile.
  r.upload.onstatus = (status, why = "") => {
    if (run !== r) return;
    ui.app.dataset.upload = status;
    const label = r.transport.name === "fetch" ? "fetch stream (HTTP/2)" : "WebSocket";
    ui.transport.textContent = status === "reconnecting" ? `${label} (reconnecting…)` : label;
    ui.transport.title = status === "reconnecting" ? `connection lost (${why}); resuming` : r.transport.reason;
  };
  ui.app.dataset.upload = "open";
  ui.sessionId.textContent = sessionId;
  ui.sessionId.title = sessionId;
  ui.app.dataset.session = sessionId;
  r.events = new EventStream(sessionId, {
    apiKey: r.settings.apiKey,
    onEvent: (event) => onEvent(r, event),
    onStatus: (status) => {
      if (run !== r) return;
      r.eventsState = status;
      showEventsStatus();
      if (status === "closed" && !r.finished) {
        showError("events_closed", "The event stream closed before the session ended.");
        finish(r, "failed");
      }
    },
  });
  r.events.open();
  ui.reconnect.disabled = false;
}

function onEvent(r, event) {
  if (run !== r) return;
  logEvent(event);
  timeline.add(event);
  showEventsStatus();
  if (event.type === "error") {
    const d = event.data;
    const where = [];
    if (d.channel !== null && d.channel !== undefined) where.push(`channel ${d.channel}`);
    if (d.start_time !== undefined) where.push(`${formatTime(d.start_time)} – ${formatTime(d.end_time)}`);
    showError(d.code, d.message, where.join(", "));
  } else if (event.type === "lagging") {
    // The server's model is behind: say how late results are, until it says they are not.
    const late = event.data.seconds > 0;
    ui.lag.textContent = late ? `late by ${event.data.seconds.toFixed(1)} s` : "on time";
    ui.lag.dataset.late = String(late);
  } else if (event.type === "end") {
    finish(r, "ended");
    showSummary(event.data);
  }
}

/** Send audio in order (a Blob from the recorder, or bytes); resolves false once sending has
 * failed or the session is over. */
function enqueue(r, data) {
  const sent = r.chain
    .then(async () => {
      if (r.finished || r.sendFailed) return false;
      const bytes = data instanceof Blob ? new Uint8Array(await data.arrayBuffer()) : data;
      await r.upload.send(bytes);
      r.bytes += bytes.byteLength;
      r.chunks += 1;
      showSent();
      return true;
    })
    .catch((err) => {
      uploadFailed(r, err);
      return false;
    });
  r.chain = sent;
  return sent;
}

function endUpload(r) {
  r.chain = r.chain
    .then(async () => {
      if (r.finished || r.uploadDone) return false;
      r.uploadDone = true;
      if (run === r && !r.finished) setState("stopping");
      await r.upload.finish();
      return true;
    })
    .catch((err) => {
      uploadFailed(r, err);
      return false;
    });
}

function uploadFailed(r, err) {
  if (r.sendFailed || r.finished) return;
  r.sendFailed = true;
  let message = err.message || String(err);
  if (r.upload?.name === "fetch" && err instanceof TypeError) {
    message += " (streaming uploads need HTTP/2 over TLS; try the WebSocket transport in Settings)";
  }
  fail(r, err.code ?? "upload_failed", message);
}

function releaseInputs(r) {
  if (r.recorder && r.recorder.state !== "inactive") {
    r.recorder.ondataavailable = null;
    r.recorder.onstop = null;
    r.recorder.stop();
  }
  r.capture?.close();
  for (const track of r.stream?.getTracks() ?? []) track.stop();
  r.audioContext?.close().catch(() => {});
  r.player?.pause();
  if (r.player) URL.revokeObjectURL(r.player.src);
  ui.level.style.width = "0";
}

function finish(r, state) {
  if (r.finished) return;
  r.finished = true;
  clearTimeout(r.failTimer);
  cancelAnimationFrame(r.frame);
  releaseInputs(r);
  r.events?.close();
  if (!r.uploadDone) r.upload?.abort();
  timeline.live = false;
  timeline.render();
  ui.clock.textContent = formatTime(timeline.now);
  setState(state);
  showEventsStatus();
}

function fail(r, code, message) {
  if (run !== r || r.finished) return;
  showError(code, message);
  if (r.events && !r.events.ended) {
    // The session exists: stop sending and let its own `end` event say how it finished.
    releaseInputs(r);
    r.clockStart = null;
    if (!r.uploadDone) {
      r.uploadDone = true;
      r.upload?.abort();
    }
    setState("stopping");
    clearTimeout(r.failTimer);
    r.failTimer = setTimeout(() => finish(r, "failed"), END_WAIT_MS);
    return;
  }
  finish(r, "failed");
}

function pickRecorderType() {
  if (typeof MediaRecorder === "undefined") return null;
  return RECORDER_TYPES.find((t) => MediaRecorder.isTypeSupported(t)) ?? "";
}

function levelMeter(r, source) {
  r.analyser = r.audioContext.createAnalyser();
  r.analyser.fftSize = 1024;
  r.levelBuf = new Float32Array(r.analyser.fftSize);
  source.connect(r.analyser);
}

/** The microphone as one mixed-down channel, plus a level meter on the way. Chrome's
 * MediaRecorder writes stereo Opus even from a mono microphone, and the service analyses each
 * channel on its own: without this every utterance would show twice. */
async function monoInput(r, stream) {
  try {
    const ctx = r.audioContext;
    const source = ctx.createMediaStreamSource(stream);
    const mono = new MediaStreamAudioDestinationNode(ctx, {
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
    });
    levelMeter(r, source);
    source.connect(mono);
    await ctx.resume();
    if (ctx.state === "running") return mono.stream;
  } catch {
    // Fall through: record the microphone as the browser delivers it.
  }
  r.analyser = null;
  return stream;
}

/** The microphone as raw 16 kHz mono PCM (pcm.js), plus the level meter. */
async function pcmInput(r, stream) {
  const ctx = r.audioContext;
  const source = ctx.createMediaStreamSource(stream);
  levelMeter(r, source);
  r.capture = await PcmCapture.create(ctx, source);
  await ctx.resume();
  if (ctx.state !== "running") {
    throw Object.assign(new Error(`Audio capture did not start (the audio context is ${ctx.state}).`), {
      code: "capture_failed",
    });
  }
  return r.capture;
}

function unsupported(message) {
  return Object.assign(new Error(message), { code: "unsupported" });
}

async function startMicrophone() {
  const r = newRun("microphone");
  const pcm = r.settings.micFormat === "pcm";
  try {
    // Made before the first await, while the click still counts as a user gesture: only then
    // may an AudioContext start running. For PCM it runs at 16 kHz: the browser resamples.
    r.audioContext =
      typeof AudioContext === "function" ? new AudioContext(pcm ? { sampleRate: PCM_SAMPLE_RATE } : undefined) : null;
    const type = pcm ? "" : pickRecorderType();
    if (pcm && !r.audioContext?.audioWorklet) {
      throw unsupported("This browser cannot capture raw audio (no AudioWorklet); send as Opus instead.");
    }
    if (type === null) throw unsupported("This browser has no MediaRecorder.");
    if (!navigator.mediaDevices?.getUserMedia) throw unsupported("Microphone access needs HTTPS or localhost.");
    // Ask for the microphone first: a permission prompt can take longer than a session waits.
    r.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    // Stop may have been pressed while the browser asked for permission or the session opened.
    if (r.finished) return releaseInputs(r);
    if (pcm) {
      const capture = await pcmInput(r, r.stream);
      if (r.finished) return releaseInputs(r);
      await openSession(r, "", { sampleRate: capture.sampleRate, channels: 1 });
      if (r.finished) return releaseInputs(r);
      capture.ondata = (bytes) => enqueue(r, bytes);
      capture.start();
    } else {
      const input = await monoInput(r, r.stream);
      r.recorder = new MediaRecorder(input, type ? { mimeType: type } : undefined);
      await openSession(r, r.recorder.mimeType || type);
      if (r.finished) return releaseInputs(r);
      r.recorder.ondataavailable = (e) => {
        if (e.data.size) enqueue(r, e.data);
      };
      r.recorder.onstop = () => endUpload(r);
      r.recorder.onerror = (e) => {
        uploadFailed(r, { code: "recorder_failed", message: e.error?.message ?? "recording failed" });
      };
      r.recorder.start(SLICE_MS);
    }
    // An unplugged microphone ends its track: finish the session with what was recorded.
    for (const track of r.stream.getAudioTracks()) track.addEventListener("ended", stop);
    r.clockStart = performance.now();
    timeline.ensureLane(0);
    timeline.live = true;
    setState("running");
    tick();
  } catch (err) {
    const code = err.name === "NotAllowedError" ? "microphone_denied" : err.code ?? err.name ?? "error";
    const message = err.name === "NotAllowedError" ? "Microphone access was refused." : err.message;
    fail(r, code, message);
  }
}

/** Duration in seconds, from the browser's own demuxer; null when it cannot tell. */
function probeDuration(file, player) {
  return new Promise((resolve) => {
    const done = (value) => {
      clearTimeout(timer);
      resolve(value);
    };
    const timer = setTimeout(() => done(null), 3000);
    player.addEventListener("loadedmetadata", () => done(Number.isFinite(player.duration) ? player.duration : null), { once: true });
    player.addEventListener("error", () => done(null), { once: true });
    player.src = URL.createObjectURL(file);
  });
}

async function startFile(file) {
  const r = newRun("file");
  const realTime = $("realtime").checked;
  try {
    r.player = new Audio();
    r.player.preload = "metadata";
    const duration = realTime ? await probeDuration(file, r.player) : null;
    await openSession(r, file.type);
    if (run !== r || r.finished) return;
    setState("running");
    timeline.live = true;
    const bytesPerSecond = duration ? file.size / duration : 0;
    if (bytesPerSecond) {
      r.player.play().catch(() => {}); // Hearing it is a bonus; autoplay rules may say no.
    }
    r.clockStart = performance.now();
    if (!bytesPerSecond) r.clockStart = null;
    tick();
    // Read the file as a stream; when pacing, send no faster than the audio plays.
    const reader = file.stream().getReader();
    const started = performance.now();
    let sent = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done || r.finished || r.stopRequested || r.sendFailed) break;
      const step = bytesPerSecond ? Math.max(1024, Math.round(bytesPerSecond * (SLICE_MS / 1000))) : value.byteLength;
      for (let i = 0; i < value.byteLength && !r.finished && !r.stopRequested; i += step) {
        const piece = value.subarray(i, i + step);
        if (!(await enqueue(r, piece))) break;
        sent += piece.byteLength;
        if (bytesPerSecond) {
          const due = started + (sent / bytesPerSecond) * 1000;
          const wait = due - performance.now();
          if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        }
      }
    }
    reader.releaseLock();
    if (!r.finished && !r.sendFailed) endUpload(r);
  } catch (err) {
    uploadFailed(r, err);
  }
}

function stop() {
  const r = run;
  if (!r || r.finished || r.uploadDone || r.stopRequested) return;
  if (r.recorder && r.recorder.state !== "inactive") {
    // The final dataavailable comes before onstop, which ends the upload.
    r.stopRequested = true;
    r.recorder.stop();
    for (const track of r.stream.getTracks()) track.stop();
    r.clockStart = null;
    setState("stopping");
  } else if (r.capture?.started) {
    // The worklet hands over what it still holds, the last partial chunk is sent, then the
    // upload ends: nothing captured is dropped.
    r.stopRequested = true;
    r.clockStart = null;
    setState("stopping");
    r.capture.stop().then(() => {
      for (const track of r.stream.getTracks()) track.stop();
      endUpload(r);
    });
  } else if (r.source === "file" && r.upload) {
    // The reading loop sees this and ends the upload after the piece in flight.
    r.stopRequested = true;
    r.clockStart = null;
    r.player?.pause();
    setState("stopping");
  } else {
    // Still starting (a permission prompt, or the session being created): nothing was sent.
    finish(r, "idle");
  }
}

// ---------------------------------------------------------------- wiring

ui.record.addEventListener("click", startMicrophone);
ui.stop.addEventListener("click", stop);
ui.file.addEventListener("change", () => {
  const file = ui.file.files?.[0];
  ui.file.value = "";
  if (file) startFile(file);
});
ui.reconnect.addEventListener("click", () => reconnectEvents());
window.addEventListener("resize", () => timeline.render());
ui.follow.addEventListener("change", () => {
  timeline.follow = ui.follow.checked;
  timeline.render();
});

/** Close the event stream and open a new one; with replay the service sends the whole log
 * again and the page must drop what it has already shown. */
function reconnectEvents({ replay = false } = {}) {
  if (!run?.events || run.finished) return false;
  run.events.reconnect({ replay });
  showEventsStatus();
  return true;
}

loadSettings();
showOutputs();
setState("idle");
{
  const choice = chooseTransport(readSettings().transport);
  ui.transport.textContent = choice.name === "fetch" ? "fetch stream (HTTP/2)" : "WebSocket";
  ui.transport.title = choice.reason;
}
ui.settings.elements.transport.addEventListener("change", () => {
  const choice = chooseTransport(readSettings().transport);
  ui.transport.textContent = choice.name === "fetch" ? "fetch stream (HTTP/2)" : "WebSocket";
  ui.transport.title = choice.reason;
});

// A small, documented handle for scripts and tests: read-only state plus the reconnect action.
window.streamer = {
  get state() {
    return ui.app.dataset.state;
  },
  get transport() {
    return run?.transport.name ?? chooseTransport(readSettings().transport).name;
  },
  get lastEventId() {
    return run?.events?.lastId ?? 0;
  },
  /** "pcm" or "opus": how the next recording will be sent (the session's is on data-mic-format). */
  get micFormat() {
    return readSettings().micFormat;
  },
  /** Bytes of audio handed to the upload, and (PCM) samples the worklet captured. */
  get bytesSent() {
    return run?.bytes ?? 0;
  },
  get samplesCaptured() {
    return run?.capture?.samples ?? 0;
  },
  /** Times the upload's connection dropped and was resumed. */
  get uploadResumes() {
    return run?.upload?.resumes ?? 0;
  },
  reconnectEvents,
};
