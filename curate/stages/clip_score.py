"""CLIP score (``use: clip_score``): cosine similarity of image and caption embeddings with open_clip.

As LAION and DataComp define it: both embeddings L2-normalised, score = their
dot product. Any open_clip architecture and pretrained tag, a local checkpoint,
or the project's demo CLIP (see :mod:`curate.models.clip`). Runs in an actor
pool (the model loads once per actor) on a GPU when Ray offers one, else on CPU.

Columns: ``clip_score`` (float32) and, with ``keep_embeddings``, ``clip_image_emb`` and
``clip_text_emb`` (fixed-size lists of float16) for dedup and statistics; embeddings go
to the Parquet shards and work files, not to the ledger.

Two ways to filter:

- ``min_score: 0.28`` — per sample (LAION-5B used 0.28 with ViT-B/32); reason ``clip_score_low``;
- ``keep_fraction: 0.3`` — keep the best 30 % of the whole pool (DataComp's CLIP filter). The
  threshold needs every score, so the recipe gets a global ``keep_fraction`` stage named
  ``<name>_fraction`` right after this one; the manifest records the threshold used.

Example::

    - use: clip_score
      model: ViT-B-32
      pretrained: datacomp_xl_s13b_b90k
      keep_fraction: 0.3
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate import rows
from curate.models.clip import preprocess_images
from curate.stages.base import Resources, Stage, StageConfig, StageContext, StageResult
from curate.stages.registry import register

log = logging.getLogger(__name__)

SCORE = "clip_score"
IMAGE_EMB = "clip_image_emb"
TEXT_EMB = "clip_text_emb"
INFERENCE_BATCH = 64  # images per forward pass: bounded memory on CPU, enough to fill small GPUs


class ClipScoreConfig(StageConfig):
    use: Literal["clip_score"] = "clip_score"
    model: str = Field("ViT-B-32", description="open_clip architecture, or curate-demo-clip.")
    pretrained: str | None = Field("datacomp_xl_s13b_b90k", description="Pretrained tag or checkpoint path.")
    min_score: float | None = Field(None, ge=-1, le=1)
    keep_fraction: float | None = Field(None, gt=0, le=1)
    keep_embeddings: bool = True
    text_column: str = "caption"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    inference_batch: int = Field(INFERENCE_BATCH, ge=1)
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=1, num_gpus=1))

    @model_validator(mode="after")
    def _demo_tag(self) -> ClipScoreConfig:
        if self.model == "curate-demo-clip" and self.pretrained == "datacomp_xl_s13b_b90k":
            self.pretrained = None  # the demo model's own checkpoint
        return self


@register
class ClipScore(Stage[ClipScoreConfig]):
    name = "clip_score"
    Config = ClipScoreConfig
    stateful = True

    def __init__(self, config: ClipScoreConfig) -> None:
        super().__init__(config)
        self.output_columns = {SCORE: pa.float32()}
        if config.keep_embeddings:  # declared before setup() so later global stages' column checks see them
            self.output_columns |= {IMAGE_EMB: pa.list_(pa.float16()), TEXT_EMB: pa.list_(pa.float16())}

    @classmethod
    def expand(cls, config: ClipScoreConfig) -> list[StageConfig]:
        if config.keep_fraction is None:
            return [config]
        from curate.stages.keep_fraction import KeepFractionConfig

        name = config.name or config.use
        return [config, KeepFractionConfig(name=f"{name}_fraction", column=SCORE,
                                           fraction=config.keep_fraction)]

    def check(self) -> None:
        """Fail before any work if the checkpoint is not available here."""
        from curate.models.clip import resolve_checkpoint

        resolve_checkpoint(self.config.model, self.config.pretrained)

    def setup(self, ctx: StageContext) -> None:
        import torch

        from curate.models.clip import load_clip_for_worker

        cfg = self.config
        self.model, self.preprocess, self.tokenizer, self.device, self.dtype = load_clip_for_worker(
            cfg.model, cfg.pretrained, cfg.device, cfg.precision)
        device = self.device
        if cfg.keep_embeddings:  # declare the vector width so batches without live rows stay typed
            with torch.inference_mode():
                dim = int(self.model.encode_text(self.tokenizer([""]).to(device)).shape[-1])
            self.output_columns = {**self.output_columns, IMAGE_EMB: pa.list_(pa.float16(), dim),
                                   TEXT_EMB: pa.list_(pa.float16(), dim)}
        log.info("clip_score: %s/%s on %s (%s)", cfg.model, cfg.pretrained, device, self.dtype)

    def process(self, batch: pa.Table) -> StageResult:
        import torch

        cfg = self.config
        images = batch[rows.IMAGE].to_pylist()
        texts = batch[cfg.text_column].to_pylist() if cfg.text_column in batch.column_names else [None] * len(images)
        n = len(images)
        scores: list[float | None] = [None] * n
        img_emb: list[np.ndarray | None] = [None] * n
        txt_emb: list[np.ndarray | None] = [None] * n
        ok, tensors, drop = preprocess_images(images, self.preprocess)
        for start in range(0, len(ok), cfg.inference_batch):
            idx = ok[start:start + cfg.inference_batch]
            imgs = torch.stack(tensors[start:start + cfg.inference_batch]).to(self.device, self.dtype)
            toks = self.tokenizer([texts[i] or "" for i in idx]).to(self.device)
            with torch.inference_mode():
                fi = torch.nn.functional.normalize(self.model.encode_image(imgs).float(), dim=-1)
                ft = torch.nn.functional.normalize(self.model.encode_text(toks).float(), dim=-1)
            sim = (fi * ft).sum(-1).cpu().numpy()
            fi16, ft16 = fi.half().cpu().numpy(), ft.half().cpu().numpy()
            for j, i in enumerate(idx):
                scores[i] = float(sim[j])
                img_emb[i], txt_emb[i] = fi16[j], ft16[j]
                if cfg.min_score is not None and sim[j] < cfg.min_score:
                    drop[i] = "clip_score_low"
        columns: dict[str, pa.Array] = {SCORE: pa.array(scores, pa.float32())}
        if cfg.keep_embeddings:
            dim = next((e.shape[0] for e in img_emb if e is not None), 0)
            if dim:
                columns[IMAGE_EMB] = _fixed_list(img_emb, dim)
                columns[TEXT_EMB] = _fixed_list(txt_emb, dim)
        return StageResult(columns=columns, drop=drop)


def _fixed_list(vectors: list[np.ndarray | None], dim: int) -> pa.Array:
    """Rows of float16 vectors (None → null) as a fixed_size_list<halffloat>[dim] array."""
    flat = np.zeros((len(vectors), dim), dtype=np.float16)
    mask = np.zeros(len(vectors), dtype=bool)
    for i, v in enumerate(vectors):
        if v is None:
            mask[i] = True
        else:
            flat[i] = v
    values = pa.array(flat.ravel(), pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(mask))
