"""Detokenizer behaviour with byte-level "tokens" (one id per UTF-8 byte), which split characters across tokens."""

from hpcllm.worker.detokenizer import IncrementalDetokenizer


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def stream(text, stop=(), tokens=None):
    detok = IncrementalDetokenizer(byte_decode, stop)
    pieces = []
    for token in tokens if tokens is not None else text.encode():
        pieces.append(detok.add(token))
        if detok.stop_hit is not None:
            break
    else:
        pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_are_never_split():
    text = "héllo 日本語 🙂🚀 ok"
    pieces, _ = stream(text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "🙂" in pieces  # emitted whole, on the token that completed it


def test_stop_string_ends_output_before_it():
    pieces, detok = stream("hello world, this is", stop=["world"])
    assert "".join(pieces) == "hello "
    assert detok.stop_hit == "world"


def test_earliest_stop_string_wins():
    pieces, detok = stream("abc STOP def END", stop=["END", "STOP", " de"])
    assert "".join(pieces) == "abc "
    assert detok.stop_hit == "STOP"


def test_possible_stop_prefix_is_held_back_then_released():
    detok = IncrementalDetokenizer(byte_decode, ["wxyz"])
    emitted = [detok.add(b) for b in b"aw"]
    assert emitted == ["a", ""]  # "w" might start "wxyz"
    assert detok.add(ord("x")) == ""
    assert detok.add(ord("q")) == "wxq"  # no longer a stop prefix
    assert detok.add(ord("w")) == ""
    assert detok.flush() == "w"  # generation ended without the stop string


def test_stop_string_inside_multibyte_text():
    pieces, detok = stream("日本語テスト", stop=["テ"])
    assert "".join(pieces) == "日本語"
    assert detok.stop_hit == "テ"


def test_flush_emits_an_incomplete_trailing_character_like_a_full_decode():
    ids = list("ok".encode()) + list("🙂".encode())[:2]
    pieces, _ = stream("", tokens=ids)
    assert "".join(pieces) == byte_decode(ids)


def test_the_text_decoder_gives_what_tokenizer_decode_gives(model_dirs):
    """The engines' decode calls a fast tokenizer's Rust backend directly: the same text as tokenizer.decode
    (special tokens skipped, spaces not cleaned up), for every dev architecture's tokenizer."""
    import random

    from transformers import AutoTokenizer

    from hpcllm.devmodels import ARCHITECTURES
    from hpcllm.worker.detokenizer import text_decoder

    rng = random.Random(0)
    for arch in ARCHITECTURES:
        tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
        decode = text_decoder(tokenizer)
        assert decode.func == tokenizer.backend_tokenizer.decode  # the fast path is the one taken
        specials = list(tokenizer.all_special_ids)
        for _ in range(300):
            ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
                   for _ in range(rng.randrange(1, 9))]
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ---- the incremental decoder of the Rust tokenizer (DecodeStream) gives the window scheme's text ----------------


def metaspace_byte_fallback_tokenizer():
    """A Llama-2-style tokenizer (Metaspace "▁", <0xNN> byte-fallback tokens, a decoder that strips the leading
    space): the other common decoder family besides byte-level BPE, trained on the devmodels corpus."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hpcllm.devmodels.tokenizer import CORPUS_PATH

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # the byte tokens are ordinary vocabulary, as in Llama's
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False)


def run_both(tokenizer, ids, stop=(), context=()):
    """The same ids (after the context ids) through the window scheme alone and through the stream: (pieces,
    stop_hit) of each, and whether the stream was still in use at the end."""
    import threading

    from hpcllm.worker.detokenizer import decode_streams, text_decoder

    new_stream = decode_streams(tokenizer, threading.Lock())
    assert new_stream is not None  # a fast tokenizer: the stream is the path taken
    results = []
    for detok in (IncrementalDetokenizer(text_decoder(tokenizer), stop, context=context),
                  IncrementalDetokenizer(text_decoder(tokenizer), stop, stream=new_stream(context), context=context)):
        pieces = []
        for token in ids:
            pieces.append(detok.add(token))
            if detok.stop_hit is not None:
                break
        streamed = detok._stream is not None
        pieces.append(detok.flush())
        results.append((pieces, detok.stop_hit))
    return results[0], results[1], streamed


def random_ids(rng, tokenizer, count):
    specials = list(tokenizer.all_special_ids)
    return [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(len(tokenizer)) for _ in range(count)]


def test_the_stream_gives_the_window_schemes_text_on_random_tokens(model_dirs):
    """Random ids (special tokens among them, byte tokens that split characters), with and without stop strings,
    for every dev architecture's tokenizer and a Metaspace byte-fallback one: piece for piece the same text."""
    import random

    from transformers import AutoTokenizer

    from hpcllm.devmodels import ARCHITECTURES
    from hpcllm.worker.detokenizer import prompt_context, text_decoder

    rng = random.Random(1)
    tokenizers = [AutoTokenizer.from_pretrained(model_dirs[arch]) for arch in ARCHITECTURES]
    tokenizers.append(metaspace_byte_fallback_tokenizer())
    for tokenizer in tokenizers:
        streamed_to_the_end = 0
        for trial in range(300):
            ids = random_ids(rng, tokenizer, rng.randrange(1, 48))
            stop = ["e", "th", "日"][: trial % 4]
            context = prompt_context(text_decoder(tokenizer), random_ids(rng, tokenizer, trial % 8))
            window, stream, streamed = run_both(tokenizer, ids, stop, context)
            assert stream == window, (ids, stop, context)
            streamed_to_the_end += streamed
        assert streamed_to_the_end > 150  # the stream, not the fallback, produced most of it


def test_multibyte_text_through_the_stream_is_never_split(model_dirs):
    from transformers import AutoTokenizer

    text = "héllo 日本語 🙂🚀 ok ünïcödé ∑∫ 한국어"
    for tokenizer in (AutoTokenizer.from_pretrained(model_dirs["llama"]), metaspace_byte_fallback_tokenizer()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        window, (pieces, _), streamed = run_both(tokenizer, ids)
        assert (pieces, None) == window
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in piece for piece in pieces)
        assert streamed


def test_special_tokens_are_skipped_through_the_stream(model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    ids = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id, *ids[:1], tokenizer.eos_token_id, tokenizer.pad_token_id, *ids[1:]]
    window, (pieces, _), _ = run_both(tokenizer, ids)
    assert (pieces, None) == window
    assert "".join(pieces) == "hello there"


def test_a_continuation_gets_the_text_it_adds_to_its_prompt_with_a_leading_space_a_metaspace_decoder_strips(
        model_dirs, load_pair, make_engine):
    """A Llama-2-style decoder strips the space of the text's first token: decoded alone, a completion's first
    token lost its space ("The capital is" + "Paris", not " Paris" as vLLM and transformers' decode of prompt and
    output give). The detokenizer reads the prompt's last ids for context, in both schemes, and the engine's
    request text is what the output adds to the prompt's."""
    from transformers import AutoTokenizer

    from hpcllm.worker.detokenizer import prompt_context, text_decoder
    from hpcllm.worker.protocol import GenerateRequest

    tokenizers = [metaspace_byte_fallback_tokenizer(), AutoTokenizer.from_pretrained(model_dirs["llama"])]
    for tokenizer in tokenizers:
        for prompt, completion in (("The capital is", " the city of light"), ("héllo", " wörld 🙂"), ("a", "b c")):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
            assert ids[:len(prompt_ids)] == prompt_ids
            output, prefix = ids[len(prompt_ids):], tokenizer.decode(prompt_ids)
            expected = tokenizer.decode(ids)[len(prefix):]
            window, (pieces, _), _ = run_both(tokenizer, output, context=prompt_context(text_decoder(tokenizer),
                                                                                      prompt_ids))
            assert (pieces, None) == window and "".join(pieces) == expected == completion, tokenizer
    metaspace = tokenizers[0]
    # A prompt of ids ending inside a character (日's first byte): no context, neither scheme could emit it whole.
    assert prompt_context(text_decoder(metaspace), [5, metaspace.convert_tokens_to_ids("<0xE6>")]) == []
    model, _ = load_pair("llama")
    engine = make_engine(model, metaspace)  # a vocabulary the model's covers: its ids are the model's too
    prompt_ids = metaspace("The capital is", add_special_tokens=False)["input_ids"]
    th = metaspace.convert_tokens_to_ids("▁th")  # one token: a space and "th"
    done = engine.generate(GenerateRequest(request_id="metaspace", prompt_token_ids=prompt_ids, max_tokens=2,
                                           temperature=0, ignore_eos=True, logit_bias={th: 100.0}))
    assert done.token_ids == [th, th] and done.text == " th th"


def test_a_stream_that_refuses_a_step_hands_over_to_the_window_scheme():
    """tokenizers raises when a decoder rewrote earlier text ("invalid prefix"); a stream that says "nothing yet"
    where the window scheme has text is out of step: in both cases the text is the window scheme's."""
    text = "héllo wörld 🙂 done"

    def refusing(after):
        calls = [0]

        def step(token):
            calls[0] += 1
            if calls[0] > after:
                raise Exception("Invalid prefix encountered")
            return None  # holds back everything until it refuses

        return step

    expected, _ = stream(text)
    for after in (0, 3, 9):
        detok = IncrementalDetokenizer(byte_decode, stream=refusing(after))
        pieces = [detok.add(b) for b in text.encode()] + [detok.flush()]
        assert pieces == expected


def test_a_resumed_request_rebuilds_the_same_detokenizer_from_its_tokens(model_dirs):
    """Migration: the destination feeds the output so far through a new detokenizer, then goes on; the text from
    the resume index on is what the source would have sent."""
    import threading

    from transformers import AutoTokenizer

    from hpcllm.worker.detokenizer import decode_streams, text_decoder

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    ids = tokenizer("résumé 🙂 of the stream, then more", add_special_tokens=False)["input_ids"]
    new_stream = decode_streams(tokenizer, threading.Lock())
    source = IncrementalDetokenizer(text_decoder(tokenizer), stream=new_stream())
    source_pieces = [source.add(t) for t in ids]
    for cut in range(len(ids)):
        destination = IncrementalDetokenizer(text_decoder(tokenizer), stream=new_stream())
        for token in ids[:cut]:
            destination.add(token)
        assert [destination.add(t) for t in ids[cut:]] == source_pieces[cut:]


def test_a_token_completing_two_stop_strings_reports_the_one_that_completes_first():
    """One token that completes two stop strings: the choice's stop_reason is the one that completes first in the
    text and the text ends before it (the answer the text would give one character at a time); when both complete
    at the same character, the one the request lists first. vLLM's check_stop_strings does the same."""
    vocab = ["x", "ab", "abcd"]

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    cases = [
        (["ab", "a"], 1, ("x", "a")),  # "a" completes before "ab"
        (["a", "ab"], 1, ("x", "a")),
        (["abcd", "bc"], 2, ("xa", "bc")),  # "bc" completes first, though "abcd" starts first
        (["bc", "abcd"], 2, ("xa", "bc")),
        (["ab", "b"], 1, ("x", "ab")),  # both complete at the "b": the one listed first
        (["b", "ab"], 1, ("xa", "b")),
    ]
    for stop, token, expected in cases:
        detok = IncrementalDetokenizer(decode, stop)
        text = detok.add(0) + detok.add(token)
        assert (text, detok.stop_hit) == expected, stop
