"""curate launched as a user launches it: ``curate run RECIPE -i … -o … --set …`` in a subprocess.

The run's own timings are read back from ``OUTPUT/manifest.json`` (its ``timings`` object:
``process_start_to_run``, ``ray_start``, ``first_row``, ``phases``, ``finalize``, ``total``,
seconds). A build that does not write them yet gives ``timings = None`` and the reports say
n/a. Nothing here imports curate's engine: only the CLI is run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import ToolFailed, ToolRun, run_tool, tool_env


@dataclass
class Timings:
    """The ``timings`` object of a manifest; every field None when the manifest lacks it."""

    process_start_to_run: float | None = None
    ray_start: float | None = None
    first_row: float | None = None
    phases: list[float] = field(default_factory=list)
    finalize: float | None = None
    total: float | None = None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Timings | None:
        raw = manifest.get("timings")
        if not isinstance(raw, Mapping):
            return None

        def num(key: str) -> float | None:
            v = raw.get(key)
            return float(v) if isinstance(v, int | float) else None

        phases = raw.get("phases")
        return cls(
            process_start_to_run=num("process_start_to_run"),
            ray_start=num("ray_start"),
            first_row=num("first_row"),
            phases=[float(p) for p in phases if isinstance(p, int | float)]
            if isinstance(phases, list)
            else [],
            finalize=num("finalize"),
            total=num("total"),
        )

    @property
    def after_ray_start(self) -> float | None:
        """Process start to manifest, less the interpreter/imports and Ray's start-up."""
        if None in (self.total, self.process_start_to_run, self.ray_start):
            return None
        return self.total - self.process_start_to_run - self.ray_start  # type: ignore[operator]

    @property
    def streaming(self) -> float | None:
        """Seconds rows flowed: the first phase's first row back to its last.

        Everything else — start-up to the first row, later phases, finalize — is paid once
        per run, whatever its size: ``fixed`` = ``total`` − ``streaming``.
        """
        if None in (self.total, self.first_row, self.finalize):
            return None
        later = sum(self.phases[1:])
        return max(0.0, self.total - self.first_row - self.finalize - later)  # type: ignore[operator]

    @property
    def fixed(self) -> float | None:
        s = self.streaming
        return None if s is None or self.total is None else self.total - s

    def describe(self) -> str:
        """One line: the fixed costs of the run, or n/a."""

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"

        return (
            f"start {f(self.process_start_to_run)} s + Ray {f(self.ray_start)} s, first row at "
            f"{f(self.first_row)} s, finalize {f(self.finalize)} s, total {f(self.total)} s − "
            f"per-image time {f(self.streaming)} s = fixed {f(self.fixed)} s"
        )


@dataclass
class CurateRun:
    """One ``curate run``: wall clock and resources of the command, its manifest and timings."""

    run: ToolRun
    output: Path
    manifest: dict[str, Any]
    timings: Timings | None
    command: list[str]

    @property
    def seconds(self) -> float:
        return self.run.seconds

    @property
    def kept(self) -> int:
        return int(self.manifest["counts"]["kept"])

    @property
    def input_rows(self) -> int:
        return int(self.manifest["counts"]["input"])

    def dropped(self) -> dict[str, int]:
        """``stage:reason`` → rows."""
        return {
            f"{stage}:{reason}": v
            for stage, reasons in self.manifest["counts"].get("dropped", {}).items()
            for reason, v in reasons.items()
        }


def curate_command() -> list[str]:
    """The ``curate`` console script next to this interpreter, else ``python -m``-style."""
    exe = Path(sys.executable).with_name("curate")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from curate.cli import main; main()"]


def compile_curate() -> None:
    """Write curate's bytecode (``__pycache__``) before anything is timed, as any first run does.

    Python skips writing it where ``PYTHONDONTWRITEBYTECODE`` is set (some sandboxes and CI
    images): then every process of every run compiles curate's modules from source again, 0.3-0.5 s
    of CPU each, which a user's second run never pays; img2dataset's modules were compiled when pip
    installed them. ``compileall`` writes it whatever that variable says."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("curate")
    if spec is not None and spec.origin:
        compileall.compile_dir(str(Path(spec.origin).parent), quiet=1)


def describe_timings(timings: Timings | None) -> str:
    return timings.describe() if timings else "n/a (this build's manifest has no timings)"


def run_curate(
    recipe: Path,
    output: Path,
    *,
    input_path: str | Path | None = None,
    sets: Sequence[str] = (),
    log_path: Path,
    cores: Sequence[int] | None = None,
    limit: float = 1800.0,
    memory: bool = False,
    interval: float = 0.5,
    verbose: bool = False,
    env: Mapping[str, str] | None = None,
) -> CurateRun:
    """``curate [-v] run RECIPE [-i INPUT] -o OUTPUT --no-progress --set …`` into a fresh ``output``."""
    shutil.rmtree(output, ignore_errors=True)
    compile_curate()
    cli = [*(["-v"] if verbose else []), "run", str(recipe), "-o", str(output), "--no-progress"]
    if input_path is not None:
        cli[cli.index("-o") : cli.index("-o")] = ["-i", str(input_path)]
    for s in sets:
        cli += ["--set", s]
    cmd = [*curate_command(), *cli]
    run = run_tool(
        cmd,
        name="curate",
        log_path=log_path,
        env=tool_env(env),
        cores=cores,
        limit=limit,
        memory=memory,
        interval=interval,
    )
    manifest = json.loads((output / "manifest.json").read_text())
    return CurateRun(run, output, manifest, Timings.from_manifest(manifest), ["curate", *cli])


STAGE_ALONE_SCRIPT = r"""
import json, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from curate.recipe import load_recipe
from curate.stages.base import StageContext
from curate.stages.registry import stage_class
recipe, urls, sets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
r = load_recipe(recipe, overrides=sets, input_path=urls, output_path="/tmp/unused")
cfg = next(c for c in r.stages if c.use == "download")
stage = stage_class("download")(cfg)
stage.setup(StageContext())
t = pq.read_table(urls)
n = t.num_rows
t = pa.table({"key": [f"{i:09d}" for i in range(n)], "url": t["url"], "caption": t["caption"],
              "status": pa.array(["kept"] * n), "dropped_by": pa.nulls(n, pa.string()),
              "reason": pa.nulls(n, pa.string())})
batch = cfg.resources.batch_size or r.runtime.batch_size
c0, w0 = time.process_time(), time.perf_counter()
kept = 0
for start in range(0, n, batch):
    out = stage(t.slice(start, batch))
    kept += sum(1 for s in out["status"].to_pylist() if s == "kept")
cpu, wall = time.process_time() - c0, time.perf_counter() - w0
stage.teardown()
print(json.dumps({"images": n, "kept": kept, "cpu_seconds": cpu, "wall_seconds": wall}))
"""


def run_stage_alone(recipe: Path, urls: Path, sets: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """The recipe's download stage alone, in one process (no Ray), over a URL list: its CPU seconds
    (``cpu_seconds``, after set-up and imports), images and kept rows. The bar a whole run's CPU per
    image is measured against."""
    proc = subprocess.run([sys.executable, "-c", STAGE_ALONE_SCRIPT, str(recipe), str(urls), json.dumps(list(sets))],
                          capture_output=True, text=True, env=tool_env(), timeout=timeout)
    if proc.returncode != 0:
        raise ToolFailed(f"download stage in-process: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
