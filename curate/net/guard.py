"""SSRF guard: refuse URLs that would make a worker talk to its own machine or network.

A URL list is untrusted input. Without a guard, a row such as
``http://169.254.169.254/latest/meta-data/`` (the cloud metadata service) or
``http://10.0.0.5:8080/admin`` makes a download worker fetch from inside the
cluster, and the response lands in the output shards. The guard refuses:

- schemes other than ``http`` and ``https`` (``file://``, ``ftp://``, ``gopher://``…);
- any host whose address is loopback, private, link-local (169.254.0.0/16, fe80::/10),
  multicast, reserved, unspecified or otherwise not globally routable —
  including IPv4 addresses embedded in IPv6 (``::ffff:127.0.0.1``, NAT64).

Literal IPs are checked before the request; host names are checked by
:class:`GuardedResolver`, the resolver the HTTP connector uses, so the
addresses checked are exactly the addresses connected to (a DNS answer that
changes between a check and the connect — "DNS rebinding" — cannot slip through).
Every redirect hop goes through the same checks.

>>> Guard().blocked_ip("169.254.169.254")
True
>>> Guard(allowed_networks=["10.0.0.0/8"]).blocked_ip("10.1.2.3")
False
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = frozenset({"http", "https"})
#: NAT64 well-known prefix: the low 32 bits are an IPv4 address that must be checked too.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedURLError(Exception):
    """A URL the guard refuses; ``reason`` is the ledger reason (``bad_scheme``, ``private_address``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class BlockedAddressError(OSError):
    """Raised by the resolver for a host that resolves to a refused address.

    An ``OSError`` so aiohttp wraps it like any resolver failure (``ClientConnectorDNSError``);
    the fetcher finds it again through ``__cause__``.
    """


class Guard:
    """Decides which schemes and addresses a download may reach.

    ``enabled=False`` (``allow_private_networks: true``) lifts the address checks; the
    scheme check always applies. ``allowed_networks`` exempts CIDRs, e.g. an internal mirror.
    """

    def __init__(self, *, enabled: bool = True, allowed_networks: Iterable[str] = ()) -> None:
        self.enabled = enabled
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def blocked_ip(self, ip: str | IPAddress) -> bool:
        """True if connecting to ``ip`` is refused."""
        if not self.enabled:
            return False
        addr = ipaddress.ip_address(ip.split("%", 1)[0]) if isinstance(ip, str) else ip
        if any(addr in net for net in self.allowed if net.version == addr.version):
            return False
        return _not_public(addr)

    def check_url(self, url: URL) -> None:
        """Refuse a bad scheme, a missing host, or a literal IP host that is not public."""
        if url.scheme not in ALLOWED_SCHEMES:
            raise BlockedURLError("bad_scheme", f"{url.scheme or '(none)'}:// is not http(s)")
        host = url.raw_host
        if not host:
            raise BlockedURLError("bad_url", "no host")
        if not self.enabled:
            return
        try:
            addr = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        if self.blocked_ip(addr):
            raise BlockedURLError("private_address", f"{host} is not a public address")


def _not_public(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return _not_public(addr.ipv4_mapped)
        if addr in _NAT64:
            return _not_public(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr.sixtofour is not None and _not_public(addr.sixtofour):
            return True
    return (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or not addr.is_global
    )


# ---------------------------------------------------------------- resolver

Lookup = Callable[..., list[tuple[Any, ...]]]

#: How long a failed lookup (NXDOMAIN) is remembered: dead domains recur across a URL list,
#: but a short memory lets a domain that comes back be retried within a run.
NEGATIVE_TTL_S = 60.0
#: Cached host names per worker; beyond this the oldest entries are forgotten.
MAX_CACHED_HOSTS = 100_000


class GuardedResolver(AbstractResolver):
    """aiohttp resolver with a per-worker DNS cache and the SSRF address check.

    Lookups run ``getaddrinfo`` in ``executor`` (many threads: a lookup mostly waits).
    Answers are cached for ``ttl`` seconds and concurrent lookups of one host share one
    query. When the guard is on, a host with any refused address is refused as a whole.
    ``lookup`` replaces ``socket.getaddrinfo`` (tests use it to play a rebinding DNS).
    """

    def __init__(self, guard: Guard, *, ttl: float, executor: Executor | None = None,
                 lookup: Lookup = socket.getaddrinfo) -> None:
        self.guard = guard
        self.ttl = ttl
        self.executor = executor
        self.lookup = lookup
        self._cache: dict[tuple[str, int, int], tuple[float, list[ResolveResult] | OSError]] = {}
        self._inflight: dict[tuple[str, int, int], asyncio.Future[list[ResolveResult]]] = {}

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        key = (host, port, int(family))
        hit = self._cache.get(key)
        if hit is not None:
            expires, value = hit
            if expires > time.monotonic():
                if isinstance(value, OSError):
                    raise type(value)(*value.args)  # a fresh exception: a cached one would grow its traceback
                return value
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            # The lookup is its own task: a caller that times out does not cancel it for the others.
            task = asyncio.ensure_future(self._lookup(host, port, int(family)))
            self._inflight[key] = task
            task.add_done_callback(lambda t: (self._inflight.pop(key, None),
                                              t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _lookup(self, host: str, port: int, family: int) -> list[ResolveResult]:
        key = (host, port, family)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.run_in_executor(
                self.executor, self.lookup, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                self._remember(key, e, NEGATIVE_TTL_S)
            raise
        results: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            ip = address[0]
            if self.guard.blocked_ip(ip):
                err = BlockedAddressError(f"{host} resolves to {ip}, which is not a public address")
                self._remember(key, err, self.ttl)
                raise err
            if fam == socket.AF_INET6 and len(address) >= 4 and address[3]:
                continue  # scoped (link-local) IPv6: not reachable by name from a worker
            results.append({"hostname": host, "host": ip, "port": port, "family": fam, "proto": proto,
                            "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        if not results:
            raise OSError(f"{host}: no usable address")
        self._remember(key, results, self.ttl)
        return results

    def _remember(self, key: tuple[str, int, int], value: list[ResolveResult] | OSError, ttl: float) -> None:
        if len(self._cache) >= MAX_CACHED_HOSTS:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (time.monotonic() + ttl, value)

    async def close(self) -> None:
        self._cache.clear()
