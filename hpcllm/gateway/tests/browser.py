"""Headless Chromium (Debian's `chromium` package, installed by `make test`) for page tests.

Each call runs one browser process with its own throw-away profile, so tests may run side by side. The page's
scripts run under a virtual-time budget: fetches to the live server complete, timers fire, then the DOM is dumped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Screenshots outlive pytest's temporary folders (which keep only the last few runs).
ARTIFACTS_DIR = Path(os.environ.get("HPCLLM_TEST_ARTIFACTS", "/var/tmp/hpcllm-test-artifacts"))
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", "--window-size=1400,1000")


def chromium() -> str:
    """The browser's path; without one, a skip (a failure under CI, where `make test` installs it)."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    reason = "no headless Chromium for the page tests: `make test-host` (or `apt-get install chromium`) installs it"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the page tests: {reason}", pytrace=False)
    pytest.skip(reason)


def _run(url: str, *args: str, budget_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="hpcllm-chromium-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                               *args, url], capture_output=True, text=True, timeout=timeout_s)


def dump_dom(url: str, budget_ms: int = 5000, timeout_s: float = 120) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time."""
    result = _run(url, "--dump-dom", budget_ms=budget_ms, timeout_s=timeout_s)
    assert result.returncode == 0, f"chromium exited {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


def screenshot(url: str, name: str, budget_ms: int = 5000, timeout_s: float = 120) -> Path:
    """A PNG of the page after its scripts ran, kept as ARTIFACTS_DIR/name (evidence of what it shows)."""
    path = ARTIFACTS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    result = _run(url, f"--screenshot={path}", budget_ms=budget_ms, timeout_s=timeout_s)
    assert result.returncode == 0 and path.exists() and path.stat().st_size > 0, \
        f"no screenshot from chromium ({result.returncode}): {result.stderr[-2000:]}"
    return path


# Reading the status page's dumped DOM (hpcllm/gateway/status/page.html): its tables and summary chips.


def rows(dom: str, table: str) -> list[str]:
    """The <tr> elements of a table's body."""
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, f"no table {table} in the page"
    return re.findall(r"<tr.*?</tr>", body.group(1), re.S)


def cells(row: str) -> list[str]:
    """The text of each cell, tags dropped and spaces collapsed."""
    return [" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def summary(dom: str, label: str) -> str:
    """The value of a summary chip."""
    match = re.search(rf'data-summary="{label}">[^<]*<b>([^<]*)</b>', dom)
    assert match, f"no summary chip {label!r}"
    return match.group(1)
