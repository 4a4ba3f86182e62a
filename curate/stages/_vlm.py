"""What the VLM stages (``mlm_filter``, ``recaption``) share: their config base, a backend per
worker, replies kept for resume, one ask per live row. A helper module, not a stage (``_``).

A subclass builds one prompt per row and turns the answers into columns and drop
reasons. Rows without image bytes are never sent (``image_missing``). Replies found in
the resume store are used as they are; the others are asked, and each reply is kept as
soon as it arrives.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
from pydantic import Field, model_validator

from curate import rows
from curate.stages.base import Resources, Stage, StageConfig, StageContext
from curate.vlm.base import DEFAULT_BATCH_ROWS, Answer, Ask, Backend, VLMOptions
from curate.vlm.cache import NO_SHARD, ReplyCache
from curate.vlm.registry import check_backend, make_backend

log = logging.getLogger(__name__)

IMAGE_MISSING = "image_missing"


class VLMStageConfig(StageConfig, VLMOptions):
    """A VLM stage's options: the stage's (``use``, ``name``, ``resources``) and the backend's, flat."""

    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=1, batch_size=DEFAULT_BATCH_ROWS))

    @model_validator(mode="before")
    @classmethod
    def _gpu_for_in_process(cls, data: Any) -> Any:
        """In-process models want a GPU (the engine falls back to CPU when Ray has none)."""
        if isinstance(data, dict) and data.get("backend") == "transformers" and "resources" not in data:
            data = {**data, "resources": {"num_cpus": 1, "num_gpus": 1, "batch_size": DEFAULT_BATCH_ROWS}}
        return data


V = TypeVar("V", bound=VLMStageConfig)


class VLMStage(Stage[V]):
    """Base of ``mlm_filter`` and ``recaption``: subclasses call :meth:`ask` from ``process``."""

    stateful: ClassVar[bool] = True

    def __init__(self, config: V) -> None:
        super().__init__(config)
        self.options: VLMOptions = config
        self.backend: Backend | None = None
        self.cache: ReplyCache | None = None
        #: requests sent to the backend by this worker (replies from the resume store excluded)
        self.asked = 0

    def templates(self) -> list[str]:
        """Every prompt template the stage may use: they enter the resume fingerprint."""
        raise NotImplementedError

    def check(self) -> None:
        self.templates()  # a missing prompt file fails now
        check_backend(self.options)

    def setup(self, ctx: StageContext) -> None:
        """Open the backend and, in a run, the resume store under ``ctx.work_dir``."""
        self.ctx = ctx
        if self.backend is None:
            self.backend = make_backend(self.options)
        if self.cache is None and self.options.resume and ctx.work_dir:
            self.cache = ReplyCache(ctx.work_dir, self.options.fingerprint(*self.templates()))

    def teardown(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def ask(self, batch: pa.Table, prompts: list[str | None]) -> list[Answer]:
        """One answer per row: from the resume store, from the model, or ``image_missing``.

        A ``None`` prompt means "do not ask" (the answer is an empty error).
        """
        if self.backend is None:
            self.setup(self.ctx)
        n = batch.num_rows
        images = batch[rows.IMAGE].to_pylist() if rows.IMAGE in batch.column_names else [None] * n
        formats = (batch[rows.IMAGE_FORMAT].to_pylist() if rows.IMAGE_FORMAT in batch.column_names
                   else ["jpg"] * n)
        shards = batch[rows.SHARD].to_pylist() if rows.SHARD in batch.column_names else [NO_SHARD] * n
        keys = [str(k) for k in batch[rows.KEY].to_pylist()]
        answers: list[Answer] = [Answer(error="not_asked")] * n
        todo: list[int] = []
        for i in range(n):
            if prompts[i] is None:
                continue
            if images[i] is None:
                answers[i] = Answer(error=IMAGE_MISSING)
                continue
            kept = self.cache.get(shards[i], keys[i], prompts[i]) if self.cache is not None else None
            if kept is not None:
                answers[i] = Answer(text=kept)
            else:
                todo.append(i)
        if todo:
            asks = [Ask(keys[i], images[i], formats[i], prompts[i]) for i in todo]  # type: ignore[arg-type]

            def keep(j: int, answer: Answer) -> None:
                if self.cache is not None and answer.text is not None:
                    i = todo[j]
                    self.cache.put(shards[i], keys[i], prompts[i], answer.text)  # type: ignore[arg-type]

            assert self.backend is not None
            self.asked += len(asks)
            for i, a in zip(todo, self.backend.generate(asks, keep), strict=True):
                answers[i] = a
            if self.cache is not None:
                self.cache.flush()
        log.debug("%s: %d rows, %d asked, %d from the resume store", self.stage_name, n, len(todo),
                  sum(1 for p in prompts if p is not None) - len(todo))
        return answers
