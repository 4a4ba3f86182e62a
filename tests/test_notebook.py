"""notebooks/explore_run.ipynb runs top to bottom on a real run's output (executed with nbclient)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "explore_run.ipynb"
CELL_TIMEOUT_S = 120


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 40 % 256, seed * 90 % 256, 120)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, ray_session) -> Path:
    """12 rows: 6 clean, 3 one-word captions (caption_length), 3 image copies (dedup_exact)."""
    from curate.recipe import load_recipe
    from curate.runner import run

    root = tmp_path_factory.mktemp("notebook-run")
    rows = [{"image": _png(i), "caption": f"a green field with {i} sheep", "similarity": 0.5 + i / 20}
            for i in range(6)]
    rows += [{"image": _png(10 + i), "caption": "sheep", "similarity": 0.1} for i in range(3)]
    rows += [{"image": _png(i), "caption": f"the same field again, copy {i}", "similarity": 0.2} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "in.parquet")
    recipe = {"source": {"path": str(root / "in.parquet")},
              "stages": [{"use": "caption_length", "min_words": 3}, {"use": "dedup_exact", "by": ["image"]}],
              "write": {"output": str(root / "out")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert run(load_recipe(root / "recipe.yaml")).counts.kept == 6
    return root / "out"


def test_notebook_runs_on_a_run_and_shows_its_numbers(small_run, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("CURATE_RUN", str(small_run))  # the notebook's parameter
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(small_run.parent)}}).execute()
    texts, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            texts.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
            images += "image/png" in out.get("data", {})
    text = "\n".join(texts)
    assert f"{small_run}: 12 rows in, 6 kept, 6 dropped" in text
    assert "caption_too_few_words" in text and "duplicate:exact_image" in text
    assert "score columns: ['similarity']" in text
    assert "showing 6 of 6 kept samples" in text
    assert images >= 3  # funnel, the similarity histogram, the kept images
