"""A loopback OpenAI chat-completions server for the VLM tests: real HTTP on 127.0.0.1, scriptable.

It answers ``POST /v1/chat/completions`` as vLLM does. What it replies is decided per
request by ``behaviour(caption, attempt)`` (``attempt`` counts requests for that caption
and prompt, from 1), one of:

``ok``            a judge reply: ``score(caption)`` on the first line, a reason after it;
                  or, for a recaption prompt, ``recaption_for(image)``; for a fuse prompt,
                  ``fused: <alt-text> | <recaption>``
``http_<code>``   that status (``http_429`` sends ``Retry-After``)
``slow``          waits ``slow_seconds`` before answering ok (longer than the client's timeout)
``no_number``     a reply with no number; ``score_150`` out of range; ``text_first`` the score
                  on the second line; ``bad_json`` a 200 that is not JSON; ``empty`` blank content

The judge's caption is read from the prompt's ``Caption: "..."`` line, so the score a
test expects is ``score(caption)``. Counters: ``requests`` (all), ``by_caption``,
``auth`` (Authorization headers seen), ``models``, ``images`` (decoded image bytes hashes),
``max_in_flight`` (most requests open at once).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import threading
from collections import Counter
from collections.abc import Callable

from aiohttp import web

_CAPTION = re.compile(r'Caption: "(.*)"')
_FUSE = re.compile(r'alt-text of this image: "(.*)"\nHere is a synthetic description of the same image: "(.*)"')


def score(caption: str) -> int:
    """The score the server gives a caption: deterministic, 0-100."""
    return hashlib.sha1(caption.encode()).digest()[0] % 101


def recaption_for(image: bytes) -> str:
    return f"a synthetic caption of image {hashlib.sha1(image).hexdigest()[:10]}"


class ChatServer:
    """Start with ``start()`` (returns self), stop with ``stop()``; ``base_url`` ends in /v1."""

    def __init__(self, behaviour: Callable[[str, int], str] | None = None, *, slow_seconds: float = 3.0,
                 retry_after: str = "0.05") -> None:
        self.behaviour = behaviour or (lambda caption, attempt: "ok")
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.requests = 0
        self.by_caption: Counter[str] = Counter()
        self.attempts: Counter[tuple[str, str]] = Counter()
        self.auth: Counter[str | None] = Counter()
        self.models: Counter[str] = Counter()
        self.images: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ChatServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        content = body["messages"][0]["content"]
        text = next(p["text"] for p in content if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        image = base64.b64decode(url.split(",", 1)[1])
        m = _CAPTION.search(text)
        fuse = _FUSE.search(text)
        caption = m.group(1) if m else (fuse.group(1) if fuse else f"image:{hashlib.sha1(image).hexdigest()[:10]}")
        with self._lock:
            self.requests += 1
            self.by_caption[caption] += 1
            self.attempts[(caption, text)] += 1
            attempt = self.attempts[(caption, text)]
            self.auth[request.headers.get("Authorization")] += 1
            self.models[body.get("model")] += 1
            self.images[hashlib.sha1(image).hexdigest()[:10]] += 1
        what = self.behaviour(caption, attempt)
        if what.startswith("http_"):
            code = int(what[5:])
            headers = {"Retry-After": self.retry_after} if code == 429 else {}
            return web.json_response({"error": {"message": what}}, status=code, headers=headers)
        if what == "slow":
            await asyncio.sleep(self.slow_seconds)
        if what == "bad_json":
            return web.Response(text="<html>gateway</html>", content_type="text/html")
        if fuse:
            reply = f"fused: {fuse.group(1)} | {fuse.group(2)}"
        elif m is None:
            reply = recaption_for(image)
        elif what == "no_number":
            reply = "The caption describes the image well."
        elif what == "score_150":
            reply = "150"
        elif what == "text_first":
            reply = f"Score:\n{score(caption)}"
        else:
            reply = f"{score(caption)}\nThe caption fits the image."
        if what == "empty":
            reply = "  "
        return web.json_response({
            "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        })
