"""A reasoning model's thinking in hpcllm's engine (GenerateRequest.thinking): a tiny model with Qwen3's <think> and
</think> tokens (devmodels' qwen3-think), whose random weights never close their thinking by themselves. The grammar
constrains only the answer after </think>, the thinking before it is free; a thinking budget forces </think> after
that many thinking tokens; greedy and sampled alike, in the engine's thread and in a model process."""

from __future__ import annotations

import pytest
import torch

from hpcllm.worker import engine as engine_module
from hpcllm.worker import runner_process, sampling
from hpcllm.worker.engine import Engine, InvalidRequest
from hpcllm.worker.grammar import compile_grammar
from hpcllm.worker.protocol import Thinking
from hpcllm.worker.sampling import SamplingParams, TokenState

from .test_model_process import PROMPTS, request, run_together
from .test_structured_outputs import outcome

CHOICES = ["positive", "negative"]
CHOICE = compile_grammar("choice", CHOICES)


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory):
    from hpcllm.devmodels import make_model

    return make_model("llama", tmp_path_factory.mktemp("thinker") / "tiny-thinker", chat_template="qwen3-think")


def _engine(path, **options) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    return Engine(model, tokenizer, model_name="tiny-thinker", prefill_chunk_tokens=8, kv_block_size=4, **options)


@pytest.fixture(scope="module")
def engines(thinker_dir):
    """The engine choosing tokens in its own thread, and one whose model process chooses them a step ahead."""
    with _engine(thinker_dir) as local, _engine(thinker_dir, model_process=True) as remote:
        yield local, remote


def markers(engine) -> tuple[int, int]:
    start, end = engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    return start, end


def split(engine, ids: list[int]) -> tuple[list[int], str]:
    """An output's thinking tokens (before the first </think>) and the answer's text after it."""
    end = markers(engine)[1]
    assert end in ids, engine.tokenizer.decode(ids)
    cut = ids.index(end)
    return ids[:cut], engine.tokenizer.decode(ids[cut + 1:], skip_special_tokens=True)


def same_in_both(engines, cases):
    local, remote = engines
    here = run_together(local, [r.model_copy(update={"request_id": f"{r.request_id}-local"}) for r in cases])
    there = run_together(remote, cases)
    assert [outcome(events) for events in there] == [outcome(events) for events in here]
    return [outcome(events) for events in here]


def test_the_grammar_constrains_the_answer_after_a_budget_cut_thinking(engines):
    """Inside thinking from the start (the prompt opened it): budget free tokens, then </think> forced, then an
    answer the choice allows ("stop"); greedy and sampled, the same in either process. The same request without
    the budget thinks on (the random weights never write </think>) with the very same first tokens."""
    local = engines[0]
    end = markers(local)[1]
    budget = 6
    thinking = Thinking(end_token_id=end, budget=budget)
    cases = [request(prompt=PROMPTS[0], max_tokens=24, temperature=0, grammar=CHOICE, thinking=thinking),
             *[request(prompt=p, max_tokens=24, temperature=1.0, seed=i, grammar=CHOICE, thinking=thinking)
               for i, p in enumerate(PROMPTS)]]
    for ids, _, finish_reason in same_in_both(engines, cases):
        thought, answer = split(local, ids)
        assert len(thought) == budget and finish_reason == "stop"
        assert answer in CHOICES
    unbounded = local.generate(cases[0].model_copy(update={"request_id": "unbounded", "thinking": Thinking(
        end_token_id=end)}))
    assert end not in unbounded.token_ids and unbounded.finish_reason == "length"
    assert unbounded.token_ids[:budget] == same_in_both(engines, cases[:1])[0][0][:budget]


def test_thinking_resumed_from_free_text_goes_on_to_a_constrained_answer(engines):
    """Resumed output that thought freely and closed its thinking: accepted (the grammar reads only the answer), and
    the answer follows the grammar; without `thinking` the same tokens are refused by the grammar."""
    local = engines[0]
    end = markers(local)[1]
    free = local.tokenizer("the user wants a mood word", add_special_tokens=False)["input_ids"]
    resumed = request(prompt=PROMPTS[1], max_tokens=24, temperature=0, grammar=CHOICE, resume_token_ids=[*free, end],
                      thinking=Thinking(end_token_id=end))
    [(ids, text, finish_reason)] = same_in_both(engines, [resumed])
    assert finish_reason == "stop" and text in CHOICES
    with pytest.raises(InvalidRequest) as refused:
        local.submit(resumed.model_copy(update={"request_id": "unthinking", "thinking": None}))
    assert refused.value.param == "resume_token_ids" and "resume_token_ids[0]" in str(refused.value)


def test_an_output_that_may_open_its_thinking_answers_at_once_or_after_it(engines):
    """start_token_id given (the model writes <think> itself): a first token other than <think> begins the answer,
    which the grammar constrains at once; one that opens the thinking thinks freely up to its budget, then answers
    (a logit bias away from <think> and towards it chooses which)."""
    local = engines[0]
    start, end = markers(local)
    thinking = Thinking(end_token_id=end, start_token_id=start, budget=3)
    direct, opened = same_in_both(engines, [
        request(prompt=PROMPTS[2], max_tokens=24, temperature=0, grammar=CHOICE, thinking=thinking,
                logit_bias={start: -50.0}),
        request(prompt=PROMPTS[2], max_tokens=24, temperature=0, grammar=CHOICE, thinking=thinking,
                logit_bias={start: 50.0})])
    assert direct[1] in CHOICES and direct[2] == "stop"
    assert opened[0][0] == start
    thought, answer = split(local, opened[0][1:])
    assert len(thought) == 3 and answer in CHOICES


def test_a_thinking_budget_without_a_grammar_cuts_the_thinking_and_the_answer_goes_on(engines, monkeypatch):
    """Greedy and sampled, the same in either process: </think> after exactly `budget` thinking tokens. A greedy
    one's tokens are the step's argmax, </think> replacing it at the budget: no row of its own is copied and
    chosen per token (engine.sample_token, which a grammar or a penalty needs, is never called for it)."""
    local = engines[0]
    end = markers(local)[1]
    thinking = Thinking(end_token_id=end, budget=4)
    cases = [request(prompt=PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True, thinking=thinking),
             *[request(prompt=p, max_tokens=12, temperature=1.0, seed=i, ignore_eos=True, thinking=thinking)
               for i, p in enumerate(PROMPTS)]]
    for ids, _, finish_reason in same_in_both(engines, cases):
        assert ids.index(end) == 4 and len(ids) == 12 and finish_reason == "length"
    chosen_per_row = []
    monkeypatch.setattr(engine_module, "sample_token",
                        lambda *args: chosen_per_row.append(args) or sampling.sample_token(*args))
    greedy = local.generate(cases[0].model_copy(update={"request_id": "greedy-budget"}))
    assert greedy.token_ids.index(end) == 4 and chosen_per_row == []


def test_the_model_process_chooses_a_budget_only_greedy_row_by_the_steps_argmax(monkeypatch):
    """runner_process.choose_tokens: the row's token is the argmax over the step's rows, </think> once the budget
    is spent (its TokenState takes either), with no per-row choice (sample_token) for it."""
    end = 3
    params = SamplingParams(temperature=0.0, thinking=sampling.Thinking(end=end, budget=1))
    state = TokenState.build(params, 4, [0], [])
    rows = torch.tensor([[0.0, 2.0, 1.0, -5.0]] * 3)
    per_row = []
    monkeypatch.setattr(runner_process, "sample_token", lambda *args: per_row.append(args) or 0)
    chosen = [runner_process.choose_tokens(rows[i:i + 1], [(params, i)], [state])[0] for i in range(3)]
    assert chosen == [1, end, 1] and per_row == [] and state.thinking.answer_from == 2


def test_bad_marker_ids_are_refused_naming_them(engines):
    local = engines[0]
    with pytest.raises(InvalidRequest) as refused:
        local.submit(request(prompt="hi", grammar=CHOICE, thinking=Thinking(end_token_id=10**6)))
    assert refused.value.param == "thinking.end_token_id"
