"""Grade zero-shot tags (``clip_tags``) against the demo world's truth tags.

The demo world knows every image's tags (:meth:`curate.demo.scenes.Scene.tags`), so
the tags a run predicted — the ``clip_tags`` column of its ledger or Parquet shards
— can be scored: micro precision and recall over all (row, tag) pairs, the same per
tag type (colour, shape, object = colour-shape pair, background), and per type the
top-1 accuracy (the most probable predicted tag of that type is true).

Example::

    >>> from curate.demo.tags_eval import tag_accuracy
    >>> tag_accuracy(ledger, truth)                           # doctest: +SKIP
    {'rows': 1310, 'precision': 0.70, 'recall': 0.49, 'by_type': {'colour': {...}, ...}}
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from curate import rows
from curate.demo.scenes import vocabulary_text
from curate.stages.clip_tags import TAGS, parse_vocabulary


def tag_types() -> dict[str, str]:
    """Demo tag → its type (its group in the demo's vocabulary file)."""
    vocab = parse_vocabulary(vocabulary_text(), source="demo vocabulary")
    return {t: vocab.groups[g] for t, g in zip(vocab.tags, vocab.group_of, strict=True)}


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def tag_accuracy(predicted: pa.Table, truth: pa.Table, *, on: str = rows.URL) -> dict[str, Any]:
    """Precision/recall of ``predicted[clip_tags]`` against ``truth[tags]``, joined on ``on``.

    Rows without predicted tags (dropped before tagging, or no tag passed the threshold)
    count only in ``untagged``: they add to recall's denominator, not to precision's.
    Predicted rows whose ``on`` value is not in the truth are counted in ``unmatched``.
    """
    types = tag_types()
    truth_tags = dict(zip(truth[on].to_pylist(), truth["tags"].to_pylist(), strict=True))
    kinds = sorted(set(types.values()))
    per = {k: {"tp": 0, "predicted": 0, "true": 0, "top1_ok": 0, "top1_rows": 0} for k in kinds}
    tp = n_pred = n_true = tagged = untagged = unmatched = exact = 0
    statuses = (predicted[rows.STATUS].to_pylist() if rows.STATUS in predicted.column_names
                else [rows.KEPT] * predicted.num_rows)
    for key, pred, status in zip(predicted[on].to_pylist(), predicted[TAGS].to_pylist(), statuses, strict=True):
        if status != rows.KEPT:
            continue
        if key not in truth_tags:
            unmatched += 1
            continue
        true = set(truth_tags[key] or [])
        pred = pred or []
        n_true += len(true)
        for t in true:
            if t in types:
                per[types[t]]["true"] += 1
        if not pred:
            untagged += 1
            continue
        tagged += 1
        exact += set(pred) == true
        hits = true & set(pred)
        tp += len(hits)
        n_pred += len(pred)
        first_of_type: dict[str, str] = {}
        for t in pred:  # most probable first
            k = types.get(t)
            if k is None:
                continue
            per[k]["predicted"] += 1
            per[k]["tp"] += t in true
            first_of_type.setdefault(k, t)
        for k, t in first_of_type.items():
            per[k]["top1_rows"] += 1
            per[k]["top1_ok"] += t in true
    return {
        "rows": tagged + untagged, "tagged": tagged, "untagged": untagged, "unmatched": unmatched,
        "precision": _ratio(tp, n_pred), "recall": _ratio(tp, n_true), "exact_match": _ratio(exact, tagged),
        "tags_per_row": _ratio(n_pred, tagged),
        "by_type": {k: {"precision": _ratio(v["tp"], v["predicted"]), "recall": _ratio(v["tp"], v["true"]),
                        "top1_accuracy": _ratio(v["top1_ok"], v["top1_rows"]), "predicted": v["predicted"]}
                    for k, v in per.items()},
    }
