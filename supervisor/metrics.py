"""Prometheus metrics: counters, gauges, histograms in the text exposition format, no dependency."""

from __future__ import annotations

from typing import Iterable

import trio

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_esc(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_: str, labels: tuple[str, ...] = (), fn=None):
        super().__init__(name, help_, labels)
        self.fn = fn  # callable returning {labels tuple: value}, read at scrape time
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def render(self) -> list[str]:
        values = self.fn() if self.fn else self.values
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(values.items())]


class CounterFn(Gauge):
    """A counter kept elsewhere (e.g. the pools' own), read at scrape time."""
    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, labels: tuple[str, ...] = (), buckets: Iterable[float] = LATENCY_BUCKETS_S):
        super().__init__(name, help_, labels)
        self.buckets = tuple(buckets)
        self.values: dict[tuple[str, ...], list] = {}  # labels -> [counts per bucket..., sum, count]

    def observe(self, value: float, *labels: str) -> None:
        row = self.values.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
        for i, b in enumerate(self.buckets):
            if value <= b:
                row[i] += 1
        row[-2] += value
        row[-1] += 1

    def render(self) -> list[str]:
        out = self.header()
        for k, row in sorted(self.values.items()):
            for i, b in enumerate(self.buckets):
                le = 'le="%g"' % b
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {row[i]}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, k, inf)} {row[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {row[-2]:g}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {row[-1]}")
        return out


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, m):
        self.metrics.append(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


class Metrics:
    """The daemon's metrics, one place."""

    def __init__(self, stats_fn=None):
        r = self.registry = Registry()
        self.jobs = r.add(Counter("jailer_jobs_total", "Jobs finished, by tenant and status", ("tenant", "status")))
        self.latency = r.add(Histogram("jailer_job_latency_seconds", "Submit to result", ("tenant",)))
        self.queue_wait = r.add(Histogram("jailer_job_queue_seconds", "Time queued before a slot", ("tenant",)))
        self.broker_calls = r.add(Counter("jailer_broker_calls_total", "Capability calls", ("tenant", "cap")))
        self.broker_denials = r.add(Counter("jailer_broker_denials_total", "Capability calls refused",
                                            ("tenant", "cap")))
        self.client_errors = r.add(Counter("jailer_client_errors_total", "Client requests refused", ("code",)))
        self.running = r.add(Gauge("jailer_running_jails", "Jails running now"))
        self.queued = r.add(Gauge("jailer_queue_depth", "Jobs waiting, by tenant", ("tenant",)))
        self.pool_jails = r.add(Gauge("jailer_pool_jails", "Warm-pool jails by state (warm, starting, taken)",
                                      ("tenant", "runtime", "state")))
        self.pool_events = r.add(CounterFn("jailer_pool_events_total", "Warm-pool events (hits, misses, "
                                           "cold_fallbacks, boot_failures, retired)", ("tenant", "runtime", "event")))
        self.reloads = r.add(Counter("jailer_reloads_total", "Profile reloads, by outcome", ("outcome",)))


async def serve_metrics(metrics: Metrics, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP/1.0 endpoint: any GET returns the exposition (scrapers ask for /metrics)."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                body = metrics.registry.render().encode()
                ok = data.startswith(b"GET ")
                head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n" if ok
                        else b"HTTP/1.0 405 Method Not Allowed\r\n")
                await stream.send_all(head + f"Content-Length: {len(body) if ok else 0}\r\n\r\n".encode()
                                      + (body if ok else b""))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname())
    await trio.serve_listeners(handle, listeners)
