"""What the bench scripts share: how a run names its result files, and the usage error for a count below its
minimum."""

from __future__ import annotations

import itertools
import os
from datetime import datetime
from pathlib import Path


def new_result_stem(out: Path, prefix: str) -> Path:
    """out/<prefix>-<time>, the stem of one run's result files (<stem>.json, <stem>.png, ...), claimed by creating
    <stem>.json. The time is to the second, as people read it; a run that finds its second's name taken (two runs
    in one second) gets <time>-2, -3, ... instead of overwriting the other run's files."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for number in itertools.count(1):
        stem = out / (f"{prefix}-{stamp}" if number == 1 else f"{prefix}-{stamp}-{number}")
        try:
            os.close(os.open(f"{stem}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return stem
    raise AssertionError("unreachable")


def require_at_least(parser, args, minimum: int, *names: str) -> None:
    """A usage error (parser.error: one line, exit 2) naming the first of the arguments `names` (their dest names)
    that is, or has a value, below `minimum`: a count or size of 0 or less ran nothing, ran forever or failed later
    with a traceback."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and v < minimum for v in values):
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, not {' '.join(map(str, values))}")
