"""A Qwen3-Reranker-style model end to end: a causal LM that answers a relevance question with a token, converted
with `--classifier-from-token` (its two answer tokens) and `--score-template`, loaded by the store and served by a
real worker. Each pair's score through the gateway is transformers' softmax(logit_no, logit_yes)[yes] at the last
token of the causal LM run on the templated text, as vLLM computes it with its hf_overrides and --chat-template."""

from __future__ import annotations

import pytest
import torch

from .conftest import MODEL, SECRET, ThreadServer
from .test_errors import assert_error

RERANKER = "tiny-lm-reranker"
NO, YES = "no", "the"  # single tokens of devmodels' vocabulary, standing for Qwen3-Reranker's "no" and "yes"
QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "the cat sat on the mat", "berlin is in germany"]
DEFAULT_INSTRUCTION = "judge relevance"
TEMPLATE = ("<|system|>\n{{ instruction | default('" + DEFAULT_INSTRUCTION + "') }}\n"
            "<|query|>\n{{ messages | selectattr('role', 'eq', 'query') | map(attribute='content') | first }}\n"
            "<|document|>\n{{ messages | selectattr('role', 'eq', 'document') | map(attribute='content') | first }}\n"
            "<|assistant|>")  # jinja drops a template's trailing newline (transformers' and vLLM's rendering)


def templated(query: str, document: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """What TEMPLATE renders, written out."""
    return f"<|system|>\n{instruction}\n<|query|>\n{query}\n<|document|>\n{document}\n<|assistant|>"


@pytest.fixture(scope="module")
def lm_reranker(tmp_path_factory):
    """(transformers' causal LM, its tokenizer, the converted cross-encoder's folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.checkpoint import convert
    from hpcllm.devmodels import make_model

    root = tmp_path_factory.mktemp("lm-reranker")
    hf_dir = make_model("qwen2", root / "hf", seed=7)
    template = root / "reranker.jinja"
    template.write_text(TEMPLATE)
    converted = convert(hf_dir, root / "ckpt", score_tokens=(NO, YES), score_template=template, progress=False).root
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir), converted


@pytest.fixture(scope="module")
def reranker_worker(lm_reranker):
    from hpcllm.store.loader import load_model
    from hpcllm.worker.server import ModelForServing, WorkerService, create_app

    model, tokenizer, _ = load_model(lm_reranker[2])
    service = WorkerService(RERANKER, secret=SECRET, keepalive_seconds=0.5)
    service.attach(ModelForServing(model, tokenizer, tier="dram", load_seconds=0.1))
    server = ThreadServer(create_app(service))
    yield server.url
    server.stop()
    service.shutdown()


@pytest.fixture
def gateway(make_gateway, lm_reranker, reranker_worker, worker_url, tiny_model_dir):
    return make_gateway(static_models={RERANKER: {"worker_url": reranker_worker, "source": str(lm_reranker[2])},
                                       MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)}})


def yes_probability(lm_reranker, text: str) -> float:
    """softmax(logit_no, logit_yes)[yes] of the causal LM at text's last token."""
    model, tokenizer, _ = lm_reranker
    ids = tokenizer([NO, YES], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0, -1]
    return torch.softmax(logits[[ids[0][0], ids[1][0]]], dim=0)[1].item()


def test_a_converted_lm_reranker_scores_the_templated_pair_as_its_yes_probability(gateway, lm_reranker):
    want = [yes_probability(lm_reranker, templated(QUERY, d)) for d in DOCUMENTS]
    assert len({round(p, 4) for p in want}) == len(want)  # distinct: the ranking below is tested
    answer = gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS}).json()
    assert [d["score"] for d in answer["data"]] == pytest.approx(want, abs=1e-5)
    tokenizer = lm_reranker[1]
    assert answer["usage"]["prompt_tokens"] == sum(len(tokenizer(templated(QUERY, d))["input_ids"])
                                                   for d in DOCUMENTS)

    ranked = gateway.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": DOCUMENTS}).json()
    assert [r["index"] for r in ranked["results"]] == sorted(range(len(want)), key=lambda i: -want[i])
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx(sorted(want, reverse=True), abs=1e-5)


def test_the_instruction_and_chat_template_kwargs_reach_the_score_template(gateway, lm_reranker):
    for body in ({"instruction": "find the city"}, {"chat_template_kwargs": {"instruction": "find the city"}}):
        answer = gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS[0],
                                                 **body}).json()
        assert answer["data"][0]["score"] == pytest.approx(
            yes_probability(lm_reranker, templated(QUERY, DOCUMENTS[0], "find the city")), abs=1e-5)
    assert_error(gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": "a",
                                                 "chat_template_kwargs": {"tokenize": True}}),
                 400, "invalid_value", "chat_template_kwargs")


def test_max_tokens_per_query_and_per_doc_cut_the_texts_the_score_template_is_given(gateway, lm_reranker):
    from .test_score_api import cut_by_hand

    tokenizer = lm_reranker[1]
    query, document = cut_by_hand(tokenizer, QUERY, 3), cut_by_hand(tokenizer, DOCUMENTS[0], 2)
    answer = gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS[0],
                                             "max_tokens_per_query": 3, "max_tokens_per_doc": 2}).json()
    assert answer["data"][0]["score"] == pytest.approx(yes_probability(lm_reranker, templated(query, document)),
                                                       abs=1e-5)
    assert answer["usage"]["prompt_tokens"] == len(tokenizer(templated(query, document))["input_ids"])


def test_a_scoring_request_naming_no_model_goes_to_the_one_cross_encoder(gateway, lm_reranker):
    """The LLM served beside it could score as a bi-encoder, but a cross-encoder is what a rerank is for."""
    answer = gateway.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS[:1]}).json()
    assert answer["model"] == RERANKER
    assert answer["results"][0]["relevance_score"] == pytest.approx(
        yes_probability(lm_reranker, templated(QUERY, DOCUMENTS[0])), abs=1e-5)
    answer = gateway.post("/v1/classify", json={"input": "paris"}).json()
    assert answer["model"] == RERANKER and answer["data"][0]["num_classes"] == 1


@pytest.mark.parametrize("template, status, code, param", [
    ("{% if %}", 500, "internal_error", None),  # the checkpoint's fault, not the request's
    ("{{ raise_exception('no documents about cats') }}", 400, "invalid_value", "text_2"),
])
def test_a_score_template_that_fails_is_an_error_saying_whose(make_gateway, lm_reranker, reranker_worker, tmp_path,
                                                             template, status, code, param):
    """A folder served as it is (not through hpcllm convert, which checks the template) may hold a broken one."""
    import shutil

    from hpcllm.checkpoint.heads import SCORE_TEMPLATE_FILE

    source = shutil.copytree(lm_reranker[2], tmp_path / "served")
    (source / SCORE_TEMPLATE_FILE).write_text(template)
    gateway = make_gateway(static_models={RERANKER: {"worker_url": reranker_worker, "source": str(source)}})
    error = assert_error(gateway.post("/v1/score", json={"model": RERANKER, "text_1": QUERY, "text_2": "cats"}),
                         status, code, param)
    assert (SCORE_TEMPLATE_FILE if status == 500 else "no documents about cats") in error["message"]


def test_a_score_template_that_cannot_be_read_is_a_500_for_that_models_scores_only(make_gateway, lm_reranker,
                                                                                   reranker_worker, worker_url,
                                                                                   tiny_model_dir, tmp_path):
    """Not UTF-8: the model is still a classifier (classify answers, a request naming no model finds it), and only
    its scores fail, naming the file."""
    import shutil

    from hpcllm.checkpoint.heads import SCORE_TEMPLATE_FILE

    source = shutil.copytree(lm_reranker[2], tmp_path / "served")
    (source / SCORE_TEMPLATE_FILE).write_bytes(b"\xff\xfe{{ messages }}")
    gateway = make_gateway(static_models={RERANKER: {"worker_url": reranker_worker, "source": str(source)},
                                          MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)}})
    error = assert_error(gateway.post("/v1/rerank", json={"query": QUERY, "documents": ["cats"]}), 500,
                         "internal_error", None)
    assert SCORE_TEMPLATE_FILE in error["message"] and "cannot be read" in error["message"]
    answer = gateway.post("/v1/classify", json={"input": "paris"})
    assert answer.status_code == 200 and answer.json()["model"] == RERANKER
    assert gateway.post("/v1/score", json={"model": MODEL, "text_1": QUERY, "text_2": "cats"}).status_code == 200
