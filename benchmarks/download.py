"""Download benchmark: curate vs img2dataset on the same URL list, side by side in one run.

Serves N clean JPEGs (default 20,000; 256-512 px per side, 15-40 KB, generated
once from a fixed seed and cached under ``benchmarks/.cache/``) from a server on
loopback, then downloads them with resize to 256 px (``border``) with img2dataset
and with curate, one after the other: same URL list, same settings, same number
of CPUs, same server. Prints samples/s for each and the ratio curate / img2dataset;
the goal is curate >= 1.5x.

Run it from the repository root with curate's own virtual environment::

    .venv/bin/python benchmarks/download.py                     # 20,000 images, all CPUs
    .venv/bin/python benchmarks/download.py -n 500 --cpus 2     # a quick check
    .venv/bin/python benchmarks/download.py --cpus 12 --pin --json bench.json
    .venv/bin/python benchmarks/download.py --only curate --keep
    .venv/bin/python benchmarks/download.py -n 20000 --also-n 5000 --cpus 2   # + per-image rates
    .venv/bin/python benchmarks/download.py -n 20000 --also-n 5000 --cpus 2 --stage-cpu  # + CPU per image
    .venv/bin/python benchmarks/download.py --latency-median-ms 200 --latency-sigma 0.5 --hosts 32

**Web-latency mode** (``--latency-median-ms``): every reply waits a lognormal time
(median and sigma as given; the delay depends only on the file name, so both tools meet
the same delays) and the URLs are spread over ``--hosts`` loopback addresses
(127.0.0.2 …; default 32), as a crawl spreads over many sites. Downloads then wait on
the network rather than on the CPU, and concurrency decides the rate: curate runs at
``concurrency_per_worker`` 64, 256 and 1024 (``--curate-concurrency``; its
``max_connections_per_host`` is raised where the hosts would cap that concurrency) and
img2dataset at ``thread_count`` 64 and 256, and each run is compared with
img2dataset's fastest.

The tools run as a user runs them: img2dataset's command line from its own virtual
environment (``.bench-venv/``, created on first use: see ``_harness/img2dataset.py``),
and ``curate run`` (see ``_harness/curate_cli.py``), whose fixed costs come from the
``timings`` its manifest records (first row, finalize; "n/a" from a build without them).

Fairness:

- Server: nginx (``apt-get install -y nginx``) when it is on PATH, else an aiohttp
  server in a separate process (always aiohttp in the latency mode); loopback only,
  access logs off. The same server process serves every tool; its files are read once
  before any tool starts so all find them in the page cache.
- CPUs: img2dataset gets ``--processes_count C``, curate ``runtime.num_cpus=C``.
  With ``--pin`` both tools are confined to cores ``0..C-1`` and the server to
  the remaining ones (use it with ``--cpus`` below the machine's count).
- Shards: both use the same samples per shard. img2dataset runs one shard per
  process at a time, so the default cuts N into about 4 shards per CPU.
- img2dataset runs once per ``--i2d-threads`` value (default 64 and 256, its
  default) and curate is compared with the fastest of those runs.
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
manifest's ``timings.total`` less ``process_start_to_run`` and ``ray_start``.
Each run's CPU seconds (the tool's whole process tree, sampled) are printed too.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _harness import (
    REPO,
    Latency,
    Server,
    ToolFailed,
    describe_timings,
    ensure_bench_venv,
    ensure_images,
    read_all,
    run_curate,
    run_img2dataset,
    run_stage_alone,
    sigterm_as_interrupt,
    start_server,
    url_list,
)

log = logging.getLogger("benchmarks.download")

CACHE = REPO / "benchmarks" / ".cache"
RECIPE = REPO / "pipelines" / "download.yaml"
RECIPE_SCHEMA = REPO / "schemas" / "recipe.schema.json"

SHARDS_PER_CPU = 4  # enough shards that img2dataset's processes stay busy to the end
MIN_SHARD = 50
SERVER_WORKERS = 2  # nginx with sendfile serves >20k small files/s per worker
TOOL_TIMEOUT = 1800.0  # a tool that hangs is stopped and reported, the others still run
#: img2dataset threads per process to try. Its default is 256 (its examples use 64-128); on
#: loopback fewer threads may do better, so both run and the fastest is compared.
I2D_THREADS = (64, 256)
#: The latency mode's defaults: curate's concurrency_per_worker values and the hosts.
LATENCY_CONCURRENCY = (64, 256, 1024)
LATENCY_HOSTS = 32
DEFAULT_PER_HOST = 16  # curate's max_connections_per_host default, when the recipe has none

#: What both tools are told, by img2dataset's option names (curate's download stage uses the same).
SETTINGS: dict[str, Any] = {
    "image_size": 256,
    "resize_mode": "border",
    "encode_format": "jpg",
    "encode_quality": 95,
    "timeout": 10,
    "retries": 0,
}


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


# ------------------------------------------------------------------ the two tools


def i2d_result(urls: Path, out: Path, *, n: int, cpus: int, threads: int, shard: int,
               logs: Path, cores: Sequence[int] | None, limit: float) -> Result:
    r = run_img2dataset(
        urls, out, processes=cpus, threads=threads, samples_per_shard=shard, settings=SETTINGS,
        log_path=logs / f"img2dataset-t{threads}-n{n}.log", cores=cores, limit=limit,
    )
    in_tars, size = count_tar_images(out)
    return Result(
        "img2dataset", n, r.successes, in_tars, r.seconds, r.span_seconds, command=r.command,
        extra={"count": r.count, "errors": r.errors, "image_size_seen": size, "threads": threads,
               "cpu_seconds": r.run.cpu_seconds,
               "outside_shards_seconds": r.seconds - r.span_seconds if r.span_seconds else None},
    )


def download_stage(recipe: Path) -> tuple[int, dict[str, Any]]:
    """Index and options of the recipe's ``use: download`` stage."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    for i, s in enumerate(data.get("stages") or []):
        if isinstance(s, dict) and s.get("use") == "download":
            return i, s
    raise SystemExit(f"{recipe}: no stage with `use: download`")


def download_options() -> set[str]:
    """The download stage's option names, from the recipe JSON Schema curate publishes."""
    schema = json.loads(RECIPE_SCHEMA.read_text())
    props = schema.get("$defs", {}).get("DownloadConfig", {}).get("properties")
    if not props:
        raise SystemExit(f"{RECIPE_SCHEMA}: no DownloadConfig; does curate have a download stage?")
    return set(props)


def curate_overrides(recipe: Path, *, cpus: int, shard: int, concurrency: int | None = None,
                     hosts: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """``--set`` arguments giving the recipe's download stage the benchmark's settings."""
    idx, stage = download_stage(recipe)
    wanted: dict[str, Any] = dict(SETTINGS, allow_private_networks=True, compute_hash="sha256")
    if concurrency is not None:
        wanted["concurrency_per_worker"] = concurrency
        per_host = int(stage.get("max_connections_per_host") or DEFAULT_PER_HOST)
        if per_host * hosts < concurrency:  # a cap img2dataset does not have: lift it
            wanted["max_connections_per_host"] = math.ceil(concurrency / hosts)
    fields = download_options()
    sets = []
    for k, v in wanted.items():
        if k in fields:
            sets.append(f"stages.{idx}.{k}={json.dumps(v)}")
        else:
            log.warning("curate's download stage has no option %r; leaving its default", k)
    return [*sets, f"runtime.num_cpus={cpus}", f"write.samples_per_shard={shard}",
            "write.formats=[webdataset]", *extra]


def curate_result(recipe: Path, urls: Path, out: Path, *, n: int, cpus: int, shard: int,
                  logs: Path, cores: Sequence[int] | None, limit: float,
                  concurrency: int | None = None, hosts: int = 1,
                  extra_sets: Sequence[str] = ()) -> Result:
    if not recipe.exists():
        raise SystemExit(f"{recipe} does not exist (yet)")
    sets = curate_overrides(recipe, cpus=cpus, shard=shard, concurrency=concurrency,
                            hosts=hosts, extra=extra_sets)
    tag = f"-c{concurrency}" if concurrency else ""
    r = run_curate(recipe, out, input_path=urls, sets=sets, log_path=logs / f"curate{tag}-n{n}.log",
                   cores=cores, limit=limit)
    in_tars, size = count_tar_images(out)
    t = r.timings
    return Result(
        "curate", n, r.kept, in_tars, r.seconds, t.after_ray_start if t else None,
        command=r.command,
        extra={"count": r.input_rows, "errors": r.dropped(), "image_size_seen": size,
               "concurrency_per_worker": concurrency, "cpu_seconds": r.run.cpu_seconds,
               "cpu_by_role": r.run.monitor.get("cpu_by_role"),
               "timings": asdict(t) if t else None, "fixed_costs": describe_timings(t),
               "manifest_elapsed_seconds": r.manifest.get("elapsed_seconds"),
               "stages": r.manifest.get("recipe", {}).get("stages")},
    )


def stage_cpu(recipe: Path, urls: Path, *, cpus: int, shard: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The download stage alone, in one process (no Ray): CPU seconds per image, the bar the whole
    run's CPU per image is measured against (engine overhead = run / stage)."""
    sets = curate_overrides(recipe, cpus=cpus, shard=shard, extra=extra)
    return run_stage_alone(recipe, urls, sets, timeout=TOOL_TIMEOUT)


# ------------------------------------------------------------------ report


def print_table(results: list[Result], *, headline: bool = True) -> float | None:
    """Print the comparison; return curate/img2dataset samples/s (None unless both ran)."""
    head = ("tool", "samples", "successes", "in tars", "seconds", "samples/s",
            "excl. start-up s", "samples/s")
    rows = [head]
    for r in results:
        excl = f"{r.seconds_excl_startup:.1f}" if r.seconds_excl_startup else "-"
        rate = f"{r.samples_per_s_excl_startup:.0f}" if r.samples_per_s_excl_startup else "-"
        rows.append((r.label, str(r.samples), str(r.successes), str(r.images_in_tars),
                     f"{r.seconds:.1f}", f"{r.samples_per_s:.0f}", excl, rate))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for j, row in enumerate(rows):
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for r in results:
        cpu = r.extra.get("server_cpu_seconds")
        if cpu is not None:
            print(f"server CPU during {r.label}: {cpu:.1f} s ({cpu / r.seconds:.0%} of one core)")
    for r in results:
        cpu = r.extra.get("cpu_seconds")
        if cpu:
            per = f" ({cpu / r.successes * 1000:.1f} ms per image)" if r.successes else ""
            print(f"CPU of {r.label} (its whole process tree): {cpu:.1f} s{per}")
            roles = r.extra.get("cpu_by_role")
            if roles and r.tool == "curate":
                print("  by process: " + ", ".join(f"{k} {v:.1f} s" for k, v in roles.items() if v >= 0.5))
    for r in results:
        if r.tool == "curate":
            print(f"fixed costs of {r.label}: {r.extra.get('fixed_costs')}")
        elif r.extra.get("outside_shards_seconds") is not None:
            print(f"fixed costs of {r.label}: wall {r.seconds:.1f} s − its shards' span "
                  f"{r.seconds_excl_startup:.1f} s = {r.extra['outside_shards_seconds']:.1f} s "
                  "outside its shards")
    for r in results:
        if r.successes != r.samples or r.images_in_tars != r.samples:
            print(f"WARNING: {r.label} stored {r.successes} ({r.images_in_tars} in tars) of "
                  f"{r.samples}; errors: {r.extra.get('errors')}")
        if r.extra.get("image_size_seen") not in (None, (256, 256), [256, 256]):
            print(f"WARNING: {r.label} wrote {r.extra['image_size_seen']} images, expected 256x256")
    cur, base = best(results, "curate"), best(results, "img2dataset")
    if not headline or cur is None or base is None or not base.samples_per_s:
        return None
    if sum(r.tool == "curate" for r in results) > 1:
        print(f"each curate run against the fastest img2dataset ({base.label}, "
              f"{base.samples_per_s:.0f} samples/s):")
        for r in results:
            if r.tool == "curate":
                print(f"  {r.label}: {r.samples_per_s / base.samples_per_s:.2f}x")
    ratio = cur.samples_per_s / base.samples_per_s
    line = f"curate / {base.label}: {ratio:.2f}x samples/s (wall clock; goal >= 1.5x)"
    if cur.label != "curate":
        line = f"{cur.label} / {base.label}: {ratio:.2f}x samples/s (wall clock; goal >= 1.5x)"
    a, b = cur.samples_per_s_excl_startup, base.samples_per_s_excl_startup
    if a and b:
        line += f"; {a / b:.2f}x excluding start-up"
    print(line)
    return ratio


def smaller_run(big: Result, smaller: list[Result]) -> Result | None:
    """The --also-n run of the same tool and settings as ``big`` (labelled ``"<big's label> n=M"``)."""
    return next((r for r in smaller if r.label == f"{big.label} n={r.samples}"), None)


def print_marginal(results: list[Result], smaller: list[Result]) -> dict[str, Any]:
    """Print each run's rate over the images the N run has beyond the M run; return the figures.

    Both tools pay a start-up once (interpreters, Ray, actors, a report) and then a cost per
    image; the difference of two runs of the same settings cancels the first.
    """
    pairs = {}
    print("rate over the extra images (N run minus M run: start-up cancels out):")
    for big in results:
        small = smaller_run(big, smaller)
        if small is None or big.seconds <= small.seconds or big.successes <= small.successes:
            print(f"  {big.label}: no rate (the N run is not both longer and larger than the M run)")
            continue
        rate = (big.successes - small.successes) / (big.seconds - small.seconds)
        fixed = small.seconds - small.successes / rate
        pairs[big.label] = {"tool": big.tool, "rate": rate, "start_up_seconds": fixed}
        print(f"  {big.label}: {big.samples - small.samples} more images in "
              f"{big.seconds - small.seconds:.1f} s more: {rate:.0f} samples/s; "
              f"start-up about {fixed:.1f} s")
    cur = [v["rate"] for v in pairs.values() if v["tool"] == "curate"]
    base = [v["rate"] for v in pairs.values() if v["tool"] == "img2dataset"]
    out: dict[str, Any] = {"runs": pairs}
    if cur and base:
        out["ratio"] = max(cur) / max(base)
        print(f"curate / fastest img2dataset per image: {out['ratio']:.2f}x")
    return out


def print_cpu_per_row(results: list[Result], smaller: list[Result], stage_per_image: float) -> dict[str, Any]:
    """Split each curate run's CPU into a fixed part and a part per image (the N run minus the M
    run, as :func:`print_marginal` does for time) and print the latter against the stage alone's.

    The whole run's CPU per image mixes the two: start-up (interpreters, imports, Ray's daemons,
    the actors' set-up, the report) is paid once, and a longer list spreads it thinner."""
    out = {}
    for big in results:
        small = smaller_run(big, smaller)
        cpu_big = big.extra.get("cpu_seconds") if big.tool == "curate" else None
        cpu_small = small.extra.get("cpu_seconds") if small is not None else None
        if not cpu_big or not cpu_small or big.samples <= small.samples:
            continue
        per_row = (cpu_big - cpu_small) / (big.samples - small.samples)
        fixed = cpu_small - small.samples * per_row
        out[big.label] = {"cpu_per_image": per_row, "fixed_cpu_seconds": fixed,
                          "over_stage": per_row / stage_per_image}
        print(f"  {big.label}: per image beyond the first {small.samples} {per_row * 1000:.2f} ms = "
              f"{per_row / stage_per_image:.2f}x the stage's; fixed about {fixed:.1f} s of CPU")
    return out


def best(results: list[Result], tool: str) -> Result | None:
    """The tool's fastest run by wall-clock samples/s."""
    runs = [r for r in results if r.tool == tool]
    return max(runs, key=lambda r: r.samples_per_s) if runs else None


def with_server_cpu(server: Server, run: Callable[[], Result]) -> Result:
    """Run one tool and note the server's CPU seconds meanwhile (it must stay far from busy)."""
    before = server.cpu_seconds()
    result = run()
    result.extra["server_cpu_seconds"] = round(server.cpu_seconds() - before, 2)
    return result


# ------------------------------------------------------------------ main


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--samples", type=int, default=20_000,
                   help="images to serve and download (20000)")
    p.add_argument("--cpus", type=int,
                   default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(),
                   help="CPUs for each tool: img2dataset processes, curate runtime.num_cpus (all)")
    p.add_argument("--i2d-threads", type=_int_list, default=list(I2D_THREADS),
                   help="img2dataset --thread_count per process; a comma list runs it once per "
                   "value and compares curate with the fastest (default: 64,256; 256 is "
                   "img2dataset's default)")
    p.add_argument("--curate-concurrency", type=_int_list, default=None,
                   help="curate concurrency_per_worker; a comma list runs curate once per value "
                   "(default: the recipe's; 64,256,1024 in the latency mode)")
    p.add_argument("--latency-median-ms", type=float, default=None, metavar="MS",
                   help="web-latency mode: delay every reply by a lognormal time of this median")
    p.add_argument("--latency-sigma", type=float, default=0.5,
                   help="sigma of the lognormal reply delay (0.5)")
    p.add_argument("--hosts", type=int, default=None,
                   help="spread the URLs over this many loopback addresses, 127.0.0.2 … "
                   f"(default: 1, i.e. 127.0.0.1; {LATENCY_HOSTS} in the latency mode)")
    p.add_argument("--recipe", type=Path, default=RECIPE,
                   help=f"curate recipe with a `use: download` stage ({RECIPE.relative_to(REPO)})")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help=f"both tools; default about {SHARDS_PER_CPU} shards per CPU, "
                   f"at least {MIN_SHARD}")
    p.add_argument("--curate-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `curate run --set` (repeatable), e.g. "
                   "stages.0.resources.batch_size=512")
    p.add_argument("--also-n", type=int, default=None, metavar="M",
                   help="also run every tool on the first M images (same shard size) and print "
                   "each tool's rate over the other N-M: the per-image rate, without the "
                   "start-up both pay once")
    p.add_argument("--only", choices=("curate", "img2dataset"), help="run one tool")
    p.add_argument("--stage-cpu", action="store_true",
                   help="also run curate's download stage alone in one process (no Ray) and print each "
                        "curate run's CPU per image against it: the engine's overhead (with --also-n, "
                        "also per image beyond the first M, the fixed CPU left out)")
    p.add_argument("--server", choices=("auto", "nginx", "aiohttp"), default="auto",
                   help="static server: nginx when on PATH, else aiohttp (aiohttp with latency)")
    p.add_argument("--server-workers", type=int, default=SERVER_WORKERS,
                   help=f"server processes ({SERVER_WORKERS})")
    p.add_argument("--pin", action="store_true",
                   help="pin the tools to cores 0..CPUS-1 and the server to the others")
    p.add_argument("--cache", type=Path, default=CACHE,
                   help=f"image cache ({CACHE.relative_to(REPO)})")
    p.add_argument("--workdir", type=Path, default=None,
                   help="URL list, outputs and logs (a temp folder)")
    p.add_argument("--tool-timeout", type=float, default=TOOL_TIMEOUT,
                   help=f"stop a tool that runs longer, report it and go on ({TOOL_TIMEOUT:.0f} s)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (outputs, logs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = p.parse_args(argv)
    if args.samples < 1 or args.cpus < 1 or min(args.i2d_threads) < 1:
        p.error("--samples, --cpus and --i2d-threads must be >= 1")
    if args.also_n is not None and not 0 < args.also_n < args.samples:
        p.error(f"--also-n must be between 1 and --samples - 1 ({args.samples - 1})")
    latency = args.latency_median_ms is not None
    if latency and (args.latency_median_ms <= 0 or args.latency_sigma < 0):
        p.error("--latency-median-ms must be > 0 and --latency-sigma >= 0")
    if args.hosts is None:
        args.hosts = LATENCY_HOSTS if latency else 1
    if not 1 <= args.hosts <= 250:
        p.error("--hosts must be between 1 and 250")
    if args.curate_concurrency is None and latency:
        args.curate_concurrency = list(LATENCY_CONCURRENCY)
    if args.curate_concurrency is not None and min(args.curate_concurrency, default=0) < 1:
        p.error("--curate-concurrency must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    n, cpus = args.samples, args.cpus
    shard = args.samples_per_shard or max(MIN_SHARD, math.ceil(n / (SHARDS_PER_CPU * cpus)))
    latency = (Latency(args.latency_median_ms / 1000, args.latency_sigma)
               if args.latency_median_ms is not None else None)
    tool_cores = server_cores = None
    if args.pin:
        avail = sorted(os.sched_getaffinity(0))
        if cpus >= len(avail):
            raise SystemExit(f"--pin needs --cpus below the {len(avail)} available cores, "
                             "to leave some to the server")
        tool_cores, server_cores = avail[:cpus], avail[cpus:]

    if args.only != "curate":
        ensure_bench_venv()  # before any timing: a first install must not look like img2dataset's time
    images = ensure_images(n, args.cache, workers=os.cpu_count() or 1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    total_bytes = read_all(images, n)
    concurrency = (f", curate concurrency_per_worker {','.join(map(str, args.curate_concurrency))}"
                   if args.curate_concurrency else "")
    print(f"{n} images, {total_bytes / n / 1024:.1f} KB mean, {cpus} CPUs, {shard} samples per "
          f"shard, img2dataset threads {','.join(map(str, args.i2d_threads))}{concurrency}; "
          f"work folder {workdir}")

    server = start_server(images, workdir, kind=args.server, workers=args.server_workers,
                          hosts=args.hosts, latency=latency, cores=server_cores)
    results: list[Result] = []
    smaller: list[Result] = []  # the --also-n runs
    failures: dict[str, str] = {}
    try:
        sizes = [n] + ([args.also_n] if args.also_n else [])
        urls = {}
        for size in sizes:
            urls[size] = workdir / f"urls-{size}.parquet"
            url_list(urls[size], size, server)

        def common(size: int) -> dict[str, Any]:
            return dict(n=size, cpus=cpus, shard=shard, logs=logs, cores=tool_cores,
                        limit=args.tool_timeout)

        def tag(size: int) -> str:
            return "" if size == n else f" n={size}"

        runs: dict[str, Callable[[], Result]] = {}
        if args.only in (None, "img2dataset"):
            for size in sizes:
                for t in args.i2d_threads:
                    runs[f"img2dataset t={t}{tag(size)}"] = partial(
                        i2d_result, urls[size], workdir / f"img2dataset-t{t}-n{size}", threads=t,
                        **common(size))
        if args.only in (None, "curate"):
            for size in sizes:
                for c in args.curate_concurrency or [None]:
                    label = "curate" if c is None else f"curate c={c}"
                    out = workdir / f"curate{'' if c is None else f'-c{c}'}-n{size}"
                    runs[f"{label}{tag(size)}"] = partial(
                        curate_result, args.recipe, urls[size], out, concurrency=c,
                        hosts=args.hosts, extra_sets=args.curate_set, **common(size))
        # One after the other, img2dataset first, so no Ray process lingers during its run.
        for label, run in runs.items():
            try:
                result = with_server_cpu(server, run)
                result.label = label
                (results if result.samples == n else smaller).append(result)
            except ToolFailed as e:
                print(f"ERROR: {label}: {e}", file=sys.stderr)
                failures[label] = str(e)
        stage = None
        if args.stage_cpu:
            stage = stage_cpu(args.recipe, urls[n], cpus=cpus, shard=shard, extra=args.curate_set)
    finally:
        server.stop()
        keep = args.keep or args.workdir is not None or bool(failures)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"server: {server.describe()}" + (", pinned" if args.pin else ""))
    ratio = print_table(results)
    marginal = None
    if smaller:
        print(f"the same on the first {args.also_n} images:")
        print_table(smaller, headline=False)
        marginal = print_marginal(results, smaller)
    if stage is not None:
        per = stage["cpu_seconds"] / stage["images"]
        print(f"download stage alone, one process: {stage['cpu_seconds']:.1f} s CPU for {stage['images']} "
              f"images ({stage['kept']} kept) = {per * 1000:.2f} ms per image")
        for r in results:
            cpu = r.extra.get("cpu_seconds") if r.tool == "curate" else None
            if cpu:
                print(f"  {r.label}: whole run {cpu:.1f} s CPU = {cpu / n * 1000:.2f} ms per image = "
                      f"{cpu / n / per:.2f}x the stage's (goal <= 1.2x)")
        if marginal is not None:
            marginal["cpu"] = print_cpu_per_row(results, smaller, per)
    if keep:
        print(f"outputs and logs kept in {workdir}")
    if args.json:
        args.json.write_text(json.dumps({
            "samples": n, "cpus": cpus, "samples_per_shard": shard,
            "i2d_threads": args.i2d_threads, "curate_concurrency": args.curate_concurrency,
            "latency": asdict(latency) if latency else None, "hosts": args.hosts,
            "server": server.kind, "server_workers": args.server_workers, "pinned": args.pin,
            "mean_image_kb": round(total_bytes / n / 1024, 2), "machine_cpus": os.cpu_count(),
            "settings": SETTINGS, "ratio": ratio,
            "ratio_against": getattr(best(results, "img2dataset"), "label", None),
            "results": [asdict(r) for r in results], "also_n": args.also_n,
            "results_also_n": [asdict(r) for r in smaller], "marginal": marginal,
            "failures": failures, "stage_cpu": stage,
        }, indent=1) + "\n")
    ok = not failures and all(r.successes == r.samples and r.images_in_tars == r.samples
                              for r in results + smaller)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
