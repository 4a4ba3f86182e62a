"""Shared fixtures: one local Ray for the whole session, tiny generated data, recipe helpers."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_ACCEPT_CALLABLE_CLASSES", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test session (about 3 s to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    yield ray


def jpeg_bytes(size=(32, 32), color=(200, 30, 30), quality=90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(size=(32, 32), color=(30, 200, 30, 255)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, Any]]) -> Path:
    """Write a WebDataset tar from dicts like {"__key__": k, "jpg": b, "txt": "cap", "json": {...}}."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            s = dict(s)
            if isinstance(s.get("txt"), str):
                s["txt"] = s["txt"].encode()
            if isinstance(s.get("json"), dict):
                s["json"] = json.dumps(s["json"]).encode()
            w.write(s)
    return path


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tmp_path):
    def _make(recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
        return write_recipe(tmp_path / name, recipe)

    return _make
