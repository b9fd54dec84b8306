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
import urllib.parse
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
    """A constraint llguidance cannot compile (the message is llguidance's), a JSON schema with a part no value
    satisfies (json_grammar's message), or output tokens its grammar refuses."""


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
        dumped = json.dumps({**schema, "x-guidance": {**JSON_OPTIONS, **options}})
    except (TypeError, ValueError) as exc:  # not JSON
        raise InvalidGrammar(f"the schema is no JSON: {exc}") from None
    return _checked_json_grammar(dumped)


@functools.lru_cache(maxsize=256)  # as checked_grammar: a request's schema is compiled twice (checked, then sent)
def _checked_json_grammar(dumped: str) -> str:
    """json_grammar of a schema as JSON text (with its x-guidance options), once llguidance compiled it and
    endless_subschema found no part without values (which walks the whole schema: milliseconds for a large one)."""
    try:
        text = checked_grammar("start: %json " + dumped)
    except InvalidGrammar as exc:
        # Its first line says what is wrong; the others quote the grammar's line, the whole schema
        raise InvalidGrammar(re.sub(r"^at \d+\(\d+\): ", "", str(exc).splitlines()[0])) from None
    endless = endless_subschema(json.loads(dumped))
    if endless is not None:  # llguidance compiles it into a grammar that never completes: no answer could be right
        raise InvalidGrammar(f"no JSON value satisfies the schema's part at '{endless}', which an answer could reach "
                             "and never complete: each of its values would need another inside it without end (a "
                             "reference that leads only back to itself, like {\"$ref\": \"#\"}, or a required "
                             "property or item of its own kind); make the recursion optional (not required, "
                             "minItems 0, an anyOf branch without it)")
    return text


# The JSON types as a schema's "type" names them ("integer" is a "number" here: no schema recurses through either)
JSON_TYPES = frozenset(("null", "boolean", "object", "array", "string", "number"))


def _schema_types(schema: dict[str, Any]) -> frozenset[str]:
    """The types the schema's own "type" allows (all without one)."""
    given = schema.get("type")
    if given is None:
        return JSON_TYPES
    names = [given] if isinstance(given, str) else given if isinstance(given, list) else []
    return frozenset("number" if name == "integer" else name for name in names if isinstance(name, str)) & JSON_TYPES


def _pointer(parent: str, key: str | int) -> str:
    return f"{parent}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _ref_target(ref: Any, root: Any) -> tuple[str, Any] | None:
    """The JSON pointer ("#/...") of a local $ref's target and the target, None when it is no pointer into the
    schema (an anchor, another document: left to llguidance)."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        return None
    pointer, node = "#", root
    for part in ref[2:].split("/") if ref != "#" else []:
        key: str | int = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and isinstance(key, str) and key.isdigit() and int(key) < len(node):
            key = int(key)
        elif not isinstance(node, dict) or key not in node:
            return None
        pointer, node = _pointer(pointer, key), node[key]
    return pointer, node


def endless_subschema(root: Any) -> str | None:
    """The JSON pointer of a part of the schema no finite JSON value satisfies (its values would each hold another
    without end) where an answer could need one, or None. llguidance compiles such a schema, and its grammar does not
    leave the part out: an answer that reaches it ('{"a":' for a property whose values never end) can never be
    completed (cut at max_tokens, or ended broken). The part is reported when the schema itself has no value, or an
    object the answer may hold lists a property of that part, or an array needs items of it.

    For each part (subschema), the types of which it has a finite value, to a fixpoint from none: an object needs a
    value of each required property; an array of minItems items; a $ref what its target has; allOf what every
    branch has, anyOf and oneOf what one has. What else a schema says is left to llguidance (it only narrows)."""
    # Each part's schema by its pointer: every part dependencies names, kept as it finds it (not looked up again)
    parts: dict[str, Any] = {"#": root}

    def dependencies(pointer: str, schema: Any) -> dict[str, list[str]]:
        """The parts the schema's rules need values of (ref, allOf, anyOf, oneOf, object: required properties,
        array: the minItems first items), and the other parts an answer's object or array may hold (properties,
        items)."""
        needs: dict[str, list[str]] = {key: [] for key in ("ref", "allOf", "anyOf", "oneOf", "object", "array",
                                                            "properties", "items")}
        if not isinstance(schema, dict):
            return needs

        def part(*keys: str | int) -> str:
            """The pointer of the schema's part under keys (which it has), the part kept in parts."""
            path, node = pointer, schema
            for key in keys:
                path, node = _pointer(path, key), node[key]
            parts[path] = node
            return path

        if "$ref" in schema:
            target = _ref_target(schema["$ref"], root)
            if target is not None:
                parts[target[0]] = target[1]
                needs["ref"].append(target[0])
        for keyword in ("allOf", "anyOf", "oneOf"):
            if isinstance(schema.get(keyword), list):
                needs[keyword] = [part(keyword, i) for i in range(len(schema[keyword]))]
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        needs["properties"] = [part("properties", name) for name in properties]
        for name in schema.get("required", []) if isinstance(schema.get("required"), list) else []:
            if name in properties:
                needs["object"].append(part("properties", name))
            elif not schema.get("patternProperties") and "additionalProperties" in schema:
                needs["object"].append(part("additionalProperties"))
        items = schema.get("items")
        prefix_keyword, rest_keyword = ("items", "additionalItems") if isinstance(items, list) else \
            ("prefixItems", "items")
        prefix = schema.get(prefix_keyword) if isinstance(schema.get(prefix_keyword), list) else []
        needs["items"] = [part(prefix_keyword, i) for i in range(len(prefix))]
        if isinstance(schema.get(rest_keyword), (dict, bool)):
            needs["items"].append(part(rest_keyword))
        min_items = schema.get("minItems", 0)
        if isinstance(min_items, int) and min_items > 0:  # the first prefix items, then the rest's
            needs["array"] = needs["items"][:min_items]
        return needs

    # Every part an answer may reach, and what each needs
    graph: dict[str, dict[str, list[str]]] = {}
    pending = ["#"]
    while pending:
        pointer = pending.pop()
        if pointer in graph:
            continue
        graph[pointer] = dependencies(pointer, parts[pointer])
        pending += [needed for rule in graph[pointer].values() for needed in rule]

    def own_types(pointer: str) -> frozenset[str]:
        schema = parts[pointer]
        if isinstance(schema, bool):
            return JSON_TYPES if schema else frozenset()
        return _schema_types(schema) if isinstance(schema, dict) else JSON_TYPES

    def finite_types(pointer: str, finite: dict[str, frozenset[str]]) -> frozenset[str]:
        needs = graph[pointer]
        types = own_types(pointer)
        if any(not finite[needed] for needed in needs["object"]):
            types -= {"object"}
        if any(not finite[needed] for needed in needs["array"]):
            types -= {"array"}
        for needed in needs["ref"] + needs["allOf"]:
            types &= finite[needed]
        for keyword in ("anyOf", "oneOf"):
            if needs[keyword]:
                types &= frozenset().union(*(finite[branch] for branch in needs[keyword]))
        return types

    finite: dict[str, frozenset[str]] = dict.fromkeys(graph, frozenset())
    changed = True
    while changed:
        changed = False
        for pointer in graph:
            types = finite_types(pointer, finite)
            if types != finite[pointer]:
                finite[pointer], changed = types, True

    def without_end(pointer: str) -> str:
        """From a part without values down a part that leaves it so (wanted: the types it would need), to where
        they loop back."""
        wanted, seen = JSON_TYPES, set()
        while True:
            seen.add(pointer)
            wanted &= own_types(pointer)
            needs = graph[pointer]
            lacking = [needed for needed in needs["ref"] + needs["allOf"] if not finite[needed] & wanted]
            for keyword in ("anyOf", "oneOf"):
                if needs[keyword] and not any(finite[branch] & wanted for branch in needs[keyword]):
                    lacking.append(needs[keyword][0])
            if not lacking:  # a property or an item of each type wanted: any of them, wanted whole
                for kind in ("object", "array"):
                    lacking += [needed for needed in needs[kind] if kind in wanted and not finite[needed]]
                wanted = JSON_TYPES
            if not lacking:
                return pointer
            if lacking[0] in seen:
                return lacking[0]
            pointer = lacking[0]

    if not finite["#"]:
        return without_end("#")
    # The parts an answer may reach (with the types it may have there): an object that lists a property without
    # values, or an array that needs an item without, can be begun and never completed
    reached: set[tuple[str, frozenset[str]]] = set()
    pending_reached = [("#", JSON_TYPES)]
    while pending_reached:
        pointer, wanted = pending_reached.pop()
        if (pointer, wanted) in reached:
            continue
        reached.add((pointer, wanted))
        wanted &= own_types(pointer)
        needs = graph[pointer]
        contained = []
        if "object" in wanted:
            contained += needs["properties"] + needs["object"]
        if "array" in wanted:
            contained += needs["items"]
            for needed in needs["array"]:
                if not finite[needed]:
                    return without_end(needed)
        for needed in contained:
            if not finite[needed] and parts[needed] is not False:  # llguidance leaves out a property that is false
                return without_end(needed)
        pending_reached += [(needed, wanted) for key in ("ref", "allOf", "anyOf", "oneOf") for needed in needs[key]]
        pending_reached += [(needed, JSON_TYPES) for needed in contained]
    return None


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
