"""Moved to :mod:`curate.demo.train_clip`. Kept only for ``tests/stages/test_clip_score.py``'s import of
``roc_auc``; delete this file when that import reads ``from curate.demo.train_clip import roc_auc``."""

from curate.demo.train_clip import roc_auc

__all__ = ["roc_auc"]
