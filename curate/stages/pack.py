"""``use: pack`` — each sample's length in tokens, for packing into training sequences.

Where packing happens (a design decision): in two places, each where it is cheap.

- This map stage computes every kept sample's length, ``num_tokens`` =
  ``image_tokens`` per image + the caption's tokens + ``special_tokens``
  (BOS/EOS), and drops (``too_long_for_sequence``) or truncates the samples that
  could never fit a sequence. Drops happen here, not in the writer, so they land
  in the ledger with a reason like every other drop, and the counts add up.
- The bin packing itself runs per output shard when the shard is finalized
  (``write.formats`` containing ``packed``; ``curate/sinks/packed.py``): FFD over
  the shard's kept rows, as Open-Qwen2VL packs per shard. Memory stays bounded by
  one shard, packing needs no global phase, and resume keeps working shard by shard.
  The price: each shard's last sequences are partly empty — with 10,000-sample
  shards and 4,096-token sequences that is well under 1 % of the capacity.

``max_tokens`` has one source of truth, this stage's config: the packed writer
reads it from here (``curate.sinks.packed.packing_options``). Put ``pack`` last
among the stages that change captions (e.g. after recaptioning).

Example::

    - use: pack
      max_tokens: 4096
      image_tokens: 144            # SigLIP's 729 patches pooled to 12×12, as Open-Qwen2VL
      tokenizer: /models/qwen2/tokenizer.json
      on_overflow: truncate
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate import rows
from curate.errors import CurateError
from curate.pack.tokens import TokenCounter, make_counter
from curate.stages.base import Stage, StageConfig, StageContext, StageResult
from curate.stages.registry import register

DEFAULT_MAX_TOKENS = 4096  # Open-Qwen2VL's packed sequence length
DEFAULT_IMAGE_TOKENS = 144  # Open-Qwen2VL: SigLIP-SO400M's 27×27 = 729 patches average-pooled to 12×12
DEFAULT_SPECIAL_TOKENS = 2  # BOS + EOS around each sample
TOO_LONG = "too_long_for_sequence"
EMPTY = "empty_sample"  # only with special_tokens: 0, no image and an empty text
NUM_TOKENS = "num_tokens"  # what the packed writer bins by
#: The truncated text of a sample cut to fit (null when it was not cut): the packed writer uses it
#: instead of ``text_column``, while the caption itself stays whole in the ledger and Parquet shards.
PACK_TEXT = "pack_text"


class PackConfig(StageConfig):
    use: Literal["pack"] = "pack"
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="Tokens per packed sequence (the context).")
    image_tokens: int = Field(DEFAULT_IMAGE_TOKENS, ge=0,
                              description="Tokens each image takes in the target model.")
    special_tokens: int = Field(DEFAULT_SPECIAL_TOKENS, ge=0, description="Tokens added per sample (BOS/EOS).")
    tokenizer: str | None = Field(
        None, description="Local tokenizer.json or tokenizer directory; none: approximate counts (logged).")
    text_column: str = Field(rows.CAPTION, description="Column whose text is counted (and truncated).")
    on_overflow: Literal["drop", "truncate"] = Field(
        "drop", description="A sample longer than max_tokens: drop it, or cut its text to fit.")

    @model_validator(mode="after")
    def _fits(self) -> PackConfig:
        if self.image_tokens + self.special_tokens >= self.max_tokens:
            raise ValueError(f"image_tokens + special_tokens ({self.image_tokens + self.special_tokens}) "
                             f"leave no room for text in max_tokens {self.max_tokens}")
        return self


@register
class Pack(Stage[PackConfig]):
    """Record ``num_tokens`` (and ``text_tokens``, ``pack_truncated``, ``pack_text``); drop or truncate
    over-long samples.

    Reasons: ``too_long_for_sequence``, ``empty_sample`` (no image, no text and ``special_tokens: 0``).
    """

    name = "pack"
    Config = PackConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {
        NUM_TOKENS: pa.int32(),
        "text_tokens": pa.int32(),
        "pack_truncated": pa.bool_(),
        PACK_TEXT: pa.string(),
    }

    def __init__(self, config: PackConfig) -> None:
        super().__init__(config)
        self.counter: TokenCounter | None = None

    def check(self) -> None:
        """On the driver: load the tokenizer (errors name the path), or warn that counts are approximate."""
        cfg = self.config
        try:
            make_counter(cfg.tokenizer)
        except (OSError, ValueError, RuntimeError) as e:
            raise CurateError(f"stage {self.stage_name}: {e}") from e

    def setup(self, ctx: StageContext) -> None:
        self.counter = make_counter(self.config.tokenizer)

    def process(self, batch: pa.Table) -> StageResult:
        cfg = self.config
        if self.counter is None:
            self.setup(self.ctx)
        if cfg.text_column not in batch.column_names:
            raise CurateError(f"stage {self.stage_name}: no column {cfg.text_column!r} to count tokens of; "
                              f"columns: {', '.join(batch.column_names)}")
        texts = [t or "" for t in batch.column(cfg.text_column).to_pylist()]
        if rows.IMAGE in batch.column_names:
            n_images = [0 if null else 1 for null in batch.column(rows.IMAGE).is_null().to_pylist()]
        else:
            n_images = [0] * batch.num_rows
        text_tokens = self.counter.count(texts)
        num_tokens, truncated, drop = [], [], []
        cut_texts: list[str | None] = [None] * batch.num_rows
        for i, (text, n_text, n_img) in enumerate(zip(texts, text_tokens, n_images, strict=True)):
            fixed = n_img * cfg.image_tokens + cfg.special_tokens
            total = fixed + n_text
            cut = False
            if total == 0:  # no image, no text, no BOS/EOS: nothing to train on, and no length to pack
                num_tokens.append(0)
                truncated.append(False)
                drop.append(EMPTY)
                continue
            if total > cfg.max_tokens:
                room = cfg.max_tokens - fixed
                if cfg.on_overflow == "truncate" and room > 0:
                    cut_texts[i] = self.counter.truncate(text, room)
                    text_tokens[i] = self.counter.count([cut_texts[i]])[0]
                    total, cut = fixed + text_tokens[i], True
                else:
                    num_tokens.append(total)
                    truncated.append(False)
                    drop.append(TOO_LONG)
                    continue
            num_tokens.append(total)
            truncated.append(cut)
            drop.append(None)
        columns = {
            NUM_TOKENS: pa.array(num_tokens, pa.int32()),
            "text_tokens": pa.array(text_tokens, pa.int32()),
            "pack_truncated": pa.array(truncated, pa.bool_()),
            PACK_TEXT: pa.array(cut_texts, pa.string()),
        }
        return StageResult(columns=columns, drop=drop)
