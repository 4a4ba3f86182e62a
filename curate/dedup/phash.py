"""Perceptual hashes of images and the pairs of them within a Hamming distance.

:func:`image_hashes` decodes an image once and returns its 64-bit pHash (as
computed by the ``imagehash`` library: grey 32×32 LANCZOS thumbnail, 2-D DCT,
the 8×8 lowest frequencies above their median) and a SHA-256 of its decoded
RGB pixels and size, which equals for a lossless re-encode of the same pixels.

:func:`near_pairs` finds every pair of hashes within ``max_distance`` bits
without comparing all pairs: the 64 bits are cut into ``max_distance + 1``
bands, and by the pigeonhole principle two hashes that differ in at most
``max_distance`` bits agree exactly on at least one band. Rows that share a
band value are candidates; each candidate pair is verified by its exact
Hamming distance, and reported once (in the first band where it collides).

Example::

    >>> import numpy as np
    >>> h = np.array([0, 1, 3, -1], dtype=np.int64)  # 0b0, 0b1, 0b11, all ones
    >>> left, right, _ = near_pairs(h, max_distance=2)
    >>> sorted(zip(left.tolist(), right.tolist()))
    [(0, 1), (0, 2), (1, 2)]
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

HASH_BITS = 64
#: Pairwise-distance block (elements) per candidate bucket: bounds memory to ~32 MB of uint64
#: however large a bucket grows, while keeping numpy calls big enough to be fast.
PAIR_BLOCK = 4_000_000
WHITE = (255, 255, 255)


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can decode (truncated, corrupt, or a decompression bomb)."""


@dataclass(frozen=True)
class ImageHashes:
    phash: int  # the 64 pHash bits reinterpreted as a signed int64 (Arrow/Parquet have no uint64 need)
    pixel_sha256: str
    width: int
    height: int


def to_rgb(im):
    """RGB pixels as a viewer shows them: transparency composited onto white, as img2dataset does."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def image_hashes(data: bytes) -> ImageHashes:
    """pHash and pixel SHA-256 of encoded image bytes; :class:`UndecodableImage` when PIL cannot decode them."""
    import imagehash
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure (incl. DecompressionBombError) is one case
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e
    w, h = rgb.size
    digest = hashlib.sha256(f"{w}x{h}:".encode())
    digest.update(rgb.tobytes())
    bits = imagehash.phash(rgb, hash_size=8).hash.ravel()  # row-major, as str(ImageHash) prints it
    return ImageHashes(phash=bits_to_int64(bits), pixel_sha256=digest.hexdigest(), width=w, height=h)


def bits_to_int64(bits: np.ndarray) -> int:
    """64 booleans (most significant first, the order of ``str(imagehash.ImageHash)``) → signed int64."""
    packed = np.packbits(np.asarray(bits, dtype=bool)).view(">u8")[0]
    return int(np.array(packed, dtype=np.uint64).view(np.int64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of int64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    return np.bitwise_count(x.view(np.uint64))  # on int64 numpy would count |x|'s bits


def band_layout(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of ``max_distance + 1`` bands covering the 64 bits, widths differing by at most one."""
    n_bands = max_distance + 1
    if not 1 <= n_bands <= HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    base, extra = divmod(HASH_BITS, n_bands)
    out, shift = [], 0
    for i in range(n_bands):
        width = base + (1 if i < extra else 0)
        out.append((shift, width))
        shift += width
    return out


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every pair (i < j) of rows whose hashes differ in at most ``max_distance`` bits.

    Returns (left, right, candidates): row indices of the pairs, and how many
    candidate pairs were verified (the cost, reported in the manifest). Exact:
    no pair within the distance is missed, none beyond it is returned.
    """
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    n = h.size
    bands = band_layout(max_distance)
    values = np.stack([(h >> np.uint64(s)) & np.uint64((1 << w) - 1) for s, w in bands], axis=1) \
        if n else np.zeros((0, len(bands)), dtype=np.uint64)
    lefts: list[np.ndarray] = []
    rights: list[np.ndarray] = []
    candidates = 0
    for b in range(len(bands)):
        col = values[:, b]
        order = np.argsort(col, kind="stable")
        sorted_vals = col[order]
        starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]) if n else np.zeros(0, int)
        ends = np.r_[starts[1:], n] if n else np.zeros(0, int)
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            candidates += (e - s) * (e - s - 1) // 2
            for li, ri in _bucket_pairs(h, members, max_distance):
                if b:  # report a pair only in the first band it collides in
                    first = ~np.any(values[li, :b] == values[ri, :b], axis=1)
                    li, ri = li[first], ri[first]
                lefts.append(li)
                rights.append(ri)
    if not lefts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), candidates
    return np.concatenate(lefts), np.concatenate(rights), candidates


def _bucket_pairs(h: np.ndarray, members: np.ndarray, max_distance: int):
    """Pairs (members[i], members[j]), i < j, within the distance; in row blocks to bound memory."""
    m = members.size
    hm = h[members]
    rows_per_block = max(1, PAIR_BLOCK // m)
    for start in range(0, m - 1, rows_per_block):
        stop = min(m - 1, start + rows_per_block)
        dist = np.bitwise_count(hm[start:stop, None] ^ hm[None, :])
        i, j = np.nonzero(dist <= max_distance)
        upper = j > i + start
        yield members[i[upper] + start], members[j[upper]]
