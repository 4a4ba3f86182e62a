"""Recaptioning (``use: recaption``): a VLM writes a new caption; the original is kept beside it.

Columns: ``recaption`` (the model's caption), ``recaption_model`` (which model wrote it),
``fused_caption`` (``mode: fuse`` only) and ``train_caption``: the caption to train on,
chosen by ``mode``. The original ``caption`` column is never changed. To put the chosen
caption in the WebDataset ``.txt``, set ``write.caption_column: train_caption``.

``mode``:

- ``original`` — train on the alt-text (recaptions recorded for later);
- ``recaption`` — train on the model's caption;
- ``both`` — keep both (synthetic captions alone lose the alt-text's world knowledge):
  ``both: alternate`` picks one per sample by a stable hash of the key (half and half),
  ``both: join`` writes alt-text, ``join_separator``, then the recaption;
- ``fuse`` — CapsFusion-style: a second prompt (``fuse_prompt``) merges alt-text and
  recaption into one caption.

Prompts are data files: ``prompt: short`` / ``detailed`` (``curate/vlm/prompts/recaption_*.txt``)
or a path to your own ``.txt`` (``{caption}`` is filled in with the alt-text).

Reasons: ``recaption_http_<code>``, ``recaption_timeout``, ``recaption_connect_error``,
``recaption_bad_response``, ``recaption_empty`` (a blank reply), ``image_missing``.
With ``on_failure: keep_original`` such rows are kept and train on the alt-text.

Example::

    - use: recaption
      model: Qwen/Qwen2.5-VL-7B-Instruct
      base_url: http://127.0.0.1:8000/v1
      prompt: short
      mode: fuse
    write:
      caption_column: train_caption
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field

from curate import rows
from curate.stages._vlm import IMAGE_MISSING, VLMStage, VLMStageConfig
from curate.stages.base import StageResult
from curate.stages.registry import register
from curate.vlm.base import Answer, load_prompt, render

RECAPTION = "recaption"
RECAPTION_MODEL = "recaption_model"
FUSED = "fused_caption"
TRAIN_CAPTION = "train_caption"
SHIPPED = {"short": "recaption_short", "detailed": "recaption_detailed", "fuse": "recaption_fuse"}


def _clean(text: str | None) -> str | None:
    """Strip whitespace and one pair of wrapping quotes (chat models like to quote their caption)."""
    if text is None:
        return None
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t or None


def alternate_pick(key: str) -> bool:
    """True → the recaption, False → the alt-text; stable across runs and machines (not Python's hash)."""
    return hashlib.sha1(key.encode("utf-8")).digest()[0] & 1 == 1


class RecaptionConfig(VLMStageConfig):
    use: Literal["recaption"] = "recaption"
    prompt: str = Field("short", description="short | detailed | a shipped prompt's name | a .txt path.")
    mode: Literal["original", "recaption", "both", "fuse"] = Field(
        "recaption", description="Which caption goes in train_caption (see the stage doc).")
    both: Literal["alternate", "join"] = Field("alternate", description="mode both: one of the two per "
                                                "sample by key hash, or both joined.")
    join_separator: str = "\n"
    fuse_prompt: str = Field("fuse", description="mode fuse: template with {caption} and {recaption}.")
    on_failure: Literal["drop", "keep_original"] = "drop"
    max_tokens: int = Field(256, ge=1, description="A detailed caption is 100-250 tokens.")


@register
class Recaption(VLMStage[RecaptionConfig]):
    """Write a new caption per image and choose the training caption (see the module doc)."""

    name = "recaption"
    Config = RecaptionConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {
        RECAPTION: pa.string(), RECAPTION_MODEL: pa.string(), FUSED: pa.string(), TRAIN_CAPTION: pa.string()}

    def __init__(self, config: RecaptionConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self._prompt: str | None = None
        self._fuse: str | None = None

    def templates(self) -> list[str]:
        if self._prompt is None:
            self._prompt = load_prompt(SHIPPED.get(self.cfg.prompt, self.cfg.prompt))
            if self.cfg.mode == "fuse":
                self._fuse = load_prompt(SHIPPED.get(self.cfg.fuse_prompt, self.cfg.fuse_prompt))
        return [self._prompt] + ([self._fuse] if self._fuse else [])

    def process(self, batch: pa.Table) -> StageResult:
        self.templates()
        assert self._prompt is not None
        n = batch.num_rows
        captions = batch[rows.CAPTION].to_pylist() if rows.CAPTION in batch.column_names else [None] * n
        keys = [str(k) for k in batch[rows.KEY].to_pylist()]
        answers = self.ask(batch, [render(self._prompt, caption=c) for c in captions])
        recaps = [_clean(a.text) for a in answers]
        errors = [self._reason(a, r) for a, r in zip(answers, recaps, strict=True)]
        fused: list[str | None] = [None] * n
        if self.cfg.mode == "fuse":
            assert self._fuse is not None
            prompts = [render(self._fuse, caption=c, recaption=r) if e is None else None
                       for c, r, e in zip(captions, recaps, errors, strict=True)]
            fanswers = self.ask(batch, prompts)
            for i, (p, a) in enumerate(zip(prompts, fanswers, strict=True)):
                if p is not None:
                    fused[i] = _clean(a.text)
                    errors[i] = self._reason(a, fused[i])
        train: list[str | None] = []
        drop: list[str | None] = [None] * n
        for i in range(n):
            if errors[i] is not None:
                if self.cfg.on_failure == "drop" or errors[i] == IMAGE_MISSING:
                    drop[i] = errors[i]
                train.append(captions[i])
                continue
            train.append(self._choose(keys[i], captions[i], recaps[i], fused[i]))
        model = [self.cfg.model if r is not None else None for r in recaps]
        return StageResult(columns={
            RECAPTION: pa.array(recaps, pa.string()), RECAPTION_MODEL: pa.array(model, pa.string()),
            FUSED: pa.array(fused, pa.string()), TRAIN_CAPTION: pa.array(train, pa.string()),
        }, drop=drop)

    @staticmethod
    def _reason(answer: Answer, cleaned: str | None) -> str | None:
        if answer.error == IMAGE_MISSING:
            return IMAGE_MISSING
        if answer.error is not None:
            return f"recaption_{answer.error}"
        return None if cleaned else "recaption_empty"

    def _choose(self, key: str, caption: str | None, recap: str | None, fused: str | None) -> str | None:
        mode = self.cfg.mode
        if mode == "original":
            return caption
        if mode == "recaption":
            return recap
        if mode == "fuse":
            return fused
        if self.cfg.both == "join":
            return self.cfg.join_separator.join(t for t in (caption, recap) if t)
        return recap if alternate_pick(key) or not caption else caption
