"""modules.http: outbound HTTP for a jail, through the host, allow-listed and pinned.

One method:
  fetch(url, method="GET", headers={}, body=null)
    -> {"status": int, "headers": {lowercase name: value}, "body": str, "truncated": bool,
        "url": final URL (differs from `url` after followed redirects)}

The checks, in order, for the first request and for every redirect hop:
 1. The URL is parsed strictly (ASCII, no userinfo, no fragment sent, valid percent-encoding) and must
    match one of the profile's `capabilities.http.allow` prefixes: same scheme, same host
    (case-insensitive, exact), same port (80/443 by default) and a path prefix on a segment boundary
    ("https://h/v1" allows /v1, /v1/x and /v1?q but not /v1x; a prefix ending in "/" is a plain
    prefix). Paths with "." or ".." segments (also "..;"), percent-encoded ".", "/", "\\", NUL or "%",
    or a backslash are refused: what the host matches must be what the server serves.
    Failure: CapabilityDenied.
 2. The host name is resolved on the host (trio getaddrinfo, or the injected resolver) exactly once
    per hop, and EVERY address is checked: loopback, private (RFC 1918, ULA), link-local,
    multicast, unspecified, reserved, shared CGNAT 100.64/10, site-local, non-global, cloud metadata
    (169.254.169.254, fd00:ec2::254, 100.100.100.200), and IPv4 embedded in IPv6 (mapped, NAT64,
    6to4) are refused, unless the operator's `allow_internal` (daemon config, never a tenant profile)
    lists that exact destination "scheme://IP:port". Failure: Forbidden.
 3. The request goes to the checked IP (pinned: a second DNS answer cannot switch it) with
    `Host: <original host[:port]>`, and for https with TLS SNI and certificate verification against
    the original host name. Connections are never reused between requests (no keep-alive pool), so a
    TLS session verified for one name never carries a request for another.

Redirects are not followed automatically; up to MAX_REDIRECTS are followed by hand when the Location
target passes steps 1 and 2, otherwise the 3xx response is returned as it is. One deadline
(`capabilities.http.timeout`) covers the whole fetch, redirects included: Timeout. The response body
is read as a stream and cut at `capabilities.http.max_response` (truncated=true); responses are
requested with `Accept-Encoding: identity` so the cap is on real bytes (a server that compresses
anyway is returned undecoded). Request bodies are at most 1 MiB, methods GET HEAD POST PUT PATCH
DELETE, header names are tokens and values printable ASCII; framing and routing headers (Host,
Content-Length, Transfer-Encoding, Connection, ...) are the host's and refused.

Error types: BadCall (malformed arguments), CapabilityDenied (not allow-listed), Forbidden (internal
address), Timeout, NetworkError (DNS failure, connection refused, TLS or protocol error).
"""

from __future__ import annotations

import functools
import http.cookiejar
import inspect
import ipaddress
import re
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, Union
from urllib.parse import urljoin

import httpx
import trio

from jailer.broker import CallContext, CapabilityError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[[str, int], Union[Sequence[str], Awaitable[Sequence[str]]]]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
MAX_REDIRECTS = 5
MAX_URL_CHARS = 8192
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADERS = 64
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
MAX_HEADERS_BYTES = 32 * 1024
MAX_ADDRESSES_TRIED = 4
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# Headers the host owns: framing, connection management, routing, encoding.
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
    "trailer", "proxy-connection", "proxy-authorization", "proxy-authenticate", "accept-encoding",
    "expect", "http2-settings",
})
# Dropped when a followed redirect changes origin (scheme, host or port).
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})

METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")
_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_PATH_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*$")
_QUERY_RE = re.compile(r"^(?:[\x21-\x7e]|%[0-9A-Fa-f]{2})*$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_BAD_ESCAPES = ("%2e", "%2f", "%5c", "%00", "%25")


class URLRejected(Exception):
    """The URL is not one jailer will fetch; `reason` says why (shown to the tenant)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lowercase name, or canonical IP text (IPv6 without brackets)
    port: int
    path: str  # raw (still percent-encoded), starts with "/"
    query: str  # raw, without "?"; "" for none

    @property
    def ip_literal(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> str:
        if self.port == DEFAULT_PORTS[self.scheme]:
            return self.host_for_url
        return f"{self.host_for_url}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def raw_target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.raw_target}"


# ----------------------------------------------------------------------------------------------
# URL parsing and the allow-list (pure functions, unit-tested directly)


def parse_url(url: str) -> Target:
    """Parse an absolute http(s) URL strictly; raise URLRejected with the reason."""
    if len(url) > MAX_URL_CHARS:
        raise URLRejected(f"URL longer than {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise URLRejected("URL must be ASCII without spaces or control characters (percent-encode the rest)")
    if "\\" in url:
        raise URLRejected("URL must not contain a backslash")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$", url)
    if not m:
        raise URLRejected("URL must look like http(s)://host[:port]/path")
    scheme, netloc, path, query = m.group(1).lower(), m.group(2), m.group(3), m.group(4) or ""
    if scheme not in DEFAULT_PORTS:
        raise URLRejected(f"scheme {scheme!r} is not http or https")
    if "@" in netloc:
        raise URLRejected("URLs with user information (user@host) are not allowed")
    host, port = _parse_netloc(netloc, scheme)
    if not path:
        path = "/"
    _check_path(path)
    if not _QUERY_RE.match(query):
        raise URLRejected("query has an invalid percent-encoding")
    return Target(scheme, host, port, path, query)


def _parse_netloc(netloc: str, scheme: str) -> tuple[str, int]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise URLRejected("unterminated IPv6 address in URL")
        literal, rest = netloc[1:end], netloc[end + 1:]
        if "%" in literal:
            raise URLRejected("IPv6 zone ids are not allowed in URLs")
        try:
            ip = ipaddress.IPv6Address(literal)
        except ValueError:
            raise URLRejected("invalid IPv6 address in URL") from None
        host = str(ip)
        if rest and not rest.startswith(":"):
            raise URLRejected("invalid text after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        if netloc.count(":") > 1:
            raise URLRejected("invalid host:port in URL (IPv6 addresses go in brackets)")
        host, sep, port_text = netloc.partition(":")
        if not sep:
            port_text = None
        host = host.lower()
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not host or len(host) > 253 or not all(_LABEL_RE.match(label) for label in host.split(".")):
                raise URLRejected(f"invalid host name {host[:100]!r}") from None
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    else:
        if not _PORT_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
            raise URLRejected(f"invalid port {port_text[:10]!r}")
        port = int(port_text)
    return host, port


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise URLRejected("path must start with /")
    if not _PATH_RE.match(path):
        raise URLRejected("path has a character that must be percent-encoded, or an invalid percent-encoding")
    lower = path.lower()
    for esc in _BAD_ESCAPES:
        if esc in lower:
            raise URLRejected(f"path contains {esc!r} (a percent-encoded dot, slash, backslash, NUL or percent)")
    for segment in path.split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            raise URLRejected("path has a '.' or '..' segment")


@dataclass(frozen=True)
class AllowRule:
    scheme: str
    host: str
    port: int
    path: str

    def matches(self, t: Target) -> bool:
        if (t.scheme, t.host, t.port) != (self.scheme, self.host, self.port):
            return False
        if self.path.endswith("/"):
            return t.path.startswith(self.path)
        return t.path == self.path or t.path.startswith(self.path + "/")


@functools.lru_cache(maxsize=256)
def parse_allow(allow: tuple[str, ...]) -> tuple[AllowRule, ...]:
    """Profile allow-list prefixes -> rules. An entry that does not parse cleanly (or carries a query
    or fragment) matches nothing: fail closed."""
    rules = []
    for entry in allow:
        if not isinstance(entry, str) or "?" in entry or "#" in entry:
            continue
        try:
            t = parse_url(entry)
        except URLRejected:
            continue
        rules.append(AllowRule(t.scheme, t.host, t.port, t.path))
    return tuple(rules)


def allowed(target: Target, allow: tuple[str, ...]) -> bool:
    return any(rule.matches(target) for rule in parse_allow(tuple(allow)))


# ----------------------------------------------------------------------------------------------
# addresses


def address_problem(ip: IPAddress) -> str | None:
    """Why this destination address is internal, or None if it is a public unicast address."""
    if ip in METADATA:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_problem(embedded)
            return f"{why} (IPv4 {embedded} inside IPv6)" if why else None
        if ip.sixtofour is not None:
            # Decided by the embedded IPv4 (Python < 3.11.10 calls all of 2002::/16 private).
            why = address_problem(ip.sixtofour)
            return f"{why} (IPv4 {ip.sixtofour} inside a 6to4 address)" if why else None
        if ip.is_site_local:
            return "a site-local address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT:
        return "a shared (CGNAT) address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-global address"
    return None


def parse_internal(entries: Sequence[str]) -> frozenset[tuple[str, IPAddress, int]]:
    """Operator's allow_internal: exact "scheme://IP:port" destinations. Raises ValueError."""
    out = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"allow_internal: expected a string, got {entry!r}")
        try:
            t = parse_url(entry)
        except URLRejected as e:
            raise ValueError(f"allow_internal: {entry!r}: {e.reason}") from None
        ip = t.ip_literal
        if ip is None or t.path != "/" or t.query or "?" in entry or "#" in entry:
            raise ValueError(f"allow_internal: {entry!r} must be exactly scheme://IP:port "
                             "(an IP address, no path), e.g. http://127.0.0.1:8081")
        out.add((t.scheme, ip, t.port))
    return frozenset(out)


# ----------------------------------------------------------------------------------------------
# the capability


class _NoCookies(http.cookiejar.CookiePolicy):
    netscape = True
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: Any) -> bool:
        return False

    def path_return_ok(self, path: str, request: Any) -> bool:
        return False


class HttpCapability:
    name = "http"

    def __init__(self, allow_internal: Sequence[str] = (), resolver: Resolver | None = None, *,
                 max_connections: int = 64, ssl_context: ssl.SSLContext | None = None):
        """`allow_internal`: the daemon config's exact internal destinations ("scheme://IP:port").
        `resolver(host, port) -> [ip, ...]` (sync or async) replaces DNS, for tests.
        `ssl_context`: certificate verification settings (default: certifi's CA bundle)."""
        self.allow_internal = parse_internal(allow_internal)
        self.resolver = resolver
        self.client = httpx.AsyncClient(
            trust_env=False,  # never a proxy from the environment: it would defeat pinning
            follow_redirects=False,
            verify=ssl_context if ssl_context is not None else True,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
            headers={"User-Agent": "jailer-http/1", "Accept-Encoding": "identity", "Connection": "close"},
            # The client is shared by every tenant: it must never remember a response's cookies.
            cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def call(self, ctx: CallContext, method: str, args: dict[str, Any]) -> Any:
        if method != "fetch":
            raise CapabilityError("BadCall", f"http.{str(method)[:64]}: unknown method (use fetch)")
        if not isinstance(args, dict):
            raise CapabilityError("BadCall", "http.fetch: args must be an object")
        unknown = set(args) - {"url", "method", "headers", "body"}
        if unknown:
            names = ", ".join(sorted(repr(str(k)[:64]) for k in unknown)[:5])
            raise CapabilityError("BadCall", f"http.fetch: unknown argument(s) {names} "
                                             "(allowed: url, method, headers, body)")
        url = args.get("url")
        if not isinstance(url, str):
            raise CapabilityError("BadCall", "http.fetch: url must be a string")
        verb = _method(args.get("method"))
        headers = _headers(args.get("headers"))
        body = _body(args.get("body"))

        cfg = ctx.profile.capabilities.http
        try:
            target = parse_url(url)
        except URLRejected as e:
            raise CapabilityError("CapabilityDenied", f"http.fetch: {e.reason}") from None
        if not allowed(target, cfg.allow):
            raise CapabilityError("CapabilityDenied", f"http.fetch: {target} does not match the tenant's allow-list")

        with trio.move_on_after(cfg.timeout_s) as scope:
            try:
                return await self._fetch(target, verb, headers, body, cfg)
            except httpx.TimeoutException:
                scope.cancel()
            except httpx.HTTPError as e:
                raise CapabilityError("NetworkError", f"http.fetch: {_describe(e)}") from None
        raise CapabilityError("Timeout", f"http.fetch: no complete response within {cfg.timeout_s:g}s")

    async def _fetch(self, target: Target, verb: str, headers: list[tuple[str, str]], body: bytes | None,
                     cfg: Any) -> dict:
        addresses = await self._resolve_checked(target)
        hops = 0
        while True:
            resp = await self._send(target, addresses, verb, headers, body, cfg.timeout_s)
            try:
                if resp.status_code in REDIRECT_STATUSES and hops < MAX_REDIRECTS:
                    nxt = await self._redirect(target, resp.headers.get("location"), cfg.allow)
                    if nxt is not None:
                        new_target, addresses = nxt
                        hops += 1
                        if (resp.status_code == 303 and verb != "HEAD") or (
                                resp.status_code in (301, 302) and verb == "POST"):
                            verb, body = "GET", None
                        if new_target.origin != target.origin:
                            headers = [(k, v) for k, v in headers if k.lower() not in CREDENTIAL_HEADERS]
                        target = new_target
                        continue
                return await _read(resp, target, cfg.max_response_bytes, verb)
            finally:
                await resp.aclose()

    async def _redirect(self, current: Target, location: str | None,
                        allow: tuple[str, ...]) -> tuple[Target, list[IPAddress]] | None:
        """The next hop if Location passes the allow-list and address checks, else None."""
        if not location:
            return None
        try:
            nxt = parse_url(urljoin(str(current), location.strip()))
        except (URLRejected, ValueError):
            return None
        if not allowed(nxt, allow):
            return None
        try:
            return nxt, await self._resolve_checked(nxt)
        except CapabilityError:
            return None

    async def _resolve_checked(self, target: Target) -> list[IPAddress]:
        """Every address of the host, each one allowed; raises Forbidden or NetworkError."""
        literal = target.ip_literal
        if literal is not None:
            addresses = [literal]
        else:
            try:
                answer = await self._resolve(target.host, target.port)
            except OSError as e:
                raise CapabilityError("NetworkError", f"http.fetch: cannot resolve {target.host}: {e}") from None
            addresses = []
            for a in answer:
                try:
                    addresses.append(ipaddress.ip_address(str(a).split("%", 1)[0]))
                except ValueError:
                    raise CapabilityError("Forbidden", f"http.fetch: {target.host} resolved to an invalid "
                                                       "address") from None
            if not addresses:
                raise CapabilityError("NetworkError", f"http.fetch: {target.host} has no address")
        for ip in addresses:
            why = address_problem(ip)
            if why and (target.scheme, ip, target.port) not in self.allow_internal:
                raise CapabilityError(
                    "Forbidden",
                    f"http.fetch: {target.host} resolves to {ip}, {why}; internal destinations are refused "
                    "unless the operator's allow_internal lists them")
        # Unique, in resolver order.
        return list(dict.fromkeys(addresses))

    async def _resolve(self, host: str, port: int) -> list[str]:
        if self.resolver is not None:
            result = self.resolver(host, port)
            if inspect.isawaitable(result):
                result = await result
            return list(result)
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        return [info[4][0] for info in infos]

    async def _send(self, target: Target, addresses: list[IPAddress], verb: str,
                    headers: list[tuple[str, str]], body: bytes | None, timeout_s: float) -> httpx.Response:
        """Send to the checked addresses in turn (only a refused connection moves on)."""
        last: Exception | None = None
        for ip in addresses[:MAX_ADDRESSES_TRIED]:
            url = httpx.URL(scheme=target.scheme, host=str(ip), port=target.port,
                            raw_path=target.raw_target.encode("ascii"))
            request = self.client.build_request(
                verb, url, headers=[("Host", target.host_header), *headers], content=body,
                timeout=httpx.Timeout(timeout_s), extensions={"sni_hostname": target.host})
            try:
                return await self.client.send(request, stream=True)
            except httpx.ConnectError as e:
                last = e
        assert last is not None
        raise last


async def _read(resp: httpx.Response, target: Target, cap: int, verb: str) -> dict:
    chunks: list[bytes] = []
    size = 0
    truncated = False
    if verb != "HEAD":
        async for chunk in resp.aiter_raw():
            if size + len(chunk) > cap:
                chunks.append(chunk[: cap - size])
                size = cap
                truncated = True
                break
            chunks.append(chunk)
            size += len(chunk)
    headers: dict[str, str] = {}
    for k, v in resp.headers.multi_items():
        k = k.lower()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return {
        "status": resp.status_code,
        "headers": headers,
        "body": b"".join(chunks).decode("utf-8", errors="replace"),
        "truncated": truncated,
        "url": str(target),
    }


def _describe(e: BaseException) -> str:
    """A short reason for a transport failure: the innermost cause that says something (TLS errors
    arrive wrapped, with an empty message on the outside)."""
    parts = []
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(parts) < 6:
        seen.add(id(cur))
        text = getattr(cur, "verify_message", None) or getattr(cur, "reason", None) or str(cur)
        if isinstance(cur, ssl.SSLCertVerificationError):
            text = f"TLS certificate verify failed: {cur.verify_message}"
        if text and isinstance(text, str) and text not in parts:
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    reason = "; ".join(parts[-2:]) if parts else ""
    return f"{type(e).__name__}: {reason}"[:300]


# ----------------------------------------------------------------------------------------------
# argument validation (every argument is hostile input)


def _method(m: Any) -> str:
    if m is None:
        return "GET"
    if not isinstance(m, str) or m.upper() not in METHODS:
        raise CapabilityError("BadCall", f"http.fetch: method must be one of {', '.join(METHODS)}")
    return m.upper()


def _headers(h: Any) -> list[tuple[str, str]]:
    if h is None:
        return []
    if not isinstance(h, dict):
        raise CapabilityError("BadCall", "http.fetch: headers must be an object of name: value strings")
    if len(h) > MAX_HEADERS:
        raise CapabilityError("BadCall", f"http.fetch: more than {MAX_HEADERS} headers")
    out = []
    total = 0
    for name, value in h.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_HEADER_NAME or not _TOKEN_RE.match(name):
            raise CapabilityError("BadCall", f"http.fetch: invalid header name {str(name)[:64]!r}")
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("proxy-"):
            raise CapabilityError("BadCall", f"http.fetch: header {name!r} is set by the host, not the tenant")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE or not _VALUE_RE.match(value):
            raise CapabilityError("BadCall", f"http.fetch: header {name!r}: the value must be a string of "
                                             f"printable ASCII (no CR, LF or NUL), at most {MAX_HEADER_VALUE}")
        total += len(name) + len(value) + 4
        out.append((name, value))
    if total > MAX_HEADERS_BYTES:
        raise CapabilityError("BadCall", f"http.fetch: headers exceed {MAX_HEADERS_BYTES} bytes")
    return out


def _body(b: Any) -> bytes | None:
    if b is None:
        return None
    if not isinstance(b, str):
        raise CapabilityError("BadCall", "http.fetch: body must be a string or null")
    try:
        data = b.encode("utf-8")
    except UnicodeEncodeError:
        raise CapabilityError("BadCall", "http.fetch: body is not valid Unicode (lone surrogate)") from None
    if len(data) > MAX_BODY_BYTES:
        raise CapabilityError("BadCall", f"http.fetch: body is {len(data)} bytes, more than {MAX_BODY_BYTES}")
    return data
