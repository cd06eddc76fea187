#!/usr/bin/env python3
"""Benchmark (not a test): warm pools. Starts a `jailer serve` subprocess with two tenants that
differ only in their pool (`warm`: [pool] min 4, max 8; `cold`: no pool) and prints markdown tables:

  latency     closed loop, one job at a time, interleaved: warm daemon submit->result, cold daemon
              submit->result, raw bwrap with jailer's flags, bare interpreter (no jail); node, python.
              The script sleeps 30 ms after every warm sample so the pool can refill (the "pool not
              drained" case)
  throughput  jobs/s at client concurrency 1, 2, 4, 8 for warm and cold, next to a raw bwrap spawn
              loop at the same concurrency, and the daemon's own CPU (utime+stime) per job
  open loop   Poisson arrivals at 25% and 50% of the best warm throughput, warm and cold tenants at
              the same absolute rates, with the pool counters (hits/misses/cold_fallbacks) before/after
  memory      daemon RSS with pools full and idle, PSS of each idle pooled jail by runtime

and, with matplotlib (`pip install -e .[bench]`), latency CDFs to --plot.

Usage (root): .venv/bin/python bench/bench_pool.py [-n 100] [--jobs 150] [--open-loop-jobs 300]
              [--pool MIN,MAX] [--plot docs/bench-pool.png]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_run import HELLO, pct, raw_argv, run_raw, write_hello_scripts  # noqa: E402
from jailer import seccomp  # noqa: E402
from jailer.cgroup import detect  # noqa: E402
from jailer.client import AsyncClient  # noqa: E402
from jailer.plan import probe_host  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
RUNTIMES = ("node", "python")
CONCURRENCY = (1, 2, 4, 8)
OPEN_LOOP_FRACTIONS = (0.25, 0.50)
REFILL_SLEEP = 0.030  # after every closed-loop warm sample
RUN_DIR = "/run/jailer-bench-p"
CGROUP_PARENT = "jailer-bench-p"
POOL_MIN, POOL_MAX = 4, 8
POOL_COUNTERS = ("hits", "misses", "cold_fallbacks")
LIMITS = "[limits]\nconcurrency = 64\nqueue = 10000\nrate = 100000.0\nburst = 100000\n"


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- /proc readers -------------------------------------------------------------------------------

def cpu_s(pid: int) -> float:
    """utime+stime (fields 14, 15) of the process itself: reaped children (cutime/cstime) excluded."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def jail_cgroup(pid: str) -> str | None:
    """The cgroup path of a process if it is one of ours: the v1 `memory` line, else the v2 `0::` line."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            v1 = path
        elif hid == "0" and ctrls == "":
            v2 = path
    path = v1 if v1 is not None else v2
    return path if path and f"/{CGROUP_PARENT}/" in path else None


def process_runtime(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = os.path.basename(f.read().split(b"\0", 1)[0].decode(errors="replace"))
    except OSError:
        return None
    for name in (comm, argv0):
        if name == "node" or name.startswith("node"):
            return "node"
        if name.startswith("python"):
            return "python"
    return None


def jails_snapshot(exclude: int) -> list[dict]:
    """Every cgroup under our parent that holds processes: its runtime, process count and summed PSS."""
    groups: dict[str, list[str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == exclude:
            continue
        path = jail_cgroup(pid)
        if path is not None:
            groups.setdefault(path, []).append(pid)
    out = []
    for path, pids in sorted(groups.items()):
        rts = {process_runtime(p) for p in pids} - {None}
        out.append({"cgroup": path, "procs": len(pids), "pss_kib": sum(pss_kib(int(p)) for p in pids),
                    "runtime": rts.pop() if len(rts) == 1 else ("mixed" if rts else "?")})
    return out


# --- machine -------------------------------------------------------------------------------------

def first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout.strip() or p.stderr.strip()).splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def machine_info(layout) -> dict:
    try:
        cg = f"v{detect(CGROUP_PARENT).describe().get('version', '?')}"
    except Exception as exc:  # noqa: BLE001 - informational only
        cg = f"? ({exc})"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cgroup": cg,
        "node": first_line([layout.node, "--version"]),
        "python (jail)": first_line([layout.python, "--version"]),
        "python (bench/daemon)": platform.python_version(),
        "bwrap": first_line(["bwrap", "--version"]),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# --- daemon --------------------------------------------------------------------------------------

def write_config(tmp: str, profiles: str, pool_max: bool) -> str:
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'[paths]\nprofiles = "{profiles}"\nstate_dir = "{tmp}/state"\nrun_dir = "{RUN_DIR}"\n'
                f'[jails]\ncgroup_parent = "{CGROUP_PARENT}"\nuid_base = 570000\nuid_count = 128\n'
                + ("pool_max = 64\n" if pool_max else "")
                + '[log]\nlevel = "warning"\nformat = "text"\n')
    return cfg


def start_daemon(cfg: str, log_path: str) -> subprocess.Popen | None:
    """Start `jailer serve`; None if it exits before its socket appears (log in log_path)."""
    sock = os.path.join(RUN_DIR, "jailer.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    log = open(log_path, "wb")  # a fresh log per start
    try:
        daemon = subprocess.Popen([sys.executable, "-m", "jailer.cli", "serve", "--config", cfg],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            return None
        if os.path.exists(sock):
            return daemon
        time.sleep(0.05)
    stop_daemon(daemon)
    raise SystemExit(f"the daemon did not create {sock} within 30 s; log: {log_path}")


def stop_daemon(daemon: subprocess.Popen) -> None:
    if daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(15)
    except subprocess.TimeoutExpired:
        warn("the daemon did not exit 15 s after SIGTERM; SIGKILL")
        daemon.kill()
        daemon.wait()


# --- the benchmark -------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, daemon: subprocess.Popen, layout, files: dict[str, str]):
        self.args = args
        self.daemon = daemon
        self.layout = layout
        self.files = files
        self.bpf = seccomp.compile_filter()
        self.sock = os.path.join(RUN_DIR, "jailer.sock")
        self.pools_supported: bool | None = None
        self.pool_max = True  # the daemon accepted `[jails] pool_max`
        self.notes: list[str] = []
        self.concurrency = None
        self.lat: dict[tuple[str, str], list[float]] = {}          # (runtime, case) -> ms
        self.lat_pool_delta: dict = {}
        self.thr: dict[tuple[str, str, int], float] = {}            # (runtime, case, conc) -> jobs/s
        self.cpu: dict[tuple[str, str, int], float] = {}            # (runtime, tenant, conc) -> ms/job
        self.cpu_refill: dict[tuple[str, int], float] = {}          # (runtime, conc) -> ms/job incl. refill
        self.thr_pool_delta: dict[tuple[str, int], dict] = {}
        self.open: dict[tuple[str, str, float], dict] = {}          # (runtime, tenant, frac) -> result
        self.capacity: dict[str, float] = {}
        self.memory: list[dict] = []

    # pools ----------------------------------------------------------------------------------------

    async def pools(self, c: AsyncClient) -> dict | None:
        st = await c.stats()
        self.concurrency = st.get("concurrency", self.concurrency)
        return st.get("pools")

    async def settle(self, c: AsyncClient, timeout: float = 30.0) -> dict | None:
        """Wait until every warm/* pool holds at least `min` ready jails and none is starting."""
        t0 = time.monotonic()
        while True:
            p = await self.pools(c)
            if p is None:
                if self.pools_supported is None and time.monotonic() - t0 < 5.0:
                    await trio.sleep(0.1)
                    continue
                if self.pools_supported is None:
                    self.pools_supported = False
                    msg = ("the daemon's stats have no `pools` (warm pools not implemented yet?): "
                           "`warm` behaves like `cold`")
                    warn(msg)
                    self.notes.append(msg)
                return None
            self.pools_supported = True
            warm = {k: v for k, v in p.items() if k.startswith("warm/")}
            if warm and all(v.get("warm", 0) >= v.get("min", POOL_MIN) and not v.get("starting", 0)
                            for v in warm.values()):
                return p
            if time.monotonic() - t0 > timeout:
                msg = f"pools not full after {timeout:.0f} s: {p}"
                warn(msg)
                self.notes.append(msg)
                return p
            await trio.sleep(0.05)

    @staticmethod
    def pool_delta(before: dict | None, after: dict | None, rt: str) -> dict | None:
        if before is None or after is None:
            return None
        b, a = before.get(f"warm/{rt}", {}), after.get(f"warm/{rt}", {})
        return {k: a.get(k, 0) - b.get(k, 0) for k in POOL_COUNTERS}

    # single jobs ----------------------------------------------------------------------------------

    async def submit_ms(self, c: AsyncClient, tenant: str, rt: str) -> float:
        name, handler, _ = HELLO[rt]
        t = time.perf_counter()
        r = await c.submit(tenant, code=handler, filename=name, input={"name": "x"})
        dt = (time.perf_counter() - t) * 1000
        if r.get("status") != "ok":
            raise SystemExit(f"{tenant} {rt} job failed: {r}")
        return dt

    def raw_ms(self, rt: str) -> float:
        return run_raw(raw_argv(rt, self.layout, self.files[rt], 3), self.bpf)

    def bare_ms(self, rt: str) -> float:
        cmd = [self.layout.node, self.files[rt]] if rt == "node" else [self.layout.python, "-I", "-S", self.files[rt]]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env={"PATH": "/usr/bin:/bin"})
        dt = (time.perf_counter() - t) * 1000
        if p.returncode != 0:
            raise SystemExit(f"bare {rt} failed: {p.stderr.decode()}")
        return dt

    # phases ---------------------------------------------------------------------------------------

    async def memory_phase(self, c: AsyncClient, when: str) -> None:
        await self.settle(c)
        await trio.sleep(0.5)  # let the last jail's start-up finish touching its pages
        self.memory.append({"when": when, "rss_kib": status_kib(self.daemon.pid, "VmRSS"),
                            "jails": jails_snapshot(self.daemon.pid)})

    async def latency_phase(self, c: AsyncClient) -> None:
        before = await self.settle(c)
        for i in range(self.args.n + 3):
            for rt in RUNTIMES:
                row = {"warm": await self.submit_ms(c, "warm", rt)}
                await trio.sleep(REFILL_SLEEP)
                row["cold"] = await self.submit_ms(c, "cold", rt)
                row["raw bwrap"] = await trio.to_thread.run_sync(self.raw_ms, rt)
                row["bare"] = await trio.to_thread.run_sync(self.bare_ms, rt)
                if i >= 3:  # warm-up rounds dropped
                    for k, v in row.items():
                        self.lat.setdefault((rt, k), []).append(v)
        after = await self.pools(c)
        self.lat_pool_delta = {rt: self.pool_delta(before, after, rt) for rt in RUNTIMES}

    async def throughput_phase(self, c: AsyncClient) -> None:
        jobs = self.args.jobs
        for rt in RUNTIMES:
            for conc in CONCURRENCY:
                for tenant in ("warm", "cold"):
                    before = await self.settle(c)
                    c0 = cpu_s(self.daemon.pid)
                    todo = iter(range(jobs))

                    async def worker() -> None:
                        for _ in todo:
                            await self.submit_ms(c, tenant, rt)  # noqa: B023 - awaited within the loop

                    t = time.perf_counter()
                    async with trio.open_nursery() as n:
                        for _ in range(conc):
                            n.start_soon(worker)
                    dt = time.perf_counter() - t
                    self.thr[(rt, tenant, conc)] = jobs / dt
                    self.cpu[(rt, tenant, conc)] = (cpu_s(self.daemon.pid) - c0) / jobs * 1000
                    if tenant == "warm":
                        after = await self.settle(c)
                        self.cpu_refill[(rt, conc)] = (cpu_s(self.daemon.pid) - c0) / jobs * 1000
                        self.thr_pool_delta[(rt, conc)] = self.pool_delta(before, after, rt)
                await self.settle(c)
                todo = iter(range(jobs))

                async def raw_worker() -> None:
                    for _ in todo:
                        await trio.to_thread.run_sync(self.raw_ms, rt)  # noqa: B023

                t = time.perf_counter()
                async with trio.open_nursery() as n:
                    for _ in range(conc):
                        n.start_soon(raw_worker)
                self.thr[(rt, "raw bwrap", conc)] = jobs / (time.perf_counter() - t)
            self.capacity[rt] = max(self.thr[(rt, "warm", conc)] for conc in CONCURRENCY)

    async def open_loop_run(self, clients: list[AsyncClient], tenant: str, rt: str, rate: float,
                            seed: int) -> dict:
        rng = random.Random(seed)  # same arrival schedule for warm and cold at one rate
        arrivals = list(itertools.accumulate(rng.expovariate(rate) for _ in range(self.args.open_loop_jobs)))
        lat: list[float] = []
        failed: list[str] = []
        name, handler, _ = HELLO[rt]

        async def one(c: AsyncClient) -> None:
            t = time.perf_counter()
            r = await c.submit(tenant, code=handler, filename=name, input={"name": "x"})
            if r.get("status") == "ok":
                lat.append((time.perf_counter() - t) * 1000)
            else:
                failed.append(f"{r.get('status')}/{r.get('reason')}")

        t0 = trio.current_time()
        w0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for i, a in enumerate(arrivals):
                await trio.sleep_until(t0 + a)
                n.start_soon(one, clients[i % len(clients)])
        return {"rate": rate, "offered": len(arrivals) / arrivals[-1], "wall_s": time.perf_counter() - w0,
                "lat": lat, "failed": failed}

    async def open_loop_phase(self, clients: list[AsyncClient]) -> None:
        c = clients[0]
        for rt in RUNTIMES:
            for fi, frac in enumerate(OPEN_LOOP_FRACTIONS):
                rate = self.capacity[rt] * frac
                seed = 1000 * RUNTIMES.index(rt) + fi
                for tenant in ("warm", "cold"):
                    before = await self.settle(c)
                    res = await self.open_loop_run(clients, tenant, rt, rate, seed)
                    if tenant == "warm":
                        res["pool_delta"] = self.pool_delta(before, await self.pools(c), rt)
                    self.open[(rt, tenant, frac)] = res
                    note(f"  open loop {rt} {tenant} {frac:.0%}: {len(res['lat'])} ok, "
                         f"p50 {pct(res['lat'], 50) if res['lat'] else float('nan'):.1f} ms")

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(AsyncClient.open(self.sock)) for _ in range(4)]
            c = clients[0]
            note("waiting for the warm pools to fill...")
            await self.settle(c, timeout=60.0)
            await self.memory_phase(c, "after start")
            note(f"latency: {self.args.n} samples (+3 warm-up rounds) per case...")
            await self.latency_phase(c)
            note(f"throughput: {self.args.jobs} jobs per point...")
            await self.throughput_phase(c)
            note(f"open loop: {self.args.open_loop_jobs} jobs per run...")
            await self.open_loop_phase(clients)
            await self.memory_phase(c, "after the run")


# --- report --------------------------------------------------------------------------------------

def fmt_delta(d: dict | None) -> str:
    return "n/a" if d is None else " / ".join(str(d[k]) for k in POOL_COUNTERS)


def report(b: Bench, info: dict, args) -> None:
    out = print
    out(f"## Warm pools (`bench/bench_pool.py -n {args.n} --jobs {args.jobs} --open-loop-jobs {args.open_loop_jobs}`, "
        f"{info['date']})\n")
    out("| machine | |\n|---|---|")
    for k, v in info.items():
        out(f"| {k} | {v} |")
    out(f"| daemon concurrency | {b.concurrency} |")
    out(f"| tenants | `warm`: [pool] min {POOL_MIN}, max {POOL_MAX}, idle 60s; `cold`: no pool; "
        f"both concurrency 64{'; daemon `[jails] pool_max = 64`' if b.pool_max else ''} |")
    for n in b.notes:
        out(f"\n**Note:** {n}")

    out(f"\n### Latency, closed loop (ms, n={args.n} per case, interleaved, 3 warm-up rounds dropped)\n")
    out(f"One job at a time. The script sleeps {REFILL_SLEEP * 1000:.0f} ms after every warm sample so the pool "
        "can refill (the pool is never drained: every warm job should be a hit). `raw bwrap` is bwrap with "
        "jailer's flags and seccomp filter running the hello file directly; `bare` is the interpreter alone.\n")
    out("| runtime | case | p50 | p90 | p99 | mean |\n|---|---|---:|---:|---:|---:|")
    for rt in RUNTIMES:
        for case in ("warm", "cold", "raw bwrap", "bare"):
            xs = b.lat.get((rt, case))
            if xs:
                out(f"| {rt} | {case} | {pct(xs, 50):.1f} | {pct(xs, 90):.1f} | {pct(xs, 99):.1f} | "
                    f"{statistics.fmean(xs):.1f} |")
    out("")
    for rt in RUNTIMES:
        w, c, r = (b.lat.get((rt, k)) for k in ("warm", "cold", "raw bwrap"))
        if w and c and r:
            out(f"- {rt}: warm - cold at p50 {pct(w, 50) - pct(c, 50):+.1f} ms; warm - raw bwrap at p50 "
                f"{pct(w, 50) - pct(r, 50):+.1f} ms; pool hits / misses / cold_fallbacks during the "
                f"phase: {fmt_delta(b.lat_pool_delta.get(rt))}")

    out(f"\n### Throughput (jobs/s, {args.jobs} jobs per point) and daemon CPU per job\n")
    out("Client concurrency c on one connection. `raw bwrap` is a spawn loop with c threads. Daemon CPU is "
        "utime+stime of the daemon process alone (/proc/PID/stat fields 14+15; its reaped children's CPU "
        "is not included). Warm points start with full pools; `+refill` also counts the CPU until the pool "
        "is full again.\n")
    out("| runtime | c | warm | cold | raw bwrap | warm/raw | cold/raw | CPU ms/job warm | warm +refill | "
        "cold | hits / misses / fallbacks |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for rt in RUNTIMES:
        for conc in CONCURRENCY:
            w, c, r = (b.thr.get((rt, k, conc)) for k in ("warm", "cold", "raw bwrap"))
            if w is None:
                continue
            out(f"| {rt} | {conc} | {w:.1f} | {c:.1f} | {r:.1f} | {w / r:.2f} | {c / r:.2f} | "
                f"{b.cpu[(rt, 'warm', conc)]:.2f} | {b.cpu_refill[(rt, conc)]:.2f} | {b.cpu[(rt, 'cold', conc)]:.2f} | "
                f"{fmt_delta(b.thr_pool_delta.get((rt, conc)))} |")

    out(f"\n### Open loop ({args.open_loop_jobs} jobs per run, Poisson arrivals, submit->result ms)\n")
    out("Capacity = best warm throughput above for the runtime; cold runs at the same absolute rates and "
        "the same arrival schedule. Each job is its own task; jobs round-robin over 4 client connections.\n")
    out("| runtime | load | rate /s (offered) | tenant | ok | p50 | p90 | p99 | max | hits / misses / fallbacks |")
    out("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for rt in RUNTIMES:
        for frac in OPEN_LOOP_FRACTIONS:
            for tenant in ("warm", "cold"):
                res = b.open.get((rt, tenant, frac))
                if res is None:
                    continue
                xs = res["lat"]
                stat = (f"{pct(xs, 50):.1f} | {pct(xs, 90):.1f} | {pct(xs, 99):.1f} | {max(xs):.1f}" if xs
                        else "- | - | - | -")
                ok = f"{len(xs)}" + (f" ({len(res['failed'])} failed: {sorted(set(res['failed']))})"
                                     if res["failed"] else "")
                out(f"| {rt} | {frac:.0%} | {res['rate']:.1f} ({res['offered']:.1f}) | {tenant} | {ok} | {stat} | "
                    f"{fmt_delta(res.get('pool_delta')) if tenant == 'warm' else ''} |")

    out("\n### Memory (pools full, daemon idle)\n")
    out("| when | daemon VmRSS MiB | runtime | idle pooled jails | PSS MiB per jail p50 (min-max) | procs per jail | "
        "PSS MiB all jails |")
    out("|---|---:|---|---:|---:|---:|---:|")
    for m in b.memory:
        rss = f"{m['rss_kib'] / 1024:.1f}" if m["rss_kib"] else "?"
        by_rt: dict[str, list[dict]] = {}
        for j in m["jails"]:
            by_rt.setdefault(j["runtime"], []).append(j)
        if not by_rt:
            out(f"| {m['when']} | {rss} | - | 0 | - | - | - |")
        for rt, js in sorted(by_rt.items()):
            p = [j["pss_kib"] / 1024 for j in js]
            procs = sorted({j["procs"] for j in js})
            out(f"| {m['when']} | {rss} | {rt} | {len(js)} | {statistics.median(p):.1f} ({min(p):.1f}-{max(p):.1f}) "
                f"| {'/'.join(map(str, procs))} | {sum(p):.1f} |")


def plot(b: Bench, info: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    except ImportError:
        note(f"matplotlib is not installed (pip install -e .[bench]): no plot written to {path}")
        return

    def ecdf(ax, xs: list[float], label: str, **kw) -> None:
        xs = sorted(xs)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label, **kw)

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    colors = {"warm": "tab:red", "cold": "tab:blue", "raw bwrap": "tab:green", "bare": "tab:gray"}
    for ax, rt in zip(axes[:2], RUNTIMES):
        for case in ("warm", "cold", "raw bwrap", "bare"):
            xs = b.lat.get((rt, case), [])
            ecdf(ax, xs, f"{case} (p50 {pct(xs, 50):.1f})" if xs else case, color=colors[case])
        ax.set_title(f"{rt}: closed loop, one job at a time")
    ax = axes[2]
    for tenant in ("warm", "cold"):
        for frac, ls in zip(OPEN_LOOP_FRACTIONS, ("-", "--")):
            res = b.open.get(("node", tenant, frac))
            if res and res["lat"]:
                ecdf(ax, res["lat"], f"{tenant} {frac:.0%} ({res['rate']:.1f}/s, p99 {pct(res['lat'], 99):.0f})",
                     color=colors[tenant], linestyle=ls)
    ax.set_title(f"node: open loop (Poisson), % of warm capacity {b.capacity.get('node', 0):.1f}/s")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("submit->result latency, ms (log)")
        ax.set_ylabel("fraction of jobs")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"jailer warm pools, {info['date']}, {info['host']}: {info['nproc']} CPUs, kernel {info['kernel']}, "
                 f"cgroup {info['cgroup']}, node {info['node']}, {info['bwrap']}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    note(f"plot written to {path}")


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    global POOL_MIN, POOL_MAX
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100, help="closed-loop latency samples per case")
    ap.add_argument("--jobs", type=int, default=150, help="jobs per throughput point")
    ap.add_argument("--open-loop-jobs", type=int, default=300, help="jobs per open-loop run")
    ap.add_argument("--pool", default=f"{POOL_MIN},{POOL_MAX}", help="the warm tenant's [pool] min,max")
    ap.add_argument("--plot", default=None, help="write latency CDFs (PNG) here, e.g. docs/bench-pool.png")
    args = ap.parse_args()
    POOL_MIN, POOL_MAX = (int(x) for x in args.pool.split(","))
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    if min(args.n, args.jobs, args.open_loop_jobs) < 1:
        raise SystemExit("-n, --jobs and --open-loop-jobs must be at least 1")

    layout = probe_host()
    info = machine_info(layout)
    tmp = tempfile.mkdtemp(prefix="jailer-bench-p-")
    os.chmod(tmp, 0o755)
    profiles = os.path.join(tmp, "profiles")
    os.makedirs(profiles)
    with open(os.path.join(profiles, "warm.toml"), "w") as f:
        f.write(LIMITS + f'[pool]\nmin = {POOL_MIN}\nmax = {POOL_MAX}\nidle = "60s"\n')
    with open(os.path.join(profiles, "cold.toml"), "w") as f:
        f.write(LIMITS)
    files = write_hello_scripts(tmp)
    log_path = os.path.join(tmp, "daemon.log")
    daemon = None
    bench = None
    try:
        daemon = start_daemon(write_config(tmp, profiles, pool_max=True), log_path)
        if daemon is None:
            with open(log_path, errors="replace") as f:
                log = f.read()
            if "pool_max" not in log:
                raise SystemExit("the daemon exited at start (its log is above)")
            warn("the daemon refused `[jails] pool_max` (not implemented yet?); running without it:\n  "
                 + log.strip().replace("\n", "\n  "))
            daemon = start_daemon(write_config(tmp, profiles, pool_max=False), log_path)
            if daemon is None:
                raise SystemExit("the daemon exited at start (its log is above)")
            bench = Bench(args, daemon, layout, files)
            bench.pool_max = False
            bench.notes.append("the daemon refused `[jails] pool_max = 64`; measured without it")
        else:
            bench = Bench(args, daemon, layout, files)
        trio.run(bench.run)
    finally:
        if daemon is not None:
            stop_daemon(daemon)
        with contextlib.suppress(Exception):
            backend = detect(CGROUP_PARENT)
            stale = backend.cleanup_stale()
            if stale:
                warn(f"removed {len(stale)} cgroups the daemon left behind")
            backend.remove_parent()
        with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
            log = f.read().strip()
            if log:
                note("daemon log (warnings and errors, last 60 lines):\n  " + "\n  ".join(log.splitlines()[-60:]))
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(RUN_DIR, ignore_errors=True)

    report(bench, info, args)
    if args.plot:
        plot(bench, info, args.plot)


if __name__ == "__main__":
    main()
