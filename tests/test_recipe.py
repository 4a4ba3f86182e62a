"""Recipe loading: presets, overrides and errors that name file, line and key."""

from __future__ import annotations

import pytest

from curate.errors import RecipeError
from curate.recipe import load_recipe

BASE = """\
source:
  path: data/urls.parquet
stages:
  - use: caption_length
    min_words: 2
write:
  output: out
"""


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_recipe_loads_with_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, BASE))
    assert r.source.path == "data/urls.parquet"
    assert r.stages[0].use == "caption_length" and r.stages[0].min_words == 2
    assert r.write.samples_per_shard == 10000
    assert r.write.formats == ["webdataset", "parquet"]


def test_unknown_key_names_file_line_and_path(tmp_path):
    p = _write(tmp_path, BASE.replace("    min_words: 2", "    min_words: 2\n    max_wrods: 9"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}:6: stages[0].max_wrods: unknown key"


def test_wrong_type_is_reported_with_value(tmp_path):
    p = _write(tmp_path, BASE.replace("min_words: 2", "min_words: many"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.line == 5 and e.value.key == "stages[0].min_words"
    assert "'many'" in str(e.value)


def test_missing_source_is_an_error(tmp_path):
    p = _write(tmp_path, "stages: []\nwrite:\n  output: x\n")
    with pytest.raises(RecipeError, match="source: required key is missing"):
        load_recipe(p)


def test_unknown_stage_lists_known_ones(tmp_path):
    p = _write(tmp_path, BASE.replace("use: caption_length", "use: caption_lenght"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.line == 4 and e.value.key == "stages[0].use"
    assert "caption_length" in str(e.value)


def test_top_level_typo(tmp_path):
    p = _write(tmp_path, BASE + "runtme:\n  num_cpus: 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.line == 8 and e.value.key == "runtme"


def test_invalid_yaml_names_line(tmp_path):
    p = _write(tmp_path, "source:\n  path: [unclosed\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "invalid YAML" in str(e.value) and e.value.file == str(p)


def test_yaml_tags_are_not_executed(tmp_path):
    p = _write(tmp_path, "source: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_set_overrides_and_cli_paths(tmp_path):
    p = _write(tmp_path, BASE)
    r = load_recipe(p, overrides=["write.samples_per_shard=500", "stages.0.max_words=30"],
                    input_path="other.csv", output_path="elsewhere")
    assert r.write.samples_per_shard == 500
    assert r.stages[0].max_words == 30
    assert r.source.path == "other.csv" and r.write.output == "elsewhere"


def test_bad_set_value_names_the_override(tmp_path):
    p = _write(tmp_path, BASE)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides=["write.samples_per_shard=zero"])
    assert e.value.file == "--set write.samples_per_shard=zero"
    assert e.value.key == "write.samples_per_shard"


def test_cross_field_validation(tmp_path):
    p = _write(tmp_path, BASE.replace("min_words: 2", "min_words: 5\n    max_words: 2"))
    with pytest.raises(RecipeError, match="max_words must be >= min_words"):
        load_recipe(p)


def test_preset_is_spliced(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "short.yaml").write_text("stages:\n  - use: caption_length\n    max_words: 3\n")
    monkeypatch.setenv("CURATE_FILTERS_PATH", str(presets))
    p = _write(tmp_path, BASE.replace("  - use: caption_length\n    min_words: 2", "  - preset: short"))
    r = load_recipe(p)
    assert [s.use for s in r.stages] == ["caption_length"] and r.stages[0].max_words == 3


def test_preset_error_points_into_the_preset_file(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bad.yaml").write_text("stages:\n  - use: caption_length\n    max_words: -1\n")
    monkeypatch.setenv("CURATE_FILTERS_PATH", str(presets))
    p = _write(tmp_path, BASE.replace("  - use: caption_length\n    min_words: 2", "  - preset: bad"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.file == str(presets / "bad.yaml") and e.value.line == 3


def test_unknown_preset(tmp_path):
    p = _write(tmp_path, BASE.replace("  - use: caption_length\n    min_words: 2", "  - preset: nope"))
    with pytest.raises(RecipeError, match="unknown preset 'nope'"):
        load_recipe(p)


def test_duplicate_stage_names_need_name(tmp_path):
    p = _write(tmp_path, BASE + "  - use: caption_length\n")
    p = _write(tmp_path, BASE.replace("write:", "  - use: caption_length\nwrite:"))
    with pytest.raises(RecipeError, match="used twice"):
        load_recipe(p)
    ok = _write(tmp_path, BASE.replace("write:", "  - use: caption_length\n    name: again\nwrite:"), "ok.yaml")
    assert [s.name for s in load_recipe(ok).stages] == [None, "again"]


def test_fingerprint_ignores_output_and_runtime(tmp_path):
    p = _write(tmp_path, BASE)
    a = load_recipe(p, output_path="a", overrides=["runtime.num_cpus=1"])
    b = load_recipe(p, output_path="b")
    c = load_recipe(p, overrides=["stages.0.min_words=3"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_set_into_a_scalar_is_a_recipe_error(tmp_path):
    p = _write(tmp_path, BASE)
    with pytest.raises(RecipeError, match="source.path is not a mapping"):
        load_recipe(p, overrides=["source.path.x=1"])


def test_duplicate_name_after_a_preset_points_at_the_recipe_entry(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "two.yaml").write_text("stages:\n  - use: caption_length\n    name: a\n  - use: caption_length\n")
    monkeypatch.setenv("CURATE_FILTERS_PATH", str(presets))
    p = _write(tmp_path, "source:\n  path: x.parquet\nstages:\n  - preset: two\n  - use: caption_length\n"
                         "    name: a\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert e.value.file == str(p) and e.value.line == 5 and e.value.key == "stages[1]"
