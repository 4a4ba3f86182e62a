"""Packed sequences: a shard's kept samples bin-packed into training sequences of ``max_tokens``.

Runs per output shard at finalize (see ``curate/stages/pack.py`` for why), over
the rows the ``pack`` stage measured (``num_tokens``). Two layouts, both
round-trippable with the readers users already have:

- ``packed/webdataset/SHARD.tar``: one member group per sequence —
  ``seqSHARD_000123.0.jpg``, ``seqSHARD_000123.1.jpg``, … and ``seqSHARD_000123.json``
  holding the texts, keys, per-sample token counts and token offsets;
- ``packed/parquet/SHARD.parquet``: one row per sequence with ``images``
  (list<binary>), ``image_formats``, ``texts``, ``keys``, ``num_tokens`` and
  ``offsets`` (list<int32>) and ``total_tokens``.

A sample's offset is where its tokens start in the sequence (BOS included); the
last sample ends at ``total_tokens`` ≤ ``max_tokens``.

>>> from curate.recipe import Recipe  # doctest: +SKIP
>>> packing_options(recipe)["max_tokens"]  # doctest: +SKIP
4096
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import rows
from curate.errors import CurateError
from curate.fsutil import atomic_open
from curate.pack.ffd import first_fit_decreasing
from curate.sinks.base import ShardRows, ShardWrite, Sink
from curate.sinks.tar import TarWriter
from curate.stages.pack import NUM_TOKENS, PACK_TEXT

log = logging.getLogger(__name__)

PACKED = "packed"
PACK_STAGE = "pack"
SEQUENCE_GROUP_ROWS = 64  # Parquet row group: 64 sequences ≈ 1,000+ images, a few MB to read at once


def packing_options(recipe: Any) -> dict[str, Any] | None:
    """What the packed writer needs, taken from the recipe's one ``pack`` stage (the single source
    of ``max_tokens``); None when ``write.formats`` has no ``packed``. Fails before any work when
    the recipe asks for packed output without a ``pack`` stage."""
    if PACKED not in recipe.write.formats:
        return None
    packs = [c for c in recipe.stages if c.use == PACK_STAGE]
    if len(packs) != 1:
        found = "none" if not packs else f"{len(packs)} ({', '.join(c.name or c.use for c in packs)})"
        raise CurateError(f"write.formats has `packed`, which needs exactly one `use: pack` stage to measure "
                          f"the samples; found {found}")
    cfg = packs[0]
    return {
        "stage": cfg.name or cfg.use,
        "max_tokens": cfg.max_tokens,
        "image_tokens": cfg.image_tokens,
        "special_tokens": cfg.special_tokens,
        "text_column": cfg.text_column,
        "token_count": "exact" if cfg.tokenizer else "approximate",
        "tokenizer": cfg.tokenizer,
        "formats": list(getattr(recipe.write, "packed_formats", ["webdataset", "parquet"])),
    }


class PackedShard:
    """One shard's kept rows, packed: the sequences as lists of row indices, plus what they hold."""

    def __init__(self, kept: pa.Table, *, shard: int, options: dict[str, Any]) -> None:
        if NUM_TOKENS not in kept.column_names:
            raise CurateError(f"shard {shard}: kept rows have no {NUM_TOKENS} column; the `pack` stage "
                              "must run on every kept sample")
        lengths = kept[NUM_TOKENS].to_numpy(zero_copy_only=False)
        if kept[NUM_TOKENS].null_count:
            missing = kept[rows.KEY][int(np.flatnonzero(kept[NUM_TOKENS].is_null().to_numpy(
                zero_copy_only=False))[0])].as_py()
            raise CurateError(f"shard {shard}: kept sample {missing!r} has no {NUM_TOKENS}; the `pack` "
                              "stage must run on every kept sample")
        self.shard = shard
        self.options = options
        self.kept = kept
        self.lengths = lengths.astype(np.int64)
        # kept rows arrive sorted by key, so FFD's ties (equal lengths) go by key: deterministic.
        self.packing = first_fit_decreasing(self.lengths, options["max_tokens"])
        self.bins = self.packing.bins()
        texts = kept[options["text_column"]].to_pylist() if options["text_column"] in kept.column_names \
            else [None] * kept.num_rows
        if PACK_TEXT in kept.column_names:
            texts = [c if c is not None else t for c, t in zip(kept[PACK_TEXT].to_pylist(), texts, strict=True)]
        self.texts = [t or "" for t in texts]
        self.keys = kept[rows.KEY].to_pylist()
        self.images = kept[rows.IMAGE].to_pylist() if rows.IMAGE in kept.column_names else [None] * kept.num_rows
        self.formats = (kept[rows.IMAGE_FORMAT].to_pylist() if rows.IMAGE_FORMAT in kept.column_names
                        else ["jpg"] * kept.num_rows)

    def sequence_key(self, i: int) -> str:
        return f"seq{self.shard:05d}_{i:06d}"  # no dots: WebDataset splits member names at the first one

    def sequences(self):
        """Yield (key, row indices, token counts, offsets) per sequence."""
        for i, idx in enumerate(self.bins):
            idx = idx.tolist()
            tokens = self.lengths[idx]
            offsets = np.concatenate([[0], np.cumsum(tokens)[:-1]]).astype(int).tolist()
            yield self.sequence_key(i), idx, tokens.astype(int).tolist(), offsets

    def stats(self) -> dict[str, Any]:
        p = self.packing
        return {"sequences": p.num_bins, "samples": int(self.kept.num_rows), "tokens": int(p.loads.sum()),
                "capacity": int(p.num_bins * p.capacity), "efficiency": round(p.efficiency, 6),
                "max_tokens": p.capacity, "token_count": self.options["token_count"]}

    def write_webdataset(self, path: str) -> int:
        with atomic_open(path) as f, TarWriter(f, mtime=int(time.time())) as tar:
            for key, idx, tokens, offsets in self.sequences():
                members = []
                for j, r in enumerate(idx):
                    if self.images[r] is not None:
                        members.append((f"{j}.{self.formats[r] or 'jpg'}", self.images[r]))
                meta = {"key": key, "keys": [self.keys[r] for r in idx], "texts": [self.texts[r] for r in idx],
                        "image_formats": [self.formats[r] if self.images[r] is not None else None for r in idx],
                        "num_tokens": tokens, "offsets": offsets, "total_tokens": int(sum(tokens)),
                        "max_tokens": self.packing.capacity, "image_tokens": self.options["image_tokens"],
                        "token_count": self.options["token_count"]}
                members.append(("json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
                for ext, data in members:
                    tar.add(f"{key}.{ext}", data)
        return self.packing.num_bins

    def table(self) -> pa.Table:
        cols: dict[str, list] = {"key": [], "images": [], "image_formats": [], "texts": [], "keys": [],
                                 "num_tokens": [], "offsets": [], "total_tokens": []}
        for key, idx, tokens, offsets in self.sequences():
            cols["key"].append(key)
            cols["images"].append([self.images[r] for r in idx])
            cols["image_formats"].append([self.formats[r] if self.images[r] is not None else None for r in idx])
            cols["texts"].append([self.texts[r] for r in idx])
            cols["keys"].append([self.keys[r] for r in idx])
            cols["num_tokens"].append(tokens)
            cols["offsets"].append(offsets)
            cols["total_tokens"].append(int(sum(tokens)))
        schema = pa.schema([
            pa.field("key", pa.string()), pa.field("images", pa.list_(pa.binary())),
            pa.field("image_formats", pa.list_(pa.string())), pa.field("texts", pa.list_(pa.string())),
            pa.field("keys", pa.list_(pa.string())), pa.field("num_tokens", pa.list_(pa.int32())),
            pa.field("offsets", pa.list_(pa.int32())), pa.field("total_tokens", pa.int32()),
        ], metadata={"max_tokens": str(self.packing.capacity), "token_count": self.options["token_count"]})
        return pa.table(cols, schema=schema)

    def write_parquet(self, path: str) -> int:
        table = self.table()
        with atomic_open(path) as f:
            # image bytes are already compressed; the rest is small text and integers
            pq.write_table(table, f, row_group_size=SEQUENCE_GROUP_ROWS, use_dictionary=False,
                           compression={c: ("none" if c == "images" else "zstd") for c in table.column_names})
        return table.num_rows


def write_packed(kept: pa.Table, *, root: str, shard: int, options: dict[str, Any]) -> dict[str, Any]:
    """Pack one shard's kept rows and write the packed layouts; returns the ``_done`` marker's
    ``packed`` entry (sequences, tokens, capacity, efficiency, outputs)."""
    name = f"{shard:05d}"
    packed = PackedShard(kept, shard=shard, options=options)
    outputs = []
    if "webdataset" in options["formats"]:
        rel = f"{PACKED}/webdataset/{name}.tar"
        outputs.append({"path": rel, "format": "webdataset", "num_sequences": packed.write_webdataset(f"{root}/{rel}")})
    if "parquet" in options["formats"]:
        rel = f"{PACKED}/parquet/{name}.parquet"
        outputs.append({"path": rel, "format": "parquet", "num_sequences": packed.write_parquet(f"{root}/{rel}")})
    stats = packed.stats()
    log.debug("shard %s: %d samples in %d sequences, efficiency %.4f", name, stats["samples"],
              stats["sequences"], stats["efficiency"])
    return {**stats, "outputs": outputs}


def summarize_packing(dones: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's packing, from the shards' ``_done`` markers: totals and overall efficiency."""
    entries = [d["packed"] for d in dones if d.get("packed")]
    if not entries:
        return None
    tokens = sum(e["tokens"] for e in entries)
    capacity = sum(e["capacity"] for e in entries)
    return {"sequences": sum(e["sequences"] for e in entries), "samples": sum(e["samples"] for e in entries),
            "tokens": tokens, "capacity": capacity, "efficiency": round(tokens / capacity, 6) if capacity else 1.0,
            "max_tokens": entries[0]["max_tokens"], "token_count": entries[0]["token_count"],
            "outputs": [o for e in entries for o in e["outputs"]]}


class PackedSink(Sink):
    """``packed/{webdataset,parquet}/NNNNN.*``: a shard's kept samples packed into sequences."""

    name = "packed"

    def write(self, shard: ShardRows) -> ShardWrite:
        options = self.ctx.packing
        packed = write_packed(shard.kept, root=self.ctx.root, shard=shard.shard, options=options) \
            if options and shard.kept.num_rows else None
        return ShardWrite(record={"packed": packed})

    def on_complete(self, dones: list[dict[str, Any]]) -> dict[str, Any]:
        return {"packing": summarize_packing(dones)}
