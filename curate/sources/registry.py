"""Which :class:`~curate.sources.base.Source` reads an input: chosen by file format, and for
Parquet by whether the image bytes are already there.

>>> from curate.sources.base import SourceConfig
>>> from curate.sources.registry import make_source
>>> make_source(SourceConfig(path="urls.parquet")).plan("work", 10_000)  # doctest: +SKIP
"""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.sources.base import Source, SourceConfig, detect_format, expand_paths
from curate.sources.parquet_images import ParquetImageSource
from curate.sources.urllist import UrlListSource
from curate.sources.webdataset import WebDatasetSource


def make_source(config: SourceConfig) -> Source:
    """The source for ``config``: every input file expanded, one format for all of them."""
    files = expand_paths(config.path)
    formats = {config.format if config.format != "auto" else detect_format(f) for f in files}
    if len(formats) > 1:
        raise InputError(f"source.path mixes formats {sorted(formats)}; use one format per run")
    fmt = formats.pop()
    if fmt == "webdataset":
        return WebDatasetSource(config, files)
    if fmt == "parquet":
        with fsspec.open(files[0], "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if config.image_col in names:  # images already there: nothing to download
            return ParquetImageSource(config, files)
    return UrlListSource(config, files, fmt)
