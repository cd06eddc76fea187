#!/usr/bin/env python3
"""Benchmark (not a test): what it costs to start a process inside a job's cgroup.

Ways to get a new process into a fresh job cgroup, each followed by exec of /bin/true:
  fork                  fork + exec, no cgroup at all (the baseline)
  fork+procs            fork; the child writes "0" to the job's cgroup.procs (v1: to each
                        hierarchy's), then execs: what jailer's runner does today (in preexec_fn)
  clone3                clone3(CLONE_INTO_CGROUP) with an fd of the job's directory: the child is
                        born in the cgroup (cgroup v2 only, Linux 5.7+)
  py-preexec            Python subprocess.Popen with a preexec_fn that writes "0" to cgroup.procs
                        (the runner's exact path, minus the uid/rlimit steps)
  py-preexec-noop       the same Popen with a preexec_fn that does nothing (same fork path)
  py-clone3             from this (big, multi-threaded-capable) Python process: a C function called
                        through ctypes does clone3(CLONE_INTO_CGROUP), fork-like (no CLONE_VM), and
                        the child only execs: what the runner could do instead of preexec_fn
  py-clone3-nocg        the same C function without CLONE_INTO_CGROUP (its baseline)

"spawn" is the time from the fork/clone call until the child has exec'd (EOF on a CLOEXEC pipe;
Popen returns at that point too); "attach" is the cgroup.procs write(s) alone, timed in the child.
Each run uses a job cgroup of its own, created beforehand (not timed) with memory/pids/cpu
limits, as the runner does. Two cases: runs back to back, and runs after an idle pause: the
cgroup.procs write takes cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period
when it has been idle (on an SMP kernel; see docs/cgroups.md).

The fork/clone3 loop is a small C helper compiled with gcc at start (Python 3.11 has no clone3).
On a cgroup v1 (legacy/hybrid) host it prints the v1 attach cost instead (no clone3 there);
``--unified`` additionally measures clone3 vs cgroup.procs in the host's cgroup2 mount (a hybrid
host's /sys/fs/cgroup/unified, which has no controllers but the same attach path).

Usage (root): .venv/bin/python bench/bench_cgroup_attach.py [-n 200] [--idle-ms 100] [--idle-runs 40]
              [--ballast-mb 60] [--unified] [--json]
Results: docs/benchmarks.md, "cgroup attach: CLONE_INTO_CGROUP vs cgroup.procs".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jailer.cgroup import CgroupLimits, detect  # noqa: E402

HELPER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* attachbench MODE IDLE_US: one run per stdin line (the run's cgroup directories, space-separated).
   MODE fork | procs | clone3. Prints "spawn_ns attach_ns" per run. */

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: attachbench fork|procs|clone3 IDLE_US\n"); return 2; }
    int mode = !strcmp(argv[1], "fork") ? 0 : !strcmp(argv[1], "procs") ? 1 : !strcmp(argv[1], "clone3") ? 2 : -1;
    if (mode < 0) { fprintf(stderr, "bad mode %s\n", argv[1]); return 2; }
    long idle_us = atol(argv[2]);
    char *const true_argv[] = {"/bin/true", NULL};
    char *const envp[] = {NULL};
    char line[16384];
    while (fgets(line, sizeof line, stdin)) {
        char procs[8][4200];
        char *dirs[8];
        int n = 0;
        for (char *tok = strtok(line, " \n"); tok && n < 8; tok = strtok(NULL, " \n")) {
            dirs[n] = tok;
            snprintf(procs[n], sizeof procs[n], "%s/cgroup.procs", tok);
            n++;
        }
        if (n == 0) continue;
        if (idle_us) usleep(idle_us);
        int ex[2], tp[2];
        if (pipe2(ex, O_CLOEXEC) || pipe2(tp, O_CLOEXEC)) { perror("pipe2"); return 1; }
        int cgfd = -1;
        uint64_t t0 = now_ns();
        pid_t pid;
        if (mode == 2) {
            cgfd = open(dirs[0], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (cgfd < 0) { perror(dirs[0]); return 1; }
            struct clone_args a;
            memset(&a, 0, sizeof a);
            a.flags = CLONE_INTO_CGROUP;
            a.exit_signal = SIGCHLD;
            a.cgroup = (uint64_t)cgfd;
            pid = (pid_t)syscall(SYS_clone3, &a, sizeof a);
        } else {
            pid = fork();
        }
        if (pid < 0) { perror(mode == 2 ? "clone3" : "fork"); return 1; }
        if (pid == 0) {
            uint64_t a0 = now_ns();
            if (mode == 1) {
                for (int i = 0; i < n; i++) {
                    int fd = open(procs[i], O_WRONLY | O_CLOEXEC);
                    if (fd < 0 || write(fd, "0", 1) != 1) _exit(120);
                    close(fd);
                }
            }
            uint64_t d = now_ns() - a0;
            if (write(tp[1], &d, sizeof d) != sizeof d) _exit(121);
            execve(true_argv[0], true_argv, envp);
            _exit(122);
        }
        close(ex[1]);
        close(tp[1]);
        char b;
        while (read(ex[0], &b, 1) < 0 && errno == EINTR) {}
        uint64_t t1 = now_ns();
        uint64_t d = 0;
        if (read(tp[0], &d, sizeof d) != sizeof d) d = 0;
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "child failed: status %d\n", st);
            return 1;
        }
        close(ex[0]);
        close(tp[0]);
        if (cgfd >= 0) close(cgfd);
        printf("%llu %llu\n", (unsigned long long)(t1 - t0), (unsigned long long)d);
        fflush(stdout);
    }
    return 0;
}
"""

# Called from Python through ctypes. Fork-like clone3 (no CLONE_VM: the child gets a copy of the
# address space and its own stack), so the child may only make raw system calls: it execs at once.
SPAWN_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Returns the pid once the child has exec'd (EOF on a CLOEXEC pipe), or -errno. */
long spawn_into(int cgroup_fd, const char *path) {
    int ex[2];
    if (pipe2(ex, O_CLOEXEC)) return -errno;
    struct clone_args a;
    memset(&a, 0, sizeof a);
    a.flags = cgroup_fd >= 0 ? CLONE_INTO_CGROUP : 0;
    a.exit_signal = SIGCHLD;
    a.cgroup = cgroup_fd >= 0 ? (uint64_t)cgroup_fd : 0;
    long pid = syscall(SYS_clone3, &a, sizeof a);
    if (pid == 0) {
        char *const av[] = {(char *)path, NULL};
        char *const ev[] = {NULL};
        syscall(SYS_execve, path, av, ev);
        syscall(SYS_exit_group, 127);
    }
    int err = errno;
    close(ex[1]);
    if (pid < 0) { close(ex[0]); return -err; }
    char b;
    while (read(ex[0], &b, 1) < 0 && errno == EINTR) {}
    close(ex[0]);
    return pid;
}
"""

LIMITS = CgroupLimits(memory_max_bytes=256 << 20, pids_max=64, cpu_max_cores=1.0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def build_helper(workdir: str) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        sys.exit("bench_cgroup_attach: gcc not found (apt-get install gcc)")
    src = os.path.join(workdir, "attachbench.c")
    exe = os.path.join(workdir, "attachbench")
    with open(src, "w") as f:
        f.write(HELPER_C)
    subprocess.run([gcc, "-O2", "-Wall", "-o", exe, src], check=True)
    so_src = os.path.join(workdir, "spawn_into.c")
    with open(so_src, "w") as f:
        f.write(SPAWN_C)
    subprocess.run([gcc, "-O2", "-Wall", "-shared", "-fPIC", "-o", os.path.join(workdir, "spawn_into.so"), so_src],
                   check=True)
    return exe


_spawn_into = None


def run_py_clone3(dirs: list[list[str]], idle_s: float, into: bool, so_path: str) -> list[float]:
    global _spawn_into
    if _spawn_into is None:
        import ctypes

        lib = ctypes.CDLL(so_path, use_errno=True)
        lib.spawn_into.argtypes = [ctypes.c_int, ctypes.c_char_p]
        lib.spawn_into.restype = ctypes.c_long
        _spawn_into = lib.spawn_into
    times = []
    for d in dirs:
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        fd = os.open(d[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if into else -1
        try:
            pid = _spawn_into(fd, b"/bin/true")
        finally:
            if fd >= 0:
                os.close(fd)
        t1 = time.perf_counter()
        if pid < 0:
            raise SystemExit(f"bench_cgroup_attach: clone3: {os.strerror(-pid)}")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit("bench_cgroup_attach: /bin/true failed")
        times.append((t1 - t0) * 1000)
    return times


class Jobs:
    """Fresh job cgroups, one per run, made by jailer's own backend (or plain mkdir in --unified)."""

    def __init__(self, backend=None, unified_parent: str | None = None) -> None:
        self.backend = backend
        self.unified_parent = unified_parent
        self.seq = 0
        self.live = []

    def make(self, n: int) -> list[list[str]]:
        out = []
        for _ in range(n):
            self.seq += 1
            name = f"b{self.seq}"
            if self.backend is not None:
                job = self.backend.create(name, LIMITS)
                self.live.append(job)
                out.append([os.path.dirname(p) for p in job.procs_files])
            else:
                path = os.path.join(self.unified_parent, name)
                os.mkdir(path)
                self.live.append(path)
                out.append([path])
        return out

    def used(self, dirs: list[list[str]]) -> bool:
        """True if a process ran in every one of these cgroups: a high-water mark or the CPU
        counter moved (UML's tick-based CPU accounting can leave /bin/true at 0 us)."""
        for d in dirs:
            seen = False
            for x in d:
                for f in ("pids.peak", "memory.peak", "memory.max_usage_in_bytes", "cpuacct.usage"):
                    path = os.path.join(x, f)
                    if os.path.exists(path):
                        with open(path) as fh:
                            seen = seen or int(fh.read()) > 0
                path = os.path.join(x, "cpu.stat")
                if os.path.exists(path):
                    with open(path) as fh:
                        seen = seen or int(fh.read().split()[1]) > 0
            if not seen:
                return False
        return True

    def clear(self) -> None:
        for job in self.live:
            if self.backend is not None:
                job.destroy()
            else:
                os.rmdir(job)
        self.live = []


def run_helper(exe: str, mode: str, dirs: list[list[str]], idle_us: int, jobs: Jobs) -> tuple[list[float], list[float]]:
    out = subprocess.run([exe, mode, str(idle_us)], input="".join(" ".join(d) + "\n" for d in dirs),
                         capture_output=True, text=True, check=True).stdout
    rows = [tuple(map(int, line.split())) for line in out.splitlines()]
    assert len(rows) == len(dirs), (mode, out)
    if mode != "fork" and not jobs.used(dirs):
        raise SystemExit(f"bench_cgroup_attach: mode {mode}: a child did not run in its cgroup")
    return [s / 1e6 for s, _ in rows], [a / 1e6 for _, a in rows]


def run_python(dirs: list[list[str]], idle_s: float, attach: bool) -> list[float]:
    times = []
    for d in dirs:
        files = [os.path.join(x, "cgroup.procs") for x in d]

        def preexec(files=files) -> None:
            if attach:
                for path in files:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, b"0")
                    finally:
                        os.close(fd)

        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        p = subprocess.Popen(["/bin/true"], preexec_fn=preexec, env={}, close_fds=True)  # returns after exec
        t1 = time.perf_counter()
        if p.wait() != 0:
            raise SystemExit("bench_cgroup_attach: /bin/true failed")
        times.append((t1 - t0) * 1000)
    return times


def measure(exe: str, jobs: Jobs, modes: list[str], n: int, idle_ms: float, idle_runs: int,
            chunk: int = 10) -> dict:
    """Modes interleaved in chunks of ``chunk`` runs (a noisy machine drifts: compare within a run)."""
    results: dict[str, dict] = {}
    for case, runs, idle in (("back-to-back", n, 0.0), (f"after {idle_ms:g} ms idle", idle_runs, idle_ms)):
        spawn: dict[str, list[float]] = {m: [] for m in modes}
        attach: dict[str, list[float]] = {m: [] for m in modes}
        for start in range(0, runs, chunk):
            for mode in modes:
                dirs = jobs.make(min(chunk, runs - start))
                try:
                    if mode.startswith("py-clone3"):
                        spawn[mode] += run_py_clone3(dirs, idle / 1000, mode == "py-clone3",
                                                     os.path.join(os.path.dirname(exe), "spawn_into.so"))
                        if mode == "py-clone3" and not jobs.used(dirs):
                            raise SystemExit("bench_cgroup_attach: py-clone3: a child did not run in its cgroup")
                    elif mode.startswith("py-"):
                        spawn[mode] += run_python(dirs, idle / 1000, attach=mode == "py-preexec")
                    else:
                        s_, a_ = run_helper(exe, mode, dirs, int(idle * 1000), jobs)
                        spawn[mode] += s_
                        attach[mode] += a_
                finally:
                    jobs.clear()
        for mode in modes:
            r = results.setdefault(mode, {})
            r[case] = {"runs": runs, "spawn_p50_ms": pct(spawn[mode], 50), "spawn_p90_ms": pct(spawn[mode], 90)}
            if mode == "procs":
                r[case].update(attach_p50_ms=pct(attach[mode], 50), attach_p90_ms=pct(attach[mode], 90))
    return results


LABELS = {
    "fork": "fork + exec, no cgroup (baseline)",
    "procs": "fork, child writes cgroup.procs, exec",
    "clone3": "clone3(CLONE_INTO_CGROUP) + exec",
    "py-preexec": 'Popen, preexec_fn writes "0" to cgroup.procs',
    "py-preexec-noop": "Popen, no-op preexec_fn",
    "py-clone3-nocg": "Python -> C clone3, no cgroup (baseline)",
    "py-clone3": "Python -> C clone3(CLONE_INTO_CGROUP)",
}


def print_table(title: str, results: dict) -> None:
    cases = list(next(iter(results.values())))
    print(f"\n{title}")
    print(f"  {'(ms, p50 / p90)':48}" + "".join(f"{c:>30}" for c in cases))
    for mode, r in results.items():
        print(f"  {LABELS[mode]:48}" + "".join(
            f"{r[c]['spawn_p50_ms']:>19.3f} / {r[c]['spawn_p90_ms']:<8.3f}" for c in cases))
        if "attach_p50_ms" in r[cases[0]]:
            print(f"  {'  of which the cgroup.procs write(s)':48}" + "".join(
                f"{r[c]['attach_p50_ms']:>19.3f} / {r[c]['attach_p90_ms']:<8.3f}" for c in cases))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200, help="runs per mode, back to back (default 200)")
    ap.add_argument("--idle-ms", type=float, default=100.0, help="pause before each run of the idle case")
    ap.add_argument("--idle-runs", type=int, default=40, help="runs per mode in the idle case (default 40)")
    ap.add_argument("--unified", action="store_true",
                    help="v1/hybrid host: also measure clone3 vs cgroup.procs in the cgroup2 mount")
    ap.add_argument("--ballast-mb", type=int, default=60,
                    help="touch this much memory first, so this process forks like the daemon (~60 MB RSS)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ballast = bytearray(args.ballast_mb << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # resident, so fork copies its page tables
    if os.geteuid() != 0:
        sys.exit("bench_cgroup_attach: run as root (it creates cgroups)")

    backend = detect(f"jailer-bench-{os.getpid()}")
    where = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "in_uml_guest": os.environ.get("JAILER_IN_VM") == "1",
        "cgroup_version": backend.version,
        "ballast_mb": args.ballast_mb,
    }
    tmp = tempfile.mkdtemp(prefix="attachbench.")
    report: dict = {"where": where}
    try:
        exe = build_helper(tmp)
        jobs = Jobs(backend)
        try:
            if backend.version == 2:
                modes = ["fork", "procs", "clone3", "py-preexec-noop", "py-preexec", "py-clone3-nocg", "py-clone3"]
                report["v2"] = measure(exe, jobs, modes, args.n, args.idle_ms, args.idle_runs)
            else:
                modes = ["fork", "procs", "py-preexec-noop", "py-preexec"]
                report["v1"] = measure(exe, jobs, modes, args.n, args.idle_ms, args.idle_runs)
        finally:
            jobs.clear()
            backend.cleanup_stale()
            backend.remove_parent()
        if args.unified and backend.version == 1:
            mount = _cgroup2_mount()
            if mount is None:
                sys.exit("bench_cgroup_attach: --unified: no cgroup2 mount on this host")
            parent = os.path.join(mount, f"jailer-bench-{os.getpid()}")
            os.mkdir(parent)
            ujobs = Jobs(unified_parent=parent)
            try:
                report["v2_no_controllers"] = measure(exe, ujobs, ["fork", "procs", "clone3", "py-preexec-noop",
                                                             "py-preexec", "py-clone3-nocg", "py-clone3"], args.n,
                                                      args.idle_ms, args.idle_runs)
                report["v2_no_controllers_mount"] = mount
            finally:
                ujobs.clear()
                os.rmdir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"cgroup attach: kernel {where['kernel']}, {where['cpus']} CPU(s), cgroup v{backend.version}"
          f"{' (UML guest)' if where['in_uml_guest'] else ''}; spawn = fork/clone until the child has "
          "exec'd /bin/true")
    if "v2" in report:
        print_table("cgroup v2, fresh job cgroup (memory, pids, cpu) per run:", report["v2"])
    if "v1" in report:
        print_table(f"cgroup v1, fresh job cgroup per run in {len(backend.parent_paths)} hierarchies "
                    "(no clone3 on v1):", report["v1"])
    if "v2_no_controllers" in report:
        print_table(f"cgroup2 mount {report['v2_no_controllers_mount']} (no controllers), fresh cgroup per run:",
                    report["v2_no_controllers"])


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return fields[4]
    return None


if __name__ == "__main__":
    main()
