"""Prompt log probabilities (GenerateRequest.prompt_logprobs): every prompt token's log probability given the
tokens before it, against transformers' own forward over the prompt, however the engine runs the prefill."""

import itertools

import pytest
import torch

from hpcllm.worker.engine import Engine
from hpcllm.worker.protocol import GenerateRequest, TokenLine

from .test_model_process import load_unpacked

PROMPT = "hello world, this is a longer prompt whose prefill is cut into chunks"
_ids = itertools.count()


def request(**fields) -> GenerateRequest:
    return GenerateRequest(request_id=f"p{next(_ids)}", **fields)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[positions, vocab]: log_softmax of a plain forward; row p scores token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_prompt_logprobs(entries, prompt_ids, expected, top, tokenizer):
    assert len(entries) == len(prompt_ids)
    assert entries[0] is None  # the first token has nothing before it (OpenAI's and vLLM's None)
    for position in range(1, len(prompt_ids)):
        row, entry = expected[position - 1], entries[position]
        assert entry.logprob == pytest.approx(float(row[prompt_ids[position]]), abs=1e-4)
        assert entry.token == tokenizer.decode([prompt_ids[position]])
        assert [t.token_id for t in entry.top] == torch.topk(row, top).indices.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(torch.topk(row, top).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("options", [
    {},  # one chunk, in this process
    {"prefill_chunk_tokens": 5},  # chunked
    {"prefill_chunk_tokens": 5, "model_process": True},  # chunked, logits in the model process
    {"prefill_chunk_tokens": 5, "batching": "sequential"},
], ids=["one-chunk", "chunked", "model-process", "sequential"])
def test_prompt_logprobs_equal_a_plain_forward_batched_with_other_requests(options, load_pair, reference_model,
                                                                            model_dirs):
    # A model process needs a model no in-process engine packed (test_model_process.unpacked_pair).
    model, tokenizer = load_unpacked(model_dirs) if options.get("model_process") else load_pair("llama")
    reference = reference_model("llama")
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    engine = Engine(model, tokenizer, model_name="tiny", **options).start()
    try:
        with engine._lock:  # one batch from the first step
            plain = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=6, temperature=0,
                                          ignore_eos=True))
            scored = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=3, temperature=0, logprobs=1,
                                           prompt_logprobs=2))
        plain_lines = [e for e in plain.events() if isinstance(e, TokenLine)]
        lines = [e for e in scored.events() if isinstance(e, TokenLine)]
        # Most of that prompt again: its prefix is in the cache now, yet every position is scored.
        again = engine.submit(request(prompt_token_ids=prompt_ids[:-2], max_tokens=2, temperature=0,
                                      prompt_logprobs=0))
        again_lines = [e for e in again.events() if isinstance(e, TokenLine)]
    finally:
        engine.shutdown()
    expected = reference_logprobs(reference, prompt_ids)
    check_prompt_logprobs(lines[0].prompt_logprobs, prompt_ids, expected, 2, tokenizer)
    assert all(line.prompt_logprobs is None for line in lines[1:])  # delivered once, with the first token
    check_prompt_logprobs(again_lines[0].prompt_logprobs, prompt_ids[:-2], expected, 0, tokenizer)
    # The first generated token's logprob continues where the prompt's end.
    assert lines[0].logprobs.logprob == pytest.approx(float(expected[-1][lines[0].token_id]), abs=1e-4)
    assert all(line.prompt_logprobs is None for line in plain_lines)  # a request without them is unchanged


def test_a_request_resumed_after_its_first_token_gets_no_prompt_logprobs(load_pair):
    model, tokenizer = load_pair("llama")
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with Engine(model, tokenizer, model_name="tiny") as engine:
        first = engine.generate(request(prompt_token_ids=prompt_ids, max_tokens=2, temperature=0,
                                        ignore_eos=True))
        resumed = engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=4, temperature=0, ignore_eos=True,
                                        resume_token_ids=first.token_ids, prompt_logprobs=1))
        lines = [e for e in resumed.events() if isinstance(e, TokenLine)]
    assert lines[0].index == 2 and all(line.prompt_logprobs is None for line in lines)


def test_a_request_migrated_before_its_first_token_gets_them_from_the_destination(load_pair, reference_model):
    """The source delivered no token yet: the held request the destination prefills scores the prompt, and its
    first token line, the stream's first, carries them."""
    model, tokenizer = load_pair("llama")
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with Engine(model, tokenizer, model_name="tiny", prefill_chunk_tokens=5) as destination:
        held = request(prompt_token_ids=prompt_ids, max_tokens=3, temperature=0, prompt_logprobs=1)
        destination.hold(held, hold_seconds=60)
        destination.wait_prefilled(held.request_id)
        lines = [e for e in destination.attach(held.request_id, 0).events() if isinstance(e, TokenLine)]
    check_prompt_logprobs(lines[0].prompt_logprobs, prompt_ids, reference_logprobs(reference_model("llama"),
                                                                                   prompt_ids), 1, tokenizer)


def metaspace_pair():
    """A tiny Llama whose tokenizer pre-tokenizes with Metaspace (SentencePiece's "▁" word marker, as Mistral's and
    newer Llama conversions do): its decoder drops the leading space of a token decoded alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hpcllm.devmodels.tokenizer import CORPUS_PATH

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_token_strings_keep_the_word_space_a_metaspace_tokenizer_marks(make_engine):
    """A token's string in logprobs (the completions' tokens, echoed prompt included; chat's token and bytes) is its
    text in the answer: '▁model' is ' model', as vLLM restores it (convert_ids_list_to_tokens), not 'model', which
    decoding it alone gives; joined, the prompt's strings after its first are the prompt's text."""
    model, tokenizer = metaspace_pair()
    text = "the model runs on the cluster"
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    engine = make_engine(model, tokenizer)
    lines = [e for e in engine.submit(request(prompt_token_ids=prompt_ids, max_tokens=4, temperature=0, logprobs=3,
                                              prompt_logprobs=3, ignore_eos=True)).events()
             if isinstance(e, TokenLine)]
    prompt = lines[0].prompt_logprobs
    assert tokenizer.decode(prompt_ids[:1]) + "".join(entry.token for entry in prompt[1:]) == text
    entries = prompt[1:] + [line.logprobs for line in lines]
    for token_id, entry in zip(prompt_ids[1:] + [line.token_id for line in lines], entries):
        word_start = tokenizer.convert_ids_to_tokens(token_id).startswith("▁")
        assert entry.token == (" " if word_start else "") + tokenizer.decode([token_id])
    alternatives = [top for entry in entries for top in entry.top]
    assert any(top.token.startswith(" ") for top in alternatives)
    for top in alternatives:
        assert top.token.startswith(" ") == tokenizer.convert_ids_to_tokens(top.token_id).startswith("▁")
