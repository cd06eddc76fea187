"""The pure pipeline: profile -> plan -> bwrap argv, against golden files (no root, no I/O).

Regenerate after an intended change with JAILER_REGEN_GOLDEN=1 and review the diff.
"""

import os

import pytest

from jailer.plan import (JAIL_BROKER_SOCKET, HostLayout, bwrap_argv, make_plan, runtime_argv, runtime_for)
from jailer.profile import builtin_defaults, load_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden")
LAYOUT = HostLayout(bwrap="/usr/bin/bwrap", node="/usr/bin/node", python="/usr/bin/python3.11",
                    shim_dir="/usr/lib/python3/dist-packages/jailer/shims",
                    root_symlinks=(("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64"),
                                   ("/sbin", "usr/sbin")),
                    root_dirs=())
SOCK = "/run/jailer/jobs/j-0000000000000000/broker.sock"
SECCOMP_FD = 3


def all_profiles():
    profiles, errors = load_dir(os.path.join(ROOT, "profiles"))
    assert errors == []
    profiles["builtin"] = builtin_defaults()
    return profiles


CASES = [(name, rt) for name in sorted(all_profiles()) for rt in ("node", "python")
         if all_profiles()[name].runtime.name in ("auto", rt)]


def render(argv):
    """One option per line so a golden diff reads like a review."""
    lines, cur = [], []
    for a in argv:
        if a.startswith("--") and cur:
            lines.append(" ".join(cur))
            cur = []
        cur.append(a)
    lines.append(" ".join(cur))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name,runtime", CASES)
def test_argv_golden(name, runtime):
    prof = all_profiles()[name]
    argv = bwrap_argv(make_plan(prof, runtime, SOCK), LAYOUT, SECCOMP_FD)
    path = os.path.join(GOLDEN, f"{name}.{runtime}.argv")
    text = render(argv)
    if os.environ.get("JAILER_REGEN_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()


def test_golden_files_have_no_orphans():
    expected = {f"{n}.{rt}.argv" for n, rt in CASES}
    assert set(os.listdir(GOLDEN)) == expected


@pytest.mark.parametrize("name,runtime", CASES)
def test_invariants_every_profile(name, runtime):
    """What the security model requires, whatever the profile says."""
    prof = all_profiles()[name]
    argv = bwrap_argv(make_plan(prof, runtime, SOCK), LAYOUT, SECCOMP_FD)
    head = argv[: argv.index("--")]
    for flag in ("--unshare-all", "--unshare-user", "--unshare-cgroup", "--disable-userns", "--die-with-parent",
                 "--new-session", "--clearenv"):
        assert flag in head
    assert head[head.index("--cap-drop") + 1] == "ALL"
    assert head[head.index("--seccomp") + 1] == str(SECCOMP_FD)
    assert "--share-net" not in head and "--bind" not in head  # nothing host-writable, no network
    # the root is an empty tmpfs made read-only after everything was mounted on it
    pairs = list(zip(head, head[1:]))
    last_mount = max(i for i, a in enumerate(head) if a in ("--ro-bind", "--tmpfs", "--dir", "--symlink", "--dev"))
    assert pairs.index(("--tmpfs", "/")) < pairs.index(("--remount-ro", "/")) and \
        pairs.index(("--remount-ro", "/")) > last_mount
    # /tmp and /dev/shm capped at the profile's size
    for target in ("/tmp", "/dev/shm"):
        i = [j for j in range(len(head)) if head[j] == "--tmpfs" and head[j + 1] == target][0]
        assert head[i - 2:i] == ["--size", str(prof.limits.tmpfs_bytes)]
    # the only way out: the broker socket, read-only
    i = head.index(JAIL_BROKER_SOCKET)
    assert head[i - 2:i] == ["--ro-bind", SOCK]
    # the job is not in the argv: the same command can start a warm jail
    assert argv[argv.index("--") + 1:] == runtime_argv(make_plan(prof, runtime, SOCK), LAYOUT)


def test_setenv_only_minimal_environment():
    argv = bwrap_argv(make_plan(builtin_defaults(), "node", SOCK), LAYOUT, SECCOMP_FD)
    names = [argv[i + 1] for i, a in enumerate(argv) if a == "--setenv"]
    assert names == ["PATH", "HOME", "TMPDIR", "LANG"]


def test_runtime_from_extension():
    prof = builtin_defaults()
    assert [runtime_for(prof, f) for f in ("a.js", "a.mjs", "a.cjs", "a.py")] == ["node"] * 3 + ["python"]
    with pytest.raises(ValueError, match="cannot tell the runtime"):
        runtime_for(prof, "a.rb")
    assert runtime_for(all_profiles()["globex"], "x.js") == "python"  # the profile pins it


def test_plan_is_frozen():
    plan = make_plan(builtin_defaults(), "python", SOCK)
    with pytest.raises(Exception):
        plan.runtime = "node"
    assert plan.cgroup_limits.pids_max == builtin_defaults().limits.pids + 2
