"""Replies kept as they arrive, so a re-run after a crash asks the model only what it had not answered.

Layout (under the run's output, so ``--overwrite`` clears it with the rest)::

    <output>/_work/stages/<stage>/<fingerprint>/<shard>/<worker>-<seq>.jsonl

One JSON line per reply: ``{"k": key, "p": prompt hash, "t": text}``. The fingerprint
covers the model, generation settings and prompt templates, so changing any of them
never reuses an old reply; the prompt hash (of the rendered prompt) guards against a key
whose caption changed, and lets one key hold a reply per prompt (one per metric). Only replies are kept: transport failures are asked again.

Each worker buffers replies and writes a new small file every ``FLUSH_REPLIES`` replies
or ``FLUSH_SECONDS`` seconds, through fsspec (so ``s3://`` outputs work: no appends), with
the temp-name-and-rename writer, so a file is complete or absent. A crash loses at most
the buffer. Files are per input shard: a worker loads only the shards it sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict

import fsspec

from curate.fsutil import atomic_open

log = logging.getLogger(__name__)

#: Replies per file: small enough that a crash loses little, large enough not to litter the store.
FLUSH_REPLIES = 64
#: ...or this often, so a slow server's replies are kept too.
FLUSH_SECONDS = 5.0
#: Shards whose replies one worker keeps in memory (a batch rarely spans more than two).
SHARDS_IN_MEMORY = 4
NO_SHARD = -1


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


class ReplyCache:
    """Replies of one stage and fingerprint, loaded per shard, written in small files."""

    def __init__(self, root: str, fingerprint: str) -> None:
        self.root = f"{root.rstrip('/')}/{fingerprint}"
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.worker = uuid.uuid4().hex[:12]
        self._seq = 0
        self._loaded: OrderedDict[int, dict[tuple[str, str], str]] = OrderedDict()
        self._buffer: dict[int, list[dict[str, str]]] = {}
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def _shard_dir(self, shard: int) -> str:
        return f"{self._base}/{'all' if shard == NO_SHARD else f'{shard:05d}'}"

    def _load(self, shard: int) -> dict[tuple[str, str], str]:
        if shard in self._loaded:
            self._loaded.move_to_end(shard)
            return self._loaded[shard]
        replies: dict[tuple[str, str], str] = {}
        try:
            files = sorted(p for p in self.fs.ls(self._shard_dir(shard), detail=False) if p.endswith(".jsonl"))
        except FileNotFoundError:
            files = []
        for path in files:
            with self.fs.open(path, "r", encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        replies[(r["k"], r["p"])] = r["t"]
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignoring a damaged line in %s", path)
        self._loaded[shard] = replies
        while len(self._loaded) > SHARDS_IN_MEMORY:
            self._loaded.popitem(last=False)
        return replies

    def get(self, shard: int, key: str, prompt: str) -> str | None:
        """The kept reply for this key and prompt, or None."""
        with self._lock:
            return self._load(shard).get((key, prompt_hash(prompt)))

    def put(self, shard: int, key: str, prompt: str, text: str) -> None:
        """Keep a reply (buffered; written at the next flush)."""
        line = {"k": key, "p": prompt_hash(prompt), "t": text}
        with self._lock:
            self._buffer.setdefault(shard, []).append(line)
            if shard in self._loaded:
                self._loaded[shard][(key, line["p"])] = text
            self._buffered += 1
            due = self._buffered >= FLUSH_REPLIES or time.monotonic() - self._last_flush >= FLUSH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        """Write buffered replies, one new file per shard."""
        with self._lock:
            buffer, self._buffer, self._buffered = self._buffer, {}, 0
            self._last_flush = time.monotonic()
            seqs = []
            for _ in buffer:
                self._seq += 1
                seqs.append(self._seq)
        for (shard, lines), seq in zip(buffer.items(), seqs, strict=True):
            if not lines:
                continue
            path = f"{self._shard_dir(shard)}/{self.worker}-{seq:06d}.jsonl"
            self.fs.makedirs(self._shard_dir(shard), exist_ok=True)
            data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
            with atomic_open(_with_protocol(self.root, path)) as f:
                f.write(data)


def _with_protocol(like: str, path: str) -> str:
    if "://" in like and "://" not in path:
        return like.split("://", 1)[0] + "://" + path
    return path
