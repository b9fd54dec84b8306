"""Structured outputs (OpenAI's response_format, vLLM's structured_outputs) by llguidance: a JSON schema, a regular
expression, a choice of strings or a Lark / GBNF grammar becomes one llguidance grammar, and a constrained request's
matcher says which tokens may come next (sampling.apply_grammar masks the others' logits).

The gateway compiles the request's constraint once (compile_grammar; a bad one is a 400 before any worker is
asked) and the worker gets the grammar's text (GenerateRequest.grammar), which it checks against the model's
tokenizer. The text is Lark, llguidance's own grammar syntax, which both engines take unchanged: hpcllm's builds its
matcher from it, vLLM's guidance backend gets it as StructuredOutputsParams.grammar (a Lark text passes its
conversion as it is), so the two constrain every token alike. Each kind is written as vLLM's guidance backend writes
it (serialize_guidance_grammar): a JSON schema as `%json` (with compact JSON, below), a regex as llguidance's
grammar_from_regex, a choice and a grammar by llguidance.grammar_from.

The worker compiles each grammar text against its tokenizer once (GrammarCompiler: the most recently used are
kept), which checks it, and each request's matcher is a copy of the compiled one: a batch of requests with one schema
compiles it once.

A matcher is built from the text wherever the request's tokens are chosen, replaying its output ids, so a resumed,
migrated or preempted request goes on exactly where it was. When the grammar is complete the matcher allows only
the tokenizer's end-of-sequence token, which ends the request (finish_reason "stop").

Torch-free: the gateway imports it to compile constraints.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import llguidance

# Compact JSON (no whitespace between tokens): llguidance's default admits any whitespace there, and a model can
# then pad the answer with it until max_tokens (vLLM's disable_any_whitespace). A schema's own "x-guidance"
# options win, as with llguidance's grammar_from_json_schema defaults.
JSON_OPTIONS = {"whitespace_flexible": False}
# response_format {"type": "json_object"}: any JSON object (vLLM's guidance backend compiles the same schema).
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# The kinds of constraint compile_grammar takes: a JSON schema, a regular expression, a list of strings, a Lark or
# GBNF grammar (vLLM's StructuredOutputsParams json, regex, choice, grammar).
GRAMMAR_KINDS = ("json", "regex", "choice", "grammar")


class InvalidGrammar(ValueError):
    """A constraint llguidance cannot compile (the message is llguidance's), or output tokens its grammar refuses."""


def compile_grammar(kind: str, spec: Any) -> str:
    """The llguidance grammar (Lark text) constraining output to `spec`, a constraint of `kind` (GRAMMAR_KINDS):
    a JSON schema (a dict), a regex, a list of strings, a Lark or GBNF grammar text. InvalidGrammar when llguidance
    cannot compile it."""
    if kind == "json":
        return json_grammar(spec)
    if kind == "regex":
        text = "start: /" + llguidance.regex_to_lark(spec) + "/"
    elif kind in ("choice", "grammar"):
        try:
            text = llguidance.grammar_from(kind, spec)
        except ValueError as exc:  # a GBNF grammar its converter cannot read
            raise InvalidGrammar(str(exc)) from None
    else:
        raise ValueError(f"unknown kind of grammar {kind!r}: one of {', '.join(GRAMMAR_KINDS)}")
    return checked_grammar(text)


def json_grammar(schema: dict[str, Any]) -> str:
    """compile_grammar of a JSON schema."""
    options = schema.get("x-guidance", {}) if isinstance(schema, dict) else None
    if not isinstance(options, dict):
        raise InvalidGrammar("a JSON schema is an object, and its 'x-guidance' options too")
    try:
        text = checked_grammar("start: %json " + json.dumps({**schema, "x-guidance": {**JSON_OPTIONS, **options}}))
    except InvalidGrammar as exc:
        # Its first line says what is wrong; the others quote the grammar's line, the whole schema
        raise InvalidGrammar(re.sub(r"^at \d+\(\d+\): ", "", str(exc).splitlines()[0])) from None
    except (TypeError, ValueError) as exc:  # not JSON (json.dumps)
        raise InvalidGrammar(f"the schema is no JSON: {exc}") from None
    if not admits_text(text):  # every JSON value is text: the model could only end, with an empty answer
        raise InvalidGrammar("no JSON value satisfies the schema: its references lead only back to themselves "
                             "(like {\"$ref\": \"#\"}); give the schema of the values the answer may be")
    return text


class _ByteVocabulary:
    """The 256 bytes and an end token, as llguidance's TokenizerWrapper reads a tokenizer: a grammar allows some
    text iff it allows one of these bytes first, whatever a model's vocabulary."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([byte]) for byte in range(256)] + [b""]
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@functools.cache
def _byte_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()), slices=[])


@functools.lru_cache(maxsize=256)
def admits_text(grammar: str) -> bool:
    """Whether the grammar (compiled: checked_grammar) allows any text, not only an empty answer: llguidance compiles
    a schema whose references only lead back to themselves into one that allows nothing."""
    matcher = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    return any(matcher.compute_bitmask()[:256 // 8])  # a bit per token, the bytes' first


@functools.lru_cache(maxsize=256)  # the same schema (a client's tools, its response format) comes again and again
def checked_grammar(text: str) -> str:
    """The grammar text, once llguidance compiled it (without a tokenizer: the worker checks it against its own)."""
    check_grammar(text)
    return text


def check_grammar(text: str) -> None:
    """InvalidGrammar (llguidance's message) unless the grammar text compiles (without a tokenizer:
    GrammarCompiler.matcher compiles it against one)."""
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise InvalidGrammar(error.strip())


# Grammars a worker keeps compiled against its tokenizer (GrammarCompiler): a client's batch of requests comes with
# one schema (its tools, its response format), a few at a time; compiling a large schema costs milliseconds.
COMPILED_GRAMMARS = 256


class GrammarCompiler:
    """llguidance's view of a model's tokenizer (it reads the whole vocabulary: built once per tokenizer in a
    process, grammar_compiler) and the grammars compiled against it: each grammar text compiled once (the
    COMPILED_GRAMMARS most recently used are kept), every request's matcher a copy of the compiled one."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, capacity: int = COMPILED_GRAMMARS) -> None:
        self.tokenizer = tokenizer
        self.eos_token: int = tokenizer.eos_token
        self.capacity = capacity
        self.compilations = 0  # grammar texts compiled (a cached one is not compiled again)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A new matcher at the grammar's start; InvalidGrammar (llguidance's message) when the grammar does not
        compile against the tokenizer."""
        return self._compiled_matcher(grammar).deep_copy()

    def check(self, grammar: str) -> None:
        """InvalidGrammar unless the grammar compiles against the tokenizer; compiled and kept for its requests'
        matchers, none copied."""
        self._compiled_matcher(grammar)

    def _compiled_matcher(self, grammar: str) -> llguidance.LLMatcher:
        """The grammar compiled (never advanced: matchers are copies of it). Compiled outside the lock: the engine
        thread's matcher for a cached grammar must not wait for a client's large schema to compile; two requests
        bringing a new grammar at once compile it twice, which is harmless."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
        compiled = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        with self._lock:
            self.compilations += 1
            if compiled.is_error():  # not kept: a bad grammar is a client's mistake, not a batch's schema
                raise InvalidGrammar(compiled.get_error().strip())
            self._compiled[grammar] = compiled
            if len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return compiled


_compilers: dict[int, tuple[object, GrammarCompiler]] = {}
_compilers_lock = threading.Lock()


def grammar_compiler(tokenizer) -> GrammarCompiler:
    """The GrammarCompiler of a Hugging Face fast tokenizer, one per tokenizer in a process."""
    with _compilers_lock:
        cached = _compilers.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            import llguidance.hf  # imports transformers: only where a tokenizer is

            cached = _compilers[id(tokenizer)] = (tokenizer, GrammarCompiler(llguidance.hf.from_tokenizer(tokenizer)))
        return cached[1]


class GrammarState:
    """A constrained request's place in its grammar: built from its output ids, advanced per token taken."""

    def __init__(self, grammar: str, compiler: GrammarCompiler, output_ids: list[int]) -> None:
        self._matcher = compiler.matcher(grammar)
        self._eos = compiler.eos_token
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
