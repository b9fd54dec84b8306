"""What the Files and Batch APIs hold in one gateway process: the file store, the batch store and the runner."""

from __future__ import annotations

from flask import Flask, current_app

from hpcllm.config import Config
from hpcllm.gateway.batches.metrics import BatchGauges
from hpcllm.gateway.batches.runner import BatchRunner
from hpcllm.gateway.batches.store import BatchStore
from hpcllm.gateway.files.store import EXTENSION_KEY as FILES_KEY
from hpcllm.gateway.files.store import FileStore
from hpcllm.gateway.runtime import Gateway

EXTENSION_KEY = "hpcllm_batches"


class BatchService:
    def __init__(self, app: Flask, gw: Gateway):
        self.config: Config = gw.config
        self.metrics = gw.metrics
        self.router = gw.router  # the models a batch may name
        self.files = FileStore.of(gw.config, gw.shared)
        self.batches = BatchStore(self.files, lease_s=gw.config.gateway.batch_lease_seconds)
        self.files.in_use = self.batches.active_inputs  # kept from deletion and the sweep while a batch reads them
        self.runner = BatchRunner(app, gw, self.files, self.batches)

    @classmethod
    def install(cls, app: Flask, gw: Gateway) -> BatchService:
        """Attach to the app and start this process's runner (gunicorn builds the app in each worker process)."""
        service = cls(app, gw)
        app.extensions[EXTENSION_KEY] = service
        app.extensions[FILES_KEY] = service.files
        gw.metrics.add_collector(BatchGauges(service.files, service.batches))
        service.runner.start()
        gw.on_close(service.runner.close)
        return service


def current_batches() -> BatchService:
    return current_app.extensions[EXTENSION_KEY]
