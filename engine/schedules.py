"""Learning-rate schedules as pure functions of the step (0-based optimizer steps), so resume is trivial.

    lr_at = make_schedule("warmup_cosine", lr=6e-4, warmup_steps=2000, total_steps=600000, min_lr=6e-5)
    opt.step(lr=lr_at(step))

Each schedule is a frozen dataclass with `__call__(step) -> float`: config data in, a callable out; the fields are
validated on construction with errors naming the field. ReduceLROnPlateau and EarlyStopping are the two stateful
helpers (they react to a metric, not to the step); both have state_dict / load_state_dict of plain scalars.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable


def _require(cond: bool, schedule: str, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"schedule {schedule!r}: field {field!r} {msg}")


@dataclass(frozen=True)
class constant:
    lr: float

    def __post_init__(self):
        _require(self.lr >= 0, "constant", "lr", f"must be >= 0, got {self.lr}")

    def __call__(self, step: int) -> float:
        return float(self.lr)


@dataclass(frozen=True)
class step_decay:
    """torch StepLR: lr * gamma ** (step // step_size)."""
    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        _require(self.lr >= 0, "step_decay", "lr", f"must be >= 0, got {self.lr}")
        _require(self.step_size >= 1, "step_decay", "step_size", f"must be >= 1, got {self.step_size}")
        _require(self.gamma > 0, "step_decay", "gamma", f"must be > 0, got {self.gamma}")

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)


def _cos_interp(start: float, end: float, frac: float) -> float:
    """start at frac=0, end at frac=1, half a cosine in between."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class cosine:
    """Cosine annealing from lr (step 0) to min_lr (step total_steps and after); torch CosineAnnealingLR values."""
    lr: float
    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self):
        _require(self.total_steps >= 1, "cosine", "total_steps", f"must be >= 1, got {self.total_steps}")
        _require(0 <= self.min_lr <= self.lr, "cosine", "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")

    def __call__(self, step: int) -> float:
        return _cos_interp(self.lr, self.min_lr, min(step, self.total_steps) / self.total_steps)


@dataclass(frozen=True)
class warmup_cosine:
    """nanoGPT's get_lr: linear warmup lr (it+1)/(warmup+1), then cosine down to min_lr at total_steps
    (nanoGPT's lr_decay_iters), then min_lr."""
    lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self):
        _require(self.warmup_steps >= 0, "warmup_cosine", "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        # A run shorter than its warmup is legal (a quick try of a preset tuned for long runs): as in nanoGPT's
        # get_lr it simply never leaves the linear warmup.
        _require(self.total_steps >= 1, "warmup_cosine", "total_steps", f"must be >= 1, got {self.total_steps}")
        _require(0 <= self.min_lr <= self.lr, "warmup_cosine", "min_lr",
                 f"must be in [0, lr={self.lr}], got {self.min_lr}")

    def __call__(self, it: int) -> float:
        if it < self.warmup_steps:
            return self.lr * (it + 1) / (self.warmup_steps + 1)
        if it >= self.total_steps:
            return self.min_lr
        decay_ratio = (it - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return _cos_interp(self.lr, self.min_lr, decay_ratio)


@dataclass(frozen=True)
class inverse_sqrt_warmup:
    """Vaswani et al. (2017) eq. 3: scale * d_model^-0.5 * min(n^-0.5, n * warmup^-1.5), with n = step + 1 (the
    paper counts steps from 1). The peak, at n = warmup, is scale / sqrt(d_model * warmup)."""
    d_model: int
    warmup_steps: int = 4000
    scale: float = 1.0

    def __post_init__(self):
        _require(self.d_model >= 1, "inverse_sqrt_warmup", "d_model", f"must be >= 1, got {self.d_model}")
        _require(self.warmup_steps >= 1, "inverse_sqrt_warmup", "warmup_steps",
                 f"must be >= 1, got {self.warmup_steps}")
        _require(self.scale > 0, "inverse_sqrt_warmup", "scale", f"must be > 0, got {self.scale}")

    def __call__(self, step: int) -> float:
        n = step + 1
        return self.scale * self.d_model ** -0.5 * min(n ** -0.5, n * self.warmup_steps ** -1.5)


@dataclass(frozen=True)
class inverse_sqrt:
    """fairseq's inverse_sqrt (the translation recipes' schedule): linear warmup from warmup_init_lr to the peak lr
    over warmup_steps updates, then lr * sqrt(warmup_steps / n), with n = step + 1 updates done."""
    lr: float
    warmup_steps: int = 4000
    warmup_init_lr: float = 0.0

    def __post_init__(self):
        _require(self.lr > 0, "inverse_sqrt", "lr", f"must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 1, "inverse_sqrt", "warmup_steps", f"must be >= 1, got {self.warmup_steps}")
        _require(0 <= self.warmup_init_lr <= self.lr, "inverse_sqrt", "warmup_init_lr",
                 f"must be in [0, lr={self.lr}], got {self.warmup_init_lr}")

    def __call__(self, step: int) -> float:
        n = step + 1
        if n < self.warmup_steps:
            return self.warmup_init_lr + n * (self.lr - self.warmup_init_lr) / self.warmup_steps
        return self.lr * math.sqrt(self.warmup_steps / n)


@dataclass(frozen=True)
class one_cycle:
    """Smith & Topin's 1cycle, torch OneCycleLR values (cosine annealing, two phases by default): from
    max_lr/div_factor up to max_lr over pct_start of total_steps, then down to max_lr/div_factor/final_div_factor.
    three_phase=True: up, back down to the initial lr symmetrically, then annihilate to the minimum."""
    max_lr: float
    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal_strategy: str = "cos"
    three_phase: bool = False

    def __post_init__(self):
        _require(self.total_steps >= 2, "one_cycle", "total_steps", f"must be >= 2, got {self.total_steps}")
        _require(0 < self.pct_start < 1, "one_cycle", "pct_start", f"must be in (0, 1), got {self.pct_start}")
        _require(self.anneal_strategy in ("cos", "linear"), "one_cycle", "anneal_strategy",
                 f"must be 'cos' or 'linear', got {self.anneal_strategy!r}")
        _require(self.div_factor > 0, "one_cycle", "div_factor", f"must be > 0, got {self.div_factor}")
        _require(self.final_div_factor > 0, "one_cycle", "final_div_factor",
                 f"must be > 0, got {self.final_div_factor}")

    def _phases(self):
        initial = self.max_lr / self.div_factor
        minimum = initial / self.final_div_factor
        up_end = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            return [(up_end, initial, self.max_lr), (2 * up_end, self.max_lr, initial),
                    (self.total_steps - 1, initial, minimum)]
        return [(up_end, initial, self.max_lr), (self.total_steps - 1, self.max_lr, minimum)]

    def __call__(self, step: int) -> float:
        start_step = 0.0
        phases = self._phases()
        for i, (end_step, start_lr, end_lr) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                frac = min((step - start_step) / (end_step - start_step), 1.0)
                if self.anneal_strategy == "cos":
                    return _cos_interp(start_lr, end_lr, frac)
                return (end_lr - start_lr) * frac + start_lr
            start_step = end_step
        raise AssertionError("unreachable")


SCHEDULES: dict[str, type] = {c.__name__: c for c in
                              (constant, step_decay, cosine, warmup_cosine, inverse_sqrt_warmup, inverse_sqrt,
                               one_cycle)}


def make_schedule(name: str, **kwargs) -> Callable[[int], float]:
    """A schedule from config data, e.g. make_schedule("cosine", lr=1e-3, total_steps=1000).
    Errors name the schedule and the unknown, missing or bad field."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise ValueError(f"schedule {name!r}: unknown field {unknown[0]!r}; fields are {list(fields)}")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ValueError(f"schedule {name!r}: missing field {missing[0]!r}; fields are {list(fields)}")
    return cls(**kwargs)


# -- stateful helpers driven by a metric -----------------------------------------------------------------------------
class _MetricTracker:
    """Shared best-so-far logic: mode 'min' or 'max', threshold relative ('rel') or absolute ('abs'), as torch."""

    def __init__(self, mode: str, threshold: float, threshold_mode: str, who: str):
        if mode not in ("min", "max"):
            raise ValueError(f"{who}: field 'mode' must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"{who}: field 'threshold_mode' must be 'rel' or 'abs', got {threshold_mode!r}")
        self.mode, self.threshold, self.threshold_mode = mode, float(threshold), threshold_mode
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0

    def is_better(self, a: float) -> bool:
        best, th = self.best, self.threshold
        if self.mode == "min":
            return a < (best * (1 - th) if self.threshold_mode == "rel" else best - th)
        return a > (best * (1 + th) if self.threshold_mode == "rel" else best + th)

    def update(self, metric: float) -> bool:
        """Record a metric; True when it improved on the best."""
        metric = float(metric)
        if self.is_better(metric):
            self.best, self.num_bad = metric, 0
            return True
        self.num_bad += 1
        return False


class ReduceLROnPlateau:
    """torch ReduceLROnPlateau for one lr: after `patience` evaluations without improvement, lr *= factor (not
    below min_lr), then wait `cooldown` evaluations. `step(metric)` returns the lr to use from now on."""

    def __init__(self, lr: float, *, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0,
                 eps: float = 1e-8):
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau: field 'factor' must be in (0, 1), got {factor}")
        self.tracker = _MetricTracker(mode, threshold, threshold_mode, "ReduceLROnPlateau")
        self.lr, self.factor, self.patience = float(lr), float(factor), int(patience)
        self.cooldown, self.min_lr, self.eps = int(cooldown), float(min_lr), float(eps)
        self.cooldown_counter = 0

    def step(self, metric: float) -> float:
        self.tracker.update(metric)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.tracker.num_bad = 0
        if self.tracker.num_bad > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.tracker.num_bad = 0
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.tracker.best, "num_bad": self.tracker.num_bad,
                "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.tracker.best = float(state["lr"]), float(state["best"])
        self.tracker.num_bad, self.cooldown_counter = int(state["num_bad"]), int(state["cooldown_counter"])


class EarlyStopping:
    """`step(metric)` returns True once `patience` evaluations in a row brought no improvement of at least
    min_delta (absolute). `best` holds the best metric, `improved` whether the last step improved it (save a
    checkpoint then)."""

    def __init__(self, patience: int = 5, *, min_delta: float = 0.0, mode: str = "min"):
        if patience < 1:
            raise ValueError(f"EarlyStopping: field 'patience' must be >= 1, got {patience}")
        self.tracker = _MetricTracker(mode, min_delta, "abs", "EarlyStopping")
        self.patience = int(patience)
        self.improved = False

    @property
    def best(self) -> float:
        return self.tracker.best

    def step(self, metric: float) -> bool:
        self.improved = self.tracker.update(metric)
        return self.tracker.num_bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.tracker.best, "num_bad": self.tracker.num_bad}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.best, self.tracker.num_bad = float(state["best"]), int(state["num_bad"])


__all__ = ["constant", "step_decay", "cosine", "warmup_cosine", "inverse_sqrt_warmup", "inverse_sqrt", "one_cycle",
           "make_schedule", "SCHEDULES", "ReduceLROnPlateau", "EarlyStopping"]
