"""One cgroup per job: the interface, name rules and host detection.

Two backends implement the same interface:

- ``jailer.cgroup_v1.CgroupV1Backend``: legacy/hybrid hosts; one directory per job in each of the
  memory, pids, cpu, cpuacct and freezer hierarchies.
- ``jailer.cgroup_v2.CgroupV2Backend``: unified hosts; one directory per job.

Lifecycle (ioi/isolate style, each method says when it is called):

- daemon start:   ``detect()`` -> ``backend.ensure_parent()`` -> ``backend.cleanup_stale()``
- job set-up:     ``backend.create(name, limits)`` -> the forked child writes its own pid to every
                  path in ``job.procs_files`` before it execs (or the parent calls ``job.attach(pid)``)
- job running:    ``job.cpu_ns()`` (cheap, every ~10 ms), ``job.usage()``
- job teardown:   ``job.kill()`` -> wait for ``job.is_empty()`` -> ``job.remove()``
                  (``job.destroy()`` is the blocking helper doing all three)
- daemon stop:    ``backend.cleanup_stale()`` -> ``backend.remove_parent()``

Every filesystem access goes through a ``CgroupFS`` object so that the backends can be exercised
against an in-memory fake (``tests/fakecgroupfs.py``). Failures raise ``CgroupError`` whose message
says what is missing and what the operator can do: jailer fails closed and never runs a job without
its limits.
"""

from __future__ import annotations

import abc
import errno
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "CPU_PERIOD_US",
    "MIN_CPU_QUOTA_US",
    "SUPERVISOR_LEAF",
    "CgroupBackend",
    "CgroupError",
    "CgroupFS",
    "CgroupLimits",
    "CgroupUsage",
    "InvalidCgroupName",
    "JobCgroup",
    "Mount",
    "detect",
    "parse_mountinfo",
    "swap_enabled",
    "validate_name",
]

#: CFS period used for the CPU quota on both versions (microseconds): the kernel default.
CPU_PERIOD_US = 100_000
#: The kernel rejects a CFS quota below 1 ms (``min_cfs_quota_period``, kernel/sched/core.c).
MIN_CPU_QUOTA_US = 1_000
#: Name of the leaf cgroup the daemon moves itself into on a delegated v2 subtree.
SUPERVISOR_LEAF = "supervisor"

# Every controller name the kernel knows (v1 and v2); ``<controller>.<anything>`` is the kernel's
# interface-file namespace, so a job directory may never be named like that.
_CONTROLLERS = frozenset(
    {
        "cgroup", "cpuset", "cpu", "cpuacct", "io", "blkio", "memory", "devices", "freezer",
        "net_cls", "net_prio", "perf_event", "hugetlb", "pids", "rdma", "misc", "dmem",
    }
)
# v1 core files without a dot, and our own leaf.
_RESERVED_NAMES = frozenset({"tasks", "notify_on_release", "release_agent", SUPERVISOR_LEAF})
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CgroupError(Exception):
    """The cgroup layer cannot do what was asked; the message says what is missing and what to do."""


class InvalidCgroupName(CgroupError, ValueError):
    """A job or parent name that could escape its directory or collide with a kernel file."""


def validate_name(name: str, *, what: str = "job cgroup name") -> str:
    """Return ``name`` if it is safe as one cgroup directory name, else raise InvalidCgroupName.

    Rules: 1-64 characters from ``[A-Za-z0-9_.-]``, no leading dot (so no ``.``/``..``), not a kernel
    interface-file name (``cgroup.procs``, ``memory.max``, ``cpu.anything``, ``tasks``...), and not
    our reserved ``supervisor`` leaf. Tenant-derived strings therefore never escape the parent nor
    collide with a file the kernel may create later.
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidCgroupName(
            f"invalid {what} {name!r}: use 1-64 characters from [A-Za-z0-9_.-]"
        )
    if name.startswith("."):
        raise InvalidCgroupName(f"invalid {what} {name!r}: must not start with a dot")
    if "." in name and name.split(".", 1)[0] in _CONTROLLERS:
        raise InvalidCgroupName(
            f"invalid {what} {name!r}: '<controller>.*' names are reserved for kernel interface files"
        )
    if name in _RESERVED_NAMES:
        raise InvalidCgroupName(f"invalid {what} {name!r}: reserved name")
    return name


@dataclass(frozen=True)
class CgroupLimits:
    """Per-job limits. All are mandatory: a job never runs without memory and pids limits."""

    memory_max_bytes: int  # bytes of RAM; swap is always limited to 0 (rounded down to pages)
    pids_max: int  # tasks (processes + threads) alive at once in the job
    cpu_max_cores: float  # CPU bandwidth in cores, quota/period over 100 ms; 0 = no quota

    def __post_init__(self) -> None:
        for field in ("memory_max_bytes", "pids_max"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CgroupLimits.{field} must be a positive int, got {value!r}")
        cores = self.cpu_max_cores
        if isinstance(cores, bool) or not isinstance(cores, (int, float)) or not math.isfinite(cores):
            raise ValueError(f"CgroupLimits.cpu_max_cores must be a number, got {cores!r}")
        if cores < 0:
            raise ValueError(f"CgroupLimits.cpu_max_cores must be >= 0, got {cores!r}")
        if cores and self.cpu_quota_us() < MIN_CPU_QUOTA_US:
            raise ValueError(
                f"CgroupLimits.cpu_max_cores={cores!r} is below the kernel minimum "
                f"({MIN_CPU_QUOTA_US / CPU_PERIOD_US} cores = 1 ms per {CPU_PERIOD_US // 1000} ms)"
            )

    def cpu_quota_us(self) -> int | None:
        """CFS quota in microseconds per ``CPU_PERIOD_US``, or None for no quota."""
        if not self.cpu_max_cores:
            return None
        return round(self.cpu_max_cores * CPU_PERIOD_US)


@dataclass(frozen=True)
class CgroupUsage:
    """A snapshot of a job cgroup's counters (counters since the cgroup was created)."""

    cpu_ns: int  # user+system CPU time of every task that ever ran in the cgroup
    memory_peak_bytes: int  # high-water mark of charged memory (v1: incl. swap when memsw exists)
    oom_kills: int  # processes the kernel OOM-killed because of this cgroup's limit
    pids_current: int  # tasks currently charged to the cgroup


class CgroupFS:
    """The real cgroup filesystem. The only object through which the backends touch cgroupfs.

    Errors are raised as ``OSError`` with the kernel's errno; the backends turn them into
    ``CgroupError``. cgroupfs files must be written in a single ``write(2)``: ``write_text`` does that
    and never creates or truncates files.
    """

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def read_text(self, path: str) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode()

    def write_text(self, path: str, text: str) -> None:
        data = text.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):  # cgroupfs handlers consume whole writes; never seen in practice
            raise OSError(errno.EIO, f"short write to {path}")

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def getxattr(self, path: str, name: str) -> bytes | None:
        """Extended attribute value, or None when absent/unsupported (systemd's delegation marker)."""
        try:
            return os.getxattr(path, name)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM):
                return None
            raise


class JobCgroup(abc.ABC):
    """The cgroup(s) of one job. Created by ``CgroupBackend.create``; never shared between jobs."""

    #: The validated job name (the directory name in every hierarchy).
    name: str
    #: Absolute ``cgroup.procs`` paths: a forked child writes its own pid (or "0") to each, in order,
    #: before exec. v2 has exactly one; v1 one per hierarchy.
    procs_files: tuple[str, ...]
    #: Absolute directories of this job (v1: one per hierarchy; v2: one).
    paths: tuple[str, ...]

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the job (every hierarchy on v1).

        Only safe before ``pid`` can fork: children forked earlier stay where they were.
        """
        for path in self.procs_files:
            try:
                self._fs.write_text(path, str(int(pid)))
            except OSError as exc:
                raise _error(f"cannot attach pid {pid} to job cgroup {self.name!r}", path, exc) from exc

    @abc.abstractmethod
    def usage(self) -> CgroupUsage:
        """Counters of the job (readable until ``remove()``)."""

    @abc.abstractmethod
    def cpu_ns(self) -> int:
        """CPU time used by the job so far, in ns. One small read: call it as often as every 10 ms."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Pids (thread-group ids, as seen from our pid namespace) currently in the job, sorted."""

    @abc.abstractmethod
    def is_empty(self) -> bool:
        """True when no process is left in the job (also true once its directories are gone)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process of the job at once (a fork bomb cannot outrun it). Does not wait."""

    def set_cpu_weight(self, weight: int) -> None:
        """CPU share against sibling jobs when the CPU is contended, on the v2 scale (1..10000,
        default 100): warm jails boot low and are raised at delivery. One write (v1 cpu.shares
        takes ~0.2 ms in the kernel)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 10000:
            raise ValueError(f"cpu weight must be an int in 1..10000, got {weight!r}")
        self._write_cpu_weight(weight)

    @abc.abstractmethod
    def _write_cpu_weight(self, weight: int) -> None: ...

    @abc.abstractmethod
    def remove(self) -> None:
        """rmdir every directory of the job; missing ones are fine. CgroupError if still populated."""

    def destroy(self, timeout_s: float = 2.0) -> None:
        """Blocking helper: kill, poll until empty (short sleeps), remove. Safe to call twice.

        Raises CgroupError if the job is not empty after ``timeout_s`` (a process stuck in an
        uninterruptible sleep): the directories are then left in place for ``cleanup_stale``.
        """
        deadline = time.monotonic() + timeout_s
        self.kill()
        delay = 0.0002
        next_kill = time.monotonic() + 0.1
        while not self.is_empty():
            now = time.monotonic()
            if now >= deadline:
                raise CgroupError(
                    f"job cgroup {self.name!r} still has processes {self.pids()} {timeout_s}s after "
                    f"SIGKILL; left in place ({', '.join(self.paths)}) for cleanup_stale()"
                )
            if now >= next_kill:  # belt and braces: anything that slipped past the first kill
                self.kill()
                next_kill = now + 0.1
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        self.remove()

    _fs: CgroupFS

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {list(self.paths)}>"


class CgroupBackend(abc.ABC):
    """Creates job cgroups under the daemon's parent cgroup(s)."""

    #: 1 or 2.
    version: int
    #: The directories under which job cgroups are created (v1: one per hierarchy; v2: one).
    parent_paths: tuple[str, ...]

    @abc.abstractmethod
    def ensure_parent(self) -> None:
        """Create the parent directories and enable what they need. Idempotent; called by
        ``create`` and ``cleanup_stale`` too. Call it once at daemon start-up, before READY=1."""

    @abc.abstractmethod
    def create(self, name: str, limits: CgroupLimits) -> JobCgroup:
        """mkdir the job's cgroup(s) and apply ``limits``. On any failure, remove what was made and
        raise CgroupError (also when ``name`` already exists: it is never reused)."""

    @abc.abstractmethod
    def cleanup_stale(self, timeout_s: float = 2.0) -> list[str]:
        """Kill and remove every job cgroup left under our parent (a daemon killed by SIGKILL).
        Returns the names removed. Only call it when no job of this daemon is running."""

    @abc.abstractmethod
    def remove_parent(self) -> None:
        """rmdir our parent directories if they are empty (never our own delegated cgroup)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """What ``jailer doctor`` prints: version, controllers available/missing, delegation, notes.
        Has no side effects."""


# ---------------------------------------------------------------------------------------------
# helpers shared by both backends


def _error(what: str, path: str, exc: OSError) -> CgroupError:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = (
            " (run the daemon as root, or under systemd with Delegate=yes, with /sys/fs/cgroup "
            "mounted read-write)"
        )
    return CgroupError(f"{what}: {path}: {name} ({exc.strerror}){hint}")


def _parse_pids(text: str) -> list[int]:
    return [int(tok) for tok in text.split()]


def _parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse 'key value' lines (memory.events, cpu.stat, memory.oom_control, cgroup.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def _subcgroups(fs: CgroupFS, path: str) -> list[str]:
    """Child cgroup directories of ``path`` (directories holding a cgroup.procs)."""
    try:
        names = fs.listdir(path)
    except FileNotFoundError:
        return []
    return [os.path.join(path, n) for n in names if fs.exists(os.path.join(path, n, "cgroup.procs"))]


def _rmdir_tree(fs: CgroupFS, path: str) -> str | None:
    """rmdir ``path``; only if that fails with EBUSY, remove its sub-cgroups first and retry (the
    common case costs one syscall). Returns None when the directory is gone, else what failed."""
    for attempt in range(2):
        try:
            fs.rmdir(path)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            if exc.errno != errno.EBUSY:
                return f"{path}: {code}"
            children = _subcgroups(fs, path) if attempt == 0 else []
            if not children:
                return f"{path}: EBUSY (still populated)"
            for child in children:
                err = _rmdir_tree(fs, child)
                if err:
                    return err
    return None  # pragma: no cover


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_in_passes(list_pids: Callable[[], Iterable[int]], passes: int = 100) -> None:
    """SIGKILL everything a (frozen) cgroup lists, again for pids that appear meanwhile."""
    sent: set[int] = set()
    for _ in range(passes):
        new = set(list_pids()) - sent
        if not new:
            return
        _kill_pids(new)
        sent |= new


# ---------------------------------------------------------------------------------------------
# detection


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (the fields we use)."""

    mount_point: str
    root: str
    fstype: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo into ``Mount`` records (proc(5) format)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=fields[sep + 1],
                super_options=frozenset(fields[sep + 3].split(",")),
            )
        )
    return mounts


def swap_enabled(swaps_path: str = "/proc/swaps") -> bool:
    """True if any swap area is active (``/proc/swaps`` has more than its header line)."""
    try:
        with open(swaps_path) as f:
            lines = [ln for ln in f.read().splitlines()[1:] if ln.strip()]
    except FileNotFoundError:
        return False
    return bool(lines)


def _pick(mounts: list[Mount]) -> Mount:
    # Prefer a mount of the hierarchy's root, then the conventional location, then the shortest path.
    return min(
        mounts,
        key=lambda m: (m.root != "/", not m.mount_point.startswith("/sys/fs/cgroup"), len(m.mount_point)),
    )


def detect(
    parent: str = "jailer",
    *,
    fs: CgroupFS | None = None,
    mountinfo_path: str = "/proc/self/mountinfo",
    self_cgroup_path: str = "/proc/self/cgroup",
    swaps_path: str = "/proc/swaps",
    delegate: bool | None = None,
) -> CgroupBackend:
    """Find the cgroup version and controllers of this host and return the matching backend.

    - If any of memory, pids, cpu, cpuacct, freezer is bound to a v1 ("cgroup") hierarchy, the host
      is legacy or hybrid and the v1 backend is used; a cgroup2 mount (e.g. /sys/fs/cgroup/unified,
      which carries no resource controllers on a hybrid host) is ignored.
    - Otherwise a cgroup2 mount means the v2 backend.
    - ``parent`` names our directory: v1 ``<hierarchy>/<parent>/<job>``; v2 ``<mount>/<parent>/<job>``
      unless we run on a delegated subtree (``delegate``: None = auto-detect from systemd's
      ``trusted.delegate``/``user.delegate`` xattr or a cgroup-namespace root), where jobs are
      siblings of the ``supervisor`` leaf inside our own cgroup.

    Reads only; nothing is created until ``ensure_parent()``/``create()``. Raises CgroupError naming
    what is missing and how to fix it.
    """
    validate_name(parent, what="cgroup parent name")
    fs = fs if fs is not None else CgroupFS()
    try:
        with open(mountinfo_path) as f:
            mounts = parse_mountinfo(f.read())
    except OSError as exc:
        raise CgroupError(f"cannot read {mountinfo_path}: {exc.strerror}; is /proc mounted?") from exc

    from . import cgroup_v1, cgroup_v2  # local import: both modules import this one

    v1_by_ctrl: dict[str, list[Mount]] = {}
    v2_mounts = []
    for m in mounts:
        if m.fstype == "cgroup":
            for opt in m.super_options:
                if opt in _CONTROLLERS:
                    v1_by_ctrl.setdefault(opt, []).append(m)
        elif m.fstype == "cgroup2":
            v2_mounts.append(m)

    swap = swap_enabled(swaps_path)
    if any(c in v1_by_ctrl for c in cgroup_v1.REQUIRED_CONTROLLERS):
        hierarchies = {c: _pick(ms).mount_point for c, ms in v1_by_ctrl.items()}
        notes = []
        if v2_mounts:
            notes.append(
                "hybrid host: cgroup2 mount(s) "
                + ", ".join(m.mount_point for m in v2_mounts)
                + " ignored (resource controllers are on v1)"
            )
        return cgroup_v1.CgroupV1Backend(parent, hierarchies, fs=fs, swap_enabled=swap, notes=notes)

    if not v2_mounts:
        raise CgroupError(
            "no cgroup filesystem is mounted (no 'cgroup' or 'cgroup2' entry in "
            f"{mountinfo_path}): mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)"
        )
    mount = _pick(v2_mounts).mount_point
    own = "/"
    try:
        with open(self_cgroup_path) as f:
            for line in f.read().splitlines():
                if line.startswith("0::"):
                    own = line[3:] or "/"
                    break
    except OSError as exc:
        raise CgroupError(f"cannot read {self_cgroup_path}: {exc.strerror}") from exc
    return cgroup_v2.CgroupV2Backend(
        parent, mount, fs=fs, own_cgroup=own, delegate=delegate, swap_enabled=swap
    )
