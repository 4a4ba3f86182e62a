"""clip_score with real open_clip code: the demo CLIP, missing checkpoints, fraction mode across shards."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.recipe import load_recipe
from curate.runner import run
from curate.stages.base import StageContext
from curate.stages.clip_score import ClipScore, ClipScoreConfig
from tests.conftest import write_tar

AUC_FLOOR = 0.9  # the shipped demo CLIP measures well above this (see README)


def _scene_pairs(n: int, seed: int):
    from curate.demo.world import captioned_scenes

    return [(jpeg, caption) for jpeg, caption, _ in captioned_scenes(n, seed)]


def _table(images, captions):
    n = len(images)
    return pa.table({"key": [f"{i:04d}" for i in range(n)], "url": [None] * n, "caption": captions,
                     "status": ["kept"] * n, "dropped_by": pa.nulls(n, pa.string()),
                     "reason": pa.nulls(n, pa.string()), "image": pa.array(images, pa.binary())})


def test_demo_clip_ranks_matched_above_mismatched():
    from curate.demo.train_clip import roc_auc

    pairs = _scene_pairs(120, seed=123)
    images = [p[0] for p in pairs]
    captions = [p[1] for p in pairs]
    shuffled = captions[1:] + captions[:1]  # every image with another scene's caption
    stage = ClipScore(ClipScoreConfig(model="curate-demo-clip"))
    stage.setup(StageContext())
    matched = stage(_table(images, captions))
    mismatched = stage(_table(images, shuffled))
    pos = matched["clip_score"].to_pylist()
    neg = mismatched["clip_score"].to_pylist()
    assert roc_auc(pos, neg) >= AUC_FLOOR
    emb = matched["clip_image_emb"]
    assert emb.type == pa.list_(pa.float16(), 64) and emb.null_count == 0


def test_corrupt_image_is_dropped_not_crashing():
    stage = ClipScore(ClipScoreConfig(model="curate-demo-clip", min_score=0.99))
    stage.setup(StageContext())
    good, cap = _scene_pairs(1, seed=5)[0]
    out = stage(_table([b"not an image", good], ["x", cap]))
    assert out["reason"].to_pylist() == ["image_decode_error", "clip_score_low"]
    assert out["clip_score"].to_pylist()[0] is None


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    stage = ClipScore(ClipScoreConfig(model="ViT-B-32", pretrained="datacomp_xl_s13b_b90k"))
    with pytest.raises(CurateError) as e:
        stage.check()
    msg = str(e.value)
    assert "ViT-B-32/datacomp_xl_s13b_b90k is not in the local cache" in msg and "pretrained:" in msg
    with pytest.raises(CurateError, match="random weights are never used"):
        ClipScore(ClipScoreConfig(model="ViT-B-32", pretrained=None)).check()
    with pytest.raises(CurateError, match="neither a file nor a pretrained tag"):
        ClipScore(ClipScoreConfig(model="ViT-B-32", pretrained="/no/such/file.pt")).check()


def test_checking_a_local_checkpoint_does_not_import_open_clip(tmp_path):
    """The driver checks a recipe before any work; with a local checkpoint (or the demo CLIP) it reads
    open_clip's config files instead of importing it (torch, torchvision, transformers: ~7 s here,
    on the run's critical path). The answers are the ones open_clip's own tables give."""
    import subprocess
    import sys

    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"not read by the check")
    script = f"""
import json, sys
from curate.models.clip import DEMO_WEIGHTS, resolve_checkpoint
from curate.errors import RecipeError
got = [resolve_checkpoint("ViT-B-32", {str(ckpt)!r}), resolve_checkpoint("curate-demo-clip", None)]
light = not any(m in sys.modules for m in ("open_clip", "torch"))
try:
    resolve_checkpoint("ViT-Q-99", {str(ckpt)!r})
except RecipeError as e:
    got.append(str(e))
print(json.dumps([got, light, str(DEMO_WEIGHTS)]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got, light, demo = json.loads(out.stdout.strip().splitlines()[-1])
    assert light
    assert got[:2] == [str(ckpt), demo]
    assert "unknown open_clip model 'ViT-Q-99'" in got[2]  # an unknown name still goes to open_clip's list

    import open_clip

    from curate.models.clip import config_names, register_configs

    register_configs()
    assert config_names() == set(open_clip.list_models())


def test_local_checkpoint_path_loads(tmp_path):
    from curate.models.clip import DEMO_WEIGHTS

    stage = ClipScore(ClipScoreConfig(model="curate-demo-clip", pretrained=str(DEMO_WEIGHTS)))
    stage.check()
    stage.setup(StageContext())
    img, cap = _scene_pairs(1, seed=9)[0]
    assert stage(_table([img], [cap]))["clip_score"].to_pylist()[0] is not None


def test_checkpoint_in_torchs_legacy_format_loads_and_scores_the_same(tmp_path):
    """A zip checkpoint is memory-mapped by torch.load; one in the legacy format cannot be, and
    loads the ordinary way instead: the same weights, the same scores."""
    import torch

    from curate.models.clip import DEMO_WEIGHTS

    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(DEMO_WEIGHTS, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    pairs = _scene_pairs(4, seed=11)
    table = _table([p[0] for p in pairs], [p[1] for p in pairs])
    scores = []
    for ckpt in (DEMO_WEIGHTS, legacy):
        stage = ClipScore(ClipScoreConfig(model="curate-demo-clip", pretrained=str(ckpt)))
        stage.setup(StageContext())
        scores.append(stage(table)["clip_score"].to_pylist())
    assert scores[0] == scores[1] and None not in scores[0]


def test_fraction_mode_across_shards(tmp_path, make_recipe, ray_session):
    pairs = _scene_pairs(60, seed=77)
    rng = random.Random(0)
    for t in range(4):  # 4 tars → 4 shards; a third of captions belong to other scenes
        samples = []
        for i in range(15):
            img, cap = pairs[t * 15 + i]
            if rng.random() < 0.33:
                cap = pairs[(t * 15 + i + 7) % 60][1]
            samples.append({"__key__": f"s{t}_{i:02d}", "jpg": img, "txt": cap})
        write_tar(tmp_path / "src" / f"{t}.tar", samples)
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "stages": [{"use": "clip_score", "model": "curate-demo-clip", "keep_fraction": 0.3}],
                          "write": {"output": str(tmp_path / "out")}})
    m = run(load_recipe(recipe))
    assert m.counts.input == 60
    assert m.counts.kept == math.ceil(0.3 * 60)  # float scores: no ties
    info = next(s for s in m.stages if s.name == "clip_score_fraction").info
    assert info["scored"] == 60 and info["kept"] == 18
    ledger = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "ledger").glob("*.parquet"))])
    kept_scores = [r["clip_score"] for r in ledger.to_pylist() if r["status"] == "kept"]
    dropped_scores = [r["clip_score"] for r in ledger.to_pylist() if r["status"] == "dropped"]
    assert min(kept_scores) == pytest.approx(info["threshold"]) and max(dropped_scores) < info["threshold"]
    assert "clip_image_emb" not in ledger.column_names
    shard = pq.read_table(next((tmp_path / "out" / "parquet").glob("*.parquet")))
    assert shard["clip_image_emb"].type == pa.list_(pa.float16(), 64)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["recipe"]["stages"][1]["use"] == "keep_fraction"


def test_keep_fraction_keeps_whole_tie_groups(tmp_path, make_recipe, ray_session):
    # caption_length's caption_words is an integer score with many ties
    samples = [{"__key__": f"k{i:03d}", "jpg": b"\xff\xd8\xff", "txt": " ".join(["w"] * (1 + i % 5))}
               for i in range(50)]
    write_tar(tmp_path / "src" / "a.tar", samples[:25])
    write_tar(tmp_path / "src" / "b.tar", samples[25:])
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "stages": [{"use": "caption_length"},
                                     {"use": "keep_fraction", "column": "caption_words", "fraction": 0.3}],
                          "write": {"output": str(tmp_path / "out"), "formats": ["parquet"]}})
    m = run(load_recipe(recipe))
    # 10 rows each with 1..5 words: the top 30 % (15 rows) ends inside the 4-word tie group,
    # which is kept whole: 5 words (10) + 4 words (10) = 20
    assert m.counts.kept == 20
    assert m.stages[-1].info["threshold"] == 4


def test_keep_fraction_treats_nan_as_missing():
    from curate.stages.keep_fraction import KeepFraction, KeepFractionConfig

    t = pa.table({"key": ["a", "b", "c", "d"], "s": [0.9, float("nan"), 0.5, 0.1]})
    decisions, info = KeepFraction(KeepFractionConfig(column="s", fraction=0.5)).decide(t)
    assert decisions["reason"].to_pylist() == [None, "s_missing", None, "s_below_fraction"]
    assert info["threshold"] == 0.5 and info["scored"] == 3
