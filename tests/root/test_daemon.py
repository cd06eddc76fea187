"""The daemon for real: a Daemon on a temporary socket, real jails, real clients (some as other uids).

In-process daemons for the protocol and scheduling tests; a `jailer serve` subprocess for the signal
tests (SIGHUP, SIGTERM, SIGKILL). Every test checks that no cgroup and no jail process is left.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from jailer.client import AsyncClient
from supervisor.config import load_config
from supervisor.daemon import Daemon

from ..conftest import ROOT, processes_with_uid_in

pytestmark = pytest.mark.root

UID_COUNT = 32
NODE_OK = "exports.handler = async (req, m) => ({tenant: req.who, n: req.n});"
PY_OK = "def handler(request, modules):\n    return {'tenant': request['who'], 'n': request['n']}\n"

PROFILES = {
    "alpha": """
        [runtime]
        name = "node"
        [access]
        uids = [5001]
        [limits]
        wall_time = "10s"
        cpu_time = "2s"
        memory = "96MiB"
        pids = 16
        output = "256KiB"
        concurrency = 2
        queue = 50
        [capabilities.kv]
        enabled = true
        max_keys = 20
    """,
    "beta": """
        [runtime]
        name = "python"
        [limits]
        wall_time = "10s"
        concurrency = 2
        queue = 50
        [capabilities.kv]
        enabled = true
    """,
    "tiny": """
        [limits]
        wall_time = "10s"
        concurrency = 1
        queue = 1
        rate = 0.01
        burst = 3
    """,
}


def write_profiles(directory, profiles=PROFILES):
    os.makedirs(directory, exist_ok=True)
    for name, text in profiles.items():
        with open(os.path.join(directory, f"{name}.toml"), "w") as f:
            f.write(textwrap.dedent(text))


@pytest.fixture
def daemon_env(tmp_path):
    tag = f"jailer-test-{os.getpid()}-d"
    run_dir = f"/run/{tag}"
    uid_base = 800000 + (os.getpid() % 1000) * UID_COUNT
    profiles = tmp_path / "profiles"
    write_profiles(profiles)
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(textwrap.dedent(f"""
        [server]
        socket_mode = "0666"
        [paths]
        profiles = "{profiles}"
        scripts = "{tmp_path / 'scripts'}"
        state_dir = "{tmp_path / 'state'}"
        run_dir = "{run_dir}"
        [jails]
        uid_base = {uid_base}
        uid_count = {UID_COUNT}
        cgroup_parent = "{tag}"
        concurrency = 2
        [log]
        format = "text"
        level = "warning"
        [shutdown]
        drain = "5s"
    """))
    env = {"tag": tag, "run_dir": run_dir, "socket": f"{run_dir}/jailer.sock", "profiles": str(profiles),
           "config": str(cfg_path), "uid_base": uid_base, "tmp": tmp_path}
    try:
        yield env
    finally:
        left = processes_with_uid_in(uid_base, UID_COUNT)
        dirs = [os.path.join("/sys/fs/cgroup", c, tag) for c in os.listdir("/sys/fs/cgroup")
                if os.path.isdir(os.path.join("/sys/fs/cgroup", c, tag))]
        for d in dirs:  # clean up even when the test failed, then complain
            subprocess.run(["find", d, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"], capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        assert left == [], f"jail processes left behind: {left}"
        assert dirs == [], f"cgroups left behind: {dirs}"


@pytest.fixture
async def daemon(daemon_env, nursery):
    d = Daemon(load_config(daemon_env["config"]), daemon_env["config"])
    await nursery.start(d.serve)
    yield d
    await d.shutdown()


async def test_two_tenants_concurrently(daemon, daemon_env):
    async with AsyncClient.open(daemon_env["socket"]) as c:
        results = {}

        async def one(tenant, code, name, n):
            results[(tenant, n)] = await c.submit(tenant, code=code, filename=name, input={"who": tenant, "n": n})

        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(one, "alpha", NODE_OK, "h.js", i)
                n.start_soon(one, "beta", PY_OK, "h.py", i)
    assert len(results) == 8
    for (tenant, i), r in results.items():
        assert r["status"] == "ok", r
        assert r["result"] == {"tenant": tenant, "n": i} and r["tenant"] == tenant
        assert r["timings"]["queued_ms"] >= 0


HOSTILE = [
    ("exports.handler = async () => { while (true) {} };", "cpu_limit"),
    ("exports.handler = async () => { const a = []; while (true) a.push(Buffer.alloc(1 << 20, 1)); };", "memory_limit"),
    ("const fs = require('fs'), b = Buffer.alloc(1 << 16, 97); while (true) fs.writeSync(1, b);", "output_limit"),
    ("const cp = require('child_process'); exports.handler = async () => { for (let i = 0; i < 64; i++) "
     "{ try { cp.spawn('/usr/bin/sleep', ['30']); } catch (e) {} } while (true) {} };", "cpu_limit"),
    # broker abuse: ungranted capability, crafted keys aiming at beta's data, huge and bogus calls
    ("exports.handler = async (req, m) => { const out = [];"
     " for (const k of ['../beta', '../../beta.sqlite3', 'beta/secret', '%', '\\u0000x']) {"
     "  try { out.push(await m.kv.get(k)); } catch (e) { out.push(e.name); } }"
     " try { await m.secrets.get('X'); } catch (e) { out.push(e.name); }"
     " try { await m.http.fetch('http://127.0.0.1/'); } catch (e) { out.push(e.name); }"
     " try { await m.kv.set('big', 'x'.repeat(2 << 20)); } catch (e) { out.push(e.name); }"
     " try { await m.kv.set('big', 'x'.repeat(100000)); } catch (e) { out.push(e.name); }"
     " return out; };", "ok"),
]


async def test_hostile_tenant_does_not_starve_benign_one(daemon, daemon_env):
    """alpha floods hostile jobs; beta's benign jobs keep completing `ok`; the daemon stays responsive."""
    async with AsyncClient.open(daemon_env["socket"]) as c:
        # beta stores a secret value first: alpha must never see it
        await c.submit("beta", code="def handler(r, m):\n    m.kv.set('secret', 'beta-only')\n    return 1\n",
                       filename="h.py")
        hostile_results, benign, pings = [], [], []

        async def flood():
            async with trio.open_nursery() as n:
                for _ in range(2):
                    for code, expected in HOSTILE:
                        async def one(code=code, expected=expected):
                            r = await c.submit("alpha", code=code, filename="h.js")
                            hostile_results.append((expected, r))
                        n.start_soon(one)

        async def benign_loop():
            for i in range(6):
                r = await c.submit("beta", code=PY_OK, filename="h.py", input={"who": "beta", "n": i})
                benign.append(r)

        async def pinger():
            while len(benign) < 6:
                t = time.monotonic()
                await c.ping()
                pings.append(time.monotonic() - t)
                await trio.sleep(0.1)

        async with trio.open_nursery() as n:
            n.start_soon(flood)
            n.start_soon(benign_loop)
            n.start_soon(pinger)
    assert [r["status"] for r in benign] == ["ok"] * 6, [r["error"] for r in benign]
    assert [r["result"]["n"] for r in benign] == list(range(6))
    for expected, r in hostile_results:
        assert r["status"] == expected, (expected, r["status"], r["error"], r["stderr"][:300])
        if expected == "ok":
            assert "beta-only" not in json.dumps(r)
            # alpha's own (empty) namespace whatever the key; a NUL in a key is refused
            assert r["result"] == [None, None, None, None, "BadCall", "CapabilityDenied", "CapabilityDenied",
                                   "OutputTooLarge", "QuotaExceeded"]
    assert pings  # the daemon answered while under attack


async def test_unauthorised_uid_refused_authorised_uid_allowed(daemon, daemon_env):
    # A plain client in the system python (no jailer import): the protocol is all it needs.
    request = {"id": 1, "op": "submit", "tenant": "alpha", "code": NODE_OK, "filename": "h.js",
               "input": {"who": "alpha", "n": 1}}
    script = textwrap.dedent(f"""
        import json, socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({daemon_env['socket']!r})
        s.sendall(json.dumps({request!r}).encode() + b"\\n")
        r = json.loads(s.makefile().readline())["result"]
        print(json.dumps([r["status"], r["reason"]]))
    """)

    def as_uid(uid):
        p = subprocess.run(["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, user=uid,
                           group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin"}, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    denied = await trio.to_thread.run_sync(as_uid, 5000)
    allowed = await trio.to_thread.run_sync(as_uid, 5001)
    assert denied == ["rejected", "forbidden"]
    assert allowed == ["ok", None]


async def test_queue_full_and_rate_limited(daemon, daemon_env):
    slow = "import time\ndef handler(r, m):\n    time.sleep(1)\n    return 1\n"
    async with AsyncClient.open(daemon_env["socket"]) as c:
        results = []

        async def one():
            results.append(await c.submit("tiny", code=slow, filename="h.py"))

        async with trio.open_nursery() as n:
            for _ in range(3):  # burst 3: 1 runs, 1 queued, 1 over the queue
                n.start_soon(one)
                await trio.sleep(0.05)
        fourth = await c.submit("tiny", code=slow, filename="h.py")  # bucket empty (rate 0.01/s)
    statuses = sorted((r["status"], r["reason"]) for r in results)
    assert statuses == [("ok", None), ("ok", None), ("rejected", "queue_full")]
    assert (fourth["status"], fourth["reason"]) == ("rejected", "rate_limited")


async def test_cancel_running_and_queued(daemon, daemon_env):
    slow = "import time\ndef handler(r, m):\n    time.sleep(30)\n"
    async with AsyncClient.open(daemon_env["socket"]) as c:
        got = {}
        accepted = []

        async def one(key):
            async for ev in c.events({"op": "submit", "tenant": "tiny", "code": slow, "filename": "h.py",
                                      "stream": True}):
                if ev.get("event") == "accepted":
                    accepted.append(ev["job"])
                if ev.get("event") == "result":
                    got[key] = ev["result"]

        async with trio.open_nursery() as n:
            n.start_soon(one, "first")
            await trio.sleep(0.5)
            n.start_soon(one, "second")  # tiny runs one at a time: this one is queued
            await trio.sleep(0.3)
            assert len(accepted) == 2
            st = await c.status(accepted[1])
            assert st["state"] == "queued"
            assert await c.cancel(accepted[1]) is True
            assert await c.cancel(accepted[0]) is True
    assert got["first"]["status"] == "cancelled"
    assert got["second"]["status"] == "cancelled"


async def test_protocol_errors_are_replies_not_crashes(daemon, daemon_env):
    with trio.fail_after(30):
        stream = await trio.open_unix_socket(daemon_env["socket"])
        await stream.send_all(b'not json\n{"id": 7, "op": "bogus"}\n[1,2]\n{"id": 8, "op": "submit"}\n'
                              b'{"id": 9, "op": "ping"}\n')
        data = b""
        while data.count(b"\n") < 5:
            data += await stream.receive_some(65536)
        replies = [json.loads(x) for x in data.splitlines()]
        codes = sorted((r.get("id") or 0, r["ok"], (r.get("error") or {}).get("code") or r.get("result", {}).get("reason"))
                       for r in replies)
        assert codes == [(0, False, "invalid_frame"), (0, False, "invalid_frame"), (7, False, "unknown_op"),
                         (8, True, "bad_request"), (9, True, None)]
        # an oversized frame loses the framing: error reply, then the connection closes
        try:
            await stream.send_all(b"x" * (5 * 1024 * 1024))
        except trio.BrokenResourceError:
            pass  # the daemon may close before we finish sending
        tail = b""
        with trio.move_on_after(10):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                tail += chunk
        assert b"frame_too_large" in tail
        await stream.aclose()
        async with AsyncClient.open(daemon_env["socket"]) as c:  # everyone else is still served
            assert (await c.ping())["pong"] is True


async def test_kv_isolation_between_tenants(daemon, daemon_env):
    async with AsyncClient.open(daemon_env["socket"]) as c:
        a = await c.submit("alpha", code="exports.handler = async (r, m) => { await m.kv.set('k', 'from-alpha');"
                                         " return await m.kv.get('k'); };", filename="h.js")
        b = await c.submit("beta", code="def handler(r, m):\n    before = m.kv.get('k')\n    m.kv.set('k', 'from-beta')\n"
                                        "    return [before, m.kv.get('k'), m.kv.list('')]\n", filename="h.py")
        a2 = await c.submit("alpha", code="exports.handler = async (r, m) => m.kv.get('k');", filename="h.js")
    assert (a["status"], a["result"]) == ("ok", "from-alpha")
    assert (b["status"], b["result"]) == ("ok", [None, "from-beta", ["k"]])
    assert (a2["status"], a2["result"]) == ("ok", "from-alpha")


# --- signals: a real `jailer serve` process ---------------------------------------------------------

def start_serve(env):
    log = open(os.path.join(env["tmp"], "serve.log"), "ab")
    p = subprocess.Popen([sys.executable, "-m", "jailer.cli", "serve", "--config", env["config"]], cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT)
    import socket
    for _ in range(400):  # ready = answers a ping (a stale socket file of a killed daemon may exist)
        if p.poll() is not None:
            break
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(env["socket"])
                s.sendall(b'{"id": 0, "op": "ping"}\n')
                if b'"pong"' in s.makefile("rb").readline():
                    return p
        except OSError:
            pass
        time.sleep(0.05)
    p.kill()
    raise AssertionError(open(os.path.join(env["tmp"], "serve.log")).read())


def reap_our_orphans():
    """Earlier in-process daemons made this test process a child subreaper, so the killed daemon's
    orphaned jail processes are reparented to us: reap them (only our own children, by pid)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        pid, stat = line.split()
        if stat.startswith("Z"):
            try:
                os.waitpid(int(pid), os.WNOHANG)
            except ChildProcessError:
                pass


def stop(p):
    if p.poll() is None:
        p.kill()
    p.wait()


async def test_sighup_keeps_last_good_profile(daemon_env):
    p = start_serve(daemon_env)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            before = (await c.stats())["profiles"]["beta"]
            with open(os.path.join(daemon_env["profiles"], "beta.toml"), "a") as f:
                f.write("\n[limitz]\nbroken = true\n")
            with open(os.path.join(daemon_env["profiles"], "gamma.toml"), "w") as f:
                f.write('[limits]\nwall_time = "3s"\n')
            p.send_signal(signal.SIGHUP)
            for _ in range(100):
                stats = await c.stats()
                if "gamma" in stats["profiles"]:
                    break
                await trio.sleep(0.05)
            assert stats["profiles"]["beta"] == before  # broken file: old version kept
            assert "gamma" in stats["profiles"]  # good new file: loaded
            r = await c.submit("beta", code=PY_OK, filename="h.py", input={"who": "beta", "n": 1})
            assert r["status"] == "ok" and r["profile_digest"] == before
    finally:
        p.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(p.wait)
    log = open(os.path.join(daemon_env["tmp"], "serve.log")).read()
    assert "limitz: unknown section" in log


async def test_sigterm_drains_running_jobs(daemon_env):
    p = start_serve(daemon_env)
    code = "import time\ndef handler(r, m):\n    time.sleep(1)\n    return 'drained'\n"
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            async with trio.open_nursery() as n:
                out = []

                async def one():
                    out.append(await c.submit("beta", code=code, filename="h.py"))

                n.start_soon(one)
                await trio.sleep(0.4)
                p.send_signal(signal.SIGTERM)
        assert out[0]["status"] == "ok" and out[0]["result"] == "drained"
        assert await trio.to_thread.run_sync(lambda: p.wait(timeout=20)) == 0
        assert not os.path.exists(daemon_env["socket"])
    finally:
        stop(p)


async def test_sigkill_leaves_no_jail_and_restart_is_clean(daemon_env):
    p = start_serve(daemon_env)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            async with trio.open_nursery() as n:
                n.start_soon(functools.partial(c.submit, "beta", code="while True:\n    pass\n", filename="h.py"))
                for _ in range(100):
                    if processes_with_uid_in(daemon_env["uid_base"], UID_COUNT):
                        break
                    await trio.sleep(0.05)
                assert processes_with_uid_in(daemon_env["uid_base"], UID_COUNT), "the job never started"
                p.kill()
                n.cancel_scope.cancel()
        p.wait()
        for _ in range(100):  # die-with-parent: the jail goes with the daemon
            reap_our_orphans()
            if not processes_with_uid_in(daemon_env["uid_base"], UID_COUNT):
                break
            await trio.sleep(0.05)
        assert processes_with_uid_in(daemon_env["uid_base"], UID_COUNT) == [] or \
            all("Z" in row[2] for row in processes_with_uid_in(daemon_env["uid_base"], UID_COUNT))
        p = start_serve(daemon_env)  # stale socket and stale cgroups are cleaned up
        async with AsyncClient.open(daemon_env["socket"]) as c:
            r = await c.submit("beta", code=PY_OK, filename="h.py", input={"who": "beta", "n": 2})
            assert r["status"] == "ok"
    finally:
        p.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(p.wait)
    for _ in range(100):  # zombies of the SIGKILLed daemon's jails are reaped by init
        if not processes_with_uid_in(daemon_env["uid_base"], UID_COUNT):
            break
        await trio.sleep(0.05)


async def test_connections_beyond_max_connections_get_an_error_and_the_rest_are_served(daemon_env, nursery):
    import socket as pysocket
    text = open(daemon_env["config"]).read().replace('socket_mode = "0666"', 'socket_mode = "0666"\nmax_connections = 2')
    with open(daemon_env["config"], "w") as f:
        f.write(text)
    d = Daemon(load_config(daemon_env["config"]), daemon_env["config"])
    await nursery.start(d.serve)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as a, AsyncClient.open(daemon_env["socket"]) as b:
            await a.ping()
            await b.ping()

            def third():
                with pysocket.socket(pysocket.AF_UNIX) as s:
                    s.settimeout(10)
                    s.connect(daemon_env["socket"])
                    f = s.makefile("rb")
                    return json.loads(f.readline()), f.readline()

            refused, after = await trio.to_thread.run_sync(third)
            assert refused["ok"] is False and refused["error"]["code"] == "too_many_connections", refused
            assert after == b""  # closed
            r = await a.submit("beta", code=PY_OK, filename="h.py", input={"who": "beta", "n": 1})
            assert r["status"] == "ok"  # those already connected are served as before
        with trio.fail_after(5):
            while d.connections:
                await trio.sleep(0.01)
        async with AsyncClient.open(daemon_env["socket"]) as c:  # room again
            assert (await c.ping())["pong"] is True
    finally:
        await d.shutdown()
