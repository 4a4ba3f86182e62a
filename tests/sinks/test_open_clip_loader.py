"""curate's WebDataset shards feed open_clip's own data loaders unchanged: evaluation and training.

The training path (``is_train=True``) reads tars with open_clip_train's ``tarfile_to_samples_nothrow``,
which breaks on webdataset >= 0.2.96 (``KeyError: 'fname'`` at the end of every shard); pyproject.toml
pins ``webdataset<=0.2.86``, as ``open_clip_torch[training]`` does. This test fails if that pin goes.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_tar


def _curated_shards(tmp_path: Path, make_recipe, n_tars: int, per_tar: int) -> tuple[list[str], dict[str, str]]:
    """A real `curate` run over ``n_tars`` source tars; returns its output shards and key -> caption."""
    captions = {}
    for t in range(n_tars):
        batch = []
        for i in range(per_tar):
            key, caption = f"t{t}_{i:03d}", f"a red square {t} {i}"
            batch.append({"__key__": key, "jpg": jpeg_bytes(size=(64, 48), color=(i * 10, t * 90, 20)),
                          "txt": caption})
            captions[key] = caption
        write_tar(tmp_path / "src" / f"{t:03d}.tar", batch)
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "write": {"output": str(tmp_path / "out"), "formats": ["webdataset"]}})
    m = run(load_recipe(recipe), progress=False)
    assert m.complete and m.counts.kept == len(captions)
    return sorted(str(p) for p in (tmp_path / "out" / "webdataset").glob("*.tar")), captions


def test_open_clip_train_reads_our_shards(tmp_path, make_recipe, ray_session):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    shards, _ = _curated_shards(tmp_path, make_recipe, n_tars=1, per_tar=10)
    args = argparse.Namespace(
        train_data=None, val_data="::".join(shards), train_num_samples=None, val_num_samples=10,
        train_data_upsampling_factors=None, seed=0, dataset_resampled=False, batch_size=4, workers=0,
        world_size=1, distributed=False)
    preprocess = open_clip.image_transform(96, is_train=False)
    info = get_wds_dataset(args, preprocess, is_train=False, epoch=0,
                           tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 96, 96) and texts.shape[1] == 77
        seen += images.shape[0]
    assert seen == 10


def test_open_clip_train_training_loader_reads_our_shards(tmp_path, make_recipe, ray_session):
    """``get_wds_dataset(is_train=True)``, what ``python -m open_clip_train.main --dataset-type webdataset
    --train-data 'out/webdataset/{00000..00001}.tar' --train-num-samples 12`` builds: shard and sample
    shuffling, full batches only. Two epochs each see every curated sample exactly once."""
    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset

    shards, captions = _curated_shards(tmp_path, make_recipe, n_tars=2, per_tar=6)
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar"]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    args = argparse.Namespace(
        train_data=str(tmp_path / "out" / "webdataset" / "{00000..00001}.tar"), val_data=None,
        train_num_samples=len(captions),  # curate writes no sizes.json: --train-num-samples is required
        val_num_samples=None, train_data_upsampling_factors=None, seed=0, dataset_resampled=False,
        batch_size=4, workers=0, world_size=1, distributed=False)
    info = get_wds_dataset(args, open_clip.image_transform(96, is_train=True), is_train=True, epoch=0,
                           tokenizer=tokenizer)
    loader = info.dataloader
    assert (loader.num_batches, loader.num_samples) == (3, 12)
    expected = Counter(tuple(tokenizer(c)[0].tolist()) for c in captions.values())
    for epoch in range(2):
        info.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 3
        for images, texts in batches:
            assert images.shape == (4, 3, 96, 96) and images.dtype == torch.float32
            assert texts.shape == (4, 77) and texts.dtype == torch.long
        assert Counter(tuple(t.tolist()) for _, texts in batches for t in texts) == expected
