"""The demo world's captions: varied English descriptions of a scene, the same scene in German,
French or Spanish, junk alt-text, and the small edits that make caption near-duplicates.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from curate.demo.scenes import COUNT_WORDS, SHAPES, Scene, SceneObject
from curate.text import normalise_caption

_PLURAL_EN = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
_STYLE_PREFIX = ("a drawing of", "an illustration of", "clip art of", "a simple graphic of",
                 "a sticker showing", "a flat icon of", "a picture of", "a poster with")
_STYLE_SUFFIX = ("", "", "", " in flat style", ", vector art", ", minimal design", ", simple shapes",
                 " for kids", " wallpaper", ", digital art")


def _object_phrase(o: SceneObject, with_size: bool) -> str:
    shape = o.shape if o.count == 1 else _PLURAL_EN[o.shape]
    words = [COUNT_WORDS[o.count]]
    if with_size:
        words.append(o.size)
    words += [o.colour, shape]
    phrase = " ".join(words)
    if o.count == 1 and words[1][0] in "aeiou":
        phrase = "an" + phrase[1:]
    return phrase


def english_caption(scene: Scene, rng: random.Random) -> str:
    """A varied English description of ``scene`` (every template names every object and colour)."""
    with_size = rng.random() < 0.3
    objs = [_object_phrase(o, with_size) for o in scene.objects]
    joined = objs[0] if len(objs) == 1 else rng.choice([f"{objs[0]} and {objs[1]}",
                                                        f"{objs[0]} next to {objs[1]}",
                                                        f"{objs[0]} with {objs[1]}"])
    bg = scene.background
    template = rng.randrange(7)
    if template == 0:
        text = f"{joined} on a {bg} background"
    elif template == 1:
        text = joined
    elif template == 2:
        text = f"{rng.choice(_STYLE_PREFIX)} {joined} on {bg}"
    elif template == 3:
        text = f"{bg} background with {joined}"
    elif template == 4:
        verb = "is" if scene.objects[0].count == 1 else "are"
        text = f"there {verb} {joined} on a {bg} background"
    elif template == 5:
        text = f"{rng.choice(_STYLE_PREFIX)} {joined}, {bg} background"
    else:
        text = f"{joined} against a plain {bg} backdrop"
    return text + rng.choice(_STYLE_SUFFIX)


# German, French and Spanish descriptions: the same scene, grammatical enough for a
# language identifier, in other languages (the language filter's job, not the CLIP filter's).
_DE_SHAPES = {"circle": ("Kreis", "Kreise", "m"), "square": ("Quadrat", "Quadrate", "n"),
              "triangle": ("Dreieck", "Dreiecke", "n"), "star": ("Stern", "Sterne", "m"),
              "cross": ("Kreuz", "Kreuze", "n"), "diamond": ("Raute", "Rauten", "f")}
_DE_COLOURS = {"red": "Rot", "orange": "Orange", "yellow": "Gelb", "green": "Grün", "blue": "Blau",
               "purple": "Lila", "pink": "Rosa", "brown": "Braun"}
_DE_BG = {"white": "weißem", "gray": "grauem", "black": "schwarzem"}
_FR_SHAPES = {"circle": ("cercle", "cercles", "m"), "square": ("carré", "carrés", "m"),
              "triangle": ("triangle", "triangles", "m"), "star": ("étoile", "étoiles", "f"),
              "cross": ("croix", "croix", "f"), "diamond": ("losange", "losanges", "m")}
_FR_COLOURS = {"red": ("rouge", "rouge"), "orange": ("orange", "orange"), "yellow": ("jaune", "jaune"),
               "green": ("vert", "verte"), "blue": ("bleu", "bleue"), "purple": ("violet", "violette"),
               "pink": ("rose", "rose"), "brown": ("marron", "marron")}
_FR_BG = {"white": "blanc", "gray": "gris", "black": "noir"}
_ES_SHAPES = {"circle": ("círculo", "círculos", "m"), "square": ("cuadrado", "cuadrados", "m"),
              "triangle": ("triángulo", "triángulos", "m"), "star": ("estrella", "estrellas", "f"),
              "cross": ("cruz", "cruces", "f"), "diamond": ("rombo", "rombos", "m")}
_ES_COLOURS = {"red": ("rojo", "roja", "rojos", "rojas"), "orange": ("naranja", "naranja", "naranjas", "naranjas"),
               "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
               "green": ("verde", "verde", "verdes", "verdes"), "blue": ("azul", "azul", "azules", "azules"),
               "purple": ("morado", "morada", "morados", "moradas"), "pink": ("rosa", "rosa", "rosas", "rosas"),
               "brown": ("marrón", "marrón", "marrones", "marrones")}
_ES_BG = {"white": "blanco", "gray": "gris", "black": "negro"}


def _de(o: SceneObject) -> str:
    sing, plur, gender = _DE_SHAPES[o.shape]
    count = {1: "eine" if gender == "f" else "ein", 2: "zwei", 3: "drei"}[o.count]
    return f"{count} {sing if o.count == 1 else plur} in {_DE_COLOURS[o.colour]}"


def _fr(o: SceneObject) -> str:
    sing, plur, gender = _FR_SHAPES[o.shape]
    adj = _FR_COLOURS[o.colour][1 if gender == "f" else 0]
    if o.count > 1 and not adj.endswith("s") and o.colour not in ("orange", "brown"):
        adj += "s"
    count = {1: "une" if gender == "f" else "un", 2: "deux", 3: "trois"}[o.count]
    return f"{count} {sing if o.count == 1 else plur} {adj}"


def _es(o: SceneObject) -> str:
    sing, plur, gender = _ES_SHAPES[o.shape]
    forms = _ES_COLOURS[o.colour]
    adj = forms[(2 if o.count > 1 else 0) + (1 if gender == "f" else 0)]
    count = {1: "una" if gender == "f" else "un", 2: "dos", 3: "tres"}[o.count]
    return f"{count} {sing if o.count == 1 else plur} {adj}"


def foreign_caption(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(caption, language) describing ``scene`` in German, French or Spanish."""
    lang = rng.choice(("de", "fr", "es"))
    if lang == "de":
        objs = " und ".join(_de(o) for o in scene.objects)
        text = rng.choice([f"Ein Bild mit {objs} auf {_DE_BG[scene.background]} Hintergrund",
                           f"Hier sieht man {objs} auf {_DE_BG[scene.background]} Hintergrund",
                           f"Eine einfache Zeichnung: {objs} vor {_DE_BG[scene.background]} Hintergrund"])
    elif lang == "fr":
        objs = " et ".join(_fr(o) for o in scene.objects)
        text = rng.choice([f"Une image avec {objs} sur fond {_FR_BG[scene.background]}",
                           f"On voit {objs} sur un fond {_FR_BG[scene.background]}",
                           f"Un dessin simple de {objs} sur fond {_FR_BG[scene.background]}"])
    else:
        objs = " y ".join(_es(o) for o in scene.objects)
        text = rng.choice([f"Una imagen con {objs} sobre fondo {_ES_BG[scene.background]}",
                           f"Se ven {objs} sobre un fondo {_ES_BG[scene.background]}",
                           f"Un dibujo sencillo de {objs} sobre fondo {_ES_BG[scene.background]}"])
    return text[0].upper() + text[1:], lang


CASE_EDITS: tuple[Callable[[str], str], ...] = (
    lambda c: c[0].upper() + c[1:] + ".",
    lambda c: c.upper(),
    lambda c: c.title(),
    lambda c: c + "!",
    lambda c: "  " + c.replace(" ", "  ", 1) + " ",
    lambda c: c.replace(",", " -") + "...",
)
WORD_EDITS: tuple[Callable[[str], str], ...] = (
    lambda c: c + " hd",
    lambda c: c + " (2)",
    lambda c: "cute " + c,
    lambda c: c + " image",
    lambda c: "new " + c,
    lambda c: c + " - free download",
    lambda c: c + " 4k",
    lambda c: "stock photo: " + c,
)


def normalise(caption: str | None) -> str:
    """Casefold and strip punctuation/extra spaces: the form exact caption dedup compares."""
    return normalise_caption(caption) or ""


#: Characters per shingle: ``dedup_minhash``'s default (``shingle: char``, ``ngram: 5``).
SHINGLE_CHARS = 5
#: Captions of rows the truth calls distinct stay below this char-5-gram Jaccard of each other.
#: ``dedup_minhash`` at threshold 0.8 accepts an estimated Jaccard down to ~0.73 (two standard
#: errors at 128 permutations); a true 0.6 reaches that less than once in 5,000 pairs.
DISTINCT_MAX_JACCARD = 0.6
#: A caption near-duplicate keeps at least this Jaccard with its original: above the 0.8
#: threshold by more than its noise, so MinHash finds it (a 0.85 pair passes with p > 0.999).
NEAR_DUPLICATE_MIN_JACCARD = 0.85


def shingles(caption: str | None) -> frozenset[str]:
    """Char 5-grams of the normalised caption, as ``dedup_minhash`` hashes them (a caption shorter
    than 5 characters is one shingle; an empty one has none)."""
    text = normalise(caption)
    if not text:
        return frozenset()
    if len(text) <= SHINGLE_CHARS:
        return frozenset((text,))
    return frozenset(text[i:i + SHINGLE_CHARS] for i in range(len(text) - SHINGLE_CHARS + 1))


def jaccard(a: str | None, b: str | None) -> float:
    """Exact char-5-gram Jaccard of two captions (0 when either is empty)."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa and sb else 0.0


class CaptionIndex:
    """The captions placed so far, for the exact Jaccard of a new caption with every one of them.

    A shingle × caption 0/1 matrix: one query gathers its shingles' rows and sums them, about
    0.1 ms for the 2,000 captions of the default world.

        >>> index = CaptionIndex()
        >>> index.add("two small yellow diamonds against a plain white backdrop")
        0
        >>> round(index.max_jaccard("three small yellow diamonds against a plain white backdrop"), 2)
        0.86
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._sizes: list[int] = []
        self._matrix = np.zeros((1024, 256), dtype=np.uint8)  # shingle id × caption

    def __len__(self) -> int:
        return len(self._sizes)

    def jaccards(self, caption: str | None) -> np.ndarray:
        """Jaccard of ``caption`` with each indexed caption, in the order they were added."""
        n = len(self._sizes)
        sh = shingles(caption)
        if not sh or not n:
            return np.zeros(n)
        known = [self._ids[s] for s in sh if s in self._ids]
        inter = self._matrix[known, :n].sum(axis=0, dtype=np.int64)
        return inter / (len(sh) + np.asarray(self._sizes) - inter)

    def max_jaccard(self, caption: str | None, *, skip: int | None = None) -> float:
        """The highest Jaccard of ``caption`` with an indexed caption (other than number ``skip``)."""
        j = self.jaccards(caption)
        if skip is not None and skip < len(j):
            j[skip] = 0.0
        return float(j.max()) if len(j) else 0.0

    def add(self, caption: str | None) -> int:
        """Index ``caption``; returns its number (for ``skip``)."""
        sh = shingles(caption)
        for s in sh:
            if s not in self._ids:
                self._ids[s] = len(self._ids)
        n = len(self._sizes)
        rows, cols = self._matrix.shape
        if len(self._ids) > rows or n >= cols:
            grown = np.zeros((max(rows, 2 * len(self._ids)), cols * 2 if n >= cols else cols), dtype=np.uint8)
            grown[:rows, :cols] = self._matrix
            self._matrix = grown
        self._matrix[[self._ids[s] for s in sh], n] = 1
        self._sizes.append(len(sh))
        return n


JUNK_FIXED = ("image", "nan", "untitled", "photo", "identicon", "captcha", "thumbnail", "null",
              "placeholder", "img", "Untitled-1.png", "image.jpg", "no description")


def junk_caption(rng: random.Random) -> str:
    """A made-up file name, camera name, bare URL or screenshot name: alt-text that says nothing."""
    kind = rng.randrange(4)
    if kind == 0:
        return f"IMG_{rng.randrange(10000):04d}.JPG"
    if kind == 1:
        return f"DSC{rng.randrange(10000):04d}"
    if kind == 2:
        return f"https://cdn.example.com/u/{rng.getrandbits(32):08x}.jpg"
    shot = (f"Screenshot 20{rng.randrange(15, 24)}-0{rng.randrange(1, 10)}-1{rng.randrange(10)} "
            f"at {rng.randrange(10, 24)}.{rng.randrange(10, 60)}.{rng.randrange(10, 60)}")
    return shot + rng.choice(("", ".png"))
