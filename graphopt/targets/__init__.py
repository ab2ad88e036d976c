"""The target registry: every module of this package that defines ``TARGET`` (a targets.base.Target)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from graphopt.targets.base import Target, TargetError

_REGISTRY: dict[str, Target] = {}
_LOADED = False


def register(target: Target) -> Target:
    """Add ``target`` (built-in targets are found by module; others, e.g. a plugin's, call this)."""
    if target.name in _REGISTRY and type(_REGISTRY[target.name]) is not type(target):
        raise TargetError(f"target {target.name!r} is registered twice; give the new one another name")
    _REGISTRY[target.name] = target
    return target


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if isinstance(getattr(module, "TARGET", None), Target):
                register(module.TARGET)


def targets() -> dict[str, Target]:
    _load()
    return dict(_REGISTRY)


def get_target(name: str) -> Target:
    """The registered target called ``name``; a one-line error listing the known ones otherwise."""
    known = targets()
    if name not in known:
        raise TargetError(f"unknown target {name!r}; use one of {', '.join(sorted(known))}")
    return known[name]


def accepting(option: str) -> list[str]:
    """The targets whose options include ``option``."""
    return sorted(t.name for t in targets().values() if option in {f.name for f in dataclasses.fields(t.options)})


def flag_name(option: str) -> str:
    """The command-line flag of a target option (its field's ``flag`` metadata), e.g. --trt-max-seq."""
    for target in targets().values():
        for field in dataclasses.fields(target.options):
            if field.name == option and "flag" in field.metadata:
                return field.metadata["flag"]
    return "--" + option.replace("_", "-")
