"""``use: recaption``: new captions from the loopback server, caption modes, failures, the written .txt."""

from __future__ import annotations

import hashlib
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.recaption import Recaption, RecaptionConfig, alternate_pick
from tests.conftest import jpeg_bytes
from tests.vlm.chat_server import ChatServer, recaption_for

IMAGES = [jpeg_bytes(color=(20 * i, 255 - 20 * i, 90)) for i in range(8)]


def _batch(n: int = 8) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(n)], "caption": [f"alt text {i}" for i in range(n)],
                     "image": pa.array([IMAGES[i % len(IMAGES)] for i in range(n)], pa.binary()),
                     "image_format": ["jpg"] * n, "status": ["kept"] * n,
                     "dropped_by": pa.nulls(n, pa.string()), "reason": pa.nulls(n, pa.string())})


@pytest.fixture
def server():
    s = ChatServer().start()
    yield s
    s.stop()


def _stage(server, **kw) -> Recaption:
    return Recaption(RecaptionConfig(model="captioner-1", base_url=server.base_url, retries=1,
                                     retry_backoff=0.01, timeout=2, **kw))


def _run(stage: Recaption, batch: pa.Table) -> pa.Table:
    try:
        return stage(batch)
    finally:
        stage.teardown()


def test_modes_choose_the_training_caption(server):
    recaps = [recaption_for(IMAGES[i]) for i in range(8)]
    out = _run(_stage(server, mode="recaption"), _batch())
    assert out["recaption"].to_pylist() == recaps == out["train_caption"].to_pylist()
    assert out["caption"].to_pylist() == [f"alt text {i}" for i in range(8)]  # the original is kept
    assert set(out["recaption_model"].to_pylist()) == {"captioner-1"}
    out = _run(_stage(server, mode="original"), _batch())
    assert out["train_caption"].to_pylist() == out["caption"].to_pylist()
    out = _run(_stage(server, mode="both", both="join", join_separator=" || "), _batch())
    assert out["train_caption"].to_pylist() == [f"alt text {i} || {recaps[i]}" for i in range(8)]
    out = _run(_stage(server, mode="both"), _batch())
    picks = [alternate_pick(f"k{i}") for i in range(8)]
    assert 0 < sum(picks) < 8  # both kinds occur
    assert out["train_caption"].to_pylist() == [recaps[i] if picks[i] else f"alt text {i}" for i in range(8)]
    assert picks == [hashlib.sha1(f"k{i}".encode()).digest()[0] % 2 == 1 for i in range(8)]  # stable hash


def test_failures_drop_or_keep_the_original(server):
    bad = hashlib.sha1(IMAGES[1]).hexdigest()[:10]
    empty = hashlib.sha1(IMAGES[2]).hexdigest()[:10]
    server.behaviour = lambda c, n: "http_500" if c == f"image:{bad}" else ("empty" if c == f"image:{empty}" else "ok")
    out = _run(_stage(server), _batch(4))
    assert out["reason"].to_pylist() == [None, "recaption_http_500", "recaption_empty", None]
    out = _run(_stage(server, on_failure="keep_original"), _batch(4))
    assert out["status"].to_pylist() == ["kept"] * 4
    assert out["train_caption"].to_pylist()[1:3] == ["alt text 1", "alt text 2"]
    assert out["recaption"].to_pylist()[1:3] == [None, None]


def test_fuse_end_to_end_writes_the_fused_caption(tmp_path, make_recipe, ray_session, server):
    n = 24
    pq.write_table(pa.table({"caption": [f"alt text {i}" for i in range(n)],
                             "image": pa.array([IMAGES[i % len(IMAGES)] for i in range(n)], pa.binary())}),
                   tmp_path / "src.parquet")
    path = make_recipe({
        "source": {"path": str(tmp_path / "src.parquet")},
        "stages": [{"use": "recaption", "model": "captioner-1", "base_url": server.base_url, "mode": "fuse",
                    "prompt": "detailed"}],
        "write": {"output": str(tmp_path / "out"), "caption_column": "train_caption"},
        "runtime": {"num_cpus": 2},
    })
    m = run(load_recipe(path))
    assert m.complete and m.counts.kept == n and server.requests == 2 * n  # describe, then fuse
    assert sum("in detail" in t for _, t in server.attempts) == len(IMAGES)  # one per distinct image
    rows = {r["caption"]: r for r in pq.read_table(tmp_path / "out" / "parquet").to_pylist()}
    for i in range(n):
        r = rows[f"alt text {i}"]
        recap = recaption_for(IMAGES[i % len(IMAGES)])
        assert r["recaption"] == recap and r["fused_caption"] == f"fused: alt text {i} | {recap}"
        assert r["train_caption"] == r["fused_caption"]
    with tarfile.open(tmp_path / "out" / "webdataset" / "00000.tar") as tar:
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    assert len(texts) == n and all(t.startswith("fused: alt text ") for t in texts.values())


def test_detailed_and_custom_prompts_reach_the_server(server, tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("Name the colours. Alt-text for context: {caption}")
    stage = _stage(server, prompt=str(custom))
    out = _run(stage, _batch(2))
    assert out["recaption"].to_pylist() == [recaption_for(IMAGES[0]), recaption_for(IMAGES[1])]
    assert {t for _, t in server.attempts} == {"Name the colours. Alt-text for context: alt text 0",
                                               "Name the colours. Alt-text for context: alt text 1"}
    with pytest.raises(Exception, match="neither a shipped prompt"):
        _stage(server, prompt="no-such-prompt").check()
