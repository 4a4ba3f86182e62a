"""clip_score inside the curate pipeline vs a bare open_clip loop: same images, model and CPUs.

What a user would otherwise write is a loop: load the model, then decode,
preprocess, encode image and caption, cosine. This script times that loop (run
as a script of its own, from its first line: importing torch and open_clip and
loading the model count, as they do in the pipeline's actors) and a
``curate run`` of the same images through ``use: clip_score``, the CLI in a
subprocess as a user runs it, with ``runtime.num_cpus`` = ``--cpus``. curate's
time is its manifest's ``timings.total`` less the interpreter's start-up and
Ray's (``process_start_to_run``, ``ray_start``: paid once per session, not per
image); everything else — source reading, the actors' model load, writing
shards and ledger — is included. It prints images/s for both and the ratio
(n/a from a build whose manifest has no timings; the whole command's rate is
printed either way). Goal: ≥ 0.95 on the median of five runs (pipeline overhead under 5 %):
``--repeat 5`` runs both five times in one invocation, alternating which goes first, so that
the drift of a shared machine over the half hour falls on both, and prints the median ratio.

No model hub is reachable here, so by default the architecture is ViT-B-32 with
randomly initialised weights saved to a local checkpoint: throughput does not
depend on the weight values. Pass ``--model curate-demo-clip`` for the tiny demo
model, or ``--pretrained PATH`` for a real checkpoint.

Run::

    python benchmarks/clip_score.py -n 1000 --cpus 2 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from _harness import ToolFailed, run_curate, sigterm_as_interrupt


def make_images(n: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    from curate.demo.world import captioned_scenes

    scenes = captioned_scenes(n, seed, 256, 256)
    return [jpeg for jpeg, _, _ in scenes], [caption for _, caption, _ in scenes]


#: The loop a user would write, run as a script of its own: timed from its first line, so it pays
#: for importing torch and open_clip and loading the model, as the pipeline's actor does.
BARE_SCRIPT = """\
import time
t0 = time.perf_counter()
import io, json, sys
import torch
from PIL import Image
from curate.models.clip import load_clip
args = json.loads(sys.argv[1])
import pyarrow.parquet as pq
table = pq.read_table(args["src"])
images, captions = table["image"].to_pylist(), table["caption"].to_pylist()
torch.set_num_threads(args["cpus"])
t1 = time.perf_counter()  # imports done: what the benchmark timed before it ran the loop as a script
model, preprocess, tokenizer = load_clip(args["model"], args["ckpt"])
scores, batch = [], args["batch"]
for i in range(0, len(images), batch):
    imgs = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i:i + batch]])
    toks = tokenizer(captions[i:i + batch])
    with torch.inference_mode():
        fi = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(toks).float(), dim=-1)
    scores += (fi * ft).sum(-1).tolist()
assert len(scores) == len(images)
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t0, "seconds_after_imports": t2 - t1}))
"""


def bare_loop(src: Path, n: int, model_name: str, ckpt: str | None, cpus: int, batch: int) -> tuple[float, float]:
    """The bare open_clip loop over the same Parquet file, in a fresh process.

    Returns images/s timed from the script's first line, and images/s with its imports left out."""
    args = {"src": str(src), "model": model_name, "ckpt": ckpt, "cpus": cpus, "batch": batch}
    r = subprocess.run([sys.executable, "-c", BARE_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                       check=True, cwd=Path(__file__).resolve().parents[1])
    t = json.loads(r.stdout.strip().splitlines()[-1])
    return n / t["seconds"], n / t["seconds_after_imports"]


def pipeline(src: Path, n: int, model_name: str, ckpt: str | None, cpus: int, batch: int, workdir: Path,
             actor_cpus: int = 1) -> tuple[float | None, float]:
    """``curate run`` of the same images through ``use: clip_score``, as a user runs it.

    Returns images/s with the interpreter's start-up and Ray's left out (from the manifest's
    timings: paid once per session, not per image; None when this build records no timings),
    and images/s of the whole command."""
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = workdir / "recipe.yaml"
    # curate's default is one actor per CPU, each with one torch thread (``--actor-cpus 1``); the bare
    # loop is one process with one torch thread per core. ``--actor-cpus C`` makes it one actor too.
    stage = {"use": "clip_score", "model": model_name, "pretrained": ckpt,
             "resources": {"num_cpus": actor_cpus, "num_gpus": 0, "batch_size": batch}}
    recipe.write_text(json.dumps({"source": {"path": str(src)}, "stages": [stage],
                                  "write": {"formats": ["parquet"], "samples_per_shard": 256},
                                  "runtime": {"num_cpus": cpus}}))
    try:
        r = run_curate(recipe, workdir / "out", log_path=workdir / "curate.log", limit=3600)
    except ToolFailed as e:
        raise SystemExit(str(e)) from None
    if r.kept != n:
        raise SystemExit(f"curate kept {r.kept} of {n} images; dropped: {r.dropped()}")
    t = r.timings
    excl = t.after_ray_start if t else None
    return (n / excl if excl else None), n / r.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--images", type=int, default=1000)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default=None, help="checkpoint path (default: random weights saved locally)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--actor-cpus", type=int, default=1,
                   help="CPUs (torch threads) per clip_score actor: 1 is curate's default, one actor per CPU")
    p.add_argument("--repeat", type=int, default=1,
                   help="run both this many times, alternating which goes first; prints each run and the medians")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    sigterm_as_interrupt()

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
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = workdir / "images.parquet"
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": captions}), src,
                       row_group_size=256)
        runs = []
        for i in range(a.repeat):
            tools = {"loop": partial(bare_loop, src, a.images, a.model, ckpt, a.cpus, a.batch),
                     "curate": partial(pipeline, src, a.images, a.model, ckpt, a.cpus, a.batch,
                                       workdir / f"run{i}", a.actor_cpus)}
            # Alternate which goes first, so a shared machine's drift over the minutes falls on both.
            got = {name: tools[name]() for name in (("loop", "curate") if i % 2 == 0 else ("curate", "loop"))}
            (bare, bare_ni), (piped, whole) = got["loop"], got["curate"]
            runs.append({"bare_images_per_s": round(bare, 2), "bare_images_per_s_imports_excluded": round(bare_ni, 2),
                         "curate_images_per_s": round(piped, 2) if piped else None,
                         "curate_whole_command_images_per_s": round(whole, 2),
                         "ratio": round(piped / bare, 3) if piped else None})
            if a.repeat > 1:
                print(f"run {i + 1}/{a.repeat} ({'loop' if i % 2 == 0 else 'curate'} first): loop {bare:.2f}, "
                      f"curate {f'{piped:.2f}' if piped else 'n/a'} images/s, ratio "
                      f"{f'{piped / bare:.3f}' if piped else 'n/a'}", flush=True)
    med = {k: round(statistics.median(r[k] for r in runs), 3) if all(r[k] is not None for r in runs) else None
           for k in runs[0]}
    result = {"model": a.model, "images": a.images, "cpus": a.cpus, "actor_cpus": a.actor_cpus, "repeat": a.repeat,
              **med, "runs": runs}
    bare, bare_no_imports, piped, whole = (med["bare_images_per_s"], med["bare_images_per_s_imports_excluded"],
                                           med["curate_images_per_s"], med["curate_whole_command_images_per_s"])
    if a.repeat > 1:
        print(f"medians of {a.repeat} runs (the ratio's median is of the runs' ratios):")
    print(f"{'tool':<26}{'images/s':>10}")
    print(f"{'bare open_clip loop':<26}{bare:>10.1f}")
    print(f"{'  (its imports left out)':<26}{bare_no_imports:>10.1f}")
    print(f"{'curate clip_score stage':<26}{f'{piped:.1f}' if piped else 'n/a':>10}")
    print(f"{'curate run, whole command':<26}{whole:>10.1f}  (interpreter and Ray start-up included)")
    if piped:
        ratio = med["ratio"]
        no_imports = statistics.median(r["curate_images_per_s"] / r["bare_images_per_s_imports_excluded"] for r in runs)
        print(f"ratio curate/bare: {ratio:.3f}  (goal >= 0.95 on the median of five runs: --repeat 5); "
              f"{no_imports:.3f} against the loop with its imports left out")
    else:
        print("ratio curate/bare: n/a — this build's manifest has no timings, so Ray's start-up "
              f"cannot be left out; whole command / bare: {whole / bare:.2f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
