"""What the benchmarks share, written once.

Scripts under ``benchmarks/`` run as ``python benchmarks/X.py`` (their folder is then first
on ``sys.path``) and import from here::

    from _harness import run_curate, start_server, TreeMonitor

- :mod:`.procs`: run a command in its own process group with a time limit (:func:`run_tool`),
  its process tree's CPU seconds and peak memory (:class:`TreeMonitor`), a proxy-free env;
- :mod:`.serve`: synthetic JPEGs, a loopback static server (nginx or aiohttp), a web-latency
  mode (lognormal reply delays, URLs over many loopback hosts);
- :mod:`.curate_cli`: ``curate run`` as a user runs it, its ``manifest.json`` timings;
- :mod:`.img2dataset`: img2dataset in its own virtual environment, its fastest setup.
"""

from .curate_cli import (
    CurateRun,
    Timings,
    curate_command,
    describe_timings,
    run_curate,
    run_stage_alone,
)
from .img2dataset import (
    BENCH_VENV,
    IMG2DATASET_PINS,
    Img2datasetRun,
    ensure_bench_venv,
    run_img2dataset,
)
from .procs import (
    MIB,
    REPO,
    PeakRSS,
    ToolFailed,
    ToolRun,
    TreeMonitor,
    affinity,
    run_tool,
    sigterm_as_interrupt,
    tail,
    tool_env,
    tree_cpu_seconds,
)
from .serve import (
    Latency,
    Server,
    ensure_images,
    image_name,
    loopback_hosts,
    make_jpeg,
    read_all,
    start_server,
    url_list,
)

__all__ = [
    "BENCH_VENV",
    "IMG2DATASET_PINS",
    "MIB",
    "PeakRSS",
    "REPO",
    "CurateRun",
    "Img2datasetRun",
    "Latency",
    "Server",
    "Timings",
    "ToolFailed",
    "ToolRun",
    "TreeMonitor",
    "affinity",
    "curate_command",
    "describe_timings",
    "ensure_bench_venv",
    "ensure_images",
    "image_name",
    "loopback_hosts",
    "make_jpeg",
    "read_all",
    "run_curate",
    "run_stage_alone",
    "run_img2dataset",
    "run_tool",
    "sigterm_as_interrupt",
    "start_server",
    "tail",
    "tool_env",
    "tree_cpu_seconds",
    "url_list",
]
