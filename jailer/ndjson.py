"""NDJSON framing over trio streams, with a hard frame-size limit (both protocols use it)."""

from __future__ import annotations

import json
from typing import Any

import trio

DEFAULT_MAX_FRAME = 1024 * 1024


class FrameError(Exception):
    """The peer broke the framing: too long, not UTF-8 JSON, or not an object.

    `fatal`: the stream is out of sync (an oversized or unterminated frame) and must be closed;
    otherwise the bad line was consumed whole and the next frame can be read.
    """

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream, max_frame: int = DEFAULT_MAX_FRAME):
        self._stream = stream
        self._max = max_frame
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no newline

    async def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at a clean EOF. Raises FrameError on bad input."""
        while True:
            nl = self._buf.find(b"\n", self._scan)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._scan = 0
                if len(line) > self._max:
                    raise FrameError(f"frame of {len(line)} bytes exceeds the {self._max}-byte limit", True)
                return decode(line)
            self._scan = len(self._buf)
            if len(self._buf) > self._max:
                raise FrameError(f"frame exceeds the {self._max}-byte limit", True)
            data = await self._stream.receive_some(65536)
            if not data:
                if self._buf:
                    raise FrameError("connection closed in the middle of a frame", True)
                return None
            self._buf += data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise FrameError("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise FrameError(f"a frame must be a JSON object, got {type(obj).__name__}")
    return obj


def encode(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate from a peer: keep it escaped
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
