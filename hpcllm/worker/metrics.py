"""Prometheus metrics of one worker: vLLM's names with the hpcllm_ prefix (':' is reserved for recording rules).

Each worker keeps its own CollectorRegistry, so several engines in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets from vLLM's metrics (seconds), trimmed to the ranges a CPU or single-GPU worker sees.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


class WorkerMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "hpcllm_time_to_first_token_seconds", "Time from arrival to the first generated token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "hpcllm_inter_token_latency_seconds", "Time between consecutive generated tokens.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "hpcllm_e2e_request_latency_seconds", "Time from arrival to the end of a request.", _REQUEST_BUCKETS
        )
        self.request_queue_time = histogram(
            "hpcllm_request_queue_time_seconds", "Time a request waited before its first step.", _REQUEST_BUCKETS
        )
        self.num_requests_running = Gauge(
            "hpcllm_num_requests_running", "Requests being generated.", labels, registry=self.registry
        ).labels(model_name)
        self.num_requests_waiting = Gauge(
            "hpcllm_num_requests_waiting", "Requests queued for a slot.", labels, registry=self.registry
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "hpcllm_prompt_tokens", "Prefilled prompt tokens.", labels, registry=self.registry
        ).labels(model_name)
        self.generation_tokens = Counter(
            "hpcllm_generation_tokens", "Generated tokens.", labels, registry=self.registry
        ).labels(model_name)
        self.preemptions = Counter(
            "hpcllm_num_preemptions", "Requests preempted (KV cache full) to be recomputed later.", labels,
            registry=self.registry,
        ).labels(model_name)
        self.prefix_cache_queries = Counter(
            "hpcllm_prefix_cache_queries", "Known tokens of admitted requests (looked up in the prefix cache).",
            labels, registry=self.registry,
        ).labels(model_name)
        self.prefix_cache_hits = Counter(
            "hpcllm_prefix_cache_hits", "Tokens whose KV came from the prefix cache instead of a prefill.", labels,
            registry=self.registry,
        ).labels(model_name)
        # Speculative decoding (vLLM's spec_decode_num_draft_tokens / num_accepted_tokens): acceptance = their ratio.
        self.spec_proposed_tokens = Counter(
            "hpcllm_spec_decode_num_draft_tokens", "Tokens proposed by n-gram speculation and verified.", labels,
            registry=self.registry,
        ).labels(model_name)
        self.spec_accepted_tokens = Counter(
            "hpcllm_spec_decode_num_accepted_tokens", "Proposed tokens that greedy decoding confirmed.", labels,
            registry=self.registry,
        ).labels(model_name)
        self._request_success = Counter(
            "hpcllm_request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._model_load = Gauge(
            "hpcllm_model_load_seconds",
            "Seconds this worker took to load its model, by the tier it loaded from.",
            ["model_name", "tier"],
            registry=self.registry,
        )

    def request_finished(self, finish_reason: str) -> None:
        self._request_success.labels(self.model_name, finish_reason).inc()

    def model_loaded(self, tier: str, seconds: float) -> None:
        self._model_load.labels(self.model_name, tier).set(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
