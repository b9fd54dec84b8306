"""Prometheus metrics of the gateway: vLLM's request metrics under the hpcllm_ prefix, plus cold starts.

Names follow vLLM (`vllm:time_to_first_token_seconds` -> `hpcllm_time_to_first_token_seconds`, each with a
`model_name` label); Prometheus reserves ':' for recording rules, hence the underscore. Under gunicorn every
worker process writes its samples to mmap files in PROMETHEUS_MULTIPROC_DIR (prometheus_client multiprocess
mode, chosen when prometheus_client is first imported, so the CLI sets the variable before importing the app)
and /metrics aggregates them; without the variable (tests, a single werkzeug process) a private registry is used.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess, values)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# Client-visible gap of a live migration: a few ms (hand-over of a couple of tokens) up to a whole re-prefill.
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                 30.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)


def multiprocess_enabled() -> bool:
    return values.ValueClass is not values.MutexValue


class GatewayMetrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_enabled()
        if os.environ.get(MULTIPROC_ENV) and not self.multiprocess:
            log.warning("%s is set but prometheus_client was imported before it: /metrics shows this process only",
                        MULTIPROC_ENV)
        self.registry = CollectorRegistry()
        self._collectors: list[Collector] = []  # read at each scrape (add_collector)
        reg = self.registry
        model = ["model_name"]
        self.time_to_first_token = Histogram(
            "hpcllm_time_to_first_token_seconds", "Seconds from request arrival to the first generated token.",
            model, buckets=TTFT_BUCKETS, registry=reg)
        self.inter_token_latency = Histogram(
            "hpcllm_inter_token_latency_seconds", "Seconds between two generated tokens of one request.",
            model, buckets=ITL_BUCKETS, registry=reg)
        self.e2e_request_latency = Histogram(
            "hpcllm_e2e_request_latency_seconds",
            "Seconds from request arrival to its end (its last token, or its failure), of every request a worker "
            "took.",
            model, buckets=E2E_BUCKETS, registry=reg)
        self.request_queue_time = Histogram(
            "hpcllm_request_queue_time_seconds",
            "Seconds a request waited for a ready model instance (routing, queueing, cold start), once per request.",
            model, buckets=E2E_BUCKETS, registry=reg)
        self.num_requests_running = Gauge(
            "hpcllm_num_requests_running", "Requests streaming tokens from a worker now.",
            model, multiprocess_mode="livesum", registry=reg)
        self.num_requests_waiting = Gauge(
            "hpcllm_num_requests_waiting", "Requests waiting for a ready model instance now.",
            model, multiprocess_mode="livesum", registry=reg)
        self.prompt_tokens = Counter(
            "hpcllm_prompt_tokens", "Prompt tokens of requests a worker took.", model, registry=reg)
        self.generation_tokens = Counter(
            "hpcllm_generation_tokens", "Generated tokens sent to clients.", model, registry=reg)
        # By the key's group ("" without one), not by key: a site's keys would be too many series.
        self.group_prompt_tokens = Counter(
            "hpcllm_group_prompt_tokens", "Prompt tokens of finished requests, by the API key's group.",
            model + ["group"], registry=reg)
        self.group_generation_tokens = Counter(
            "hpcllm_group_generation_tokens", "Generated tokens of finished requests, by the API key's group.",
            model + ["group"], registry=reg)
        self.usage_records_dropped = Counter(
            "hpcllm_usage_records_dropped",
            "Finished requests left out of usage accounting (the limits database refused or was away).",
            registry=reg)
        self.request_success = Counter(
            "hpcllm_request_success", "Requests that finished generating, by finish reason.",
            model + ["finished_reason"], registry=reg)
        self.http_requests = Counter(
            "hpcllm_http_requests", "HTTP requests answered by the gateway, by endpoint and status code.",
            ["endpoint", "status"], registry=reg)
        self.cold_starts = Counter(
            "hpcllm_cold_starts",
            "Model instance loads (cold starts) by the storage tier they loaded from; each instance counts once, "
            "when the gateway first routes to it.", ["model_name", "tier"], registry=reg)
        self.resumes = Counter(
            "hpcllm_request_resumes",
            "Generations moved to another instance after theirs went away mid-stream (token-based migration).",
            model, registry=reg)
        self.migrations = Counter(
            "hpcllm_request_migrations",
            "Generations that went on on another instance through live migration (attached to the destination).",
            model, registry=reg)
        self.migration_pause = Histogram(
            "hpcllm_migration_pause_seconds",
            "Seconds between the last token from a live migration's source and the first from its destination.",
            model, buckets=PAUSE_BUCKETS, registry=reg)
        self.model_load_seconds = Histogram(
            "hpcllm_model_load_seconds", "Seconds a model instance took to load, by storage tier.",
            ["tier"], buckets=LOAD_BUCKETS, registry=reg)
        self.batch_requests = Counter(
            "hpcllm_batch_requests", "Requests of batches written to their output (completed) or error file "
            "(failed, expired ones included), by the batch's model (\"\" for a model this gateway does not serve).",
            model + ["status"], registry=reg)
        self.batches_finished = Counter(
            "hpcllm_batches_finished", "Batches that ended, by their final status (completed, failed, expired, "
            "cancelled).", ["status"], registry=reg)

    def add_collector(self, collector: Collector) -> None:
        """Metrics read at each scrape (from the limits database: the same for every process and host), outside
        the multiprocess files."""
        self._collectors.append(collector)
        if not self.multiprocess:
            self.registry.register(collector)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            for collector in self._collectors:
                registry.register(collector)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges from the aggregate."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
