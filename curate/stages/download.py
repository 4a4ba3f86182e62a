"""The ``download`` stage: fetch each row's URL, check and resize the image — img2dataset, without the hangs.

Options keep img2dataset's names and defaults (``image_size``, ``resize_mode``,
``encode_format``, ``timeout``, ``retries``, ``disallowed_header_directives``…),
so an img2dataset command line translates key for key. What is added is what
img2dataset lacks: a total deadline per download, a body cap, a pixel limit,
content sniffing, bounded redirects and an SSRF guard that is on by default.

Each worker (an actor: ``stateful = True``) runs one asyncio event loop on a
background thread with one aiohttp session, so connections, the per-host cap
and the DNS cache live across batches; up to ``concurrency_per_worker``
downloads are in flight, and decode/resize/encode runs in a small thread pool
(OpenCV releases the GIL) so the loop keeps downloading meanwhile.

Columns added: ``image`` (the encoded output, kept rows only), ``image_format``
(jpg/png/webp), ``width``/``height`` (output), ``original_width``/``original_height``
(also for rows dropped by a size filter), ``sha256`` (of the output image, the row
contract's image identity that ``dedup_exact`` uses), ``original_<compute_hash>`` (of
the downloaded bytes: what img2dataset stores as ``<compute_hash>``) and ``http_status``.

Every row ends kept or dropped with one of these reasons:

========================  ===================================================================
``missing_url``           the row has no URL
``bad_url``               the URL cannot be parsed or has no host
``bad_scheme``            not http(s): ``file://``, ``ftp://``… (also on a redirect hop)
``private_address``       the host is (or resolves to) a loopback, private, link-local,
                          multicast, reserved or unspecified address (SSRF guard)
``dns_error``             the host name does not resolve
``connect_error``         refused, reset, TLS failure, or the server hung up mid-body
``protocol_error``        the server's response is not valid HTTP
``timeout``               the deadline (``timeout``) passed: DNS + connect + redirects + body
``http_<code>``           a non-2xx final status, e.g. ``http_404``, ``http_503``
``redirect_loop``         a redirect chain came back to a URL it had visited
``too_many_redirects``    more than ``max_redirects`` redirects
``too_large``             the body is larger than ``max_bytes``
``opt_out:<directive>``   ``X-Robots-Tag`` opts out, e.g. ``opt_out:noai``
``hash_mismatch``         ``verify_hash`` given and the downloaded bytes differ
``not_an_image``          the bytes are no image format we decode (HTML, JSON, SVG, empty)
``decode_error``          an image format, but corrupt or truncated beyond decoding
``decompression_bomb``    the header declares more than ``max_pixels`` pixels
``image_too_small``       shorter side below ``min_image_size``
``image_too_large_area``  width x height above ``max_image_area``
``image_aspect_ratio``    long side / short side above ``max_aspect_ratio``
``encode_error``          the resized image could not be encoded
``internal_error``        a bug in curate; the log has the traceback
========================  ===================================================================

Example (recipe)::

    stages:
      - use: download
        image_size: 384
        resize_mode: center_crop
        timeout: 10
        retries: 2
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate import rows
from curate.net.fetch import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DISALLOWED_DIRECTIVES,
    DEFAULT_DNS_TTL_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REDIRECTS,
    DEFAULT_PER_HOST,
    DEFAULT_RETRY_BACKOFF_S,
    DEFAULT_TIMEOUT_S,
    BackgroundLoop,
    Fetcher,
    FetchOptions,
    FetchResult,
)
from curate.net.image import (  # noqa: F401 - FAILED_TO_RESIZE: the reasons this stage reports
    DEFAULT_MAX_PIXELS,
    FAILED_TO_RESIZE,
    EncodeFormat,
    Header,
    ImageOptions,
    ImageProcessor,
    ImageResult,
    Interpolation,
    ResizeMode,
)
from curate.stages.base import Resources, Stage, StageConfig, StageContext, StageResult
from curate.stages.registry import register

log = logging.getLogger(__name__)

HashName = Literal["sha256", "md5", "sha512"]

#: Threads for decode/resize/encode of large images per worker (one CPU): two, so one decodes
#: while another hashes or encodes and the event loop keeps its share; more only contend for the
#: CPU. OpenCV is set to one internal thread, so this is the worker's whole CPU parallelism.
DEFAULT_DECODE_THREADS = 2

#: Images up to this many pixels (a 1,600 x 1,250 photo) are decoded, resized and encoded in the
#: event loop's own thread: at most ~15 ms of loop time each, and no hand-off to a decode thread
#: and back (a future, a wake-up of the loop, the GIL passed twice), which cost 10-14 % of a
#: 20,000-image run's CPU with web-thumbnail-sized images (91-96 s instead of 104-105 s, measured
#: in alternating runs). Larger ones go to the decode threads so the loop never stalls long.
INLINE_MAX_PIXELS = 2_000_000

#: Rows per batch handed to a worker. A batch returns when its slowest download ends (at worst
#: a deadline per attempt); each worker runs ``batches_in_flight`` (4) batches at once, so one
#: batch's tail overlaps the others' work: 2048 rows in flight per worker, about 40 MB of
#: 256 px JPEGs, while small batches keep shards finishing (and being written) steadily.
DEFAULT_BATCH_ROWS = 512



class DownloadConfig(StageConfig):
    """Options of ``use: download``: img2dataset's (same names, same defaults), then curate's."""

    use: Literal["download"] = "download"
    resources: Resources = Field(
        default_factory=lambda: Resources(num_cpus=1, batch_size=DEFAULT_BATCH_ROWS),
        description="Per worker; batch_size defaults to 512 rows here (see DEFAULT_BATCH_ROWS).")
    # --- img2dataset's options
    image_size: int = Field(256, ge=1, description="Target size in pixels (see resize_mode).")
    resize_mode: ResizeMode = Field("border", description=(
        "no | border (fit the longer side, pad white to a square) | keep_ratio (shorter side = image_size) | "
        "keep_ratio_largest (longer side = image_size) | center_crop (keep_ratio, then a centred square)."))
    resize_only_if_bigger: bool = Field(False, description="Never upscale (and then never pad or crop).")
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality; for png the compression 0-9.")
    skip_reencode: bool = Field(False, description="Keep the downloaded bytes when nothing changed and the "
                                "format already is encode_format.")
    disable_all_reencoding: bool = Field(False, description="Store downloaded bytes as they are (no resize).")
    min_image_size: int = Field(0, ge=0, description="Drop images whose shorter side is smaller.")
    max_image_area: float | None = Field(None, gt=0, description="Drop images with more pixels (w x h).")
    max_aspect_ratio: float | None = Field(None, ge=1, description="Drop images with long/short side above this.")
    compute_hash: HashName | None = Field("sha256", description=(
        "Hash of the downloaded bytes, stored as original_<name> (what img2dataset stores as <name>). "
        "The `sha256` column always holds the sha256 of the output image."))
    verify_hash: tuple[str, HashName] | None = Field(None, description=(
        "[column, hash]: drop rows whose downloaded bytes do not hash to the column's value "
        "(a null value is not checked)."))
    timeout: float = Field(DEFAULT_TIMEOUT_S, gt=0, description=(
        "Deadline in seconds for one attempt: DNS, connect, redirects, headers and the whole body."))
    retries: int = Field(0, ge=0, description="Extra attempts after a timeout, 429 or 5xx.")
    user_agent_token: str | None = Field(None, description="Added to the User-Agent; X-Robots-Tag "
                                         "`token: directive` lines naming it apply to us.")
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES),
        description="X-Robots-Tag directives that opt an image out; [] disables the check.")
    # --- curate's additions
    retry_backoff: float = Field(DEFAULT_RETRY_BACKOFF_S, ge=0, description=(
        "Seconds before the first retry; doubles each retry. A Retry-After is honoured up to `timeout`."))
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="Largest body accepted, in bytes.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=(
        "Decompression-bomb limit, checked on the header before decoding."))
    max_redirects: int = Field(DEFAULT_MAX_REDIRECTS, ge=0)
    allow_private_networks: bool = Field(False, description=(
        "Lift the SSRF guard: allow loopback, private, link-local… addresses."))
    allowed_networks: list[str] = Field(default_factory=list, description=(
        "CIDRs the SSRF guard lets through, e.g. an internal mirror's 10.1.0.0/16."))
    concurrency_per_worker: int = Field(DEFAULT_CONCURRENCY, ge=1, description="Downloads in flight per worker.")
    max_connections_per_host: int = Field(DEFAULT_PER_HOST, ge=1, description="Per worker.")
    decode_threads: int = Field(DEFAULT_DECODE_THREADS, ge=1, description=(
        "Decode/resize threads per worker for images over 2 megapixels (smaller ones are decoded in the "
        "worker's event loop)."))
    dns_cache_ttl: float = Field(DEFAULT_DNS_TTL_S, ge=0, description="Seconds a DNS answer is reused.")
    jpeg_draft: bool = Field(True, description=(
        "Decode JPEGs at 1/2-1/8 scale when they are shrunk that much anyway (much faster)."))
    fast_area: bool = Field(True, description=(
        "Shrink by 1.6-2x (area interpolation) as a 2x linear upscale and an exact 2:1 area average: "
        "half the resize CPU, >= 41.9 dB PSNR of OpenCV's INTER_AREA on real photos."))

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"{net!r} is not an IP network (e.g. 10.0.0.0/8)") from e
        return v

    @model_validator(mode="after")
    def _png_quality(self) -> DownloadConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError("for encode_format png, encode_quality is the compression level 0-9 "
                             f"(got {self.encode_quality}); set it explicitly, e.g. 9")
        return self


@dataclass
class _Outcome:
    reason: str | None
    status: int | None = None
    image: bytes | None = None
    image_format: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    original_hash: str | None = None


@register
class Download(Stage[DownloadConfig]):
    """Download, check, resize and encode each row's image (img2dataset's options; reasons above)."""

    name = "download"
    Config = DownloadConfig
    stateful = True
    #: Batches one worker can usefully run at once: ``process`` is thread-safe and concurrent
    #: batches share the worker's event loop and download slots, so a runner that calls an actor
    #: from several threads overlaps one batch's slow tail with the next batch's downloads.
    batches_in_flight: ClassVar[int] = 4
    output_columns: ClassVar[dict[str, pa.DataType]] = {
        rows.IMAGE: pa.binary(),
        rows.IMAGE_FORMAT: pa.string(),
        "width": pa.int32(),
        "height": pa.int32(),
        "original_width": pa.int32(),
        "original_height": pa.int32(),
        rows.SHA256: pa.string(),
        "original_sha256": pa.string(),
        "http_status": pa.int32(),
    }

    def __init__(self, config: DownloadConfig) -> None:
        super().__init__(config)
        cfg = config
        self.cfg = cfg
        self.fetch_options = FetchOptions(
            timeout=cfg.timeout, retries=cfg.retries, retry_backoff=cfg.retry_backoff, max_bytes=cfg.max_bytes,
            max_redirects=cfg.max_redirects, user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=frozenset(d.strip().lower() for d in cfg.disallowed_header_directives),
            allow_private_networks=cfg.allow_private_networks, allowed_networks=tuple(cfg.allowed_networks),
            concurrency=cfg.concurrency_per_worker, per_host=cfg.max_connections_per_host,
            dns_ttl=cfg.dns_cache_ttl,
        )
        self.processor = ImageProcessor(ImageOptions(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            upscale_interpolation=cfg.upscale_interpolation, downscale_interpolation=cfg.downscale_interpolation,
            encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, skip_reencode=cfg.skip_reencode,
            disable_all_reencoding=cfg.disable_all_reencoding, min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio, max_pixels=cfg.max_pixels,
            jpeg_draft=cfg.jpeg_draft, fast_area=cfg.fast_area,
        ))
        # The original-bytes hash column is named after the chosen hash, as img2dataset names it.
        columns = {k: v for k, v in type(self).output_columns.items() if k != "original_sha256"}
        self.hash_column = f"original_{cfg.compute_hash}" if cfg.compute_hash else None
        if self.hash_column:
            columns[self.hash_column] = pa.string()
        self.output_columns = columns  # type: ignore[misc]
        self._loop: BackgroundLoop | None = None
        self._fetcher: Fetcher | None = None
        self._cpu: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._setup_lock = threading.Lock()
        self._inline_pixels = INLINE_MAX_PIXELS

    # ------------------------------------------------------------ lifecycle

    def setup(self, ctx: StageContext) -> None:
        """Start the worker's event loop, HTTP session and decode threads (once per actor)."""
        with self._setup_lock:
            if self._loop is None:
                # a worker with more than one CPU decodes everything in its threads, or it would use one
                self._inline_pixels = INLINE_MAX_PIXELS if ctx.num_cpus <= 1 else 0
                self._start()

    def _start(self) -> None:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from decode_threads; OpenCV's own pool would oversubscribe
        self._loop = BackgroundLoop(name=f"curate-{self.stage_name}")
        self._cpu = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="curate-decode")
        self._fetcher = Fetcher(self.fetch_options)
        self._loop.run(self._fetcher.start())
        # One cap for the worker: batches processed concurrently (actor max_concurrency > 1) share it.
        self._slots = asyncio.Semaphore(self.cfg.concurrency_per_worker)

    def teardown(self) -> None:
        """Close the session and stop the threads (the engine calls it when the worker is done)."""
        if self._loop is None:
            return
        if self._fetcher is not None:
            self._loop.run(self._fetcher.close())
        self._loop.close()
        if self._cpu is not None:
            self._cpu.shutdown(wait=True)
        self._loop = self._fetcher = self._cpu = self._slots = None

    # ------------------------------------------------------------ per batch

    def process(self, batch: pa.Table) -> StageResult:
        self.setup(self.ctx)
        assert self._loop is not None
        urls = batch.column(rows.URL).to_pylist() if rows.URL in batch.column_names else [None] * batch.num_rows
        expected = self._expected_hashes(batch)
        outcomes, first_at = self._loop.run(self._download_all(urls, expected))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("download batch of %d: %s", len(outcomes), dict(Counter(o.reason or "ok" for o in outcomes)))

        def col(attr: str, typ: pa.DataType) -> pa.Array:
            return pa.array([getattr(o, attr) for o in outcomes], typ)

        columns = {
            rows.IMAGE: col("image", pa.binary()),
            rows.IMAGE_FORMAT: col("image_format", pa.string()),
            "width": col("width", pa.int32()),
            "height": col("height", pa.int32()),
            "original_width": col("original_width", pa.int32()),
            "original_height": col("original_height", pa.int32()),
            rows.SHA256: col("sha256", pa.string()),
            "http_status": col("status", pa.int32()),
        }
        if self.hash_column:
            columns[self.hash_column] = col("original_hash", pa.string())
        # when this batch's first image was ready: the run's "first downloaded row" (manifest timings)
        columns[rows.FIRST_AT] = pa.array([first_at] * len(outcomes), pa.float64())
        return StageResult(columns=columns, drop=[o.reason for o in outcomes])

    def _expected_hashes(self, batch: pa.Table) -> list[str | None]:
        if self.cfg.verify_hash is None:
            return [None] * batch.num_rows
        column = self.cfg.verify_hash[0]
        # Sources carry input columns that clash with pipeline columns (e.g. sha256) as source_<name>.
        name = f"source_{column}" if column in rows.RESERVED else column
        if name not in batch.column_names:
            raise ValueError(f"download: verify_hash names column {column!r}, but the rows have "
                             f"{', '.join(c for c in batch.column_names if not rows.is_internal(c))}")
        return [None if v is None else str(v).strip().lower() for v in batch.column(name).to_pylist()]

    async def _download_all(self, urls: list[str | None], expected: list[str | None]
                            ) -> tuple[list[_Outcome], float | None]:
        """Every row's outcome, and when (epoch seconds) the first image was ready."""
        first: list[float] = []

        async def one(url: str | None, want: str | None) -> _Outcome:
            outcome = await self._one(url, want)
            if not first and outcome.image is not None:
                first.append(time.time())
            return outcome

        outcomes = await asyncio.gather(*(one(u, e) for u, e in zip(urls, expected, strict=True)))
        return list(outcomes), (first[0] if first else None)

    async def _one(self, url: str | None, expected: str | None) -> _Outcome:
        url = url.strip() if isinstance(url, str) else None
        if not url:
            return _Outcome("missing_url")
        assert self._slots is not None
        # The slot is held through decoding, so bodies waiting for a CPU are bounded by the
        # concurrency too (backpressure when CPU-bound, as img2dataset's semaphore does).
        async with self._slots:
            try:
                assert self._fetcher is not None
                fetched = await self._fetcher.fetch(url)
                if fetched.error is not None:
                    return _Outcome(fetched.error, status=fetched.status)
                head = self.processor.inspect(fetched.body or b"")  # the header only: microseconds
                if isinstance(head, ImageResult) or head.pixels <= self._inline_pixels:
                    return self._finish(fetched, expected, head)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._cpu, self._finish, fetched, expected, head)
            except Exception:  # noqa: BLE001 - one bad row must not take the batch down
                log.exception("download of %s failed unexpectedly", url)
                return _Outcome("internal_error")

    def _finish(self, fetched: FetchResult, expected: str | None, head: Header | ImageResult) -> _Outcome:
        """Hash check, decode, resize, encode (in the event loop's thread, or the decode threads for
        large images: see :data:`INLINE_MAX_PIXELS`)."""
        body = fetched.body or b""
        hashes: dict[str, str] = {}

        def digest(name: str) -> str:
            if name not in hashes:
                hashes[name] = hashlib.new(name, body).hexdigest()
            return hashes[name]

        if expected is not None and self.cfg.verify_hash is not None and digest(self.cfg.verify_hash[1]) != expected:
            return _Outcome("hash_mismatch", status=fetched.status)
        out = _Outcome(None, status=fetched.status,
                       original_hash=digest(self.cfg.compute_hash) if self.cfg.compute_hash else None)
        res = head if isinstance(head, ImageResult) else self.processor.finish(body, head)
        out.original_width, out.original_height = res.original_width, res.original_height
        if res.error is not None or res.image is None:
            out.reason = res.error or "encode_error"
            return out
        out.image, out.image_format, out.width, out.height = res.image, res.format, res.width, res.height
        out.sha256 = hashlib.sha256(res.image).hexdigest()
        return out
