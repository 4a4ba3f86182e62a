"""Writing files that are complete or absent: every output, marker and work file goes through here."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec


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
