"""Run one job in a fresh jail: the impure half of the pipeline (needs root).

    profile + job -> plan -> argv (pure, plan.py)
    -> uid slot, broker socket, cgroup, seccomp fd -> spawn bwrap -> deliver job over the broker
    -> watch wall / CPU / output / OOM -> result record -> kill the cgroup, remove everything.

A tenant's failure is a value (a status in the Result), never an exception out of `run`.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import prctl
import trio

from . import launch, seccomp
from .broker import BrokerLimits, BrokerSession, CallContext, Capability, LogSink, default_providers
from .cgroup import CgroupBackend, CgroupError, JobCgroup
from .identity import Identity, IdentityPool, NoFreeIdentity
from .ndjson import FrameError
from .plan import HostLayout, bwrap_argv, make_plan, probe_host, runtime_for
from .profile import Profile
from .result import Facts, Result, decide, rejected
from .spawn import JailProcess, Spawner

log = logging.getLogger("jailer.runner")

START_TIMEOUT_S = 10.0  # bwrap + runtime start; far above the ~40 ms it takes, but a loaded host...
EXIT_GRACE_S = 1.0  # after the runtime said idle, how long its exit may take before we kill it
# cgroup CPU weights (v2 scale: 1..10000, default 100; v1 cpu.shares scaled): a warm jail boots at
# a tenth of a running job's share, so refills never slow the jobs that are running.
BOOT_CPU_WEIGHT = 10
JOB_CPU_WEIGHT = 100


def new_job_id() -> str:
    return "j-" + secrets.token_hex(8)


@dataclass
class Job:
    filename: str  # base name, for the runtime (module kind) and stack traces
    code: str
    input: Any = None
    entry: str | None = None  # None: the profile's
    id: str = field(default_factory=new_job_id)


class CappedOutput:
    """stdout/stderr kept up to a shared byte budget; going over it is the job's output_limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.chunks: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = {"stdout": False, "stderr": False}

    def add(self, name: str, data: bytes) -> bool:
        """Keep what fits; False once the budget is exceeded."""
        room = self.limit - self.total
        self.total += len(data)
        if len(data) > room:
            self.chunks[name] += data[: max(room, 0)]
            self.truncated[name] = True
            return False
        self.chunks[name] += data
        return True

    def text(self, name: str) -> str:
        return self.chunks[name].decode("utf-8", errors="replace")


class Runner:
    """Long-lived: host layout, cgroup backend and uid slots are set up once, not per job."""

    def __init__(self, run_dir: str, cgroups: CgroupBackend, identities: IdentityPool,
                 layout: HostLayout | None = None, providers: dict[str, Capability] | None = None,
                 broker_limits: BrokerLimits = BrokerLimits(), use_exec_helper: bool = True):
        self.run_dir = run_dir
        self.jobs_dir = os.path.join(run_dir, "jobs")
        self.cgroups = cgroups
        self.identities = identities
        self.layout = layout or probe_host()
        self.providers = providers if providers is not None else default_providers()
        self.broker_limits = broker_limits
        self.on_call: Callable[[str, str, bool], None] | None = None  # (tenant, cap, granted): metrics
        # Set by the daemon: jails are torn down there, after the result has been returned.
        # None (jailer run, tests): `run` returns once the jail is gone.
        self.background: trio.Nursery | None = None
        self.seccomp_bpf = seccomp.compile_filter()  # compiled once; installed in every jail
        self.spawner = Spawner()  # forks from one long-lived thread (PR_SET_PDEATHSIG is per thread)
        # Orphaned jail processes come to us, not to the host's init (see Jail._note_orphans).
        prctl.set_child_subreaper(1)
        # The jail uids must traverse these to reach their own socket, and list nothing.
        for d in (run_dir, self.jobs_dir):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o711)
        # jailer-exec when a C compiler is there to build it (vfork: ~2.5 ms less daemon CPU per
        # jail), else the same steps as a preexec_fn (see launch.py).
        self.exec_helper, self.launcher = launch.build(run_dir) if use_exec_helper else (None, "disabled")
        if self.exec_helper is None:
            log.warning("jails are started with a Python preexec_fn (slower): jailer-exec: %s", self.launcher)

    def jail(self, profile: Profile, runtime: str, *, warm: bool = False) -> "Jail":
        """A jail not started yet: run `jail.life` in a nursery (warm pools), then `run(..., jail=)`."""
        return Jail(self, profile, runtime, name=new_jail_name() if warm else None, warm=warm)

    async def run(self, job: Job, profile: Profile, *, cancel: trio.Event | None = None,
                  queued_ms: float = 0.0, on_log: Callable[[dict], None] | None = None,
                  runtime: str | None = None, jail: "Jail | None" = None) -> Result:
        """Run `job`: in `jail` (a warm one, already started and never used) or in a fresh cold one.

        `profile` is the job's effective policy; a warm jail was built from its pool's profile,
        whose jail-shaping parts must be the same (supervisor.pool checks)."""
        if jail is not None:
            return await jail.execute(job, profile, cancel, queued_ms, on_log)
        try:
            runtime = runtime or runtime_for(profile, job.filename)
        except ValueError as e:
            return rejected(job.id, profile.tenant, "invalid_request", str(e))
        jail = Jail(self, profile, runtime, name=job.id)
        if self.background is not None:
            await self.background.start(jail.life)
            return await jail.execute(job, profile, cancel, queued_ms, on_log)
        async with trio.open_nursery() as nursery:
            await nursery.start(jail.life)
            return await jail.execute(job, profile, cancel, queued_ms, on_log)


def new_jail_name() -> str:
    return "w-" + secrets.token_hex(8)


def _internal(job: Job, profile: Profile, reason: str, message: str) -> Result:
    return Result(id=job.id, tenant=profile.tenant, status="internal", reason=reason,
                  error={"type": "InternalError", "message": message, "stack": ""},
                  profile_digest=profile.digest)


class Jail:
    """One jail, for exactly one job: started (booted), then given its job, then destroyed.

    `life` owns the jail's processes, pipes and teardown; `execute` delivers the job and decides
    the result. A cold jail boots right before its job; a warm one boots into a pool and waits
    there, connected and pinged, until `execute` (or until retired or found dead).

    state: new -> booting -> ready -> running -> done; or -> failed (never ready) / dead (died or
    retired while ready: never runs anything).
    """

    def __init__(self, runner: Runner, profile: Profile, runtime: str, *, name: str | None = None,
                 warm: bool = False):
        self.r = runner
        self.profile = profile  # what the jail was built from (limits that shape it, tenant)
        self.runtime = runtime
        self.name = name or new_jail_name()
        self.warm = warm
        self.state = "new"
        self.fail: tuple[str, str] | None = None  # (reason, message): jailer's own failure at boot
        self.on_dead: Callable[["Jail"], None] | None = None  # a pooled jail died while waiting
        self.facts = Facts()
        self.output = CappedOutput(profile.limits.output_bytes)
        self.logs = LogSink(profile.limits.log_bytes)
        self.ident: Identity | None = None
        self.cg: JobCgroup | None = None
        self.proc: JailProcess | None = None
        self.session: BrokerSession | None = None
        self.exited = trio.Event()
        self._listener: trio.socket.SocketType | None = None
        self._done = trio.Event()  # the job is over, or the jail is retired: tear down
        self.cpu_base_ns = 0
        self.orphans: set[int] = set()  # jail processes that may be reparented to us when killed
        self.t_boot = self.t_taken = self.t_delivered = self.t_result = None
        # Set by execute:
        self.job: Job | None = None
        self.job_profile = profile
        self.queued_ms = 0.0

    def __repr__(self) -> str:
        return f"<Jail {self.name} {self.profile.tenant}/{self.runtime} {self.state}>"

    # ---- life: boot, wait, teardown -----------------------------------------------------------

    async def life(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Boot; report started (ready or failed); wait for the job to end or a retire; tear down."""
        job_dir = os.path.join(self.r.jobs_dir, self.name)
        self.state = "booting"
        self.t_boot = time.monotonic()
        try:
            async with trio.open_nursery() as io:
                try:
                    await self._boot(io, job_dir)
                except NoFreeIdentity as e:
                    self.fail = ("no_identity", str(e))
                except CgroupError as e:
                    self.fail = ("cgroup", str(e))  # fail closed
                except OSError as e:
                    log.exception("jail %s: host failure", self.name)
                    self.fail = ("host_error", f"{e.__class__.__name__}: {e}")
                except Exception as e:  # jailer's own bug: this jail fails, the daemon serves on
                    log.exception("jail %s: failed to start", self.name)
                    self.fail = ("internal", f"{e.__class__.__name__}: {e}")
                finally:
                    if self._listener is not None:
                        self._listener.close()  # exactly one connection per jail
                ready = self.fail is None and self.session is not None and self.facts.internal is None
                if self.state != "dead":  # retired while booting stays retired
                    self.state = "ready" if ready else "failed"
                task_status.started()
                if ready and self.warm:
                    io.start_soon(self._watch_idle_death)
                # Even a failed boot waits: `execute` reads its exit status and cgroup first.
                await self._done.wait()
                # Whatever still runs now (lingering timers, the reaper) goes; the readers then see
                # EOF. The deadline only matters if a process refuses to die.
                self._kill_pid_namespace()
                io.cancel_scope.deadline = trio.current_time() + EXIT_GRACE_S
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup(job_dir)

    @property
    def retired(self) -> bool:
        return self._done.is_set()

    def retire(self) -> None:
        """A pooled jail that will never get a job (reload, idle, shutdown): destroy it."""
        if self.state in ("new", "booting", "ready"):
            self.state = "dead"
        self._done.set()

    async def _watch_idle_death(self) -> None:
        await self.exited.wait()
        if self.state == "ready":  # died while waiting in the pool: never hand it out
            self.retire()
            if self.on_dead is not None:
                self.on_dead(self)

    async def _boot(self, io: trio.Nursery, job_dir: str) -> None:
        self.ident = self.r.identities.acquire()
        # Our own fresh directory: root-owned, group = the jail's gid, so only this jail's uid can
        # reach the socket inside. We never touch a jail-writable path by name.
        os.mkdir(job_dir, 0o750)
        os.chown(job_dir, 0, self.ident.gid)
        sock_path = os.path.join(job_dir, "broker.sock")
        listener = self._listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        await listener.bind(sock_path)
        os.chmod(sock_path, 0o660)
        os.chown(sock_path, 0, self.ident.gid)
        listener.listen(1)

        plan = make_plan(self.profile, self.runtime, sock_path)
        missing = [b.host for b in plan.ro_binds if not os.path.exists(b.host)]
        if missing:  # the operator's mistake: say which, rather than a bwrap error
            self.fail = ("profile_path_missing",
                         f"filesystem.ro_paths of tenant {self.profile.tenant!r}: {', '.join(missing)} "
                         "does not exist on this host")
            return
        def create() -> JobCgroup:  # mkdir and limit writes in every hierarchy: off the event loop
            cg = self.r.cgroups.create(self.name, plan.cgroup_limits)
            if self.warm:
                self._set_cpu_weight(cg, BOOT_CPU_WEIGHT)  # refills yield the CPU to running jobs
            return cg

        self.cg = await trio.to_thread.run_sync(create)

        seccomp_fd = seccomp.program_fd(self.r.seccomp_bpf)  # sealed memfd, one per jail
        try:
            argv = bwrap_argv(plan, self.r.layout, seccomp_fd)
            ids = (self.cg.procs_files, self.ident.uid, self.ident.gid, self.profile.limits.open_files, os.getpid())
            if self.r.exec_helper is not None:
                argv, preexec = launch.exec_argv(self.r.exec_helper, *ids, argv), None
            else:
                preexec = launch.preexec(*ids)
            self.proc = await self.r.spawner.spawn(
                argv, stdin=subprocess.DEVNULL,
                env={},  # bwrap's pid-1 keeps this env, readable at /proc/1/environ: nothing
                pass_fds=(seccomp_fd,), close_fds=True, preexec_fn=preexec,
            )
        finally:
            os.close(seccomp_fd)

        async def wait_exit() -> None:
            await self.proc.wait()
            self.exited.set()

        io.start_soon(self._read_output, "stdout", self.proc.stdout)
        io.start_soon(self._read_output, "stderr", self.proc.stderr)
        io.start_soon(wait_exit)

        # The shim connects and says hello (or the jail dies trying).
        with trio.move_on_after(START_TIMEOUT_S) as start_scope:
            async with trio.open_nursery() as race:
                async def accept() -> None:
                    conn, _ = await listener.accept()
                    self.session = BrokerSession(
                        trio.SocketStream(conn),
                        CallContext(self.name, self.profile.tenant, self.profile, self.logs),
                        self.r.providers, self.facts, self.r.broker_limits, self.r.on_call)
                    race.cancel_scope.cancel()

                async def died() -> None:
                    await self.exited.wait()
                    race.cancel_scope.cancel()

                race.start_soon(accept)
                race.start_soon(died)
        if self.session is None:
            if start_scope.cancelled_caught:
                self.facts.internal = f"the jail did not connect within {START_TIMEOUT_S}s"
            return
        try:
            with trio.fail_after(START_TIMEOUT_S):
                await self.session.wait_hello()
                if self.warm:
                    await self.session.ping()  # the shim's first round trip pays its lazy compilation
        except (FrameError, trio.TooSlowError, trio.BrokenResourceError) as e:
            self.facts.internal = f"the runtime shim did not say hello: {e}"
            return
        self._note_orphans()

    def _note_orphans(self) -> None:
        """bwrap's monitor exits as soon as the jail's pid 1 reports the exit code (or when we kill
        it), orphaning pid 1 to us, a child subreaper: remember the jail's processes to reap it."""
        self.orphans.update(p for p in self.cg.pids() if p != self.proc.pid)

    def _set_cpu_weight(self, cg: JobCgroup, weight: int) -> None:
        try:
            cg.set_cpu_weight(weight)
        except CgroupError as e:  # a scheduling preference, not a protection: run without it
            log.warning("jail %s: %s", self.name, e)

    # ---- the job ------------------------------------------------------------------------------

    async def execute(self, job: Job, profile: Profile, cancel: trio.Event | None = None,
                      queued_ms: float = 0.0, on_log: Callable[[dict], None] | None = None) -> Result:
        """Deliver `job` and return its result as soon as it is decided; `life` tears down after.

        `profile` is the job's own (possibly lowered per request): wall, CPU, output and log limits
        are the host's to enforce, so they are taken from it."""
        if self.job is not None:  # the invariant, not a tenant's doing: never a second job
            raise RuntimeError(f"{self!r} already ran job {self.job.id}")
        self.t_taken = time.monotonic()
        self.job, self.job_profile, self.queued_ms = job, profile, queued_ms
        try:
            if self.fail is not None:
                return _internal(job, profile, *self.fail)
            if self.state != "ready":  # boot failed (the facts say why) or died in the pool
                if self.state == "dead":
                    return _internal(job, profile, "jail_lost", "the warm jail died before its job")
                return self._result()
            self.state = "running"
            self.logs = LogSink(profile.limits.log_bytes, on_log)
            self.output.limit = profile.limits.output_bytes
            self.session.ctx = CallContext(job.id, profile.tenant, profile, self.logs)
            async with trio.open_nursery() as control:
                if cancel is not None:
                    control.start_soon(self._watch_cancel, cancel)
                await self._drive(control)
                control.cancel_scope.cancel()
            if self.facts.killed_for is not None:
                # A limit or a cancel: not the fast path. Let the exit status show the kill.
                with trio.move_on_after(EXIT_GRACE_S):
                    await self.exited.wait()
            return self._result()
        except OSError as e:
            log.exception("job %s: host failure", job.id)
            return _internal(job, profile, "host_error", f"{e.__class__.__name__}: {e}")
        finally:
            self.state = "done" if self.state == "running" else self.state
            self._done.set()

    def kill(self, reason: str) -> None:
        """The host's own verdict: first reason wins, the whole cgroup dies at once."""
        if self.facts.killed_for is None:
            self.facts.killed_for = reason
        self.kill_quietly()

    def kill_quietly(self) -> None:
        if self.cg is not None:
            try:
                if self.proc is not None:
                    self._note_orphans()  # killed together with the monitor, pid 1 comes to us
                self.cg.kill()
            except (OSError, CgroupError) as e:
                log.warning("jail %s: cgroup kill failed: %s", self.name, e)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def _drive(self, nursery: trio.Nursery) -> None:
        """Deliver, then wait for result / idle / exit under the wall and CPU limits."""
        lim = self.job_profile.limits
        session, exited = self.session, self.exited
        # Accounting starts here so the runtime's own start is not charged.
        self.cpu_base_ns = self.cg.cpu_ns()
        job = self.job
        try:
            await session.deliver({"id": job.id, "filename": job.filename, "code": job.code,
                                   "entry": job.entry or self.profile.runtime.entry, "input": job.input})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # killed meanwhile (cancel) or died after hello: the facts and exit status decide
        self.t_delivered = time.monotonic()
        if self.warm:  # after the send: the v1 cpu.shares write costs ~0.2 ms, the job need not wait
            self._set_cpu_weight(self.cg, JOB_CPU_WEIGHT)
        nursery.start_soon(session.serve)
        nursery.start_soon(self._watch_cpu)

        # Wait for the handler to complete (or the script to end) within the wall limit.
        deadline = trio.current_time() + lim.wall_time_s
        with trio.move_on_at(deadline) as wall:
            await _first(session.result_event.wait, exited.wait)
            if self.facts.script_mode:
                await exited.wait()
        self.t_result = time.monotonic()
        if wall.cancelled_caught:
            self.kill("timeout")
            return
        if not exited.is_set():
            # Linger: pending async work may still run (and throw) briefly, then the runtime says
            # idle. Past the linger the handler's result stands and the jail dies. Once idle the
            # result is final: reply now, the exit and namespace teardown happen after the reply.
            with trio.move_on_at(min(deadline, trio.current_time() + lim.linger_s)):
                await session.idle_event.wait()
            if session.idle_event.is_set() and not exited.is_set():
                self._drain_output()  # written before `idle` was sent, so already in the pipes
                return
        if exited.is_set():
            # Frames written just before the exit may still be in the socket: read them to EOF.
            with trio.move_on_after(EXIT_GRACE_S):
                await session.idle_event.wait()

    def _drain_output(self) -> None:
        """Take what the pipes hold right now without waiting (the readers may not have run yet)."""
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            while True:
                try:
                    data = os.read(stream.fileno(), 65536)  # non-blocking: trio's FdStream set it
                except OSError:  # EAGAIN: empty for now; EBADF: reader saw EOF and closed it
                    break
                if not data:
                    break
                if not self.output.add(name, data):
                    self.kill("output_limit")
                    return

    async def _watch_cpu(self) -> None:
        """CPU budget from cgroup accounting (all processes), polled no more often than needed."""
        lim = self.job_profile.limits
        budget = int(lim.cpu_time_s * 1e9)
        parallel = lim.cpu_cores if lim.cpu_cores > 0 else float(os.cpu_count() or 1)
        while True:
            used = self.cg.cpu_ns() - self.cpu_base_ns
            if used >= budget:
                self.kill("cpu_limit")
                return
            # The soonest the budget could run out, at full speed on every allowed core.
            await trio.sleep(max(0.005, (budget - used) / 1e9 / parallel))

    async def _watch_cancel(self, cancel: trio.Event) -> None:
        await cancel.wait()
        self.kill("cancelled")

    async def _read_output(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                if not self.output.add(name, data):
                    self.kill("output_limit")
                    return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    def _result(self) -> Result:
        f = self.facts
        job, profile = self.job, self.job_profile
        rc = self.proc.returncode if self.proc is not None else None
        if rc is not None:
            if rc < 0:
                f.exit_signal = -rc
            elif rc > 128:  # bwrap reports a payload killed by signal N as 128 + N
                f.exit_signal = rc - 128
            else:
                f.exit_code = rc
        usage = None
        if self.cg is not None:
            try:
                usage = self.cg.usage()
                f.oom_kills = usage.oom_kills
            except (OSError, CgroupError) as e:
                log.warning("job %s: reading cgroup usage failed: %s", job.id, e)
        status, error, reason = decide(f)
        now = time.monotonic()
        end = self.t_result or now
        res = Result(id=job.id, tenant=profile.tenant, status=status, error=error, reason=reason,
                     profile_digest=profile.digest)
        if status == "ok" and f.result is not None:
            res.result = f.result.get("result")
        res.stdout, res.stderr = self.output.text("stdout"), self.output.text("stderr")
        res.logs = self.logs.records
        res.truncated = {**self.output.truncated, "logs": self.logs.truncated}
        res.exit = {"code": f.exit_code, "signal": f.exit_signal}
        if usage is not None:
            res.usage = {
                "wall_ms": _ms(self.t_delivered, end),
                "cpu_ms": round(max(0, usage.cpu_ns - self.cpu_base_ns) / 1e6, 3) if self.t_delivered else 0.0,
                "memory_peak_bytes": usage.memory_peak_bytes,
            }
        # start_ms: what starting the jail cost this job (a warm jail: only the hand-over).
        start = self.t_taken if self.warm else self.t_boot
        res.timings = {"queued_ms": round(self.queued_ms, 3), "start_ms": _ms(start, self.t_delivered),
                       "run_ms": _ms(self.t_delivered, end), "warm": self.warm}
        return res

    def _kill_pid_namespace(self) -> None:
        """One signal instead of a cgroup freeze-and-kill in the event loop: bwrap's monitor dies,
        --die-with-parent kills the jail's pid 1, and with it the kernel SIGKILLs everything in its
        pid namespace (nothing there can fork any more). The cgroup kill in `destroy` (a worker
        thread) still follows, and checks the cgroup is empty."""
        if self.proc is None:
            return
        if self.cg is not None and self.proc.returncode is None and not self.orphans:
            try:
                self._note_orphans()  # done at boot after hello; this is for a jail ended before
            except (OSError, CgroupError):
                pass
        self.proc.kill()  # not yet reaped by us: its pid cannot have been reused

    async def _cleanup(self, job_dir: str) -> None:
        if self._listener is not None:
            self._listener.close()  # boot cancelled or failed midway
        if self.session is not None:
            await self.session.stream.aclose()
        self._kill_pid_namespace()
        if self.proc is not None:
            with trio.move_on_after(5):
                await self.proc.wait()
            for s in (self.proc.stdout, self.proc.stderr):
                if s is not None:
                    await s.aclose()
        def remove() -> bool:
            # A worker thread: cgroup removal and unlinking the socket (a mount point in the dying
            # jail's mount namespace) block for up to ~1 ms in the kernel; the event loop must not.
            emptied = True
            if self.cg is not None:
                try:
                    self.cg.destroy()
                except (OSError, CgroupError) as e:
                    emptied = False
                    log.error("jail %s: cgroup not removed: %s", self.name, e)
            shutil.rmtree(job_dir, ignore_errors=True)
            return emptied

        emptied = await trio.to_thread.run_sync(remove)
        await _reap(self.orphans)
        if self.ident is not None and emptied:
            # Only now, and only if no process of this jail can be left to share the uid with
            # the next jail (a stuck one keeps its slot until the daemon restarts).
            self.ident.release()


async def _reap(pids: set[int]) -> None:
    """Reap jail processes reparented to us; only these pids, never trio's own children.

    Called once bwrap's monitor has been reaped (so reparenting is done) and the cgroup is empty;
    a pid may still be between leaving its cgroup and becoming a zombie: retry briefly.
    """
    for pid in pids:
        for _ in range(1000):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # reaped by its own parent, or never ours
            if done:
                break
            await trio.sleep(0.001)


async def _first(*fns: Callable[[], Any]) -> None:
    """Return as soon as any of the awaitables completes."""
    async with trio.open_nursery() as n:
        for fn in fns:
            async def one(fn=fn) -> None:
                await fn()
                n.cancel_scope.cancel()
            n.start_soon(one)


def _ms(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0
    return round((b - a) * 1000, 3)

