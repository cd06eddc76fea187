"""`jailer serve`: the trio supervisor.

Accepts jobs from socket clients (server.py), admits and orders them fairly (scheduler.py), runs
each in a fresh jail (jailer.runner), brokers every capability, reloads profiles on SIGHUP, drains
on SIGTERM. A tenant's failure is a result record; only the daemon's own failures are exceptions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import resource
import signal
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from jailer.broker import Capability, default_providers
from jailer.cgroup import CgroupError, detect
from jailer.identity import IdentityPool
from jailer.plan import RUNTIME_BY_EXTENSION, runtime_for
from jailer.profile import SCHEMA as PROFILE_SCHEMA
from jailer.profile import Profile, ProfileError, builtin_defaults, check_value, load_dir
from jailer.result import Result, rejected
from jailer.runner import Job, Runner, new_job_id

from . import systemd
from .auth import Peer, is_admin, may_act_for
from .config import Config, ceiling_errors, load_config
from .metrics import Metrics
from .pool import Pools
from .scheduler import CancelledWhileQueued, Rejected, Scheduler, TenantPolicy

log = logging.getLogger("jailer.daemon")
audit = logging.getLogger("jailer.audit")

SCRIPT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FILENAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_CODE_BYTES = 1024 * 1024
FINISHED_KEPT = 10_000  # finished jobs remembered for `status`
# Per-request limits a client may set: only lower than the profile's.
REQUEST_LIMITS = {"wall_time": "wall_time_s", "cpu_time": "cpu_time_s", "memory": "memory_bytes",
                  "pids": "pids", "tmpfs": "tmpfs_bytes", "output": "output_bytes", "log": "log_bytes"}


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class JobState:
    id: str
    tenant: str
    uid: int
    state: str = "queued"  # queued | running | done
    cancel: trio.Event = field(default_factory=trio.Event)
    status: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None, *,
                 providers: dict[str, Capability] | None = None):
        self.config = config
        self.config_path = config_path
        self.profiles: dict[str, Profile] = {}
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.concurrency)
        self.jobs: dict[str, JobState] = {}
        self.finished: OrderedDict[str, JobState] = OrderedDict()
        self.running = 0
        self.active_requests = 0  # client requests being handled (a reply not yet queued)
        self.connections: set = set()
        self.idle = trio.Event()  # set whenever running and active_requests are both 0 (shutdown)
        self.accepting = True
        self.extra_providers = providers or {}
        self.runner: Runner | None = None
        self.pools: Pools | None = None
        self.cgroups = None
        self.listeners: list[trio.SocketListener] = []
        self.ready = trio.Event()
        self.metrics_address: tuple | None = None
        self._own_socket: str | None = None  # path we bound (not systemd's), unlinked at exit
        self._closers: list[Callable[[], Any]] = []
        self.metrics.running.fn = lambda: {(): float(self.running)}
        self.metrics.queued.fn = lambda: {(t,): float(s.queued)
                                          for t, s in self.scheduler.statistics().tenants.items()}
        self.metrics.pool_jails.fn = lambda: {(p.tenant, p.runtime, state): float(getattr(p, state))
                                              for p in self._pool_stats() for state in ("warm", "starting", "taken")}
        self.metrics.pool_events.fn = lambda: {(p.tenant, p.runtime, ev): float(getattr(p, ev))
                                               for p in self._pool_stats()
                                               for ev in ("hits", "misses", "cold_fallbacks", "boot_failures",
                                                          "retired")}

    def _pool_stats(self) -> list:
        return list(self.pools.statistics().values()) if self.pools is not None else []

    # ---- start-up ------------------------------------------------------------------------------

    def load_profiles(self) -> list[str]:
        """(Re)load every profile; a bad one keeps its last good version. Returns the errors."""
        directory = self.config.get("paths", "profiles")
        if not os.path.isdir(directory):
            # No profile directory: one built-in tenant, "default", for root (the README demo).
            self.profiles = {"default": builtin_defaults()} if not self.profiles else self.profiles
            return []
        new, errors = load_dir(directory)
        for tenant, prof in list(new.items()):
            errs = ceiling_errors(self.config, prof)
            if errs:
                errors.extend(errs)
                del new[tenant]
        kept = []
        for tenant, old in self.profiles.items():
            path = os.path.join(directory, f"{tenant}.toml")
            if tenant not in new and os.path.exists(path):
                new[tenant] = old  # still there but broken now: keep the last good version
                kept.append(tenant)
        self.profiles = new
        for tenant, prof in new.items():
            self.scheduler.update_policy(tenant, TenantPolicy.from_limits(prof.limits))
        if self.pools is not None:
            self.pools.configure(self.profiles)  # a changed profile's warm jails are retired here
        for e in errors:
            log.error("profile rejected: %s", e, extra={"event": "profile_error"})
        if kept:
            log.warning("kept the last good profile of %s", ", ".join(sorted(kept)), extra={"event": "profile_kept"})
        return errors

    def providers(self) -> dict[str, Capability]:
        from .capabilities import HttpCapability, KVCapability

        state_dir = self.config.get("paths", "state_dir")
        kv = KVCapability(state_dir)
        http = HttpCapability(allow_internal=self.config.get("http", "allow_internal"))
        self._closers += [kv.close, http.aclose]
        prov = default_providers()
        prov.update({"kv": kv, "http": http})
        prov.update(_entry_point_providers(self.config))
        prov.update(self.extra_providers)
        return prov

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        run_dir = cfg.run_dir
        os.makedirs(run_dir, mode=0o711, exist_ok=True)
        # ~5 fds per jail (warm ones too) and one per client: take the hard limit, not the soft
        # 1024. Jails do not inherit it: jailer-exec sets their own limits.open_files.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.makedirs(cfg.get("paths", "state_dir"), mode=0o700, exist_ok=True)
        try:
            self.cgroups = detect(cfg.get("jails", "cgroup_parent"))
            self.cgroups.ensure_parent()  # v2: move ourselves into supervisor/ first (Delegate=yes)
        except CgroupError as e:
            raise SystemExit(f"jailer serve: cgroups: {e}") from None
        stale = self.cgroups.cleanup_stale()  # jobs of a previous daemon killed with SIGKILL
        if stale:
            log.warning("removed %d stale job cgroups from a previous run", len(stale), extra={"event": "stale"})
        _clean_stale_job_dirs(os.path.join(run_dir, "jobs"))
        self.load_profiles()
        self.runner = Runner(run_dir, self.cgroups, IdentityPool(os.path.join(run_dir, "uids"),
                                                                 cfg.get("jails", "uid_base"),
                                                                 cfg.get("jails", "uid_count")),
                             providers=self.providers())
        self.runner.on_call = self._on_call
        self.pools = Pools(self.runner, cfg.get("jails", "pool_max"))
        self.listeners = await self._open_listeners()
        from .server import handle_connection

        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._signals)
                await nursery.start(self.pools.run)  # every jail lives (and is torn down) in there
                self.pools.configure(self.profiles)
                if cfg.get("metrics", "address"):
                    from .metrics import serve_metrics
                    host, _, port = cfg.get("metrics", "address").rpartition(":")
                    self.metrics_address = await nursery.start(serve_metrics, self.metrics, host or "127.0.0.1",
                                                               int(port))
                # Connections live in `nursery`; accepting has its own scope so SIGTERM can stop it
                # without touching connections already open.
                self.accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with self.accept_scope:
                        async with trio.open_nursery() as acceptors:
                            for lst in self.listeners:
                                acceptors.start_soon(_accept_loop, lst, nursery,
                                                     lambda s: handle_connection(self, s))

                nursery.start_soon(accept)
                systemd.notify("READY=1\nSTATUS=accepting jobs")
                log.info("serving", extra={"event": "ready", "socket": cfg.socket_path,
                                           "tenants": sorted(self.profiles), "cgroup_version": self.cgroups.version})
                self.ready.set()
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                for close in self._closers:
                    r = close()
                    if hasattr(r, "__await__"):
                        await r
                self.cgroups.cleanup_stale()
                self.cgroups.remove_parent()
                if self._own_socket:
                    try:
                        os.unlink(self._own_socket)
                    except OSError:
                        pass

    async def _open_listeners(self) -> list[trio.SocketListener]:
        activated = systemd.listen_fds()
        if activated:
            return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in activated]
        path = self.config.socket_path
        try:
            os.unlink(path)  # a stale socket from a killed daemon
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # never world-connectable, even for an instant
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        group = self.config.get("server", "socket_group")
        if group:
            from .auth import resolve_gid
            os.chown(path, 0, resolve_gid(group))
        os.chmod(path, int(self.config.get("server", "socket_mode"), 8))
        sock.listen(512)
        self._own_socket = path
        return [trio.SocketListener(sock)]

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    self.reload()
                else:
                    await self.shutdown()
                    return

    def reload(self) -> None:
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        errors: list[str] = []
        if self.config_path:
            try:
                new = load_config(self.config_path)
                if new.socket_path != self.config.socket_path:
                    log.warning("server.socket changed: takes effect after a restart")
                self.config = new
                self.pools.max_total = new.get("jails", "pool_max")
            except ProfileError as e:
                errors += e.errors
                for err in e.errors:
                    log.error("config rejected, keeping the old one: %s", err, extra={"event": "config_error"})
        errors += self.load_profiles()
        self.metrics.reloads.inc("ok" if not errors else "partial")
        log.info("reloaded", extra={"event": "reload", "tenants": sorted(self.profiles), "errors": len(errors)})
        systemd.notify("READY=1")

    async def shutdown(self) -> None:
        """SIGTERM: stop accepting, let running jobs finish within the drain deadline, kill the rest."""
        systemd.notify("STOPPING=1")
        self.accepting = False
        self.accept_scope.cancel()
        for lst in self.listeners:
            await lst.aclose()
        self.scheduler.close()
        self.pools.close()  # warm jails go now; running jobs keep theirs
        drain = self.config.get("shutdown", "drain")
        log.info("draining", extra={"event": "drain", "running": self.running, "deadline_s": drain})
        with trio.move_on_after(drain):
            await self._wait_idle()
        for st in list(self.jobs.values()):
            st.cancel.set()  # the runner kills the jail's whole cgroup and cleans up
        with trio.move_on_after(10):
            await self._wait_idle()
        # Every result is queued for its client by now: let the writers flush, then stop.
        for conn in list(self.connections):
            conn.send_out.close()
        with trio.move_on_after(2):
            for conn in list(self.connections):
                await conn.flushed.wait()
        self.nursery.cancel_scope.cancel()

    async def _wait_idle(self) -> None:
        while self.running or self.active_requests:
            self.idle = trio.Event()
            await self.idle.wait()

    def _maybe_idle(self) -> None:
        if not self.running and not self.active_requests:
            self.idle.set()

    # ---- jobs ----------------------------------------------------------------------------------

    def _on_call(self, tenant: str, cap: str, granted: bool) -> None:
        (self.metrics.broker_calls if granted else self.metrics.broker_denials).inc(tenant, cap)

    def build_job(self, peer: Peer, req: dict) -> tuple[Job, Profile, str | None]:
        """Validate a submit request into (job, effective profile, runtime). Raises BadRequest."""
        tenant = req.get("tenant")
        if not isinstance(tenant, str):
            raise BadRequest("submit: field 'tenant' must be a string")
        profile = self.profiles.get(tenant)
        if profile is None or not may_act_for(peer, profile, self.config.get("server", "admin_group")):
            who = f"uid {peer.uid}"
            if profile is None and is_admin(peer, self.config.get("server", "admin_group")):
                raise BadRequest(f"unknown tenant {tenant[:64]!r}", "unknown_tenant")
            raise BadRequest(f"{who} may not submit jobs as tenant {tenant[:64]!r}", "forbidden")
        code, filename = self._code_of(tenant, req)
        entry = req.get("entry")
        if entry is not None and (not isinstance(entry, str) or not PROFILE_SCHEMA["runtime"]["entry"].pattern.match(entry)):
            raise BadRequest("submit: field 'entry' must be an identifier")
        runtime = req.get("runtime")
        if runtime is not None:
            if runtime not in ("node", "python"):
                raise BadRequest("submit: field 'runtime' must be 'node' or 'python'")
            if profile.runtime.name not in ("auto", runtime):
                raise BadRequest(f"submit: tenant {tenant!r} runs {profile.runtime.name}, not {runtime}")
        else:
            try:
                runtime = runtime_for(profile, filename)
            except ValueError as e:
                raise BadRequest(f"submit: {e}") from None
        limits = req.get("limits")
        if limits is not None:
            profile = _lower_limits(profile, limits)
        job = Job(filename=filename, code=code, input=req.get("input"), entry=entry)
        return job, profile, runtime

    def _code_of(self, tenant: str, req: dict) -> tuple[str, str]:
        if "code" in req and "script" in req:
            raise BadRequest("submit: give either 'code' or 'script', not both")
        if "code" in req:
            code = req["code"]
            filename = req.get("filename", "handler.js" if req.get("runtime") != "python" else "handler.py")
            try:
                too_big = not isinstance(code, str) or len(code.encode()) > MAX_CODE_BYTES
            except UnicodeEncodeError:
                raise BadRequest("submit: field 'code' is not valid Unicode (a lone surrogate)") from None
            if too_big:
                raise BadRequest(f"submit: field 'code' must be a string of at most {MAX_CODE_BYTES} bytes")
            if not isinstance(filename, str) or not FILENAME_RE.match(filename) or filename.startswith("."):
                raise BadRequest("submit: field 'filename' must be a plain file name like 'handler.js'")
            return code, filename
        name = req.get("script")
        if not isinstance(name, str) or not SCRIPT_NAME_RE.match(name):
            raise BadRequest("submit: needs 'code' (a string) or 'script' (a script name: letters, digits, _ and -)")
        base = os.path.join(self.config.get("paths", "scripts"), tenant)
        for ext in RUNTIME_BY_EXTENSION:
            path = os.path.join(base, name + ext)
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read(MAX_CODE_BYTES + 1), name + ext
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as e:
                raise BadRequest(f"submit: script {name!r} cannot be read: {e}") from None
        raise BadRequest(f"submit: tenant {tenant!r} has no script named {name!r}", "unknown_script")

    async def submit(self, peer: Peer, req: dict, emit: Callable[[dict], Any] | None = None,
                     emit_nowait: Callable[[dict], Any] | None = None) -> Result:
        """Run one job for a client; always returns a result record (rejected when it never ran).

        `emit` (async) sends the `accepted` event; `emit_nowait` streams log events (dropped for
        a client too slow to read them: they are in the result record anyway)."""
        t0 = time.monotonic()
        job_id = new_job_id()
        tenant = req.get("tenant") if isinstance(req.get("tenant"), str) else "?"
        try:
            job, profile, runtime = self.build_job(peer, req)
        except BadRequest as e:
            self.metrics.jobs.inc(tenant if tenant in self.profiles else "(unknown)", "rejected")
            res = rejected(job_id, tenant[:64], e.code, e.message)
            self._audit(peer, res, None)
            return res
        job.id = job_id
        if not self.accepting:
            return self._reject(peer, job, profile, "shutting_down", "the daemon is shutting down")
        try:
            ticket = self.scheduler.submit(profile.tenant, TenantPolicy.from_limits(profile.limits), job.id)
        except Rejected as e:
            return self._reject(peer, job, profile, e.reason, e.message)
        st = JobState(job.id, profile.tenant, peer.uid)
        self.jobs[job.id] = st
        if emit is not None:
            await emit({"event": "accepted", "job": job.id})
        try:
            try:
                queued_s = await ticket.wait_turn()
            except CancelledWhileQueued:
                res = Result(id=job.id, tenant=profile.tenant, status="cancelled", profile_digest=profile.digest)
                res.timings["queued_ms"] = round((time.monotonic() - t0) * 1000, 3)
                return self._finish(peer, st, res, t0)
            except Rejected as e:
                return self._finish(peer, st, _rejected_with(job, profile, e.reason, e.message), t0)
            st.state = "running"
            self.running += 1
            self.metrics.queue_wait.observe(queued_s, profile.tenant)
            try:
                on_log = None
                if emit_nowait is not None and req.get("stream"):
                    def on_log(record: dict) -> None:
                        emit_nowait({"event": "log", "job": job.id, "record": record})
                jail = self.pools.take(profile, runtime) if self.pools is not None else None
                try:
                    res = await self.runner.run(job, profile, cancel=st.cancel, queued_ms=queued_s * 1000,
                                                on_log=on_log, runtime=runtime, jail=jail)
                finally:
                    if jail is not None:
                        self.pools.finished(jail)
            finally:
                self.running -= 1
                self._maybe_idle()
            return self._finish(peer, st, res, t0)
        finally:
            ticket.release()
            self.jobs.pop(job.id, None)

    def cancel(self, peer: Peer, job_id: Any) -> bool:
        st = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if st is None:
            return False
        if st.uid != peer.uid and not is_admin(peer, self.config.get("server", "admin_group")):
            raise BadRequest(f"job {job_id} was not submitted by uid {peer.uid}", "forbidden")
        if self.scheduler.cancel(job_id):
            return True
        st.cancel.set()
        return True

    def status(self, peer: Peer, job_id: Any) -> dict:
        st = self.jobs.get(job_id) if isinstance(job_id, str) else None
        st = st or (self.finished.get(job_id) if isinstance(job_id, str) else None)
        if st is None or (st.uid != peer.uid and not is_admin(peer, self.config.get("server", "admin_group"))):
            return {"job": job_id, "state": "unknown"}
        return {"job": st.id, "tenant": st.tenant, "state": st.state, "status": st.status}

    def stats(self, peer: Peer) -> dict:
        s = self.scheduler.statistics()
        admin = is_admin(peer, self.config.get("server", "admin_group"))
        tenants = {t: dataclasses.asdict(ts) for t, ts in s.tenants.items()
                   if admin or (t in self.profiles and may_act_for(peer, self.profiles[t]))}
        out = {"running": s.running, "queued": s.queued, "concurrency": self.config.concurrency,
               "tenants": tenants,
               "pools": {k: dataclasses.asdict(p) for k, p in (self.pools.statistics().items() if self.pools else ())
                         if admin or (p.tenant in self.profiles and may_act_for(peer, self.profiles[p.tenant]))}}
        if admin:
            out["profiles"] = {t: p.digest for t, p in sorted(self.profiles.items())}
        return out

    def _reject(self, peer: Peer, job: Job, profile: Profile, reason: str, message: str) -> Result:
        res = _rejected_with(job, profile, reason, message)
        self.metrics.jobs.inc(profile.tenant, "rejected")
        self._audit(peer, res, profile)
        return res

    def _finish(self, peer: Peer, st: JobState, res: Result, t0: float) -> Result:
        st.state, st.status = "done", res.status
        self.finished[st.id] = st
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        self.metrics.jobs.inc(res.tenant, res.status)
        self.metrics.latency.observe(time.monotonic() - t0, res.tenant)
        self._audit(peer, res, self.profiles.get(res.tenant))
        return res

    def _audit(self, peer: Peer, res: Result, profile: Profile | None) -> None:
        audit.info("job", extra={"event": "audit", "job": res.id, "tenant": res.tenant, "uid": peer.uid,
                                 "pid": peer.pid, "status": res.status, "reason": res.reason,
                                 "profile_digest": res.profile_digest, "usage": res.usage,
                                 "timings": res.timings})


async def _accept_loop(listener: trio.SocketListener, nursery: trio.Nursery, handler) -> None:
    """Accept until cancelled; each connection runs in `nursery` (which outlives accepting)."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:  # EMFILE and friends: back off, keep serving those already connected
            log.error("accept failed: %s", e, extra={"event": "accept_error"})
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handler, stream)


def _rejected_with(job: Job, profile: Profile, reason: str, message: str) -> Result:
    res = rejected(job.id, profile.tenant, reason, message)
    res.profile_digest = profile.digest
    return res


def _lower_limits(profile: Profile, limits: Any) -> Profile:
    """Apply per-request limits, which may only be lower than the profile's."""
    if not isinstance(limits, dict):
        raise BadRequest("submit: field 'limits' must be an object")
    changes = {}
    for key, value in limits.items():
        attr = REQUEST_LIMITS.get(key)
        if attr is None:
            raise BadRequest(f"submit: limits.{str(key)[:64]}: not a per-request limit "
                             f"(allowed: {', '.join(REQUEST_LIMITS)})")
        parsed, err = check_value(f"submit: limits.{key}", PROFILE_SCHEMA["limits"][key], value)
        if err:
            raise BadRequest(err)
        current = getattr(profile.limits, attr)
        if parsed > current:
            raise BadRequest(f"submit: limits.{key}: {value!r} exceeds the tenant's profile ({current})")
        changes[attr] = parsed
    return dataclasses.replace(profile, limits=dataclasses.replace(profile.limits, **changes))


def _clean_stale_job_dirs(jobs_dir: str) -> None:
    """Broker sockets of a daemon that was killed: root-owned dirs we created, safe to remove."""
    import shutil
    try:
        names = os.listdir(jobs_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(("j-", "w-")):  # cold (job id) and warm (jail name) jails
            shutil.rmtree(os.path.join(jobs_dir, name), ignore_errors=True)


def _entry_point_providers(config: Config) -> dict[str, Capability]:
    """Operator-registered capability providers: entry points in group `jailer.capabilities`,
    each a factory called with the daemon config and returning a Capability."""
    from importlib.metadata import entry_points

    out: dict[str, Capability] = {}
    for ep in entry_points(group="jailer.capabilities"):
        try:
            provider = ep.load()(config)
        except Exception:  # an operator's plug-in must not take the daemon down
            log.exception("capability provider %s failed to load", ep.name, extra={"event": "provider_error"})
            continue
        if ep.name in ("log", "kv", "http", "secrets"):
            log.error("capability provider %s shadows a built-in: ignored", ep.name)
            continue
        out[ep.name] = provider
    return out


async def main(config_path: str | None) -> None:
    cfg = load_config(config_path)
    from . import logs
    logs.setup(cfg.get("log", "format"), cfg.get("log", "level"))
    await Daemon(cfg, config_path).serve()
