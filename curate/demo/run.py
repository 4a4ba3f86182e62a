"""``curate demo``: run a real recipe on a synthetic world and grade every stage against the truth.

The demo needs no network and no data: it generates a world of rendered
scenes with planted defects (:mod:`curate.demo.world`), serves it on
127.0.0.1 (:mod:`curate.demo.server`), writes the URL list, runs
``pipelines/demo.yaml`` with :func:`curate.runner.run` (its ``clip_tags`` stage reads the
world's tag vocabulary, which the demo writes as ``demo_vocabulary.txt``), and then — because the
truth of every row is known — says how well each stage did.

How a stage is graded
---------------------
:data:`RESPONSIBLE` maps a stage (by its recipe name, else by its ``use``) to
the truth categories it should drop. A category may belong to several stages
(tiny images: ``download`` through ``min_image_size``, or ``image_rules``);
whichever runs first gets the credit, and later stages only see what is left.

For a stage *S* with categories *C*:

- *reached*: rows still kept when they came to *S* (not dropped by an earlier
  stage; recipe order, ``source`` first). A defect caught earlier never counts
  for or against *S*.
- *expected*: the reached rows whose category is in *C*. Duplicate categories
  are counted per group instead of per row: a group (an original and its
  copy) with *m* members reaching *S* expects *m - 1* drops, and it does not
  matter which member is kept.
- *correct*: rows *S* dropped that it was expected to drop (per group at most
  *m - 1*).
- **precision** = correct / rows *S* dropped — of what it removed, how much
  was its job. Dropping a clean row, or another stage's defect, lowers it.
- **recall** = correct / expected — of the defects it should catch that
  reached it, how many it caught.

Either is ``null`` when its denominator is 0. A stage in the recipe but not in
:data:`RESPONSIBLE` is reported with its drops by category and no scores;
entries of :data:`RESPONSIBLE` whose stage is not in the recipe are skipped.
The overall scores grade the whole pipeline the same way (every defect
category is expected to be dropped by someone), and ``uncovered`` lists the
defect categories no stage in the recipe is responsible for.

The result is printed as tables and written to ``<output>/demo_eval.json``;
``<output>/demo_truth.parquet`` holds the truth with the URLs of this run, to
join with the ledger on ``url``.

Example::

    >>> from curate.demo.run import run_demo
    >>> result = run_demo("curate-demo", samples=200)          # doctest: +SKIP
    >>> result.evaluation["stages"][0]["stage"]                # doctest: +SKIP
    'download'
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from curate import rows
from curate.demo.scenes import write_vocabulary
from curate.demo.server import DemoServer
from curate.demo.world import (
    CATEGORIES,
    CLEAN,
    DEFAULT_SAMPLES,
    DUPLICATE_CATEGORIES,
    generate_world,
)
from curate.errors import EnvironmentProblem, OutputError
from curate.manifest import Manifest

log = logging.getLogger(__name__)
T = TypeVar("T")

DEMO_RECIPE = "demo.yaml"
DEFAULT_OUTPUT = "curate-demo"
URLS_FILE = "demo_urls.parquet"
VOCABULARY_FILE = "demo_vocabulary.txt"  # a clip_tags stage naming this file gets the world's vocabulary
EVAL_FILE = "demo_eval.json"
TRUTH_FILE = "demo_truth.parquet"

#: Stage (recipe name or ``use``) → truth categories it should drop. Add an entry
#: when a stage lands; entries whose stage is not in the recipe are skipped.
RESPONSIBLE: dict[str, frozenset[str]] = {
    # URL failures are only visible while downloading; size limits are img2dataset options too.
    # (tiny and elongated images are image_rules' job: set min_image_size / max_aspect_ratio on
    # download instead and its precision will show it dropping what it was not asked to)
    "download": frozenset({"dead_link", "corrupt_bytes", "slow_drip", "opt_out", "html_as_image"}),
    "caption_length": frozenset({"empty_caption", "junk_caption"}),
    "caption_rules": frozenset({"empty_caption", "junk_caption"}),
    "image_rules": frozenset({"tiny_image", "elongated_image"}),
    "language": frozenset({"non_english"}),
    "clip_score": frozenset({"mismatched_caption"}),
    "keep_fraction": frozenset({"mismatched_caption"}),  # a top-k% CLIP cut; it drops clean rows by design
    "dedup_exact": frozenset({"exact_duplicate", "caption_duplicate"}),
    "dedup_phash": frozenset({"exact_duplicate", "perceptual_duplicate"}),
    "dedup_minhash": frozenset({"caption_duplicate", "caption_near_duplicate"}),
    "dedup_semantic": frozenset({"exact_duplicate", "perceptual_duplicate"}),
}

DEFECTS: tuple[str, ...] = tuple(c for c in CATEGORIES if c != CLEAN)


# ------------------------------------------------------------------ evaluation


@dataclass(eq=False)  # identity semantics: rows go in sets
class _Row:
    category: str
    group: str | None  # duplicate group, evaluated per group when the group's category is the stage's
    fate: int  # index in the stage order of the stage that dropped it; len(order) if kept


def _group_categories(truth: pa.Table) -> dict[str, str]:
    """Duplicate group → the category of its copy (the group's kind of duplication)."""
    out: dict[str, str] = {}
    for g, cat in zip(truth["dup_group"].to_pylist(), truth["category"].to_pylist(), strict=True):
        if g is not None and cat in DUPLICATE_CATEGORIES:
            out[g] = cat
    return out


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def evaluate(truth: pa.Table, ledger: pa.Table, stages: Sequence[tuple[str, str]],
             responsible: Mapping[str, Iterable[str]] = RESPONSIBLE) -> dict[str, Any]:
    """Grade each stage's drops against the truth (see the module docstring for the definitions).

    ``truth`` needs ``url``, ``category``, ``dup_group``; ``ledger`` needs ``url``,
    ``status``, ``dropped_by``, ``reason``; ``stages`` is the recipe's (name, use) in order.
    """
    order = [("source", "source"), *stages]
    index = {name: i for i, (name, _) in enumerate(order)}
    kept_fate = len(order)
    by_url = {u: i for i, u in enumerate(truth["url"].to_pylist())}
    cats, groups = truth["category"].to_pylist(), truth["dup_group"].to_pylist()
    group_cat = _group_categories(truth)

    table: list[_Row] = []
    reasons: list[str | None] = []
    unmatched = 0
    for url, status, by, reason in zip(ledger[rows.URL].to_pylist(), ledger[rows.STATUS].to_pylist(),
                                       ledger[rows.DROPPED_BY].to_pylist(), ledger[rows.REASON].to_pylist(),
                                       strict=True):
        i = by_url.get(url)
        if i is None:
            unmatched += 1
            continue
        fate = kept_fate if status == rows.KEPT else index.get(by or "", 0)
        table.append(_Row(cats[i], groups[i], fate))
        reasons.append(reason)

    def grade(stage_idx: int | None, cats_of: frozenset[str]) -> dict[str, Any]:
        """Score one stage (or, with ``stage_idx=None``, the whole pipeline) on ``cats_of``."""
        whole = stage_idx is None
        reached = [r for r in table if whole or r.fate >= stage_idx]
        dropped_here = {r for r in reached if (r.fate < kept_fate if whole else r.fate == stage_idx)}
        expected = correct = 0
        wrong: Counter[str] = Counter()
        missed: Counter[str] = Counter()
        members: dict[str, list[_Row]] = defaultdict(list)
        for r in reached:
            if r.group is not None and group_cat.get(r.group) in cats_of:
                members[r.group].append(r)
                continue
            if r.category in cats_of and r.category not in DUPLICATE_CATEGORIES:
                expected += 1
                if r in dropped_here:
                    correct += 1
                else:
                    missed[r.category] += 1
            elif r in dropped_here:
                wrong[r.category] += 1
        for g, ms in members.items():
            quota = len(ms) - 1
            n_drop = sum(1 for r in ms if r in dropped_here)
            expected += quota
            correct += min(n_drop, quota)
            if n_drop > quota:
                wrong[group_cat[g] + " (whole group)"] += n_drop - quota
            elif n_drop < quota:
                missed[group_cat[g]] += quota - n_drop
        return {
            "reached": len(reached), "dropped": len(dropped_here), "expected": expected, "correct": correct,
            "precision": _ratio(correct, len(dropped_here)), "recall": _ratio(correct, expected),
            "wrongly_dropped": dict(sorted(wrong.items())), "missed": dict(sorted(missed.items())),
        }

    graded: list[dict[str, Any]] = []
    covered: set[str] = set()
    for i, (name, use) in enumerate(order):
        if name == "source" and not any(r.fate == 0 for r in table):
            continue
        cats_of = responsible.get(name, responsible.get(use))
        drops = [r for r in table if r.fate == i]
        entry: dict[str, Any] = {
            "stage": name, "use": use, "categories": sorted(cats_of) if cats_of is not None else None,
            "dropped_by_category": dict(sorted(Counter(r.category for r in drops).items())),
            "reasons": dict(sorted(Counter(reasons[j] or "unknown" for j, r in enumerate(table)
                                           if r.fate == i).items())),
        }
        if cats_of is None:
            entry.update({"reached": sum(1 for r in table if r.fate >= i), "dropped": len(drops),
                          "precision": None, "recall": None, "note": "no truth mapping for this stage"})
        else:
            covered |= set(cats_of)
            entry.update(grade(i, frozenset(cats_of)))
        graded.append(entry)

    overall = grade(None, frozenset(DEFECTS))
    kept = [r for r in table if r.fate == kept_fate]
    left: Counter[str] = Counter(r.category for r in kept if r.category not in DUPLICATE_CATEGORIES
                                 and r.category != CLEAN)
    kept_per_group = Counter(r.group for r in kept if r.group in group_cat)
    for g, n in kept_per_group.items():
        if n > 1:
            left[group_cat[g]] += n - 1
    counts = Counter(cats)
    return {
        "definitions": {
            "reached": "rows still kept when they came to the stage",
            "expected": "reached rows of the stage's categories; a duplicate group of m reached members "
                        "expects m-1 drops",
            "precision": "correct drops / rows the stage dropped",
            "recall": "correct drops / expected",
        },
        "rows": {"input": ledger.num_rows, "kept": len(kept), "dropped": len(table) - len(kept),
                 "unmatched_urls": unmatched},
        "truth_counts": {c: counts.get(c, 0) for c in CATEGORIES},
        "stages": graded,
        "uncovered": [c for c in DEFECTS if c not in covered and counts.get(c)],
        "overall": {
            **overall,
            "clean_rows": counts.get(CLEAN, 0),
            "clean_kept": sum(1 for r in kept if r.category == CLEAN),
            "defects_left": dict(sorted(left.items())),
        },
    }


# ------------------------------------------------------------------ running


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: where, the run's manifest, the evaluation, how long each step took."""

    output: Path
    manifest: Manifest
    evaluation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    world_dir: Path | None = None


def is_demo_output(path: Path) -> bool:
    """True when ``path`` holds an earlier demo's output (which the demo may replace)."""
    if (path / EVAL_FILE).exists():
        return True
    recipe_json = path / "_work" / "recipe.json"
    if recipe_json.exists():
        try:
            src = json.loads(recipe_json.read_text())["recipe"]["source"]["path"]
        except (ValueError, KeyError, TypeError):
            return False
        return isinstance(src, str) and src.endswith("/" + URLS_FILE)
    return False


def check_output(path: Path, *, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder that is not a demo output, unless told to."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder; choose another -o")
    if overwrite or not any(path.iterdir()) or is_demo_output(path):
        return
    raise OutputError(f"output {path} is not empty and holds no curate demo; choose another -o or pass --overwrite")


def demo_recipe_path() -> Path:
    from curate.recipe import bundled_path

    path = bundled_path("pipelines", DEMO_RECIPE)
    if path is None:
        raise EnvironmentProblem(f"pipelines/{DEMO_RECIPE} is missing from this installation of curate")
    return path


def run_demo(output: str | Path = DEFAULT_OUTPUT, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
             world_dir: str | Path | None = None, recipe: str | Path | None = None,
             overrides: Sequence[str] = (), overwrite: bool = False, progress: bool | None = None) -> DemoResult:
    """Generate and serve a world, run the demo recipe into ``output``, grade it; see the module doc.

    ``world_dir`` keeps the generated world (and reuses it when it matches);
    by default it lives in a temporary folder removed at the end. ``output``
    is replaced when it holds an earlier demo, refused when it holds anything
    else (unless ``overwrite``).
    """
    from curate.recipe import load_recipe
    from curate.runner import run

    started = time.perf_counter()
    out = Path(output).expanduser().resolve()
    check_output(out, overwrite=overwrite)
    recipe_path = Path(recipe) if recipe is not None else demo_recipe_path()
    tmp = None if world_dir is not None else tempfile.mkdtemp(prefix="curate-demo-")
    root = Path(world_dir) if world_dir is not None else Path(tmp) / "world"  # type: ignore[arg-type]
    seconds: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        world = _with_status(progress, f"generating a demo world of {samples} samples",
                             lambda: generate_world(root, samples=samples, seed=seed))
        seconds["world"] = time.perf_counter() - t0
        with DemoServer(world) as server:
            base_url = server.base_url
            urls_path = world.root / URLS_FILE
            pq.write_table(world.url_list(base_url), urls_path)
            r = load_recipe(recipe_path, overrides=overrides, input_path=str(urls_path), output_path=str(out))
            _use_world_vocabulary(r.stages, write_vocabulary(world.root / VOCABULARY_FILE))
            t0 = time.perf_counter()
            manifest = run(r, overwrite=True, progress=progress)
            seconds["pipeline"] = time.perf_counter() - t0
            log.info("demo server answered %s", dict(server.requests))
        t0 = time.perf_counter()
        truth = world.truth_with_urls(base_url)
        ledger = read_ledger(out, manifest.ledger)
        evaluation = evaluate(truth, ledger, [(c.name or c.use, c.use) for c in r.stages])  # ledger names
        tags = read_tags(out, manifest.ledger)
        if tags is not None:  # the recaptioner's zero-shot tags against the world's truth tags
            from curate.demo.tags_eval import tag_accuracy

            evaluation["tags"] = tag_accuracy(tags, truth)
        evaluation["world"] = {"samples": world.samples, "seed": world.seed,
                               "dir": str(root) if world_dir is not None else None}
        pq.write_table(truth, out / TRUTH_FILE)
        seconds["evaluation"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - started
        evaluation["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        (out / EVAL_FILE).write_text(json.dumps(evaluation, indent=1) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoResult(output=out, manifest=manifest, evaluation=evaluation, seconds=seconds,
                      world_dir=Path(world_dir) if world_dir is not None else None)


def _use_world_vocabulary(stages: Sequence[Any], path: Path) -> None:
    """Point every ``clip_tags`` stage whose ``vocabulary`` is :data:`VOCABULARY_FILE` at the world's copy."""
    for config in stages:
        if config.use == "clip_tags" and config.vocabulary == VOCABULARY_FILE:
            config.vocabulary = str(path)


def read_ledger(output: Path, files: Iterable[str]) -> pa.Table:
    """The run's ledger (every input row), only the columns the evaluation needs."""
    cols = [rows.KEY, rows.URL, rows.STATUS, rows.DROPPED_BY, rows.REASON]
    tables = [pq.read_table(output / f, columns=cols) for f in files]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in cols})
    return pa.concat_tables(tables, promote_options="permissive")


def read_tags(output: Path, files: Iterable[str]) -> pa.Table | None:
    """``url``, ``status`` and the ``clip_tags`` column of the ledger, or None when no stage tagged."""
    from curate.stages.clip_tags import TAGS

    cols = [rows.URL, rows.STATUS, TAGS]
    tables = [pq.read_table(output / f, columns=cols) for f in files
              if TAGS in pq.read_schema(output / f).names]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _with_status(progress: bool | None, message: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` under a rich spinner on a terminal (the runner shows its own progress bars)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return fn()
    from rich.console import Console

    with Console(stderr=True).status(message):
        return fn()


# ------------------------------------------------------------------ the summary


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _counts(d: Mapping[str, int], limit: int = 4) -> str:
    items = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


def summary(result: DemoResult) -> list[Any]:
    """Rich renderables for the terminal: the run per stage, the grades, where the files are."""
    from rich.table import Table
    from rich.text import Text

    m, ev, out = result.manifest, result.evaluation, result.output
    run_t = Table(title=f"curate demo: {m.counts.input} rows in, {m.counts.kept} kept "
                        f"({result.seconds.get('total', 0):.0f} s)", title_justify="left")
    for col, just in (("stage", "left"), ("in", "right"), ("kept", "right"), ("dropped", "right"),
                      ("reasons", "left"), ("seconds", "right")):
        run_t.add_column(col, justify=just)  # type: ignore[arg-type]
    for s in m.stages:
        run_t.add_row(s.name, str(s.rows_in), str(s.kept), str(sum(s.dropped.values())),
                      _counts(s.dropped, 12), f"{s.seconds:.1f}")

    grade_t = Table(title="against the truth — precision: of the rows a stage dropped, the share that was its job; "
                          "recall: of its defects that reached it, the share it caught", title_justify="left")
    for col, just in (("stage", "left"), ("reached", "right"), ("dropped", "right"), ("precision", "right"),
                      ("recall", "right"), ("responsible for", "left"), ("notes", "left")):
        grade_t.add_column(col, justify=just)  # type: ignore[arg-type]

    def notes(s: Mapping[str, Any]) -> str:
        parts = [f"missed: {_counts(s['missed'])}"] if s.get("missed") else []
        parts += [f"wrongly dropped: {_counts(s['wrongly_dropped'])}"] if s.get("wrongly_dropped") else []
        return "; ".join(parts) or s.get("note", "")

    for s in ev["stages"]:
        grade_t.add_row(s["stage"], str(s["reached"]), str(s["dropped"]), _pct(s["precision"]), _pct(s["recall"]),
                        ", ".join(s["categories"]) if s["categories"] is not None else "(not mapped)", notes(s))
    o = ev["overall"]
    # Misses of categories no stage covers are listed once, below the table.
    covered_missed = {k: v for k, v in o["missed"].items() if k not in ev["uncovered"]}
    grade_t.add_row(Text("whole pipeline", style="bold"), str(o["reached"]), str(o["dropped"]),
                    _pct(o["precision"]), _pct(o["recall"]), "every defect", notes({**o, "missed": covered_missed}))

    lines = []
    if ev["uncovered"]:
        todo = ", ".join(f"{c} ({ev['truth_counts'][c]})" for c in ev["uncovered"])
        lines.append(Text(f"not handled by any stage of this recipe (they stay in the output): {todo}",
                          style="yellow"))
    lines.append(Text(f"clean rows kept: {o['clean_kept']} of {o['clean_rows']}; defects left in the output: "
                      f"{sum(o['defects_left'].values())}"))
    tags = ev.get("tags")
    if tags:
        by = {k: v for k, v in tags["by_type"].items() if v["predicted"]}
        lines.append(Text("clip_tags against the truth tags: " + "; ".join(
            f"{k} precision {_pct(v['precision'])}, recall {_pct(v['recall'])}" for k, v in by.items())
            + f" ({tags['tagged']} of {tags['rows']} kept rows tagged, {tags['tags_per_row']} tags each)"))
    if m.packing:
        pk = m.packing
        lines.append(Text(f"packed:   {pk['samples']} samples into {pk['sequences']} sequences of <= "
                          f"{pk['max_tokens']} tokens, {100 * pk['efficiency']:.1f}% full "
                          f"({pk['token_count']} token counts) in {out / 'packed'}/"))
    n_tars = sum(1 for s in m.shards if s.format == "webdataset")
    n_pq = sum(1 for s in m.shards if s.format == "parquet")
    lines.append(Text(
        f"shards:   {out / 'webdataset'}/*.tar ({n_tars}), {out / 'parquet'}/*.parquet ({n_pq})\n"
        f"ledger:   {out / 'ledger'}/*.parquet (one row per input row)\n"
        f"manifest: {out / 'manifest.json'}\n"
        + (f"report:   {out / m.stats['report']}   stats: {out / m.stats.get('stats', 'stats.json')} "
           f"(redraw: curate stats {out})\n" if m.stats.get("report") else "")
        + f"grades:   {out / EVAL_FILE}   truth: {out / TRUTH_FILE} (join the ledger on url)"))
    return [run_t, grade_t, *lines]
