"""The client API: NDJSON over the daemon's Unix socket (docs/protocol.md).

One task per connection, one task per request in the connection's nursery, replies carrying the
client's request id in any order. Bad input gets an error reply; the connection is closed only when
the framing is lost (an oversized or unterminated frame). Nothing a client sends raises out of here.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from jailer import __version__
from jailer.ndjson import FrameError, FrameReader, encode

from .auth import Peer, peer_of
from .daemon import BadRequest, Daemon

log = logging.getLogger("jailer.server")

OUTBOX = 1024  # frames queued for one slow client before log events are dropped


def _request_id(frame: dict) -> Any:
    rid = frame.get("id")
    # ids are echoed back: keep them small and JSON-plain
    if rid is None or isinstance(rid, (int, str)) and not isinstance(rid, bool) and len(str(rid)) <= 128:
        return rid
    return None


class Connection:
    def __init__(self, daemon: Daemon, stream: trio.SocketStream, peer: Peer):
        self.d = daemon
        self.stream = stream
        self.peer = peer
        self.in_flight = 0
        self.send_out, self.recv_out = trio.open_memory_channel(OUTBOX)
        self.flushed = trio.Event()  # the writer has sent everything and stopped

    async def writer(self) -> None:
        try:
            async for frame in self.recv_out:
                await self.stream.send_all(encode(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; its jobs still finish within their limits
        finally:
            self.flushed.set()

    async def reply(self, frame: dict) -> None:
        try:
            await self.send_out.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def reply_nowait(self, frame: dict) -> None:
        try:
            self.send_out.send_nowait(frame)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def error(self, rid: Any, code: str, message: str) -> None:
        self.d.metrics.client_errors.inc(code)
        await self.reply({"id": rid, "ok": False, "error": {"code": code, "message": message}})

    async def handle(self, frame: dict) -> None:
        rid = _request_id(frame)
        op = frame.get("op")
        try:
            if op == "ping":
                await self.reply({"id": rid, "ok": True, "pong": True, "version": __version__})
            elif op == "submit":
                async def emit(f: dict) -> None:
                    if frame.get("stream"):
                        await self.reply({"id": rid, **f})

                res = await self.d.submit(self.peer, frame, emit, lambda f: self.reply_nowait({"id": rid, **f}))
                if frame.get("stream"):
                    await self.reply({"id": rid, "event": "result", "ok": True, "result": res.to_dict()})
                else:
                    await self.reply({"id": rid, "ok": True, "result": res.to_dict()})
            elif op == "cancel":
                await self.reply({"id": rid, "ok": True, "cancelled": self.d.cancel(self.peer, frame.get("job"))})
            elif op == "status":
                await self.reply({"id": rid, "ok": True, **self.d.status(self.peer, frame.get("job"))})
            elif op == "stats":
                await self.reply({"id": rid, "ok": True, "stats": self.d.stats(self.peer)})
            else:
                await self.error(rid, "unknown_op", f"unknown op {str(op)[:64]!r} (ping, submit, cancel, status, stats)")
        except BadRequest as e:
            await self.error(rid, e.code, e.message)
        except Exception:  # our bug: say so to this client, keep serving everyone
            log.exception("request failed", extra={"event": "internal", "uid": self.peer.uid})
            await self.error(rid, "internal", "internal error (logged by the daemon)")
        finally:
            self.in_flight -= 1
            self.d.active_requests -= 1
            self.d._maybe_idle()


async def _linger_close(stream: trio.SocketStream) -> None:
    """Stop reading a client that lost the framing, without a reset that could eat our error reply:
    half-close, then discard what it still sends for a moment."""
    with trio.move_on_after(1):
        try:
            await stream.send_eof()
            discarded = 0
            while discarded < 64 * 1024 * 1024:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    break
                discarded += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def handle_connection(daemon: Daemon, stream: trio.SocketStream) -> None:
    try:
        peer = peer_of(stream.socket)
    except OSError:
        await stream.aclose()
        return
    cfg = daemon.config
    if len(daemon.connections) >= cfg.get("server", "max_connections"):
        # Say why, then close: the client can retry; everyone already connected is unaffected.
        daemon.metrics.client_errors.inc("too_many_connections")
        log.warning("connection refused: server.max_connections reached", extra={"event": "conn_refused",
                                                                                  "uid": peer.uid})
        with trio.move_on_after(1):
            try:
                await stream.send_all(encode({"id": None, "ok": False, "error": {
                    "code": "too_many_connections",
                    "message": f"the daemon has {len(daemon.connections)} client connections "
                               "(server.max_connections); retry later"}}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await stream.aclose()
        return
    conn = Connection(daemon, stream, peer)
    daemon.connections.add(conn)
    reader = FrameReader(stream, cfg.get("server", "max_frame"))
    max_in_flight = cfg.get("server", "max_in_flight")
    lost = False
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(conn.writer)
            async with trio.open_nursery() as requests:
                while True:
                    try:
                        frame = await reader.receive()
                    except FrameError as e:
                        await conn.error(None, "frame_too_large" if e.fatal and "limit" in str(e) else "invalid_frame", str(e))
                        if e.fatal:
                            lost = True  # framing lost: no way to find the next frame
                            break
                        continue
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if frame is None:
                        break  # EOF: finish what is in flight (a half-closed client still reads)
                    if conn.in_flight >= max_in_flight:
                        await conn.error(_request_id(frame), "too_many_in_flight",
                                         f"more than {max_in_flight} requests in flight on this connection")
                        continue
                    conn.in_flight += 1
                    daemon.active_requests += 1
                    requests.start_soon(conn.handle, frame)
            await conn.send_out.aclose()
            await conn.flushed.wait()
            if lost:
                await _linger_close(stream)
    finally:
        daemon.connections.discard(conn)
        await stream.aclose()
