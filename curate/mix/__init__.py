"""Mixtures (``curate mix MIXTURE.yaml -o OUT``): several curated outputs at target ratios, one corpus.

A mixture file names sources — a curate run's output folder (its ``manifest.json``
shard list, Parquet shards preferred), Parquet files with image bytes, or
WebDataset tars — and how much of each to take: ``weight`` (a share of
``total_samples`` / ``total_tokens``) or ``epochs`` (passes over the source).
``unit: samples`` counts rows; ``unit: tokens`` counts tokens in one unit for every
source (:mod:`~curate.mix.tokens`): ``token_unit`` — the tokenizer of the captions,
``image_tokens`` per image and ``special_tokens`` per sample, the pack stage's sum —
declared in the mixture file or taken from what the sources' outputs record (their
``pack`` stage). A source keeps its ``num_tokens`` when it is recorded in that unit and
is recounted otherwise (its captions with the same tokenizer, plus the image tokens);
when that is impossible — the tokenizer is not on this machine, or the sources record
different units and the file does not pick one — the mix stops and says which source
and why. The manifest records the unit, and per source how its tokens were obtained;
the mixture's rows carry ``num_tokens`` in that unit.

Sampling is seeded and deterministic. Without ``replace: true`` a row is taken at
most once per pass; when a source is too small for its share, ``if_short`` decides:
``error`` (the default: the mixture cannot be met as written), ``cap`` (take all of
it, warn, record the shortfall) or ``repeat`` (whole passes plus a random part,
i.e. upsampling). ``epochs: 2.5`` is two whole passes plus half.

It streams: a first pass reads only keys and token counts, rows are chosen by
index, then each source is read once per pass in its own order, the sources are
interleaved by a seeded random merge, and the output is written shard by shard —
at most one output shard of image bytes is in memory. Output keys are
``<source>_<key>`` (``_<n>`` added for the n-th repeat), with ``mix_source`` and
``source_key`` columns. ``OUT/mixture_manifest.json`` records, per source, the
requested and achieved ratios, samples, unique samples, tokens and the seed.

Example mixture::

    sources:
      - {name: web, path: runs/web-curated, weight: 0.7}
      - {name: synth, path: runs/synthetic, weight: 0.3}
    unit: tokens
    total_tokens: 2000000
    token_unit: {tokenizer: /models/qwen2/tokenizer.json, image_tokens: 144}
    seed: 0
    write: {formats: [webdataset, parquet], samples_per_shard: 10000}

The package: :mod:`~curate.mix.model` (the mixture file and its loading),
:mod:`~curate.mix.read` (a source's files, row index and rows), :mod:`~curate.mix.tokens`
(the token unit and recounting), :mod:`~curate.mix.select`
(how many rows of each source, and which), :mod:`~curate.mix.write` (the whole mix and its manifest).
"""

from curate.mix.model import MANIFEST_FILE, MixSource, Mixture, MixWrite, TokenUnit, load_mixture
from curate.mix.select import select
from curate.mix.tokens import APPROXIMATE, Unit
from curate.mix.write import (
    SOURCE_COLUMN,
    SOURCE_KEY_COLUMN,
    MixResult,
    read_mixture_manifest,
    run_mix,
)

__all__ = ["APPROXIMATE", "MANIFEST_FILE", "SOURCE_COLUMN", "SOURCE_KEY_COLUMN", "MixResult", "MixSource",
           "MixWrite", "Mixture", "TokenUnit", "Unit", "load_mixture", "read_mixture_manifest", "run_mix", "select"]
