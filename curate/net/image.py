"""Decode, check, resize and encode one downloaded image — img2dataset's resizer, in OpenCV.

The semantics mirror img2dataset 1.47 (``resizer.py``), which users' settings
and expectations are built on:

- ``resize_mode``: ``no``; ``keep_ratio`` (shorter side → ``image_size``);
  ``center_crop`` (keep_ratio, then a centred ``image_size`` square);
  ``keep_ratio_largest`` (longer side → ``image_size``); ``border`` (keep_ratio_largest,
  then white padding to an ``image_size`` square). New sizes are ``round(side * scale)``
  as albumentations' Smallest/LongestMaxSize compute them.
- ``resize_only_if_bigger``: leave images that would be upscaled alone (no pad, no crop).
- ``area`` interpolation to downscale, ``lanczos`` to upscale; RGBA is composited onto white;
  EXIF orientation is ignored (as ``IMREAD_UNCHANGED`` does).
- ``min_image_size`` (shorter side), ``max_image_area``, ``max_aspect_ratio``.

What is added: content sniffing by magic bytes (an HTML page labelled
``image/jpeg`` is ``not_an_image``, a JPEG labelled ``text/plain`` is a JPEG), a
pixel limit read from the header *before* decoding (``decompression_bomb``), the
size filters applied from the header too (a filtered image is never decoded),
and JPEG DCT-domain downscaling at decode time (``IMREAD_REDUCED_*``) when the
image is shrunk by 5x or more anyway (``JPEG_DRAFT_GAP``), resized on the full decode's pixel grid:
within 40 dB PSNR of img2dataset's full decode + INTER_AREA on real photos, at 2-5x less CPU
for large sources; and shrinks by 1.6-2x (``FAST_AREA_MIN``, web photos to 256 px) done as a 2x
linear upscale + an exact 2:1 INTER_AREA, half the resize's CPU, its final JPEGs within 41.9 dB
PSNR of INTER_AREA's on real photos (benchmarks/jpeg_quality.py, both tables).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

#: Reasons img2dataset counts as ``failed_to_resize`` (a download that arrived but is no usable
#: image); every other reason of the download stage is ``failed_to_download``.
FAILED_TO_RESIZE = frozenset({
    "not_an_image", "decode_error", "decompression_bomb", "image_too_small", "image_too_large_area",
    "image_aspect_ratio", "encode_error",
})

log = logging.getLogger(__name__)

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
EncodeFormat = Literal["jpg", "png", "webp"]
Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
    "lanczos4": cv2.INTER_LANCZOS4,
}
_ENCODE_PARAM = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION,
                 "webp": cv2.IMWRITE_WEBP_QUALITY}

#: Pillow's own decompression-bomb threshold (~0.25 GiB of RGB): no real photo comes close.
DEFAULT_MAX_PIXELS = 89_478_485
#: Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's scaled IDCT) only while it stays at least
#: this many times the target size, then INTER_AREA the rest of the way. The scaled IDCT is a
#: sharper filter than INTER_AREA's box, so the remaining resize must average its difference away.
#: Measured on real photos (benchmarks/jpeg_quality.py: 512-4000 px, JPEG q75/90/95, targets
#: 256/384/512) against img2dataset's full decode + INTER_AREA, resized pixels: gap 1 -> 31.2 dB
#: PSNR at worst, 1.5 -> 36.8, 2 -> 42.5 (38.8 on a native-detail mosaic just above the 2x
#: margin), 2.5 -> 45.1 (42.1 on that mosaic). 2.5 is the cheapest setting that keeps >= 40 dB on
#: every case; it still saves 2.2x of the CPU over the benchmark (3-5x on 2,400-4,000 px sources).
JPEG_DRAFT_GAP = 2.5
#: Shrinks by a factor in [FAST_AREA_MIN, 2) on both axes are done as a linear upscale to twice the
#: target and an exact 2:1 INTER_AREA (OpenCV's vectorised integer path) instead of OpenCV's
#: fractional INTER_AREA, which is scalar code: 2x less CPU for the resize (0.8 against 1.6 ms for a
#: 500 px photo to 256 px on the 2-core test machine), the image path's largest cost at web sizes.
#: Against the exact INTER_AREA, on real photos (benchmarks/jpeg_quality.py, fast-area table;
#: targets 256/384/512, JPEG q75/90/95) the final q95 JPEGs are at >= 41.9 dB PSNR from a factor of
#: 1.6 (1.5: 39.5 dB; 1.02: 38.9 dB — the box of the upscaled grid blurs more than a shrink that
#: small does), and the margin grows toward 2 (44.9 dB at 1.99).
FAST_AREA_MIN = 1.6
WHITE = (255, 255, 255, 255)

# We enforce our own pixel limit from the header; Pillow's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Sniffed format → (Pillow format name, file extension used when bytes are kept as they are).
FORMATS: dict[str, tuple[str, str]] = {
    "jpeg": ("JPEG", "jpg"),
    "png": ("PNG", "png"),
    "gif": ("GIF", "gif"),
    "webp": ("WEBP", "webp"),
    "bmp": ("BMP", "bmp"),
    "tiff": ("TIFF", "tiff"),
    "ico": ("ICO", "ico"),
    "avif": ("AVIF", "avif"),
}
_AVIF_BRANDS = (b"avif", b"avis")


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes, or None if they are not an image we decode.

    >>> sniff(b"\\xff\\xd8\\xff\\xe0rest"), sniff(b"<!doctype html>")
    ('jpeg', None)
    """
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(data) > 26:
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ico"
    if head[4:8] == b"ftyp" and head[8:12] in _AVIF_BRANDS:
        return "avif"
    return None


@dataclass(frozen=True)
class ImageOptions:
    """img2dataset's resizer options (same names and defaults), plus ``max_pixels``, ``jpeg_draft`` and
    ``fast_area`` (the two cheaper paths of equal quality: :data:`JPEG_DRAFT_GAP`, :data:`FAST_AREA_MIN`)."""

    image_size: int = 256
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    encode_format: EncodeFormat = "jpg"
    encode_quality: int = 95
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    min_image_size: int = 0
    max_image_area: float | None = None
    max_aspect_ratio: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = True
    fast_area: bool = True


@dataclass
class ImageResult:
    """The encoded image and its sizes, or ``error`` (a ledger reason) and whatever was known."""

    image: bytes | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Header:
    """What :meth:`ImageProcessor.inspect` read from an image's header."""

    fmt: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class ResizePlan:
    """What happens to an image of a given size: resize to ``size`` (w, h), then pad or crop."""

    size: tuple[int, int] | None
    downscale: bool
    pad: bool
    crop: bool


def plan_resize(width: int, height: int, opts: ImageOptions) -> ResizePlan:
    """Output geometry for ``width`` x ``height``, computed as img2dataset/albumentations do."""
    mode, s = opts.resize_mode, opts.image_size
    if mode == "no":
        return ResizePlan(None, False, False, False)
    by_short = mode in ("keep_ratio", "center_crop")
    side = min(width, height) if by_short else max(width, height)
    downscale = side > s
    if opts.resize_only_if_bigger and not downscale:
        return ResizePlan(None, False, False, False)
    scale = s / float(side)
    size = (width, height) if scale == 1.0 else (round(width * scale), round(height * scale))
    return ResizePlan(size, downscale, pad=mode == "border", crop=mode == "center_crop")


class ImageProcessor:
    """Turns downloaded bytes into the output image; thread-safe (holds only options).

    >>> from curate.net.image import ImageProcessor, ImageOptions
    >>> ImageProcessor(ImageOptions(image_size=64))(open("cat.jpg", "rb").read()).width  # doctest: +SKIP
    64
    """

    def __init__(self, opts: ImageOptions) -> None:
        if opts.encode_format == "png" and not 0 <= opts.encode_quality <= 9:
            raise ValueError(f"for png, encode_quality is the compression level 0-9, got {opts.encode_quality}")
        self.opts = opts
        self.up = INTERPOLATIONS[opts.upscale_interpolation]
        self.down = INTERPOLATIONS[opts.downscale_interpolation]
        self.encode_ext = "." + opts.encode_format
        self.encode_params = [int(_ENCODE_PARAM[opts.encode_format]), int(opts.encode_quality)]

    def __call__(self, data: bytes) -> ImageResult:
        head = self.inspect(data)
        return head if isinstance(head, ImageResult) else self.finish(data, head)

    def inspect(self, data: bytes) -> Header | ImageResult:
        """The image's header, or the result already decided from it (a refusal, or the bytes kept
        as they are): format sniffing and Pillow's header parse only, tens of microseconds."""
        fmt = sniff(data)
        if fmt is None:
            return ImageResult(error="not_an_image")
        try:
            with Image.open(io.BytesIO(data), formats=[FORMATS[fmt][0]]) as im:
                width, height = im.size
                mode = im.mode
        except Image.DecompressionBombError:
            return ImageResult(error="decompression_bomb")
        except Exception:  # noqa: BLE001 - any header Pillow cannot parse is a corrupt image
            return ImageResult(error="decode_error")
        res = ImageResult(original_width=width, original_height=height)
        o = self.opts
        if width <= 0 or height <= 0:
            res.error = "decode_error"
        elif width * height > o.max_pixels:
            res.error = "decompression_bomb"
        elif min(width, height) < o.min_image_size:
            res.error = "image_too_small"
        elif o.max_image_area is not None and width * height > o.max_image_area:
            res.error = "image_too_large_area"
        elif o.max_aspect_ratio is not None and max(width, height) / min(width, height) > o.max_aspect_ratio:
            res.error = "image_aspect_ratio"
        if res.error:
            return res
        if o.disable_all_reencoding:
            res.image, res.format, res.width, res.height = data, FORMATS[fmt][1], width, height
            return res
        return Header(fmt, width, height, mode)

    def finish(self, data: bytes, head: Header) -> ImageResult:
        """Decode, resize and encode an image whose header :meth:`inspect` accepted."""
        fmt, width, height, mode, o = head.fmt, head.width, head.height, head.mode, self.opts
        res = ImageResult(original_width=width, original_height=height)
        plan = plan_resize(width, height, o)
        img, r = self._decode(data, fmt, mode, width, height, plan)
        if img is None:
            res.error = "decode_error"
            return res
        img, changed = _to_8bit_bgr_or_gray(img)
        if plan.size is not None:
            if r > 1:
                img = _resize_reduced(img, width, height, r, plan.size, self.down)
            elif (img.shape[1], img.shape[0]) != plan.size:
                img = self._shrink(img, plan.size) if plan.downscale else \
                    cv2.resize(img, plan.size, interpolation=self.up)
            if plan.pad:
                img = _pad_to(img, o.image_size)
            elif plan.crop:
                img = _center_crop(img, o.image_size)
            changed = True
        res.height, res.width = img.shape[:2]
        if o.skip_reencode and not changed and FORMATS[fmt][1] == o.encode_format:
            res.image, res.format = data, o.encode_format
            return res
        try:
            ok, buf = cv2.imencode(self.encode_ext, img, self.encode_params)
        except cv2.error:
            ok = False
        if not ok:
            res.error = "encode_error"
            return res
        res.image, res.format = buf.tobytes(), o.encode_format
        return res

    def _shrink(self, img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Downscale a full decode to ``size`` (see :data:`FAST_AREA_MIN` for the fast path)."""
        w, h = size
        if self.opts.fast_area and self.down == cv2.INTER_AREA \
                and FAST_AREA_MIN * w <= img.shape[1] < 2 * w and FAST_AREA_MIN * h <= img.shape[0] < 2 * h:
            img = cv2.resize(img, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(img, size, interpolation=self.down)

    def _decode(self, data: bytes, fmt: str, mode: str, width: int, height: int,
                plan: ResizePlan) -> tuple[np.ndarray | None, int]:
        """The decoded image and the JPEG scale denominator it was decoded at (1: full size)."""
        flags, r = cv2.IMREAD_UNCHANGED, 1
        if fmt == "jpeg" and self.opts.jpeg_draft and plan.downscale and plan.size is not None:
            r = _jpeg_reduction(width, height, plan.size)
            if r > 1:
                flags = _REDUCED[(r, mode == "L")] | cv2.IMREAD_IGNORE_ORIENTATION
        buf = np.frombuffer(data, np.uint8)
        try:
            img = cv2.imdecode(buf, flags)
        except cv2.error:
            img = None
        if img is None or img.size == 0:
            img, r = _pil_decode(data), 1
        elif r > 1 and img.shape[:2] != (-(-height // r), -(-width // r)):
            r = 1  # not the scaled decode we asked for: resize it as a full-size image
        return img, r


_REDUCED = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def _jpeg_reduction(width: int, height: int, target: tuple[int, int]) -> int:
    """Largest JPEG DCT scale denominator (8, 4, 2) that keeps the decode >= GAP x target."""
    tw, th = target
    for r in (8, 4, 2):
        if width / r >= tw * JPEG_DRAFT_GAP and height / r >= th * JPEG_DRAFT_GAP:
            return r
    return 1


def _resize_reduced(img: np.ndarray, width: int, height: int, r: int, size: tuple[int, int],
                    interpolation: int) -> np.ndarray:
    """Resize a 1/r-scale decode of a ``width`` x ``height`` JPEG to ``size`` on the full decode's grid.

    The decode is ``ceil(width / r)`` wide: its last column stands for only ``width % r`` source
    columns. Resizing it to ``size`` as it is would stretch the picture by up to (r-1)/r of a
    source pixel at the far edge (a third of an output pixel for 655 -> 218 px at r=2, -5 to
    -10 dB PSNR against the full path on detailed photos). Scaling by the exact source ratio
    (``size * r / width``) and cropping the partial edge maps every output pixel to the same
    source area as img2dataset's full decode + resize does.
    """
    tw, th = size
    fx, fy = tw * r / width, th * r / height
    if fx == 1.0 and fy == 1.0:
        return img
    out = cv2.resize(img, None, fx=fx, fy=fy, interpolation=interpolation)
    if out.shape[0] < th or out.shape[1] < tw:  # cannot happen (the decode covers the source); be safe
        return cv2.resize(img, size, interpolation=interpolation)
    return np.ascontiguousarray(out[:th, :tw])


def _pil_decode(data: bytes) -> np.ndarray | None:
    """Fallback for what OpenCV cannot decode (e.g. AVIF, ICO): Pillow, first frame, as BGR(A)/gray."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("1", "L", "I;16", "I"):
                return np.asarray(im.convert("L"))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                return cv2.cvtColor(np.asarray(im.convert("RGBA")), cv2.COLOR_RGBA2BGRA)
            return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except Exception:  # noqa: BLE001 - undecodable: the caller reports decode_error
        return None


def _to_8bit_bgr_or_gray(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """8-bit gray or BGR; alpha composited onto white as img2dataset does. Returns (img, changed)."""
    changed = False
    if img.dtype == np.uint16:
        img, changed = (img >> 8).astype(np.uint8), True
    elif img.dtype != np.uint8:
        img, changed = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8), True
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 1:
            img = img[:, :, 0]
        elif channels == 2:
            img, changed = img[:, :, 0], True
        elif channels == 4:
            alpha = img[:, :, 3:4]
            if alpha.min() == 255:
                img = np.ascontiguousarray(img[:, :, :3])
            else:
                a = alpha.astype(np.float32)
                out = img[:, :, :3].astype(np.float32) * (a / 255.0) + (255.0 - a)
                img = np.rint(np.clip(out, 0, 255)).astype(np.uint8)
            changed = True
    return img, changed


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Centre ``img`` on a white ``size`` square (albumentations PadIfNeeded, constant border)."""
    h, w = img.shape[:2]
    if h >= size and w >= size:
        return img
    top = max(0, (size - h) // 2)
    left = max(0, (size - w) // 2)
    bottom = max(0, size - h - top)
    right = max(0, size - w - left)
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=WHITE)


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = min(size, h), min(size, w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])
