"""previous_response_id naming a response that was a turn of a conversation: OpenAI's rule is that the two are
exclusive in one request, and that chaining replays everything the previous response's context held. Its context was
the conversation's items before its turn, then its own input and output: the chained request sees them all, as
sending them whole does (the same prompt tokens and greedy answer at the worker)."""

from __future__ import annotations

from .conftest import MODEL
from .test_responses_api import QUESTION
from .test_responses_store import AGAIN, _user

BEFORE = "what came before the turn"


def test_a_response_chained_after_a_conversations_turn_sees_the_conversation_before_it(gateway):
    client = gateway.client()
    conversation = client.conversations.create(items=[_user(BEFORE), _user(QUESTION)])
    turn = client.responses.create(model=MODEL, conversation=conversation.id, input=AGAIN, max_output_tokens=4,
                                   temperature=0)
    assert turn.conversation.id == conversation.id and turn.store
    after_turn = client.responses.create(model=MODEL, conversation=conversation.id, input="not replayed",
                                         max_output_tokens=2, temperature=0, store=False)
    assert after_turn.conversation.id == conversation.id  # a later turn of the conversation: not the chain's

    chained = client.responses.create(model=MODEL, previous_response_id=turn.id, input="once more",
                                      max_output_tokens=4, temperature=0)
    whole = client.responses.create(
        model=MODEL, input=[_user(BEFORE), _user(QUESTION), _user(AGAIN),
                            *(item.model_dump(exclude_none=True) for item in turn.output), _user("once more")],
        max_output_tokens=4, temperature=0, store=False)
    assert (chained.usage.input_tokens, chained.output_text) == (whole.usage.input_tokens, whole.output_text)
    with gateway.state.responses.shared.connection() as db:  # the conversation the chain replays lives as long
        used = {row["id"]: row["used"] for row in db.conn.execute(
            "SELECT id, used FROM gateway_stored WHERE id IN (?, ?)", (conversation.id, chained.id))}
    assert used[conversation.id] == used[chained.id]

    # One link further: the chain still starts with the conversation's items before the turn.
    further = client.responses.create(model=MODEL, previous_response_id=chained.id, input="one more time",
                                      max_output_tokens=2, temperature=0, store=False)
    whole_further = client.responses.create(
        model=MODEL, input=[_user(BEFORE), _user(QUESTION), _user(AGAIN),
                            *(item.model_dump(exclude_none=True) for item in turn.output), _user("once more"),
                            *(item.model_dump(exclude_none=True) for item in chained.output), _user("one more time")],
        max_output_tokens=2, temperature=0, store=False)
    assert further.usage.input_tokens == whole_further.usage.input_tokens
