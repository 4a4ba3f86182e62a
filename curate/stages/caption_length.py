"""Caption length bounds in words and characters (a rule every recipe wants first)."""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate import rows
from curate.stages.base import Stage, StageConfig, StageResult
from curate.stages.registry import register


class CaptionLengthConfig(StageConfig):
    use: Literal["caption_length"] = "caption_length"
    min_words: int = Field(0, ge=0)
    max_words: int | None = Field(None, ge=1)
    min_chars: int = Field(0, ge=0)
    max_chars: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> CaptionLengthConfig:
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError("max_words must be >= min_words")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError("max_chars must be >= min_chars")
        return self


@register
class CaptionLength(Stage[CaptionLengthConfig]):
    """Drop captions outside word/character bounds; records ``caption_words`` and ``caption_chars``.

    Reasons: ``caption_missing``, ``caption_too_few_words``, ``caption_too_many_words``,
    ``caption_too_short``, ``caption_too_long``.
    """

    name = "caption_length"
    Config = CaptionLengthConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {
        "caption_words": pa.int32(),
        "caption_chars": pa.int32(),
    }

    def process(self, batch: pa.Table) -> StageResult:
        cfg = self.config
        words, chars, drop = [], [], []
        for caption in batch.column(rows.CAPTION).to_pylist():
            if caption is None:
                words.append(None)
                chars.append(None)
                drop.append("caption_missing")
                continue
            text = caption.strip()
            w, c = len(text.split()), len(text)
            words.append(w)
            chars.append(c)
            if w < cfg.min_words:
                drop.append("caption_too_few_words")
            elif cfg.max_words is not None and w > cfg.max_words:
                drop.append("caption_too_many_words")
            elif c < cfg.min_chars:
                drop.append("caption_too_short")
            elif cfg.max_chars is not None and c > cfg.max_chars:
                drop.append("caption_too_long")
            else:
                drop.append(None)
        return StageResult(
            columns={"caption_words": pa.array(words, pa.int32()), "caption_chars": pa.array(chars, pa.int32())},
            drop=drop,
        )
