"""The mixture file (``curate mix MIXTURE.yaml``): its pydantic model and loading, with errors
that name the file, line and key as recipe errors do (:mod:`curate.yamlio`).

>>> from curate.mix.model import load_mixture
>>> mix = load_mixture("pipelines/mixtures/example.yaml", output="runs/mix")  # doctest: +SKIP
>>> [s.weight for s in mix.sources]                                           # doctest: +SKIP
[0.7, 0.3]
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curate.errors import RecipeError
from curate.yamlio import apply_override, load_yaml, validation_message

MANIFEST_FILE = "mixture_manifest.json"
RUN_MANIFEST = "manifest.json"
DEFAULT_TOKEN_COLUMN = "num_tokens"  # what the pack stage writes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ---------------------------------------------------------------- the mixture file


class MixSource(BaseModel):
    """One input of the mixture and how much of it to take."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Short name: prefixes output keys, names the source in the manifest.")
    path: str | list[str] = Field(description="A curate output folder, Parquet file/folder/glob, or tars.")
    weight: float | None = Field(None, gt=0, description="Share of the total (normalised over sources).")
    epochs: float | None = Field(None, gt=0, description="Passes over the source instead of a weight.")
    format: Literal["auto", "parquet", "webdataset"] = "auto"
    tokens: Literal["auto", "column", "recount"] = Field(
        "auto", description=(
            "How its tokens are counted in the mixture's `token_unit`. auto: its `token_column` when its output "
            "records that column in the same unit (a pack stage's manifest), else recounted from its captions "
            "and images; column: trust `token_column` as being in the mixture's unit (files without a manifest); "
            "recount: always recount."))
    text_column: str | None = Field(
        None, description=("Column whose text is counted when this source is recounted. Default: the column "
                           "its pack stage counted, else `write.caption_column` when it has it, else caption."))

    @model_validator(mode="after")
    def _one_amount(self) -> MixSource:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, _ and - only")
        if (self.weight is None) == (self.epochs is None):
            raise ValueError("give exactly one of `weight` or `epochs`")
        return self


class TokenUnit(BaseModel):
    """What one token is, for every source alike: the pack stage's sum per sample."""

    model_config = ConfigDict(extra="forbid")
    tokenizer: str | None = Field(
        None, description=("Local tokenizer.json (or its directory) that counts caption tokens, or `approximate` "
                           "(the pack stage's estimate: max(words, ceil(UTF-8 bytes / 4))). Default: what the "
                           "sources' pack stages recorded when they agree, else approximate."))
    image_tokens: int | None = Field(None, ge=0, description=(
        "Tokens per image. Default: the sources' recorded value when they agree, else 144 (the pack stage's)."))
    special_tokens: int | None = Field(None, ge=0, description=(
        "Tokens added per sample (BOS/EOS). Default: the sources' recorded value when they agree, else 2."))


class MixWrite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str | None = Field(None, description="Output folder; `-o` sets it.")
    formats: list[Literal["webdataset", "parquet"]] = Field(default_factory=lambda: ["webdataset", "parquet"],
                                                            min_length=1)
    samples_per_shard: int = Field(10000, ge=1)
    caption_column: str = Field("caption", description="Column written as KEY.txt.")


class Mixture(BaseModel):
    """A mixture file: sources with weights or epochs, a unit (and the token unit), a total, a seed."""

    model_config = ConfigDict(extra="forbid")
    sources: list[MixSource] = Field(min_length=1)
    unit: Literal["samples", "tokens"] = "samples"
    total_samples: int | None = Field(None, ge=1)
    total_tokens: int | None = Field(None, ge=1)
    seed: int = 0
    replace: bool = Field(False, description="Sample with replacement (i.i.d. draws).")
    if_short: Literal["error", "cap", "repeat"] = Field(
        "error", description="Without replace, a source smaller than its share: fail, take all, or repeat it.")
    token_column: str = Field(DEFAULT_TOKEN_COLUMN, description=(
        "Per-sample token counts: kept when a source records them in the mixture's unit; the mixture's "
        "rows carry it in that unit."))
    token_unit: TokenUnit = Field(default_factory=TokenUnit, description=(
        "The one unit every source's tokens are counted in; sources recorded in another unit are recounted, "
        "and the mix stops when that is impossible."))
    write: MixWrite = Field(default_factory=MixWrite)

    @model_validator(mode="after")
    def _totals(self) -> Mixture:
        names = [s.name for s in self.sources]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"source name {dup!r} is used twice")
        weighted = [s for s in self.sources if s.weight is not None]
        if weighted and len(weighted) != len(self.sources):
            raise ValueError("give every source a `weight`, or every source `epochs`, not a mix of both")
        total = self.total_samples if self.unit == "samples" else self.total_tokens
        other = self.total_tokens if self.unit == "samples" else self.total_samples
        if other is not None:
            raise ValueError(f"unit is {self.unit}: use total_{self.unit}, not total_"
                             f"{'tokens' if self.unit == 'samples' else 'samples'}")
        if weighted and total is None:
            raise ValueError(f"weights need a total: set total_{self.unit}")
        if not weighted and total is not None:
            raise ValueError(f"total_{self.unit} needs weights; with `epochs` the total follows from the sources")
        return self

    @property
    def total(self) -> int | None:
        return self.total_samples if self.unit == "samples" else self.total_tokens


def load_mixture(path: str | os.PathLike, *, output: str | None = None, overrides: Iterable[str] = ()) -> Mixture:
    """Load and validate a mixture file; errors name the file, line and key like recipe errors."""
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise RecipeError("a mixture is a mapping with keys sources, unit, total_samples/total_tokens, seed, write",
                          file=doc.file, line=1)
    set_keys = {apply_override(doc.data, expr): expr for expr in overrides}
    if output is not None:
        doc.data.setdefault("write", {})["output"] = output
    try:
        mix = Mixture.model_validate(doc.data)
    except ValidationError as e:
        err = e.errors()[0]
        raise doc.error(tuple(err["loc"]), validation_message(err), overrides=set_keys) from None
    if not mix.write.output:
        raise RecipeError("no output folder: pass -o OUT or set write.output", file=doc.file)
    return mix
