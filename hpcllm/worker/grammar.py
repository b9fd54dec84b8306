"""Structured outputs (OpenAI's response_format json_object / json_schema) by llguidance: a JSON schema becomes a
grammar, and a constrained request's matcher says which tokens may come next (sampling.apply_grammar masks the
others' logits).

The schema is compiled once, when the request is validated (the gateway's check, then the engine's _prepare, which
keeps the grammar's JSON string in the request's SamplingParams); a matcher is built from that string wherever the
request's tokens are chosen, replaying its output ids, so a resumed, migrated or preempted request goes on exactly
where it was. When the grammar is complete the matcher allows only the tokenizer's end-of-sequence token, which
ends the request (finish_reason "stop").

Torch-free: the gateway imports it to check schemas.
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance

# Compact JSON (no whitespace between tokens): llguidance's default admits any whitespace there, and a model can
# then pad the answer with it until max_tokens (vLLM's disable_any_whitespace; the vLLM engine runs with it too,
# so both engines produce the same grammar from a schema).
JSON_OPTIONS = {"whitespace_flexible": False}
# response_format {"type": "json_object"}: any JSON object (vLLM's guidance backend compiles the same schema).
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class InvalidGrammar(ValueError):
    """A schema llguidance cannot compile (the message is llguidance's), or output tokens its grammar refuses."""


def json_grammar(schema: dict[str, Any], tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The llguidance grammar (its JSON string) constraining output to JSON valid against `schema`; checked against
    the tokenizer when one is given."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise InvalidGrammar(str(exc)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise InvalidGrammar(error)
    return grammar


_tokenizers: dict[int, tuple[object, llguidance.LLTokenizer]] = {}
_tokenizers_lock = threading.Lock()


def ll_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer, built once per tokenizer in a process (it reads the
    whole vocabulary)."""
    with _tokenizers_lock:
        cached = _tokenizers.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            import llguidance.hf  # imports transformers: only where a tokenizer is

            cached = _tokenizers[id(tokenizer)] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
        return cached[1]


class GrammarState:
    """A constrained request's place in its grammar: built from its output ids, advanced per token taken."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer, output_ids: list[int]) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        self._eos = tokenizer.eos_token
        self.extend(output_ids)

    def extend(self, token_ids: list[int]) -> int | None:
        """Take tokens (an output's so far, or a migration's next ones); the index of the first one the grammar
        refused, None if it took them all. A refused token leaves the matcher failed: it allows only
        end-of-sequence from there (the request stops, as vLLM's does)."""
        refused = None
        for index, token in enumerate(token_ids):
            if not self.add(token) and refused is None:
                refused = index
        return refused

    @property
    def error(self) -> str:
        """Why the matcher failed (empty while it has not)."""
        return self._matcher.get_error()

    def add(self, token: int) -> bool:
        """Take a token; whether the grammar allowed it. The end-of-sequence token that follows a complete grammar
        is taken without a change."""
        if self._matcher.is_stopped() and token == self._eos:
            return True
        return self._matcher.consume_token(token)

    def bitmask(self) -> bytes:
        """The tokens allowed next, one bit each (token i: bit i % 8 of byte i // 8); only end-of-sequence once the
        grammar is complete (or the matcher failed)."""
        return self._matcher.compute_bitmask()
