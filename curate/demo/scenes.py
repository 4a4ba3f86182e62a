"""The demo world's scenes: the concepts (colours, shapes, backgrounds), a scene made of them, its
true tags, the tag vocabulary a zero-shot tagger reads, and drawing a scene as an image.

Example::

    >>> import random
    >>> from curate.demo.scenes import random_scene, render_scene
    >>> scene = random_scene(random.Random(0))
    >>> render_scene(scene, 320, 256, random.Random(0)).size
    (320, 256)
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

#: Object colours: eight hues far apart, so a small model separates them easily.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (35, 165, 60),
    "blue": (35, 85, 225),
    "purple": (135, 50, 180),
    "pink": (245, 125, 190),
    "brown": (125, 75, 35),
}
#: Backgrounds are neutral so they never share a name with an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 245),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneObject:
    """``count`` identical objects: one shape, one colour, one size."""

    shape: str
    colour: str
    count: int
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((o.colour, o.shape) for o in self.objects)

    def tags(self) -> list[str]:
        """The tags of :func:`tag_vocabulary` that are true of this scene, in vocabulary order."""
        true = {o.colour for o in self.objects} | {o.shape for o in self.objects}
        true |= {f"{o.colour} {o.shape}" for o in self.objects} | {f"{self.background} background"}
        return [t for t in tag_vocabulary() if t in true]

    def to_json(self) -> str:
        return json.dumps([asdict(o) for o in self.objects], sort_keys=True)


def tag_vocabulary() -> list[str]:
    """Zero-shot tag vocabulary: colours, shapes, colour-shape pairs, backgrounds (fixed order)."""
    tags = list(COLOURS) + list(SHAPES)
    tags += [f"{c} {s}" for c in COLOURS for s in SHAPES]
    tags += [f"{b} background" for b in BACKGROUNDS]
    return tags


def write_tags(path: str | Path) -> Path:
    """Write :func:`tag_vocabulary` one tag a line (the file a zero-shot tagger reads)."""
    p = Path(path)
    p.write_text("\n".join(tag_vocabulary()) + "\n", encoding="utf-8")
    return p


def random_scene(rng: random.Random, *, avoid: frozenset[tuple[str, str]] = frozenset()) -> Scene:
    """One or two object groups (distinct colour-shape pairs, none in ``avoid``) on a background."""
    n_groups = 1 if rng.random() < 0.6 else 2
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    while len(objects) < n_groups:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) in used or (colour, shape) in avoid:
            continue
        used.add((colour, shape))
        count = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
        objects.append(SceneObject(shape=shape, colour=colour, count=count, size=rng.choice(SIZES)))
    return Scene(background=rng.choice(list(BACKGROUNDS)), objects=tuple(objects))


def vocabulary_text() -> str:
    """:func:`tag_vocabulary` in the ``clip_tags`` vocabulary format, in four groups (colour, shape,
    object, background), so that each question gets its own softmax."""
    parts = [("colour", list(COLOURS)), ("shape", list(SHAPES)),
             ("object", [f"{c} {s}" for c in COLOURS for s in SHAPES]),
             ("background", [f"{b} background" for b in BACKGROUNDS])]
    return "".join(f"[{name}]\n" + "".join(t + "\n" for t in tags) for name, tags in parts)


def write_vocabulary(path: str | Path) -> Path:
    """Write :func:`vocabulary_text` (the file ``pipelines/demo.yaml``'s ``clip_tags`` stage reads)."""
    p = Path(path)
    p.write_text(vocabulary_text(), encoding="utf-8")
    return p


# ------------------------------------------------------------------ rendering

_SUPERSAMPLE = 2  # draw at 2× and downsample: smooth edges without a dependency on aggdraw


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None


def render_scene(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    """Draw the scene's objects in distinct cells of a grid so they never overlap."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (width * s, height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    items = [o for o in scene.objects for _ in range(o.count)]
    n = len(items)
    aspect = width / height
    rows_ = 1 if aspect >= 2.5 or (n <= 2 and aspect >= 1.2) else 2
    cols = max(math.ceil(n / rows_), round(rows_ * aspect))
    if aspect < 1 / 1.2:
        rows_, cols = max(math.ceil(n / 2), round(2 / aspect)), 2
    cells = rng.sample(range(rows_ * cols), n)
    cw, ch = width * s / cols, height * s / rows_
    for obj, cell in zip(items, cells, strict=True):
        r = min(cw, ch) * (0.42 if obj.size == "large" else 0.27)
        slack_x, slack_y = cw / 2 - r, ch / 2 - r
        cx = (cell % cols + 0.5) * cw + rng.uniform(-slack_x, slack_x) * 0.8
        cy = (cell // cols + 0.5) * ch + rng.uniform(-slack_y, slack_y) * 0.8
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif obj.shape == "square":
            q = r * 0.82
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=colour)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=colour)
    return img.reduce(s)  # box-average 2×2 blocks: smooth edges, ~20× faster than LANCZOS


def encode(img: Image.Image, fmt: str, *, quality: int = 90) -> bytes:
    """``jpeg``, ``png`` or ``png_rgba`` (opaque scene inside a transparent 4-px frame)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        img.convert("RGB").save(buf, "PNG", optimize=False)
    elif fmt == "png_rgba":
        rgba = img.convert("RGBA")
        alpha = Image.new("L", rgba.size, 0)
        ImageDraw.Draw(alpha).rectangle([4, 4, rgba.width - 5, rgba.height - 5], fill=255)
        rgba.putalpha(alpha)
        rgba.save(buf, "PNG", optimize=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected jpeg, png or png_rgba")
    return buf.getvalue()
