"""dedup_minhash's compiled kernels: equal to the numpy reference, seeded, the same in every process;
curate.text.normalise_caption and its compiled ASCII twin agree with the original regex definition."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import unicodedata

import numpy as np
import pyarrow as pa
import pytest

from curate.dedup import minhash as mh
from curate.dedup import minhash_lsh as lsh
from curate.text import normalise_caption

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")
_POOL = ([chr(c) for c in range(128)] + ["é", "ß", "Ä", "日", "本", "\u2028", "\u00a0", "\ufb01", "\u2460",
                                            "\uff21", "\u3000", "\u200b", "\u0130", "\U0001f600", "ς", "Σ"])


def _regex_normalise(text: str | None) -> str | None:
    """normalise_caption as it was first written (dedup_exact): the definition to keep."""
    if text is None:
        return None
    text = _SPACE.sub(" ", _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).casefold())).strip()
    return text or None


def _random_texts(seed: int, n: int, ascii_share: float = 0.7) -> list[str | None]:
    rng = random.Random(seed)
    out: list[str | None] = []
    for i in range(n):
        pool = _POOL[:128] if rng.random() < ascii_share else _POOL
        out.append(None if i % 53 == 0 else "".join(rng.choice(pool) for _ in range(rng.randint(0, 40))))
    return out


def _captions(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = "a photo of the red dog on beach ünïcode 日本語 テキスト cat stock image old house".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def test_normalise_caption_equals_the_regex_definition():
    for text in _random_texts(0, 20_000):
        assert normalise_caption(text) == _regex_normalise(text), repr(text)


def test_compiled_ascii_normalisation_equals_normalise_caption():
    texts = _random_texts(1, 5_000)
    arr = pa.array(texts, pa.string()).slice(3)  # a sliced array: offsets start mid-buffer
    cp, starts, lengths = mh.normalised_codepoints(arr, 4)
    for i, text in enumerate(arr.to_pylist()):
        got = "".join(map(chr, cp[starts[i]:starts[i] + lengths[i]]))
        assert got == (normalise_caption(text) or ""), repr(text)
        assert not cp[starts[i] + lengths[i]:starts[i] + lengths[i] + 4].any() or lengths[i] == 0


@pytest.mark.parametrize("shingle,n", [("char", 5), ("char", 3), ("char", 1), ("word", 3)])
def test_compiled_signatures_equal_the_numpy_reference(shingle, n):
    texts = [normalise_caption(t) for t in _captions(2, 500)]
    params = mh.MinHashParams(shingle=shingle, ngram=n, num_perm=128, seed=11)
    hashes, counts = mh.shingle_hashes(texts, shingle, n)
    ref = mh.signatures_from_hashes(hashes, counts, 128, 11)
    sig = mh.signatures(texts, params)
    np.testing.assert_array_equal(sig, ref)
    np.testing.assert_array_equal(mh.band_hashes(sig, 20, 6), mh.band_hashes_reference(sig, 20, 6))
    assert not np.array_equal(sig, mh.signatures(texts, mh.MinHashParams(shingle=shingle, ngram=n, seed=12)))


def test_map_task_signs_what_signatures_signs_and_skips_null_and_empty():
    caps = _captions(3, 300) + [None, "", "  !! ", "Dog"]
    params = mh.MinHashParams(threshold=0.7)
    sketch, *pieces = lsh._map_task(pa.array(caps), 1000, params, 3, False)
    norm = [normalise_caption(c) for c in caps]
    live = [i for i, t in enumerate(norm) if t]
    np.testing.assert_array_equal(sketch[live], mh.signatures([norm[i] for i in live], params).astype(np.uint16))
    rows = np.concatenate([p[2] for p in pieces])
    assert set(rows.tolist()) == {1000 + i for i in live}  # null, empty and punctuation-only: no band entries
    again = lsh._map_task(pa.array(norm), 1000, params, 3, True)  # normalised: true, same result
    np.testing.assert_array_equal(again[0], sketch)


_CHILD = """
import hashlib, sys
sys.path.insert(0, {root!r})
from curate.dedup import minhash as mh
from curate.text import normalise_caption
from tests.dedup.test_minhash_kernel import _captions
texts = [normalise_caption(t) for t in _captions(4, 300)]
sig = mh.signatures(texts, mh.MinHashParams(num_perm=128, seed=5))
print(hashlib.sha256(sig.tobytes()).hexdigest())
"""


def test_signatures_are_the_same_in_another_process():
    texts = [normalise_caption(t) for t in _captions(4, 300)]
    here = hashlib.sha256(mh.signatures(texts, mh.MinHashParams(num_perm=128, seed=5)).tobytes()).hexdigest()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for hashseed in ("1", "2"):  # str hashing differs between these processes; signatures must not
        out = subprocess.run([sys.executable, "-c", _CHILD.format(root=root)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}, check=True, cwd=root)
        assert out.stdout.strip() == here
