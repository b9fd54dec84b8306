"""The gateway's tokenizer cache (hpcllm/gateway/tokenization.py)."""

from __future__ import annotations

import threading

from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.tokenization import TokenizerCache

from .conftest import MODEL


def test_the_first_requests_for_a_model_arriving_together_load_its_tokenizer_once(tiny_model_dir, monkeypatch):
    """Each used to load its own copy (CPU for nothing at every cold start), and two threads racing through
    transformers' lazy imports in a fresh process failed one request with a 500 (ImportError)."""
    loads = []
    load = TokenizerCache._load

    def counted_load(name, source):
        loads.append(name)
        return load(name, source)

    monkeypatch.setattr(TokenizerCache, "_load", staticmethod(counted_load))
    cache = TokenizerCache()
    card = ModelCard(name=MODEL, source=tiny_model_dir, max_model_len=512, created=0)
    together = threading.Barrier(4)
    encoders = []

    def first_request():
        together.wait()
        encoders.append(cache.get(card))

    threads = [threading.Thread(target=first_request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [MODEL]
    assert len(encoders) == 4 and all(encoder is encoders[0] for encoder in encoders)
    assert encoders[0].encode("hello world")
