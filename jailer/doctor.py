"""`jailer doctor`: which protections this host can apply, which it cannot, and what to do.

A host preflight in the spirit of isolate-check-environment: every check runs the real thing
(a real bwrap with a user namespace as an unprivileged uid, a real cgroup detection, a real
seccomp compile) rather than guessing from version numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

from .identity import DEFAULT_UID_BASE

MIN_BWRAP = (0, 8, 0)  # --disable-userns and --size


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x or 0) for x in m.groups()) if m else ()


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else f"running as uid {os.geteuid()}",
                 "run jailer as root (it creates cgroups and drops each jail to its own uid)")


def check_bwrap() -> Check:
    path = shutil.which("bwrap")
    if not path:
        return Check("bubblewrap", False, "bwrap not found on PATH", "apt-get install bubblewrap")
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    v = _version(out)
    if v < MIN_BWRAP:
        return Check("bubblewrap", False, f"{out} at {path}",
                     f"need bubblewrap >= {'.'.join(map(str, MIN_BWRAP))} (--disable-userns, --size)")
    if os.stat(path).st_mode & 0o4000:
        return Check("bubblewrap", False, f"{path} is setuid root",
                     "use a non-setuid bwrap: jailer needs unprivileged user namespaces, not setuid")
    return Check("bubblewrap", True, f"{out} at {path}")


def check_userns() -> Check:
    """A real jail: new user namespace + all others, as an unprivileged uid, nested userns off."""
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return Check("user namespaces", False, "cannot test without bwrap", "apt-get install bubblewrap")
    uid = DEFAULT_UID_BASE
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--", "/usr/bin/true"]
    try:
        kw = {"user": uid, "group": uid, "extra_groups": []} if os.geteuid() == 0 else {}
        p = subprocess.run(argv, capture_output=True, text=True, env={}, timeout=10, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("user namespaces", False, str(e), "see `sysctl user.max_user_namespaces`")
    if p.returncode != 0:
        hint = ("enable unprivileged user namespaces: sysctl -w kernel.unprivileged_userns_clone=1 "
                "(Debian) or user.max_user_namespaces > 0; on Ubuntu 24.04 allow bwrap in AppArmor")
        return Check("user namespaces", False, p.stderr.strip() or f"bwrap exited {p.returncode}", hint)
    return Check("user namespaces", True, f"a full jail starts as unprivileged uid {uid} (all namespaces, "
                 "nested user namespaces disabled)")


def check_cgroups() -> list[Check]:
    from .cgroup import CgroupError, detect

    try:
        backend = detect(os.environ.get("JAILER_CGROUP_PARENT", "jailer"))
    except CgroupError as e:
        return [Check("cgroups", False, str(e), "see docs/cgroups.md (Fail closed, Delegation under systemd)")]
    d = backend.describe()
    if d["version"] == 1:
        hier = ", ".join(f"{c} {p}" for c, p in d["hierarchies"].items())
        checks = [
            Check("cgroups", True, f"cgroup v1 (legacy/hybrid): {hier}"),
            Check("cgroup placement", True,
                  f"jobs are <hierarchy>/{os.path.basename(d['parent_paths'][0])}/<job> in "
                  f"{len(d['parent_paths'])} hierarchies: {', '.join(d['parent_paths'])}"),
        ]
        return checks + [Check("cgroup note", True, n, required=False) for n in d["notes"]]
    # v2
    available = " ".join(d["controllers_available"])
    checks = [
        Check("cgroups", True,
              f"cgroup v2 at {d['mount']}; required {' '.join(d['controllers_required'])} available "
              f"(cgroup.controllers: {available}); our cgroup {d['own_cgroup']}"),
    ]
    parent = d["parent_paths"][0]
    if d["delegated"]:
        checks.append(Check(
            "cgroup delegation", True,
            f"delegated ({d['delegation']}): the daemon moves into {d['supervisor_leaf']}, "
            f"jobs are {parent}/<job>, siblings of it"))
    elif d["own_cgroup"] == "/":
        checks.append(Check(
            "cgroup delegation", True,
            f"root mode ({d['delegation']}): jobs are {parent}/<job>"))
    else:
        checks.append(Check(
            "cgroup delegation", False,
            f"{d['delegation']}; jobs would go to {parent}/<job>, outside our own cgroup {d['own_cgroup']} "
            "(systemd neither accounts nor stops them with the unit)",
            "under systemd: Delegate=yes in the jailer unit (systemd marks its cgroup with the "
            "trusted.delegate xattr); elsewhere: start the daemon in the root cgroup, or in a cgroup of "
            f"its own marked with (package attr): setfattr -n trusted.delegate -v 1 {d['mount']}{d['own_cgroup']}",
            required=False))
    enabled = " ".join(d["subtree_control"]) or "nothing"
    if not d["parent_exists"]:
        checks.append(Check("cgroup set-up", True,
                            f"{parent} does not exist yet; at start the daemon will: " + "; ".join(d["pending"])))
    elif d["pending"]:
        checks.append(Check("cgroup set-up", True,
                            f"{parent}/cgroup.subtree_control enables {enabled}; at start the daemon will: "
                            + "; ".join(d["pending"])))
    else:
        checks.append(Check("cgroup set-up", True, f"{parent}/cgroup.subtree_control enables {enabled}: ready"))
    for problem in d["problems"]:
        checks.append(Check("cgroup set-up", False, problem, "see docs/cgroups.md"))
    if d["swap_enabled"]:
        checks.append(Check("cgroup swap", True, "swap is on; jobs get memory.swap.max = 0", required=False))
    return checks


def check_seccomp() -> Check:
    from . import seccomp

    ok, why = seccomp.supported()
    return Check("seccomp", ok, why, "" if ok else "install libseccomp2; the kernel needs CONFIG_SECCOMP_FILTER")


def check_runtime(name: str, path: str | None, args: list[str]) -> Check:
    if not path:
        return Check(name, False, "not found", f"apt-get install {'nodejs' if name == 'node' else 'python3'}",
                     required=False)
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=10)
        return Check(name, out.returncode == 0, f"{(out.stdout or out.stderr).strip()} at {path}")
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, False, str(e), required=False)


def check_launcher() -> Check:
    """Builds jailer-exec in a scratch directory: the daemon builds the same into its run dir."""
    import tempfile

    from . import launch

    with tempfile.TemporaryDirectory() as d:
        path, how = launch.build(d)
    if path is None:
        return Check("launcher", False, f"jailer-exec cannot be built ({how}): jails start through a Python "
                     "preexec_fn, same protections, ~2.5 ms more daemon CPU per jail",
                     "apt-get install gcc libc6-dev", required=False)
    return Check("launcher", True, f"jailer-exec {how} (jails start via vfork)")


def run_checks() -> list[Check]:
    checks = [check_root(), check_bwrap(), check_userns(), *check_cgroups(), check_seccomp(), check_launcher(),
              check_runtime("node", shutil.which("node"), ["--version"]),
              check_runtime("python", "/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                            else shutil.which("python3"), ["--version"])]
    return checks


def main(as_json: bool = False) -> int:
    checks = run_checks()
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            mark = "ok " if c.ok else ("MISSING" if c.required else "absent ")
            print(f"[{mark}] {c.name}: {c.detail}")
            if not c.ok and c.fix:
                print(f"          -> {c.fix}")
        failed = [c.name for c in checks if not c.ok and c.required]
        runtimes = [c.name for c in checks if c.name in ("node", "python") and c.ok]
        if failed:
            print(f"\njailer will refuse to run jobs: missing {', '.join(failed)}.")
        elif not runtimes:
            print("\nno runtime (node or python) found: jobs cannot run.")
        else:
            print(f"\nall protections available; runtimes: {', '.join(runtimes)}.")
    bad = any(not c.ok and c.required for c in checks) or not any(
        c.ok for c in checks if c.name in ("node", "python"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main("--json" in sys.argv))
