import copy
import itertools
import threading

import pytest
import torch

from hpcllm.worker.engine import (DuplicateRequest, Engine, EngineUnavailable, InvalidRequest, PromptTooLong,
                                  UnknownRequest)
from hpcllm.worker.protocol import FLOAT32_TINY, FinalLine, GenerateRequest, TokenLine

from .conftest import ARCHS
from .test_model_process import load_unpacked

PROMPT = "hello world, this"
_ids = itertools.count()


def request(**fields) -> GenerateRequest:
    fields.setdefault("request_id", f"r{next(_ids)}")
    return GenerateRequest(**fields)


def hf_greedy(model, prompt_ids, max_new_tokens, **kwargs):
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(arch, load_pair, reference_model, make_engine):
    model, tokenizer = load_pair(arch)
    engine = make_engine(model, tokenizer)
    for prompt in (PROMPT, "🙂 日本語", "the"):
        prompt_ids = tokenizer(prompt)["input_ids"]
        expected = hf_greedy(reference_model(arch), prompt_ids, 40)
        done = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=40, temperature=0))
        assert done.token_ids == expected
        assert done.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert done.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
        assert done.usage.prompt_tokens == len(prompt_ids) and done.usage.completion_tokens == len(expected)


def test_chunked_prefill_gives_the_same_greedy_output(load_pair, reference_model, make_engine):
    model, tokenizer = load_pair("llama")
    prompt_ids = tokenizer("hello world, this is a small test corpus. héllo")["input_ids"]
    assert len(prompt_ids) > 8
    engine = make_engine(model, tokenizer, prefill_chunk_tokens=3)
    done = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=20, temperature=0))
    assert done.token_ids == hf_greedy(reference_model("llama"), prompt_ids, 20)


def test_text_prompt_and_chat_messages_are_tokenized_like_transformers(load_pair, reference_model, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    by_text = engine.generate(request(prompt=PROMPT, max_tokens=5, temperature=0))
    by_ids = engine.generate(request(prompt_token_ids=tokenizer(PROMPT)["input_ids"], max_tokens=5, temperature=0))
    assert by_text.token_ids == by_ids.token_ids

    messages = [{"role": "user", "content": "hi there"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    without_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert rendered.startswith(without_prompt) and len(rendered) > len(without_prompt)
    chat = engine.generate(request(messages=messages, max_tokens=5, temperature=0))
    expected_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert chat.usage.prompt_tokens == len(expected_ids)
    assert chat.token_ids == hf_greedy(reference_model("llama"), expected_ids, 5)


def test_seeded_sampling_is_reproducible_and_seeds_differ(load_pair, make_engine):
    model, tokenizer = load_pair("gpt2")
    engine = make_engine(model, tokenizer)
    sample = lambda seed: engine.generate(request(prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed,
                                                  ignore_eos=True)).token_ids
    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    assert first != engine.generate(request(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True)).token_ids


def test_tiny_top_p_samples_the_greedy_tokens(load_pair, make_engine):
    model, tokenizer = load_pair("qwen2")
    engine = make_engine(model, tokenizer)
    greedy = engine.generate(request(prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True))
    nucleus = engine.generate(request(prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=1e-6, seed=5,
                                      ignore_eos=True))
    assert nucleus.token_ids == greedy.token_ids
    # Below float32's range (top_p 1e-300 compares as 0.0) and a temperature whose division overflows: both used to
    # make NaN probabilities that failed the engine's step for every request; they are greedy.
    for extreme in ({"top_p": 1e-300, "temperature": 1.0}, {"temperature": 1e-40}, {"temperature": 1e-320}):
        assert engine.generate(request(prompt=PROMPT, max_tokens=16, seed=5, ignore_eos=True,
                                       **extreme)).token_ids == greedy.token_ids, extreme
    assert engine.generate(request(prompt=PROMPT, max_tokens=4, temperature=0, ignore_eos=True)).token_ids


def test_max_tokens_ends_with_length(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    done = engine.generate(request(prompt=PROMPT, max_tokens=7, temperature=0.7, seed=1, ignore_eos=True))
    assert len(done.token_ids) == 7 and done.finish_reason == "length"
    assert done.usage.completion_tokens == 7


def test_stop_string_is_cut_and_not_emitted(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    full = engine.generate(request(prompt=PROMPT, max_tokens=40, temperature=0, ignore_eos=True)).text
    starts = [i for i in range(len(full) // 3, len(full) - 1) if "\ufffd" not in full[i : i + 2]]
    stop = full[starts[0] : starts[0] + 2]
    done = engine.generate(request(prompt=PROMPT, max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))
    assert done.finish_reason == "stop" and done.stop_reason == stop
    assert done.text == full[: full.index(stop)]
    assert stop not in done.text


def test_stop_token_id_ends_generation(load_pair, make_engine):
    model, tokenizer = load_pair("gpt2")
    engine = make_engine(model, tokenizer)
    full = engine.generate(request(prompt=PROMPT, max_tokens=30, temperature=0, ignore_eos=True)).token_ids
    stop_token = full[5]
    cut = full.index(stop_token)
    done = engine.generate(request(prompt=PROMPT, max_tokens=30, temperature=0, stop_token_ids=[stop_token]))
    assert done.token_ids == full[: cut + 1]
    assert done.finish_reason == "stop" and done.stop_reason == stop_token
    assert done.text == tokenizer.decode(full[:cut], skip_special_tokens=True)


def test_concurrent_requests_each_get_their_solo_output(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer, max_running_requests=2)  # the third one queues
    prompts = [PROMPT, "the quick brown", "🙂 日本語 テスト"]
    solo = [engine.generate(request(prompt=p, max_tokens=25, temperature=0)).token_ids for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = engine.generate(request(prompt=prompts[i], max_tokens=25, temperature=0)).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == solo
    assert engine.counts() == (0, 0)


def test_streams_interleave_round_robin(load_pair, make_engine):
    model, tokenizer = load_pair("gpt2")
    engine = make_engine(model, tokenizer, max_running_requests=4)
    step_sizes = []  # chunks per forward, as the engine ran them
    run_step = engine._run_step

    def counted(batch):
        step_sizes.append(len(batch.chunks))
        return run_step(batch)

    engine._run_step = counted
    with engine._lock:  # submit both before the engine can run either
        a = engine.submit(request(prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True))
        b = engine.submit(request(prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True))
    events = {"a": [], "b": []}
    threads = [threading.Thread(target=lambda name=name, s=s: events[name].extend(s.events()))
               for name, s in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Each request advanced one token per forward, side by side: 10 forwards of both, not 10 of one then 10 of the
    # other (which thread reads its events first is up to the OS, so the order read is not what is checked).
    assert step_sizes == [2] * 10
    assert len(events["a"]) == len(events["b"]) == 11


def test_prompt_too_long_is_refused_with_a_clear_error(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    limit = engine.max_model_len
    with pytest.raises(PromptTooLong, match=f"maximum context length is {limit} tokens"):
        engine.submit(request(prompt_token_ids=[5] * limit, max_tokens=1))
    with pytest.raises(PromptTooLong, match="lower max_tokens"):
        engine.submit(request(prompt_token_ids=[5] * 10, max_tokens=limit))
    # Without max_tokens the output may fill the context, then ends with "length".
    done = engine.generate(request(prompt_token_ids=[5] * (limit - 3), temperature=0, ignore_eos=True))
    assert len(done.token_ids) == 3 and done.finish_reason == "length"


def test_bad_token_ids_and_duplicate_ids_are_refused(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    with pytest.raises(InvalidRequest, match="outside this model's vocabulary"):
        engine.submit(request(prompt_token_ids=[1, 10**6]))
    stream = engine.submit(request(request_id="dup", prompt=PROMPT, max_tokens=50, ignore_eos=True))
    with pytest.raises(DuplicateRequest):
        engine.submit(request(request_id="dup", prompt=PROMPT))
    stream.close()
    with pytest.raises(UnknownRequest):
        engine.tokens("nope")


# Every parameter whose effect depends on the request's token history (and some that do not), seeded.
PENALIZED = {"temperature": 0.9, "seed": 78, "presence_penalty": 1.5, "frequency_penalty": 0.7,
             "repetition_penalty": 1.4, "min_p": 0.02, "logit_bias": {5: 2.0, 9: -3.0}}


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_from_tokens_on_another_engine_continues_exactly(arch, load_pair, make_engine):
    model, tokenizer = load_pair(arch)
    first, second = make_engine(model, tokenizer), make_engine(model, tokenizer)
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 77}, PENALIZED):
        body = dict(prompt="🙂 hello wörld", max_tokens=30, ignore_eos=True, **sampling)
        whole = first.generate(request(**body))

        stream = first.submit(request(request_id=f"mig-{arch}-{len(sampling)}", **body))
        events = stream.events()
        head = [next(events) for _ in range(9)]
        state = first.cancel(stream.request_id)
        tail_of_first = list(events)
        assert isinstance(tail_of_first[-1], FinalLine) and tail_of_first[-1].finish_reason == "abort"
        streamed = head + [e for e in tail_of_first if isinstance(e, TokenLine)]
        assert [e.token_id for e in streamed] == state.output_token_ids
        assert state.state == "finished" and len(state.output_token_ids) >= 9

        resumed = second.generate(request(prompt_token_ids=state.prompt_token_ids, resume_token_ids=state.output_token_ids,
                                          seed=state.seed, **{k: v for k, v in body.items() if k not in ("prompt", "seed")}))
        assert state.output_token_ids + resumed.token_ids == whole.token_ids
        assert "".join(e.text for e in streamed) + resumed.text == whole.text
        assert resumed.usage.completion_tokens == len(whole.token_ids)


def test_cancel_frees_the_slot_for_waiting_requests(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer, max_running_requests=1)
    long = engine.submit(request(prompt=PROMPT, max_tokens=100, ignore_eos=True))
    next(long.events())
    queued = engine.submit(request(prompt=PROMPT, max_tokens=3, temperature=0))
    assert engine.counts() == (1, 1)
    long.close()
    done = [e for e in queued.events() if isinstance(e, FinalLine)][0]
    assert done.finish_reason == "length"
    assert engine.tokens(long.request_id).finish_reason == "abort"


def test_a_burst_beyond_the_running_and_waiting_limits_gets_worker_full(load_pair, make_engine):
    """The engine holds at most max_running_requests + max_waiting_requests requests (the worker's HTTP pool has a
    thread for each one's stream, and 16 for control calls): a burst that arrives before the engine admits any, or
    while the KV budget keeps free slots empty, used to be queued without bound."""
    from hpcllm.worker.engine import EngineOverloaded

    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer, max_running_requests=2, max_waiting_requests=1)
    with engine._lock:  # all arrive within one step: none admitted yet
        streams = [engine.submit(request(prompt=PROMPT, max_tokens=2)) for _ in range(3)]
        with pytest.raises(EngineOverloaded, match=r"worker is full \(3 requests running or waiting, at most 3\)"):
            engine.submit(request(prompt=PROMPT, max_tokens=2))
    assert all(isinstance(list(s.events())[-1], FinalLine) for s in streams)


# the model process (a CPU worker's default) times its prefills apart from the in-process step: both priced
@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_tokens_in_flight_and_prefill_rate_price_a_migration(model_process, load_pair, model_dirs, make_engine):
    model, tokenizer = load_unpacked(model_dirs) if model_process else load_pair("llama")
    engine = make_engine(model, tokenizer, max_running_requests=1, model_process=model_process)
    assert (engine.tokens_in_flight(), engine.prefill_tokens_per_second) == (0, None)
    prompt_ids = (tokenizer(PROMPT)["input_ids"] * 8)[:40]  # a prefill long enough to time
    with engine._lock:  # both queued before the engine steps either
        running = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=200, ignore_eos=True))
        waiting = engine.submit(request(prompt_token_ids=prompt_ids[:5], max_tokens=3))
    events = running.events()
    for _ in range(3):
        next(events)
    # What a destination must prefill to take both: the running one's prompt and output so far, the waiting prompt.
    in_flight = engine.tokens_in_flight()
    assert 40 + 3 + 5 <= in_flight <= 40 + 200 + 5
    assert engine.prefill_tokens_per_second > 0
    running.close()
    assert [e for e in waiting.events() if isinstance(e, FinalLine)]
    assert engine.tokens_in_flight() == 0


def test_a_dead_engine_fails_requests_and_reports_it(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("device lost")

    engine._forward = broken_forward
    done = engine.generate(request(prompt=PROMPT, max_tokens=3))
    assert done.finish_reason == "error" and "device lost" in done.error.message
    assert not engine.alive
    with pytest.raises(EngineUnavailable, match="device lost"):
        engine.submit(request(prompt=PROMPT))


@pytest.mark.gpu
def test_greedy_on_cuda_equals_generate_on_cuda(model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = model.generate(torch.tensor([prompt_ids], device="cuda"), do_sample=False, max_new_tokens=20)
    with Engine(model, tokenizer) as engine:
        done = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=20, temperature=0))
        sampled = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=20, seed=1, ignore_eos=True))
    assert done.token_ids == expected[0, len(prompt_ids):].tolist()
    assert len(sampled.token_ids) == 20


def test_logprobs_are_the_models_log_softmax_with_the_top_alternatives(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    stream = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=4, temperature=0, logprobs=3))
    lines = [e for e in stream.events() if isinstance(e, TokenLine)]
    ids = prompt_ids + [line.token_id for line in lines]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for i, line in enumerate(lines):
        row = expected[len(prompt_ids) - 1 + i]
        assert line.logprobs.logprob == pytest.approx(float(row[line.token_id]), abs=1e-4)
        assert [t.token_id for t in line.logprobs.top] == torch.topk(row, 3).indices.tolist()
        assert line.logprobs.top[0].token_id == line.token_id  # greedy: the sampled token is the most likely
        assert line.logprobs.token == tokenizer.decode([line.token_id])
    plain = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=2, temperature=0))
    assert all(e.logprobs is None for e in plain.events() if isinstance(e, TokenLine))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_embeddings_are_the_normalized_last_hidden_state_while_generating(arch, load_pair, make_engine):
    model, tokenizer = load_pair(arch)
    engine = make_engine(model, tokenizer)
    busy = engine.submit(request(prompt=PROMPT, max_tokens=30, ignore_eos=True))  # embedding runs between steps
    inputs = [tokenizer(PROMPT)["input_ids"], tokenizer("the")["input_ids"]]
    embeddings = engine.embed(inputs)
    for ids, embedding in zip(inputs, embeddings):
        with torch.no_grad():
            hidden = model.base_model(torch.tensor([ids])).last_hidden_state[0, -1]
        assert embedding == pytest.approx(torch.nn.functional.normalize(hidden, dim=-1).tolist(), abs=1e-5)
        assert sum(x * x for x in embedding) == pytest.approx(1.0)
    assert [e for e in busy.events() if isinstance(e, FinalLine)][0].finish_reason == "length"
    with pytest.raises(InvalidRequest, match="outside this model's vocabulary"):
        engine.embed([[10**9]])


def test_step_times_are_predicted_from_recent_steps_token_counts():
    """Asynchronous scheduling sends the next step shortly before the running one should end: its compute time is
    predicted from its tokens (decode-only steps are short, steps with a prefill chunk long)."""
    from hpcllm.worker.engine import _StepTimes

    times = _StepTimes()
    assert times.predict(16) is None  # nothing measured yet: the next step goes at once
    for _ in range(30):
        times.observe(16, 0.006)
        times.observe(120, 0.020)
    assert times.predict(16) == pytest.approx(0.006, rel=0.05)
    assert times.predict(120) == pytest.approx(0.020, rel=0.05)
    for _ in range(60):  # the machine got slower: recent steps count
        times.observe(16, 0.012)
        times.observe(120, 0.040)
    assert times.predict(16) == pytest.approx(0.012, rel=0.05)


def test_a_prompt_that_tokenizes_to_nothing_is_refused_and_the_engine_goes_on(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    assert tokenizer("")["input_ids"] == []  # this tokenizer adds no BOS: an empty prompt has nothing to prefill
    engine = make_engine(model, tokenizer)
    for submit in (engine.submit, lambda generate: engine.hold(generate, 60)):
        with pytest.raises(InvalidRequest, match="empty once tokenized") as refused:
            submit(request(prompt="", max_tokens=3))
        assert refused.value.param == "prompt"
    assert engine.alive and engine.counts() == (0, 0)
    assert engine.generate(request(prompt=PROMPT, max_tokens=3, ignore_eos=True)).finish_reason == "length"


def test_messages_the_chat_template_refuses_are_a_400_naming_messages_and_the_engine_goes_on(load_pair, make_engine):
    """A template's raise_exception (Llama 2's and Mistral's refuse roles that do not alternate) is the request's
    fault, said in the template's words: it used to escape as a 500 internal error."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    engine.tokenizer = templated = copy.copy(tokenizer)
    templated.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start "
                               "with a user message') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(request(messages=[{"role": "assistant", "content": "hi"}], max_tokens=3))
    # The gateway's words and code (hpcllm.gateway.tokenization): a request refused by either reads the same.
    assert str(refused.value) == ("the model's chat template rejected the messages: Conversation must start with a "
                                  "user message")
    assert (refused.value.param, refused.value.code) == ("messages", "invalid_messages")
    assert engine.generate(request(messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   ignore_eos=True)).finish_reason == "length"
    assert tokenizer.chat_template != templated.chat_template  # the session's tokenizer is as it was


def test_a_failure_sampling_one_request_ends_it_alone(load_pair, make_engine, monkeypatch):
    import hpcllm.worker.engine as engine_module

    sample = engine_module.sample_token

    def failing_for_seed_13(logits, params, index, counts=None):
        if params.seed == 13:
            raise ValueError("bad row")
        return sample(logits, params, index, counts)

    monkeypatch.setattr(engine_module, "sample_token", failing_for_seed_13)
    engine = make_engine(*load_pair("llama"))
    bad = engine.submit(request(prompt=PROMPT, max_tokens=20, seed=13, ignore_eos=True))
    good = engine.submit(request(prompt=PROMPT, max_tokens=20, seed=14, ignore_eos=True))
    bad_final = [e for e in bad.events() if isinstance(e, FinalLine)][0]
    assert bad_final.finish_reason == "error" and bad_final.error.message == "ValueError: bad row"
    assert [e for e in good.events() if isinstance(e, FinalLine)][0].finish_reason == "length"
    assert engine.alive
    assert engine.generate(request(prompt=PROMPT, max_tokens=3, seed=1, ignore_eos=True)).finish_reason == "length"


def counting_tokenizer(tokenizer):
    """A copy of the tokenizer, of a subclass of its type (so the engine's decoding takes the same path), noting
    the length of each text it is asked to tokenize in `.lengths`."""

    class Counting(type(tokenizer)):
        def __call__(self, text, **kwargs):
            self.lengths.append(len(text))
            return super().__call__(text, **kwargs)

    counting = copy.copy(tokenizer)
    counting.__class__, counting.lengths = Counting, []
    return counting


def test_a_text_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing_it(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    engine.tokenizer = counting = counting_tokenizer(tokenizer)
    huge = "hello world " * 200_000
    for fields, param in (({"prompt": huge}, "prompt"), ({"messages": [{"role": "user", "content": huge}]},
                                                          "messages")):
        with pytest.raises(PromptTooLong, match=f"at least .* tokens \\({len(huge)} characters\\)") as refused:
            engine.submit(request(max_tokens=3, **fields))
        assert refused.value.param == param
    assert counting.lengths == []
    assert engine.generate(request(prompt=PROMPT, max_tokens=3, ignore_eos=True)).finish_reason == "length"
    assert counting.lengths == [len(PROMPT)]  # a prompt that may fit is tokenized as before


def test_a_large_embedding_job_runs_in_pieces_between_decode_steps(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer, prefill_chunk_tokens=8)
    inputs = [[5, 6, 7], [8, 9, 10], [11] * 20, [12, 13]]
    alone = [engine.embed([ids])[0] for ids in inputs]
    calls: list = []
    embed, forward = engine._embed, engine._forward
    engine._embed = lambda piece: calls.append(len(piece)) or embed(piece)
    engine._forward = lambda batch: calls.append("step") or forward(batch)
    stream = engine.submit(request(prompt=PROMPT, max_tokens=200, ignore_eos=True))
    next(stream.events())  # it is running: it steps as long as the job lasts
    assert engine.embed(inputs) == alone  # the same embeddings as one at a time
    stream.close()
    pieces = [i for i, call in enumerate(calls) if call != "step"]
    assert [calls[i] for i in pieces] == [2, 1, 1]  # at most prefill_chunk_tokens tokens, one input at least
    assert all("step" in calls[a:b] for a, b in zip(pieces, pieces[1:])), calls


def test_an_embedding_job_its_caller_gave_up_on_is_skipped(load_pair, make_engine):
    from hpcllm.worker.engine import EngineOverloaded

    engine = make_engine(*load_pair("llama"))
    embedded: list = []
    embed = engine._embed
    engine._embed = lambda piece: embedded.append(piece) or embed(piece)
    with engine._lock:  # the engine thread cannot take the job before its caller gives up
        with pytest.raises(EngineOverloaded, match="did not finish within 0s"):
            engine.embed([[5, 6, 7]], timeout=0)
    assert len(engine.embed([[8, 9]])) == 1
    assert embedded == [[[8, 9]]]


def test_an_empty_embedding_batch_or_input_from_python_is_answered_and_the_engine_goes_on(load_pair, make_engine):
    """The HTTP API refuses an empty batch and an empty input before the engine, but Python callers reach
    Engine.embed directly: an empty batch failed the engine thread (max() of no input lengths) and the engine died,
    and an empty input got an output pooled from nothing."""
    engine = make_engine(*load_pair("llama"))
    assert engine.embed([]) == []
    with pytest.raises(InvalidRequest, match=r"input\[1\] is empty"):
        engine.embed([[5, 6], []])
    assert engine.alive
    assert len(engine.embed([[5, 6]])) == 1


def penalized_greedy_reference(model, prompt_ids, max_new_tokens, **penalties):
    """Greedy decoding over transformers' logits with vLLM's logit bias and penalties (test_sampling's reference)."""
    from .test_sampling import vllm_reference_logits

    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(vllm_reference_logits(logits, prompt_ids, ids[len(prompt_ids):],
                                                              **penalties))))
    return ids[len(prompt_ids):]


def test_a_frequency_penalty_stops_greedy_decoding_from_repeating_tokens(load_pair, reference_model, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    prompt_ids = tokenizer(PROMPT)["input_ids"]

    def greedy(**penalties) -> list[int]:
        done = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=40, temperature=0, ignore_eos=True,
                                       **penalties))
        return done.token_ids

    plain = greedy()
    assert len(set(plain)) < 40  # the tiny model repeats tokens
    penalized = greedy(frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(penalized)) == 40
    assert penalized == penalized_greedy_reference(reference_model("llama"), prompt_ids, 40, frequency=2.0,
                                                   presence=2.0)
    rewarded = greedy(frequency_penalty=-2.0)  # a negative penalty: the first tokens are repeated ever more
    assert len(set(rewarded)) <= len(set(plain)) // 3
    assert rewarded == penalized_greedy_reference(reference_model("llama"), prompt_ids, 40, frequency=-2.0)
    repeated = greedy(repetition_penalty=1.8, frequency_penalty=-0.5)
    assert repeated == penalized_greedy_reference(reference_model("llama"), prompt_ids, 40, repetition=1.8,
                                                  frequency=-0.5)


def test_the_smallest_repetition_penalty_over_biased_prompt_tokens_still_takes_the_most_likely(load_pair,
                                                                                              reference_model,
                                                                                              make_engine):
    """The API's smallest repetition_penalty divides the logits of the prompt's tokens, each raised by a bias of 100,
    past float32's range: they all saturated at its largest number, and greedy took the lowest of those token ids
    instead of the prompt token the model finds most likely."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    in_prompt = sorted(set(prompt_ids))
    done = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=4, temperature=0, ignore_eos=True,
                                   repetition_penalty=FLOAT32_TINY, logit_bias={t: 100.0 for t in in_prompt}))
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(4):
            logits = reference_model("llama")(torch.tensor([ids])).logits[0, -1]
            ids.append(max(in_prompt, key=lambda token: logits[token]))
    assert done.token_ids == ids[len(prompt_ids):]


def test_logit_bias_forces_a_token_bans_one_and_checks_token_ids(load_pair, make_engine):
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    plain = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=8, temperature=0, ignore_eos=True))
    forced = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=8, temperature=0.8, seed=3,
                                     ignore_eos=True, logit_bias={17: 100.0}))
    assert forced.token_ids == [17] * 8
    banned = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=8, temperature=0, ignore_eos=True,
                                     logit_bias={plain.token_ids[0]: -100.0}))
    assert banned.token_ids[0] != plain.token_ids[0] and plain.token_ids[0] not in banned.token_ids
    with pytest.raises(InvalidRequest, match="logit_bias contains token id 1000000, outside") as refused:
        engine.submit(request(prompt_token_ids=prompt_ids, logit_bias={1: 1.0, 10**6: 5.0}))
    assert refused.value.param == "logit_bias"


def test_logprobs_of_a_biased_request_stay_the_models_raw_distribution(load_pair, make_engine):
    """As vLLM's default (raw logprobs): what logit_bias and the penalties change is the choice, not the report."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    stream = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=3, temperature=0, logprobs=1,
                                   logit_bias={17: 100.0}, frequency_penalty=1.0))
    lines = [e for e in stream.events() if isinstance(e, TokenLine)]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt_ids + [17, 17]])).logits[0].float(), dim=-1)
    for i, line in enumerate(lines):
        row = expected[len(prompt_ids) - 1 + i]
        assert line.token_id == 17
        assert line.logprobs.logprob == pytest.approx(float(row[17]), abs=1e-4)
        assert line.logprobs.top[0].token_id == int(torch.argmax(row))


def test_a_resume_with_nothing_left_to_generate_ends_with_the_real_finish_reason(load_pair, make_engine):
    """A worker lost between its last token line and its final line: the gateway resumes the choice from every
    token, which already end it. The answer is that end (no tokens, no error), as the first worker would have
    said: max_tokens reached, the context full (no max_tokens), EOS, a stop string. Each is counted finished, by
    its reason, as a generated one (hpcllm_request_success_total, the end-to-end latency)."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    words = tokenizer("hello world the end", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    cases = [  # (request fields, finish_reason, stop_reason)
        ({"max_tokens": len(words), "resume_token_ids": words}, "length", None),
        ({"resume_token_ids": [7] * (engine.max_model_len - len(prompt_ids))}, "length", None),
        ({"max_tokens": 20, "resume_token_ids": [*words, eos]}, "stop", None),
        ({"max_tokens": 20, "resume_token_ids": [*words[:2], 9], "stop_token_ids": [9]}, "stop", 9),
        ({"max_tokens": 20, "resume_token_ids": words, "stop": ["end"]}, "stop", "end"),
    ]
    for fields, finish_reason, stop_reason in cases:
        done = engine.generate(request(prompt_token_ids=prompt_ids, temperature=0, **fields))
        assert (done.finish_reason, done.stop_reason, done.error) == (finish_reason, stop_reason, None), fields
        assert done.token_ids == [] and done.text == ""
        assert done.usage.completion_tokens == len(fields["resume_token_ids"])
    registry, model_name = engine.metrics.registry, engine.metrics.model_name
    for reason, count in (("length", 2), ("stop", 3)):
        labels = {"model_name": model_name, "finished_reason": reason}
        assert registry.get_sample_value("hpcllm_request_success_total", labels) == count
    assert registry.get_sample_value("hpcllm_e2e_request_latency_seconds_count", {"model_name": model_name}) == 5


def test_resumed_tokens_no_generation_could_have_made_are_refused(load_pair, make_engine):
    """Going on after a stop, or more than max_tokens: not a generation's output, refused naming resume_token_ids."""
    model, tokenizer = load_pair("llama")
    engine = make_engine(model, tokenizer)
    for fields in ({"max_tokens": 20, "resume_token_ids": [tokenizer.eos_token_id, 7]},
                   {"max_tokens": 2, "resume_token_ids": [7, 8, 9]}):
        with pytest.raises(InvalidRequest) as refused:
            engine.submit(request(prompt=PROMPT, **fields))
        assert refused.value.param == "resume_token_ids"
