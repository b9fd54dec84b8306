"""A *ForSequenceClassification checkpoint (a reranker) through hpcllm's own path: converted, loaded by the store
into the sequence-classification class its config names, and pooled by the engine (in process and in a model
process) into the logits transformers gives; it refuses to generate."""

from __future__ import annotations

import pytest
import torch

from hpcllm.store.loader import load_model
from hpcllm.store.tests.test_loader import assert_same_model
from hpcllm.worker.protocol import GenerateRequest
from hpcllm.worker.requests import InvalidRequest

PAIRS = [("what is the capital of france", "paris is the capital of france"), ("hello", "the cat sat on the mat")]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    """(transformers' model, its converted checkpoint) of a seeded one-label Qwen2 classifier."""
    from transformers import AutoModelForSequenceClassification

    from hpcllm.checkpoint import convert
    from hpcllm.devmodels import make_model
    root = tmp_path_factory.mktemp("reranker")
    hf_dir = make_model("qwen2", root / "hf", num_labels=1, seed=3)
    return AutoModelForSequenceClassification.from_pretrained(hf_dir).eval(), convert(hf_dir, root / "ckpt",
                                                                                     progress=False).root


def test_the_store_loads_a_classifier_as_transformers_does(reranker):
    reference, converted = reranker
    loaded = load_model(converted, tokenizer=False).model
    assert type(loaded).__name__ == "Qwen2ForSequenceClassification"
    assert_same_model(reference, loaded)


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "model-process"])
def reranker_engine(request, reranker):
    """An engine over the reranker, in process and in a model process (its start takes a model process's imports:
    seconds), that the tests only ask for logits: pieces of at most 256 padded tokens."""
    from hpcllm.worker.engine import Engine

    loaded, tokenizer, _ = load_model(reranker[1])  # a copy of its own: an engine's fast path packs its weights
    engine = Engine(loaded, tokenizer, model_name="reranker", model_process=request.param,
                    prefill_chunk_tokens=256).start()
    yield engine
    engine.shutdown()


def test_the_engine_pools_the_heads_logits_and_does_not_generate(reranker, reranker_engine):
    reference, _ = reranker
    engine, tokenizer = reranker_engine, reranker_engine.tokenizer
    inputs = [tokenizer(query, document)["input_ids"] for query, document in PAIRS]
    with torch.no_grad():
        want = [reference(torch.tensor([ids])).logits[0].tolist() for ids in inputs]
    assert engine.classifies
    logits = engine.embed(inputs)
    assert [len(row) for row in logits] == [1, 1]
    assert logits == [pytest.approx(row, abs=1e-5) for row in want]
    with pytest.raises(InvalidRequest, match="'reranker' is a classification model"):
        engine.submit(GenerateRequest(request_id="r", prompt="hello", max_tokens=2))


def test_a_rerank_of_passages_of_very_different_lengths_is_pooled_in_pieces_as_one_at_a_time(reranker,
                                                                                            reranker_engine,
                                                                                            monkeypatch):
    """The query against 12 passages, in pieces of at most prefill_chunk_tokens padded tokens: each logit is
    transformers' for the pair alone, in the call's order."""
    reference, _ = reranker
    engine, tokenizer = reranker_engine, reranker_engine.tokenizer
    passages = [" ".join(["paris is the capital of france"] * n) for n in (1, 12, 2, 5, 1, 9, 3, 20, 2, 7, 4, 1)]
    inputs = [tokenizer(PAIRS[0][0], passage)["input_ids"] for passage in passages]
    with torch.no_grad():
        want = [reference(torch.tensor([ids])).logits[0].tolist() for ids in inputs]
    pieces: list[int] = []
    embed = engine._embed
    monkeypatch.setattr(engine, "_embed", lambda piece: pieces.append(len(piece)) or embed(piece))
    logits = engine.embed(inputs)
    assert logits == [pytest.approx(row, abs=1e-5) for row in want]
    # 26 to 292 tokens, shortest first: 5 x 40 padded tokens, 3 x 82, then one each (two would pass 256)
    assert pieces == [5, 3, 1, 1, 1, 1]
