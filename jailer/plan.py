"""Profile + job -> frozen Plan -> bwrap argv. Pure: no I/O, no root, golden-file tested.

The job itself (code, entry, input) is NOT in the argv: it arrives over the broker socket, so the
same argv can start a jail before its job is known (warm pools).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from .cgroup import CgroupLimits
from .profile import Bind, Limits, Profile

JAIL_BROKER_DIR = "/run/jailer"
JAIL_BROKER_SOCKET = "/run/jailer/broker.sock"
JAIL_SHIM_DIR = "/opt/jailer"
JAIL_HOSTNAME = "jail"
JAIL_PATH = "/usr/local/bin:/usr/bin:/bin"
SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims")

RUNTIME_BY_EXTENSION = {".js": "node", ".mjs": "node", ".cjs": "node", ".py": "python"}


@dataclass(frozen=True)
class HostLayout:
    """Facts about the host's filesystem the argv depends on; gathered once by `probe_host`."""

    bwrap: str
    node: str
    python: str
    shim_dir: str
    # merged-/usr hosts (Debian 12): /lib -> usr/lib and so on are symlinks; others get ro binds.
    root_symlinks: tuple[tuple[str, str], ...]
    root_dirs: tuple[str, ...]


def probe_host(shim_dir: str = SHIM_DIR) -> HostLayout:
    """The impure half: look at the host once (at start-up, not per job)."""
    links, dirs = [], []
    for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(p):
            links.append((p, os.readlink(p)))
        elif os.path.isdir(p):
            dirs.append(p)
    return HostLayout(
        bwrap=shutil.which("bwrap") or "bwrap",
        node=os.path.realpath(shutil.which("node") or "/usr/bin/node"),
        python=os.path.realpath("/usr/bin/python3") if os.path.exists("/usr/bin/python3")
        else os.path.realpath(shutil.which("python3") or "/usr/bin/python3"),
        shim_dir=shim_dir,
        root_symlinks=tuple(links),
        root_dirs=tuple(dirs),
    )


def runtime_for(profile: Profile, filename: str) -> str:
    """Which runtime runs `filename`: the profile's, or from the extension when it says auto."""
    if profile.runtime.name != "auto":
        return profile.runtime.name
    ext = os.path.splitext(filename)[1].lower()
    try:
        return RUNTIME_BY_EXTENSION[ext]
    except KeyError:
        raise ValueError(f"{filename}: cannot tell the runtime from extension {ext!r} "
                         "(use .js/.mjs/.cjs or .py, or set runtime.name in the profile)") from None


@dataclass(frozen=True)
class Plan:
    tenant: str
    runtime: str  # node | python
    limits: Limits
    ro_binds: tuple[Bind, ...]
    broker_socket: str  # host path of this jail's broker socket
    profile_digest: str

    @property
    def cgroup_limits(self) -> CgroupLimits:
        # bwrap's outer monitor and pid-1 reaper live in the cgroup too: two extra pids.
        return CgroupLimits(memory_max_bytes=self.limits.memory_bytes,
                            pids_max=self.limits.pids + 2,
                            cpu_max_cores=self.limits.cpu_cores)


def make_plan(profile: Profile, runtime: str, broker_socket: str) -> Plan:
    if runtime not in ("node", "python"):
        raise ValueError(f"unknown runtime {runtime!r}")
    return Plan(tenant=profile.tenant, runtime=runtime, limits=profile.limits, ro_binds=profile.ro_paths,
                broker_socket=broker_socket, profile_digest=profile.digest)


def runtime_argv(plan: Plan, layout: HostLayout) -> list[str]:
    """The command bwrap runs inside the jail: the runtime's shim, pointed at the broker socket."""
    if plan.runtime == "node":
        return [layout.node, f"{JAIL_SHIM_DIR}/shim.js", JAIL_BROKER_SOCKET]
    # -I: ignore PYTHON* env and user site; -S: no site-packages; -B: never write .pyc
    return [layout.python, "-I", "-S", "-B", f"{JAIL_SHIM_DIR}/shim.py", JAIL_BROKER_SOCKET]


def bwrap_argv(plan: Plan, layout: HostLayout, seccomp_fd: int) -> list[str]:
    """Complete bwrap command line. Filesystem options apply in order (bwrap(1))."""
    lim = plan.limits
    argv = [
        layout.bwrap,
        # namespaces: all of them, a user namespace even as root, and no nested ones
        "--unshare-all", "--unshare-user", "--unshare-cgroup", "--disable-userns",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--hostname", JAIL_HOSTNAME,
        "--clearenv",
        "--setenv", "PATH", JAIL_PATH,
        "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        # root: an empty tmpfs, made read-only at the end; only the runtime's files are bound in
        "--tmpfs", "/",
        "--ro-bind", "/usr", "/usr",
    ]
    for path, target in layout.root_symlinks:
        argv += ["--symlink", target, path]
    for path in layout.root_dirs:
        argv += ["--ro-bind", path, path]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(lim.tmpfs_bytes), "--tmpfs", "/dev/shm",
        "--size", str(lim.tmpfs_bytes), "--tmpfs", "/tmp",
        "--ro-bind", layout.shim_dir, JAIL_SHIM_DIR,
        "--dir", JAIL_BROKER_DIR,
        "--ro-bind", plan.broker_socket, JAIL_BROKER_SOCKET,
    ]
    for b in plan.ro_binds:
        argv += ["--ro-bind", b.host, b.jail]
    argv += [
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--chdir", "/tmp",
        "--seccomp", str(seccomp_fd),
        "--",
    ]
    return argv + runtime_argv(plan, layout)
