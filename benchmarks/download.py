"""Download benchmark: curate vs img2dataset on the same URL list, side by side in one run.

Serves N clean JPEGs (default 20,000; 256-512 px per side, 15-40 KB, generated
once from a fixed seed and cached under ``benchmarks/.cache/``) from a static
server on 127.0.0.1, then downloads them with resize to 256 px (``border``)
with img2dataset and with curate, one after the other: same URL list, same
settings, same number of CPUs, same server. Prints samples/s for each and the
ratio curate / img2dataset; the goal is curate >= 1.5x.

Run it from the repository root with curate's own virtual environment::

    .venv/bin/python benchmarks/download.py                     # 20,000 images, all CPUs
    .venv/bin/python benchmarks/download.py -n 500 --cpus 2     # a quick check
    .venv/bin/python benchmarks/download.py --cpus 12 --pin --json bench.json
    .venv/bin/python benchmarks/download.py --only curate --keep
    .venv/bin/python benchmarks/download.py -n 20000 --also-n 5000 --cpus 2   # + per-image rates

img2dataset 1.47.0 pins ``webdataset<0.3`` and ``pandas<3``, which conflict
with curate's dependencies, so it runs from its own virtual environment,
``.bench-venv/`` at the repository root, created on first use with
``python -m venv`` and ``pip install`` of :data:`IMG2DATASET_PINS` (needs
PyPI once, about 20 s; reused afterwards). Those pins are a set that installs
and runs on Python 3.11; they are pinned so two machines measure the same code.

Fairness:

- Server: nginx (``apt-get install -y nginx``) when it is on PATH, else an
  aiohttp static server in a separate process (both bind 127.0.0.1 only,
  access logs off). The same server process serves both tools; its files are
  read once before either tool starts so both find them in the page cache.
- CPUs: img2dataset gets ``--processes_count C``, curate ``runtime.num_cpus=C``.
  With ``--pin`` both tools are confined to cores ``0..C-1`` and the server to
  the remaining ones (use it with ``--cpus`` below the machine's count).
- Shards: both use the same samples per shard. img2dataset runs one shard per
  process at a time, so the default cuts N into about 4 shards per CPU
  (with img2dataset's 10,000 default, 20,000 images would keep 2 processes busy).
- img2dataset runs once per ``--i2d-threads`` value (default 64 and 256, its
  default; on loopback fewer threads can be faster) and curate is compared
  with the fastest of those runs.
- Settings: image_size 256, resize_mode border, encode_format jpg,
  encode_quality 95, timeout 10, retries 0 and, where curate's stage has the
  option, sha256 hashes as img2dataset computes by default. Both write
  WebDataset tars only (curate's ledger plays the role of img2dataset's
  Parquet sidecar, which img2dataset always writes).
- Outputs are checked: successes come from each tool's own counters *and* from
  counting the images in its tars, and one image per tool is checked to be
  256x256, so a tool that drops images cannot look faster.

A tool that fails or runs past ``--tool-timeout`` is stopped (SIGINT, then
SIGKILL), reported, and the other tools still run; the work folder is kept
then. Exit status: 0 when every run stored all N images, else 1.

The headline is wall clock of the whole command (interpreter, imports, Ray
start-up included). "excl. start-up" is, for img2dataset, the span of its
shards' ``start_time``..``end_time`` in ``*_stats.json``, and for curate the
run's ``elapsed_seconds`` from ``manifest.json`` less Ray's start-up (timed
around ``curate.runner._init_ray`` in the ``curate run`` process).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.download")

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"
BENCH_VENV = REPO / ".bench-venv"
RECIPE = REPO / "pipelines" / "download.yaml"

#: What ``.bench-venv`` gets. img2dataset 1.47.0 with the versions its
#: requirements resolved to on Python 3.11 (Nov 2025); all are wheels.
IMG2DATASET_PINS = (
    "img2dataset==1.47.0",
    "albumentations==1.4.24",
    "opencv-python-headless==4.14.0.94",
    "numpy==2.4.6",
    "pandas==2.3.3",
    "pyarrow==26.0.1",
    "webdataset==0.2.111",
    "wandb==0.31.0",
)

SEED = 20_251_125
IMAGES_VERSION = 1  # bump when make_jpeg changes so old caches are not reused
MIN_SIDE, MAX_SIDE = 256, 512
JPEG_QUALITY = 85  # with NOISE_SIGMA gives 15-40 KB files, like web thumbnails
NOISE_SIGMA = 6.0
SHARDS_PER_CPU = 4  # enough shards that img2dataset's processes stay busy to the end
MIN_SHARD = 50
SERVER_WORKERS = 2  # nginx with sendfile serves >20k small files/s per worker
SERVER_START_TIMEOUT = 20.0
TOOL_TIMEOUT = 1800.0  # a tool that hangs is stopped and reported, the other still runs
STOP_GRACE = 30.0  # seconds between SIGINT and SIGKILL for a tool past its limit
#: img2dataset threads per process to try. Its default is 256 (its examples use 64-128); on
#: loopback fewer threads may do better, so both run and the fastest is compared.
I2D_THREADS = (64, 256)

#: What both tools are told, by img2dataset's option names (curate's download stage uses the same).
SETTINGS: dict[str, Any] = {
    "image_size": 256,
    "resize_mode": "border",
    "encode_format": "jpg",
    "encode_quality": 95,
    "timeout": 10,
    "retries": 0,
}


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
        with multiprocessing.Pool(workers) as pool:
            for _ in pool.imap_unordered(
                _write_image, [(str(folder), i) for i in missing], chunksize=64
            ):
                pass
        log.info("generated %d images in %.1f s", len(missing), time.perf_counter() - t0)
    return folder


def read_all(folder: Path, n: int) -> int:
    """Read images 0..n-1 once (page cache warm for both tools); return their total bytes."""
    total = 0
    for i in range(n):
        total += len((folder / image_name(i)).read_bytes())
    return total


def write_url_list(path: Path, n: int, port: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.1:{port}/{image_name(i)}" for i in range(n)]
    captions = [f"synthetic benchmark image number {i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


# ------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _affinity(cores: Sequence[int] | None) -> Callable[[], None] | None:
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, set(cores))


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
    listen 127.0.0.1:{port} backlog=4096;
    root {root};
    location / {{ try_files $uri =404; }}
  }}
}}
"""

# Fallback server: aiohttp's static route (sendfile), one process per worker on one port.
AIOHTTP_SERVER = """\
import multiprocessing, sys
from aiohttp import web

def serve(root, port):
    app = web.Application()
    app.router.add_static("/", root)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, access_log=None, print=None,
                backlog=4096)

if __name__ == "__main__":
    root, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    procs = [multiprocessing.Process(target=serve, args=(root, port), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
"""


@dataclass
class Server:
    kind: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by the server's processes (its process group); None off Linux."""
        if not os.path.isdir("/proc"):
            return None
        ticks = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # pgrp; then utime, stime
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_server(
    kind: str, root: Path, workdir: Path, workers: int, cores: Sequence[int] | None
) -> Server:
    """Start a static server for ``root`` on 127.0.0.1 in its own process group and wait until it answers."""
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "aiohttp"
    port = free_port()
    prefix = workdir / "server"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    log_path = prefix / "server.log"
    if kind == "nginx":
        nginx = shutil.which("nginx")
        if nginx is None:
            raise SystemExit("--server nginx: nginx is not on PATH (apt-get install -y nginx)")
        # Started as root, nginx's workers would run as `nobody`, who may not read the cache.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(user=user, workers=workers, prefix=prefix, port=port, root=root)
        )
        cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    elif kind == "aiohttp":
        script = prefix / "serve.py"
        script.write_text(AIOHTTP_SERVER)
        cmd = [sys.executable, str(script), str(root), str(port), str(workers)]
    else:
        raise SystemExit(f"--server: expected auto, nginx or aiohttp, got {kind!r}")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_affinity(cores),
        )
    server = Server(kind, port, proc, log_path)
    url = f"http://127.0.0.1:{port}/{image_name(0)}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise SystemExit(
                f"{kind} server exited with {proc.returncode}:\n{_tail(log_path)}"
                + (f"\n{_tail(prefix / 'error.log')}" if kind == "nginx" else "")
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and r.read():
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit(
                f"{kind} server did not answer {url} within {SERVER_START_TIMEOUT:.0f} s"
            )
        time.sleep(0.1)
    log.info("%s serving %s on 127.0.0.1:%d with %d workers", kind, root, port, workers)
    return server


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# ------------------------------------------------------------------ tools


@dataclass
class Result:
    tool: str
    samples: int
    successes: int  # from the tool's own counters
    images_in_tars: int  # counted independently
    seconds: float  # wall clock of the whole command
    seconds_excl_startup: float | None
    samples_per_s: float = 0.0  # successes / seconds
    samples_per_s_excl_startup: float | None = None
    label: str = ""  # the table's name for the run, e.g. "img2dataset t=64"
    command: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label = self.label or self.tool
        self.samples_per_s = self.successes / self.seconds if self.seconds else 0.0
        if self.seconds_excl_startup:
            self.samples_per_s_excl_startup = self.successes / self.seconds_excl_startup


class ToolFailed(Exception):
    """A tool exited non-zero or ran past its time limit."""


def run_timed(
    cmd: list[str],
    *,
    name: str,
    log_path: Path,
    env: dict[str, str],
    cores: Sequence[int] | None,
    limit: float,
) -> float:
    """Run ``cmd`` to completion, output to ``log_path``; return its wall-clock seconds.

    Past ``limit`` seconds it gets SIGINT (curate and img2dataset shut down their workers),
    then SIGKILL for its process group after ``STOP_GRACE`` more.
    """
    log.info("running: %s", " ".join("<driver>" if "\n" in a else a for a in cmd))
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,  # its own group, so a stuck run can be stopped whole
            preexec_fn=_affinity(cores),
        )
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise ToolFailed(
                f"{name} ran past --tool-timeout {limit:.0f} s and was stopped; "
                f"its output ({log_path}):\n{_tail(log_path)}"
            ) from None
        except BaseException:  # Ctrl-C reaches only our process group, not the tool's session
            _stop(proc)
            raise
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise ToolFailed(
            f"{name} failed with exit code {proc.returncode}; its output ({log_path}):\n"
            f"{_tail(log_path)}"
        )
    return seconds


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (the tools then stop their workers), SIGKILL to the group after STOP_GRACE."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)  # loopback must not go through a proxy
    env.update(
        {
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "WANDB_MODE": "disabled",
            "NO_ALBUMENTATIONS_UPDATE": "1",  # no network calls at start-up
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def count_tar_images(folder: Path) -> tuple[int, tuple[int, int] | None]:
    """Images in every ``*.tar`` under ``folder`` and the size of the first one."""
    from PIL import Image

    n, size = 0, None
    for tar_path in sorted(folder.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith((".jpg", ".jpeg")):
                    n += 1
                    if size is None:
                        f = tar.extractfile(m)
                        assert f is not None
                        size = Image.open(io.BytesIO(f.read())).size
    return n, size


def ensure_bench_venv() -> Path:
    """``.bench-venv/bin/img2dataset``, installing :data:`IMG2DATASET_PINS` on first use."""
    exe = BENCH_VENV / "bin" / "img2dataset"
    py = BENCH_VENV / "bin" / "python"
    if exe.exists():
        probe = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == IMG2DATASET_PINS[0].split("==")[1]:
            return exe
        log.warning(
            "%s holds another img2dataset (%s); reinstalling",
            BENCH_VENV,
            probe.stdout.strip() or probe.stderr.strip()[-200:],
        )
    log.info(
        "creating %s with %s (needs PyPI, about 20 s)", BENCH_VENV, ", ".join(IMG2DATASET_PINS)
    )
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *IMG2DATASET_PINS,
        ],
        check=True,
    )
    return exe


def run_img2dataset(
    urls: Path,
    out: Path,
    *,
    n: int,
    cpus: int,
    threads: int,
    shard: int,
    logs: Path,
    cores: Sequence[int] | None,
    limit: float,
) -> Result:
    exe = ensure_bench_venv()
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(exe),
        "--url_list",
        str(urls),
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_format",
        "webdataset",
        "--output_folder",
        str(out),
        "--processes_count",
        str(cpus),
        "--thread_count",
        str(threads),
        "--number_sample_per_shard",
        str(shard),
        "--enable_wandb",
        "False",
        "--distributor",
        "multiprocessing",
    ]
    for k, v in SETTINGS.items():
        cmd += [f"--{k}", str(v)]
    seconds = run_timed(
        cmd,
        name="img2dataset",
        log_path=logs / f"img2dataset-t{threads}-n{n}.log",
        env=tool_env(),
        cores=cores,
        limit=limit,
    )
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    successes = sum(s.get("successes", 0) for s in stats)
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in s.get("status_dict", {}).items():
            if k != "success":
                errors[k] = errors.get(k, 0) + v
    span = (
        (max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)) if stats else None
    )
    in_tars, size = count_tar_images(out)
    return Result(
        "img2dataset",
        n,
        successes,
        in_tars,
        seconds,
        span,
        label=f"img2dataset t={threads}",
        command=cmd,
        extra={
            "count": sum(s.get("count", 0) for s in stats),
            "errors": errors,
            "image_size_seen": size,
            "threads": threads,
        },
    )


# Runs `curate run ...` in a fresh interpreter, timing Ray's start-up inside it.
CURATE_DRIVER = """\
import json, sys, time
import curate.runner as runner
if hasattr(runner, "_init_ray"):
    _init_ray = runner._init_ray
    def _timed_init_ray(recipe):
        t = time.perf_counter()
        _init_ray(recipe)
        with open(out, "w") as f:  # written here: `curate run` ends with os._exit
            json.dump({"ray_init_seconds": time.perf_counter() - t}, f)
    runner._init_ray = _timed_init_ray
from curate.cli import main
out, sys.argv = sys.argv[1], ["curate", *sys.argv[2:]]
main()
"""


def curate_overrides(
    recipe: Path, *, cpus: int, shard: int, extra: Sequence[str] = ()
) -> list[str]:
    """``--set`` arguments giving the recipe's download stage the benchmark's settings."""
    import yaml

    from curate.stages import REGISTRY

    if "download" not in REGISTRY:
        raise SystemExit("curate has no `download` stage yet (curate/stages/download.py)")
    data = yaml.safe_load(recipe.read_text())
    idx = next(
        (
            i
            for i, s in enumerate(data.get("stages") or [])
            if isinstance(s, dict) and s.get("use") == "download"
        ),
        None,
    )
    if idx is None:
        raise SystemExit(f"{recipe}: no stage with `use: download`")
    fields = REGISTRY["download"].Config.model_fields
    wanted = dict(SETTINGS, allow_private_networks=True, compute_hash="sha256")
    sets = []
    for k, v in wanted.items():
        if k in fields:
            sets.append(f"stages.{idx}.{k}={json.dumps(v)}")
        else:
            log.warning("curate's download stage has no option %r; leaving its default", k)
    sets += [
        f"runtime.num_cpus={cpus}",
        f"write.samples_per_shard={shard}",
        "write.formats=[webdataset]",
        *extra,
    ]
    return sets


def run_curate(
    recipe: Path,
    urls: Path,
    out: Path,
    *,
    n: int,
    cpus: int,
    shard: int,
    logs: Path,
    cores: Sequence[int] | None,
    limit: float,
    extra_sets: Sequence[str] = (),
) -> Result:
    if not recipe.exists():
        raise SystemExit(f"{recipe} does not exist (yet)")
    shutil.rmtree(out, ignore_errors=True)
    timings_path = logs / f"curate-timings-n{n}.json"
    timings_path.unlink(missing_ok=True)
    cli = ["run", str(recipe), "-i", str(urls), "-o", str(out), "--no-progress"]
    for s in curate_overrides(recipe, cpus=cpus, shard=shard, extra=extra_sets):
        cli += ["--set", s]
    cmd = [sys.executable, "-c", CURATE_DRIVER, str(timings_path), *cli]
    seconds = run_timed(
        cmd, name="curate", log_path=logs / f"curate-n{n}.log", env=tool_env(), cores=cores, limit=limit
    )
    manifest = json.loads((out / "manifest.json").read_text())
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    ray_init = timings.get("ray_init_seconds")
    elapsed = manifest.get("elapsed_seconds")
    excl = elapsed - ray_init if elapsed is not None and ray_init is not None else None
    successes = int(manifest["counts"]["kept"])
    in_tars, size = count_tar_images(out)
    errors = {
        f"{stage}:{reason}": v
        for stage, reasons in manifest["counts"].get("dropped", {}).items()
        for reason, v in reasons.items()
    }
    return Result(
        "curate",
        n,
        successes,
        in_tars,
        seconds,
        excl,
        command=["curate", *cli],
        extra={
            "count": manifest["counts"]["input"],
            "errors": errors,
            "image_size_seen": size,
            "ray_init_seconds": ray_init,
            "manifest_elapsed_seconds": elapsed,
            "stages": manifest.get("recipe", {}).get("stages"),
        },
    )


# ------------------------------------------------------------------ report


def print_table(results: list[Result], *, headline: bool = True) -> float | None:
    """Print the comparison; return curate/img2dataset samples/s (None unless both ran)."""
    head = (
        "tool",
        "samples",
        "successes",
        "in tars",
        "seconds",
        "samples/s",
        "excl. start-up s",
        "samples/s",
    )
    rows = [head]
    for r in results:
        excl = f"{r.seconds_excl_startup:.1f}" if r.seconds_excl_startup else "-"
        rate = f"{r.samples_per_s_excl_startup:.0f}" if r.samples_per_s_excl_startup else "-"
        rows.append(
            (
                r.label,
                str(r.samples),
                str(r.successes),
                str(r.images_in_tars),
                f"{r.seconds:.1f}",
                f"{r.samples_per_s:.0f}",
                excl,
                rate,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for j, row in enumerate(rows):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        cpu = r.extra.get("server_cpu_seconds")
        if cpu is not None:
            print(f"server CPU during {r.label}: {cpu:.1f} s ({cpu / r.seconds:.0%} of one core)")
    for r in results:
        if r.successes != r.samples or r.images_in_tars != r.samples:
            print(
                f"WARNING: {r.label} stored {r.successes} ({r.images_in_tars} in tars) of {r.samples}; "
                f"errors: {r.extra.get('errors')}"
            )
        if r.extra.get("image_size_seen") not in (None, (256, 256), [256, 256]):
            print(f"WARNING: {r.label} wrote {r.extra['image_size_seen']} images, expected 256x256")
    cur, base = best(results, "curate"), best(results, "img2dataset")
    if not headline or cur is None or base is None or not base.samples_per_s:
        return None
    ratio = cur.samples_per_s / base.samples_per_s
    line = f"curate / {base.label}: {ratio:.2f}x samples/s (wall clock; goal >= 1.5x)"
    a, b = cur.samples_per_s_excl_startup, base.samples_per_s_excl_startup
    if a and b:
        line += f"; {a / b:.2f}x excluding start-up"
    print(line)
    return ratio


def print_marginal(results: list[Result], smaller: list[Result]) -> dict[str, Any]:
    """Print each run's rate over the images the N run has beyond the M run; return the figures.

    Both tools pay a start-up once (interpreters, Ray, actors, a report) and then a cost per
    image; the difference of two runs of the same settings cancels the first.
    """
    pairs = {}
    print("rate over the extra images (N run minus M run: start-up cancels out):")
    for big in results:
        small = next((r for r in smaller if r.label.startswith(big.label + " n=")), None)
        if small is None or big.seconds <= small.seconds or big.successes <= small.successes:
            print(f"  {big.label}: no rate (the N run is not both longer and larger than the M run)")
            continue
        rate = (big.successes - small.successes) / (big.seconds - small.seconds)
        fixed = small.seconds - small.successes / rate
        pairs[big.label] = {"tool": big.tool, "rate": rate, "start_up_seconds": fixed}
        print(
            f"  {big.label}: {big.samples - small.samples} more images in "
            f"{big.seconds - small.seconds:.1f} s more: {rate:.0f} samples/s; "
            f"start-up about {fixed:.1f} s"
        )
    cur = [v["rate"] for v in pairs.values() if v["tool"] == "curate"]
    base = [v["rate"] for v in pairs.values() if v["tool"] == "img2dataset"]
    out: dict[str, Any] = {"runs": pairs}
    if cur and base:
        out["ratio"] = max(cur) / max(base)
        print(f"curate / fastest img2dataset per image: {out['ratio']:.2f}x")
    return out


def best(results: list[Result], tool: str) -> Result | None:
    """The tool's fastest run by wall-clock samples/s."""
    runs = [r for r in results if r.tool == tool]
    return max(runs, key=lambda r: r.samples_per_s) if runs else None


# ------------------------------------------------------------------ main


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from e


def with_server_cpu(server: Server, run: Callable[[], Result]) -> Result:
    """Run one tool and note the server's CPU seconds meanwhile (it must stay far from busy)."""
    before = server.cpu_seconds()
    result = run()
    after = server.cpu_seconds()
    if before is not None and after is not None:
        result.extra["server_cpu_seconds"] = round(after - before, 2)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-n", "--samples", type=int, default=20_000, help="images to serve and download (20000)"
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        help="CPUs for each tool: img2dataset processes, curate runtime.num_cpus (all)",
    )
    p.add_argument(
        "--i2d-threads",
        type=_int_list,
        default=list(I2D_THREADS),
        help="img2dataset --thread_count per process; a comma list runs it once per value and "
        "compares curate with the fastest (default: 64,256; 256 is img2dataset's default)",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=RECIPE,
        help=f"curate recipe with a `use: download` stage ({RECIPE.relative_to(REPO)})",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help=f"both tools; default about {SHARDS_PER_CPU} shards per CPU, at least {MIN_SHARD}",
    )
    p.add_argument(
        "--curate-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `curate run --set` (repeatable), e.g. stages.0.resources.batch_size=512",
    )
    p.add_argument(
        "--also-n",
        type=int,
        default=None,
        metavar="M",
        help="also run every tool on the first M images (same shard size) and print each "
        "tool's rate over the other N-M: the per-image rate, without the start-up both pay once",
    )
    p.add_argument("--only", choices=("curate", "img2dataset"), help="run one tool")
    p.add_argument(
        "--server",
        choices=("auto", "nginx", "aiohttp"),
        default="auto",
        help="static server: nginx when on PATH, else aiohttp",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        default=SERVER_WORKERS,
        help=f"server processes ({SERVER_WORKERS})",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the tools to cores 0..CPUS-1 and the server to the others",
    )
    p.add_argument(
        "--cache", type=Path, default=CACHE, help=f"image cache ({CACHE.relative_to(REPO)})"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="URL list, outputs and logs (a temp folder)"
    )
    p.add_argument(
        "--tool-timeout",
        type=float,
        default=TOOL_TIMEOUT,
        help=f"stop a tool that runs longer, report it and go on ({TOOL_TIMEOUT:.0f} s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (outputs, logs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = p.parse_args(argv)
    if args.samples < 1 or args.cpus < 1 or min(args.i2d_threads) < 1:
        p.error("--samples, --cpus and --i2d-threads must be >= 1")
    if args.also_n is not None and not 0 < args.also_n < args.samples:
        p.error(f"--also-n must be between 1 and --samples - 1 ({args.samples - 1})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    n, cpus = args.samples, args.cpus
    shard = args.samples_per_shard or max(MIN_SHARD, math.ceil(n / (SHARDS_PER_CPU * cpus)))
    tool_cores = server_cores = None
    if args.pin:
        avail = sorted(os.sched_getaffinity(0))
        if cpus >= len(avail):
            raise SystemExit(
                f"--pin needs --cpus below the {len(avail)} available cores, to leave some to the server"
            )
        tool_cores, server_cores = avail[:cpus], avail[cpus:]

    if args.only != "curate":
        ensure_bench_venv()  # before any timing: a first install must not look like img2dataset's time
    images = ensure_images(n, args.cache, workers=os.cpu_count() or 1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    total_bytes = read_all(images, n)
    print(
        f"{n} images, {total_bytes / n / 1024:.1f} KB mean, {cpus} CPUs, {shard} samples per shard, "
        f"img2dataset threads {','.join(map(str, args.i2d_threads))}; work folder {workdir}"
    )

    server = start_server(args.server, images, workdir, args.server_workers, server_cores)
    results: list[Result] = []
    smaller: list[Result] = []  # the --also-n runs
    failures: dict[str, str] = {}
    try:
        sizes = [n] + ([args.also_n] if args.also_n else [])
        urls = {}
        for size in sizes:
            urls[size] = workdir / f"urls-{size}.parquet"
            write_url_list(urls[size], size, server.port)

        def common(size: int) -> dict[str, Any]:
            return dict(n=size, cpus=cpus, shard=shard, logs=logs, cores=tool_cores, limit=args.tool_timeout)

        def tag(size: int) -> str:
            return "" if size == n else f" n={size}"

        runs: dict[str, Callable[[], Result]] = {}
        if args.only in (None, "img2dataset"):
            for size in sizes:
                for t in args.i2d_threads:
                    out = workdir / f"img2dataset-t{t}-n{size}"
                    runs[f"img2dataset t={t}{tag(size)}"] = partial(
                        run_img2dataset, urls[size], out, threads=t, **common(size)
                    )
        if args.only in (None, "curate"):
            for size in sizes:
                runs[f"curate{tag(size)}"] = partial(
                    run_curate, args.recipe, urls[size], workdir / f"curate-n{size}",
                    extra_sets=args.curate_set, **common(size)
                )
        # One after the other, img2dataset first, so no Ray process lingers during its run.
        for label, run in runs.items():
            try:
                result = with_server_cpu(server, run)
                result.label = label
                (results if result.samples == n else smaller).append(result)
            except ToolFailed as e:
                print(f"ERROR: {label}: {e}", file=sys.stderr)
                failures[label] = str(e)
    finally:
        server.stop()
        keep = args.keep or args.workdir is not None or bool(failures)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"server: {server.kind} ({args.server_workers} workers)" + (", pinned" if args.pin else "")
    )
    ratio = print_table(results)
    marginal = None
    if smaller:
        print(f"the same on the first {args.also_n} images:")
        print_table(smaller, headline=False)
        marginal = print_marginal(results, smaller)
    if keep:
        print(f"outputs and logs kept in {workdir}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "samples": n,
                    "cpus": cpus,
                    "samples_per_shard": shard,
                    "i2d_threads": args.i2d_threads,
                    "server": server.kind,
                    "server_workers": args.server_workers,
                    "pinned": args.pin,
                    "mean_image_kb": round(total_bytes / n / 1024, 2),
                    "machine_cpus": os.cpu_count(),
                    "settings": SETTINGS,
                    "ratio": ratio,
                    "ratio_against": getattr(best(results, "img2dataset"), "label", None),
                    "results": [asdict(r) for r in results],
                    "also_n": args.also_n,
                    "results_also_n": [asdict(r) for r in smaller],
                    "marginal": marginal,
                    "failures": failures,
                },
                indent=1,
            )
            + "\n"
        )
    ok = not failures and all(
        r.successes == r.samples and r.images_in_tars == r.samples for r in results + smaller
    )
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
