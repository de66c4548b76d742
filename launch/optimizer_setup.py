"""The optimizer and the learning-rate schedule the optim.* config names, over the flat parameter buffers.

    optimizer = make_optimizer(cfg.optim, store)           # engine.optim: step(lr) updates store.data in place
    lr_at = make_schedule_fn(cfg.optim, cfg.run.steps)     # engine.schedules: a pure function of the step
"""
from __future__ import annotations

import dataclasses
import inspect
import typing

from ndtrain.engine import optim, schedules
from ndtrain.launch.config import ConfigError, _coerce


def make_schedule_fn(ocfg, total_steps: int):
    """lr(step) from optim.schedule + optim.schedule_kwargs; lr / max_lr and total_steps filled in from the
    config when the schedule takes them and they are not given."""
    kwargs = dict(ocfg.schedule_kwargs)
    cls = schedules.SCHEDULES.get(ocfg.schedule)
    if cls is None:
        raise ConfigError(f"optim.schedule: unknown schedule {ocfg.schedule!r}; known: "
                          f"{', '.join(sorted(schedules.SCHEDULES))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in kwargs.items():  # types first: "warmup_steps = 'x'" is named, not a TypeError inside
        if key in hints and hints[key] in (int, float, str, bool):
            kwargs[key] = _coerce(f"optim.schedule_kwargs.{key}", value, hints[key])
    for key, value in (("lr", ocfg.lr), ("max_lr", ocfg.lr), ("total_steps", total_steps)):
        if key in fields:
            kwargs.setdefault(key, value)
    try:
        return schedules.make_schedule(ocfg.schedule, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optim.schedule_kwargs: {e}") from None


def make_optimizer(ocfg, store):
    """The optimizer named by optim.name over the flat buffers (engine.optim); `step(lr)` updates in place.
    Each optimizer gets the optim.* fields its constructor takes (betas for Adam, momentum for SGD, ...)."""
    cls = optim.OPTIMIZERS.get(ocfg.name)
    if cls is None:
        raise ConfigError(f"optim.name: unknown optimizer {ocfg.name!r}; known: {', '.join(sorted(optim.OPTIMIZERS))}")
    given = {"lr": ocfg.lr, "betas": tuple(ocfg.betas), "eps": ocfg.eps, "momentum": ocfg.momentum,
             "nesterov": ocfg.nesterov, "weight_decay": ocfg.weight_decay}
    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls(store, **{k: v for k, v in given.items() if k in accepted})
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None
