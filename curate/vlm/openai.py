"""OpenAI-compatible chat completions (vLLM, SGLang, hosted APIs) with bounded concurrency and retries.

Each worker runs one asyncio loop on a background thread (as the download stage does)
with one aiohttp session; up to ``concurrency_per_worker`` requests are in flight. The
image goes inline as a base64 data URL, the prompt as text, in one user message::

    POST {base_url}/chat/completions
    {"model": ..., "max_tokens": ..., "temperature": 0,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}},
         {"type": "text", "text": "..."}]}]}

Several ``base_url``s are load-balanced: ``least_in_flight`` sends each request to the
endpoint with the fewest open requests (ties in turn), ``round_robin`` strictly in turn.
A retry goes to another endpoint than the one that just failed, so a dead endpoint's requests
move to the others.

Retried (with exponential backoff, honouring ``Retry-After`` up to the timeout): 429,
5xx, timeouts and refused/reset connections. Not retried: other 4xx (a bad request stays
bad) and malformed replies. Errors: ``http_<code>``, ``timeout``, ``connect_error``,
``bad_response`` (not JSON, or no ``choices[0].message.content``).

The API key is read from the environment variable named by ``api_key_env`` when the
worker starts; it is sent only as the ``Authorization`` header and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import random
from typing import Any

import aiohttp

from curate.errors import EnvironmentProblem
from curate.net.fetch import BackgroundLoop
from curate.vlm.base import IMAGE_MIME, Answer, Ask, VLMOptions

log = logging.getLogger(__name__)

#: aiohttp's connection pool per worker: the request cap is the real bound, this just never binds first.
CONNECTION_HEADROOM = 8
#: Longest Retry-After we wait, whatever the server asks (a queue-full vLLM says a few seconds).
MAX_RETRY_AFTER_S = 60.0


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Final(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Balancer:
    """Picks an endpoint per request: least requests in flight (ties in turn), or plain round-robin."""

    def __init__(self, urls: list[str], mode: str) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.mode = mode
        self.in_flight = [0] * len(self.urls)
        self._turn = itertools.count()

    def acquire(self, avoid: int | None = None) -> int:
        """An endpoint index; ``avoid`` (the one that just failed this request) is skipped if there are others."""
        turn = next(self._turn)
        n = len(self.urls)
        order = [(turn + j) % n for j in range(n)]
        if avoid is not None and n > 1:
            order.remove(avoid)
        if self.mode == "round_robin":
            i = order[0]
        else:
            i = min(order, key=lambda k: self.in_flight[k])
        self.in_flight[i] += 1
        return i

    def release(self, i: int) -> None:
        self.in_flight[i] -= 1


class OpenAIBackend:
    """Chat completions over HTTP; see the module doc. Thread-safe ``generate`` (one loop per worker)."""

    def __init__(self, options: VLMOptions) -> None:
        self.options = options
        key = None
        if options.api_key_env:
            key = os.environ.get(options.api_key_env)
            if not key:
                raise EnvironmentProblem(f"api_key_env names {options.api_key_env}, which is not set on this "
                                         "worker; on a cluster pass it with runtime_env env_vars or set it on every node")
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.balancer = Balancer(options.urls, options.load_balance)
        self._loop = BackgroundLoop(name="curate-vlm")
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop.run(self._start())

    async def _start(self) -> None:
        o = self.options
        connector = aiohttp.TCPConnector(limit=o.concurrency_per_worker + CONNECTION_HEADROOM)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        self._slots = asyncio.Semaphore(o.concurrency_per_worker)

    def close(self) -> None:
        if self._session is not None:
            self._loop.run(self._session.close())
            self._session = None
        self._loop.close()

    def generate(self, asks: list[Ask], on_answer: Any = None) -> list[Answer]:
        return self._loop.run(self._all(asks, on_answer))

    async def _all(self, asks: list[Ask], on_answer: Any) -> list[Answer]:
        async def one(i: int, ask: Ask) -> Answer:
            assert self._slots is not None
            async with self._slots:
                answer = await self.ask(ask)
            if on_answer is not None:
                on_answer(i, answer)
            return answer

        return await asyncio.gather(*(one(i, a) for i, a in enumerate(asks)))

    def payload(self, ask: Ask) -> dict[str, Any]:
        mime = IMAGE_MIME.get((ask.image_format or "jpg").lower(), "image/jpeg")
        data_url = f"data:{mime};base64,{base64.b64encode(ask.image).decode('ascii')}"
        return {
            "model": self.options.model, "max_tokens": self.options.max_tokens,
            "temperature": self.options.temperature,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": ask.prompt},
            ]}],
        }

    async def ask(self, ask: Ask) -> Answer:
        """One request with retries; returns text or an error reason, never raises for the network."""
        o = self.options
        body = self.payload(ask)
        attempt = 0
        failed: int | None = None
        while True:
            attempt += 1
            i = self.balancer.acquire(avoid=failed)
            try:
                return Answer(text=await self._post(self.balancer.urls[i], body))
            except _Final as e:
                return Answer(error=e.reason)
            except _Retryable as e:
                if attempt > o.retries:
                    return Answer(error=e.reason)
                failed = i
                wait = o.retry_backoff * (2 ** (attempt - 1)) * (1 + 0.25 * random.random())
                if e.retry_after is not None:
                    wait = max(wait, min(e.retry_after, o.timeout, MAX_RETRY_AFTER_S))
                log.debug("key %s: %s from endpoint %d, retry %d in %.2fs", ask.key, e.reason, i, attempt, wait)
            finally:
                self.balancer.release(i)
            await asyncio.sleep(wait)

    async def _post(self, base_url: str, body: dict[str, Any]) -> str:
        assert self._session is not None
        try:
            async with asyncio.timeout(self.options.timeout):
                async with self._session.post(f"{base_url}/chat/completions", json=body,
                                              headers=self._headers) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        raise _Retryable(f"http_{resp.status}", _retry_after(resp))
                    if not 200 <= resp.status < 300:
                        raise _Final(f"http_{resp.status}")
                    raw = await resp.read()
        except TimeoutError:
            raise _Retryable("timeout") from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise _Retryable("connect_error") from e
        except aiohttp.ClientError as e:  # malformed HTTP
            raise _Final("bad_response") from e
        return _content(raw)


def _content(raw: bytes) -> str:
    """``choices[0].message.content`` as text (a string, or a list of text parts)."""
    import json

    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Final("bad_response") from None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise _Final("bad_response")
    return content


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
