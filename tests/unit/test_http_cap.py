"""modules.http: allow-list, internal-address refusal, DNS pinning, redirects, caps, timeouts.

Every request in this file goes to a test server on 127.0.0.1 (ephemeral port). Host names are
answered by FakeResolver, never by DNS, and addresses other than loopback only ever appear in fake
DNS answers that the capability must refuse before connecting.
"""

import ipaddress
import json
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio

from jailer.broker import CallContext, CapabilityError, LogSink
from jailer.profile import load_profile
from supervisor.capabilities import HttpCapability
from supervisor.capabilities.http import (MAX_REDIRECTS, URLRejected, address_problem, allowed, parse_internal,
                                          parse_url)

HUGE = 4 * 1024 * 1024


class Server:
    """A small threaded HTTP(S) server on loopback that records every request it sees."""

    def __init__(self, tls_context=None):
        self.requests = []
        self.release = threading.Event()
        self.sni = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                server.requests.append({"method": self.command, "path": self.path,
                                        "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": body.decode()})
                try:
                    self.route(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def send(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def redirect(self, status, location):
                self.send(status, b"moved", [("Location", location)])

            def route(self, body):
                p = self.path
                if p.startswith("/api/hello"):
                    self.send(200, b"hello \xe2\x9c\x93", [("Content-Type", "text/plain; charset=utf-8"),
                                                          ("X-Test", "a"), ("X-Test", "b")])
                elif p == "/api/cookie":
                    self.send(200, b"here", [("Set-Cookie", "session=tenant-a-secret; Path=/")])
                elif p == "/api/echo":
                    self.send(200, json.dumps({"method": self.command, "body": body.decode(),
                                               "headers": {k.lower(): v for k, v in self.headers.items()}}).encode())
                elif p == "/api/redirect-in":
                    self.redirect(302, "/api/hello?from=redirect")
                elif p == "/api/redirect-abs":
                    self.redirect(301, f"http://api.example.test:{server.port}/api/hello")
                elif p == "/api/redirect-out":
                    self.redirect(302, f"http://elsewhere.test:{server.port}/api/hello")
                elif p == "/api/redirect-outside-prefix":
                    self.redirect(307, "/private/secret")
                elif p == "/api/redirect-internal":
                    self.redirect(302, f"http://rebind.test:{server.port}/api/hello")
                elif p == "/api/redirect-dotdot":
                    self.redirect(302, "/api/%2e%2e/private/secret")
                elif p == "/api/redirect-303":
                    self.redirect(303, "/api/echo")
                elif p == "/api/redirect-307":
                    self.redirect(307, "/api/echo")
                elif p.startswith("/api/loop"):
                    n = int(p.rsplit("/", 1)[1]) if p.count("/") == 3 else 0
                    self.redirect(302, f"/api/loop/{n + 1}")
                elif p == "/api/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(HUGE))
                    self.end_headers()
                    chunk = b"x" * 65536
                    for _ in range(HUGE // len(chunk)):
                        self.wfile.write(chunk)
                elif p == "/api/slow":
                    server.release.wait(10)
                    self.send(200, b"late")
                else:
                    self.send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None
        if tls_context is not None:
            tls_context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def paths(self):
        return [r["path"] for r in self.requests]


class FakeResolver:
    """Stands in for DNS: a fixed table, and a record of every lookup."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, host, port):
        self.calls.append((host, port))
        if host not in self.table:
            raise OSError(f"fake resolver: no such host {host}")
        return list(self.table[host])


@pytest.fixture
def server():
    with Server() as s:
        yield s


def make_ctx(tmp_path, allow, timeout="2s", max_response="64KiB", tenant="acme"):
    p = tmp_path / f"{tenant}.toml"
    p.write_text("[capabilities.http]\nallow = [" + ", ".join(json.dumps(a) for a in allow) + "]\n"
                 f'timeout = "{timeout}"\nmax_response = "{max_response}"\n')
    return CallContext(job_id="j-1", tenant=tenant, profile=load_profile(tenant, str(p)), logs=LogSink(4096))


async def fetch_error(cap, ctx, **args):
    with pytest.raises(CapabilityError) as ei:
        await cap.call(ctx, "fetch", args)
    return ei.value


class Cap:
    """HttpCapability as an async context manager (closes its client)."""

    def __init__(self, *a, **kw):
        self.cap = HttpCapability(*a, **kw)

    async def __aenter__(self):
        return self.cap

    async def __aexit__(self, *exc):
        await self.cap.aclose()


# ----------------------------------------------------------------------------------------------
# allow-listed fetches and the loopback refusal


async def test_allow_listed_fetch_with_operator_internal_allowance(server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    async with Cap(allow_internal=[base]) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/hello"})
    assert r["status"] == 200
    assert r["body"] == "hello ✓"
    assert r["truncated"] is False
    assert r["headers"]["content-type"] == "text/plain; charset=utf-8"
    assert r["headers"]["x-test"] == "a, b"
    assert r["url"] == f"{base}/api/hello"
    [req] = server.requests
    assert req["headers"]["host"] == f"127.0.0.1:{server.port}"
    assert req["headers"]["accept-encoding"] == "identity"


async def test_same_fetch_without_allow_internal_is_forbidden(server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    async with Cap() as cap:
        e = await fetch_error(cap, ctx, url=f"{base}/api/hello")
    assert e.type == "Forbidden" and "loopback" in e.message
    assert server.requests == []


@pytest.mark.parametrize("internal", [
    "http://127.0.0.1:{other}",  # another port
    "https://127.0.0.1:{port}",  # another scheme
    "http://127.0.0.2:{port}",  # another address
])
async def test_allow_internal_is_exact(server, tmp_path, internal):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    other = server.port + 1 if server.port < 65535 else server.port - 1
    async with Cap(allow_internal=[internal.format(port=server.port, other=other)]) as cap:
        assert (await fetch_error(cap, ctx, url=f"{base}/api/hello")).type == "Forbidden"
    assert server.requests == []


@pytest.mark.parametrize("answer", [
    ["10.0.0.5"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"], ["100.64.0.1"], ["100.100.100.200"],
    ["fd00:ec2::254"], ["192.168.1.1"], ["172.16.0.1"], ["fe80::1"], ["fe80::1%eth0"], ["fc00::1"],
    ["0.0.0.0"], ["::"], ["224.0.0.1"], ["ff02::1"], ["240.0.0.1"], ["255.255.255.255"],
    ["::ffff:10.0.0.5"], ["64:ff9b::a9fe:a9fe"], ["2002:7f00:1::1"], ["127.0.0.2"], ["not-an-ip"],
    # every address is checked, not just the one used: loopback is allowed here, 10.0.0.5 is not
    ["127.0.0.1", "10.0.0.5"], ["10.0.0.5", "127.0.0.1"],
])
async def test_names_resolving_to_internal_addresses_are_forbidden(server, tmp_path, answer):
    ctx = make_ctx(tmp_path, [f"http://api.example.test:{server.port}/"])
    resolver = FakeResolver({"api.example.test": answer})
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        e = await fetch_error(cap, ctx, url=f"http://api.example.test:{server.port}/api/hello")
    assert e.type == "Forbidden", e.message
    assert resolver.calls == [("api.example.test", server.port)]
    assert server.requests == []


async def test_dns_failure_is_a_network_error(tmp_path):
    ctx = make_ctx(tmp_path, ["http://nowhere.test/"])
    async with Cap(resolver=FakeResolver({})) as cap:
        assert (await fetch_error(cap, ctx, url="http://nowhere.test/x")).type == "NetworkError"
    async with Cap(resolver=FakeResolver({"nowhere.test": []})) as cap:
        assert (await fetch_error(cap, ctx, url="http://nowhere.test/x")).type == "NetworkError"


async def test_pinned_to_the_checked_address_with_the_original_host_header(server, tmp_path):
    ctx = make_ctx(tmp_path, [f"http://api.example.test:{server.port}/api/"])
    resolver = FakeResolver({"api.example.test": ["127.0.0.1"]})
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"http://API.Example.TEST:{server.port}/api/hello?x=1"})
        assert r["status"] == 200
        assert resolver.calls == [("api.example.test", server.port)]  # once per request
        [req] = server.requests
        assert req["headers"]["host"] == f"api.example.test:{server.port}"
        assert req["path"] == "/api/hello?x=1"
        # a DNS answer that changes between requests (rebinding) is checked afresh every time
        resolver.table["api.example.test"] = ["169.254.169.254"]
        assert (await fetch_error(cap, ctx, url=f"http://api.example.test:{server.port}/api/hello")).type \
            == "Forbidden"
        assert len(resolver.calls) == 2 and len(server.requests) == 1


async def test_async_resolver_is_awaited(server, tmp_path):
    calls = []

    async def resolver(host, port):  # a fake, like FakeResolver, but async
        calls.append(host)
        await trio.sleep(0)
        return ["127.0.0.1"]

    ctx = make_ctx(tmp_path, [f"http://api.example.test:{server.port}/api/"])
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        assert (await cap.call(ctx, "fetch", {"url": f"http://api.example.test:{server.port}/api/hello"}))[
            "status"] == 200
    assert calls == ["api.example.test"]


# ----------------------------------------------------------------------------------------------
# the allow-list


@pytest.mark.parametrize("url", [
    "{base}/private/secret",  # path outside the prefix
    "{base}/apix",  # prefix is /api/: /apix is not under it
    "{base}/",
    "http://127.0.0.1:{other}/api/hello",  # other port
    "https://127.0.0.1:{port}/api/hello",  # other scheme
    "http://localhost:{port}/api/hello",  # other host (same address)
    "http://user@127.0.0.1:{port}/api/hello",  # userinfo
    "http://user:pw@127.0.0.1:{port}/api/hello",
    "http://127.0.0.1:{port}@evil.test/api/hello",
    "{base}/api/../private/secret",
    "{base}/api/./hello",
    "{base}/api/..",
    "{base}/api/%2e%2e/private/secret",
    "{base}/api/%2E%2E/private/secret",
    "{base}/api/.%2e/private/secret",
    "{base}/api/..%2fprivate",
    "{base}/api%2f..%2fprivate",
    "{base}/api/%252e%252e/private",
    "{base}/api/..;/private/secret",
    "{base}/api/hello%00",
    "{base}/api\\..\\private",
    "{base}/api/%5c..%5cprivate",
    "{base}/api/hel lo",
    "{base}/api/héllo",
    "{base}/api/%zz",
    "ftp://127.0.0.1:{port}/api/hello",
    "file:///etc/passwd",
    "//127.0.0.1:{port}/api/hello",
    "/api/hello",
    "http://127.0.0.1:{port}:80/api/hello",
    "http://127.0.0.1:0/api/hello",
    "http://127.0.0.1:99999/api/hello",
    "http://[::1]:{port}/api/hello",
    "http://2130706433:{port}/api/hello",
    "http://127.1:{port}/api/hello",
    "",
])
async def test_not_allow_listed_is_capability_denied(server, tmp_path, url):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    resolver = FakeResolver({})
    async with Cap(allow_internal=[base, f"http://[::1]:{server.port}"], resolver=resolver) as cap:
        e = await fetch_error(cap, ctx, url=url.format(base=base, port=server.port, other=server.port + 1))
    assert e.type == "CapabilityDenied", e.message
    assert resolver.calls == [] and server.requests == []


@pytest.mark.parametrize("rule,url,ok", [
    ("https://api.example.com/v1", "https://api.example.com/v1", True),
    ("https://api.example.com/v1", "https://api.example.com/v1/charges?x=1", True),
    ("https://api.example.com/v1", "https://api.example.com/v1?x=1", True),
    ("https://api.example.com/v1", "https://api.example.com/v10", False),
    ("https://api.example.com/v1/", "https://api.example.com/v1", False),
    ("https://api.example.com/v1/", "https://api.example.com/v1/x", True),
    ("https://api.example.com", "https://api.example.com", True),
    ("https://api.example.com", "https://API.EXAMPLE.COM:443/anything", True),
    ("https://api.example.com", "https://api.example.com:8443/", False),
    ("https://api.example.com", "http://api.example.com/", False),
    ("https://api.example.com", "https://api.example.com.evil.test/", False),
    ("https://api.example.com", "https://evil.test/api.example.com", False),
    ("https://api.example.com", "https://xapi.example.com/", False),
    ("http://h.test:8080/", "http://h.test:8080/a#frag", True),
    ("http://h.test/", "http://h.test:80/", True),
    ("HTTP://H.TEST/", "http://h.test/", True),
    ("http://h.test/?q=1", "http://h.test/?q=1", False),  # rules with a query match nothing
    ("http://[::1]:81/", "http://[0:0::1]:81/", True),
])
def test_allow_rules(rule, url, ok):
    assert allowed(parse_url(url), (rule,)) is ok


@pytest.mark.parametrize("entry", ["http://localhost:80", "127.0.0.1:80", "http://127.0.0.1:80/path",
                                   "http://127.0.0.1:80/?q", "tcp://127.0.0.1:80", "http://u@127.0.0.1:1", 5])
def test_allow_internal_must_be_scheme_ip_port(entry):
    with pytest.raises(ValueError):
        parse_internal([entry])


def test_allow_internal_parses():
    assert parse_internal(["http://127.0.0.1:8081", "https://[::1]:8443/", "http://10.0.0.1"]) == {
        ("http", ipaddress.ip_address("127.0.0.1"), 8081), ("https", ipaddress.ip_address("::1"), 8443),
        ("http", ipaddress.ip_address("10.0.0.1"), 80)}


@pytest.mark.parametrize("addr,bad", [
    ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False),
    ("64:ff9b::808:808", False), ("2002:808:808::1", False),
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.31.255.255", True), ("192.168.0.1", True),
    ("169.254.169.254", True), ("169.254.0.1", True), ("100.64.0.1", True), ("100.127.255.254", True),
    ("100.100.100.200", True), ("0.0.0.0", True), ("224.0.0.251", True), ("239.255.255.250", True),
    ("240.0.0.1", True), ("255.255.255.255", True), ("192.0.2.1", True), ("198.18.0.1", True),
    ("::1", True), ("::", True), ("fe80::1", True), ("fc00::1", True), ("fd00:ec2::254", True),
    ("fec0::1", True), ("ff02::1", True), ("::ffff:127.0.0.1", True), ("::ffff:169.254.169.254", True),
    ("64:ff9b::7f00:1", True), ("2002:a00:1::1", True), ("2001:db8::1", True), ("::127.0.0.1", True),
])
def test_address_policy(addr, bad):
    assert (address_problem(ipaddress.ip_address(addr)) is not None) is bad


@pytest.mark.parametrize("url", ["http://a_b.test/", "http://x.test:1/", "https://[2001:db8::1]/a;b=c/d?x=[1]|{2}"])
def test_parse_url_accepts(url):
    parse_url(url)


@pytest.mark.parametrize("url", ["http://a..b/", "http://-a.test/", "http://a.test./", "http://a%41.test/",
                                 "http://[fe80::1%25eth0]/", "http://" + "a" * 64 + ".test/",
                                 "http://a.test/" + "x" * 9000])
def test_parse_url_rejects(url):
    with pytest.raises(URLRejected):
        parse_url(url)


# ----------------------------------------------------------------------------------------------
# redirects


@pytest.fixture
def named(server, tmp_path):
    """A profile allowing api.example.test and rebind.test (fake DNS), the operator allowing loopback."""
    p = server.port
    ctx = make_ctx(tmp_path, [f"http://api.example.test:{p}/api/", f"http://rebind.test:{p}/api/"])
    resolver = FakeResolver({"api.example.test": ["127.0.0.1"], "elsewhere.test": ["127.0.0.1"],
                             "rebind.test": ["10.0.0.5"]})
    return ctx, resolver, f"http://api.example.test:{p}"


async def test_redirect_within_allow_list_is_followed(server, named):
    ctx, resolver, base = named
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/redirect-in"})
        assert r["status"] == 200 and r["body"] == "hello ✓"
        assert r["url"] == f"{base}/api/hello?from=redirect"
        assert server.paths() == ["/api/redirect-in", "/api/hello?from=redirect"]
        assert len(resolver.calls) == 2  # one lookup per request, each hop checked
        assert all(req["headers"]["host"] == f"api.example.test:{server.port}" for req in server.requests)
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/redirect-abs"})
        assert r["status"] == 200


@pytest.mark.parametrize("path,status", [
    ("/api/redirect-out", 302),  # another host
    ("/api/redirect-outside-prefix", 307),  # same host, outside the allowed prefix
    ("/api/redirect-internal", 302),  # allowed host, but it resolves to 10.0.0.5
    ("/api/redirect-dotdot", 302),  # traversal trick in Location
])
async def test_redirect_outside_allow_list_is_returned_not_followed(server, named, path, status):
    ctx, resolver, base = named
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}{path}"})
    assert r["status"] == status
    assert r["body"] == "moved" and "location" in r["headers"]
    assert server.paths() == [path]


async def test_redirects_stop_after_the_limit(server, named):
    ctx, resolver, base = named
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/loop"})
    assert r["status"] == 302
    assert len(server.requests) == MAX_REDIRECTS + 1
    assert r["headers"]["location"] == f"/api/loop/{MAX_REDIRECTS + 1}"


async def test_redirect_method_rules(server, named):
    ctx, resolver, base = named
    async with Cap(allow_internal=[f"http://127.0.0.1:{server.port}"], resolver=resolver) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/redirect-303", "method": "POST", "body": "data"})
        assert json.loads(r["body"])["method"] == "GET" and json.loads(r["body"])["body"] == ""
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/redirect-307", "method": "PUT", "body": "data"})
        assert json.loads(r["body"])["method"] == "PUT" and json.loads(r["body"])["body"] == "data"


# ----------------------------------------------------------------------------------------------
# caps and timeouts


async def test_body_truncated_at_the_cap(server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"], max_response="1000B")
    async with Cap(allow_internal=[base]) as cap:
        with trio.fail_after(5):
            r = await cap.call(ctx, "fetch", {"url": f"{base}/api/huge"})
        assert r["status"] == 200 and r["truncated"] is True and r["body"] == "x" * 1000
        small = make_ctx(tmp_path, [f"{base}/api/"], max_response="9B")  # "hello ✓" is exactly 9 bytes
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/hello"})
        r2 = await cap.call(small, "fetch", {"url": f"{base}/api/hello"})
        assert r["truncated"] is False and r2["truncated"] is False and r2["body"] == "hello ✓"
        tiny = make_ctx(tmp_path, [f"{base}/api/"], max_response="8B")  # cut inside the UTF-8 of ✓
        r3 = await cap.call(tiny, "fetch", {"url": f"{base}/api/hello"})
        assert r3["truncated"] is True and r3["body"].startswith("hello ") and r3["body"].endswith("\ufffd")


async def test_timeout(server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"], timeout="300ms")
    async with Cap(allow_internal=[base]) as cap:
        t0 = time.monotonic()
        e = await fetch_error(cap, ctx, url=f"{base}/api/slow")
        assert e.type == "Timeout"
        assert time.monotonic() - t0 < 2
        server.release.set()
        assert (await cap.call(ctx, "fetch", {"url": f"{base}/api/hello"}))["status"] == 200


async def test_timeout_covers_slow_dns(tmp_path):
    async def slow_resolver(host, port):  # a fake that never answers in time
        await trio.sleep(10)
        return ["127.0.0.1"]

    ctx = make_ctx(tmp_path, ["http://api.example.test/"], timeout="200ms")
    async with Cap(resolver=slow_resolver) as cap:
        assert (await fetch_error(cap, ctx, url="http://api.example.test/")).type == "Timeout"


# ----------------------------------------------------------------------------------------------
# request validation


async def test_methods_headers_and_body_reach_the_server(server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    async with Cap(allow_internal=[base]) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/echo", "method": "post",
                                          "headers": {"X-Token": "abc", "Content-Type": "application/json",
                                                      "User-Agent": "tenant/1"},
                                          "body": '{"a": "é"}'})
        echo = json.loads(r["body"])
        assert echo["method"] == "POST" and echo["body"] == '{"a": "é"}'
        assert echo["headers"]["x-token"] == "abc" and echo["headers"]["user-agent"] == "tenant/1"
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/hello", "method": "HEAD"})
        assert r["status"] == 200 and r["body"] == "" and r["truncated"] is False
        for m in ("PUT", "PATCH", "DELETE"):
            assert json.loads((await cap.call(ctx, "fetch", {"url": f"{base}/api/echo", "method": m}))["body"])[
                "method"] == m


@pytest.mark.parametrize("args", [
    {},
    {"url": 5},
    {"url": "{base}/api/hello", "method": "TRACE"},
    {"url": "{base}/api/hello", "method": "CONNECT"},
    {"url": "{base}/api/hello", "method": "GET\r\nX: y"},
    {"url": "{base}/api/hello", "method": 1},
    {"url": "{base}/api/hello", "headers": {"X-A": "b\r\nX-Injected: 1"}},
    {"url": "{base}/api/hello", "headers": {"X-A": "b\nc"}},
    {"url": "{base}/api/hello", "headers": {"X-A": "b\x00"}},
    {"url": "{base}/api/hello", "headers": {"X-A\r\nX-B": "c"}},
    {"url": "{base}/api/hello", "headers": {"X A": "c"}},
    {"url": "{base}/api/hello", "headers": {"": "c"}},
    {"url": "{base}/api/hello", "headers": {"X-A": 1}},
    {"url": "{base}/api/hello", "headers": {"X-A": "é"}},
    {"url": "{base}/api/hello", "headers": ["X-A", "b"]},
    {"url": "{base}/api/hello", "headers": {"Host": "evil.test"}},
    {"url": "{base}/api/hello", "headers": {"content-length": "5"}},
    {"url": "{base}/api/hello", "headers": {"Transfer-Encoding": "chunked"}},
    {"url": "{base}/api/hello", "headers": {"Connection": "close"}},
    {"url": "{base}/api/hello", "headers": {"Proxy-Foo": "x"}},
    {"url": "{base}/api/hello", "headers": {f"X-{i}": "v" for i in range(65)}},
    {"url": "{base}/api/hello", "method": "POST", "body": "x" * (1024 * 1024 + 1)},
    {"url": "{base}/api/hello", "method": "POST", "body": {"json": "object"}},
    {"url": "{base}/api/hello", "method": "POST", "body": "\ud800"},
    {"url": "{base}/api/hello", "follow": True},
])
async def test_bad_arguments(server, tmp_path, args):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    if isinstance(args.get("url"), str):
        args = {**args, "url": args["url"].format(base=base)}
    async with Cap(allow_internal=[base]) as cap:
        e = await fetch_error(cap, ctx, **args)
        assert e.type == "BadCall", e.message
        assert (await fetch_error(cap, ctx, url=f"{base}/api/hello", method="GET", body=None, x=1)).type == "BadCall"
        with pytest.raises(CapabilityError) as ei:
            await cap.call(ctx, "get", {"url": f"{base}/api/hello"})
        assert ei.value.type == "BadCall"
    assert server.requests == []


async def test_one_mebibyte_body_is_accepted(server, tmp_path):
    base = f"http://127.0.0.1:{server.port}"
    ctx = make_ctx(tmp_path, [f"{base}/api/"])
    async with Cap(allow_internal=[base]) as cap:
        r = await cap.call(ctx, "fetch", {"url": f"{base}/api/hello", "method": "POST", "body": "x" * 1024 * 1024})
    assert r["status"] == 200 and len(server.requests[0]["body"]) == 1024 * 1024


async def test_connection_refused_is_a_network_error(tmp_path):
    with Server() as s:
        port = s.port
    base = f"http://127.0.0.1:{port}"  # the server is gone: nothing listens there now
    ctx = make_ctx(tmp_path, [f"{base}/"])
    async with Cap(allow_internal=[base]) as cap:
        assert (await fetch_error(cap, ctx, url=f"{base}/x")).type == "NetworkError"


# ----------------------------------------------------------------------------------------------
# https: SNI and certificate checked against the original host name, connection to the pinned IP


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=api.example.test",
                    "-addext", "subjectAltName=DNS:api.example.test"], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


async def test_https_sni_and_certificate_use_the_original_name(cert, tmp_path):
    certfile, keyfile = cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certfile, keyfile)
    with Server(tls_context=server_ctx) as s:
        p = s.port
        ctx = make_ctx(tmp_path, [f"https://api.example.test:{p}/api/", f"https://other.example.test:{p}/api/"])
        resolver = FakeResolver({"api.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
        client_tls = ssl.create_default_context(cafile=certfile)
        async with Cap(allow_internal=[f"https://127.0.0.1:{p}"], resolver=resolver, ssl_context=client_tls) as cap:
            r = await cap.call(ctx, "fetch", {"url": f"https://api.example.test:{p}/api/hello"})
            assert r["status"] == 200 and r["body"] == "hello ✓"
            assert s.sni == ["api.example.test"]
            assert s.requests[0]["headers"]["host"] == f"api.example.test:{p}"
            # the same server, reached under a name its certificate does not carry: refused
            e = await fetch_error(cap, ctx, url=f"https://other.example.test:{p}/api/hello")
            assert e.type == "NetworkError" and "certificate" in e.message.lower(), e.message
            assert len(s.requests) == 1


async def test_cookies_are_never_kept_between_requests(server, tmp_path):
    """One client serves every tenant: a cookie set for tenant A must not ride along for tenant B."""
    base = f"http://127.0.0.1:{server.port}"
    a = make_ctx(tmp_path, [f"{base}/api/"], tenant="acme")
    b = make_ctx(tmp_path, [f"{base}/api/"], tenant="globex")
    async with Cap(allow_internal=[base]) as cap:
        r = await cap.call(a, "fetch", {"url": f"{base}/api/cookie"})
        assert r["headers"]["set-cookie"].startswith("session=")  # the tenant sees it
        await cap.call(b, "fetch", {"url": f"{base}/api/echo"})
        await cap.call(a, "fetch", {"url": f"{base}/api/echo"})
        assert len(cap.client.cookies) == 0
    assert all("cookie" not in req["headers"] for req in server.requests)
    assert all(req["headers"]["connection"] == "close" for req in server.requests)
