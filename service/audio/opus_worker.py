"""The Opus decoding process: ``python -m service.audio.opus_worker``, run by
:class:`service.audio.packets.DecodeProcess`.

It holds every session's demuxer and libopus state and runs their steps, batch by batch, with an
interpreter (and a GIL) of its own: in the server's process the decoding thread and the event
loop kept waiting on each other for the GIL. Frames on stdin and stdout are a 4-byte
little-endian length and a pickle (both ends are this package). A request batch is a list of
``(key, op, args)``; the reply lists, in the same order, ``(result, error)`` with ``error`` the
``repr`` of an exception or None.

- ``("open", demuxer)``: start a stream for ``key`` from the demuxer that read its headers;
- ``("step", (data, packets, final))``: its :meth:`_OpusStream.step` and then its error state,
  as :func:`service.audio.packets.pack_step` puts them;
- ``("close", None)``: forget it.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any, BinaryIO


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    parts: list[bytes] = []
    while n:
        data = stream.read(n)
        if not data:
            return None
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def main() -> None:
    import signal

    from service.audio.packets import _OpusStream, pack_step

    # The server ends this process by closing its stdin (or kills it); a Ctrl-C or SIGTERM sent
    # to the whole process group must not end it first, with the server's sessions mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    streams: dict[int, _OpusStream] = {}
    while True:
        header = _read_exactly(stdin, 4)
        if header is None:
            return  # the server closed our stdin: it is shutting down
        payload = _read_exactly(stdin, int.from_bytes(header, "little"))
        if payload is None:
            return
        replies: list[tuple[Any, str | None]] = []
        for key, op, args in pickle.loads(payload):
            try:
                if op == "open":
                    streams[key] = _OpusStream(args)
                    replies.append((streams[key].decoder.channels, None))
                elif op == "step":
                    stream = streams[key]
                    replies.append((pack_step(stream.step(*args), stream.failure_state()), None))
                else:
                    streams.pop(key, None)
                    replies.append((None, None))
            except Exception as exc:  # one session's failure is its reply, not ours
                replies.append((None, repr(exc)))
        out = pickle.dumps(replies, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(len(out).to_bytes(4, "little"))
        stdout.write(out)
        stdout.flush()


if __name__ == "__main__":
    main()
