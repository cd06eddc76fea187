"""modules.kv on SQLite: one file per tenant, quotas, TTL, literal prefixes, isolation."""

import os
import stat
import tempfile

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jailer.broker import CallContext, CapabilityError, LogSink
from jailer.profile import load_profile
from supervisor.capabilities import KVCapability


class FakeClock:
    """Wall clock the test moves by hand."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def make_ctx(tmp_path, tenant, max_keys=100, max_bytes="64KiB", max_value="4KiB"):
    p = tmp_path / f"{tenant}.toml"
    p.write_text(f'[capabilities.kv]\nenabled = true\nmax_keys = {max_keys}\n'
                 f'max_bytes = "{max_bytes}"\nmax_value = "{max_value}"\n')
    return CallContext(job_id="j-1", tenant=tenant, profile=load_profile(tenant, str(p)), logs=LogSink(4096))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def kv(tmp_path, clock):
    cap = KVCapability(str(tmp_path / "state"), clock=clock)
    yield cap
    cap.close()


@pytest.fixture
def ctx(tmp_path):
    return make_ctx(tmp_path, "acme")


async def err(cap, ctx, method, args):
    with pytest.raises(CapabilityError) as ei:
        await cap.call(ctx, method, args)
    return ei.value


@pytest.mark.parametrize("value", [None, True, False, 0, -1.5, 2**62, "", "héllo ✓ 🎉", [], [1, [2, {"a": None}]],
                                   {"nested": {"list": [1, "two", 3.0], "empty": {}}}])
async def test_round_trip_json_values(kv, ctx, value):
    assert await kv.call(ctx, "set", {"key": "k", "value": value}) is None
    assert await kv.call(ctx, "get", {"key": "k"}) == value


async def test_get_missing_set_overwrite_delete(kv, ctx):
    assert await kv.call(ctx, "get", {"key": "nope"}) is None
    await kv.call(ctx, "set", {"key": "a", "value": 1})
    await kv.call(ctx, "set", {"key": "a", "value": {"x": 2}})
    assert await kv.call(ctx, "get", {"key": "a"}) == {"x": 2}
    assert await kv.call(ctx, "delete", {"key": "a"}) is True
    assert await kv.call(ctx, "delete", {"key": "a"}) is False
    assert await kv.call(ctx, "get", {"key": "a"}) is None


async def test_list_sorted_limit_and_paging(kv, ctx):
    for k in ["b", "a", "c/2", "c/1", "é", "Z"]:
        await kv.call(ctx, "set", {"key": k, "value": k})
    assert await kv.call(ctx, "list", {}) == ["Z", "a", "b", "c/1", "c/2", "é"]
    assert await kv.call(ctx, "list", {"prefix": "c/"}) == ["c/1", "c/2"]
    assert await kv.call(ctx, "list", {"limit": 2}) == ["Z", "a"]
    assert await kv.call(ctx, "list", {"limit": 2, "after": "a"}) == ["b", "c/1"]
    assert await kv.call(ctx, "list", {"prefix": "zz"}) == []


async def test_prefix_wildcards_are_literal(kv, ctx):
    keys = ["100%", "100%x", "1000", "10_", "10_a", "10a", "a%b", "axb", "[a]", "a*", "ab", "a\\", "a\\b"]
    for k in keys:
        await kv.call(ctx, "set", {"key": k, "value": 0})
    assert await kv.call(ctx, "list", {"prefix": "100%"}) == ["100%", "100%x"]
    assert await kv.call(ctx, "list", {"prefix": "10_"}) == ["10_", "10_a"]
    assert await kv.call(ctx, "list", {"prefix": "a%"}) == ["a%b"]
    assert await kv.call(ctx, "list", {"prefix": "%"}) == []
    assert await kv.call(ctx, "list", {"prefix": "_"}) == []
    assert await kv.call(ctx, "list", {"prefix": "a*"}) == ["a*"]
    assert await kv.call(ctx, "list", {"prefix": "[a"}) == ["[a]"]
    assert await kv.call(ctx, "list", {"prefix": "a\\"}) == ["a\\", "a\\b"]


async def test_prefix_at_unicode_boundaries(kv, ctx):
    keys = ["\u007f", "\u007fx", "\u0080", "\U0010ffff", "\U0010ffffa", "\ud7ff", "\ue000"]
    for k in keys:
        await kv.call(ctx, "set", {"key": k, "value": 0})
    assert await kv.call(ctx, "list", {}) == sorted(keys)
    for k in keys:
        assert await kv.call(ctx, "list", {"prefix": k}) == sorted(x for x in keys if x.startswith(k))


async def test_ttl_expiry_with_fake_clock(kv, ctx, clock):
    await kv.call(ctx, "set", {"key": "short", "value": 1, "ttl": 10})
    await kv.call(ctx, "set", {"key": "long", "value": 2, "ttl": 100.5})
    await kv.call(ctx, "set", {"key": "forever", "value": 3})
    clock.now += 9.9
    assert await kv.call(ctx, "get", {"key": "short"}) == 1
    clock.now += 0.1  # exactly at the deadline: gone
    assert await kv.call(ctx, "get", {"key": "short"}) is None
    assert await kv.call(ctx, "list", {}) == ["forever", "long"]
    clock.now += 1000
    assert await kv.call(ctx, "list", {}) == ["forever"]
    assert await kv.call(ctx, "delete", {"key": "long"}) is False  # was invisible already
    # set without ttl clears an earlier ttl
    await kv.call(ctx, "set", {"key": "t", "value": 1, "ttl": 5})
    await kv.call(ctx, "set", {"key": "t", "value": 2})
    clock.now += 10
    assert await kv.call(ctx, "get", {"key": "t"}) == 2


async def test_expired_keys_are_purged_and_free_quota(kv, tmp_path, clock):
    ctx = make_ctx(tmp_path, "tiny", max_keys=2)
    await kv.call(ctx, "set", {"key": "a", "value": 1, "ttl": 1})
    await kv.call(ctx, "set", {"key": "b", "value": 1, "ttl": 1})
    e = await err(kv, ctx, "set", {"key": "c", "value": 1})
    assert e.type == "QuotaExceeded"
    clock.now += 2
    await kv.call(ctx, "set", {"key": "c", "value": 1})
    await kv.call(ctx, "set", {"key": "d", "value": 1})
    assert await kv.call(ctx, "list", {}) == ["c", "d"]
    import sqlite3
    with sqlite3.connect(kv.path_for("tiny")) as raw:
        assert sorted(bytes(r[0]) for r in raw.execute("SELECT key FROM kv")) == [b"c", b"d"]


async def test_quota_value_size(kv, tmp_path):
    ctx = make_ctx(tmp_path, "q", max_value="100B")
    await kv.call(ctx, "set", {"key": "k", "value": "x" * 98})  # '"' + 98 + '"' = 100 bytes
    e = await err(kv, ctx, "set", {"key": "k", "value": "x" * 99})
    assert e.type == "QuotaExceeded"
    assert "101 bytes" in e.message and "100 bytes" in e.message
    # multi-byte characters count in UTF-8 bytes
    e = await err(kv, ctx, "set", {"key": "k", "value": "é" * 50})
    assert e.type == "QuotaExceeded" and "102 bytes" in e.message
    assert await kv.call(ctx, "get", {"key": "k"}) == "x" * 98


async def test_quota_keys(kv, tmp_path):
    ctx = make_ctx(tmp_path, "q", max_keys=3)
    for k in "abc":
        await kv.call(ctx, "set", {"key": k, "value": 1})
    e = await err(kv, ctx, "set", {"key": "d", "value": 1})
    assert e.type == "QuotaExceeded" and "3 keys" in e.message and "max_keys is 3" in e.message
    await kv.call(ctx, "set", {"key": "a", "value": 2})  # overwriting does not add a key
    assert await kv.call(ctx, "delete", {"key": "b"}) is True
    await kv.call(ctx, "set", {"key": "d", "value": 1})
    assert await kv.call(ctx, "list", {}) == ["a", "c", "d"]


async def test_quota_bytes(kv, tmp_path):
    ctx = make_ctx(tmp_path, "q", max_bytes="20B", max_value="1KiB")
    await kv.call(ctx, "set", {"key": "ab", "value": "12345678"})  # 2 + len('"12345678"') = 12 bytes
    await kv.call(ctx, "set", {"key": "cd", "value": "1234"})  # 2 + 6 = 8: exactly 20 in use
    e = await err(kv, ctx, "set", {"key": "e", "value": 1})  # 1 + 1 more
    assert e.type == "QuotaExceeded"
    assert "22 bytes" in e.message and "max_bytes (20 bytes" in e.message
    e = await err(kv, ctx, "set", {"key": "cd", "value": "12345"})  # growing a key counts the difference
    assert e.type == "QuotaExceeded"
    await kv.call(ctx, "set", {"key": "cd", "value": "12"})  # shrinking is fine
    await kv.call(ctx, "set", {"key": "e", "value": 1})
    assert await kv.call(ctx, "list", {}) == ["ab", "cd", "e"]


async def test_lowered_quota_still_allows_shrinking(kv, tmp_path):
    big = make_ctx(tmp_path, "q", max_keys=10)
    for k in "abcde":
        await kv.call(big, "set", {"key": k, "value": "xxxx"})
    small = make_ctx(tmp_path, "q", max_keys=2, max_bytes="10B")  # an operator reload lowered it
    await kv.call(small, "set", {"key": "a", "value": "x"})  # no new key, fewer bytes
    assert (await err(kv, small, "set", {"key": "f", "value": 1})).type == "QuotaExceeded"
    assert (await err(kv, small, "set", {"key": "b", "value": "xxxxxx"})).type == "QuotaExceeded"
    assert await kv.call(small, "delete", {"key": "c"}) is True


@pytest.mark.parametrize("method,args", [
    ("get", {}),
    ("get", {"key": ""}),
    ("get", {"key": 5}),
    ("get", {"key": None}),
    ("get", {"key": ["a"]}),
    ("get", {"key": "a\x00b"}),
    ("get", {"key": "\ud800"}),
    ("get", {"key": "x" * 513}),
    ("get", {"key": "é" * 257}),
    ("get", {"key": "a", "extra": 1}),
    ("set", {"key": "a"}),
    ("set", {"key": "a", "value": float("nan")}),
    ("set", {"key": "a", "value": float("inf")}),
    ("set", {"key": "a", "value": "\udfff"}),
    ("set", {"key": "a", "value": 1, "ttl": 0}),
    ("set", {"key": "a", "value": 1, "ttl": -1}),
    ("set", {"key": "a", "value": 1, "ttl": "10"}),
    ("set", {"key": "a", "value": 1, "ttl": True}),
    ("set", {"key": "a", "value": 1, "ttl": float("inf")}),
    ("set", {"key": "a", "value": 1, "ttl": 1e300}),
    ("delete", {"key": 1}),
    ("list", {"prefix": 1}),
    ("list", {"prefix": "a\x00"}),
    ("list", {"limit": 0}),
    ("list", {"limit": 1001}),
    ("list", {"limit": "5"}),
    ("list", {"limit": True}),
    ("list", {"after": 3}),
    ("drop", {}),
    ("__init__", {}),
])
async def test_bad_calls(kv, ctx, method, args):
    e = await err(kv, ctx, method, args)
    assert e.type == "BadCall", e.message


async def test_key_size_limit_is_in_bytes(kv, ctx):
    await kv.call(ctx, "set", {"key": "x" * 512, "value": 1})
    await kv.call(ctx, "set", {"key": "é" * 256, "value": 2})
    assert await kv.call(ctx, "get", {"key": "é" * 256}) == 2


async def test_file_layout_and_modes(kv, ctx, tmp_path):
    await kv.call(ctx, "set", {"key": "a", "value": 1})
    kv_dir = tmp_path / "state" / "kv"
    assert stat.S_IMODE(os.stat(kv_dir).st_mode) == 0o700
    assert kv.path_for("acme") == str(kv_dir / "acme.sqlite3")
    for name in os.listdir(kv_dir):  # the db and its -wal / -shm companions
        assert name.startswith("acme.sqlite3")
        assert stat.S_IMODE(os.stat(kv_dir / name).st_mode) == 0o600, name
    import sqlite3
    with sqlite3.connect(kv.path_for("acme")) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_file_mode_tightened_even_with_a_lax_umask(tmp_path, clock):
    old = os.umask(0)
    try:
        cap = KVCapability(str(tmp_path / "s"), clock=clock)
        await cap.call(make_ctx(tmp_path, "acme"), "set", {"key": "a", "value": 1})
    finally:
        os.umask(old)
        cap.close()
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "kv").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "kv" / "acme.sqlite3").st_mode) == 0o600


async def test_invalid_tenant_never_becomes_a_path(kv, tmp_path):
    ctx = make_ctx(tmp_path, "acme")
    for bad in ["../acme", "ACME", "a/b", "", "-x", "a" * 64, "acme\x00", "acme\n", None]:
        ctx.tenant = bad
        e = await err(kv, ctx, "get", {"key": "a"})
        assert e.type == "Unavailable"
    assert not (tmp_path / "state" / "kv").exists() or os.listdir(tmp_path / "state" / "kv") == []


WEIRD_KEYS = ["../a", "../acme.sqlite3", "/etc/passwd", "..", ".", "%", "_", "*", "a", "acme:a", "globex/a",
              "\u202eevil", "\ufeff", "\U0001f600", "\u0301", "\r\n", " ", "\t", "'; DROP TABLE kv; --",
              "a" * 512]


async def test_tenant_isolation(kv, tmp_path):
    a = make_ctx(tmp_path, "acme")
    b = make_ctx(tmp_path, "globex")
    for k in WEIRD_KEYS:
        await kv.call(a, "set", {"key": k, "value": ["acme", k]})
    for k in WEIRD_KEYS:
        assert await kv.call(b, "get", {"key": k}) is None
        assert await kv.call(b, "delete", {"key": k}) is False
        await kv.call(b, "set", {"key": k, "value": ["globex", k]})
    assert await kv.call(b, "list", {"prefix": ""}) == sorted(WEIRD_KEYS)
    for k in WEIRD_KEYS:
        assert await kv.call(a, "get", {"key": k}) == ["acme", k]
        assert await kv.call(b, "get", {"key": k}) == ["globex", k]
    assert sorted(os.listdir(tmp_path / "state" / "kv")) == sorted(
        f"{t}.sqlite3{s}" for t in ("acme", "globex") for s in ("", "-shm", "-wal"))


async def test_calls_of_one_tenant_are_serialized(kv, ctx):
    async def bump(i):
        await kv.call(ctx, "set", {"key": f"k{i:03}", "value": i})

    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(bump, i)
    assert len(await kv.call(ctx, "list", {})) == 50


async def test_close(kv, ctx):
    await kv.call(ctx, "set", {"key": "a", "value": 1})
    kv.close()
    assert (await err(kv, ctx, "get", {"key": "a"})).type == "Unavailable"
    again = KVCapability(kv.state_dir)
    try:
        assert await again.call(ctx, "get", {"key": "a"}) == 1  # durable across restarts
    finally:
        again.close()


# ----------------------------------------------------------------------------------------------
# property: two tenants behave like two independent dicts

keys = st.one_of(st.sampled_from(WEIRD_KEYS[:8]),
                 st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                         min_size=1, max_size=6))
values = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
                      | st.floats(allow_nan=False, allow_infinity=False),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                 max_size=3),
                      max_leaves=6)
ops = st.lists(st.tuples(st.sampled_from(["acme", "globex"]), st.sampled_from(["set", "get", "delete", "list"]),
                         keys, values), max_size=40)


@pytest.fixture
def two_ctxs(tmp_path):
    return {t: make_ctx(tmp_path, t, max_keys=1000, max_bytes="1MiB", max_value="64KiB") for t in ("acme", "globex")}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
async def test_two_tenants_are_two_dicts(tmp_path, two_ctxs, ops):
    ctxs = two_ctxs
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:  # fresh state for every example
        cap = KVCapability(d, clock=FakeClock())
        model: dict[str, dict] = {"acme": {}, "globex": {}}
        try:
            for tenant, op, key, value in ops:
                ctx, m = ctxs[tenant], model[tenant]
                if op == "set":
                    await cap.call(ctx, "set", {"key": key, "value": value})
                    m[key] = value
                elif op == "get":
                    assert await cap.call(ctx, "get", {"key": key}) == m.get(key)
                elif op == "delete":
                    existed = key in m
                    m.pop(key, None)
                    assert await cap.call(ctx, "delete", {"key": key}) is existed
                else:
                    prefix = key[:1]
                    assert await cap.call(ctx, "list", {"prefix": prefix}) == sorted(
                        k for k in m if k.startswith(prefix))
            for tenant, m in model.items():
                assert await cap.call(ctxs[tenant], "list", {}) == sorted(m)[:1000]
                for k, v in m.items():
                    assert await cap.call(ctxs[tenant], "get", {"key": k}) == v
        finally:
            cap.close()
