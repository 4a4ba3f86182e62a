"""Choosing a mixture's rows: how much of each source (weights or epochs), and which rows add up
to it — seeded, without replacement unless asked, short sources capped, repeated or refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from curate.errors import InputError, RecipeError
from curate.mix.model import Mixture
from curate.mix.read import SourceIndex

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """Chosen rows of one source: index into the source's rows, and which copy (0 = first) each is."""

    rows: np.ndarray
    copy: np.ndarray
    capped: bool = False
    shortfall: float = 0.0


def _copies(idx: np.ndarray) -> np.ndarray:
    """The occurrence number of each value in ``idx`` (0 for the first time a row is drawn)."""
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_idx)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
    out = np.empty(len(idx), dtype=np.int64)
    out[order] = np.arange(len(idx)) - run_start
    return out


def select(amount: np.ndarray, target: float, rng: np.random.Generator, *, replace: bool,
           if_short: str, name: str, unit: str) -> Selection:
    """Choose rows whose ``amount`` (1 per row, or tokens) adds up to ``target``.

    Without replacement a random permutation is cut where the running sum comes closest
    to the target; short sources repeat whole passes, cap, or fail (``if_short``).
    """
    n = len(amount)
    if target <= 0:
        return Selection(np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n == 0 or amount.sum() == 0:
        raise InputError(f"mixture source {name!r} is empty but its share is {target:g} {unit}")
    if replace:
        mean = float(amount.mean())
        picks: list[np.ndarray] = []
        got = 0.0
        while got < target:  # draw in chunks until the running sum passes the target
            chunk = rng.integers(0, n, size=max(16, int((target - got) / mean * 1.1) + 1))
            picks.append(chunk)
            got += float(amount[chunk].sum())
        drawn = np.concatenate(picks)
        idx = drawn[: _cut(np.cumsum(amount[drawn]), target)]
        return Selection(idx, _copies(idx))
    total = float(amount.sum())
    passes = 0
    capped = False
    shortfall = 0.0
    if target > total:
        if if_short == "error":
            raise RecipeError(  # the mixture asks for more than there is: the mixture file must change
                f"mixture source {name!r} has {total:g} {unit} but its share is {target:g}: set `if_short: cap` "
                "(take all of it), `if_short: repeat` (upsample by repeating it), or `replace: true`")
        if if_short == "cap":
            log.warning("mixture source %s: %g %s available, %g asked; taking all of it", name, total, unit, target)
            capped, shortfall, target = True, target - total, total
        else:
            passes = int(target // total)
            target -= passes * total
    parts = [np.arange(n, dtype=np.int64)] * passes
    copies = [np.full(n, p, dtype=np.int64) for p in range(passes)]
    if target > 0:
        perm = rng.permutation(n)
        k = _cut(np.cumsum(amount[perm]), target)
        parts.append(perm[:k])
        copies.append(np.full(k, passes, dtype=np.int64))
    return Selection(np.concatenate(parts), np.concatenate(copies), capped, shortfall)


def _cut(cumsum: np.ndarray, target: float) -> int:
    """How many leading items bring the running sum closest to ``target``."""
    k = int(np.searchsorted(cumsum, target))
    if k >= len(cumsum):
        return len(cumsum)
    below = cumsum[k - 1] if k > 0 else 0
    return k + 1 if abs(cumsum[k] - target) < abs(target - below) else k


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer shares of ``total`` in proportion to ``weights`` that add up to ``total`` exactly."""
    w = np.array(weights, dtype=float) / sum(weights)
    raw = w * total
    base = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - base), kind="stable")[: total - int(base.sum())]:
        base[i] += 1
    return base.tolist()


def targets(mix: Mixture, indexes: list[SourceIndex]) -> list[float]:
    """The amount (rows or tokens) to take from each source."""
    sizes = [float(ix.rows if mix.unit == "samples" else ix.tokens.sum()) for ix in indexes]
    if mix.sources[0].weight is None:
        out = [s.epochs * size for s, size in zip(mix.sources, sizes, strict=True)]  # type: ignore[operator]
        return [float(round(x)) for x in out] if mix.unit == "samples" else out
    weights = [s.weight for s in mix.sources]
    if mix.unit == "samples":
        return [float(x) for x in _largest_remainder(mix.total, weights)]  # type: ignore[arg-type]
    return [mix.total * w / sum(weights) for w in weights]  # type: ignore[operator]
