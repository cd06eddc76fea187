"""The cgroup v1 backend on this machine's REAL v1 hierarchies (root only).

Every test works under a unique parent (``jailer-test-<pid>-v1``) that the fixture removes, even on
failure, and then checks that no directory of that name is left under /sys/fs/cgroup/*/. Processes
are started with subprocess and, if still alive at the end, killed by their own pid only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from jailer.cgroup import CgroupError, CgroupLimits, detect

pytestmark = pytest.mark.root

MiB = 1024 * 1024
CG = "/sys/fs/cgroup"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates real cgroups under /sys/fs/cgroup"
    try:
        backend = detect("jailer-probe")
    except CgroupError as exc:
        return f"cgroup v1 backend unavailable: {exc}"
    if backend.version != 1:
        return f"host uses cgroup v{backend.version}; these tests exercise the v1 backend"
    return None


_REASON = _skip_reason()
if _REASON:
    pytestmark = [pytest.mark.root, pytest.mark.skip(reason=_REASON)]


def _leftover_dirs(name: str) -> list[str]:
    found = []
    for ctrl in os.listdir(CG):
        path = os.path.join(CG, ctrl, name)
        if os.path.isdir(path):
            found.append(path)
    return found


def _rmtree_cgroup(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmtree_cgroup(entry.path)
    os.rmdir(path)


class Procs:
    """The processes this test started: killed by pid at the end if still running."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def spawn(self, job, code: str, **kw) -> subprocess.Popen:
        """python3 -c code, attached to ``job`` by the child itself before exec (the contract)."""
        files = job.procs_files

        def join_cgroup() -> None:
            me = str(os.getpid()).encode()
            for path in files:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, me)
                finally:
                    os.close(fd)

        p = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", code],
            preexec_fn=join_cgroup,  # noqa: PLW1509 (pytest is single-threaded here)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **kw,
        )
        self.started.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()


@pytest.fixture
def env():
    parent = f"jailer-test-{os.getpid()}-v1"
    backend = detect(parent)
    procs = Procs()
    try:
        yield backend, procs
    finally:
        errors = []
        try:
            backend.cleanup_stale()
        except CgroupError as exc:
            errors.append(str(exc))
        procs.cleanup()
        backend.remove_parent()
        left = _leftover_dirs(parent)
        for path in left:  # last resort so a failing test does not leak
            try:
                _rmtree_cgroup(path)
            except OSError as exc:
                errors.append(f"{path}: {exc}")
        assert left == [], f"cgroup directories left behind: {left}"
        assert errors == [], errors


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _wait_until(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def test_limits_are_applied(env):
    backend, _ = env
    job = backend.create("limits", CgroupLimits(memory_max_bytes=64 * MiB + 100, pids_max=16, cpu_max_cores=0.5))
    d = backend.describe()["hierarchies"]
    base = {c: os.path.join(d[c], backend.parent, "limits") for c in d}
    assert len(job.procs_files) == len(set(job.paths)) == len({d[c] for c in d})
    # the kernel keeps whole pages
    assert _read(f"{base['memory']}/memory.limit_in_bytes") == str(64 * MiB)
    if backend.memsw:
        assert _read(f"{base['memory']}/memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert "oom_kill_disable 0" in _read(f"{base['memory']}/memory.oom_control")
    assert _read(f"{base['pids']}/pids.max") == "16"
    assert _read(f"{base['cpu']}/cpu.cfs_period_us") == "100000"
    assert _read(f"{base['cpu']}/cpu.cfs_quota_us") == "50000"
    assert _read(f"{base['freezer']}/freezer.state") == "THAWED"
    u = job.usage()
    assert (u.cpu_ns, u.oom_kills, u.pids_current) == (0, 0, 0)
    assert job.is_empty() and job.pids() == []
    job.destroy()
    assert all(not os.path.exists(p) for p in job.paths)
    job.destroy()  # twice is fine


def test_no_cpu_quota_by_default(env):
    backend, _ = env
    job = backend.create("noquota", CgroupLimits(memory_max_bytes=32 * MiB, pids_max=4, cpu_max_cores=0))
    cpu_dir = os.path.join(backend.describe()["hierarchies"]["cpu"], backend.parent, "noquota")
    assert cpu_dir in job.paths
    assert _read(f"{cpu_dir}/cpu.cfs_quota_us") == "-1"
    job.destroy()


def test_memory_hog_is_oom_killed(env):
    backend, procs = env
    job = backend.create("hog", CgroupLimits(memory_max_bytes=48 * MiB, pids_max=16, cpu_max_cores=0))
    hog = procs.spawn(job, "chunks = []\nfor i in range(1024):\n    chunks.append(b'x' * (1 << 20))\nprint('survived')")
    out, err = hog.communicate(timeout=60)
    assert hog.returncode == -signal.SIGKILL, (hog.returncode, out, err)
    assert b"survived" not in out
    u = job.usage()
    assert u.oom_kills >= 1
    assert 40 * MiB <= u.memory_peak_bytes <= 48 * MiB, u
    job.destroy()


def test_pids_max_contains_a_fork_loop(env):
    backend, procs = env
    job = backend.create("forks", CgroupLimits(memory_max_bytes=256 * MiB, pids_max=8, cpu_max_cores=0))
    code = (
        "import os, time\n"
        "ok = fail = 0\n"
        "for i in range(40):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        fail += 1\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    ok += 1\n"
        "print(ok, fail, flush=True)\n"
        "time.sleep(60)\n"
    )
    p = procs.spawn(job, code)
    ok, fail = map(int, p.stdout.readline().split())
    assert ok == 7 and fail == 33, (ok, fail)  # 8 tasks: the parent and 7 children
    assert job.usage().pids_current == 8
    assert len(job.pids()) == 8
    job.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_cpu_ns_grows_for_a_busy_loop(env):
    backend, procs = env
    job = backend.create("busy", CgroupLimits(memory_max_bytes=64 * MiB, pids_max=4, cpu_max_cores=0))
    start = job.cpu_ns()
    p = procs.spawn(job, "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass")
    samples = []
    while p.poll() is None:
        samples.append(job.cpu_ns())
        time.sleep(0.01)
    p.wait()
    used = job.cpu_ns() - start
    assert used >= 300_000_000, used
    assert samples == sorted(samples)  # monotonic while it runs
    job.destroy()


def test_cpu_quota_throttles(env):
    backend, procs = env
    job = backend.create("quota", CgroupLimits(memory_max_bytes=64 * MiB, pids_max=4, cpu_max_cores=0.2))
    p = procs.spawn(job, "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0:\n    pass")
    p.wait(timeout=30)
    used_s = job.cpu_ns() / 1e9
    assert used_s < 0.45, used_s  # ~0.2 s of CPU per wall second (+ start-up slack)
    job.destroy()


def test_kill_kills_a_tree_at_once(env):
    backend, procs = env
    job = backend.create("tree", CgroupLimits(memory_max_bytes=256 * MiB, pids_max=64, cpu_max_cores=0))
    code = (
        "import os, time\n"
        "for i in range(4):\n"
        "    if os.fork() == 0:\n"
        "        for j in range(2):\n"
        "            if os.fork() == 0:\n"
        "                os.setsid()\n"  # escape the process group: only the cgroup holds them
        "                time.sleep(60)\n"
        "                os._exit(0)\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "time.sleep(60)\n"
    )
    p = procs.spawn(job, code)
    assert _wait_until(lambda: len(job.pids()) == 1 + 4 + 8), job.pids()
    members = job.pids()
    job.kill()
    assert _wait_until(job.is_empty, 2.0), job.pids()
    assert p.wait(timeout=5) == -signal.SIGKILL
    for pid in members:
        if pid == p.pid:
            continue
        # reparented to init (or a subreaper) and reaped there; at most a zombie for an instant
        assert _wait_until(lambda pid=pid: not _alive(pid), 2.0), pid
    freezer = os.path.join(backend.describe()["hierarchies"]["freezer"], backend.parent, "tree")
    assert _read(f"{freezer}/freezer.state") == "THAWED"
    job.remove()
    assert all(not os.path.exists(x) for x in job.paths)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_attach_from_the_parent(env):
    backend, procs = env
    job = backend.create("attach", CgroupLimits(memory_max_bytes=64 * MiB, pids_max=4, cpu_max_cores=0))
    p = subprocess.Popen(["sleep", "60"])
    procs.started.append(p)
    job.attach(p.pid)
    assert job.pids() == [p.pid]
    for f in job.procs_files:
        assert _read(f) == str(p.pid)
    with pytest.raises(CgroupError):
        job.remove()  # populated
    job.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_create_refuses_existing_and_invalid_names(env):
    backend, _ = env
    job = backend.create("dup", CgroupLimits(memory_max_bytes=32 * MiB, pids_max=4, cpu_max_cores=0))
    with pytest.raises(CgroupError, match="already exists"):
        backend.create("dup", CgroupLimits(memory_max_bytes=32 * MiB, pids_max=4, cpu_max_cores=0))
    assert all(os.path.isdir(p) for p in job.paths)  # the existing job is untouched
    with pytest.raises(CgroupError):
        backend.create("memory.limit_in_bytes", CgroupLimits(memory_max_bytes=32 * MiB, pids_max=4, cpu_max_cores=0))
    job.destroy()


def test_cleanup_stale_removes_leftovers(env):
    backend, procs = env
    limits = CgroupLimits(memory_max_bytes=64 * MiB, pids_max=8, cpu_max_cores=0)
    ps, jobs = [], []
    for name in ("stale-a", "stale-b"):
        jobs.append(backend.create(name, limits))
        ps.append(procs.spawn(jobs[-1], "import time\ntime.sleep(60)"))
    assert [j.pids() for j in jobs] == [[p.pid] for p in ps]
    # a new daemon after a SIGKILL: a fresh backend for the same parent
    fresh = detect(backend.parent)
    assert fresh.cleanup_stale() == ["stale-a", "stale-b"]
    for p in ps:
        assert p.wait(timeout=5) == -signal.SIGKILL
    for parent in fresh.parent_paths:
        assert [n for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n))] == []
    assert fresh.cleanup_stale() == []


def test_cpu_weight_maps_to_cpu_shares(env):
    """Warm jails boot at a low CPU weight and are raised at delivery (v2 scale, 100 = default)."""
    backend, _ = env
    job = backend.create("weight", CgroupLimits(memory_max_bytes=32 * MiB, pids_max=4, cpu_max_cores=0))
    shares = os.path.join(backend.describe()["hierarchies"]["cpu"], backend.parent, "weight", "cpu.shares")
    assert _read(shares) == "1024"
    job.set_cpu_weight(10)
    assert _read(shares) == "102"
    job.set_cpu_weight(100)
    assert _read(shares) == "1024"
    with pytest.raises(ValueError):
        job.set_cpu_weight(0)
    job.destroy()
