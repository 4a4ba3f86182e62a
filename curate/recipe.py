"""Recipes: YAML validated by pydantic, with errors that name file, line and key (:mod:`curate.yamlio`).

>>> from curate.recipe import load_recipe
>>> r = load_recipe("pipelines/download.yaml", overrides=["write.samples_per_shard=500"])  # doctest: +SKIP
>>> r.write.samples_per_shard                                                          # doctest: +SKIP
500
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate.errors import RecipeError
from curate.sinks.img2dataset import Img2datasetOutput
from curate.sources.base import SourceConfig
from curate.stages.base import StageConfig
from curate.stages.registry import stage_class, stage_classes
from curate.yamlio import YamlDoc, apply_override, load_yaml, validation_message


class WriteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str | None = Field(None, description="Output root (fsspec path); `-o` sets it.")
    formats: list[Literal["webdataset", "parquet", "packed", "img2dataset"]] = Field(
        default_factory=lambda: ["webdataset", "parquet"],
        description="`packed`: also write training sequences packed by the `pack` stage's lengths; "
        "`img2dataset`: img2dataset's layout (see `img2dataset`).")
    packed_formats: list[Literal["webdataset", "parquet"]] = Field(
        default_factory=lambda: ["webdataset", "parquet"], description="Layouts of the packed sequences.")
    samples_per_shard: int = Field(10000, ge=1, description="Rows per input shard, as img2dataset.")
    caption_column: str = Field("caption", description="Column written as KEY.txt.")
    img2dataset: Img2datasetOutput | None = Field(None, description=(
        "Options of the `img2dataset` format: img2dataset's own layout (NNNNN.tar or NNNNN/ or the parquet "
        "form, NNNNN.parquet metadata, NNNNN_stats.json), as `curate img2dataset` writes it."))
    thumbnails: bool = Field(True, description=(
        "Keep a seeded sample of 96 px thumbnails of what each stage dropped (up to 8 per stage and reason; "
        "a dedup copy beside the row it copies) and of the kept rows (16) in _work/samples.parquet, shown "
        "in report.html."))


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ray_address: str | None = Field(None, description="Join this Ray cluster; default: start a local one.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all).")
    batch_size: int = Field(512, ge=1, description="Rows per batch handed to a stage.")
    read_batch_rows: int = Field(1024, ge=1, description="Rows per batch the source readers emit.")
    work_unit_rows: int | None = Field(None, ge=1, description=(
        "Rows per work unit (a read task's, or a call of a download actor, which reads its own): a shard "
        "whose size is known up front (URL lists; every shard after the first phase) is read as several "
        "units so that every worker takes part whatever samples_per_shard is. "
        "Default: the first stage's batch size."))
    warm_start: bool = Field(True, description=(
        "While this process starts a local Ray (3-8 s), it runs the first work units itself when the first "
        "phase starts with an I/O stage (download) and loads no model: the first images arrive before Ray is "
        "up. Its part files are committed like any worker's."))
    on_source_error: Literal["continue", "fail"] = Field(
        "continue", description="An input shard that cannot be read mid-run (truncated, corrupt): `continue` "
        "commits every other shard, then fails naming the bad files; `fail` stops at the first one.")


class Recipe(BaseModel):
    """A whole run: source → stages → write, plus runtime settings."""

    model_config = ConfigDict(extra="forbid")
    source: SourceConfig
    stages: list[StageConfig] = Field(default_factory=list)
    write: WriteConfig = Field(default_factory=WriteConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def fingerprint(self) -> str:
        """Hash of what decides the output (runtime settings excluded)."""
        data = self.model_dump(mode="json", include={"source", "stages", "write"}, serialize_as_any=True)
        data["write"].pop("output", None)
        if data["write"].get("thumbnails") is True:  # the default: fingerprints from before the switch hold
            data["write"].pop("thumbnails")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json", serialize_as_any=True)


# ---------------------------------------------------------------- presets


def preset_dirs() -> list[Path]:
    """Where ``preset:`` names are looked up: $CURATE_FILTERS_PATH, the checkout, the wheel."""
    dirs = [Path(p) for p in os.environ.get("CURATE_FILTERS_PATH", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs += [here.parent / "filters", here / "_bundled" / "filters"]
    return dirs


def bundled_path(kind: str, name: str) -> Path | None:
    """A file shipped with curate (``pipelines/`` or ``filters/``), from a checkout or a wheel."""
    here = Path(__file__).resolve().parent
    for base in (here.parent / kind, here / "_bundled" / kind):
        if (base / name).exists():
            return base / name
    return None


def _find_preset(name: str, recipe_file: str) -> Path:
    candidates = [Path(recipe_file).parent / name] if name.endswith((".yaml", ".yml")) else []
    for d in preset_dirs():
        candidates += [d / f"{name}.yaml", d / name]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted({p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise RecipeError(f"unknown preset {name!r}; known presets: {', '.join(known) or 'none'}")


# ---------------------------------------------------------------- loading


def load_recipe(
    path: str | os.PathLike,
    *,
    overrides: Iterable[str] = (),
    input_path: str | None = None,
    output_path: str | None = None,
    ray_address: str | None = None,
) -> Recipe:
    """Load, splice presets, apply overrides and validate a recipe file.

    Every error is a :class:`RecipeError` naming the file, the line and the key path.
    """
    doc = load_yaml(path)
    data = doc.data
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a mapping with keys source, stages, write, runtime", file=doc.file, line=1)
    set_keys: dict[tuple, str] = {}
    for expr in overrides:
        set_keys[apply_override(data, expr)] = expr
    if input_path is not None:
        data.setdefault("source", {})
        if not isinstance(data["source"], dict):
            raise RecipeError("source must be a mapping", file=doc.file, line=doc.line_for(("source",)))
        data["source"]["path"] = input_path
    if output_path is not None:
        data.setdefault("write", {})
        data["write"]["output"] = output_path
    if ray_address is not None:
        data.setdefault("runtime", {})
        data["runtime"]["ray_address"] = ray_address

    def fail(loc: tuple, msg: str, origin: YamlDoc | None = None) -> RecipeError:
        return (origin or doc).error(loc, msg, overrides=set_keys)

    # Stages: splice presets, then validate each against its own Config.
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        raise fail(("stages",), "must be a list of {use: NAME, ...options}")
    stages: list[StageConfig] = []
    origins: list[tuple[tuple, YamlDoc | None]] = []  # where each expanded stage was written, for errors
    for i, entry in enumerate(raw_stages):
        loc = ("stages", i)
        if isinstance(entry, dict) and "preset" in entry:
            if set(entry) != {"preset"}:
                raise fail(loc, "a preset entry takes only `preset: NAME`")
            try:
                preset_file = _find_preset(str(entry["preset"]), doc.file)
            except RecipeError as e:
                raise fail(loc + ("preset",), e.detail) from None
            pdoc = load_yaml(preset_file)
            pstages = pdoc.data.get("stages") if isinstance(pdoc.data, dict) else None
            if not isinstance(pstages, list):
                raise RecipeError("a preset is a mapping with a `stages:` list", file=pdoc.file, line=1)
            for j, pentry in enumerate(pstages):
                if isinstance(pentry, dict) and "preset" in pentry:
                    raise fail(("stages", j), "presets cannot include presets", pdoc)
                new = _expand([_validate_stage(pentry, ("stages", j), lambda lc, m, d=pdoc: fail(lc, m, d))])
                stages += new
                origins += [(("stages", j), pdoc)] * len(new)
        else:
            new = _expand([_validate_stage(entry, loc, fail)])
            stages += new
            origins += [(loc, None)] * len(new)
    names: set[str] = set()
    for s, (loc, origin) in zip(stages, origins, strict=True):
        n = s.name or s.use
        if n in names or n in ("source", "download_source"):
            raise fail(loc, f"stage name {n!r} is used twice; give one of them `name:`", origin)
        names.add(n)

    rest = {k: v for k, v in data.items() if k != "stages"}
    try:
        recipe = Recipe.model_validate(rest)
    except ValidationError as e:
        err = e.errors()[0]
        raise fail(tuple(err["loc"]), validation_message(err)) from None
    recipe.stages = stages
    return recipe


def _validate_stage(entry: Any, loc: tuple, fail) -> StageConfig:
    if not isinstance(entry, dict) or "use" not in entry:
        raise fail(loc, "each stage is a mapping with `use: NAME` (or `preset: NAME`)")
    use = entry["use"]
    known = stage_classes()
    if use not in known:
        raise fail(loc + ("use",), f"unknown stage {use!r}; known stages: {', '.join(sorted(known))}")
    try:
        return known[use].Config.model_validate(entry)
    except ValidationError as e:
        err = e.errors()[0]
        raise fail(loc + tuple(err["loc"]), validation_message(err)) from None


def _expand(configs: list[StageConfig]) -> list[StageConfig]:
    return [c for cfg in configs for c in stage_class(cfg.use).expand(cfg)]


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of a recipe, with every registered stage's options."""
    configs = tuple(cls.Config for cls in sorted(stage_classes().values(), key=lambda c: c.name))
    StageUnion = Annotated[Union[configs], Field(discriminator="use")]  # noqa: UP007

    class PresetEntry(BaseModel):
        model_config = ConfigDict(extra="forbid")
        preset: str = Field(description="Name of a file in filters/ whose stages are spliced in here.")

    class RecipeSchema(Recipe):
        stages: list[Union[StageUnion, PresetEntry]] = Field(default_factory=list)  # type: ignore[assignment]  # noqa: UP007

    schema = RecipeSchema.model_json_schema()
    schema["title"] = "curate recipe"
    return schema
