"""How sizes and tables look in every command's output."""

from __future__ import annotations

import pytest

from hpcllm.present import human_size, table_console


@pytest.mark.parametrize("nbytes, shown", [(0, "0 B"), (1023, "1023 B"), (999_477, "976.1 KiB"),
                                           (1_900_000_000, "1.8 GiB"), (3 * 1024**5, "3072.0 TiB")])
def test_sizes_read_the_same_in_every_command(nbytes, shown):
    assert human_size(nbytes) == shown


def test_a_piped_table_keeps_each_row_on_one_line(capsys, monkeypatch):
    """`hpcllm status | grep MODEL` must find whole rows: rich alone assumes 80 columns when not on a terminal and
    folds long cells (instance ids, placement estimates) over several lines."""
    from rich.table import Table

    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table(*(f"column {i}" for i in range(6)))
    cells = [f"tiny-llama-8bb3fe57-cell-{i}" for i in range(6)]
    table.add_row(*cells)
    table_console().print(table)
    [row] = [line for line in capsys.readouterr().out.splitlines() if "cell-0" in line]
    assert all(cell in row for cell in cells)
