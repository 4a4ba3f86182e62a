"""Train the demo CLIP (``curate-demo-clip``) on the synthetic demo world, on CPU, in minutes.

The demo and the tests cannot download a real CLIP, so the project trains its
own: a 4-layer ViT (64 px, patch 8) and a 2-layer text transformer with
open_clip's own tokenizer, contrastively trained on freshly rendered scenes of
:mod:`curate.demo.scenes` (a seed range disjoint from the demo's). The result is
saved in float16 (under 10 MB) to ``curate/models/weights/curate-demo-clip.pt``
and is loaded like any open_clip checkpoint.

Run::

    python -m curate.demo.train_clip --steps 1500
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

from curate.demo.captions import english_caption
from curate.demo.scenes import random_scene, render_scene

log = logging.getLogger(__name__)

TRAIN_SEED = 10_000  # the demo uses small seeds; training scenes come from another stream


def _pool(n: int, seed: int, preprocess):
    """Render n scenes at small sizes and preprocess them once (re-captioned every epoch)."""
    import torch

    rng = random.Random(seed)
    scenes, images = [], []
    for _ in range(n):
        scene = random_scene(rng)
        w = rng.randrange(48, 97, 8)
        h = max(48, int(w / rng.uniform(0.7, 1.5)) // 8 * 8)
        images.append(preprocess(render_scene(scene, w, h, rng)))
        scenes.append(scene)
    return scenes, torch.stack(images)


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """Probability that a random matched pair scores above a random mismatched one (ties count half)."""
    import numpy as np

    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def train(steps: int, batch: int, pool: int, out: Path, lr: float, seed: int) -> dict[str, float]:
    import open_clip
    import torch

    from curate.models.clip import DEMO_MODEL, register_configs

    torch.manual_seed(seed)
    register_configs()
    model, preprocess, _ = open_clip.create_model_and_transforms(DEMO_MODEL)
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    t0 = time.time()
    scenes, images = _pool(pool, TRAIN_SEED + seed, preprocess)
    log.info("rendered %d training scenes in %.1fs", pool, time.time() - t0)
    rng = random.Random(seed)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        idx = torch.randint(0, pool, (batch,))
        texts = tokenizer([english_caption(scenes[i], rng) for i in idx.tolist()])
        img_f, txt_f, scale = model(images[idx], texts)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0fs)", step, steps, loss.item(), time.time() - t0)
    model.eval()
    metrics = evaluate(model, preprocess, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, out)
    log.info("saved %s (%.1f MB): %s", out, out.stat().st_size / 1e6, metrics)
    return metrics


def evaluate(model, preprocess, tokenizer, n: int = 400, seed: int = 7) -> dict[str, float]:
    """ROC-AUC of matched vs mismatched pairs on unseen scenes at the demo's image sizes."""
    import torch

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    imgs = torch.stack([preprocess(render_scene(s, 320, 256, rng)) for s in scenes])
    caps = [english_caption(s, rng) for s in scenes]
    with torch.no_grad():
        fi = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tokenizer(caps)).float(), dim=-1)
    sims = fi @ ft.T
    pos = sims.diag().tolist()
    neg = [sims[i, (i + 1 + rng.randrange(n - 1)) % n].item() for i in range(n)]
    return {"roc_auc": roc_auc(pos, neg), "mean_matched": sum(pos) / n, "mean_mismatched": sum(neg) / n}


def main() -> None:
    from curate.models.clip import DEMO_WEIGHTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pool", type=int, default=12000, help="distinct training scenes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(train(a.steps, a.batch, a.pool, a.out, a.lr, a.seed))


if __name__ == "__main__":
    main()
