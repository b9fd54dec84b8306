"""Slurm hostlist expressions (`n[1-4,7]`, `a[01-03]b`, `gpu[1-2]-[a,b]`, `n1,n3`) -> node names.

`expand_nodes` asks Slurm (`scontrol show hostnames`) when it can, so site-specific forms behave exactly as in
Slurm; `expand_hostlist` is the pure-Python fallback: comma-separated items, each with any number of bracket groups
of comma-separated numbers or `lo-hi` ranges (zero padding kept from `lo`), expanded as a cartesian product in order.
As in Slurm's hostlist.c, a range that goes backwards (`n[3-1]`) is an error and one range holds at most
MAX_RANGE names; and as `scontrol show hostnames` does, names keep their order and repeats (`n[1,1]` is n1 twice,
`n[2,1]` n2 then n1): a per-task list names a node once per task. A caller that wants each node once drops the
repeats itself. hpcllm.slurm.adapter reads the hostlists Slurm prints with `expand_hostlist` too.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from hpcllm.errors import HpcllmError
from hpcllm.slurm.environment import run_slurm_command

MAX_HOSTS = 100_000  # names in one node list
MAX_RANGE = 64 * 1024  # names in one lo-hi range: Slurm's own limit (MAX_RANGE in src/common/hostlist.c)
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class HostlistError(HpcllmError):
    """A node list that is not valid hostlist syntax."""

    exit_code = 2


def split_top_level(expr: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in expr:
        if char == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"node list {expr!r}: nested '[' is not hostlist syntax")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"node list {expr!r}: ']' without a matching '['")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise HostlistError(f"node list {expr!r}: '[' without a matching ']'")
    items.append("".join(current))
    return items


def _expand_group(body: str, expr: str) -> list[str]:
    values = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise HostlistError(f"node list {expr!r}: [{body}] must hold numbers or ranges like 1-4 or 01-03")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise HostlistError(f"node list {expr!r}: range {low}-{high} goes backwards; write it {high}-{low}")
        if int(high) - int(low) + 1 > MAX_RANGE:
            raise HostlistError(f"node list {expr!r}: range {low}-{high} is too large: {int(high) - int(low) + 1} "
                                f"names, and Slurm takes at most {MAX_RANGE} in one range")
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def expand_item(item: str, expr: str | None = None) -> list[str]:
    """One item of a node list (no top-level comma) -> its names; HostlistError names `expr` (default: the item)."""
    expr = item if expr is None else expr
    if len(split_top_level(item)) != 1:  # also raises for unbalanced or nested brackets
        raise HostlistError(f"node list {expr!r}: {item!r} is more than one item")
    if "[]" in item:
        raise HostlistError(f"node list {expr!r}: empty []")
    names = [""]
    for text, group in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
        names = [name + text for name in names]
        if group:
            names = [name + value for name in names for value in _expand_group(group, expr)]
        if len(names) > MAX_HOSTS:
            raise HostlistError(f"node list {expr!r} expands to more than {MAX_HOSTS} names")
    return names


def expand_hostlist(expr: str) -> list[str]:
    """Pure-Python expansion, in order with repeats, as `scontrol show hostnames` prints it."""
    expr = (expr or "").strip()
    if not expr:
        raise HostlistError("node list is empty; give node names like n1,n2 or n[1-4]")
    if re.search(r"\s", expr):
        raise HostlistError(f"node list {expr!r} must not contain spaces")
    names: list[str] = []
    for item in split_top_level(expr):
        if not item:
            raise HostlistError(f"node list {expr!r} has an empty item (two commas, or a trailing comma)")
        names.extend(expand_item(item, expr))
    return names


def expand_nodes(expr: str, timeout: float = 10.0) -> list[str]:
    """Expand with Slurm when `scontrol` works here, else with the pure-Python expander."""
    fallback = expand_hostlist(expr)  # validates; also the answer when Slurm cannot be asked
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return fallback
    try:
        result = run_slurm_command([scontrol, "show", "hostnames", expr], timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return fallback
    names = result.stdout.split()
    return names if result.returncode == 0 and names else fallback
