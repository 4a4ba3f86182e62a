"""Caption text normalisation shared by every stage that compares captions.

A leaf module (standard library only), so :mod:`curate.dedup` and :mod:`curate.stages`
both import it without importing each other. ``dedup_exact``'s ``by: caption`` and
``dedup_minhash``'s shingles see the same normalised text, so a caption pair the
exact level calls equal is a Jaccard-1 pair for MinHash too.

Example::

    >>> normalise_caption("  A Photo — of the  CAFÉ!! ")
    'a photo of the café'
    >>> normalise_caption("...") is None
    True
"""

from __future__ import annotations

import re
import unicodedata

#: Runs of word characters (letters, digits, underscore, as Python's Unicode ``\w``). The
#: normalised caption is these runs joined by one space: every other character (punctuation,
#: symbols, any whitespace) separates words and is dropped.
_WORD = re.compile(r"\w+", re.UNICODE)
#: ASCII fast path: every ASCII character that is not ``\w`` becomes a space (then ``str.split``).
_ASCII_SEPARATORS = str.maketrans({chr(c): " " for c in range(128) if not re.match(r"\w", chr(c))})


def normalise_caption(text: str | None) -> str | None:
    """NFKC, case-fold, punctuation to spaces, whitespace collapsed; None when nothing is left.

    Same result as ``re.sub(r"\\s+", " ", re.sub(r"[^\\w\\s]", " ", casefold(NFKC(text)))).strip()``
    (tests check it on random Unicode), in one pass; ASCII text (most captions) skips NFKC and the regex.
    """
    if text is None:
        return None
    if text.isascii():  # NFKC leaves ASCII as it is and casefold() of ASCII is lower()
        return " ".join(text.lower().translate(_ASCII_SEPARATORS).split()) or None
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold())) or None
