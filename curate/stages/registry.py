"""Where stages are found: ``use: <name>`` in a recipe -> the class that runs it.

A stage is one file. Every public module of this package is imported the first
time the registry is asked (files starting with ``_`` are helpers, not stages),
and so is every entry point of the ``curate.stages`` group, so a plugin package
adds stages with no change here::

    # pyproject.toml of a plugin
    [project.entry-points."curate.stages"]
    my_filter = "my_package.my_filter"     # a module whose classes use @register

``register`` checks that the class's ``Config`` pins ``use`` to the stage's name,
so the name is written once in the recipe's vocabulary and nowhere else.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import threading
from importlib.metadata import entry_points

from curate.errors import EnvironmentProblem
from curate.stages.base import Stage

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "curate.stages"
_NOT_STAGES = {"base", "registry"}

_REGISTRY: dict[str, type[Stage]] = {}
_lock = threading.RLock()
_discovered = False


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to recipes as ``use: <name>``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__}: a stage needs a class attribute `name`")
    use = cls.Config.model_fields.get("use")
    if use is None or use.default != name:
        raise TypeError(f"{cls.__qualname__}: its Config must pin `use` to the stage's name, "
                        f'e.g. use: Literal["{name}"] = "{name}" (got {getattr(use, "default", None)!r})')
    with _lock:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"stage name {name!r} registered twice: {old.__module__}.{old.__qualname__} "
                             f"and {cls.__module__}.{cls.__qualname__}")
        _REGISTRY[name] = cls
    return cls


def discover() -> None:
    """Import every stage module (built-in and plugins) once; later calls return at once."""
    global _discovered
    if _discovered:
        return
    with _lock:
        if _discovered:
            return
        package = __name__.rsplit(".", 1)[0]  # curate.stages: this module's own folder
        for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
            if info.name not in _NOT_STAGES and not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()  # a module (its @register classes) or a class decorated with @register
            except Exception as e:  # a broken plugin names itself instead of failing every recipe
                raise EnvironmentProblem(
                    f"stage plugin {ep.name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) "
                    f"cannot be loaded: {type(e).__name__}: {e}") from e
        _discovered = True


def stage_classes() -> dict[str, type[Stage]]:
    """Every stage by name (a copy)."""
    discover()
    return dict(_REGISTRY)


def stage_class(use: str) -> type[Stage]:
    """The class behind ``use: <name>``; KeyError names the known stages.

    On a worker the stage's module is already imported (unpickling its config did it), so the
    class is there without importing every other stage module (numba, torch: seconds a worker).
    """
    cls = _REGISTRY.get(use)
    if cls is not None:
        return cls
    discover()
    try:
        return _REGISTRY[use]
    except KeyError:
        raise KeyError(f"unknown stage {use!r}; known stages: {', '.join(sorted(_REGISTRY))}") from None
