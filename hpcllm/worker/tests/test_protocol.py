"""Stream lines as the worker writes them: token lines filled into a template are the bytes pydantic would write."""

import pytest

from hpcllm.worker.protocol import (
    FinalLine,
    TokenLine,
    TokenLogprobs,
    TopLogprob,
    Usage,
    parse_stream_line,
    stream_line_bytes,
    stream_line_json,
)

EVERY_CHARACTER = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]  # surrogates are not text


def pydantic_line(line) -> bytes:
    return stream_line_json(line) + b"\n"


def test_token_lines_are_pydantics_bytes_for_every_character():
    for start in range(0, len(EVERY_CHARACTER), 2048):
        text = "".join(EVERY_CHARACTER[start : start + 2048])
        line = TokenLine(index=start, token_id=start % 1000, text=text)
        assert stream_line_bytes(line) == pydantic_line(line), f"characters from U+{ord(text[0]):04X}"


@pytest.mark.parametrize("text", ["", " hello", '"quoted" \\ back\\slash', "tab\tnew\nline\r\x00\x1f\x7f",
                                  "日本語 🙂", "\u2028\u2029", "</script>"])
def test_token_lines_round_trip(text):
    line = TokenLine.model_construct(index=7, token_id=123456, text=text, logprobs=None)
    raw = stream_line_bytes(line)
    assert raw == pydantic_line(TokenLine(index=7, token_id=123456, text=text))
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1  # one NDJSON line, whatever the text
    assert parse_stream_line(raw) == TokenLine(index=7, token_id=123456, text=text)


def test_lines_with_logprobs_and_final_lines_go_through_pydantic():
    with_logprobs = TokenLine(index=0, token_id=5, text="a", logprobs=TokenLogprobs(
        token="a", logprob=-0.5, top=[TopLogprob(token_id=5, token="a", logprob=-0.5)]))
    final = FinalLine(finish_reason="stop", stop_reason="END", usage=Usage(prompt_tokens=1, completion_tokens=2,
                                                                             total_tokens=3))
    for line in (with_logprobs, final):
        assert stream_line_bytes(line) == pydantic_line(line)
        assert parse_stream_line(stream_line_bytes(line)) == line
