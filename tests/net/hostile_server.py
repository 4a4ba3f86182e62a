"""A real HTTP server on 127.0.0.1 (aiohttp.web on a thread) that plays good and hostile hosts.

Routes:
  /static/<name>        bodies registered with ``add`` (any status, content type, headers)
  /drip                 headers, then one byte a second, forever
  /hang                 accepts the request and never answers
  /huge                 Content-Length of 1 GiB (a body never needed)
  /huge-chunked         chunked body that streams 64 KiB chunks up to 64 MiB
  /loop/a, /loop/b      redirect to each other
  /chain/<n>            n redirects (n >= 1), then /static/good.jpg
  /redirect?to=URL      302 to URL
  /flaky/<key>?fail=N&status=S[&retry_after=R]   S for the first N requests, then a JPEG
Every request's path and time is recorded in ``hits``.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib
from collections import defaultdict

from aiohttp import web


def jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30), quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(size: tuple[int, int] = (64, 48), color: tuple[int, ...] = (30, 200, 30, 255), mode: str = "RGBA") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A ``side`` x ``side`` one-colour PNG: 1 bit per pixel, so a few tens of KB on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = []
    block = row * 1000
    for _ in range(side // 1000):
        parts.append(comp.compress(block))
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


GOOD_JPEG = jpeg()


class HostileServer:
    """Start with ``with HostileServer() as s:``; ``s.url("/static/x.jpg")`` is a full URL."""

    def __init__(self) -> None:
        self.static: dict[str, tuple[int, bytes, str, dict[str, str]]] = {}
        self.hits: dict[str, list[float]] = defaultdict(list)
        self._counts: dict[str, int] = defaultdict(int)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.add("good.jpg", GOOD_JPEG)

    # ------------------------------------------------------------ content

    def add(self, name: str, body: bytes, content_type: str = "image/jpeg", status: int = 200,
            headers: dict[str, str] | None = None) -> str:
        """Serve ``body`` at /static/<name>; returns its URL."""
        self.static[name] = (status, body, content_type, headers or {})
        return self.url(f"/static/{name}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # ------------------------------------------------------------ handlers

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self.static:
            return web.Response(status=404, text="not found")
        status, body, ctype, headers = self.static[name]
        return web.Response(status=status, body=body, headers={"Content-Type": ctype, **headers})

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": "100000"})
        await resp.prepare(request)
        try:
            for i in range(100000):
                await resp.write(GOOD_JPEG[i % len(GOOD_JPEG) : i % len(GOOD_JPEG) + 1])
                await asyncio.sleep(1.0)
        except ConnectionError:
            pass  # the client gave up, as it should
        return resp

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        return web.Response(text="too late")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(1 << 30)})
        await resp.prepare(request)
        await resp.write(GOOD_JPEG)
        await asyncio.sleep(3600)
        return resp

    async def _huge_chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = GOOD_JPEG + b"\x00" * (65536 - len(GOOD_JPEG))
        try:
            for _ in range(1024):
                await resp.write(block)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def _loop(self, request: web.Request) -> web.StreamResponse:
        other = "b" if request.match_info["which"] == "a" else "a"
        raise web.HTTPFound(f"/loop/{other}")

    async def _chain(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        raise web.HTTPFound("/static/good.jpg" if n <= 1 else f"/chain/{n - 1}")

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["to"])

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        self._counts[key] += 1
        if self._counts[key] <= int(request.query.get("fail", "1")):
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            return web.Response(status=int(request.query.get("status", "500")), text="try later", headers=headers)
        return web.Response(body=GOOD_JPEG, content_type="image/jpeg")

    @web.middleware
    async def _record(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        self.hits[request.path].append(time.monotonic())
        return await handler(request)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> HostileServer:
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("test HTTP server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        try:
            fut.result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(middlewares=[self._record])
        app.add_routes([
            web.get("/static/{name}", self._static),
            web.get("/drip", self._drip),
            web.get("/hang", self._hang),
            web.get("/huge", self._huge),
            web.get("/huge-chunked", self._huge_chunked),
            web.get("/loop/{which}", self._loop),
            web.get("/chain/{n}", self._chain),
            web.get("/redirect", self._redirect),
            web.get("/flaky/{key}", self._flaky),
        ])
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None, handle_signals=False)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.set()
        self.loop.run_forever()
