"""Model registry: `--model NAME` -> a builder(task_info, cfg) returning a TaskModel.

Each family lives in its own module here and registers itself with `@register_model("name")`; `build_model`
imports them all, so adding a family never edits the trainer.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from ndtrain.cluster.job import TaskModel

_REGISTRY: dict[str, Callable] = {}


def register_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):  # each family module registers itself on import
        importlib.import_module(f"{__name__}.{info.name}")


def model_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def build_model(name: str, task_info, cfg) -> TaskModel:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](task_info, cfg)


__all__ = ["TaskModel", "register_model", "build_model", "model_names"]
