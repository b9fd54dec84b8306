"""The pooling models' way to the worker, shared by /v1/embeddings, /v1/score, /v1/rerank and /v1/classify: which
model may be asked (pooling_model), its inputs' token ids, truncated as asked (tokenize_input, tokenize_inputs), what
its head is (classifier_of, from its config.json), and the pooled outputs of one worker call (pool_on_a_worker:
embeddings, or a classifier's logits)."""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from hpcllm.checkpoint.heads import SCORE_TEMPLATE_FILE, classifier_architecture
from hpcllm.gateway.errors import ApiError, InternalError, InvalidRequest
from hpcllm.gateway.routing import Endpoint, ModelCard
from hpcllm.gateway.runtime import Gateway, gateway_shutdown
from hpcllm.gateway.serving import RequestContext, on_a_worker, route_request, the_one_model
from hpcllm.gateway.protocol import InputsRequest
from hpcllm.gateway.tokenization import PromptEncoder, Truncation
from hpcllm.gateway.upstream import cancel_on_worker, embed_on_worker
from hpcllm.worker.protocol import MAX_EMBED_INPUTS, not_pooled_by_vllm

log = logging.getLogger(__name__)

# The activations vLLM accepts from a config (sentence_transformers' activation_fn or
# sbert_ce_default_activation_function): softmax and sigmoid are its default (PoolerClassify), identity none.
ACTIVATIONS = {"torch.nn.modules.linear.Identity": False, "torch.nn.modules.activation.Sigmoid": True,
               "torch.nn.modules.activation.Softmax": True}


@dataclass(frozen=True)
class Classifier:
    """A *ForSequenceClassification model's head, as its config.json describes it."""

    architecture: str
    num_labels: int
    labels: dict[int, str]  # id2label
    use_sep_token: bool  # a pair is tokenized as (text, text_pair); else the two texts joined (vLLM's rule)
    activation_fn: str | None = None  # config.json's (sentence-transformers'); None: vLLM's default, on
    # The checkpoint's score template (hpcllm convert --score-template): each pair is rendered through it and the
    # text tokenized, as vLLM does with --chat-template; None: the pair tokenized as above.
    score_template: str | None = None
    template_unread: str | None = None  # why the checkpoint's score template could not be read

    def template(self) -> str | None:
        """The score template pairs are rendered through (None: none); a 500 naming its file when it could not be
        read (the checkpoint's fault, as one that does not parse)."""
        if self.template_unread is not None:
            raise InternalError(f"the model's score template ({SCORE_TEMPLATE_FILE}) cannot be read "
                                f"({self.template_unread}); ask the operator to convert the model again with a "
                                "working --score-template")
        return self.score_template

    def applies_activation(self, use_activation: bool | None) -> bool:
        """Whether outputs go through the activation: the request's use_activation, else config.json's
        activation_fn, else vLLM's default (on); a 400 for an activation this server does not apply."""
        if use_activation is not None:
            return use_activation
        if self.activation_fn is None:
            return True
        if self.activation_fn not in ACTIVATIONS:
            raise InvalidRequest(f"the model's config.json asks for the activation {self.activation_fn!r}, which this "
                                 f"server does not apply (only {', '.join(ACTIVATIONS)}); send use_activation false "
                                 "for the raw logits", param="use_activation")
        return ACTIVATIONS[self.activation_fn]

    @staticmethod
    def probabilities(logits: list[float], activate: bool) -> list[float]:
        """vLLM's classify output: sigmoid of a single logit, softmax of several; without activation the logits."""
        if not activate:
            return logits
        if len(logits) == 1:
            return [1.0 / (1.0 + math.exp(-logits[0]))]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        return [e / total for e in exps]


# Which of the served models (each with its classifier_of) an API answers for when a request names none.
Answering = Callable[[list[tuple[ModelCard, Classifier | None]]], list[ModelCard]]


def pooling_model(gw: Gateway, model: str, api: str) -> ModelCard:
    """The card of a model that `api` (what the error calls it: "embeddings", "scores") may run on: a LoRA adapter
    is refused naming its base model (pooling runs the base model's weights only), and a model whose workers do
    not pool (vLLM's engine) before anything starts one."""
    card = gw.router.get_model(model)
    if card.lora is not None:
        raise InvalidRequest(f"model {model!r} is a LoRA adapter of {card.parent!r}: {api} are served by models, "
                             f"not adapters; ask {card.parent!r}", param="model")
    if not card.pools:
        raise InvalidRequest(not_pooled_by_vllm(model), param="model")
    return card


def requested_pooling_model(gw: Gateway, model: str | None, api: str, answering: Answering) -> ModelCard:
    """The named model (pooling_model); with none named, the one model that `answering` picks of the served ones
    whose workers pool (each with its classifier_of; LoRA adapters not counted), else a 400 naming `model`
    (the_one_model)."""
    if model is not None:
        return pooling_model(gw, model, api)
    served = [card for card in gw.router.list_models() if card.lora is None]
    pooling = [(card, classifier_of(card)) for card in served if card.pools]
    return the_one_model(answering(pooling), len(served), api)


def embedding_models(served: list[tuple[ModelCard, Classifier | None]]) -> list[ModelCard]:
    """The models an embeddings request naming none is for (an Answering): those without a classification head."""
    return [card for card, classifier in served if classifier is None]


def classifier_of(card: ModelCard) -> Classifier | None:
    """The model's classification head (config.json's architectures name a *ForSequenceClassification) with its
    score template if the checkpoint has one, else None (an embedding model, or a config the gateway cannot read:
    the worker's answer says what it pooled)."""
    path = Path(card.source) / "config.json"
    try:
        return _classifier_at(path, card.created)  # read once per deployment: a redeploy changes created
    except OSError as exc:  # not cached: the shared FS may answer the next request
        log.warning("cannot read %s: %s", path, exc)
        return None
    except _TemplateUnread as exc:  # the classifier still (not an embedding model), its scores a 500
        return exc.classifier


@lru_cache(maxsize=64)
def _classifier_at(path: Path, created: int) -> Classifier | None:
    try:
        classifier = _classifier_in(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # not JSON, or not the shape of a model's config.json
        log.warning("cannot read %s (pooling as its worker does): %s", path, exc)
        return None
    template = path.with_name(SCORE_TEMPLATE_FILE)
    if classifier is None or not template.is_file():
        return classifier
    try:
        return replace(classifier, score_template=template.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read %s: %s", template, exc)
        raise _TemplateUnread(replace(classifier, template_unread=str(exc))) from None


class _TemplateUnread(Exception):
    """A classifier whose score template could not be read: raised, not returned, so that lru_cache does not keep
    it (the shared FS may answer the next request, a fixed file be read)."""

    def __init__(self, classifier: Classifier):
        super().__init__(classifier.template_unread)
        self.classifier = classifier


def _classifier_in(config: object) -> Classifier | None:
    if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    architecture = classifier_architecture(config.get("architectures"))
    if architecture is None:
        return None
    labels = {int(k): str(v) for k, v in _object(config, "id2label").items()}
    num_labels = int(config.get("num_labels") or len(labels) or 2)
    function = _object(config, "sentence_transformers").get("activation_fn") or config.get(
        "sbert_ce_default_activation_function")
    use_sep_token = config.get("use_sep_token", config.get("use_pad_token", True))
    return Classifier(architecture, num_labels, labels, bool(use_sep_token), function or None)


def _object(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not a JSON object")
    return value


def tokenize_input(encoder: PromptEncoder, card: ModelCard, text_or_ids: str | list[int], param: str,
                   truncation: Truncation | None, pair: str | None = None, join: bool = False,
                   add_special_tokens: bool = True) -> list[int]:
    """The token ids of one input (BOS added as vLLM does, unless add_special_tokens is false), truncated as asked,
    or a 400 naming param: empty, outside the vocabulary, or longer than the model's context. pair: a
    cross-encoder's second text, tokenized as the tokenizer's text pair (or, join, appended to the first text)."""
    if isinstance(text_or_ids, str) and pair is not None and join:
        text_or_ids, pair = text_or_ids + pair, None
    ids = encoder.prompt_ids(text_or_ids, param, card.max_model_len, truncation, pair=pair,
                             add_special_tokens=add_special_tokens).ids
    if not ids:
        raise InvalidRequest("the input is empty (no tokens after tokenization)", param=param, code="empty_prompt")
    if card.max_model_len is not None and len(ids) > card.max_model_len:
        raise InvalidRequest(f"This model's maximum context length is {card.max_model_len} tokens. However, "
                             f"the input has {len(ids)} tokens. Please reduce the length of the input, or send "
                             "truncate_prompt_tokens.", param=param, code="context_length_exceeded")
    return ids


def tokenize_inputs(encoder: PromptEncoder, card: ModelCard, req: InputsRequest) -> list[list[int]]:
    """The token ids of a request's `input` list (embeddings, classify), truncated as it asks; a 400 naming
    `input` or `input[i]`, too many inputs before any is tokenized."""
    check_input_count(len(req.input), "input")
    truncation = encoder.truncation(req, card.max_model_len, generating=False)  # nothing generated: all of it
    return [tokenize_input(encoder, card, text_or_ids, "input" if len(req.input) == 1 else f"input[{i}]", truncation,
                           add_special_tokens=req.add_special_tokens)
            for i, text_or_ids in enumerate(req.input)]


def check_input_count(count: int, param: str) -> None:
    """A 400 naming param for more inputs than one worker call pools, checked before they are tokenized."""
    if count > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBED_INPUTS} texts are pooled in one request (a cross-encoder's pairs, "
                             f"an embedding model's inputs: queries and documents together); this one has "
                             f"{count}: split it", param=param)


class BatchPoolingCall:
    """A batch's pooling call in flight on a worker, tracked with the generations so that the process's close
    (Gateway.stop_batch_generations) and the drain timeout stop it as they stop a generation: the worker is asked
    to cancel it (its pieces not yet run are skipped) and the request ends with the shutdown's 503, its late
    answer unwritten."""

    def __init__(self, gw: Gateway, ctx: RequestContext, worker_url: str, secret: str):
        self.gw, self.ctx, self.worker_url, self.secret = gw, ctx, worker_url, secret
        # One per worker call (retries included), within the worker's id pattern (REQUEST_ID_PATTERN: 128 characters).
        self.call_id = f"{ctx.request_id[:100]}-pool-{uuid.uuid4().hex[:12]}"
        self._aborted: str | None = None

    def abort(self, reason: str) -> None:
        """From the stopping thread: the request ends with `reason`, and the call is cancelled on its worker from a
        thread of its own (the stop, near its budget's end, waits on no worker: it has other calls to abort, and its
        batches to hand back)."""
        self._aborted = reason
        threading.Thread(target=cancel_on_worker, name=f"cancel {self.call_id}", daemon=True,
                         args=(self.gw.config.internal_http, self.worker_url, self.secret, self.call_id)).start()

    def raise_if_aborted(self) -> None:
        if self._aborted is not None:
            raise gateway_shutdown(self._aborted)

    def close(self) -> None:
        """Nothing to settle from the stopping thread: pool_on_a_worker settles the tokens when the call ends."""


def pool_on_a_worker(gw: Gateway, ctx: RequestContext, card: ModelCard, inputs: list[list[int]],
                     classifier: Classifier | None) -> tuple[list[list[float]], int]:
    """The inputs' pooled outputs (embeddings, or with a classifier its head's logits) from one worker call
    (another worker if the routed one is gone), and the prompt tokens they took: taken from the key's token budget
    and counted as the request's (metrics, usage accounting). The callers checked their count (check_input_count)
    before tokenizing them."""
    prompt_tokens = sum(len(ids) for ids in inputs)
    if ctx.api_key is not None:
        gw.limiter.reserve_tokens(ctx.api_key, prompt_tokens)

    def route() -> Endpoint:
        return route_request(gw, ctx, card.name)

    def pool(endpoint: Endpoint):
        secret = endpoint.key(gw.config.cluster.shared_secret)
        if not ctx.batch:
            return embed_on_worker(gw.http, endpoint.worker_url, secret, inputs, for_request=ctx.request_id)
        call = BatchPoolingCall(gw, ctx, endpoint.worker_url, secret)
        gw.track(call)
        try:
            gw.raise_if_stopping(batch=True)  # stopped before it was tracked: not started
            result = embed_on_worker(gw.http, endpoint.worker_url, secret, inputs, for_request=ctx.request_id,
                                     call_id=call.call_id)
        except ApiError:
            call.raise_if_aborted()  # cancelled: the shutdown's 503, not the worker's answer to it
            raise
        finally:
            gw.untrack(call)
        call.raise_if_aborted()  # answered after the stop: not written (the batch's next process runs it again)
        return result

    expected = "embed" if classifier is None else "classify"
    try:
        _, result = on_a_worker(gw, ctx, route(), route, pool)  # a worker that died meanwhile: another
        if result.pooling != expected:  # never answer a classifier's logits as embeddings, or the reverse
            log.error("model %s: its worker pools as %r, its config.json (%s) says %r", card.name, result.pooling,
                      card.source, expected)
            raise InternalError(f"model {card.name!r}: its worker computes {result.pooling!r} outputs, its "
                                f"checkpoint's config.json says {expected!r}; ask the operator to redeploy it")
    except BaseException:  # nothing answered: nothing counted or billed
        if ctx.api_key is not None:
            gw.limiter.settle_tokens(ctx.api_key, prompt_tokens, 0)
        raise
    gw.metrics.prompt_tokens.labels(card.name).inc(prompt_tokens)
    gw.usage.record(ctx.api_key, card.name, ctx.endpoint, prompt_tokens, 0)
    return result.embeddings, prompt_tokens
