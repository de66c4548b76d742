"""The interface the worker loop is written against. Nothing here knows about layers or data."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Handle(ABC):
    """A pending non-blocking operation (`iallreduce`)."""

    @abstractmethod
    def wait(self) -> None: ...


class DoneHandle(Handle):
    def wait(self) -> None:
        return None


class Communicator(ABC):
    rank: int
    world_size: int
    # Does iallreduce make progress in the background while the caller computes? Only then is it worth starting
    # all-reduces bucket by bucket during backward; a blocking transport would only add synchronisation points.
    overlaps_compute: bool = False

    @abstractmethod
    def allreduce(self, buf: np.ndarray) -> None:
        """Sum `buf` across ranks, in place (contiguous array)."""

    def iallreduce(self, buf: np.ndarray) -> Handle:
        """Start an in-place sum; the result is in `buf` after `handle.wait()`. Default: blocking."""
        self.allreduce(buf)
        return DoneHandle()

    @abstractmethod
    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrite `buf` on every rank with root's, in place."""

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def allgather_obj(self, obj: Any) -> list:
        """Gather one small JSON-able record from every rank (off the hot path: config hashes, checksums)."""

    def close(self) -> None:
        pass
