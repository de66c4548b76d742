"""The hint "did you mean ...?" for a mistyped task, model or config key (difflib's close matches).

    raise ConfigError(f"run.task: unknown task {name!r}{did_you_mean(name, TASKS)}; built-in tasks: ...")
"""
from __future__ import annotations

import difflib
from typing import Iterable


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to n choices close to word, best first (difflib ratio >= 0.6), case-insensitively."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    return [lower[m] for m in difflib.get_close_matches(str(word).lower(), list(lower), n=n, cutoff=0.6)]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """The hint " (did you mean 'x'?)" (or "'x' or 'y'"), or '' when nothing is close."""
    found = close_matches(word, choices)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


__all__ = ["did_you_mean", "close_matches"]
