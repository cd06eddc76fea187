"""modules.kv: the tenant's own key-value data, one SQLite file per tenant (single-host mode).

Layout: `{state_dir}/kv/{tenant}.sqlite3`, directory 0700, file 0600 (SQLite gives its -wal and -shm
files the database file's mode). The file name is built only from the tenant name the daemon
validated (`TENANT_RE`), never from anything the jail sends, so no key string can reach another
tenant's data: keys are rows inside the tenant's own file.

Methods (args is the call's JSON object; unknown argument names are a BadCall):
  get(key)                       -> value | null
  set(key, value, ttl?=seconds)  -> null
  delete(key)                    -> bool (true if a live key was removed)
  list(prefix="", limit=1000, after?) -> [key, ...] sorted by code point (= UTF-8 byte order),
                                    at most `limit` (1..1000), only keys > `after` when given
                                    (for paging).

Keys are strings of 1..512 UTF-8 bytes without NUL. Values are any JSON value, stored serialized
(compact, UTF-8). Quotas come from the job's profile ([capabilities.kv]): max_value (serialized
value bytes), max_keys, max_bytes (key + value bytes over live keys); exceeding one raises
CapabilityError("QuotaExceeded"). A set that does not increase usage is always allowed, so a tenant
whose quota was lowered by a reload can still overwrite with smaller values and delete.

TTL: expired keys are invisible to get/list/delete; they are purged on set (all of them, via an
index), and a get that meets one deletes it.

Prefix listing is a range query on the keys' UTF-8 bytes (key >= prefix AND key < successor), so
`%`, `_` and every other character match literally.

All SQLite work runs in a worker thread; each tenant has one connection and a trio.Lock, so calls of
one tenant are serialized while different tenants proceed in parallel.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from jailer.broker import CallContext, CapabilityError
from jailer.profile import TENANT_RE

MAX_KEY_BYTES = 512
MAX_LIST = 1000
MAX_TTL_S = 100 * 365 * 86400  # a century: "forever" should be spelled by leaving ttl out

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,      -- UTF-8 bytes of the key: byte order = code point order
    value TEXT NOT NULL,       -- compact JSON
    size INTEGER NOT NULL,     -- len(key bytes) + len(value bytes)
    expires REAL               -- clock() value after which the key is gone; NULL = never
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv(expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    keys INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS kv_ins AFTER INSERT ON kv BEGIN
    UPDATE totals SET keys = keys + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kv_del AFTER DELETE ON kv BEGIN
    UPDATE totals SET keys = keys - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS kv_upd AFTER UPDATE ON kv BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0;
END;
"""

_ARGS = {
    "get": ({"key"}, {"key"}),
    "set": ({"key", "value"}, {"key", "value", "ttl"}),
    "delete": ({"key"}, {"key"}),
    "list": (set(), {"prefix", "limit", "after"}),
}


@dataclass
class _TenantDB:
    lock: trio.Lock = field(default_factory=trio.Lock)
    conn: sqlite3.Connection | None = None


class KVCapability:
    name = "kv"

    def __init__(self, state_dir: str, clock: Callable[[], float] = time.time):
        self.state_dir = os.path.abspath(state_dir)
        self.kv_dir = os.path.join(self.state_dir, "kv")
        self.clock = clock
        self._dbs: dict[str, _TenantDB] = {}
        self._closed = False

    # ------------------------------------------------------------------------------------------
    # the Capability protocol

    async def call(self, ctx: CallContext, method: str, args: dict[str, Any]) -> Any:
        if method not in _ARGS:
            raise CapabilityError("BadCall", f"kv.{str(method)[:64]}: unknown method (use get, set, delete, list)")
        if not isinstance(args, dict):
            raise CapabilityError("BadCall", f"kv.{method}: args must be an object")
        required, allowed = _ARGS[method]
        unknown = set(args) - allowed
        if unknown:
            names = ", ".join(sorted(repr(str(k)[:64]) for k in unknown)[:5])
            raise CapabilityError("BadCall", f"kv.{method}: unknown argument(s) {names} "
                                             f"(allowed: {', '.join(sorted(allowed))})")
        missing = required - set(args)
        if missing:
            raise CapabilityError("BadCall", f"kv.{method}: missing argument(s) {', '.join(sorted(missing))}")

        quota = ctx.profile.capabilities.kv
        if method == "get":
            key = _key(args["key"])
            return await self._run(ctx.tenant, self._get, key)
        if method == "set":
            key = _key(args["key"])
            value = _serialize(args["value"])
            ttl = _ttl(args.get("ttl"))
            if len(value) > quota.max_value_bytes:
                raise CapabilityError(
                    "QuotaExceeded",
                    f"kv.set: value is {len(value)} bytes serialized, more than max_value "
                    f"({quota.max_value_bytes} bytes)")
            return await self._run(ctx.tenant, self._set, key, value, ttl, quota.max_keys, quota.max_bytes)
        if method == "delete":
            key = _key(args["key"])
            return await self._run(ctx.tenant, self._delete, key)
        # list
        prefix = args.get("prefix", "")
        if prefix is None:
            prefix = ""
        prefix_b = _key(prefix, what="prefix", allow_empty=True)
        limit = args.get("limit", MAX_LIST)
        if limit is None:
            limit = MAX_LIST
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise CapabilityError("BadCall", f"kv.list: limit must be an integer from 1 to {MAX_LIST}")
        after = args.get("after")
        after_b = None if after is None else _key(after, what="after")
        return await self._run(ctx.tenant, self._list, prefix_b, limit, after_b)

    def close(self) -> None:
        """Close every tenant's connection. Call once no job is running (daemon shutdown)."""
        self._closed = True
        for db in self._dbs.values():
            if db.conn is not None:
                try:
                    db.conn.close()
                except sqlite3.Error:
                    pass
                db.conn = None
        self._dbs.clear()

    # ------------------------------------------------------------------------------------------
    # plumbing

    def path_for(self, tenant: str) -> str:
        """The tenant's database file. Only a validated tenant name ever becomes part of a path."""
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            # The daemon validated it already; reaching this is a bug, so fail closed.
            raise CapabilityError("Unavailable", "kv: invalid tenant name")
        return os.path.join(self.kv_dir, tenant + ".sqlite3")

    async def _run(self, tenant: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise CapabilityError("Unavailable", "kv: the key-value store is shut down")
        path = self.path_for(tenant)
        db = self._dbs.get(tenant)
        if db is None:
            db = self._dbs[tenant] = _TenantDB()
        async with db.lock:
            try:
                if db.conn is None:
                    db.conn = await trio.to_thread.run_sync(self._open, path)
                return await trio.to_thread.run_sync(fn, db.conn, *args)
            except sqlite3.Error as e:
                raise CapabilityError("Unavailable", f"kv: storage error ({type(e).__name__})") from None
            except OSError as e:
                raise CapabilityError("Unavailable", f"kv: storage unavailable ({e.strerror})") from None

    def _open(self, path: str) -> sqlite3.Connection:
        # Directory: created 0700, must be a real directory we own (not a symlink).
        os.makedirs(self.kv_dir, mode=0o700, exist_ok=True)
        st = os.lstat(self.kv_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(0, f"{self.kv_dir} is not a directory owned by the daemon")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.kv_dir, 0o700)
        # File: create 0600 ourselves (never following a symlink) so SQLite never creates it with
        # the umask's mode; its -wal/-shm files inherit this mode.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise OSError(0, f"{path} is not a regular file")
            if stat.S_IMODE(fst.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    # The following run in a worker thread, one at a time per tenant (the tenant's lock).

    def _get(self, conn: sqlite3.Connection, key: bytes) -> Any:
        row = conn.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        value, expires = row
        if expires is not None and expires <= self.clock():
            conn.execute("DELETE FROM kv WHERE key = ? AND expires = ?", (key, expires))
            return None
        return json.loads(value)

    def _set(self, conn: sqlite3.Connection, key: bytes, value: bytes, ttl: float | None,
             max_keys: int, max_bytes: int) -> None:
        now = self.clock()
        expires = None if ttl is None else now + ttl
        size = len(key) + len(value)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))
            keys, total = conn.execute("SELECT keys, bytes FROM totals WHERE id = 0").fetchone()
            row = conn.execute("SELECT size FROM kv WHERE key = ?", (key,)).fetchone()
            new_keys = keys if row is not None else keys + 1
            new_total = total - (row[0] if row is not None else 0) + size
            if new_keys > max_keys and new_keys > keys:
                raise CapabilityError(
                    "QuotaExceeded",
                    f"kv.set: the tenant already has {keys} keys and max_keys is {max_keys}")
            if new_total > max_bytes and new_total > total:
                raise CapabilityError(
                    "QuotaExceeded",
                    f"kv.set: storing this key ({size} bytes of key and value) would bring the tenant's data "
                    f"to {new_total} bytes, more than max_bytes ({max_bytes} bytes; {total} in use)")
            conn.execute(
                "INSERT INTO kv (key, value, size, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size, "
                "expires = excluded.expires",
                (key, value.decode("utf-8"), size, expires))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return None

    def _delete(self, conn: sqlite3.Connection, key: bytes) -> bool:
        now = self.clock()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT expires FROM kv WHERE key = ?", (key,)).fetchone()
            if row is not None:
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return row is not None and (row[0] is None or row[0] > now)

    def _list(self, conn: sqlite3.Connection, prefix: bytes, limit: int, after: bytes | None) -> list[str]:
        where = ["(expires IS NULL OR expires > ?)"]
        params: list[Any] = [self.clock()]
        if prefix:
            where.append("key >= ?")
            params.append(prefix)
            upper = _successor(prefix)
            if upper is not None:
                where.append("key < ?")
                params.append(upper)
        if after is not None:
            where.append("key > ?")
            params.append(after)
        params.append(limit)
        rows = conn.execute(
            f"SELECT key FROM kv WHERE {' AND '.join(where)} ORDER BY key LIMIT ?", params).fetchall()
        return [bytes(r[0]).decode("utf-8") for r in rows]


# ----------------------------------------------------------------------------------------------
# argument validation (every argument is hostile input)


def _key(key: Any, what: str = "key", allow_empty: bool = False) -> bytes:
    if not isinstance(key, str):
        raise CapabilityError("BadCall", f"kv: {what} must be a string")
    try:
        b = key.encode("utf-8")
    except UnicodeEncodeError:
        raise CapabilityError("BadCall", f"kv: {what} is not valid Unicode (lone surrogate)") from None
    if not b and not allow_empty:
        raise CapabilityError("BadCall", f"kv: {what} must not be empty")
    if len(b) > MAX_KEY_BYTES:
        raise CapabilityError("BadCall", f"kv: {what} is {len(b)} bytes, more than {MAX_KEY_BYTES} (UTF-8)")
    if b"\x00" in b:
        raise CapabilityError("BadCall", f"kv: {what} must not contain NUL")
    return b


def _serialize(value: Any) -> bytes:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CapabilityError("BadCall", "kv.set: value contains invalid Unicode (lone surrogate)") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise CapabilityError("BadCall", f"kv.set: value is not storable JSON ({str(e)[:120]})") from None


def _ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise CapabilityError("BadCall", "kv.set: ttl must be a number of seconds")
    if not 0 < ttl <= MAX_TTL_S:
        raise CapabilityError("BadCall", f"kv.set: ttl must be more than 0 and at most {MAX_TTL_S} seconds")
    return float(ttl)


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix`."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:  # never in UTF-8, kept for completeness
        b.pop()
    if not b:
        return None
    b[-1] += 1
    return bytes(b)
