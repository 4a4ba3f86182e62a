"""Files served over HTTP on loopback: synthetic JPEGs, a static server, a web-latency server.

- :func:`ensure_images` writes N deterministic web-thumbnail-like JPEGs (256-512 px,
  15-40 KB) once into a cache folder.
- :func:`start_server` serves a folder on loopback only, in its own process group:
  ``nginx`` (when on PATH) or an ``aiohttp`` static server for plain serving, or the
  aiohttp server with every reply delayed by a lognormal time (``latency``) to stand in
  for the web. With ``hosts`` > 1 it listens on 127.0.0.2 … 127.0.0.(hosts+1) — all
  loopback addresses (127.0.0.0/8), never another — and :func:`url_list` spreads the URLs
  over them, so per-host connection limits and pools behave as on many sites.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .procs import affinity, tail, tree_cpu_seconds

log = logging.getLogger("benchmarks.harness")

SEED = 20_251_125
IMAGES_VERSION = 1  # bump when make_jpeg changes so old caches are not reused
MIN_SIDE, MAX_SIDE = 256, 512
JPEG_QUALITY = 85  # with NOISE_SIGMA gives 15-40 KB files, like web thumbnails
NOISE_SIGMA = 6.0
SERVER_START_TIMEOUT = 20.0
MAX_HOSTS = 250  # 127.0.0.2 .. 127.0.0.251


# ------------------------------------------------------------------ images


def image_name(i: int) -> str:
    return f"{i:06d}.jpg"


def make_jpeg(i: int, seed: int = SEED) -> bytes:
    """Image ``i``: a colour gradient, 8-19 filled shapes and mild noise, as a JPEG.

    Deterministic in (seed, i), so a cache built for a smaller N extends to a larger one.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, i])
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    c0, cx, cy = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    base = c0 + (cx - c0) * x + (cy - c0) * y
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 20))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.integers(0, 2) else draw.rectangle
        shape((x0, y0, x1, y1), fill=fill)
    arr = np.asarray(img).astype(np.int16)
    arr += rng.normal(0, NOISE_SIGMA, arr.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(
        buf, "JPEG", quality=JPEG_QUALITY
    )
    return buf.getvalue()


def _write_image(args: tuple[str, int]) -> None:
    folder, i = args
    path = os.path.join(folder, image_name(i))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(make_jpeg(i))
    os.replace(tmp, path)  # an interrupted run never leaves a truncated image behind


def ensure_images(n: int, cache: Path, workers: int) -> Path:
    """Generate whichever of images 0..n-1 are not in the cache yet; return the folder."""
    folder = cache / f"images-v{IMAGES_VERSION}-seed{SEED}"
    folder.mkdir(parents=True, exist_ok=True)
    have = set(os.listdir(folder))
    missing = [i for i in range(n) if image_name(i) not in have]
    if missing:
        log.info("generating %d images in %s with %d processes", len(missing), folder, workers)
        t0 = time.perf_counter()
        # The pool ends its workers with SIGTERM: they must die quietly, not run the benchmark's
        # handler (sigterm_as_interrupt), which would print a KeyboardInterrupt from each of them.
        with multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
            for _ in pool.imap_unordered(
                _write_image, [(str(folder), i) for i in missing], chunksize=64
            ):
                pass
        log.info("generated %d images in %.1f s", len(missing), time.perf_counter() - t0)
    return folder


def read_all(folder: Path, n: int) -> int:
    """Read images 0..n-1 once (page cache warm for every tool); return their total bytes."""
    return sum(len((folder / image_name(i)).read_bytes()) for i in range(n))


# ------------------------------------------------------------------ hosts and URLs


def loopback_hosts(count: int) -> list[str]:
    """``count`` loopback addresses: 127.0.0.1 for one, else 127.0.0.2 … 127.0.0.(count+1)."""
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"hosts: expected 1..{MAX_HOSTS}, got {count}")
    hosts = ["127.0.0.1"] if count == 1 else [f"127.0.0.{2 + i}" for i in range(count)]
    assert all(ipaddress.ip_address(h).is_loopback for h in hosts)
    return hosts


def url_list(path: Path, n: int, server: Server) -> None:
    """Parquet ``url``, ``caption`` for images 0..n-1, round-robin over the server's hosts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hosts = server.hosts
    urls = [f"http://{hosts[i % len(hosts)]}:{server.port}/{image_name(i)}" for i in range(n)]
    captions = [f"synthetic benchmark image number {i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def free_port(hosts: Sequence[str]) -> int:
    """A port free on every one of ``hosts``."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts[0]}..{hosts[-1]}")


# ------------------------------------------------------------------ servers

NGINX_CONF = """\
{user}worker_processes {workers};
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 65;
  keepalive_requests 1000000;
  open_file_cache off;  # a cache of 20,000 open files ran into the fd limit (EMFILE → 404)
  types {{ image/jpeg jpg; }}
  default_type application/octet-stream;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  server {{
{listen}
    root {root};
    location / {{ try_files $uri =404; }}
  }}
}}
"""

# aiohttp: one process per worker, each listening on every host with SO_REUSEPORT. A file is
# sent with sendfile; with a median delay each reply first waits a lognormal time that depends
# only on the file name (sha256 of it as the normal quantile's seed), so every tool meets the
# same delay for the same image and runs stay comparable.
AIOHTTP_SERVER = """\
import asyncio, hashlib, json, math, multiprocessing, os, random, sys
from aiohttp import web

def delay_for(name, median, sigma, seed):
    z = random.Random(hashlib.sha256(f"{seed}/{name}".encode()).digest()).gauss(0.0, 1.0)
    return median * math.exp(sigma * z)

def serve(cfg):
    root, median, sigma, seed = cfg["root"], cfg["median_s"], cfg["sigma"], cfg["seed"]

    async def handle(request):
        name = request.match_info["name"]
        path = os.path.join(root, name)
        if "/" in name or name.startswith(".") or not os.path.isfile(path):
            raise web.HTTPNotFound()
        if median > 0:
            await asyncio.sleep(delay_for(name, median, sigma, seed))
        return web.FileResponse(path, headers={"Content-Type": "image/jpeg"})

    async def main():
        app = web.Application()
        app.router.add_get("/{name}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for host in cfg["hosts"]:
            await web.TCPSite(runner, host, cfg["port"], reuse_port=True, backlog=4096).start()
        await asyncio.Event().wait()

    asyncio.run(main())

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    procs = [multiprocessing.Process(target=serve, args=(cfg,), daemon=True) for _ in range(cfg["workers"])]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
"""


@dataclass
class Latency:
    """Each reply waits ``median_s · exp(sigma · z)``, z a standard normal (a lognormal delay)."""

    median_s: float
    sigma: float = 0.5

    def mean_s(self) -> float:
        return self.median_s * math.exp(self.sigma**2 / 2)

    def describe(self) -> str:
        return (
            f"lognormal reply delay, median {self.median_s * 1000:.0f} ms, sigma {self.sigma} "
            f"(mean {self.mean_s() * 1000:.0f} ms)"
        )


@dataclass
class Server:
    kind: str
    port: int
    hosts: list[str]
    proc: subprocess.Popen
    log_path: Path
    latency: Latency | None = None
    workers: int = 1
    extra: dict[str, object] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server and its workers."""
        return tree_cpu_seconds(self.proc.pid)

    def describe(self) -> str:
        where = self.hosts[0] if len(self.hosts) == 1 else f"{self.hosts[0]}..{self.hosts[-1]}"
        text = f"{self.kind} ({self.workers} workers) on {where}:{self.port}"
        if self.latency:
            text += f", {self.latency.describe()}"
        return text

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    root: Path,
    workdir: Path,
    *,
    kind: str = "auto",
    workers: int = 2,
    hosts: int = 1,
    latency: Latency | None = None,
    cores: Sequence[int] | None = None,
    probe: str | None = None,
    seed: int = SEED,
) -> Server:
    """Serve ``root`` on loopback in its own process group; return once ``probe`` answers.

    ``kind``: ``auto`` (nginx when on PATH, else aiohttp; always aiohttp with ``latency``),
    ``nginx`` or ``aiohttp``. ``probe``: a file name under ``root`` fetched to check the server.
    """
    if latency is not None:
        if kind == "nginx":
            raise SystemExit("--server nginx cannot delay replies; the latency mode uses aiohttp")
        kind = "aiohttp"
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "aiohttp"
    addrs = loopback_hosts(hosts)
    port = free_port(addrs)
    prefix = workdir / "server"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    log_path = prefix / "server.log"
    if kind == "nginx":
        nginx = shutil.which("nginx")
        if nginx is None:
            raise SystemExit("--server nginx: nginx is not on PATH (apt-get install -y nginx)")
        # Started as root, nginx's workers would run as `nobody`, who may not read the cache.
        user = "user root;\n" if os.geteuid() == 0 else ""
        listen = "\n".join(f"    listen {h}:{port} backlog=4096;" for h in addrs)
        conf = prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                user=user, workers=workers, prefix=prefix, listen=listen, root=root
            )
        )
        cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    elif kind == "aiohttp":
        import json

        script = prefix / "serve.py"
        script.write_text(AIOHTTP_SERVER)
        cfg = {
            "root": str(root),
            "port": port,
            "hosts": addrs,
            "workers": workers,
            "median_s": latency.median_s if latency else 0.0,
            "sigma": latency.sigma if latency else 0.0,
            "seed": seed,
        }
        cmd = [sys.executable, str(script), json.dumps(cfg)]
    else:
        raise SystemExit(f"--server: expected auto, nginx or aiohttp, got {kind!r}")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=affinity(cores),
        )
    server = Server(kind, port, addrs, proc, log_path, latency, workers)
    probe = probe or next(iter(sorted(os.listdir(root))), "")
    urls = [f"http://{h}:{port}/{probe}" for h in (addrs[0], addrs[-1])]
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    pending = list(urls)
    while pending:
        if proc.poll() is not None:
            raise SystemExit(
                f"{kind} server exited with {proc.returncode}:\n{tail(log_path)}"
                + (f"\n{tail(prefix / 'error.log')}" if kind == "nginx" else "")
            )
        try:
            with opener.open(pending[0], timeout=5) as r:
                if r.status == 200 and r.read():
                    pending.pop(0)
                    continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit(
                f"{kind} server did not answer {pending[0]} within {SERVER_START_TIMEOUT:.0f} s"
            )
        time.sleep(0.1)
    log.info("serving %s: %s", root, server.describe())
    return server
