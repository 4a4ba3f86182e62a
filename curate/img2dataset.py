"""``curate img2dataset [FLAGS]``: img2dataset 1.47's command line, flag for flag, run by curate's engine.

Replacing the command name is the whole migration::

    img2dataset        --url_list urls.parquet --input_format parquet --output_folder out ...
    curate img2dataset --url_list urls.parquet --input_format parquet --output_folder out ...

Flags carry img2dataset's names and defaults (its ``download()`` signature, read off
img2dataset 1.47.0) and are parsed as python-fire parses them: ``--flag value``,
``--flag=value``, a bare ``--flag`` for True and ``--noflag`` for False, ``--flag-name`` for
``--flag_name``, lists as ``'["a","b"]'``, ``[a,b]`` or ``a,b``, ``None``, ``inf``, and
``url_list`` also as the first positional argument.

The command builds a recipe (a ``download`` stage with the image and network flags, a
URL-list source, ``formats: [img2dataset]``) and runs it with ``write.output =
OUTPUT/_curate``: the ledger, manifest, statistics and work files go there, out of the way
of img2dataset's readers (its ``*.json`` glob at the root sees only ``NNNNN_stats.json``),
and :class:`curate.sinks.img2dataset.Img2datasetSink` writes img2dataset's layout to
``OUTPUT``. The recipe is also saved as ``OUTPUT/_curate/img2dataset_recipe.yaml``, for
``curate run`` and the filters img2dataset does not have.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from curate.errors import RecipeError

#: The folder under ``--output_folder`` that holds curate's own files.
CURATE_SUBFOLDER = "_curate"
INPUT_FORMATS = ("txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz",
                 "parquet")
OUTPUT_FORMATS = ("files", "webdataset", "parquet")
#: img2dataset's ``arguments_validator``: names it keeps for itself.
RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}
INF = float("inf")


@dataclass(frozen=True)
class Flag:
    default: Any
    kind: str  # int | float | bool | str | optstr | list
    help: str


#: img2dataset 1.47.0's ``download()`` parameters, in its order, with its defaults.
FLAGS: dict[str, Flag] = {
    "url_list": Flag(None, "optstr", "File or folder of URL lists (any fsspec path)."),
    "image_size": Flag(256, "int", "Target size in pixels."),
    "output_folder": Flag("images", "str", "Where img2dataset's layout goes; curate's files go to OUTPUT/_curate."),
    "processes_count": Flag(1, "int", "Workers: runtime.num_cpus of the local Ray."),
    "resize_mode": Flag("border", "str", "no | border | keep_ratio | keep_ratio_largest | center_crop."),
    "resize_only_if_bigger": Flag(False, "bool", "Never upscale."),
    "upscale_interpolation": Flag("lanczos", "str", "Interpolation when enlarging."),
    "downscale_interpolation": Flag("area", "str", "Interpolation when shrinking."),
    "encode_quality": Flag(95, "int", "jpg/webp quality; png compression 0-9 (png default here: 9)."),
    "encode_format": Flag("jpg", "str", "jpg | png | webp."),
    "skip_reencode": Flag(False, "bool", "Keep the downloaded bytes when no resize was needed."),
    "output_format": Flag("files", "str", "files | webdataset | parquet."),
    "input_format": Flag("txt", "str", "txt | csv | tsv | json | jsonl | parquet, and the .gz forms."),
    "url_col": Flag("url", "str", "Column with the URLs."),
    "caption_col": Flag(None, "optstr", "Column with the captions."),
    "bbox_col": Flag(None, "optstr", "Not supported (img2dataset's face blurring)."),
    "thread_count": Flag(256, "int", "Downloads in flight per worker (concurrency_per_worker)."),
    "number_sample_per_shard": Flag(10000, "int", "Rows per shard."),
    "extract_exif": Flag(True, "bool", "Add the exif field (null: curate does not read EXIF yet)."),
    "save_additional_columns": Flag(None, "list", "Input columns to keep in the metadata."),
    "timeout": Flag(10, "float", "Deadline per attempt, in seconds (curate: DNS to the last byte)."),
    "enable_wandb": Flag(False, "bool", "Ignored (curate writes manifest.json, stats.json, report.html)."),
    "wandb_project": Flag("img2dataset", "str", "Ignored."),
    "oom_shard_count": Flag(5, "int", "Digits of the shard number in file names and keys."),
    "compute_hash": Flag("sha256", "optstr", "md5 | sha256 | sha512 | None: hash of the downloaded bytes."),
    "verify_hash": Flag(None, "list", "[column, hash]: drop rows whose bytes do not hash to the column's value."),
    "distributor": Flag("multiprocessing", "str", "Always Ray; `ray` with --ray_address (or RAY_ADDRESS) joins "
                        "a cluster."),
    "subjob_size": Flag(1000, "int", "Ignored (pyspark's batching)."),
    "retries": Flag(0, "int", "Extra attempts after a timeout, 429 or 5xx."),
    "disable_all_reencoding": Flag(False, "bool", "Store the downloaded bytes as they are."),
    "min_image_size": Flag(0, "int", "Drop images whose shorter side is smaller."),
    "max_image_area": Flag(INF, "float", "Drop images with more pixels."),
    "max_aspect_ratio": Flag(INF, "float", "Drop images with long/short side above this."),
    "incremental_mode": Flag("incremental", "str", "incremental (resume) | overwrite."),
    "max_shard_retry": Flag(1, "int", "Ignored (Ray retries failed tasks; a re-run resumes)."),
    "user_agent_token": Flag(None, "optstr", "Added to the User-Agent; X-Robots-Tag lines naming it apply."),
    "disallowed_header_directives": Flag(None, "list", "X-Robots-Tag directives that opt out (default: noai, "
                                         "noimageai, noindex, noimageindex; [] disables)."),
}
#: Flags img2dataset does not have.
EXTRA_FLAGS: dict[str, Flag] = {
    "allow_private_networks": Flag(False, "bool", "Lift the SSRF guard (loopback, private, link-local addresses)."),
    "ray_address": Flag(None, "optstr", "Join this Ray cluster."),
}
ALL_FLAGS = {**FLAGS, **EXTRA_FLAGS}


# ---------------------------------------------------------------- parsing, as python-fire does


def _literal(text: str) -> Any:
    """fire's value parsing: a Python literal, barewords as strings (``[a,b]`` → ['a', 'b'])."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return text

    class _Bare(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:  # noqa: N802 - the ast API
            return ast.copy_location(ast.Constant(node.id), node)

    try:
        return ast.literal_eval(ast.fix_missing_locations(_Bare().visit(tree)))
    except (ValueError, SyntaxError, TypeError):
        return text


def _convert(name: str, flag: Flag, raw: Any) -> Any:
    value = _literal(raw) if isinstance(raw, str) else raw
    bad = RecipeError(f"--{name}: {raw!r} is not a valid {flag.kind.replace('optstr', 'string or None')}")
    if flag.kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if isinstance(value, bool | int) and value in (0, 1):
            return bool(value)
        raise bad
    if value is None or (isinstance(value, str) and value == "None"):
        if flag.kind in ("optstr", "list") or flag.default is None:
            return None
        raise bad
    if flag.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise bad
        return int(value)
    if flag.kind == "float":
        if isinstance(value, str) and value.lower() in ("inf", "infinity"):
            return INF
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if flag.kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise bad
        return [str(v) for v in value]
    if isinstance(value, str):
        return value
    return raw if isinstance(raw, str) else str(value)  # --url_col 10 is the column "10"


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """img2dataset's flags from a command line, as python-fire reads them; unknown flags are errors."""
    given: dict[str, Any] = {}
    positional: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            positional.append(arg)
            continue
        name, eq, raw = arg[2:].partition("=")
        name = name.replace("-", "_")
        negated = False
        if name not in ALL_FLAGS and name.startswith("no") and name[2:] in ALL_FLAGS \
                and ALL_FLAGS[name[2:]].kind == "bool" and not eq:
            name, negated = name[2:], True
        if name not in ALL_FLAGS:
            close = difflib.get_close_matches(name, list(ALL_FLAGS), n=3)
            raise RecipeError(f"unknown flag --{name}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                          if close else "; `curate img2dataset --help` lists them"))
        flag = ALL_FLAGS[name]
        if negated:
            given[name] = False
            continue
        if not eq:
            if flag.kind == "bool":
                nxt = args[i] if i < len(args) else None
                if nxt is not None and nxt.lower() in ("true", "false", "1", "0", "yes", "no"):
                    raw, i = nxt, i + 1
                else:
                    raw = "True"
            elif i < len(args):
                raw, i = args[i], i + 1
            else:
                raise RecipeError(f"--{name} needs a value")
        given[name] = _convert(name, flag, raw)
    names = list(FLAGS)
    for pos, raw in enumerate(positional):
        if pos >= len(names):
            raise RecipeError(f"too many positional arguments: {positional!r}")
        if names[pos] in given:
            raise RecipeError(f"--{names[pos]} given twice (as a flag and as positional argument {pos + 1})")
        given[names[pos]] = _convert(names[pos], FLAGS[names[pos]], raw)
    return given


def usage() -> str:
    lines = ["usage: curate img2dataset --url_list URLS --output_folder OUT [FLAGS]", "",
             "img2dataset 1.47's flags, same names and defaults:"]
    lines += [f"  --{n:<30} {f.help} (default: {f.default!r})" for n, f in FLAGS.items()]
    lines += ["", "curate's additions:"]
    lines += [f"  --{n:<30} {f.help} (default: {f.default!r})" for n, f in EXTRA_FLAGS.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- flags → recipe


def _input_files(url_list: str, input_format: str) -> str | list[str]:
    """img2dataset reads a folder's ``*.<input_format>`` files, sorted; a file as it is."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url_list)
    if not fs.isdir(path):
        return url_list
    proto = url_list.split("://", 1)[0] + "://" if "://" in url_list else ""
    found = sorted(fs.glob(path.rstrip("/") + "/*." + input_format))
    if not found:
        raise RecipeError(f"--url_list: no file found at path {url_list} with extension {input_format}")
    return [p if p.startswith(proto) else proto + p for p in found]


def build(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The recipe (as a dict: source, stages, write, runtime) for img2dataset's flags, the settings of
    the run itself (output folder, overwrite) and the notes to print."""
    f = {n: fl.default for n, fl in ALL_FLAGS.items()} | flags
    notes: list[str] = []
    if not f["url_list"]:
        raise RecipeError("--url_list is required (a file or folder of URL lists)")
    if f["input_format"] not in INPUT_FORMATS:
        raise RecipeError(f"--input_format {f['input_format']!r}: img2dataset reads {', '.join(INPUT_FORMATS)}")
    if f["output_format"] not in OUTPUT_FORMATS:
        raise RecipeError(f"--output_format {f['output_format']!r} is not written by curate img2dataset; it writes "
                          f"{', '.join(OUTPUT_FORMATS)} (for tfrecord, convert the webdataset tars)")
    if f["bbox_col"] is not None:
        raise RecipeError("--bbox_col (blurring faces in bounding boxes) is not supported by curate img2dataset")
    if f["incremental_mode"] not in ("incremental", "overwrite"):
        raise RecipeError(f"--incremental_mode {f['incremental_mode']!r}: curate img2dataset supports incremental "
                          "(resume what an earlier run left) and overwrite")
    if f["compute_hash"] not in (None, "md5", "sha256", "sha512"):
        raise RecipeError(f"--compute_hash: unsupported hash to compute: {f['compute_hash']}")
    verify = f["verify_hash"]
    if verify is not None:
        if len(verify) != 2:
            raise RecipeError(f"--verify_hash takes [column, hash type], got {verify!r}")
        if verify[1] != f["compute_hash"]:
            raise RecipeError(f"--verify_hash and --compute_hash must be the same but got {verify[1]} and "
                              f"{f['compute_hash']}")
    extra = list(f["save_additional_columns"] or [])
    clash = RESERVED_COLUMNS & set(extra)
    if clash:
        raise RecipeError(f"--save_additional_columns: img2dataset reserves {sorted(clash)} for its own use")
    if f["enable_wandb"] or flags.get("wandb_project") is not None:
        notes.append("note: --enable_wandb/--wandb_project are ignored: curate writes no wandb logs; counts and "
                     "timings are in OUTPUT/_curate/manifest.json, stats.json and report.html")
    txt = f["input_format"].startswith("txt")
    fmt = f["input_format"].removesuffix(".gz")
    source: dict[str, Any] = {
        "path": _input_files(str(f["url_list"]), f["input_format"]), "format": fmt, "url_col": f["url_col"],
        "caption_col": None if txt else f["caption_col"],
        "columns": [] if txt else extra + ([verify[0]] if verify else []),
    }
    encode_quality = f["encode_quality"]
    if f["encode_format"] == "png" and "encode_quality" not in flags:
        encode_quality = 9  # for png it is the compression level 0-9
    download: dict[str, Any] = {
        "use": "download",
        "image_size": f["image_size"], "resize_mode": f["resize_mode"],
        "resize_only_if_bigger": f["resize_only_if_bigger"], "upscale_interpolation": f["upscale_interpolation"],
        "downscale_interpolation": f["downscale_interpolation"], "encode_format": f["encode_format"],
        "encode_quality": encode_quality, "skip_reencode": f["skip_reencode"],
        "disable_all_reencoding": f["disable_all_reencoding"], "min_image_size": f["min_image_size"],
        "max_image_area": None if f["max_image_area"] == INF else f["max_image_area"],
        "max_aspect_ratio": None if f["max_aspect_ratio"] == INF else f["max_aspect_ratio"],
        "compute_hash": f["compute_hash"], "verify_hash": list(verify) if verify else None,
        "timeout": f["timeout"], "retries": f["retries"], "user_agent_token": f["user_agent_token"],
        "allow_private_networks": f["allow_private_networks"],
        "concurrency_per_worker": f["thread_count"],
    }
    if f["disallowed_header_directives"] is not None:
        download["disallowed_header_directives"] = f["disallowed_header_directives"]
    out = str(f["output_folder"]).rstrip("/") or "."
    ray_address = f["ray_address"]
    recipe = {
        "source": source,
        "stages": [download],
        "write": {
            "output": f"{out}/{CURATE_SUBFOLDER}", "formats": ["img2dataset"],
            "samples_per_shard": f["number_sample_per_shard"],
            "img2dataset": {
                "output_folder": "..", "output_format": f["output_format"], "oom_shard_count": f["oom_shard_count"],
                "caption": f["caption_col"] is not None and not txt, "save_caption": f["caption_col"] is not None,
                "additional_columns": [] if txt else extra, "extract_exif": f["extract_exif"],
                "encode_format": f["encode_format"], "compute_hash": f["compute_hash"],
                "verify_hash_column": verify is not None and not txt,
            },
        },
        "runtime": {"ray_address": ray_address, "num_cpus": None if ray_address else f["processes_count"]},
    }
    run = {"output_folder": out, "overwrite": f["incremental_mode"] == "overwrite"}
    return recipe, run, notes


def to_recipe(data: dict[str, Any]):
    """Validate the recipe dict as ``load_recipe`` does; errors name the flag."""
    from pydantic import ValidationError

    from curate.recipe import Recipe
    from curate.stages.registry import stage_class

    stage = data["stages"][0]
    try:
        cfg = stage_class(stage["use"]).Config.model_validate(stage)
        recipe = Recipe.model_validate({k: v for k, v in data.items() if k != "stages"})
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][-1]) if err["loc"] else "?"
        flag = {"concurrency_per_worker": "thread_count", "samples_per_shard": "number_sample_per_shard",
                "num_cpus": "processes_count"}.get(name, name)
        raise RecipeError(f"--{flag}: {err['msg']}") from None
    recipe.stages = [cfg]
    return recipe


def main(argv: Sequence[str], *, debug: bool = False, echo: Callable[[str], None] | None = None) -> int:
    """Run ``curate img2dataset ARGV``; returns the exit code."""
    echo = echo or (lambda s: print(s, file=sys.stderr))
    if any(a in ("--help", "-h") for a in argv):
        print(usage())
        return 0
    flags = parse_flags(argv)
    data, run, notes = build(flags)
    for note in notes:
        echo(note)
    recipe = to_recipe(data)
    out = run["output_folder"]
    if run["overwrite"]:
        import fsspec

        fs, path = fsspec.core.url_to_fs(out)
        if fs.exists(path):  # img2dataset's overwrite: the whole output folder goes
            fs.rm(path, recursive=True)
    from curate.runner import run as run_recipe

    manifest = run_recipe(recipe, overwrite=run["overwrite"], debug=debug)
    _save_recipe(data, f"{out}/{CURATE_SUBFOLDER}/img2dataset_recipe.yaml")
    c = manifest.counts
    failed = {r: n for reasons in c.dropped.values() for r, n in reasons.items()}
    ratio = (lambda n: f"{n / c.input:.3f}") if c.input else (lambda n: "0.000")
    from curate.net.image import FAILED_TO_RESIZE

    resize = sum(n for r, n in failed.items() if r in FAILED_TO_RESIZE or r.startswith(("image_", "decode")))
    echo(f"total   - success: {ratio(c.kept)} - failed to download: {ratio(c.input - c.kept - resize)} - "
         f"failed to resize: {ratio(resize)} - count: {c.input}")
    echo(f"output: {out} (img2dataset layout); ledger, manifest and report: {out}/{CURATE_SUBFOLDER}/")
    return 0 if manifest.complete else 1


def _save_recipe(data: dict[str, Any], path: str) -> None:
    import yaml

    from curate.fsutil import atomic_open

    text = ("# What `curate img2dataset` ran; `curate run` takes it as it is (add filters under stages:).\n"
            + yaml.safe_dump(data, sort_keys=False))
    try:
        with atomic_open(path) as f:
            f.write(text.encode())
    except OSError:  # a convenience: never fail a finished run over it
        pass


__all__ = ["FLAGS", "EXTRA_FLAGS", "build", "main", "parse_flags", "to_recipe", "usage"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:], debug=bool(os.environ.get("CURATE_DEBUG"))))
