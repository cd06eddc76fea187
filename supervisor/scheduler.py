"""Admission control and fair dispatch of jobs: pure trio, no I/O.

Every job passes through two gates:

1. **Admission** (``Scheduler.submit``, synchronous): the daemon answers at once whether it takes
   the job. Checked in this order:

   - the scheduler is closed -> ``Rejected("shutting_down")``;
   - the tenant's token bucket (``rate`` tokens per second, at most ``burst``, refilled from
     ``trio.current_time()``) holds less than one token -> ``Rejected("rate_limited")``. Every
     submission that gets past this check takes a token, whether or not it is then queued, so a
     client retrying a full queue in a loop ends up rate limited;
   - the job cannot start now and the tenant already has ``queue`` jobs waiting (running jobs do not
     count) -> ``Rejected("queue_full")``. With ``queue = 0`` a job is admitted only if it can start
     at once.

2. **Dispatch** (``Ticket.wait_turn``): at most ``concurrency`` jobs run at once in the daemon and
   at most ``policy.concurrency`` per tenant. When a slot is free, the next job comes from the next
   tenant in round-robin order among the *ready* tenants (jobs queued and below their own
   concurrency), FIFO within a tenant. A tenant with 1000 queued jobs therefore delays another
   tenant's new job by at most one of its own jobs per freed slot, never by its backlog.

Cost and memory: each submit, release and cancel is O(1) (the ready ring and each tenant's queue are
``OrderedDict`` s, so a cancelled job or a tenant that stopped being ready leaves in O(1) with no
stale entries); dispatch is event driven (a release wakes exactly the waiters it dispatches), with no
polling. A tenant with nothing queued or running leaves the active maps; only its token bucket and
counters stay, in an LRU of at most ``max_idle_tenants`` entries. Evicting a bucket forgets the
tenant's debt (it comes back with a full burst) and resets its counters: it only happens to a tenant
that has been idle while ``max_idle_tenants`` other tenants were active after it.

Wiring (the daemon)::

    scheduler = Scheduler(concurrency=config.max_jobs)
    try:
        ticket = scheduler.submit(tenant, TenantPolicy.from_limits(profile.limits), job_id)
    except Rejected as exc:
        return rejected_result(job_id, exc.reason, exc.message)
    async with ticket:                       # waits for its turn; releases on exit, also on cancel
        result = await run_job(...)          # result.timings.queued_ms = ticket.queued_s * 1000

``cancel(job_id)`` withdraws a queued job (its ``wait_turn`` raises ``CancelledWhileQueued``) and
returns False for a running one: the caller then kills the jail, and the ``async with`` releases the
slot. A ticket whose ``wait_turn`` raises (cancelled, rejected at close) holds no slot: there is
nothing to release. Every ticket must end in ``async with``, ``release()`` or ``cancel()``, or its
slot is never given back.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import trio

__all__ = [
    "CancelledWhileQueued",
    "Rejected",
    "Scheduler",
    "SchedulerStatistics",
    "TenantPolicy",
    "TenantStatistics",
    "Ticket",
]

#: Idle tenants whose token bucket and counters are remembered (LRU), by default.
DEFAULT_MAX_IDLE_TENANTS = 16384

# Slack for float arithmetic in the token bucket: 0.1 s at 10 jobs/s must give back one whole token.
_TOKEN_EPSILON = 1e-9

# Ticket states.
_QUEUED = "queued"
_RUNNING = "running"
_DONE = "done"  # released after running
_CANCELLED = "cancelled"  # withdrawn while queued: cancel(), release() or a cancelled wait_turn()
_FAILED = "failed"  # still queued at close()


@dataclass(frozen=True)
class TenantPolicy:
    """A tenant's scheduling limits, from its profile's ``[limits]`` section."""

    concurrency: int  # jobs of this tenant running at once; >= 1
    queue: int  # jobs of this tenant waiting at once (running ones not counted); >= 0
    rate: float  # sustained submissions per second (token bucket refill); > 0
    burst: int  # token bucket depth: submissions accepted at once; >= 1

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.queue < 0:
            raise ValueError(f"queue must be at least 0, not {self.queue}")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of jobs per second, not {self.rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")

    @classmethod
    def from_limits(cls, limits: Any) -> TenantPolicy:
        """From a ``jailer.profile.Limits`` (or anything with the same four attributes)."""
        return cls(concurrency=limits.concurrency, queue=limits.queue, rate=limits.rate, burst=limits.burst)


class Rejected(Exception):
    """The scheduler did not take the job, or dropped it at close; it never ran.

    ``reason`` is ``"queue_full"``, ``"rate_limited"`` or ``"shutting_down"`` (the result record's
    reason code); ``message`` is for humans. ``retry_after_s`` is set for ``rate_limited``: how long
    until the bucket holds a token again.
    """

    REASONS = frozenset({"queue_full", "rate_limited", "shutting_down"})

    def __init__(self, reason: str, message: str, *, retry_after_s: float | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"Rejected({self.reason!r}, {self.message!r})"


class CancelledWhileQueued(Exception):
    """Raised by ``Ticket.wait_turn`` when the job was withdrawn before it started."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} was cancelled while queued")
        self.job_id = job_id


@dataclass(frozen=True)
class TenantStatistics:
    running: int
    queued: int
    tokens: float  # in the bucket now (refilled to the current time)
    rejected_queue_full: int
    rejected_rate_limited: int
    dispatched: int


@dataclass(frozen=True)
class SchedulerStatistics:
    concurrency: int  # global limit on running jobs
    running: int
    queued: int
    closed: bool
    dispatched: int  # since start, all tenants
    rejected_shutting_down: int
    #: Active tenants plus the idle ones still remembered (see ``max_idle_tenants``).
    tenants: Mapping[str, TenantStatistics]


class _Tenant:
    """Per-tenant state. Active (something queued or running) or parked in the idle LRU."""

    __slots__ = (
        "name", "policy", "tokens", "stamp", "queue", "running",
        "rejected_queue_full", "rejected_rate_limited", "dispatched",
    )

    def __init__(self, name: str, policy: TenantPolicy, now: float) -> None:
        self.name = name
        self.policy = policy
        self.tokens = float(policy.burst)
        self.stamp = now
        self.queue: OrderedDict[str, Ticket] | None = None  # allocated while active
        self.running = 0
        self.rejected_queue_full = 0
        self.rejected_rate_limited = 0
        self.dispatched = 0

    def tokens_at(self, now: float) -> float:
        return min(float(self.policy.burst), self.tokens + (now - self.stamp) * self.policy.rate)

    @property
    def queued(self) -> int:
        return len(self.queue) if self.queue else 0


class Ticket:
    """One admitted job's place in the scheduler. Use as ``async with ticket:``."""

    __slots__ = ("job_id", "tenant", "submitted_at", "_scheduler", "_state", "_dispatched_at", "_event")

    def __init__(self, scheduler: Scheduler, tenant: str, job_id: str, now: float) -> None:
        self.job_id = job_id
        self.tenant = tenant
        self.submitted_at = now  # trio.current_time() at submit
        self._scheduler = scheduler
        self._state = _QUEUED
        self._dispatched_at: float | None = None
        self._event: trio.Event | None = None  # only while someone waits

    @property
    def state(self) -> str:
        """``queued``, ``running``, ``done``, ``cancelled`` or ``failed``."""
        return self._state

    @property
    def queued_s(self) -> float | None:
        """Seconds between submit and dispatch; None until dispatched."""
        if self._dispatched_at is None:
            return None
        return self._dispatched_at - self.submitted_at

    async def wait_turn(self) -> float:
        """Wait until the job is dispatched; return the seconds it spent queued.

        Raises ``CancelledWhileQueued`` if the job was withdrawn, ``Rejected("shutting_down")`` if
        the scheduler closed first. If this raises for any reason, including trio cancellation,
        the ticket holds no slot (a queued job is withdrawn, a just-dispatched one released).
        """
        try:
            if self._state is _QUEUED:
                if self._event is None:
                    self._event = trio.Event()
                await self._event.wait()
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            self.release()
            raise
        state = self._state
        if state is _RUNNING:
            return self._dispatched_at - self.submitted_at  # type: ignore[operator]
        if state is _CANCELLED:
            raise CancelledWhileQueued(self.job_id)
        if state is _FAILED:
            raise Rejected("shutting_down", "the daemon is shutting down; the job was not started")
        raise RuntimeError(f"ticket for job {self.job_id!r} was already released")

    def release(self) -> None:
        """The job is over: free its slot and dispatch the next. Idempotent.

        On a ticket still queued this withdraws it (as ``cancel``).
        """
        state = self._state
        if state is _RUNNING:
            self._scheduler._finish(self)
        elif state is _QUEUED:
            self._scheduler._withdraw(self)

    async def __aenter__(self) -> Ticket:
        await self.wait_turn()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def _wake(self, state: str) -> None:
        self._state = state
        if self._event is not None:
            self._event.set()
            self._event = None

    def __repr__(self) -> str:
        return f"<Ticket {self.job_id!r} tenant={self.tenant!r} {self._state}>"


class Scheduler:
    """Admission control and fair dispatch for the daemon's jobs. See the module docstring."""

    def __init__(self, concurrency: int, *, max_idle_tenants: int = DEFAULT_MAX_IDLE_TENANTS) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if max_idle_tenants < 0:
            raise ValueError(f"max_idle_tenants must be at least 0, not {max_idle_tenants}")
        self._concurrency = concurrency
        self._max_idle_tenants = max_idle_tenants
        self._closed = False
        self._running = 0
        self._queued = 0
        self._dispatched = 0
        self._rejected_shutting_down = 0
        # Invariants (checked by the tests):
        #   _tickets: every queued or running ticket, by job id;
        #   _active:  tenants with something queued or running; _idle: the others remembered (LRU);
        #   _ready:   round-robin ring of the active tenants with something queued and below their
        #             own concurrency; the head is served next;
        #   after every public call, _running == _concurrency or _ready is empty (work conserving).
        self._tickets: dict[str, Ticket] = {}
        self._active: dict[str, _Tenant] = {}
        self._idle: OrderedDict[str, _Tenant] = OrderedDict()
        self._ready: OrderedDict[str, _Tenant] = OrderedDict()

    # -- public API ----------------------------------------------------------------------------

    def submit(self, tenant: str, policy: TenantPolicy, job_id: str) -> Ticket:
        """Admit a job or raise ``Rejected``. ``policy`` also becomes the tenant's current policy.

        The returned ticket may already be running (a free slot); ``wait_turn`` then returns at once.
        Raises ``ValueError`` if ``job_id`` is already queued or running.
        """
        if self._closed:
            self._rejected_shutting_down += 1
            raise Rejected("shutting_down", "the daemon is shutting down and accepts no new jobs")
        if job_id in self._tickets:
            raise ValueError(f"job id {job_id!r} is already queued or running")
        now = trio.current_time()
        t = self._active.get(tenant)
        if t is None:
            t = self._idle.pop(tenant, None)
            if t is None:
                t = _Tenant(tenant, policy, now)
        self._set_policy(t, policy, now)

        if t.tokens < 1.0 - _TOKEN_EPSILON:
            t.rejected_rate_limited += 1
            self._park_if_idle(t)
            retry_after_s = (1.0 - t.tokens) / policy.rate
            raise Rejected(
                "rate_limited",
                f"tenant {tenant!r} exceeded its submission rate ({policy.rate:g}/s, burst "
                f"{policy.burst}); retry in {retry_after_s:.3g} s",
                retry_after_s=retry_after_s,
            )
        t.tokens = max(0.0, t.tokens - 1.0)

        can_start_now = self._running < self._concurrency and t.running < policy.concurrency
        if not can_start_now and t.queued >= policy.queue:
            t.rejected_queue_full += 1
            self._park_if_idle(t)
            raise Rejected(
                "queue_full",
                f"tenant {tenant!r} already has {t.queued} jobs waiting (limit {policy.queue})",
            )

        ticket = Ticket(self, tenant, job_id, now)
        if t.queue is None:
            t.queue = OrderedDict()
        self._active[tenant] = t
        t.queue[job_id] = ticket
        self._tickets[job_id] = ticket
        self._queued += 1
        self._update_ready(t)
        self._dispatch(now)
        return ticket

    def cancel(self, job_id: str) -> bool:
        """Withdraw a queued job: True, and its ``wait_turn`` raises ``CancelledWhileQueued``.

        False if the job is running (the caller kills the jail; the ticket's release frees the slot)
        or unknown (finished, never admitted).
        """
        ticket = self._tickets.get(job_id)
        if ticket is None or ticket._state is not _QUEUED:
            return False
        self._withdraw(ticket)
        return True

    def close(self) -> None:
        """Stop admitting (``Rejected("shutting_down")``); queued jobs fail the same way.

        Running jobs keep running and release their slots as usual. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        for t in list(self._active.values()):
            if t.queue:
                for ticket in t.queue.values():
                    del self._tickets[ticket.job_id]
                    ticket._wake(_FAILED)
                self._queued -= len(t.queue)
                t.queue.clear()
            self._park_if_idle(t)

    def update_policy(self, tenant: str, policy: TenantPolicy) -> None:
        """A reloaded profile: the new limits apply to future admissions and dispatches.

        Jobs already queued stay queued even above a lower ``queue``; running jobs keep running
        even above a lower ``concurrency`` (no new dispatch for the tenant until it is below).
        Tokens already in the bucket are kept up to the new ``burst``. Unknown tenants are ignored:
        ``submit`` brings the policy with it.
        """
        t = self._active.get(tenant) or self._idle.get(tenant)
        if t is None:
            return
        now = trio.current_time()
        self._set_policy(t, policy, now)
        if tenant in self._active:
            self._update_ready(t)
            self._dispatch(now)

    def statistics(self) -> SchedulerStatistics:
        now = trio.current_time()
        tenants = {}
        for group in (self._idle, self._active):
            for name, t in group.items():
                tenants[name] = TenantStatistics(
                    running=t.running,
                    queued=t.queued,
                    tokens=t.tokens_at(now),
                    rejected_queue_full=t.rejected_queue_full,
                    rejected_rate_limited=t.rejected_rate_limited,
                    dispatched=t.dispatched,
                )
        return SchedulerStatistics(
            concurrency=self._concurrency,
            running=self._running,
            queued=self._queued,
            closed=self._closed,
            dispatched=self._dispatched,
            rejected_shutting_down=self._rejected_shutting_down,
            tenants=MappingProxyType(tenants),
        )

    def __repr__(self) -> str:
        closed = " | closed" if self._closed else ""
        return (
            f"<Scheduler [running {self._running}/{self._concurrency} | queued {self._queued}"
            f" | tenants {len(self._active)}{closed}]>"
        )

    # -- internals -----------------------------------------------------------------------------

    def _set_policy(self, t: _Tenant, policy: TenantPolicy, now: float) -> None:
        # Refill under the old rate up to now, then switch; never more tokens than the new burst.
        t.tokens = t.tokens_at(now)
        t.stamp = now
        if policy != t.policy:
            t.policy = policy
            t.tokens = min(t.tokens, float(policy.burst))

    def _update_ready(self, t: _Tenant) -> None:
        """Put ``t`` at the back of the ring if it became ready, take it out if it no longer is."""
        ready = bool(t.queue) and t.running < t.policy.concurrency
        if ready:
            if t.name not in self._ready:
                self._ready[t.name] = t
        else:
            self._ready.pop(t.name, None)

    def _dispatch(self, now: float | None = None) -> None:
        if self._running >= self._concurrency or not self._ready:
            return
        if now is None:
            now = trio.current_time()
        while self._running < self._concurrency and self._ready:
            name, t = self._ready.popitem(last=False)
            _, ticket = t.queue.popitem(last=False)  # type: ignore[union-attr]
            self._queued -= 1
            t.running += 1
            t.dispatched += 1
            self._running += 1
            self._dispatched += 1
            ticket._dispatched_at = now
            ticket._wake(_RUNNING)
            if t.queue and t.running < t.policy.concurrency:
                self._ready[name] = t  # back of the ring

    def _finish(self, ticket: Ticket) -> None:
        t = self._active[ticket.tenant]
        del self._tickets[ticket.job_id]
        ticket._state = _DONE
        t.running -= 1
        self._running -= 1
        self._update_ready(t)
        self._park_if_idle(t)
        self._dispatch()

    def _withdraw(self, ticket: Ticket) -> None:
        t = self._active[ticket.tenant]
        del t.queue[ticket.job_id]  # type: ignore[union-attr]
        del self._tickets[ticket.job_id]
        self._queued -= 1
        ticket._wake(_CANCELLED)
        self._update_ready(t)
        self._park_if_idle(t)
        # No dispatch: withdrawing a queued job frees no slot.

    def _park_if_idle(self, t: _Tenant) -> None:
        """A tenant with nothing queued or running moves to the bounded idle LRU."""
        if t.running or t.queue:
            return
        self._active.pop(t.name, None)
        t.queue = None
        if self._max_idle_tenants == 0:
            return
        self._idle[t.name] = t
        self._idle.move_to_end(t.name)
        while len(self._idle) > self._max_idle_tenants:
            self._idle.popitem(last=False)
