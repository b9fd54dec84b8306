"""The docs name what operators see: every Prometheus metric the gateway, a worker and the controller export is
described in docs/ (by its name, or a counter's `_total` sample name), so a dashboard's builder finds what it
means and a metric added without a word fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def exported_metrics(name: str, tmp_path: Path) -> list[str]:
    """The metric families one component registers (the gateway's batch gauges, read at scrape, included)."""
    if name == "gateway":
        from hpcllm.gateway.batches.metrics import BatchGauges
        from hpcllm.gateway.batches.store import BatchStore
        from hpcllm.gateway.files.store import FileStore
        from hpcllm.gateway.metrics import GatewayMetrics
        from hpcllm.gateway.shared_state import SharedState

        shared = SharedState(tmp_path / "limits.db")
        try:
            files = FileStore(shared, tmp_path / "files", max_bytes=1)
            gauges = [f.name for f in BatchGauges(files, BatchStore(files, lease_s=60)).collect()]
            assert gauges, "the batch gauges read nothing from the limits database"
            return [f.name for f in GatewayMetrics().registry.collect()] + gauges
        finally:
            shared.close()
    if name == "worker":
        from hpcllm.worker.metrics import WorkerMetrics

        return [f.name for f in WorkerMetrics("m").registry.collect()]
    from hpcllm.controller.app import Metrics

    return [f.name for f in Metrics().registry.collect()]


@pytest.mark.parametrize("component", ["gateway", "worker", "controller"])
def test_every_exported_metric_is_described_in_the_docs(component, tmp_path):
    text = "\n".join(path.read_text() for path in sorted(DOCS.glob("*.md")))
    names = exported_metrics(component, tmp_path)
    assert names
    missing = [n for n in names if n not in text]
    assert not missing, f"{component} metrics no docs/*.md describes: {missing}"


def test_every_config_key_is_named_in_the_docs_or_the_example_configs():
    """Each key of every config section appears in docs/*.md or conf/ (its meaning and default live in
    hpcllm/config.py's comments; the docs say where it acts), so an operator reading the docs finds every knob."""
    from pydantic import BaseModel

    from hpcllm.config import Config

    root = DOCS.parent
    text = "\n".join(path.read_text() for path in [*sorted(DOCS.glob("*.md")), *sorted(root.glob("conf/**/*.toml"))])
    keys = [f"{section}.{key}" for section, field in Config.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            for key in field.annotation.model_fields]
    assert len(keys) > 100
    missing = [key for key in keys if key.split(".")[1] not in text]
    assert not missing, f"config keys no docs/*.md or conf/ file names: {missing}"
