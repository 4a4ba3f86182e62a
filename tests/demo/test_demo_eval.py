"""Grading stages against the truth: the definitions of the module docstring, on a hand-made ledger."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from curate.demo.run import EVAL_FILE, check_output, evaluate, is_demo_output
from curate.errors import OutputError

# url, category, dup_group  |  status, dropped_by
ROWS = [
    ("u1", "clean", None, "kept", None),
    ("u2", "dead_link", None, "dropped", "download"),
    ("u3", "junk_caption", None, "dropped", "caption_length"),
    ("u4", "junk_caption", None, "kept", None),                        # missed by caption_length
    ("u5", "clean", "g1", "dropped", "dedup_exact"),                  # original dropped, copy kept: fine
    ("u6", "exact_duplicate", "g1", "kept", None),
    ("u7", "clean", "g2", "dropped", "dedup_exact"),                  # both members dropped: one too many
    ("u8", "exact_duplicate", "g2", "dropped", "dedup_exact"),
    ("u9", "non_english", None, "dropped", "caption_length"),         # not caption_length's job
    ("u10", "opt_out", None, "dropped", "download"),
    ("u11", "clean", None, "dropped", "dedup_exact"),                 # a clean row lost
]
STAGES = [("download", "download"), ("caption_length", "caption_length"), ("dedup_exact", "dedup_exact"),
          ("language", "language"), ("my_filter", "my_filter")]


@pytest.fixture(scope="module")
def ev():
    truth = pa.table({"url": [r[0] for r in ROWS], "category": [r[1] for r in ROWS],
                      "dup_group": pa.array([r[2] for r in ROWS], pa.string())})
    ledger = pa.table({"key": [f"{i:09d}" for i in range(len(ROWS))], "url": [r[0] for r in ROWS],
                       "status": [r[3] for r in ROWS], "dropped_by": pa.array([r[4] for r in ROWS], pa.string()),
                       "reason": pa.array([None if r[4] is None else "why" for r in ROWS], pa.string())})
    return evaluate(truth, ledger, STAGES)


def _stage(ev, name):
    return next(s for s in ev["stages"] if s["stage"] == name)


def test_perfect_stage(ev):
    s = _stage(ev, "download")
    assert (s["reached"], s["dropped"], s["expected"], s["correct"]) == (11, 2, 2, 2)
    assert s["precision"] == s["recall"] == 1.0 and s["dropped_by_category"] == {"dead_link": 1, "opt_out": 1}


def test_wrong_drops_and_misses(ev):
    s = _stage(ev, "caption_length")
    assert (s["reached"], s["dropped"], s["expected"], s["correct"]) == (9, 2, 2, 1)
    assert s["precision"] == s["recall"] == 0.5
    assert s["wrongly_dropped"] == {"non_english": 1} and s["missed"] == {"junk_caption": 1}


def test_duplicates_are_graded_per_group(ev):
    s = _stage(ev, "dedup_exact")
    # g1: one drop of a quota of one (which member does not matter); g2: two drops of one; u11: clean.
    assert (s["reached"], s["dropped"], s["expected"], s["correct"]) == (7, 4, 2, 2)
    assert s["precision"] == 0.5 and s["recall"] == 1.0
    assert s["wrongly_dropped"] == {"clean": 1, "exact_duplicate (whole group)": 1}


def test_defects_caught_earlier_do_not_count_later(ev):
    s = _stage(ev, "language")  # u9 was (wrongly) dropped by caption_length before reaching it
    assert s["reached"] == 3 and s["expected"] == 0 and s["recall"] is None and s["precision"] is None


def test_unmapped_and_absent_stages(ev):
    s = _stage(ev, "my_filter")
    assert s["categories"] is None and "no truth mapping" in s["note"]
    assert [s["stage"] for s in ev["stages"]] == [name for name, _ in STAGES]  # no clip_score etc.
    assert ev["uncovered"] == []


def test_overall(ev):
    o = ev["overall"]
    assert (o["dropped"], o["expected"], o["correct"]) == (8, 7, 6)
    assert o["precision"] == 0.75 and o["recall"] == pytest.approx(6 / 7, abs=1e-4)
    assert o["defects_left"] == {"junk_caption": 1} and (o["clean_kept"], o["clean_rows"]) == (1, 4)
    assert ev["rows"] == {"input": 11, "kept": 3, "dropped": 8, "unmatched_urls": 0}


def test_uncovered_categories():
    truth = pa.table({"url": ["a", "b"], "category": ["clean", "mismatched_caption"],
                      "dup_group": pa.array([None, None], pa.string())})
    ledger = pa.table({"url": ["a", "b"], "status": ["kept", "kept"],
                       "dropped_by": pa.array([None, None], pa.string()),
                       "reason": pa.array([None, None], pa.string())})
    ev = evaluate(truth, ledger, [("download", "download")])
    assert ev["uncovered"] == ["mismatched_caption"]
    assert ev["overall"]["missed"] == {"mismatched_caption": 1}


def test_output_guard(tmp_path):
    check_output(tmp_path / "new", overwrite=False)
    check_output(tmp_path, overwrite=False)  # empty
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(OutputError, match="holds no curate demo"):
        check_output(tmp_path, overwrite=False)
    check_output(tmp_path, overwrite=True)
    (tmp_path / EVAL_FILE).write_text("{}")
    assert is_demo_output(tmp_path)
    check_output(tmp_path, overwrite=False)


def test_an_interrupted_demo_is_recognised(tmp_path):
    (tmp_path / "_work").mkdir()
    recipe = tmp_path / "_work" / "recipe.json"
    recipe.write_text(json.dumps({"recipe": {"source": {"path": "/tmp/x/world/demo_urls.parquet"}}}))
    assert is_demo_output(tmp_path)
    recipe.write_text(json.dumps({"recipe": {"source": {"path": "/data/urls.parquet"}}}))
    assert not is_demo_output(tmp_path)
