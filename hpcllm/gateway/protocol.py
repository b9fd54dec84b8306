"""Wire types shared by the OpenAI endpoints, and how request bodies become validated models.

Status mapping for bad bodies (documented in docs/gateway.md):
  400 unsupported_media_type  the Content-Type is not application/json (vLLM's answer too: a 400, not a 415)
  400 invalid_json       the body is not JSON or not a JSON object
  400 missing_field      a required field is absent (param names it)
  422 invalid_value      a field is present with the wrong type or outside its range (param names it)
  400 unsupported_parameter  a valid OpenAI parameter with a value this gateway does not implement (echo, ...)
Validation is strict: "10" is not accepted where an integer is expected, as OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hpcllm.config import PRIORITY_MAX, PRIORITY_MIN
from hpcllm.gateway.errors import InvalidRequest, InvalidValue
from hpcllm.httpkit.body import parse_json_body, request_bytes
from hpcllm.worker.grammar import ANY_JSON_OBJECT, GRAMMAR_KINDS, InvalidGrammar, compile_grammar
from hpcllm.worker.protocol import (LOGIT_BIAS_MAX, LOGIT_BIAS_MAX_TOKENS, SEED_MAX, SEED_MIN, Float32Factor,
                                    Thinking)

M = TypeVar("M", bound=BaseModel)
# A request's `priority` (vLLM's extension; completions, chat, Responses): lower is sooner at the worker
# (docs/gateway.md, Priority); below the key's min_priority is a 400.
Priority = Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)]


class OpenAIRequest(BaseModel):
    # Unknown fields are ignored (clients send newer or vendor fields); fields that would change the output
    # if honoured are declared, and rejected with a 400 when set to something unsupported.
    model_config = ConfigDict(extra="ignore", strict=True)


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIRequest):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PromptLogprob(OpenAIResponse):
    """vLLM's Logprob, as its prompt_logprobs report it."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, {token id: PromptLogprob} for the token and its most likely alternatives
# (None for the first token, which nothing comes before).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class UsageInfo(OpenAIResponse):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCardOut(OpenAIResponse):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    # vLLM's extra field: clients (LiteLLM, Open WebUI) read a model's context length from it.
    max_model_len: int | None = None
    # vLLM's: the model a LoRA adapter is served on (`parent`, null for a model) and what it was made from (`root`:
    # the model's own name, the adapter's for an adapter: no filesystem paths go to clients).
    root: str | None = None
    parent: str | None = None


class ModelList(OpenAIResponse):
    object: str = "list"
    data: list[ModelCardOut] = Field(default_factory=list)


Listed = TypeVar("Listed", bound=BaseModel | dict[str, Any])


def _id_of(listed: BaseModel | dict[str, Any]) -> str:
    return listed["id"] if isinstance(listed, dict) else listed.id


def unplaced_after(after: str, noun: str, why: str) -> InvalidRequest:
    """The 400 naming `after` of a list (files, batches, a response's or a conversation's items) when it names
    nothing of the list (`noun`) that places a page (`why`, in parentheses): the pager starts again."""
    return InvalidRequest(f"'after': you have no {noun} with id {after[:80]!r} ({why}): list again from the start, "
                          f"without 'after'", param="after")


class ListPage(OpenAIResponse, Generic[Listed]):
    """OpenAI's paged list object (files, batches; stored items, as the JSON dicts kept): a page of objects with
    ids, the first's and last's."""

    object: Literal["list"] = "list"
    data: list[Listed]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False

    @classmethod
    def of(cls, data: list[Listed], has_more: bool) -> ListPage[Listed]:
        return cls(data=data, first_id=_id_of(data[0]) if data else None,
                   last_id=_id_of(data[-1]) if data else None, has_more=has_more)


_UNION_BRANCH_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _where(loc: tuple) -> str:
    """'messages[0].content' from pydantic's loc, leaving out the union branch names pydantic puts in it."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif "[" in part or part in _UNION_BRANCH_NAMES or part.startswith("function-"):
            continue
        else:
            parts.append(f".{part}" if parts else part)
    return "".join(parts) or "body"


def validation_error(exc: ValidationError) -> InvalidRequest | InvalidValue:
    errors = exc.errors(include_url=False)
    missing = [e for e in errors if e["type"] == "missing"]
    if missing:
        where = _where(missing[0]["loc"])
        return InvalidRequest(f"'{where}' is a required property", param=where, code="missing_field")
    first = errors[0]
    where = _where(first["loc"])
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    reason = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators' messages
    return InvalidValue(f"invalid value for '{where}': {reason}{more}", param=where, code="invalid_value")


JSON_MEDIA_TYPE = "application/json"


def check_json_content_type() -> None:
    """A body sent as form data (curl -d without -H) or text is refused, as vLLM does, not parsed anyway: the client
    learns what to send instead of a JSON error about a body it did not mean as JSON. Parameters (charset) are fine."""
    got = request.mimetype
    if got != JSON_MEDIA_TYPE:
        named = f"'{got[:100]}'" if got.isascii() and got.isprintable() else "another"  # never echo raw bytes
        raise InvalidRequest(f"the request body must be JSON sent with the header 'Content-Type: {JSON_MEDIA_TYPE}' "
                             f"(got {named if got else 'no'} Content-Type)", code="unsupported_media_type")


def json_body() -> dict[str, Any]:
    check_json_content_type()
    raw = request_bytes()
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = parse_json_body(raw)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return body


def parse_body(model_cls: type[M]) -> M:
    body = json_body()
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_query(model_cls: type[M], args: Mapping[str, str]) -> M:
    """A request's query string as `model_cls` (its values strings, so not strict: "20" is a limit of 20); 422
    naming the parameter when it does not validate."""
    try:
        return model_cls.model_validate(dict(args), strict=False)
    except ValidationError as exc:
        raise validation_error(exc) from None


def unsupported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}': {what} is not supported by this server", param=param,
                          code="unsupported_parameter")


PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def prompt_list(value: Any, name: str) -> list[str | list[int]]:
    """A completions prompt or an embeddings input as a list of prompts, each a str or a list of token ids."""
    if isinstance(value, str) or _is_token_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
        return value
    if isinstance(value, list) and not value:
        raise ValueError(f"{name} must not be empty")
    raise ValueError(f"{name} must be {PROMPT_SHAPES}")


# More than any context (a tokenizer's max_length beyond a C long is an OverflowError, a 500).
TRUNCATE_PROMPT_TOKENS_MAX = 2**31 - 1


class TruncatingRequest(OpenAIRequest):
    """vLLM's prompt truncation (completions, chat, embeddings, classify, score, rerank): each prompt keeps
    truncate_prompt_tokens tokens (-1: as many as the model's context holds), its first ones (truncation_side
    "right") or its last ones ("left"); no side: the tokenizer's (most truncate on the right)."""

    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=TRUNCATE_PROMPT_TOKENS_MAX)
    truncation_side: Literal["left", "right"] | None = None


class InputsRequest(TruncatingRequest):
    """A request of inputs in the completions prompt shapes, one result each (embeddings, classify)."""

    model: str | None = Field(None, min_length=1)  # none: the one served model that answers (as vLLM's one model)
    # After validation: a list of inputs, each a str or a list of token ids.
    input: Any
    # vLLM's: false encodes a text without the tokenizer's special tokens (BOS, CLS/SEP); token ids are as given.
    add_special_tokens: bool = True

    @field_validator("input")
    @classmethod
    def _input_list(cls, value: Any) -> list[str | list[int]]:
        return prompt_list(value, "input")


MAX_STOP_STRINGS = 16
# vLLM's sampling extensions that change the output and that hpcllm's engine does not implement: (neutral value,
# what is refused, when another value matters: None always, else a test of the request, false where vLLM makes any
# value a no-op). Sent with the neutral value (clients that send every field), or where it changes nothing, they are
# accepted; any other value is a 400, never silently ignored.
UNIMPLEMENTED_VLLM_PARAMETERS: dict[str, tuple[Any, str, Callable[[Any], bool] | None]] = {
    "min_tokens": (0, "a minimum number of tokens", None),
    "include_stop_str_in_output": (False, "the stop string in the output",
                                   lambda req: bool(req.stop or req.stop_token_ids)),
    "skip_special_tokens": (True, "special tokens in the output", None),
    "spaces_between_special_tokens": (True, "a choice of spaces between special tokens",
                                      lambda req: req.skip_special_tokens is False),
    "bad_words": ([], "bad words", None),
    "allowed_token_ids": (None, "a set of allowed token ids", None),
    "logprob_token_ids": (None, "the log probabilities of chosen token ids", None),
    "return_tokens_as_token_ids": (False, "tokens as token ids in logprobs",
                                   lambda req: req.logprobs is not None and req.logprobs is not False),
    "use_beam_search": (False, "beam search", None),  # and so its length_penalty, which only beam search reads
    "return_token_ids": (False, "the prompt's and the choice's token ids in each choice", None),
    # vLLM's RepetitionDetectionParams: a max_pattern_size of 0 turns it off
    "repetition_detection": (None, "ending the answer at a repeated n-gram",
                             lambda req: not isinstance(req.repetition_detection, dict)
                             or req.repetition_detection.get("max_pattern_size", 0) != 0),
}
# How an error names each kind of constraint (hpcllm.worker.grammar.GRAMMAR_KINDS).
CONSTRAINT_NAMES = {"json": "JSON schema", "regex": "regular expression", "choice": "choice", "grammar": "grammar"}


@dataclass(frozen=True)
class Constraint:
    """What the answer must follow: a kind of grammar.compile_grammar's and its spec, and the request field that
    gives it (param, which an error names)."""

    param: str
    kind: str
    spec: Any

    @property
    def field(self) -> str:
        """The top-level request field that gives it."""
        return self.param.split(".")[0]

    def grammar(self) -> str:
        """Its llguidance grammar (what the worker gets); a 400 naming param when llguidance cannot compile it."""
        try:
            return compile_grammar(self.kind, self.spec)
        except InvalidGrammar as exc:
            raise InvalidRequest(f"invalid {CONSTRAINT_NAMES[self.kind]} in '{self.param}': {exc}", param=self.param,
                                 code="invalid_value") from None


class JsonSchemaFormat(OpenAIRequest):
    """response_format.json_schema: OpenAI's structured outputs. strict is accepted either way: the output always
    follows the schema (vLLM's rule too)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # OpenAI's default: {} (any JSON)
    strict: bool | None = None


class ResponseFormat(OpenAIRequest):
    """What the answer must be: text (the default), any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        """The JSON schema the output is constrained to (None for text); a 400 for json_schema without its object."""
        if self.type == "json_object":
            return Constraint("response_format", "json", ANY_JSON_OBJECT)
        if self.type == "text":
            return None
        if self.json_schema is None:
            raise InvalidRequest("response_format of type 'json_schema' needs a 'json_schema' object",
                                 param="response_format.json_schema", code="missing_field")
        return Constraint("response_format.json_schema.schema", "json", self.json_schema.schema_)


def json_schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text (vLLM takes both: structured_outputs.json, guided_json);
    a 400 naming param when it is neither."""
    schema = value
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            schema = None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON schema: an object, or its JSON text", param=param,
                             code="invalid_value")
    return schema


class StructuredOutputs(OpenAIRequest):
    """vLLM's `structured_outputs` extension (StructuredOutputsParams): one constraint of `json` (a schema, or its
    JSON text), `json_object`, `regex`, `choice` (strings) and `grammar` (Lark or GBNF, as vLLM's guidance backend
    reads it); `structural_tag` and the options that change a schema are refused (check)."""

    json_: Any = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    structural_tag: Any = None
    # vLLM's options: compact JSON is what this server always writes, so disable_any_whitespace changes nothing.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Any = None
    # The fields that give a constraint (constraints), as errors list them.
    CONSTRAINT_FIELDS: ClassVar[tuple[str, ...]] = ("json", "json_object", "regex", "choice", "grammar")

    def constraints(self) -> list[Constraint]:
        """The constraints given (check: one at most); a 400 when `json` is no schema."""
        given = [Constraint("structured_outputs.json_object", "json", ANY_JSON_OBJECT)] if self.json_object else []
        if self.json_ is not None:
            param = "structured_outputs.json"
            given.append(Constraint(param, "json", json_schema(self.json_, param)))
        given += [Constraint(f"structured_outputs.{kind}", kind, getattr(self, kind))
                  for kind in ("regex", "choice", "grammar") if getattr(self, kind) is not None]
        return given

    @classmethod
    def _fields(cls, conjunction: str) -> str:
        *first, last = cls.CONSTRAINT_FIELDS
        return f"{', '.join(first)} {conjunction} {last}"

    @classmethod
    def unsupported_option(cls, param: str, name: str) -> InvalidRequest:
        """The 400 for an option (structural_tag, whitespace_pattern) given as `param`."""
        return unsupported(param, f"a {name} ({cls._fields('and')} are)")

    def check(self) -> None:
        for name in ("structural_tag", "whitespace_pattern"):
            if getattr(self, name) is not None:
                raise self.unsupported_option(f"structured_outputs.{name}", name)
        if self.disable_additional_properties:
            raise unsupported("structured_outputs.disable_additional_properties", "disable_additional_properties")
        given = self.constraints()
        if not given:  # vLLM's 400 too: a misspelt field must not leave the answer unconstrained
            raise InvalidRequest(f"structured_outputs needs one constraint: {self._fields('or')}",
                                 param="structured_outputs", code="invalid_value")
        if len(given) > 1:
            names = " and ".join(f"'{c.param.split('.')[1]}'" for c in given)
            raise InvalidRequest(f"structured_outputs takes one constraint, not {names}",
                                 param="structured_outputs", code="invalid_value")


class SamplingRequest(TruncatingRequest):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    # vLLM extensions, passed to the worker: top_k (0 or -1 disables) and ignore_eos.
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    # vLLM's: at most this many thinking tokens, then the worker ends the thinking (writes </think>) and the answer
    # goes on; -1 (or none): no bound. Only for a reasoning model's chat (hpcllm.gateway.chat.reasoning).
    thinking_token_budget: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # After validation: token id -> bias (JSON keys are strings: each must be a token id's digits).
    logit_bias: dict[str, float] | None = None
    # vLLM extensions, passed to the worker: repetition_penalty (over prompt and output tokens) and min_p.
    repetition_penalty: Float32Factor | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    priority: Priority = 0
    # vLLM extension: each prompt token's log probability and rank and this many most likely alternatives
    # (PromptLogprob; not streamed, as vLLM).
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # Structured outputs: json_object / json_schema constrain the answer (hpcllm.worker.grammar, both engines).
    response_format: ResponseFormat | None = None
    # vLLM's extension (StructuredOutputs), and its older guided_<kind> fields: a JSON schema, a regex, a choice, a
    # grammar (GRAMMAR_KINDS).
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None  # a schema or its JSON text, as structured_outputs.json
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_whitespace_pattern: Any = None  # structured_outputs.whitespace_pattern's older name: refused as it is
    # vLLM's: more tokens that end a choice, as EOS does (the worker checks them against the vocabulary; the choice's
    # stop_reason is the id).
    stop_token_ids: list[int] | None = None
    # UNIMPLEMENTED_VLLM_PARAMETERS: declared so that check_supported sees them (unknown fields are dropped)
    min_tokens: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logprob_token_ids: Any = None
    return_tokens_as_token_ids: Any = None
    use_beam_search: Any = None
    return_token_ids: Any = None
    repetition_detection: Any = None
    # vLLM's watermarking is not here: it only opts a request out of the server's --watermark-config, and with none
    # (hpcllm has none) vLLM answers unmarked, true or not; so it is an ignored field, as there.
    # The vLLM extensions this endpoint refuses unless neutral (check_supported): a subclass adds its own.
    unimplemented_parameters: ClassVar[dict[str, tuple[Any, str, Callable[[Any], bool] | None]]] = (
        UNIMPLEMENTED_VLLM_PARAMETERS)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        return [s for s in value if s]

    @field_validator("logit_bias")
    @classmethod
    def _token_id_biases(cls, value: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's rules: token ids as keys, biases within -100..100, at most 300 of them (the worker checks the
        ids against the model's vocabulary)."""
        if not value:
            return {}
        if len(value) > LOGIT_BIAS_MAX_TOKENS:
            raise ValueError(f"logit_bias may hold at most {LOGIT_BIAS_MAX_TOKENS} token ids, not {len(value)}")
        biases = {}
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers as strings), not {key!r}")
            if not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
                raise ValueError(f"the bias of token {key} is {bias:g}; biases must be within "
                                 f"{-LOGIT_BIAS_MAX:g}..{LOGIT_BIAS_MAX:g}")
            biases[int(key)] = bias
        return biases

    @property
    def thinking_budget(self) -> int | None:
        """thinking_token_budget, None for no bound."""
        return None if self.thinking_token_budget in (None, -1) else self.thinking_token_budget

    def check_supported(self) -> None:
        """Reject parameter values this server cannot honour (400), instead of silently ignoring them."""
        for name, (neutral, what, matters) in self.unimplemented_parameters.items():
            value = getattr(self, name)
            if value is not None and value != neutral and (matters is None or matters(self)):
                raise unsupported(name, what)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options",
                                 code="invalid_request")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequest("prompt_logprobs are not available when stream is true", param="prompt_logprobs",
                                 code="invalid_value")
        self._check_response_format()

    def _check_response_format(self) -> None:
        """One constraint at most (response_format, structured_outputs or a guided_* field), which llguidance
        compiles (here, before any worker is asked: the worker checks the grammar against the model's tokenizer)."""
        if self.structured_outputs is not None:
            self.structured_outputs.check()
        if self.guided_whitespace_pattern is not None:
            raise StructuredOutputs.unsupported_option("guided_whitespace_pattern", "whitespace_pattern")
        given = self.constraints_given()
        if len(given) > 1:
            raise InvalidRequest(f"'{given[0].field}' and '{given[1].field}' both constrain the answer; send one of "
                                 "them", param=given[1].field, code="invalid_value")
        if given:
            given[0].grammar()

    def constraints_given(self) -> list[Constraint]:
        """The request's constraints on the answer (check_supported: one at most)."""
        given = [self.response_format.constraint()] if self.response_format is not None else []
        if self.structured_outputs is not None:
            given += self.structured_outputs.constraints()
        given += [Constraint(f"guided_{kind}", kind, getattr(self, f"guided_{kind}") if kind != "json" else
                             json_schema(self.guided_json, "guided_json"))
                  for kind in GRAMMAR_KINDS if getattr(self, f"guided_{kind}") is not None]
        return [constraint for constraint in given if constraint is not None]

    def constraint(self) -> Constraint | None:
        """What the answer must follow (None: free text); after check_supported."""
        given = self.constraints_given()
        return given[0] if given else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.include_usage and self.stream_options.continuous_usage_stats)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def sampling(self, max_tokens: int | None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingOptions:
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0.0:  # OpenAI accepts top_p=0: only the most likely token is kept, i.e. greedy
            temperature, top_p = 0.0, 1.0
        return SamplingOptions(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(0, self.top_k or 0),
            seed=self.seed, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0, logit_bias=self.logit_bias or {},
            grammar=constraint.grammar() if (constraint := self.constraint()) is not None else None,
            priority=self.priority,
        )


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None  # None: until the model's context is full
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    logprobs: int | None = None  # top alternatives per token the worker reports (None: no logprobs)
    prompt_logprobs: int | None = None  # top alternatives per prompt token (None: the prompt is not scored)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # structured outputs: the llguidance grammar the output follows (Constraint.grammar)
    thinking: Thinking | None = None  # a reasoning model's thinking: the grammar waits for its end, a budget bounds it
    priority: int = 0  # lower is sooner at the worker (GenerateRequest.priority)
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS (GenerateRequest.stop_token_ids)
