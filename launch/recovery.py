"""The failure and recovery settings of a distributed run, from the config (launch/launch_mpi.py,
launch/launch_ray.py hand them to the coordinator and the Ray group supervisor as plain numbers).

    settings = recovery_settings(cfg)     # {"max_restarts", "heartbeat_timeout", "stall_timeout"}
"""
from __future__ import annotations

import os


# recovery settings: the config field when set (>= 0), else these environment variables, else the default
RECOVERY = {  # name: (config section, environment variable, default)
    "max_restarts": ("cluster", "NDTRAIN_MAX_RESTARTS", 3),
    "heartbeat_timeout": ("cluster", "NDTRAIN_HEARTBEAT_TIMEOUT", 30.0),
    "stall_timeout": ("cluster", "NDTRAIN_STALL_TIMEOUT", 20.0),
}


def recovery_settings(cfg, env=None) -> dict:
    """{"max_restarts": int (Ray: group restarts allowed), "heartbeat_timeout": s (a rank silent that long has
    failed), "stall_timeout": s (peers waiting that long in a collective: the rank they wait for is hung)}."""
    env = os.environ if env is None else env
    out = {}
    for name, (section, var, default) in RECOVERY.items():
        value = getattr(getattr(cfg, section, None), name, None)
        if value is not None and value < 0:  # the config's "automatic": environment, else default
            value = None
        if value is None and env.get(var, "") != "":
            try:
                value = type(default)(float(env[var]))
            except ValueError:
                raise ValueError(f"{var}={env[var]!r}: expected a number ({name})") from None
        value = default if value is None else value
        if value < 0:
            raise ValueError(f"{name} ({section}.{name} or {var}): must be >= 0, got {value}")
        out[name] = value
    return out
