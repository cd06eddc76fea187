"""cgroup v2 (unified hosts): one directory per job.

Files used (Documentation/admin-guide/cgroup-v2.rst):

| what                  | file                                                                   |
|-----------------------|------------------------------------------------------------------------|
| controllers for jobs  | <parent>/cgroup.subtree_control <- "+memory +pids +cpu"                |
| memory limit, no swap | memory.max = bytes, memory.swap.max = 0                                |
| pids limit / current  | pids.max / pids.current                                                |
| CPU bandwidth         | cpu.max = "<quota_us> 100000" (or "max 100000")                        |
| CPU time              | cpu.stat ``usage_usec`` (hierarchical)                                 |
| OOM kills             | memory.events ``oom_kill`` (hierarchical)                              |
| memory peak           | memory.peak (5.19+); else the max of memory.current sampled by cpu_ns() |
| populated?            | cgroup.events ``populated``                                            |
| atomic kill           | cgroup.kill <- "1" (5.14+); else cgroup.freeze + SIGKILL each + thaw   |

Placement (the systemd model, docs/CGROUP_DELEGATION.md in systemd):

- Delegated (``Delegate=yes`` marks our own cgroup with the ``trusted.delegate`` xattr, or we are
  at the root of a cgroup namespace): the "no internal processes" rule forbids enabling controllers
  in a cgroup that holds processes, so ``ensure_parent`` first moves every process of our cgroup
  into the leaf ``<own>/supervisor``, then enables ``+memory +pids +cpu`` in ``<own>``; each job is
  ``<own>/<job>``, a sibling of ``supervisor``.
- Root, not delegated: ``<mount>/<parent>`` is created at the root (whose subtree_control gets the
  controllers if missing); each job is ``<mount>/<parent>/<job>``.

With a single cgroup.procs file, a child can also be spawned straight into the job with
``clone3(CLONE_INTO_CGROUP)`` (open the job directory as the cgroup fd), which costs nothing extra.
"""

from __future__ import annotations

import errno
import os

from .cgroup import (
    CPU_PERIOD_US,
    SUPERVISOR_LEAF,
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
    _subcgroups,
    validate_name,
)

__all__ = ["REQUIRED_CONTROLLERS", "CgroupV2Backend", "CgroupV2Job"]

#: Controllers a v2 parent must be able to enable for its children.
REQUIRED_CONTROLLERS = ("memory", "pids", "cpu")

_DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")  # systemd >= 251 sets both; trusted first


class CgroupV2Job(JobCgroup):
    """A job's single v2 directory."""

    def __init__(self, name: str, path: str, *, fs: CgroupFS) -> None:
        self.name = name
        self._fs = fs
        self.path = path
        self.paths = (path,)
        self.procs_files = (os.path.join(path, "cgroup.procs"),)
        self._cpu_stat = os.path.join(path, "cpu.stat")
        self._memory_current = os.path.join(path, "memory.current")
        self._has_peak = fs.exists(os.path.join(path, "memory.peak"))
        self._has_kill = fs.exists(os.path.join(path, "cgroup.kill"))
        self._peak_sampled = 0

    # -- set-up (during create) --------------------------------------------------------------

    def _apply(self, limits: CgroupLimits, *, swap_enabled: bool) -> None:
        quota = limits.cpu_quota_us()
        writes = [
            ("memory.max", str(limits.memory_max_bytes)),
            ("memory.swap.max", "0"),
            ("pids.max", str(limits.pids_max)),
        ]
        if quota is not None:
            writes.append(("cpu.max", f"{quota} {CPU_PERIOD_US}"))
        for fname, value in writes:
            path = os.path.join(self.path, fname)
            try:
                self._fs.write_text(path, value)
            except FileNotFoundError as exc:
                if fname == "memory.swap.max" and not swap_enabled:
                    continue  # no swap accounting, and no swap to limit
                hint = ""
                if fname == "memory.swap.max":
                    hint = "; swap is on: boot with swapaccount=1 (CONFIG_MEMCG_SWAP) or swapoff -a"
                raise CgroupError(
                    f"cannot set {fname} for job cgroup {self.name!r}: {path} does not exist "
                    f"(controller not enabled in the parent's cgroup.subtree_control?{hint})"
                ) from exc
            except OSError as exc:
                raise _error(f"cannot set {fname}={value!r} for job cgroup {self.name!r}", path, exc) from exc

    # -- running -----------------------------------------------------------------------------

    def cpu_ns(self) -> int:
        path = self._cpu_stat
        try:
            text = self._fs.read_text(path)
            if not self._has_peak:
                path = self._memory_current
                self._peak_sampled = max(self._peak_sampled, int(self._fs.read_text(path)))
        except OSError as exc:
            raise _error(f"cannot read usage of job cgroup {self.name!r}", path, exc) from exc
        first = text.split(None, 2)
        if len(first) >= 2 and first[0] == "usage_usec":
            return int(first[1]) * 1000
        return _parse_flat_keyed(text).get("usage_usec", 0) * 1000

    def usage(self) -> CgroupUsage:
        cpu = self.cpu_ns()  # also samples memory.current when memory.peak is missing
        path = ""
        try:
            if self._has_peak:
                path = os.path.join(self.path, "memory.peak")
                peak = int(self._fs.read_text(path))
            else:
                path = self._memory_current
                peak = max(self._peak_sampled, int(self._fs.read_text(path)))
            path = os.path.join(self.path, "memory.events")
            oom = _parse_flat_keyed(self._fs.read_text(path)).get("oom_kill", 0)
            path = os.path.join(self.path, "pids.current")
            pids_current = int(self._fs.read_text(path))
        except OSError as exc:
            raise _error(f"cannot read usage of job cgroup {self.name!r}", path, exc) from exc
        return CgroupUsage(cpu_ns=cpu, memory_peak_bytes=peak, oom_kills=oom, pids_current=pids_current)

    def _walk(self, path: str) -> list[str]:
        """``path`` and its sub-cgroups, parents first ([] if it is gone)."""
        if not self._fs.exists(path):
            return []
        out = [path]
        for child in _subcgroups(self._fs, path):
            out.extend(self._walk(child))
        return out

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for d in self._walk(self.path):
            try:
                pids.update(_parse_pids(self._fs.read_text(os.path.join(d, "cgroup.procs"))))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _error(f"cannot list processes of job cgroup {self.name!r}", d, exc) from exc
        return sorted(pids)

    def is_empty(self) -> bool:
        path = os.path.join(self.path, "cgroup.events")
        try:
            return _parse_flat_keyed(self._fs.read_text(path)).get("populated", 0) == 0
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise _error(f"cannot read cgroup.events of job cgroup {self.name!r}", path, exc) from exc

    # -- teardown ----------------------------------------------------------------------------

    def kill(self) -> None:
        """cgroup.kill: the kernel SIGKILLs every process of the job and its sub-cgroups at once,
        and new forks into a cgroup being killed are refused. Older kernels: freeze, kill, thaw."""
        if self._has_kill:
            path = os.path.join(self.path, "cgroup.kill")
            try:
                self._fs.write_text(path, "1")
            except FileNotFoundError:
                return  # already removed
            except OSError as exc:
                raise _error(f"cannot kill job cgroup {self.name!r}", path, exc) from exc
            return
        freeze = os.path.join(self.path, "cgroup.freeze")
        frozen = False
        if self._fs.exists(freeze):
            try:
                self._fs.write_text(freeze, "1")
                frozen = True
            except FileNotFoundError:
                return
        try:
            _kill_in_passes(self.pids)
        finally:
            if frozen:
                try:
                    self._fs.write_text(freeze, "0")
                except FileNotFoundError:
                    pass

    def _write_cpu_weight(self, weight: int) -> None:
        path = os.path.join(self.path, "cpu.weight")
        try:
            self._fs.write_text(path, str(weight))
        except OSError as exc:
            raise _error(f"cannot set cpu.weight of job cgroup {self.name!r}", path, exc) from exc

    def remove(self) -> None:
        err = _rmdir_tree(self._fs, self.path)
        if err:
            raise CgroupError(
                f"cannot remove job cgroup {self.name!r}: {err} (kill() it and wait until is_empty() first)"
            )


class CgroupV2Backend(CgroupBackend):
    """Job cgroups on the unified hierarchy."""

    version = 2

    def __init__(
        self,
        parent: str,
        mount: str,
        *,
        fs: CgroupFS | None = None,
        own_cgroup: str = "/",
        delegate: bool | None = None,
        swap_enabled: bool = False,
    ) -> None:
        """``mount``: the cgroup2 mount point; ``own_cgroup``: our cgroup as in /proc/self/cgroup
        ("0::<path>"); ``delegate``: None = detect (systemd's delegate xattr, or a cgroup-namespace
        root). Raises CgroupError if the controllers we need are not available to our parent."""
        self.parent = validate_name(parent, what="cgroup parent name")
        self._fs = fs if fs is not None else CgroupFS()
        self.mount = mount.rstrip("/") or "/"
        self._swap = swap_enabled
        self._notes: list[str] = []
        own = "/" + own_cgroup.strip("/") if own_cgroup.strip("/") else "/"
        self.own_cgroup = own
        # Our delegated cgroup is our own one, or its parent when we already sit in its leaf
        # (a restart of the daemon inside the same unit, or a re-exec).
        base = own
        if os.path.basename(own) == SUPERVISOR_LEAF:
            base = os.path.dirname(own)
        base_path = self._join(base)
        if delegate is None:
            if base == "/":
                # At the mount root: the real root has no cgroup.type; a cgroup-namespace root
                # (a container) has one and is subject to the no-internal-processes rule.
                delegate = self._fs.exists(os.path.join(self.mount, "cgroup.type"))
                if delegate:
                    self._notes.append("cgroup namespace root: treating it as delegated")
                    self.delegation = f"cgroup namespace root ({self.mount} has a cgroup.type)"
                else:
                    self.delegation = "not delegated: we run in the root cgroup"
            else:
                marker = self._delegate_marker(base_path)
                delegate = marker is not None
                self.delegation = (
                    f"{marker}=1 on {base_path}" if marker is not None
                    else f"not delegated: no trusted.delegate (or user.delegate) xattr on {base_path}"
                )
        else:
            self.delegation = f"delegate={bool(delegate)} given explicitly"
        self.delegated = bool(delegate)
        if self.delegated:
            self.parent_path = base_path
            self.supervisor_leaf: str | None = os.path.join(base_path, SUPERVISOR_LEAF)
            controllers_file = os.path.join(base_path, "cgroup.controllers")
        else:
            self.parent_path = os.path.join(self.mount, self.parent)
            self.supervisor_leaf = None
            controllers_file = os.path.join(self.mount, "cgroup.controllers")
            if own != "/":
                self._notes.append(
                    f"our cgroup {own} is not delegated: job cgroups go under {self.parent_path} "
                    "(under systemd prefer Delegate=yes)"
                )
        self.parent_paths = (self.parent_path,)
        try:
            self.available = self._fs.read_text(controllers_file).split()
        except OSError as exc:
            raise _error("cannot read the cgroup v2 controllers", controllers_file, exc) from exc
        self.missing = [c for c in REQUIRED_CONTROLLERS if c not in self.available]
        if self.missing:
            if self.delegated:
                above = os.path.dirname(self.parent_path)
                enabled = self._read_list(os.path.join(above, "cgroup.subtree_control"))
                where = (
                    f"our delegated cgroup ({self.delegation}); {above}/cgroup.subtree_control enables "
                    f"{' '.join(enabled) if enabled else 'nothing'}: set Delegate=yes (or Delegate=memory "
                    "pids cpu) in the jailer unit, or enable them in every ancestor's cgroup.subtree_control "
                    f"(echo '{' '.join('+' + c for c in self.missing)}' > {above}/cgroup.subtree_control)"
                )
            else:
                where = (
                    "the cgroup2 root: enable the controller in the kernel (e.g. not disabled with "
                    "cgroup_disable=) and make sure no v1 hierarchy holds it"
                )
            raise CgroupError(
                f"cgroup v2 controller(s) {', '.join(self.missing)} not available in "
                f"{controllers_file} ({where}); jailer refuses to run jobs without them"
            )
        self._parent_ready = False

    def _join(self, cgroup_path: str) -> str:
        rel = cgroup_path.strip("/")
        return os.path.join(self.mount, rel) if rel else self.mount

    def _delegate_marker(self, path: str) -> str | None:
        """The name of systemd's delegation xattr set on ``path``, or None."""
        for name in _DELEGATE_XATTRS:
            value = self._fs.getxattr(path, name)
            if value is not None and value.strip() in (b"1", b"yes", b"true"):
                return name
        return None

    def _read_list(self, path: str) -> list[str]:
        try:
            return self._fs.read_text(path).split()
        except OSError:
            return []

    # -- parent set-up -----------------------------------------------------------------------

    def _enable_controllers(self, path: str) -> None:
        sc_path = os.path.join(path, "cgroup.subtree_control")
        try:
            enabled = self._fs.read_text(sc_path).split()
        except OSError as exc:
            raise _error("cannot read cgroup.subtree_control", sc_path, exc) from exc
        todo = [c for c in REQUIRED_CONTROLLERS if c not in enabled]
        if not todo:
            return
        try:
            self._fs.write_text(sc_path, " ".join("+" + c for c in todo))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise CgroupError(
                    f"cannot enable {' '.join('+' + c for c in todo)} in {sc_path}: EBUSY, the cgroup "
                    "holds processes of its own (cgroup v2 'no internal processes' rule); move them "
                    "to a leaf cgroup first"
                ) from exc
            if exc.errno == errno.EOPNOTSUPP:
                # A domain holding processes with a threaded controller (pids, cpu) already enabled
                # is a thread root: the kernel refuses domain controllers (memory) there, and also
                # any controller in a cgroup under such a thread root ("domain invalid").
                kind = self._read_list(os.path.join(path, "cgroup.type"))
                raise CgroupError(
                    f"cannot enable {' '.join('+' + c for c in todo)} in {sc_path}: EOPNOTSUPP, its "
                    f"cgroup.type is '{' '.join(kind) or '?'}' (processes in a cgroup with threaded "
                    "controllers enabled, or below one); empty it of processes, or disable its threaded "
                    "controllers, then retry"
                ) from exc
            if exc.errno in (errno.ENOENT, errno.EINVAL):
                raise CgroupError(
                    f"cannot enable {' '.join('+' + c for c in todo)} in {sc_path}: not in its "
                    "cgroup.controllers (enable them in the parent first / Delegate=yes)"
                ) from exc
            raise _error("cannot enable cgroup controllers", sc_path, exc) from exc

    def _move_into_leaf(self) -> None:
        assert self.supervisor_leaf is not None
        try:
            self._fs.mkdir(self.supervisor_leaf)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _error("cannot create the supervisor leaf cgroup", self.supervisor_leaf, exc) from exc
        src = os.path.join(self.parent_path, "cgroup.procs")
        dst = os.path.join(self.supervisor_leaf, "cgroup.procs")
        for _ in range(100):  # processes may fork while we move them: repeat until none is left
            try:
                pids = _parse_pids(self._fs.read_text(src))
            except OSError as exc:
                raise _error("cannot list our own cgroup", src, exc) from exc
            if not pids:
                return
            for pid in pids:
                try:
                    self._fs.write_text(dst, str(pid))
                except ProcessLookupError:
                    continue  # exited meanwhile
                except OSError as exc:
                    if exc.errno == errno.EOPNOTSUPP:
                        # Our cgroup holds processes and has a threaded controller (pids, cpu)
                        # enabled: a thread root, whose domain children ("domain invalid") take no
                        # processes. Disabling controllers ourselves could strip a live job's limits.
                        enabled = " ".join(self._read_list(os.path.join(self.parent_path, "cgroup.subtree_control")))
                        raise CgroupError(
                            f"cannot move pid {pid} into {self.supervisor_leaf}: EOPNOTSUPP, {self.parent_path} "
                            f"holds processes with '{enabled}' enabled in its cgroup.subtree_control (a thread "
                            f"root: its children are 'domain invalid'); write "
                            f"'{' '.join('-' + c for c in enabled.split())}' to {self.parent_path}/cgroup.subtree_control "
                            "(or restart the unit) so that jailer can set it up"
                        ) from exc
                    raise _error(f"cannot move pid {pid} into the supervisor leaf", dst, exc) from exc
        raise CgroupError(f"processes keep appearing in {src}; cannot empty it into {self.supervisor_leaf}")

    def ensure_parent(self) -> None:
        if self._parent_ready:
            return
        if self.delegated:
            self._move_into_leaf()
            self._enable_controllers(self.parent_path)
        else:
            self._enable_controllers(self.mount)
            try:
                self._fs.mkdir(self.parent_path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _error("cannot create the jailer parent cgroup", self.parent_path, exc) from exc
            self._enable_controllers(self.parent_path)
        self._parent_ready = True

    # -- jobs --------------------------------------------------------------------------------

    def create(self, name: str, limits: CgroupLimits) -> CgroupV2Job:
        validate_name(name)
        if not isinstance(limits, CgroupLimits):
            raise TypeError("limits must be a CgroupLimits")
        self.ensure_parent()
        path = os.path.join(self.parent_path, name)
        try:
            self._fs.mkdir(path)
        except FileExistsError as exc:
            raise CgroupError(
                f"job cgroup {path} already exists: job names must be unique "
                "(a leftover from a crashed daemon is removed by cleanup_stale())"
            ) from exc
        except OSError as exc:
            raise _error(f"cannot create job cgroup {name!r}", path, exc) from exc
        try:
            job = CgroupV2Job(name, path, fs=self._fs)
            job._apply(limits, swap_enabled=self._swap)
            return job
        except BaseException:
            try:
                self._fs.rmdir(path)
            except OSError:
                pass
            raise

    def cleanup_stale(self, timeout_s: float = 2.0) -> list[str]:
        try:
            names = self._fs.listdir(self.parent_path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _error("cannot list the jailer parent cgroup", self.parent_path, exc) from exc
        removed = []
        for n in sorted(names):
            if n == SUPERVISOR_LEAF and self.delegated:
                continue
            path = os.path.join(self.parent_path, n)
            if not self._fs.exists(os.path.join(path, "cgroup.procs")):
                continue  # an interface file, not a cgroup
            CgroupV2Job(n, path, fs=self._fs).destroy(timeout_s)
            removed.append(n)
        return removed

    def remove_parent(self) -> None:
        if self.delegated:
            return  # our own cgroup: systemd removes it when the unit stops
        try:
            self._fs.rmdir(self.parent_path)
        except OSError:
            pass  # not empty (EBUSY) or already gone
        self._parent_ready = False

    def describe(self) -> dict:
        """Reads only. ``pending``: what ``ensure_parent()`` will still do; ``problems``: what will
        make it fail (each says what to do)."""
        subtree = self._read_list(os.path.join(self.parent_path, "cgroup.subtree_control"))
        pending: list[str] = []
        problems: list[str] = []
        need = [c for c in REQUIRED_CONTROLLERS if c not in subtree]
        enable = " ".join("+" + c for c in need)
        parent_exists = self._fs.exists(os.path.join(self.parent_path, "cgroup.procs"))
        procs = self._read_list(os.path.join(self.parent_path, "cgroup.procs")) if parent_exists else []
        kind = " ".join(self._read_list(os.path.join(self.parent_path, "cgroup.type")))
        if kind in ("domain threaded", "domain invalid", "threaded"):
            threaded = [c for c in subtree if c in ("cpu", "cpuset", "perf_event", "pids")]
            problems.append(
                f"{self.parent_path} is '{kind}' (a thread root, or inside one: processes in a cgroup "
                "with threaded controllers enabled): memory cannot be enabled there, nor processes "
                "moved below it; "
                + (f"write '{' '.join('-' + c for c in threaded)}' to {self.parent_path}/cgroup.subtree_control"
                   if kind == "domain threaded" and threaded else "use another cgroup")
                + " (or restart the unit)"
            )
        if self.delegated:
            if procs:
                pending.append(
                    f"move {len(procs)} process(es) of {self.parent_path} into {self.supervisor_leaf}"
                )
            if need:
                pending.append(f"enable {enable} in {self.parent_path}/cgroup.subtree_control")
        else:
            root_sc = self._read_list(os.path.join(self.mount, "cgroup.subtree_control"))
            root_need = [c for c in REQUIRED_CONTROLLERS if c not in root_sc]
            if root_need:
                pending.append(
                    f"enable {' '.join('+' + c for c in root_need)} in {self.mount}/cgroup.subtree_control"
                )
            if not parent_exists:
                pending.append(f"create {self.parent_path}")
            if need:
                pending.append(f"enable {enable} in {self.parent_path}/cgroup.subtree_control")
            if procs and need:
                problems.append(
                    f"{self.parent_path} holds processes ({' '.join(procs[:5])}{' ...' if len(procs) > 5 else ''}): "
                    "enabling its controllers will fail with EBUSY; move them out or choose another parent"
                )
        return {
            "version": 2,
            "mount": self.mount,
            "own_cgroup": self.own_cgroup,
            "mode": "delegated" if self.delegated else "root",
            "delegated": self.delegated,
            "delegation": self.delegation,
            "parent_paths": list(self.parent_paths),
            "supervisor_leaf": self.supervisor_leaf,
            "controllers_available": list(self.available),
            "controllers_required": list(REQUIRED_CONTROLLERS),
            "controllers_missing": list(self.missing),
            "parent_exists": parent_exists,
            "subtree_control": subtree,
            "pending": pending,
            "problems": problems,
            "swap_enabled": self._swap,
            "notes": list(self._notes),
        }
