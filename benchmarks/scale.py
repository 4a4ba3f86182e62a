"""Load: the non-download stages over 100k → 1M synthetic rows; throughput and peak memory per size.

Why: a global stage (dedup) needs the whole data set, so the driver and the object
store hold something per row; the issue's bar is that the *total* peak memory stays
within 1.5× from 100k to 1M rows, i.e. the per-row part is small next to the fixed
cost of Ray and its workers.

For each size it generates Parquet shards of synthetic rows (once, cached under
``--work``), then runs ``curate run`` on them **in a fresh process** (so peaks are
independent) with these stages:

    caption_rules (preset caption-junk) → caption_length (≥ 3 words, ≥ 6 chars)
    → language (keep en) → image_rules (side ≥ 24, aspect ≤ 3)
    → dedup_exact (image, caption) → dedup_minhash (match: caption)

and writes WebDataset + Parquet shards, the ledger, the manifest and the stats
report, as a real run does. ``--no-images`` drops the image column, ``image_rules``
and image dedup, and writes Parquet only. Not ``clip_score``: CPU CLIP scores about
10 images/s, so a million rows would take a day; its memory is per batch, not per row.

The rows: captions from a template grammar over a large vocabulary (mostly unique),
with planted defects — junk alt-text (``image``, ``IMG_1234.JPG``, bare URLs), too
short captions, German/French/Spanish captions, exact caption copies and near copies
(case + punctuation, a typo, one word added) — and 32×32 random-colour JPEGs (a pool encoded
once; each row's bytes made unique by a JPEG comment holding its index), a few
8×8 (too small) and 120×30 (too elongated), some exact image copies.

Memory is sampled every ``--interval`` s by a thread of this process
(``_harness.TreeMonitor``), over the ``curate`` process and all its descendants (Ray's GCS, raylet — which holds the
object store, shared memory in /dev/shm — agents and workers):

- **driver**: RSS of the ``curate`` process (the Ray driver: planning, Ray Data's
  streaming executor, the global phase, the manifest and the statistics);
- **total**: the sum of PSS (proportional set size) over the whole process tree,
  which splits each shared page among the processes that map it, so shared
  libraries count once; for the object store, the larger of its pages' PSS and
  the bytes allocated in its shared-memory file (read through the raylet's open
  file descriptor), so a store page counts once even when the worker that wrote
  it has exited. A sum of RSS (shared pages counted once per process) is
  reported too, as an upper bound.

Run::

    python benchmarks/scale.py --sizes 100000,300000,1000000 --cpus 2 --json scale.json
    python benchmarks/scale.py --sizes 100000 --no-images
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _harness import ToolFailed, describe_timings, run_curate, sigterm_as_interrupt

log = logging.getLogger("scale")

#: Rows per generated Parquet file; row groups of SAMPLES_PER_SHARD rows so the source plans
#: one input shard per row group (img2dataset's 10,000-row shards).
ROWS_PER_FILE = 100_000
SAMPLES_PER_SHARD = 10_000
#: Bar of the issue: total peak at the largest size ≤ this × the total peak at the smallest.
FLAT_BAR = 1.5
#: Shares of planted defects: of the order seen in web alt-text pools (REFERENCES.md, "Filtering").
DEFECTS = {"junk": 0.03, "short": 0.02, "foreign": 0.04, "copy": 0.03, "near": 0.02,
           "image_copy": 0.02, "tiny": 0.01, "banner": 0.01}
#: Distinct pre-encoded JPEGs per size class; rows reuse them, made unique by a comment segment.
IMAGE_POOL = 256

_ADJ = ("red blue green old new small large beautiful bright dark wooden modern vintage rusty "
        "shiny quiet busy empty colorful foggy snowy sunny tall tiny ancient").split()
_NOUN = ("dog cat house car bicycle boat tree flower mountain river bridge castle lighthouse "
         "street market garden kitchen chair table lamp window door beach forest city village "
         "train airplane horse bird guitar piano book cup bottle").split()
_PLACE = ("in the park|on the beach|at sunset|in the snow|near the lake|on a hill|in the city|"
          "at night|in the rain|on a table|by the window|in the forest|under a bridge|"
          "in an old town|at the market").split("|")
_STYLE = ("photo of|close up of|picture of|view of|stock image of|illustration of|portrait of|"
          "watercolor of|drawing of|aerial view of").split("|")
_FOREIGN = ("ein altes Haus am See mit einem roten Dach|une petite maison près de la rivière au printemps|"
            "un perro grande corriendo en la playa al atardecer|eine Katze schläft auf dem Sofa im Wohnzimmer|"
            "la vieille ville sous la neige en hiver|una casa antigua en el centro de la ciudad").split("|")
_JUNK = ("image|untitled|photo|IMG_{n}.JPG|DSC{n}|https://example.com/{n}.jpg|{n}|banner-{n}|"
         "thumbnail|no title").split("|")


# ------------------------------------------------------------------ synthetic input


class Images:
    """Tiny JPEGs by size class, encoded once; ``get`` makes the bytes unique with a comment."""

    SIZES = {"ok": (32, 32), "tiny": (8, 8), "banner": (120, 30)}

    def __init__(self, rng: random.Random) -> None:
        from PIL import Image

        self.pool: dict[str, list[bytes]] = {}
        for kind, size in self.SIZES.items():
            out = []
            for _ in range(IMAGE_POOL if kind == "ok" else 16):
                img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
                for _ in range(4):  # a few blocks of another colour: not every pool image is flat
                    x, y = rng.randrange(size[0]), rng.randrange(size[1])
                    img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 4, y + 4))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                out.append(buf.getvalue())
            self.pool[kind] = out

    def get(self, kind: str, i: int, rng: random.Random) -> bytes:
        """A pool JPEG with a COM segment (FF FE, length, text) after SOI: same pixels, new sha256."""
        base = rng.choice(self.pool[kind])
        text = f"row {i}".encode()
        return base[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + base[2:]


class Captions:
    """A template grammar: style + adjectives + noun + place + a rare word, so most captions are unique."""

    def __init__(self, rng: random.Random) -> None:
        syll = ["ka", "lo", "mi", "ren", "sa", "to", "vi", "an", "el", "or", "ber", "gan", "dor", "qui"]
        self.vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(20_000)})

    def clean(self, rng: random.Random) -> str:
        words = [rng.choice(_STYLE), "a"]
        words += rng.sample(_ADJ, rng.randint(1, 2))
        words.append(rng.choice(_NOUN))
        words.append(rng.choice(_PLACE))
        words += [rng.choice(["named", "with", "and", "near"]), rng.choice(self.vocab), rng.choice(self.vocab)]
        return " ".join(words).capitalize()

    def near(self, base: str, rng: random.Random) -> str:
        kind = rng.randrange(3)
        if kind == 0:  # case and punctuation: normalised away, so exact caption dedup catches it
            return base.upper() + rng.choice(["!", ".", " ...", "?"])
        words = base.split()
        if kind == 1:  # a typo: two letters of the longest word swapped
            i = max(range(len(words)), key=lambda j: len(words[j]))
            w = words[i]
            if len(w) > 3:
                k = rng.randrange(len(w) - 1)
                words[i] = w[:k] + w[k + 1] + w[k] + w[k + 2:]
            return " ".join(words)
        words.insert(rng.randrange(len(words) + 1), rng.choice(_ADJ))
        return " ".join(words)


def _row(i: int, rng: random.Random, caps: Captions, imgs: Images | None,
         recent: list[tuple[str, bytes | None]]) -> tuple[str, bytes | None]:
    r = rng.random()
    edges, acc = {}, 0.0
    for name in ("junk", "short", "foreign", "copy", "near"):
        acc += DEFECTS[name]
        edges[name] = acc
    if r < edges["junk"]:
        caption = rng.choice(_JUNK).format(n=rng.randrange(10_000))
    elif r < edges["short"]:
        caption = rng.choice(_NOUN)
    elif r < edges["foreign"]:
        caption = rng.choice(_FOREIGN) + " " + rng.choice(caps.vocab)
    elif r < edges["copy"] and recent:
        caption = rng.choice(recent)[0]
    elif r < edges["near"] and recent:
        caption = caps.near(rng.choice(recent)[0], rng)
    else:
        caption = caps.clean(rng)
    image = None
    if imgs is not None:
        r = rng.random()
        if r < DEFECTS["image_copy"] and recent and recent[-1][1] is not None:
            image = rng.choice(recent)[1]
        elif r < DEFECTS["image_copy"] + DEFECTS["tiny"]:
            image = imgs.get("tiny", i, rng)
        elif r < DEFECTS["image_copy"] + DEFECTS["tiny"] + DEFECTS["banner"]:
            image = imgs.get("banner", i, rng)
        else:
            image = imgs.get("ok", i, rng)
    return caption, image


def generate(n: int, folder: Path, *, images: bool, seed: int) -> float:
    """Write ``n`` rows as Parquet files under ``folder`` (reused if already there); returns seconds."""
    done = folder / "_complete.json"
    spec = {"rows": n, "images": images, "seed": seed, "rows_per_file": ROWS_PER_FILE}
    if done.exists() and json.loads(done.read_text()) == spec:
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = random.Random(seed)
    caps = Captions(rng)
    imgs = Images(rng) if images else None
    recent: list[tuple[str, bytes | None]] = []  # copies come from the last few hundred rows
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        captions, blobs, urls = [], [], []
        for i in range(start, min(n, start + ROWS_PER_FILE)):
            caption, image = _row(i, rng, caps, imgs, recent)
            captions.append(caption)
            blobs.append(image)
            urls.append(f"https://img.example.com/{i}.jpg")
            recent.append((caption, image))
            if len(recent) > 512:
                del recent[:256]
        cols: dict[str, pa.Array] = {"url": pa.array(urls), "caption": pa.array(captions)}
        if images:
            cols["image"] = pa.array(blobs, pa.binary())
        pq.write_table(pa.table(cols), folder / f"{f:05d}.parquet", row_group_size=SAMPLES_PER_SHARD)
    done.write_text(json.dumps(spec))
    return time.perf_counter() - t0


def recipe_yaml(input_dir: Path, cpus: int, images: bool) -> str:
    image_stages = """
  - use: image_rules
    min_side: 24
    max_aspect_ratio: 3.0""" if images else ""
    return f"""\
source:
  path: {input_dir}
  format: parquet
stages:
  - preset: caption-junk
  - use: caption_length
    min_words: 3
    min_chars: 6
  - use: language
    keep: [en]{image_stages}
  - use: dedup_exact
    by: [{'image, ' if images else ''}caption]
  - use: dedup_minhash
    match: caption
write:
  formats: [{'webdataset, ' if images else ''}parquet]
  samples_per_shard: {SAMPLES_PER_SHARD}
runtime:
  num_cpus: {cpus}
"""


# ------------------------------------------------------------------ one run


def store_cap_env(object_store_mb: int | None) -> dict[str, str]:
    """Cap the object store of the local Ray that ``curate run`` starts: Ray sizes it as 30 % of the
    memory, at most ``RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES``; what does not fit spills to disk."""
    return {} if not object_store_mb else {"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(object_store_mb * 2**20)}


def run_size(n: int, *, work: Path, cpus: int, images: bool, seed: int, interval: float,
             object_store_mb: int | None = None) -> dict[str, Any]:
    input_dir = work / f"input-{n}{'' if images else '-noimg'}"
    gen_s = generate(n, input_dir, images=images, seed=seed)
    if gen_s:
        log.info("generated %s rows in %.1fs", f"{n:,}", gen_s)
    out = work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    recipe = work / f"recipe-{'img' if images else 'noimg'}.yaml"
    recipe.write_text(recipe_yaml(input_dir, cpus, images))
    logf = work / f"run-{n}.log"
    try:
        r = run_curate(recipe, out, log_path=logf, memory=True, interval=interval, verbose=True,
                       limit=24 * 3600, env={"RAY_DEDUP_LOGS": "0", **store_cap_env(object_store_mb)})
    except ToolFailed as e:
        raise SystemExit(f"curate run failed for {n:,} rows: {e}") from None
    seconds, mem = r.seconds, r.run.monitor
    manifest = r.manifest
    if manifest["counts"]["input"] != n or not manifest["complete"]:
        raise SystemExit(f"{out}/manifest.json: {manifest['counts']['input']} rows in, expected {n}")
    stages = {s["name"]: {"kept": s["kept"], "dropped": sum(s["dropped"].values()), "seconds": s["seconds"]}
              for s in manifest["stages"]}
    return {
        "rows": n, "seconds": seconds, "rows_per_s": n / seconds, "kept": manifest["counts"]["kept"],
        "cpu_seconds": mem["cpu_seconds"],
        "driver_peak_mib": mem["driver_peak_mib"], "total_peak_mib": mem["total_peak_mib"],
        "rss_sum_peak_mib": mem["rss_sum_peak_mib"], "object_store_peak_mib": mem["object_store_peak_mib"],
        "at_peak_mib": mem["at_peak_mib"], "timings": asdict(r.timings) if r.timings else None,
        "fixed_costs": describe_timings(r.timings), "stages": stages, "log": str(logf), "curve": mem["curve"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated row counts")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--no-images", action="store_true", help="captions only: no image column, no image stages")
    p.add_argument("--work", type=Path, default=Path("/tmp/curate-scale"), help="inputs, outputs and logs")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-output", action="store_true", help="keep each run's output folder")
    p.add_argument("--json", type=Path)
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="cap Ray's object store at this many MiB (default: Ray's 30 %% of memory)")
    a = p.parse_args()
    sigterm_as_interrupt()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    sizes = [int(s) for s in a.sizes.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    print("stages: caption_rules (caption-junk), caption_length, language"
          f"{', image_rules' if not a.no_images else ''}, dedup_exact, dedup_minhash (match: caption). "
          "Not clip_score: CPU CLIP scores ~10 images/s, a million rows would take about a day.")
    results = []
    for n in sizes:
        r = run_size(n, work=a.work, cpus=a.cpus, images=not a.no_images, seed=a.seed, interval=a.interval,
                     object_store_mb=a.object_store_mb)
        results.append(r)
        log.info("%s rows: %.1fs, driver %.0f MiB, total %.0f MiB; at peak: %s", f"{n:,}", r["seconds"],
                 r["driver_peak_mib"], r["total_peak_mib"], r["at_peak_mib"])
        if not a.keep_output:
            shutil.rmtree(a.work / f"out-{n}", ignore_errors=True)

    print(f"\n{'rows':>10}{'seconds':>9}{'rows/s':>9}{'kept':>10}{'driver peak MiB':>17}"
          f"{'total peak MiB':>16}{'store peak MiB':>16}{'RSS-sum peak MiB':>18}")
    for r in results:
        print(f"{r['rows']:>10,}{r['seconds']:>9.1f}{r['rows_per_s']:>9,.0f}{r['kept']:>10,}"
              f"{r['driver_peak_mib']:>17.0f}{r['total_peak_mib']:>16.0f}{r['object_store_peak_mib']:>16.0f}"
              f"{r['rss_sum_peak_mib']:>18.0f}")
    for r in results:
        print(f"{r['rows']:>10,} rows: CPU {r['cpu_seconds']:.1f} s (whole process tree); "
              f"fixed costs: {r['fixed_costs']}")
    first, last = results[0], results[-1]
    ratio = last["total_peak_mib"] / first["total_peak_mib"]
    if last["rows"] > first["rows"]:
        per_row = (last["total_peak_mib"] - first["total_peak_mib"]) * 2**20 / (last["rows"] - first["rows"])
        drv_row = (last["driver_peak_mib"] - first["driver_peak_mib"]) * 2**20 / (last["rows"] - first["rows"])
        print(f"total peak {last['rows']:,} / {first['rows']:,} rows: {ratio:.2f}x (bar: <= {FLAT_BAR}x: "
              f"{'flat' if ratio <= FLAT_BAR else 'NOT flat'}); per extra row: {per_row:.0f} B in total, "
              f"{drv_row:.0f} B in the driver")
    print("driver: RSS of the curate process; total: PSS over it and every Ray process it started, the object "
          f"store counted once (see --help); wall seconds include Ray start-up; {a.cpus} CPUs")
    if a.json:
        a.json.write_text(json.dumps({"cpus": a.cpus, "images": not a.no_images, "results": results,
                                      "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
