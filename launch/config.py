"""The run configuration as data: dataclasses, loaded from TOML, overridden with `--set a.b=value`, validated.

    cfg = Config()                                   # defaults
    cfg = load_config(path)                          # a TOML file: [run], [model], [optim], [data], [cluster]
    apply_overrides(cfg, ["optim.lr=3e-3", "model.hidden=[64, 64]"])
    validate(cfg)                                    # ConfigError naming the field ("optim.lr: must be > 0")
    write_config(cfg, "runs/x/config.toml"); config_hash(cfg)

`[model]` is a free-form table: each model family states its own defaults and checks its keys with
`model_options(cfg.model, DEFAULTS, family)`, so a new family never edits this file.
Every error is a `ConfigError` (a `UsageError`: one line on stderr, exit status 2) whose message names the field.
Every float field must be a finite number: NaN and inf are refused wherever they come from (TOML, --set, [model]).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ndtrain.data.atomic import atomic_open
from ndtrain.launch.errors import UsageError
from ndtrain.launch.suggest import did_you_mean
from ndtrain.cluster.comm.netif import interface_address


class ConfigError(UsageError):
    """A bad configuration value; the message starts with the field's dotted name (or the file)."""


def _f(default, *, min=None, max=None, choices=None, doc=""):
    """A dataclass field with validation metadata. `min` is inclusive; strictly-positive fields use `min_excl`."""
    kw = {"default_factory": (lambda d=default: copy.deepcopy(d))} if isinstance(default, (list, dict)) else \
        {"default": default}
    return field(metadata={"min": min, "max": max, "choices": choices, "doc": doc}, **kw)


POSITIVE = 1e-300  # `min` for "must be > 0" floats


@dataclass
class RunConfig:
    task: str = _f("xor", doc="task name (ndtrain.data.tasks) ")
    model: str = _f("mlp", doc="model family (launch.models registry)")
    steps: int = _f(1000, min=1, doc="optimizer steps")
    batch_size: int = _f(32, min=1, doc="GLOBAL batch: split across workers, so any worker count trains the same")
    seed: int = _f(0, min=0, doc="seeds init, data order, dropout")
    out: str = _f("", doc="run directory ('' = a fresh runs/<task>-<model>-<timestamp>); `ndtrain train` refuses a "
                          "non-empty one unless --resume or --overwrite")
    checkpoint_every: int = _f(0, min=0, doc="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(3, min=1, doc="how many recent checkpoints to keep")
    log_every: int = _f(10, min=1, doc="steps between metrics records")
    eval_every: int = _f(0, min=0, doc="steps between evaluations (0: only at the end)")
    eval_batch_size: int = _f(1024, min=1, doc="rows per eval batch, per rank")
    eval_rows: int = _f(0, min=0, doc="evaluate on the first N validation rows only (0: all); the same rows on any "
                                      "number of workers")
    report: bool = _f(True, doc="write DIR/report.html (plots) when training ends (env NDTRAIN_REPORT=0 turns it "
                                "off, e.g. in test suites)")
    tensorboard: bool = _f(True, doc="write TensorBoard events to DIR/tb (env NDTRAIN_TENSORBOARD=0 turns it off)")
    backend: str = _f("local", choices=("local", "mpi", "ray"))
    workers: int = _f(1, min=1)
    threads: int = _f(0, min=0, doc="BLAS threads per worker (0: $OPENBLAS/OMP_NUM_THREADS if set, else cores // "
                                     "workers on the host)")
    dtype: str = _f("float32", choices=("float32", "float64"))
    resume: str = _f("", doc="checkpoint JSON, checkpoints directory or run directory to resume from ('' = fresh "
                             "start); a directory resumes from its newest valid checkpoint")
    max_nonfinite: int = _f(5, min=1, doc="non-finite steps in a row (skipped, no update) after which the run stops")
    deterministic: bool = _f(False, doc="bitwise-identical results for any worker count (fixed micro-batches, "
                                        "fixed summation tree, 1 BLAS thread); slower")
    micro_batches: int = _f(8, min=1, doc="deterministic mode: micro-batches per global batch (a power of two, "
                                          ">= run.workers, dividing run.batch_size)")


@dataclass
class OptimConfig:
    name: str = _f("adamw", doc="optimizer (ndtrain.engine.optim)")
    lr: float = _f(1e-3, min=POSITIVE)
    betas: list[float] = _f([0.9, 0.999])
    eps: float = _f(1e-8, min=POSITIVE)
    momentum: float = _f(0.0, min=0.0, max=1.0)
    nesterov: bool = _f(False)
    weight_decay: float = _f(0.0, min=0.0)
    grad_clip: float = _f(0.0, min=0.0, doc="max global grad norm (0: no clipping)")
    schedule: str = _f("constant", doc="lr schedule (ndtrain.engine.schedules.make_schedule)")
    schedule_kwargs: dict = _f({}, doc="extra arguments of the schedule, e.g. {warmup_steps = 100}")


@dataclass
class DataConfig:
    dir: str = _f("", doc="prepared dataset directory ('' = generate the built-in task in memory)")
    cache: str = _f("", doc="cache root for prepared datasets")
    rows: int = _f(0, min=0, doc="rows to generate for synthetic tasks (0: the task's default)")
    options: dict = _f({}, doc="task-specific options passed to the data layer")
    # Variable-length seq2seq batches (data/plan.py). Both keep global batch k a function of (seed, epoch) and the
    # data only, never of run.workers: W=1 and W=2 train on the same batches, and resume holds across W.
    bucket: bool = _f(False, doc="seq2seq: length-bucketed batches of run.batch_size rows (rows of similar length "
                                 "share a batch: little padding, faster steps; it can slow learning per step: on the toy "
                                 "presets and an earlier Multi30k preset it did, see docs/real-runs.md)")
    bucket_batches: int = _f(50, min=1, doc="with bucket: rows are sorted by length within chunks of "
                                             "bucket_batches * run.batch_size shuffled rows (smaller: batches mix "
                                             "lengths more, pad more)")
    max_tokens: int = _f(0, min=0, doc="seq2seq: token-budget batches, rows * longest <= max_tokens and at most "
                                       "run.batch_size rows (0: off; overrides bucket)")
    rows_multiple: int = _f(8, min=1, doc="with max_tokens: batch rows come in multiples of this (>= run.workers, "
                                          "so every rank gets a non-empty share)")


@dataclass
class ClusterConfig:
    bucket_mb: float = _f(1.0, min=POSITIVE, doc="all-reduce bucket size in MB (the S Transformer's 3.7 MB of gradients make 4 buckets, so all but the last overlap backward)")
    overlap: bool = _f(True, doc="all-reduce buckets while backward runs")
    hostfile: str = _f("", doc="MPI hostfile")
    address: str = _f("", doc="Ray address ('' = start a local Ray)")
    iface: str = _f("", doc="network interface for traffic between hosts (MPI, Ray's TCP mesh, the coordinator), "
                            "e.g. eth1; must exist on every host ('' = loopback on one host, the default route's "
                            "interface across hosts). docs/security.md")
    # Recovery (cluster/supervise.py). -1 = automatic: the environment variable named, else the built-in default.
    max_restarts: int = _f(-1, min=-1, doc="Ray: worker-group restarts from the last checkpoint after a dead worker "
                                           "(-1: $NDTRAIN_MAX_RESTARTS or 3)")
    heartbeat_timeout: float = _f(-1.0, min=-1.0, doc="seconds of silence after which a rank has failed "
                                                      "(-1: $NDTRAIN_HEARTBEAT_TIMEOUT or 30)")
    stall_timeout: float = _f(-1.0, min=-1.0, doc="seconds peers may wait for a rank in a collective before it is "
                                                  "declared hung; 0 turns the rule off (-1: $NDTRAIN_STALL_TIMEOUT or 20)")
    # Elastic training (docs/elastic.md): Ray only; 0 = run.workers (not elastic: a dead worker restarts the group).
    min_workers: int = _f(0, min=0, doc="Ray: fewest workers the run continues with after workers leave; below it the "
                                        "run stops with a checkpoint (0: run.workers)")
    max_workers: int = _f(0, min=0, doc="Ray: most workers the run grows to when capacity appears (0: run.workers)")
    # Fewer bytes on a slow link (docs/network.md): opt-in, recorded in config.toml.
    compress: str = _f("", choices=("", "fp16", "bf16", "powersgd"),
                       doc="gradient compression with error feedback ('' = none; fp16, bf16: 2 bytes a value; "
                           "powersgd: rank cluster.powersgd_rank factors of each 2-D gradient)")
    powersgd_rank: int = _f(2, min=1, doc="PowerSGD's rank r (cluster.compress=powersgd)")
    link_probe_mb: float = _f(4.0, min=0.0, doc="MB all-reduced at start-up to measure the link between ranks "
                                               "(bandwidth, latency: summary.json, progress lines, advice when "
                                               "communication would exceed 30% of a step); 0: no probe")
    sync_every: int = _f(0, min=0, doc="DiLoCo / local SGD: H inner optimizer steps per rank between parameter "
                                       "all-reduces (0: synchronous training, every step)")
    outer_lr: float = _f(0.7, min=POSITIVE, doc="DiLoCo's outer Nesterov learning rate (cluster.sync_every > 0)")
    outer_momentum: float = _f(0.9, min=0.0, max=0.999999, doc="DiLoCo's outer momentum (cluster.sync_every > 0)")
    sync_overlap: bool = _f(False, doc="DiLoCo: exchange the outer gradient in the background while the next H inner "
                                       "steps run, and apply the outer step one round later (cluster.sync_every > 0; "
                                       "docs/network.md)")
    sync_delay: int = _f(0, min=0, doc="DiLoCo overlapped: inner steps between an outer exchange's launch and its "
                                       "outer step, tau <= H (0: H, the next sync). Smaller: fresher parameters "
                                       "(closer to the blocking sync's convergence), less time to hide the exchange")
    # The live straggler view (cluster/straggler.py, docs/elastic.md "Stragglers"): MPI and Ray runs of W > 1.
    straggler_factor: float = _f(1.5, min=1.0, doc="name a rank whose compute time per step (step time minus time "
                                                  "blocked in communication) exceeds this many times the other "
                                                  "ranks' median (must be > 1)")
    straggler_steps: int = _f(20, min=1, doc="... for this many consecutive steps (once per episode)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: dict = field(default_factory=dict)  # free-form, per family: see model_options
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"run": RunConfig, "optim": OptimConfig, "data": DataConfig, "cluster": ClusterConfig}


# -- type checking ---------------------------------------------------------------------------------------------------
def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(name: str, value: Any, t) -> Any:
    """Check `value` against annotation `t`; returns the value (ints widened to float where a float is expected)."""
    origin = typing.get_origin(t)
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):  # no float field takes NaN or inf: they would pass every range check below
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_t,) = typing.get_args(t) or (Any,)
        return [v if item_t is Any else _coerce(f"{name}[{i}]", v, item_t) for i, v in enumerate(value)]
    if t is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported annotation {_type_name(t)}")


def _check_range(name: str, value, meta) -> None:
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    if lo is not None and value < lo:
        raise ConfigError(f"{name}: must be {'> 0' if lo == POSITIVE else f'>= {lo}'}; got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}: must be <= {hi}; got {value!r}")


def _set_section(section_obj, section: str, table: dict, source: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown key{source}{did_you_mean(key, names)}; "
                              f"known: {', '.join(sorted(names))}")
        try:
            value = _coerce(f"{section}.{key}", value, hints[key])
        except ConfigError as e:
            raise ConfigError(f"{e}{source}") from None
        setattr(section_obj, key, value)


def merge_dict(cfg: Config, data: dict, source: str = "") -> Config:
    """Overlay a nested dict (a parsed TOML file) onto cfg, checking keys and types. Returns cfg."""
    for section, table in data.items():
        if section == "model":
            if not isinstance(table, dict):
                raise ConfigError(f"model: expected a table{source}")
            cfg.model.update(copy.deepcopy(table))
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section{source}{did_you_mean(section, [*SECTIONS, 'model'])}; "
                              f"known: run, model, optim, data, cluster")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table{source}, got {table!r}")
        _set_section(getattr(cfg, section), section, table, source)
    return cfg


def load_config(path: str | os.PathLike, base: Config | None = None) -> Config:
    """Read a TOML file over `base` (default: the defaults)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a TOML config file") from None
    except UnicodeDecodeError as e:  # tomllib decodes the whole file as UTF-8 first
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): not a TOML config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    return merge_dict(base if base is not None else Config(), data, source=f" (in {path})")


# -- --set a.b=value -------------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A TOML literal (`3`, `1e-3`, `true`, `[64, 64]`, `"x"`, `{a = 1}`), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` (deeper paths for tables: `optim.schedule_kwargs.warmup_steps=100`)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.01")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {key}: expected section.key, e.g. optim.lr")
        value = parse_value(text.strip())
        nested: Any = value
        for p in reversed(parts[2:]):
            nested = {p: nested}
        section, name = parts[0], parts[1]
        if len(parts) > 2 and section != "model":
            # merge into the existing table rather than replacing it
            current = getattr(getattr(cfg, section, None), name, None)
            if isinstance(current, dict):
                merged = copy.deepcopy(current)
                _deep_update(merged, nested)
                nested = merged
        if section == "model" and len(parts) > 2:
            merged = copy.deepcopy(cfg.model.get(name, {}))
            if not isinstance(merged, dict):
                raise ConfigError(f"--set {key}: model.{name} is not a table")
            _deep_update(merged, nested)
            nested = merged
        merge_dict(cfg, {section: {name: nested}}, source=" (from --set)")
    return cfg


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


# -- validation ------------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> Config:
    """Types and ranges of every field (the model table is checked by its family's builder). Returns cfg."""
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(obj):
            name = f"{section}.{f.name}"
            value = _coerce(name, getattr(obj, f.name), hints[f.name])
            setattr(obj, f.name, value)
            _check_range(name, value, f.metadata)
    o = cfg.optim
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {o.betas!r}")
    if cfg.run.backend == "local" and cfg.run.workers != 1:
        raise ConfigError(f"run.workers: the local backend runs 1 worker, got {cfg.run.workers} "
                          "(use --backend mpi or ray)")
    if cfg.run.batch_size < cfg.run.workers:
        raise ConfigError(f"run.batch_size: the global batch ({cfg.run.batch_size}) must be >= run.workers "
                          f"({cfg.run.workers})")
    if cfg.data.max_tokens and cfg.data.rows_multiple < cfg.run.workers:
        raise ConfigError(f"data.rows_multiple: token-budget batches come in multiples of {cfg.data.rows_multiple} "
                          f"rows, fewer than run.workers ({cfg.run.workers}): a rank could get no rows")
    if not isinstance(cfg.model, dict):
        raise ConfigError("model: expected a table")
    if cfg.run.deterministic:
        _check_deterministic(cfg.run)
    c = cfg.cluster
    if c.compress and cfg.run.deterministic:
        raise ConfigError("cluster.compress: not available with run.deterministic (each rank rounds its own share "
                          "of the gradient, so the result depends on the number of workers)")
    if c.compress == "powersgd" and c.sync_every:
        raise ConfigError("cluster.compress: powersgd is not available with cluster.sync_every (DiLoCo's outer "
                          "gradient goes as fp16 or bf16)")
    if c.sync_overlap and not c.sync_every:
        raise ConfigError("cluster.sync_overlap: needs cluster.sync_every > 0 (it overlaps DiLoCo's outer sync)")
    if c.sync_delay and not c.sync_overlap:
        raise ConfigError("cluster.sync_delay: needs cluster.sync_overlap (it delays the overlapped outer step)")
    if c.sync_delay > c.sync_every:
        raise ConfigError(f"cluster.sync_delay: at most cluster.sync_every ({c.sync_every}), got {c.sync_delay} "
                          f"(an exchange is applied by the next sync at the latest)")
    if c.straggler_factor <= 1.0:
        raise ConfigError(f"cluster.straggler_factor: must be > 1 (a multiple of the median), got {c.straggler_factor}")
    _check_elastic(cfg)
    if cfg.cluster.iface:
        try:
            interface_address(cfg.cluster.iface)
        except ValueError as e:
            raise ConfigError(f"cluster.iface: {e}") from None
    return cfg


def worker_bounds(cfg: Config) -> tuple[int, int]:
    """(min_workers, max_workers) with 0 read as run.workers. min < max: an elastic run (docs/elastic.md)."""
    c, w = cfg.cluster, cfg.run.workers
    return (c.min_workers or w), (c.max_workers or w)


def _check_elastic(cfg: Config) -> None:
    lo, hi = worker_bounds(cfg)
    w = cfg.run.workers
    if not lo <= w <= hi:
        raise ConfigError(f"cluster.min_workers / max_workers: need min ({lo}) <= run.workers ({w}) <= max ({hi})")
    if lo == hi:
        return
    if cfg.run.backend != "ray":
        raise ConfigError(f"cluster.min_workers / max_workers: only the Ray backend changes its world mid-run; "
                          f"{cfg.run.backend} cannot (MPI's world is fixed: --resume on any number of workers covers it)")
    if cfg.cluster.sync_every:
        raise ConfigError("cluster.min_workers / max_workers: not available with cluster.sync_every (DiLoCo's ranks "
                          "hold their own parameters between syncs)")
    if cfg.run.batch_size < hi:
        raise ConfigError(f"run.batch_size: the global batch ({cfg.run.batch_size}) must be >= cluster.max_workers "
                          f"({hi})")
    if cfg.run.deterministic and cfg.run.micro_batches < hi:
        raise ConfigError(f"run.micro_batches: {cfg.run.micro_batches} micro-batches cannot feed "
                          f"cluster.max_workers ({hi}) ranks in deterministic mode; use at least {hi}")


def _check_deterministic(run: RunConfig) -> None:
    """The fixed micro-batch partition (cluster.deterministic) needs M a power of two, W | M and M | B."""
    m = run.micro_batches
    if m & (m - 1):
        raise ConfigError(f"run.micro_batches: must be a power of two in deterministic mode; got {m}")
    if m < run.workers:
        raise ConfigError(f"run.micro_batches: {m} micro-batches cannot feed run.workers ({run.workers}) ranks in "
                          f"deterministic mode; use at least {run.workers}")
    if run.batch_size % m:
        raise ConfigError(f"run.batch_size: the global batch ({run.batch_size}) must be a multiple of "
                          f"run.micro_batches ({m}) in deterministic mode")


def model_options(given: dict, defaults: dict, family: str) -> dict:
    """A family's hyper-parameters: `defaults` overlaid with `given` ([model] table); unknown keys and values of
    the wrong type raise ConfigError naming `model.<key>`. Types follow the defaults (an int default accepts only
    ints, a float default ints or floats, a list default a list)."""
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        name = f"model.{key}"
        if key not in defaults:
            raise ConfigError(f"{name}: unknown key for model {family!r}{did_you_mean(key, defaults)}; "
                              f"known: {', '.join(sorted(defaults))}")
        d = defaults[key]
        t = type(d) if d is not None else None
        if t is list:
            item_t = type(d[0]) if d else None
            value = _coerce(name, value, list[item_t] if item_t in (int, float, str, bool) else list)
        elif t in (bool, int, float, str, dict):
            value = _coerce(name, value, t)
        out[key] = value
    return out


# -- output ----------------------------------------------------------------------------------------------------------
def to_toml_dict(cfg: Config) -> dict:
    return cfg.to_dict()


def write_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML, atomically (temp file + fsync + rename)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        tomli_w.dump(to_toml_dict(cfg), f)


def config_hash(cfg: Config) -> str:
    """A short hash of the resolved config (canonical JSON); ranks compare it at start-up."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. a checkpoint's JSON, a worker's config.toml)."""
    return validate(merge_dict(Config(), copy.deepcopy(data)))


def describe() -> list[tuple[str, Any, str]]:
    """(dotted name, default, doc) of every fixed field: for --help style listings."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{section}.{f.name}", default, f.metadata.get("doc", "")))
    return rows
