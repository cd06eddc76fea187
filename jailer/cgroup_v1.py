"""cgroup v1 (legacy and hybrid hosts): one directory per job in each required hierarchy.

Files used (Documentation/admin-guide/cgroup-v1/*.rst):

| what                   | file                                                                  |
|------------------------|-----------------------------------------------------------------------|
| memory limit, no swap  | memory.limit_in_bytes, then memory.memsw.limit_in_bytes = same value  |
| OOM kill inside the cg | memory.oom_control <- "0" (oom_kill_disable 0)                        |
| OOM kills counter      | memory.oom_control, line ``oom_kill N`` (kernel >= 4.13)              |
| memory peak            | memory.memsw.max_usage_in_bytes (memory.max_usage_in_bytes w/o memsw) |
| pids limit / current   | pids.max / pids.current                                               |
| CPU bandwidth          | cpu.cfs_period_us = 100000, cpu.cfs_quota_us = cores * 100000         |
| CPU time               | cpuacct.usage (ns, user+system, hierarchical)                         |
| atomic kill            | freezer.state FROZEN -> SIGKILL every pid in cgroup.procs -> THAWED   |

The job directories live at the root of each hierarchy, ``<mount>/<parent>/<job>``, whatever cgroup
the daemon itself sits in (on these hosts the memory hierarchy's ``/process_api/...`` belongs to the
machine's own supervisor).

Cost note (measured on the development VMs, kernel 6.18): attaching a process to a v1 cgroup takes
``cgroup_threadgroup_rwsem`` for writing, which waits for an RCU grace period when the lock has been
idle: the first attach after idle costs ~5-9 ms of wall time (almost no CPU), back-to-back attaches
~0.03 ms for all five hierarchies. create()+destroy() of a job: ~0.45 ms. See docs/cgroups.md.
"""

from __future__ import annotations

import os
import time

from .cgroup import (
    CPU_PERIOD_US,
    CgroupBackend,
    CgroupError,
    CgroupFS,
    CgroupLimits,
    CgroupUsage,
    JobCgroup,
    _error,
    _kill_in_passes,
    _parse_flat_keyed,
    _parse_pids,
    _rmdir_tree,
    validate_name,
)

__all__ = ["REQUIRED_CONTROLLERS", "CgroupV1Backend", "CgroupV1Job"]

#: Controllers a v1 host must have mounted, in the order procs files are written.
REQUIRED_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")

# How long kill() spins waiting for FREEZING -> FROZEN before killing anyway (then repeats passes).
_FREEZE_WAIT_S = 0.05


class CgroupV1Job(JobCgroup):
    """A job's directories, one per required v1 hierarchy (cpu and cpuacct may share one)."""

    def __init__(self, name: str, dirs: dict[str, str], *, fs: CgroupFS, memsw: bool) -> None:
        self.name = name
        self._fs = fs
        self._dirs = dict(dirs)  # controller -> directory
        unique: list[str] = []
        for ctrl in REQUIRED_CONTROLLERS:
            d = self._dirs.get(ctrl)
            if d is not None and d not in unique:
                unique.append(d)
        self.paths = tuple(unique)
        self.procs_files = tuple(os.path.join(d, "cgroup.procs") for d in unique)
        self._memsw = memsw
        self._cpuacct_usage = os.path.join(self._dirs.get("cpuacct", ""), "cpuacct.usage")

    # -- set-up (during create) --------------------------------------------------------------

    def _apply(self, limits: CgroupLimits) -> None:
        mem = self._dirs["memory"]
        writes = [(os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_max_bytes))]
        if self._memsw:
            # memsw >= limit must hold at every step: the limit is lowered first, memsw second.
            writes.append((os.path.join(mem, "memory.memsw.limit_in_bytes"), str(limits.memory_max_bytes)))
        # The kernel must OOM-kill inside the cgroup, never pause the job waiting for an OOM handler.
        writes.append((os.path.join(mem, "memory.oom_control"), "0"))
        writes.append((os.path.join(self._dirs["pids"], "pids.max"), str(limits.pids_max)))
        quota = limits.cpu_quota_us()
        if quota is not None:
            cpu = self._dirs["cpu"]
            writes.append((os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US)))
            writes.append((os.path.join(cpu, "cpu.cfs_quota_us"), str(quota)))
        for path, value in writes:
            try:
                self._fs.write_text(path, value)
            except OSError as exc:
                raise _error(f"cannot set {value!r} for job cgroup {self.name!r}", path, exc) from exc

    # -- running -----------------------------------------------------------------------------

    def cpu_ns(self) -> int:
        try:
            return int(self._fs.read_text(self._cpuacct_usage))
        except OSError as exc:
            raise _error(f"cannot read CPU usage of job cgroup {self.name!r}", self._cpuacct_usage, exc) from exc

    def usage(self) -> CgroupUsage:
        mem = self._dirs["memory"]
        peak_file = "memory.memsw.max_usage_in_bytes" if self._memsw else "memory.max_usage_in_bytes"
        path = ""
        try:
            path = os.path.join(mem, peak_file)
            peak = int(self._fs.read_text(path))
            path = os.path.join(mem, "memory.oom_control")
            oom = _parse_flat_keyed(self._fs.read_text(path)).get("oom_kill", 0)
            path = os.path.join(self._dirs["pids"], "pids.current")
            pids_current = int(self._fs.read_text(path))
        except OSError as exc:
            raise _error(f"cannot read usage of job cgroup {self.name!r}", path, exc) from exc
        return CgroupUsage(cpu_ns=self.cpu_ns(), memory_peak_bytes=peak, oom_kills=oom, pids_current=pids_current)

    def _procs(self) -> set[int]:
        pids: set[int] = set()
        for path in self.procs_files:
            try:
                pids.update(_parse_pids(self._fs.read_text(path)))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error(f"cannot list processes of job cgroup {self.name!r}", path, exc) from exc
        return pids

    def pids(self) -> list[int]:
        return sorted(self._procs())

    def is_empty(self) -> bool:
        for path in self.procs_files:
            try:
                if self._fs.read_text(path).strip():
                    return False
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error(f"cannot list processes of job cgroup {self.name!r}", path, exc) from exc
        return True

    # -- teardown ----------------------------------------------------------------------------

    def kill(self) -> None:
        """Freeze, SIGKILL every process listed in any hierarchy, thaw.

        Frozen tasks cannot fork or exit, so the listing is complete and its pids cannot be reused
        while we signal them; the SIGKILLs take effect at thaw. If the freezer is missing or the
        cgroup stays FREEZING (a task in uninterruptible sleep), kill anyway in repeated passes until
        no new pid shows up. Does not wait for the processes to die.
        """
        state = os.path.join(self._dirs["freezer"], "freezer.state") if "freezer" in self._dirs else None
        frozen = False
        if state is not None:
            try:
                self._fs.write_text(state, "FROZEN")
                frozen = True
            except FileNotFoundError:
                pass  # directory already gone
            except OSError as exc:
                raise _error(f"cannot freeze job cgroup {self.name!r}", state, exc) from exc
        try:
            if frozen:
                deadline = time.monotonic() + _FREEZE_WAIT_S
                while time.monotonic() < deadline:
                    try:
                        if self._fs.read_text(state).strip() == "FROZEN":
                            break
                    except OSError:
                        break  # gone or unreadable: kill in passes below
                    time.sleep(0.0002)
            _kill_in_passes(self._procs)
        finally:
            if frozen:
                try:
                    self._fs.write_text(state, "THAWED")
                except FileNotFoundError:
                    pass

    def _write_cpu_weight(self, weight: int) -> None:
        path = os.path.join(self._dirs["cpu"], "cpu.shares")
        shares = max(2, weight * 1024 // 100)  # v1 default 1024 = v2 default 100; kernel minimum 2
        try:
            self._fs.write_text(path, str(shares))
        except OSError as exc:
            raise _error(f"cannot set cpu.shares of job cgroup {self.name!r}", path, exc) from exc

    def remove(self) -> None:
        errors = [e for e in (_rmdir_tree(self._fs, d) for d in self.paths) if e]
        if errors:
            raise CgroupError(
                f"cannot remove job cgroup {self.name!r}: " + "; ".join(errors)
                + " (kill() it and wait until is_empty() first)"
            )


class CgroupV1Backend(CgroupBackend):
    """Job cgroups at ``<hierarchy mount>/<parent>/<job>`` in memory, pids, cpu, cpuacct, freezer."""

    version = 1

    def __init__(
        self,
        parent: str,
        hierarchies: dict[str, str],
        *,
        fs: CgroupFS | None = None,
        swap_enabled: bool = False,
        notes: list[str] | None = None,
    ) -> None:
        """``hierarchies`` maps each mounted v1 controller to its mount point (co-mounted
        controllers such as ``cpu,cpuacct`` map to the same path). Raises CgroupError if a required
        controller is missing, or if swap is on and memory+swap cannot be limited."""
        self.parent = validate_name(parent, what="cgroup parent name")
        self._fs = fs if fs is not None else CgroupFS()
        self._hier = dict(hierarchies)
        self._notes = list(notes or [])
        self._swap = swap_enabled
        self.missing = [c for c in REQUIRED_CONTROLLERS if c not in self._hier]
        if self.missing:
            raise CgroupError(
                "cgroup v1 controller(s) not mounted: " + ", ".join(self.missing)
                + ". Mount each one (e.g. mount -t cgroup -o "
                + self.missing[0] + " cgroup /sys/fs/cgroup/" + self.missing[0]
                + ") or boot with systemd.unified_cgroup_hierarchy=1 to use cgroup v2; "
                "jailer refuses to run jobs without them"
            )
        self._mounts: list[str] = []
        for ctrl in REQUIRED_CONTROLLERS:
            if self._hier[ctrl] not in self._mounts:
                self._mounts.append(self._hier[ctrl])
        self.parent_paths = tuple(os.path.join(m, self.parent) for m in self._mounts)
        mem_root = self._hier["memory"]
        self.memsw = self._fs.exists(os.path.join(mem_root, "memory.memsw.limit_in_bytes"))
        if not self.memsw and self._swap:
            raise CgroupError(
                "swap is enabled (/proc/swaps) but the v1 memory controller has no "
                "memory.memsw.* files, so a job could use unlimited swap: boot with "
                "swapaccount=1 (CONFIG_MEMCG_SWAP) or disable swap (swapoff -a)"
            )
        if not self.memsw:
            self._notes.append("no memory.memsw.*: swap is off, memory.limit_in_bytes alone limits memory")
        self._parent_ready = False

    def _job_dirs(self, name: str) -> dict[str, str]:
        return {c: os.path.join(self._hier[c], self.parent, name) for c in REQUIRED_CONTROLLERS}

    def ensure_parent(self) -> None:
        if self._parent_ready:
            return
        for path in self.parent_paths:
            try:
                self._fs.mkdir(path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _error("cannot create the jailer parent cgroup", path, exc) from exc
        self._parent_ready = True

    def create(self, name: str, limits: CgroupLimits) -> CgroupV1Job:
        validate_name(name)
        if not isinstance(limits, CgroupLimits):
            raise TypeError("limits must be a CgroupLimits")
        self.ensure_parent()
        dirs = self._job_dirs(name)
        made: list[str] = []
        try:
            for ctrl in REQUIRED_CONTROLLERS:
                path = dirs[ctrl]
                if path in made:
                    continue  # cpu,cpuacct co-mounted
                try:
                    try:
                        self._fs.mkdir(path)
                    except FileNotFoundError:
                        # Another process (a `jailer run` finishing) removed our empty parent
                        # between ensure_parent() and here: make it again, once.
                        self._parent_ready = False
                        self.ensure_parent()
                        self._fs.mkdir(path)
                except FileExistsError as exc:
                    raise CgroupError(
                        f"job cgroup {path} already exists: job names must be unique "
                        "(a leftover from a crashed daemon is removed by cleanup_stale())"
                    ) from exc
                except OSError as exc:
                    raise _error(f"cannot create job cgroup {name!r}", path, exc) from exc
                made.append(path)
            job = CgroupV1Job(name, dirs, fs=self._fs, memsw=self.memsw)
            job._apply(limits)
            return job
        except BaseException:
            for path in reversed(made):
                try:
                    self._fs.rmdir(path)
                except OSError:
                    pass
            raise

    def _existing_jobs(self) -> dict[str, dict[str, str]]:
        jobs: dict[str, dict[str, str]] = {}
        for ctrl in REQUIRED_CONTROLLERS:
            parent = os.path.join(self._hier[ctrl], self.parent)
            try:
                names = self._fs.listdir(parent)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error("cannot list the jailer parent cgroup", parent, exc) from exc
            for n in names:
                path = os.path.join(parent, n)
                if self._fs.exists(os.path.join(path, "cgroup.procs")):
                    jobs.setdefault(n, {})[ctrl] = path
        return jobs

    def cleanup_stale(self, timeout_s: float = 2.0) -> list[str]:
        removed = []
        for name, dirs in sorted(self._existing_jobs().items()):
            CgroupV1Job(name, dirs, fs=self._fs, memsw=self.memsw).destroy(timeout_s)
            removed.append(name)
        return removed

    def remove_parent(self) -> None:
        for path in self.parent_paths:
            try:
                self._fs.rmdir(path)
            except OSError:
                pass  # not empty (EBUSY) or already gone
        self._parent_ready = False

    def describe(self) -> dict:
        available = sorted(self._hier)
        return {
            "version": 1,
            "hierarchies": {c: self._hier[c] for c in REQUIRED_CONTROLLERS},
            "controllers_available": available,
            "controllers_required": list(REQUIRED_CONTROLLERS),
            "controllers_missing": list(self.missing),
            "parent_paths": list(self.parent_paths),
            "delegated": False,
            "supervisor_leaf": None,
            "memsw": self.memsw,
            "swap_enabled": self._swap,
            "notes": [
                *self._notes,
                (
                    "v1: the first attach after idle waits for an RCU grace period (~5-9 ms wall); "
                    "attach while pre-spawning (warm pool) to keep it off the job's path"
                ),
            ],
        }
