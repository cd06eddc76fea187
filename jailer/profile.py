"""Tenant profiles: strict TOML schema -> frozen Profile.

Policy only: nothing here touches the kernel. A profile directory holds `defaults.toml` (optional)
and one `<tenant>.toml` per tenant; a tenant file overrides the defaults key by key. Every key has a
type, a unit, a default and a one-line meaning (SCHEMA below is the single source of truth: the
docs and profiles/defaults.toml are checked against it by the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from .units import UnitError, parse_duration, parse_size

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
IDENT_RE = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]{0,127}$")
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RUNTIMES = ("auto", "node", "python")


class ProfileError(Exception):
    """All problems found in one or more profile files; `errors` lists each one."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass(frozen=True)
class Field:
    kind: str  # str, int, float, bool, size, duration, list_int, list_str, list_id
    default: Any
    doc: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    pattern: re.Pattern | None = None


# section -> key -> Field. Sizes in bytes, durations in seconds once parsed.
SCHEMA: dict[str, dict[str, Field]] = {
    "runtime": {
        "name": Field("str", "auto", "Language runtime: node, python, or auto (from the file's extension)",
                      choices=RUNTIMES),
        "entry": Field("str", "handler", "Name of the exported entry function", pattern=IDENT_RE),
    },
    "access": {
        "uids": Field("list_int", [], "Host uids allowed to submit jobs as this tenant (root always may)"),
        "groups": Field("list_id", [], "Host groups (names or gids) whose members may submit as this tenant"),
    },
    "limits": {
        "wall_time": Field("duration", 5.0, "Wall-clock time from job delivery to result", "duration",
                           minimum=0.001, maximum=3600),
        "cpu_time": Field("duration", 2.0, "CPU time of all the job's processes (cgroup accounting)",
                          "duration", minimum=0.001, maximum=3600),
        "cpu_cores": Field("float", 1.0, "CPU bandwidth quota in cores (0 = no quota)", "cores",
                           minimum=0, maximum=1024),
        "memory": Field("size", 256 * 1024**2, "Memory of the whole jail, swap excluded (OOM -> memory_limit)",
                        "size", minimum=16 * 1024**2),
        "pids": Field("int", 64, "Processes and threads in the jail at once", "count", minimum=4, maximum=65536),
        "tmpfs": Field("size", 16 * 1024**2, "Size of the jail's writable /tmp (and /dev/shm)", "size",
                       minimum=64 * 1024),
        "output": Field("size", 1024**2, "stdout + stderr bytes; more kills the job (output_limit)", "size",
                        minimum=1024),
        "log": Field("size", 64 * 1024, "Bytes of modules.log records kept; more are dropped (truncated.logs)",
                     "size", minimum=0),
        "open_files": Field("int", 256, "RLIMIT_NOFILE for every process in the jail", "count",
                            minimum=16, maximum=65536),
        "linger": Field("duration", 0.1, "How long pending async work may run after the handler completed",
                        "duration", minimum=0, maximum=60),
        "concurrency": Field("int", 4, "Jobs of this tenant running at once (daemon)", "count",
                             minimum=1, maximum=4096),
        "queue": Field("int", 64, "Jobs of this tenant waiting at once; more are rejected (queue_full)",
                       "count", minimum=0, maximum=100000),
        "rate": Field("float", 100.0, "Sustained job submissions per second (token bucket)", "jobs/s",
                      minimum=0.001, maximum=1e6),
        "burst": Field("int", 200, "Token bucket depth: submissions allowed at once", "count",
                       minimum=1, maximum=1000000),
    },
    "capabilities": {
        "log": Field("bool", True, "modules.log: structured log records returned in the result"),
        "custom": Field("list_str", [], "Operator-registered capability providers granted to this tenant"),
    },
    "capabilities.kv": {
        "enabled": Field("bool", False, "modules.kv: the tenant's own key-value data"),
        "max_keys": Field("int", 1000, "Keys the tenant may store", "count", minimum=0),
        "max_bytes": Field("size", 1024**2, "Total bytes of keys and values", "size", minimum=0),
        "max_value": Field("size", 64 * 1024, "Largest single value", "size", minimum=0),
    },
    "capabilities.http": {
        "allow": Field("list_str", [], "URL prefixes allowed for modules.http (scheme://host[:port]/path)"),
        "timeout": Field("duration", 5.0, "Time limit of one HTTP request", "duration", minimum=0.001, maximum=300),
        "max_response": Field("size", 1024**2, "Largest response body", "size", minimum=0),
    },
    "pool": {
        "min": Field("int", 0, "Warm jails kept ready (daemon)", "count", minimum=0, maximum=1024),
        "max": Field("int", 0, "Warm jails at most, bursts included (daemon)", "count", minimum=0, maximum=1024),
        "idle": Field("duration", 60.0, "Idle time after which warm jails above min are retired", "duration",
                      minimum=0),
    },
}
# Free-form tables, validated by their own functions below.
#   [capabilities.secrets]  NAME = { file = "/host/path" }
#   [filesystem]            ro_paths = ["/opt/x", { host = "/srv/nm", jail = "/opt/node_modules" }]
FREEFORM = ("capabilities.secrets", "filesystem")


@dataclass(frozen=True)
class Secret:
    name: str
    file: str


@dataclass(frozen=True)
class Bind:
    host: str
    jail: str


@dataclass(frozen=True)
class Runtime:
    name: str
    entry: str


@dataclass(frozen=True)
class Access:
    uids: tuple[int, ...]
    groups: tuple[int | str, ...]


@dataclass(frozen=True)
class Limits:
    wall_time_s: float
    cpu_time_s: float
    cpu_cores: float
    memory_bytes: int
    pids: int
    tmpfs_bytes: int
    output_bytes: int
    log_bytes: int
    open_files: int
    linger_s: float
    concurrency: int
    queue: int
    rate: float
    burst: int


@dataclass(frozen=True)
class KV:
    enabled: bool
    max_keys: int
    max_bytes: int
    max_value_bytes: int


@dataclass(frozen=True)
class HTTP:
    allow: tuple[str, ...]
    timeout_s: float
    max_response_bytes: int


@dataclass(frozen=True)
class Capabilities:
    log: bool
    custom: tuple[str, ...]
    kv: KV
    http: HTTP
    secrets: tuple[Secret, ...]

    def granted(self) -> frozenset[str]:
        names = set()
        if self.log:
            names.add("log")
        if self.kv.enabled:
            names.add("kv")
        if self.http.allow:
            names.add("http")
        if self.secrets:
            names.add("secrets")
        return frozenset(names | set(self.custom))


@dataclass(frozen=True)
class Pool:
    min: int
    max: int
    idle_s: float


@dataclass(frozen=True)
class Profile:
    tenant: str
    runtime: Runtime
    access: Access
    limits: Limits
    capabilities: Capabilities
    ro_paths: tuple[Bind, ...]
    pool: Pool
    sources: tuple[str, ...]  # files it was read from, for messages

    @functools.cached_property  # read per job; a frozen instance never changes
    def digest(self) -> str:
        """sha256 over the effective policy (not the file bytes): what a result record cites."""
        d = dataclasses.asdict(self)
        d.pop("sources")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# validation


def check_value(where: str, f: Field, value: Any) -> tuple[Any, str | None]:
    """Return (parsed value, error or None). `where` is "file: section.key"."""
    try:
        if f.kind == "str":
            if not isinstance(value, str):
                return None, f"{where}: expected a string, got {_tname(value)}"
            if f.choices and value not in f.choices:
                return None, f"{where}: expected one of {', '.join(f.choices)}, got {value!r}"
            if f.pattern and not f.pattern.match(value):
                return None, f"{where}: {value!r} is not a valid identifier"
            return value, None
        if f.kind == "bool":
            if not isinstance(value, bool):
                return None, f"{where}: expected true or false, got {_tname(value)}"
            return value, None
        if f.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return None, f"{where}: expected an integer, got {_tname(value)}"
            parsed: Any = value
        elif f.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None, f"{where}: expected a number, got {_tname(value)}"
            parsed = float(value)
        elif f.kind == "size":
            parsed = parse_size(value)
        elif f.kind == "duration":
            parsed = parse_duration(value)
        elif f.kind == "list_int":
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                return None, f"{where}: expected a list of non-negative integers, got {value!r}"
            return tuple(value), None
        elif f.kind == "list_str":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return None, f"{where}: expected a list of strings, got {value!r}"
            return tuple(value), None
        elif f.kind == "list_id":
            if not isinstance(value, list) or not all(
                (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v)
                for v in value
            ):
                return None, f"{where}: expected a list of group names or gids, got {value!r}"
            return tuple(value), None
        else:  # pragma: no cover - schema bug
            raise AssertionError(f.kind)
    except UnitError as e:
        return None, f"{where}: {e}"
    if f.minimum is not None and parsed < f.minimum:
        return None, f"{where}: must be at least {_show(f, f.minimum)}, got {value!r}"
    if f.maximum is not None and parsed > f.maximum:
        return None, f"{where}: must be at most {_show(f, f.maximum)}, got {value!r}"
    return parsed, None


def _show(f: Field, n: float) -> str:
    if f.kind == "size":
        from .units import format_size
        return format_size(int(n))
    if f.kind == "duration":
        from .units import format_duration
        return format_duration(n)
    return str(n if f.kind == "float" else int(n))


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__) + f" ({v!r})"


def _validate_file(path: str, data: dict) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Validate one file's tables; return {section: {key: parsed}} and the errors."""
    out: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    def walk_section(section: str, table: Any) -> None:
        if not isinstance(table, dict):
            errors.append(f"{path}: [{section}]: expected a table, got {_tname(table)}")
            return
        if section == "capabilities.secrets":
            out[section] = _validate_secrets(path, table, errors)
            return
        if section == "filesystem":
            out[section] = _validate_filesystem(path, table, errors)
            return
        fields = SCHEMA[section]
        parsed = out.setdefault(section, {})
        for key, value in table.items():
            sub = f"{section}.{key}"
            if sub in SCHEMA or sub in FREEFORM:
                walk_section(sub, value)
                continue
            f = fields.get(key)
            if f is None:
                known = sorted(list(fields) + [s.split(".")[-1] for s in (*SCHEMA, *FREEFORM)
                                                if s.startswith(section + ".")])
                errors.append(f"{path}: {sub}: unknown key (known keys in [{section}]: {', '.join(known)})")
                continue
            v, err = check_value(f"{path}: {sub}", f, value)
            if err:
                errors.append(err)
            else:
                parsed[key] = v

    for key, value in data.items():
        if key in SCHEMA or key in FREEFORM:
            walk_section(key, value)
        else:
            top = sorted({s.split(".")[0] for s in (*SCHEMA, *FREEFORM)})
            errors.append(f"{path}: {key}: unknown section (known: {', '.join(top)})")
    return out, errors


def _validate_secrets(path: str, table: dict, errors: list[str]) -> dict[str, Secret]:
    secrets: dict[str, Secret] = {}
    for name, spec in table.items():
        where = f"{path}: capabilities.secrets.{name}"
        if not SECRET_NAME_RE.match(name):
            errors.append(f"{where}: secret names are letters, digits and _ (not starting with a digit)")
            continue
        if not isinstance(spec, dict) or set(spec) != {"file"} or not isinstance(spec["file"], str):
            errors.append(f"{where}: expected {{ file = \"/absolute/host/path\" }}, got {spec!r}")
            continue
        if not os.path.isabs(spec["file"]):
            errors.append(f"{where}.file: expected an absolute host path, got {spec['file']!r}")
            continue
        secrets[name] = Secret(name, os.path.normpath(spec["file"]))
    return secrets


# Paths a profile may never bind into a jail, even read-only.
_FORBIDDEN_BIND_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/var/run", "/etc/shadow", "/etc/gshadow",
                            "/root", "/boot", "/home")
_RESERVED_JAIL_PATHS = ("/", "/tmp", "/proc", "/dev", "/run", "/run/jailer", "/opt/jailer", "/usr")


def _validate_filesystem(path: str, table: dict, errors: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}: filesystem.{key}"
        if key != "ro_paths":
            errors.append(f"{where}: unknown key (known keys in [filesystem]: ro_paths)")
            continue
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list of paths or {{ host, jail }} tables, got {_tname(value)}")
            continue
        binds = []
        for i, item in enumerate(value):
            w = f"{where}[{i}]"
            if isinstance(item, str):
                host, jail = item, item
            elif isinstance(item, dict) and set(item) == {"host", "jail"} and all(
                isinstance(v, str) for v in item.values()
            ):
                host, jail = item["host"], item["jail"]
            else:
                errors.append(f"{w}: expected \"/path\" or {{ host = \"/path\", jail = \"/path\" }}, got {item!r}")
                continue
            if not (os.path.isabs(host) and os.path.isabs(jail)):
                errors.append(f"{w}: paths must be absolute, got host={host!r} jail={jail!r}")
                continue
            host, jail = os.path.normpath(host), os.path.normpath(jail)
            if any(host == p or host.startswith(p + "/") for p in _FORBIDDEN_BIND_PREFIXES) or host == "/":
                errors.append(f"{w}: {host!r} may not be exposed to a jail")
                continue
            if jail in _RESERVED_JAIL_PATHS or jail.startswith(("/tmp/", "/proc/", "/dev/", "/run/")):
                errors.append(f"{w}: {jail!r} is reserved inside the jail")
                continue
            binds.append(Bind(host, jail))
        out["ro_paths"] = tuple(binds)
    return out


def _merge(base: dict[str, dict[str, Any]], over: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _build(tenant: str, values: dict[str, dict[str, Any]], sources: tuple[str, ...]) -> Profile:
    def get(section: str, key: str) -> Any:
        v = values.get(section, {}).get(key)
        return SCHEMA[section][key].default if v is None else v

    def tup(v: Any) -> tuple:
        return tuple(v)

    lim = {k: get("limits", k) for k in SCHEMA["limits"]}
    errors = []
    if lim["tmpfs"] > lim["memory"]:
        errors.append(f"{sources[-1]}: limits.tmpfs: /tmp is backed by the jail's memory, so it cannot "
                      f"exceed limits.memory ({lim['tmpfs']} > {lim['memory']} bytes)")
    if get("pool", "min") > get("pool", "max"):
        errors.append(f"{sources[-1]}: pool.min: must not exceed pool.max")
    for url in get("capabilities.http", "allow"):
        if not re.match(r"^https?://[^/\s@]+(/[^\s]*)?$", url):
            errors.append(f"{sources[-1]}: capabilities.http.allow: {url!r} is not an http(s)://host[:port]/path "
                          "prefix")
    if errors:
        raise ProfileError(errors)
    return Profile(
        tenant=tenant,
        runtime=Runtime(get("runtime", "name"), get("runtime", "entry")),
        access=Access(tup(get("access", "uids")), tup(get("access", "groups"))),
        limits=Limits(
            wall_time_s=lim["wall_time"], cpu_time_s=lim["cpu_time"], cpu_cores=lim["cpu_cores"],
            memory_bytes=lim["memory"], pids=lim["pids"], tmpfs_bytes=lim["tmpfs"],
            output_bytes=lim["output"], log_bytes=lim["log"], open_files=lim["open_files"],
            linger_s=lim["linger"], concurrency=lim["concurrency"], queue=lim["queue"],
            rate=lim["rate"], burst=lim["burst"],
        ),
        capabilities=Capabilities(
            log=get("capabilities", "log"),
            custom=tup(get("capabilities", "custom")),
            kv=KV(get("capabilities.kv", "enabled"), get("capabilities.kv", "max_keys"),
                  get("capabilities.kv", "max_bytes"), get("capabilities.kv", "max_value")),
            http=HTTP(tup(get("capabilities.http", "allow")), get("capabilities.http", "timeout"),
                      get("capabilities.http", "max_response")),
            secrets=tuple(sorted(values.get("capabilities.secrets", {}).values(), key=lambda s: s.name)),
        ),
        ro_paths=tuple(values.get("filesystem", {}).get("ro_paths", ())),
        pool=Pool(get("pool", "min"), get("pool", "max"), get("pool", "idle")),
        sources=sources,
    )


# ---------------------------------------------------------------------------------------------
# loading


def parse_file(path: str, text: str | None = None) -> dict[str, dict[str, Any]]:
    """Parse and validate one file; raise ProfileError with every problem in it."""
    try:
        if text is None:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            data = tomllib.loads(text)
    except OSError as e:
        raise ProfileError([f"{path}: cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError([f"{path}: invalid TOML: {e}"]) from None
    values, errors = _validate_file(path, data)
    if errors:
        raise ProfileError(errors)
    return values


def builtin_defaults() -> Profile:
    return _build("default", {}, ("<built-in defaults>",))


def load_profile(tenant: str, path: str | None, defaults_path: str | None = None) -> Profile:
    """The tenant's effective profile: built-in defaults < defaults file < tenant file."""
    if not TENANT_RE.match(tenant):
        raise ProfileError([f"tenant {tenant!r}: names are lowercase letters, digits, - and _ (max 63)"])
    values: dict[str, dict[str, Any]] = {}
    sources: list[str] = ["<built-in defaults>"]
    errors: list[str] = []
    for p in (defaults_path, path):
        if p is None:
            continue
        try:
            values = _merge(values, parse_file(p))
            sources.append(p)
        except ProfileError as e:
            errors.extend(e.errors)
    if errors:
        raise ProfileError(errors)
    return _build(tenant, values, tuple(sources))


def load_dir(directory: str) -> tuple[dict[str, Profile], list[str]]:
    """Every tenant profile in a directory; bad ones are left out and reported, not fatal."""
    defaults = os.path.join(directory, "defaults.toml")
    has_defaults = os.path.exists(defaults)
    profiles: dict[str, Profile] = {}
    errors: list[str] = []
    if has_defaults:
        try:
            parse_file(defaults)
        except ProfileError as e:
            return {}, e.errors  # every tenant inherits from it: nothing is trustworthy
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        return {}, [f"{directory}: cannot list: {e.strerror}"]
    for name in names:
        if not name.endswith(".toml") or name == "defaults.toml":
            continue
        tenant = name[:-5]
        try:
            profiles[tenant] = load_profile(tenant, os.path.join(directory, name),
                                            defaults if has_defaults else None)
        except ProfileError as e:
            errors.extend(e.errors)
    return profiles, errors


def check_files(paths: list[str]) -> list[str]:
    """`jailer profile check`: every error in every file (a defaults.toml is checked on its own)."""
    errors: list[str] = []
    for p in paths:
        base = os.path.basename(p)
        try:
            if base == "defaults.toml":
                values = parse_file(p)
                _build("default", values, ("<built-in defaults>", p))
            else:
                sibling = os.path.join(os.path.dirname(p), "defaults.toml")
                load_profile(base[:-5] if base.endswith(".toml") else base, p,
                             sibling if os.path.exists(sibling) else None)
        except ProfileError as e:
            errors.extend(e.errors)
    return errors


def schema_rows() -> list[tuple[str, str, Field]]:
    """(section, key, field) for docs and tests."""
    return [(s, k, f) for s, fields in SCHEMA.items() for k, f in fields.items()]

