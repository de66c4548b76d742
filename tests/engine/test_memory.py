"""engine/memory.py: glibc is told to keep freed memory for reuse (M_TRIM_THRESHOLD / M_MMAP_THRESHOLD)."""
import platform

import pytest

from ndtrain.engine.memory import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retain_freed_memory_is_accepted_by_glibc():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # and again: idempotent
