"""Warm pools: jails started ahead of their job, each used for exactly one job.

A warm jail is complete (namespaces, cgroup attached, seccomp, runtime started, shim connected and
pinged once) and waits on its broker socket; nothing tenant-specific beyond the profile it was
built from is in it. Secrets and per-job data arrive only with the job. Taking a jail hands it to
exactly one job; its replacement starts when that job ends, or at once when less than half the
pool is warm (see _missing); the used jail is destroyed after the job.

One pool per (tenant, runtime): a profile with `runtime.name = "auto"` has a node and a python
pool, each sized by its `[pool]` section. Sizing:
  target starts at pool.min; a job that finds the pool empty runs cold and grows the target by one
  (up to pool.max), so bursts widen the pool; after pool.idle without a take it shrinks back to
  min. The daemon's `jails.pool_max` caps warm + starting jails over all pools.
A reload that changes a profile retires its warm jails (and those still booting under the old
policy): nothing warm ever runs under an old profile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from dataclasses import dataclass

import trio

from jailer.profile import Profile
from jailer.runner import Jail, Runner

log = logging.getLogger("jailer.pool")

BACKOFF_MIN_S = 0.5  # after a failed boot, the pool waits before the next one, doubling...
BACKOFF_MAX_S = 60.0  # ...up to this: a broken profile must not become a fork loop
# Limits a single request may lower without changing how the jail is built (the host enforces
# them, not the jail's construction): such a job can still take a warm jail.
HOST_ENFORCED = ("wall_time_s", "cpu_time_s", "output_bytes", "log_bytes")


def runtimes_of(profile: Profile) -> tuple[str, ...]:
    return ("node", "python") if profile.runtime.name == "auto" else (profile.runtime.name,)


def warm_compatible(built: Profile, job: Profile) -> bool:
    """Can a jail built from `built` run a job whose effective profile is `job`?"""
    if job is built:
        return True
    same = {a: getattr(built.limits, a) for a in HOST_ENFORCED}
    return dataclasses.replace(job, limits=dataclasses.replace(job.limits, **same)) == built


@dataclass
class PoolStats:
    tenant: str
    runtime: str
    min: int
    max: int
    target: int  # warm jails wanted now (min <= target <= max)
    warm: int  # ready, waiting for a job
    starting: int  # booting
    taken: int  # running a job now
    hits: int  # jobs that got a warm jail
    misses: int  # jobs that found the pool empty (ran cold)
    cold_fallbacks: int  # jobs of this pool that ran cold for any reason (misses + per-request limits)
    boot_failures: int
    retired: int  # warm jails destroyed unused (reload, idle, died, shutdown)
    last_error: str | None


class Pool:
    def __init__(self, tenant: str, runtime: str, profile: Profile):
        self.tenant, self.runtime = tenant, runtime
        self.profile = profile
        self.ready: deque[Jail] = deque()
        self.booting: set[Jail] = set()
        self.taken = 0
        self.target = profile.pool.min
        self.last_take = trio.current_time()
        self.backoff_s = 0.0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.hits = self.misses = self.lowered = self.boot_failures = self.retired = 0  # lowered: see take

    @property
    def size(self) -> int:
        return len(self.ready) + len(self.booting)

    def stats(self) -> PoolStats:
        p = self.profile.pool
        return PoolStats(self.tenant, self.runtime, p.min, p.max, self.target, len(self.ready), len(self.booting),
                         self.taken, self.hits, self.misses, self.misses + self.lowered, self.boot_failures, self.retired,
                         self.last_error)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<Pool {self.tenant}/{self.runtime} warm={s.warm} starting={s.starting} taken={s.taken} "
                f"target={s.target} hits={s.hits} misses={s.misses}>")


def _missing(pool: Pool) -> int:
    """Jails to start now. The replacement of a jail taken by a running job waits for that job to
    end while at least half the pool is still warm: a boot competes with the job for the CPU and
    for the daemon's event loop (measured: warm node p50 3.2 ms deferred vs 7.2 ms started at once
    on 2 cores). Below half (a burst), every replacement starts at once."""
    deferred = pool.taken if 2 * len(pool.ready) >= max(pool.target, 1) else 0
    return pool.target - pool.size - deferred


class Pools:
    """Every warm pool of the daemon, and the nursery in which all jails (warm and cold) live."""

    def __init__(self, runner: Runner, max_total: int, boot_parallel: int | None = None):
        self.runner = runner
        self.max_total = max_total
        self.pools: dict[tuple[str, str], Pool] = {}
        # Boots at once: each costs a core for ~30 ms (node); more than the cores only queue.
        self.boot_limit = trio.CapacityLimiter(boot_parallel or os.cpu_count() or 1)
        self.closed = False
        self._wake = trio.Event()
        self.nursery: trio.Nursery | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the jails' nursery (also the runner's background for cold teardowns) and refill."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.runner.background = nursery
            task_status.started(self)
            try:
                await self._refill_loop()
            finally:
                self.runner.background = None
                self._retire_all()

    def configure(self, profiles: dict[str, Profile]) -> None:
        """(Re)apply the profiles: new pools, resized pools, and old jails retired on change."""
        wanted: dict[tuple[str, str], Profile] = {}
        for tenant, prof in profiles.items():
            if prof.pool.max > 0:
                for rt in runtimes_of(prof):
                    wanted[(tenant, rt)] = prof
        for key, pool in self.pools.items():
            new = wanted.get(key)
            if new is None or new.digest != pool.profile.digest:
                self._retire_pool(pool, "profile changed" if new else "pool removed")
        for key, prof in wanted.items():
            pool = self.pools.get(key)
            if pool is None:
                self.pools[key] = Pool(*key, prof)
            elif prof.digest != pool.profile.digest:
                pool.profile = prof
                pool.target = prof.pool.min
                pool.backoff_s, pool.retry_at, pool.last_error = 0.0, 0.0, None
        for key, pool in self.pools.items():
            if key not in wanted:  # kept (its counters must not go backwards), but empty
                pool.target = 0
                pool.profile = dataclasses.replace(pool.profile, pool=dataclasses.replace(pool.profile.pool,
                                                                                           min=0, max=0))
        self.wake()

    def close(self) -> None:
        """Shutdown: no more refills; every warm jail is destroyed (jobs running keep theirs)."""
        self.closed = True
        self._retire_all()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # ---- taking ---------------------------------------------------------------------------------

    def take(self, profile: Profile, runtime: str) -> Jail | None:
        """A warm jail for this job, or None (run it cold). Never waits."""
        pool = self.pools.get((profile.tenant, runtime))
        if pool is None or pool.profile.pool.max == 0 or self.closed:
            return None
        pool.last_take = trio.current_time()
        if not warm_compatible(pool.profile, profile):
            pool.lowered += 1  # lowered memory/pids/tmpfs: a jail built for this request, cold
            return None
        while pool.ready:
            jail = pool.ready.popleft()
            if jail.state == "ready":
                pool.hits += 1
                pool.taken += 1
                self.wake()  # its replacement is due now (see _missing: maybe after this job)
                return jail
        pool.misses += 1
        pool.target = min(pool.target + 1, pool.profile.pool.max)  # a burst: widen the pool
        self.wake()
        return None

    def finished(self, jail: Jail) -> None:
        """The job that took `jail` is over (the jail is being torn down)."""
        pool = self.pools.get((jail.profile.tenant, jail.runtime))
        if pool is not None:
            pool.taken -= 1
            self.wake()  # a deferred replacement may start now

    # ---- state ----------------------------------------------------------------------------------

    def statistics(self) -> dict[str, PoolStats]:
        return {f"{t}/{rt}": p.stats() for (t, rt), p in sorted(self.pools.items())}

    def total(self) -> int:
        return sum(p.size for p in self.pools.values())

    def __repr__(self) -> str:
        return f"<Pools total={self.total()}/{self.max_total} {list(self.pools.values())}>"

    # ---- refilling ------------------------------------------------------------------------------

    async def _refill_loop(self) -> None:
        while True:
            next_check = self._refill()
            self._wake = trio.Event()
            with trio.move_on_at(next_check):
                await self._wake.wait()

    def _refill(self) -> float:
        """Start the boots that are due; return when to look again at the latest."""
        now = trio.current_time()
        next_check = now + 60.0
        if self.closed:
            return next_check
        for pool in self.pools.values():
            pmin, idle = pool.profile.pool.min, pool.profile.pool.idle_s
            if pool.target > pmin:
                if now - pool.last_take >= idle:
                    pool.target = pmin  # quiet for pool.idle: back to min
                else:
                    next_check = min(next_check, pool.last_take + idle)
            extra = len(pool.ready) - pool.target
            if extra > 0:
                self._retire(pool, extra, "idle")
        while self.total() > self.max_total:  # jails.pool_max lowered by a reload
            fullest = max(self.pools.values(), key=lambda p: len(p.ready))
            if not fullest.ready:
                break  # only booting ones left over the cap: they are not replaced
            self._retire(fullest, 1, "jails.pool_max lowered")
        # Round-robin over the pools so one big pool cannot starve the others of the total cap.
        progress = True
        while progress:
            progress = False
            for pool in self.pools.values():
                if _missing(pool) <= 0 or self.total() >= self.max_total:
                    continue
                if now < pool.retry_at:
                    next_check = min(next_check, pool.retry_at)
                    continue
                self._start(pool)
                progress = True
        return next_check

    def _start(self, pool: Pool) -> None:
        jail = self.runner.jail(pool.profile, pool.runtime, warm=True)
        pool.booting.add(jail)
        self.nursery.start_soon(self._boot, pool, jail)

    async def _boot(self, pool: Pool, jail: Jail) -> None:
        try:
            async with self.boot_limit:
                if jail.state == "new" and not self.closed and jail.profile is pool.profile:
                    await self.nursery.start(jail.life)
        finally:
            pool.booting.discard(jail)
        if jail.state == "ready" and not jail.retired and jail.profile is pool.profile and not self.closed:
            pool.backoff_s, pool.last_error = 0.0, None
            jail.on_dead = lambda j: self._on_dead(pool, j)
            pool.ready.append(jail)
        elif jail.state == "failed":
            pool.boot_failures += 1
            err = jail.fail[1] if jail.fail else (jail.facts.internal or "the runtime exited before its hello")
            pool.backoff_s = min(max(pool.backoff_s * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
            pool.retry_at = trio.current_time() + pool.backoff_s
            if err != pool.last_error:
                log.error("warm jail for %s/%s failed to start: %s (retrying in %.1fs)", pool.tenant, pool.runtime,
                          err, pool.backoff_s, extra={"event": "pool_boot_failed", "tenant": pool.tenant})
            pool.last_error = err
            jail.retire()
        else:  # retired while booting (reload, shutdown), or never started
            pool.retired += 1
            jail.retire()
        self.wake()

    def _on_dead(self, pool: Pool, jail: Jail) -> None:
        try:
            pool.ready.remove(jail)
        except ValueError:
            return
        pool.retired += 1
        log.warning("warm jail %s of %s/%s died while waiting", jail.name, pool.tenant, pool.runtime,
                    extra={"event": "pool_jail_died", "tenant": pool.tenant})
        self.wake()

    def _retire(self, pool: Pool, count: int, why: str) -> None:
        count = min(count, len(pool.ready))
        for _ in range(count):
            jail = pool.ready.popleft()  # the oldest first
            jail.retire()
            pool.retired += 1
        if count:
            log.info("retired %d warm jails of %s/%s: %s", count, pool.tenant, pool.runtime, why,
                     extra={"event": "pool_retire", "tenant": pool.tenant})

    def _retire_pool(self, pool: Pool, why: str) -> None:
        self._retire(pool, len(pool.ready), why)
        for jail in list(pool.booting):
            jail.retire()  # booting under the old policy (or shutting down): retired when it reports

    def _retire_all(self) -> None:
        for pool in self.pools.values():
            self._retire_pool(pool, "shutdown")
