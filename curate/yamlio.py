"""YAML files a user writes (recipes, presets, mixtures): loaded with the line of every key, so an
error says ``file:line: key.path: what is wrong``; ``--set dotted.key=value`` overrides.

>>> from curate.yamlio import load_yaml
>>> doc = load_yaml("pipelines/download.yaml")             # doctest: +SKIP
>>> doc.line_for(("write", "samples_per_shard"))          # doctest: +SKIP
12
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curate.errors import RecipeError

Loc = tuple[Any, ...]  # a key path: mapping keys and list indexes, as pydantic reports them


@dataclass
class YamlDoc:
    """A parsed YAML file: its data, and the line (1-based) where each key path is written."""

    file: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_for(self, loc: Iterable[Any]) -> int | None:
        """The line of ``loc``, else of its nearest written parent (a missing key: where it belongs)."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())

    def error(self, loc: Iterable[Any], message: str, *, overrides: Mapping[Loc, str] = {}) -> RecipeError:
        """A :class:`RecipeError` at ``loc``: in the ``--set`` that wrote it, else at its file and line."""
        loc = tuple(loc)
        for key, expr in overrides.items():
            if loc[: len(key)] == key:
                return RecipeError(message, file=f"--set {expr}", key=keypath(loc))
        return RecipeError(message, file=self.file, line=self.line_for(loc), key=keypath(loc) or None)


def _node_lines(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            _node_lines(v, path + (key,), out)
            out[path + (key,)] = k.start_mark.line + 1  # a key's line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _node_lines(v, path + (i,), out)


def load_yaml(path: str | os.PathLike) -> YamlDoc:
    """Parse a YAML file (safe loader) and record key lines; errors are :class:`RecipeError`."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"file not found: {p}")
    text = p.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RecipeError(f"invalid YAML: {getattr(e, 'problem', e)}", file=str(p),
                          line=mark.line + 1 if mark else None) from e
    lines: dict[Loc, int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return YamlDoc(str(p), data, lines)


def keypath(loc: Iterable[Any]) -> str:
    """``("stages", 0, "use")`` → ``stages[0].use``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def apply_override(data: dict, expr: str) -> Loc:
    """Apply ``--set dotted.key=value`` (value parsed as YAML) to ``data``; return the key path set."""
    if "=" not in expr:
        raise RecipeError(f"--set {expr!r}: expected dotted.key=value")
    key, raw = expr.split("=", 1)
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {expr!r}: value is not valid YAML: {e}") from e
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"--set {key}: no list item {part} at {keypath(parts[:i])}")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {keypath(parts[:i])} is not a mapping")
            node = node.setdefault(part, {})
    last = parts[-1]
    if not isinstance(node, dict | list):
        raise RecipeError(f"--set {key}: {keypath(parts[:-1])} is not a mapping")
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"--set {key}: no list item {last}")
        node[last] = value
    else:
        node[last] = value
    return tuple(parts)


def validation_message(err: Mapping[str, Any]) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in the user's words."""
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    if "input" in err and err["type"] not in ("missing", "extra_forbidden") and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return msg
