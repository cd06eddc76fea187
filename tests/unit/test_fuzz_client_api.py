"""Fuzzing the daemon's client API (supervisor/server.py handle_connection + Connection).

A real `Daemon` (config from supervisor.config.load_config on a temporary file, profiles loaded by
`load_profiles` from a temporary directory) is not served: no cgroups, no listener. Its `runner` is
a FakeRunner returning canned results, because this file is about the protocol layer; real jails are
tested in tests/root. `handle_connection` runs over a real trio socketpair and `peer_of` is patched
to say the client is uid 4242, which tenant "a" allows and tenant "b" does not (not an admin).

Before the fuzzed client connects, tenant b (as uid 5555) has one job that finished (it ran a named
script holding B_MARKER) and one still running; the client never learns their ids unless it guesses.

Properties, for every byte stream:
- handle_connection returns (under fail_after) and never raises;
- every reply line is strict JSON (no NaN), an object with a boolean ok or a stream event;
- every line read gets exactly one final reply, with the request's id when the id is usable
  (null, an integer or a string of at most 128 characters), null otherwise or for a broken line;
- a line over server.max_frame (or cut off by the EOF) gets an error reply and then the connection
  closes: no later line is answered;
- never an `internal` error (that is the daemon's own bug);
- a submit for any tenant but "a" is rejected "forbidden" (unknown tenants too: no enumeration), and
  nothing sent back holds tenant b's profile digest or script, or the ids of b's jobs unless the
  client sent them; b's jobs cannot be read (status) or cancelled;
- stats show only tenant a, never the profile digests; requests in flight <= server.max_in_flight;
- nothing leaks: no connection, request or job is left behind once the client is gone.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import supervisor.server as server
from jailer.result import Result
from supervisor.auth import Peer
from supervisor.config import load_config
from supervisor.daemon import Daemon

MAX_FRAME = 8192
MAX_IN_FLIGHT = 4
PEER_A = Peer(pid=4000, uid=4242, gid=4242, groups=frozenset({4242}))
PEER_B = Peer(pid=5000, uid=5555, gid=5555, groups=frozenset({5555}))
B_MARKER = "b-script-" + secrets.token_hex(16)  # no strategy can produce it
HOLD = "hold: b's long job"  # code of b's running job
FINAL_ERROR_CODES = {"invalid_frame", "frame_too_large", "unknown_op", "too_many_in_flight", "forbidden"}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CONFIG = """
[server]
max_frame = "{max_frame}B"
max_in_flight = {max_in_flight}
[paths]
profiles = "{d}/profiles"
scripts = "{d}/scripts"
state_dir = "{d}/state"
run_dir = "{d}/run"
[jails]
concurrency = 3
"""
PROFILES = {
    "a": "[access]\nuids = [4242]\n[limits]\nconcurrency = 2\nqueue = 100\nrate = 10000\nburst = 10000\n",
    "b": "[access]\nuids = [5555]\n[runtime]\nname = \"python\"\n",
}


@dataclass
class World:
    config: object

    def __repr__(self) -> str:
        return "World()"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("client-fuzz")
    (d / "profiles").mkdir()
    for tenant, text in PROFILES.items():
        (d / "profiles" / f"{tenant}.toml").write_text(text)
    for tenant, name, text in (("a", "hello", "print('hello from a')\n"), ("b", "secret", f"# {B_MARKER}\n")):
        (d / "scripts" / tenant).mkdir(parents=True)
        (d / "scripts" / tenant / f"{name}.py").write_text(text)
    (d / "config.toml").write_text(CONFIG.format(d=d, max_frame=MAX_FRAME, max_in_flight=MAX_IN_FLIGHT))
    return World(load_config(str(d / "config.toml")))


@pytest.fixture(scope="module", autouse=True)
def client_is_uid_4242():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server, "peer_of", lambda sock: PEER_A)
        yield


class FakeRunner:
    """Stands in for jailer.runner.Runner (whose real jails are tested in tests/root): canned results.

    Output is the job's code, so a job that ran tenant b's script would show B_MARKER to the client."""

    def __init__(self):
        self.holding = trio.Event()  # b's long job is running
        self.release = trio.Event()  # ends it
        self.b_long_cancelled = False
        self.tenants_run: list[str] = []

    async def run(self, job, profile, *, cancel=None, queued_ms=0.0, on_log=None, runtime=None, jail=None) -> Result:
        assert jail is None  # no pools without serve()
        self.tenants_run.append(profile.tenant)
        if profile.tenant == "b" and job.code == HOLD:
            self.holding.set()
            await self.release.wait()
            self.b_long_cancelled = cancel is not None and cancel.is_set()
        elif job.code == "slow":
            await trio.sleep(0.002)
        else:
            await trio.sleep(0)
        record = {"ts": 0.0, "level": "info", "msg": "hi", "fields": {}}
        if on_log is not None:
            on_log(record)
        return Result(id=job.id, tenant=profile.tenant, status="ok", result={"ran": job.filename},
                      stdout=job.code.encode("utf-8", "replace").decode(), logs=[record],
                      profile_digest=profile.digest)


@dataclass
class Setup:
    daemon: Daemon
    runner: FakeRunner
    b_running: str
    b_done: str
    b_digest: str
    peak_submits: int = 0


async def start_daemon(world: World, nursery: trio.Nursery) -> Setup:
    d = Daemon(world.config)
    assert d.load_profiles() == []
    assert set(d.profiles) == {"a", "b"}
    runner = d.runner = FakeRunner()
    # Tenant b's own activity, by b's own uid, before the fuzzed client connects.
    done = await d.submit(PEER_B, {"tenant": "b", "script": "secret"})
    assert done.status == "ok" and B_MARKER in done.stdout
    nursery.start_soon(d.submit, PEER_B, {"tenant": "b", "code": HOLD, "filename": "long.py"})
    await runner.holding.wait()
    setup = Setup(d, runner, next(iter(d.jobs)), done.id, d.profiles["b"].digest)
    assert d.jobs[setup.b_running].state == "running"

    # Requests in flight, seen where they take time (a submit waits for its result).
    real_submit, now = d.submit, [0]

    async def counting_submit(*args, **kwargs):
        now[0] += 1
        setup.peak_submits = max(setup.peak_submits, now[0])
        try:
            return await real_submit(*args, **kwargs)
        finally:
            now[0] -= 1

    d.submit = counting_submit
    return setup


async def converse(world: World, chunks_for) -> tuple[Setup, bytes]:
    """One fuzzed client: sends `chunks_for(setup)` (b's job ids are known by then), then EOF, and
    reads every reply until the daemon closes the connection."""
    received = bytearray()
    escaped: BaseException | None = None
    async with trio.open_nursery() as nursery:
        setup = await start_daemon(world, nursery)
        d = setup.daemon
        chunks = chunks_for(setup)
        a, b = trio.socket.socketpair()
        host, client = trio.SocketStream(a), trio.SocketStream(b)

        async def feed() -> None:
            try:
                for chunk in chunks:
                    await client.send_all(chunk)
                    await trio.sleep(0)
                await client.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the daemon closed first (lost framing)

        async def read() -> None:
            while True:
                data = await client.receive_some(65536)
                if not data:
                    return
                received.extend(data)

        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as conv:
                    conv.start_soon(feed)
                    conv.start_soon(read)
                    await server.handle_connection(d, host)
        except Exception as e:  # noqa: BLE001 - any escape is the bug under test
            escaped = e
        await client.aclose()
        setup.runner.release.set()  # b's long job may end now
        if escaped is not None:
            pytest.fail(f"handle_connection raised on client input (or hung): {escaped!r}"[:2000])
        # Nothing of this connection is left in the daemon; b's job is untouched.
        assert not d.connections and d.active_requests == 0
        assert set(d.jobs) == {setup.b_running}
    assert not d.jobs and d.running == 0
    assert not setup.runner.b_long_cancelled, "a non-admin peer cancelled tenant b's job"
    return setup, bytes(received)


def cut(data: bytes, draw) -> list[bytes]:
    """`data` split at random points (empty chunks included)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *points, len(data)]
    return [data[x:y] for x, y in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------------------------
# the model


def _strict_loads(line: bytes):
    def no_constants(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=no_constants)


def usable_id(frame: dict):
    rid = frame.get("id")
    if rid is None or isinstance(rid, (int, str)) and not isinstance(rid, bool) and len(str(rid)) <= 128:
        return rid
    return None


@dataclass
class Line:
    frame: dict | None  # None: not an object (gets invalid_frame)
    rid: object
    ambiguous: bool = False  # NaN/Infinity: accepted today, refusing it is fine too


def model(data: bytes) -> tuple[list[Line], str | None]:
    """The lines the daemon must answer, and the code of the framing error that ends it (if any)."""
    lines: list[Line] = []
    rest = data
    while rest:
        nl = rest.find(b"\n")
        line = rest if nl < 0 else rest[:nl]
        if len(line) > MAX_FRAME:
            return lines, "frame_too_large"
        if nl < 0:
            return lines, "invalid_frame"  # cut off by the EOF
        rest = rest[nl + 1:]
        try:
            frame = _strict_loads(line)
            ambiguous = False
        except (ValueError, RecursionError):
            try:
                frame = json.loads(line)
                ambiguous = True
            except (ValueError, RecursionError):
                frame = None
                ambiguous = False
        if not isinstance(frame, dict):
            lines.append(Line(None, None))
        else:
            lines.append(Line(frame, usable_id(frame), ambiguous))
    return lines, None


def check(setup: Setup, data: bytes, sent_back: bytes, *, use_model: bool = True) -> list[dict]:
    """Every property of one conversation. Returns the replies."""
    # Tenant b's secrets never reach this client; b's job ids only when the client sent them.
    assert setup.b_digest.encode() not in sent_back
    assert B_MARKER.encode() not in sent_back
    for job_id in (setup.b_running, setup.b_done):
        assert job_id.encode() not in sent_back or job_id.encode() in data
    assert not sent_back or sent_back.endswith(b"\n")
    replies = [_strict_loads(line) for line in sent_back.split(b"\n")[:-1]]
    finals = []
    for r in replies:
        assert isinstance(r, dict) and "id" in r, r
        event = r.get("event")
        if event in ("accepted", "log"):
            assert set(r) == ({"id", "event", "job"} if event == "accepted" else {"id", "event", "job", "record"}), r
            continue
        assert event in (None, "result"), r
        assert isinstance(r.get("ok"), bool), r
        finals.append(r)
        if not r["ok"]:
            assert r["error"]["code"] in FINAL_ERROR_CODES, r
            assert isinstance(r["error"]["message"], str)
            continue
        if "result" in r:  # a submit
            res = r["result"]
            if res["tenant"] != "a":  # "?": the tenant was not a string
                reasons = ("forbidden", "bad_request") if res["tenant"] == "?" else ("forbidden",)
                assert res["status"] == "rejected" and res["reason"] in reasons, r
                assert res["profile_digest"] is None, r
        if "stats" in r:
            assert set(r["stats"]["tenants"]) <= {"a"} and "profiles" not in r["stats"], r
        if "state" in r:  # a status
            if r["job"] in (setup.b_running, setup.b_done):
                assert r == {"id": r["id"], "ok": True, "job": r["job"], "state": "unknown"}, r
    assert setup.peak_submits <= MAX_IN_FLIGHT
    assert "b" not in setup.runner.tenants_run[2:], "a job ran as tenant b for uid 4242"

    if not use_model:
        return replies
    lines, fatal = model(data)
    expected_finals = len(lines) + (fatal is not None)
    assert len(finals) == expected_finals, (len(finals), expected_finals, data[:300])
    if fatal is not None:
        assert any(not r["ok"] and r["id"] is None and r["error"]["code"] == fatal for r in finals), (fatal, finals)
    # Framing error codes: frame_too_large only for the frame that ends the connection.
    codes = Counter(r["error"]["code"] for r in finals if not r["ok"])
    assert codes["frame_too_large"] == (fatal == "frame_too_large"), (codes, fatal)
    broken = sum(1 for ln in lines if ln.frame is None) + (fatal == "invalid_frame")
    maybe_broken = sum(1 for ln in lines if ln.ambiguous)
    assert broken <= codes["invalid_frame"] <= broken + maybe_broken, (codes, broken, maybe_broken)
    # Ids: each line's own id (or null); a NaN line may be answered either way.
    got = Counter(json.dumps(r["id"]) for r in finals)
    sure = Counter(json.dumps(ln.rid) for ln in lines if not ln.ambiguous and ln.rid is not None)
    maybe = Counter(json.dumps(ln.rid) for ln in lines if ln.ambiguous and ln.rid is not None)
    for key in set(got) | set(sure):
        if key == "null":
            continue
        assert sure[key] <= got[key] <= sure[key] + maybe[key], (key, got, sure, maybe)
    # Lines with a unique id: the answer fits the request.
    counts = Counter(json.dumps(ln.rid) for ln in lines)
    by_id = {json.dumps(r["id"]): r for r in finals}
    for ln in lines:
        key = json.dumps(ln.rid)
        if ln.rid is None or ln.ambiguous or counts[key] != 1:
            continue
        r, op = by_id[key], ln.frame.get("op")
        if not r["ok"] and r["error"]["code"] == "too_many_in_flight":
            continue
        if op == "ping":
            assert r["ok"] and r["pong"] is True, r
        elif op == "submit":
            assert r["ok"], r
            tenant, res = ln.frame.get("tenant"), r["result"]
            if tenant != "a":
                reason = "forbidden" if isinstance(tenant, str) else "bad_request"
                assert (res["status"], res["reason"]) == ("rejected", reason), r
            elif res["status"] == "ok":  # a's profile, or a's with limits the request lowered
                assert res["tenant"] == "a" and res["profile_digest"].startswith("sha256:"), r
            else:
                assert res["status"] == "rejected", r
                assert res["reason"] in ("bad_request", "unknown_script", "rate_limited", "queue_full"), r
        elif op == "cancel":
            if ln.frame.get("job") == setup.b_running:
                assert not r["ok"] and r["error"]["code"] == "forbidden", r
            else:
                assert r["ok"] and r["cancelled"] is False, r  # a has no job of its own in flight
        elif op == "status":
            assert r["ok"] and r["state"] == "unknown", r
        elif op == "stats":
            assert r["ok"], r
        else:
            assert not r["ok"] and r["error"]["code"] == "unknown_op", r
    return replies


# ----------------------------------------------------------------------------------------------
# strategies

SURROGATES = ["\ud800", "a\udfffb", "\udc00\ud800"]
texts = st.one_of(st.text(max_size=12), st.text(st.characters(exclude_categories=()), max_size=6),
                  st.sampled_from(SURROGATES + ["", "\x00", "\u2028", "é" * 5, "\n"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**16, 2**16), st.integers(-2**80, 2**80),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                           max_leaves=10)

small_ids = st.integers(0, 30)
request_ids = st.one_of(
    small_ids, small_ids, small_ids, st.integers(-2**64, 2**64), texts,
    st.sampled_from([10**127, 10**128, -(10**127), 0, -1, "x" * 128, "x" * 129, "é" * 128, *SURROGATES]),
    st.text(min_size=120, max_size=140), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.lists(scalars, max_size=2), st.dictionaries(texts, scalars, max_size=2))
tenants = st.one_of(st.sampled_from(["a", "a", "b", "b", "c", "A", "b ", "../b", "b\x00", "", "default"]),
                    json_values)
B_RUNNING, B_DONE = "@b-running", "@b-done"  # replaced by the ids of b's jobs before sending
jobs = st.one_of(st.sampled_from([B_RUNNING, B_DONE]),
                 st.sampled_from([B_RUNNING, B_DONE, "j-0000000000000000", "", *SURROGATES]), json_values)
limit_values = st.one_of(st.sampled_from(["1s", "100ms", "1h", "0s", "16MiB", "1KiB", "9" * 400 + "GiB", "1e400KiB",
                                          "9" * 400 + "h", "-1s", "nans"]),
                         st.integers(-5, 2**70), json_values)
limits = st.one_of(st.dictionaries(st.sampled_from(["wall_time", "cpu_time", "memory", "pids", "tmpfs", "output", "log",
                                                    "concurrency", "rate", "x"]), limit_values, max_size=3),
                   json_values)

SUBMIT_FIELDS = {
    "code": st.one_of(st.sampled_from(["x = 1", "slow", HOLD, "é" * 3]), texts, json_values),
    "script": st.one_of(st.sampled_from(["hello", "secret", "../b/secret", "b/secret", "hello.py"]), texts),
    "filename": st.one_of(st.sampled_from(["h.py", "h.js", "h.txt", "../h.py", ".h.py", "x" * 129]), texts),
    "runtime": st.one_of(st.sampled_from(["node", "python", "java"]), json_values),
    "entry": st.one_of(st.sampled_from(["handler", "main", "1x", "a-b"]), json_values),
    "input": json_values,
    "limits": limits,
    "stream": st.one_of(st.booleans(), json_values),
}
submits = st.fixed_dictionaries({"op": st.just("submit"), "tenant": tenants},
                                optional={"id": request_ids, **SUBMIT_FIELDS})
other_requests = st.one_of(
    st.fixed_dictionaries({"op": st.sampled_from(["cancel", "status"])}, optional={"id": request_ids, "job": jobs}),
    st.fixed_dictionaries({"op": st.sampled_from(["stats", "ping"])}, optional={"id": request_ids, "x": json_values}),
    st.fixed_dictionaries({}, optional={"op": st.one_of(st.sampled_from(["bogus", "", "Submit", "PING"]),
                                                        json_values),
                                        "id": request_ids}),
    st.dictionaries(texts, json_values, max_size=3),
)
requests = st.one_of(submits, submits, other_requests)
# Submits that get past the authorization check (tenant a) or stop at it (tenant b): every field
# of the request is then validated by the daemon.
focused_submits = st.one_of(
    st.fixed_dictionaries({"op": st.just("submit"), "tenant": st.sampled_from(["a", "a", "a", "b"]),
                           "id": st.integers(0, 1000)}, optional=SUBMIT_FIELDS),
    # plausible ones, which tenant a gets to run (streamed or not)
    st.fixed_dictionaries({"op": st.just("submit"), "tenant": st.sampled_from(["a", "a", "b"]),
                           "id": st.integers(0, 1000), "code": st.sampled_from(["x = 1", "slow"]),
                           "filename": st.sampled_from(["h.py", "h.js", "h.mjs"])},
                          optional={"stream": st.booleans(), "input": json_values,
                                    "limits": st.fixed_dictionaries({}, optional={"wall_time": st.just("1s"),
                                                                                  "memory": st.just("64MiB")})}),
    st.fixed_dictionaries({"op": st.just("submit"), "tenant": st.sampled_from(["a", "b"]), "id": st.integers(0, 1000),
                           "script": st.sampled_from(["hello", "secret"])}, optional={"stream": st.booleans()}),
)


def _fill(value, ids: dict):
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@dataclass
class Request:
    """A request whose job ids are filled in once b's jobs exist."""
    frame: dict
    raw_utf8: bool

    def encode(self, ids: dict) -> bytes:
        frame = _fill(self.frame, ids)
        if self.raw_utf8:
            try:
                return json.dumps(frame, ensure_ascii=False).encode() + b"\n"
            except UnicodeEncodeError:
                pass
        return json.dumps(frame).encode() + b"\n"


request_lines = st.builds(Request, requests, st.booleans())
junk_lines = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    st.sampled_from([b"\n", b"\r\n", b"{\n", b"[]\n", b"null\n", b"\xff\xfe{}\n", b"\xef\xbb\xbf{}\n",
                     b'{"op":"ping"}{"op":"ping"}\n', b'{"op":"ping","id":1,}\n', b'{"op":"ping","id":NaN}\n',
                     b'{"op":"status","job":NaN,"id":3}\n', b'{"op":"ping","id":Infinity}\n',
                     b'{"op":"ping","id":' + b"1" * 5000 + b"}\n", b'{"op":"ping","id":"\\ud800"}\n',
                     b'{"op":"ping","id":4,"id":5}\n', b"[" * 1500 + b"\n"]),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
)


@st.composite
def oversized_lines(draw):
    size = draw(st.integers(MAX_FRAME - 20, MAX_FRAME + 20))
    head = b'{"op":"ping","id":99,"pad":"'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}\n'


@st.composite
def conversations(draw, max_lines=16):
    """A list of Request or raw bytes pieces; junk and near-limit lines anywhere, maybe a cut tail."""
    parts: list = draw(st.lists(request_lines, max_size=max_lines))
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.one_of(junk_lines, oversized_lines())))
    if draw(st.integers(0, 5)) == 0:
        parts.append(draw(st.sampled_from([b"{", b'{"op":"ping","id":1}', b"x" * (MAX_FRAME + 5)])))
    return parts


async def run_conversation(world, parts: list, cuts) -> list[dict]:
    built: dict = {}

    def chunks_for(setup: Setup) -> list[bytes]:
        ids = {B_RUNNING: setup.b_running, B_DONE: setup.b_done}
        built["data"] = b"".join(p.encode(ids) if isinstance(p, Request) else p for p in parts)
        return [built["data"]] if cuts is None else cut(built["data"], cuts.draw)

    setup, sent_back = await converse(world, chunks_for)
    return check(setup, built["data"], sent_back)


# ----------------------------------------------------------------------------------------------
# properties


@FUZZ
@given(data=st.binary(max_size=3000), cuts=st.data())
@example(data=b"[" * 5000 + b"\n", cuts=None)  # nesting past the recursion limit
@example(data=b'{"op":"ping","id":"\\ud800"}\n', cuts=None)  # an id that is not UTF-8-encodable
@example(data=b'{"op":"status","id":1,"job":NaN}\n', cuts=None)  # NaN echoed back
async def test_random_bytes(world, data, cuts):
    setup, sent_back = await converse(world, lambda _: [data] if cuts is None else cut(data, cuts.draw))
    check(setup, data, sent_back)


@FUZZ
@given(lines=st.lists(json_values.map(lambda v: json.dumps(v).encode() + b"\n"), max_size=10))
async def test_random_json_values(world, lines):
    data = b"".join(lines)
    setup, sent_back = await converse(world, lambda _: [data])
    check(setup, data, sent_back)


@FUZZ
@given(parts=conversations(), cuts=st.data())
async def test_random_requests(world, parts, cuts):
    await run_conversation(world, parts, cuts)


@FUZZ
@given(reqs=st.lists(st.builds(Request, focused_submits, st.booleans()), min_size=1, max_size=8), cuts=st.data())
@example(reqs=[Request({"op": "submit", "tenant": "a", "id": 1, "code": "\ud800"}, False)], cuts=None)
@example(reqs=[Request({"op": "submit", "tenant": "a", "id": 1, "code": "x", "limits": {"memory": "9" * 400 + "GiB"}},
                       False)], cuts=None)
async def test_submit_fields(world, reqs, cuts):
    """Every field of a submit is hostile: a reply (a result or a rejection), never an internal error."""
    await run_conversation(world, reqs, cuts)


@settings(FUZZ, max_examples=100)
@given(before=st.lists(request_lines, max_size=5), after=st.lists(request_lines, min_size=1, max_size=3),
       extra=st.integers(1, 5000), cuts=st.data())
async def test_oversized_frame_closes_the_connection(world, before, after, extra, cuts):
    """An error reply for the oversized frame, answers to what came before, nothing after, then EOF."""
    big = Request({"op": "ping", "id": "big", "pad": "x" * (MAX_FRAME + extra)}, False)
    parts = [*before, big, *after]
    await run_conversation(world, parts, cuts)  # the model expects exactly that


@pytest.mark.parametrize("line, code", [
    (b'{"op":"ping","id":' + b"1" * 5000 + b"}", "invalid_frame"),  # not JSON Python can read: not "too large"
    (b"[" * 5000, "invalid_frame"),
    (b'{"op":"ping","id":1,"x":' + b"[" * 990 + b"]" * 990 + b"}", None),  # maybe readable: either way, no crash
])
async def test_hostile_single_lines(world, line, code):
    data = line + b'\n{"op":"ping","id":"after"}\n'
    setup, sent_back = await converse(world, lambda _: [data])
    replies = check(setup, data, sent_back, use_model=code is not None)
    assert any(r.get("pong") and r["id"] == "after" for r in replies)  # the connection survived
    if code is not None:
        assert [r["error"]["code"] for r in replies if not r["ok"]] == [code]
