"""Structured outputs in hpcllm's engine (GenerateRequest.grammar, llguidance): the tiny model's random weights
never write JSON by themselves, so output that parses and validates shows the grammar at work, greedy and sampled,
in the engine's own thread and in a model process that chooses tokens a step ahead."""

from __future__ import annotations

import json
import pickle

import llguidance
import pytest
import torch

from hpcllm.worker import grammar as grammar_module
from hpcllm.worker.engine import Engine, InvalidRequest
from hpcllm.worker.grammar import ANY_JSON_OBJECT, GrammarCompiler, GrammarState, compile_grammar, json_grammar
from hpcllm.worker.protocol import FLOAT32_MAX, GenerateRequest
from hpcllm.worker.sampling import apply_grammar
from hpcllm.worker.vllm_engine import vllm_grammar

from .schemas import CONSTRAINED, OTHER_CONSTRAINTS, PERSON_GRAMMAR, PERSON_SCHEMA, check_person
from .test_model_process import PROMPTS, process_engine, request, run_together  # noqa: F401 (a fixture)

def outcome(events) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of a stream's events."""
    return [e.token_id for e in events[:-1]], "".join(e.text for e in events[:-1]), events[-1].finish_reason


@pytest.fixture(scope="module")
def local_engine(load_pair):
    model, tokenizer = load_pair("llama")
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=8, kv_block_size=4) as engine:
        yield engine


def constrained_cases() -> list[GenerateRequest]:
    return [request(prompt=PROMPTS[0], max_tokens=64, temperature=0, grammar=PERSON_GRAMMAR),
            *[request(prompt=p, max_tokens=64, seed=i, **CONSTRAINED) for i, p in enumerate(PROMPTS)],
            request(prompt=PROMPTS[1], max_tokens=64, seed=7, presence_penalty=1.0, repetition_penalty=1.2,
                    logprobs=1, **CONSTRAINED)]


def test_json_schema_output_validates_greedy_sampled_and_penalized_in_either_process(local_engine, process_engine):
    """Greedy, seeded temperature 1 and penalized requests, batched, all end with "stop" and JSON valid against the
    schema; the model process (asynchronous scheduling) chooses every token as the engine's thread does."""
    cases = constrained_cases()
    local = run_together(local_engine, [r.model_copy(update={"request_id": f"{r.request_id}-local"})
                                        for r in cases])
    remote = run_together(process_engine, cases)
    assert [outcome(events) for events in remote] == [outcome(events) for events in local]
    names = set()
    for events in local:
        _, text, finish_reason = outcome(events)
        assert finish_reason == "stop"
        names.add(check_person(text)["name"])
    assert len(names) > 1  # sampled: different answers, each valid
    # The same seeded request without the schema: the random weights' text is no JSON.
    [free] = run_together(local_engine, [cases[1].model_copy(update={"request_id": "free", "grammar": None})])
    with pytest.raises(ValueError):
        json.loads(outcome(free)[1])


def test_json_object_gives_a_json_object(local_engine):
    """{"type": "object"}: any object; a bias towards quotes and braces closes its random keys soon."""
    tokenizer = local_engine.tokenizer
    closers = {tokenizer.convert_tokens_to_ids(t): 10.0 for t in ('"', "}")}
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=1)):
        completion = local_engine.generate(request(prompt="hello", max_tokens=64, grammar=json_grammar(ANY_JSON_OBJECT),
                                                   logit_bias=closers, **sampling))
        assert completion.finish_reason == "stop"
        assert isinstance(json.loads(completion.text), dict)


def test_max_tokens_too_small_ends_with_length_and_the_schema_ends_the_request_even_with_ignore_eos(local_engine):
    cut = local_engine.generate(request(prompt=PROMPTS[0], max_tokens=5, temperature=0, grammar=PERSON_GRAMMAR))
    whole = local_engine.generate(request(prompt=PROMPTS[0], max_tokens=64, temperature=0, ignore_eos=True,
                                          grammar=PERSON_GRAMMAR))
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5
    assert whole.text.startswith(cut.text) and whole.finish_reason == "stop"
    check_person(whole.text)  # complete: ignore_eos does not make it go on past the schema


def test_invalid_schemas_and_resumed_tokens_outside_the_schema_are_refused(local_engine):
    with pytest.raises(InvalidRequest) as refused:
        local_engine.submit(request(prompt="hi", grammar="start: unknown_rule"))
    assert refused.value.param == "grammar" and "unknown_rule" in str(refused.value)
    plain = local_engine.generate(request(prompt="hi", max_tokens=4, temperature=0, ignore_eos=True))
    with pytest.raises(InvalidRequest) as refused:
        local_engine.submit(request(prompt="hi", resume_token_ids=plain.token_ids, grammar=PERSON_GRAMMAR))
    assert refused.value.param == "resume_token_ids" and "resume_token_ids[0]" in str(refused.value)


def test_a_constrained_request_resumed_from_its_tokens_continues_exactly(local_engine, process_engine):
    """Resumed (another worker's output so far): the grammar is replayed from the resumed ids, in the engine's
    thread and in the model process alike."""
    original = request(prompt=PROMPTS[2], max_tokens=64, seed=5, **CONSTRAINED)
    [events] = run_together(local_engine, [original])
    ids, text, _ = outcome(events)
    check_person(text)
    for engine in (local_engine, process_engine):
        resumed = original.model_copy(update={"request_id": f"resumed-{id(engine)}", "resume_token_ids": ids[:7]})
        [rest] = run_together(engine, [resumed])
        assert outcome(rest)[0] == ids[7:] and outcome(rest)[2] == "stop"


def test_the_mask_allows_only_what_the_grammar_does_and_none_of_a_padded_vocabulary(local_engine):
    """A model's output rows may be wider than its tokenizer's vocabulary (padded embeddings): those tokens are
    never allowed. At the start of a JSON object only tokens that begin one are."""
    tokenizer, grammar_tokenizer = local_engine.tokenizer, local_engine.grammar_tokenizer
    state = GrammarState(PERSON_GRAMMAR, grammar_tokenizer, [])
    width = len(tokenizer) + 40
    logits = torch.zeros(width)
    logits[len(tokenizer):] = 100.0  # the padding would win an unmasked argmax
    masked = apply_grammar(logits, state)
    allowed = (masked > float("-inf")).nonzero().flatten().tolist()
    assert allowed and max(allowed) < len(tokenizer)
    assert all(tokenizer.decode([token]).startswith("{") for token in allowed)
    assert torch.equal(logits[allowed], masked[allowed])


@pytest.mark.parametrize("name", OTHER_CONSTRAINTS)
def test_regex_choice_and_grammar_outputs_match_greedy_and_sampled_in_either_process(local_engine, process_engine,
                                                                                     name):
    """Each kind ends with "stop" and output its constraint matches, greedy and seeded, the same tokens in the
    engine's thread and in the model process; sampled answers differ."""
    kind, spec, matches = OTHER_CONSTRAINTS[name]
    grammar = compile_grammar(kind, spec)
    cases = [request(prompt=PROMPTS[0], max_tokens=32, temperature=0, grammar=grammar),
             *[request(prompt=p, max_tokens=32, temperature=1.0, seed=i, grammar=grammar)
               for i, p in enumerate(PROMPTS)]]
    local = run_together(local_engine, [r.model_copy(update={"request_id": f"{r.request_id}-local"}) for r in cases])
    remote = run_together(process_engine, cases)
    assert [outcome(events) for events in remote] == [outcome(events) for events in local]
    texts = set()
    for events in local:
        _, text, finish_reason = outcome(events)
        assert finish_reason == "stop" and matches(text), text
        texts.add(text)
    assert len(texts) > 1


def test_the_largest_repetition_penalty_on_every_token_the_grammar_allows_still_answers_by_it(local_engine,
                                                                                            process_engine):
    """The grammar's first tokens, all in the prompt, biased below 0 and multiplied by the largest repetition penalty
    the API takes: their logits overflowed to -inf like those of the tokens the grammar refuses, and the request
    ended with an error (sampled: NaN) or a refused token (greedy: the argmax of only -inf). The penalty saturates
    instead: the answer is one of the choices, greedy and sampled, in either process."""
    kind, spec, matches = OTHER_CONSTRAINTS["choice"]
    grammar = compile_grammar(kind, spec)
    first = GrammarState(grammar, local_engine.grammar_tokenizer, [])
    allowed = apply_grammar(torch.zeros(len(local_engine.tokenizer)), first).isfinite().nonzero().flatten().tolist()
    extreme = {"prompt_token_ids": allowed, "logit_bias": {token: -100.0 for token in allowed},
               "repetition_penalty": FLOAT32_MAX, "grammar": grammar, "max_tokens": 16}
    cases = [request(temperature=0, **extreme), request(temperature=1.0, seed=3, **extreme)]
    for engine in (local_engine, process_engine):
        for events in run_together(engine, [r.model_copy(update={"request_id": f"{r.request_id}-{id(engine)}"})
                                            for r in cases]):
            _, text, finish_reason = outcome(events)
            assert finish_reason == "stop" and matches(text), (text, events[-1])


def test_a_grammar_goes_to_the_model_process_once_not_with_every_steps_choices(process_engine, monkeypatch):
    """The per-step choices (sampling parameters and output index per row) stay a few hundred bytes however large
    the grammar: it is sent once, with the request's state seed."""
    described = {name: {**field, "description": f"what the {name} is, at length " * 300}
                 for name, field in PERSON_SCHEMA["properties"].items()}
    grammar = json_grammar({**PERSON_SCHEMA, "properties": described})
    sent = []
    launch = process_engine.runner.launch
    monkeypatch.setattr(process_engine.runner, "launch", lambda batch: sent.append(
        (len(pickle.dumps(batch.choices)), [seed.grammar for seed in batch.state_seeds.values()])) or launch(batch))
    completion = process_engine.generate(request(prompt=PROMPTS[0], max_tokens=64, temperature=0, grammar=grammar))
    check_person(completion.text)
    assert len(grammar) > 20_000 and len(sent) > 10
    assert max(size for size, _ in sent) < 1_000
    assert [seeds for _, seeds in sent if seeds] == [[grammar]]


def test_a_lark_grammar_vllm_would_read_as_gbnf_goes_to_it_marked_as_lark(local_engine):
    """vLLM's guidance backend reads a grammar with no line beginning `start:` as GBNF (llguidance.grammar_from
    "grammar", which its serialize_guidance_grammar calls): vllm_grammar marks such a Lark text, which vLLM then
    passes on unchanged, allowing what hpcllm's engine allows."""
    lark = 'digits: /[0-9]{2}/\n?start: "n=" digits'
    with pytest.raises(ValueError):
        llguidance.grammar_from("grammar", lark)
    marked = vllm_grammar(lark)
    assert llguidance.grammar_from("grammar", marked) == marked
    assert vllm_grammar(PERSON_GRAMMAR) == PERSON_GRAMMAR
    tokenizer = local_engine.grammar_tokenizer
    ids = local_engine.tokenizer("n=4", add_special_tokens=False)["input_ids"]
    assert GrammarState(lark, tokenizer, ids).bitmask() == GrammarState(marked, tokenizer, ids).bitmask()


class CountingMatcher:
    """llguidance.LLMatcher, counting the grammars compiled (a matcher built, a grammar validated)."""

    def __init__(self, real):
        self.real, self.compiled = real, 0

    def __call__(self, *args, **kwargs):
        self.compiled += 1
        return self.real(*args, **kwargs)

    def validate_grammar(self, *args, **kwargs):
        self.compiled += 1
        return self.real.validate_grammar(*args, **kwargs)


def test_a_batch_with_one_schema_compiles_it_once(local_engine, monkeypatch):
    """30 requests with the same grammar (a client's batch with one schema): compiled once against the tokenizer,
    each request's matcher a copy."""
    grammar = compile_grammar("choice", ["a batch's own answer", "another"])  # not compiled by any test before
    counting = CountingMatcher(llguidance.LLMatcher)
    monkeypatch.setattr(grammar_module.llguidance, "LLMatcher", counting)
    cases = [request(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=3, temperature=1.0, seed=i, grammar=grammar)
             for i in range(30)]
    results = run_together(local_engine, cases)
    assert all(outcome(events)[1] for events in results)
    assert counting.compiled == 1


def test_the_compiled_grammars_are_bounded_the_least_recently_used_dropped(local_engine):
    compiler = GrammarCompiler(local_engine.grammar_tokenizer.tokenizer, capacity=2)
    first, second, third = (compile_grammar("choice", [word]) for word in ("alpha", "beta", "gamma"))
    for grammar in (first, second, first, third):  # the third drops the second, the least recently used
        compiler.matcher(grammar)
    assert compiler.compilations == 3
    compiler.matcher(first)
    assert compiler.compilations == 3
    compiler.matcher(second)
    assert compiler.compilations == 4


def test_a_cached_grammar_is_not_held_up_by_another_compiling(local_engine, monkeypatch):
    """The engine thread takes a running request's matcher while an HTTP thread compiles a new grammar: compiling
    holds no lock that taking a cached grammar's matcher needs (it stalled every stream)."""
    compiler = GrammarCompiler(local_engine.grammar_tokenizer.tokenizer)
    cached, new = (compile_grammar("choice", [word]) for word in ("cached", "new one"))
    compiler.matcher(cached)
    taken_meanwhile = []
    real = llguidance.LLMatcher

    def compiling(*args, **kwargs):
        free = compiler._lock.acquire(blocking=False)  # what the engine thread's matcher(cached) would wait for
        if free:
            compiler._lock.release()
            taken_meanwhile.append(compiler.matcher(cached))
        return real(*args, **kwargs)

    monkeypatch.setattr(grammar_module.llguidance, "LLMatcher", compiling)
    compiler.check(new)
    assert len(taken_meanwhile) == 1 and compiler.compilations == 2
    compiler.matcher(new)
    assert compiler.compilations == 2  # check kept it compiled
