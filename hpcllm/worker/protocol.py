"""Wire types of the worker's internal HTTP API (the worker owns them; the gateway and node agent import them).

POST /v1/internal/generate takes a GenerateRequest and answers with an NDJSON stream (Content-Type
application/x-ndjson): one TokenLine per produced token, then exactly one FinalLine. Blank lines are keep-alives
sent while a request waits; readers skip them. See docs/worker.md for the full description.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, Strict, TypeAdapter, model_validator

from hpcllm.config import MODEL_NAME_PATTERN, PRIORITY_MAX, PRIORITY_MIN
from hpcllm.credentials import MigrationTicket
from hpcllm.httpkit.client import HttpUrl
from hpcllm.httpkit.wire import WireModel

GENERATE_PATH = "/v1/internal/generate"
TOKENS_PATH = "/v1/internal/requests/{request_id}/tokens"
CANCEL_PATH = "/v1/internal/requests/{request_id}/cancel"
# Live migration (docs/migration.md). On the destination: prepare a HELD request, extend it, attach to it.
PREPARE_MIGRATION_PATH = "/v1/internal/migrations/prepare"
EXTEND_MIGRATION_PATH = "/v1/internal/migrations/{request_id}/extend"
ATTACH_MIGRATION_PATH = "/v1/internal/migrations/{request_id}/attach"
# DELETE: drop a held request (only a held one: a live request that merely shares the id is never touched).
HELD_MIGRATION_PATH = "/v1/internal/migrations/{request_id}"
# On the source: move one running request, or all of them (node drain), to a destination worker.
MIGRATE_REQUEST_PATH = "/v1/internal/requests/{request_id}/migrate"
MIGRATE_ALL_PATH = "/v1/internal/migrate"
# Embeddings of token id lists (the model's last-token hidden state, L2-normalized: vLLM's default for decoders).
EMBED_PATH = "/v1/internal/embed"
MAX_EMBED_INPUTS = 2048  # token id lists per embed call (the gateway checks a request against it)


def not_pooled_by_vllm(model: str) -> str:
    """Why a model deployed with engine = "vllm" answers no embed call: its worker's refusal, and the gateway's
    before routing a request there (no cold start for it)."""
    return (f'model {model!r}: embeddings are not served by models with engine = "vllm" yet, nor the scores and '
            "classifications computed from them; deploy the model on hpcllm's engine for /v1/embeddings, "
            "/v1/score, /v1/rerank and /v1/classify")
# LoRA adapters at runtime, under vLLM's names for them (its dynamic LoRA endpoints; the worker's key guards them).
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
NDJSON_MEDIA_TYPE = "application/x-ndjson"

# Why a generation ended. "stop": eos, a stop token id or a stop string; "length": max_tokens or the model's context
# is full; "abort": cancelled (client went away, POST cancel, worker shutting down); "error": failed in the engine;
# "migrated": the generation goes on on another worker (FinalLine.migrated_to says where and from which index).
FinishReason = Literal["stop", "length", "abort", "error", "migrated"]
# "held": a migration destination's request, prefilled from token ids, waiting to be attached (not sampling).
RequestState = Literal["waiting", "running", "held", "finished"]

# Request ids appear in URL paths, so keep them to characters that need no escaping.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class ChatMessage(WireModel):
    role: str = Field(min_length=1)
    content: str


# Seeds are signed 64-bit integers, as vLLM's OpenAI server takes them (its engine is given them unchanged).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


# OpenAI's bounds on logit_bias: a bias is within -100..100, for at most 300 token ids.
LOGIT_BIAS_MAX = 100.0
LOGIT_BIAS_MAX_TOKENS = 300


# The float32 range the sampler computes in (sampling.py): the largest finite number, the smallest normal one.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 2.0**-126


def float32_factor(value: float) -> float:
    """A factor the sampler multiplies by and divides by in float32 (repetition_penalty: sampling.apply_penalties):
    it and its inverse must be finite float32 numbers, else the arithmetic overflows (1e39, 1e-40, inf)."""
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:
        raise ValueError(f"must be a float32 number above 0 whose inverse is one too ({FLOAT32_TINY:.4g} to "
                         f"{FLOAT32_MAX:.4g}), not {value!r}")
    return value


Float32Factor = Annotated[float, AfterValidator(float32_factor)]


def offset_seed(seed: int, offset: int) -> int:
    """seed + offset, wrapped around within the seed range (sample j of n draws with offset_seed(seed, j))."""
    return (seed - SEED_MIN + offset) % 2**64 + SEED_MIN


class Thinking(WireModel):
    """A reasoning model's thinking before its answer, by its marker tokens (the gateway's reasoning parser knows
    them): its grammar constrains only the answer after the first end_token_id (vLLM's structured outputs with a
    reasoning parser), and budget bounds it (vLLM's thinking_token_budget)."""

    end_token_id: int = Field(ge=0)
    # None: the output starts inside thinking (the prompt opened it); else it thinks only when its first token is
    # this one, and any other first token begins the answer.
    start_token_id: int | None = Field(default=None, ge=0)
    # At most this many thinking tokens (the markers not counted), then end_token_id is forced; None: no bound.
    budget: int | None = Field(default=None, ge=0)


class GenerateRequest(WireModel):
    """One generation. Give exactly one of prompt_token_ids, prompt (text) or messages (chat)."""

    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    # Rendered with the tokenizer's chat template (add_generation_prompt=True), then tokenized.
    messages: list[ChatMessage] | None = None
    # Upper bound on generated tokens (resumed ones included); None: until the model's context is full.
    max_tokens: int | None = Field(default=None, ge=1)
    # 0 means greedy (argmax).
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # 0 disables top-k.
    top_k: int = Field(default=0, ge=0)
    # vLLM's min-p: after temperature, drop tokens less likely than min_p times the most likely one (0: off).
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    # OpenAI's penalties over the OUTPUT tokens (resumed ones included): logit -= frequency_penalty * count +
    # presence_penalty * (count > 0).
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM's, over prompt and output tokens: a positive logit is divided by it, another multiplied (1: off).
    repetition_penalty: Float32Factor = 1.0
    # Added to the logits of these token ids before the penalties (OpenAI's logit_bias; ids are checked against
    # the model's vocabulary). JSON keys are strings: a key is the token id's decimal digits.
    logit_bias: dict[Annotated[int, Strict(False)], Annotated[float, Field(ge=-LOGIT_BIAS_MAX, le=LOGIT_BIAS_MAX)]] = (
        Field(default_factory=dict, max_length=LOGIT_BIAS_MAX_TOKENS))
    # Sampling is reproducible for a given seed; None picks a random seed (reported by the tokens endpoint).
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    # Migration: output tokens an earlier worker already produced for this request; generation continues after them.
    resume_token_ids: list[int] = Field(default_factory=list)
    # Log probabilities: None = none; k >= 0 = each token line carries the sampled token's log probability and the
    # k most likely tokens' (of the model's raw distribution, before temperature / top-k / top-p, as vLLM).
    logprobs: int | None = Field(default=None, ge=0, le=20)
    # Prompt log probabilities (vLLM's SamplingParams.prompt_logprobs): None = none; k >= 0 = the first token line
    # (index 0) carries, per prompt token, its log probability given the tokens before it and the k most likely
    # tokens' (None for the first prompt token). A request resumed after index 0 gets none (they were delivered).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Structured outputs: the output follows this llguidance grammar, Lark text (the gateway's JSON schema, regex,
    # choice or grammar as hpcllm.worker.grammar.compile_grammar writes it); one the model's tokenizer cannot take
    # is a 400 naming grammar.
    grammar: str | None = Field(default=None, min_length=1)
    # A reasoning model's thinking (Thinking): the grammar waits for its end, its budget bounds it.
    thinking: Thinking | None = None
    # The LoRA adapter to run with (vLLM's lora_request; one the worker was started with, else a 400 naming lora).
    lora: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN)
    # vLLM's priority: lower is sooner. Waiting requests are admitted by (priority, arrival); a running request of a
    # larger value is preempted first when KV blocks run out, and for a waiting one of a smaller value.
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX)

    @model_validator(mode="after")
    def _one_prompt_form(self) -> "GenerateRequest":
        given = [name for name in ("prompt_token_ids", "prompt", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of prompt_token_ids, prompt or messages (got {', '.join(given) or 'none'})"
            )
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages is empty")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


# vLLM's stand-in for a log probability of -inf (JSON has no infinity): reported log probabilities are at least this.
LOGPROB_FLOOR = -9999.0


class TopLogprob(WireModel):
    token_id: int
    token: str  # the token decoded alone (special tokens kept)
    logprob: float


class TokenLogprobs(WireModel):
    """Log probability of the produced token, and the most likely alternatives (GenerateRequest.logprobs of them)."""

    token: str
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)
    rank: int | None = None  # prompt entries only: how many tokens were at least as likely (vLLM's Logprob.rank)


class TokenLine(WireModel):
    """One produced token. text is the newly final detokenized text (may be empty: held back until complete)."""

    type: Literal["token"] = "token"
    index: int  # position in the output (resumed tokens count, so a resumed stream starts at len(resume_token_ids))
    token_id: int
    text: str
    logprobs: TokenLogprobs | None = None  # only when the request asked for logprobs
    # Only on index 0 when the request asked for prompt_logprobs: one entry per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int  # resumed tokens included: the whole request's output so far
    total_tokens: int


class ErrorInfo(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


# ErrorInfo.type of a refusal or a final "error" line when the worker's engine is not running or died (its model
# process was killed, a step hung): the worker's trouble, not the request's; the gateway continues elsewhere.
ENGINE_UNAVAILABLE = "engine_unavailable"


# A chat the model's chat template refuses (its raise_exception: roles that do not alternate) is a 400 naming messages,
# with this code and this message (the template's words), from the gateway and the worker alike; a template that does
# not parse is the model's fault, a 500.
INVALID_MESSAGES = "invalid_messages"


def chat_template_refusal(exc: Exception) -> str:
    return f"the model's chat template rejected the messages: {exc}"


def engine_unavailable(error: ErrorInfo | None) -> bool:
    """The refusal or failure is ENGINE_UNAVAILABLE: the worker's engine is not running (its model still loads,
    failed to load, or died), not the request's fault, nor a worker that is merely full for a moment."""
    return error is not None and error.type == ENGINE_UNAVAILABLE


class MigratedTo(WireModel):
    """Where a migrated generation goes on: attach to request_id on worker_url from output index from_index."""

    worker_url: str
    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    from_index: int = Field(ge=0)
    # The migration ticket's grant: the destination lets the reader attach to this request with it (a node that
    # is not the operator's never learns the destination's key).
    grant: str | None = None


class FinalLine(WireModel):
    type: Literal["final"] = "final"
    finish_reason: FinishReason
    # The stop string or stop token id that ended the generation (None for eos or other reasons).
    stop_reason: str | int | None = None
    usage: Usage
    error: ErrorInfo | None = None
    # Only with finish_reason "migrated".
    migrated_to: MigratedTo | None = None


StreamLine = Annotated[TokenLine | FinalLine, Field(discriminator="type")]
_STREAM_LINE = TypeAdapter(StreamLine)


def stream_line_json(line: TokenLine | FinalLine) -> bytes:
    """A stream line as sent: a token line leaves out the logprobs keys it has no values for (the common case stays
    short)."""
    exclude = None
    if isinstance(line, TokenLine):
        exclude = {name: True for name in ("logprobs", "prompt_logprobs") if getattr(line, name) is None}
        if line.logprobs is not None and line.logprobs.rank is None:
            exclude["logprobs"] = {"rank"}  # a generated token's entry has none
    return line.model_dump_json(exclude=exclude or None).encode()


# A token line without logprobs as stream_line_json writes it, filled in without pydantic (one per token per stream,
# ~0.3 us instead of ~4 us): the same bytes, as hpcllm/worker/tests/test_protocol.py checks for every code point.
_TOKEN_LINE = b'{"type":"token","index":%d,"token_id":%d,"text":%s}\n'
_json_string = json.encoder.encode_basestring  # str -> JSON string literal, non-ASCII kept (pydantic's escaping)


def stream_line_bytes(line: TokenLine | FinalLine) -> bytes:
    """stream_line_json(line) plus the newline: one NDJSON line of a generate stream."""
    if type(line) is TokenLine and line.logprobs is None and line.prompt_logprobs is None:
        return _TOKEN_LINE % (line.index, line.token_id, _json_string(line.text).encode())
    return stream_line_json(line) + b"\n"


def parse_stream_line(raw: str | bytes) -> TokenLine | FinalLine | None:
    """One NDJSON line of a generate stream; None for a blank keep-alive line."""
    if not raw.strip():
        return None
    return _STREAM_LINE.validate_json(raw)


class RequestTokens(WireModel):
    """Answer of GET tokens and POST cancel: everything needed to resume the request on another worker."""

    request_id: str
    state: RequestState
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int
    finish_reason: FinishReason | None = None


class EmbedRequest(WireModel):
    inputs: list[list[int]] = Field(min_length=1, max_length=MAX_EMBED_INPUTS)
    # The caller's id of the call, to cancel it by (CANCEL_PATH, in whose URL it travels: a generation's pattern)
    # while it runs; none: it cannot be cancelled.
    request_id: str | None = Field(None, pattern=REQUEST_ID_PATTERN)

    @model_validator(mode="after")
    def _not_empty(self) -> "EmbedRequest":
        empty = next((i for i, ids in enumerate(self.inputs) if not ids), None)
        if empty is not None:
            raise ValueError(f"inputs[{empty}] is empty")
        return self


class EmbedResult(WireModel):
    embeddings: list[list[float]]  # one per input, in order: what `pooling` says
    prompt_tokens: int
    # "embed": L2-normalized last hidden states; "classify": a *ForSequenceClassification head's logits (raw)
    pooling: Literal["embed", "classify"] = "embed"


class ErrorResponse(WireModel):
    error: ErrorInfo


class LoadLoraAdapter(WireModel):
    lora_name: str = Field(pattern=MODEL_NAME_PATTERN)
    lora_path: str = Field(min_length=1)  # the PEFT adapter folder, as the worker's node sees it


class UnloadLoraAdapter(WireModel):
    lora_name: str = Field(pattern=MODEL_NAME_PATTERN)


class LoraAdapterResult(WireModel):
    """Answer of a load or unload: what the worker serves now."""

    lora_name: str
    changed: bool  # False: a load of an adapter already served from that folder (loading is idempotent)
    running_requests: int = 0  # an unload's: requests still running with it, whose end frees its weights
    lora_adapters: dict[str, str]  # name -> folder of every adapter it serves now


# ---- live migration (docs/migration.md) ---------------------------------------------------------------------------


class PrepareMigration(WireModel):
    """Destination: create a HELD request (prefill prompt + resume_token_ids, do not sample) and wait for it.

    generate carries the source request's prompt_token_ids, resume_token_ids = its output so far, and the same
    seed, sampling fields, stop, ignore_eos and max_tokens. The answer comes once the tokens are prefilled.
    """

    request_id: str = Field(pattern=REQUEST_ID_PATTERN)
    generate: GenerateRequest
    # The held request is dropped (its KV cache freed) when it is not attached within this many seconds of the
    # last prepare/extend call.
    hold_seconds: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _same_id(self) -> "PrepareMigration":
        if self.generate.request_id != self.request_id:
            raise ValueError(
                f"generate.request_id {self.generate.request_id!r} differs from request_id {self.request_id!r}"
            )
        return self


class PrepareResult(WireModel):
    request_id: str
    cached_tokens: int  # prompt + output tokens in the destination's KV cache


class ExtendMigration(WireModel):
    """Destination: append output tokens the source produced since the last round (replayed through the
    detokenizer and stop checks as if generated here) and prefill them; wait: answer only once prefilled."""

    token_ids: list[int]
    wait: bool = False


class ExtendResult(WireModel):
    cached_tokens: int  # tokens in the KV cache now (prompt + output)
    output_tokens: int  # output tokens the held request knows (resumed + extended)


class AttachMigration(WireModel):
    """Destination: release the held request and stream it from output index from_index (must equal the number
    of output tokens it holds, i.e. what the source delivered)."""

    from_index: int = Field(ge=0)


# How long after its deadline (MigrateRequest.timeout_seconds) a drain's answer may come: dropping on the
# destination the holds of moves cut short (hpcllm.worker.migration bounds each drop by a third of
# drain_answer_margin of its own deadline), the answer. The node agent orders the deadline drain_answer_margin before
# its own, so it hears the answer before it stops the worker.
DRAIN_ANSWER_MARGIN_SECONDS = 3.0


def drain_answer_margin(timeout_seconds: float) -> float:
    """The answer margin of a drain given timeout_seconds: DRAIN_ANSWER_MARGIN_SECONDS, or a fifth of it when that is
    short (a short drain keeps most of its time for moving). The node agent takes it from its own time and orders
    the rest as the worker's deadline; the worker, which sees only that deadline, gets at most this margin of it."""
    return min(DRAIN_ANSWER_MARGIN_SECONDS, timeout_seconds / 5)


class MigrateRequest(WireModel):
    """Source: move one request (or, on POST /v1/internal/migrate, every running one) to destination_url."""

    destination_url: HttpUrl
    # The controller's ticket naming this worker's model and destination_url (hpcllm.credentials): without one,
    # or for another destination, the worker refuses (403).
    ticket: MigrationTicket | None = None
    # Rounds in all, the first (prepare with everything so far) and the hand-over included; 1 = stop-and-copy.
    max_rounds: int = Field(default=8, ge=1, le=64)
    # Hand over (pause here, send the last tokens) once a round leaves at most this many new tokens, or once the
    # new tokens stop shrinking from one round to the next (from round 3 on).
    handover_tokens: int = Field(default=2, ge=0)
    hold_seconds: float = Field(default=60.0, gt=0, le=3600)
    # The migration's deadline, counted from when the worker takes the order: every call to the destination (a
    # prepare waits for the whole prefill) is bounded by what is left of it, and once half of what a request had
    # left when its move began has passed, its next round is the hand-over. POST /v1/internal/migrate (a drain)
    # begins no move past it and answers with what moved and what did not within DRAIN_ANSWER_MARGIN_SECONDS of it.
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600)


class MigrationResult(WireModel):
    request_id: str
    destination_url: str
    destination_request_id: str
    rounds: int
    tokens_per_round: list[int]  # tokens the destination prefilled in each round (the first includes the prompt)
    handover_seconds: float  # from pausing the request here to its stream's final "migrated" line
    total_seconds: float
    output_tokens_at_handover: int  # == MigratedTo.from_index


class MigrationFailure(WireModel):
    request_id: str
    error: str


class MigrateAllResult(WireModel):
    migrated: list[MigrationResult]
    failed: list[MigrationFailure]
