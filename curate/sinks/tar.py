"""A streaming tar writer for shards: the bytes ``tarfile`` writes, at a fraction of its CPU.

``tarfile.TarFile.addfile`` costs about 30 µs a member (a ``TarInfo`` copy, a header built field by
field, a PAX check; this writer 4.6 µs): 0.1 ms a sample for an image, a caption and its JSON, about
what fetching the image costs. Shard members here are all regular files with the same mode, owner and time, so the
512-byte ustar header is a template in which only the name, size and checksum change. Names that
ustar cannot hold (over 100 bytes, or not ASCII) get ``tarfile``'s own PAX header, so the archive
is byte for byte what ``tarfile.open(mode="w|", format=PAX_FORMAT)`` writes for the same members.

>>> import io, tarfile
>>> buf = io.BytesIO()
>>> with TarWriter(buf, mtime=0) as tar:
...     tar.add("000000000.txt", b"a cat")
>>> tarfile.open(fileobj=io.BytesIO(buf.getvalue())).extractfile("000000000.txt").read()
b'a cat'
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the archive to a whole record
_NAME = 100  # ustar's name field
_SIZE_LIMIT = 8**11  # an 11-digit octal size field: 8 GiB


def _octal(n: int, width: int) -> bytes:
    """A ustar number: ``width - 1`` octal digits and a NUL, as ``tarfile.itn`` writes it."""
    return b"%0*o\0" % (width - 1, n)


class TarWriter:
    """Writes regular files to ``fileobj`` as a POSIX tar stream; ``close`` ends the archive.

    Every member gets ``mode``, ``mtime`` (whole seconds: a fraction would make ``tarfile`` add a
    PAX header to each member) and ``owner`` as user and group name, uid and gid 0.
    """

    def __init__(self, fileobj: BinaryIO, *, mtime: int, mode: int = 0o444, owner: str = "curate") -> None:
        self.fileobj = fileobj
        self.mtime, self.mode, self.owner = int(mtime), mode, owner
        self._offset = 0
        self._closed = False
        template = tarfile.TarInfo("x")
        template.mtime, template.mode, template.uname, template.gname = self.mtime, mode, owner, owner
        header = bytearray(template.tobuf(tarfile.USTAR_FORMAT))
        header[0:_NAME] = bytes(_NAME)  # name: per member
        header[124:136] = bytes(12)  # size: per member
        header[148:156] = b" " * 8  # checksum: computed as over spaces, per member
        self._template = bytes(header)
        self._template_sum = sum(self._template)

    def add(self, name: str, data: bytes) -> None:
        """Append one regular file named ``name`` holding ``data``."""
        raw = name.encode("utf-8", "surrogateescape")
        size = len(data)
        if len(raw) <= _NAME and raw.isascii() and size < _SIZE_LIMIT and b"\0" not in raw:
            size_field = _octal(size, 12)
            chksum = self._template_sum + sum(raw) + sum(size_field)  # both fields are NULs in the template
            header = bytearray(self._template)
            header[0:len(raw)] = raw
            header[124:136] = size_field
            header[148:156] = b"%06o\0 " % chksum
        else:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, self.mtime, self.mode
            info.uname = info.gname = self.owner
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.fileobj.write(header)
        self.fileobj.write(data)
        pad = -size % BLOCK
        if pad:
            self.fileobj.write(bytes(pad))
        self._offset += len(header) + size + pad

    def close(self) -> None:
        """End the archive: two zero blocks, then zeros to a whole record, as ``tarfile`` does."""
        if self._closed:
            return
        self._closed = True
        end = self._offset + 2 * BLOCK
        self.fileobj.write(bytes(2 * BLOCK + (-end % RECORD)))

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # on an error the caller discards the file (atomic_open)
            self.close()
