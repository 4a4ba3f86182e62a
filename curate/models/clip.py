"""Loading CLIP models through open_clip — real checkpoints and the project's own demo CLIP alike.

``load_clip(model, pretrained)`` accepts:

- an open_clip architecture and pretrained tag (``ViT-B-32``, ``datacomp_xl_s13b_b90k``), taken
  from the local Hugging Face / open_clip cache — never fetched silently: when it is not cached
  and the hub cannot be reached, :class:`~curate.errors.EnvironmentProblem` says what is missing
  and how to provide it (a model name or tag that does not exist is a
  :class:`~curate.errors.RecipeError`);
- an architecture and a local checkpoint file (``pretrained: /models/vit-l-14-dfn.pt``);
- ``curate-demo-clip``: a tiny CLIP trained by :mod:`curate.demo.train_clip` on the demo
  world, shipped in ``curate/models/weights/``, loaded through the same
  ``open_clip.create_model_and_transforms`` call as any checkpoint (a custom model config
  registered with ``open_clip.add_model_config`` plus a local file).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from curate.errors import EnvironmentProblem, RecipeError

log = logging.getLogger(__name__)

DEMO_MODEL = "curate-demo-clip"
HERE = Path(__file__).resolve().parent
CONFIG_DIR = HERE / "configs"
DEMO_WEIGHTS = HERE / "weights" / f"{DEMO_MODEL}.pt"


def register_configs() -> None:
    """Make the project's own model configs known to open_clip (idempotent)."""
    import open_clip

    if DEMO_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


@functools.cache
def config_names() -> frozenset[str] | None:
    """The architectures open_clip knows, read from its config files as ``open_clip.list_models()``
    does (a JSON with ``embed_dim``, ``vision_cfg`` and ``text_cfg``), without importing open_clip:
    that import brings torch, torchvision and transformers, 6.8-7.4 s here, which a driver that only
    checks a recipe never needs. None when open_clip is not installed where expected. Read once per
    process (145 files, ~13 ms): every check and every model load asks."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    names: set[str] = set()
    for folder in [Path(loc) / "model_configs" for loc in spec.submodule_search_locations] + [CONFIG_DIR]:
        for path in folder.glob("*.json"):
            try:
                cfg = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                names.add(path.stem)
    return frozenset(names) or None


def resolve_checkpoint(model: str, pretrained: str | None) -> str | None:
    """The local file or cached tag to load; raise a clear error when it is not available offline.

    A known architecture with a local checkpoint file (or the demo CLIP) is answered from files
    alone (:func:`config_names`); a pretrained tag needs open_clip's own tables, so it imports it."""
    demo = model == DEMO_MODEL and pretrained in (None, "", "demo")
    local = demo or (pretrained not in (None, "") and os.path.isfile(os.path.expanduser(pretrained)))
    if local and model in (config_names() or ()):
        return _demo_weights() if demo else os.path.expanduser(pretrained)
    import open_clip

    register_configs()
    if model not in open_clip.list_models():
        raise RecipeError(
            f"unknown open_clip model {model!r}; see open_clip.list_models() "
            f"(e.g. ViT-B-32, ViT-L-14) or use {DEMO_MODEL!r}")
    if demo:
        return _demo_weights()
    if pretrained in (None, ""):
        raise RecipeError(f"clip model {model!r} needs `pretrained:` (a tag such as "
                          f"{_tags(model)[:3]} or a local checkpoint path); random weights are never used")
    if os.path.exists(os.path.expanduser(pretrained)):
        return os.path.expanduser(pretrained)
    if pretrained not in _tags(model):
        # a checkpoint file this machine lacks, or a tag that does not exist (a recipe mistake)
        kind = EnvironmentProblem if _looks_like_path(pretrained) else RecipeError
        raise kind(f"{pretrained!r} is neither a file nor a pretrained tag of {model!r} "
                   f"(tags: {', '.join(_tags(model)) or 'none'})")
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not _cached(cfg):
        raise EnvironmentProblem(
            f"CLIP checkpoint {model}/{pretrained} is not in the local cache and this machine cannot "
            "download it. On a machine with internet run "
            f"`python -c \"import open_clip; open_clip.create_model_and_transforms('{model}', pretrained='{pretrained}')\"` "
            "and copy ~/.cache/huggingface (or set HF_HOME) here, or set `pretrained:` to a local checkpoint file.")
    return pretrained


def _demo_weights() -> str:
    if not DEMO_WEIGHTS.exists():
        raise EnvironmentProblem(f"the demo CLIP checkpoint {DEMO_WEIGHTS} is missing; "
                                 "train it with `python -m curate.demo.train_clip`")
    return str(DEMO_WEIGHTS)


def _looks_like_path(pretrained: str) -> bool:
    """A checkpoint file rather than a tag: tags are bare names such as ``datacomp_xl_s13b_b90k``."""
    return "/" in pretrained or os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _tags(model: str) -> list[str]:
    import open_clip

    return [t for m, t in open_clip.list_pretrained() if m == model]


def _cached(cfg: dict[str, Any]) -> bool:
    """Whether a pretrained config's file is already in the Hugging Face cache."""
    hub = cfg.get("hf_hub")
    if not hub:
        url = cfg.get("url", "")
        cache = Path(os.path.expanduser("~/.cache/clip"))
        return bool(url) and (cache / os.path.basename(url)).exists()
    try:
        from huggingface_hub import try_to_load_from_cache

        repo = hub.rstrip("/")
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, name), str):
                return True
    except Exception:  # noqa: BLE001 - any cache probing problem means "not cached"
        return False
    return False


def load_clip(model: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32"):
    """Return (model, preprocess, tokenizer) in eval mode on ``device``."""
    import open_clip

    ckpt = resolve_checkpoint(model, pretrained)
    register_configs()  # the demo CLIP's architecture (resolve_checkpoint may not have imported open_clip)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # cached tags load without touching the network

    def create():
        return open_clip.create_model_and_transforms(model, pretrained=ckpt, device=device, precision=precision)

    from torch.utils.serialization import config as torch_load_config

    try:
        # The checkpoint's tensors are mapped from the file (torch.load's mmap, copy-on-write) and
        # copied once into the model, instead of first being read into fresh memory: one actor per
        # CPU loading a 600 MB ViT-B-32 each, two at once took ~2 s for torch.load alone, 0.02 s mapped.
        with torch_load_config.patch({"load.mmap": True}):
            clip, _, preprocess = create()
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        clip, _, preprocess = create()  # a checkpoint in torch's legacy (non-zip) format cannot be mapped
    clip.eval()
    return clip, preprocess, open_clip.get_tokenizer(model)


def assigned_cpus() -> int:
    """CPUs Ray gave this worker (Ray sets OMP threads to 1); outside Ray, every core."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    except Exception:  # noqa: BLE001 - outside a Ray worker: one thread per core is torch's own default
        pass
    return os.cpu_count() or 1


def load_clip_for_worker(model: str, pretrained: str | None, device: str = "auto", precision: str = "auto"):
    """:func:`load_clip` with ``auto`` resolved (GPU and fp16 when there is one) and torch's CPU
    threads set to what this worker was given. Returns (model, preprocess, tokenizer, device, dtype)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    if device == "cpu":
        torch.set_num_threads(assigned_cpus())
    clip, preprocess, tokenizer = load_clip(model, pretrained, device, precision)
    return clip, preprocess, tokenizer, device, next(clip.parameters()).dtype


def preprocess_images(images: list[bytes | None], preprocess) -> tuple[list[int], list[Any], list[str | None]]:
    """Decode and preprocess a batch's image bytes: (indices that decoded, their tensors, drop reason per row)."""
    import io

    from PIL import Image

    ok: list[int] = []
    tensors: list[Any] = []
    drop: list[str | None] = [None] * len(images)
    for i, data in enumerate(images):
        if data is None:
            drop[i] = "image_missing"
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                tensors.append(preprocess(im.convert("RGB")))
            ok.append(i)
        except Exception:  # noqa: BLE001 - any decoder failure is a per-row drop
            drop[i] = "image_decode_error"
    return ok, tensors, drop
