"""Pool sizing and bookkeeping (supervisor.pool) on a fake clock, with stand-in jails.

FakeJail stands in for jailer.runner.Jail (real pooled jails are tested in tests/root/test_pool.py):
it "boots" in 30 ms of fake time, or fails to, and records whether it was retired.
"""

import dataclasses

import pytest
import trio

from jailer.profile import _build, builtin_defaults, parse_file
from supervisor.pool import Pools, warm_compatible


class FakeFacts:
    internal = None


class FakeJail:
    def __init__(self, runner, profile, runtime):
        self.profile, self.runtime, self.name = profile, runtime, f"w-{len(runner.made)}"
        self.state, self.fail, self.facts, self.on_dead = "new", None, FakeFacts(), None
        self._done = trio.Event()
        self.runner = runner

    @property
    def retired(self):
        return self._done.is_set()

    def retire(self):
        if self.state in ("new", "booting", "ready"):
            self.state = "dead"
        self._done.set()

    async def life(self, *, task_status=trio.TASK_STATUS_IGNORED):
        self.state = "booting"
        self.runner.booting_now += 1
        self.runner.peak_booting = max(self.runner.peak_booting, self.runner.booting_now)
        await trio.sleep(0.03)
        self.runner.booting_now -= 1
        if self.runner.fail_boots:
            self.fail = ("profile_path_missing", "/srv/x does not exist")
        if self.state != "dead":
            self.state = "failed" if self.fail else "ready"
        task_status.started()
        await self._done.wait()
        self.runner.destroyed.append(self)


class FakeRunner:
    def __init__(self):
        self.background = None
        self.made: list[FakeJail] = []
        self.destroyed: list[FakeJail] = []
        self.fail_boots = False
        self.booting_now = self.peak_booting = 0

    def jail(self, profile, runtime, *, warm=False):
        assert warm
        j = FakeJail(self, profile, runtime)
        self.made.append(j)
        return j


def prof(tenant, text):
    return _build(tenant, parse_file(f"{tenant}.toml", text), (f"{tenant}.toml",))


@pytest.fixture
async def pools(nursery, autojump_clock):
    runner = FakeRunner()
    p = Pools(runner, max_total=64, boot_parallel=2)
    await nursery.start(p.run)
    p.runner_fake = runner
    yield p
    p.close()


async def settle():
    await trio.sleep(1)  # fake time: every boot (30 ms each, 2 at once) is done


async def test_min_is_filled_per_runtime_and_take_hands_out_each_jail_once(pools, autojump_clock):
    a = prof("a", '[pool]\nmin = 3\nmax = 5\n')  # runtime auto: a node and a python pool
    pools.configure({"a": a})
    await settle()
    s = pools.statistics()
    assert (s["a/node"].warm, s["a/python"].warm) == (3, 3)
    assert pools.runner_fake.peak_booting <= 2  # boots are throttled
    taken = [pools.take(a, "node") for _ in range(3)]
    assert len({id(j) for j in taken}) == 3 and all(j.state == "ready" for j in taken)
    s = pools.statistics()["a/node"]
    assert (s.hits, s.taken, s.misses) == (3, 3, 0)
    await settle()
    assert pools.statistics()["a/node"].warm == 3  # replaced
    for j in taken:
        pools.finished(j)
    assert pools.statistics()["a/node"].taken == 0


async def test_miss_grows_target_to_max_and_idle_shrinks_it_back(pools, autojump_clock):
    a = prof("a", '[runtime]\nname = "python"\n[pool]\nmin = 1\nmax = 3\nidle = "10s"\n')
    pools.configure({"a": a})
    await settle()
    for _ in range(4):  # drain faster than the refill: the 2nd..4th find it empty
        pools.take(a, "python")
    s = pools.statistics()["a/python"]
    assert s.misses == 3 and s.cold_fallbacks == 3 and s.target == 3  # capped at max
    await settle()
    assert pools.statistics()["a/python"].warm == 3
    await trio.sleep(11)  # pool.idle without a take
    s = pools.statistics()["a/python"]
    assert s.target == 1 and s.warm == 1 and s.retired == 2


async def test_total_cap_is_shared_round_robin(nursery, autojump_clock):
    runner = FakeRunner()
    p = Pools(runner, max_total=3)
    await nursery.start(p.run)
    profiles = {t: prof(t, '[runtime]\nname = "node"\n[pool]\nmin = 4\nmax = 4\n') for t in ("a", "b")}
    p.configure(profiles)
    await settle()
    s = p.statistics()
    assert s["a/node"].warm + s["b/node"].warm == 3 and min(s["a/node"].warm, s["b/node"].warm) >= 1
    p.close()


async def test_failing_boots_back_off_instead_of_looping(pools, autojump_clock):
    pools.runner_fake.fail_boots = True
    a = prof("a", '[runtime]\nname = "node"\n[pool]\nmin = 2\nmax = 2\n')
    pools.configure({"a": a})
    await trio.sleep(60)
    s = pools.statistics()["a/node"]
    # 0.5 s doubling to 60 s: a handful of attempts in a minute, not thousands.
    assert 2 <= s.boot_failures <= 16, s
    assert s.last_error == "/srv/x does not exist" and s.warm == 0
    assert pools.take(a, "node") is None
    pools.runner_fake.fail_boots = False
    pools.configure({"a": prof("a", '[runtime]\nname = "node"\n[pool]\nmin = 2\nmax = 3\n')})  # fixed: retry now
    await settle()
    assert pools.statistics()["a/node"].warm == 2 and pools.statistics()["a/node"].last_error is None


async def test_reload_retires_old_jails_and_keeps_counters(pools, autojump_clock):
    a = prof("a", '[runtime]\nname = "node"\n[pool]\nmin = 2\nmax = 2\n')
    pools.configure({"a": a})
    await settle()
    old = list(pools.pools[("a", "node")].ready)
    pools.take(a, "node")
    pools.configure({"a": a})  # unchanged: nothing retired
    assert not any(j.retired for j in pools.pools[("a", "node")].ready)
    a2 = prof("a", '[runtime]\nname = "node"\n[limits]\nmemory = "96MiB"\n[pool]\nmin = 2\nmax = 2\n')
    pools.configure({"a": a2})
    assert all(j.retired for j in old[1:])
    await settle()
    ready = pools.pools[("a", "node")].ready
    assert len(ready) == 2 and all(j.profile is a2 for j in ready)
    assert pools.take(a, "node") is None  # a job admitted under the old profile: not these jails
    pools.configure({})  # tenant removed: pool emptied, counters kept
    await settle()
    s = pools.statistics()["a/node"]
    assert s.warm == 0 and s.hits == 1 and s.max == 0


async def test_close_retires_everything_and_stops_refilling(pools, autojump_clock):
    a = prof("a", '[pool]\nmin = 2\nmax = 2\n')
    pools.configure({"a": a})
    await settle()
    pools.close()
    await settle()
    assert all(j.retired for j in pools.runner_fake.made)
    assert pools.total() == 0 and pools.take(a, "node") is None


def test_warm_compatible():
    base = builtin_defaults()
    assert warm_compatible(base, base)
    lowered_wall = dataclasses.replace(base, limits=dataclasses.replace(base.limits, wall_time_s=1.0, cpu_time_s=0.5,
                                                                        output_bytes=1024, log_bytes=1024))
    assert warm_compatible(base, lowered_wall)
    for change in ({"memory_bytes": 32 << 20}, {"pids": 4}, {"tmpfs_bytes": 1 << 20}):
        assert not warm_compatible(base, dataclasses.replace(base, limits=dataclasses.replace(base.limits, **change)))


async def test_lowering_the_total_cap_retires_from_the_fullest_pool(pools, autojump_clock):
    a = prof("a", '[runtime]\nname = "node"\n[pool]\nmin = 4\nmax = 4\n')
    b = prof("b", '[runtime]\nname = "node"\n[pool]\nmin = 2\nmax = 2\n')
    pools.configure({"a": a, "b": b})
    await settle()
    pools.max_total = 4  # a reload of the daemon config
    pools.wake()
    await settle()
    s = pools.statistics()
    assert (s["a/node"].warm, s["b/node"].warm) == (2, 2) and s["a/node"].retired == 2


async def test_replacement_waits_for_the_job_unless_the_pool_runs_low(pools, autojump_clock):
    a = prof("a", '[runtime]\nname = "node"\n[pool]\nmin = 4\nmax = 4\n')
    pools.configure({"a": a})
    await settle()
    made = len(pools.runner_fake.made)
    j1 = pools.take(a, "node")  # 3 of 4 still warm: the replacement waits for j1's job
    await settle()
    assert len(pools.runner_fake.made) == made and pools.statistics()["a/node"].warm == 3
    pools.finished(j1)
    await settle()
    assert len(pools.runner_fake.made) == made + 1 and pools.statistics()["a/node"].warm == 4
    taken = [pools.take(a, "node") for _ in range(3)]  # a burst: 1 of 4 left, refill at once
    await settle()
    assert pools.statistics()["a/node"].warm == 4 and pools.statistics()["a/node"].taken == 3
    for j in taken:
        pools.finished(j)
