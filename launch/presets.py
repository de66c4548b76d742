"""The task presets: configs/<task>.toml beside the package (an editable install: the repo's configs/) or inside it
(an installed wheel: ndtrain/configs). `ndtrain train --task T` and `ndtrain.train(task=T)` start from T's preset."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
PRESET_DIRS = (_HERE.parent / "configs", _HERE / "configs")


def preset_path(task: str) -> Path | None:
    for d in PRESET_DIRS:
        if (d / f"{task}.toml").is_file():
            return d / f"{task}.toml"
    return None


def preset_names() -> list[str]:
    return sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.toml")})
