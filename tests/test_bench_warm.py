"""bench/warm.py: both ways of warming the node caches start from a cold origin, as its docstring says."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import warm  # noqa: E402

from hpcllm.store.readers import cached_fraction  # noqa: E402


def test_drop_cache_leaves_a_just_written_origin_cold():
    # The bench converts the origin and drops its pages right away, then times the broadcast: the pages were still
    # dirty, DONTNEED kept them, and the broadcast (timed first) read a warm origin while the independent copies
    # (timed second, pages written back by then) read a cold one.
    with tempfile.TemporaryDirectory(prefix="bench-warm-", dir="/var/tmp") as tmp:  # the bench's disk, not tmpfs
        origin = Path(tmp)
        data = origin / "data-0.h5"
        data.write_bytes(os.urandom(16 << 20))
        warm.drop_cache(origin)
        assert cached_fraction(data) < 0.1
