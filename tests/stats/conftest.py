"""One small run whose truth is known, shared by the stats, report and browser tests.

48 Parquet rows with image bytes, a ``source`` column, a ``num_tokens`` column and a
carried ``similarity`` score, through caption_length → image_rules → language →
dedup_exact (by image). Which stage drops which row is fixed by construction.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPT_CAPTION = "<script>alert('owned')</script>"
CLEAN = 20  # kept
SHORT = 6  # caption_length: caption_too_few_words (one of them is SCRIPT_CAPTION)
TINY = 5  # image_rules: image_too_small
FOREIGN = 4  # language: language:<code>
DUPES = 5  # dedup_exact: duplicate:exact_image (copies of the first clean images)
TOTAL = CLEAN + SHORT + TINY + FOREIGN + DUPES

FOREIGN_CAPTIONS = [
    "Das ist ein wunderschönes rotes Haus am Rande des dunklen Waldes",
    "Une belle maison rouge au bord de la forêt sombre et mystérieuse",
    "Una hermosa casa roja en el borde del bosque oscuro y misterioso",
    "Una bellissima casa rossa ai margini della foresta oscura e misteriosa",
]


def image(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")  # PNG: distinct colours give distinct bytes
    return buf.getvalue()


@dataclass
class KnownRun:
    output: Path
    input: pa.Table
    recipe: dict


def build_input() -> pa.Table:
    rows: list[dict] = []

    def add(caption: str, img: bytes, source: str, tokens: int, similarity: float) -> None:
        rows.append({"image": img, "caption": caption, "source": source, "num_tokens": tokens,
                     "similarity": similarity, "url": f"http://example.test/{len(rows)}.png"})

    for i in range(CLEAN):  # 64x48 landscape images, unique colours
        add(f"a photo of a red house number {i} near the forest", image(64, 48, i), ["web", "books"][i % 2],
            100 + i, 0.5 + i / 100)
    for i in range(SHORT):
        add(SCRIPT_CAPTION if i == 0 else "house", image(40, 40, 100 + i), "web", 10, 0.1)
    for i in range(TINY):
        add(f"a small picture of a blue car number {i} in the city", image(8, 8, 200 + i), "books", 20, 0.2)
    for i, cap in enumerate(FOREIGN_CAPTIONS):
        add(cap, image(32, 64, 300 + i), "web", 30, 0.3)
    for i in range(DUPES):  # same bytes as clean image i, later key: the copy is the one dropped
        add(f"another photo of the same house, copy {i}", image(64, 48, i), "web", 40, 0.4)
    assert len(rows) == TOTAL
    return pa.Table.from_pylist(rows)


def known_recipe(input_path: Path, output: Path) -> dict:
    return {
        "source": {"path": str(input_path)},
        "stages": [
            {"use": "caption_length", "min_words": 3},
            {"use": "image_rules", "min_side": 16},
            {"use": "language", "keep": ["en"]},
            {"use": "dedup_exact", "by": ["image"]},
        ],
        "write": {"output": str(output), "samples_per_shard": 20},
        "runtime": {"batch_size": 16},
    }


@pytest.fixture(scope="session")
def known_run(tmp_path_factory, ray_session) -> KnownRun:
    """The run above, executed once per session through curate.runner.run (stats included)."""
    import yaml

    from curate.recipe import load_recipe
    from curate.runner import run

    root = tmp_path_factory.mktemp("stats-run")
    table = build_input()
    pq.write_table(table, root / "input.parquet", row_group_size=10)
    recipe = known_recipe(root / "input.parquet", root / "out")
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    manifest = run(load_recipe(root / "recipe.yaml"))
    assert manifest.complete
    return KnownRun(output=root / "out", input=table, recipe=recipe)
