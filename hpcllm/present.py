"""How the CLI shows things to people: sizes and tables, the same in every command."""

from __future__ import annotations

import os
import sys

# Wide enough for `hpcllm status`'s widest table without wrapping its cells one word per line.
PIPED_WIDTH = 200


def human_size(nbytes: float) -> str:
    """Binary units, as the checkpoint and cache sizes are counted: `976.1 KiB`, `1.8 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def table_console():
    """A rich console for tables: the terminal's width (or $COLUMNS); piped into a file, `less` or `grep`, a fixed
    wide line (rich would otherwise assume 80 columns and fold every cell into a narrow column). Cells are data
    (an agent's error, `[rank 0/2]`): square brackets and `:name:` print as they are, never as rich markup or emoji."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH
    return Console(width=width, markup=False, emoji=False)
