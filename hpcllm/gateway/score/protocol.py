"""Wire types of vLLM's scoring APIs: /v1/score (vLLM's ScoreRequest, four spellings of its two sides) and
/v1/rerank, /v2/rerank (Jina's and Cohere's shape, vLLM's RerankRequest, plus Cohere's return_documents)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from hpcllm.gateway.errors import InvalidRequest
from hpcllm.gateway.protocol import OpenAIResponse, TruncatingRequest, UsageInfo, unsupported

if TYPE_CHECKING:
    from hpcllm.gateway.tokenization import PromptEncoder

# vLLM's names for the two sides of a score request, in the order its request union tries them.
SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


@dataclass(frozen=True)
class Side:
    """The texts of one side of a score request, and the field that gave them (what errors name)."""

    name: str
    texts: list[str]
    given_as_list: bool

    @classmethod
    def of(cls, value: Any, name: str) -> "Side":
        """A string or a list of strings; multimodal content (vLLM's {"content": [...]}) is refused."""
        values = value if isinstance(value, list) else [value]
        for i, text in enumerate(values):
            where = f"{name}[{i}]" if isinstance(value, list) else name
            if isinstance(text, dict) and "content" in text:
                raise unsupported(where, "multimodal content (the served models read text)")
            if not isinstance(text, str):
                raise InvalidRequest(f"'{where}' must be a string or a list of strings", param=where,
                                     code="invalid_value")
        return cls(name, values, isinstance(value, list))

    def cut(self, encoder: PromptEncoder, tokens: int) -> "Side":
        """This side with each text cut to its first `tokens` content tokens (0: uncut)."""
        if not tokens:
            return self
        return replace(self, texts=[encoder.cut_to_tokens(text, tokens) for text in self.texts])

    def param(self, index: int) -> str:
        return f"{self.name}[{index}]" if self.given_as_list else self.name


class ScoringRequest(TruncatingRequest):
    """What vLLM's score and rerank requests share. max_tokens_per_query and max_tokens_per_doc (Cohere's v2) cut
    each query and document text before they are paired; truncate_prompt_tokens then cuts each input (a
    cross-encoder's pair as one)."""

    model: str | None = Field(None, min_length=1)  # none: the one model that scores (serving.scoring_models)
    user: str | None = None
    max_tokens_per_query: int = 0
    max_tokens_per_doc: int = 0
    use_activation: bool | None = None  # a cross-encoder's sigmoid (None: the model's default, on)
    # A score template's variables (vLLM's); instruction is chat_template_kwargs' "instruction" unless that is set.
    instruction: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any] | None:
        if self.instruction is None:
            return self.chat_template_kwargs
        return {"instruction": self.instruction, **(self.chat_template_kwargs or {})}

    def side_limits(self, max_model_len: int | None) -> tuple[int, int]:
        """The content tokens each query and each document keeps (0: all), a 400 naming the field (vLLM's words)
        for a negative one or one the model's context could not hold with a special token."""
        for param in ("max_tokens_per_query", "max_tokens_per_doc"):
            value = getattr(self, param)
            if value < 0:
                raise InvalidRequest(f"{param} must be a non-negative integer", param=param, code="invalid_value")
            if max_model_len is not None and value >= max_model_len:
                raise InvalidRequest(f"{param} ({value}) must be less than max_model_len ({max_model_len}).",
                                     param=param, code="invalid_value")
        return self.max_tokens_per_query, self.max_tokens_per_doc


class ScoreRequest(ScoringRequest):
    queries: Any = None
    documents: Any = None
    items: Any = None
    data_1: Any = None
    data_2: Any = None
    text_1: Any = None
    text_2: Any = None

    def sides(self) -> tuple[Side, Side]:
        """The first of vLLM's spellings given whole (text_1 with text_2, queries with documents, ...)."""
        for first, second in SCORE_SIDES:
            if getattr(self, first) is not None and getattr(self, second) is not None:
                return Side.of(getattr(self, first), first), Side.of(getattr(self, second), second)
        given = next((name for pair in SCORE_SIDES for name in pair if getattr(self, name) is not None), None)
        missing = "text_2" if given is None else _partner(given)
        raise InvalidRequest(f"'{missing}' is a required property (a score request gives text_1 and text_2, or "
                             "queries and documents)", param=missing, code="missing_field")


def _partner(name: str) -> str:
    return next(second if name == first else first for first, second in SCORE_SIDES if name in (first, second))


class RerankRequest(ScoringRequest):
    query: Any
    documents: Any
    top_n: int = Field(0, ge=0)  # 0: every document
    return_documents: bool = True  # Cohere's; vLLM always returns them

    def sides(self) -> tuple[Side, Side]:
        query = Side.of(self.query, "query")
        if len(query.texts) != 1:
            raise InvalidRequest("'query' must be one string", param="query", code="invalid_value")
        return query, Side.of(self.documents, "documents")


class ScoreData(OpenAIResponse):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(OpenAIResponse):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankDocument(OpenAIResponse):
    text: str
    multi_modal: None = None


class RerankResult(OpenAIResponse):
    index: int
    document: RerankDocument | None  # None (left out) when return_documents is false
    relevance_score: float


class RerankUsage(OpenAIResponse):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIResponse):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
