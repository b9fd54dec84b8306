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
