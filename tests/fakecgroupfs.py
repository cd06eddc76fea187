"""FAKE cgroup2 filesystem, in memory, for unit tests. NOT a kernel, never used in production.

``FakeCgroup2FS`` implements the ``jailer.cgroup.CgroupFS`` interface (mkdir, rmdir, read_text,
write_text, listdir, exists, getxattr) over an in-memory tree, and models the kernel semantics the
v2 backend relies on. Each behaviour names its source:

[DOC §x] Documentation/admin-guide/cgroup-v2.rst, section x
[SRC f]  the kernel function f (kernel/cgroup/cgroup.c, mm/memcontrol.c, kernel/sched/core.c,
         kernel/cgroup/pids.c, fs/kernfs/file.c)

Modelled:
- [DOC 2-2-1] a process is in exactly one cgroup; writing its pid to cgroup.procs moves it;
  an unknown pid is ESRCH; "0" means the writer (``self_pid``).
- [DOC 2-3] cgroup.events ``populated`` is 1 if the cgroup or any descendant has a process.
- [DOC 2-4-1] cgroup.controllers of a child = its parent's cgroup.subtree_control (root: all);
  writing "+c"/"-c" tokens to subtree_control; the interface files of controller c appear in the
  children when c is enabled in the parent and disappear (values lost) when disabled.
  [SRC cgroup_subtree_control_write] a token without +/- or an unknown controller -> EINVAL;
  enabling a controller not in cgroup.controllers -> ENOENT; disabling one that a child still has
  in its own subtree_control -> EBUSY.
- [DOC 2-4-3] "no internal processes": [SRC cgroup_vet_subtree_control_enable] enabling a domain
  controller (memory, io, ...) in a non-root cgroup with processes of its own -> EBUSY (threaded
  controllers cpu, cpuset, perf_event, pids alone are allowed while the cgroup can still become a
  thread root); [SRC cgroup_migrate_vet_dst] moving a process into a non-root cgroup that has
  controllers in its subtree_control -> EBUSY unless it can be a thread root (only threaded
  controllers enabled and no populated child). The root cgroup is exempt (mixable).
- [DOC 2-2-2, SRC cgroup_is_thread_root/cgroup_is_valid_domain] a non-root domain that has
  processes AND threaded controllers (cpu, pids, ...) in its subtree_control is a *thread root*:
  its cgroup.type reads "domain threaded", enabling a domain controller (memory) in it is
  EOPNOTSUPP (not EBUSY), and its domain children read "domain invalid": moving a process into
  them, or enabling any controller in them, is EOPNOTSUPP. It becomes a plain domain again when
  its processes leave or the threaded controllers are disabled.
- [SRC cgroup_rmdir/cgroup_destroy_locked] rmdir of a populated cgroup or one with child cgroups
  -> EBUSY; of the root -> EBUSY.
- [DOC 4-3] core files on every non-root cgroup: cgroup.type ("domain"), cgroup.procs,
  cgroup.controllers, cgroup.subtree_control, cgroup.events, cgroup.freeze, cgroup.kill,
  cgroup.stat, cpu.stat (cpu.stat is a core file: usage_usec/user_usec/system_usec always, the
  nr_periods... lines only when the cpu controller is enabled). The root has no cgroup.type,
  cgroup.events, cgroup.freeze, cgroup.kill nor any controller's limit file (CFTYPE_NOT_ON_ROOT);
  ``namespace_root=True`` makes the root look like a cgroup-namespace root (a non-root cgroup).
- [DOC 4-3 cgroup.kill, SRC cgroup_kill_write] write-only ("1"): SIGKILLs every process of the
  cgroup and its descendants; "0"/"2" -> ERANGE, non-integer -> EINVAL. The real kernel clears
  ``populated`` when the killed tasks exit (about 0.5 ms later, before they are reaped: an unreaped
  zombie does not keep a cgroup populated, nor block its rmdir); the fake does it at once.
- The fake models a **root** writer (CAP_DAC_OVERRIDE, as the daemon runs): every cgroup file
  uses kernfs ops with both a show and a write method, so the open always succeeds and
  [SRC cgroup_seqfile_show] reading a write-only file (cgroup.kill, memory.reclaim) -> EINVAL;
  [SRC cgroup_file_write] writing a read-only file (memory.current, cgroup.events, cpu.stat, ...)
  -> EINVAL. (A non-root writer would get EACCES from the mode bits; not modelled.)
- [SRC cgroup_procs_write_start] cgroup.procs: a non-integer or negative pid -> EINVAL; an unknown
  pid -> ESRCH. [SRC cgroup_freeze_write] cgroup.freeze: non-integer -> EINVAL, not 0/1 -> ERANGE.
  [SRC cpu_weight_write] cpu.weight: non-integer -> EINVAL, outside 1..10000 -> ERANGE.
- Empty cgroup.subtree_control / cgroup.controllers read as "" (no newline).
- [DOC 5-2-1, SRC page_counter_memparse/memparse] memory.max/high/low/min/swap.max accept "max"
  or a number with an optional K/M/G/T/P/E suffix; anything else -> EINVAL; the value is stored
  in pages (rounded down to 4096) and read back as bytes; default "max".
  memory.events: "low high max oom oom_kill oom_group_kill" counters, hierarchical;
  memory.events.local: the same, this cgroup only. memory.peak: high-water mark of memory.current
  (5.19+; ``has_peak=False`` models an older kernel). memory.swap.* exist only with swap
  accounting (``swap_accounting=True``); memory.swap.peak is 6.5+ and not modelled.
- [DOC 5-4-1, SRC pids_max_write] pids.max: "max" or an integer 0 <= n < PID_MAX_LIMIT+1 (any
  base, kstrtoll: "0x10" is stored and read back as "16") else EINVAL; pids.current counts the
  tasks of the cgroup and its descendants; pids.peak their high-water mark.
- [DOC 5-1-1, SRC cpu_max_write/cpu_period_quota_parse/tg_set_cfs_bandwidth] cpu.max
  "$MAX [$PERIOD]" parsed with sscanf("%20s %llu"): MAX "max" or microseconds (leading digits:
  "1500abc" is 1500), a missing or non-numeric PERIOD keeps the current one, anything after the
  period is ignored; period 1000..1000000 us and quota >= 1000 us else EINVAL; default
  "max 100000".
- The file set is Linux 6.1's (checked against the real kernel in the UML guest, see
  docs/cgroups.md): children also have cpu.idle, memory.reclaim (write-only), memory.swap.high,
  memory.zswap.current/max (CONFIG_ZSWAP), pids.peak; the real root has the root-visible files
  of its controllers (cpu.stat, io.stat, memory.stat, memory.reclaim).
- [DOC 2-5, systemd docs/CGROUP_DELEGATION.md] xattrs (``trusted.delegate``) via ``set_xattr``.

Not modelled: threaded cgroups (writes to cgroup.type, threaded children; only the implicit
thread root above is), permissions/delegation checks for non-root writers, cgroup.max.depth/descendants, io/rdma/misc/hugetlb limit files, PSI files.

Test hooks (not part of CgroupFS): ``add_process``, ``exit_process``, ``set_cpu_usage``,
``set_memory``, ``trigger_oom``, ``set_xattr``, ``make_unkillable``, ``cgroup_of``, ``ops`` (a log of
every successful mutating call, for ordering assertions), ``writes``, ``mountinfo_text()``,
``proc_self_cgroup_text()``.
"""

from __future__ import annotations

import errno
import itertools
import os
import re

PAGE_SIZE = 4096
PID_MAX_LIMIT = 4 * 1024 * 1024
PIDS_MAX_LIMIT = PID_MAX_LIMIT + 1  # kernel/cgroup/pids.c
PAGE_COUNTER_MAX = (2**63 - 1) // PAGE_SIZE  # 64-bit LONG_MAX / PAGE_SIZE

# ssid order of include/linux/cgroup_subsys.h, as cgroup.controllers prints them
CONTROLLER_ORDER = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
THREADED_CONTROLLERS = frozenset({"cpuset", "cpu", "perf_event", "pids"})

_MEM_FILES_RW = ("memory.min", "memory.low", "memory.high", "memory.max", "memory.oom.group")
_MEM_FILES_RO = ("memory.current", "memory.events", "memory.events.local", "memory.stat")
_EVENT_KEYS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")


_MEMPARSE_FILES = (
    "memory.min", "memory.low", "memory.high", "memory.max", "memory.swap.max", "memory.swap.high",
    "memory.zswap.max",
)


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _kstrtoint(text: str, path: str) -> int:
    """kstrtoint(s, 0, ...): an integer in any base (0x.., 0..), else EINVAL."""
    m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        raise _oserror(errno.EINVAL, path)
    digits = m.group(2)
    base = 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10
    return int(m.group(1) + (digits[2:] if base == 16 else digits), base)


def _mask_text(names: list[str]) -> str:
    """cgroup_print_ss_mask(): names separated by spaces, a newline only if any was printed."""
    return " ".join(names) + "\n" if names else ""


def _memparse(text: str) -> int:
    """page_counter_memparse(): 'max' or memparse() with a K/M/G/T/P/E suffix; in pages."""
    s = text.strip()
    if s == "max":
        return PAGE_COUNTER_MAX
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([KkMmGgTtPpEe]?)", s)
    if not m:
        raise ValueError(s)
    num = int(m.group(1), 0)
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[m.group(2).lower()]
    return min((num << shift) // PAGE_SIZE, PAGE_COUNTER_MAX)


class _Node:
    def __init__(self, name: str, parent: _Node | None) -> None:
        self.name = name
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.subtree_control: set[str] = set()
        self.procs: list[int] = []
        self.values: dict[str, str] = {}  # per-controller interface values (reset on disable)
        self.freeze = 0
        self.cpu_usage_usec = 0
        self.memory_bytes = 0  # own charge; memory.current is hierarchical
        self.memory_peak = 0
        self.pids_peak = 0
        self.events = dict.fromkeys(_EVENT_KEYS, 0)
        self.events_local = dict.fromkeys(_EVENT_KEYS, 0)

    def walk(self):
        yield self
        for c in self.children.values():
            yield from c.walk()

    def populated(self) -> bool:
        return any(n.procs for n in self.walk())


class FakeCgroup2FS:
    """A FAKE, in-memory cgroup2 filesystem mounted at ``mount`` (see the module docstring)."""

    def __init__(
        self,
        mount: str = "/sys/fs/cgroup",
        *,
        controllers: tuple[str, ...] = CONTROLLER_ORDER,
        root_subtree_control: tuple[str, ...] = (),
        has_peak: bool = True,
        has_kill: bool = True,
        swap_accounting: bool = True,
        namespace_root: bool = False,
        self_pid: int = 1000,
    ) -> None:
        self.mount = mount.rstrip("/")
        self.root = _Node("", None)
        self.controllers = tuple(c for c in CONTROLLER_ORDER if c in controllers)
        self.root.subtree_control = set(root_subtree_control)
        self.has_peak = has_peak
        self.has_kill = has_kill
        self.swap_accounting = swap_accounting
        self.namespace_root = namespace_root
        self.self_pid = self_pid
        self.pid_cgroup: dict[int, _Node] = {}
        self.unkillable: set[int] = set()
        self.killed: list[int] = []
        self.xattrs: dict[str, dict[str, bytes]] = {}
        self.ops: list[tuple] = []  # ("mkdir", path) / ("rmdir", path) / ("write", path, text)
        self._pids = itertools.count(10_000)
        self.add_process("/", self_pid)

    # ------------------------------------------------------------------ path helpers

    def _split(self, path: str) -> list[str]:
        path = os.path.normpath(path)
        if path == self.mount:
            return []
        if not path.startswith(self.mount + "/"):
            raise _oserror(errno.ENOENT, path)
        return path[len(self.mount) + 1 :].split("/")

    def _node(self, parts: list[str], path: str) -> _Node:
        node = self.root
        for p in parts:
            if p not in node.children:
                raise _oserror(errno.ENOENT, path)
            node = node.children[p]
        return node

    def _resolve(self, path: str) -> tuple[_Node | None, str | None]:
        """(node, None) for a cgroup directory, (node, filename) for an interface file."""
        parts = self._split(path)
        try:
            return self._node(parts, path), None
        except OSError:
            if not parts:
                raise
        node = self._node(parts[:-1], path)
        fname = parts[-1]
        if fname not in self._files(node):
            raise _oserror(errno.ENOENT, path)
        return node, fname

    def _is_root(self, node: _Node) -> bool:
        """cgroup_is_mixable(): the real root. A namespace root is an ordinary cgroup."""
        return node.parent is None and not self.namespace_root

    def _controllers_of(self, node: _Node) -> list[str]:
        """cgroup.controllers: the parent's subtree_control; the root has all."""
        if node.parent is None:
            return list(self.controllers)
        return [c for c in CONTROLLER_ORDER if c in node.parent.subtree_control]

    def _files(self, node: _Node) -> dict[str, str]:
        """filename -> 'rw' | 'r' | 'w' for the files present in ``node``."""
        files = {
            "cgroup.procs": "rw",
            "cgroup.threads": "rw",
            "cgroup.controllers": "r",
            "cgroup.subtree_control": "rw",
            "cgroup.stat": "r",
            "cgroup.max.depth": "rw",
            "cgroup.max.descendants": "rw",
            "cpu.stat": "r",
        }
        if self._is_root(node):
            # the root-visible files of the controllers (the rest are CFTYPE_NOT_ON_ROOT)
            if "io" in self.controllers:
                files["io.stat"] = "r"
            if "memory" in self.controllers:
                files["memory.stat"] = "r"
                if self.has_peak:  # memory.reclaim came with memory.peak (5.19)
                    files["memory.reclaim"] = "w"
            return files
        files.update({"cgroup.type": "rw", "cgroup.events": "r", "cgroup.freeze": "rw"})
        if self.has_kill:
            files["cgroup.kill"] = "w"
        enabled = self._controllers_of(node)
        if "memory" in enabled:
            files.update(dict.fromkeys(_MEM_FILES_RW, "rw"))
            files.update(dict.fromkeys(_MEM_FILES_RO, "r"))
            if self.has_peak:
                files["memory.peak"] = "r"
                files["memory.reclaim"] = "w"
                files.update({"memory.zswap.current": "r", "memory.zswap.max": "rw"})
            if self.swap_accounting:
                files.update({"memory.swap.current": "r", "memory.swap.high": "rw", "memory.swap.max": "rw",
                              "memory.swap.events": "r"})
        if "pids" in enabled:
            files.update({"pids.max": "rw", "pids.current": "r", "pids.events": "r", "pids.peak": "r"})
        if "cpu" in enabled:
            files.update({"cpu.max": "rw", "cpu.max.burst": "rw", "cpu.weight": "rw", "cpu.weight.nice": "rw",
                          "cpu.idle": "rw"})
        return files

    @staticmethod
    def _defaults(fname: str) -> str:
        return {
            "memory.min": "0",
            "memory.low": "0",
            "memory.high": "max",
            "memory.max": "max",
            "memory.swap.max": "max",
            "memory.swap.high": "max",
            "memory.zswap.max": "max",
            "memory.oom.group": "0",
            "pids.max": "max",
            "cpu.max": "max 100000",
            "cpu.max.burst": "0",
            "cpu.weight": "100",
            "cpu.weight.nice": "0",
            "cpu.idle": "0",
        }.get(fname, "")

    # ------------------------------------------------------------------ CgroupFS interface

    def exists(self, path: str) -> bool:
        try:
            self._resolve(path)
            return True
        except OSError:
            return False

    def listdir(self, path: str) -> list[str]:
        node, fname = self._resolve(path)
        if fname is not None:
            raise _oserror(errno.ENOTDIR, path)
        return sorted(self._files(node)) + list(node.children)

    def mkdir(self, path: str) -> None:
        parts = self._split(path)
        if not parts:
            raise _oserror(errno.EEXIST, path)
        parent = self._node(parts[:-1], path)
        name = parts[-1]
        if name in parent.children or name in self._files(parent):
            raise _oserror(errno.EEXIST, path)
        parent.children[name] = _Node(name, parent)
        self.ops.append(("mkdir", os.path.normpath(path)))

    def rmdir(self, path: str) -> None:
        node, fname = self._resolve(path)
        if fname is not None:
            raise _oserror(errno.ENOTDIR, path)
        if node.parent is None or node.children or node.populated():
            raise _oserror(errno.EBUSY, path)
        del node.parent.children[node.name]
        self.ops.append(("rmdir", os.path.normpath(path)))

    def getxattr(self, path: str, name: str) -> bytes | None:
        self._resolve(path)
        return self.xattrs.get(os.path.normpath(path), {}).get(name)

    def read_text(self, path: str) -> str:
        node, fname = self._resolve(path)
        if fname is None:
            raise _oserror(errno.EISDIR, path)
        if "r" not in self._files(node)[fname]:
            raise _oserror(errno.EINVAL, path)  # cgroup_seqfile_show(): no show method
        return self._show(node, fname)

    def write_text(self, path: str, text: str) -> None:
        node, fname = self._resolve(path)
        if fname is None:
            raise _oserror(errno.EISDIR, path)
        if "w" not in self._files(node)[fname]:
            raise _oserror(errno.EINVAL, path)  # cgroup_file_write(): no write method
        self._store(node, fname, text, path)
        self.ops.append(("write", os.path.normpath(path), text))

    # ------------------------------------------------------------------ file contents

    def _events(self, ev: dict[str, int]) -> str:
        return "".join(f"{k} {ev[k]}\n" for k in _EVENT_KEYS)

    def _show(self, node: _Node, fname: str) -> str:
        if fname == "cgroup.procs" or fname == "cgroup.threads":
            return "".join(f"{p}\n" for p in node.procs)
        if fname == "cgroup.controllers":
            return _mask_text(self._controllers_of(node))
        if fname == "cgroup.subtree_control":
            return _mask_text([c for c in CONTROLLER_ORDER if c in node.subtree_control])
        if fname == "cgroup.events":
            return f"populated {int(node.populated())}\nfrozen {node.freeze}\n"
        if fname == "cgroup.freeze":
            return f"{node.freeze}\n"
        if fname == "cgroup.type":
            if not self._is_valid_domain(node):
                return "domain invalid\n"
            return "domain threaded\n" if self._is_thread_root(node) else "domain\n"
        if fname == "cgroup.stat":
            n = sum(1 for _ in node.walk()) - 1
            return f"nr_descendants {n}\nnr_dying_descendants 0\n"
        if fname in ("cgroup.max.depth", "cgroup.max.descendants"):
            return "max\n"
        if fname == "cpu.stat":
            usage = sum(n.cpu_usage_usec for n in node.walk())
            text = f"usage_usec {usage}\nuser_usec {usage * 7 // 10}\nsystem_usec {usage - usage * 7 // 10}\n"
            if "cpu" in self._controllers_of(node) and not self._is_root(node):
                text += "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"
            return text
        if fname == "memory.current":
            return f"{sum(n.memory_bytes for n in node.walk())}\n"
        if fname == "memory.peak":
            return f"{node.memory_peak}\n"
        if fname == "memory.events":
            return self._events(node.events)
        if fname == "memory.events.local":
            return self._events(node.events_local)
        if fname == "memory.stat":
            return f"anon {sum(n.memory_bytes for n in node.walk())}\nfile 0\n"
        if fname in ("memory.swap.current", "memory.zswap.current"):
            return "0\n"
        if fname == "memory.swap.events":
            return "high 0\nmax 0\nfail 0\n"
        if fname == "pids.current":
            return f"{sum(len(n.procs) for n in node.walk())}\n"
        if fname == "pids.events":
            return "max 0\n"
        if fname == "pids.peak":
            return f"{node.pids_peak}\n"
        value = node.values.get(fname, self._defaults(fname))
        if fname in _MEMPARSE_FILES:
            if value == "max" or int(value) == PAGE_COUNTER_MAX:
                return "max\n"
            return f"{int(value) * PAGE_SIZE}\n"
        return f"{value}\n"

    def _store(self, node: _Node, fname: str, text: str, path: str) -> None:
        s = text.strip()
        einval = _oserror(errno.EINVAL, path)
        if fname == "cgroup.procs":
            try:
                pid = int(s)
            except ValueError:
                raise einval from None
            if pid < 0:
                raise einval
            if pid == 0:
                pid = self.self_pid
            if pid not in self.pid_cgroup:
                raise _oserror(errno.ESRCH, path)
            code = self._migrate_vet_dst(node)
            if code:
                raise _oserror(code, path)
            old = self.pid_cgroup[pid]
            old.procs.remove(pid)
            node.procs.append(pid)
            self.pid_cgroup[pid] = node
            self._update_pids_peak(node)
            return
        if fname == "cgroup.subtree_control":
            self._write_subtree_control(node, s, path)
            return
        if fname == "cgroup.kill":
            try:
                value = int(s, 0)
            except ValueError:
                raise einval from None
            if value != 1:
                raise _oserror(errno.ERANGE, path)
            for n in list(node.walk()):
                for pid in list(n.procs):
                    if pid in self.unkillable:
                        continue
                    self.exit_process(pid)
                    self.killed.append(pid)
            return
        if fname == "cgroup.freeze":
            value = _kstrtoint(s, path)
            if value not in (0, 1):
                raise _oserror(errno.ERANGE, path)
            node.freeze = value
            return
        if fname == "memory.reclaim":
            try:
                _memparse(s)
            except ValueError:
                raise einval from None
            return
        if fname in _MEMPARSE_FILES:
            try:
                node.values[fname] = str(_memparse(s))
            except ValueError:
                raise einval from None
            return
        if fname == "memory.oom.group":
            if s not in ("0", "1"):
                raise einval
            node.values[fname] = s
            return
        if fname == "pids.max":
            if s != "max":
                limit = _kstrtoint(s, path)
                if limit < 0 or limit >= PIDS_MAX_LIMIT:
                    raise einval
                s = str(limit)  # stored as a number: "0x10" reads back as "16"
            node.values[fname] = s
            return
        if fname == "cpu.max":
            # cpu_period_quota_parse(): sscanf(buf, "%20s %llu", tok, &period) < 1 -> EINVAL, so a
            # missing or non-numeric period keeps the current one and trailing text is ignored;
            # then sscanf(tok, "%llu") takes the leading digits of the quota, else "max".
            toks = s.split()
            if not toks:
                raise einval
            period = int(node.values.get(fname, self._defaults(fname)).split()[1])
            if len(toks) >= 2 and (m := re.match(r"\d+", toks[1])):
                period = int(m.group())
            if m := re.match(r"\d+", toks[0][:20]):
                quota: int | None = int(m.group())
            elif toks[0][:20] == "max":
                quota = None
            else:
                raise einval
            if period < 1000 or period > 1_000_000 or (quota is not None and quota < 1000):
                raise einval
            node.values[fname] = f"{'max' if quota is None else quota} {period}"
            return
        if fname == "cpu.weight":
            if not 1 <= _kstrtoint(s, path) <= 10000:
                raise _oserror(errno.ERANGE, path)
            node.values[fname] = str(int(s))
            return
        node.values[fname] = s  # other rw files: accepted as is (not modelled further)

    def _migrate_vet_dst(self, node: _Node) -> int:
        """cgroup_migrate_vet_dst(): 0 if a process may move into ``node``, else the errno."""
        if not self._is_valid_domain(node):
            return errno.EOPNOTSUPP
        if self._can_be_thread_root(node):
            return 0
        return errno.EBUSY if node.subtree_control else 0

    def _is_thread_root(self, node: _Node) -> bool:
        """cgroup_is_thread_root(): a domain with processes and threaded controllers enabled
        (threaded children, the other way to become one, are not modelled)."""
        return bool(node.procs) and bool(node.subtree_control & THREADED_CONTROLLERS)

    def _is_valid_domain(self, node: _Node) -> bool:
        """cgroup_is_valid_domain(): no non-root ancestor is a thread root."""
        n = node.parent
        while n is not None:
            if not self._is_root(n) and self._is_thread_root(n):
                return False
            n = n.parent
        return True

    def _can_be_thread_root(self, node: _Node) -> bool:
        if self._is_root(node):
            return True
        if any(c.populated() for c in node.children.values()):
            return False
        return not (node.subtree_control - THREADED_CONTROLLERS)

    def _write_subtree_control(self, node: _Node, s: str, path: str) -> None:
        """cgroup_subtree_control_write()."""
        enable, disable = set(), set()
        known = set(CONTROLLER_ORDER) | {"perf_event"}
        for tok in s.split():
            name = tok[1:]
            if tok[:1] not in ("+", "-") or name not in known:
                raise _oserror(errno.EINVAL, path)
            if tok[0] == "+":
                enable.add(name)
                disable.discard(name)
            else:
                disable.add(name)
                enable.discard(name)
        enable -= node.subtree_control
        disable &= node.subtree_control
        if enable - set(self._controllers_of(node)):
            raise _oserror(errno.ENOENT, path)
        for child in node.children.values():
            if child.subtree_control & disable:
                raise _oserror(errno.EBUSY, path)
        # cgroup_vet_subtree_control_enable()
        if enable and not self._is_valid_domain(node):
            raise _oserror(errno.EOPNOTSUPP, path)
        if enable and not self._is_root(node):
            domain_enable = enable - THREADED_CONTROLLERS
            if domain_enable and self._is_thread_root(node):
                raise _oserror(errno.EOPNOTSUPP, path)
            if not domain_enable and self._can_be_thread_root(node):
                pass
            elif node.procs:
                raise _oserror(errno.EBUSY, path)
        node.subtree_control |= enable
        node.subtree_control -= disable
        # controller files of disabled controllers vanish with their values (css destroyed)
        prefixes = tuple(c + "." for c in disable)
        for child in node.children.values():
            for key in [k for k in child.values if k.startswith(prefixes)]:
                del child.values[key]

    # ------------------------------------------------------------------ test hooks

    def cgroup_of(self, pid: int) -> str:
        node = self.pid_cgroup[pid]
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))

    def _node_at(self, cgroup: str) -> _Node:
        path = self.mount + ("/" + cgroup.strip("/") if cgroup.strip("/") else "")
        node, fname = self._resolve(path)
        if fname is not None:
            raise _oserror(errno.ENOTDIR, path)
        return node

    def add_process(self, cgroup: str = "/", pid: int | None = None) -> int:
        """Fork a fake process into ``cgroup`` (a cgroup path like "/jailer/j1", or an absolute
        filesystem path under the mount). Returns its pid."""
        if cgroup.startswith(self.mount):
            cgroup = cgroup[len(self.mount) :] or "/"
        node = self._node_at(cgroup)
        pid = next(self._pids) if pid is None else pid
        node.procs.append(pid)
        self.pid_cgroup[pid] = node
        self._update_pids_peak(node)
        return pid

    def _update_pids_peak(self, node: _Node) -> None:
        n: _Node | None = node
        while n is not None:
            n.pids_peak = max(n.pids_peak, sum(len(x.procs) for x in n.walk()))
            n = n.parent

    def exit_process(self, pid: int) -> None:
        node = self.pid_cgroup.pop(pid)
        node.procs.remove(pid)
        self.unkillable.discard(pid)

    def make_unkillable(self, pid: int) -> None:
        """Model a task stuck in uninterruptible sleep: cgroup.kill does not remove it."""
        self.unkillable.add(pid)

    def set_cpu_usage(self, cgroup: str, usec: int) -> None:
        self._node_at(cgroup).cpu_usage_usec = usec

    def set_memory(self, cgroup: str, nbytes: int) -> None:
        node = self._node_at(cgroup)
        node.memory_bytes = nbytes
        n = node
        while n is not None:
            n.memory_peak = max(n.memory_peak, sum(x.memory_bytes for x in n.walk()))
            n = n.parent

    def trigger_oom(self, cgroup: str, *, kill: bool = True) -> int | None:
        """An OOM in ``cgroup``: oom and oom_kill +1 (memory.events of it and its ancestors,
        memory.events.local of it); the last process of the cgroup is killed. Returns its pid."""
        node = self._node_at(cgroup)
        victim = node.procs[-1] if (kill and node.procs) else None
        node.events_local["max"] += 1
        node.events_local["oom"] += 1
        n = node
        while n is not None:
            n.events["max"] += 1
            n.events["oom"] += 1
            if victim is not None:
                n.events["oom_kill"] += 1
            n = n.parent
        if victim is not None:
            node.events_local["oom_kill"] += 1
            self.exit_process(victim)
        return victim

    def set_xattr(self, cgroup: str, name: str, value: bytes) -> None:
        node = self._node_at(cgroup)  # must exist
        del node
        path = os.path.normpath(self.mount + "/" + cgroup.strip("/"))
        self.xattrs.setdefault(path, {})[name] = value

    @property
    def writes(self) -> list[tuple[str, str]]:
        return [(op[1], op[2]) for op in self.ops if op[0] == "write"]

    def mountinfo_text(self) -> str:
        """A /proc/self/mountinfo of a pure cgroup2 host with this fake at ``mount``."""
        return (
            "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
            "25 22 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
            f"30 22 0:26 / {self.mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
            "rw,nsdelegate,memory_recursiveprot\n"
        )

    def proc_self_cgroup_text(self) -> str:
        return f"0::{self.cgroup_of(self.self_pid)}\n"
