"""Client library for the daemon's socket API (docs/protocol.md): `Client` (blocking) and
`AsyncClient` (trio, many requests in flight on one connection)."""

from __future__ import annotations

import itertools
import json
import os
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from .ndjson import FrameReader, encode

DEFAULT_SOCKET = os.environ.get("JAILER_SOCKET", "/run/jailer/jailer.sock")


class ClientError(Exception):
    """The daemon refused a request (bad request, forbidden, unknown op...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def submit_frame(tenant: str, *, code: str | None = None, filename: str | None = None, script: str | None = None,
                 input: Any = None, entry: str | None = None, runtime: str | None = None,
                 limits: dict | None = None, stream: bool = False) -> dict:
    frame: dict[str, Any] = {"op": "submit", "tenant": tenant, "input": input if input is not None else {}}
    for k, v in (("code", code), ("filename", filename), ("script", script), ("entry", entry),
                 ("runtime", runtime), ("limits", limits)):
        if v is not None:
            frame[k] = v
    if stream:
        frame["stream"] = True
    return frame


def _unwrap(reply: dict) -> dict:
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise ClientError(err.get("code", "error"), err.get("message", ""))
    return reply


class Client:
    """Blocking client: one request at a time on one connection."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.ids = itertools.count(1)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, frame: dict) -> dict:
        rid = next(self.ids)
        self.sock.sendall(encode({**frame, "id": rid}))
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the daemon closed the connection")
            reply = json.loads(line)
            if reply.get("id") == rid and ("event" not in reply or reply.get("event") == "result"):
                return _unwrap(reply)

    def submit(self, tenant: str, **kw: Any) -> dict:
        """Run a job; returns the result record (status `rejected` when it never ran)."""
        return self.request(submit_frame(tenant, **kw))["result"]

    def ping(self) -> dict:
        return self.request({"op": "ping"})

    def cancel(self, job: str) -> bool:
        return self.request({"op": "cancel", "job": job})["cancelled"]

    def status(self, job: str) -> dict:
        return self.request({"op": "status", "job": job})

    def stats(self) -> dict:
        return self.request({"op": "stats"})["stats"]


class AsyncClient:
    """trio client: requests are multiplexed by id over one connection."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.ids = itertools.count(1)
        self.waiting: dict[int, trio.MemorySendChannel] = {}
        self.lock = trio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str = DEFAULT_SOCKET) -> AsyncIterator[AsyncClient]:
        stream = await trio.open_unix_socket(path)
        client = cls(stream)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(client._reader)
                try:
                    yield client
                finally:
                    n.cancel_scope.cancel()
        finally:
            await stream.aclose()

    async def _reader(self) -> None:
        reader = FrameReader(self.stream, 64 * 1024 * 1024)
        while True:
            try:
                frame = await reader.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                frame = None
            if frame is None:
                break
            ch = self.waiting.get(frame.get("id"))
            if ch is not None:
                ch.send_nowait(frame)
        for ch in self.waiting.values():
            ch.close()

    async def events(self, frame: dict) -> AsyncIterator[dict]:
        """Every frame answering this request (events for a streaming submit), ending with the reply."""
        rid = next(self.ids)
        send, recv = trio.open_memory_channel(1024)
        self.waiting[rid] = send
        try:
            async with self.lock:
                await self.stream.send_all(encode({**frame, "id": rid}))
            async for reply in recv:
                yield reply
                if "event" not in reply or reply.get("event") == "result":
                    return
            raise ConnectionError("the daemon closed the connection")
        finally:
            del self.waiting[rid]

    async def request(self, frame: dict) -> dict:
        async for reply in self.events(frame):
            if "event" not in reply or reply.get("event") == "result":
                return _unwrap(reply)
        raise ConnectionError("the daemon closed the connection")

    async def submit(self, tenant: str, **kw: Any) -> dict:
        return (await self.request(submit_frame(tenant, **kw)))["result"]

    async def ping(self) -> dict:
        return await self.request({"op": "ping"})

    async def cancel(self, job: str) -> bool:
        return (await self.request({"op": "cancel", "job": job}))["cancelled"]

    async def status(self, job: str) -> dict:
        return await self.request({"op": "status", "job": job})

    async def stats(self) -> dict:
        return (await self.request({"op": "stats"}))["stats"]
