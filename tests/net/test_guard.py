"""The SSRF guard: schemes, literal addresses, names that resolve inside, redirect hops, rebinding."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from yarl import URL

from curate.net.guard import BlockedAddressError, BlockedURLError, Guard, GuardedResolver
from tests.net.conftest import fetch
from tests.net.hostile_server import GOOD_JPEG

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("ip", [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1",
])
def test_non_public_addresses_are_blocked(ip):
    assert Guard().blocked_ip(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip):
    assert not Guard().blocked_ip(ip)


def test_disabled_guard_and_allowed_networks():
    assert not Guard(enabled=False).blocked_ip("127.0.0.1")
    g = Guard(allowed_networks=["127.0.0.1/32"])
    assert not g.blocked_ip("127.0.0.1") and g.blocked_ip("127.0.0.2") and g.blocked_ip("::1")


@pytest.mark.parametrize("url,reason", [
    ("file:///etc/passwd", "bad_scheme"),
    ("ftp://example.com/a.jpg", "bad_scheme"),
    ("gopher://example.com/", "bad_scheme"),
    ("http://127.0.0.1/a.jpg", "private_address"),
    ("http://169.254.169.254/latest/meta-data/", "private_address"),
    ("http://[::1]:8080/a.jpg", "private_address"),
    ("http://[::ffff:10.0.0.1]/a.jpg", "private_address"),
])
def test_check_url_refuses(url, reason):
    with pytest.raises(BlockedURLError) as e:
        Guard().check_url(URL(url))
    assert e.value.reason == reason


def test_scheme_check_applies_even_without_the_address_guard():
    with pytest.raises(BlockedURLError):
        Guard(enabled=False).check_url(URL("file:///etc/passwd"))
    Guard(enabled=False).check_url(URL("http://127.0.0.1/"))


# ------------------------------------------------------------ through the fetcher (real server on 127.0.0.1)


def test_guard_refuses_loopback_server_by_default(server):
    url = server.url("/static/good.jpg")
    assert fetch(url, allow_private_networks=False).error == "private_address"
    assert "/static/good.jpg" not in server.hits  # refused before any connection
    assert fetch(url, allow_private_networks=True).body == GOOD_JPEG


def test_guard_refuses_metadata_address_without_connecting():
    t0 = time.monotonic()
    r = fetch("http://169.254.169.254/latest/meta-data/", allow_private_networks=False, timeout=5.0)
    assert r.error == "private_address"
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg"])
def test_guard_refuses_other_schemes(url):
    assert fetch(url, allow_private_networks=False).error == "bad_scheme"


def test_host_name_resolving_to_loopback_is_refused(server):
    r = fetch(f"http://localhost:{server.port}/static/good.jpg", allow_private_networks=False)
    assert r.error == "private_address"


def test_redirect_to_a_private_address_is_refused_at_the_hop(server):
    """The first hop is allowed (127.0.0.1 exempted), the redirect target is not."""
    allowed = ("127.0.0.1/32",)
    hop = server.url(f"/redirect?to=http://127.0.0.2:{server.port}/static/good.jpg")
    r = fetch(hop, allow_private_networks=False, allowed_networks=allowed)
    assert r.error == "private_address"
    # control: the same server reached on an allowed address works, so the refusal came from the guard
    ok = server.url(f"/redirect?to=http://127.0.0.1:{server.port}/static/good.jpg")
    assert fetch(ok, allow_private_networks=False, allowed_networks=allowed).body == GOOD_JPEG
    meta = server.url("/redirect?to=http://169.254.169.254/latest/meta-data/")
    assert fetch(meta, allow_private_networks=False, allowed_networks=allowed).error == "private_address"


def test_connection_goes_only_to_checked_addresses(server):
    """A name whose DNS answer is private is refused; the connector never gets another answer to use."""
    calls = []

    def rebinding_dns(host, port, *args):
        calls.append(host)
        ip = "127.0.0.1" if len(calls) > 1 else "127.0.0.2"  # changes its answer between lookups
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    url = f"http://images.example.test:{server.port}/static/good.jpg"
    r = fetch(url, lookup=rebinding_dns, allow_private_networks=False, allowed_networks=("127.0.0.1/32",))
    assert r.error == "private_address"
    assert calls == ["images.example.test"]  # one lookup per host (cached), and it was the refused one


def test_resolver_caches_and_refuses():
    calls = []

    def dns(host, port, *args):
        calls.append(host)
        ip = {"public.test": "93.184.216.34", "inside.test": "10.0.0.7"}[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    async def go():
        res = GuardedResolver(Guard(), ttl=60, lookup=dns)
        a = await asyncio.gather(*(res.resolve("public.test", 80) for _ in range(5)))
        with pytest.raises(BlockedAddressError):
            await res.resolve("inside.test", 80)
        with pytest.raises(BlockedAddressError):
            await res.resolve("inside.test", 80)
        return a

    results = asyncio.run(go())
    assert all(r[0]["host"] == "93.184.216.34" for r in results)
    assert calls == ["public.test", "inside.test"]  # concurrent lookups shared; refusals cached
