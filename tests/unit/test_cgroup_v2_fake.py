"""The cgroup v2 backend (and detection) against the FAKE in-memory cgroup2 filesystem."""

from __future__ import annotations

import errno

import pytest

from jailer import cgroup, cgroup_v2
from jailer.cgroup import (
    CgroupError,
    CgroupLimits,
    InvalidCgroupName,
    detect,
    parse_mountinfo,
    validate_name,
)
from jailer.cgroup_v1 import CgroupV1Backend
from jailer.cgroup_v2 import CgroupV2Backend
from tests.fakecgroupfs import FakeCgroup2FS

MiB = 1024 * 1024
M = "/sys/fs/cgroup"
LIMITS = CgroupLimits(memory_max_bytes=64 * MiB, pids_max=32, cpu_max_cores=1.5)

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

COMOUNTED_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,nosuid shared:12 - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,nosuid shared:13 - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid shared:14 - cgroup2 cgroup2 rw,nsdelegate
"""

SWAP_ON = "/dev/vdb                                partition\t1048572\t0\t-2\n"


def _detect(tmp_path, fake, *, own="/", delegate=None, swaps="", mountinfo=None, parent="jailer"):
    mi = tmp_path / "mountinfo"
    mi.write_text(mountinfo if mountinfo is not None else fake.mountinfo_text())
    cg = tmp_path / "cgroup"
    cg.write_text(f"0::{own}\n")
    sw = tmp_path / "swaps"
    sw.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n" + swaps)
    return detect(
        parent,
        fs=fake,
        mountinfo_path=str(mi),
        self_cgroup_path=str(cg),
        swaps_path=str(sw),
        delegate=delegate,
    )


def _systemd_tree(fake, *, delegate_xattr=True, extra_pids=1):
    """/system.slice/jailer.service holding our process (and workers), like systemd starts us."""
    fake.write_text(f"{M}/cgroup.subtree_control", "+memory +pids +cpu")
    fake.mkdir(f"{M}/system.slice")
    fake.write_text(f"{M}/system.slice/cgroup.subtree_control", "+memory +pids +cpu")
    fake.mkdir(f"{M}/system.slice/jailer.service")
    unit = "/system.slice/jailer.service"
    fake.write_text(f"{M}{unit}/cgroup.procs", str(fake.self_pid))
    workers = [fake.add_process(unit) for _ in range(extra_pids)]
    if delegate_xattr:
        fake.set_xattr(unit, "trusted.delegate", b"1")
    fake.ops.clear()
    return unit, workers


# --------------------------------------------------------------------------------------------
# root mode (root outside systemd delegation)


def test_root_mode_writes_limits_exactly(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    assert isinstance(backend, CgroupV2Backend) and backend.version == 2
    assert not backend.delegated and backend.parent_paths == (f"{M}/jailer",)
    assert fake.ops == []  # detection has no side effects

    job = backend.create("j1", LIMITS)

    assert fake.ops == [
        ("write", f"{M}/cgroup.subtree_control", "+memory +pids +cpu"),
        ("mkdir", f"{M}/jailer"),
        ("write", f"{M}/jailer/cgroup.subtree_control", "+memory +pids +cpu"),
        ("mkdir", f"{M}/jailer/j1"),
        ("write", f"{M}/jailer/j1/memory.max", str(64 * MiB)),
        ("write", f"{M}/jailer/j1/memory.swap.max", "0"),
        ("write", f"{M}/jailer/j1/pids.max", "32"),
        ("write", f"{M}/jailer/j1/cpu.max", "150000 100000"),
    ]
    assert job.procs_files == (f"{M}/jailer/j1/cgroup.procs",)
    assert job.paths == (f"{M}/jailer/j1",)
    read = lambda f: fake.read_text(f"{M}/jailer/j1/{f}").strip()
    assert read("memory.max") == str(64 * MiB)
    assert read("memory.swap.max") == "0"
    assert read("pids.max") == "32"
    assert read("cpu.max") == "150000 100000"


def test_no_cpu_quota_leaves_cpu_max_alone_and_parent_set_up_once(tmp_path):
    fake = FakeCgroup2FS(root_subtree_control=("memory", "pids", "cpu"))
    backend = _detect(tmp_path, fake)
    backend.create("a", CgroupLimits(memory_max_bytes=1000 * 4096 + 5, pids_max=1, cpu_max_cores=0))
    backend.create("b", CgroupLimits(memory_max_bytes=MiB, pids_max=2, cpu_max_cores=0.01))
    writes = fake.writes
    assert (f"{M}/cgroup.subtree_control", "+memory +pids +cpu") not in writes  # already enabled
    assert [w for w in writes if w[0].endswith("cgroup.subtree_control")] == [
        (f"{M}/jailer/cgroup.subtree_control", "+memory +pids +cpu")
    ]
    assert not any(w[0] == f"{M}/jailer/a/cpu.max" for w in writes)
    assert fake.read_text(f"{M}/jailer/a/cpu.max") == "max 100000\n"
    # the kernel keeps whole pages: the written value is exact, the read-back rounded down
    assert (f"{M}/jailer/a/memory.max", str(1000 * 4096 + 5)) in writes
    assert fake.read_text(f"{M}/jailer/a/memory.max") == f"{1000 * 4096}\n"
    assert fake.read_text(f"{M}/jailer/b/cpu.max") == "1000 100000\n"


def test_parent_with_own_processes_is_refused_with_reason(tmp_path):
    fake = FakeCgroup2FS(root_subtree_control=("memory", "pids", "cpu"))
    fake.mkdir(f"{M}/jailer")
    fake.add_process("/jailer")  # someone put a process into our parent
    backend = _detect(tmp_path, fake)
    with pytest.raises(CgroupError, match="no internal processes"):
        backend.create("j1", LIMITS)


# --------------------------------------------------------------------------------------------
# delegation (systemd Delegate=yes)


def test_delegated_moves_processes_to_supervisor_leaf_before_enabling(tmp_path):
    fake = FakeCgroup2FS()
    unit, workers = _systemd_tree(fake, extra_pids=2)
    backend = _detect(tmp_path, fake, own=unit)
    base = f"{M}{unit}"
    assert backend.delegated
    assert backend.parent_paths == (base,)
    assert backend.supervisor_leaf == f"{base}/supervisor"
    d = backend.describe()
    assert d["mode"] == "delegated" and d["supervisor_leaf"] == f"{base}/supervisor"

    backend.ensure_parent()

    ops = fake.ops
    assert ops[0] == ("mkdir", f"{base}/supervisor")
    moved = [op for op in ops if op[0] == "write" and op[1] == f"{base}/supervisor/cgroup.procs"]
    assert sorted(int(op[2]) for op in moved) == sorted([fake.self_pid, *workers])
    enable = ops.index(("write", f"{base}/cgroup.subtree_control", "+memory +pids +cpu"))
    assert enable > max(ops.index(op) for op in moved)  # the move happens first
    assert fake.read_text(f"{base}/cgroup.procs") == ""
    assert fake.cgroup_of(fake.self_pid) == f"{unit}/supervisor"

    job = backend.create("j1", LIMITS)
    assert job.paths == (f"{base}/j1",)  # a sibling of supervisor/
    assert fake.read_text(f"{base}/j1/cgroup.controllers").split() == ["cpu", "memory", "pids"]
    assert backend.cleanup_stale() == ["j1"]  # never touches supervisor/
    assert fake.exists(f"{base}/supervisor") and not fake.exists(f"{base}/j1")
    backend.remove_parent()  # our own cgroup: left to systemd
    assert fake.exists(base)


def test_enabling_controllers_without_the_leaf_move_is_ebusy(tmp_path):
    fake = FakeCgroup2FS()
    unit, _ = _systemd_tree(fake)
    with pytest.raises(OSError) as exc:
        fake.write_text(f"{M}{unit}/cgroup.subtree_control", "+memory +pids +cpu")
    assert exc.value.errno == errno.EBUSY
    # and the backend explains it if someone enables controllers and then a process shows up
    backend = _detect(tmp_path, fake, own=unit)
    real_move = backend._move_into_leaf
    backend._move_into_leaf = lambda: None  # simulate a backend that forgot to move
    with pytest.raises(CgroupError, match="EBUSY.*no internal processes"):
        backend.ensure_parent()
    backend._move_into_leaf = real_move
    backend.ensure_parent()


def test_delegated_thread_root_is_explained(tmp_path):
    # the unit's cgroup holds processes and someone enabled +pids there: a thread root
    fake = FakeCgroup2FS()
    unit, _ = _systemd_tree(fake)
    fake.write_text(f"{M}{unit}/cgroup.subtree_control", "+pids")
    backend = _detect(tmp_path, fake, own=unit)
    d = backend.describe()
    assert any("'domain threaded'" in p for p in d["problems"])
    with pytest.raises(CgroupError, match=r"EOPNOTSUPP.*'pids' enabled.*write '-pids' to"):
        backend.ensure_parent()


def test_enable_controllers_in_a_thread_root_is_explained(tmp_path):
    fake = FakeCgroup2FS()
    unit, _ = _systemd_tree(fake)
    fake.write_text(f"{M}{unit}/cgroup.subtree_control", "+pids")
    backend = _detect(tmp_path, fake, own=unit)
    backend._move_into_leaf = lambda: None  # as if the move had been skipped
    with pytest.raises(CgroupError, match=r"EOPNOTSUPP, its cgroup.type is 'domain threaded'"):
        backend.ensure_parent()


def test_describe_says_what_start_up_will_do(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    d = backend.describe()
    assert d["delegation"] == "not delegated: we run in the root cgroup" and not d["parent_exists"]
    assert d["pending"] == [
        f"enable +memory +pids +cpu in {M}/cgroup.subtree_control",
        f"create {M}/jailer",
        f"enable +memory +pids +cpu in {M}/jailer/cgroup.subtree_control",
    ]
    assert d["problems"] == [] and fake.ops == []  # describe() changes nothing
    backend.ensure_parent()
    d = backend.describe()
    assert d["pending"] == [] and d["problems"] == [] and d["parent_exists"]
    # a parent that holds a process (and has no controllers yet) would fail with EBUSY
    fake2 = FakeCgroup2FS(root_subtree_control=("memory", "pids", "cpu"))
    fake2.mkdir(f"{M}/jailer")
    pid = fake2.add_process("/jailer")
    problems = _detect(tmp_path, fake2).describe()["problems"]
    assert len(problems) == 1 and f"holds processes ({pid})" in problems[0] and "EBUSY" in problems[0]
    # delegated: the move, then the controllers
    fake3 = FakeCgroup2FS()
    unit, workers = _systemd_tree(fake3, extra_pids=2)
    d = _detect(tmp_path, fake3, own=unit).describe()
    assert d["delegation"] == f"trusted.delegate=1 on {M}{unit}"
    assert d["pending"] == [
        f"move 3 process(es) of {M}{unit} into {M}{unit}/supervisor",
        f"enable +memory +pids +cpu in {M}{unit}/cgroup.subtree_control",
    ]


def test_delegation_detected_when_already_in_supervisor_leaf(tmp_path):
    fake = FakeCgroup2FS()
    unit, _ = _systemd_tree(fake, extra_pids=0)
    backend = _detect(tmp_path, fake, own=unit)
    backend.ensure_parent()
    # a restarted daemon inside the same unit reads ".../supervisor" as its own cgroup
    again = _detect(tmp_path, fake, own=f"{unit}/supervisor")
    assert again.delegated and again.parent_paths == (f"{M}{unit}",)
    again.ensure_parent()
    again.create("j2", LIMITS)


def test_not_delegated_without_xattr_uses_root_parent(tmp_path):
    fake = FakeCgroup2FS()
    unit, _ = _systemd_tree(fake, delegate_xattr=False)
    backend = _detect(tmp_path, fake, own=unit)
    assert not backend.delegated
    assert backend.parent_paths == (f"{M}/jailer",)
    assert any("not delegated" in n for n in backend.describe()["notes"])
    backend.create("j1", LIMITS)
    assert fake.cgroup_of(fake.self_pid) == unit  # we were not moved


def test_user_delegate_xattr_and_explicit_override(tmp_path):
    fake = FakeCgroup2FS()
    unit, _ = _systemd_tree(fake, delegate_xattr=False)
    fake.set_xattr(unit, "user.delegate", b"1")
    assert _detect(tmp_path, fake, own=unit).delegated
    assert not _detect(tmp_path, fake, own=unit, delegate=False).delegated


def test_cgroup_namespace_root_is_treated_as_delegated(tmp_path):
    fake = FakeCgroup2FS(namespace_root=True)
    backend = _detect(tmp_path, fake, own="/")
    assert backend.delegated and backend.supervisor_leaf == f"{M}/supervisor"
    job = backend.create("j1", LIMITS)
    assert fake.cgroup_of(fake.self_pid) == "/supervisor"
    assert job.paths == (f"{M}/j1",)


def test_delegated_cgroup_without_controllers_fails_closed(tmp_path):
    fake = FakeCgroup2FS()
    fake.write_text(f"{M}/cgroup.subtree_control", "+cpu")  # systemd delegated only cpu
    fake.mkdir(f"{M}/svc")
    fake.set_xattr("/svc", "trusted.delegate", b"1")
    with pytest.raises(CgroupError) as exc:
        _detect(tmp_path, fake, own="/svc")
    msg = str(exc.value)
    assert "memory, pids" in msg and "Delegate=yes" in msg and "refuses" in msg


def test_missing_controllers_at_root_fail_closed(tmp_path):
    fake = FakeCgroup2FS(controllers=("cpu", "io", "memory"))
    with pytest.raises(CgroupError, match=r"controller\(s\) pids not available in /sys/fs/cgroup/cgroup.controllers"):
        _detect(tmp_path, fake)


# --------------------------------------------------------------------------------------------
# usage, kill, remove


def test_usage_parsing_and_oom(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    job = backend.create("j1", LIMITS)
    assert job.cpu_ns() == 0
    assert job.usage().oom_kills == 0
    p1 = fake.add_process("/jailer/j1")
    p2 = fake.add_process("/jailer/j1")
    fake.set_cpu_usage("/jailer/j1", 1234)
    fake.set_memory("/jailer/j1", 30 * MiB)
    fake.set_memory("/jailer/j1", 10 * MiB)
    assert job.cpu_ns() == 1_234_000
    assert job.pids() == sorted([p1, p2])
    u = job.usage()
    assert (u.cpu_ns, u.memory_peak_bytes, u.oom_kills, u.pids_current) == (1_234_000, 30 * MiB, 0, 2)
    victim = fake.trigger_oom("/jailer/j1")
    assert victim == p2
    u = job.usage()
    assert u.oom_kills == 1 and u.pids_current == 1
    assert "oom 1\noom_kill 1\n" in fake.read_text(f"{M}/jailer/j1/memory.events")


def test_peak_is_sampled_when_memory_peak_is_missing(tmp_path):
    fake = FakeCgroup2FS(has_peak=False)
    job = _detect(tmp_path, fake).create("j1", LIMITS)
    assert not fake.exists(f"{M}/jailer/j1/memory.peak")
    fake.set_memory("/jailer/j1", 10 * MiB)
    job.cpu_ns()  # the ~10 ms poll also samples memory.current
    fake.set_memory("/jailer/j1", 2 * MiB)
    assert job.usage().memory_peak_bytes == 10 * MiB


def test_kill_uses_cgroup_kill_and_covers_descendants(tmp_path):
    fake = FakeCgroup2FS()
    job = _detect(tmp_path, fake).create("j1", LIMITS)
    pids = [fake.add_process("/jailer/j1") for _ in range(3)]
    fake.mkdir(f"{M}/jailer/j1/inner")  # a sub-cgroup made inside the job
    inner = fake.add_process("/jailer/j1/inner")
    assert not job.is_empty()
    fake.ops.clear()
    job.kill()
    assert fake.ops == [("write", f"{M}/jailer/j1/cgroup.kill", "1")]
    assert sorted(fake.killed) == sorted([*pids, inner])
    assert job.is_empty()
    job.remove()
    assert not fake.exists(f"{M}/jailer/j1")
    assert fake.exists(f"{M}/jailer")


def test_kill_fallback_without_cgroup_kill(tmp_path, monkeypatch):
    fake = FakeCgroup2FS(has_kill=False)
    job = _detect(tmp_path, fake).create("j1", LIMITS)
    pids = [fake.add_process("/jailer/j1") for _ in range(2)]
    signalled = []

    def fake_kill(pids_):  # never signal real host processes from a unit test
        for p in pids_:
            signalled.append(p)
            fake.exit_process(p)

    monkeypatch.setattr(cgroup, "_kill_pids", fake_kill)  # used by _kill_in_passes
    fake.ops.clear()
    job.kill()
    assert sorted(signalled) == sorted(pids)
    assert fake.ops[0] == ("write", f"{M}/jailer/j1/cgroup.freeze", "1")
    assert fake.ops[-1] == ("write", f"{M}/jailer/j1/cgroup.freeze", "0")
    assert job.is_empty()


def test_remove_populated_raises_and_destroy_is_idempotent(tmp_path):
    fake = FakeCgroup2FS()
    job = _detect(tmp_path, fake).create("j1", LIMITS)
    fake.add_process("/jailer/j1")
    with pytest.raises(CgroupError, match="still populated"):
        job.remove()
    job.destroy()
    assert not fake.exists(f"{M}/jailer/j1")
    job.destroy()  # second call: nothing left, no error
    assert job.is_empty()


def test_destroy_times_out_on_unkillable_process(tmp_path):
    fake = FakeCgroup2FS()
    job = _detect(tmp_path, fake).create("j1", LIMITS)
    pid = fake.add_process("/jailer/j1")
    fake.make_unkillable(pid)
    with pytest.raises(CgroupError, match=rf"still has processes \[{pid}\]"):
        job.destroy(timeout_s=0.05)
    assert fake.exists(f"{M}/jailer/j1")  # left for cleanup_stale
    fake.exit_process(pid)
    job.destroy()


def test_cleanup_stale_after_a_crash(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    for name in ("j1", "j2"):
        backend.create(name, LIMITS)
        fake.add_process(f"/jailer/{name}")
    # the daemon is SIGKILLed; the next one starts with a fresh backend
    fresh = _detect(tmp_path, fake)
    assert fresh.cleanup_stale() == ["j1", "j2"]
    assert not any(n.startswith("j") for n in fake.listdir(f"{M}/jailer"))
    assert fresh.cleanup_stale() == []
    fresh.remove_parent()
    assert not fake.exists(f"{M}/jailer")
    fresh.remove_parent()  # already gone: fine
    assert _detect(tmp_path, fake).cleanup_stale() == []  # no parent at all


def test_remove_parent_keeps_a_non_empty_parent(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    backend.create("j1", LIMITS)
    backend.remove_parent()
    assert fake.exists(f"{M}/jailer/j1")


def test_create_rolls_back_on_failure(tmp_path):
    # swap is on but the kernel has no swap accounting: memory.swap.max cannot be written
    fake = FakeCgroup2FS(swap_accounting=False)
    backend = _detect(tmp_path, fake, swaps=SWAP_ON)
    with pytest.raises(CgroupError, match="memory.swap.max.*swapaccount=1"):
        backend.create("j1", LIMITS)
    assert not fake.exists(f"{M}/jailer/j1")
    assert fake.ops[-1] == ("rmdir", f"{M}/jailer/j1")
    # without swap, no swap accounting is fine
    ok = _detect(tmp_path, FakeCgroup2FS(swap_accounting=False))
    ok.create("j1", LIMITS)


def test_existing_job_name_is_refused_and_left_alone(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    backend.create("j1", LIMITS)
    pid = fake.add_process("/jailer/j1")
    with pytest.raises(CgroupError, match="already exists"):
        backend.create("j1", LIMITS)
    assert fake.cgroup_of(pid) == "/jailer/j1"


def test_attach_moves_the_process(tmp_path):
    fake = FakeCgroup2FS()
    job = _detect(tmp_path, fake).create("j1", LIMITS)
    pid = fake.add_process("/")
    job.attach(pid)
    assert fake.cgroup_of(pid) == "/jailer/j1" and job.pids() == [pid]
    with pytest.raises(CgroupError, match="ESRCH"):
        job.attach(999_999)


# --------------------------------------------------------------------------------------------
# names and limits


@pytest.mark.parametrize(
    "name",
    [
        "", ".", "..", "../x", "a/b", "/abs", ".hidden", "a b", "tenant\n", "é", "x" * 65,
        "cgroup.procs", "cgroup.kill", "memory.max", "memory.anything", "cpu.max", "pids.max",
        "io.max", "cpuacct.usage", "freezer.state", "tasks", "notify_on_release", "release_agent",
        "supervisor", None, 42,
    ],
)
def test_invalid_names_are_refused_before_any_mkdir(tmp_path, name):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    with pytest.raises(InvalidCgroupName):
        backend.create(name, LIMITS)
    assert not any(op[0] == "mkdir" for op in fake.ops)


@pytest.mark.parametrize("name", ["job-1", "tenant_a.job.42", "memory", "cpu-1", "x" * 64, "A.b_c-D"])
def test_valid_names(name):
    assert validate_name(name) == name


def test_parent_name_is_validated(tmp_path):
    with pytest.raises(InvalidCgroupName):
        _detect(tmp_path, FakeCgroup2FS(), parent="../escape")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_max_bytes": 0, "pids_max": 1, "cpu_max_cores": 0},
        {"memory_max_bytes": -1, "pids_max": 1, "cpu_max_cores": 0},
        {"memory_max_bytes": MiB, "pids_max": 0, "cpu_max_cores": 0},
        {"memory_max_bytes": True, "pids_max": 1, "cpu_max_cores": 0},
        {"memory_max_bytes": MiB, "pids_max": 1, "cpu_max_cores": -1},
        {"memory_max_bytes": MiB, "pids_max": 1, "cpu_max_cores": 0.005},
        {"memory_max_bytes": MiB, "pids_max": 1, "cpu_max_cores": float("nan")},
        {"memory_max_bytes": 1.5, "pids_max": 1, "cpu_max_cores": 0},
    ],
)
def test_invalid_limits(kwargs):
    with pytest.raises(ValueError):
        CgroupLimits(**kwargs)


# --------------------------------------------------------------------------------------------
# detection


def test_detect_hybrid_is_v1_and_ignores_unified(tmp_path):
    backend = _detect(tmp_path, FakeCgroup2FS(), mountinfo=HYBRID_MOUNTINFO)
    assert isinstance(backend, CgroupV1Backend) and backend.version == 1
    assert backend.parent_paths == tuple(
        f"/sys/fs/cgroup/{c}/jailer" for c in ("memory", "pids", "cpu", "cpuacct", "freezer")
    )
    d = backend.describe()
    assert d["controllers_missing"] == []
    assert any("/sys/fs/cgroup/unified ignored" in n for n in d["notes"])


def test_detect_v1_with_cpu_cpuacct_comounted(tmp_path):
    backend = _detect(tmp_path, FakeCgroup2FS(), mountinfo=COMOUNTED_MOUNTINFO)
    assert backend.version == 1
    h = backend.describe()["hierarchies"]
    assert h["cpu"] == h["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert len(backend.parent_paths) == 4


def test_detect_v1_missing_controller_names_it(tmp_path):
    text = "\n".join(ln for ln in HYBRID_MOUNTINFO.splitlines() if "rw,pids" not in ln) + "\n"
    with pytest.raises(CgroupError, match=r"not mounted: pids.*mount -t cgroup -o pids"):
        _detect(tmp_path, FakeCgroup2FS(), mountinfo=text)


def test_detect_v1_refuses_swap_without_memsw(tmp_path):
    # the fake fs has no /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes
    with pytest.raises(CgroupError, match="memsw.*swapaccount=1"):
        _detect(tmp_path, FakeCgroup2FS(), mountinfo=HYBRID_MOUNTINFO, swaps=SWAP_ON)


def test_detect_pure_v2(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    assert backend.version == 2
    d = backend.describe()
    assert d["version"] == 2 and d["mount"] == M and d["controllers_missing"] == []
    assert set(d["controllers_available"]) >= {"memory", "pids", "cpu"}
    assert d["supervisor_leaf"] is None and d["mode"] == "root"


def test_detect_nothing_mounted(tmp_path):
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        _detect(tmp_path, FakeCgroup2FS(), mountinfo="22 1 0:21 / / rw - ext4 /dev/vda rw\n")


def test_parse_mountinfo_unescapes_and_reads_super_options():
    (m,) = parse_mountinfo(r"40 31 0:37 / /sys/fs/cgroup/a\040b rw shared:1 master:2 - cgroup cg rw,cpu,cpuacct")
    assert m.mount_point == "/sys/fs/cgroup/a b" and m.fstype == "cgroup"
    assert {"cpu", "cpuacct"} <= m.super_options


# --------------------------------------------------------------------------------------------
# the fake itself follows the kernel (so the tests above mean something)


def _errno(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_fake_kernel_rules():
    # Each expectation below was checked against Linux 6.1 in the UML guest (tests/vm/run); the
    # ones marked "real:" are where the fake used to disagree (see docs/cgroups.md).
    fake = FakeCgroup2FS()
    w = fake.write_text
    assert _errno(w, f"{M}/cgroup.subtree_control", "memory") == errno.EINVAL
    assert _errno(w, f"{M}/cgroup.subtree_control", "+bogus") == errno.EINVAL
    w(f"{M}/cgroup.subtree_control", "+memory +pids +cpu")  # root: processes allowed
    fake.mkdir(f"{M}/a")
    assert fake.read_text(f"{M}/a/cgroup.controllers") == "cpu memory pids\n"
    assert fake.read_text(f"{M}/a/cgroup.subtree_control") == ""  # real: no newline when empty
    assert _errno(w, f"{M}/a/cgroup.subtree_control", "+io") == errno.ENOENT
    pid = fake.add_process("/a")
    assert _errno(w, f"{M}/a/cgroup.subtree_control", "+memory +pids") == errno.EBUSY  # no internal procs
    fake.exit_process(pid)
    w(f"{M}/a/cgroup.subtree_control", "+memory")
    assert _errno(w, f"{M}/a/cgroup.procs", str(fake.self_pid)) == errno.EBUSY  # no internal procs
    assert _errno(w, f"{M}/cgroup.subtree_control", "-memory") == errno.EBUSY  # a child uses it
    fake.mkdir(f"{M}/a/b")
    assert fake.exists(f"{M}/a/b/memory.max") and not fake.exists(f"{M}/a/b/cpu.max")
    assert _errno(fake.rmdir, f"{M}/a") == errno.EBUSY  # has a child
    assert _errno(w, f"{M}/a/b/memory.max", "abc") == errno.EINVAL
    w(f"{M}/a/b/memory.max", "64M")
    assert fake.read_text(f"{M}/a/b/memory.max") == f"{64 * MiB}\n"
    w(f"{M}/a/b/memory.max", str(64 * MiB + 100))  # whole pages
    assert fake.read_text(f"{M}/a/b/memory.max") == f"{64 * MiB}\n"
    assert _errno(w, f"{M}/a/b/memory.current", "1") == errno.EINVAL  # real: EINVAL for root, not EACCES
    assert _errno(w, f"{M}/a/b/cgroup.events", "1") == errno.EINVAL
    assert _errno(w, f"{M}/a/pids.max", "-1") == errno.EINVAL
    assert _errno(fake.read_text, f"{M}/a/b/cpu.max") == errno.ENOENT  # cpu not enabled in a
    assert _errno(w, f"{M}/a/cpu.max", "0 100000") == errno.EINVAL
    assert _errno(w, f"{M}/a/cpu.max", "999 100000") == errno.EINVAL
    assert _errno(w, f"{M}/a/cpu.max", "1000 999") == errno.EINVAL
    assert _errno(w, f"{M}/a/cpu.max", "1000 1000001") == errno.EINVAL
    assert _errno(w, f"{M}/a/cpu.max", "maximum") == errno.EINVAL
    w(f"{M}/a/cpu.max", "1000")
    assert fake.read_text(f"{M}/a/cpu.max") == "1000 100000\n"
    w(f"{M}/a/cpu.max", "1500abc")  # real: sscanf("%llu") takes the leading digits
    assert fake.read_text(f"{M}/a/cpu.max") == "1500 100000\n"
    w(f"{M}/a/cpu.max", "2000 50000 junk")  # real: trailing text ignored
    assert fake.read_text(f"{M}/a/cpu.max") == "2000 50000\n"
    w(f"{M}/a/cpu.max", "max")  # the period is kept
    assert fake.read_text(f"{M}/a/cpu.max") == "max 50000\n"
    assert _errno(w, f"{M}/a/cpu.weight", "0") == errno.ERANGE  # real: ERANGE, not EINVAL
    assert _errno(w, f"{M}/a/cpu.weight", "x") == errno.EINVAL
    w(f"{M}/a/pids.max", "0x10")
    assert fake.read_text(f"{M}/a/pids.max") == "16\n"  # real: stored as a number
    assert _errno(w, f"{M}/a/b/cgroup.kill", "2") == errno.ERANGE
    assert _errno(w, f"{M}/a/b/cgroup.kill", "x") == errno.EINVAL
    assert _errno(fake.read_text, f"{M}/a/b/cgroup.kill") == errno.EINVAL  # real: EINVAL, not EACCES
    assert _errno(w, f"{M}/a/b/cgroup.freeze", "2") == errno.ERANGE  # real: ERANGE, not EINVAL
    assert _errno(w, f"{M}/a/b/cgroup.freeze", "x") == errno.EINVAL
    assert _errno(w, f"{M}/a/b/cgroup.procs", "-1") == errno.EINVAL  # real: EINVAL, not ESRCH
    assert _errno(w, f"{M}/a/b/cgroup.procs", "999999") == errno.ESRCH
    assert not fake.exists(f"{M}/cgroup.kill") and not fake.exists(f"{M}/memory.max")
    assert fake.exists(f"{M}/memory.stat") and fake.exists(f"{M}/cpu.stat")  # root-visible files
    p = fake.add_process("/a/b")
    assert fake.read_text(f"{M}/a/cgroup.events").startswith("populated 1")
    assert _errno(fake.rmdir, f"{M}/a/b") == errno.EBUSY
    w(f"{M}/a/cgroup.kill", "1")  # kills descendants too
    assert p in fake.killed and fake.read_text(f"{M}/a/cgroup.events").startswith("populated 0")
    fake.rmdir(f"{M}/a/b")
    w(f"{M}/a/cgroup.subtree_control", "-memory")
    assert _errno(fake.rmdir, M) == errno.EBUSY
    assert _errno(fake.mkdir, f"{M}/a/cgroup.procs") == errno.EEXIST


def test_fake_thread_root_rules():
    """real: a domain with processes and a threaded controller (pids, cpu) enabled becomes a
    thread root: memory can no longer be enabled there (EOPNOTSUPP, not EBUSY) and its children are
    invalid domains that cannot take processes. Checked on Linux 6.1 in the UML guest."""
    fake = FakeCgroup2FS(root_subtree_control=("memory", "pids", "cpu"))
    w = fake.write_text
    fake.mkdir(f"{M}/b")
    pid = fake.add_process("/b")
    w(f"{M}/b/cgroup.subtree_control", "+pids +cpu")  # threaded only: allowed with processes
    assert fake.read_text(f"{M}/b/cgroup.type") == "domain threaded\n"
    assert _errno(w, f"{M}/b/cgroup.subtree_control", "+memory") == errno.EOPNOTSUPP
    fake.mkdir(f"{M}/b/c")
    assert fake.read_text(f"{M}/b/c/cgroup.type") == "domain invalid\n"
    assert _errno(w, f"{M}/b/c/cgroup.procs", str(pid)) == errno.EOPNOTSUPP
    assert _errno(w, f"{M}/b/c/cgroup.subtree_control", "+pids") == errno.EOPNOTSUPP
    w(f"{M}/b/cgroup.subtree_control", "-pids -cpu")
    assert fake.read_text(f"{M}/b/cgroup.type") == "domain\n"
    assert fake.read_text(f"{M}/b/c/cgroup.type") == "domain\n"
    w(f"{M}/b/c/cgroup.procs", str(pid))
    w(f"{M}/b/cgroup.subtree_control", "+memory +pids +cpu")  # b is empty now
    assert fake.read_text(f"{M}/b/pids.peak") == "1\n"


def test_fake_file_set_is_linux_6_1():
    fake = FakeCgroup2FS(controllers=("cpu", "io", "memory", "pids"), root_subtree_control=("memory", "pids", "cpu"))
    fake.mkdir(f"{M}/b")
    # the listings the real kernel (6.1, UML guest) gave for the same set-up
    assert sorted(n for n in fake.listdir(M) if n != "b") == [
        "cgroup.controllers", "cgroup.max.depth", "cgroup.max.descendants", "cgroup.procs", "cgroup.stat",
        "cgroup.subtree_control", "cgroup.threads", "cpu.stat", "io.stat", "memory.reclaim", "memory.stat",
    ]
    assert sorted(fake.listdir(f"{M}/b")) == [
        "cgroup.controllers", "cgroup.events", "cgroup.freeze", "cgroup.kill", "cgroup.max.depth",
        "cgroup.max.descendants", "cgroup.procs", "cgroup.stat", "cgroup.subtree_control", "cgroup.threads",
        "cgroup.type", "cpu.idle", "cpu.max", "cpu.max.burst", "cpu.stat", "cpu.weight", "cpu.weight.nice",
        "memory.current", "memory.events", "memory.events.local", "memory.high", "memory.low", "memory.max",
        "memory.min", "memory.oom.group", "memory.peak", "memory.reclaim", "memory.stat", "memory.swap.current",
        "memory.swap.events", "memory.swap.high", "memory.swap.max", "memory.zswap.current", "memory.zswap.max",
        "pids.current", "pids.events", "pids.max", "pids.peak",
    ]


def test_cpu_weight_is_written_and_range_checked(tmp_path):
    fake = FakeCgroup2FS()
    backend = _detect(tmp_path, fake)
    job = backend.create("j1", LIMITS)
    fake.ops.clear()
    job.set_cpu_weight(10)
    job.set_cpu_weight(100)
    assert fake.ops == [("write", f"{M}/jailer/j1/cpu.weight", "10"), ("write", f"{M}/jailer/j1/cpu.weight", "100")]
    assert fake.read_text(f"{M}/jailer/j1/cpu.weight").strip() == "100"
    with pytest.raises(ValueError):
        job.set_cpu_weight(10001)
