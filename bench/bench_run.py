#!/usr/bin/env python3
"""Benchmark (not a test): `jailer run` latency next to a raw bwrap with the same flags.

For node and python hello-worlds, interleaved in one run (noisy shared machines: compare within a
run, trust medians):
  raw       bwrap with exactly jailer's flags and seccomp filter, running the hello file directly
            as the same kind of unprivileged uid (no cgroup, no broker, no shim)
  inproc    Runner.run() inside one Python process: cgroup, uid slot, broker, shim, result record
  cli       `jailer run --json` as a fresh process (adds the jailer CLI's own interpreter start)
  bare      the interpreter alone, no jail
Prints p50/p90/p99 in ms and the in-process overhead (inproc - raw) at p50.

Usage (root): .venv/bin/python bench/bench_run.py [-n 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jailer import seccomp  # noqa: E402
from jailer.cgroup import detect  # noqa: E402
from jailer.identity import IdentityPool  # noqa: E402
from jailer.plan import JAIL_BROKER_SOCKET, bwrap_argv, make_plan, probe_host  # noqa: E402
from jailer.profile import builtin_defaults  # noqa: E402
from jailer.runner import Job, Runner  # noqa: E402

HELLO = {
    "node": ("hello.js", "exports.handler = async (req) => ({hello: req.name});",
             "console.log(JSON.stringify({hello: 'x'}));"),
    "python": ("hello.py", "def handler(request, modules):\n    return {'hello': request['name']}\n",
               "import json\nprint(json.dumps({'hello': 'x'}))\n"),
}
UID = 530000


def write_hello_scripts(directory: str) -> dict[str, str]:
    """The script-mode hello of each runtime as a world-readable file (for raw bwrap and bare runs)."""
    files = {}
    for rt, (name, _, script) in HELLO.items():
        sp = os.path.join(directory, "script-" + name)
        with open(sp, "w") as f:
            f.write(script)
        os.chmod(sp, 0o644)
        files[rt] = sp
    return files


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def raw_argv(runtime: str, layout, hello_path: str, fd: int) -> list[str]:
    """jailer's argv, but the payload is the hello file itself (bound where the socket would be)."""
    plan = make_plan(builtin_defaults(), runtime, hello_path)
    argv = bwrap_argv(plan, layout, fd)
    cmd = argv.index("--")
    interp = [layout.node] if runtime == "node" else [layout.python, "-I", "-S", "-B"]
    return argv[: cmd + 1] + interp + [JAIL_BROKER_SOCKET]


def run_raw(argv: list[str], bpf: bytes) -> float:
    fd = seccomp.program_fd(bpf)
    argv = list(argv)
    argv[argv.index("--seccomp") + 1] = str(fd)
    t = time.perf_counter()
    p = subprocess.run(argv, env={}, pass_fds=(fd,), capture_output=True, user=UID, group=UID, extra_groups=[])
    dt = (time.perf_counter() - t) * 1000
    os.close(fd)
    if p.returncode != 0:
        raise SystemExit(f"raw bwrap failed: {p.stderr.decode()}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--json", help="also write the samples to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")

    layout = probe_host()
    bpf = seccomp.compile_filter()
    tmp = tempfile.mkdtemp(prefix="jailer-bench-")
    os.chmod(tmp, 0o755)
    run_dir = "/run/jailer-bench"
    backend = detect("jailer-bench")
    runner = Runner(run_dir, backend, IdentityPool(os.path.join(run_dir, "uids"), 540000, 64), layout=layout)
    jailer_cli = [sys.executable, "-m", "jailer.cli"]
    if shutil.which("jailer") and os.path.dirname(shutil.which("jailer")) == os.path.dirname(sys.executable):
        jailer_cli = [shutil.which("jailer")]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAILER_RUN_DIR": run_dir,
           "JAILER_CGROUP_PARENT": "jailer-bench"}
    samples: dict[str, list[float]] = {}
    try:
        scripts = write_hello_scripts(tmp)
        files = {}
        for rt, (name, handler, _) in HELLO.items():
            hp = os.path.join(tmp, name)
            with open(hp, "w") as f:
                f.write(handler)
            files[rt] = (hp, scripts[rt], handler)

        async def inproc(rt: str) -> float:
            name, handler, _ = HELLO[rt]
            t = time.perf_counter()
            res = await runner.run(Job(name, handler, {"name": "x"}), builtin_defaults())
            dt = (time.perf_counter() - t) * 1000
            if res.status != "ok":
                raise SystemExit(f"jailer run failed: {res.to_dict()}")
            return dt

        def cli(rt: str) -> float:
            t = time.perf_counter()
            p = subprocess.run([*jailer_cli, "run", files[rt][0], "--input", '{"name":"x"}', "--json"],
                               capture_output=True, env=env)
            dt = (time.perf_counter() - t) * 1000
            if p.returncode != 0:
                raise SystemExit(f"jailer cli failed: {p.stdout.decode()} {p.stderr.decode()}")
            return dt

        def bare(rt: str) -> float:
            cmd = [layout.node, files[rt][1]] if rt == "node" else [layout.python, "-I", "-S", files[rt][1]]
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env={})
            return (time.perf_counter() - t) * 1000

        def cli_noop() -> float:
            t = time.perf_counter()
            subprocess.run([*jailer_cli, "--help"], capture_output=True, env=env)
            return (time.perf_counter() - t) * 1000

        async def loop() -> None:
            for i in range(args.n + 3):
                for rt in ("node", "python"):
                    argv = raw_argv(rt, layout, files[rt][1], 3)
                    row = {
                        f"{rt} bare": bare(rt),
                        f"{rt} raw bwrap": run_raw(argv, bpf),
                        f"{rt} jailer in-process": await inproc(rt),
                        f"{rt} jailer cli": cli(rt),
                    }
                    if i >= 3:  # warm-up rounds dropped
                        for k, v in row.items():
                            samples.setdefault(k, []).append(v)
                if i >= 3:
                    samples.setdefault("jailer cli --help (interpreter start)", []).append(cli_noop())

        trio.run(loop)
    finally:
        backend.cleanup_stale()
        backend.remove_parent()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    print(f"{'case':42} {'p50':>8} {'p90':>8} {'p99':>8}   (ms, n={args.n}, interleaved)")
    for k, xs in samples.items():
        print(f"{k:42} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f} {pct(xs, 99):8.2f}")
    for rt in ("node", "python"):
        over = statistics.median(samples[f"{rt} jailer in-process"]) - statistics.median(samples[f"{rt} raw bwrap"])
        print(f"{rt}: jailer in-process overhead over raw bwrap at p50: {over:+.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f)


if __name__ == "__main__":
    main()
