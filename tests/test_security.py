"""Security review of what curate consumes: tar member paths, YAML tags, pickles, HTML, API keys.

Each test feeds the hostile input through the real component a user would run (the
runner on the shared Ray, the recipe loader, the report writer, ``curate run`` in a
subprocess) and checks the damage that input aims at did not happen.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate
from curate.errors import RecipeError
from curate.fsutil import safe_member_path
from curate.recipe import load_recipe
from curate.runner import run
from tests.conftest import jpeg_bytes, write_recipe

SCRIPT = "<script>alert(1)</script>"
ATTR_BREAK = '"><img src=x onerror=alert(2)>'


# ------------------------------------------------------------------ (a) tar members


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **kind) -> None:
    info = tarfile.TarInfo(name)
    for k, v in kind.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _meta(i: int, url: str | None = None) -> bytes:
    return json.dumps({"url": url or f"http://example.test/{i}.jpg", "origin": f"o{i}"}).encode()


def hostile_tar(path: Path) -> Path:
    """One tar with every kind of member a hostile WebDataset shard can hold, and hostile text."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        samples = [("/etc/evil", "an absolute path sample"), ("../../x", "a parent path sample"),
                   ("a/../../b", "a nested parent path sample"), ("good", "a good plain sample"),
                   ("xss", SCRIPT), ("attr", ATTR_BREAK)]
        for i, (key, caption) in enumerate(samples):
            _add(tar, f"{key}.jpg", jpeg_bytes(color=(10 * i, 50, 50)))
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", _meta(i, ATTR_BREAK if key == "attr" else None))
        _add(tar, "link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "link.txt", b"a symbolic link sample")
        _add(tar, "hard.jpg", type=tarfile.LNKTYPE, linkname="good.jpg")
        _add(tar, "hard.txt", b"a hard link sample")
        _add(tar, "dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add(tar, "dev.txt", b"a character device sample")
        _add(tar, "fifo.jpg", type=tarfile.FIFOTYPE)
        _add(tar, "fifo.txt", b"a fifo sample")
        _add(tar, "somedir", type=tarfile.DIRTYPE)
    return path


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, ray_session):
    """A real run over the hostile tar: source → caption_length → outputs, ledger, report."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "in").mkdir()
    hostile_tar(root / "in" / "0.tar")
    recipe = write_recipe(root / "recipe.yaml", {
        "source": {"path": str(root / "in")},
        "stages": [{"use": "caption_length", "min_words": 3}],  # drops the one-word SCRIPT caption
        "write": {"output": str(root / "out")},
    })
    manifest = run(load_recipe(recipe))
    ledger = pq.read_table(root / "out" / "ledger" / "00000.parquet")
    return root, manifest, {r["key"]: r for r in ledger.to_pylist()}


def test_tar_member_paths_become_safe_keys_and_links_devices_are_dropped(hostile_run):
    root, manifest, ledger = hostile_run
    assert manifest.counts.input == 10
    assert sorted(ledger) == sorted(["etc/evil", "_/_/x", "a/_/_/b", "good", "xss", "attr",
                                     "link", "hard", "dev", "fifo"])
    reasons = {k: (r["status"], r["dropped_by"], r["reason"]) for k, r in ledger.items()}
    assert reasons["link"] == ("dropped", "source", "tar_link_member")
    assert reasons["hard"] == ("dropped", "source", "tar_link_member")
    assert reasons["dev"] == ("dropped", "source", "tar_special_member")
    assert reasons["fifo"] == ("dropped", "source", "tar_special_member")
    assert reasons["xss"] == ("dropped", "caption_length", "caption_too_few_words")
    kept = sorted(k for k, r in ledger.items() if r["status"] == "kept")
    assert kept == sorted(["etc/evil", "_/_/x", "a/_/_/b", "good", "attr"])
    # nothing was written beside the input or the output (the source never extracts)
    assert sorted(p.name for p in root.iterdir()) == ["in", "out", "recipe.yaml"]
    assert not (root.parent / "x.jpg").exists() and not (root / "b.jpg").exists()


def test_output_tar_members_are_safe_to_extract(hostile_run, tmp_path):
    root, _, _ = hostile_run
    with tarfile.open(root / "out" / "webdataset" / "00000.tar") as tar:
        names = tar.getnames()
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names), names
        assert all(m.isfile() for m in tar.getmembers())
        tar.extractall(tmp_path / "x", filter="data")  # the "data" filter refuses any unsafe member
    written = sorted(str(p.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert "_/_/x.jpg" in written and "etc/evil.jpg" in written and "a/_/_/b.json" in written
    assert all(Path(tmp_path / "x" / w).resolve().is_relative_to((tmp_path / "x").resolve()) for w in written)


def test_unsafe_keys_from_a_key_column_never_become_unsafe_member_names(tmp_path, make_recipe, ray_session):
    """Keys from a Parquet ``key_col`` lose their path characters; the output tar extracts safely."""
    from curate.rows import safe_key

    keys = ["../../escape", "/abs/olute", "ok", "back\\..\\slash"]
    pq.write_table(pa.table({"id": keys, "caption": ["a b c d"] * 4, "url": ["http://e.test/x"] * 4,
                             "image": pa.array([jpeg_bytes(color=(i, 9, 9)) for i in range(4)], pa.binary())}),
                   tmp_path / "in.parquet")
    recipe = make_recipe({"source": {"path": str(tmp_path / "in.parquet"), "key_col": "id"},
                          "write": {"output": str(tmp_path / "out"), "formats": ["webdataset"]}})
    run(load_recipe(recipe))
    ledger_keys = sorted(pq.read_table(tmp_path / "out" / "ledger" / "00000.parquet")["key"].to_pylist())
    assert ledger_keys == sorted(safe_key(k) for k in keys) == sorted(["______escape", "_abs_olute", "ok",
                                                                        "back____slash"])
    with tarfile.open(tmp_path / "out" / "webdataset" / "00000.tar") as tar:
        names = sorted(tar.getnames())
        tar.extractall(tmp_path / "x", filter="data")  # raises on an absolute or `..` member
    assert names == sorted(f"{k}.{e}" for k in ledger_keys for e in ("jpg", "txt", "json"))
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == names


def test_safe_member_path_rules():
    assert safe_member_path("../../etc/passwd") == "_/_/etc/passwd"
    assert safe_member_path("/abs/k") == "abs/k"
    assert safe_member_path("a\\..\\b") == "a/_/b"
    assert safe_member_path("a/./b//c") == "a/b/c"
    assert safe_member_path("..") == "_" and safe_member_path("/") == "_" and safe_member_path("n\x00ul") == "nul"
    assert safe_member_path("00000123") == "00000123" and safe_member_path("dir/k.v2") == "dir/k.v2"


def test_truncated_tar_fails_naming_the_file_and_member(tmp_path):
    from curate.errors import InputError
    from curate.sources.webdataset import iter_samples

    whole = hostile_tar(tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cut\.tar: unreadable tar after member '.+'"):
        list(iter_samples(str(tmp_path / "cut.tar")))


# ------------------------------------------------------------------ (b) YAML tags

PAYLOADS = ["!!python/object/apply:os.system ['touch {marker}']",
            "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
            "!!python/name:os.system"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_recipe_with_python_yaml_tag_is_refused_and_not_executed(tmp_path, payload):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source:\n  path: {payload.format(marker=marker)}\nwrite:\n  output: {tmp_path}/o\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:2: invalid YAML"):
        load_recipe(recipe)
    assert not marker.exists()


def test_preset_override_and_mixture_with_python_yaml_tags_are_refused(tmp_path):
    from curate.mix import load_mixture

    marker = tmp_path / "pwned"
    tag = PAYLOADS[0].format(marker=marker)
    (tmp_path / "evil.yaml").write_text(f"stages:\n  - use: caption_length\n    min_words: {tag}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source:\n  path: {tmp_path}/in.parquet\nstages:\n  - preset: {tmp_path}/evil.yaml\n")
    with pytest.raises(RecipeError, match=r"evil\.yaml:3: invalid YAML"):
        load_recipe(recipe)
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"source:\n  path: {tmp_path}/in.parquet\n")
    with pytest.raises(RecipeError, match="value is not valid YAML: could not determine a constructor"):
        load_recipe(plain, overrides=[f"write.output={tag}"])
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"sources:\n  - {{name: web, path: {tag}, weight: 1}}\n")
    with pytest.raises(RecipeError, match=r"mix\.yaml:2: invalid YAML"):
        load_mixture(mixture, output=str(tmp_path / "m"))
    assert not marker.exists()


# ------------------------------------------------------------------ (c) pickle, eval and friends

#: Modules that deserialize code or objects from bytes: none of curate's inputs may go through them.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec"}
#: Harmless with a literal argument (``__import__("re")``), a code path from data otherwise.
UNSAFE_UNLESS_LITERAL = {"compile", "__import__"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}
UNSAFE_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}


class UnsafeCallFinder(ast.NodeVisitor):
    """Collects ``file:line: what`` for each unsafe import or call in one module."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.found: list[str] = []

    def _hit(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.where}:{node.lineno}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self._hit(node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] in UNSAFE_MODULES:
            self._hit(node, f"from {node.module} import")

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        kwargs = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in UNSAFE_BUILTINS:
            self._hit(node, f"{f.id}()")
        if isinstance(f, ast.Name) and f.id in UNSAFE_UNLESS_LITERAL and not (
                node.args and isinstance(node.args[0], ast.Constant)):
            self._hit(node, f"{f.id}() of a non-literal")
        if isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if owner == "yaml" and f.attr in UNSAFE_YAML:
                self._hit(node, f"yaml.{f.attr}()")
            if owner == "torch" and f.attr == "load":
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    self._hit(node, "torch.load() without weights_only=True")
            if owner in ("os", "subprocess") and f.attr in ("system", "popen"):
                self._hit(node, f"{owner}.{f.attr}()")
            if owner == "subprocess":
                shell = kwargs.get("shell")
                if isinstance(shell, ast.Constant) and shell.value is True:
                    self._hit(node, "subprocess(shell=True)")
        loader = kwargs.get("Loader")
        if isinstance(loader, ast.Attribute) and loader.attr in UNSAFE_LOADERS:
            self._hit(node, f"Loader=yaml.{loader.attr}")
        self.generic_visit(node)


def unsafe_calls(source: str, where: str) -> list[str]:
    finder = UnsafeCallFinder(where)
    finder.visit(ast.parse(source))
    return finder.found


def test_package_source_has_no_pickle_eval_or_unsafe_yaml():
    """Ray pickles tasks internally (its business); curate's own code deserializes nothing unsafely."""
    pkg = Path(curate.__file__).parent
    files = sorted(pkg.rglob("*.py"))
    assert len(files) > 30  # the whole package, not an empty glob
    found = [hit for p in files for hit in unsafe_calls(p.read_text(), str(p.relative_to(pkg.parent)))]
    assert found == []


def test_unsafe_call_finder_catches_what_it_claims():
    bad = ("import pickle\nfrom marshal import loads\nimport yaml, torch, subprocess\n"
           "yaml.load(s)\nyaml.safe_load(s, Loader=yaml.FullLoader)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\neval('1')\nexec('x=1')\nsubprocess.run(c, shell=True)\n"
           "__import__(name)\nos.system(cmd)\n")
    assert len(unsafe_calls(bad, "t.py")) == 11
    good = "import yaml, torch\nyaml.safe_load(s)\ntorch.load(p, weights_only=True)\nmodel.eval()\n__import__('re')\n"
    assert unsafe_calls(good, "t.py") == []


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_clip_checkpoint_with_a_pickle_payload_is_refused_unexecuted(tmp_path):
    """``load_clip`` reaches torch.load through open_clip, which passes weights_only=True."""
    import torch

    from curate.models.clip import DEMO_MODEL, load_clip

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, ckpt)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_clip(DEMO_MODEL, str(ckpt))
    assert not marker.exists()


# ------------------------------------------------------------------ (d) report.html


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_shows_hostile_captions_and_urls_as_text(hostile_run):
    root, manifest, _ = hostile_run
    html = (root / "out" / "report.html").read_text()
    assert manifest.stats.get("report") == "report.html"
    page = _TagCollector()
    page.feed(html)
    assert not [t for t, _ in page.tags if t == "script"]
    assert not [a for t, a in page.tags if t == "img" and ("onerror" in a or a.get("src") == "x")]
    assert all(not k.lower().startswith("on") for _, a in page.tags for k in a)
    text = "".join(page.text)
    assert SCRIPT in text  # the dropped caption, shown as the text it is
    assert ATTR_BREAK in text  # the kept caption and the URL holding an attribute break
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# ------------------------------------------------------------------ (e) API keys


SECRET = "sk-curate-test-5e3f9b1c7a2d4e6f8091a2b3c4d5e6f7"  # unique: any hit is a leak
SECRET_ENV = "CURATE_SECURITY_TEST_KEY"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                continue  # sockets and the like in Ray's session folder
    return hits


def test_api_key_never_reaches_outputs_manifest_or_logs(tmp_path, make_recipe):
    """`curate run` with a VLM judge that needs a key: the key goes in the Authorization header only."""
    from tests.vlm.chat_server import ChatServer

    def behaviour(caption: str, attempt: int) -> str:  # failures too: error paths must not echo the key
        return {"3": "http_401", "4": "http_500", "5": "bad_json"}.get(caption[-1], "ok")

    server = ChatServer(behaviour).start()
    n = 8
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(n)], "url": [f"http://img/{i}" for i in range(n)],
                             "caption": [f"a photo of a red square number {i}" for i in range(n)],
                             "image": pa.array([jpeg_bytes(color=(i, 5, 5)) for i in range(n)], pa.binary())}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out"
    recipe = make_recipe({
        "source": {"path": str(tmp_path / "in.parquet"), "key_col": "id"},
        "stages": [{"use": "mlm_filter", "model": "judge", "base_url": server.base_url, "api_key_env": SECRET_ENV,
                    "metrics": {"semantic_understanding": 0}, "timeout": 5, "retries": 1, "retry_backoff": 0.01}],
        "write": {"output": str(out)}, "runtime": {"num_cpus": 2}})
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, SECRET_ENV: SECRET, "CURATE_RAY_LOGS": "1", "RAY_TMPDIR": str(ray_tmp),
           "PYTHONUNBUFFERED": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "curate.cli", "-v", "run", str(recipe), "--no-progress"],
                           env=env, capture_output=True, timeout=240)
    finally:
        server.stop()
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs.decode(errors="replace")[-3000:]
    assert server.auth[f"Bearer {SECRET}"] == server.requests > 0  # the key was really used, on every request
    ledger = pq.read_table(out / "ledger" / "00000.parquet").to_pylist()
    assert {row["reason"] for row in ledger} >= {None, "judge_http_401", "judge_http_500"}
    assert SECRET.encode() not in logs
    assert _files_containing(out, SECRET.encode()) == []  # outputs, ledger, manifest, stats, report, _work
    assert SECRET not in (out / "manifest.json").read_text() and SECRET_ENV in (out / "manifest.json").read_text()
    try:
        ray_logs = list(ray_tmp.rglob("*.log")) + list(ray_tmp.rglob("*.out")) + list(ray_tmp.rglob("*.err"))
        assert ray_logs, f"no Ray logs under {ray_tmp}"  # workers' stdout/stderr and Ray's own logs
        assert _files_containing(ray_tmp, SECRET.encode()) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
