// The microphone as raw PCM: 16 kHz mono little-endian Int16, in ~100 ms chunks.
//
// An AudioContext at 16 kHz (the browser resamples the microphone) feeds an AudioWorklet
// (pcm-worklet.js) that posts each 128-sample Float32 block; they are batched and converted
// here. Raw PCM costs the service far less than decoding a webm/opus stream.

export const PCM_SAMPLE_RATE = 16_000;
const CHUNK_MS = 100;
// How long stop() waits for the worklet's last blocks before giving up on them.
const STOP_WAIT_MS = 2_000;

/** Float samples in [-1, 1] as little-endian signed 16-bit. */
export function toInt16LE(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return bytes;
}

export class PcmCapture {
  /** Loads the worklet and connects `source` to it, mixed down to one channel; nothing is
   * delivered before start(). */
  static async create(ctx, source) {
    await ctx.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url));
    return new PcmCapture(ctx, source);
  }

  constructor(ctx, source) {
    this.ctx = ctx;
    this.source = source;
    this.node = new AudioWorkletNode(ctx, "pcm-tap", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
    });
    this.pending = new Float32Array(Math.round((ctx.sampleRate * CHUNK_MS) / 1000));
    this.filled = 0;
    this.samples = 0;
    this.ondata = null;
    this.started = false;
    this.stopped = null;
    this.node.port.onmessage = (e) => this.receive(e.data);
    source.connect(this.node);
    // Its output is silence; connected so the graph pulls it for certain.
    this.node.connect(ctx.destination);
  }

  get sampleRate() {
    return this.ctx.sampleRate;
  }

  start() {
    this.started = true;
    this.node.port.postMessage("start");
  }

  receive(data) {
    if (data === "stopped") {
      this.stopped?.();
      return;
    }
    if (!(data instanceof Float32Array)) return;
    this.samples += data.length;
    let i = 0;
    while (i < data.length) {
      const n = Math.min(data.length - i, this.pending.length - this.filled);
      this.pending.set(data.subarray(i, i + n), this.filled);
      this.filled += n;
      i += n;
      if (this.filled === this.pending.length) this.emit();
    }
  }

  emit() {
    if (!this.filled) return;
    const bytes = toInt16LE(this.pending.subarray(0, this.filled));
    this.filled = 0;
    this.ondata?.(bytes);
  }

  /** Resolves once every block captured so far has been delivered, the last partial chunk
   * included; nothing more is captured after. */
  stop() {
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.stopped?.(), STOP_WAIT_MS);
      this.stopped = () => {
        this.stopped = null;
        clearTimeout(timer);
        this.emit();
        this.close();
        resolve();
      };
      this.node.port.postMessage("stop");
    });
  }

  close() {
    this.ondata = null;
    this.node.port.onmessage = null;
    try {
      this.source.disconnect(this.node);
    } catch {
      // Already disconnected.
    }
    this.node.disconnect();
  }
}
