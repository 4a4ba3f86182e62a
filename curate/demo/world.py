"""A synthetic image-text world whose truth is known: the demo's data and its answer key.

Each sample is a rendered scene (:mod:`curate.demo.scenes`) — one or two groups
of 1-3 identical objects (one of six shapes in one of eight colours, small or
large) on a plain background colour — with an English caption that describes it
(:mod:`curate.demo.captions`). The concepts are few and drawn large and clean, so
a tiny CLIP trained on CPU can learn them (matched vs. mismatched pairs,
zero-shot tags from :func:`curate.demo.scenes.tag_vocabulary`).

On top of the clean pairs the world plants the defects a web crawl has, one
category per row (see :data:`DEFECT_RATES`): caption defects (mismatched,
junk alt-text, non-English, empty), image defects (tiny, elongated),
duplicates (exact bytes, resized/re-encoded copies, and the picture mirrored with its
caption equal after normalisation or a word added) and URL defects the loopback
server in :mod:`curate.demo.server` acts out (404, corrupt bytes, a 1 byte/s
drip, ``X-Robots-Tag: noai``, HTML served as ``image/jpeg``).

Duplicates come in *groups*: a clean ``original`` and one ``copy`` whose row
carries the duplicate category; both share ``dup_group``. Originals always
precede their copies in the URL list, so a deduplicator that keeps the first
(smallest key) drops exactly the copies. Only a group's members are near-duplicates of each
other: captions of any other two rows stay under a char-5-gram Jaccard of
:data:`~curate.demo.captions.DISTINCT_MAX_JACCARD` (``dedup_minhash``'s shingles).

The truth lives in ``truth.parquet`` next to the served files and is never
part of the pipeline's input: :meth:`World.url_list` gives only ``url``,
``caption`` and ``source``.

Everything is a pure function of ``(samples, seed)``: the same arguments give
the same table and byte-identical files.

Example::

    >>> from curate.demo.world import generate_world
    >>> world = generate_world("/tmp/demo-world", samples=200, seed=0)  # doctest: +SKIP
    >>> world.truth.num_rows, world.counts()["clean"]                   # doctest: +SKIP
    (200, 143)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.demo.captions import (
    CASE_EDITS,
    DISTINCT_MAX_JACCARD,
    JUNK_FIXED,
    NEAR_DUPLICATE_MIN_JACCARD,
    WORD_EDITS,
    CaptionIndex,
    english_caption,
    foreign_caption,
    jaccard,
    junk_caption,
)
from curate.demo.scenes import Scene, encode, random_scene, render_scene, write_tags

log = logging.getLogger(__name__)

WORLD_VERSION = 2  # bump when the same (samples, seed) would generate different data
DEFAULT_SAMPLES = 2000
MIN_SAMPLES = 40  # below this the rarest defects would round to zero rows

TRUTH_FILE = "truth.parquet"
INFO_FILE = "world.json"
TAGS_FILE = "tags.txt"
FILES_DIR = "files"

#: Truth category of clean rows and of the originals of duplicate groups.
CLEAN = "clean"

#: Share of rows in each defect category (the rest is clean): about 28 % defects.
DEFECT_RATES: dict[str, float] = {
    "mismatched_caption": 0.04,
    "junk_caption": 0.03,
    "non_english": 0.03,
    "empty_caption": 0.01,
    "tiny_image": 0.02,
    "elongated_image": 0.02,
    "exact_duplicate": 0.025,
    "perceptual_duplicate": 0.025,
    "caption_duplicate": 0.015,
    "caption_near_duplicate": 0.015,
    "dead_link": 0.02,
    "corrupt_bytes": 0.01,
    "slow_drip": 0.0025,  # each one holds a download slot until the deadline: keep them rare
    "opt_out": 0.01,
    "html_as_image": 0.01,
}
CATEGORIES: tuple[str, ...] = (CLEAN, *DEFECT_RATES)
#: Categories whose rows are copies in a duplicate group (evaluated per group).
DUPLICATE_CATEGORIES: frozenset[str] = frozenset(
    {"exact_duplicate", "perceptual_duplicate", "caption_duplicate", "caption_near_duplicate"}
)

#: How the server answers a row's URL.
BEHAVIOURS = ("ok", "not_found", "corrupt", "drip", "opt_out", "html")
_BEHAVIOUR_OF = {"dead_link": "not_found", "corrupt_bytes": "corrupt", "slow_drip": "drip",
                 "opt_out": "opt_out", "html_as_image": "html"}

SOURCES = ("shop.example", "forum.example", "blog.example", "news.example", "wiki.example")
_ROBOTS = ("noai", "noimageai", "noai, noimageai", "noindex, noai")

def captioned_scenes(n: int, seed: int, width: int = 320, height: int = 256) -> list[tuple[bytes, str, Scene]]:
    """``n`` clean matched pairs: (JPEG of a random scene, its English caption, the scene) — the
    images the CLIP stages' tests and benchmark score, deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        jpeg = encode(render_scene(scene, width, height, rng), "jpeg")
        out.append((jpeg, english_caption(scene, rng), scene))
    return out


def _normal_size(rng: random.Random) -> tuple[int, int]:
    short = rng.randrange(256, 385, 8)
    long_ = int(short * rng.uniform(1.0, 1.6)) // 8 * 8
    return (long_, short) if rng.random() < 0.6 else (short, long_)


def _pick_format(rng: random.Random) -> str:
    return rng.choices(("jpeg", "png", "png_rgba"), weights=(85, 10, 5))[0]


# ------------------------------------------------------------------ the world


def category_counts(samples: int) -> dict[str, int]:
    """Rows per category for a world of ``samples`` rows: fixed by the rates, at least one of each."""
    if samples < MIN_SAMPLES:
        raise ValueError(f"a demo world needs at least {MIN_SAMPLES} samples (got {samples})")
    counts = {c: max(1, round(rate * samples)) for c, rate in DEFECT_RATES.items()}
    return {CLEAN: samples - sum(counts.values()), **counts}


@dataclass
class _Row:
    category: str
    scene: Scene
    caption: str | None
    caption_language: str | None
    caption_matches: bool
    width: int | None = None
    height: int | None = None
    image_format: str | None = None
    body: bytes | None = None
    behaviour: str = "ok"
    robots: str | None = None
    dup_group: str | None = None
    dup_role: str | None = None
    edit: str | None = None
    source: str = ""


class World:
    """A generated world on disk: served files, ``truth.parquet``, ``world.json``, ``tags.txt``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.info: dict[str, Any] = json.loads((self.root / INFO_FILE).read_text())
        self.truth: pa.Table = pq.read_table(self.root / TRUTH_FILE)

    @property
    def samples(self) -> int:
        return self.truth.num_rows

    @property
    def seed(self) -> int:
        return int(self.info["seed"])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for c in self.truth["category"].to_pylist():
            out[c] += 1
        return out

    def url_list(self, base_url: str) -> pa.Table:
        """The pipeline's input: ``url``, ``caption``, ``source`` — and nothing of the truth."""
        base = base_url.rstrip("/")
        return pa.table({
            "url": pa.array([base + p for p in self.truth["path"].to_pylist()], pa.string()),
            "caption": self.truth["caption"],
            "source": self.truth["source"],
        })

    def truth_with_urls(self, base_url: str) -> pa.Table:
        base = base_url.rstrip("/")
        urls = pa.array([base + p for p in self.truth["path"].to_pylist()], pa.string())
        return self.truth.add_column(1, "url", urls)


def generate_world(root: str | Path, *, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> World:
    """Generate (or reuse, when ``root`` already holds the same world) and return a :class:`World`.

    Writes ``files/`` (the bytes the server sends), ``truth.parquet`` (one row per
    sample: category, duplicate group, scene fields, tags), ``tags.txt`` and
    ``world.json``. ``root`` is created; files of another world there are replaced.
    """
    root = Path(root)
    info = {"version": WORLD_VERSION, "samples": samples, "seed": seed}
    info_path = root / INFO_FILE
    if info_path.exists() and (root / TRUTH_FILE).exists():
        try:
            old = json.loads(info_path.read_text())
        except ValueError:
            old = {}
        if all(old.get(k) == v for k, v in info.items()):
            log.info("reusing demo world at %s (%d samples, seed %d)", root, samples, seed)
            return World(root)
    counts = category_counts(samples)
    rng = random.Random(f"curate-demo/{WORLD_VERSION}/{seed}")
    rows = _plan_rows(rng, counts)
    order = _order(rng, rows)
    rows = [rows[i] for i in order]

    files = root / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    for old_file in files.iterdir():
        old_file.unlink()
    records: list[dict[str, Any]] = []
    written: dict[str, str] = {}
    for i, row in enumerate(rows):
        sid = f"s{i:05d}"
        token = hashlib.sha256(f"{seed}/{sid}".encode()).hexdigest()[:16]
        ext = {"png": "png", "png_rgba": "png"}.get(row.image_format or "", "jpg")
        path = f"/img/{token}.{ext}"
        file_rel = None
        if row.body is not None:
            digest = hashlib.sha256(row.body).hexdigest()
            file_rel = written.get(digest)
            if file_rel is None:  # exact duplicates share one file
                file_rel = f"{FILES_DIR}/{token}.{'bin' if row.behaviour in ('corrupt', 'html') else ext}"
                (root / file_rel).write_bytes(row.body)
                written[digest] = file_rel
        records.append({
            "id": sid, "path": path, "caption": row.caption, "source": row.source,
            "category": row.category, "dup_group": row.dup_group, "dup_role": row.dup_role, "edit": row.edit,
            "behaviour": row.behaviour, "file": file_rel, "robots": row.robots,
            "content_type": "image/png" if ext == "png" and row.behaviour != "html" else "image/jpeg",
            "image_format": row.image_format, "width": row.width, "height": row.height,
            "background": row.scene.background, "objects": row.scene.to_json(),
            "shapes": sorted({o.shape for o in row.scene.objects}),
            "colours": sorted({o.colour for o in row.scene.objects}),
            "n_objects": sum(o.count for o in row.scene.objects),
            "tags": row.scene.tags(), "caption_language": row.caption_language,
            "caption_matches": row.caption_matches,
            "sha256": hashlib.sha256(row.body).hexdigest() if row.body is not None else None,
        })
    truth = pa.Table.from_pylist(records, schema=TRUTH_SCHEMA)
    pq.write_table(truth, root / TRUTH_FILE)
    write_tags(root / TAGS_FILE)
    info["counts"] = counts
    info_path.write_text(json.dumps(info, indent=1, sort_keys=True))
    log.info("generated demo world at %s: %d samples, seed %d", root, samples, seed)
    return World(root)


TRUTH_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("path", pa.string()), pa.field("caption", pa.string()),
    pa.field("source", pa.string()), pa.field("category", pa.string()), pa.field("dup_group", pa.string()),
    pa.field("dup_role", pa.string()), pa.field("edit", pa.string()), pa.field("behaviour", pa.string()),
    pa.field("file", pa.string()), pa.field("robots", pa.string()), pa.field("content_type", pa.string()),
    pa.field("image_format", pa.string()), pa.field("width", pa.int32()), pa.field("height", pa.int32()),
    pa.field("background", pa.string()), pa.field("objects", pa.string()),
    pa.field("shapes", pa.list_(pa.string())), pa.field("colours", pa.list_(pa.string())),
    pa.field("n_objects", pa.int32()), pa.field("tags", pa.list_(pa.string())),
    pa.field("caption_language", pa.string()), pa.field("caption_matches", pa.bool_()),
    pa.field("sha256", pa.string()),
])


def _displayed(body: bytes) -> Image.Image:
    """The image as a viewer (and curate's download) shows it: transparency composited onto white."""
    img = Image.open(io.BytesIO(body))
    if img.mode != "RGBA":
        return img.convert("RGB")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def _numbered(name: str, n: int) -> str:
    """``name`` as the n-th of its kind: ``identicon (2)``, ``image (2).jpg``; n = 1 leaves it."""
    if n == 1:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem} ({n}).{ext}" if dot and stem else f"{name} ({n})"


def _plan_rows(rng: random.Random, counts: dict[str, int]) -> list[_Row]:
    """Build every row (scene, caption, bytes, behaviour) in category order."""
    # Every caption placed so far. Rows the truth calls distinct must not have near-duplicate
    # captions (char-5-gram Jaccard >= DISTINCT_MAX_JACCARD), or caption dedup would rightly
    # pair them: "two small yellow diamonds against a plain white backdrop" and "three small ..."
    # (0.86) are near-duplicates by any measure, whatever the truth says.
    index = CaptionIndex()

    def distinct(cap: str) -> bool:
        return index.max_jaccard(cap) < DISTINCT_MAX_JACCARD

    def unique_caption(scene_factory: Callable[[], Scene]) -> tuple[Scene, str]:
        scene = scene_factory()
        for attempt in range(1, 400):
            cap = english_caption(scene, rng)
            if distinct(cap):
                index.add(cap)
                return scene, cap
            if attempt % 5 == 0:
                scene = scene_factory()
        raise RuntimeError("could not find a distinct caption; the world's vocabulary is too small")

    def image(scene: Scene, size: tuple[int, int], fmt: str) -> tuple[bytes, int, int]:
        w, h = size
        return encode(render_scene(scene, w, h, rng), fmt), w, h

    def plain(category: str, *, caption: str | None = None, lang: str | None = "en", matches: bool = True,
              size: tuple[int, int] | None = None, behaviour: str = "ok", fmt: str | None = None) -> _Row:
        if caption is None:
            scene, caption = unique_caption(lambda: random_scene(rng))
        else:
            scene = random_scene(rng)
        fmt = fmt or _pick_format(rng)
        body, w, h = image(scene, size or _normal_size(rng), fmt)
        return _Row(category, scene, caption, lang, matches, w, h, fmt, body, behaviour)

    rows: list[_Row] = [plain(CLEAN) for _ in range(counts[CLEAN])]
    caption_number = {id(r): i for i, r in enumerate(rows)}  # clean rows were indexed first, in order
    originals = rng.sample(range(len(rows)), len(rows))  # popped from the end; skipped ones stay clean
    group = 0

    def near_edit(orig: _Row) -> tuple[int, str] | None:
        """A word edit of ``orig``'s caption that stays a near-duplicate of it (Jaccard >=
        NEAR_DUPLICATE_MIN_JACCARD) and is no near-duplicate of any other caption; None if none is."""
        for k in rng.sample(range(len(WORD_EDITS)), len(WORD_EDITS)):
            cap = WORD_EDITS[k](orig.caption or "")
            if (jaccard(cap, orig.caption) >= NEAR_DUPLICATE_MIN_JACCARD
                    and index.max_jaccard(cap, skip=caption_number[id(orig)]) < DISTINCT_MAX_JACCARD):
                return k, cap
        return None

    def new_group(orig: _Row) -> str:
        nonlocal group
        group += 1
        orig.dup_group, orig.dup_role = f"g{group:04d}", "original"
        return orig.dup_group

    for category in ("exact_duplicate", "perceptual_duplicate", "caption_duplicate", "caption_near_duplicate"):
        for _ in range(counts[category]):
            orig = rows[originals.pop()]
            edit: tuple[int, str] | None = None
            if category == "caption_near_duplicate":
                # Short captions have no edit that keeps them near-duplicates ("a small blue
                # circle - free download" is 0.52 of its original): take another original.
                while (edit := near_edit(orig)) is None:
                    orig = rows[originals.pop()]
            gid = new_group(orig)
            if category == "exact_duplicate":
                # Same bytes, another URL, and a different (still true) caption: a repost.
                _, cap = unique_caption(lambda o=orig: o.scene)
                copy = _Row(category, orig.scene, cap, "en", True, orig.width, orig.height, orig.image_format,
                            orig.body, edit="same bytes")
            elif category == "perceptual_duplicate":
                _, cap = unique_caption(lambda o=orig: o.scene)
                img = _displayed(orig.body)  # not convert("RGB"): that drops a PNG's transparent frame
                kind = rng.choice(("resize", "reencode", "resize+reencode"))
                w, h = img.size
                if "resize" in kind:
                    scale = max(rng.choice((0.8, 0.9, 1.25, 1.5)), 224 / min(w, h))  # stay above 200 px
                    w, h = round(w * scale), round(h * scale)
                    img = img.resize((w, h), Image.Resampling.BICUBIC)
                quality = rng.choice((55, 65, 75)) if "reencode" in kind else 90
                fmt = "jpeg" if "reencode" in kind or orig.image_format == "jpeg" else "png"
                copy = _Row(category, orig.scene, cap, "en", True, w, h, fmt, encode(img, fmt, quality=quality),
                            edit=f"{kind} to {w}x{h}" + (f" q{quality}" if "reencode" in kind else ""))
            else:
                # The original's picture mirrored (a near-duplicate to CLIP, ~32 of 64 pHash bits
                # away, so perceptual dedup leaves it to caption dedup), reposted with its caption
                # re-cased (caption_duplicate) or a word added (caption_near_duplicate).
                if category == "caption_duplicate":
                    k = rng.randrange(len(CASE_EDITS))
                    cap = CASE_EDITS[k](orig.caption or "")
                else:
                    assert edit is not None
                    k, cap = edit
                    index.add(cap)
                fmt = "png" if orig.image_format in ("png", "png_rgba") else "jpeg"
                img = _displayed(orig.body or b"").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                copy = _Row(category, orig.scene, cap, "en", True, orig.width, orig.height, fmt,
                            encode(img, fmt, quality=rng.choice((75, 85, 90))), edit=f"mirrored, caption edit {k}")
            copy.dup_group, copy.dup_role = gid, "copy"
            rows.append(copy)

    for _ in range(counts["mismatched_caption"]):
        scene = random_scene(rng)
        # A true caption of a scene that shares no colour-shape pair with the image.
        _, cap = unique_caption(lambda s=scene: random_scene(rng, avoid=s.pairs))
        fmt = _pick_format(rng)
        body, w, h = image(scene, _normal_size(rng), fmt)
        rows.append(_Row("mismatched_caption", scene, cap, "en", False, w, h, fmt, body))
    for i in range(counts["junk_caption"]):
        # Half from the fixed list, numbered from its second round on ("identicon (2)",
        # "image (2).jpg"): a repeated "identicon" would be an exact caption duplicate as well.
        cap = _numbered(JUNK_FIXED[(i // 2) % len(JUNK_FIXED)], i // 2 // len(JUNK_FIXED) + 1) \
            if i % 2 == 0 else junk_caption(rng)
        for _attempt in range(200):
            if distinct(cap):
                break
            cap = junk_caption(rng)
        index.add(cap)
        rows.append(plain("junk_caption", caption=cap, lang=None, matches=False))
    for _ in range(counts["non_english"]):
        for _attempt in range(400):  # distinct too: caption dedup must not be what removes them
            scene = random_scene(rng)
            cap, lang = foreign_caption(scene, rng)
            if distinct(cap):
                break
        index.add(cap)
        fmt = _pick_format(rng)
        body, w, h = image(scene, _normal_size(rng), fmt)
        rows.append(_Row("non_english", scene, cap, lang, True, w, h, fmt, body))
    for i in range(counts["empty_caption"]):
        rows.append(plain("empty_caption", caption=("", " ", "  \t")[i % 3], lang=None, matches=False))
    for _ in range(counts["tiny_image"]):
        short = rng.randrange(48, 168, 8)
        size = (short, int(short * rng.uniform(1.0, 1.5)))
        rows.append(plain("tiny_image", size=size if rng.random() < 0.5 else size[::-1]))
    for _ in range(counts["elongated_image"]):
        h = rng.randrange(208, 289, 8)
        size = (int(h * rng.uniform(3.3, 5.0)), h)
        rows.append(plain("elongated_image", size=size if rng.random() < 0.7 else size[::-1]))
    for category, behaviour in _BEHAVIOUR_OF.items():
        for _ in range(counts[category]):
            row = plain(category, behaviour=behaviour, fmt="jpeg")
            if behaviour in ("not_found", "corrupt", "html"):  # no image is served
                row.image_format = row.width = row.height = None
            if behaviour == "not_found":
                row.body = None
            elif behaviour == "corrupt":
                # A JPEG's first bytes, then noise: it sniffs as a JPEG and fails to decode.
                row.body = row.body[:32] + rng.randbytes(rng.randrange(2000, 8000))
            elif behaviour == "html":
                row.body = (b"<!DOCTYPE html><html><head><title>Access denied</title></head><body>"
                            b"<h1>403</h1><p>Please enable cookies.</p>" + b"<!-- pad -->" * 40 + b"</body></html>")
            elif behaviour == "opt_out":
                row.robots = rng.choice(_ROBOTS)
            rows.append(row)
    for row in rows:
        row.source = rng.choice(SOURCES)
    return rows


def _order(rng: random.Random, rows: list[_Row]) -> list[int]:
    """A shuffled order in which every duplicate group's original precedes its copy."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    pos = {r: i for i, r in enumerate(order)}
    by_group: dict[str, dict[str, int]] = {}
    for idx, row in enumerate(rows):
        if row.dup_group:
            by_group.setdefault(row.dup_group, {})[row.dup_role or ""] = idx
    for members in by_group.values():
        o, c = members["original"], members["copy"]
        if pos[o] > pos[c]:
            order[pos[o]], order[pos[c]] = c, o
            pos[o], pos[c] = pos[c], pos[o]
    return order
