"""Fixtures for the network layer: one hostile HTTP server per module, an async fetch helper."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from curate.net.fetch import Fetcher, FetchOptions, FetchResult
from curate.net.guard import Lookup
from tests.net.hostile_server import HostileServer

#: Short deadlines keep the hostile cases fast; the server is local, so good URLs take milliseconds.
TEST_OPTIONS = FetchOptions(timeout=1.0, max_bytes=1 << 20, allow_private_networks=True, retry_backoff=0.05)


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as s:
        yield s


def fetch_all(urls: list[str], lookup: Lookup | None = None, **changes: Any) -> list[FetchResult]:
    """Fetch ``urls`` concurrently with TEST_OPTIONS changed by ``changes``."""

    async def go() -> list[FetchResult]:
        async with Fetcher(replace(TEST_OPTIONS, **changes), lookup=lookup) as f:
            return await asyncio.gather(*(f.fetch(u) for u in urls))

    return asyncio.run(go())


def fetch(url: str, lookup: Lookup | None = None, **changes: Any) -> FetchResult:
    return fetch_all([url], lookup=lookup, **changes)[0]
