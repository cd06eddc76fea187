"""The daemon's own config (TOML), validated as strictly as profiles; embedded defaults need no file.

Operator ceilings live here: no tenant profile and no single request may exceed them.
"""

from __future__ import annotations

import grp
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from jailer.identity import DEFAULT_UID_BASE, DEFAULT_UID_COUNT
from jailer.profile import Field, Profile, ProfileError, check_value

DEFAULT_RUN_DIR = "/run/jailer"

SCHEMA: dict[str, dict[str, Field]] = {
    "server": {
        "socket": Field("str", "", "Client API socket path (default: <run_dir>/jailer.sock)"),
        "socket_mode": Field("str", "0660", "Octal permission bits of the client socket"),
        "socket_group": Field("str", "", "Group owning the client socket (name or gid; empty: root's)"),
        "admin_group": Field("str", "", "Members may act for any tenant, like root (empty: root only)"),
        "max_frame": Field("size", 4 * 1024**2, "Largest client request line", "size", minimum=1024),
        "max_connections": Field("int", 1024, "Client connections at once", "count", minimum=1),
        "max_in_flight": Field("int", 256, "Requests in flight per connection", "count", minimum=1),
    },
    "paths": {
        "profiles": Field("str", "/etc/jailer/profiles", "Profile directory (defaults.toml + <tenant>.toml)"),
        "scripts": Field("str", "/etc/jailer/scripts", "Named scripts: <scripts>/<tenant>/<name>.(js|mjs|cjs|py)"),
        "state_dir": Field("str", "/var/lib/jailer", "Daemon state: kv databases (one SQLite file per tenant)"),
        "run_dir": Field("str", DEFAULT_RUN_DIR, "Runtime dir: sockets, per-job broker sockets, uid locks"),
    },
    "jails": {
        "uid_base": Field("int", DEFAULT_UID_BASE, "First host uid for jails (one per concurrent jail)",
                          minimum=1000),
        "uid_count": Field("int", DEFAULT_UID_COUNT, "Number of jail uids", "count", minimum=1),
        "cgroup_parent": Field("str", "jailer", "cgroup under which jobs get their own cgroups"),
        "concurrency": Field("int", 0, "Jobs running at once, all tenants (0 = number of cores)", "count",
                             minimum=0),
        "pool_max": Field("int", 64, "Warm jails (ready + starting) at most, all pools together; 0 = no warm "
                          "pools", "count", minimum=0),
    },
    "ceilings": {
        "wall_time": Field("duration", 300.0, "Largest limits.wall_time any profile or request may set", "duration"),
        "cpu_time": Field("duration", 120.0, "Largest limits.cpu_time", "duration"),
        "memory": Field("size", 2 * 1024**3, "Largest limits.memory", "size"),
        "pids": Field("int", 1024, "Largest limits.pids", "count"),
        "tmpfs": Field("size", 512 * 1024**2, "Largest limits.tmpfs", "size"),
        "output": Field("size", 64 * 1024**2, "Largest limits.output", "size"),
        "concurrency": Field("int", 64, "Largest limits.concurrency", "count"),
        "queue": Field("int", 10000, "Largest limits.queue", "count"),
    },
    "http": {
        "allow_internal": Field("list_str", [], "Exact internal destinations modules.http may reach "
                                "(scheme://ip:port), e.g. the platform's own API; never in a tenant profile"),
    },
    "metrics": {
        "address": Field("str", "", "host:port for Prometheus metrics over HTTP (empty: off)"),
    },
    "log": {
        "format": Field("str", "json", "json (journald-friendly, one object per line) or text",
                        choices=("json", "text")),
        "level": Field("str", "info", "debug, info, warning or error", choices=("debug", "info", "warning", "error")),
    },
    "shutdown": {
        "drain": Field("duration", 30.0, "On SIGTERM, how long running jobs may finish before being killed",
                       "duration"),
    },
}


@dataclass(frozen=True)
class Config:
    values: dict[str, dict[str, Any]]
    source: str

    def get(self, section: str, key: str) -> Any:
        v = self.values.get(section, {}).get(key)
        return SCHEMA[section][key].default if v is None else v

    @property
    def run_dir(self) -> str:
        return self.get("paths", "run_dir")

    @property
    def socket_path(self) -> str:
        return self.get("server", "socket") or os.path.join(self.run_dir, "jailer.sock")

    @property
    def concurrency(self) -> int:
        return self.get("jails", "concurrency") or (os.cpu_count() or 1)


def load_config(path: str | None) -> Config:
    """Embedded defaults, overridden by the file if given. Raises ProfileError listing every problem."""
    if path is None:
        return Config({}, "<built-in defaults>")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ProfileError([f"{path}: cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError([f"{path}: invalid TOML: {e}"]) from None
    errors: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in SCHEMA:
            errors.append(f"{path}: {section}: unknown section (known: {', '.join(sorted(SCHEMA))})")
            continue
        if not isinstance(table, dict):
            errors.append(f"{path}: [{section}]: expected a table")
            continue
        for key, value in table.items():
            f = SCHEMA[section].get(key)
            if f is None:
                errors.append(f"{path}: {section}.{key}: unknown key (known keys in [{section}]: "
                              f"{', '.join(sorted(SCHEMA[section]))})")
                continue
            v, err = check_value(f"{path}: {section}.{key}", f, value)
            if err:
                errors.append(err)
            else:
                values.setdefault(section, {})[key] = v
    cfg = Config(values, path)
    try:
        int(cfg.get("server", "socket_mode"), 8)
    except ValueError:
        errors.append(f"{path}: server.socket_mode: expected octal digits like \"0660\"")
    for key in ("socket_group", "admin_group"):
        g = cfg.get("server", key)
        if g and not g.isdigit():
            try:
                grp.getgrnam(g)
            except KeyError:
                errors.append(f"{path}: server.{key}: no such group {g!r}")
    if errors:
        raise ProfileError(errors)
    return cfg


_CEILING_FIELDS = {"wall_time": "wall_time_s", "cpu_time": "cpu_time_s", "memory": "memory_bytes",
                   "pids": "pids", "tmpfs": "tmpfs_bytes", "output": "output_bytes",
                   "concurrency": "concurrency", "queue": "queue"}


def ceiling_errors(cfg: Config, profile: Profile) -> list[str]:
    """A profile asking for more than the operator allows is refused (not silently clamped)."""
    errors = []
    src = profile.sources[-1]
    for key, attr in _CEILING_FIELDS.items():
        ceiling = cfg.get("ceilings", key)
        value = getattr(profile.limits, attr)
        if value > ceiling:
            errors.append(f"{src}: limits.{key}: {value} exceeds the operator ceiling {ceiling} "
                          f"(ceilings.{key} in {cfg.source})")
    return errors
