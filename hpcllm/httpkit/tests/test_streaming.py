"""ChunkedDecoder: a chunked body fed in arbitrary pieces decodes to exactly its data, and bad framing is refused.
(The reader on a real socket: hpcllm/worker/tests/test_client_stream.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcllm.httpkit.streaming import ChunkedDecoder, StreamBroken


def encode(chunks: list[bytes], extension: bool = False, trailers: bool = False) -> bytes:
    ext = b";name=value" if extension else b""
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c)
    return body + b"0" + ext + b"\r\n" + (b"X-Trailer: yes\r\n" if trailers else b"") + b"\r\n"


def feed_in_pieces(encoded: bytes, cuts: list[int]) -> tuple[list[bytes], bool]:
    decoder, out, last = ChunkedDecoder(), [], 0
    for cut in sorted(set(cuts)) + [len(encoded)]:
        out.append(decoder.feed(encoded[last:cut]))
        last = cut
    return out, decoder.done


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=12), extension=st.booleans(), trailers=st.booleans(),
       cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=20))
def test_any_split_of_a_chunked_body_decodes_to_its_data(chunks, extension, trailers, cuts):
    encoded = encode(chunks, extension, trailers)
    pieces, done = feed_in_pieces(encoded, [c for c in cuts if c < len(encoded)])
    assert b"".join(pieces) == b"".join(chunks)
    assert done


def test_data_in_a_piece_comes_out_of_that_piece():
    """Nothing is held back waiting for the rest of a chunk: a reader passes on what has arrived."""
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a\r\n01234") == b"01234"
    assert decoder.feed(b"56789\r\n3\r") == b"56789"
    assert decoder.feed(b"\nabc\r\n") == b"abc"
    assert not decoder.done
    assert decoder.feed(b"0\r\n\r\n") == b""
    assert decoder.done


def test_bytes_after_the_end_are_not_body():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n") == b"ok"
    assert decoder.done


@pytest.mark.parametrize("bad", [
    b"zz\r\n",  # not hex
    b"-1\r\nx\r\n",  # a sign
    b"0x2\r\nab\r\n",  # a prefix
    b"2\r\nabXY",  # data not followed by CRLF
    b"1" * 20 + b"\r\n",  # a size nobody sends
    b"1;" + b"e" * 5000,  # a size line without end
])
def test_bad_framing_is_refused(bad):
    with pytest.raises(StreamBroken):
        ChunkedDecoder().feed(bad)
