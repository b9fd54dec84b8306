"""A response asked to be stored (store true, OpenAI's default) that could not be kept once its output was known (it
took the response over gateway.responses_max_bytes, or its key over its quota, or the database refused it) is still
answered, and says why it was not kept: `store: false` and a `store_error` ({code, message}: what it means for
retrieval and previous_response_id, and what to do), whole and streamed (in response.completed). A stored response,
and one sent with store false, carry none."""

from __future__ import annotations

from dataclasses import replace

import openai
import pytest

from hpcllm.gateway.response_store import Kept, NewResponse

from .conftest import MODEL
from .test_responses_store import _message, _response, store_at  # noqa: F401 (store_at: a fixture)


def _store_error(response) -> dict | None:
    return (response.model_extra or {}).get("store_error")


def _answers(client: openai.OpenAI, **body) -> list:
    """The response answered whole, and the one a stream's last event carries."""
    whole = client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0, **body)
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0, stream=True,
                                          **body))
    return [whole, events[-1].response]


def test_a_response_whose_output_takes_it_over_the_bound_says_it_was_not_stored(make_gateway):
    small = make_gateway(responses_max_bytes=500)  # the input fits; the response object and output do not
    client = small.client()
    for response in _answers(client):
        assert response.store is False
        error = _store_error(response)
        assert error is not None and error["code"] == "storage_limit_exceeded", response
        assert "500 bytes" in error["message"] and "gateway.responses_max_bytes" in error["message"], error
        assert "previous_response_id" in error["message"], error  # what it means for the next turn
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)
    for response in _answers(client, store=False):  # not stored as asked: nothing to signal
        assert response.store is False and _store_error(response) is None


def test_the_store_says_why_a_response_asked_to_be_stored_was_not(store_at):
    """Kept.refused: "bound" for a response larger than the whole bound, "quota" for one whose key's stored bytes
    reached its quota meanwhile (another of its responses crossed it while this one generated); None when stored, or
    not asked to be."""
    make, now = store_at
    store = make(ttl_s=3600, max_bytes=2000, max_bytes_per_key=600)
    assert store.put("alice", _response(1)) == Kept(stored=True, appended=False)
    crossing = NewResponse(input=[_message("msg_big", "x" * 700)], response={"id": "resp_big", "output": []})
    assert store.put("alice", crossing) == Kept(stored=True, appended=False)  # under its quota when it began
    assert store.put("alice", _response(2)) == Kept(stored=False, appended=False, refused="quota")
    huge = NewResponse(input=[_message("msg_huge", "y" * 2500)], response={"id": "resp_huge", "output": []})
    assert store.put("bob", huge) == Kept(stored=False, appended=False, refused="bound")
    assert store.put("bob", replace(huge, store=False)) == Kept(stored=False, appended=False)


def test_a_response_the_database_refuses_says_it_was_not_stored(make_gateway):
    gw = make_gateway()
    with gw.state.shared.connection() as db:
        db.conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON gateway_stored "
                        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    for response in _answers(gw.client()):
        error = _store_error(response)
        assert response.store is False and error is not None and error["code"] == "storage_unavailable", response



def test_a_conversation_turn_whose_output_outgrows_the_bound_says_it_was_not_stored(make_gateway):
    """A turn's output taking its conversation over the whole bound: answered, neither stored nor appended
    (conversation null, the conversation as it was), and store_error saying the conversation's bound."""
    gw = make_gateway(responses_max_bytes=700)  # the conversation and the turn's input fit; its output does not
    client = gw.client()
    conversation = client.conversations.create(items=[{"role": "user", "content": "x" * 200}])
    response = client.responses.create(model=MODEL, conversation=conversation.id, input="hi", max_output_tokens=3,
                                       temperature=0)
    assert response.store is False and response.conversation is None
    error = _store_error(response)
    assert error is not None and error["code"] == "storage_limit_exceeded", response
    assert "its conversation larger" in error["message"] and "700 bytes" in error["message"], error
    assert len(client.conversations.items.list(conversation.id).data) == 1  # as it was
