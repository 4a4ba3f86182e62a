"""Writing files that are complete or absent: every output, marker and work file goes through here."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

#: Object stores whose fsspec filesystem caches directory listings by default (s3fs). curate's
#: driver decides what is finished from markers that Ray workers write from other processes; a
#: listing cached before a worker wrote its ``_done`` marker hides that marker, and a complete
#: run is then reported incomplete (seen against a real S3 server: tests/test_s3.py). Turned off
#: through fsspec's config so every filesystem curate opens for these protocols sees fresh
#: listings; an explicit ``use_listings_cache`` in the user's fsspec config still wins.
NO_LISTINGS_CACHE_PROTOCOLS = ("s3",)


def _disable_listings_cache() -> None:
    for proto in NO_LISTINGS_CACHE_PROTOCOLS:
        fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)


_disable_listings_cache()


#: A file :func:`atomic_open` is still writing: its final name, ``.tmp`` and 8 hex digits.
TEMP_NAME = re.compile(r"\.tmp[0-9a-f]{8}$")


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator[IO[bytes]]:
    """Write to a unique temp name beside ``path`` and rename on success; remove it on failure.

    A file with its final name is therefore always complete — what resume trusts.
    """
    fs, p = fsspec.core.url_to_fs(path)
    tmp = f"{p}.tmp{uuid.uuid4().hex[:8]}"
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_json(path: str, data: Any) -> None:
    with atomic_open(path) as f:
        f.write(json.dumps(data, indent=1, sort_keys=True).encode())


#: What an unsafe path component (``..``) becomes in a key: visible, and never a parent directory.
PARENT_REPLACEMENT = "_"


def safe_member_path(key: str) -> str:
    """A sample key that is safe as a relative tar member name (``KEY.jpg``) on any extractor.

    Keys come from inputs we do not control (tar member names, a ``key_col``): a key
    such as ``/etc/x`` or ``../../x`` written as a member name would make ``tar -x`` or
    ``tarfile.extractall`` write outside the target folder. Leading slashes, empty and
    ``.`` components and NUL bytes are removed, backslashes count as separators, and
    ``..`` becomes ``_``; a key that was already safe is returned unchanged.

    >>> [safe_member_path(k) for k in ("../../etc/passwd", "/abs/k", "a/./b", "ok/k01")]
    ['_/_/etc/passwd', 'abs/k', 'a/b', 'ok/k01']
    """
    parts = key.replace("\x00", "").replace("\\", "/").split("/")
    clean = [PARENT_REPLACEMENT if p == ".." else p for p in parts if p not in ("", ".")]
    return "/".join(clean) or PARENT_REPLACEMENT
