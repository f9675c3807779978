// Runs on the audio thread: hands every render quantum of its (mono) input to the page, from a
// "start" message until a "stop" one, which it answers with "stopped" after the last block.
// Messages on a port keep their order, so once the page has "stopped" it has every block.

class PcmTap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.state = "idle";
    this.port.onmessage = (e) => {
      if (e.data === "start" && this.state === "idle") {
        this.state = "running";
      } else if (e.data === "stop") {
        this.state = "stopped";
        this.port.postMessage("stopped");
      }
    };
  }

  process(inputs) {
    if (this.state === "stopped") return false;
    const channel = inputs[0]?.[0];
    if (this.state === "running" && channel) {
      const block = channel.slice();
      this.port.postMessage(block, [block.buffer]);
    }
    return true;
  }
}

registerProcessor("pcm-tap", PcmTap);
