"""``use: mlm_filter`` end to end on Ray against the loopback chat server: scores, drops, resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.mlm_filter import MLMFilter, MLMFilterConfig, parse_score
from tests.conftest import jpeg_bytes
from tests.vlm.chat_server import ChatServer, score

THRESHOLD = 50


def _caption(i: int) -> str:
    return f"sample {i:04d}: a photo of a red square"


def _behaviour(caption: str, attempt: int) -> str:
    """About 22 % of the captions get a failing reply; some succeed only on a retry."""
    i = int(caption.split()[1].rstrip(":"))
    if i % 10 == 0:
        return "http_500"                      # 10 %: every attempt fails
    if i % 10 == 1:
        return "http_429" if attempt == 1 else "ok"   # 10 %: rate-limited once, then fine
    if i % 20 == 2:
        return "no_number"                     # 5 %
    if i % 20 == 12:
        return "score_150"                     # 5 %: out of range
    if i % 50 == 3:
        return "text_first"                    # 2 %: the score is not on the first line
    if i % 50 == 4:
        return "http_400"                      # 2 %: not retried
    if i % 100 == 5:
        return "slow"                          # 1 %: beyond the timeout on every attempt
    return "ok"


def _expected(i: int) -> tuple[str | None, int | None]:
    """(reason, score) the ledger must hold for sample i."""
    what = _behaviour(_caption(i), 2)
    reasons = {"http_500": "judge_http_500", "no_number": "judge_unparseable", "score_150": "judge_unparseable",
               "text_first": "judge_unparseable", "http_400": "judge_http_400", "slow": "judge_timeout"}
    if what in reasons:
        return reasons[what], None
    s = score(_caption(i))
    return (None if s >= THRESHOLD else "mlm_filter_low:semantic_understanding"), s


def _source(path: Path, n: int) -> Path:
    img = jpeg_bytes()
    pq.write_table(pa.table({"id": [f"s{i:04d}" for i in range(n)], "url": [f"http://img/{i}.jpg" for i in range(n)],
                             "caption": [_caption(i) for i in range(n)],
                             "image": pa.array([img] * n, pa.binary())}), path)
    return path


def _recipe(make_recipe, src: Path, out: Path, base_url: str, **stage) -> Path:
    return make_recipe({
        "source": {"path": str(src), "key_col": "id"},
        "stages": [{"use": "mlm_filter", "model": "mlm-filter-test", "base_url": base_url,
                    "metrics": {"semantic_understanding": THRESHOLD}, "timeout": 2.0, "retries": 2,
                    "retry_backoff": 0.01, "concurrency_per_worker": 32, **stage}],
        "write": {"output": str(out), "samples_per_shard": 250},
        "runtime": {"num_cpus": 2},
    })


def test_parse_score_reads_only_the_first_line():
    assert [parse_score(t) for t in ("85", " 85 \nbecause", "Score: 7", "100/100", "0")] == [85, 85, 7, 100, 0]
    assert [parse_score(t) for t in ("150", "-5", "It is 85", "\n", "85.5", "eighty", None)] == [None] * 7


def test_thousand_samples_with_failing_replies_all_accounted_for(tmp_path, make_recipe, ray_session):
    server = ChatServer(_behaviour, slow_seconds=5.0).start()  # timeout 2 s: loaded CI replies late too
    try:
        src = _source(tmp_path / "src.parquet", 1000)
        m = run(load_recipe(_recipe(make_recipe, src, tmp_path / "out", server.base_url)))
    finally:
        server.stop()
    assert m.complete and m.counts.input == 1000
    ledger = {r["caption"]: r for r in pq.read_table(tmp_path / "out" / "ledger").to_pylist()}
    assert len(ledger) == 1000
    wrong = []
    for i in range(1000):
        row = ledger[_caption(i)]
        reason, s = _expected(i)
        got = (row["reason"], row["mlm_semantic_understanding"])
        if got != (reason, s) or (row["status"] == "kept") != (reason is None):
            wrong.append((i, got, (reason, s)))
    assert wrong == []
    assert m.counts.kept + sum(sum(d.values()) for d in m.counts.dropped.values()) == 1000
    dropped = m.counts.dropped["mlm_filter"]
    assert dropped["judge_http_500"] == 100 and dropped["judge_timeout"] == 10 and dropped["judge_http_400"] == 20
    assert dropped["judge_unparseable"] == 50 + 50 + 20
    # the kept shards carry the score too, and the .txt is the original caption
    kept = pq.read_table(tmp_path / "out" / "parquet")
    assert kept.num_rows == m.counts.kept and min(kept["mlm_semantic_understanding"].to_pylist()) >= THRESHOLD


def test_on_unparseable_keep_and_several_metrics(tmp_path, make_recipe, ray_session):
    server = ChatServer(lambda c, n: "no_number" if c.endswith("0: a photo of a red square") else "ok").start()
    try:
        src = _source(tmp_path / "src.parquet", 40)
        path = _recipe(make_recipe, src, tmp_path / "out", server.base_url, on_unparseable="keep",
                       metrics={"image_text_matching": None, "semantic_understanding": None})
        m = run(load_recipe(path))
    finally:
        server.stop()
    assert m.counts.kept == 40 and server.requests == 80  # two metrics: two requests per row
    rows = {r["caption"]: r for r in pq.read_table(tmp_path / "out" / "ledger").to_pylist()}
    assert rows[_caption(10)]["mlm_image_text_matching"] is None and rows[_caption(10)]["status"] == "kept"
    assert rows[_caption(11)]["mlm_image_text_matching"] == score(_caption(11))


def test_rows_without_images_are_not_sent(tmp_path):
    server = ChatServer().start()
    try:
        stage = MLMFilter(MLMFilterConfig(model="m", base_url=server.base_url))
        batch = pa.table({"key": ["a", "b"], "caption": ["one", "two"], "image": pa.array([jpeg_bytes(), None]),
                          "status": ["kept", "kept"], "dropped_by": pa.nulls(2, pa.string()),
                          "reason": pa.nulls(2, pa.string())})
        out = stage(batch)
        stage.teardown()
    finally:
        server.stop()
    assert out["reason"].to_pylist() == [None if score("one") >= 85 else "mlm_filter_low:semantic_understanding",
                                         "image_missing"]
    assert server.requests == 1


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_su85_preset_splices_the_open_qwen2vl_judge(make_recipe):
    r = load_recipe(make_recipe({"source": {"path": "x.parquet"}, "stages": [{"preset": "mlm-filter-su85"}]}))
    [stage] = r.stages
    assert (stage.use, stage.name, stage.metrics) == ("mlm_filter", "mlm_filter_su85", {"semantic_understanding": 85})
    assert stage.model == "weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o" and stage.on_unparseable == "drop"
