"""MLLM judge (``use: mlm_filter``): a VLM rates each pair 0-100 on MLM-Filter's four metrics.

MLM-Filter (Wang et al. 2024; Open-Qwen2VL's filter) asks a small fine-tuned VLM for one
metric at a time — ``image_text_matching``, ``object_detail_fulfillment``,
``caption_text_quality``, ``semantic_understanding`` — and reads an integer 0-100 from the
first line of the reply. Prompt templates are data files (``curate/vlm/prompts/<metric>.txt``,
``{caption}`` is filled in); ``prompts:`` swaps in your own file per metric.

Columns: ``mlm_<metric>`` (int32) for each metric asked. ``metrics`` maps a metric to its
threshold (``null``: score only); a row must reach every threshold.

Reasons:

=================================  ==========================================================
``mlm_filter_low:<metric>``        a score below the metric's threshold
``judge_unparseable``              the first line is no integer 0-100 (``on_unparseable: keep``
                                   keeps the row with a null score)
``judge_http_<code>``              the server answered an error (after retries for 429 / 5xx)
``judge_timeout``                  no reply within ``timeout`` (after retries)
``judge_connect_error``            the endpoint refused or dropped the connection (after retries)
``judge_bad_response``             the reply is not a chat completion
``image_missing``                  the row has no image bytes
=================================  ==========================================================

Example (Open-Qwen2VL: semantic understanding ≥ 85, served by ``vllm serve``)::

    - use: mlm_filter
      model: weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o
      base_url: http://127.0.0.1:8000/v1
      metrics: {semantic_understanding: 85}
"""

from __future__ import annotations

import re
from typing import Literal

import pyarrow as pa
from pydantic import Field, field_validator

from curate import rows
from curate.stages._vlm import IMAGE_MISSING, VLMStage, VLMStageConfig
from curate.stages.base import StageResult
from curate.stages.registry import register
from curate.vlm.base import load_prompt, render

METRICS = ("image_text_matching", "object_detail_fulfillment", "caption_text_quality", "semantic_understanding")
Metric = Literal["image_text_matching", "object_detail_fulfillment", "caption_text_quality",
                 "semantic_understanding"]
UNPARSEABLE = "judge_unparseable"
MAX_SCORE = 100
#: A first line that is a score: "85", "85.", "Score: 85", "85/100". Anything else is unparseable:
#: a judge that starts talking before the score is not following the prompt.
_SCORE_LINE = re.compile(r"^(?:score\s*[:=]?\s*)?(\d{1,3})(?:\s*/\s*100)?\s*\.?$", re.IGNORECASE)


def parse_score(text: str | None) -> int | None:
    """The integer 0-100 on the first line of a reply, or None.

    >>> parse_score("85\\nThe caption names the bridge."), parse_score("150"), parse_score("It is 85")
    (85, None, None)
    """
    if text is None:
        return None
    first = text.strip().split("\n", 1)[0].strip()
    m = _SCORE_LINE.match(first)
    if m is None:
        return None
    score = int(m.group(1))
    return score if score <= MAX_SCORE else None


def score_column(metric: str) -> str:
    return f"mlm_{metric}"


class MLMFilterConfig(VLMStageConfig):
    use: Literal["mlm_filter"] = "mlm_filter"
    metrics: dict[Metric, int | None] = Field(
        default_factory=lambda: {"semantic_understanding": 85},
        description="Metric -> minimum score 0-100 (null: record the score, drop nothing).")
    prompts: dict[Metric, str] = Field(default_factory=dict, description=(
        "Metric -> prompt template (a .txt path, or a shipped prompt's name); {caption} is filled in."))
    on_unparseable: Literal["drop", "keep"] = "drop"
    text_column: str = Field(rows.CAPTION, description="Column judged as the caption.")
    max_tokens: int = Field(16, ge=1, description="The score comes first; a few tokens are enough.")

    @field_validator("metrics")
    @classmethod
    def _thresholds(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        if not v:
            raise ValueError(f"name at least one metric: {', '.join(METRICS)}")
        for m, t in v.items():
            if t is not None and not 0 <= t <= MAX_SCORE:
                raise ValueError(f"threshold of {m} must be 0-100 (got {t})")
        return v


@register
class MLMFilter(VLMStage[MLMFilterConfig]):
    """Score pairs with an MLLM judge; keep those that reach every threshold (see the module doc)."""

    name = "mlm_filter"
    Config = MLMFilterConfig

    def __init__(self, config: MLMFilterConfig) -> None:
        super().__init__(config)
        self.cfg = config
        self.output_columns = {score_column(m): pa.int32() for m in config.metrics}
        self._templates: dict[str, str] | None = None

    def templates(self) -> list[str]:
        if self._templates is None:
            self._templates = {m: load_prompt(self.cfg.prompts.get(m, m)) for m in self.cfg.metrics}
        return list(self._templates.values())

    def process(self, batch: pa.Table) -> StageResult:
        self.templates()
        assert self._templates is not None
        n = batch.num_rows
        captions = (batch[self.cfg.text_column].to_pylist() if self.cfg.text_column in batch.column_names
                    else [None] * n)
        # One request per row and metric: stack the metrics so one backend call keeps them all in flight.
        metrics = list(self.cfg.metrics)
        stacked = batch if len(metrics) == 1 else pa.concat_tables([batch] * len(metrics))
        prompts = [render(self._templates[m], caption=c) for m in metrics for c in captions]
        answers = self.ask(stacked, prompts)
        columns: dict[str, pa.Array] = {}
        drop: list[str | None] = [None] * n
        failed: list[str | None] = [None] * n
        unparseable = [False] * n
        low: list[str | None] = [None] * n
        for j, m in enumerate(metrics):
            scores: list[int | None] = []
            for i in range(n):
                a = answers[j * n + i]
                score = parse_score(a.text) if a.error is None else None
                scores.append(score)
                if a.error is not None:
                    failed[i] = failed[i] or (a.error if a.error == IMAGE_MISSING else f"judge_{a.error}")
                elif score is None:
                    unparseable[i] = True
                elif (t := self.cfg.metrics[m]) is not None and score < t and low[i] is None:
                    low[i] = f"mlm_filter_low:{m}"
            columns[score_column(m)] = pa.array(scores, pa.int32())
        for i in range(n):
            if failed[i]:
                drop[i] = failed[i]
            elif unparseable[i] and self.cfg.on_unparseable == "drop":
                drop[i] = UNPARSEABLE
            else:
                drop[i] = low[i]
        return StageResult(columns=columns, drop=drop)
