"""The gateway's tokenizer cache (hpcllm/gateway/tokenization.py)."""

from __future__ import annotations

import threading

import pytest

from hpcllm.gateway.routing import ModelCard
from hpcllm.gateway.tokenization import TokenizerCache

from .conftest import MODEL


def test_the_first_requests_for_a_model_arriving_together_load_its_tokenizer_once(tiny_model_dir, monkeypatch):
    """Each used to load its own copy (CPU for nothing at every cold start), and two threads racing through
    transformers' lazy imports in a fresh process failed one request with a 500 (ImportError)."""
    loads = []
    load = TokenizerCache._load

    def counted_load(name, source):
        loads.append(name)
        return load(name, source)

    monkeypatch.setattr(TokenizerCache, "_load", staticmethod(counted_load))
    cache = TokenizerCache()
    card = ModelCard(name=MODEL, source=tiny_model_dir, max_model_len=512, created=0)
    together = threading.Barrier(4)
    encoders = []

    def first_request():
        together.wait()
        encoders.append(cache.get(card))

    threads = [threading.Thread(target=first_request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [MODEL]
    assert len(encoders) == 4 and all(encoder is encoders[0] for encoder in encoders)
    assert encoders[0].encode("hello world")


def whitespace_collapsing_encoder():
    """A BERT-like tokenizer (its pre-tokenizer drops whitespace): 44 characters of 'word' and spaces are one token,
    far fewer tokens per character than the vocabulary's longest token suggests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hpcllm.gateway.tokenization import PromptEncoder

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "word": 1, "end": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PromptEncoder(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]"))


def test_a_truncated_text_keeps_as_many_tokens_as_asked_whatever_its_whitespace():
    """The cut by characters before tokenizing (a 4 MB text to keep 10 tokens) is widened until the text keeps more
    tokens than asked: it was 4 tokens of 10 where whitespace runs made tokens long."""
    from hpcllm.gateway.tokenization import Truncation

    encoder = whitespace_collapsing_encoder()
    text = ("word" + " " * 40) * 2000 + "end"
    for side, by_tokenizer in (("right", True), ("right", False), ("left", False)):
        kept = encoder.encode_truncated(text, Truncation(10, side, by_tokenizer))
        assert kept.cut and len(kept.ids) == 10, (side, by_tokenizer, kept)
        assert kept.ids == ([1] * 9 + [2] if side == "left" else [1] * 10)
    short = encoder.encode_truncated("word end", Truncation(10, "right", True))
    assert (short.ids, short.cut) == ([1, 2], False)


def test_a_text_cut_to_tokens_ends_at_its_last_kept_tokens_end_however_long(tiny_model_dir):
    """max_tokens_per_query / max_tokens_per_doc's cut (vLLM's truncate_text_to_tokens): the text's own characters
    up to the last kept token (no decode round trip), from a 350 kB text as from a short one."""
    from transformers import AutoTokenizer

    from hpcllm.gateway.tokenization import PromptEncoder

    encoder = whitespace_collapsing_encoder()
    assert encoder.cut_to_tokens(("word" + " " * 40) * 8000 + "end", 3) == "word" + (" " * 40 + "word") * 2
    assert encoder.cut_to_tokens("word end", 3) == "word end"
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model_dir))
    text = "the capital of France is Paris, " * 20
    cut = encoder.cut_to_tokens(text, 7)
    assert text.startswith(cut) and encoder.encode(cut, add_special_tokens=False) == encoder.encode(
        text, add_special_tokens=False)[:7]


def test_a_truncated_chat_tokenizes_a_bounded_text_however_long_the_conversation(tiny_model_dir, monkeypatch):
    """render_chat with a truncation tokenizes the rendered prompt cut near the tokens kept, not a megabyte."""
    from transformers import AutoTokenizer

    from hpcllm.gateway.tokenization import PromptEncoder, Truncation

    encoder = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model_dir))
    whole = encoder.render_chat([{"role": "user", "content": "hello " * 200_000}])
    tokenized = []
    tokenize = encoder.tokenizer.__class__.__call__

    def spy(tokenizer, text, *args, **kwargs):
        tokenized.append(len(text))
        return tokenize(tokenizer, text, *args, **kwargs)

    monkeypatch.setattr(encoder.tokenizer.__class__, "__call__", spy)
    cut = encoder.render_chat([{"role": "user", "content": "hello " * 200_000}], truncation=Truncation(16, "left",
                                                                                                  False))
    assert cut.token_ids == whole.token_ids[-16:]
    assert tokenized and max(tokenized) < 10_000, tokenized  # the rendered text has 1.2 million characters


def test_a_chat_cut_on_the_right_reads_as_the_text_the_model_gets(tiny_model_dir):
    """Its end is what the reasoning parser reads (whether the prompt left the model thinking): the kept tokens'
    text, not the whole rendered prompt's, whose generation prompt was cut off."""
    from transformers import AutoTokenizer

    from hpcllm.gateway.tokenization import PromptEncoder, Truncation

    encoder = PromptEncoder(AutoTokenizer.from_pretrained(tiny_model_dir))
    messages = [{"role": "user", "content": "hello there " * 50}]
    whole = encoder.render_chat(messages)
    cut = encoder.render_chat(messages, truncation=Truncation(12, "right", False))
    assert cut.token_ids == whole.token_ids[:12] and cut.text == encoder.decode(whole.token_ids[:12])
    assert len(cut.text) < len(whole.text)
    same = encoder.render_chat(messages, truncation=Truncation(len(whole.token_ids), "right", False))
    assert same == whole  # nothing cut: the rendered text as it was


def test_a_chat_template_that_refuses_is_a_400_and_one_that_does_not_parse_a_500(tiny_model_dir):
    """Refused messages are the request's fault, in the worker's words and code too (protocol.INVALID_MESSAGES); a
    template that does not parse is the model's (it used to be a 400 invalid_messages as well)."""
    from transformers import AutoTokenizer

    from hpcllm.gateway.errors import InternalError, InvalidRequest
    from hpcllm.gateway.tokenization import PromptEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{{ raise_exception('Conversation must start with a user message') }}"
    with pytest.raises(InvalidRequest) as refused:
        PromptEncoder(tokenizer).render_chat([{"role": "assistant", "content": "hi"}])
    assert (refused.value.param, refused.value.code) == ("messages", "invalid_messages")
    assert str(refused.value) == ("the model's chat template rejected the messages: Conversation must start with a "
                                  "user message")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(InternalError, match="chat template does not parse"):
        PromptEncoder(tokenizer).render_chat([{"role": "user", "content": "hi"}])


def test_a_models_tool_call_format_is_read_from_its_chat_template_once(tiny_model_dir):
    """Each request with tools (or a forced call) fetched the model's tool-use template and scanned it for the call
    format again, though it never changes for a model; each request now gets the format read the first time, and one
    naming no format the same 400 each time."""
    from transformers import AutoTokenizer

    from hpcllm.devmodels.tokenizer import CHAT_TEMPLATE, HERMES_TOOLS_CHAT_TEMPLATE
    from hpcllm.gateway.chat.tool_calls import PARSERS
    from hpcllm.gateway.errors import InvalidRequest
    from hpcllm.gateway.tokenization import PromptEncoder

    for template, format_ in ((HERMES_TOOLS_CHAT_TEMPLATE, PARSERS["hermes"]), (CHAT_TEMPLATE, None)):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.chat_template = template
        fetched = []
        get_chat_template = tokenizer.get_chat_template
        tokenizer.get_chat_template = lambda *args, **kwargs: fetched.append(kwargs) or get_chat_template(*args,
                                                                                                            **kwargs)
        encoder = PromptEncoder(tokenizer)
        for _ in range(3):  # three requests
            assert encoder.tool_call_format() is format_
            if format_ is None:
                with pytest.raises(InvalidRequest, match="no format this server knows"):
                    encoder.tool_call_parser()
            else:
                assert encoder.tool_call_parser() is format_
            assert encoder.tool_call_parser("pythonic") is PARSERS["pythonic"]  # the model's config says
        assert len(fetched) == 1, fetched
