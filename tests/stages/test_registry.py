"""Stages are found by the registry: every built-in module, and a plugin's stage added in one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import pytest

from curate.stages.base import Stage, StageConfig
from curate.stages.registry import register, stage_class, stage_classes
from tests.conftest import jpeg_bytes, write_recipe, write_tar

PLUGIN = '''
"""A stage from outside curate: the whole of it is this file."""
from typing import ClassVar, Literal

import pyarrow as pa

from curate.stages.base import Stage, StageConfig, StageContext, StageResult
from curate.stages.registry import register


class NoShoutingConfig(StageConfig):
    use: Literal["no_shouting"] = "no_shouting"
    max_upper_share: float = 0.5


@register
class NoShouting(Stage[NoShoutingConfig]):
    name = "no_shouting"
    Config = NoShoutingConfig
    output_columns: ClassVar[dict[str, pa.DataType]] = {"upper_share": pa.float32()}

    def setup(self, ctx: StageContext) -> None:
        self.limit = self.config.max_upper_share  # typed: Stage[NoShoutingConfig]

    def process(self, batch: pa.Table) -> StageResult:
        shares = []
        for c in batch["caption"].to_pylist():
            letters = [ch for ch in (c or "") if ch.isalpha()]
            shares.append(sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0)
        return StageResult(columns={"upper_share": pa.array(shares, pa.float32())},
                           drop=[("shouting" if s > self.limit else None) for s in shares])
'''


def test_every_builtin_module_registers_its_stage():
    import pkgutil

    import curate.stages as package

    modules = {m.name for m in pkgutil.iter_modules(package.__path__)} - {"base", "registry"}
    modules = {m for m in modules if not m.startswith("_")}
    assert modules == set(stage_classes())  # one file per stage, named after it
    for name, cls in stage_classes().items():
        assert cls.Config.model_fields["use"].default == name


def test_register_checks_the_config_pins_use_to_the_name():
    class WrongConfig(StageConfig):
        use: Literal["something_else"] = "something_else"

    class Wrong(Stage[WrongConfig]):
        name = "wrong_name"
        Config = WrongConfig

    with pytest.raises(TypeError, match='pin `use` to the stage\'s name, e.g. use: Literal\\["wrong_name"\\]'):
        register(Wrong)
    with pytest.raises(KeyError, match="unknown stage 'wrong_name'; known stages: caption_length"):
        stage_class("wrong_name")


def test_a_plugin_adds_a_stage_in_one_file_and_a_recipe_runs_it(tmp_path):
    """A package outside curate declares a `curate.stages` entry point; `curate run` finds its stage."""
    site = tmp_path / "site"
    (site / "shout_plugin").mkdir(parents=True)
    (site / "shout_plugin" / "__init__.py").write_text("")
    (site / "shout_plugin" / "no_shouting.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "shout_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[curate.stages]\nno_shouting = shout_plugin.no_shouting\n")

    captions = {"a": "a calm photo of a red bus", "b": "BUY NOW CHEAP SHOES", "c": "Two Dogs On A Beach"}
    tar = write_tar(tmp_path / "in" / "00000.tar",
                    [{"__key__": k, "jpg": jpeg_bytes(), "txt": c} for k, c in captions.items()])
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "source": {"path": str(tar)},
        "stages": [{"use": "no_shouting", "max_upper_share": 0.6}],
        "write": {"output": str(tmp_path / "out"), "formats": ["parquet"]},
    })
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "from curate.cli import main; main()", "run", str(recipe),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ledger = pq.read_table(tmp_path / "out" / "ledger" / "00000.parquet").to_pylist()
    by_key = {r["key"]: r for r in ledger}
    assert by_key["b"]["status"] == "dropped" and by_key["b"]["dropped_by"] == "no_shouting"
    assert by_key["b"]["reason"] == "shouting"
    assert by_key["a"]["status"] == by_key["c"]["status"] == "kept"
    assert by_key["c"]["upper_share"] == pytest.approx(5 / 15)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["no_shouting"]
    # the run's own clock, as a benchmark reads it
    t = manifest["timings"]
    assert 0 < t["first_row"] <= t["total"] and t["ray_start"] > 0 and len(t["phases"]) == 1


def test_without_the_plugin_the_recipe_names_the_unknown_stage(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", {"source": {"path": str(tmp_path / "x.tar")},
                                                     "stages": [{"use": "no_shouting"}]})
    proc = subprocess.run([sys.executable, "-c", "from curate.cli import main; main()", "validate", str(recipe),
                           "--no-check-input"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown stage 'no_shouting'" in proc.stderr and Path(recipe).name in proc.stderr


def test_the_registry_loads_every_stage_without_numba_or_torch():
    """Loading a recipe imports every stage module (the registry scans them all, for their configs);
    that must not import numba (0.25 s) or torch (seconds) in a process that runs neither, such as a
    download run's driver before its first image. The dedup kernels are imported when they run."""
    script = """
import json, sys
from curate.recipe import load_recipe
from curate.stages.registry import stage_classes
load_recipe("pipelines/download.yaml", overrides=[], input_path="x.parquet", output_path="out")
names = sorted(stage_classes())
heavy = [m for m in ("numba", "torch", "open_clip") if m in sys.modules]
from curate.stages.dedup_minhash import DedupMinhash
from curate.dedup.minhash import MinHashParams, signatures
signatures(["a cat on a mat"], MinHashParams())
print(json.dumps([names, heavy, "numba" in sys.modules]))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    names, heavy, numba_after = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"download", "dedup_minhash", "dedup_phash", "image_hash", "clip_score"} <= set(names)
    assert heavy == []
    assert numba_after  # the kernels are there when a dedup stage computes
