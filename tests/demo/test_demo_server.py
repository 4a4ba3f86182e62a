"""The loopback server acts out each planted behaviour, and stops promptly even mid-drip."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from curate.demo.server import DemoServer


@pytest.fixture(scope="module")
def server(small_world):
    with DemoServer(small_world) as s:
        yield s


def _row(world, behaviour: str) -> dict:
    return next(r for r in world.truth.to_pylist() if r["behaviour"] == behaviour)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_listens_on_loopback_port(server):
    assert server.base_url.startswith("http://127.0.0.1:") and server.port > 0


def test_ok_serves_the_file(server, small_world):
    row = _row(small_world, "ok")
    status, headers, body = _get(server.url(row["path"]))
    assert status == 200 and headers["Content-Type"] == row["content_type"]
    assert body == (small_world.root / row["file"]).read_bytes()
    assert "X-Robots-Tag" not in headers


def test_dead_link_and_unknown_path_are_404(server, small_world):
    for path in (_row(small_world, "not_found")["path"], "/img/nope.jpg"):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(server.url(path))
        assert e.value.code == 404


def test_opt_out_header(server, small_world):
    row = _row(small_world, "opt_out")
    status, headers, body = _get(server.url(row["path"]))
    assert status == 200 and headers["X-Robots-Tag"] == row["robots"] and body[:2] == b"\xff\xd8"


def test_html_served_as_jpeg_and_corrupt_bytes(server, small_world):
    _, headers, body = _get(server.url(_row(small_world, "html")["path"]))
    assert headers["Content-Type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE html>")
    row = _row(small_world, "corrupt")
    _, headers, body = _get(server.url(row["path"]))
    assert headers["Content-Type"] == "image/jpeg" and body == (small_world.root / row["file"]).read_bytes()


def _start_drip(server: DemoServer, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=0.2)
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return sock


def _read_for(sock: socket.socket, seconds: float) -> bytes:
    got, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    return got


def test_drip_sends_one_byte_per_interval(server, small_world):
    sock = _start_drip(server, _row(small_world, "drip")["path"])
    try:
        head, _, body = _read_for(sock, 1.3).partition(b"\r\n\r\n")
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.0 200")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    assert length > 1000 and 1 <= len(body) <= 3  # a client without a total deadline waits ~length seconds


def test_stop_does_not_wait_for_a_drip(small_world):
    server = DemoServer(small_world).start()
    thread = server._thread
    sock = _start_drip(server, _row(small_world, "drip")["path"])
    try:
        _read_for(sock, 0.3)
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 2.0
        assert server.requests["drip"] == 1 and server._active == 0  # the dripping handler has ended
    finally:
        sock.close()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url
