"""img2dataset in its own virtual environment, run the way its docs make it fastest.

img2dataset 1.47.0 pins ``webdataset<0.3`` and ``pandas<3``, which conflict with curate's
dependencies, so it runs from ``.bench-venv/`` at the repository root, created on first use
with ``python -m venv`` and ``pip install`` of :data:`IMG2DATASET_PINS` (needs PyPI once,
about 20 s; reused afterwards). The pins are a set that installs and runs on Python 3.11,
pinned so two machines measure the same code.

Its documented fastest setup on one machine: the ``multiprocessing`` distributor, one
process per CPU (``processes_count``), many threads per process (``thread_count``; 256 is
its default, its examples use 64-128), wandb off, and shards small enough that every
process stays busy to the end (it runs one shard per process at a time).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import REPO, ToolRun, run_tool, tool_env

log = logging.getLogger("benchmarks.harness")

BENCH_VENV = REPO / ".bench-venv"

#: What ``.bench-venv`` gets: img2dataset 1.47.0 with the versions its requirements resolved
#: to on Python 3.11 (Nov 2025); all are wheels.
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
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *IMG2DATASET_PINS],
        check=True,
    )
    return exe


@dataclass
class Img2datasetRun:
    """One img2dataset command: wall clock and resources, and its ``*_stats.json`` summed."""

    run: ToolRun
    output: Path
    command: list[str]
    successes: int
    count: int
    errors: dict[str, int]
    #: first shard's start_time to last shard's end_time: its work without interpreter start-up
    span_seconds: float | None
    stats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.run.seconds


def run_img2dataset(
    urls: Path,
    output: Path,
    *,
    processes: int,
    threads: int,
    samples_per_shard: int,
    settings: Mapping[str, Any],
    log_path: Path,
    cores: Sequence[int] | None = None,
    limit: float = 1800.0,
    input_format: str = "parquet",
) -> Img2datasetRun:
    """``img2dataset`` over a URL list (``url``, ``caption`` columns) into WebDataset tars.

    ``settings``: further options by img2dataset's names (image_size, resize_mode, timeout…).
    """
    exe = ensure_bench_venv()
    shutil.rmtree(output, ignore_errors=True)
    cmd = [
        str(exe),
        "--url_list", str(urls),
        "--input_format", input_format,
        "--url_col", "url",
        "--caption_col", "caption",
        "--output_format", "webdataset",
        "--output_folder", str(output),
        "--processes_count", str(processes),
        "--thread_count", str(threads),
        "--number_sample_per_shard", str(samples_per_shard),
        "--enable_wandb", "False",
        "--distributor", "multiprocessing",
    ]  # fmt: skip
    for k, v in settings.items():
        cmd += [f"--{k}", str(v)]
    run = run_tool(
        cmd, name="img2dataset", log_path=log_path, env=tool_env(), cores=cores, limit=limit
    )
    stats = [json.loads(p.read_text()) for p in sorted(output.glob("*_stats.json"))]
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in s.get("status_dict", {}).items():
            if k != "success":
                errors[k] = errors.get(k, 0) + v
    span = (
        max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats) if stats else None
    )
    return Img2datasetRun(
        run,
        output,
        cmd,
        successes=sum(s.get("successes", 0) for s in stats),
        count=sum(s.get("count", 0) for s in stats),
        errors=errors,
        span_seconds=span,
        stats=stats,
    )
