"""How bwrap is started: through jailer-exec (a tiny C program) or, without a C compiler, a Python
preexec_fn. Both do the same steps in the same order (cgroup join, rlimits, uid/gid drop,
no_new_privs, parent-death signal); they differ only in cost.

Why a C program: a preexec_fn forces subprocess to fork() the whole daemon (tens of MB) for every
jail, and every page the daemon then writes takes a copy-on-write fault: measured ~1100 faults and
~2.5 ms of daemon CPU per jail. Without a preexec_fn, subprocess uses vfork(): no copy, no faults.
The program is built from jailer/launcher/jailer-exec.c: by `./dev setup` next to its source, or
else on first use into the run directory (root-only); its name carries the source's digest, so a
changed source is never served by an old binary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from typing import Callable

import prctl

log = logging.getLogger("jailer.launch")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher", "jailer-exec.c")


def build(run_dir: str, source: str = SOURCE) -> tuple[str | None, str]:
    """(path of the jailer-exec binary, how) — path None (and why) when it cannot be built."""
    try:
        with open(source, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError as e:
        return None, f"{source}: {e.strerror}"
    name = f"jailer-exec-{digest}"
    prebuilt = os.path.join(os.path.dirname(source), name)
    if _root_owned_executable(prebuilt):
        return prebuilt, "prebuilt"
    path = os.path.join(run_dir, name)
    if _root_owned_executable(path):
        return path, "built earlier"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc/gcc) on PATH"
    fd, tmp = tempfile.mkstemp(prefix=".jailer-exec-", dir=run_dir)
    os.close(fd)
    error = ""
    try:
        for flags in (["-static"], []):  # static: no dynamic loader work at each exec
            r = subprocess.run([cc, "-O2", "-Wall", *flags, "-o", tmp, source], capture_output=True, text=True)
            if r.returncode == 0:
                os.chmod(tmp, 0o755)
                os.rename(tmp, path)  # atomic: concurrent builders end with the same file
                return path, f"built with {cc} {' '.join(flags)}".rstrip()
            error = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return None, f"{cc} failed: {error}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _root_owned_executable(path: str) -> bool:
    """Run as root by the daemon: only a file nobody but root could have written or replaced."""
    try:
        st, parent = os.stat(path), os.stat(os.path.dirname(path))
    except FileNotFoundError:
        return False
    return (st.st_uid == 0 and not st.st_mode & 0o022 and bool(st.st_mode & 0o100)
            and parent.st_uid == 0 and not parent.st_mode & 0o022)


def exec_argv(helper: str, procs_files: tuple[str, ...], uid: int, gid: int, open_files: int, parent: int,
              argv: list[str]) -> list[str]:
    return [helper, str(uid), str(gid), str(open_files), str(parent), *procs_files, "--", *argv]


def preexec(procs_files: tuple[str, ...], uid: int, gid: int, open_files: int, parent: int) -> Callable[[], None]:
    """The same steps as jailer-exec, as a preexec_fn (the fallback without a C compiler).

    Runs in the forked child before exec, so every process of the jail is born in the cgroup.
    """

    def run() -> None:
        for path in procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" = the writing process
            finally:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        prctl.set_no_new_privs(1)
        # After setresuid: a credential change clears the parent-death signal. bwrap's
        # --die-with-parent then chains it down to the payload.
        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(111)  # the parent died before pdeathsig was armed

    return run


if __name__ == "__main__":  # ./dev setup: build it next to its source once
    import sys

    path, how = build(os.path.dirname(SOURCE))
    print(f"jailer-exec: {path} ({how})" if path else f"jailer-exec not built: {how}", file=sys.stderr)
