"""supervisor.scheduler: admission (token bucket, queue length), fair dispatch, cancel, close.

Runs under trio; time-dependent tests use the fake clock (``autojump_clock``), so a 200-job flood
of one-second jobs takes no real time.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.scheduler import (
    CancelledWhileQueued,
    Rejected,
    Scheduler,
    TenantPolicy,
)

# Generous policy: only the limit a test is about should bite.
WIDE = TenantPolicy(concurrency=64, queue=10_000, rate=1e6, burst=1_000_000)


def policy(**changes) -> TenantPolicy:
    return dataclasses.replace(WIDE, **changes)


def assert_internals_consistent(s: Scheduler) -> None:
    """The scheduler's own invariants, from the outside plus its private maps."""
    tickets = list(s._tickets.values())
    assert s._running == sum(t.state == "running" for t in tickets) <= s._concurrency
    assert s._queued == sum(t.state == "queued" for t in tickets)
    assert set(s._active) == {t.tenant for t in tickets}
    assert not set(s._active) & set(s._idle)
    for name, t in s._active.items():
        assert t.running == sum(x.tenant == name and x.state == "running" for x in tickets)
        assert t.queued == sum(x.tenant == name and x.state == "queued" for x in tickets)
        ready = t.queued > 0 and t.running < t.policy.concurrency
        assert (name in s._ready) == ready, name
    assert set(s._ready) <= set(s._active)
    # Work conserving: a free slot means nobody is ready.
    assert s._running == s._concurrency or not s._ready
    stats = s.statistics()
    assert stats.running == s._running == sum(x.running for x in stats.tenants.values())
    assert stats.queued == s._queued == sum(x.queued for x in stats.tenants.values())


def assert_idle_and_empty(s: Scheduler) -> None:
    assert_internals_consistent(s)
    assert s._running == s._queued == 0
    assert not s._tickets and not s._active and not s._ready


# -- limits ------------------------------------------------------------------------------------


async def test_global_concurrency_respected(autojump_clock):
    s = Scheduler(concurrency=3)
    now_running = 0
    peak = 0
    done = 0

    async def job(ticket):
        nonlocal now_running, peak, done
        async with ticket:
            now_running += 1
            peak = max(peak, now_running)
            await trio.sleep(1)
            now_running -= 1
            done += 1

    with trio.fail_after(10_000):  # a lost wake-up fails instead of hanging
        async with trio.open_nursery() as nursery:
            for tenant in "ABCD":
                for i in range(5):
                    nursery.start_soon(job, s.submit(tenant, WIDE, f"{tenant}{i}"))
            await trio.testing.wait_all_tasks_blocked()
            assert repr(s) == "<Scheduler [running 3/3 | queued 17 | tenants 4]>"
            assert_internals_consistent(s)

    assert (peak, done) == (3, 20)
    assert trio.current_time() == pytest.approx(7)  # ceil(20 / 3) rounds of one second
    assert_idle_and_empty(s)
    assert repr(s) == "<Scheduler [running 0/3 | queued 0 | tenants 0]>"


async def test_tenant_concurrency_respected(autojump_clock):
    s = Scheduler(concurrency=10)
    running = Counter()
    peak = Counter()

    async def job(ticket):
        async with ticket:
            running[ticket.tenant] += 1
            peak[ticket.tenant] = max(peak[ticket.tenant], running[ticket.tenant])
            await trio.sleep(1)
            running[ticket.tenant] -= 1

    with trio.fail_after(10_000):  # a lost wake-up fails instead of hanging
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(job, s.submit("A", policy(concurrency=2), f"a{i}"))
            for i in range(4):
                nursery.start_soon(job, s.submit("B", policy(concurrency=4), f"b{i}"))
            await trio.testing.wait_all_tasks_blocked()
            stats = s.statistics()
            assert (stats.running, stats.queued) == (6, 4)
            assert (stats.tenants["A"].running, stats.tenants["A"].queued) == (2, 4)

    assert peak == {"A": 2, "B": 4}
    assert_idle_and_empty(s)


async def test_free_slot_dispatches_at_submit():
    s = Scheduler(concurrency=1)
    ticket = s.submit("A", WIDE, "j1")
    assert ticket.state == "running"
    assert await ticket.wait_turn() == 0.0
    assert ticket.queued_s == 0.0
    ticket.release()
    ticket.release()  # idempotent
    assert ticket.state == "done"
    with pytest.raises(RuntimeError, match="already released"):
        await ticket.wait_turn()
    assert_idle_and_empty(s)


async def test_duplicate_live_job_id_is_a_caller_error():
    s = Scheduler(concurrency=1)
    ticket = s.submit("A", WIDE, "j1")
    with pytest.raises(ValueError, match="already queued or running"):
        s.submit("B", WIDE, "j1")
    ticket.release()
    s.submit("B", WIDE, "j1").release()  # the id is free again once the job is over


def test_policy_and_scheduler_validation():
    with pytest.raises(ValueError, match="concurrency"):
        TenantPolicy(concurrency=0, queue=1, rate=1.0, burst=1)
    with pytest.raises(ValueError, match="queue"):
        TenantPolicy(concurrency=1, queue=-1, rate=1.0, burst=1)
    with pytest.raises(ValueError, match="rate"):
        TenantPolicy(concurrency=1, queue=1, rate=0.0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        TenantPolicy(concurrency=1, queue=1, rate=1.0, burst=0)
    with pytest.raises(ValueError):
        Scheduler(concurrency=0)

    class Limits:  # the four fields jailer.profile.Limits has
        concurrency, queue, rate, burst = 2, 3, 4.5, 6

    assert TenantPolicy.from_limits(Limits) == TenantPolicy(2, 3, 4.5, 6)


# -- fairness ----------------------------------------------------------------------------------


async def test_round_robin_dispatch_order():
    s = Scheduler(concurrency=1)
    tickets = {}
    for job_id in ["a0", "a1", "a2", "b0", "b1", "c0"]:
        tickets[job_id] = s.submit(job_id[0], WIDE, job_id)
    order = []
    while True:
        running = [t for t in tickets.values() if t.state == "running"]
        if not running:
            break
        assert len(running) == 1
        order.append(running[0].job_id)
        running[0].release()
        assert_internals_consistent(s)
    # a0 started at once; then one per tenant in turn, FIFO within each tenant.
    assert order == ["a0", "a1", "b0", "c0", "a2", "b1"]
    assert_idle_and_empty(s)


async def test_flooding_tenant_does_not_delay_another(autojump_clock):
    s = Scheduler(concurrency=2)
    flood = TenantPolicy(concurrency=4, queue=500, rate=1e6, burst=1000)
    job_s = 1.0
    dispatches = []  # (dispatched_at, tenant, job_id)
    b_tickets = []

    async def job(ticket):
        async with ticket:
            dispatches.append((ticket.submitted_at + ticket.queued_s, ticket.tenant, ticket.job_id))
            await trio.sleep(job_s)

    async def b_submits(nursery):
        for i, gap in enumerate([7.3, 13.1, 2.4, 21.9, 5.5]):
            await trio.sleep(gap)
            ticket = s.submit("B", flood, f"b{i}")
            b_tickets.append(ticket)
            nursery.start_soon(job, ticket)

    with trio.fail_after(10_000):  # a lost wake-up fails instead of hanging
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(job, s.submit("A", flood, f"a{i}"))
            nursery.start_soon(b_submits, nursery)

    assert len(dispatches) == 205 and len(b_tickets) == 5
    # The backlog takes ~100 s; FIFO would start B's jobs only after it. Each B job waits at most
    # one A job per slot: it is never behind the backlog.
    for b in b_tickets:
        b_at = b.submitted_at + b.queued_s
        assert b.queued_s <= job_s
        a_in_between = [d for d in dispatches if d[1] == "A" and b.submitted_at < d[0] <= b_at]
        assert len(a_in_between) <= s._concurrency  # at most one A dispatch per slot
    stats = s.statistics()
    assert (stats.tenants["A"].dispatched, stats.tenants["B"].dispatched) == (200, 5)
    assert_idle_and_empty(s)


# -- admission ---------------------------------------------------------------------------------


async def test_queue_full_counts_only_queued_jobs():
    s = Scheduler(concurrency=10)
    p = policy(concurrency=2, queue=3)
    tickets = [s.submit("A", p, f"j{i}") for i in range(5)]  # 2 running + 3 queued
    assert [t.state for t in tickets] == ["running"] * 2 + ["queued"] * 3
    with pytest.raises(Rejected) as info:
        s.submit("A", p, "j5")
    assert info.value.reason == "queue_full"
    assert "3 jobs waiting (limit 3)" in info.value.message
    assert s.statistics().tenants["A"].rejected_queue_full == 1
    s.submit("B", p, "b0")  # other tenants are not affected

    tickets[0].release()  # j2 starts: 2 queued now, room for one more
    assert tickets[2].state == "running"
    s.submit("A", p, "j5")
    with pytest.raises(Rejected, match="limit 3"):
        s.submit("A", p, "j6")
    assert s.statistics().tenants["A"].rejected_queue_full == 2


async def test_queue_zero_admits_only_what_can_start_now():
    s = Scheduler(concurrency=1)
    p = policy(queue=0)
    first = s.submit("A", p, "j1")
    with pytest.raises(Rejected) as info:  # global slot taken
        s.submit("B", p, "j2")
    assert info.value.reason == "queue_full"
    first.release()
    s.submit("B", p, "j2").release()


async def test_rate_limit_refill_and_burst_cap(autojump_clock):
    s = Scheduler(concurrency=100)
    p = policy(rate=2.0, burst=3)
    for i in range(3):
        s.submit("A", p, f"j{i}")
    with pytest.raises(Rejected) as info:
        s.submit("A", p, "j3")
    assert info.value.reason == "rate_limited"
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert s.statistics().tenants["A"].tokens == pytest.approx(0.0)

    await trio.sleep(0.5)  # one token back
    s.submit("A", p, "j3")
    with pytest.raises(Rejected, match="rate"):
        s.submit("A", p, "j4")

    await trio.sleep(1000)  # refill stops at the burst
    stats = s.statistics().tenants["A"]
    assert stats.tokens == pytest.approx(3.0)
    assert stats.rejected_rate_limited == 2
    for i in range(3):
        s.submit("A", p, f"k{i}")
    with pytest.raises(Rejected, match="rate"):
        s.submit("A", p, "k3")
    s.submit("B", p, "b0")  # buckets are per tenant


async def test_queue_full_rejection_takes_a_token(autojump_clock):
    # Documented choice: the bucket limits submissions, so retrying a full queue gets rate limited.
    s = Scheduler(concurrency=1)
    p = policy(queue=0, rate=1.0, burst=2)
    s.submit("A", p, "j0")
    with pytest.raises(Rejected, match="waiting"):
        s.submit("A", p, "j1")
    with pytest.raises(Rejected) as info:
        s.submit("A", p, "j2")
    assert info.value.reason == "rate_limited"
    assert info.value.retry_after_s == pytest.approx(1.0)


async def test_idle_tenant_keeps_its_bucket(autojump_clock):
    s = Scheduler(concurrency=1)
    p = policy(rate=1.0, burst=1)
    s.submit("A", p, "j0").release()
    assert "A" not in s._active and "A" in s._idle
    with pytest.raises(Rejected, match="rate"):  # still empty though A went idle
        s.submit("A", p, "j1")
    await trio.sleep(1)
    s.submit("A", p, "j1").release()


# -- cancel, release, cancellation -------------------------------------------------------------


async def test_cancel_queued_and_running():
    s = Scheduler(concurrency=1)
    running = s.submit("A", WIDE, "r")
    queued = s.submit("A", WIDE, "q")
    later = s.submit("B", WIDE, "later")
    outcome = []

    async def waiter():
        try:
            await queued.wait_turn()
        except CancelledWhileQueued as exc:
            outcome.append(exc.job_id)

    with trio.fail_after(5):  # a lost wake-up fails instead of hanging
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert s.cancel("q") is True
            assert s.cancel("q") is False  # already gone
    assert outcome == ["q"]
    assert queued.state == "cancelled"
    assert s.cancel("r") is False  # running: the caller kills the jail
    assert s.cancel("nope") is False
    assert_internals_consistent(s)
    assert s.statistics().queued == 1

    running.release()  # the slot goes to B, not to the cancelled job
    assert later.state == "running"
    with pytest.raises(CancelledWhileQueued):  # also after the fact
        await queued.wait_turn()
    later.release()
    assert_idle_and_empty(s)


async def test_release_on_exception_inside_async_with():
    s = Scheduler(concurrency=1)
    with pytest.raises(ValueError, match="tenant code blew up"):
        async with s.submit("A", WIDE, "j1"):
            raise ValueError("tenant code blew up")
    assert_idle_and_empty(s)


async def test_release_when_cancelled_while_running(autojump_clock):
    s = Scheduler(concurrency=1)
    with trio.move_on_after(5) as scope:
        async with s.submit("A", WIDE, "j1"):
            assert s.statistics().running == 1
            await trio.sleep(100)
    assert scope.cancelled_caught
    assert_idle_and_empty(s)


async def test_cancelled_while_queued_withdraws_the_job(autojump_clock):
    s = Scheduler(concurrency=1)
    first = s.submit("A", WIDE, "j1")
    second = s.submit("A", WIDE, "j2")
    with trio.move_on_after(5) as scope:
        async with second:
            pytest.fail("must not be dispatched")
    assert scope.cancelled_caught
    assert second.state == "cancelled"
    first.release()  # nothing left to dispatch: no slot leaked to an abandoned ticket
    assert_idle_and_empty(s)


async def test_cancelled_at_the_checkpoint_after_dispatch_releases():
    s = Scheduler(concurrency=1)
    ticket = s.submit("A", WIDE, "j1")  # already running
    with trio.CancelScope() as scope:
        scope.cancel()
        await ticket.wait_turn()
    assert ticket.state == "done"  # wait_turn raised, so it holds no slot
    assert_idle_and_empty(s)


# -- close, policy reload ----------------------------------------------------------------------


async def test_close_fails_queued_keeps_running(autojump_clock):
    s = Scheduler(concurrency=2)
    outcomes = {}

    async def job(ticket):
        try:
            async with ticket:
                await trio.sleep(10)
                outcomes[ticket.job_id] = "finished"
        except Rejected as exc:
            outcomes[ticket.job_id] = exc.reason

    with trio.fail_after(10_000):  # a lost wake-up fails instead of hanging
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(job, s.submit("A", WIDE, f"j{i}"))
            await trio.sleep(1)
            s.close()
            s.close()  # idempotent
            assert repr(s) == "<Scheduler [running 2/2 | queued 0 | tenants 1 | closed]>"
            with pytest.raises(Rejected) as info:
                s.submit("B", WIDE, "late")
            assert info.value.reason == "shutting_down"
            assert s.statistics().rejected_shutting_down == 1
            assert s.update_policy("A", policy(concurrency=5)) is None  # no dispatch after close

    assert outcomes == {
        "j0": "finished", "j1": "finished",
        "j2": "shutting_down", "j3": "shutting_down", "j4": "shutting_down",
    }
    assert trio.current_time() == pytest.approx(10)  # running jobs were not cut short
    assert_idle_and_empty(s)


async def test_update_policy_lowers_concurrency_for_future_dispatches():
    s = Scheduler(concurrency=10)
    tickets = [s.submit("A", policy(concurrency=3), f"j{i}") for i in range(6)]
    assert [t.state for t in tickets].count("running") == 3
    s.update_policy("A", policy(concurrency=1))
    assert_internals_consistent(s)
    tickets[0].release()
    tickets[1].release()
    assert [t.state for t in tickets[3:]] == ["queued"] * 3  # still 1 running: not below 1
    tickets[2].release()
    assert [t.state for t in tickets[3:]] == ["running", "queued", "queued"]

    s.update_policy("A", policy(concurrency=3))  # raising it dispatches at once
    assert [t.state for t in tickets[3:]] == ["running"] * 3
    s.update_policy("nobody", WIDE)  # unknown tenants: nothing to do
    for t in tickets:
        t.release()
    assert_idle_and_empty(s)


async def test_update_policy_lowers_burst_and_queue(autojump_clock):
    s = Scheduler(concurrency=1)
    s.submit("A", policy(burst=100), "j0")
    s.update_policy("A", policy(burst=2, queue=1))
    assert s.statistics().tenants["A"].tokens == pytest.approx(2.0)
    s.submit("A", policy(burst=2, queue=1), "j1")
    with pytest.raises(Rejected, match="waiting"):
        s.submit("A", policy(burst=2, queue=1), "j2")


async def test_statistics_is_a_frozen_snapshot():
    s = Scheduler(concurrency=1)
    ticket = s.submit("A", WIDE, "j1")
    stats = s.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.running = 5
    with pytest.raises(TypeError):
        stats.tenants["B"] = stats.tenants["A"]
    ticket.release()
    assert stats.running == 1 and stats.tenants["A"].running == 1
    assert s.statistics().running == 0
    assert s.statistics().tenants["A"].dispatched == 1  # idle tenants keep their counters


# -- properties --------------------------------------------------------------------------------

TENANTS = ["t0", "t1", "t2", "t3"]
policies = st.builds(
    TenantPolicy,
    concurrency=st.integers(1, 3),
    queue=st.integers(0, 4),
    rate=st.sampled_from([0.5, 2.0, 1000.0]),
    burst=st.integers(1, 6),
)
# (kind, tenant, index, policy); the kinds are weighted by repetition.
KINDS = ["submit"] * 4 + ["release"] * 2 + ["cancel", "interrupt", "policy", "sleep"]
operations = st.lists(
    st.tuples(st.sampled_from(KINDS), st.sampled_from(TENANTS), st.integers(0, 99), policies),
    min_size=10,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    concurrency=st.integers(1, 4),
    initial=st.fixed_dictionaries({name: policies for name in TENANTS}),
    ops=operations,
    close_at=st.one_of(st.none(), st.integers(0, 80)),
)
def test_random_interleavings_keep_limits_and_lose_nothing(concurrency, initial, ops, close_at):
    if close_at is not None and close_at < len(ops):
        ops = ops[:close_at] + [("close", None, 0, None)] + ops[close_at:]
    trio.run(_interleave, concurrency, initial, ops, clock=trio.testing.MockClock())


async def _interleave(concurrency, initial, ops):
    clock = trio.lowlevel.current_clock()
    s = Scheduler(concurrency)
    current = dict(initial)
    tickets = {}  # every admitted job
    outcome = {}  # job id -> how its wait_turn ended
    scopes = {}  # job id -> its waiter's cancel scope (a client that goes away)
    closed = False

    async def waiter(ticket, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            scopes[ticket.job_id] = scope
            task_status.started()
            try:
                await ticket.wait_turn()
                outcome[ticket.job_id] = "dispatched"
            except CancelledWhileQueued:
                outcome[ticket.job_id] = "cancelled"
            except Rejected as exc:
                assert exc.reason == "shutting_down"
                outcome[ticket.job_id] = "failed"
        if scope.cancelled_caught:
            outcome[ticket.job_id] = "interrupted"

    def running_ids():
        return {j for j, t in tickets.items() if t.state == "running"}

    async with trio.open_nursery() as nursery:
        for n, op in enumerate(ops):
            before = running_ids()
            kind, tenant, index, new_policy = op
            if kind == "submit":
                p = current[tenant]
                queued_before = s.statistics().tenants.get(tenant)
                try:
                    ticket = s.submit(tenant, p, f"job{n}")
                except Rejected as exc:
                    assert not closed or exc.reason == "shutting_down"
                    queued = queued_before.queued if queued_before else 0
                    assert exc.reason != "queue_full" or queued >= p.queue
                else:
                    assert not closed
                    tickets[ticket.job_id] = ticket
                    if ticket.state == "queued":
                        assert s.statistics().tenants[tenant].queued <= p.queue
                    await nursery.start(waiter, ticket)
            elif kind == "release":
                ready = sorted(j for j in running_ids() if outcome.get(j) == "dispatched")
                if ready:
                    tickets[ready[index % len(ready)]].release()
            elif kind == "cancel":
                live = sorted(s._tickets)
                if live:
                    job_id = live[index % len(live)]
                    was = tickets[job_id].state
                    assert s.cancel(job_id) is (was == "queued")
            elif kind == "interrupt":
                waiting = sorted(j for j in scopes if j not in outcome)
                if waiting:
                    scopes[waiting[index % len(waiting)]].cancel()
            elif kind == "policy":
                current[tenant] = new_policy
                s.update_policy(tenant, new_policy)
            elif kind == "sleep":
                clock.jump([0.1, 0.5, 3.0][index % 3])
            elif kind == "close":
                s.close()
                closed = True
            await trio.testing.wait_all_tasks_blocked()

            assert_internals_consistent(s)
            # Whoever was dispatched by this step was below its (current) concurrency.
            started = Counter(tickets[j].tenant for j in running_ids() - before)
            for tenant in started:
                running = sum(t.tenant == tenant and t.state == "running" for t in tickets.values())
                assert running <= current[tenant].concurrency
            for job_id, how in outcome.items():
                state = tickets[job_id].state
                assert (how, state) in {
                    ("dispatched", "running"), ("dispatched", "done"), ("cancelled", "cancelled"),
                    ("failed", "failed"), ("interrupted", "cancelled"),
                }, (job_id, how, state)

        # Drain: close, then finish whatever runs.
        s.close()
        await trio.testing.wait_all_tasks_blocked()
        for job_id in running_ids():
            tickets[job_id].release()
        await trio.testing.wait_all_tasks_blocked()
        stuck = sorted(set(tickets) - set(outcome))  # waiters never woken (a lost job)
        nursery.cancel_scope.cancel()  # so that a lost wake-up fails below instead of hanging

    # Never lose a job: every admitted job was dispatched, cancelled or failed at close.
    assert stuck == []
    assert set(outcome) == set(tickets)
    assert {t.state for t in tickets.values()} <= {"done", "cancelled", "failed"}
    assert_idle_and_empty(s)
    assert len(s._idle) <= len(TENANTS)


# -- memory ------------------------------------------------------------------------------------


async def test_memory_stays_bounded_across_many_tenants(autojump_clock):
    s = Scheduler(concurrency=8, max_idle_tenants=1000)
    p = TenantPolicy(concurrency=1, queue=1, rate=1.0, burst=3)
    live = deque()
    rejected = Counter()
    max_live = 50
    for i in range(100_000):
        if i % 1000 == 0:
            await trio.sleep(0.5)  # some refill
        try:
            # bursts of 5 submits per tenant: 10k tenants, each seen twice, evicted in between
            ticket = s.submit(f"tenant-{(i // 5) % 10_000}", p, f"job-{i}")
        except Rejected as exc:
            rejected[exc.reason] += 1
            continue
        if i % 3 == 0 and ticket.state == "queued":
            assert s.cancel(ticket.job_id)
        else:
            live.append(ticket)
        while len(live) > max_live:
            live.popleft().release()  # running: done; still queued: withdrawn
        assert len(s._tickets) <= max_live + 1
        assert len(s._active) <= max_live + 1
        assert len(s._ready) <= len(s._active)
        assert len(s._idle) <= 1000
    assert rejected["rate_limited"] > 0 and rejected["queue_full"] > 0
    assert s.statistics().dispatched > 10_000
    while live:
        live.popleft().release()
    assert_idle_and_empty(s)
    assert len(s._idle) == 1000
    assert len(s.statistics().tenants) == 1000
