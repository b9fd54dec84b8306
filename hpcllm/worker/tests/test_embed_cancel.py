"""An embedding call made with a request_id is cancelled by it (POST cancel, as a generation is): the gateway cancels
a batch's pooling call so when its process closes. The call ends at once, the pieces of it not yet run are skipped,
and the engine goes on."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from hpcllm.worker.engine import DuplicateRequest, EngineOverloaded
from hpcllm.worker.protocol import EmbedRequest


def test_an_embedding_call_is_cancelled_by_its_request_id(load_pair, make_engine):
    engine = make_engine(*load_pair("llama"), prefill_chunk_tokens=4)  # one input per piece
    first_piece, go_on = threading.Event(), threading.Event()
    pieces: list = []
    embed = engine._embed

    def held(piece):  # the engine thread runs the call's first piece, then waits: the call is in progress
        pieces.append(piece)
        first_piece.set()
        assert go_on.wait(60)
        return embed(piece)

    engine._embed = held
    outcome: list = []

    def call() -> None:
        try:
            outcome.append(engine.embed([[5, 6, 7], [8, 9, 10], [11, 12, 13]], request_id="pool-1"))
        except EngineOverloaded as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert first_piece.wait(60)
    with pytest.raises(DuplicateRequest):  # the id is the call's while it runs
        engine.embed([[5]], request_id="pool-1")
    tokens = engine.cancel("pool-1")
    assert (tokens.request_id, tokens.state, tokens.finish_reason) == ("pool-1", "finished", "abort")
    caller.join(60)
    assert not caller.is_alive(), "the cancelled call still waits for its pieces"
    assert isinstance(outcome[0], EngineOverloaded) and "cancelled" in str(outcome[0])
    go_on.set()
    engine._embed = embed
    assert len(engine.embed([[8, 9]], request_id="pool-1")) == 1  # the engine goes on; the id is free again
    assert len(pieces) == 1  # the cancelled call's other pieces were skipped


@pytest.mark.parametrize("bad", ["a/b", "id with spaces", "x" * 129, ""])
def test_an_embedding_call_id_that_cannot_be_cancelled_by_url_is_refused(bad):
    """The id travels in the cancel's URL (CANCEL_PATH): a generation's pattern, checked when the call is made, not
    a cancel that never finds it."""
    with pytest.raises(ValidationError, match="request_id"):
        EmbedRequest(inputs=[[1, 2]], request_id=bad)
    assert EmbedRequest(inputs=[[1, 2]], request_id="batch_req_0a1b-pool-2c3d:4.e").request_id
