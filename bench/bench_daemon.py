#!/usr/bin/env python3
"""Benchmark (not a test): the daemon. Prints, in one run:

  latency   submit-to-result through a `jailer serve` subprocess (one client connection), next to
            the in-process runner (`jailer run` minus the CLI's interpreter start) and a raw bwrap
            with the same flags, interleaved, for node and python hello-worlds
  throughput jobs/s at client concurrency 1, 2, 4, 8 (daemon concurrency = cores), next to a raw
            bwrap spawn loop at the same concurrency
  daemon CPU  utime+stime of the daemon process per job (from /proc/PID/stat)

Usage (root): .venv/bin/python bench/bench_daemon.py [-n 60] [--jobs 120]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_run import HELLO, pct, raw_argv, run_raw, write_hello_scripts  # noqa: E402
from jailer import seccomp  # noqa: E402
from jailer.cgroup import detect  # noqa: E402
from jailer.client import AsyncClient  # noqa: E402
from jailer.identity import IdentityPool  # noqa: E402
from jailer.plan import probe_host  # noqa: E402
from jailer.profile import builtin_defaults  # noqa: E402
from jailer.runner import Job, Runner  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=60, help="latency samples per case")
    ap.add_argument("--jobs", type=int, default=120, help="jobs per throughput point")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    tmp = tempfile.mkdtemp(prefix="jailer-bench-d-")
    os.chmod(tmp, 0o755)
    profiles = os.path.join(tmp, "profiles")
    os.makedirs(profiles)
    with open(os.path.join(profiles, "bench.toml"), "w") as f:
        f.write('[limits]\nconcurrency = 64\nqueue = 10000\nrate = 100000.0\nburst = 100000\n')
    run_dir = "/run/jailer-bench-d"
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'[paths]\nprofiles = "{profiles}"\nstate_dir = "{tmp}/state"\nrun_dir = "{run_dir}"\n'
                f'[jails]\ncgroup_parent = "jailer-bench-d"\nuid_base = 550000\nuid_count = 64\n'
                f'[log]\nlevel = "warning"\nformat = "text"\n')
    sock = f"{run_dir}/jailer.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "jailer.cli", "serve", "--config", cfg],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    layout = probe_host()
    bpf = seccomp.compile_filter()
    backend = detect("jailer-bench-r")
    runner = Runner("/run/jailer-bench-r", backend, IdentityPool("/run/jailer-bench-r/uids", 560000, 64),
                    layout=layout)
    files = write_hello_scripts(tmp)
    lat: dict[str, list[float]] = {}
    thr: dict[str, float] = {}
    cpu_per_job = {}

    async def bench() -> None:
        for _ in range(200):
            if os.path.exists(sock):
                break
            await trio.sleep(0.05)
        async with AsyncClient.open(sock) as c:
            async def through_daemon(rt: str) -> float:
                name, handler, _ = HELLO[rt]
                t = time.perf_counter()
                r = await c.submit("bench", code=handler, filename=name, input={"name": "x"})
                dt = (time.perf_counter() - t) * 1000
                if r["status"] != "ok":
                    raise SystemExit(f"daemon job failed: {r}")
                return dt

            async def inproc(rt: str) -> float:
                name, handler, _ = HELLO[rt]
                t = time.perf_counter()
                r = await runner.run(Job(name, handler, {"name": "x"}), builtin_defaults())
                if r.status != "ok":
                    raise SystemExit(f"runner failed: {r.to_dict()}")
                return (time.perf_counter() - t) * 1000

            for i in range(args.n + 3):
                for rt in ("node", "python"):
                    row = {f"{rt} raw bwrap": await trio.to_thread.run_sync(run_raw, raw_argv(rt, layout, files[rt], 3), bpf),
                           f"{rt} jailer run (in-process)": await inproc(rt),
                           f"{rt} daemon submit->result": await through_daemon(rt)}
                    if i >= 3:
                        for k, v in row.items():
                            lat.setdefault(k, []).append(v)

            for rt in ("node", "python"):
                for conc in (1, 2, 4, 8):
                    c0 = cpu_s(daemon.pid)
                    t = time.perf_counter()
                    async with trio.open_nursery() as n:
                        todo = iter(range(args.jobs))

                        async def worker() -> None:
                            for _ in todo:
                                await through_daemon(rt)

                        for _ in range(conc):
                            n.start_soon(worker)
                    dt = time.perf_counter() - t
                    thr[f"{rt} daemon c={conc}"] = args.jobs / dt
                    cpu_per_job[f"{rt} c={conc}"] = (cpu_s(daemon.pid) - c0) / args.jobs * 1000
                    t = time.perf_counter()
                    async with trio.open_nursery() as n:
                        todo = iter(range(args.jobs))

                        async def raw_worker() -> None:
                            for _ in todo:
                                await trio.to_thread.run_sync(run_raw, raw_argv(rt, layout, files[rt], 3), bpf)

                        for _ in range(conc):
                            n.start_soon(raw_worker)
                    thr[f"{rt} raw bwrap c={conc}"] = args.jobs / (time.perf_counter() - t)

    try:
        trio.run(bench)
    finally:
        daemon.terminate()
        daemon.wait()
        backend.cleanup_stale()
        backend.remove_parent()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree("/run/jailer-bench-r", ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    print(f"{'latency case':36} {'p50':>8} {'p90':>8} {'p99':>8}   (ms, n={args.n}, interleaved)")
    for k, xs in lat.items():
        print(f"{k:36} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f} {pct(xs, 99):8.2f}")
    for rt in ("node", "python"):
        d = pct(lat[f"{rt} daemon submit->result"], 50) - pct(lat[f"{rt} jailer run (in-process)"], 50)
        print(f"{rt}: daemon over in-process runner at p50: {d:+.2f} ms")
    print(f"\n{'throughput':36} {'jobs/s':>8}")
    for k, v in thr.items():
        print(f"{k:36} {v:8.1f}")
    print(f"\n{'daemon CPU per job':36} {'ms':>8}")
    for k, v in cpu_per_job.items():
        print(f"{k:36} {v:8.2f}")


if __name__ == "__main__":
    main()
