"""POST /tokenize, /detokenize and GET /tokenizer_info (vLLM's extra API) through a real gateway: the ids a generation
would count, from the model's own tokenizer and chat template; nothing is routed to a worker."""

from __future__ import annotations

import jinja2
import pytest

from .conftest import MODEL, USER_KEY, GatewayFactory
from .test_errors import assert_error
from .test_tool_calling_api import ASK, ROUND, TOOLS_MODEL, WEATHER_TOOL, tools_model_dir  # noqa: F401 (a fixture)

TEXT = "Once upon a time, a tokenizer met a gateway."
BOS_MODEL = "tiny-bos"


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a tokenizer that adds its BOS to a text, as Llama's and Mistral's do (the dev models'
    add none)."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos-model") / BOS_MODEL
    shutil.copytree(tiny_model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gw(tmp_path_factory, worker_url, tiny_model_dir, tools_model_dir, bos_model_dir):  # noqa: F811 (imported)
    factory = GatewayFactory(tmp_path_factory.mktemp("tokenize-gateway"), worker_url, tiny_model_dir)
    yield factory(static_models={MODEL: {"worker_url": worker_url, "source": str(tiny_model_dir)},
                                 TOOLS_MODEL: {"worker_url": worker_url, "source": str(tools_model_dir)},
                                 BOS_MODEL: {"worker_url": worker_url, "source": str(bos_model_dir)}})
    factory.stop_all()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ok(resp) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_prompt_s_tokens_are_the_model_s_and_its_context_is_named(gw, tokenizer):
    body = ok(gw.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "return_token_strs": True}))
    ids = tokenizer(TEXT)["input_ids"]
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    assert body["max_model_len"] == ok(gw.get(f"/v1/models/{MODEL}"))["max_model_len"] is not None
    bare = ok(gw.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "add_special_tokens": False}))
    assert bare["tokens"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] is None


@pytest.mark.parametrize("model, messages, tools", [(MODEL, ASK, None), (TOOLS_MODEL, ROUND, [WEATHER_TOOL])])
def test_chat_messages_count_what_a_chat_completion_counts(gw, model, messages, tools):
    """The point of /tokenize: a client learns a conversation's length as the generation will count it."""
    extra = {"tools": tools} if tools else {}
    body = ok(gw.post("/tokenize", json={"model": model, "messages": messages, **extra}))
    chat = ok(gw.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 1, **extra}))
    assert body["count"] == chat["usage"]["prompt_tokens"] == len(body["tokens"])
    without_prompt = ok(gw.post("/tokenize", json={"model": model, "messages": messages, "add_generation_prompt": False,
                                                   **extra}))
    assert without_prompt["count"] < body["count"]  # the assistant header is left out


def test_add_special_tokens_decides_the_bos_of_a_generation_s_prompt(gw, bos_model_dir):
    """vLLM's add_special_tokens: false tokenizes a completion's text prompt without the tokenizer's BOS, a token-id
    prompt is sent as it is (vLLM ignores the flag there; benchmark scripts send both); chat's true adds it to the
    rendered chat. /tokenize counts as the generation does."""
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(bos_model_dir).bos_token_id
    assert ok(gw.post("/tokenize", json={"model": BOS_MODEL, "prompt": TEXT}))["tokens"][0] == bos

    def prompt_tokens(path, body):
        return ok(gw.post(path, json={"model": BOS_MODEL, "max_tokens": 1, **body}))["usage"]["prompt_tokens"]

    with_bos = prompt_tokens("/v1/completions", {"prompt": TEXT})
    assert prompt_tokens("/v1/completions", {"prompt": TEXT, "add_special_tokens": False}) == with_bos - 1
    assert prompt_tokens("/v1/completions", {"prompt": [5, 6, 7], "add_special_tokens": False}) == 3
    chat = prompt_tokens("/v1/chat/completions", {"messages": ASK})
    with_special = prompt_tokens("/v1/chat/completions", {"messages": ASK, "add_special_tokens": True})
    assert with_special == chat + 1 == ok(gw.post("/tokenize", json={"model": BOS_MODEL, "messages": ASK,
                                                                    "add_special_tokens": True}))["count"]


def test_detokenize_gives_back_the_text(gw, tokenizer):
    ids = ok(gw.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "add_special_tokens": False}))["tokens"]
    assert ok(gw.post("/detokenize", json={"model": MODEL, "tokens": ids})) == {"prompt": TEXT}
    assert_error(gw.post("/detokenize", json={"model": MODEL, "tokens": [len(tokenizer) + 5]}), 400,
                 "invalid_token_id", "tokens")


@pytest.mark.parametrize("path, body, status, code, param", [
    ("/tokenize", {"model": MODEL, "prompt": TEXT, "messages": ASK}, 422, "invalid_value", None),
    ("/tokenize", {"model": MODEL}, 422, "invalid_value", None),
    ("/tokenize", {"model": MODEL, "prompt": TEXT, "tools": [WEATHER_TOOL]}, 422, "invalid_value", None),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 422, "invalid_value",
     "messages[0].role"),
    ("/tokenize", {"model": MODEL, "messages": ASK, "tools": [WEATHER_TOOL]}, 400, "unsupported_parameter", "tools"),
    ("/tokenize", {"model": "nope", "prompt": TEXT}, 404, "model_not_found", "model"),
    ("/detokenize", {"model": MODEL, "tokens": "1 2 3"}, 422, "invalid_value", "tokens"),
])
def test_bad_tokenize_requests_say_what_to_fix(gw, path, body, status, code, param):
    error = assert_error(gw.post(path, json=body), status, code, param)
    assert error["message"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokenize_needs_an_api_key(gw, path):
    assert gw.post(path, key=None, json={"model": MODEL, "prompt": TEXT, "tokens": [1]}).status_code == 401
    assert gw.post(path, key="sk-wrong", json={"model": MODEL, "prompt": TEXT, "tokens": [1]}).status_code == 401
    assert gw.post(path, key=USER_KEY, json={"model": MODEL, "prompt": TEXT, "tokens": [1]}).status_code == 200


def test_tokenizer_info_needs_an_api_key(gw):
    assert gw.get(f"/tokenizer_info?model={MODEL}", key=None).status_code == 401
    assert gw.get(f"/tokenizer_info?model={MODEL}", key="sk-wrong").status_code == 401


def test_tokenizer_info_names_the_model_s_special_tokens_template_and_context(gw, tokenizer, tiny_model_dir):
    resp = gw.get(f"/tokenizer_info?model={MODEL}")
    info = ok(resp)
    assert info["model"] == MODEL
    assert [info[f"{kind}_token"] for kind in ("bos", "eos", "pad", "unk")] == [
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token]
    assert info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == ok(gw.get(f"/v1/models/{MODEL}"))["max_model_len"] is not None
    assert str(tiny_model_dir) not in resp.text  # the checkpoint's path on the shared filesystem stays private
    assert ok(gw.get(f"/tokenizer_info?model={TOOLS_MODEL}"))["chat_template"] != info["chat_template"]


@pytest.mark.parametrize("request_of", [
    lambda gw: gw.get("/tokenizer_info"),
    lambda gw: gw.post("/tokenize", json={"prompt": TEXT}),
    lambda gw: gw.post("/detokenize", json={"tokens": [1]}),
])
def test_a_gateway_of_several_models_asks_which(gw, request_of):
    error = assert_error(request_of(gw), 400, "missing_field", "model")
    assert MODEL in error["message"] and TOOLS_MODEL in error["message"]


def test_tokenizer_info_of_an_unknown_model_is_a_404(gw):
    assert_error(gw.get("/tokenizer_info?model=nope"), 404, "model_not_found", "model")


def test_lm_eval_s_remote_tokenizer_reads_a_one_model_gateway_as_a_vllm_server(gateway, tokenizer):
    """lm-evaluation-harness's tokenizer_backend=remote (lm_eval.utils.RemoteTokenizer) derives the server's root
    from base_url, sends no model, and reads eos/bos/pad and chat_template from GET /tokenizer_info; each token's id
    is the first of `/tokenize` of its string without special tokens; /detokenize gives text back."""
    info = ok(gateway.get("/tokenizer_info"))
    assert "eos_token" in info  # what its auto-detection checks

    def encode(text: str) -> list[int]:
        return ok(gateway.post("/tokenize", json={"prompt": text, "add_special_tokens": False}))["tokens"]

    assert encode(info["eos_token"])[0] == tokenizer.eos_token_id
    assert encode(info["bos_token"])[0] == tokenizer.bos_token_id
    ids = encode(TEXT)
    assert ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ok(gateway.post("/detokenize", json={"tokens": ids}))["prompt"] == TEXT
    # Rendered by the client with the served special tokens, the template gives the prompt a chat completion counts.
    rendered = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
        info["chat_template"]).render(messages=ASK, add_generation_prompt=True, bos_token=info["bos_token"],
                                      eos_token=info["eos_token"])
    assert len(encode(rendered)) == ok(gateway.post("/tokenize", json={"messages": ASK}))["count"]
