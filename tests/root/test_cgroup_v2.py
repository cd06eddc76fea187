"""The cgroup v2 backend on a REAL cgroup2 hierarchy (root only; skipped on a v1/hybrid host).

This machine runs cgroup v1, so these run in the User-Mode Linux guest (Linux 6.1, cgroup2 at
/sys/fs/cgroup, ``+memory +pids +cpu`` in the root's subtree_control, 1 CPU):

    tests/vm/run -- .venv/bin/python -m pytest -q -m root tests/root/test_cgroup_v2.py

Every test works under its own names (``jailer-test-<pid>-...``, ``test-deleg-<pid>-...``); the
fixtures kill what is left in them with cgroup.kill, remove them, even on failure, and then check
that nothing is left. Processes are started with subprocess and killed by their own pid only.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jailer import cgroup, cgroup_v2
from jailer.cgroup import CgroupError, CgroupFS, CgroupLimits, detect

pytestmark = pytest.mark.root

MiB = 1024 * 1024
CG = "/sys/fs/cgroup"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates real cgroups under /sys/fs/cgroup"
    try:
        backend = detect("jailer-probe")
    except CgroupError as exc:
        return f"cgroup v2 backend unavailable: {exc}"
    if backend.version != 2:
        return (
            f"host uses cgroup v{backend.version}; these tests need a real cgroup2 hierarchy: "
            "run them in the v2 guest (tests/vm/ci-v2, or tests/vm/run -- .venv/bin/python -m pytest "
            "-m root tests/root/test_cgroup_v2.py)"
        )
    if os.path.exists(os.path.join(backend.mount, "cgroup.type")):
        return "runs inside a cgroup namespace; these tests create cgroups at the hierarchy's root"
    return None


_REASON = _skip_reason()
if _REASON and os.environ.get("JAILER_REQUIRE_CGROUP_V2") == "1":
    # tests/vm/ci-v2 sets this: in the guest, skipping would hide a broken v2 run
    raise RuntimeError(f"JAILER_REQUIRE_CGROUP_V2=1 but the cgroup v2 tests cannot run: {_REASON}")
if _REASON:
    pytestmark = [pytest.mark.root, pytest.mark.skip(reason=_REASON)]


# --------------------------------------------------------------------------------------------
# helpers


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, text: str) -> None:
    CgroupFS().write_text(path, text)


def _wait_until(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def _kill_and_remove(path: str) -> list[str]:
    """Last resort for a test's own cgroup tree: cgroup.kill, wait, rmdir bottom-up."""
    errors: list[str] = []
    if not os.path.isdir(path):
        return errors
    try:
        _write(os.path.join(path, "cgroup.kill"), "1")
    except OSError as exc:
        errors.append(f"{path}/cgroup.kill: {exc}")
    _wait_until(lambda: "populated 0" in _read(os.path.join(path, "cgroup.events")), 5.0)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            errors += _kill_and_remove(entry.path)
    try:
        os.rmdir(path)
    except OSError as exc:
        errors.append(f"{path}: {exc}")
    return errors


class Procs:
    """The processes this test started: killed by pid at the end if still running."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def spawn(self, procs_file: str | None, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv; the child writes "0" (itself) to ``procs_file`` before exec, as the runner does."""

        def join_cgroup() -> None:
            fd = os.open(procs_file, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(argv, preexec_fn=join_cgroup if procs_file else None, **kw)  # noqa: PLW1509
        self.started.append(p)
        return p

    def python(self, job, code: str, **kw) -> subprocess.Popen:
        return self.spawn(job.procs_files[0], [PY, "-I", "-S", "-c", code], **kw)

    def cleanup(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()


class RecordingFS(CgroupFS):
    """The real cgroupfs, with a log of every write (to check what kill() does)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    def write_text(self, path: str, text: str) -> None:
        super().write_text(path, text)
        self.writes.append((path, text))


@pytest.fixture
def env():
    """(backend, procs) in root mode under /sys/fs/cgroup/jailer-test-<pid>-v2."""
    parent = f"jailer-test-{os.getpid()}-v2"
    fs = RecordingFS()
    backend = detect(parent, fs=fs)
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
        path = os.path.join(CG, parent)
        left = os.path.isdir(path)
        errors += _kill_and_remove(path)
        assert not left, f"cgroup directory left behind: {path}"
        assert errors == [], errors


LIMITS = CgroupLimits(memory_max_bytes=64 * MiB, pids_max=16, cpu_max_cores=0)


# --------------------------------------------------------------------------------------------
# limits, accounting, kill, removal


def test_limits_are_applied(env):
    backend, _ = env
    assert backend.version == 2 and not backend.delegated
    job = backend.create("limits", CgroupLimits(memory_max_bytes=64 * MiB + 100, pids_max=16, cpu_max_cores=0.5))
    path = f"{CG}/{backend.parent}/limits"
    assert job.paths == (path,) and job.procs_files == (f"{path}/cgroup.procs",)
    assert _read(f"{CG}/{backend.parent}/cgroup.subtree_control").split() == ["cpu", "memory", "pids"]
    assert _read(f"{path}/memory.max") == str(64 * MiB)  # whole pages
    if os.path.exists(f"{path}/memory.swap.max"):
        assert _read(f"{path}/memory.swap.max") == "0"
    assert _read(f"{path}/pids.max") == "16"
    assert _read(f"{path}/cpu.max") == "50000 100000"
    assert _read(f"{path}/cgroup.type") == "domain"
    u = job.usage()
    assert (u.cpu_ns, u.oom_kills, u.pids_current, u.memory_peak_bytes) == (0, 0, 0, 0)
    assert job.is_empty() and job.pids() == []
    job.destroy()
    assert not os.path.exists(path)
    job.destroy()  # twice is fine


def test_no_cpu_quota_leaves_cpu_max_at_max(env):
    backend, _ = env
    job = backend.create("noquota", LIMITS)
    assert _read(f"{job.path}/cpu.max") == "max 100000"
    job.destroy()


def test_cpu_ns_comes_from_cpu_stat(env):
    backend, procs = env
    job = backend.create("busy", LIMITS)
    start = job.cpu_ns()
    p = procs.python(job, "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass")
    samples = []
    while p.poll() is None:
        samples.append(job.cpu_ns())
        time.sleep(0.01)
    used = job.cpu_ns() - start
    assert used >= 300_000_000, used
    assert samples == sorted(samples)  # monotonic while it runs
    stat = dict(line.split() for line in _read(f"{job.path}/cpu.stat").splitlines())
    assert job.cpu_ns() == int(stat["usage_usec"]) * 1000  # after exit, the counter stays
    job.destroy()


def test_cpu_quota_throttles(env):
    backend, procs = env
    job = backend.create("quota", CgroupLimits(memory_max_bytes=64 * MiB, pids_max=4, cpu_max_cores=0.2))
    p = procs.python(job, "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0:\n    pass")
    p.wait(timeout=60)
    used_s = job.cpu_ns() / 1e9
    assert used_s < 0.45, used_s  # ~0.2 s of CPU per wall second (+ start-up slack)
    stat = dict(line.split() for line in _read(f"{job.path}/cpu.stat").splitlines())
    assert int(stat["nr_throttled"]) > 0, stat
    job.destroy()


def test_memory_hog_is_oom_killed_and_counted(env):
    backend, procs = env
    job = backend.create("hog", CgroupLimits(memory_max_bytes=48 * MiB, pids_max=16, cpu_max_cores=0))
    hog = procs.python(job, "chunks = []\nfor i in range(1024):\n    chunks.append(b'x' * (1 << 20))\nprint('survived')")
    out, err = hog.communicate(timeout=120)
    assert hog.returncode == -signal.SIGKILL, (hog.returncode, out, err)
    assert b"survived" not in out
    events = dict(line.split() for line in _read(f"{job.path}/memory.events").splitlines())
    u = job.usage()
    assert u.oom_kills == int(events["oom_kill"]) >= 1, events
    assert int(events["oom"]) >= 1
    assert 40 * MiB <= u.memory_peak_bytes <= 48 * MiB, u
    job.destroy()


def test_memory_peak_is_the_high_water_mark(env):
    backend, procs = env
    job = backend.create("peak", CgroupLimits(memory_max_bytes=128 * MiB, pids_max=4, cpu_max_cores=0))
    assert os.path.exists(f"{job.path}/memory.peak")  # 5.19+: no sampling needed
    p = procs.python(job, "import sys, time\nb = b'x' * (40 << 20)\ndel b\nprint('freed', flush=True)\ntime.sleep(60)")
    assert p.stdout.readline() == b"freed\n"
    current = int(_read(f"{job.path}/memory.current"))
    u = job.usage()
    assert u.memory_peak_bytes >= 40 * MiB, u
    assert u.memory_peak_bytes == int(_read(f"{job.path}/memory.peak"))
    assert current < u.memory_peak_bytes - 20 * MiB, (current, u)  # the 40 MiB were given back
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
    p = procs.python(job, code)
    ok, fail = map(int, p.stdout.readline().split())
    assert ok == 7 and fail == 33, (ok, fail)  # 8 tasks: the parent and 7 children
    assert job.usage().pids_current == 8 and len(job.pids()) == 8
    events = dict(line.split()[:2] for line in _read(f"{job.path}/pids.events").splitlines())
    assert int(events["max"]) == 33
    job.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_cgroup_kill_kills_a_process_tree_at_once(env, monkeypatch):
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
    p = procs.python(job, code)
    assert _wait_until(lambda: len(job.pids()) == 1 + 4 + 8, 20.0), job.pids()
    members = job.pids()

    def no_signals(pids):
        raise AssertionError(f"kill() signalled pids one by one: {list(pids)}")

    monkeypatch.setattr(cgroup, "_kill_pids", no_signals)  # what the pass-by-pass fallback calls
    backend._fs.writes.clear()
    job.kill()
    assert backend._fs.writes == [(f"{job.path}/cgroup.kill", "1")]  # one write, no freezer dance
    assert _wait_until(job.is_empty, 2.0), job.pids()
    assert p.wait(timeout=5) == -signal.SIGKILL
    for pid in members:
        if pid != p.pid:  # reparented to init and reaped there
            assert _wait_until(lambda pid=pid: not _alive(pid), 2.0), pid
    job.remove()
    assert not os.path.exists(job.path)


def test_cgroup_kill_stops_a_fork_bomb_in_one_write(env):
    backend, procs = env
    job = backend.create("bomb", CgroupLimits(memory_max_bytes=256 * MiB, pids_max=48, cpu_max_cores=0))
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    p = procs.python(job, bomb)
    assert _wait_until(lambda: job.usage().pids_current >= 40, 30.0), job.usage()
    backend._fs.writes.clear()
    job.kill()  # once: new forks into a cgroup being killed are refused by the kernel
    assert _wait_until(job.is_empty, 5.0), job.pids()
    assert [w for w in backend._fs.writes if w[0].endswith("cgroup.kill")] == [(f"{job.path}/cgroup.kill", "1")]
    assert p.wait(timeout=5) == -signal.SIGKILL
    job.remove()


def test_remove_and_destroy_leave_nothing(env):
    backend, procs = env
    job = backend.create("nested", LIMITS)
    procs.spawn(job.procs_files[0], ["sleep", "60"])
    # a sub-cgroup inside the job (what a delegated tenant, or a leftover, could make)
    os.mkdir(f"{job.path}/inner")
    procs.spawn(f"{job.path}/inner/cgroup.procs", ["sleep", "60"])
    assert len(job.pids()) == 2
    with pytest.raises(CgroupError, match="still populated"):
        job.remove()
    job.destroy()
    assert not os.path.exists(job.path)
    assert job.is_empty() and job.pids() == []
    job.destroy()
    assert [p.wait(timeout=5) for p in procs.started] == [-signal.SIGKILL] * 2
    # the parent holds only interface files now
    parent = backend.parent_paths[0]
    assert [n for n in os.listdir(parent) if os.path.isdir(f"{parent}/{n}")] == []


def test_an_unreaped_zombie_does_not_keep_the_job(env):
    backend, procs = env
    job = backend.create("zombie", LIMITS)
    p = procs.spawn(job.procs_files[0], ["sleep", "60"])
    job.kill()
    assert _wait_until(job.is_empty, 2.0)
    job.remove()  # before we reap it: cgroup v2 lets go of a task when it exits
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_attach_from_the_parent(env):
    backend, procs = env
    job = backend.create("attach", LIMITS)
    p = procs.spawn(None, ["sleep", "60"])
    job.attach(p.pid)
    assert job.pids() == [p.pid] and _cgroup_of(p.pid) == f"/{backend.parent}/attach"
    with pytest.raises(CgroupError, match="ESRCH"):
        job.attach(2**22 + 1)
    job.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_create_refuses_existing_and_invalid_names(env):
    backend, _ = env
    job = backend.create("dup", LIMITS)
    with pytest.raises(CgroupError, match="already exists"):
        backend.create("dup", LIMITS)
    assert os.path.isdir(job.path)
    for bad in ("memory.max", "cgroup.procs", "supervisor", "../x"):
        with pytest.raises(CgroupError):
            backend.create(bad, LIMITS)
    job.destroy()


def test_cleanup_stale_after_a_sigkilled_daemon(env):
    backend, procs = env
    ps = []
    for name in ("stale-a", "stale-b"):
        job = backend.create(name, LIMITS)
        ps.append(procs.spawn(job.procs_files[0], ["sleep", "60"]))
    fresh = detect(backend.parent)  # a new daemon after a SIGKILL: a fresh backend, same parent
    assert fresh.cleanup_stale() == ["stale-a", "stale-b"]
    for p in ps:
        assert p.wait(timeout=5) == -signal.SIGKILL
    parent = fresh.parent_paths[0]
    assert [n for n in os.listdir(parent) if os.path.isdir(f"{parent}/{n}")] == []
    assert fresh.cleanup_stale() == []
    fresh.remove_parent()
    assert not os.path.exists(parent)


def test_describe_is_side_effect_free_and_says_what_start_up_does(env):
    backend, _ = env
    d = backend.describe()
    assert d["version"] == 2 and d["mode"] == "root" and not d["parent_exists"]
    assert d["pending"][-2:] == [
        f"create {CG}/{backend.parent}",
        f"enable +memory +pids +cpu in {CG}/{backend.parent}/cgroup.subtree_control",
    ]
    assert not os.path.exists(f"{CG}/{backend.parent}")
    backend.ensure_parent()
    d = backend.describe()
    assert d["pending"] == [] and d["problems"] == [] and d["subtree_control"] == ["cpu", "memory", "pids"]


# --------------------------------------------------------------------------------------------
# delegation, the systemd way: the daemon runs in a cgroup of its own that it may manage


CHILD = r'''
import json, os, subprocess, sys
from jailer.cgroup import CgroupError, CgroupLimits, detect
from jailer.doctor import check_cgroups

delegate = json.loads(sys.argv[1])
parent = sys.argv[2]
def own(pid="self"):
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read().split("::", 1)[1].strip()
out = {"own_before": own()}
def doctor():
    return [[c.name, c.ok, c.detail, c.fix] for c in check_cgroups()]
try:
    b = detect(parent, delegate=delegate)
except CgroupError as e:
    out["error"] = str(e)
    out["doctor"] = doctor()
    print(json.dumps(out))
    sys.exit(0)
worker = subprocess.Popen(["sleep", "60"])  # a second process of the unit (started after detect)
out.update(delegated=b.delegated, parent_paths=list(b.parent_paths), leaf=b.supervisor_leaf,
           describe_before=b.describe(), doctor_before=doctor())
b.ensure_parent()
base = b.parent_paths[0]
out["own_after"] = own()
out["worker_after"] = own(worker.pid)
out["subtree_control"] = open(f"{base}/cgroup.subtree_control").read().split()
job = b.create("j1", CgroupLimits(memory_max_bytes=64 << 20, pids_max=16, cpu_max_cores=0.5))
out["job_paths"] = list(job.paths)
out["children"] = sorted(n for n in os.listdir(base) if os.path.isdir(f"{base}/{n}"))
def join():
    fd = os.open(job.procs_files[0], os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)
p = subprocess.Popen(["sleep", "60"], preexec_fn=join)
out["job_pids_ok"] = job.pids() == [p.pid]
out["job_limits"] = [open(f"{job.path}/{f}").read().strip() for f in ("memory.max", "pids.max", "cpu.max")]
# a daemon restarted inside the same unit finds itself in the leaf and recognises it
again = detect(parent, delegate=delegate)
out["again"] = [again.delegated, list(again.parent_paths), again.supervisor_leaf]
again.ensure_parent()
out["stale"] = again.cleanup_stale()
out["job_rc"] = p.wait(timeout=10)
out["describe_after"] = again.describe()
out["doctor_after"] = doctor()
again.remove_parent()  # never removes our own cgroup
out["base_exists"] = os.path.isdir(base)
worker.kill()
worker.wait()
print(json.dumps(out))
'''


@pytest.fixture
def own_tree():
    """make(name) -> /sys/fs/cgroup/<name>-<pid>, created now, killed and removed at the end."""
    made: list[str] = []

    def make(name: str) -> str:
        path = f"{CG}/{name}-{os.getpid()}"
        os.mkdir(path)
        made.append(path)
        return path

    yield make
    errors = []
    for path in reversed(made):
        errors += _kill_and_remove(path)
    assert errors == [], errors


def _run_child(procs: Procs, cgroup_path: str, delegate, parent: str) -> dict:
    p = procs.spawn(f"{cgroup_path}/cgroup.procs", [PY, "-c", CHILD, json.dumps(delegate), parent],
                    cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    return json.loads(out)


@pytest.mark.parametrize("how", ["xattr", "explicit"])
def test_delegated_subtree_the_systemd_way(own_tree, how):
    """Delegate=yes: systemd gives the unit a cgroup of its own and marks it with trusted.delegate
    (or the operator passes delegate=True). The daemon must move every process of that cgroup into
    supervisor/ BEFORE enabling the controllers (no internal processes), and jobs are siblings of
    supervisor/."""
    procs = Procs()
    try:
        deleg = own_tree("test-deleg")
        rel = deleg[len(CG):]
        if how == "xattr":
            os.setxattr(deleg, "trusted.delegate", b"1")
        # a process of the unit that was already there (an ExecStartPre helper, a log shipper...)
        other = procs.spawn(f"{deleg}/cgroup.procs", ["sleep", "60"])
        assert _cgroup_of(other.pid) == rel
        # the kernel rule the backend works around: a cgroup with processes cannot enable memory
        with pytest.raises(OSError) as exc:
            _write(f"{deleg}/cgroup.subtree_control", "+memory +pids +cpu")
        assert exc.value.errno == errno.EBUSY

        r = _run_child(procs, deleg, True if how == "explicit" else None, "jailer")

        assert r["own_before"] == rel
        assert r["delegated"] is True
        assert r["parent_paths"] == [deleg] and r["leaf"] == f"{deleg}/supervisor"
        d = r["describe_before"]
        assert d["mode"] == "delegated" and d["subtree_control"] == []
        # the unit's processes: `other`, the daemon (the child) and its worker
        assert d["pending"] == [f"move 3 process(es) of {deleg} into {deleg}/supervisor",
                                f"enable +memory +pids +cpu in {deleg}/cgroup.subtree_control"]
        assert ("trusted.delegate=1 on " + deleg if how == "xattr" else "given explicitly") in d["delegation"]
        # every process moved, then the controllers enabled
        assert r["own_after"] == r["worker_after"] == f"{rel}/supervisor"
        assert _cgroup_of(other.pid) == f"{rel}/supervisor"
        assert r["subtree_control"] == ["cpu", "memory", "pids"]
        # jobs are siblings of supervisor/
        assert r["job_paths"] == [f"{deleg}/j1"]
        assert r["children"] == ["j1", "supervisor"]
        assert r["job_pids_ok"] and r["job_limits"] == [str(64 * MiB), "16", "50000 100000"]
        # the restarted daemon (its own cgroup is now .../supervisor) finds the same parent
        assert r["again"] == [True, [deleg], f"{deleg}/supervisor"]
        assert r["stale"] == ["j1"] and r["job_rc"] == -signal.SIGKILL  # supervisor/ untouched
        assert r["describe_after"]["pending"] == [] and r["describe_after"]["problems"] == []
        assert r["base_exists"] and os.path.isdir(f"{deleg}/supervisor")
        # `jailer doctor` (like the daemon) detects: it sees the delegation the xattr declares
        checks = {name: (ok, detail) for name, ok, detail, _ in r["doctor_before"]}
        after = {name: (ok, detail) for name, ok, detail, _ in r["doctor_after"]}
        if how == "xattr":
            assert checks["cgroup delegation"] == (True, (
                f"delegated (trusted.delegate=1 on {deleg}): the daemon moves into {deleg}/supervisor, "
                f"jobs are {deleg}/<job>, siblings of it"))
            assert "move 3 process(es)" in checks["cgroup set-up"][1]
            assert after["cgroup set-up"] == (True, f"{deleg}/cgroup.subtree_control enables cpu memory pids: ready")
        else:
            assert not checks["cgroup delegation"][0] and not after["cgroup delegation"][0]
    finally:
        procs.cleanup()


def test_not_delegated_cgroup_uses_a_parent_at_the_root(own_tree):
    """A systemd unit without Delegate=yes: no xattr, so jobs go to <mount>/<parent>, we stay put,
    and doctor says what is missing and what to do."""
    procs = Procs()
    parent = f"jailer-test-{os.getpid()}-nd"
    try:
        unit = own_tree("test-nodeleg")
        rel = unit[len(CG):]
        r = _run_child(procs, unit, None, parent)
        assert r["delegated"] is False and r["parent_paths"] == [f"{CG}/{parent}"] and r["leaf"] is None
        assert r["own_after"] == rel  # not moved
        assert r["job_paths"] == [f"{CG}/{parent}/j1"]
        assert any("not delegated" in n for n in r["describe_before"]["notes"])
        assert not r["base_exists"]  # remove_parent() removed <mount>/<parent>
        checks = {name: (ok, detail, fix) for name, ok, detail, fix in r["doctor_before"]}
        ok, detail, fix = checks["cgroup delegation"]
        assert not ok and f"no trusted.delegate (or user.delegate) xattr on {unit}" in detail
        assert "Delegate=yes" in fix and f"setfattr -n trusted.delegate -v 1 {unit}" in fix
    finally:
        procs.cleanup()
        errors = _kill_and_remove(f"{CG}/{parent}")
        assert errors == []


def test_delegated_without_memory_and_pids_fails_closed(own_tree):
    """Delegate=cpu (or a slice that enables only cpu): memory and pids are not in our
    cgroup.controllers; detect() refuses, naming them and the fix; doctor prints that."""
    procs = Procs()
    try:
        sl = own_tree("test-slice")
        _write(f"{sl}/cgroup.subtree_control", "+cpu")
        unit = f"{sl}/jailer.service"
        os.mkdir(unit)
        os.setxattr(unit, "trusted.delegate", b"1")
        r = _run_child(procs, unit, None, "jailer")
        msg = r["error"]
        assert f"controller(s) memory, pids not available in {unit}/cgroup.controllers" in msg
        assert f"{sl}/cgroup.subtree_control enables cpu" in msg and "Delegate=yes" in msg
        assert f"echo '+memory +pids' > {sl}/cgroup.subtree_control" in msg and "refuses" in msg
        (name, ok, detail, fix), = r["doctor"]
        assert (name, ok, detail) == ("cgroups", False, msg) and "docs/cgroups.md" in fix
    finally:
        procs.cleanup()


THREAD_ROOT_CHILD = r'''
import json
from jailer.cgroup import CgroupError, detect
b = detect("jailer")
out = {"problems": b.describe()["problems"]}
try:
    b.ensure_parent()
    out["error"] = None
except CgroupError as e:
    out["error"] = str(e)
print(json.dumps(out))
'''


def test_delegated_cgroup_that_is_a_thread_root_is_explained(own_tree):
    """The unit's cgroup holds processes and has +pids enabled (a thread root): the kernel refuses
    processes in its children (EOPNOTSUPP). describe() and ensure_parent() say so and what to do."""
    procs = Procs()
    try:
        unit = own_tree("test-threaded")
        os.setxattr(unit, "trusted.delegate", b"1")
        procs.spawn(f"{unit}/cgroup.procs", ["sleep", "60"])
        _write(f"{unit}/cgroup.subtree_control", "+pids")  # threaded: allowed with processes
        assert _read(f"{unit}/cgroup.type") == "domain threaded"
        p = procs.spawn(f"{unit}/cgroup.procs", [PY, "-c", THREAD_ROOT_CHILD], cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT})
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        r = json.loads(out)
        assert r["problems"] and "'domain threaded'" in r["problems"][0]
        assert "EOPNOTSUPP" in r["error"] and f"write '-pids' to {unit}/cgroup.subtree_control" in r["error"]
    finally:
        procs.cleanup()


NS_CHILD = r'''
import json, os, subprocess
from jailer.cgroup import CgroupLimits, detect
b = detect("jailer")
out = {"delegated": b.delegated, "parent_paths": list(b.parent_paths), "notes": b.describe()["notes"]}
b.ensure_parent()
out["own_after"] = open("/proc/self/cgroup").read().strip()
job = b.create("j1", CgroupLimits(memory_max_bytes=32 << 20, pids_max=8, cpu_max_cores=0))
out["job_paths"] = list(job.paths)
out["children"] = sorted(n for n in os.listdir("/sys/fs/cgroup") if os.path.isdir(f"/sys/fs/cgroup/{n}"))
job.destroy()
print(json.dumps(out))
'''


def test_cgroup_namespace_root_is_treated_as_delegated(own_tree):
    """A container: its own cgroup namespace with cgroup2 mounted at its root. The namespace root
    has a cgroup.type (it is not the real root), so the no-internal-processes rule applies there:
    detect() treats it as delegated and the daemon moves into /supervisor."""
    procs = Procs()
    try:
        ns = own_tree("test-ns")
        # as a container runtime does: a fresh cgroup2 mount in the new mount namespace (mounting the same
        # superblock again on the same mount point is EBUSY, so the host's is unmounted there first)
        script = 'umount /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && exec "$0" -c "$1"'
        p = procs.spawn(f"{ns}/cgroup.procs",
                        ["unshare", "--cgroup", "--mount", "--propagation", "private", "--",
                         "sh", "-c", script, PY, NS_CHILD],
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        r = json.loads(out)
        assert r["delegated"] is True and r["parent_paths"] == [CG]  # the namespace's view
        assert any("cgroup namespace root" in n for n in r["notes"])
        assert r["own_after"] == "0::/supervisor"
        assert r["job_paths"] == [f"{CG}/j1"] and r["children"] == ["j1", "supervisor"]
        # seen from the host: all of it inside the container's cgroup
        assert sorted(n for n in os.listdir(ns) if os.path.isdir(f"{ns}/{n}")) == ["supervisor"]
        assert _read(f"{ns}/cgroup.subtree_control").split() == ["cpu", "memory", "pids"]
    finally:
        procs.cleanup()


# --------------------------------------------------------------------------------------------
# the fake (tests/fakecgroupfs.py) against the real kernel: same operations, same answers


def _kernel_rules(fs, base: str, spawn, wait_killed) -> list[tuple[str, object]]:
    """Operations whose outcome the v2 backend (and its unit tests) rely on; returns what each did."""
    out: list[tuple[str, object]] = []

    def rec(label, fn, *args):
        try:
            r = fn(*args)
            out.append((label, "ok" if r is None else r))
        except OSError as exc:
            out.append((label, errno.errorcode[exc.errno]))

    B = f"{base}/b"
    w, r = fs.write_text, fs.read_text
    rec("mkdir", fs.mkdir, B)
    used = ("cgroup.procs", "cgroup.events", "cgroup.kill", "cgroup.freeze", "cgroup.subtree_control",
            "cgroup.controllers", "cgroup.type", "cpu.stat", "cpu.max", "memory.max", "memory.current",
            "memory.peak", "memory.events", "pids.max", "pids.current")
    rec("backend's files exist", lambda: [f for f in used if not fs.exists(f"{B}/{f}")])
    for f in ("cgroup.controllers", "cgroup.type", "cgroup.events", "memory.max", "pids.max", "cpu.max",
              "cgroup.freeze", "cgroup.subtree_control"):
        rec(f"read {f}", r, f"{B}/{f}")
    rec("cpu.stat keys", lambda: [ln.split()[0] for ln in r(f"{B}/cpu.stat").splitlines()][:3])
    rec("memory.events keys", lambda: [ln.split()[0] for ln in r(f"{B}/memory.events").splitlines()])
    rec("read cgroup.kill", r, f"{B}/cgroup.kill")
    for f in ("memory.current", "cgroup.events", "cgroup.controllers", "cpu.stat", "pids.current"):
        rec(f"write {f}", w, f"{B}/{f}", "1")
    for f, v in [("cgroup.kill", "2"), ("cgroup.kill", "x"), ("cgroup.kill", "1"), ("cgroup.freeze", "2"),
                 ("cgroup.freeze", "x"), ("memory.max", "abc"), ("memory.max", "-1"),
                 ("memory.max", str(64 * MiB + 100)), ("memory.max", " 32M\n"), ("memory.max", "max"),
                 ("memory.oom.group", "2"), ("pids.max", "-1"), ("pids.max", "4194305"), ("pids.max", "0x10"),
                 ("cpu.max", "0 100000"), ("cpu.max", "999 100000"), ("cpu.max", "1000 999"),
                 ("cpu.max", "1000 1000001"), ("cpu.max", "1500abc"), ("cpu.max", "2000 50000 junk"),
                 ("cpu.max", "max"), ("cpu.weight", "0"), ("cgroup.subtree_control", "memory"),
                 ("cgroup.subtree_control", "+bogus"), ("cgroup.subtree_control", "+io"),
                 ("cgroup.procs", "abc"), ("cgroup.procs", "-1"), ("cgroup.procs", str(2**22 + 1))]:
        rec(f"write {f} {v!r}", w, f"{B}/{f}", v)
        if f in ("memory.max", "pids.max", "cpu.max"):
            rec(f"read back {f}", r, f"{B}/{f}")
    p = spawn(B)
    rec("populated", r, f"{B}/cgroup.events")
    rec("+memory +pids +cpu with a process", w, f"{B}/cgroup.subtree_control", "+memory +pids +cpu")
    rec("+pids with a process", w, f"{B}/cgroup.subtree_control", "+pids")
    rec("type: thread root", r, f"{B}/cgroup.type")
    rec("+memory in a thread root", w, f"{B}/cgroup.subtree_control", "+memory")
    rec("mkdir child", fs.mkdir, f"{B}/c")
    rec("child type", r, f"{B}/c/cgroup.type")
    rec("move into an invalid domain", w, f"{B}/c/cgroup.procs", str(p))
    rec("-pids", w, f"{B}/cgroup.subtree_control", "-pids")
    rec("child type after", r, f"{B}/c/cgroup.type")
    rec("move into child", w, f"{B}/c/cgroup.procs", str(p))
    rec("+memory +pids +cpu, now empty", w, f"{B}/cgroup.subtree_control", "+memory +pids +cpu")
    rec("move back: no internal processes", w, f"{B}/cgroup.procs", str(p))
    rec("child +memory with a process", w, f"{B}/c/cgroup.subtree_control", "+memory")
    rec("mkdir grandchild", fs.mkdir, f"{B}/c/d")
    rec("move into grandchild", w, f"{B}/c/d/cgroup.procs", str(p))
    rec("child +memory, now empty", w, f"{B}/c/cgroup.subtree_control", "+memory")
    rec("-memory while a child uses it", w, f"{B}/cgroup.subtree_control", "-memory")
    rec("populated via grandchild", r, f"{B}/cgroup.events")
    rec("pids.current is hierarchical", r, f"{B}/pids.current")
    rec("rmdir with a child", fs.rmdir, B)
    rec("rmdir populated", fs.rmdir, f"{B}/c/d")
    rec("mkdir cgroup.procs", fs.mkdir, f"{B}/cgroup.procs")
    rec("kill the subtree", w, f"{B}/cgroup.kill", "1")
    wait_killed(p)
    rec("populated after kill", r, f"{B}/cgroup.events")
    rec("rmdir grandchild", fs.rmdir, f"{B}/c/d")
    rec("child -memory", w, f"{B}/c/cgroup.subtree_control", "-memory")
    rec("rmdir child", fs.rmdir, f"{B}/c")
    rec("disable all", w, f"{B}/cgroup.subtree_control", "-memory -pids -cpu")
    rec("empty subtree_control", r, f"{B}/cgroup.subtree_control")
    rec("rmdir", fs.rmdir, B)
    return out


def test_the_fake_cgroupfs_answers_like_the_kernel(env):
    """Every answer tests/fakecgroupfs.py gives for these operations is the real kernel's."""
    from tests.fakecgroupfs import FakeCgroup2FS

    backend, procs = env
    backend.ensure_parent()  # <mount>/<parent> with +memory +pids +cpu: the fake gets the same
    base = backend.parent_paths[0]
    fs = CgroupFS()

    def spawn(cg):
        return procs.spawn(f"{cg}/cgroup.procs", ["sleep", "60"]).pid

    def wait_killed(pid):
        p = next(p for p in procs.started if p.pid == pid)
        assert p.wait(timeout=5) == -signal.SIGKILL
        _wait_until(lambda: "populated 0" in _read(f"{base}/b/cgroup.events"), 2.0)

    real = _kernel_rules(fs, base, spawn, wait_killed)

    available = _read(f"{CG}/cgroup.controllers").split()
    fake = FakeCgroup2FS(controllers=tuple(available), root_subtree_control=("memory", "pids", "cpu"))
    fake.mkdir(base)
    fake.write_text(f"{base}/cgroup.subtree_control", "+memory +pids +cpu")
    modelled = _kernel_rules(fake, base, lambda cg: fake.add_process(cg), lambda pid: None)

    diff = [(label, got, fake_got) for (label, got), (_, fake_got) in zip(real, modelled) if got != fake_got]
    assert diff == [], "\n".join(f"{label}: kernel {got!r}, fake {f!r}" for label, got, f in diff)
    assert len(real) == len(modelled) > 80
