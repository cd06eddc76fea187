"""Fuzzing the host side of the broker protocol (jailer/broker.py, jailer/ndjson.py).

A real BrokerSession for tenant "a" (log and kv granted, kv backed by a real KVCapability on a
temporary state dir) is fed hostile byte streams: random bytes, random JSON values, frames built
from a strategy of ops (call/result/uncaught/idle/script/hello/junk, huge/negative/bool/string/
nested ids), oversized and unterminated frames, all cut at random points. Tenant "b" shares the
state dir and holds a secret written through b's own context before any fuzzing.

Properties, for every input:
- `serve()` returns (under fail_after) and never raises; `wait_hello()` raises nothing but FrameError;
- the facts are consistent with a simple model of the framing rules: `protocol_error` is set exactly
  when the stream breaks them (oversized/unterminated/unparsable/non-object frame, unknown op, call
  without an integer id), and result/script/uncaught reflect the frames read before that point;
- every byte the host sends back is a strict-JSON `reply` frame with a boolean `ok`, and every call
  read before a protocol error is answered exactly once, with its own id;
- nothing sent back ever contains tenant b's secret, and tenant b's data is unchanged;
- BrokerLimits hold: calls reaching a provider <= max_calls, provider calls at once <= max_in_flight.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jailer.broker import BrokerLimits, BrokerSession, CallContext, LogSink, default_providers
from jailer.ndjson import FrameError
from jailer.profile import load_profile
from jailer.result import Facts
from supervisor.capabilities import KVCapability

# A fresh random token per test run: no strategy below can produce it, so seeing it in a reply to
# tenant a can only mean a leak of tenant b's data.
B_SECRET = "b-secret-" + secrets.token_hex(16)
B_KEYS = ("secret", "../a", "a", "k")  # b's keys: names tenant a's calls also use

MAX_FRAME = 8192
LIMITS = BrokerLimits(max_frame_bytes=MAX_FRAME, max_calls=12, max_in_flight=3)
KNOWN_OPS = ("call", "result", "script", "uncaught", "idle", "pong")
ERROR_TYPES = {"LimitExceeded", "BadCall", "CapabilityDenied", "Unavailable", "QuotaExceeded"}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PROFILE_A = """
[capabilities]
log = true
[capabilities.kv]
enabled = true
max_keys = 40
max_bytes = "16KiB"
max_value = "1KiB"
[limits]
log = "2KiB"
"""
PROFILE_B = """
[capabilities.kv]
enabled = true
"""


@dataclass
class World:
    state_dir: str
    profile_a: object
    ctx_b: CallContext

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"World({self.state_dir!r})"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("broker-fuzz")
    (d / "a.toml").write_text(PROFILE_A)
    (d / "b.toml").write_text(PROFILE_B)
    state = str(d / "state")
    ctx_b = CallContext("j-b", "b", load_profile("b", str(d / "b.toml")), LogSink(4096))

    async def seed() -> None:
        kv = KVCapability(state)
        try:
            for k in B_KEYS:
                await kv.call(ctx_b, "set", {"key": k, "value": {"owner": "b", "secret": B_SECRET}})
        finally:
            kv.close()

    trio.run(seed)
    return World(state, load_profile("a", str(d / "a.toml")), ctx_b)


# ----------------------------------------------------------------------------------------------
# strategies

SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]  # valid JSON escapes, not encodable as UTF-8
texts = st.one_of(st.text(max_size=12), st.text(st.characters(exclude_categories=()), max_size=6),
                  st.sampled_from(SURROGATES + ["", "\x00", "\u2028", "\ufeff", "é" * 5, "\n"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**16, 2**16), st.integers(-2**80, 2**80),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                           max_leaves=10)

int_ids = st.integers(1, 20)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
ids = st.one_of(int_ids, int_ids, int_ids, st.integers(-2**70, 2**70), st.sampled_from([0, -1, 10**200, -(10**300)]),
                st.booleans(), st.none(), texts, finite_floats, st.lists(scalars, max_size=2),
                st.dictionaries(texts, scalars, max_size=2))
caps = st.one_of(st.sampled_from(["log", "kv", "secrets", "http", "", "KV", "log ", "__class__", "custom"]),
                 json_values)
methods = st.one_of(st.sampled_from(["info", "debug", "warn", "error", "fatal", "get", "set", "delete", "list",
                                     "__init__", "call", "close", "_set", "path_for", *SURROGATES]), json_values)
keys = st.one_of(st.sampled_from(list(B_KEYS) + ["../b", "../b.sqlite3", "b", "b:secret", "kv/b", "x" * 513]),
                 texts, json_values)
kv_args = st.fixed_dictionaries({}, optional={
    "key": keys, "value": json_values, "ttl": st.one_of(finite_floats, st.integers(), json_values),
    "prefix": st.one_of(st.sampled_from(["", "s", "."]), texts, json_values),
    "limit": st.one_of(st.integers(-5, 2000), json_values), "after": keys, "junk": json_values})
log_args = st.fixed_dictionaries({}, optional={"msg": st.one_of(texts, json_values),
                                               "fields": st.one_of(st.dictionaries(texts, json_values, max_size=3),
                                                                   json_values)})
kv_good_args = st.one_of(  # well-formed kv arguments (the values and keys are still arbitrary)
    st.fixed_dictionaries({"key": keys}),
    st.fixed_dictionaries({"key": keys, "value": json_values}, optional={"ttl": st.floats(0.001, 1e6)}),
    st.fixed_dictionaries({}, optional={"prefix": st.one_of(st.sampled_from(["", "s", "."]), texts),
                                        "limit": st.integers(1, 5), "after": keys}))
args = st.one_of(kv_good_args, kv_args, log_args, json_values)


@st.composite
def call_frames(draw):
    frame = {"op": "call"}
    for name, strat in (("id", ids), ("cap", caps), ("method", methods), ("args", args)):
        if draw(st.integers(0, 9)) > 0:  # usually present
            frame[name] = draw(strat)
    return frame


benign_frames = st.one_of(
    st.builds(lambda s, r, e: {"op": "result", "status": s, "result": r, "error": e},
              st.one_of(st.sampled_from(["ok", "error", "incomplete", "OK", ""]), json_values), json_values,
              st.one_of(st.fixed_dictionaries({}, optional={"type": json_values, "message": json_values,
                                                            "stack": json_values}), json_values)),
    st.builds(lambda e: {"op": "uncaught", "error": e}, json_values),
    st.just({"op": "idle"}), st.just({"op": "script"}), st.just({"op": "pong"}),
)
bad_frames = st.one_of(  # each one ends the conversation with a protocol error
    st.builds(lambda r: {"op": "hello", "runtime": r, "version": "v1", "pid": 2}, json_values),
    st.builds(lambda op: {"op": op}, st.one_of(st.sampled_from(["job", "ping", "reply", "Call", ""]), json_values)),
    st.dictionaries(texts, json_values, max_size=3),
)


def _call(cap, methods_, args_):
    return st.builds(lambda i, m, a: {"op": "call", "id": i, "cap": cap, "method": m, "args": a},
                     st.integers(1, 40), methods_, args_)


well_formed_calls = st.one_of(  # integer ids (no protocol error), mostly meaningful cap/method/args
    _call("log", st.sampled_from(LogSink.LEVELS), log_args),
    _call("kv", st.just("get"), st.fixed_dictionaries({"key": keys})),
    _call("kv", st.just("set"), st.fixed_dictionaries({"key": keys, "value": json_values},
                                                      optional={"ttl": st.floats(0.001, 1e6)})),
    _call("kv", st.sampled_from(["delete", "list"]), kv_good_args),
    _call("kv", st.sampled_from(["get", "set", "delete", "list"]), args),
    st.builds(lambda i, cap, method, a: {"op": "call", "id": i, "cap": cap, "method": method, "args": a},
              st.integers(1, 40), st.sampled_from(["log", "kv", "secrets", "http", "nope"]),
              st.one_of(st.sampled_from(["info", "get", "bogus", "__init__"]), st.sampled_from(SURROGATES), texts),
              args),
)
frames = st.one_of(call_frames(), *[well_formed_calls] * 6, *[benign_frames] * 3, bad_frames)


@st.composite
def frame_lines(draw, frame_strategy=frames):
    """One frame as a line: JSON-escaped (always UTF-8-safe) or raw UTF-8, sometimes with extra keys."""
    frame = draw(frame_strategy)
    if draw(st.integers(0, 3)) == 0:
        frame = {**frame, **draw(st.dictionaries(st.sampled_from(["x", "op", "id", "pad"]), json_values, max_size=2))}
    text = json.dumps(frame, ensure_ascii=True)
    if draw(st.booleans()):
        try:
            return json.dumps(frame, ensure_ascii=False).encode("utf-8") + b"\n"
        except UnicodeEncodeError:
            pass
    return text.encode() + b"\n"


junk_lines = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    st.sampled_from([b"\n", b"\r\n", b" \n", b"{\n", b"}\n", b"[]\n", b"null\n", b"0\n", b'"op"\n',
                     b"\xff\xfe{}\n", b"\xef\xbb\xbf{}\n", b'{"op":"idle"}{"op":"idle"}\n', b'{"op":"idle",}\n',
                     b'{"op":"call","id":1e3}\n', b'{"op":"call","id":' + b"1" * 5000 + b"}\n",
                     b'{"op":"idle","x":NaN}\n', b'{"op":"call","id":Infinity}\n', b'{"op":"\\ud800"}\n',
                     b'{"op":"idle","op":"nope"}\n', b'{"op":"nope","op":"idle"}\n']),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
)


@st.composite
def oversized_lines(draw):
    """A frame of about max_frame bytes: some just fit, some do not."""
    size = draw(st.integers(MAX_FRAME - 40, MAX_FRAME + 40))
    head = b'{"op":"call","id":7,"cap":"log","method":"info","args":{"msg":"'
    body = head + b"x" * max(0, size - len(head) - 4) + b'"}}'
    return body + b"\n"




@st.composite
def streams(draw, max_pieces=20):
    """Frames, with up to two junk or near-limit lines anywhere, maybe an unterminated tail."""
    parts = draw(st.lists(frame_lines(), max_size=max_pieces))
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.one_of(junk_lines, oversized_lines())))
    data = b"".join(parts)
    if draw(st.integers(0, 5)) == 0:  # an unterminated tail
        data += draw(st.one_of(st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"x")),
                               st.just(b"x" * (MAX_FRAME + 10)), st.just(b'{"op":"idle"}')))
    return data


@st.composite
def cut(draw, data: bytes):
    """`data` split at random points (empty chunks included: they must be harmless)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------------------------
# the model: what a well-behaved host does with a byte stream


def _strict_loads(line: bytes):
    def no_constants(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=no_constants)


@dataclass
class Expected:
    exact: bool = True  # False once a line might be read either way (NaN/Infinity): stop predicting
    protocol_error: bool = False
    calls: list = field(default_factory=list)  # the call frames read (int ids), in order
    result: dict | None = None
    script: bool = False
    uncaught: bool = False


def model(data: bytes, max_frame: int = MAX_FRAME) -> Expected:
    exp = Expected()
    rest = data
    while rest:
        nl = rest.find(b"\n")
        line = rest if nl < 0 else rest[:nl]
        if len(line) > max_frame or nl < 0:  # oversized, or cut off by the EOF
            exp.protocol_error = True
            return exp
        rest = rest[nl + 1:]
        try:
            frame = _strict_loads(line)
        except (ValueError, RecursionError):
            try:
                json.loads(line)
            except (ValueError, RecursionError):
                exp.protocol_error = True
                return exp
            exp.exact = False  # NaN/Infinity: accepted today; rejecting it is fine too
            return exp
        if not isinstance(frame, dict):
            exp.protocol_error = True
            return exp
        op = frame.get("op")
        if op not in KNOWN_OPS:
            exp.protocol_error = True
            return exp
        if op == "call":
            if not isinstance(frame.get("id"), int) or isinstance(frame.get("id"), bool):
                exp.protocol_error = True
                return exp
            exp.calls.append(frame)
        elif op == "result":
            if exp.result is None and not exp.script:
                exp.result = frame
        elif op == "script":
            exp.script = True
        elif op == "uncaught":
            exp.uncaught = True
    return exp


# ----------------------------------------------------------------------------------------------
# the harness


class Stats:
    def __init__(self):
        self.calls = 0
        self.now = 0
        self.peak = 0
        self.tenants: set = set()


class Tracked:
    """Wraps a real provider to count calls and calls at once (and keep them overlapping)."""

    def __init__(self, inner, stats: Stats):
        self.inner, self.stats, self.name = inner, stats, inner.name

    async def call(self, ctx, method, args):
        s = self.stats
        s.calls += 1
        s.now += 1
        s.peak = max(s.peak, s.now)
        s.tenants.add(ctx.tenant)
        try:
            for _ in range(3):
                await trio.sleep(0)
            return await self.inner.call(ctx, method, args)
        finally:
            s.now -= 1


@dataclass
class Outcome:
    session: BrokerSession
    facts: Facts
    logs: LogSink
    stats: Stats
    sent: bytes  # everything the host wrote to the jail
    hello_error: FrameError | None = None
    served: bool = False


async def drive(world: World, chunks: list[bytes], *, limits: BrokerLimits = LIMITS, hello_first: bool = False,
                transport: str = "memory", abrupt: bool = False) -> Outcome:
    """Run wait_hello (optionally) and serve() against a jail that sends `chunks`, then EOF
    (or closes abruptly without reading). Fails the test if the host raises or hangs."""
    stats = Stats()
    kv = KVCapability(world.state_dir)
    providers = {name: Tracked(p, stats) for name, p in {**default_providers(), "kv": kv}.items()}
    logs = LogSink(world.profile_a.limits.log_bytes)
    ctx = CallContext("j-fuzz", "a", world.profile_a, logs)
    facts = Facts()
    if transport == "memory":
        host, jail = trio.testing.memory_stream_pair()
    else:
        a, b = trio.socket.socketpair()
        host, jail = trio.SocketStream(a), trio.SocketStream(b)
    session = BrokerSession(host, ctx, providers, facts, limits)
    out = Outcome(session, facts, logs, stats, b"")
    received = bytearray()
    fed = trio.Event()

    async def feed() -> None:
        try:
            for chunk in chunks:
                await jail.send_all(chunk)
                await trio.sleep(0)  # let the host read a partial frame
            if abrupt:
                await jail.aclose()
            else:
                await jail.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            fed.set()

    async def read() -> None:
        try:
            while True:
                data = await jail.receive_some(65536)
                if not data:
                    return
                received.extend(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    escaped: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            if not abrupt:
                nursery.start_soon(read)
            try:
                with trio.fail_after(10):
                    if hello_first:
                        try:
                            hello = await session.wait_hello()
                            assert hello.get("op") == "hello" and facts.hello
                        except FrameError as e:
                            out.hello_error = e  # the runner's documented failure: job is `internal`
                    if out.hello_error is None:
                        await session.serve()
                        out.served = True
                    await fed.wait()
            except Exception as e:  # noqa: BLE001 - any escape is the bug under test
                escaped = e
            await host.aclose()
    finally:
        kv.close()
    if escaped is not None:
        pytest.fail(f"the host raised on jail input (or hung): {escaped!r}"[:2000])
    out.sent = bytes(received)
    return out


def check_invariants(world: World, out: Outcome, data: bytes, *, limits: BrokerLimits = LIMITS,
                     hello_first: bool = False, use_model: bool = True) -> None:
    """The properties every run must have, whatever the input."""
    s, f = out.session, out.facts
    # Replies: strict JSON reply frames with a boolean ok, never tenant b's data.
    assert B_SECRET.encode() not in out.sent
    replies = []
    for line in out.sent.split(b"\n")[:-1] if out.sent else []:
        r = _strict_loads(line)
        assert isinstance(r, dict) and r.get("op") == "reply", r
        assert isinstance(r.get("ok"), bool), r
        assert isinstance(r.get("id"), int) and not isinstance(r["id"], bool), r
        if not r["ok"]:
            err = r.get("error")
            assert isinstance(err, dict) and err.get("type") in ERROR_TYPES, r
            assert isinstance(err.get("message"), str), r
        replies.append(r)
    assert not out.sent or out.sent.endswith(b"\n")
    # Limits and bookkeeping.
    assert out.stats.calls <= limits.max_calls
    assert out.stats.peak <= limits.max_in_flight
    assert out.stats.tenants <= {"a"}
    assert s.in_flight == 0
    assert out.logs.bytes <= out.logs.max_bytes
    assert all(r["level"] in LogSink.LEVELS and isinstance(r["msg"], str) for r in out.logs.records)
    assert B_SECRET not in json.dumps(out.logs.records)
    # Facts.
    if out.served:
        assert s.result_event.is_set() and s.idle_event.is_set()
    assert f.killed_for is None and f.internal is None and f.exit_code is None
    if f.result is not None:
        assert f.result["status"] in ("ok", "error", "incomplete")
        if f.result["status"] == "error":
            assert set(f.result["error"]) == {"type", "message", "stack"}
            assert all(isinstance(v, str) and len(v) <= 16384 for v in f.result["error"].values())
    if f.uncaught is not None:
        assert set(f.uncaught) == {"type", "message", "stack"}
        assert all(isinstance(v, str) and len(v) <= 16384 for v in f.uncaught.values())
    if f.protocol_error is not None:
        assert isinstance(f.protocol_error, str) and f.protocol_error

    # Against the model (for the part of the stream the model can predict).
    if not use_model or out.hello_error is not None or not out.served:
        return
    if hello_first:  # wait_hello consumed the first line
        data = data[data.find(b"\n") + 1:]
    exp = model(data, limits.max_frame_bytes)
    if not exp.exact:
        return
    assert (f.protocol_error is not None) == exp.protocol_error, (f.protocol_error, data[:300])
    assert f.script_mode == exp.script
    assert (f.uncaught is not None) == exp.uncaught
    if exp.result is None:
        assert f.result is None
    else:
        status = exp.result.get("status")
        assert f.result["status"] == (status if status in ("ok", "error", "incomplete") else "error")
        if status == "ok":
            assert f.result["result"] == exp.result.get("result")
    # Every call read is answered exactly once, with its own id.
    assert Counter(r["id"] for r in replies) == Counter(c["id"] for c in exp.calls)
    assert s.calls == len(exp.calls)
    # Calls with a unique id: the answer matches the order of the checks.
    counts = Counter(c["id"] for c in exp.calls)
    by_id = {r["id"]: r for r in replies}
    for n, c in enumerate(exp.calls, 1):
        if counts[c["id"]] != 1:
            continue
        r = by_id[c["id"]]
        cap, method, a = c.get("cap"), c.get("method"), c.get("args", {})
        if n > limits.max_calls:
            assert r["error"]["type"] == "LimitExceeded" and "calls in one job" in r["error"]["message"], r
        elif not r["ok"] and r["error"]["type"] == "LimitExceeded":
            assert "in flight" in r["error"]["message"], r
        elif not (isinstance(cap, str) and isinstance(method, str) and isinstance(a, dict)):
            assert r["error"]["type"] == "BadCall", r
        elif cap not in ("log", "kv"):
            assert r["error"]["type"] == "CapabilityDenied", r
        elif cap == "log" and method in LogSink.LEVELS and isinstance(a.get("msg", ""), str) \
                and isinstance(a.get("fields") or {}, dict):
            assert r == {"op": "reply", "id": c["id"], "ok": True, "value": None}


async def b_data_intact(world: World) -> None:
    kv = KVCapability(world.state_dir)
    try:
        for k in B_KEYS:
            assert await kv.call(world.ctx_b, "get", {"key": k}) == {"owner": "b", "secret": B_SECRET}
    finally:
        kv.close()


# ----------------------------------------------------------------------------------------------
# properties


@FUZZ
@given(data=st.binary(max_size=3000), chunks=st.data(), hello_first=st.booleans())
@example(data=b"[" * 5000 + b"\n", chunks=None, hello_first=False)  # nesting past the recursion limit
@example(data=b'{"op":"call","id":1,"cap":"log","method":"\\ud800","args":{}}\n', chunks=None, hello_first=False)
@example(data=b"garbage\n", chunks=None, hello_first=False)
async def test_random_bytes(world, data, chunks, hello_first):
    parts = chunks.draw(cut(data)) if chunks is not None else [data]
    out = await drive(world, parts, hello_first=hello_first)
    check_invariants(world, out, data, hello_first=hello_first)


@FUZZ
@given(lines=st.lists(json_values.map(lambda v: json.dumps(v).encode() + b"\n"), max_size=10), chunks=st.data())
async def test_random_json_values(world, lines, chunks):
    data = b"".join(lines)
    out = await drive(world, chunks.draw(cut(data)))
    check_invariants(world, out, data)


@FUZZ
@given(data=streams(), chunks=st.data(), hello_first=st.booleans())
async def test_random_frames(world, data, chunks, hello_first):
    if hello_first and chunks.draw(st.booleans()):
        data = b'{"op":"hello","runtime":"python","version":"3","pid":2}\n' + data
    out = await drive(world, chunks.draw(cut(data)), hello_first=hello_first)
    check_invariants(world, out, data, hello_first=hello_first)
    await b_data_intact(world)


# Well-formed calls only (no protocol error ends the stream early): exercises the limits and the
# capability code with arbitrary arguments, including tenant b's key names.
@FUZZ
@given(calls=st.lists(well_formed_calls, max_size=30), tail=st.lists(benign_frames | bad_frames, max_size=3),
       chunks=st.data())
async def test_calls_within_limits(world, calls, tail, chunks):
    data = b"".join(json.dumps(c).encode() + b"\n" for c in calls + tail)
    out = await drive(world, chunks.draw(cut(data)))
    check_invariants(world, out, data)
    await b_data_intact(world)


@settings(FUZZ, max_examples=60)
@given(data=streams(), chunks=st.data(), abrupt=st.booleans())
async def test_real_socketpair(world, data, chunks, abrupt):
    """Over a real socket; `abrupt`: the jail closes without reading its replies (a dying jail)."""
    out = await drive(world, chunks.draw(cut(data)), transport="socket", abrupt=abrupt)
    if not abrupt:
        check_invariants(world, out, data)
    else:
        assert out.session.in_flight == 0 and out.stats.peak <= LIMITS.max_in_flight


@pytest.mark.parametrize("depth", [50, 500, 990, 1000, 1100, 5000, 100_000])
@pytest.mark.parametrize("where", ["frame", "id", "args", "fields", "kv-value", "result", "uncaught"])
async def test_deep_nesting(world, depth, where):
    """Any nesting depth inside a frame: a protocol error or a normal answer, never an exception."""
    nest = "[" * depth + "]" * depth
    line = {
        "frame": nest,
        "id": '{"op":"call","id":%s}' % nest,
        "args": '{"op":"call","id":1,"cap":"kv","method":"get","args":%s}' % nest,
        "fields": '{"op":"call","id":1,"cap":"log","method":"info","args":{"msg":"m","fields":{"f":%s}}}' % nest,
        "kv-value": '{"op":"call","id":1,"cap":"kv","method":"set","args":{"key":"deep","value":%s}}' % nest,
        "result": '{"op":"result","status":"ok","result":%s}' % nest,
        "uncaught": '{"op":"uncaught","error":{"type":%s,"message":%s}}' % (nest, nest),
    }[where].encode() + b"\n"
    limits = BrokerLimits(max_frame_bytes=1024 * 1024, max_calls=10, max_in_flight=4)
    data = line + b'{"op":"call","id":2,"cap":"log","method":"info","args":{}}\n'
    out = await drive(world, [data], limits=limits)
    # Near the recursion limit "parsable" depends on the stack depth: no model, just the invariants.
    check_invariants(world, out, data, limits=limits, use_model=False)
