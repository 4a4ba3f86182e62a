"""A loopback HTTP server that acts out a demo world's URLs, planted failures included.

Each URL of :class:`curate.demo.world.World` has a ``behaviour``:

========== ==================================================================
ok         200 with the file and its ``Content-Type``
not_found  404
corrupt    200 ``image/jpeg`` whose body is a JPEG header followed by noise
drip       200 ``image/jpeg`` with the right ``Content-Length``, one byte per
           ``drip_interval`` seconds (a client without a total deadline hangs)
opt_out    200 with the image and an ``X-Robots-Tag`` such as ``noai``
html       200 ``image/jpeg`` whose body is an HTML page
========== ==================================================================

It listens on 127.0.0.1 on a free port, serves from a background thread
(one thread per connection, so a dripping response never blocks the others),
and stops within about a second: dripping handlers wait on an event that
``stop()`` sets, and no handler outlives ``stop(timeout)``.

Example::

    >>> from curate.demo.server import DemoServer
    >>> with DemoServer(world) as server:                       # doctest: +SKIP
    ...     urls = world.url_list(server.base_url)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from curate.demo.world import World

log = logging.getLogger(__name__)

DRIP_INTERVAL_S = 1.0  # "1 byte per second": far slower than any sane download deadline
DRIP_MAX_S = 600.0  # a dripping response gives up after this, even if nobody stops the server
SOCKET_TIMEOUT_S = 30.0  # a client that connects and sends nothing cannot hold a thread forever


@dataclass(frozen=True)
class Route:
    behaviour: str
    file: Path | None
    content_type: str
    robots: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # DemoServer.stop() waits for handlers itself, with a timeout
    demo: DemoServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up on dripping and unwanted responses all the time: not an error.
        log.debug("demo server: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after a response
    timeout = SOCKET_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.demo._serve(self, head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.demo._serve(self, head=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("demo server: " + format, *args)


class DemoServer:
    """Serve a :class:`World` on ``http://127.0.0.1:<port>``; use as a context manager."""

    def __init__(self, world: World | str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 drip_interval: float = DRIP_INTERVAL_S, drip_max_seconds: float = DRIP_MAX_S) -> None:
        self.world = world if isinstance(world, World) else World(world)
        self.host, self.port = host, port
        self.drip_interval, self.drip_max_seconds = drip_interval, drip_max_seconds
        t = self.world.truth
        self.routes: dict[str, Route] = {
            path: Route(behaviour, self.world.root / file if file else None, ctype, robots)
            for path, behaviour, file, ctype, robots in zip(
                t["path"].to_pylist(), t["behaviour"].to_pylist(), t["file"].to_pylist(),
                t["content_type"].to_pylist(), t["robots"].to_pylist(), strict=True)
        }
        #: Requests answered, by behaviour (``unknown`` for paths outside the world).
        self.requests: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the demo server is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self) -> DemoServer:
        if self._httpd is not None:
            return self
        self._stop.clear()
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.demo = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="curate-demo-server", daemon=True)
        self._thread.start()
        log.info("demo server listening on %s (%d URLs)", self.base_url, len(self.routes))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wake dripping handlers, and wait up to ``timeout`` s for handlers to end."""
        if self._httpd is None:
            return
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._active:
            log.warning("demo server: %d handler(s) still running after %.1f s; leaving them (daemon threads)",
                        self._active, timeout)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ requests

    def _serve(self, h: _Handler, *, head: bool) -> None:
        with self._lock:
            self._active += 1
        try:
            route = self.routes.get(h.path.split("?", 1)[0])
            behaviour = route.behaviour if route else "unknown"
            with self._lock:
                self.requests[behaviour] += 1
            if route is None or route.behaviour == "not_found" or route.file is None:
                self._send(h, 404, b"<html><body>404 Not Found</body></html>", "text/html", head=head)
                return
            body = route.file.read_bytes()
            headers = {"X-Robots-Tag": route.robots} if route.robots else {}
            if route.behaviour == "drip":
                self._drip(h, body, route.content_type, head=head)
            else:
                self._send(h, 200, body, route.content_type, head=head, headers=headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            log.debug("demo server: client hung up on %s", h.path)
        finally:
            with self._lock:
                self._active -= 1

    @staticmethod
    def _send(h: _Handler, status: int, body: bytes, content_type: str, *, head: bool,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _drip(self, h: _Handler, body: bytes, content_type: str, *, head: bool) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        if head:
            return
        give_up = time.monotonic() + self.drip_max_seconds
        for i in range(len(body)):
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()
            if self._stop.wait(self.drip_interval) or time.monotonic() > give_up:
                return  # server stopping (or a client patient beyond reason): cut the body short
