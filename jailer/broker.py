"""Host side of the broker socket: deliver the job, answer capability calls, collect the result.

Every frame from the jail is hostile input. Each call is checked against the profile's grants
before any capability code runs; limits bound frames, calls per job, calls in flight and log volume.
Protocol: docs/broker-protocol.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import trio

from .ndjson import FrameError, FrameReader, encode
from .profile import Profile
from .result import Facts


class CapabilityError(Exception):
    def __init__(self, type_: str, message: str):
        super().__init__(message)
        self.type = type_
        self.message = message


@dataclass
class CallContext:
    job_id: str
    tenant: str
    profile: Profile
    logs: "LogSink"


class Capability(Protocol):
    name: str

    async def call(self, ctx: CallContext, method: str, args: dict[str, Any]) -> Any: ...


class LogSink:
    """modules.log records kept for the result, capped in bytes (then dropped, flagged)."""

    LEVELS = ("debug", "info", "warn", "error")

    def __init__(self, max_bytes: int, on_record: Callable[[dict], None] | None = None):
        self.on_record = on_record  # the daemon streams records to clients as they arrive
        self.records: list[dict] = []
        self.max_bytes = max_bytes
        self.bytes = 0
        self.truncated = False

    def add(self, record: dict) -> bool:
        size = len(json.dumps(record, separators=(",", ":")))
        if self.bytes + size > self.max_bytes:
            self.truncated = True
            return False
        self.bytes += size
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return True


class LogCapability:
    name = "log"

    async def call(self, ctx: CallContext, method: str, args: dict[str, Any]) -> Any:
        if method not in LogSink.LEVELS:
            raise CapabilityError("BadCall", f"log.{method}: unknown level (use {', '.join(LogSink.LEVELS)})")
        msg = args.get("msg", "")
        fields = args.get("fields") or {}
        if not isinstance(msg, str) or not isinstance(fields, dict):
            raise CapabilityError("BadCall", "log: msg must be a string and fields an object")
        ctx.logs.add({"ts": round(time.time(), 6), "level": method, "msg": msg, "fields": fields})
        return None


class SecretsCapability:
    """Values the profile names, read from host files by the host (never in the jail's env)."""

    name = "secrets"

    async def call(self, ctx: CallContext, method: str, args: dict[str, Any]) -> Any:
        if method != "get":
            raise CapabilityError("BadCall", f"secrets.{method}: unknown method (use get)")
        name = args.get("name")
        granted = {s.name: s for s in ctx.profile.capabilities.secrets}
        if not isinstance(name, str) or name not in granted:
            raise CapabilityError("CapabilityDenied", f"secret {name!r} is not granted to tenant {ctx.tenant!r}")
        try:
            data = await trio.Path(granted[name].file).read_text()
        except OSError as e:
            # The operator's mistake, not the tenant's: say which secret, not the host path.
            raise CapabilityError("Unavailable", f"secret {name!r} could not be read on the host ({e.strerror})")
        return data.rstrip("\n")


class Unavailable:
    """A granted capability with no provider in this mode (e.g. kv outside the daemon)."""

    def __init__(self, name: str, why: str):
        self.name = name
        self.why = why

    async def call(self, ctx: CallContext, method: str, args: dict[str, Any]) -> Any:
        raise CapabilityError("Unavailable", f"{self.name}: {self.why}")


def default_providers() -> dict[str, Capability]:
    return {
        "log": LogCapability(),
        "secrets": SecretsCapability(),
        "kv": Unavailable("kv", "key-value data needs the daemon (jailer serve)"),
        "http": Unavailable("http", "outbound HTTP needs the daemon (jailer serve)"),
    }


@dataclass(frozen=True)
class BrokerLimits:
    max_frame_bytes: int = 1024 * 1024
    max_calls: int = 10_000
    max_in_flight: int = 32


class BrokerSession:
    """One jail's conversation. `facts` is filled in as frames arrive."""

    def __init__(self, stream: trio.SocketStream, ctx: CallContext, providers: dict[str, Capability],
                 facts: Facts, limits: BrokerLimits = BrokerLimits(),
                 on_call: Callable[[str, str, bool], None] | None = None):
        self.on_call = on_call  # (tenant, cap, granted) for metrics
        self.stream = stream
        self.ctx = ctx
        self.providers = providers
        self.facts = facts
        self.limits = limits
        self.reader = FrameReader(stream, limits.max_frame_bytes)
        self.calls = 0
        self.in_flight = 0
        self.result_event = trio.Event()  # handler completed (result) or script mode began
        self.idle_event = trio.Event()  # runtime has nothing left to do, or the channel ended
        self.hello: dict | None = None
        self.delivered_at: float | None = None
        self._send_lock = trio.Lock()

    async def send(self, frame: dict) -> None:
        async with self._send_lock:
            await self.stream.send_all(encode(frame))

    async def wait_hello(self) -> dict:
        frame = await self.reader.receive()
        if frame is None or frame.get("op") != "hello":
            raise FrameError(f"expected hello, got {frame!r}"[:200])
        self.hello = frame
        self.facts.hello = True
        return frame

    async def ping(self) -> None:
        await self.send({"op": "ping"})
        frame = await self.reader.receive()
        if frame is None or frame.get("op") != "pong":
            raise FrameError(f"expected pong, got {frame!r}"[:200])

    async def deliver(self, job: dict) -> None:
        self.delivered_at = time.monotonic()
        await self.send({"op": "job", **job})

    async def serve(self) -> None:
        """Read frames until EOF or a protocol error; never raises for the jail's misbehaviour."""
        try:
            async with trio.open_nursery() as nursery:
                # Caught inside the nursery: trio wraps what leaves it in an ExceptionGroup.
                try:
                    while True:
                        frame = await self.reader.receive()
                        if frame is None:
                            break
                        await self._on_frame(frame, nursery)
                except FrameError as e:
                    self.facts.protocol_error = str(e)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the jail died or we closed: the exit status tells the rest
        finally:
            self.result_event.set()
            self.idle_event.set()

    async def _on_frame(self, frame: dict, nursery: trio.Nursery) -> None:
        op = frame.get("op")
        if op == "call":
            await self._on_call(frame, nursery)
        elif op == "result":
            if self.facts.result is None and not self.facts.script_mode:
                self.facts.result = _clean_result(frame)
            self.result_event.set()
        elif op == "script":
            self.facts.script_mode = True
            self.result_event.set()  # nothing to wait for but the exit
        elif op == "uncaught":
            if self.facts.uncaught is None:
                self.facts.uncaught = _clean_error(frame.get("error"))
        elif op == "idle":
            self.idle_event.set()
        elif op == "pong":
            pass
        else:
            raise FrameError(f"unknown op {str(op)[:64]!r}")

    async def _on_call(self, frame: dict, nursery: trio.Nursery) -> None:
        call_id = frame.get("id")
        if not isinstance(call_id, int) or isinstance(call_id, bool):
            raise FrameError("call without an integer id")
        self.calls += 1
        if self.calls > self.limits.max_calls:
            await self._reply_error(call_id, "LimitExceeded", f"more than {self.limits.max_calls} calls in one job")
            return
        if self.in_flight >= self.limits.max_in_flight:
            await self._reply_error(call_id, "LimitExceeded",
                                    f"more than {self.limits.max_in_flight} calls in flight")
            return
        cap, method, args = frame.get("cap"), frame.get("method"), frame.get("args", {})
        if not isinstance(cap, str) or not isinstance(method, str) or not isinstance(args, dict):
            await self._reply_error(call_id, "BadCall", "a call needs string cap and method and an object args")
            return
        granted = cap in self.ctx.profile.capabilities.granted() and cap in self.providers
        if self.on_call is not None:
            self.on_call(self.ctx.tenant, cap if cap in self.providers else "(unknown)", granted)
        if not granted:
            await self._reply_error(call_id, "CapabilityDenied",
                                    f"capability {cap[:64]!r} is not granted to tenant {self.ctx.tenant!r}")
            return
        self.in_flight += 1
        nursery.start_soon(self._run_call, call_id, self.providers[cap], method, args)

    async def _run_call(self, call_id: int, provider: Capability, method: str, args: dict) -> None:
        try:
            try:
                value = await provider.call(self.ctx, method, args)
            except CapabilityError as e:
                await self._reply_error(call_id, e.type, e.message)
                return
            await self.send({"op": "reply", "id": call_id, "ok": True, "value": value})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.in_flight -= 1

    async def _reply_error(self, call_id: int, type_: str, message: str) -> None:
        await self.send({"op": "reply", "id": call_id, "ok": False,
                         "error": {"type": type_, "message": message}})


def _clean_error(err: Any) -> dict:
    """Keep only the three string fields, bounded, whatever the jail sent."""
    if not isinstance(err, dict):
        err = {}
    return {k: str(err.get(k) or "")[:16384] for k in ("type", "message", "stack")}


def _clean_result(frame: dict) -> dict:
    status = frame.get("status")
    if status not in ("ok", "error", "incomplete"):
        status = "error"
        frame = {"error": {"type": "ProtocolError", "message": "result with an unknown status"}}
    out: dict[str, Any] = {"status": status}
    if status == "ok":
        out["result"] = frame.get("result")
    elif status == "error":
        out["error"] = _clean_error(frame.get("error"))
    return out
