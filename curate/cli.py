"""The ``curate`` command line: run, validate, schema, stats, mix, demo, img2dataset."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from curate.errors import CurateError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Curate vision-language pre-training data with Ray.")
_debug = False


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and Ray logs.")] = False,
          verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log progress at INFO level.")] = False) -> None:
    global _debug
    _debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(e: BaseException) -> None:
    if _debug:
        raise e
    msg = str(e) or e.__class__.__name__
    if not isinstance(e, CurateError):
        msg = f"{e.__class__.__name__}: {msg} (run with --debug for the traceback)"
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    input: Annotated[str | None, typer.Option("-i", "--input", help="Replace source.path.")] = None,  # noqa: A002, UP007
    output: Annotated[str | None, typer.Option("-o", "--output", help="Replace write.output.")] = None,  # noqa: UP007
    set_: Annotated[list[str], typer.Option("--set", help="Override a recipe key: dotted.key=value.")] = [],  # noqa: B006
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster.")] = None,  # noqa: UP007
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress")] = None,  # noqa: UP007
) -> None:
    """Run RECIPE; re-running the same command resumes where it stopped."""
    from curate.recipe import load_recipe
    from curate.runner import run as run_recipe

    try:
        r = load_recipe(recipe, overrides=set_, input_path=input, output_path=output, ray_address=ray_address)
        manifest = run_recipe(r, overwrite=overwrite, progress=progress, debug=_debug)
    except Exception as e:  # noqa: BLE001 - one paragraph for the user (CurateError), or the type and --debug
        _fail(e)
        return
    _print_summary(manifest, r.write.output or "")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def img2dataset(ctx: typer.Context) -> None:
    """img2dataset's command line, flag for flag (--help lists them): swap the command name to migrate."""
    from curate.img2dataset import main as img2dataset_main

    try:
        code = img2dataset_main(ctx.args, debug=_debug)
    except Exception as e:  # noqa: BLE001 - one paragraph for the user (CurateError), or the type and --debug
        _fail(e)
        return
    raise typer.Exit(code)


def _print_summary(manifest, output: str) -> None:
    from rich.console import Console
    from rich.table import Table

    c = manifest.counts
    console = Console(stderr=False)
    table = Table(title=f"curate: {c.input} rows in, {c.kept} kept")
    for col in ("stage", "in", "kept", "dropped", "top reasons", "seconds"):
        table.add_column(col)
    for s in manifest.stages:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items(), key=lambda kv: -kv[1])[:4])
        table.add_row(s.name, str(s.rows_in), str(s.kept), str(sum(s.dropped.values())), reasons, f"{s.seconds:.1f}")
    console.print(table)
    console.print(f"output: {output}  (manifest.json, {len(manifest.shards)} shard files, ledger/)")
    if manifest.stats.get("report"):
        console.print(f"report: {output.rstrip('/')}/{manifest.stats['report']}  (numbers in stats.json)")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a recipe key: dotted.key=value.")] = [],  # noqa: B006
    check_input: Annotated[bool, typer.Option("--check-input/--no-check-input",
                                              help="Also open the input and check its columns.")] = True,
) -> None:
    """Check a recipe (and its input's columns) without running anything."""
    from curate.recipe import load_recipe

    try:
        r = load_recipe(recipe, overrides=set_)
        if check_input:
            from curate.sources.registry import make_source

            make_source(r.source).validate()
    except Exception as e:  # noqa: BLE001
        _fail(e)
        return
    typer.echo(f"{recipe}: ok ({len(r.stages)} stages: {', '.join(s.name or s.use for s in r.stages) or 'none'})")


@app.command()
def schema(
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the JSON Schemas.")] = Path("schemas"),
) -> None:
    """Write JSON Schemas for the recipe, the manifest and a ledger row."""
    from curate.schemas import all_schemas

    out.mkdir(parents=True, exist_ok=True)
    for name, sch in all_schemas().items():
        (out / name).write_text(json.dumps(sch, indent=2, sort_keys=True) + "\n")
        typer.echo(f"wrote {out / name}")


@app.command()
def stats(
    output: Annotated[str, typer.Argument(help="Output folder of `curate run` (any fsspec path).")],
    report: Annotated[bool, typer.Option("--report/--no-report", help="Also write report.html.")] = True,
) -> None:
    """Compute OUTPUT/stats.json and OUTPUT/report.html from a run's ledger, manifest and shards."""
    from curate.stats import REPORT_FILE, STATS_FILE, write_stats

    try:
        st = write_stats(output, report=report)
    except Exception as e:  # noqa: BLE001 - one paragraph for the user (CurateError), or the type and --debug
        _fail(e)
        return
    root = output.rstrip("/")
    typer.echo(f"{st.rows.input} rows in, {st.rows.kept} kept, {st.rows.dropped} dropped "
               f"({len(st.funnel)} stages); computed in {st.seconds:.2f}s")
    for name, ok in st.checks.items():
        if not ok:
            typer.echo(f"warning: check {name} failed: ledger, manifest and shards disagree", err=True)
    for e in st.source_errors:
        typer.echo(f"warning: input shard {e.shard} ({e.path}) could not be read, its rows are in no count: "
                   f"{e.error}", err=True)
    typer.echo(f"wrote {root}/{STATS_FILE}" + (f" and {root}/{REPORT_FILE}" if report else ""))


@app.command()
def mix(
    mixture: Annotated[Path, typer.Argument(help="Mixture YAML: sources with weights or epochs.")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="Replace write.output.")] = None,  # noqa: UP007
    set_: Annotated[list[str], typer.Option("--set", help="Override a mixture key: dotted.key=value.")] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUTPUT.")] = False,
) -> None:
    """Mix curated outputs at target ratios (by samples or tokens) into new shards."""
    from curate.mix import MANIFEST_FILE, load_mixture, run_mix

    try:
        result = run_mix(load_mixture(mixture, output=output, overrides=set_), overwrite=overwrite)
    except Exception as e:  # noqa: BLE001 - one paragraph for the user (CurateError), or the type and --debug
        _fail(e)
        return
    m = result.manifest
    for s in m["sources"]:
        tokens = ("tokens not counted" if s["tokens"] is None
                  else f"{s['tokens']} tokens{'' if s['tokens_exact'] else ' (approx.)'}")
        typer.echo(f"{s['name']}: {s['samples']} samples ({s['unique_samples']} unique), {tokens}; {m['unit']} ratio "
                   f"{s['achieved_ratio'] or 0:.4f} (asked {s['requested_ratio'] or 0:.4f})")
    typer.echo(f"wrote {m['samples']} samples in {len(result.shards)} shard files; {result.output}/{MANIFEST_FILE}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder; an earlier demo there is replaced.")]
    = Path("curate-demo"),
    samples: Annotated[int, typer.Option("--samples", min=40, help="Image-text pairs in the synthetic world.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic world.")] = 0,
    world: Annotated[Optional[Path], typer.Option("--world", help="Keep the generated world here (reused "  # noqa: UP007, UP045
                                                  "when it matches); default: a temporary folder.")] = None,
    recipe: Annotated[Optional[Path], typer.Option("-r", "--recipe", help="Run this recipe instead of "  # noqa: UP007, UP045
                                                   "pipelines/demo.yaml (source and output are set).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a recipe key: dotted.key=value.")] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT even if it is not a demo.")] = False,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress")] = None,  # noqa: UP007, UP045
) -> None:
    """Run pipelines/demo.yaml offline on a synthetic world and grade each stage against its truth."""
    from curate.demo.run import run_demo, summary

    try:
        result = run_demo(output, samples=samples, seed=seed, world_dir=world, recipe=recipe, overrides=set_,
                          overwrite=overwrite, progress=progress)
    except Exception as e:  # noqa: BLE001 - one paragraph for the user (CurateError), or the type and --debug
        _fail(e)
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and CI: wide enough that the tables do not wrap
    for part in summary(result):
        console.print(part)


def main() -> None:
    code: int | str | None = 0
    try:
        app()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        code = 130
    session = sys.modules.get("curate.engine.session")
    if session is not None and isinstance(code, int | None):
        session.fast_exit(code or 0)  # returns unless this process started its own Ray
    sys.exit(code)


if __name__ == "__main__":
    main()
