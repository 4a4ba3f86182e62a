"""clip_score inside the curate pipeline vs a bare open_clip loop: same images, model and CPUs.

What a user would otherwise write is a loop: load the model, then decode,
preprocess, encode image and caption, cosine. This script times that loop and a
curate run of the same images through ``use: clip_score`` (Ray start-up
excluded: it is paid once per session, not per image; everything else — source
reading, the actor's model load, writing shards and ledger — included) and
prints images/s for both and the ratio. Goal: ≥ 0.9
(pipeline overhead under 10 %).

No model hub is reachable here, so by default the architecture is ViT-B-32 with
randomly initialised weights saved to a local checkpoint: throughput does not
depend on the weight values. Pass ``--model curate-demo-clip`` for the tiny demo
model, or ``--pretrained PATH`` for a real checkpoint.

Run::

    python benchmarks/clip_score.py -n 1000 --cpus 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path


def make_images(n: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    from curate.demo.world import english_caption, random_scene, render_scene

    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        scene = random_scene(rng)
        buf = io.BytesIO()
        render_scene(scene, 256, 256, rng).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
        captions.append(english_caption(scene, rng))
    return images, captions


def bare_loop(images: list[bytes], captions: list[str], model_name: str, ckpt: str | None,
              cpus: int, batch: int) -> float:
    """The loop a user would write with open_clip; returns images/s."""
    import torch
    from PIL import Image

    from curate.models.clip import load_clip

    torch.set_num_threads(cpus)
    t0 = time.perf_counter()  # loading the model counts for both: the pipeline loads it in its actor
    model, preprocess, tokenizer = load_clip(model_name, ckpt)
    scores = []
    for i in range(0, len(images), batch):
        imgs = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i:i + batch]])
        toks = tokenizer(captions[i:i + batch])
        with torch.inference_mode():
            fi = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
            ft = torch.nn.functional.normalize(model.encode_text(toks).float(), dim=-1)
        scores += (fi * ft).sum(-1).tolist()
    elapsed = time.perf_counter() - t0
    assert len(scores) == len(images)
    return len(images) / elapsed


def pipeline(images: list[bytes], captions: list[str], model_name: str, ckpt: str | None, cpus: int,
             batch: int, workdir: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from curate.recipe import load_recipe
    from curate.runner import run

    src = workdir / "images.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": captions}), src,
                   row_group_size=256)
    recipe = workdir / "recipe.yaml"
    stage = {"use": "clip_score", "model": model_name, "pretrained": ckpt,
             # one actor holding every CPU, as the bare loop is one process using every core
             "resources": {"num_cpus": cpus, "num_gpus": 0, "batch_size": batch}}
    recipe.write_text(json.dumps({"source": {"path": str(src)}, "stages": [stage],
                                  "write": {"output": str(workdir / "out"), "formats": ["parquet"],
                                            "samples_per_shard": 256}}))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        r = load_recipe(recipe)
        t0 = time.perf_counter()
        m = run(r, progress=False)
        elapsed = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert m.counts.kept == len(images), m.counts
    return len(images) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--images", type=int, default=1000)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default=None, help="checkpoint path (default: random weights saved locally)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    images, captions = make_images(a.images)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ckpt = a.pretrained
        if ckpt is None and a.model != "curate-demo-clip":
            import open_clip
            import torch

            model = open_clip.create_model(a.model)  # random init: throughput only
            ckpt = str(workdir / "random.pt")
            torch.save({"state_dict": model.state_dict()}, ckpt)
        bare = bare_loop(images, captions, a.model, ckpt, a.cpus, a.batch)
        piped = pipeline(images, captions, a.model, ckpt, a.cpus, a.batch, workdir)
    result = {"model": a.model, "images": a.images, "cpus": a.cpus, "bare_images_per_s": round(bare, 2),
              "curate_images_per_s": round(piped, 2), "ratio": round(piped / bare, 3)}
    print(f"{'tool':<26}{'images/s':>10}")
    print(f"{'bare open_clip loop':<26}{bare:>10.1f}")
    print(f"{'curate clip_score stage':<26}{piped:>10.1f}")
    print(f"ratio curate/bare: {piped / bare:.2f}  (goal >= 0.9)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
