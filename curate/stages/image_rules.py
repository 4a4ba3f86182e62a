"""Image size rules: shorter side, aspect ratio, pixel count.

Tiny images, banners and extreme panoramas rarely pair well with a caption
and waste a model's input resolution; DataComp's "basic" filter keeps images
whose shorter side is at least 200 px and whose aspect ratio (long/short) is at
most 3 (Gadre et al. 2023, "DataComp", arXiv:2304.14108).

Where the size comes from, per row, first that is known:

1. ``original_width`` / ``original_height`` — the size of the image as served,
   before the download stage resized it. DataComp filters on this, so a 1000 px
   image resized to 224 px still passes ``min_side: 200``. Set
   ``use_original: false`` to judge the stored size instead.
2. ``width`` / ``height`` — the stored image's size.
3. the header of the bytes in ``image`` (WebDataset or Parquet sources that carry
   only bytes), read with PIL without decoding the pixels.

When the rows have no ``width`` column, every image's header is read and its
size recorded as ``width``/``height``, so later stages and the statistics see
the stored size whatever the source.

Example (a recipe entry)::

    - use: image_rules
      min_side: 200
      max_aspect_ratio: 3.0
      max_pixels: 100000000

Reasons, checked in this order: ``image_missing`` (no size and no bytes),
``image_unreadable`` (bytes whose header PIL cannot parse), ``decompression_bomb``
(a header declaring more pixels than PIL will open, as the download stage calls
it), ``image_too_small`` (shorter side below ``min_side``, as in ``download``),
``image_aspect_ratio`` (long/short above ``max_aspect_ratio``, as in
``download``), ``image_too_few_pixels``, ``image_too_many_pixels``.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import Any, ClassVar, Literal

import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from curate import rows
from curate.stages.base import Stage, StageConfig, StageResult
from curate.stages.registry import register

log = logging.getLogger(__name__)

WIDTH, HEIGHT = "width", "height"
ORIGINAL_WIDTH, ORIGINAL_HEIGHT = "original_width", "original_height"

#: What PIL raises on a header it cannot parse: plugins differ (a truncated PNG
#: raises SyntaxError, a short GIF struct.error, an unknown format OSError).
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class ImageTooLarge(Exception):
    """PIL refused to open the image: more than twice ``Image.MAX_IMAGE_PIXELS`` pixels."""


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, without decoding pixels; None if unreadable.

    Raises :class:`ImageTooLarge` for decompression bombs, which no later stage could decode.

    >>> from PIL import Image; import io
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30)).save(buf, "PNG")
    >>> header_size(buf.getvalue())
    (40, 30)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    except _HEADER_ERRORS:
        return None
    return (w, h) if w > 0 and h > 0 else None


def _as_int(v: Any) -> int | None:
    """A size value from a carried-through column (may be float or string); None if not a positive int."""
    try:
        n = int(v)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def _column(batch: pa.Table, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


class ImageRulesConfig(StageConfig):
    use: Literal["image_rules"] = "image_rules"
    min_side: int | None = Field(None, ge=1, description="Smallest allowed shorter side, in pixels.")
    max_aspect_ratio: float | None = Field(None, ge=1, description="Largest allowed long side / short side.")
    min_pixels: int | None = Field(None, ge=1, description="Smallest allowed width × height.")
    max_pixels: int | None = Field(None, ge=1, description="Largest allowed width × height.")
    use_original: bool = Field(True, description="Judge original_width/original_height (the size before the "
                               "download stage resized it) when the rows have them, as DataComp does.")

    @model_validator(mode="after")
    def _bounds(self) -> ImageRulesConfig:
        if self.min_pixels is not None and self.max_pixels is not None and self.max_pixels < self.min_pixels:
            raise ValueError("max_pixels must be >= min_pixels")
        return self


@register
class ImageRules(Stage[ImageRulesConfig]):
    """Drop images outside size bounds (see the module doc for where the size comes from)."""

    name = "image_rules"
    Config = ImageRulesConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {WIDTH: pa.int32(), HEIGHT: pa.int32()}

    def judge(self, w: int, h: int) -> str | None:
        """The first size rule (w, h) breaks, or None to keep it."""
        cfg = self.config
        short, long = min(w, h), max(w, h)
        if cfg.min_side is not None and short < cfg.min_side:
            return "image_too_small"
        if cfg.max_aspect_ratio is not None and long / short > cfg.max_aspect_ratio:
            return "image_aspect_ratio"
        if cfg.min_pixels is not None and w * h < cfg.min_pixels:
            return "image_too_few_pixels"
        if cfg.max_pixels is not None and w * h > cfg.max_pixels:
            return "image_too_many_pixels"
        return None

    def process(self, batch: pa.Table) -> StageResult:
        cfg = self.config
        names = set(batch.column_names)
        if not names & {WIDTH, ORIGINAL_WIDTH, rows.IMAGE}:
            raise ValueError(
                f"stage {self.stage_name}: the rows have no image size ({WIDTH}/{HEIGHT}, "
                f"{ORIGINAL_WIDTH}/{ORIGINAL_HEIGHT}) and no image bytes ({rows.IMAGE}); "
                "put it after the download stage, or use a source that holds images"
            )
        sized: list[tuple[list[Any], list[Any]]] = []
        if cfg.use_original:
            sized.append((_column(batch, ORIGINAL_WIDTH), _column(batch, ORIGINAL_HEIGHT)))
        sized.append((_column(batch, WIDTH), _column(batch, HEIGHT)))
        images = _column(batch, rows.IMAGE)
        record = WIDTH not in names  # no stored size: record what the headers say
        read_w: list[int | None] = [None] * batch.num_rows
        read_h: list[int | None] = [None] * batch.num_rows
        drop: list[str | None] = []
        for i in range(batch.num_rows):
            size = next(((w, h) for ws, hs in sized
                         if (w := _as_int(ws[i])) is not None and (h := _as_int(hs[i])) is not None), None)
            if size is not None and not (record and images[i] is not None):
                drop.append(self.judge(*size))
                continue
            if images[i] is None:
                drop.append("image_missing")
                continue
            try:
                stored = header_size(images[i])
            except ImageTooLarge:
                drop.append("decompression_bomb")
                continue
            if stored is None:
                drop.append("image_unreadable")
                continue
            read_w[i], read_h[i] = stored
            drop.append(self.judge(*(size or stored)))
        columns = {WIDTH: pa.array(read_w, pa.int32()), HEIGHT: pa.array(read_h, pa.int32())} if record else {}
        return StageResult(columns=columns, drop=drop)
