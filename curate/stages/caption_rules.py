"""Caption content rules: junk alt-texts, bare file names, bare URLs, repeated words.

Web-scraped alt-texts are often not captions at all: "image", "untitled",
"identicon", a camera file name (``IMG_1234.JPG``, ``DSC0042``), or a bare URL.
None of them tells a model anything about the picture. This stage
drops them, each with its own reason, so the ledger shows which rule fired.

Word and character bounds are the job of ``caption_length``; the two stages
share one vocabulary (``caption_*`` reasons) and are meant to be used together.

Example (a recipe entry)::

    - use: caption_rules
      junk_words: ["sample image", "lorem ipsum"]   # added to curate/data/junk_captions.txt
      junk_file: my_blacklist.txt                    # one entry per line, # comments
      max_repeat_ratio: 0.5                          # "buy buy buy buy cheap" is dropped

Reasons, checked in this order (the first that applies is recorded):
``caption_missing`` (null or blank), ``caption_url`` (only a URL),
``caption_filename`` (only a file name), ``caption_junk`` (a blacklisted
alt-text, or nothing but digits, punctuation and symbols),
``caption_repetitive`` (too many repeated words).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from typing import Literal

import fsspec
import pyarrow as pa
from pydantic import Field, field_validator

from curate import rows
from curate.errors import InputError
from curate.stages.base import Stage, StageConfig, StageResult
from curate.stages.registry import register

log = logging.getLogger(__name__)

#: The blacklist shipped with curate (inside the package, so wheels carry it).
BUNDLED_JUNK_FILE = "junk_captions.txt"

#: File extensions that make a caption a file name. Images first, then the
#: camera RAW and document formats that also turn up as alt-texts.
FILE_EXTENSIONS = (
    "jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg|ico"
    "|raw|cr2|nef|arw|dng|psd|pdf"
)
#: A caption that ends in a file extension is a file name only if it is this
#: short: "Screen Shot 2020-01-01 at 10.00.00.png" (5 words) is one, while a
#: longer sentence that happens to end in ``.jpg`` still describes something.
MAX_FILENAME_WORDS = 5
#: Prefixes that cameras, phones and scanners put before a running number. Only
#: ``_``/``-`` may separate them ("GP 2019" is a Grand Prix, ``GP010023`` a GoPro file);
#: "Photo 12" is caught by the blacklist instead.
CAMERA_PREFIXES = (
    "img|dsc|dscn|dscf|dcim|sam|pict|pimg|cimg|gopr|gp|dji|mvi|mvimg|pxl|pano|vid|wp|p"
    "|photo|image|picture|scan|screenshot"
)
#: A single token with at least this many digits, mostly digits, is a generated
#: name (``20190812_123456``, ``1234567_10152345_n``); shorter numbers such as
#: years or "Route 66" are left alone.
MIN_ID_DIGITS = 6
MIN_ID_DIGIT_SHARE = 0.6
#: Top-level domains that make a bare ``word.word`` caption a URL. A closed list,
#: because any two letters after a dot ("Vol.II", "St.Louis") is not a domain.
URL_TLDS = (
    "com|org|net|edu|gov|mil|int|info|biz|io|co|ai|app|dev|me|tv|ly|xyz|online|site|shop|store"
    "|blog|club|top|news|uk|us|ca|au|nz|ie|de|fr|es|it|nl|be|ch|at|pl|pt|br|ru|ua|jp|cn|kr|in"
    "|se|no|dk|fi|cz|hu|ro|gr|tr|mx|ar|cl|za|eu|asia"
)
#: Repetition is only judged on captions with at least this many words: in a
#: short caption one repeat ("bye bye", "New York New York") is a large share.
MIN_WORDS_FOR_REPEAT = 4

_URL = re.compile(r"^(?:(?:https?|ftps?)://|www\.)\S+$", re.IGNORECASE)
_DOMAIN = re.compile(
    rf"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:{URL_TLDS})(?::\d+)?(?:[/?#]\S*)?$", re.IGNORECASE
)
_ENDS_WITH_EXT = re.compile(rf"\.(?:{FILE_EXTENSIONS})$", re.IGNORECASE)
_CAMERA = re.compile(rf"^(?:{CAMERA_PREFIXES})[_-]?\d{{3,}}(?:[_-]\w+)*(?:\.\w{{2,5}})?$", re.IGNORECASE)
_TOKEN_ID = re.compile(r"^[\w-]+$")
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """The blacklist's view of a caption: NFKC, case-folded, no punctuation, no digit-only tokens.

    >>> normalise("Untitled-1")
    'untitled'
    >>> normalise("IMAGE (3)")
    'image'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(t for t in _NON_WORD.sub(" ", text).split() if not t.isdigit())


def is_url(text: str) -> bool:
    """True when the whole caption is one URL: ``https://…``, ``www.…`` or ``example.com/x``."""
    return bool(_URL.match(text)) or (" " not in text and bool(_DOMAIN.match(text)))


def is_filename(text: str) -> bool:
    """True when the whole caption is a file name: ``IMG_1234.JPG``, ``DSC0042``, ``image.png``,
    ``20190812_123456.jpg``, ``Screen Shot 2020-01-01 at 10.00.00.png``."""
    if _ENDS_WITH_EXT.search(text) and len(text.split()) <= MAX_FILENAME_WORDS:
        return True
    if _CAMERA.match(text):
        return True
    if " " not in text and _TOKEN_ID.match(text):
        digits = sum(c.isdigit() for c in text)
        alnum = sum(c.isalnum() for c in text)
        return digits >= MIN_ID_DIGITS and digits >= MIN_ID_DIGIT_SHARE * alnum
    return False


def repeat_ratio(words: list[str]) -> float:
    """Share of words that repeat an earlier one: ``a a a a`` → 0.75, all distinct → 0."""
    return 1.0 - len(set(words)) / len(words) if words else 0.0


def parse_blacklist(lines: Iterable[str]) -> set[str]:
    """Normalised entries of a blacklist file: one per line, ``#`` starts a comment."""
    out = set()
    for line in lines:
        entry = normalise(line.split("#", 1)[0])
        if entry:
            out.add(entry)
    return out


@lru_cache(maxsize=1)
def bundled_blacklist() -> frozenset[str]:
    """The blacklist shipped in ``curate/data/junk_captions.txt``."""
    text = resources.files("curate").joinpath("data", BUNDLED_JUNK_FILE).read_text(encoding="utf-8")
    return frozenset(parse_blacklist(text.splitlines()))


def read_blacklist_file(path: str) -> set[str]:
    """Entries of a user's blacklist file (any fsspec path)."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return parse_blacklist(f)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"junk_file {path}: cannot read it as UTF-8 text: {e}") from e


class CaptionRulesConfig(StageConfig):
    use: Literal["caption_rules"] = "caption_rules"
    junk: bool = Field(True, description="Drop alt-texts on the blacklist (curate/data/junk_captions.txt "
                       "plus junk_words and junk_file) and captions with no letters at all.")
    junk_words: list[str] = Field(default_factory=list,
                                  description="More blacklist entries (whole captions, matched normalised).")
    junk_file: str | None = Field(None, description="A file of more entries, one per line, # comments "
                                  "(any fsspec path; relative paths are from the working directory).")
    filenames: bool = Field(True, description="Drop captions that are only a file name (IMG_1234.JPG).")
    urls: bool = Field(True, description="Drop captions that are only a URL.")
    max_repeat_ratio: float | None = Field(
        None, gt=0, lt=1,
        description=f"Drop captions of {MIN_WORDS_FOR_REPEAT}+ words whose share of repeated words "
        "is above this (0.5: half the words repeat an earlier one).")

    @field_validator("junk_file")
    @classmethod
    def _junk_file_exists(cls, v: str | None) -> str | None:
        if v is not None:
            fs, path = fsspec.core.url_to_fs(v)
            if not fs.isfile(path):
                raise ValueError(f"no such file: {v}")
        return v


@register
class CaptionRules(Stage[CaptionRulesConfig]):
    """Drop captions that are junk alt-texts, bare file names or bare URLs (see the module doc)."""

    name = "caption_rules"
    Config = CaptionRulesConfig

    def __init__(self, config: CaptionRulesConfig) -> None:
        super().__init__(config)
        cfg = config
        self.blacklist: frozenset[str] = frozenset()
        if cfg.junk:
            extra = parse_blacklist(cfg.junk_words)
            if cfg.junk_file:
                extra |= read_blacklist_file(cfg.junk_file)
            self.blacklist = bundled_blacklist() | extra
            log.debug("%s: %d blacklist entries (%d from the recipe)", self.stage_name,
                      len(self.blacklist), len(extra))

    def reason(self, caption: str | None) -> str | None:
        """The first rule a caption breaks, or None to keep it."""
        cfg = self.config
        text = (caption or "").strip()
        if not text:
            return "caption_missing"
        if cfg.urls and is_url(text):
            return "caption_url"
        if cfg.filenames and is_filename(text):
            return "caption_filename"
        norm = normalise(text)
        if cfg.junk and (not any(c.isalpha() for c in norm) or norm in self.blacklist):
            return "caption_junk"
        if cfg.max_repeat_ratio is not None:
            words = norm.split()
            if len(words) >= MIN_WORDS_FOR_REPEAT and repeat_ratio(words) > cfg.max_repeat_ratio:
                return "caption_repetitive"
        return None

    def process(self, batch: pa.Table) -> StageResult:
        return StageResult(drop=[self.reason(c) for c in batch.column(rows.CAPTION).to_pylist()])
