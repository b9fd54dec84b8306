"""Cross-encoders and classifiers through a real gateway and real workers: devmodels' tiny seeded
*ForSequenceClassification models (a one-label Qwen2 reranker, a three-label Llama classifier) give /v1/score,
/v1/rerank and /v1/classify the numbers transformers gives for the same pairs and texts."""

from __future__ import annotations

import pytest
import torch

from .conftest import MODEL, SECRET, ThreadServer
from .test_errors import assert_error

RERANKER, CLASSIFIER = "tiny-reranker", "tiny-classifier"
QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "the cat sat on the mat", "france", "berlin is in germany"]


@pytest.fixture(scope="module")
def classifier_models(tmp_path_factory):
    """name -> (checkpoint folder, transformers model, tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hpcllm.devmodels import make_model

    root = tmp_path_factory.mktemp("classifiers")
    folders = {RERANKER: make_model("qwen2", root / RERANKER, num_labels=1, seed=3),
               CLASSIFIER: make_model("llama", root / CLASSIFIER, num_labels=3, seed=4)}
    return {name: (folder, AutoModelForSequenceClassification.from_pretrained(folder).eval(),
                   AutoTokenizer.from_pretrained(folder)) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def classifier_workers(classifier_models):
    from hpcllm.worker.server import ModelForServing, WorkerService, create_app

    running = {}
    for name, (_, model, tokenizer) in classifier_models.items():
        service = WorkerService(name, secret=SECRET, keepalive_seconds=0.5)
        service.attach(ModelForServing(model, tokenizer, tier="dram", load_seconds=0.1))
        running[name] = (service, ThreadServer(create_app(service)))
    yield {name: server.url for name, (_, server) in running.items()}
    for service, server in running.values():
        server.stop()
        service.shutdown()


@pytest.fixture
def gateway(make_gateway, classifier_models, classifier_workers, worker_url, tiny_model_dir):
    models = {name: {"worker_url": classifier_workers[name], "source": str(classifier_models[name][0])}
              for name in classifier_models}
    return make_gateway(static_models={**models, MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)}})


def hf_logits(classifier_models, name: str, text: str, pair: str | None = None) -> list[float]:
    _, model, tokenizer = classifier_models[name]
    with torch.no_grad():
        return model(**tokenizer(text, pair, return_tensors="pt")).logits[0].tolist()


def pair_tokens(classifier_models, name: str, pairs: list[tuple[str, str]]) -> int:
    tokenizer = classifier_models[name][2]
    return sum(len(tokenizer(text, pair)["input_ids"]) for text, pair in pairs)


def test_a_rerankers_scores_are_the_sigmoid_of_its_logit_for_each_pair(gateway, classifier_models):
    logits = [hf_logits(classifier_models, RERANKER, QUERY, d)[0] for d in DOCUMENTS]
    assert len(set(round(x, 4) for x in logits)) == len(logits)  # distinct: the order below is tested
    answer = gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert [d["score"] for d in answer["data"]] == pytest.approx([torch.sigmoid(torch.tensor(x)).item()
                                                                  for x in logits], abs=1e-5)
    tokens = pair_tokens(classifier_models, RERANKER, [(QUERY, d) for d in DOCUMENTS])  # each pair's tokens
    assert answer["usage"]["prompt_tokens"] == tokens

    raw = gateway.post("/v1/score", json={"model": RERANKER, "queries": DOCUMENTS[:2], "documents": DOCUMENTS[2:],
                                          "use_activation": False}).json()
    assert [d["score"] for d in raw["data"]] == pytest.approx(
        [hf_logits(classifier_models, RERANKER, DOCUMENTS[0], DOCUMENTS[2])[0],
         hf_logits(classifier_models, RERANKER, DOCUMENTS[1], DOCUMENTS[3])[0]], abs=1e-5)

    ranked = gateway.post("/v2/rerank", json={"model": RERANKER, "query": QUERY, "documents": DOCUMENTS,
                                              "top_n": 3}).json()
    best_first = sorted(range(len(DOCUMENTS)), key=lambda i: -logits[i])[:3]
    assert [(r["index"], r["document"]["text"]) for r in ranked["results"]] == [(i, DOCUMENTS[i]) for i in best_first]


def test_classify_answers_each_inputs_probabilities_and_label(gateway, classifier_models):
    texts = ["hello world", "the cat sat on the mat"]
    answer = gateway.post("/v1/classify", json={"model": CLASSIFIER, "input": texts}).json()
    assert answer["id"].startswith("classify-") and answer["object"] == "list" and answer["model"] == CLASSIFIER
    labels = classifier_models[CLASSIFIER][1].config.id2label
    for i, (text, data) in enumerate(zip(texts, answer["data"])):
        probs = torch.softmax(torch.tensor(hf_logits(classifier_models, CLASSIFIER, text)), dim=-1)
        assert data["probs"] == pytest.approx(probs.tolist(), abs=1e-5)
        assert (data["index"], data["num_classes"], data["label"]) == (i, 3, labels[int(probs.argmax())])
    tokenizer = classifier_models[CLASSIFIER][2]
    assert answer["usage"]["prompt_tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in texts)

    one_label = gateway.post("/classify", json={"model": RERANKER, "input": "hello world"}).json()["data"][0]
    logit = hf_logits(classifier_models, RERANKER, "hello world")[0]
    assert (one_label["probs"], one_label["num_classes"]) == (pytest.approx([torch.sigmoid(
        torch.tensor(logit)).item()], abs=1e-5), 1)


def test_a_classify_batch_answers_each_line_as_the_endpoint_does(gateway):
    """Classify lines run through a batch as score and rerank lines do (vLLM's run_batch has none: same mechanism)."""
    from .test_batches_api import finished, results, submit

    bodies = {"one": {"model": CLASSIFIER, "input": "hello world"},
              "two": {"model": CLASSIFIER, "input": ["the cat sat on the mat", "france"], "use_activation": False}}
    client = gateway.client()
    batch = submit(client, [{"custom_id": cid, "method": "POST", "url": "/v1/classify", "body": body}
                            for cid, body in bodies.items()], endpoint="/v1/classify")
    done = finished(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 2, done
    output = results(client, done.output_file_id)
    prompt_tokens = 0
    for cid, body in bodies.items():
        answer, direct = output[cid]["response"]["body"], gateway.post("/v1/classify", json=body).json()
        assert [(d["index"], d["label"], d["num_classes"]) for d in answer["data"]] == [
            (d["index"], d["label"], d["num_classes"]) for d in direct["data"]]
        for got, want in zip(answer["data"], direct["data"]):
            assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)
        assert answer["usage"] == direct["usage"]
        prompt_tokens += direct["usage"]["prompt_tokens"]
    assert (done.usage.input_tokens, done.usage.output_tokens) == (prompt_tokens, 0)


def test_truncated_pairs_and_inputs_are_scored_as_transformers_scores_them_cut(gateway, classifier_models):
    """A reranker's pair cut by its tokenizer (no side asked: truncation=True, longest first, its special tokens
    kept: vLLM's), a classifier's input keeping its last tokens (truncation_side left)."""
    tokenizer = classifier_models[RERANKER][2]
    document = " ".join(DOCUMENTS * 3)
    whole = len(tokenizer(QUERY, document)["input_ids"])
    keep = whole - 9
    _, model, _ = classifier_models[RERANKER]
    with torch.no_grad():
        cut = tokenizer(QUERY, document, truncation=True, max_length=keep, return_tensors="pt")
        logit = model(**cut).logits[0, 0].item()
    answer = gateway.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": [document],
                                              "truncate_prompt_tokens": keep, "use_activation": False}).json()
    assert answer["results"][0]["relevance_score"] == pytest.approx(logit, abs=1e-5)
    assert answer["usage"]["prompt_tokens"] == keep

    ids = list(classifier_models[CLASSIFIER][2](document)["input_ids"])
    want = hf_logits_of_ids(classifier_models, CLASSIFIER, ids[-5:])
    got = gateway.post("/v1/classify", json={"model": CLASSIFIER, "input": document, "truncate_prompt_tokens": 5,
                                             "truncation_side": "left", "use_activation": False}).json()
    assert got["data"][0]["probs"] == pytest.approx(want, abs=1e-5)
    assert got["usage"]["prompt_tokens"] == 5


def test_max_tokens_per_query_and_per_doc_cut_each_text_before_it_is_paired(gateway, classifier_models):
    """Each query and document keeps its first tokens and the cut texts are paired (vLLM's); with
    truncate_prompt_tokens too, the tokenizer then cuts the pair's document only (vLLM's only_second), where its
    own truncation would cut the longer text, here the query."""
    from .test_score_api import cut_by_hand

    _, model, tokenizer = classifier_models[RERANKER]
    query, documents = cut_by_hand(tokenizer, QUERY, 4), [cut_by_hand(tokenizer, d, 3) for d in DOCUMENTS[:2]]
    logits = [hf_logits(classifier_models, RERANKER, query, d)[0] for d in documents]
    answer = gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS[:2],
                                             "max_tokens_per_query": 4, "max_tokens_per_doc": 3,
                                             "use_activation": False})
    assert answer.status_code == 200, answer.text
    assert [d["score"] for d in answer.json()["data"]] == pytest.approx(logits, abs=1e-5)
    tokens = pair_tokens(classifier_models, RERANKER, [(query, d) for d in documents])
    assert answer.json()["usage"]["prompt_tokens"] == tokens

    long_query, document = " ".join(DOCUMENTS), " ".join(DOCUMENTS[:2])
    cut_document = cut_by_hand(tokenizer, document, 6)
    keep = len(tokenizer(long_query, cut_document)["input_ids"]) - 3
    with torch.no_grad():
        only_second = tokenizer(long_query, cut_document, truncation="only_second", max_length=keep,
                                return_tensors="pt")
        want = model(**only_second).logits[0, 0].item()
    assert only_second["input_ids"][0].tolist() != tokenizer(long_query, cut_document, truncation=True,
                                                          max_length=keep)["input_ids"]
    answer = gateway.post("/v1/rerank", json={"model": RERANKER, "query": long_query, "documents": [document],
                                              "max_tokens_per_doc": 6, "truncate_prompt_tokens": keep,
                                              "use_activation": False}).json()
    assert answer["results"][0]["relevance_score"] == pytest.approx(want, abs=1e-5)
    assert answer["usage"]["prompt_tokens"] == keep

    # A query longer than truncate_prompt_tokens alone: the document cannot make room (a fast tokenizer raises
    # there); the pair is cut by side, its first `short` tokens (the query's start), as a slow tokenizer leaves it.
    short = len(tokenizer(long_query)["input_ids"]) - 2
    first = tokenizer(long_query, cut_document)["input_ids"][:short]
    answer = gateway.post("/v1/rerank", json={"model": RERANKER, "query": long_query, "documents": [document],
                                              "max_tokens_per_doc": 6, "truncate_prompt_tokens": short,
                                              "use_activation": False})
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["relevance_score"] == pytest.approx(
        hf_logits_of_ids(classifier_models, RERANKER, first)[0], abs=1e-5)
    assert answer.json()["usage"]["prompt_tokens"] == short


def hf_logits_of_ids(classifier_models, name: str, ids: list[int]) -> list[float]:
    _, model, _ = classifier_models[name]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].tolist()


def test_each_model_kind_refuses_what_it_does_not_answer(gateway):
    error = assert_error(gateway.post("/v1/embeddings", json={"model": RERANKER, "input": "a"}), 400,
                         "invalid_request", "model")
    assert "Qwen2ForSequenceClassification" in error["message"] and "/v1/score" in error["message"]
    error = assert_error(gateway.post("/v1/score", json={"model": CLASSIFIER, "text_1": "a", "text_2": "b"}), 400,
                         "invalid_request", "model")
    assert "3 labels" in error["message"]
    assert_error(gateway.post("/v1/classify", json={"model": MODEL, "input": "a"}), 400, "invalid_request", "model")
    error = assert_error(gateway.post("/v1/completions", json={"model": RERANKER, "prompt": "a", "max_tokens": 2}),
                         400, "invalid_request")
    assert "does not generate" in error["message"]


def test_a_request_naming_no_model_goes_to_the_one_model_answering_it_else_a_400_listing_them(gateway,
                                                                                               classifier_models):
    """vLLM defaults `model` to the one it serves. Here: one reranker (the LLM could score as a bi-encoder, but a
    cross-encoder is what scores are for), two classifiers (the reranker has a head too) and one model that embeds
    (the LLM: the classifiers' heads are not embeddings)."""
    named = gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS}).json()
    for path, body in (("/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
                       ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})):
        answer = gateway.post(path, json=body).json()
        assert answer["model"] == RERANKER
        scores = [d["score"] for d in answer["data"]] if "data" in answer else \
            [r["relevance_score"] for r in sorted(answer["results"], key=lambda r: r["index"])]
        assert scores == pytest.approx([d["score"] for d in named["data"]], abs=1e-6)
    error = assert_error(gateway.post("/v1/classify", json={"input": "a"}), 400, "missing_field", "model")
    assert f"2 served models answer classifications ({CLASSIFIER}, {RERANKER})" in error["message"]
    named = gateway.post("/v1/embeddings", json={"model": MODEL, "input": "paris"}).json()
    answer = gateway.post("/v1/embeddings", json={"input": "paris"}).json()
    assert answer["model"] == MODEL
    assert answer["data"][0]["embedding"] == pytest.approx(named["data"][0]["embedding"], abs=1e-6)


def test_a_worker_pooling_otherwise_than_the_checkpoint_says_is_an_error_not_an_answer(
        make_gateway, classifier_workers, tiny_model_dir):
    """A gateway reading a causal LM's config.json in front of a reranker's worker (a redeployment gone wrong):
    the reranker's logits are never answered as embeddings."""
    from .test_usage import ALICE, KEYS, admin_usage, metric

    gateway = make_gateway(api_keys=KEYS, static_models={MODEL: {"worker_url": classifier_workers[RERANKER],
                                                                 "source": str(tiny_model_dir)}})
    error = assert_error(gateway.post("/v1/embeddings", key=ALICE, json={"model": MODEL, "input": "a"}), 500,
                         "internal_error")
    assert "config.json says 'embed'" in error["message"]
    assert admin_usage(gateway).json()["data"] == []  # nothing answered, nothing billed
    assert metric(gateway, "hpcllm_prompt_tokens_total", model=MODEL) == 0.0


def test_a_config_json_of_an_unexpected_shape_is_read_as_unreadable_not_a_500_per_request(
        make_gateway, classifier_models, classifier_workers, tmp_path):
    """A config.json whose fields have shapes no model's has (architectures no list, a sentence_transformers that is
    no object; the tokenizer loads beside them): the gateway logs why it cannot read it and pools as a causal LM
    would; the worker's classifier answer is then the operator's clear error, never a crash."""
    import json
    import shutil

    models = {}
    for name, extra in (("st", {"sentence_transformers": "x"}), ("arch", {"architectures": 5})):
        copy = shutil.copytree(classifier_models[RERANKER][0], tmp_path / name)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **extra}))
        models[name] = {"worker_url": classifier_workers[RERANKER], "source": str(copy)}
    gateway = make_gateway(static_models=models)
    for name in models:
        error = assert_error(gateway.post("/v1/embeddings", json={"model": name, "input": "a"}), 500,
                             "internal_error")
        assert "config.json says 'embed'" in error["message"], error


def test_at_most_one_worker_calls_inputs_are_pooled_counted_as_the_worker_counts_them(gateway):
    """2048 inputs per worker call: more embeddings or classify inputs are a 400 naming `input` before anything is
    reserved or sent; a cross-encoder's query and 2048 documents are 2048 pairs, one call."""
    from hpcllm.worker.protocol import MAX_EMBED_INPUTS

    for path, model in (("/v1/embeddings", MODEL), ("/v1/classify", CLASSIFIER)):
        error = assert_error(gateway.post(path, json={"model": model, "input": ["a"] * (MAX_EMBED_INPUTS + 1)}), 400,
                             "invalid_request", "input")
        assert f"at most {MAX_EMBED_INPUTS} texts" in error["message"] and "2049" in error["message"]
    ranked = gateway.post("/v1/rerank", json={"model": RERANKER, "query": "a", "documents": ["b"] * MAX_EMBED_INPUTS})
    assert ranked.status_code == 200 and len(ranked.json()["results"]) == MAX_EMBED_INPUTS, ranked.text
