"""What ``write.thumbnails`` costs: a run's CPU with and without it, and the CPU of the sampling code.

The offline demo world (``curate demo``: 2,000 served images, planted defects, every filter
and dedup level) is generated once; then ``curate demo --world W --recipe R --set
write.thumbnails=true|false`` runs alternately, ``--reps`` times each, every run in its own
process tree measured by the harness (CPU seconds of the command, Ray and its workers).

The A/B difference is within the noise of a shared machine, so the sampling code is also
timed inside the runs with thumbnails: a ``sitecustomize`` on PYTHONPATH (inherited by Ray's
workers) wraps the entry points of :mod:`curate.engine.samples` and the report's reading of
:mod:`curate.stats.thumbnails`, and adds up their thread CPU time (outermost calls only) per
process. That sum over the run's CPU is the cost the README quotes.

Run::

    python benchmarks/thumbnails.py                                  # demo.yaml and datacomp-basic.yaml, 3 reps
    python benchmarks/thumbnails.py --recipes pipelines/datacomp-basic.yaml --samples 10000 --reps 2
    python benchmarks/thumbnails.py --samples-per-shard 500                    # many small shards: the worst case
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the shared harness, as `python benchmarks/X.py` runs
from _harness.procs import REPO, run_tool, tool_env  # noqa: E402

#: As demo.yaml sets them, for any recipe: the world is served on 127.0.0.1 and its failures are permanent.
DOWNLOAD_SETTINGS = ["stages.0.allow_private_networks=true", "stages.0.timeout=2", "stages.0.retries=0"]

PROBED = {
    "curate.engine.samples": ["sample_drops", "split_samples", "write_table", "pick_global", "write_global_picks",
                              "read_global_picks", "thumbnail_wanted", "sample_kept", "shard_sample_paths",
                              "sample_shard", "merge_run"],
    "curate.stats.thumbnails": ["read_samples", "gallery", "thumbnail_uris"],
}

SITECUSTOMIZE = textwrap.dedent('''
    """Benchmark probe: thread CPU seconds spent in curate's thumbnail code, per process."""
    import importlib.abc, importlib.machinery, json, os, sys, threading, time

    _DIR = os.environ.get("CURATE_THUMB_PROBE")
    _PROBED = json.loads(os.environ.get("CURATE_THUMB_PROBED", "{}"))
    _TOTALS, _CALLS = {}, {}
    _LOCK, _LOCAL = threading.Lock(), threading.local()


    def _flush():
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"seconds": _TOTALS, "calls": _CALLS}, f)
        os.replace(path + ".tmp", path)


    def _wrap(mod, name):
        fn = getattr(mod, name)

        def probed(*a, **k):
            depth = getattr(_LOCAL, "depth", 0)
            _LOCAL.depth = depth + 1
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                _LOCAL.depth = depth
                if depth == 0:  # outermost only: inner probed calls are inside this time
                    dt = time.thread_time() - t0
                    with _LOCK:
                        _TOTALS[name] = _TOTALS.get(name, 0.0) + dt
                        _CALLS[name] = _CALLS.get(name, 0) + 1
                        _flush()

        setattr(mod, name, probed)


    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in _PROBED:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                for name in _PROBED[fullname]:
                    _wrap(module, name)

            spec.loader.exec_module = exec_module
            return spec


    if _DIR:
        sys.meta_path.insert(0, _Finder())
''')


def probe_totals(probe_dir: Path) -> tuple[float, dict[str, float], dict[str, int]]:
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    for p in probe_dir.glob("*.json"):
        d = json.loads(p.read_text())
        for k, v in d["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
        for k, v in d["calls"].items():
            calls[k] = calls.get(k, 0) + v
    return sum(seconds.values()), seconds, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["pipelines/demo.yaml", "pipelines/datacomp-basic.yaml"])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples-per-shard", type=int, default=10000,
                    help="write.samples_per_shard (the recipes' default, 10,000): the sample costs up to k "
                         "thumbnails per stage, reason and shard, so small shards cost more per row")
    ap.add_argument("--work", type=Path, default=None, help="keep world and outputs here (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="curate-thumb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    site = work / "probe_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    world = work / "world"
    base = [sys.executable, "-m", "curate.cli", "demo", "--world", str(world), "--samples", str(args.samples),
            "--no-progress", "--overwrite"]
    print(f"world: {world} (generated by the first, untimed run)")
    run_tool(base + ["-o", str(work / "warm")], name="warm-up", log_path=work / "warm.log", limit=1800)
    results = []
    for recipe in args.recipes:
        for rep in range(args.reps):
            for mode in (("true", "false") if rep % 2 == 0 else ("false", "true")):
                tag = f"{Path(recipe).stem}-{mode}-{rep}"
                probe = work / "probe" / tag
                probe.mkdir(parents=True, exist_ok=True)
                env = tool_env({"PYTHONPATH": f"{site}:{REPO}", "CURATE_THUMB_PROBE": str(probe),
                                "CURATE_THUMB_PROBED": json.dumps(PROBED)})
                settings = [*DOWNLOAD_SETTINGS, f"write.thumbnails={mode}",
                            f"write.samples_per_shard={args.samples_per_shard}"]
                sets = [x for kv in settings for x in ("--set", kv)]
                r = run_tool(base + ["-o", str(work / tag), "--recipe", str(REPO / recipe), *sets],
                             name=tag, log_path=work / f"{tag}.log", env=env, limit=1800)
                total, per, calls = probe_totals(probe)
                sample = work / tag / "_work" / "samples.parquet"
                n = 0
                if sample.exists():
                    import pyarrow.parquet as pq

                    n = pq.read_metadata(sample).num_rows
                results.append({"recipe": recipe, "thumbnails": mode == "true", "rep": rep, "wall": round(r.seconds, 2),
                                "cpu": round(r.cpu_seconds, 2), "probe_cpu": round(total, 3),
                                "probe": {k: round(v, 3) for k, v in sorted(per.items())}, "calls": calls,
                                "samples": n})
                print(json.dumps(results[-1]), flush=True)
    print("\nrecipe | thumbnails | runs | CPU s (median) | wall s (median) | sampling code CPU s | share of run CPU")
    for recipe in args.recipes:
        for on in (True, False):
            rs = [r for r in results if r["recipe"] == recipe and r["thumbnails"] == on]
            cpu = statistics.median(r["cpu"] for r in rs)
            probe = statistics.median(r["probe_cpu"] for r in rs)
            shares = [r["probe_cpu"] / r["cpu"] * 100 for r in rs]
            print(f"{recipe} | {on} | {len(rs)} | {cpu:.1f} | {statistics.median(r['wall'] for r in rs):.1f} | "
                  f"{probe:.3f} | {min(shares):.2f}-{max(shares):.2f} %")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
