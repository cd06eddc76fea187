"""Warm pools for real: pooled jails are real bwrap jails started ahead of their job.

What must hold: a pooled job gets a jail that never ran anything; one tenant's secrets never reach
another's pooled jail; a reload retires the jails built under the old profile; an empty pool falls
back to a cold start; SIGTERM and SIGKILL leave no pooled jail behind. The daemon_env fixture checks
after every test that no cgroup and no jail process is left.
"""

import os
import signal
import textwrap

import pytest
import trio

from jailer.client import AsyncClient
from supervisor.config import load_config
from supervisor.daemon import Daemon

from ..conftest import processes_with_uid_in
from .test_daemon import UID_COUNT, daemon_env, reap_our_orphans, start_serve, stop  # noqa: F401

pytestmark = pytest.mark.root

# Looks for what an earlier job would have left: a file in /tmp, a global, a child process.
NODE_PROBE = """
const fs = require('fs');
exports.handler = async (req) => {
  const seen = fs.existsSync('/tmp/marker') ? fs.readFileSync('/tmp/marker', 'utf8') : null;
  fs.writeFileSync('/tmp/marker', req.n + '');
  globalThis.__jobs = (globalThis.__jobs || 0) + 1;
  return {seen, jobs: globalThis.__jobs, pids: fs.readdirSync('/proc').filter(p => /^\\d+$/.test(p)).length};
};
"""
PY_PROBE = """
import os, builtins
def handler(request, modules):
    seen = open('/tmp/marker').read() if os.path.exists('/tmp/marker') else None
    with open('/tmp/marker', 'w') as f:
        f.write(str(request['n']))
    builtins.__jobs = getattr(builtins, '__jobs', 0) + 1
    return {'seen': seen, 'jobs': builtins.__jobs, 'pids': len([p for p in os.listdir('/proc') if p.isdigit()])}
"""

POOLED = """
    [limits]
    wall_time = "10s"
    concurrency = 2
    queue = 50
    [pool]
    min = {min}
    max = {max}
    idle = "60s"
"""


def add_profile(env, name, text):
    with open(os.path.join(env["profiles"], f"{name}.toml"), "w") as f:
        f.write(textwrap.dedent(text))


async def wait_warm(c, key, n, timeout=30):
    """Until pool `key` has at least n warm jails; returns its stats."""
    with trio.fail_after(timeout):
        while True:
            p = (await c.stats())["pools"].get(key)
            if p is not None and p["warm"] >= n:
                return p
            await trio.sleep(0.02)


@pytest.fixture
async def pooled(daemon_env, nursery):
    add_profile(daemon_env, "warm", POOLED.format(min=2, max=3))
    d = Daemon(load_config(daemon_env["config"]), daemon_env["config"])
    await nursery.start(d.serve)
    yield d
    await d.shutdown()


@pytest.mark.parametrize("runtime,code,filename", [("node", NODE_PROBE, "h.js"), ("python", PY_PROBE, "h.py")])
async def test_pooled_job_gets_a_jail_that_never_ran_anything(pooled, daemon_env, runtime, code, filename):
    async with AsyncClient.open(daemon_env["socket"]) as c:
        before = await wait_warm(c, f"warm/{runtime}", 2)
        results = []
        for n in range(6):
            await wait_warm(c, f"warm/{runtime}", 1)  # pooled, not a cold fallback
            results.append(await c.submit("warm", code=code, filename=filename, input={"n": n}))
        after = (await c.stats())["pools"][f"warm/{runtime}"]
    for r in results:
        assert r["status"] == "ok", r
        assert r["timings"]["warm"] is True
        assert r["result"]["seen"] is None, "a pooled jail saw an earlier job's /tmp"
        assert r["result"]["jobs"] == 1, "a pooled jail's runtime ran an earlier job"
    assert after["hits"] - before["hits"] == 6 and after["misses"] == before["misses"]
    assert after["taken"] == 0


async def test_secrets_of_one_tenant_never_reach_another_tenants_pooled_jail(daemon_env, nursery, tmp_path):
    secret = tmp_path / "a-token"
    secret.write_text("A-SECRET-0123456789\n")
    add_profile(daemon_env, "sa", POOLED.format(min=1, max=1) + f'[capabilities.secrets]\nTOKEN = {{ file = "{secret}" }}\n')
    add_profile(daemon_env, "sb", POOLED.format(min=1, max=1))
    probe = """
const fs = require('fs');
exports.handler = async (req, m) => {
  let got; try { got = await m.secrets.get('TOKEN'); } catch (e) { got = e.name; }
  const env = JSON.stringify(process.env) + fs.readFileSync('/proc/self/environ', 'latin1')
    + fs.readFileSync('/proc/1/environ', 'latin1') + fs.readFileSync('/proc/self/cmdline', 'latin1');
  return {got, leaked: env.includes('A-SECRET')};
};
"""
    d = Daemon(load_config(daemon_env["config"]), daemon_env["config"])
    await nursery.start(d.serve)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            await wait_warm(c, "sb/node", 1)
            await wait_warm(c, "sa/node", 1)
            rb = await c.submit("sb", code=probe, filename="h.js")
            ra = await c.submit("sa", code=probe, filename="h.js")
    finally:
        await d.shutdown()
    assert rb["status"] == "ok" and rb["timings"]["warm"], rb
    assert rb["result"] == {"got": "CapabilityDenied", "leaked": False}
    # The same probe in tenant a's own pooled jail gets the value, over the broker, with the job.
    assert ra["status"] == "ok" and ra["timings"]["warm"], ra
    assert ra["result"] == {"got": "A-SECRET-0123456789", "leaked": False}


async def test_reload_retires_jails_built_under_the_old_profile(pooled, daemon_env):
    d = pooled
    async with AsyncClient.open(daemon_env["socket"]) as c:
        await wait_warm(c, "warm/python", 2)
        old_digest = d.profiles["warm"].digest
        old = list(d.pools.pools[("warm", "python")].ready)
        assert old and all(j.profile.digest == old_digest for j in old)
        add_profile(daemon_env, "warm", POOLED.format(min=2, max=3).replace('"10s"', '"9s"'))
        d.reload()
        new_digest = d.profiles["warm"].digest
        assert new_digest != old_digest
        assert all(j.retired for j in old)  # at once: none of them can be taken any more
        await wait_warm(c, "warm/python", 2)
        assert all(j.profile.digest == new_digest for j in d.pools.pools[("warm", "python")].ready)
        r = await c.submit("warm", code=PY_PROBE, filename="h.py", input={"n": 1})
        assert r["status"] == "ok" and r["timings"]["warm"] and r["profile_digest"] == new_digest, r
        with trio.fail_after(10):  # and they are really gone: cgroups removed, processes dead
            while any(j.cg is not None and not all(not os.path.exists(p) for p in j.cg.paths) for j in old):
                await trio.sleep(0.02)
        assert all(j.proc.returncode is not None for j in old)
        assert (await c.stats())["pools"]["warm/python"]["retired"] >= 2


async def test_empty_pool_falls_back_to_cold_and_grows(daemon_env, nursery):
    add_profile(daemon_env, "warm", POOLED.format(min=1, max=2))
    d = Daemon(load_config(daemon_env["config"]), daemon_env["config"])
    await nursery.start(d.serve)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            await wait_warm(c, "warm/python", 1)
            out = []

            async def one(n):
                out.append(await c.submit("warm", code=PY_PROBE, filename="h.py", input={"n": n}))

            async with trio.open_nursery() as n:  # two at once, one warm jail: one runs cold
                n.start_soon(one, 1)
                n.start_soon(one, 2)
            assert sorted(r["timings"]["warm"] for r in out) == [False, True], [r["timings"] for r in out]
            assert all(r["status"] == "ok" and r["result"]["seen"] is None for r in out), out
            # The miss widened the pool toward max.
            stats = await wait_warm(c, "warm/python", 2)
            assert stats["misses"] == 1 and stats["cold_fallbacks"] == 1 and stats["target"] == 2
            # A request lowering a limit the jail is built with (memory) cannot take a warm jail...
            r = await c.submit("warm", code=PY_PROBE, filename="h.py", input={"n": 3}, limits={"memory": "64MiB"})
            assert r["status"] == "ok" and r["timings"]["warm"] is False
            # ...one lowering a limit the host enforces (wall time) can.
            r = await c.submit("warm", code=PY_PROBE, filename="h.py", input={"n": 4}, limits={"wall_time": "5s"})
            assert r["status"] == "ok" and r["timings"]["warm"] is True
            stats = (await c.stats())["pools"]["warm/python"]
            assert stats["cold_fallbacks"] == 2 and stats["misses"] == 1
            text = d.metrics.registry.render()  # the same counters for Prometheus
            assert 'jailer_pool_events_total{tenant="warm",runtime="python",event="misses"} 1' in text
            assert 'jailer_pool_events_total{tenant="warm",runtime="python",event="hits"} 2' in text
            assert 'jailer_pool_jails{tenant="warm",runtime="python",state="warm"}' in text
    finally:
        await d.shutdown()


async def test_warm_jail_still_enforces_the_limits(pooled, daemon_env):
    """Pre-started does not mean pre-trusted: wall, CPU and memory verdicts as in a cold jail."""
    async with AsyncClient.open(daemon_env["socket"]) as c:
        res = {}
        for name, code, limits in [
            ("cpu", "def handler(r, m):\n    while True:\n        pass\n", {"cpu_time": "300ms"}),
            ("wall", "import time\ndef handler(r, m):\n    time.sleep(30)\n", {"wall_time": "300ms"}),
        ]:
            await wait_warm(c, "warm/python", 1)
            res[name] = await c.submit("warm", code=code, filename="h.py", limits=limits)
    assert res["cpu"]["status"] == "cpu_limit" and res["cpu"]["timings"]["warm"], res["cpu"]
    assert res["wall"]["status"] == "timeout" and res["wall"]["timings"]["warm"], res["wall"]
    assert res["cpu"]["exit"]["signal"] == 9 and res["wall"]["exit"]["signal"] == 9  # the host's kill


def _cgroup_jails(tag):
    out = []
    for ctrl in os.listdir("/sys/fs/cgroup"):
        d = os.path.join("/sys/fs/cgroup", ctrl, tag)
        if os.path.isdir(d):
            out += [n for n in os.listdir(d) if n.startswith("w-")]
    return out


async def test_sigterm_and_sigkill_leave_no_pooled_jail(daemon_env):
    add_profile(daemon_env, "warm", POOLED.format(min=2, max=2))
    p = start_serve(daemon_env)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            await wait_warm(c, "warm/node", 2)
            await wait_warm(c, "warm/python", 2)
        assert len(processes_with_uid_in(daemon_env["uid_base"], UID_COUNT)) >= 4
        assert _cgroup_jails(daemon_env["tag"])
        p.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: p.wait(timeout=20)) == 0
        assert processes_with_uid_in(daemon_env["uid_base"], UID_COUNT) == []
        assert _cgroup_jails(daemon_env["tag"]) == []

        p = start_serve(daemon_env)
        async with AsyncClient.open(daemon_env["socket"]) as c:
            await wait_warm(c, "warm/node", 2)
            await wait_warm(c, "warm/python", 2)
        p.kill()  # SIGKILL: no cleanup code runs; die-with-parent takes the jails down
        p.wait()
        with trio.fail_after(10):
            while True:
                reap_our_orphans()
                left = [row for row in processes_with_uid_in(daemon_env["uid_base"], UID_COUNT) if "Z" not in row[2]]
                if not left:
                    break
                await trio.sleep(0.05)
        p = start_serve(daemon_env)  # the killed daemon's cgroups are removed at start
        async with AsyncClient.open(daemon_env["socket"]) as c:
            await wait_warm(c, "warm/python", 2)
            r = await c.submit("warm", code=PY_PROBE, filename="h.py", input={"n": 1})
            assert r["status"] == "ok" and r["timings"]["warm"], r
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: p.wait(timeout=20))
        stop(p)
    with trio.fail_after(10):
        while processes_with_uid_in(daemon_env["uid_base"], UID_COUNT):
            reap_our_orphans()
            await trio.sleep(0.05)
    assert _cgroup_jails(daemon_env["tag"]) == []


async def test_pool_stats_only_show_the_tenants_a_client_may_act_for(daemon_env, nursery):
    """uid 5001 may act for alpha only: it sees alpha's pool, not warm's (root sees both)."""
    import json
    import subprocess

    add_profile(daemon_env, "alpha", POOLED.format(min=1, max=1).replace("[limits]", '[runtime]\nname = "node"\n'
                                                                          '[access]\nuids = [5001]\n[limits]'))
    add_profile(daemon_env, "warm", POOLED.format(min=1, max=1))
    d = Daemon(load_config(daemon_env["config"]), daemon_env["config"])
    await nursery.start(d.serve)
    script = textwrap.dedent(f"""
        import json, socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({daemon_env['socket']!r})
        s.sendall(b'{{"id": 1, "op": "stats"}}\\n')
        print(json.dumps(sorted(json.loads(s.makefile().readline())["stats"]["pools"])))
    """)
    try:
        async with AsyncClient.open(daemon_env["socket"]) as c:
            await wait_warm(c, "alpha/node", 1)
            assert {"alpha/node", "warm/node", "warm/python"} <= set((await c.stats())["pools"])
        p = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, user=5001, group=5001,
            extra_groups=[], env={"PATH": "/usr/bin:/bin"}, timeout=60))
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == ["alpha/node"]
    finally:
        await d.shutdown()
