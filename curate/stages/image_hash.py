"""Image hashes for deduplication (``use: image_hash``): pHash and a SHA-256 of the decoded pixels.

Adds two small columns that the dedup stages read on the driver instead of
image bytes:

- ``phash`` (int64): the 64-bit perceptual hash of ``imagehash.phash``, its bits
  reinterpreted as a signed int64 (Arrow and Parquet readers everywhere handle int64);
  near-identical for resized and re-encoded copies — ``dedup_phash`` reads it;
- ``pixel_sha256`` (string): hex SHA-256 of the decoded RGB pixels and the size, so a
  lossless re-encode (PNG → PNG with other settings, or PNG → lossless WebP) of the same
  pixels counts as an exact copy, where the ``sha256`` of the bytes does not —
  ``dedup_exact`` with ``by: [pixels]`` reads it.

Transparent images are composited onto white first (as ``download`` does).
Rows whose bytes do not decode are dropped with ``image_decode_error`` (the
``download`` stage normally guarantees decodable images; WebDataset and Parquet
sources do not), rows without bytes with ``image_missing``.

Example::

    - use: image_hash
    - use: dedup_exact
      by: [pixels]
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa

from curate import rows
from curate.dedup.phash import UndecodableImage, image_hashes
from curate.stages.base import Stage, StageConfig, StageResult
from curate.stages.registry import register

PHASH = "phash"
PIXEL_SHA256 = "pixel_sha256"


class ImageHashConfig(StageConfig):
    use: Literal["image_hash"] = "image_hash"


@register
class ImageHash(Stage[ImageHashConfig]):
    """Decode each live image once; add ``phash`` and ``pixel_sha256``."""

    name = "image_hash"
    Config = ImageHashConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {PHASH: pa.int64(), PIXEL_SHA256: pa.string()}

    def process(self, batch: pa.Table) -> StageResult:
        images = batch[rows.IMAGE].to_pylist() if rows.IMAGE in batch.column_names else [None] * batch.num_rows
        n = len(images)
        phash: list[int | None] = [None] * n
        pixel: list[str | None] = [None] * n
        drop: list[str | None] = [None] * n
        for i, data in enumerate(images):
            if data is None:
                drop[i] = "image_missing"
                continue
            try:
                h = image_hashes(data)
            except UndecodableImage:
                drop[i] = "image_decode_error"
                continue
            phash[i], pixel[i] = h.phash, h.pixel_sha256
        return StageResult(columns={PHASH: pa.array(phash, pa.int64()), PIXEL_SHA256: pa.array(pixel, pa.string())},
                           drop=drop)


def hash_stage_for(config: StageConfig) -> ImageHashConfig:
    """The ``image_hash`` stage a dedup entry's sugar puts before it, named ``<name>_hash``."""
    name = config.name or config.use
    return ImageHashConfig(name=f"{name}_hash")
