"""The HTTP layer of the download stage: asyncio + aiohttp, with limits that make it never hang.

One :class:`Fetcher` per worker holds one aiohttp session (connection pool,
per-host cap, the guarded DNS cache) for the worker's life. ``fetch(url)``
never raises for a bad URL or a bad server: it returns a :class:`FetchResult`
whose ``error`` is a ledger reason.

What bounds one download:

- a **total deadline per attempt** (``timeout``) over DNS, connect, every redirect
  hop, headers and body — a server that drips one byte a second or never answers
  costs at most the deadline (img2dataset's socket timeout is per read, so a drip
  never ends there);
- a **body cap** (``max_bytes``), checked against ``Content-Length`` before reading
  and against the bytes actually read;
- **redirects done by hand** (``max_redirects``), each hop re-checked by the
  SSRF guard; a URL seen twice in one chain is ``redirect_loop``;
- **retries** only for transient failures (timeouts, 429, 5xx), with exponential
  backoff; a ``Retry-After`` is honoured up to the deadline.

Example::

    async with Fetcher(FetchOptions(timeout=5)) as f:
        r = await f.fetch("https://example.com/cat.jpg")
        r.body, r.status, r.error   # bytes | None, int | None, reason | None
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from curate import __version__
from curate.net.guard import BlockedAddressError, BlockedURLError, Guard, GuardedResolver, Lookup

log = logging.getLogger(__name__)

T = TypeVar("T")

#: img2dataset's default directives: the opt-outs that image/AI crawlers are asked to honour.
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
#: img2dataset's default per-download timeout.
DEFAULT_TIMEOUT_S = 10.0
#: A body larger than this is dropped (``too_large``) as soon as it is, while large photographs stay.
#: A worker buffers at most concurrency × max_bytes (256 × 20 MiB = 5 GiB if every download in flight
#: were that large; web images average a few hundred KB: ~25-130 MB); lower either for a hostile list.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: aiohttp's and most browsers' order of magnitude; real image URLs rarely need more than 3.
DEFAULT_MAX_REDIRECTS = 10
#: Downloads in flight per worker, img2dataset's default thread count. By Little's law a worker
#: downloads at most concurrency / latency images a second: at 64 and a web-like 227 ms mean reply a
#: worker is capped near 280 images/s, below what one fast core decodes and resizes (2 CPUs, lognormal
#: replies with a 200 ms median: 432 images/s at 64, 532-560 at 256, 565 at 512); on loopback 256 costs
#: nothing either (703 / 760 / 768 images/s at 64 / 256 / 512; README, Benchmarks).
DEFAULT_CONCURRENCY = 256
#: Connections to one host per worker: politeness towards one CDN without serialising it.
DEFAULT_PER_HOST = 16
#: DNS answers are kept this long: URL lists repeat hosts heavily, and a lookup is a round trip.
DEFAULT_DNS_TTL_S = 300.0
#: Threads for blocking getaddrinfo calls: lookups mostly wait, so many threads are cheap.
DNS_THREADS = 32
#: First retry waits this long; each further retry doubles it.
DEFAULT_RETRY_BACKOFF_S = 1.0
#: Bytes per body read; aiohttp hands over whatever has arrived, up to this.
READ_CHUNK = 1 << 16
#: Servers with large cookies exceed aiohttp's 8 KiB header-field default; allow 4x.
MAX_FIELD_SIZE = 32768
MAX_LINE_SIZE = 16384

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
#: Reasons worth another attempt: the same request may well succeed a moment later.
TRANSIENT = frozenset({"timeout", "http_429"})

#: Formats OpenCV decodes fast first: a server that negotiates must not pick AVIF for us.
ACCEPT = "image/webp,image/jpeg,image/png,image/*;q=0.8,*/*;q=0.5"
BASE_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def user_agent(token: str | None) -> str:
    """The User-Agent header: a browser string, plus ``token`` so sites can address us (as img2dataset)."""
    if not token:
        return BASE_USER_AGENT
    return f"{BASE_USER_AGENT} (compatible; {token}; curate/{__version__})"


def is_transient(reason: str | None) -> bool:
    return reason is not None and (reason in TRANSIENT or reason.startswith("http_5"))


def disallowed_directive(values: Iterable[str], user_agent_token: str | None,
                         directives: frozenset[str]) -> str | None:
    """The first opt-out directive in ``X-Robots-Tag`` header values that applies to us, or None.

    Same rules as img2dataset's ``is_disallowed``: a value is ``directives`` (applies to
    every crawler) or ``token: directives`` (applies only when ``token`` is our
    ``user_agent_token``); directives are comma-separated and case-insensitive.

    >>> disallowed_directive(["otherbot: noai", "noimageai"], None, frozenset({"noai", "noimageai"}))
    'noimageai'
    """
    token = user_agent_token.strip().lower() if user_agent_token else None
    for value in values:
        parts = value.split(":", 1)
        ua = parts[0].strip().lower() if len(parts) == 2 else None
        if ua is not None and ua != token:
            continue
        for d in parts[-1].split(","):
            d = d.strip().lower()
            if d in directives:
                return d
    return None


@dataclass(frozen=True)
class FetchOptions:
    """HTTP settings of one worker. See the download stage for what each one means to a user."""

    timeout: float = DEFAULT_TIMEOUT_S
    retries: int = 0
    retry_backoff: float = DEFAULT_RETRY_BACKOFF_S
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    user_agent_token: str | None = None
    disallowed_header_directives: frozenset[str] = frozenset(DEFAULT_DISALLOWED_DIRECTIVES)
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    concurrency: int = DEFAULT_CONCURRENCY
    per_host: int = DEFAULT_PER_HOST
    dns_ttl: float = DEFAULT_DNS_TTL_S


@dataclass
class FetchResult:
    """One download's outcome. ``error`` is None on success, else a ledger reason."""

    url: str
    body: bytes | None = None
    status: int | None = None
    error: str | None = None
    final_url: str | None = None
    attempts: int = 0
    content_type: str | None = None
    detail: str | None = field(default=None, repr=False)


class _Failure(Exception):
    """A download that ends with a ledger reason (internal to the fetcher)."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None,
                 detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.detail = detail


class Fetcher:
    """Downloads URLs on one event loop; use ``async with`` (the session lives inside the loop)."""

    def __init__(self, options: FetchOptions, *, lookup: Lookup | None = None) -> None:
        self.options = options
        self.guard = Guard(enabled=not options.allow_private_networks, allowed_networks=options.allowed_networks)
        self._lookup = lookup
        self._session: aiohttp.ClientSession | None = None
        self._dns_pool: ThreadPoolExecutor | None = None
        self._headers = {"User-Agent": user_agent(options.user_agent_token), "Accept": ACCEPT}

    async def __aenter__(self) -> Fetcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        o = self.options
        self._dns_pool = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="curate-dns")
        kwargs = {"lookup": self._lookup} if self._lookup is not None else {}
        resolver = GuardedResolver(self.guard, ttl=o.dns_ttl, executor=self._dns_pool, **kwargs)
        connector = aiohttp.TCPConnector(limit=o.concurrency, limit_per_host=o.per_host, resolver=resolver,
                                         use_dns_cache=False, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None), headers=self._headers,
            max_field_size=MAX_FIELD_SIZE, max_line_size=MAX_LINE_SIZE, auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dns_pool is not None:
            self._dns_pool.shutdown(wait=False, cancel_futures=True)
            self._dns_pool = None

    async def fetch(self, url: str) -> FetchResult:
        """Download ``url`` with retries; always returns (never raises for network trouble)."""
        o = self.options
        attempt = 0
        while True:
            attempt += 1
            result, retry_after = await self._attempt(url)
            result.attempts = attempt
            if result.error is None or attempt > o.retries or not is_transient(result.error):
                return result
            wait = o.retry_backoff * (2 ** (attempt - 1)) * (1 + 0.25 * random.random())
            if retry_after is not None:
                wait = max(wait, min(retry_after, o.timeout))
            log.debug("retry %s in %.2fs after %s", url, wait, result.error)
            await asyncio.sleep(wait)

    async def _attempt(self, url: str) -> tuple[FetchResult, float | None]:
        try:
            async with asyncio.timeout(self.options.timeout):
                return await self._follow(url), None
        except TimeoutError:
            return FetchResult(url, error="timeout"), None
        except _Failure as f:
            return FetchResult(url, error=f.reason, status=f.status, detail=f.detail), f.retry_after
        except BlockedURLError as e:
            return FetchResult(url, error=e.reason, detail=str(e)), None
        except aiohttp.ClientConnectorDNSError as e:
            reason = "private_address" if isinstance(e.__cause__, BlockedAddressError) else "dns_error"
            return FetchResult(url, error=reason, detail=str(e.__cause__ or e)), None
        except (aiohttp.InvalidURL, ValueError) as e:
            return FetchResult(url, error="bad_url", detail=str(e)), None
        except aiohttp.ClientResponseError as e:  # malformed status line or headers
            return FetchResult(url, error="protocol_error", detail=str(e)), None
        except (aiohttp.ClientError, OSError) as e:  # refused, reset, TLS, disconnect mid-body
            return FetchResult(url, error="connect_error", detail=f"{type(e).__name__}: {e}"), None

    async def _follow(self, url: str) -> FetchResult:
        assert self._session is not None, "Fetcher used outside `async with`"
        o = self.options
        current = URL(url)
        seen: set[str] = set()
        for _hop in range(o.max_redirects + 1):
            self.guard.check_url(current)
            ident = str(current)
            if ident in seen:
                raise _Failure("redirect_loop", detail=ident)
            seen.add(ident)
            async with self._session.get(current, allow_redirects=False) as resp:
                self._check_peer(resp)
                status = resp.status
                if status in REDIRECT_CODES and resp.headers.get("Location"):
                    current = current.join(URL(resp.headers["Location"]))
                    continue
                if not 200 <= status < 300:
                    raise _Failure(f"http_{status}", status=status, retry_after=_retry_after(resp))
                if o.disallowed_header_directives:
                    d = disallowed_directive(resp.headers.getall("X-Robots-Tag", ()), o.user_agent_token,
                                             o.disallowed_header_directives)
                    if d is not None:
                        raise _Failure(f"opt_out:{d}", status=status)
                if resp.content_length is not None and resp.content_length > o.max_bytes:
                    raise _Failure("too_large", status=status, detail=f"Content-Length {resp.content_length}")
                body = await self._read_capped(resp, status)
                return FetchResult(url, body=body, status=status, final_url=ident,
                                   content_type=resp.headers.get("Content-Type"))
        raise _Failure("too_many_redirects", detail=f"more than {o.max_redirects}")

    async def _read_capped(self, resp: aiohttp.ClientResponse, status: int) -> bytes:
        limit = self.options.max_bytes
        buf = bytearray()
        while True:
            chunk = await resp.content.read(READ_CHUNK)
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise _Failure("too_large", status=status, detail=f"body over {limit} bytes")

    def _check_peer(self, resp: aiohttp.ClientResponse) -> None:
        """Defence in depth: the address actually connected to must pass the guard too."""
        if not self.guard.enabled or resp.connection is None or resp.connection.transport is None:
            return
        peer = resp.connection.transport.get_extra_info("peername")
        if peer and self.guard.blocked_ip(peer[0]):
            raise BlockedURLError("private_address", f"connected to {peer[0]}")


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    """``Retry-After`` in seconds (the delta-seconds form; an HTTP date is ignored)."""
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, so synchronous code (a Ray actor) can run coroutines.

    The loop outlives each call, so sessions, connection pools and DNS caches persist across batches.
    """

    def __init__(self, name: str = "curate-net") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
