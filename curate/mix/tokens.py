"""The token unit of a mixture: what one token is, the same for every source, or a refusal saying why not.

A token count means something only with its unit: the tokenizer that counted the caption
(or the pack stage's labelled estimate without one), the tokens each image takes, and the
tokens added per sample (BOS/EOS) — exactly what the ``pack`` stage adds up into
``num_tokens``. A demo output packed with 144 image tokens and a download-only output
whose captions were never tokenized are not comparable until both are counted the same way.

The mixture's unit is ``token_unit`` in the mixture file; a field left out is taken from
the sources' outputs (their manifest's ``pack`` stage, or an earlier mixture's
``token_unit``) when they agree, else the pack stage's defaults when none records one;
sources that record different values stop the mix until the file picks one. Each file of
a source then keeps its ``num_tokens`` when it is recorded in that unit, and is recounted
otherwise: ``image_tokens`` × (1 if the row has an image) + the caption's tokens from the
unit's tokenizer + ``special_tokens`` — the pack stage's own sum.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from curate import rows
from curate.errors import RecipeError
from curate.pack.tokens import TOKENIZER_FILE, ApproximateCounter, HFTokenizerCounter, TokenCounter
from curate.stages.pack import DEFAULT_IMAGE_TOKENS, DEFAULT_SPECIAL_TOKENS, NUM_TOKENS

log = logging.getLogger(__name__)

APPROXIMATE = "approximate"  # `token_unit.tokenizer: approximate`: the pack stage's estimate without a tokenizer
COUNT_BATCH_ROWS = 65536  # captions tokenized per call: bounded memory, the tokenizer's threads kept busy
_FIELDS = (("tokenizer", APPROXIMATE), ("image_tokens", DEFAULT_IMAGE_TOKENS),
           ("special_tokens", DEFAULT_SPECIAL_TOKENS))


@dataclass(frozen=True)
class Unit:
    """One token unit: ``image_tokens`` per image + caption tokens by ``tokenizer`` + ``special_tokens``."""

    tokenizer: str  # a local tokenizer.json / directory, or APPROXIMATE
    image_tokens: int
    special_tokens: int

    @property
    def exact(self) -> bool:
        return self.tokenizer != APPROXIMATE

    def describe(self) -> str:
        text = f"tokenizer {self.tokenizer}" if self.exact else ApproximateCounter.description
        return f"{self.image_tokens} per image + caption tokens ({text}) + {self.special_tokens} per sample"

    def as_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "image_tokens": self.image_tokens, "special_tokens": self.special_tokens}

    def same_as(self, other: Unit) -> bool:
        return (self.image_tokens, self.special_tokens) == (other.image_tokens, other.special_tokens) \
            and tokenizer_identity(self.tokenizer) == tokenizer_identity(other.tokenizer)


@dataclass(frozen=True)
class Recorded:
    """The unit a source's output says its token column is in, and where it says so."""

    unit: Unit
    column: str  # the column holding the counts
    text_column: str | None  # the text that was counted (None: it differs by row, as in a mixture)
    origin: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.unit.as_dict(), "column": self.column, "text_column": self.text_column, "origin": self.origin}


@functools.lru_cache(maxsize=64)
def tokenizer_identity(tokenizer: str) -> str:
    """Two tokenizer settings are the same tokenizer when they name the same file contents (or the same
    path, when the file is not on this machine)."""
    if tokenizer == APPROXIMATE:
        return APPROXIMATE
    p = Path(tokenizer)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if f.is_file():
        return "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    return "path:" + os.path.normpath(tokenizer)


def recorded_unit(manifest: dict[str, Any], where: str) -> Recorded | None:
    """What an output's manifest records about its token counts: the last ``pack`` stage of its
    recipe (what wrote ``num_tokens``), or an earlier mixture's ``token_unit``; None when nothing."""
    mixed = manifest.get("token_unit")
    if isinstance(mixed, dict):
        return Recorded(Unit(str(mixed["tokenizer"]), int(mixed["image_tokens"]), int(mixed["special_tokens"])),
                        manifest.get("token_column", NUM_TOKENS), mixed.get("text_column"), f"the mixture {where}")
    stages = (manifest.get("recipe") or {}).get("stages") or []
    packs = [s for s in stages if isinstance(s, dict) and s.get("use") == "pack"]
    if not packs:
        return None
    p = packs[-1]
    unit = Unit(str(p.get("tokenizer") or APPROXIMATE), int(p.get("image_tokens", DEFAULT_IMAGE_TOKENS)),
                int(p.get("special_tokens", DEFAULT_SPECIAL_TOKENS)))
    return Recorded(unit, NUM_TOKENS, p.get("text_column", rows.CAPTION),
                    f"the `{p.get('name') or 'pack'}` stage in {where}")


def resolve_unit(declared: Any, recorded: list[tuple[str, Recorded]]) -> tuple[Unit, dict[str, str]]:
    """The mixture's unit: each field as declared (``token_unit``), else as every source that records
    one agrees, else the pack stage's default. Sources that disagree on an undeclared field: RecipeError."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, default in _FIELDS:
        value = getattr(declared, name)
        if value is not None:
            values[name], origin[name] = value, "declared in the mixture file (token_unit)"
            continue
        seen: dict[Any, tuple[Any, list[str]]] = {}
        for source, rec in recorded:
            v = getattr(rec.unit, name)
            names = seen.setdefault(tokenizer_identity(v) if name == "tokenizer" else v, (v, []))[1]
            if source not in names:
                names.append(source)
        if not seen:
            values[name], origin[name] = default, "the pack stage's default (no source records a unit)"
        elif len(seen) == 1:
            (v, names), = seen.values()
            values[name], origin[name] = v, f"recorded by source{'s' if len(names) > 1 else ''} " + \
                ", ".join(repr(n) for n in names)
        else:
            found = "; ".join(f"{', '.join(repr(n) for n in names)}: {v}" for v, names in seen.values())
            raise RecipeError(
                f"the mixture's sources record token counts in different units ({name} — {found}), so their "
                f"tokens cannot be added up or compared as they are, and the mixture file does not say which "
                f"unit to count in. Set `token_unit.{name}` in the mixture file: sources recorded in another "
                "unit are then recounted in it (image_tokens per image + the caption's tokens from the "
                "tokenizer + special_tokens), or mix by `unit: samples`.")
    unit = Unit(str(values["tokenizer"]), int(values["image_tokens"]), int(values["special_tokens"]))
    if not unit.exact:
        log.warning("mixture: caption tokens are approximate (%s); set token_unit.tokenizer to the model's "
                    "tokenizer.json for exact counts", ApproximateCounter.description)
    return unit, origin


class Counting:
    """The mixture's unit and, loaded on first use, the counter of its caption tokens."""

    def __init__(self, unit: Unit, origin: dict[str, str], token_column: str, caption_column: str) -> None:
        self.unit, self.origin = unit, origin
        self.token_column, self.caption_column = token_column, caption_column
        self._counter: TokenCounter | None = None

    def counter(self, why: str) -> TokenCounter:
        """The caption counter; ``why`` (which source needs a recount, and why) leads the error if it fails."""
        if self._counter is None:
            if not self.unit.exact:
                self._counter = ApproximateCounter()
            else:
                try:
                    self._counter = HFTokenizerCounter(self.unit.tokenizer)
                except (OSError, ValueError, RuntimeError) as e:
                    raise RecipeError(
                        f"{why}, which needs the mixture's tokenizer {self.unit.tokenizer} "
                        f"({self.origin['tokenizer']}), and it cannot be loaded here: {e}. Without it that "
                        "source's tokens would be in another unit than the others'. Make the tokenizer "
                        "available and set `token_unit.tokenizer: PATH`, or mix by `unit: samples`.") from None
        return self._counter

    def decide(self, source: Any, rec: Recorded | None, columns: list[str] | None) -> tuple[str, str, str]:
        """For one file: ``(how, text_column, why)`` — ``how`` is ``recorded_column``, ``declared_column``
        or ``recount``; ``why`` says why a recount is needed. ``columns``: the file's columns (None:
        not known before reading, as in tars)."""
        text = source.text_column or (rec.text_column if rec else None) or (
            self.caption_column if columns is None or self.caption_column in columns else rows.CAPTION)
        has_column = columns is None or self.token_column in columns
        name = f"mixture source {source.name!r}"
        if source.tokens == "recount":
            return "recount", text, f"{name} is recounted (`tokens: recount`) from its `{text}` column"
        if rec is not None and rec.column == self.token_column and not rec.unit.same_as(self.unit):
            if source.tokens == "column":
                raise RecipeError(
                    f"{name} says `tokens: column`, but {rec.origin} records its `{rec.column}` in another unit "
                    f"({rec.unit.describe()}) than the mixture's ({self.unit.describe()}). Use `tokens: auto` "
                    "to recount it in the mixture's unit, or set `token_unit` to its unit.")
            return "recount", text, (f"{name} records `{rec.column}` in another unit ({rec.unit.describe()}, "
                                     f"{rec.origin}) than the mixture's, so it is recounted from its `{text}` column")
        if source.tokens == "column":
            return "declared_column", text, ""
        if rec is not None and rec.column == self.token_column and has_column and (
                source.text_column is None or source.text_column == rec.text_column):
            return "recorded_column", text, ""
        if rec is None:
            if columns is not None and has_column:
                had = f"has a `{self.token_column}` column but "
            else:
                had = f"has no `{self.token_column}` column and "
            return "recount", text, (f"{name} {had}records no token unit (no manifest with a pack stage), so "
                                     f"its tokens are counted here from its `{text}` column")
        if rec.column != self.token_column:
            why = f"{rec.origin} records `{rec.column}`, not the mixture's token_column `{self.token_column}`"
        elif not has_column:
            why = f"its file has no `{rec.column}` column although {rec.origin} records one"
        else:
            why = f"its `{rec.column}` counted `{rec.text_column}` ({rec.origin}), not `{text}`"
        return "recount", text, f"{name} is recounted from its `{text}` column: {why}"

    def count(self, texts: list[str | None], has_image: np.ndarray, why: str) -> np.ndarray:
        """Tokens of samples in the unit: the pack stage's sum (image, caption, BOS/EOS)."""
        counter = self.counter(why)
        text = np.array(counter.count([t or "" for t in texts]), dtype=np.int64) if texts else np.zeros(0, np.int64)
        return has_image.astype(np.int64) * self.unit.image_tokens + text + self.unit.special_tokens

    def count_parquet(self, pf: pq.ParquetFile, text_column: str, why: str) -> np.ndarray:
        """Recount a Parquet file: its text column in batches, and which rows have an image."""
        parts: list[np.ndarray] = []
        has_image = image_presence(pf)
        pos = 0
        for batch in pf.iter_batches(columns=[text_column], batch_size=COUNT_BATCH_ROWS):
            n = batch.num_rows
            parts.append(self.count(batch.column(0).to_pylist(), has_image[pos:pos + n], why))
            pos += n
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def image_presence(pf: pq.ParquetFile) -> np.ndarray:
    """Which rows have an image, reading image bytes only for row groups whose statistics show nulls."""
    md = pf.metadata
    leaf = next((j for j in range(md.num_columns) if md.schema.column(j).path == rows.IMAGE), None)
    parts = []
    for rg in range(md.num_row_groups):
        n = md.row_group(rg).num_rows
        stats = md.row_group(rg).column(leaf).statistics if leaf is not None else None
        if stats is not None and stats.has_null_count and stats.null_count == 0:
            parts.append(np.ones(n, bool))
        elif leaf is None:
            parts.append(np.zeros(n, bool))
        else:
            col = pf.read_row_group(rg, columns=[rows.IMAGE])[rows.IMAGE]
            parts.append(~col.is_null().to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0, bool)
