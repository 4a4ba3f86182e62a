"""curate's WebDataset shards feed open_clip's own training data loader unchanged."""

from __future__ import annotations

import argparse

from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_tar


def test_open_clip_train_reads_our_shards(tmp_path, make_recipe, ray_session):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    write_tar(tmp_path / "src" / "000.tar", [
        {"__key__": f"k{i:03d}", "jpg": jpeg_bytes(size=(64, 48), color=(i, 10, 20)), "txt": f"a red square {i}"}
        for i in range(10)])
    recipe = make_recipe({"source": {"path": str(tmp_path / "src")},
                          "write": {"output": str(tmp_path / "out"), "formats": ["webdataset"]}})
    run(load_recipe(recipe))
    shards = sorted(str(p) for p in (tmp_path / "out" / "webdataset").glob("*.tar"))
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
