"""JPEG draft (DCT-domain scaled) decode vs a full decode: output quality on real photos, and CPU cost.

curate's download stage decodes a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's scaled IDCT,
OpenCV's ``IMREAD_REDUCED_*``) when the image is shrunk anyway, then resizes what is left with
``INTER_AREA``. The reference is img2dataset's path: full decode, ``INTER_AREA`` (curate's
default ``downscale_interpolation``) to the target. Everything else is equal: both go through
``ImageProcessor`` with the same options (default encode: JPEG quality 95), and the two final
JPEGs are decoded and compared (PSNR over all pixels and channels; SSIM from scikit-image),
on the resized picture only: ``border``'s white padding is identical in both and left out.

Sources are real photographs that installed packages ship (scikit-image's ``data``,
scikit-learn's sample images, matplotlib's ``grace_hopper.jpg``), re-encoded as JPEG
(OpenCV, 4:2:0) at qualities 75/90/95, at long sides from 512 to 4,000 px:

- ``native``: the photo downscaled with ``INTER_AREA`` to the long side (native detail kept);
  only sizes up to the photo's own size (the largest, retina, is 1411 px).
- ``upscaled``: the photo upscaled with Lanczos to the long side. These are smoother than a
  native photo of that size (no detail above the original's resolution), so they flatter
  the draft decode; they are listed apart for that reason.
- ``mosaic``: native pixels, no resampling: the photos tiled at their own size into a 4:3
  canvas of the long side. This keeps native detail at 1,600-4,000 px (and adds hard seams).

Each case runs every reduction r in (1, 2, 4, 8) that is legal for it (r=1 is the full
decode); which r a ``JPEG_DRAFT_GAP`` picks is then read off ``_jpeg_reduction``, so every gap
is evaluated on the same decodes. ms/image is the wall time of one ``ImageProcessor`` call
on one thread (``cv2.setNumThreads(1)``, as the download stage runs it), the minimum of
``--repeats`` calls; the machine is shared, so expect ±10 %.

    python benchmarks/jpeg_quality.py            # full table (a few minutes on 2 cores)
    python benchmarks/jpeg_quality.py --quick    # fewer sizes/photos
    python benchmarks/jpeg_quality.py --only area   # the fast area table alone (shrinks by 1.3-2x)

The second table checks the other cheaper path, the fast area shrink (``FAST_AREA_MIN``): a shrink
by 1.6-2x done as a 2x linear upscale and an exact 2:1 ``INTER_AREA`` (OpenCV's vectorised
integer-ratio path) instead of OpenCV's fractional ``INTER_AREA`` (scalar code), on full decodes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.net import image as I  # noqa: E402
from curate.net.image import ImageOptions, ImageProcessor, plan_resize  # noqa: E402

FLOOR_DB = 40.0


def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped by installed packages, as BGR (or gray) uint8."""
    import skimage.data as d
    out = {
        "astronaut": d.astronaut(), "coffee": d.coffee(), "chelsea": d.chelsea(), "rocket": d.rocket(),
        "retina": d.retina(), "hubble": d.hubble_deep_field(), "motorcycle": d.stereo_motorcycle()[0],
    }
    try:
        from sklearn.datasets import load_sample_images
        china, flower = load_sample_images().images
        out["china"], out["flower"] = china, flower
    except Exception:  # noqa: BLE001 - optional source
        pass
    try:
        import matplotlib.cbook as cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            out["grace_hopper"] = cv2.cvtColor(cv2.imdecode(np.frombuffer(f.read(), np.uint8), 1), cv2.COLOR_BGR2RGB)
    except Exception:  # noqa: BLE001
        pass
    bgr = {k: cv2.cvtColor(np.ascontiguousarray(v[..., :3]), cv2.COLOR_RGB2BGR) for k, v in out.items()}
    bgr["camera(gray)"] = d.camera()
    return bgr


def resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LANCZOS4)


def mosaic(tiles: list[np.ndarray], long_side: int, seed: int) -> np.ndarray:
    """Native-resolution photos tiled (row by row, in a shuffled order) into a 4:3 canvas."""
    w, h = long_side, long_side * 3 // 4
    canvas = np.zeros((h, w, 3), np.uint8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tiles))
    y = k = 0
    while y < h:
        x, row_h = 0, 0
        while x < w:
            t = tiles[order[k % len(order)]]
            k += 1
            th, tw = min(t.shape[0], h - y), min(t.shape[1], w - x)
            canvas[y:y + th, x:x + tw] = t[:th, :tw]
            x += tw
            row_h = max(row_h, th)
        y += row_h
    return canvas


def sources(sizes: list[int], names: list[str] | None) -> list[tuple[str, str, np.ndarray]]:
    """(kind, name, image) for every size: native where the photo is that large, else upscaled; mosaics."""
    ph = photos()
    if names:
        ph = {k: v for k, v in ph.items() if k in names}
    out = []
    color = [v for k, v in ph.items() if v.ndim == 3 and k != "hubble"]
    for L in sizes:
        for name, img in ph.items():
            kind = "native" if L <= max(img.shape[:2]) else "upscaled"
            out.append((kind, name, resize_long(img, L)))
        if L >= 1600 and len(color) >= 2:
            for seed in (0,):
                out.append(("mosaic", f"mosaic{seed}", mosaic(color, L, seed)))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity
    return float(structural_similarity(a, b, data_range=255, channel_axis=2 if a.ndim == 3 else None))


def content(img: np.ndarray, plan, opts: ImageOptions) -> np.ndarray:
    """The resized picture without ``border``'s padding (identical in both paths)."""
    if not plan.pad:
        return img
    w, h = plan.size
    s = opts.image_size
    top, left = max(0, (s - h) // 2), max(0, (s - w) // 2)
    return img[top:top + h, left:left + w]


def run_forced(data: bytes, opts: ImageOptions, r: int, repeats: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Curate's path with the JPEG reduction forced to r: the pixels handed to the final encode,
    the final image (its JPEG decoded) and the best-of-``repeats`` ms of the whole call."""
    saved = I._jpeg_reduction
    I._jpeg_reduction = lambda w, h, t: r
    try:
        return timed_call(replace(opts, fast_area=False, jpeg_draft=opts.jpeg_draft and r > 1), data, repeats)
    finally:
        I._jpeg_reduction = saved


def timed_call(opts: ImageOptions, data: bytes, repeats: int) -> tuple[np.ndarray, np.ndarray, float]:
    """One ``ImageProcessor`` call: the pixels it hands the final encode, the final image (its JPEG
    decoded) and the best-of-``repeats`` ms of the whole call."""
    saved_enc = cv2.imencode
    seen = []

    def imencode(ext, img, params=()):  # records what ImageProcessor encodes
        seen.append(img)
        return saved_enc(ext, img, params)

    cv2.imencode = imencode
    try:
        proc = ImageProcessor(opts)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = proc(data)
            best = min(best, time.perf_counter() - t0)
    finally:
        cv2.imencode = saved_enc
    assert res.error is None, res.error
    return seen[-1], cv2.imdecode(np.frombuffer(res.image, np.uint8), cv2.IMREAD_UNCHANGED), best * 1000


def legal_reductions(width: int, height: int, size: tuple[int, int]) -> list[int]:
    """Reductions that decode to at least the target (what any gap >= 1 may pick)."""
    return [r for r in (2, 4, 8) if math.ceil(width / r) >= size[0] and math.ceil(height / r) >= size[1]]


def gap_choice(width: int, height: int, size: tuple[int, int], gap: float) -> int:
    saved = I.JPEG_DRAFT_GAP
    I.JPEG_DRAFT_GAP = gap
    try:
        return I._jpeg_reduction(width, height, size)
    finally:
        I.JPEG_DRAFT_GAP = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024, 1600, 2400, 4000])
    ap.add_argument("--qualities", type=int, nargs="+", default=[75, 90, 95])
    ap.add_argument("--targets", type=int, nargs="+", default=[256, 384, 512])
    ap.add_argument("--mode", default="border", help="resize_mode (the download recipe's default: border)")
    ap.add_argument("--gaps", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0])
    ap.add_argument("--photos", nargs="*", help="only these photos")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="sizes 768 1600 4000, qualities 75 95")
    ap.add_argument("--only", choices=("draft", "area"), help="one table: the JPEG draft's or the fast area's")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.qualities = [768, 1600, 4000], [75, 95]
    cv2.setNumThreads(1)
    if args.only == "area":
        fast_area_table(args)
        return

    # one row per (case, r): kind, name, L, w, h, q, target, r, psnr, ssim, ms, ms_full
    rows = []
    srcs = sources(args.sizes, args.photos)
    t_start = time.perf_counter()
    for kind, name, img in srcs:
        h, w = img.shape[:2]
        L = max(h, w)
        for q in args.qualities:
            data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
            for target in args.targets:
                opts = ImageOptions(image_size=target, resize_mode=args.mode)
                plan = plan_resize(w, h, opts)
                if not plan.downscale or plan.size is None:
                    continue
                rs = legal_reductions(w, h, plan.size)
                if not rs:
                    continue
                ref_px, ref, ms_full = run_forced(data, opts, 1, args.repeats)
                ref_px, ref = content(ref_px, plan, opts), content(ref, plan, opts)
                enc = psnr(ref, ref_px)  # what the final JPEG encode alone costs, on the full path
                for r in rs:
                    px, out, ms = run_forced(data, opts, r, args.repeats)
                    px, out = content(px, plan, opts), content(out, plan, opts)
                    rows.append(dict(kind=kind, name=name, L=L, w=w, h=h, q=q, target=target, r=r,
                                     psnr=psnr(px, ref_px), psnr_out=psnr(out, ref), ssim=ssim(out, ref),
                                     enc=enc, ms=ms, ms_full=ms_full))
    print(f"# {len(srcs)} sources, {len(rows)} (case, reduction) pairs, {time.perf_counter() - t_start:.0f} s; "
          f"target mode {args.mode}; output JPEG q95; floor {FLOOR_DB:.0f} dB PSNR\n")

    # Per (kind, size, quality, target, r): the figures over the photos.
    groups = defaultdict(list)
    for row in rows:
        groups[(row["kind"], row["L"], row["q"], row["target"], row["r"])].append(row)
    print("| source | long side | quality | target | r | n | PSNR resized min / mean (dB) | PSNR final min | "
          "SSIM final min | encode's own PSNR min | ms draft | ms full | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (kind, L, q, target, r), g in sorted(groups.items()):
        ps = [x["psnr"] for x in g]
        worst = min(g, key=lambda x: x["psnr"])
        ms = statistics.median(x["ms"] for x in g)
        msf = statistics.median(x["ms_full"] for x in g)
        print(f"| {kind} | {L} | {q} | {target} | {r} | {len(g)} | {min(ps):.1f} ({worst['name']}) / "
              f"{statistics.mean(min(p, 99) for p in ps):.1f} | {min(x['psnr_out'] for x in g):.1f} | "
              f"{min(x['ssim'] for x in g):.4f} | {min(x['enc'] for x in g):.1f} | "
              f"{ms:.2f} | {msf:.2f} | {msf / ms:.2f}x |")

    # Per gap: which reduction each case gets, the worst case and the CPU saved over all cases.
    cases = defaultdict(dict)
    for row in rows:
        cases[(row["kind"], row["name"], row["L"], row["q"], row["target"])][row["r"]] = row
    print("\n| JPEG_DRAFT_GAP | cases | drafted | PSNR resized min (case) | cases < floor | PSNR final min | "
          "SSIM final min | total ms draft / full | speedup |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |")
    for gap in args.gaps:
        worst, worst_case, ssim_min, below, t_d, t_f, drafted = math.inf, "-", 1.0, 0, 0.0, 0.0, 0
        worst_out = math.inf
        for key, by_r in cases.items():
            any_row = next(iter(by_r.values()))
            plan = plan_resize(any_row["w"], any_row["h"], ImageOptions(image_size=key[4], resize_mode=args.mode))
            r = gap_choice(any_row["w"], any_row["h"], plan.size, gap)
            t_f += any_row["ms_full"]
            if r == 1:
                t_d += any_row["ms_full"]
                continue
            row = by_r[r]
            drafted += 1
            t_d += row["ms"]
            ssim_min = min(ssim_min, row["ssim"])
            worst_out = min(worst_out, row["psnr_out"])
            below += row["psnr"] < FLOOR_DB
            if row["psnr"] < worst:
                worst, worst_case = row["psnr"], f"{key[1]} {row['w']}x{row['h']} q{key[3]} -> {key[4]}, r{r}"
        print(f"| {gap:g} | {len(cases)} | {drafted} | {worst:.1f} dB ({worst_case}) | {below} | {worst_out:.1f} | "
              f"{ssim_min:.4f} | "
              f"{t_d:.0f} / {t_f:.0f} | {t_f / t_d:.2f}x |")

    if args.only != "draft":
        fast_area_table(args)


#: Shrink factors of the fast-area table: two below FAST_AREA_MIN (for contrast), the rest in the range.
AREA_FACTORS = (1.3, 1.5, 1.6, 1.65, 1.7, 1.8, 1.9, 1.99)


def fast_area_table(args: argparse.Namespace) -> None:
    """The fast area path (a 2x linear upscale + an exact 2:1 INTER_AREA, for shrinks by
    FAST_AREA_MIN-2x) against OpenCV's fractional INTER_AREA, img2dataset's path: sources a factor
    above each target (native detail: each photo INTER_AREA-shrunk from its own size, and a mosaic of
    native tiles), JPEG at each quality, full decode, the two paths forced; PSNR of the resized pixels
    and of the final q95 JPEGs, SSIM, and the whole ImageProcessor call's ms (best of --repeats)."""
    ph = photos()
    if args.photos:
        ph = {k: v for k, v in ph.items() if k in args.photos}
    color = [v for k, v in ph.items() if v.ndim == 3 and k != "hubble"]
    print(f"\n# fast area (FAST_AREA_MIN {I.FAST_AREA_MIN:g}) vs exact INTER_AREA, full decodes; "
          f"targets {args.targets}, JPEG q{args.qualities}, output JPEG q95")
    print("| factor | used | n | PSNR resized min (case) | PSNR final min | SSIM final min | ms fast / exact | speedup |")
    print("| ---: | --- | ---: | --- | ---: | ---: | --- | ---: |")
    for factor in AREA_FACTORS:
        worst, case, worst_out, ssim_min, t_fast, t_exact, n = math.inf, "-", math.inf, 1.0, 0.0, 0.0, 0
        for target in args.targets:
            L = round(target * factor)
            srcs = [(name, resize_long(img, L)) for name, img in ph.items() if max(img.shape[:2]) >= L]
            srcs.append(("mosaic", mosaic([resize_long(t, min(L, max(t.shape[:2]))) for t in color], L, 0)))
            for name, img in srcs:
                for q in args.qualities:
                    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
                    opts = ImageOptions(image_size=target, resize_mode=args.mode, jpeg_draft=False)
                    h, w = img.shape[:2]
                    plan = plan_resize(w, h, opts)
                    (fpx, fout, fms), (epx, eout, ems) = (
                        _forced_area(data, opts, fast, args.repeats) for fast in (True, False))
                    fpx, fout, epx, eout = (content(x, plan, opts) for x in (fpx, fout, epx, eout))
                    p = psnr(fpx, epx)
                    n += 1
                    t_fast += fms
                    t_exact += ems
                    worst_out = min(worst_out, psnr(fout, eout))
                    ssim_min = min(ssim_min, ssim(fout, eout))
                    if p < worst:
                        worst, case = p, f"{name} {w}x{h} q{q} -> {target}"
        used = "yes" if I.FAST_AREA_MIN <= factor < 2 else "no (exact)"
        print(f"| {factor:g} | {used} | {n} | {worst:.1f} dB ({case}) | {worst_out:.1f} | {ssim_min:.4f} | "
              f"{t_fast:.0f} / {t_exact:.0f} | {t_exact / t_fast:.2f}x |")
    print("(rows below FAST_AREA_MIN force the fast path to show why it stops there)")


def _forced_area(data: bytes, opts: ImageOptions, fast: bool, repeats: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Like :func:`run_forced` for the shrink: the fast area path forced on (whatever the factor) or off."""
    saved = I.FAST_AREA_MIN
    I.FAST_AREA_MIN = 1.0
    try:
        return timed_call(replace(opts, fast_area=fast), data, repeats)
    finally:
        I.FAST_AREA_MIN = saved


if __name__ == "__main__":
    main()
