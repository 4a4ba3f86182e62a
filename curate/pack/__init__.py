"""Packing samples into fixed-length training sequences for MLLM pre-training.

``ffd`` is the bin-packing algorithm, ``tokens`` counts a sample's tokens; the
``pack`` stage (``curate/stages/pack.py``) records every sample's length and the
packed sink (``curate/sinks/packed.py``) writes the sequences per output shard.
"""

from curate.pack.ffd import Packing, first_fit_decreasing, lower_bound_bins

__all__ = ["Packing", "first_fit_decreasing", "lower_bound_bins"]
