"""A small fake broker host for driving the runtime shims outside a jail.

`run_shim` listens on a fresh Unix socket, spawns one shim (`node shim.js SOCK` or
`python3 -I -S shim.py SOCK`) with a minimal environment, accepts its connection, optionally
pings it, sends one job, answers its capability calls from a dict of handlers, and records every
frame the shim sends (with its arrival time), stdout, stderr and the exit code. A hard deadline
kills the shim by pid; the process is always reaped before returning.

Plain blocking sockets and subprocess: no root, no trio, usable from any test or from a REPL::

    from tests.shimhost import run_shim
    run = run_shim("python", "def handler(request, modules):\\n    return 1\\n")
    run.ops  # ['hello', 'result', 'idle']
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

SHIMS_DIR = Path(__file__).resolve().parent.parent / "jailer" / "shims"
NODE = "/usr/bin/node"
PYTHON = "/usr/bin/python3"
MAX_FRAME_BYTES = 1024 * 1024
# Start-up time leaks in through the environment (NODE_EXTRA_CA_CERTS costs node ~40 ms), and the
# jail runs the shim with a cleared one: do the same.
SHIM_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

DEFAULT_FILENAME = {"node": "handler.js", "python": "handler.py"}


class HostError(Exception):
    """Raised by a call handler to answer `ok: false` with this error type and message."""

    def __init__(self, type_: str, message: str = "") -> None:
        super().__init__(message)
        self.type = type_
        self.message = message


# A call handler receives the call's args and returns the reply value (or raises HostError).
CallHandler = Callable[[dict], Any]


@dataclass
class ShimRun:
    """Everything one shim process did."""

    frames: list[dict] = field(default_factory=list)  # every frame the shim sent, in order
    times_ms: list[float] = field(default_factory=list)  # arrival of each frame, ms after spawn
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None  # negative: killed by that signal
    timed_out: bool = False
    protocol_errors: list[str] = field(default_factory=list)

    @property
    def ops(self) -> list[str]:
        return [f.get("op") for f in self.frames]

    def frames_of(self, op: str) -> list[dict]:
        return [f for f in self.frames if f.get("op") == op]

    @property
    def result(self) -> dict | None:
        results = self.frames_of("result")
        return results[0] if results else None

    @property
    def calls(self) -> list[dict]:
        return self.frames_of("call")

    def ms_until(self, op: str) -> float | None:
        for frame, t in zip(self.frames, self.times_ms):
            if frame.get("op") == op:
                return t
        return None


def shim_command(runtime: str, socket_path: str) -> list[str]:
    if runtime == "node":
        return [NODE, str(SHIMS_DIR / "shim.js"), socket_path]
    if runtime == "python":
        return [PYTHON, "-I", "-S", str(SHIMS_DIR / "shim.py"), socket_path]
    raise ValueError(f"unknown runtime {runtime!r}")


def _lookup(handlers: Mapping[str, CallHandler], cap: str, method: str) -> CallHandler | None:
    return handlers.get(f"{cap}.{method}") or handlers.get(cap)


def _reply_to(frame: dict, handlers: Mapping[str, CallHandler]) -> dict:
    handler = _lookup(handlers, str(frame.get("cap")), str(frame.get("method")))
    if handler is None:
        return {
            "op": "reply",
            "id": frame.get("id"),
            "ok": False,
            "error": {"type": "CapabilityDenied", "message": f"capability {frame.get('cap')!r} is not granted"},
        }
    try:
        value = handler(frame.get("args"))
    except HostError as e:
        return {"op": "reply", "id": frame.get("id"), "ok": False, "error": {"type": e.type, "message": e.message}}
    return {"op": "reply", "id": frame.get("id"), "ok": True, "value": value}


def _send(conn: socket.socket, frame: dict) -> None:
    conn.sendall(json.dumps(frame, separators=(",", ":")).encode() + b"\n")


def run_shim(
    runtime: str,
    code: str,
    *,
    filename: str | None = None,
    entry: str = "handler",
    input: Any = None,
    handlers: Mapping[str, CallHandler] | None = None,
    pings: int = 0,
    send_job: bool = True,
    hang_up_after_hello: bool = False,
    extra_job_fields: Mapping[str, Any] | None = None,
    timeout_s: float = 10.0,
) -> ShimRun:
    """Runs one shim through one job; returns when it exits (or is killed at the deadline)."""
    handlers = handlers or {}
    run = ShimRun()
    job = {
        "op": "job",
        "id": "j-1",
        "filename": filename or DEFAULT_FILENAME[runtime],
        "code": code,
        "entry": entry,
        "input": input,
        **(extra_job_fields or {}),
    }
    with tempfile.TemporaryDirectory(prefix="shimhost-") as tmp:
        sock_path = os.path.join(tmp, "broker.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen(1)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        start = time.monotonic()
        deadline = start + timeout_s
        proc = None
        conn = None
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    shim_command(runtime, sock_path),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=SHIM_ENV,
                    cwd=tmp,
                )
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                run.timed_out = True
                return run
            finally:
                listener.close()  # exactly one connection, as the real broker does
            if hang_up_after_hello:
                _converse(conn, run, job, handlers, 0, False, start, deadline, stop_after_first=True)
                conn.close()
                conn = None
            else:
                _converse(conn, run, job, handlers, pings, send_job, start, deadline)
        finally:
            if proc is not None:
                _reap(proc, deadline, run)  # before closing: a hang-up would make the shim exit 70
            if conn is not None:
                conn.close()
            if proc is not None:
                with open(out_path, encoding="utf-8", errors="replace") as f:
                    run.stdout = f.read()
                with open(err_path, encoding="utf-8", errors="replace") as f:
                    run.stderr = f.read()
    return run


def _converse(conn, run, job, handlers, pings, send_job, start, deadline, stop_after_first=False) -> None:
    buf = b""
    pings_left = pings
    job_sent = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            run.timed_out = True
            return
        conn.settimeout(remaining)
        try:
            data = conn.recv(65536)
        except socket.timeout:
            run.timed_out = True
            return
        except ConnectionResetError:
            return
        if not data:
            return  # the shim closed its end (it exited)
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if len(line) + 1 > MAX_FRAME_BYTES:
                run.protocol_errors.append(f"frame of {len(line) + 1} bytes")
                continue
            try:
                frame = json.loads(line)
            except ValueError as e:
                run.protocol_errors.append(f"unparsable frame {line[:200]!r}: {e}")
                continue
            run.frames.append(frame)
            run.times_ms.append((time.monotonic() - start) * 1000)
            op = frame.get("op")
            if op in ("hello", "pong") and not job_sent:
                if pings_left > 0:
                    pings_left -= 1
                    _send(conn, {"op": "ping"})
                elif send_job:
                    _send(conn, job)
                    job_sent = True
            elif op == "call":
                _send(conn, _reply_to(frame, handlers))
            if stop_after_first:
                return
        if len(buf) > MAX_FRAME_BYTES:
            run.protocol_errors.append("frame over the size limit")
            return


def _reap(proc: subprocess.Popen, deadline: float, run: ShimRun) -> None:
    try:
        proc.wait(timeout=max(0.01, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        run.timed_out = True
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    run.exit_code = proc.returncode
