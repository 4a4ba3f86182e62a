"""The shipped recipes run as the README says: on a URL list, or stop early with a clear error."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from curate.demo.server import DemoServer
from curate.demo.world import generate_world
from curate.recipe import load_recipe
from curate.runner import run


@pytest.fixture(scope="module")
def served_world(tmp_path_factory):
    world = generate_world(tmp_path_factory.mktemp("world"), samples=80, seed=5)
    server = DemoServer(world).start()
    urls = tmp_path_factory.mktemp("urls") / "urls.parquet"
    pq.write_table(world.url_list(server.base_url), urls)
    yield world, server, urls
    server.stop()


def test_datacomp_basic_pipeline_on_a_url_list(served_world, tmp_path, ray_session):
    world, server, urls = served_world
    recipe = load_recipe("pipelines/datacomp-basic.yaml", input_path=str(urls), output_path=str(tmp_path / "out"),
                         overrides=["stages.0.allow_private_networks=true", "stages.0.timeout=2",
                                    "stages.0.retries=0", "write.samples_per_shard=40"])
    m = run(recipe)
    assert m.counts.input == 80 and m.complete
    truth = {r["url"]: r["category"] for r in world.truth_with_urls(server.base_url).to_pylist()}
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pylist()  # the folder reads as one table
    assert len(ledger) == 80
    by_cat: dict[str, set[str]] = {}
    for row in ledger:
        cat = truth[row["url"]]
        by_cat.setdefault(cat, set()).add(row["dropped_by"] or "kept")
    assert by_cat["tiny_image"] == by_cat["elongated_image"] == {"datacomp_image"}
    assert by_cat["non_english"] == {"datacomp_language"}
    assert by_cat["dead_link"] == {"download"} and by_cat["exact_duplicate"] == {"dedup_exact"}
    assert by_cat["junk_caption"] <= {"caption_junk", "datacomp_caption"}
    assert "kept" in by_cat["clean"]


def test_laion_style_without_checkpoint_stops_before_any_work(tmp_path):
    pq.write_table(_tiny_urls(), tmp_path / "u.parquet")
    r = subprocess.run([sys.executable, "-m", "curate.cli", "run", "pipelines/laion-style.yaml",
                        "-i", str(tmp_path / "u.parquet"), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                         "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    assert "ViT-B-32/openai is not in the local cache" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "_work" / "plan.json").exists()


def _tiny_urls():
    import pyarrow as pa

    return pa.table({"url": ["http://example.com/a.jpg"], "caption": ["a red circle on white"]})
