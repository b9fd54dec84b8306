"""vLLM's scoring APIs on an embedding (bi-encoder) model, through a real gateway and the tiny model's worker:
/v1/score and /v1/rerank (/v2/rerank, /score, /rerank) score a pair by the cosine similarity of its texts'
/v1/embeddings vectors, rerank orders by it, and bad requests are 400s naming the field."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from .conftest import MODEL
from .test_errors import assert_error
from .test_usage import ALICE, KEYS, admin_usage

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "the cat sat on the mat", "france", "berlin is in germany"]


def embeddings(gateway, texts: list[str]) -> list[list[float]]:
    resp = gateway.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"})
    return [item["embedding"] for item in resp.json()["data"]]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def prompt_tokens(hf_pair, texts: list[str]) -> int:
    return sum(len(hf_pair[1](text)["input_ids"]) for text in texts)


def test_scores_are_the_cosine_of_the_embeddings_one_query_to_many_or_pairwise(gateway, hf_pair):
    query_vector, *document_vectors = embeddings(gateway, [QUERY, *DOCUMENTS])
    want = [cosine(query_vector, d) for d in document_vectors]
    resp = gateway.post("/v1/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["object"] == "list" and answer["model"] == MODEL and answer["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in answer["data"]] == [(i, "score") for i in range(len(DOCUMENTS))]
    assert [d["score"] for d in answer["data"]] == pytest.approx(want, abs=1e-5)
    assert len(set(round(s, 4) for s in want)) == len(want)  # the documents' scores differ: the order is tested
    tokens = prompt_tokens(hf_pair, [QUERY, *DOCUMENTS])  # the query once, each document once (vLLM's count)
    assert answer["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}

    for spelling in ({"queries": [QUERY], "documents": DOCUMENTS}, {"data_1": QUERY, "data_2": DOCUMENTS},
                     {"queries": QUERY, "items": DOCUMENTS}):
        same = gateway.post("/score", json={"model": MODEL, **spelling}).json()
        assert [d["score"] for d in same["data"]] == pytest.approx(want, abs=1e-6)

    pairwise = gateway.post("/v1/score", json={"model": MODEL, "text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[2:]})
    assert [d["score"] for d in pairwise.json()["data"]] == pytest.approx(
        [cosine(document_vectors[0], document_vectors[2]), cosine(document_vectors[1], document_vectors[3])],
        abs=1e-5)


def test_rerank_orders_the_documents_by_score_and_keeps_the_top_n(gateway, hf_pair):
    query_vector, *document_vectors = embeddings(gateway, [QUERY, *DOCUMENTS])
    scores = [cosine(query_vector, d) for d in document_vectors]
    best_first = sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i])
    body = {"model": MODEL, "query": QUERY, "documents": DOCUMENTS}
    answer = gateway.post("/v1/rerank", json=body).json()
    assert answer["id"].startswith("score-") and answer["model"] == MODEL
    assert [r["index"] for r in answer["results"]] == best_first
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(
        [scores[i] for i in best_first], abs=1e-5)
    assert [r["document"] for r in answer["results"]] == [
        {"text": DOCUMENTS[i], "multi_modal": None} for i in best_first]
    tokens = prompt_tokens(hf_pair, [QUERY, *DOCUMENTS])
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    top = gateway.post("/v2/rerank", json={**body, "top_n": 2, "return_documents": False}).json()
    assert [(r["index"], "document" in r) for r in top["results"]] == [(best_first[0], False), (best_first[1], False)]
    assert gateway.post("/rerank", json={**body, "top_n": 10}).json()["results"] == answer["results"]


def test_bad_score_and_rerank_requests_are_400_naming_the_field(gateway, tiny_model_dir):
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    too_long = "hello world " * context
    rerank = {"model": MODEL, "query": QUERY}
    assert_error(gateway.post("/v1/rerank", json={**rerank, "documents": []}), 400, "invalid_request", "documents")
    assert_error(gateway.post("/v1/rerank", json={**rerank, "documents": ["a", too_long]}), 400,
                 "context_length_exceeded", "documents[1]")
    assert_error(gateway.post("/v1/rerank", json={**rerank, "query": ["a", "b"], "documents": ["c"]}), 400,
                 "invalid_value", "query")
    assert_error(gateway.post("/v1/rerank", json={"model": MODEL, "documents": ["a"]}), 400, "missing_field", "query")
    assert_error(gateway.post("/v1/rerank", json={**rerank, "documents": [{"content": [{"type": "image_url"}]}]}),
                 400, "unsupported_parameter", "documents[0]")
    assert_error(gateway.post("/v1/score", json={"model": MODEL, "text_1": too_long, "text_2": "a"}), 400,
                 "context_length_exceeded", "text_1")
    error = assert_error(gateway.post("/v1/score", json={"model": MODEL, "text_1": ["a", "b"],
                                                         "text_2": ["c", "d", "e"]}), 400, "invalid_request", "text_2")
    assert "1:1, 1:N or N:N" in error["message"]
    assert_error(gateway.post("/v1/score", json={"model": MODEL, "queries": "a"}), 400, "missing_field", "documents")
    assert_error(gateway.post("/v1/score", json={"model": MODEL, "text_1": "a", "text_2": [3]}), 400,
                 "invalid_value", "text_2[0]")
    for param in ("max_tokens_per_query", "max_tokens_per_doc"):
        error = assert_error(gateway.post("/v1/rerank", json={**rerank, "documents": ["b"], param: -1}), 400,
                             "invalid_value", param)
        assert error["message"] == f"{param} must be a non-negative integer"
        error = assert_error(gateway.post("/v1/score", json={"model": MODEL, "text_1": "a", "text_2": "b",
                                                             param: context}), 400, "invalid_value", param)
        assert error["message"] == f"{param} ({context}) must be less than max_model_len ({context})."
    error = assert_error(gateway.post("/v1/score", json={"model": MODEL, "text_1": "a", "text_2": ["b"] * 2048}),
                         400, "invalid_request", "text_2")
    assert "at most 2048 texts" in error["message"] and "2049" in error["message"]


def cut_by_hand(tokenizer, text: str, tokens: int) -> str:
    """text up to the end of its tokens-th token (special tokens not counted), by the tokenizer's offsets."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = text[:offsets[tokens - 1][1]]
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == tokens < len(offsets)  # it was cut
    return cut


def test_max_tokens_per_query_and_per_doc_cut_each_text_before_it_is_embedded(gateway, hf_pair):
    """Cohere's per-side limits (vLLM's): each query and document keeps its first tokens, the cut texts are what
    is embedded and counted; rerank still answers each document as it was sent."""
    tokenizer = hf_pair[1]
    query, documents = cut_by_hand(tokenizer, QUERY, 3), [cut_by_hand(tokenizer, d, 2) for d in DOCUMENTS[:2]]
    query_vector, *document_vectors = embeddings(gateway, [query, *documents])
    want = [cosine(query_vector, d) for d in document_vectors]
    limits = {"max_tokens_per_query": 3, "max_tokens_per_doc": 2}
    answer = gateway.post("/v1/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS[:2], **limits})
    assert answer.status_code == 200, answer.text
    assert [d["score"] for d in answer.json()["data"]] == pytest.approx(want, abs=1e-5)
    tokens = prompt_tokens(hf_pair, [query, *documents])
    assert answer.json()["usage"]["prompt_tokens"] == tokens

    ranked = gateway.post("/v2/rerank", json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS[:2],
                                              **limits}).json()
    assert sorted((r["index"], r["relevance_score"], r["document"]["text"]) for r in ranked["results"]) == [
        (i, pytest.approx(want[i], abs=1e-5), DOCUMENTS[i]) for i in range(2)]
    assert ranked["usage"]["prompt_tokens"] == tokens


def test_with_no_cross_encoder_a_score_naming_no_model_goes_to_the_one_bi_encoder(gateway):
    named = gateway.post("/v1/score", json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS}).json()
    answer = gateway.post("/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert answer["model"] == MODEL
    assert [d["score"] for d in answer["data"]] == pytest.approx([d["score"] for d in named["data"]], abs=1e-6)
    error = assert_error(gateway.post("/v1/classify", json={"input": "a"}), 400, "missing_field", "model")
    assert "none of the 1 served models answers classifications" in error["message"]


def test_a_request_naming_no_model_leaves_out_the_models_whose_worker_cannot_pool(make_gateway, tiny_model_dir,
                                                                                 worker_url):
    """vLLM's engine refuses the embed call: a model deployed on it (the controller's card says so) beside one that
    pools is no candidate for embeddings or scores naming no model, and a request naming it is refused before it is
    routed; two that pool are a 400 listing both."""
    import dataclasses

    from hpcllm.controller import protocol as controller_wire
    from hpcllm.gateway.routing import ControllerRouter

    from .test_resume import ScriptedRouter

    (on_vllm,) = ControllerRouter._cards(controller_wire.ModelCard(
        name="on-vllm", source=str(tiny_model_dir), max_model_len=512, gpus=1, size_bytes=1, created_at=0,
        engine="vllm"))
    router = ScriptedRouter(tiny_model_dir, [worker_url])
    router.list_models = lambda: [router.card, on_vllm]
    gateway = make_gateway(router=router)
    answer = gateway.post("/v1/embeddings", json={"input": [QUERY]}).json()
    assert answer["model"] == MODEL
    assert answer["data"][0]["embedding"] == pytest.approx(embeddings(gateway, [QUERY])[0], abs=1e-6)
    assert gateway.post("/v1/score", json={"text_1": QUERY, "text_2": "france"}).json()["model"] == MODEL
    resolved = len(router.resolved)
    for path, body in (("/v1/embeddings", {"input": "a"}), ("/v1/rerank", {"query": "a", "documents": ["b"]})):
        error = assert_error(gateway.post(path, json={"model": "on-vllm", **body}), 400, "invalid_request", "model")
        assert 'engine = "vllm"' in error["message"]
    assert len(router.resolved) == resolved  # refused before any instance of it is asked for (a cold start)

    router.list_models = lambda: [router.card, dataclasses.replace(router.card, name="other")]
    error = assert_error(gateway.post("/v1/embeddings", json={"input": "a"}), 400, "missing_field", "model")
    assert f"2 served models answer embeddings (other, {MODEL})" in error["message"]


def test_a_static_model_says_its_engine_and_one_on_vllm_is_no_candidate_for_pooling(make_gateway, tiny_model_dir,
                                                                                      worker_url):
    """A static model could not say it is served by a vLLM worker (taken as hpcllm's): beside a model that pools, an
    embeddings or score request naming no model was a 400 listing both, never answered. With engine = "vllm" it is
    no candidate, and a request naming it is refused before its worker is asked."""
    gateway = make_gateway(static_models={
        MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)},
        "on-vllm": {"worker_url": "http://127.0.0.1:9", "source": str(tiny_model_dir), "engine": "vllm"}})
    answer = gateway.post("/v1/embeddings", json={"input": [QUERY]})
    assert answer.status_code == 200 and answer.json()["model"] == MODEL, answer.text
    assert gateway.post("/v1/score", json={"text_1": QUERY, "text_2": "france"}).json()["model"] == MODEL
    error = assert_error(gateway.post("/v1/embeddings", json={"model": "on-vllm", "input": "a"}), 400,
                         "invalid_request", "model")
    assert 'engine = "vllm"' in error["message"]  # not a 502/503 for a worker nobody reached


def test_a_static_models_engine_is_checked_at_start(tmp_path, tiny_model_dir):
    from hpcllm.errors import ConfigError

    from .conftest import gateway_config

    with pytest.raises(ConfigError, match=r"gateway\.static_models\.m\.engine: Input should be 'hpcllm' or 'vllm'"):
        gateway_config(tmp_path, "http://127.0.0.1:9", tiny_model_dir,
                       static_models={"m": {"worker_url": "http://127.0.0.1:9", "source": str(tiny_model_dir),
                                            "engine": "sglang"}})


def test_the_root_paths_need_an_api_key(gateway):
    for path in ("/score", "/rerank", "/v2/rerank", "/classify"):
        assert_error(gateway.post(path, key=None, json={"model": MODEL}), 401, "missing_api_key")


def test_scores_and_reranks_are_counted_in_usage(make_gateway, hf_pair):
    gw = make_gateway(api_keys=KEYS)
    gw.post("/v1/score", key=ALICE, json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS}).raise_for_status()
    gw.post("/v2/rerank", key=ALICE, json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS[:2]}
            ).raise_for_status()
    row, = admin_usage(gw, by="key").json()["data"]
    assert (row["requests"], row["prompt_tokens"]) == (
        2, prompt_tokens(hf_pair, [QUERY, *DOCUMENTS]) + prompt_tokens(hf_pair, [QUERY, *DOCUMENTS[:2]]))
