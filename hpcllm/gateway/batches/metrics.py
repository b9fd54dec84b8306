"""The Files and Batch APIs' gauges, read from the limits database at each scrape (aggregates over columns the
writes keep, never a batch's JSON): what the database holds is the same for every gateway process and host, so no
process's copy can be stale (several hosts report the same values: aggregate them with max, not sum). The counters
(requests written, batches ended) are hpcllm.gateway.metrics'."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hpcllm.gateway.batches import ACTIVE
from hpcllm.gateway.batches.store import BatchStore
from hpcllm.gateway.files.store import FileStore

log = logging.getLogger(__name__)


class BatchGauges(Collector):
    def __init__(self, files: FileStore, batches: BatchStore, clock: Callable[[], float] = time.time):
        self.files, self.batches, self.clock = files, batches, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            queue = self.batches.queue()
            count, size = self.files.stored()
        except Exception as exc:  # the database is away: /metrics still answers, without these
            log.warning("metrics: could not read the batches and files from the limits database: %s", exc)
            return
        by_status = GaugeMetricFamily("hpcllm_batches", "Batches not yet ended, by status.", labels=["status"])
        for status in ACTIVE:
            by_status.add_metric([status], queue.get(status, (0,))[0])
        yield by_status
        running = queue.get("in_progress")
        yield GaugeMetricFamily("hpcllm_batch_requests_waiting",
                                "Requests of in_progress batches that have no result yet (the batch queue).",
                                value=running[1] if running else 0)
        yield GaugeMetricFamily("hpcllm_batch_oldest_in_progress_age_seconds",
                                "Seconds since the oldest in_progress batch was created (0: none); a batch expires "
                                "24 h after its creation.", value=self.clock() - running[2] if running else 0)
        yield GaugeMetricFamily("hpcllm_files", "Files stored (uploads and batch outputs), expired ones aside.",
                                value=count)
        yield GaugeMetricFamily("hpcllm_files_bytes", "Bytes of the files stored, expired ones aside.", value=size)
